//! `cargo xtask bench-serve`: throughput of `serve` under concurrent clients, over real HTTP.
//!
//! Starts `serve` (this same binary) on a free loopback port, then for each client count runs that
//! many clients at once, each sending `--requests` streaming chat requests one after another
//! (greedy, `max_tokens` new tokens, `ignore_eos` so every answer has exactly that length).
//! Reported per client count: aggregate completion tokens per second (all tokens over the wall
//! time of the round, prompt processing included), the mean time to first token, and the mean
//! decode speed of one stream (tokens after the first over the time after the first).
//!
//! `--size mini` (the default) writes a random-weight model of Qwen2.5-0.5B's layer shape with 4
//! layers and the real vocabulary (as `benches/generate.rs`), with Qwen2.5's tokenizer from
//! `--tokenizer`; `--size demo` serves the built-in demo model; `--model DIR` any model directory.
//! `scripts/bench_serve_hf.py` measures transformers' batched `generate` on the same shapes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use serde_json::{json, Value};

/// Arguments of `bench-serve`.
#[derive(clap::Args)]
pub struct BenchServeArgs {
    /// mini (random weights, Qwen2.5-0.5B's layer shape, 4 layers, real vocabulary) or demo.
    #[arg(long, default_value = "mini")]
    size: String,
    /// Serve this model directory instead of a `--size` model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokenizer directory for `--size mini` (Qwen2.5's tokenizer.json).
    #[arg(long, default_value = "../shared/data/qwen2.5-tokenizer")]
    tokenizer: PathBuf,
    /// Client counts to measure, comma-separated.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    requests: usize,
    /// New tokens per answer.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Approximate prompt length in tokens (the exact count is reported).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Where to write the model of `--size` (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

pub fn run(a: BenchServeArgs) -> anyhow::Result<()> {
    if a.clients.contains(&0) || a.requests == 0 || a.max_tokens == 0 {
        bail!("--clients, --requests and --max-tokens must be at least 1");
    }
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let work = a
        .work_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let model = match (&a.model, a.size.as_str()) {
        (Some(m), _) => Some(m.clone()),
        (None, "mini") => Some(write_mini(&work, &a.tokenizer)?),
        (None, "demo") => None,
        (None, s) => bail!("--size {s:?}: use mini or demo (or --model DIR)"),
    };
    let max_clients = *a.clients.iter().max().unwrap();
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--port".into(),
        "0".into(),
        "--max-num-seqs".into(),
        max_clients.to_string(),
    ];
    if let Some(m) = &model {
        args.extend(["--model".into(), m.display().to_string()]);
    }
    let mut server = Server::start(&args, &work)?;
    let url = server.url.clone();
    let name = models(&url)?;
    let prompt = prompt_text(a.prompt_tokens);
    // Warm-up: first-use allocations and page faults of the weights.
    one_request(&url, &name, &prompt, 4)?;
    println!(
        "bench-serve: {} ({}), {} requests per client, {} new tokens each, {} threads",
        model
            .as_ref()
            .map_or("demo".to_string(), |m| m.display().to_string()),
        a.size,
        a.requests,
        a.max_tokens,
        rayon::current_num_threads()
    );
    println!("clients | tokens/s (all) | x one client | TTFT ms (mean) | decode tokens/s per stream | prompt tokens | mean batch");
    let mut single = None;
    let mut rows = Vec::new();
    for &c in &a.clients {
        let before = health(&url)?;
        let start = Instant::now();
        let results: Vec<anyhow::Result<Vec<Timing>>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..c)
                .map(|i| {
                    let (url, name, prompt) = (&url, &name, &prompt);
                    let n = a.max_tokens;
                    sc.spawn(move || {
                        (0..a.requests)
                            .map(|r| {
                                let p = format!("{} (client {i}, request {r})", prompt);
                                one_request(url, name, &p, n)
                            })
                            .collect()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wall = start.elapsed().as_secs_f64();
        let after = health(&url)?;
        let timings: Vec<Timing> = results
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let tokens: usize = timings.iter().map(|t| t.tokens).sum();
        let tps = tokens as f64 / wall;
        let single_tps = *single.get_or_insert(tps);
        let ttft = timings.iter().map(|t| t.ttft).sum::<f64>() / timings.len() as f64;
        let decode = timings
            .iter()
            .map(|t| (t.tokens - 1) as f64 / (t.total - t.ttft).max(1e-9))
            .sum::<f64>()
            / timings.len() as f64;
        let steps =
            after["steps"].as_f64().unwrap_or(0.0) - before["steps"].as_f64().unwrap_or(0.0);
        let step_rows = after["step_rows"].as_f64().unwrap_or(0.0)
            - before["step_rows"].as_f64().unwrap_or(0.0);
        let batch = step_rows / steps.max(1.0);
        println!(
            "{c:>7} | {tps:>14.1} | {:>12.2} | {:>14.1} | {decode:>26.1} | {:>13} | {batch:>10.2}",
            tps / single_tps,
            ttft * 1e3,
            timings[0].prompt_tokens,
        );
        rows.push(
            json!({"clients": c, "tokens_per_sec": tps, "vs_one_client": tps / single_tps,
            "ttft_ms": ttft * 1e3, "decode_tokens_per_sec_per_stream": decode,
            "prompt_tokens": timings[0].prompt_tokens, "mean_batch": batch, "wall_s": wall}),
        );
    }
    println!(
        "{}",
        json!({"bench": "serve", "size": a.size, "max_tokens": a.max_tokens, "rows": rows})
    );
    server.stop();
    Ok(())
}

/// Writes the `mini` model (random weights, seeded) with Qwen2.5's tokenizer under `work/mini`.
fn write_mini(work: &Path, tokenizer: &Path) -> anyhow::Result<PathBuf> {
    let tok = tokenizer.join("tokenizer.json");
    if !tok.is_file() {
        bail!(
            "--tokenizer {}: no tokenizer.json there; pass a directory holding Qwen2.5's tokenizer",
            tokenizer.display()
        );
    }
    let dir = work.join("mini");
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = qwen2::Qwen2Config::new(151_936, 896, 4864, 4, 14, 2, true);
    Flex::seed(&Default::default(), 0);
    let model = qwen2::Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default());
    qwen2::save_model(&model, &cfg, &dir)?;
    std::fs::copy(&tok, dir.join("tokenizer.json"))
        .with_context(|| format!("copying {}", tok.display()))?;
    Ok(dir)
}

/// Roughly `n` tokens of ordinary English (about one token per word).
fn prompt_text(n: usize) -> String {
    const WORDS: [&str; 16] = [
        "the", "court", "was", "quiet", "when", "she", "walked", "into", "garden", "and", "saw",
        "moon", "over", "old", "palace", "walls",
    ];
    (0..n.saturating_sub(30))
        .map(|i| WORDS[i % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(args: &[String], cwd: &Path) -> anyhow::Result<Server> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut child = Command::new(exe)
            .args(args)
            .current_dir(cwd)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting serve")?;
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(u) = line.strip_prefix("serving on ") {
                        break u.to_string();
                    }
                }
                _ => {
                    let _ = child.kill();
                    bail!("serve exited before listening");
                }
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Server { child, url })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .into()
}

fn get_json(url: &str) -> anyhow::Result<Value> {
    let text = agent().get(url).call()?.body_mut().read_to_string()?;
    Ok(serde_json::from_str(&text)?)
}

fn health(url: &str) -> anyhow::Result<Value> {
    get_json(&format!("{url}/health"))
}

/// The base model's name.
fn models(url: &str) -> anyhow::Result<String> {
    let v = get_json(&format!("{url}/v1/models"))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .context("no model in /v1/models")
}

/// One streamed request's timings (seconds from sending it).
struct Timing {
    ttft: f64,
    total: f64,
    tokens: usize,
    prompt_tokens: u64,
}

fn one_request(url: &str, model: &str, prompt: &str, max_tokens: usize) -> anyhow::Result<Timing> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}});
    let start = Instant::now();
    let resp = agent()
        .post(format!("{url}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string())?;
    let mut ttft = None;
    let mut usage = Value::Null;
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
            && ttft.is_none()
        {
            ttft = Some(start.elapsed().as_secs_f64());
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    let total = start.elapsed().as_secs_f64();
    let tokens = usage["completion_tokens"]
        .as_u64()
        .context("no usage chunk")? as usize;
    Ok(Timing {
        ttft: ttft.unwrap_or(total),
        total,
        tokens,
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
    })
}
