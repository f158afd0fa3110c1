//! The CPU training path of `LoraLinear::forward` (one operation with its own backward) against
//! `forward_reference` (Burn ops): outputs and the gradients of the input and both adapter factors,
//! with and without bias and dropout, from the same seed.

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Tensor};
use lora_core::{InitLoraWeights, LoraLinear, LoraWeight};
use test_support::{max_abs, max_abs_err, rng_lock};

type Ad = Autodiff<Flex>;

/// A layer with a frozen base (and non-zero frozen bias), as `apply_lora` leaves it, and an adapter
/// with non-zero `B`.
fn layer(i: usize, o: usize, bias: bool, r: usize, dropout: f64) -> LoraLinear<Ad> {
    let device = Default::default();
    let mut layer = LoraLinear::<Ad>::new(i, o, bias, 0.2, &device);
    if let Some(b) = &layer.bias {
        let v = Tensor::<Ad, 1>::random([o], Distribution::Normal(0.0, 0.5), &device);
        layer.bias = Some(b.clone().map(|_| v));
    }
    let mut layer = layer.no_grad();
    layer.attach_adapter("fc", r, 2.0, dropout, &InitLoraWeights::Bool(false));
    assert!(layer.runs_fused(DType::F32));
    assert!(!layer.runs_fused(DType::BF16));
    layer
}

/// Max `|a - b|` and max `|b|`.
fn err_and_scale(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> (f32, f32) {
    let a = a.into_data().to_vec::<f32>().unwrap();
    let b = b.into_data().to_vec::<f32>().unwrap();
    (max_abs_err(&a, &b), max_abs(&b))
}

/// The gradients of `lora_A` and `lora_B`.
fn adapter_grads(
    layer: &LoraLinear<Ad>,
    grads: &<Ad as AutodiffBackend>::Gradients,
) -> (Tensor<Flex, 2>, Tensor<Flex, 2>) {
    let grad = |w: &Option<LoraWeight<Ad>>| w.as_ref().unwrap().weight.val().grad(grads).unwrap();
    (grad(&layer.lora_A), grad(&layer.lora_B))
}

/// `(y, gx, gA, gB)` of `sum(forward(x) · g)` for a fixed upstream gradient `g`.
fn run(
    layer: &LoraLinear<Ad>,
    x: &Tensor<Flex, 3>,
    g: &Tensor<Flex, 3>,
    reference: bool,
) -> [Tensor<Flex, 2>; 4] {
    let device = Default::default();
    Ad::seed(&device, 7);
    let x = Tensor::<Ad, 3>::from_inner(x.clone()).require_grad();
    let y = if reference {
        layer.forward_reference(x.clone())
    } else {
        layer.forward(x.clone())
    };
    let grads = (y.clone() * Tensor::from_inner(g.clone())).sum().backward();
    let [b, s, o] = y.dims();
    let gx = x.grad(&grads).unwrap();
    let i = gx.dims()[2];
    let (ga, gb) = adapter_grads(layer, &grads);
    [
        y.inner().reshape([b * s, o]),
        gx.reshape([b * s, i]),
        ga,
        gb,
    ]
}

fn check(bias: bool, dropout: f64) {
    let device = Default::default();
    Ad::seed(&device, 1);
    let (i, o) = (48, 40);
    let layer = layer(i, o, bias, 4, dropout);
    let x = Tensor::<Flex, 3>::random([2, 5, i], Distribution::Normal(0.0, 1.0), &device);
    let g = Tensor::<Flex, 3>::random([2, 5, o], Distribution::Normal(0.0, 1.0), &device);
    let host = run(&layer, &x, &g, false);
    let reference = run(&layer, &x, &g, true);
    for (name, (h, r)) in ["y", "grad x", "grad A", "grad B"]
        .iter()
        .zip(host.into_iter().zip(reference))
    {
        let (err, scale) = err_and_scale(h, r);
        println!("bias {bias}, dropout {dropout}: {name} max |host - reference| {err:.2e} (max |ref| {scale:.2})");
        assert!(
            scale > 0.1,
            "{name}: reference is (near) zero, the check is empty"
        );
        assert!(err <= 1e-5 * scale, "{name}: host path differs by {err}");
    }
}

#[test]
fn host_linear_matches_burn_ops_without_dropout() {
    let _rng = rng_lock();
    check(false, 0.0);
    check(true, 0.0);
}

#[test]
fn host_linear_matches_burn_ops_with_dropout() {
    // Equal results need equal masks: both paths draw the dropout key from the seeded backend RNG.
    let _rng = rng_lock();
    check(true, 0.1);
    check(false, 0.5);
}

#[test]
fn host_linear_dropout_changes_the_output() {
    // Guards the test above against a dropout that silently does nothing on one path.
    let device = Default::default();
    let mut layer = layer(32, 16, false, 4, 0.5);
    let x = Tensor::<Ad, 2>::random([8, 32], Distribution::Normal(0.0, 1.0), &device);
    let with = layer.forward(x.clone()).inner();
    layer.lora_dropout = None;
    let without = layer.forward(x).inner();
    let (err, _) = err_and_scale(with, without);
    assert!(err > 1e-3, "dropout 0.5 left the output unchanged ({err})");
}

#[test]
fn frozen_input_gets_no_gradient_but_adapters_do() {
    // An untracked input (an embedding output, say): only A and B are parents of the operation.
    let device = Default::default();
    let layer = layer(24, 12, true, 2, 0.1);
    let x = Tensor::<Ad, 2>::random([6, 24], Distribution::Normal(0.0, 1.0), &device);
    let grads = layer.forward(x.clone()).sum().backward();
    assert!(x.grad(&grads).is_none());
    let (ga, gb) = adapter_grads(&layer, &grads);
    assert_eq!(ga.dims(), [2, 24]);
    assert_eq!(gb.dims(), [12, 2]);
    assert!(
        layer.weight.val().grad(&grads).is_none(),
        "the base stays frozen"
    );
    assert!(layer.bias.as_ref().unwrap().val().grad(&grads).is_none());
}
