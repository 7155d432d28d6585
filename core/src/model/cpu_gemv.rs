//! Multi-threaded f32 products of a few activation rows with a weight matrix, for decoding on
//! the CPU.
//!
//! A decode step multiplies one activation row per sequence (up to `MAX_ROWS`) by every
//! weight matrix. Up to a few dozen rows that is bound by memory bandwidth: the weights must be
//! read once per step, and the arithmetic is cheap next to it. libtorch's CPU paths are not
//! built for it (MKL `sgemv` runs on one core; its GEMM on 8-32 rows re-reads the weights and
//! costs 2x the bandwidth floor on this machine). This module splits the weight rows across a
//! small persistent thread pool and streams each weight row once: with AVX-512, four weight
//! rows at a time against four activation rows at a time (16 accumulators in registers), so
//! the weights come from memory once and the activation rows from cache.
//!
//! A prefill (more than `MAX_ROWS` rows) goes through the same kernel `MAX_ROWS` rows at a
//! time: on AMD CPUs MKL's GEMM takes a generic path (a 128-token prefill of the default
//! model on 2 EPYC cores: 600-870 tok/s through MKL, 1000-1130 through this kernel).
//!
//! Invariant: each output element is computed by the same arithmetic in the same order whatever
//! the number of activation rows and whichever rows share a tile (16 lane-wise fused
//! multiply-add chains, then one fixed reduction), so a sequence's logits do not depend on what
//! else is in the batch. Only used without autograd (generation, scoring), on contiguous CPU
//! tensors.

use tch::{Device, Kind, Tensor};

use super::{cpu_gemv_bf16, cpu_pool};

/// A decode step's largest batch on this kernel.
pub(crate) const MAX_ROWS: i64 = 32;

/// Activation rows per pass over the weights in a prefill: each four-row weight tile stays in
/// L1 while it meets all of them (from L2), so the weights are read from memory once per block.
const PREFILL_BLOCK_ROWS: usize = 128;

/// Whether a pass over `rows` activation rows will use this module: the engine then drops
/// libtorch to one intra-op thread for the step, so its OpenMP workers do not spin on the
/// cores this module's workers need.
pub fn handles_rows(device: Device, kind: Kind, rows: i64) -> bool {
    device == Device::Cpu && handles_kind(kind) && (rows <= MAX_ROWS || kind == Kind::Float) && cpu_pool::pool().is_some()
}

/// f32 always; bf16 where the CPU has AVX512-BF16 ([`super::cpu_gemv_bf16`]).
fn handles_kind(kind: Kind) -> bool {
    kind == Kind::Float || (kind == Kind::BFloat16 && cpu_gemv_bf16::supported())
}

/// Whether [`linear`] applies to this product.
pub(crate) fn applies(x: &Tensor, weight: &Tensor) -> bool {
    x.device() == Device::Cpu
        && handles_kind(x.kind())
        && weight.kind() == x.kind()
        && weight.is_contiguous()
        && !weight.requires_grad()
        && !x.requires_grad()
        && (rows_of(x) <= MAX_ROWS || prefill_applies(x.kind()))
        && cpu_pool::pool().is_some()
}

/// More than [`MAX_ROWS`] rows (f32 only) go to the kernel when the caller lowered libtorch to
/// one thread for the pass ([`handles_rows`]); next to libtorch's spinning OpenMP workers the
/// kernel would be slower than MKL (a 128-token prefill: 314 tok/s against 600-870).
fn prefill_applies(kind: Kind) -> bool {
    kind == Kind::Float && tch::get_num_threads() == 1
}

fn rows_of(x: &Tensor) -> i64 {
    let size = x.size();
    size[..size.len().saturating_sub(1)].iter().product()
}

/// `x W^T + bias` for `x` of shape `(..., in)` and `weight` `(out, in)`.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let x = x.contiguous();
    let (out_features, in_features) = (weight.size()[0], weight.size()[1]);
    let rows = rows_of(&x);
    let mut out_shape = x.size();
    if let Some(last) = out_shape.last_mut() {
        *last = out_features;
    }
    if x.kind() == Kind::BFloat16 {
        let out = cpu_gemv_bf16::output(rows, out_features);
        cpu_gemv_bf16::product(&x.view([rows, in_features]), weight, &out);
        return with_bias(out.view(out_shape.as_slice()), bias);
    }
    let out = Tensor::empty([rows, out_features], (Kind::Float, Device::Cpu));
    // A prefill's rows go MAX_ROWS at a time: each block streams the weights once, and the
    // kernel's tiles keep the arithmetic of every row the same as in a decode step.
    let (x_base, out_base) = (x.data_ptr() as *const f32, out.data_ptr() as *mut f32);
    let (in_width, out_width) = (in_features as usize, out_features as usize);
    for first in (0..rows as usize).step_by(PREFILL_BLOCK_ROWS) {
        let job = Job {
            weight: weight.data_ptr() as *const f32,
            x: x_base.wrapping_add(first * in_width),
            out: out_base.wrapping_add(first * out_width),
            rows: (rows as usize - first).min(PREFILL_BLOCK_ROWS),
            in_features: in_width,
            out_features: out_width,
        };
        cpu_pool::run(&|part, parts| job.run_part(part, parts));
    }
    with_bias(out.view(out_shape.as_slice()), bias)
}

fn with_bias(out: Tensor, bias: Option<&Tensor>) -> Tensor {
    match bias {
        Some(b) => out + b,
        None => out,
    }
}

/// One product, split by weight rows into `parts`.
struct Job {
    weight: *const f32,
    x: *const f32,
    out: *mut f32,
    rows: usize,
    in_features: usize,
    out_features: usize,
}

// SAFETY: the pointers are only read, except `out`, where each part writes its own columns.
unsafe impl Sync for Job {}

impl Job {
    fn run_part(&self, part: usize, parts: usize) {
        let std::ops::Range { start, end } = cpu_pool::part_range(self.out_features, part, parts);
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the features `columns_avx512` is compiled for.
                unsafe { self.columns_avx512(start, end) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features `columns_avx2` is compiled for.
                unsafe { self.columns_avx2(start, end) };
                return;
            }
        }
        self.rows_of_columns(start, end, 0);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns_avx2(&self, start: usize, end: usize) {
        self.rows_of_columns(start, end, 0);
    }

    /// Output columns `start..end` for every activation row, four weight rows by four
    /// activation rows at a time in AVX-512 registers, then four weight rows by one activation
    /// row; weight rows left over go through [`Self::rows_of_columns`]. Each element's arithmetic is
    /// exactly [`dot4`]'s.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn columns_avx512(&self, start: usize, end: usize) {
        use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps, _mm512_storeu_ps, _mm_prefetch, _MM_HINT_T0};
        let n = self.in_features;
        let chunks = n / LANES;
        let tail = chunks * LANES;
        // SAFETY: as in `rows_of_columns`: the job's pointers cover rows of `n` floats, and every load
        // reads LANES floats at an offset below `chunks * LANES <= n`; parts write disjoint
        // output columns.
        unsafe {
            let row = |base: *const f32, r: usize| base.wrapping_add(r * n);
            let mut o = start;
            while o + 4 <= end {
                let w = [row(self.weight, o), row(self.weight, o + 1), row(self.weight, o + 2), row(self.weight, o + 3)];
                // The next four weight rows are fetched from memory while these are multiplied
                // (measured on a 2-core EPYC: batch 8 went from 22.6 to 15.5 ms a step, 32 from
                // 39.6 to 32.4). Up to eight rows, every group of activation rows requests them
                // (more requests in flight); beyond, the first group's requests have time enough.
                let next = (o + 8 <= end).then(|| [row(self.weight, o + 4), row(self.weight, o + 5), row(self.weight, o + 6), row(self.weight, o + 7)]);
                let prefetch_groups_end = if self.rows <= 8 { self.rows } else { 4 };
                let mut r = 0;
                while r + 4 <= self.rows {
                    let x = [row(self.x, r), row(self.x, r + 1), row(self.x, r + 2), row(self.x, r + 3)];
                    let mut acc: [[__m512; 4]; 4] = [[_mm512_setzero_ps(); 4]; 4];
                    let prefetch = next.filter(|_| r < prefetch_groups_end);
                    for c in 0..chunks {
                        let at = c * LANES;
                        if let Some(next) = prefetch {
                            for next_row in next {
                                _mm_prefetch::<_MM_HINT_T0>(next_row.add(at) as *const i8);
                            }
                        }
                        let wv = [_mm512_loadu_ps(w[0].add(at)), _mm512_loadu_ps(w[1].add(at)), _mm512_loadu_ps(w[2].add(at)), _mm512_loadu_ps(w[3].add(at))];
                        for (xi, x_row) in x.iter().enumerate() {
                            let xv = _mm512_loadu_ps(x_row.add(at));
                            for (wi, wv) in wv.iter().enumerate() {
                                acc[wi][xi] = _mm512_fmadd_ps(*wv, xv, acc[wi][xi]);
                            }
                        }
                    }
                    for (wi, w_row) in w.iter().enumerate() {
                        let w_tail = std::slice::from_raw_parts(w_row.add(tail), n - tail);
                        for (xi, x_row) in x.iter().enumerate() {
                            let mut lanes = [0.0f32; LANES];
                            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[wi][xi]);
                            let x_tail = std::slice::from_raw_parts(x_row.add(tail), n - tail);
                            *self.out.add((r + xi) * self.out_features + o + wi) = finish(lanes, w_tail, x_tail);
                        }
                    }
                    r += 4;
                }
                // The last rows one at a time, against the same four weight rows.
                while r < self.rows {
                    let x_row = row(self.x, r);
                    let mut acc: [__m512; 4] = [_mm512_setzero_ps(); 4];
                    for c in 0..chunks {
                        let at = c * LANES;
                        let xv = _mm512_loadu_ps(x_row.add(at));
                        for (wi, w_row) in w.iter().enumerate() {
                            acc[wi] = _mm512_fmadd_ps(_mm512_loadu_ps(w_row.add(at)), xv, acc[wi]);
                        }
                    }
                    let x_tail = std::slice::from_raw_parts(x_row.add(tail), n - tail);
                    for (wi, w_row) in w.iter().enumerate() {
                        let mut lanes = [0.0f32; LANES];
                        _mm512_storeu_ps(lanes.as_mut_ptr(), acc[wi]);
                        *self.out.add(r * self.out_features + o + wi) = finish(lanes, std::slice::from_raw_parts(w_row.add(tail), n - tail), x_tail);
                    }
                    r += 1;
                }
                o += 4;
            }
            self.rows_of_columns(o, end, 0);
        }
    }

    /// Output columns `start..end` for activation rows `first_row..`: each weight row is read
    /// once and multiplied with up to four activation rows at a time.
    #[inline(always)]
    fn rows_of_columns(&self, start: usize, end: usize, first_row: usize) {
        let n = self.in_features;
        // SAFETY: the tensors behind the pointers are contiguous f32 of the sizes recorded in
        // the job and outlive it ([`cpu_pool::run`] returns only when every part is done); parts
        // write disjoint output columns.
        unsafe {
            let x = |r: usize| std::slice::from_raw_parts(self.x.add(r * n), n);
            for o in start..end {
                let w = std::slice::from_raw_parts(self.weight.add(o * n), n);
                let mut r = first_row;
                while r + 4 <= self.rows {
                    let sums = dot4(w, [x(r), x(r + 1), x(r + 2), x(r + 3)]);
                    for (k, sum) in sums.into_iter().enumerate() {
                        *self.out.add((r + k) * self.out_features + o) = sum;
                    }
                    r += 4;
                }
                while r < self.rows {
                    *self.out.add(r * self.out_features + o) = dot1(w, x(r));
                    r += 1;
                }
            }
        }
    }
}

/// Lanes of independent partial sums per row.
pub(super) const LANES: usize = 16;

/// Four dot products of `w` with four rows in one pass over `w`. Each row's arithmetic is the
/// same whichever rows share the call (fixed lane split, fused multiply-adds, fixed reduction
/// order), which keeps results independent of the batch.
#[inline(always)]
fn dot4(w: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    let n = w.len();
    let chunks = n / LANES;
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    let [x0, x1, x2, x3] = rows;
    for c in 0..chunks {
        let range = c * LANES..(c + 1) * LANES;
        let wc = lanes(&w[range.clone()]);
        fma_lanes(&mut a0, wc, lanes(&x0[range.clone()]));
        fma_lanes(&mut a1, wc, lanes(&x1[range.clone()]));
        fma_lanes(&mut a2, wc, lanes(&x2[range.clone()]));
        fma_lanes(&mut a3, wc, lanes(&x3[range]));
    }
    let tail = chunks * LANES;
    [finish(a0, &w[tail..], &x0[tail..]), finish(a1, &w[tail..], &x1[tail..]), finish(a2, &w[tail..], &x2[tail..]), finish(a3, &w[tail..], &x3[tail..])]
}

/// [`dot4`] for one row: the same arithmetic as each of its four.
#[inline(always)]
fn dot1(w: &[f32], x: &[f32]) -> f32 {
    let chunks = w.len() / LANES;
    let mut acc = [0.0f32; LANES];
    for c in 0..chunks {
        let range = c * LANES..(c + 1) * LANES;
        fma_lanes(&mut acc, lanes(&w[range.clone()]), lanes(&x[range]));
    }
    let tail = chunks * LANES;
    finish(acc, &w[tail..], &x[tail..])
}

#[inline(always)]
fn lanes(slice: &[f32]) -> &[f32; LANES] {
    // Callers slice exactly LANES elements.
    slice.try_into().unwrap_or(&[0.0; LANES])
}

#[inline(always)]
fn fma_lanes(acc: &mut [f32; LANES], w: &[f32; LANES], x: &[f32; LANES]) {
    for k in 0..LANES {
        acc[k] = w[k].mul_add(x[k], acc[k]);
    }
}

/// Adds the tail elements and reduces the lanes pairwise in a fixed order.
#[inline(always)]
pub(super) fn finish(acc: [f32; LANES], w_tail: &[f32], x_tail: &[f32]) -> f32 {
    let mut tail = 0.0f32;
    for (w, x) in w_tail.iter().zip(x_tail) {
        tail = w.mul_add(*x, tail);
    }
    reduce_lanes(acc) + tail
}

/// The lanes' sum in a fixed order: lane k plus lane k + 8, then k + 4, k + 2, k + 1. Every
/// CPU kernel reduces with it, so results never depend on which path computed them.
#[inline(always)]
pub(super) fn reduce_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            acc[k] += acc[k + width];
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libtorch_and_is_batch_invariant() {
        tch::manual_seed(3);
        // 37 outputs (not a multiple of the 4-row tiles), inputs with and without a tail after
        // the 16-lane chunks, and every batch size up to MAX_ROWS.
        for in_features in [64i64, 70] {
            let w = Tensor::randn([37, in_features], (Kind::Float, Device::Cpu));
            let b = Tensor::randn([37], (Kind::Float, Device::Cpu));
            let x = Tensor::randn([MAX_ROWS, in_features], (Kind::Float, Device::Cpu));
            let all = linear(&x, &w, None);
            assert!(f64::try_from((&all - x.linear::<Tensor>(&w, None)).abs().max()).unwrap_or(1.0) < 1e-4);
            for rows in 1..=MAX_ROWS {
                let some = linear(&x.narrow(0, 0, rows), &w, None);
                assert!(some.equal(&all.narrow(0, 0, rows)), "rows 0..{rows} differ from the same rows in a batch of {MAX_ROWS}");
            }
            let alone = linear(&x.get(MAX_ROWS - 1).unsqueeze(0), &w, None);
            assert!(alone.equal(&all.narrow(0, MAX_ROWS - 1, 1)), "a row's result must not depend on the batch");
            // A prefill's rows go in blocks (the last one here starts at row 128), each row with
            // its decode arithmetic.
            let many = Tensor::cat(&[&x, &x.flip([0]), &x, &x.flip([0]), &x, &x.narrow(0, 0, 6)], 0);
            let blocks = linear(&many, &w, None);
            assert!(f64::try_from((&blocks - many.linear::<Tensor>(&w, None)).abs().max()).unwrap_or(1.0) < 1e-4);
            assert!(blocks.narrow(0, 5 * MAX_ROWS, 6).equal(&all.narrow(0, 0, 6)), "a row in a prefill block must equal its decode result");
            let shaped = linear(&x.view([4, MAX_ROWS / 4, in_features]), &w, Some(&b));
            assert_eq!(shaped.size(), vec![4, MAX_ROWS / 4, 37]);
            assert!(f64::try_from((&shaped - x.linear(&w, Some(&b)).view([4, MAX_ROWS / 4, 37])).abs().max()).unwrap_or(1.0) < 1e-4);
        }
    }
}
