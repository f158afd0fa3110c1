//! The built-in demo: `cargo xtask finetune` with no `--model` and no `--data`.
//!
//! It needs no download. It writes, under the output directory:
//! - `model/`: a character-level tokenizer (`tokenizer.json`: one token per character plus the three
//!   ChatML specials) and a small Qwen2-architecture model with random weights (`config.json`,
//!   `model.safetensors`);
//! - `data.json`: an alpaca-style dataset of a court persona: questions asking who the speaker is
//!   get "I am Zhen Huan, consort of the Emperor."; every other request gets "As Your Majesty
//!   wishes." (the two classes differ only in the words of the question).
//!
//! Then it fine-tunes that model with LoRA through exactly the same code path as a real run
//! (`finetune::run`: prepare, apply LoRA to all seven projections, train, write a PEFT adapter),
//! and answers two held-out requests greedily before and after. The base is random, so "before" is
//! noise; "after" shows what the adapter learned, including the class distinction on unseen wording.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::backend::Flex;
use burn::tensor::DType;
use lora_data::{Message, Role, Template};
use qwen2::{generate, GenerationConfig, Qwen2Config, Qwen2ForCausalLM};

use crate::finetune::FinetuneOptions;

pub(crate) const SYSTEM: &str = "You are Zhen Huan.";
const WHO: &str = "I am Zhen Huan, consort of the Emperor.";
const OTHER: &str = "As Your Majesty wishes.";
const HELD_OUT: [&str; 2] = ["Who are you, my lady?", "Light the lanterns in the hall."];

/// Characters the tokenizer knows (besides the specials).
fn alphabet() -> Vec<char> {
    let mut v: Vec<char> = (' '..='~').collect();
    v.push('\n');
    v
}

/// A character-level `tokenizer.json`: WordLevel over single characters, ChatML specials as added
/// tokens, characters fused back on decode.
fn tokenizer_json() -> serde_json::Value {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for (i, c) in alphabet().into_iter().enumerate() {
        vocab.insert(c.to_string(), (specials.len() + i).into());
    }
    let added: Vec<serde_json::Value> = specials[..3]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

/// The persona dataset: identity questions and other requests, phrased many ways.
fn dataset() -> Vec<serde_json::Value> {
    let who = [
        "Who are you?",
        "Who is there?",
        "Tell me who you are.",
        "Who are you, lady?",
        "Who stands before me?",
        "Who is this?",
        "Say who you are.",
        "Who am I speaking to?",
        "Who are you, woman?",
        "And who might you be?",
        "Who goes there?",
        "Who is speaking?",
    ];
    let other = [
        "Bring me tea.",
        "Open the window.",
        "Play the zither.",
        "Prepare the garden.",
        "Read me a poem.",
        "Fetch my robe.",
        "Close the doors.",
        "Sing for the court.",
        "Pour the wine.",
        "Call the physician.",
        "Clean the palace.",
        "Walk with me.",
    ];
    let mut out = Vec::new();
    for (qs, a) in [(who, WHO), (other, OTHER)] {
        for q in qs {
            for prefix in ["", "Consort, ", "Now, "] {
                out.push(serde_json::json!({"instruction": format!("{prefix}{q}"), "input": "", "output": a}));
            }
        }
    }
    out
}

/// Writes the demo's model directory and dataset; returns (model dir, data file).
fn write_files(root: &Path, seed: u64) -> anyhow::Result<(PathBuf, PathBuf)> {
    use burn::tensor::backend::Backend;
    let model_dir = root.join("model");
    std::fs::create_dir_all(&model_dir)
        .with_context(|| format!("creating {}", model_dir.display()))?;
    let tok = tokenizer_json();
    let vocab = tok["model"]["vocab"].as_object().map_or(0, |v| v.len());
    std::fs::write(
        model_dir.join("tokenizer.json"),
        serde_json::to_string(&tok)?,
    )?;
    std::fs::write(
        model_dir.join("tokenizer_config.json"),
        r#"{"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}"#,
    )?;
    // Two layers of width 128: big enough to learn the persona in a minute or two on 2 cores.
    let mut cfg = Qwen2Config::new(vocab.div_ceil(64) * 64, 128, 256, 2, 4, 2, true);
    cfg.initializer_range = 0.05;
    Flex::seed(&Default::default(), seed);
    let model = Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default());
    qwen2::save_model(&model, &cfg, &model_dir)?;
    let data = root.join("data.json");
    std::fs::write(&data, serde_json::to_string_pretty(&dataset())?)?;
    Ok((model_dir, data))
}

/// Greedy answers of `model` to the held-out requests.
fn answers(
    model: &Qwen2ForCausalLM<Flex>,
    tok: &tokenizers::Tokenizer,
) -> anyhow::Result<Vec<String>> {
    let gen = GenerationConfig {
        max_new_tokens: 48,
        eos_token_id: vec![0, 2],
        ..GenerationConfig::default()
    };
    let mut out = Vec::new();
    for q in HELD_OUT {
        let msgs = [Message {
            role: Role::User,
            content: q.to_string(),
        }];
        let prompt = Template::Qwen.render_prompt(&msgs, SYSTEM);
        let ids = tok
            .encode(prompt, false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        let g = generate(model, &ids, &gen, &Default::default(), |_| true);
        let text = tok.decode(&g.tokens, true).map_err(anyhow::Error::msg)?;
        out.push(text);
    }
    Ok(out)
}

/// The demo's model directory for `serve` (written under `runs/demo` when absent, as the demo
/// writes it before training) and its trained adapter when `cargo xtask finetune` has made one.
pub fn serve_files() -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let root = defaults().training.output_dir;
    let model_dir = root.join("model");
    if !model_dir.join("config.json").is_file() {
        eprintln!(
            "demo: no --model given; writing the demo model in {}",
            model_dir.display()
        );
        write_files(&root, defaults().training.seed)?;
    }
    let adapter = root.join("adapter");
    let adapter = adapter
        .join(lora_core::ADAPTER_CONFIG)
        .is_file()
        .then_some(adapter);
    Ok((model_dir, adapter))
}

/// Runs the demo with `o`'s training options (resolved over [`defaults`]).
pub fn run(mut o: FinetuneOptions) -> anyhow::Result<()> {
    // Refuse impossible options before building anything.
    o.validate()?;
    let started = std::time::Instant::now();
    let root = o.training.output_dir.clone();
    outln!(
        "demo: no --model/--data given; building a tiny model, tokenizer and dataset in {}",
        root.display()
    );
    let (model_dir, data) = write_files(&root, o.training.seed)?;
    let tok = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let base = qwen2::load_model::<Flex>(&model_dir, DType::F32, &Default::default())?.model;
    let before = answers(&base, &tok)?;

    o.model = Some(model_dir.clone());
    o.data = Some(data);
    o.template = "qwen".into();
    o.system = Some(SYSTEM.into());
    o.training.output_dir = root.join("adapter");
    // The fine-tune itself runs on `--device`; the before/after answers on the CPU.
    crate::finetune::run(&o)?;

    let base = qwen2::load_model::<Flex>(&model_dir, DType::F32, &Default::default())?.model;
    let (tuned, _, _) = lora_core::load_adapter(base, &o.training.output_dir)?;
    let after = answers(&tuned, &tok)?;
    outln!("\nheld-out requests (greedy decoding), before -> after fine-tuning:");
    for ((q, b), a) in HELD_OUT.iter().zip(&before).zip(&after) {
        outln!("  user:   {q}\n  before: {b:?}\n  after:  {a:?}");
    }
    outln!("demo finished in {:.1?}", started.elapsed());
    Ok(())
}

/// The demo's defaults (under the config file and the flags): more steps and a higher learning rate
/// than the tutorial (a random base adapts slowly at 1e-4), small batches, frequent logging.
pub fn defaults() -> FinetuneOptions {
    let mut o = FinetuneOptions::default();
    o.training.output_dir = PathBuf::from("runs/demo");
    o.training.overwrite_output_dir = true; // the demo replaces its own previous run
    o.training.learning_rate = 2e-3;
    o.training.per_device_train_batch_size = 8;
    o.training.gradient_accumulation_steps = 1;
    o.training.max_steps = Some(200);
    o.training.warmup_steps = 10;
    o.training.logging_steps = 10;
    o.training.save_steps = 50;
    o.training.save_total_limit = Some(2);
    o.training.gradient_checkpointing = false;
    o.max_length = 160;
    o
}
