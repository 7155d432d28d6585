//! Multi-threaded f32 matrix-vector products for decoding on the CPU.
//!
//! A decode step multiplies a few activation rows by every weight matrix: it is bound by
//! memory bandwidth, and libtorch's CPU path (MKL `sgemv`) runs it on one core, which leaves
//! half of a 2-core machine's bandwidth unused (measured here: 11 GB/s on one or two threads).
//! This module splits the weight rows across a small persistent thread pool and computes the
//! dot products with AVX2/FMA when the CPU has them.
//!
//! Invariant: each output element is computed by the same code in the same order whatever the
//! number of activation rows, so a sequence's logits do not depend on what else is in the
//! batch. Only used without autograd (generation), on contiguous f32 CPU tensors.

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

use tch::{Device, Kind, Tensor};

/// Activation rows handled per call. Up to here the product is bandwidth-bound and two
/// cores beat libtorch's single-threaded GEMV; beyond, libtorch's GEMM (compute-bound, well
/// blocked) wins. Measured on SmolLM2-135M, 2 cores: batch 1 decode 20 ms/step here vs 55 ms
/// in libtorch; batch 8: 95 ms here vs 72 ms in libtorch.
pub(crate) const MAX_ROWS: i64 = 4;

/// Whether a pass over `rows` activation rows will use this module: the engine then drops
/// libtorch to one intra-op thread for the step, so its OpenMP workers do not spin on the
/// cores this module's workers need.
pub fn handles_rows(device: Device, kind: Kind, rows: i64) -> bool {
    device == Device::Cpu && kind == Kind::Float && rows <= MAX_ROWS && pool().is_some()
}

/// Whether [`linear`] applies to this product.
pub(crate) fn applies(x: &Tensor, weight: &Tensor) -> bool {
    x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && weight.kind() == Kind::Float
        && weight.is_contiguous()
        && !weight.requires_grad()
        && !x.requires_grad()
        && rows_of(x) <= MAX_ROWS
        && pool().is_some()
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
    let out = Tensor::empty([rows, out_features], (Kind::Float, Device::Cpu));
    let job = Job {
        weight: weight.data_ptr() as *const f32,
        x: x.data_ptr() as *const f32,
        out: out.data_ptr() as *mut f32,
        rows: rows as usize,
        in_features: in_features as usize,
        out_features: out_features as usize,
    };
    match pool() {
        Some(pool) => pool.run(&job),
        None => job.run_part(0, 1),
    }
    let out = out.view(out_shape.as_slice());
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

impl Job {
    fn run_part(&self, part: usize, parts: usize) {
        let chunk = self.out_features.div_ceil(parts);
        let start = (part * chunk).min(self.out_features);
        let end = ((part + 1) * chunk).min(self.out_features);
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features `columns_avx2` is compiled for.
                unsafe { self.columns_avx2(start, end) };
                return;
            }
        }
        self.columns(start, end);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns_avx2(&self, start: usize, end: usize) {
        self.columns(start, end);
    }

    /// Output columns `start..end` for every activation row: each weight row is read once
    /// and multiplied with up to four activation rows at a time.
    #[inline(always)]
    fn columns(&self, start: usize, end: usize) {
        let n = self.in_features;
        // SAFETY: the tensors behind the pointers are contiguous f32 of the sizes recorded in
        // the job and outlive it ([`Pool::run`] returns only when every part is done); parts
        // write disjoint output columns.
        unsafe {
            let x = |r: usize| std::slice::from_raw_parts(self.x.add(r * n), n);
            for o in start..end {
                let w = std::slice::from_raw_parts(self.weight.add(o * n), n);
                let mut r = 0;
                while r + 4 <= self.rows {
                    let sums = dot4(w, [x(r), x(r + 1), x(r + 2), x(r + 3)]);
                    for (k, sum) in sums.into_iter().enumerate() {
                        *self.out.add((r + k) * self.out_features + o) = sum;
                    }
                    r += 4;
                }
                while r < self.rows {
                    *self.out.add(r * self.out_features + o) = dot4(w, [x(r); 4])[0];
                    r += 1;
                }
            }
        }
    }
}

/// Lanes of independent partial sums per row.
const LANES: usize = 16;

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
fn finish(mut acc: [f32; LANES], w_tail: &[f32], x_tail: &[f32]) -> f32 {
    let mut tail = 0.0f32;
    for (w, x) in w_tail.iter().zip(x_tail) {
        tail = w.mul_add(*x, tail);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            acc[k] += acc[k + width];
        }
    }
    acc[0] + tail
}

/// Persistent workers that spin briefly, then park, waiting for the next job.
struct Pool {
    workers: Vec<Thread>,
    job: AtomicPtr<Job>,
    generation: AtomicU64,
    done: AtomicUsize,
    /// One job at a time; a second caller computes alone instead of waiting.
    busy: Mutex<()>,
}

// SAFETY: the raw job pointer is only dereferenced while the publishing call waits in `run`.
unsafe impl Sync for Pool {}
unsafe impl Send for Pool {}

/// Spin iterations before a worker parks (a decode step's products come microseconds apart).
const SPINS: u32 = 20_000;

fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        let threads = std::env::var("HICRA_GEMV_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        if threads <= 1 {
            return None;
        }
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            workers: Vec::new(),
            job: AtomicPtr::new(std::ptr::null_mut()),
            generation: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            busy: Mutex::new(()),
        }));
        let mut workers = Vec::new();
        for index in 1..threads {
            let spawned = std::thread::Builder::new().name(format!("hicra-gemv-{index}")).spawn(move || worker(pool, index, threads));
            match spawned {
                Ok(handle) => workers.push(handle.thread().clone()),
                Err(_) => return None,
            }
        }
        // Only this initialiser writes `workers`, before the pool is published.
        let pool_mut = pool as *const Pool as *mut Pool;
        // SAFETY: no other reference reads `workers` until OnceLock publishes the pool.
        unsafe { (*pool_mut).workers = workers };
        Some(pool)
    })
}

fn worker(pool: &'static Pool, index: usize, parts: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0;
        let generation = loop {
            let g = pool.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::park_timeout(std::time::Duration::from_millis(10));
            }
        };
        seen = generation;
        let job = pool.job.load(Ordering::Acquire);
        if !job.is_null() {
            // SAFETY: `run` keeps the job alive until `done` counts this worker.
            unsafe { (*job).run_part(index, parts) };
        }
        pool.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl Pool {
    fn run(&self, job: &Job) {
        let Ok(_guard) = self.busy.try_lock() else {
            job.run_part(0, 1);
            return;
        };
        let parts = self.workers.len() + 1;
        self.done.store(0, Ordering::Release);
        self.job.store(job as *const Job as *mut Job, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        for worker in &self.workers {
            worker.unpark();
        }
        job.run_part(0, parts);
        while self.done.load(Ordering::Acquire) < self.workers.len() {
            std::hint::spin_loop();
        }
        self.job.store(std::ptr::null_mut(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libtorch_and_is_batch_invariant() {
        tch::manual_seed(3);
        let w = Tensor::randn([37, 70], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([37], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 3, 70], (Kind::Float, Device::Cpu));
        let ours = linear(&x, &w, Some(&b));
        let reference = x.linear(&w, Some(&b));
        assert_eq!(ours.size(), vec![2, 3, 37]);
        assert!(f64::try_from((&ours - &reference).abs().max()).unwrap_or(1.0) < 1e-4);
        let alone = linear(&x.get(1).get(2).unsqueeze(0), &w, None);
        let together = linear(&x, &w, None).get(1).get(2).unsqueeze(0);
        assert!(alone.equal(&together), "a row's result must not depend on the batch");
    }
}
