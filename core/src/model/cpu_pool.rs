//! A small persistent thread pool for the CPU decode kernels ([`super::cpu_gemv`],
//! [`super::cpu_attention`]).
//!
//! A decode step calls a few hundred short kernels, microseconds apart. Waking OS threads for
//! each would cost more than the work, so the workers spin briefly between jobs and only then
//! park. One job runs at a time: a second caller computes alone instead of waiting.

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

/// A job: called once per part with `(part, parts)`; parts must touch disjoint outputs.
pub(crate) type Work<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// Persistent workers that spin briefly, then park, waiting for the next job.
pub(crate) struct Pool {
    workers: Vec<Thread>,
    /// Points at a `&Work` that lives on the stack of the `run` call publishing it.
    job: AtomicPtr<()>,
    generation: AtomicU64,
    done: AtomicUsize,
    /// One job at a time.
    busy: Mutex<()>,
}

/// Spin iterations before a worker parks (a decode step's kernels come microseconds apart).
const SPINS: u32 = 20_000;

/// Processes sharing this machine's cores (data-parallel replicas on one host).
static CORE_SHARERS: AtomicUsize = AtomicUsize::new(1);

/// Tells the CPU kernels that `processes` replicas share this machine's cores: unless
/// `HICRA_GEMV_THREADS` says otherwise, the pool then takes `cores / processes` threads, and so
/// does libtorch unless `OMP_NUM_THREADS` is set. Replicas spinning on more threads than there
/// are cores slow each other down several times over. Call it before the first forward pass.
pub fn share_cores_among(processes: usize) {
    let processes = processes.max(1);
    CORE_SHARERS.store(processes, Ordering::Relaxed);
    if processes > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
        tch::set_num_threads((available_cores() / processes).max(1) as i32);
    }
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The process-wide pool: `HICRA_GEMV_THREADS` threads (default: the available parallelism,
/// divided among replicas sharing the machine), `None` with a single thread.
pub(crate) fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        let threads = std::env::var("HICRA_GEMV_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| (available_cores() / CORE_SHARERS.load(Ordering::Relaxed)).max(1));
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

/// Runs `f`, a heavy libtorch kernel (a prefill's attention), with as many libtorch threads as
/// the pool has, when the caller lowered libtorch to fewer so that its workers would not spin
/// against the pool's during the pass; the previous count comes back afterwards.
pub(crate) fn with_libtorch_threads<T>(f: impl FnOnce() -> T) -> T {
    let Some(pool) = pool() else { return f() };
    let threads = (pool.workers.len() + 1) as i32;
    let previous = tch::get_num_threads();
    if previous >= threads {
        return f();
    }
    tch::set_num_threads(threads);
    let out = f();
    tch::set_num_threads(previous);
    out
}

/// Part `part` of `parts` equal, contiguous shares of `0..len` (the last may be shorter or
/// empty): a weight matrix's rows, split once per product.
pub(crate) fn part_range(len: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    let chunk = len.div_ceil(parts.max(1));
    (part * chunk).min(len)..((part + 1) * chunk).min(len)
}

/// Runs `work` split into parts over the pool, or in one part on the calling thread when
/// there is no pool or it is busy. Returns when every part is done.
pub(crate) fn run(work: &Work<'_>) {
    match pool() {
        Some(pool) => pool.run(work),
        None => work(0, 1),
    }
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
            // SAFETY: `run` stored a pointer to a live `&Work` and keeps it alive until `done`
            // counts this worker.
            let work: &Work<'_> = unsafe { *(job as *const &Work<'_>) };
            work(index, parts);
        }
        pool.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl Pool {
    fn run(&self, work: &Work<'_>) {
        let Ok(_guard) = self.busy.try_lock() else {
            work(0, 1);
            return;
        };
        let parts = self.workers.len() + 1;
        self.done.store(0, Ordering::Release);
        let published: &Work<'_> = work;
        self.job.store(&published as *const &Work<'_> as *mut (), Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        for worker in &self.workers {
            worker.unpark();
        }
        work(0, parts);
        while self.done.load(Ordering::Acquire) < self.workers.len() {
            std::hint::spin_loop();
        }
        self.job.store(std::ptr::null_mut(), Ordering::Release);
    }
}
