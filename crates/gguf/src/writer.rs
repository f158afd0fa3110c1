//! The streaming writer. Layout (ggml `docs/gguf.md`, v3, little-endian):
//!
//! ```text
//! "GGUF" u32:version u64:tensor_count u64:kv_count
//! kv_count × (string:key u32:value_type value)
//! tensor_count × (string:name u32:n_dims u64:ne[n_dims] u32:ggml_type u64:offset)
//! zero padding to the alignment
//! tensor data, each tensor at data_start + offset (a multiple of the alignment), zero-padded
//! ```
//!
//! `ne[0]` is the innermost (contiguous) dimension, so a PyTorch `[out, in]` weight has
//! `ne = [in, out]` and the same bytes: shapes are given here in PyTorch order and reversed on
//! writing, the data is never transposed.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::Path;

use crate::error::GgufError;
use crate::value::{write_str, Value};
use crate::{
    align_up, quant, GgmlType, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, MAX_NAME_BYTES, VERSION,
};

/// One tensor to write.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Row-major shape, outermost first (PyTorch's order; the file stores it reversed).
    pub shape: Vec<usize>,
    /// The encoding of its data in the file.
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of its data in the file (without padding).
    pub fn bytes(&self) -> usize {
        self.ty.bytes_for(self.len())
    }
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// Tensors written.
    pub tensors: usize,
    /// Size of the file.
    pub file_bytes: u64,
    /// Bytes of the largest tensor's encoded data: with its f32 values, what the writer holds.
    pub largest_tensor_bytes: u64,
}

/// Writes `path` as a GGUF v3 file with `metadata` (in order) and `tensors` (in order), asking
/// `data(i, &tensors[i])` for each tensor's values (row-major f32) only when it is written, so at
/// most one tensor is in memory. The file is written under a temporary name and renamed: after an
/// error `path` is unchanged. Everything that can be checked without the data (names, shapes,
/// block sizes, duplicate keys, array element types) is checked before the file is created.
pub fn write_gguf<F>(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorInfo],
    mut data: F,
) -> Result<WriteReport, GgufError>
where
    F: FnMut(usize, &TensorInfo) -> Result<Vec<f32>, String>,
{
    let invalid = |reason: String| GgufError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let alignment = check_metadata(metadata).map_err(invalid)?;
    check_tensors(tensors).map_err(invalid)?;

    // Offsets of each tensor's data relative to the start of the data section.
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut end = 0usize;
    for t in tensors {
        offsets.push(end);
        end = align_up(end + t.bytes(), alignment);
    }
    let header_len = 4
        + 4
        + 8
        + 8
        + metadata
            .iter()
            .map(|(k, v)| 8 + k.len() + 4 + v.encoded_len())
            .sum::<usize>()
        + tensors
            .iter()
            .map(|t| 8 + t.name.len() + 4 + 8 * t.shape.len() + 4 + 8)
            .sum::<usize>();
    let data_start = align_up(header_len, alignment);
    let file_bytes = (data_start + end) as u64;

    let mut failed: Option<String> = None;
    let mut largest = 0u64;
    let result = kernels::io::write_atomic_with(path, |w| {
        let mut w = Counting { inner: w, n: 0 };
        w.write_all(&MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in metadata {
            write_str(&mut w, key)?;
            w.write_all(&(value.value_type() as u32).to_le_bytes())?;
            value.write(&mut w)?;
        }
        for (t, off) in tensors.iter().zip(&offsets) {
            write_str(&mut w, &t.name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for d in t.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&t.ty.id().to_le_bytes())?;
            w.write_all(&(*off as u64).to_le_bytes())?;
        }
        debug_assert_eq!(w.n, header_len);
        pad(&mut w, alignment)?;
        let mut buf = Vec::new();
        for (i, t) in tensors.iter().enumerate() {
            debug_assert_eq!(w.n, data_start + offsets[i]);
            let values = match data(i, t) {
                Ok(v) if v.len() == t.len() => v,
                Ok(v) => {
                    failed = Some(format!(
                        "tensor `{}`: got {} values for shape {:?} ({} expected)",
                        t.name,
                        v.len(),
                        t.shape,
                        t.len()
                    ));
                    return Err(io::Error::other("tensor data"));
                }
                Err(e) => {
                    failed = Some(format!("tensor `{}`: {e}", t.name));
                    return Err(io::Error::other("tensor data"));
                }
            };
            buf.clear();
            quant::encode(t.ty, &values, &mut buf);
            drop(values);
            largest = largest.max(buf.len() as u64);
            w.write_all(&buf)?;
            pad(&mut w, alignment)?;
        }
        debug_assert_eq!(w.n as u64, file_bytes);
        Ok(())
    });
    match (result, failed) {
        (Ok(()), _) => Ok(WriteReport {
            tensors: tensors.len(),
            file_bytes,
            largest_tensor_bytes: largest,
        }),
        (Err(_), Some(reason)) => Err(GgufError::Write {
            path: path.to_path_buf(),
            reason,
        }),
        (Err(e), None) => Err(GgufError::Write {
            path: path.to_path_buf(),
            reason: if kernels::io::is_storage_full(&e) {
                format!("no space left on device ({e}): free space and run the command again")
            } else {
                e.to_string()
            },
        }),
    }
}

/// Duplicate keys, mistyped arrays, and the alignment (`general.alignment`, a `u32` power of two,
/// else 32).
fn check_metadata(metadata: &[(String, Value)]) -> Result<usize, String> {
    let mut seen = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for (key, value) in metadata {
        if !seen.insert(key.as_str()) {
            return Err(format!("metadata key `{key}` is given twice"));
        }
        if let Some(e) = value.mistyped() {
            return Err(format!("metadata `{key}`: {e}"));
        }
        if key == "general.alignment" {
            match value {
                Value::U32(a) if a.is_power_of_two() => alignment = *a as usize,
                other => {
                    return Err(format!(
                        "`general.alignment` must be a u32 power of two, got {other:?}"
                    ))
                }
            }
        }
    }
    Ok(alignment)
}

/// Names (unique, non-empty, at most 63 bytes: ggml's `GGML_MAX_NAME` with its NUL), ranks 1–4,
/// non-zero dimensions, and whole blocks along the innermost dimension.
fn check_tensors(tensors: &[TensorInfo]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for t in tensors {
        if t.name.is_empty() || t.name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "tensor name `{}` has {} bytes; GGUF allows 1 to {MAX_NAME_BYTES}",
                t.name,
                t.name.len()
            ));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(format!("tensor `{}` is given twice", t.name));
        }
        if t.shape.is_empty() || t.shape.len() > MAX_DIMS || t.shape.contains(&0) {
            return Err(format!(
                "tensor `{}` has shape {:?}; GGUF needs 1 to {MAX_DIMS} non-zero dimensions",
                t.name, t.shape
            ));
        }
        let inner = *t.shape.last().expect("non-empty");
        if !inner.is_multiple_of(t.ty.block_len()) {
            return Err(format!(
                "tensor `{}` of shape {:?} cannot be stored as {:?}: its rows of {inner} values are \
                 not whole blocks of {}",
                t.name,
                t.shape,
                t.ty,
                t.ty.block_len()
            ));
        }
    }
    Ok(())
}

/// Zeros up to the next multiple of `alignment`.
fn pad(w: &mut Counting<'_>, alignment: usize) -> io::Result<()> {
    let n = align_up(w.n, alignment) - w.n;
    w.write_all(&[0u8; 64][..n.min(64)])?;
    if n > 64 {
        w.write_all(&vec![0u8; n - 64])?;
    }
    Ok(())
}

/// A writer that counts the bytes written, so padding needs no seek.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: usize,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
