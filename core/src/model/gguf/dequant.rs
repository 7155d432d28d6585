//! ggml tensor types and their exact dequantization to `f32`.
//!
//! Every `dequantize_*` kernel below reproduces ggml's reference `dequantize_row_*`
//! (`ggml-quants.c`) operation for operation, so the result is bit-identical to ggml and to
//! gguf-py's `gguf.quants.dequantize`. That rules out fused multiply-add and re-association:
//! `d * q - m` is one rounded product followed by one rounded subtraction, and
//! `d * sc * q` is `(d * sc) * q`. Rust never contracts floating-point expressions on its own,
//! so writing the expression in ggml's order is enough.
//!
//! Kernels work on whole blocks through fixed-size array references (`&[u8; TYPE_SIZE]`,
//! `&mut [f32; BLOCK_SIZE]`) so the compiler can drop the bounds checks; large tensors are
//! split at block boundaries across threads with [`std::thread::scope`].

use half::f16;

use super::GgufError;

/// The element type of a GGUF tensor (`enum ggml_type`), with ggml's numeric ids.
///
/// All types known to ggml are listed so that a file using any of them can be opened and its
/// byte ranges checked; [`GgmlType::can_dequantize`] says which ones [`dequantize`] supports.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 32 weights: f16 scale, 4-bit quants centred on 8.
    Q4_0,
    /// 32 weights: f16 scale and minimum, 4-bit quants.
    Q4_1,
    /// 32 weights: f16 scale, 5-bit quants centred on 16.
    Q5_0,
    /// 32 weights: f16 scale and minimum, 5-bit quants.
    Q5_1,
    /// 32 weights: f16 scale, 8-bit signed quants.
    Q8_0,
    /// 32 weights: f32 scale and sum, 8-bit quants (activation type, no reference dequantizer).
    Q8_1,
    /// 256-weight super-block, 2-bit quants with 4-bit scales and minimums.
    Q2_K,
    /// 256-weight super-block, 3-bit quants with 6-bit scales.
    Q3_K,
    /// 256-weight super-block, 4-bit quants with 6-bit scales and minimums.
    Q4_K,
    /// 256-weight super-block, 5-bit quants with 6-bit scales and minimums.
    Q5_K,
    /// 256-weight super-block, 6-bit quants with 8-bit scales.
    Q6_K,
    /// 256-weight super-block, f32 scale, 8-bit quants and block sums.
    Q8_K,
    /// i-quant, 2.06 bits per weight.
    IQ2_XXS,
    /// i-quant, 2.31 bits per weight.
    IQ2_XS,
    /// i-quant, 3.06 bits per weight.
    IQ3_XXS,
    /// i-quant, 1.56 bits per weight.
    IQ1_S,
    /// 32 weights: f16 scale, 4-bit indices into a non-linear table.
    IQ4_NL,
    /// i-quant, 3.44 bits per weight.
    IQ3_S,
    /// i-quant, 2.5 bits per weight.
    IQ2_S,
    /// 256-weight super-block of non-linear 4-bit quants with 6-bit scales.
    IQ4_XS,
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// 64-bit IEEE float.
    F64,
    /// i-quant, 1.75 bits per weight.
    IQ1_M,
    /// bfloat16.
    BF16,
    /// ternary, 1.69 bits per weight.
    TQ1_0,
    /// ternary, 2.06 bits per weight.
    TQ2_0,
}

/// Elements per K-quant super-block (`QK_K`).
const QK_K: usize = 256;

/// Non-linear code book of IQ4_NL and IQ4_XS (`kvalues_iq4nl`).
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Tensors with at least this many elements are split across threads: below it the spawn
/// cost (tens of microseconds) is comparable to the work.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 18;

/// Upper bound on dequantization threads; the work is memory-bound well before this.
const MAX_THREADS: usize = 8;

impl GgmlType {
    /// Maps a raw `ggml_type` id to the type, `None` for ids ggml does not define (or has
    /// removed, such as 4 and 5, the old Q4_2/Q4_3).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            _ => return None,
        })
    }

    /// The raw `ggml_type` id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
        }
    }

    /// ggml's name for the type (`"Q4_K"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
        }
    }

    /// Elements per block (1 for plain scalar types).
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL => 32,
            _ => QK_K,
        }
    }

    /// Bytes per block (`ggml_type_size`), as in gguf-py's `GGML_QUANT_SIZES`.
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            F64 | I64 => 8,
            I8 => 1,
            Q4_0 => 2 + 16,
            Q4_1 => 2 + 2 + 16,
            Q5_0 => 2 + 4 + 16,
            Q5_1 => 2 + 2 + 4 + 16,
            Q8_0 => 2 + 32,
            Q8_1 => 4 + 4 + 32,
            Q2_K => 2 + 2 + QK_K / 16 + QK_K / 4,
            Q3_K => 2 + QK_K / 4 + QK_K / 8 + 12,
            Q4_K => 2 + 2 + QK_K / 2 + 12,
            Q5_K => 2 + 2 + QK_K / 2 + QK_K / 8 + 12,
            Q6_K => 2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
            Q8_K => 4 + QK_K + QK_K / 8,
            IQ2_XXS => 2 + QK_K / 4,
            IQ2_XS => 2 + QK_K / 4 + QK_K / 32,
            IQ3_XXS => 2 + QK_K / 4 + QK_K / 8,
            IQ1_S => 2 + QK_K / 8 + QK_K / 16,
            IQ4_NL => 2 + 16,
            IQ3_S => 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
            IQ2_S => 2 + QK_K / 4 + QK_K / 16,
            IQ4_XS => 2 + 2 + QK_K / 2 + QK_K / 64,
            IQ1_M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            TQ1_0 => 2 + 4 * 13,
            TQ2_0 => 2 + 64,
        }
    }

    /// Exact byte size of `n_elements` elements of this type; `None` when `n_elements` is not
    /// a whole number of blocks or the size overflows `usize`.
    pub fn byte_size(self, n_elements: usize) -> Option<usize> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }

    /// Whether [`dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
                | IQ4_NL
                | IQ4_XS
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantizes `n_elements` values of `ggml_type` stored in `bytes` (exactly
/// [`GgmlType::byte_size`] bytes) to `f32`, bit-exactly as ggml's `dequantize_row_*`.
///
/// The output keeps the storage order, which for a GGUF tensor is row-major over
/// [`GgufTensorInfo::shape`](super::GgufTensorInfo::shape).
///
/// # Examples
///
/// ```
/// use hicra_core::model::gguf::{dequantize, GgmlType};
/// # fn main() -> Result<(), hicra_core::model::gguf::GgufError> {
/// // One Q8_0 block: f16 scale 0.5, then 32 signed quants.
/// let mut block = vec![0x00, 0x38];
/// block.extend((0..32).map(|i| (i as i8 - 16) as u8));
/// let values = dequantize(GgmlType::Q8_0, &block, 32)?;
/// assert_eq!(values[0], -8.0);
/// assert_eq!(values[31], 7.5);
/// # Ok(())
/// # }
/// ```
pub fn dequantize(
    ggml_type: GgmlType,
    bytes: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, GgufError> {
    dequantize_named(ggml_type, bytes, n_elements, UNNAMED)
}

/// Like [`dequantize`] but writes into `out`, whose length gives the element count; lets a
/// caller fill memory it already owns (a pinned buffer, a tensor's storage) without a copy.
pub fn dequantize_into(
    ggml_type: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), GgufError> {
    dequantize_into_named(ggml_type, bytes, out, UNNAMED)
}

/// Tensor name used in errors from the free functions, which have no name to report.
const UNNAMED: &str = "<unnamed>";

/// [`dequantize`] with a tensor name for the errors.
pub(crate) fn dequantize_named(
    ggml_type: GgmlType,
    bytes: &[u8],
    n_elements: usize,
    tensor: &str,
) -> Result<Vec<f32>, GgufError> {
    // Validate before allocating so a bogus count cannot trigger a huge allocation.
    check_sizes(ggml_type, bytes.len(), n_elements, tensor)?;
    let mut out = vec![0f32; n_elements];
    dequantize_into_named(ggml_type, bytes, &mut out, tensor)?;
    Ok(out)
}

/// [`dequantize_into`] with a tensor name for the errors.
pub(crate) fn dequantize_into_named(
    ggml_type: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
    tensor: &str,
) -> Result<(), GgufError> {
    check_sizes(ggml_type, bytes.len(), out.len(), tensor)?;
    use GgmlType::*;
    match ggml_type {
        F32 => par::<4, 1>(bytes, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        F16 => par::<2, 1>(bytes, out, |b, y| y[0] = f16::from_le_bytes(*b).to_f32()),
        BF16 => par::<2, 1>(bytes, out, |b, y| {
            y[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16)
        }),
        F64 => par::<8, 1>(bytes, out, |b, y| y[0] = f64::from_le_bytes(*b) as f32),
        Q4_0 => par::<18, 32>(bytes, out, block_q4_0),
        Q4_1 => par::<20, 32>(bytes, out, block_q4_1),
        Q5_0 => par::<22, 32>(bytes, out, block_q5_0),
        Q5_1 => par::<24, 32>(bytes, out, block_q5_1),
        Q8_0 => par::<34, 32>(bytes, out, block_q8_0),
        Q2_K => par::<84, QK_K>(bytes, out, block_q2_k),
        Q3_K => par::<110, QK_K>(bytes, out, block_q3_k),
        Q4_K => par::<144, QK_K>(bytes, out, block_q4_k),
        Q5_K => par::<176, QK_K>(bytes, out, block_q5_k),
        Q6_K => par::<210, QK_K>(bytes, out, block_q6_k),
        Q8_K => par::<292, QK_K>(bytes, out, block_q8_k),
        IQ4_NL => par::<18, 32>(bytes, out, block_iq4_nl),
        IQ4_XS => par::<136, QK_K>(bytes, out, block_iq4_xs),
        other => {
            return Err(GgufError::UnsupportedType {
                tensor: tensor.to_owned(),
                type_name: other.name(),
                type_id: other.id(),
            })
        }
    }
    Ok(())
}

/// Checks that `n_bytes` is exactly `n_elements` of `ggml_type` and the type is supported.
fn check_sizes(
    ggml_type: GgmlType,
    n_bytes: usize,
    n_elements: usize,
    tensor: &str,
) -> Result<(), GgufError> {
    if !ggml_type.can_dequantize() {
        return Err(GgufError::UnsupportedType {
            tensor: tensor.to_owned(),
            type_name: ggml_type.name(),
            type_id: ggml_type.id(),
        });
    }
    match ggml_type.byte_size(n_elements) {
        Some(expected) if expected == n_bytes => Ok(()),
        expected => Err(GgufError::SizeMismatch {
            tensor: tensor.to_owned(),
            type_name: ggml_type.name(),
            n_elements,
            expected_bytes: expected,
            actual_bytes: n_bytes,
        }),
    }
}

/// Runs `kernel` over every block, in parallel for large inputs. Callers guarantee
/// `x.len() / TS == y.len() / BS` with no remainder (see [`check_sizes`]).
fn par<const TS: usize, const BS: usize>(
    x: &[u8],
    y: &mut [f32],
    kernel: impl Fn(&[u8; TS], &mut [f32; BS]) + Sync,
) {
    let n_blocks = y.len() / BS;
    let threads = if y.len() >= PARALLEL_MIN_ELEMENTS {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS)
    } else {
        1
    };
    if threads <= 1 {
        run_blocks(x, y, &kernel);
        return;
    }
    let blocks_per_thread = n_blocks.div_ceil(threads);
    let kernel = &kernel;
    std::thread::scope(|s| {
        for (xc, yc) in x
            .chunks(blocks_per_thread * TS)
            .zip(y.chunks_mut(blocks_per_thread * BS))
        {
            s.spawn(move || run_blocks(xc, yc, kernel));
        }
    });
}

/// Sequential loop over whole blocks, handing the kernel fixed-size views.
#[inline(always)]
fn run_blocks<const TS: usize, const BS: usize>(
    x: &[u8],
    y: &mut [f32],
    kernel: &impl Fn(&[u8; TS], &mut [f32; BS]),
) {
    for (b, o) in x.chunks_exact(TS).zip(y.chunks_exact_mut(BS)) {
        // Both conversions always succeed (chunks_exact yields exactly TS / BS items); the
        // `if let` keeps this path free of panics and compiles to nothing.
        if let (Ok(b), Ok(o)) = (<&[u8; TS]>::try_from(b), <&mut [f32; BS]>::try_from(o)) {
            kernel(b, o);
        }
    }
}

/// Reads the little-endian f16 at `b[i..i + 2]` as f32.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `dequantize_row_q4_0`: `y = (q - 8) * d`.
#[inline(always)]
fn block_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `dequantize_row_q4_1`: `y = q * d + m`.
#[inline(always)]
fn block_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `dequantize_row_q5_0`: `y = (q - 16) * d`, the fifth bit from `qh`.
#[inline(always)]
fn block_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `dequantize_row_q5_1`: `y = q * d + m`, the fifth bit from `qh`.
#[inline(always)]
fn block_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = (qs[j] & 0x0F) | xh0;
        let x1 = (qs[j] >> 4) | xh1;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// `dequantize_row_q8_0`: `y = q * d`.
#[inline(always)]
fn block_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// `dequantize_row_q2_K`: 16 sub-blocks of 16, `y = (d * sc) * q - dmin * m`.
#[inline(always)]
fn block_q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let base = n * 128 + j * 32 + half * 16;
                for l in 0..16 {
                    let v = ((q[half * 16 + l] >> shift) & 3) as f32;
                    y[base + l] = dl * v - ml;
                }
            }
        }
    }
}

/// `dequantize_row_q3_K`: 16 sub-blocks of 16 with 6-bit signed scales, `y = (d * sc) * q`,
/// where the high bit set in `hmask` means "no offset" and a clear bit subtracts 4.
#[inline(always)]
fn block_q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let hm = &b[0..32];
    let qs = &b[32..96];
    let sc_raw = &b[96..108];
    let d = f16_at(b, 108);
    let mut scales = [0i8; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 {
            sc_raw[i] & 0x0F
        } else {
            sc_raw[i - 8] >> 4
        };
        let high = (sc_raw[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | (high << 4)) as i8 - 32;
    }
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            let m = 1u8 << (n * 4 + j);
            for half in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                let base = n * 128 + j * 32 + half * 16;
                for l in 0..16 {
                    let k = half * 16 + l;
                    let low = ((q[k] >> shift) & 3) as i8;
                    let off = if hm[k] & m != 0 { 0 } else { 4 };
                    y[base + l] = dl * (low - off) as f32;
                }
            }
        }
    }
}

/// `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K
/// super-block.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `dequantize_row_q4_K`: 8 sub-blocks of 32, `y = (d * sc) * q - dmin * m`.
#[inline(always)]
fn block_q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let d1 = d * sc1 as f32;
        let m1 = dmin * m1 as f32;
        let d2 = d * sc2 as f32;
        let m2 = dmin * m2 as f32;
        let q = &qs[c * 32..c * 32 + 32];
        let out = &mut y[c * 64..c * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `dequantize_row_q5_K`: as Q4_K with a fifth bit per weight from `qh`.
#[inline(always)]
fn block_q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let d1 = d * sc1 as f32;
        let m1 = dmin * m1 as f32;
        let d2 = d * sc2 as f32;
        let m2 = dmin * m2 as f32;
        let u1 = 1u8 << (2 * c);
        let u2 = 2u8 << (2 * c);
        let q = &qs[c * 32..c * 32 + 32];
        let out = &mut y[c * 64..c * 64 + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
            out[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// `dequantize_row_q6_K`: 16 sub-blocks of 16 with signed 8-bit scales, `y = (d * sc) * q`.
#[inline(always)]
fn block_q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &ql_all[n * 64..n * 64 + 64];
        let qh = &qh_all[n * 32..n * 32 + 32];
        let sc = &sc_all[n * 8..n * 8 + 8];
        let out = &mut y[n * 128..n * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            out[l] = d * sc[is] as i8 as f32 * q1 as f32;
            out[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            out[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            out[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// `dequantize_row_q8_K`: f32 scale, `y = d * q` (the block sums are ignored).
#[inline(always)]
fn block_q8_k(b: &[u8; 292], y: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..QK_K {
        y[j] = d * b[4 + j] as i8 as f32;
    }
}

/// `dequantize_row_iq4_nl`: `y = d * kvalues[q]`.
#[inline(always)]
fn block_iq4_nl(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * KVALUES_IQ4NL[(qs[j] & 0x0F) as usize] as f32;
        y[j + 16] = d * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
    }
}

/// `dequantize_row_iq4_xs`: 8 sub-blocks of 32 with 6-bit scales,
/// `y = (d * (ls - 32)) * kvalues[q]`.
#[inline(always)]
fn block_iq4_xs(b: &[u8; 136], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let scales_l = &b[4..8];
    let qs_all = &b[8..136];
    for ib in 0..8 {
        let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F) as i32
            | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
        let dl = d * (ls - 32) as f32;
        let qs = &qs_all[ib * 16..ib * 16 + 16];
        let out = &mut y[ib * 32..ib * 32 + 32];
        for j in 0..16 {
            out[j] = dl * KVALUES_IQ4NL[(qs[j] & 0x0F) as usize] as f32;
            out[j + 16] = dl * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip_and_sizes_match_gguf_py() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id, "{t}");
                assert!(t.type_size() > 0);
            }
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::Q4_1.byte_size(64), Some(40));
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(GgmlType::Q4_K.byte_size(100), None);
    }

    #[test]
    fn q8_k_matches_reference_formula() {
        let mut block = vec![0u8; 292];
        block[0..4].copy_from_slice(&0.25f32.to_le_bytes());
        for j in 0..256 {
            block[4 + j] = (j as i32 - 128) as i8 as u8;
        }
        let y = dequantize(GgmlType::Q8_K, &block, 256).expect("valid block");
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, 0.25 * (j as i32 - 128) as f32);
        }
    }

    #[test]
    fn wrong_sizes_and_unsupported_types_are_errors() {
        let err = dequantize(GgmlType::Q4_0, &[0u8; 17], 32).expect_err("short block");
        assert!(
            matches!(
                err,
                GgufError::SizeMismatch {
                    expected_bytes: Some(18),
                    ..
                }
            ),
            "{err}"
        );
        let err = dequantize(GgmlType::Q4_0, &[0u8; 18], 31).expect_err("not a block multiple");
        assert!(
            matches!(
                err,
                GgufError::SizeMismatch {
                    expected_bytes: None,
                    ..
                }
            ),
            "{err}"
        );
        let err = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], 256).expect_err("unsupported");
        assert!(err.to_string().contains("IQ2_XXS"), "{err}");
        let mut out = [0f32; 3];
        assert!(dequantize_into(GgmlType::F32, &[0u8; 8], &mut out).is_err());
    }

    #[test]
    fn parallel_split_matches_sequential() {
        // Enough Q4_1 blocks to cross PARALLEL_MIN_ELEMENTS, with an odd block count so the
        // last thread gets a shorter chunk.
        let n_blocks = PARALLEL_MIN_ELEMENTS / 32 + 7;
        let mut bytes = vec![0u8; n_blocks * 20];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for (i, byte) in bytes.iter_mut().enumerate() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Keep the two f16 fields finite: clear the exponent's top bit.
            *byte = if i % 20 == 1 || i % 20 == 3 {
                (state as u8) & 0x3F
            } else {
                state as u8
            };
        }
        let par_out = dequantize(GgmlType::Q4_1, &bytes, n_blocks * 32).expect("valid");
        let mut seq_out = vec![0f32; n_blocks * 32];
        run_blocks::<20, 32>(&bytes, &mut seq_out, &block_q4_1);
        assert!(par_out
            .iter()
            .zip(&seq_out)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
