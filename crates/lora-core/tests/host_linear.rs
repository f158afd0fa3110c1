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
    variant_layer(i, o, bias, r, dropout, Variant::Plain)
}

/// LoRA's forms the layer computes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Plain,
    /// DoRA, its magnitude moved off its initial value (which makes it a plain LoRA).
    Dora,
    /// A random `lora_B` bias.
    LoraBias,
}

fn variant_layer(
    i: usize,
    o: usize,
    bias: bool,
    r: usize,
    dropout: f64,
    variant: Variant,
) -> LoraLinear<Ad> {
    let device = Default::default();
    let mut layer = LoraLinear::<Ad>::new(i, o, bias, 0.2, &device);
    if let Some(b) = &layer.bias {
        let v = Tensor::<Ad, 1>::random([o], Distribution::Normal(0.0, 0.5), &device);
        layer.bias = Some(b.clone().map(|_| v));
    }
    let mut layer = layer.no_grad();
    layer.attach_adapter("fc", r, 2.0, dropout, &InitLoraWeights::Bool(false));
    let noise = || Tensor::<Ad, 1>::random([o], Distribution::Normal(0.0, 0.3), &device);
    match variant {
        Variant::Plain => {}
        Variant::Dora => {
            layer.add_dora("fc");
            let m = layer.lora_magnitude_vector.as_ref().unwrap().weight.val();
            let m = (m * (noise() + 1.0)).into_data().to_vec::<f32>().unwrap();
            assert!(layer.set_adapter_tensor("lora_magnitude_vector", m));
        }
        Variant::LoraBias => {
            layer.add_lora_bias("fc");
            let b = noise().into_data().to_vec::<f32>().unwrap();
            assert!(layer.set_adapter_tensor("lora_B.bias", b));
        }
    }
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

/// `(y, gx, gA, gB, g extra)` of `sum(forward(x) · g)` for a fixed upstream gradient `g`; the
/// last is the gradient of the DoRA magnitude or the `lora_B` bias (`[1, out]`), or of nothing.
fn run(
    layer: &LoraLinear<Ad>,
    x: &Tensor<Flex, 3>,
    g: &Tensor<Flex, 3>,
    reference: bool,
) -> Vec<Tensor<Flex, 2>> {
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
    let mut out = vec![
        y.inner().reshape([b * s, o]),
        gx.reshape([b * s, i]),
        ga,
        gb,
    ];
    let extra = match (
        &layer.lora_magnitude_vector,
        layer.lora_B.as_ref().unwrap().bias.as_ref(),
    ) {
        (Some(m), _) => Some(m.weight.val()),
        (None, Some(b)) => Some(b.val()),
        _ => None,
    };
    if let Some(p) = extra {
        out.push(p.grad(&grads).unwrap().unsqueeze::<2>());
    }
    out
}

fn check(bias: bool, dropout: f64) {
    check_variant(bias, dropout, Variant::Plain);
}

fn check_variant(bias: bool, dropout: f64, variant: Variant) {
    let device = Default::default();
    Ad::seed(&device, 1);
    let (i, o) = (48, 40);
    let layer = variant_layer(i, o, bias, 4, dropout, variant);
    let x = Tensor::<Flex, 3>::random([2, 5, i], Distribution::Normal(0.0, 1.0), &device);
    let g = Tensor::<Flex, 3>::random([2, 5, o], Distribution::Normal(0.0, 1.0), &device);
    let host = run(&layer, &x, &g, false);
    let reference = run(&layer, &x, &g, true);
    assert_eq!(host.len(), if variant == Variant::Plain { 4 } else { 5 });
    for (name, (h, r)) in ["y", "grad x", "grad A", "grad B", "grad magnitude/bias"]
        .iter()
        .zip(host.into_iter().zip(reference))
    {
        let (err, scale) = err_and_scale(h, r);
        println!("{variant:?}, bias {bias}, dropout {dropout}: {name} max |host - reference| {err:.2e} (max |ref| {scale:.2})");
        assert!(
            scale > 0.1,
            "{name}: reference is (near) zero, the check is empty"
        );
        assert!(err <= 1e-5 * scale, "{name}: host path differs by {err}");
    }
}

#[test]
fn host_dora_and_lora_bias_match_burn_ops() {
    // DoRA's fused form rearranges PEFT's terms (`g ⊙ F(x) + b`, and `(x − xd)·Wᵀ + b + g ⊙
    // F(xd)` with dropout); the Burn-ops form is PEFT's own arithmetic.
    let _rng = rng_lock();
    for variant in [Variant::Dora, Variant::LoraBias] {
        check_variant(true, 0.0, variant);
        check_variant(false, 0.0, variant);
        check_variant(true, 0.2, variant);
        check_variant(false, 0.5, variant);
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
