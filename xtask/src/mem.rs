//! `cargo xtask mem-load`: peak resident memory while loading a checkpoint, against the size of
//! the loaded model. `--synthesize DIR` first writes a random-weight checkpoint of a chosen size
//! (streamed to disk tensor by tensor), so the measurement needs no downloaded weights.
//!
//! The synthetic directory also gets a minimal byte-level BPE `tokenizer.json` (the 256 byte
//! tokens and the ChatML specials), so `cargo xtask export` can measure its streaming writer on it.
//!
//! Run the two steps as separate invocations, so the writer's memory does not count:
//! `cargo xtask mem-load --synthesize runs/syn --layers 8` then `cargo xtask mem-load --model runs/syn`.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::tensor::DType;
use qwen2::Qwen2Config;

/// Arguments of `mem-load`.
#[derive(clap::Args)]
pub struct MemLoadArgs {
    /// Model directory to load and measure.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Instead of loading: write a synthetic checkpoint to this directory.
    #[arg(long)]
    pub synthesize: Option<PathBuf>,
    /// Synthetic model: decoder layers (hidden 2048, MLP 11008, vocab 32000: ~0.34 GiB f32 a layer).
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Storage dtype of the synthetic file: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub file_dtype: String,
    /// Compute dtype to load into: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub quant: crate::quant::QuantArgs,
}

pub fn run(a: MemLoadArgs) -> anyhow::Result<()> {
    if let Some(dir) = a.synthesize {
        return synthesize(&dir, a.layers, &a.file_dtype);
    }
    let Some(model) = a.model else {
        bail!("pass --model DIR to measure, or --synthesize DIR to write a synthetic checkpoint");
    };
    let dtype = parse_dtype(&a.dtype)?;
    let model = crate::hub::model(&model, &Default::default())?;
    let before = peak_rss_kib()?;
    let t = Instant::now();
    let loaded = a
        .quant
        .load::<burn::backend::Flex>(&model, dtype, &Default::default())?;
    let secs = t.elapsed().as_secs_f64();
    let peak = peak_rss_kib()?;
    // The model as held: with --load-in-4bit, the 4-bit projections and the rest in the dtype.
    let r = &loaded.report;
    let quantized_elements: usize = if r.quantized_tensors > 0 {
        crate::quant::layer_projection_params(&loaded.config) as usize
            * loaded.config.num_hidden_layers
    } else {
        0
    };
    let bytes = (r.elements - quantized_elements) * dtype.size() + r.quantized_bytes;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let model_mib = bytes as f64 / (1024.0 * 1024.0);
    outln!(
        "{{\"model_mib\": {:.1}, \"peak_rss_mib\": {:.1}, \"rss_before_mib\": {:.1}, \"ratio\": {:.3}, \
         \"load_s\": {:.2}, \"file_dtypes\": {:?}, \"dtype\": \"{}\", \"load_in_4bit\": {}}}",
        model_mib,
        mib(peak),
        mib(before),
        mib(peak) / model_mib,
        secs,
        loaded.report.file_dtypes,
        a.dtype,
        a.quant.load_in_4bit
    );
    drop(loaded);
    Ok(())
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => bail!("unknown dtype {s:?}: use f32, bf16 or f16"),
    })
}

/// Peak resident set size of this process (`VmHWM`), KiB.
pub(crate) fn peak_rss_kib() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}

/// Writes config.json + model.safetensors for a Qwen2 shape, streaming pseudo-random values.
fn synthesize(dir: &Path, layers: usize, file_dtype: &str) -> anyhow::Result<()> {
    let (st_dtype, elem) = match file_dtype {
        "f32" => ("F32", 4usize),
        "bf16" => ("BF16", 2usize),
        _ => bail!("unknown --file-dtype {file_dtype:?}: use f32 or bf16"),
    };
    let cfg = Qwen2Config::new(32_000, 2048, 11_008, layers, 16, 2, false);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let shapes: Vec<(String, Vec<usize>)> = {
        let m = qwen2::Qwen2ForCausalLM::<burn::backend::Flex>::new(&cfg, &Default::default());
        qwen2::parameter_shapes::<burn::backend::Flex, _>(&m) // lazy: nothing allocated
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (k, s) in &shapes {
        let n: usize = s.iter().product::<usize>() * elem;
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": st_dtype, "shape": s, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(&path)?);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    // Data follows `shapes` order, the order the offsets were assigned in (the header's key order
    // does not matter to readers).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for (_, s) in &shapes {
        let n: usize = s.iter().product();
        let mut buf = Vec::with_capacity(1 << 20);
        for i in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
            if elem == 4 {
                buf.extend_from_slice(&v.to_le_bytes());
            } else {
                buf.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
            if buf.len() >= 1 << 20 || i + 1 == n {
                w.write_all(&buf)?;
                buf.clear();
            }
        }
    }
    w.flush()?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&byte_level_tokenizer())?,
    )?;
    outln!(
        "wrote {} ({:.2} GiB, {} parameters, {file_dtype})",
        path.display(),
        offset as f64 / (1u64 << 30) as f64,
        cfg.num_parameters()
    );
    Ok(())
}

/// A byte-level BPE `tokenizer.json` without merges: the 256 byte tokens in GPT-2's byte-to-unicode
/// spelling, then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.
fn byte_level_tokenizer() -> serde_json::Value {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut vocab = serde_json::Map::new();
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        vocab.insert(char::from_u32(c).expect("valid").to_string(), b.into());
    }
    let added: Vec<serde_json::Value> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": 256 + i, "content": t, "special": true}))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    })
}
