//! Tokenizing the whole Huanhuan dataset (3,729 records): the Rust side of the tutorial's
//! `datasets.map(process_func)`. Reading and parsing the JSON is outside the timed part, as
//! `load_dataset` is outside the Python timing in scripts/bench_tokenize.py.
//!
//! `cargo bench -p lora-data --bench tokenize`; needs ../shared/data (or FERROLORA_SHARED_DATA).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lora_data::{load_dataset, prepare, ChatTokenizer, PrepareOptions, Template};
use test_support::shared_data;

fn bench(c: &mut Criterion) {
    let Some(shared) = shared_data() else {
        eprintln!("skipping: shared data not found; set FERROLORA_SHARED_DATA");
        return;
    };
    let ds = load_dataset(&shared.join("huanhuan/huanhuan.json"), None).unwrap();
    let tok = ChatTokenizer::load(&shared.join("qwen2.5-tokenizer")).unwrap();
    let n = ds.conversations.len();
    let mut g = c.benchmark_group("tokenize_huanhuan");
    g.sample_size(10);
    let threads = rayon::current_num_threads();
    for template in [Template::Seed, Template::Qwen] {
        let opts = PrepareOptions {
            template,
            ..PrepareOptions::default()
        };
        for (label, pool_threads) in [("1thread", 1), ("rayon", threads)] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(pool_threads)
                .build()
                .unwrap();
            let id = BenchmarkId::new(format!("{}/{label}{pool_threads}", template.name()), n);
            g.bench_with_input(id, &ds.conversations, |b, convs| {
                b.iter(|| pool.install(|| prepare(black_box(convs), &tok, &opts).unwrap()))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
