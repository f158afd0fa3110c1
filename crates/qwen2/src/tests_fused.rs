//! The fused CPU operations of `kernels::cpu` that the model uses, against the Burn-ops forms
//! they replace (which stay this crate's definition): outputs and every input gradient.

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Distribution, Tensor};

type Ad = Autodiff<Flex>;

fn bits(t: Tensor<Flex, 2>) -> Vec<u32> {
    t.into_data()
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn fused_swiglu_equals_burn_ops_bit_for_bit() {
    let device = Default::default();
    // More elements than one parallel task, and values of both signs and large magnitude.
    let dims = [3, 2 * (1 << 14) / 3 + 5];
    let dist = Distribution::Normal(0.0, 6.0);
    let g0 = Tensor::<Flex, 2>::random(dims, dist, &device);
    let u0 = Tensor::<Flex, 2>::random(dims, dist, &device);
    let up = Tensor::<Flex, 2>::random(dims, dist, &device);
    let run = |fused: bool| {
        let g = Tensor::<Ad, 2>::from_inner(g0.clone()).require_grad();
        let u = Tensor::<Ad, 2>::from_inner(u0.clone()).require_grad();
        let h = if fused {
            kernels::cpu::swiglu(&g, &u).expect("the fused path")
        } else {
            silu(g.clone()) * u.clone()
        };
        let grads = (h.clone() * Tensor::from_inner(up.clone()))
            .sum()
            .backward();
        [h.inner(), g.grad(&grads).unwrap(), u.grad(&grads).unwrap()]
    };
    let (fused, reference) = (run(true), run(false));
    for (name, (f, r)) in ["h", "grad gate", "grad up"]
        .iter()
        .zip(fused.into_iter().zip(reference))
    {
        assert_eq!(bits(f), bits(r), "{name}");
    }
}

fn values(t: Tensor<Flex, 4>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn fused_rope_equals_burn_ops() {
    use crate::RopeCache;
    use burn::tensor::{Int, TensorData};
    let device = Default::default();
    let (b, s, h, d) = (2, 7, 3, 8);
    // Per-row positions (left padding in the first row), and one shared row of positions.
    let rows = TensorData::new(vec![0i64, 0, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [b, s]);
    let shared = TensorData::new((0..s as i64).collect::<Vec<_>>(), [1, s]);
    for pos in [rows, shared] {
        let pos = Tensor::<Ad, 2, Int>::from_data(pos, &device);
        let rope = RopeCache::new(pos, 10_000.0, d, DType::F32);
        let x0 = Tensor::<Flex, 4>::random([b, s, h, d], Distribution::Normal(0.0, 2.0), &device);
        let up = Tensor::<Flex, 4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = Tensor::<Ad, 4>::from_inner(x0.clone()).require_grad();
            let y = if fused {
                kernels::cpu::rope(&x, &rope.cos, &rope.sin)
                    .expect("the fused path")
                    .swap_dims(1, 2)
            } else {
                rope.apply(x.clone().swap_dims(1, 2))
            };
            let grads = (y.clone() * Tensor::from_inner(up.clone()))
                .sum()
                .backward();
            (values(y.inner()), values(x.grad(&grads).unwrap()))
        };
        let ((y, gx), (y_ref, gx_ref)) = (run(true), run(false));
        assert_eq!(y, y_ref, "rotated values");
        assert_eq!(gx, gx_ref, "gradient");
        assert!(y.iter().any(|v| v.abs() > 1.0));
    }
}

#[test]
fn fused_rms_norm_matches_burn_ops() {
    use crate::Qwen2RmsNorm;
    use burn::module::Module;
    let device = Default::default();
    let (rows, n) = (19, 40);
    let norm = Qwen2RmsNorm::<Ad>::new(n, 1e-6, &device).no_grad();
    let w = Tensor::<Ad, 1>::random([n], Distribution::Normal(1.0, 0.5), &device);
    let norm = Qwen2RmsNorm {
        weight: norm.weight.map(|_| w.set_require_grad(false)),
        eps: norm.eps,
    };
    let x0 = Tensor::<Flex, 3>::random([1, rows, n], Distribution::Normal(0.0, 3.0), &device);
    let up = Tensor::<Flex, 3>::random([1, rows, n], Distribution::Normal(0.0, 1.0), &device);
    let run = |fused: bool| {
        let x = Tensor::<Ad, 3>::from_inner(x0.clone()).require_grad();
        let y = if fused {
            kernels::cpu::rms_norm(&x, &norm.weight.val(), norm.eps).expect("the fused path")
        } else {
            norm.forward_reference(x.clone())
        };
        let grads = (y.clone() * Tensor::from_inner(up.clone()))
            .sum()
            .backward();
        let flat = |t: Tensor<Flex, 3>| t.into_data().to_vec::<f32>().unwrap();
        (flat(y.inner()), flat(x.grad(&grads).unwrap()))
    };
    let ((y, gx), (y_ref, gx_ref)) = (run(true), run(false));
    for (name, a, b) in [("y", &y, &y_ref), ("grad x", &gx, &gx_ref)] {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            scale > 0.1 && err <= 2e-6 * scale,
            "{name}: {err} of {scale}"
        );
    }
}

#[test]
fn fused_attention_matches_burn_ops() {
    use crate::attention::attention_reference;
    use crate::{additive_mask, attention_mask_4d, AttentionBias};
    use burn::tensor::{Int, TensorData};
    use kernels::cpu::AttentionMask;
    let device = Default::default();
    let (nh, nkv, d) = (6, 2, 8);
    // Left padding (row 0's first two queries see no key at all: uniform attention, as in
    // transformers), and a packed row of three sequences.
    let pad = Tensor::<Ad, 2, Int>::from_data(
        TensorData::new(vec![0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 7]),
        &device,
    );
    let dense = AttentionBias::Dense(additive_mask(attention_mask_4d(Some(pad), 2, 7, &device)));
    let packed = AttentionBias::Packed(
        [3usize, 5, 6]
            .iter()
            .map(|&n| additive_mask(attention_mask_4d::<Ad>(None, 1, n, &device)))
            .collect(),
    );
    for (bias, b, s) in [(dense, 2, 7), (packed, 1, 14)] {
        let dist = Distribution::Normal(0.0, 1.5);
        let q0 = Tensor::<Flex, 4>::random([b, s, nh, d], dist, &device);
        let k0 = Tensor::<Flex, 4>::random([b, s, nkv, d], dist, &device);
        let v0 = Tensor::<Flex, 4>::random([b, s, nkv, d], dist, &device);
        let up = Tensor::<Flex, 4>::random([b, s, nh, d], dist, &device);
        let run = |fused: bool| {
            let leaf = |t: &Tensor<Flex, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
            let (q, k, v) = (leaf(&q0), leaf(&k0), leaf(&v0));
            let y = if fused {
                let mask = match &bias {
                    AttentionBias::Dense(m) => AttentionMask::Dense(m),
                    AttentionBias::Packed(m) => AttentionMask::Packed(m),
                    AttentionBias::Full => unreachable!("not built here"),
                };
                kernels::cpu::attention(&q, &k, &v, mask).expect("the fused path")
            } else {
                // [batch, seq, heads, head_dim] <-> [batch, heads, seq, head_dim]
                let heads_first = |t: &Tensor<Ad, 4>| t.clone().swap_dims(1, 2);
                attention_reference(heads_first(&q), heads_first(&k), heads_first(&v), &bias)
                    .swap_dims(1, 2)
            };
            let grads = (y.clone() * Tensor::from_inner(up.clone()))
                .sum()
                .backward();
            [
                y.inner(),
                q.grad(&grads).unwrap(),
                k.grad(&grads).unwrap(),
                v.grad(&grads).unwrap(),
            ]
            .map(values)
        };
        let (fused, reference) = (run(true), run(false));
        for (name, (a, r)) in ["out", "grad q", "grad k", "grad v"]
            .iter()
            .zip(fused.iter().zip(&reference))
        {
            let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(r).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                scale > 0.1 && err <= 2e-6 * scale,
                "{name} (batch {b}): {err} of {scale}"
            );
        }
    }
}
