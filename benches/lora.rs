//! What LoRA adds to a linear layer: forward + backward of `LoraLinear` with a rank-8 adapter vs the
//! same frozen linear without one, at Qwen2.5-7B's MLP shape (3584 -> 18944), on Flex under autodiff.
//! The base weight is frozen in both cases; the loss is a plain sum so backward cost is the layer's.

use std::hint::black_box;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_core::{InitLoraWeights, LoraLinear};

type Ad = Autodiff<Flex>;

fn lora_vs_plain(c: &mut Criterion) {
    let dev = Default::default();
    let mut g = c.benchmark_group("linear_fwd_bwd_7b_mlp");
    g.sample_size(10);
    let (tokens, din, dout, r) = (128usize, 3584usize, 18944usize, 8usize);
    let frozen = || {
        let mut l = LoraLinear::<Ad>::new(din, dout, false, 0.02, &dev);
        l.weight = l.weight.clone().set_require_grad(false);
        l
    };
    let plain = frozen();
    let mut lora = frozen();
    lora.attach_adapter("up_proj", r, 4.0, 0.0, &InitLoraWeights::Bool(false));
    // Input needs a gradient, as a layer inside a network does.
    let x = Tensor::<Ad, 3>::random([1, tokens, din], Distribution::Default, &dev).require_grad();
    g.throughput(Throughput::Elements(tokens as u64));
    for (name, layer) in [("plain", &plain), ("lora_r8", &lora)] {
        g.bench_with_input(
            BenchmarkId::new(
                format!("flex/{name}/tokens"),
                format!("{tokens}x{din}->{dout}"),
            ),
            &x,
            |b, x| {
                b.iter(|| {
                    let y = layer.forward(x.clone());
                    black_box(y.sum().backward());
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, lora_vs_plain);
criterion_main!(benches);
