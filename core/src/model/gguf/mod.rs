//! GGUF files: a validating, memory-mapped reader and exact dequantization to `f32`.
//!
//! [`GgufFile::open`] maps the file, parses the header, metadata and tensor table, and checks
//! every count, string length, type id, alignment and tensor byte range against the file
//! before returning; after that, [`GgufFile::tensor_bytes`] and [`GgufFile::dequantize`]
//! only slice the map. [`dequantize`] reproduces ggml's reference `dequantize_row_*`
//! bit for bit for F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL and IQ4_XS.
//!
//! Invariants: no input byte sequence makes this module panic (all sizes and offsets read
//! from the file go through checked arithmetic); every error names the file, or the tensor
//! when it is about one tensor. This module knows nothing about model architectures or
//! `tch`: it hands out bytes, metadata values and `Vec<f32>` in row-major order.
//!
//! # Examples
//!
//! ```no_run
//! use hicra_core::model::gguf::GgufFile;
//! # fn main() -> Result<(), hicra_core::model::gguf::GgufError> {
//! let file = GgufFile::open("model.gguf".as_ref())?;
//! assert_eq!(file.get_str("general.architecture"), Some("llama"));
//! let info = file.tensor_info("token_embd.weight").expect("present");
//! let weights = file.dequantize("token_embd.weight")?; // row-major over info.shape()
//! assert_eq!(weights.len(), info.n_elements());
//! # Ok(())
//! # }
//! ```

mod dequant;
mod reader;

use std::path::PathBuf;

pub use dequant::{dequantize, dequantize_into, GgmlType};
pub use reader::{GgufFile, GgufTensorInfo, GgufValue};

/// Everything that can go wrong reading or dequantizing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, inspected or mapped.
    #[error("{}: cannot read GGUF file: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the `GGUF` magic.
    #[error("{}: not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes of the file.
        found: [u8; 4],
    },
    /// The GGUF version is not 2 or 3 (a big-endian file shows a byte-swapped version).
    #[error("{}: unsupported GGUF version {version} (supported: 2, 3; a huge number means a big-endian file)", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version field as read (little-endian).
        version: u32,
    },
    /// The file ends before a structure that the header announces.
    #[error("{}: file truncated while reading {what} at byte {offset} (file is {file_len} bytes)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read, e.g. `value of metadata key "general.name"`.
        what: String,
        /// Byte offset where the read started.
        offset: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A structurally invalid header: duplicate keys, bad value type, bad alignment, etc.
    #[error("{}: invalid GGUF header: {what}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A tensor's type id is not a ggml type, so its size (and the file) cannot be checked.
    #[error("{}: tensor {tensor:?} has unknown ggml type id {type_id}", path.display())]
    UnknownType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The raw type id.
        type_id: u32,
    },
    /// A tensor's dimensions are invalid for its type (too many, overflow, partial block).
    #[error("{}: tensor {tensor:?} has invalid shape {dims:?} (GGUF order) for type {type_name}: {reason}", path.display())]
    BadShape {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dimensions as stored (fastest-varying first).
        dims: Vec<u64>,
        /// The tensor's type.
        type_name: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A tensor's offset is not a multiple of the file's alignment.
    #[error("{}: tensor {tensor:?} data offset {offset} is not a multiple of the alignment {alignment}", path.display())]
    MisalignedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Offset relative to the data section.
        offset: u64,
        /// `general.alignment` (default 32).
        alignment: u64,
    },
    /// A tensor's bytes extend past the end of the file (usually a truncated download).
    #[error("{}: tensor {tensor:?} occupies bytes {start}..{end} but the file is only {file_len} bytes (truncated?)", path.display())]
    TensorOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Absolute start offset in the file.
        start: u64,
        /// Absolute end offset (exclusive), saturated at `u64::MAX`.
        end: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// No tensor of that name is in the file.
    #[error("no tensor named {name:?} in the GGUF file")]
    MissingTensor {
        /// The requested name.
        name: String,
    },
    /// The tensor's type is valid but this module cannot dequantize it.
    #[error("tensor {tensor:?}: cannot dequantize ggml type {type_name} (id {type_id})")]
    UnsupportedType {
        /// The tensor (`<unnamed>` from the free functions).
        tensor: String,
        /// ggml's name for the type.
        type_name: &'static str,
        /// The raw type id.
        type_id: u32,
    },
    /// The byte or element count given to the dequantizer does not match the type.
    #[error("tensor {tensor:?}: {n_elements} elements of {type_name} need {} bytes, got {actual_bytes}",
        expected_bytes.map_or_else(|| "a whole number of blocks and".to_owned(), |b| b.to_string()))]
    SizeMismatch {
        /// The tensor (`<unnamed>` from the free functions).
        tensor: String,
        /// ggml's name for the type.
        type_name: &'static str,
        /// Requested element count.
        n_elements: usize,
        /// Bytes those elements take; `None` when the count is not a whole number of blocks.
        expected_bytes: Option<usize>,
        /// Bytes provided.
        actual_bytes: usize,
    },
}
