//! GGUF, the file format of llama.cpp (ggml's `docs/gguf.md`, version 3): a header, typed
//! key/value metadata, tensor descriptions, then aligned tensor data.
//!
//! - [`write_gguf`] streams a file: the header and every tensor description are written first (all
//!   sizes are known from shapes and types), then each tensor's data is asked for, encoded and
//!   written before the next is asked for, so the memory held is one tensor's, not the model's. The
//!   file is written under a temporary name and renamed ([`kernels::io::write_atomic_with`]).
//! - [`GgufFile`] reads a file back and checks what llama.cpp's loader checks (magic, version,
//!   value types, alignment, tensor offsets and extents), for tests and for `info`-style tools.
//! - [`quant`]: the tensor encodings this crate writes (f32, f16, bf16, and `Q8_0` as ggml defines
//!   it: blocks of 32 values with one f16 scale).
//!
//! Written here rather than taken from a crate: candle's `gguf_file::write` writes version 2 and
//! needs every tensor in memory as a candle `QTensor` at once; see `docs/gguf.md` for the others.
#![forbid(unsafe_code)]

mod error;
pub mod quant;
mod reader;
mod value;
mod writer;

pub use error::GgufError;
pub use reader::{GgufFile, TensorEntry};
pub use value::{Value, ValueType};
pub use writer::{write_gguf, TensorInfo, WriteReport};

/// `GGUF` as the first four bytes of the file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version this crate writes (and the only one it reads).
pub const VERSION: u32 = 3;
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// llama.cpp's `GGML_MAX_NAME`: a tensor name has at most this many bytes, less its NUL.
pub const MAX_NAME_BYTES: usize = 63;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;

/// The tensor encodings this crate writes, with their numbers in ggml's `ggml_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// Blocks of 32 values: one f16 scale `d`, then 32 `i8` (value ≈ `d·q`).
    Q8_0,
    /// bfloat16.
    Bf16,
}

impl GgmlType {
    /// The number in `ggml_type`.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
            Self::Bf16 => 30,
        }
    }

    /// The type with number `id`, if this crate handles it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// Values per block (1 for the plain floats).
    pub fn block_len(self) -> usize {
        match self {
            Self::Q8_0 => quant::Q8_0_BLOCK,
            _ => 1,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q8_0 => quant::Q8_0_BLOCK_BYTES,
        }
    }

    /// Bytes of `n` values (`n` a multiple of [`Self::block_len`]).
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }
}

/// `n` rounded up to a multiple of `align`.
pub fn align_up(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}
