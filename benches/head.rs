//! The CPU output head of training: softmax cross-entropy through Qwen2.5's tied embedding
//! (151,936 × 896, f32) for the supervised rows of one step, loss and input gradient, with
//! `kernels::cpu::fused_linear_cross_entropy` (vocabulary-blocked, no `[rows, vocab]` logits). Two products
//! of `rows × 896 × 151,936` multiply-adds: the throughput is reported in FLOP.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kernels::cpu::fused_linear_cross_entropy;

fn head(c: &mut Criterion) {
    let (vocab, hidden) = (151_936usize, 896usize);
    let mut g = c.benchmark_group("fused_head_xent");
    g.sample_size(10);
    let mut s = 1u64;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    };
    let weight: Vec<f32> = (0..vocab * hidden).map(|_| next()).collect();
    // 73 rows: a real Huanhuan step of 4 records; 1024: random 4 × 384 with a third masked.
    for rows in [73usize, 256, 1024] {
        let x: Vec<f32> = (0..rows * hidden).map(|_| next()).collect();
        let targets: Vec<i64> = (0..rows).map(|i| (i * 7919 % vocab) as i64).collect();
        g.throughput(Throughput::Elements((4 * rows * hidden * vocab) as u64));
        g.bench_with_input(
            BenchmarkId::new("flex/flop", format!("{rows}x{hidden}x{vocab}")),
            &x,
            |b, x| {
                b.iter(|| {
                    black_box(fused_linear_cross_entropy(
                        x,
                        &weight,
                        &targets,
                        hidden,
                        rows as f32,
                    ))
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, head);
criterion_main!(benches);
