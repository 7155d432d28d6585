//! The GGUF container: header, typed metadata, tensor table, and the memory-mapped data.
//!
//! Layout (little-endian, versions 2 and 3): magic `GGUF`, `u32` version, `u64` tensor
//! count, `u64` metadata count; then the metadata entries (`string` key, `u32` value type,
//! value); then per tensor a `string` name, `u32` dimension count, `u64` dimensions
//! (fastest-varying first), `u32` ggml type and `u64` offset; then padding up to
//! `general.alignment` (default 32), where the data section starts. A `string` is a `u64`
//! byte length followed by UTF-8 bytes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::{dequantize_into_named, dequantize_named, GgmlType};
use super::GgufError;

/// The `GGUF` magic as it appears in the first four bytes.
const MAGIC: [u8; 4] = *b"GGUF";

/// Data-section alignment when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml supports at most 4 dimensions (`GGML_MAX_DIMS`); llama.cpp rejects more.
const MAX_DIMS: u32 = 4;

/// Nesting limit for array values: real files use at most arrays of strings, and the limit
/// keeps a crafted file from recursing deep enough to overflow the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// One metadata value. Integer widths are kept as stored; use the `as_*` accessors to read
/// them without caring about the width the converter chose.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `GGUF_TYPE_UINT8`.
    U8(u8),
    /// `GGUF_TYPE_INT8`.
    I8(i8),
    /// `GGUF_TYPE_UINT16`.
    U16(u16),
    /// `GGUF_TYPE_INT16`.
    I16(i16),
    /// `GGUF_TYPE_UINT32`.
    U32(u32),
    /// `GGUF_TYPE_INT32`.
    I32(i32),
    /// `GGUF_TYPE_UINT64`.
    U64(u64),
    /// `GGUF_TYPE_INT64`.
    I64(i64),
    /// `GGUF_TYPE_FLOAT32`.
    F32(f32),
    /// `GGUF_TYPE_FLOAT64`.
    F64(f64),
    /// `GGUF_TYPE_BOOL`.
    Bool(bool),
    /// `GGUF_TYPE_STRING`. Invalid UTF-8 is replaced by U+FFFD (llama.cpp does not validate
    /// these bytes either, so a file may contain some).
    String(String),
    /// `GGUF_TYPE_ARRAY`; elements all have the same type.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any integer value that is non-negative, widened to `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any float or integer value as `f64` (64-bit integers may round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The string, for [`GgufValue::String`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The flag, for [`GgufValue::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, for [`GgufValue::Array`].
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` varies fastest (ggml's `ne`).
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the first byte, relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major (PyTorch) shape: `dims` reversed. A linear weight stored with
    /// `dims = [in, out]` has shape `[out, in]`.
    pub fn shape(&self) -> Vec<usize> {
        // `GgufFile::open` checked that the element count fits in usize, so each dim does.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (1 for a zero-dimensional tensor).
    pub fn n_elements(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }

    /// Exact byte size of the tensor's data.
    pub fn n_bytes(&self) -> usize {
        // Checked at open time for every tensor of a `GgufFile`.
        self.ggml_type.byte_size(self.n_elements()).unwrap_or(0)
    }
}

/// Everything parsed from the bytes before the data section.
#[derive(Debug)]
struct Header {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    /// Absolute offset of the data section (header end rounded up to the alignment).
    data_offset: u64,
}

/// An open, validated GGUF file. The file is memory-mapped: tensor data is read lazily from
/// the page cache, and the file must not be modified while this value lives.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    header: Header,
    by_name: HashMap<String, usize>,
}

impl GgufFile {
    /// Opens, maps and validates `path`: magic, version (2 or 3), counts, string lengths,
    /// value types, tensor type ids and shapes, alignment, and that every tensor's bytes lie
    /// inside the file. After this succeeds, reading any listed tensor cannot fail except for
    /// an unsupported type.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io_err = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        if file_len == 0 {
            return Err(GgufError::Truncated {
                path: path.to_owned(),
                what: "magic".to_owned(),
                offset: 0,
                file_len,
            });
        }
        // SAFETY: the map is only read through `&[u8]`. Memory-mapping is unsound only if
        // another process truncates or rewrites the file while mapped; model files are
        // treated as immutable, which the type documentation states.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let header = parse_header(path, &map)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        tracing::debug!(
            path = %path.display(),
            version = header.version,
            tensors = header.tensors.len(),
            metadata = header.metadata.len(),
            "opened GGUF file"
        );
        Ok(GgufFile {
            path: path.to_owned(),
            map,
            header,
            by_name,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// Data-section alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// Absolute file offset where the data section starts.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.header.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.header.metadata.get(key)
    }

    /// A non-negative integer metadata value of any width.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(GgufValue::as_u64)
    }

    /// A float or integer metadata value as `f64`.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(GgufValue::as_f64)
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.header.tensors
    }

    /// The table entry of one tensor.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The tensor's raw bytes, exactly [`GgufTensorInfo::n_bytes`] long.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                name: name.to_owned(),
            })?;
        self.bytes_of(info)
    }

    /// Dequantizes the tensor to `f32`, row-major over [`GgufTensorInfo::shape`], of length
    /// [`GgufTensorInfo::n_elements`]. Large tensors use all cores.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                name: name.to_owned(),
            })?;
        dequantize_named(
            info.ggml_type,
            self.bytes_of(info)?,
            info.n_elements(),
            &info.name,
        )
    }

    /// Like [`GgufFile::dequantize`], writing into `out`, which must hold exactly
    /// [`GgufTensorInfo::n_elements`] values.
    pub fn dequantize_into(&self, name: &str, out: &mut [f32]) -> Result<(), GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                name: name.to_owned(),
            })?;
        dequantize_into_named(info.ggml_type, self.bytes_of(info)?, out, &info.name)
    }

    /// Slices a tensor's bytes out of the map; the range was validated by `open`, the
    /// `get` keeps this panic-free regardless.
    fn bytes_of(&self, info: &GgufTensorInfo) -> Result<&[u8], GgufError> {
        let start = self.header.data_offset.checked_add(info.offset);
        let range = start.and_then(|s| {
            let s = usize::try_from(s).ok()?;
            Some(s..s.checked_add(info.n_bytes())?)
        });
        range
            .and_then(|r| self.map.get(r))
            .ok_or_else(|| GgufError::TensorOutOfBounds {
                path: self.path.clone(),
                tensor: info.name.clone(),
                start: start.unwrap_or(u64::MAX),
                end: u64::MAX,
                file_len: self.map.len() as u64,
            })
    }
}

/// A bounds-checked little-endian reader over the header bytes.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, what: impl FnOnce() -> String) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_owned(),
            what: what(),
            offset: self.pos as u64,
            file_len: self.bytes.len() as u64,
        }
    }

    fn invalid(&self, what: String) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_owned(),
            what,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Takes the next `n` bytes; `what` names the structure for the error message.
    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Raw string bytes: a `u64` length, then that many bytes.
    fn string_bytes(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| self.truncated(|| format!("{} ({len} bytes)", what())))?;
        self.take(len, what)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn strict_string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let b = self.string_bytes(what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| self.invalid(format!("{} is not valid UTF-8", what())))
    }

    /// A metadata value of type id `ty`.
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, GgufError> {
        let what = || format!("value of metadata key {key:?}");
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.invalid(format!("metadata key {key:?}: bool byte {b}"))),
            },
            8 => GgufValue::String(String::from_utf8_lossy(self.string_bytes(&what)?).into_owned()),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!(
                        "metadata key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem_ty = self.u32(|| format!("array type of metadata key {key:?}"))?;
                let min_size = min_value_size(elem_ty).ok_or_else(|| {
                    self.invalid(format!(
                        "metadata key {key:?}: unknown array element type {elem_ty}"
                    ))
                })?;
                let count = self.u64(|| format!("array length of metadata key {key:?}"))?;
                // Every element takes at least `min_size` bytes, which bounds the allocation
                // by the file size whatever the count field says.
                let count = usize::try_from(count)
                    .ok()
                    .filter(|&c| c <= self.remaining() / min_size)
                    .ok_or_else(|| {
                        self.truncated(|| {
                            format!("array of {count} elements for metadata key {key:?}")
                        })
                    })?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(
                    self.invalid(format!("metadata key {key:?}: unknown value type {other}"))
                )
            }
        })
    }
}

/// Smallest encoding of a value of type id `ty`, `None` for unknown types.
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12, // element type + count
        _ => return None,
    })
}

/// Parses and validates everything up to and including the tensor table, and checks every
/// tensor's byte range against `bytes.len()`.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor {
        path,
        bytes,
        pos: 0,
    };
    let magic: [u8; 4] = c.array(|| "magic".to_owned())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            path: path.to_owned(),
            found: magic,
        });
    }
    let version = c.u32(|| "version".to_owned())?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_owned(),
            version,
        });
    }
    let n_tensors = c.u64(|| "tensor count".to_owned())?;
    let n_kv = c.u64(|| "metadata count".to_owned())?;
    // Minimal encodings: key (8) + type (4) + 1-byte value; name (8) + n_dims (4) + type (4)
    // + offset (8). Bounding counts by the bytes left keeps `with_capacity` honest.
    let n_kv = usize::try_from(n_kv)
        .ok()
        .filter(|&n| n <= c.remaining() / 13)
        .ok_or_else(|| c.truncated(|| format!("{n_kv} metadata entries")))?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.strict_string(&|| format!("key of metadata entry {i}"))?;
        let ty = c.u32(|| format!("value type of metadata key {key:?}"))?;
        let value = c.value(ty, &key, 0)?;
        if metadata.contains_key(&key) {
            return Err(c.invalid(format!("duplicate metadata key {key:?}")));
        }
        metadata.insert(key, value);
    }

    let n_tensors = usize::try_from(n_tensors)
        .ok()
        .filter(|&n| n <= c.remaining() / 24)
        .ok_or_else(|| c.truncated(|| format!("{n_tensors} tensor infos")))?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut seen = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.strict_string(&|| format!("name of tensor {i}"))?;
        let n_dims = c.u32(|| format!("dimension count of tensor {name:?}"))?;
        if n_dims > MAX_DIMS {
            return Err(c.invalid(format!(
                "tensor {name:?} has {n_dims} dimensions (max {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(|| format!("dimensions of tensor {name:?}"))?);
        }
        let type_id = c.u32(|| format!("type of tensor {name:?}"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownType {
            path: path.to_owned(),
            tensor: name.clone(),
            type_id,
        })?;
        let offset = c.u64(|| format!("data offset of tensor {name:?}"))?;
        check_shape(path, &name, &dims, ggml_type)?;
        if seen.insert(name.clone(), i).is_some() {
            return Err(c.invalid(format!("duplicate tensor name {name:?}")));
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| c.invalid(format!("general.alignment {v:?} is not a power of two")))?,
    };
    let header_end = c.pos as u64;
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| c.invalid("data section offset overflows".to_owned()))?;
    let file_len = bytes.len() as u64;
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                path: path.to_owned(),
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes() as u64));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    path: path.to_owned(),
                    tensor: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// Checks that the element count and byte size fit in `usize` and that rows are whole blocks
/// (ggml quantizes along `dims[0]`, so a block never spans two rows).
fn check_shape(path: &Path, name: &str, dims: &[u64], ty: GgmlType) -> Result<(), GgufError> {
    let bad = |reason| GgufError::BadShape {
        path: path.to_owned(),
        tensor: name.to_owned(),
        dims: dims.to_vec(),
        type_name: ty.name(),
        reason,
    };
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
        .ok_or_else(|| bad("element count overflows"))?;
    if dims
        .first()
        .is_some_and(|&d0| d0 % ty.block_size() as u64 != 0)
    {
        return Err(bad(
            "the first dimension is not a multiple of the block size",
        ));
    }
    match ty.byte_size(n) {
        Some(b) if u64::try_from(b).is_ok() => Ok(()),
        Some(_) => Err(bad("byte size overflows")),
        None if n % ty.block_size() != 0 => {
            Err(bad("element count is not a multiple of the block size"))
        }
        None => Err(bad("byte size overflows")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf")
            .join(name)
    }

    fn open_fixture(name: &str) -> GgufFile {
        let path = fixture(name);
        GgufFile::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    }

    /// Writes `bytes` to a fresh temporary file, named after the test.
    fn temp_file(tag: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("hicra-gguf-{}-{tag}.gguf", std::process::id()));
        std::fs::write(&path, bytes).expect("writing temp file");
        path
    }

    #[test]
    fn every_type_dequantizes_exactly_like_gguf_py() {
        let file = open_fixture("types.gguf");
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("types.expected.json")).expect("expected json"),
        )
        .expect("valid json");
        let raw = std::fs::read(fixture("types.expected.bin")).expect("expected bin");
        let expected: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let index = index.as_object().expect("object");
        assert_eq!(index.len(), file.tensors().len());
        let mut types_seen = Vec::new();
        for (name, entry) in index {
            let info = file
                .tensor_info(name)
                .unwrap_or_else(|| panic!("tensor {name} missing"));
            let type_name = entry["type"].as_str().expect("type");
            assert_eq!(info.ggml_type.name(), type_name, "{name}");
            let shape: Vec<usize> = entry["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            assert_eq!(info.shape(), shape, "{name}");
            let offset = entry["offset"].as_u64().expect("offset") as usize;
            let len = entry["len"].as_u64().expect("len") as usize;
            let want = &expected[offset..offset + len];
            let got = file.dequantize(name).expect("dequantize");
            assert_eq!(got.len(), info.n_elements(), "{name}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{name}[{i}]: got {g}, gguf-py {w}"
                );
            }
            let mut into = vec![0f32; len];
            file.dequantize_into(name, &mut into)
                .expect("dequantize_into");
            assert_eq!(into, got, "{name}");
            assert_eq!(
                file.tensor_bytes(name).expect("bytes").len(),
                info.n_bytes()
            );
            types_seen.push(info.ggml_type);
        }
        use GgmlType::*;
        for t in [
            F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
            IQ4_XS,
        ] {
            assert!(types_seen.contains(&t), "fixture lacks {t}");
        }
    }

    #[test]
    fn metadata_round_trips() {
        let f = open_fixture("types.gguf");
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.data_offset() % 32, 0);
        assert_eq!(f.get_str("general.architecture"), Some("llama"));
        assert_eq!(f.get("test.u8"), Some(&GgufValue::U8(250)));
        assert_eq!(f.get("test.i8"), Some(&GgufValue::I8(-120)));
        assert_eq!(f.get("test.u16"), Some(&GgufValue::U16(65000)));
        assert_eq!(f.get("test.i16"), Some(&GgufValue::I16(-32000)));
        assert_eq!(f.get("test.u32"), Some(&GgufValue::U32(4_000_000_000)));
        assert_eq!(f.get("test.i32"), Some(&GgufValue::I32(-2_000_000_000)));
        assert_eq!(
            f.get("test.u64"),
            Some(&GgufValue::U64(18_000_000_000_000_000_000))
        );
        assert_eq!(
            f.get("test.i64"),
            Some(&GgufValue::I64(-9_000_000_000_000_000_000))
        );
        assert_eq!(f.get("test.f32"), Some(&GgufValue::F32(0.15625)));
        assert_eq!(f.get("test.f64"), Some(&GgufValue::F64(-1.0e300)));
        assert_eq!(
            f.get("test.bool_true").and_then(GgufValue::as_bool),
            Some(true)
        );
        assert_eq!(
            f.get("test.bool_false").and_then(GgufValue::as_bool),
            Some(false)
        );
        assert_eq!(f.get_str("test.string"), Some("héllo wörld ✓"));
        assert_eq!(f.get_str("test.empty_string"), Some(""));
        let strs: Vec<&str> = f
            .get("test.array_str")
            .and_then(GgufValue::as_array)
            .expect("array")
            .iter()
            .map(|v| v.as_str().expect("string element"))
            .collect();
        assert_eq!(strs, ["a", "", "ĠHello", "<|im_end|>"]);
        let ints: Vec<i64> = f
            .get("test.array_i32")
            .and_then(GgufValue::as_array)
            .expect("array")
            .iter()
            .filter_map(GgufValue::as_i64)
            .collect();
        assert_eq!(ints, [1, -2, 3]);
        assert_eq!(
            f.get("test.array_f32"),
            Some(&GgufValue::Array(vec![
                GgufValue::F32(0.5),
                GgufValue::F32(-1.25)
            ]))
        );
        assert_eq!(
            f.get("test.array_nested"),
            Some(&GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)]),
                GgufValue::Array(vec![GgufValue::I32(3)]),
            ]))
        );
        // Accessor conversions.
        assert_eq!(f.get_u64("test.u32"), Some(4_000_000_000));
        assert_eq!(f.get_u64("test.i8"), None, "negative values are not u64");
        assert_eq!(f.get("test.i8").and_then(GgufValue::as_i64), Some(-120));
        assert_eq!(
            f.get("test.u64").and_then(GgufValue::as_i64),
            None,
            "does not fit i64"
        );
        assert_eq!(f.get_f64("test.f32"), Some(0.15625));
        assert_eq!(f.get_f64("test.i16"), Some(-32000.0));
        assert_eq!(f.get_f64("test.string"), None);
        assert_eq!(f.get_str("test.u8"), None);
        assert_eq!(f.get("missing"), None);
        // Tensor table.
        let t = f.tensor_info("f32_3d").expect("f32_3d");
        assert_eq!(t.dims, [4, 3, 2]);
        assert_eq!(t.shape(), [2, 3, 4]);
        assert_eq!(t.n_elements(), 24);
        assert!(matches!(
            f.tensor_bytes("nope"),
            Err(GgufError::MissingTensor { .. })
        ));
        assert!(matches!(
            f.dequantize("nope"),
            Err(GgufError::MissingTensor { .. })
        ));
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let f = open_fixture("align64.gguf");
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f.dequantize("a").expect("a"), [0.0, 1.0, 2.0]);
        assert_eq!(f.dequantize("b").expect("b"), [0.0, -1.0, -2.0, -3.0, -4.0]);
        assert_eq!(f.tensor_info("b").expect("b").offset % 64, 0);
    }

    #[test]
    fn bad_magic_names_the_file() {
        let mut bytes = std::fs::read(fixture("align64.gguf")).expect("fixture");
        bytes[0..4].copy_from_slice(b"GGML");
        let path = temp_file("bad-magic", &bytes);
        let err = GgufFile::open(&path).expect_err("bad magic");
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn unsupported_version_and_missing_file_are_errors() {
        let mut bytes = std::fs::read(fixture("align64.gguf")).expect("fixture");
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        let err = parse_header(Path::new("v1.gguf"), &bytes).expect_err("v1");
        assert!(
            matches!(err, GgufError::UnsupportedVersion { version: 1, .. }),
            "{err}"
        );
        let err = GgufFile::open(Path::new("/nonexistent/model.gguf")).expect_err("missing");
        assert!(
            matches!(err, GgufError::Io { .. })
                && err.to_string().contains("/nonexistent/model.gguf")
        );
        let empty = temp_file("empty", &[]);
        let err = GgufFile::open(&empty).expect_err("empty");
        let _ = std::fs::remove_file(&empty);
        assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    }

    #[test]
    fn truncated_header_names_the_file() {
        let bytes = std::fs::read(fixture("types.gguf")).expect("fixture");
        let path = temp_file("truncated-header", &bytes[..100]);
        let err = GgufFile::open(&path).expect_err("truncated");
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn truncated_tensor_data_names_file_and_tensor() {
        let bytes = std::fs::read(fixture("types.gguf")).expect("fixture");
        // The writer pads after the last tensor, so cut well past the padding (the last
        // tensor, iq4_xs, is 272 bytes).
        let path = temp_file("truncated-data", &bytes[..bytes.len() - 100]);
        let err = GgufFile::open(&path).expect_err("truncated");
        let _ = std::fs::remove_file(&path);
        match &err {
            GgufError::TensorOutOfBounds { tensor, .. } => assert_eq!(tensor, "iq4_xs"),
            other => panic!("unexpected error {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("iq4_xs"),
            "{msg}"
        );
    }

    #[test]
    fn every_prefix_of_a_file_is_an_error_not_a_panic() {
        let bytes = std::fs::read(fixture("types.gguf")).expect("fixture");
        let h = parse_header(Path::new("full.gguf"), &bytes).expect("valid");
        let data_end = h
            .tensors
            .iter()
            .map(|t| h.data_offset as usize + t.offset as usize + t.n_bytes())
            .max();
        let data_end = data_end.expect("tensors");
        assert!(parse_header(Path::new("full.gguf"), &bytes[..data_end]).is_ok());
        for len in 0..data_end {
            let res = parse_header(Path::new("prefix.gguf"), &bytes[..len]);
            let err = res.expect_err("a strict prefix must not parse");
            assert!(err.to_string().contains("prefix.gguf"), "{err}");
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        // Flip every header byte to a few values; any outcome but a panic is fine.
        let bytes = std::fs::read(fixture("types.gguf")).expect("fixture");
        let header_len = parse_header(Path::new("x"), &bytes)
            .expect("valid")
            .data_offset as usize;
        let mut copy = bytes.clone();
        for i in 0..header_len {
            for v in [0x00, 0xFF, 0x7F, 0x80, bytes[i] ^ 0x01] {
                copy[i] = v;
                let _ = parse_header(Path::new("x"), &copy);
            }
            copy[i] = bytes[i];
        }
    }

    #[test]
    fn unknown_type_id_names_tensor_and_id() {
        let path = fixture("unknown_type.gguf");
        let err = GgufFile::open(&path).expect_err("unknown type");
        match &err {
            GgufError::UnknownType {
                tensor, type_id, ..
            } => {
                assert_eq!(tensor, "weird.weight");
                assert_eq!(*type_id, 99);
            }
            other => panic!("unexpected error {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("weird.weight") && msg.contains("99") && msg.contains("unknown_type.gguf"),
            "{msg}"
        );
    }

    #[test]
    fn hostile_counts_do_not_allocate_or_panic() {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // tensors
        b.extend_from_slice(&1u64.to_le_bytes()); // kv
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'k');
        b.extend_from_slice(&9u32.to_le_bytes()); // array
        b.extend_from_slice(&8u32.to_le_bytes()); // of strings
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = parse_header(Path::new("hostile.gguf"), &b).expect_err("huge array");
        assert!(matches!(err, GgufError::Truncated { .. }), "{err}");

        let mut b2 = b[..8].to_vec();
        b2.extend_from_slice(&u64::MAX.to_le_bytes());
        b2.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_header(Path::new("hostile.gguf"), &b2).is_err());
    }

    #[test]
    fn empty_array_parses() {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'e');
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        let h = parse_header(Path::new("empty-array.gguf"), &b).expect("valid");
        assert_eq!(h.metadata.get("e"), Some(&GgufValue::Array(vec![])));
        assert_eq!(h.version, 2);
    }

    /// Uses the real default model when it is present; skipped (with a note) otherwise.
    #[test]
    fn real_smollm2_model_if_present() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.deps/models/smollm2-135m-instruct.gguf");
        if !path.exists() {
            eprintln!(
                "note: {} not found, skipping the real-model test",
                path.display()
            );
            return;
        }
        let t0 = Instant::now();
        let f = GgufFile::open(&path).expect("open real model");
        let open_time = t0.elapsed();
        assert_eq!(f.get_str("general.architecture"), Some("llama"));
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for t in f.tensors() {
            *counts.entry(t.ggml_type.name()).or_default() += 1;
        }
        eprintln!(
            "{}: {} tensors, types {counts:?}, opened in {open_time:?}",
            path.display(),
            f.tensors().len()
        );
        let emb = f
            .tensor_info("token_embd.weight")
            .expect("token_embd.weight");
        assert_eq!(emb.shape(), [49152, 576]);
        let values = f
            .dequantize("token_embd.weight")
            .expect("dequantize embeddings");
        assert_eq!(values.len(), 49152 * 576);
        assert!(values.iter().all(|v| v.is_finite()));

        let t1 = Instant::now();
        let mut total = 0usize;
        let mut all_finite = true;
        for t in f.tensors() {
            let v = f.dequantize(&t.name).expect("dequantize");
            total += v.len();
            all_finite &= v.iter().all(|x| x.is_finite());
        }
        assert!(all_finite);
        eprintln!(
            "dequantized all {} tensors ({total} values) in {:?}",
            f.tensors().len(),
            t1.elapsed()
        );
    }
}
