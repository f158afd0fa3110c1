//! `run.json`: what produced an adapter, written into the output directory when a fine-tune starts
//! and completed when it ends. The command line and resolved options, the build (version, git
//! commit), SHA-256 of the data, of `config.json` and `tokenizer.json` and of every weight file's
//! safetensors header (the header names every tensor's dtype, shape and offsets, so it identifies
//! the weights without reading gigabytes), the backend, dtype, device and threads, the start and end
//! times, the final loss and the adapter's SHA-256.

use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const FILE: &str = "run.json";

/// Hex SHA-256 of a whole file.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("hashing {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("hashing {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Hex SHA-256 of a safetensors file's header: its 8-byte length and the JSON it announces.
pub fn sha256_safetensors_header(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("hashing {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: no safetensors header", path.display()))?;
    let n = u64::from_le_bytes(len);
    anyhow::ensure!(
        n <= 100 << 20,
        "{}: safetensors header of {n} bytes",
        path.display()
    );
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let mut h = Sha256::new();
    h.update(len);
    h.update(&header);
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The weight files of a model directory: `model.safetensors`, or the shards its index names.
pub fn weight_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("reading {}", index.display()))?;
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        Ok(files)
    } else {
        Ok(vec!["model.safetensors".into()])
    }
}

/// The identity of a model directory: its config, tokenizer and weight headers.
pub fn model_identity(dir: &Path, tokenizer: &Path) -> anyhow::Result<Value> {
    let tok_file = if tokenizer.is_dir() {
        tokenizer.join("tokenizer.json")
    } else {
        tokenizer.to_path_buf()
    };
    let mut weights = Vec::new();
    for f in weight_files(dir)? {
        weights.push(json!({
            "file": f,
            "header_sha256": sha256_safetensors_header(&dir.join(&f))?,
        }));
    }
    Ok(json!({
        "dir": dir,
        "config_sha256": sha256_file(&dir.join("config.json"))?,
        "tokenizer_sha256": sha256_file(&tok_file)?,
        "weights": weights,
    }))
}

/// `2026-12-02T21:50:22Z` for a time since the epoch (UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The build's identity.
pub fn build() -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "git_commit": env!("FERROLORA_GIT_COMMIT"),
    })
}

/// Writes `run.json` into `dir` (atomically).
pub fn write(dir: &Path, manifest: &Value) -> anyhow::Result<()> {
    let path = dir.join(FILE);
    let text = serde_json::to_string_pretty(manifest)? + "\n";
    kernels::io::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// `run.json` of an adapter directory, if it has one.
pub fn read(dir: &Path) -> anyhow::Result<Option<Value>> {
    let path = dir.join(FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_utc_rfc3339() {
        let at = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        // `date -u -d @1796248222 +%FT%TZ`
        assert_eq!(at(1_796_248_222), "2026-12-02T21:50:22Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    }
}
