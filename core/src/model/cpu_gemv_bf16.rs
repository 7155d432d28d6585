//! [`super::cpu_gemv`] for bf16 weights and activations, on CPUs with AVX512-BF16.
//!
//! bf16 halves the bytes a decode step reads. libtorch's CPU path for a few bf16 rows is slower
//! than its f32 one on this module's target (Zen 4: 62 tok/s at batch 1 against f32's 80), so
//! the gain needs a kernel of its own: the same tiling as the f32 kernel (four weight rows by
//! four activation rows in registers, the next weight rows prefetched), with `vdpbf16ps`,
//! which multiplies 32 bf16 pairs into 16 f32 sums per instruction.
//!
//! Invariant (as in the f32 kernel): each output element is computed by the same instructions
//! in the same order whatever shares its batch: 16 f32 lanes of pair sums, the tail in f32,
//! one fixed reduction ([`super::cpu_gemv::finish`]), then rounding to bf16 (nearest even, as
//! libtorch rounds).

use tch::{Device, Kind, Tensor};

use super::cpu_gemv::{finish, LANES};
use super::cpu_pool;

/// bf16 values per 512-bit register.
const PAIRS: usize = 2 * LANES;

/// Whether this CPU has the instructions the kernel needs.
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x W^T` for contiguous bf16 `x` `(rows, in)` and `weight` `(out, in)`, into `out`
/// `(rows, out)` bf16. The caller checks [`supported`].
pub(super) fn product(x: &Tensor, weight: &Tensor, out: &Tensor) {
    let job = Job {
        weight: weight.data_ptr() as *const u16,
        x: x.data_ptr() as *const u16,
        out: out.data_ptr() as *mut u16,
        rows: out.size()[0] as usize,
        in_features: weight.size()[1] as usize,
        out_features: weight.size()[0] as usize,
    };
    cpu_pool::run(&|part, parts| job.run_part(part, parts));
}

/// An output tensor for [`product`].
pub(super) fn output(rows: i64, out_features: i64) -> Tensor {
    Tensor::empty([rows, out_features], (Kind::BFloat16, Device::Cpu))
}

/// One product, split by weight rows into parts.
struct Job {
    weight: *const u16,
    x: *const u16,
    out: *mut u16,
    rows: usize,
    in_features: usize,
    out_features: usize,
}

// SAFETY: the pointers are only read, except `out`, where each part writes its own columns.
unsafe impl Sync for Job {}

impl Job {
    fn run_part(&self, part: usize, parts: usize) {
        let rows = cpu_pool::part_range(self.out_features, part, parts);
        #[cfg(target_arch = "x86_64")]
        if supported() {
            // SAFETY: the CPU supports the features `columns` is compiled for.
            unsafe { self.columns(rows.start, rows.end) };
        }
    }

    /// Output columns `start..end` for every activation row (see the module comment).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn columns(&self, start: usize, end: usize) {
        let row = |base: *const u16, r: usize| base.wrapping_add(r * self.in_features);
        let prefetch_groups_end = if self.rows <= 8 { self.rows } else { 4 };
        let mut o = start;
        while o < end {
            // A last tile of fewer than four weight rows repeats its last row (computed, not
            // stored), so every tile runs the same code.
            let tile = (end - o).min(4);
            let w: [*const u16; 4] = std::array::from_fn(|i| row(self.weight, o + i.min(tile - 1)));
            let next = (o + 8 <= end).then(|| std::array::from_fn(|i| row(self.weight, o + 4 + i)));
            let mut r = 0;
            while r < self.rows {
                let prefetch = next.filter(|_| r < prefetch_groups_end);
                // SAFETY: `r + G <= self.rows` in each arm; the CPU has the features.
                unsafe {
                    match self.rows - r {
                        1 => self.tile::<1>(w, tile, o, r, prefetch),
                        2 => self.tile::<2>(w, tile, o, r, prefetch),
                        3 => self.tile::<3>(w, tile, o, r, prefetch),
                        _ => self.tile::<4>(w, tile, o, r, prefetch),
                    }
                }
                r += (self.rows - r).min(4);
            }
            o += tile;
        }
    }

    /// Up to four weight rows `w` (the first `tile` stored, at output column `o`) against
    /// activation rows `r..r + G`, in `4 x G` registers; the next weight rows are prefetched
    /// when given.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn tile<const G: usize>(&self, w: [*const u16; 4], tile: usize, o: usize, r: usize, next: Option<[*const u16; 4]>) {
        use std::arch::x86_64::{__m512, __m512bh, _mm512_dpbf16_ps, _mm512_loadu_si512, _mm512_setzero_ps, _mm512_storeu_ps, _mm_prefetch, _MM_HINT_T0};
        let n = self.in_features;
        let chunks = n / PAIRS;
        let tail = chunks * PAIRS;
        // SAFETY: the pointers cover rows of `n` bf16 values (the caller's shapes); every load
        // reads PAIRS values at an offset below `chunks * PAIRS <= n`; parts write disjoint
        // output columns; a prefetch never faults.
        unsafe {
            let load = |p: *const u16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p.cast())) };
            let tail_of = |p: *const u16| to_f32(std::slice::from_raw_parts(p.add(tail), n - tail));
            let x: [*const u16; G] = std::array::from_fn(|i| self.x.add((r + i) * n));
            let mut acc: [[__m512; G]; 4] = [[_mm512_setzero_ps(); G]; 4];
            for c in 0..chunks {
                let at = c * PAIRS;
                if let Some(next) = next {
                    for next_row in next {
                        _mm_prefetch::<_MM_HINT_T0>(next_row.add(at) as *const i8);
                    }
                }
                let wv = [load(w[0].add(at)), load(w[1].add(at)), load(w[2].add(at)), load(w[3].add(at))];
                for (xi, x_row) in x.iter().enumerate() {
                    let xv = load(x_row.add(at));
                    for (wi, wv) in wv.iter().enumerate() {
                        acc[wi][xi] = _mm512_dpbf16_ps(acc[wi][xi], *wv, xv);
                    }
                }
            }
            for (wi, w_row) in w.iter().enumerate().take(tile) {
                let w_tail = tail_of(*w_row);
                for (xi, x_row) in x.iter().enumerate() {
                    let mut lanes = [0.0f32; LANES];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), acc[wi][xi]);
                    let x_tail = tail_of(*x_row);
                    let sum = finish(lanes, &w_tail[..n - tail], &x_tail[..n - tail]);
                    *self.out.add((r + xi) * self.out_features + o + wi) = to_bf16(sum);
                }
            }
        }
    }
}

/// A tail of fewer than [`PAIRS`] bf16 values as f32.
#[inline(always)]
fn to_f32(values: &[u16]) -> [f32; PAIRS] {
    let mut out = [0.0f32; PAIRS];
    for (o, v) in out.iter_mut().zip(values) {
        *o = bf16_to_f32(*v);
    }
    out
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub(super) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 to bf16 bits, rounding to nearest even as libtorch does (NaN stays NaN).
#[inline(always)]
pub(super) fn to_bf16(value: f32) -> u16 {
    if value.is_nan() {
        return 0x7fc0;
    }
    let bits = value.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libtorch_and_is_batch_invariant() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        tch::manual_seed(4);
        // 37 outputs (tiles of 4 and a remainder), inputs with and without a tail after the
        // 32-value chunks, every batch size up to 32.
        for in_features in [64i64, 70] {
            let w = Tensor::randn([37, in_features], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let x = Tensor::randn([32, in_features], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let all = output(32, 37);
            product(&x, &w, &all);
            let reference = x.to_kind(Kind::Float).linear::<Tensor>(&w.to_kind(Kind::Float), None);
            let err = f64::try_from((all.to_kind(Kind::Float) - &reference).abs().max()).unwrap_or(1.0);
            let scale = f64::try_from(reference.abs().max()).unwrap_or(0.0);
            assert!(err <= scale / 128.0, "bf16 product off by {err} (largest value {scale})");
            for rows in 1..=32i64 {
                let some = output(rows, 37);
                product(&x.narrow(0, 0, rows), &w, &some);
                assert!(some.equal(&all.narrow(0, 0, rows)), "rows 0..{rows} differ from the same rows in a batch of 32");
            }
        }
    }
}
