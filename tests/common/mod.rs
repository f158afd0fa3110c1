//! Tensor helpers of the workspace-level integration tests (the rest is in `test-support`).
#![allow(dead_code)] // each test binary uses its own subset

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use test_support::Ref;

/// A 2-D id tensor (input ids, attention mask, labels) from a reference's I64 values.
pub fn int2<B: Backend>(r: &Ref) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(r.i64.clone(), [r.shape[0], r.shape[1]]),
        &Default::default(),
    )
}

/// A float tensor's values, as f32.
pub fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}
