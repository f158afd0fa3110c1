//! Forward throughput of the model's building blocks on the CPU backend (Flex).
//! Ids carry the backend and the shape; throughput is in elements (tokens) per second, and the
//! GEMM-bound cases report FLOP via criterion's `Throughput::Elements` on the FLOP count.

use burn::tensor::{Distribution, Int, Tensor};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferrolora::Cpu;
use lora_core::LoraLinear;
use qwen2::{Qwen2Config, Qwen2ForCausalLM};

fn linear(c: &mut Criterion) {
    let dev = Default::default();
    let mut g = c.benchmark_group("linear_forward");
    g.sample_size(10);
    // Qwen2.5-0.5B MLP up projection at one batch of 4 x 384 tokens.
    for &(tokens, din, dout) in &[(1536usize, 896usize, 4864usize), (384, 896, 4864)] {
        let layer = LoraLinear::<Cpu>::new(din, dout, false, 0.02, &dev);
        let x = Tensor::<Cpu, 3>::random([1, tokens, din], Distribution::Default, &dev);
        g.throughput(Throughput::Elements((2 * tokens * din * dout) as u64));
        g.bench_with_input(
            BenchmarkId::new("flex/flop", format!("{tokens}x{din}->{dout}")),
            &x,
            |b, x| b.iter(|| black_box(layer.forward(x.clone())).into_data()),
        );
    }
    g.finish();
}

fn model_forward(c: &mut Criterion) {
    let dev = Default::default();
    let mut g = c.benchmark_group("qwen2_forward");
    g.sample_size(10);
    // tiny: the fixtures' shape; mini-1: one Qwen2.5-0.5B layer with a small vocab.
    let cases = [
        (
            "tiny",
            Qwen2Config::new(256, 64, 128, 2, 4, 2, true),
            4usize,
            64usize,
        ),
        (
            "mini-1layer",
            Qwen2Config::new(4096, 896, 4864, 1, 14, 2, true),
            1,
            384,
        ),
    ];
    for (name, cfg, batch, seq) in cases {
        let model = Qwen2ForCausalLM::<Cpu>::new(&cfg, &dev);
        let ids =
            Tensor::<Cpu, 2, Int>::random([batch, seq], Distribution::Uniform(0.0, 255.0), &dev);
        g.throughput(Throughput::Elements((batch * seq) as u64));
        g.bench_with_input(
            BenchmarkId::new("flex/tokens", format!("{name}/b{batch}xs{seq}")),
            &ids,
            |b, ids| b.iter(|| black_box(model.forward(ids.clone(), None, None)).into_data()),
        );
    }
    g.finish();
}

criterion_group!(benches, linear, model_forward);
criterion_main!(benches);
