//! Generation speed on the CPU backend (Flex): prompt (prefill) and decode tokens per second on the
//! `mini` config — Qwen2.5-0.5B's layer shape (hidden 896, MLP 4864, 14/2 heads) with 4 layers and
//! the real vocabulary (151,936, tied head), random weights. `scripts/bench_generate.py` measures
//! transformers' `generate` on the same shape, prompt length and token count.
//!
//! * `prefill`: one cached forward of the prompt and the last position's logits.
//! * `decode`: `qwen2::generate` greedy with `NEW + 1` new tokens; only the `NEW` single-token steps
//!   after the first token are timed (`Generation::decode_secs`), each including its argmax.

use std::hint::black_box;
use std::time::Duration;

use burn::tensor::{Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferrolora::Cpu;
use qwen2::{generate, GenerationConfig, KvCache, Qwen2Config, Qwen2ForCausalLM};

const PROMPT: usize = 128;
const NEW: usize = 32;

fn mini() -> Qwen2ForCausalLM<Cpu> {
    let cfg = Qwen2Config::new(151_936, 896, 4864, 4, 14, 2, true);
    Qwen2ForCausalLM::<Cpu>::new(&cfg, &Default::default())
}

fn prompt() -> Vec<u32> {
    (0..PROMPT as u32)
        .map(|i| (i * 7919 + 13) % 151_000)
        .collect()
}

fn bench_generate(c: &mut Criterion) {
    let dev = Default::default();
    let model = mini();
    let prompt = prompt();
    let mut g = c.benchmark_group("generate_mini");
    g.sample_size(10);

    g.throughput(Throughput::Elements(PROMPT as u64));
    g.bench_function(
        BenchmarkId::new("flex/prefill_tokens", format!("p{PROMPT}")),
        |b| {
            b.iter(|| {
                let ids = Tensor::<Cpu, 2, Int>::from_data(
                    TensorData::new(
                        prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                        [1, PROMPT],
                    ),
                    &dev,
                );
                let mut cache = KvCache::new(model.model.layers.len());
                black_box(model.forward_step_last(black_box(ids), &mut cache)).into_data()
            })
        },
    );

    let cfg = GenerationConfig {
        max_new_tokens: NEW + 1,
        eos_token_id: vec![],
        ..Default::default()
    };
    g.throughput(Throughput::Elements(NEW as u64));
    g.bench_function(
        BenchmarkId::new("flex/decode_tokens", format!("p{PROMPT}+n{NEW}")),
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let out = generate(&model, black_box(&prompt), &cfg, &dev, |_| true);
                    assert_eq!(out.tokens.len(), NEW + 1);
                    total += Duration::from_secs_f64(out.decode_secs);
                }
                total
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench_generate);
criterion_main!(benches);
