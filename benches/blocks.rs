//! Forward + backward of the model's blocks and whole LoRA train steps on the CPU backend (Flex),
//! under autodiff with the tutorial's LoRA config (r 8 on the seven projections, base frozen), at
//! Qwen2.5-0.5B's layer shape. Ids carry the backend and the shape; throughput is in tokens.
//!
//! `cargo bench --bench blocks` (the `train_step/mini` case takes a few minutes).

use std::hint::black_box;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_core::{apply_lora, LoraConfig};
use lora_data::Batch;
use lora_trainer::TrainableLm;
use qwen2::{
    additive_mask, attention_mask_4d, AttentionBias, Qwen2Config, Qwen2ForCausalLM, RopeCache,
};

type Ad = Autodiff<Flex>;

/// A LoRA-wrapped random Qwen2 with the 0.5B layer shape (`layers`, `vocab` as given).
fn model(layers: usize, vocab: usize) -> (Qwen2Config, Qwen2ForCausalLM<Ad>) {
    let cfg = Qwen2Config::new(vocab, 896, 4864, layers, 14, 2, true);
    let base = Qwen2ForCausalLM::<Ad>::new(&cfg, &Default::default());
    let cfg_lora = LoraConfig {
        lora_dropout: 0.0,
        ..lora_trainer::recipe::lora_config()
    };
    (cfg, apply_lora(base, &cfg_lora).expect("tutorial config").0)
}

fn rope_and_mask(
    cfg: &Qwen2Config,
    batch: usize,
    seq: usize,
) -> (RopeCache<Ad>, AttentionBias<Ad>) {
    let dev = Default::default();
    let positions = Tensor::<Ad, 1, Int>::arange(0..seq as i64, &dev)
        .reshape([1, seq])
        .expand([batch, seq]);
    let rope = RopeCache::new(
        positions,
        cfg.rope_theta(),
        cfg.head_dim(),
        burn::tensor::DType::F32,
    );
    let mask = AttentionBias::Dense(additive_mask(attention_mask_4d::<Ad>(
        None, batch, seq, &dev,
    )));
    (rope, mask)
}

fn input(batch: usize, seq: usize) -> Tensor<Ad, 3> {
    Tensor::<Ad, 3>::random(
        [batch, seq, 896],
        Distribution::Default,
        &Default::default(),
    )
    .require_grad()
}

fn blocks(c: &mut Criterion) {
    let (cfg, m) = model(1, 4096);
    let layer = &m.model.layers[0];
    let mut g = c.benchmark_group("block_fwd_bwd");
    g.sample_size(10);
    for (batch, seq) in [(4usize, 384usize), (1, 2048)] {
        let x = input(batch, seq);
        let (rope, mask) = rope_and_mask(&cfg, batch, seq);
        let id = |name: &str| {
            BenchmarkId::new(format!("flex/{name}/tokens"), format!("b{batch}xs{seq}"))
        };
        g.throughput(Throughput::Elements((batch * seq) as u64));
        g.bench_function(id("rmsnorm"), |b| {
            b.iter(|| black_box(layer.input_layernorm.forward(x.clone()).sum().backward()))
        });
        g.bench_function(id("rope"), |b| {
            // The projections' own layout, as the attention applies it in training.
            let q = x.clone().reshape([batch, seq, 14, 64]);
            b.iter(|| black_box(rope.apply_bshd(q.clone()).sum().backward()))
        });
        g.bench_function(id("attention"), |b| {
            b.iter(|| {
                black_box(
                    layer
                        .self_attn
                        .forward(x.clone(), &rope, &mask, None)
                        .sum()
                        .backward(),
                )
            })
        });
        g.bench_function(id("mlp"), |b| {
            b.iter(|| black_box(layer.mlp.forward(x.clone()).sum().backward()))
        });
        g.bench_function(id("decoder_layer"), |b| {
            b.iter(|| {
                black_box(
                    layer
                        .forward(x.clone(), &rope, &mask, None)
                        .sum()
                        .backward(),
                )
            })
        });
    }
    g.finish();
}

/// One LoRA step's loss and adapter gradients (what `bench-train` times, without the optimizer):
/// random tokens, the first third of the labels masked.
fn train_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    // tiny: 2 layers, 4k vocabulary; mini: 4 layers and the real 151,936-token vocabulary.
    for (name, layers, vocab) in [("tiny-2layer", 2usize, 4096usize), ("mini", 4, 151_936)] {
        let (_, m) = model(layers, vocab);
        let (batch, seq) = (4usize, 384usize);
        let dev = Default::default();
        let ids: Vec<i64> = (0..batch * seq)
            .map(|i| ((i * 7919) % vocab) as i64)
            .collect();
        let labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i % seq < seq / 3 { -100 } else { t })
            .collect();
        let t =
            |v: Vec<i64>| Tensor::<Ad, 2, Int>::from_data(TensorData::new(v, [batch, seq]), &dev);
        let b = Batch {
            input_ids: t(ids),
            attention_mask: t(vec![1; batch * seq]),
            labels: t(labels),
            seq_lens: None,
        };
        g.throughput(Throughput::Elements((batch * seq) as u64));
        g.bench_function(
            BenchmarkId::new("flex/tokens", format!("{name}/b{batch}xs{seq}")),
            |bench| bench.iter(|| black_box(m.loss_and_grads(&b, 1000.0, false, 0))),
        );
    }
    g.finish();
}

criterion_group!(benches, blocks, train_step);
criterion_main!(benches);
