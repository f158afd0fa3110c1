//! Reading a GGUF v3 file back, checking what llama.cpp's `gguf_init_from_file` checks: magic,
//! version, known value and tensor types, names, ranks, offsets that are multiples of the
//! alignment, and tensor data that lies inside the file without overlapping.

use std::path::{Path, PathBuf};

use kernels::io::Mmap;

use crate::error::GgufError;
use crate::value::{Value, ValueType};
use crate::{align_up, quant, GgmlType, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, VERSION};

/// One tensor's description in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Its name.
    pub name: String,
    /// Row-major shape, outermost first (the file's `ne` reversed).
    pub shape: Vec<usize>,
    /// Its encoding.
    pub ty: GgmlType,
    /// Its offset from the start of the data section.
    pub offset: u64,
}

/// A GGUF file, mapped read-only, with its metadata and tensor descriptions parsed and checked.
pub struct GgufFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor descriptions in file order.
    pub tensors: Vec<TensorEntry>,
    /// The alignment in force (`general.alignment`, else 32).
    pub alignment: usize,
    /// Where the data section starts.
    pub data_start: u64,
    map: Mmap,
}

impl GgufFile {
    /// Opens and checks `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path).map_err(|source| GgufError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let map = kernels::io::map_readonly(&file).map_err(|source| GgufError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let malformed = |reason: String| GgufError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let (metadata, tensors, alignment, data_start) = parse(&map).map_err(malformed)?;
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
            alignment,
            data_start,
            map,
        })
    }

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The description of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The encoded bytes of `t` (a tensor of this file).
    pub fn tensor_bytes(&self, t: &TensorEntry) -> &[u8] {
        let start = (self.data_start + t.offset) as usize;
        let n: usize = t.shape.iter().product();
        &self.map[start..start + t.ty.bytes_for(n)]
    }

    /// The values of tensor `name` as f32 (decoded), row-major.
    pub fn tensor_f32(&self, name: &str) -> Option<Vec<f32>> {
        let t = self.tensor(name)?;
        Some(quant::decode(t.ty, self.tensor_bytes(t)))
    }

    /// The file's size.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the file is empty (never, for a file that parsed).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

type Parsed = (Vec<(String, Value)>, Vec<TensorEntry>, usize, u64);

fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut c = Cursor { bytes, pos: 0 };
    if c.take(4)? != MAGIC {
        return Err("the first four bytes are not `GGUF`".into());
    }
    let version = c.u32()?;
    if version != VERSION {
        return Err(format!(
            "version {version}; this reader reads version {VERSION}"
        ));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // Each entry takes at least 8 bytes: counts beyond the file's size are corrupt, not huge.
    if n_tensors.max(n_kv) > bytes.len() as u64 / 8 {
        return Err(format!(
            "{n_tensors} tensors and {n_kv} metadata entries cannot fit in {} bytes",
            bytes.len()
        ));
    }
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let at = c.pos;
        let key = c.string()?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(format!("metadata key `{key}` appears twice (byte {at})"));
        }
        let t = c.value_type()?;
        let v = c.value(t).map_err(|e| format!("metadata `{key}`: {e}"))?;
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => *a as usize,
        Some((_, v)) => {
            return Err(format!(
                "`general.alignment` is {v:?}: not a u32 power of two"
            ))
        }
    };
    let mut tensors: Vec<TensorEntry> = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string()?;
        if tensors.iter().any(|t| t.name == name) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let n_dims = c.u32()? as usize;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let mut shape = (0..n_dims)
            .map(|_| c.u64().map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        shape.reverse();
        let id = c.u32()?;
        let ty = GgmlType::from_id(id)
            .ok_or_else(|| format!("tensor `{name}` has ggml type {id}, unknown to this reader"))?;
        let offset = c.u64()?;
        if !offset.is_multiple_of(alignment as u64) {
            return Err(format!(
                "tensor `{name}` starts at data offset {offset}, not a multiple of {alignment}"
            ));
        }
        if shape
            .last()
            .is_some_and(|d| !d.is_multiple_of(ty.block_len()))
        {
            return Err(format!(
                "tensor `{name}` of {ty:?} has rows of partial blocks"
            ));
        }
        tensors.push(TensorEntry {
            name,
            shape,
            ty,
            offset,
        });
    }
    let data_start = align_up(c.pos, alignment) as u64;
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for t in &tensors {
        let n = t
            .shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .ok_or_else(|| format!("tensor `{}` has an impossible shape {:?}", t.name, t.shape))?;
        let end = data_start + t.offset + t.ty.bytes_for(n) as u64;
        if end > bytes.len() as u64 {
            return Err(format!(
                "tensor `{}` ends at byte {end}, past the end of the file ({} bytes)",
                t.name,
                bytes.len()
            ));
        }
        spans.push((t.offset, end - data_start, &t.name));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!("tensors `{}` and `{}` overlap", w[0].2, w[1].2));
        }
    }
    Ok((metadata, tensors, alignment, data_start))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "{n} bytes needed at byte {} but the file has {}",
                self.pos,
                self.bytes.len()
            ));
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String, String> {
        let at = self.pos;
        let n = self.u64()?;
        let raw = self.take(usize::try_from(n).map_err(|_| format!("string length {n}"))?)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("string at byte {at} is not UTF-8"))
    }

    fn value_type(&mut self) -> Result<ValueType, String> {
        let at = self.pos;
        let id = self.u32()?;
        ValueType::from_id(id).ok_or_else(|| format!("unknown value type {id} at byte {at}"))
    }

    fn value(&mut self, t: ValueType) -> Result<Value, String> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>()?[0]),
            ValueType::I8 => Value::I8(self.array::<1>()?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("bool byte {b} at byte {}", self.pos - 1)),
            },
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => {
                let et = self.value_type()?;
                let n = self.u64()?;
                if n > (self.bytes.len() - self.pos) as u64 {
                    return Err(format!("array of {n} elements cannot fit in the file"));
                }
                let items = (0..n)
                    .map(|_| self.value(et))
                    .collect::<Result<Vec<_>, _>>()?;
                Value::Array(et, items)
            }
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
        })
    }
}
