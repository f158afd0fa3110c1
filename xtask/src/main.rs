//! `cargo xtask <command>`: the project's commands (built in release by the alias in
//! `.cargo/config.toml`).

use clap::{Parser, Subcommand};

// First, so that `outln!` is in scope in every module below.
#[macro_use]
mod out;

mod bench_matmul;
mod bench_serve;
mod bench_train;
mod chat;
mod data;
mod demo;
mod device;
mod eval;
mod export;
mod finetune;
mod hub;
mod info;
mod manifest;
mod mem;
mod merge;
mod parity;
mod plan;
mod prepare;
mod quant;
mod serve;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "LoRA fine-tuning of Qwen2 models on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat with a model (+ adapter): one answer with --prompt, else interactive; streams tokens.
    Chat(chat::ChatArgs),
    /// Matrix-product rate (GFLOP/s) of the backend for given shapes and dtype.
    BenchMatmul(bench_matmul::BenchMatmulArgs),
    /// Throughput of `serve` for 1, 8, 32 concurrent streaming clients (tokens/s, time to first
    /// token), over HTTP on the loopback.
    BenchServe(bench_serve::BenchServeArgs),
    /// Time LoRA training steps of a random-weight model (compare with peft_baseline.py).
    BenchTrain(bench_train::BenchTrainArgs),
    /// Fine-tune a model with LoRA (the tutorial's recipe by default) and write a PEFT adapter;
    /// with neither --model nor --data, the built-in demo.
    Finetune(Box<finetune::FinetuneArgs>),
    /// Fetch a model or adapter from the Hugging Face hub (or ModelScope) into its cache; print
    /// the local directory.
    Download(hub::DownloadArgs),
    /// Mean causal-LM loss and perplexity of a model (+ adapter) over a data file.
    Eval(eval::EvalArgs),
    /// Load a model directory and print its config, parameter count and load report.
    Info(info::InfoArgs),
    /// Fixture logits against transformers/PEFT on a chosen device and dtype.
    Parity(parity::ParityArgs),
    /// Measure peak memory while loading a (synthetic) checkpoint.
    MemLoad(mem::MemLoadArgs),
    /// Merge a LoRA adapter into its base model and write a Hugging Face model directory.
    Merge(merge::MergeArgs),
    /// Write the merged model (or the adapter alone) as GGUF for llama.cpp, Ollama, LM Studio.
    Export(export::ExportArgs),
    /// Serve the model and its adapters over OpenAI's Chat Completions API (streaming, continuous
    /// batching) with a web chat page; with no --model, the built-in demo model.
    Serve(serve::ServeArgs),
    /// Tokenize a dataset with a ChatML template into input_ids/labels/attention_mask JSONL.
    Prepare(prepare::PrepareArgs),
}

/// `finetune` given a model or data (by flag or config file): the fine-tune, over the tutorial's
/// recipe. Given neither: the built-in demo, over the demo's own defaults.
fn finetune_or_demo(a: &finetune::FinetuneArgs) -> anyhow::Result<()> {
    let o = a.resolve(finetune::FinetuneOptions::default())?;
    if o.model.is_some() || o.data.is_some() {
        finetune::run(&o)
    } else {
        demo::run(a.resolve(demo::defaults())?)
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Chat(a) => chat::run(a),
        Command::BenchMatmul(a) => bench_matmul::run(a),
        Command::BenchTrain(a) => bench_train::run(a),
        Command::BenchServe(a) => bench_serve::run(a),
        Command::Finetune(a) => finetune_or_demo(&a),
        Command::Download(a) => hub::download(a),
        Command::Eval(a) => eval::run(a),
        Command::Info(a) => info::run(a),
        Command::MemLoad(a) => mem::run(a),
        Command::Parity(a) => parity::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Export(a) => export::run(a),
        Command::Prepare(a) => prepare::run(a),
        Command::Serve(a) => serve::run(a),
    };
    if let Err(e) = result {
        // One clear line per cause, no backtrace: these are user-facing errors.
        for line in error_lines(&e) {
            eprintln!("{line}");
        }
        std::process::exit(1);
    }
}

/// `error: ...` then one `caused by: ...` line per cause, each said once: many errors (an I/O
/// error with its path, a config error naming its file) already end their message with their
/// source's text, and printing the chain repeated it on the next line.
fn error_lines(e: &anyhow::Error) -> Vec<String> {
    let mut lines = vec![format!("error: {e}")];
    let mut said = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !said.contains(&text) {
            lines.push(format!("  caused by: {text}"));
        }
        said = text;
    }
    lines
}
