//! Attention of one new token per sequence over the KV cache, on the CPU, reading the cache in
//! place.
//!
//! A decode step attends each sequence's new query to its cached keys. libtorch's CPU
//! `scaled_dot_product_attention` does that through its flash kernel: it needs the cache
//! window copied out (`index_select` for scattered slots), an explicit mask, and it calls one
//! MKL matrix-vector product per head and block, on one thread. On the default model at batch
//! 8 that was a fifth of the step. Here each (sequence, key-value head) pair is one task: the
//! keys and values of that head are read once, where they lie in the cache, for all the query
//! heads that share them (grouped-query attention), and the tasks are split over the CPU pool.
//!
//! Keys and values are read in the cache's dtype (f32, or bf16 for a bf16 model); the
//! arithmetic is f32.
//!
//! Invariant: a sequence's output is computed by the same arithmetic in the same order
//! whatever else is in the batch and whatever the window: it reads its own slot, positions
//! `0..=p` for its position `p`, and nothing else.

use std::cell::RefCell;

use tch::{Device, Kind, Tensor};

use super::cpu_pool;

/// Whether [`decode`] applies: one new f32 or bf16 query per row on the CPU, no autograd, and
/// a contiguous cache layer of the same dtype.
pub(crate) fn applies(q: &Tensor, cache_keys: &Tensor) -> bool {
    q.device() == Device::Cpu
        && matches!(q.kind(), Kind::Float | Kind::BFloat16)
        && cache_keys.kind() == q.kind()
        && cache_keys.is_contiguous()
        && q.dim() == 4
        && q.size()[2] == 1
        && !q.requires_grad()
}

/// One layer of the cache: keys and values `(slots, kv_heads, capacity, head_dim)`,
/// contiguous, in the query's dtype.
pub(crate) struct CacheLayer<'a> {
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
}

/// Attention of `q` `(b, heads, 1, head_dim)` over the cache: row `i` reads slot `slots[i]`
/// at positions `0..=positions[i]` (which must already hold the row's new key and value).
/// Returns `(b, 1, heads * head_dim)`, or `None` when a slot or position lies outside the
/// cache (the caller's checks failed; the generic path then reports it).
pub(crate) fn decode(q: &Tensor, cache: &CacheLayer<'_>, slots: &[i64], positions: &[i64]) -> Option<Tensor> {
    let q = q.contiguous();
    let [b_sz, heads, _, head_dim] = q.size()[..] else { return None };
    let [num_slots, kv_heads, capacity, cache_head_dim] = cache.keys.size()[..] else { return None };
    let shapes_agree = cache.values.size() == cache.keys.size()
        && cache.values.is_contiguous()
        && cache_head_dim == head_dim
        && kv_heads > 0
        && heads % kv_heads == 0
        && slots.len() == b_sz as usize
        && positions.len() == b_sz as usize;
    let in_cache = slots.iter().all(|s| (0..num_slots).contains(s)) && positions.iter().all(|p| (0..capacity).contains(p));
    if !shapes_agree || !in_cache {
        return None;
    }
    let out = Tensor::empty([b_sz, 1, heads * head_dim], (q.kind(), Device::Cpu));
    match q.kind() {
        Kind::Float => run::<f32>(&q, cache, &out, slots, positions),
        Kind::BFloat16 => run::<Bf16>(&q, cache, &out, slots, positions),
        _ => return None,
    }
    Some(out)
}

/// A stored value type: computation is in f32 whatever the storage.
trait Element: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

/// bf16 bits.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Bf16(u16);

impl Element for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
    /// Rounds to nearest even, as libtorch does.
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        if value.is_nan() {
            return Bf16(0x7fc0);
        }
        let bits = value.to_bits();
        Bf16(((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16)
    }
}

fn run<T: Element>(q: &Tensor, cache: &CacheLayer<'_>, out: &Tensor, slots: &[i64], positions: &[i64]) {
    let [_, heads, _, head_dim] = q.size()[..] else { return };
    let [_, kv_heads, capacity, _] = cache.keys.size()[..] else { return };
    let job = Job::<T> {
        q: q.data_ptr() as *const T,
        keys: cache.keys.data_ptr() as *const T,
        values: cache.values.data_ptr() as *const T,
        out: out.data_ptr() as *mut T,
        slots,
        positions,
        heads: heads as usize,
        kv_heads: kv_heads as usize,
        capacity: capacity as usize,
        head_dim: head_dim as usize,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    cpu_pool::run(&|part, parts| job.run_part(part, parts));
}

/// One layer's decode attention, split into (row, key-value head) tasks.
struct Job<'a, T> {
    q: *const T,
    keys: *const T,
    values: *const T,
    out: *mut T,
    slots: &'a [i64],
    positions: &'a [i64],
    heads: usize,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
    scale: f32,
}

// SAFETY: the pointers are only read, except `out`, where each task writes its own heads.
unsafe impl<T: Element> Sync for Job<'_, T> {}

thread_local! {
    /// Per-thread scores and output accumulators, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl<T: Element> Job<'_, T> {
    /// Tasks `part, part + parts, ...` (interleaved: rows at different positions cost
    /// differently, so neighbours go to different threads).
    fn run_part(&self, part: usize, parts: usize) {
        let tasks = self.slots.len() * self.kv_heads;
        SCRATCH.with_borrow_mut(|scratch| {
            for task in (part..tasks).step_by(parts.max(1)) {
                self.task(task / self.kv_heads, task % self.kv_heads, scratch);
            }
        });
    }

    fn task(&self, row: usize, kv_head: usize, scratch: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the features `task_avx512` is compiled for.
                return unsafe { self.task_avx512(row, kv_head, scratch) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features `task_avx2` is compiled for.
                return unsafe { self.task_avx2(row, kv_head, scratch) };
            }
        }
        self.task_portable(row, kv_head, scratch);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn task_avx512(&self, row: usize, kv_head: usize, scratch: &mut Vec<f32>) {
        self.task_portable(row, kv_head, scratch);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn task_avx2(&self, row: usize, kv_head: usize, scratch: &mut Vec<f32>) {
        self.task_portable(row, kv_head, scratch);
    }

    /// Softmax attention of the query heads sharing `kv_head` in `row` over keys `0..=p`.
    #[inline(always)]
    fn task_portable(&self, row: usize, kv_head: usize, scratch: &mut Vec<f32>) {
        let d = self.head_dim;
        let group = self.heads / self.kv_heads;
        let keys_len = self.positions[row] as usize + 1;
        let first_head = kv_head * group;
        scratch.clear();
        scratch.resize(group * (keys_len + 2 * d), 0.0);
        let (scores, rest) = scratch.split_at_mut(group * keys_len);
        let (acc, q) = rest.split_at_mut(group * d);
        // SAFETY: `decode` checked the slot and position against the cache's shape, so every
        // range below lies inside the tensors behind the pointers; `out` ranges of different
        // tasks are disjoint (row, head group).
        unsafe {
            let slot_base = (self.slots[row] as usize * self.kv_heads + kv_head) * self.capacity * d;
            let keys = std::slice::from_raw_parts(self.keys.add(slot_base), keys_len * d);
            let values = std::slice::from_raw_parts(self.values.add(slot_base), keys_len * d);
            let q_stored = std::slice::from_raw_parts(self.q.add((row * self.heads + first_head) * d), group * d);
            for (q, stored) in q.iter_mut().zip(q_stored) {
                *q = stored.to_f32();
            }
            let out = std::slice::from_raw_parts_mut(self.out.add((row * self.heads + first_head) * d), group * d);

            for (j, key) in keys.chunks_exact(d).enumerate() {
                for (h, q_head) in q.chunks_exact(d).enumerate() {
                    scores[h * keys_len + j] = dot(q_head, key) * self.scale;
                }
            }
            for head_scores in scores.chunks_exact_mut(keys_len) {
                let max = head_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for s in head_scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                for s in head_scores.iter_mut() {
                    *s *= inv;
                }
            }
            for (j, value) in values.chunks_exact(d).enumerate() {
                for (h, acc_head) in acc.chunks_exact_mut(d).enumerate() {
                    let weight = scores[h * keys_len + j];
                    for (a, v) in acc_head.iter_mut().zip(value) {
                        *a = v.to_f32().mul_add(weight, *a);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                *o = T::from_f32(*a);
            }
        }
    }
}

/// Lanes of independent partial sums in [`dot`].
const LANES: usize = 16;

/// A dot product with a fixed lane split and reduction order.
#[inline(always)]
fn dot<T: Element>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (a_chunk, b_chunk) = (&a[c * LANES..(c + 1) * LANES], &b[c * LANES..(c + 1) * LANES]);
        for k in 0..LANES {
            acc[k] = a_chunk[k].mul_add(b_chunk[k].to_f32(), acc[k]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in a[chunks * LANES..].iter().zip(&b[chunks * LANES..]) {
        tail = x.mul_add(y.to_f32(), tail);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Against libtorch's SDPA with an explicit mask, on scattered slots, rows at different
    /// positions, grouped-query heads and a head size with a tail after the 16-lane chunks.
    #[test]
    fn matches_sdpa_over_scattered_slots_and_is_batch_invariant() {
        tch::manual_seed(5);
        for (kind, tolerance, head_dim) in [(Kind::Float, 1e-5, 64i64), (Kind::Float, 1e-5, 40), (Kind::BFloat16, 2e-2, 64)] {
            let (slots, kv_heads, capacity, heads) = (6i64, 2i64, 50i64, 6i64);
            let opts = (Kind::Float, Device::Cpu);
            let keys = Tensor::randn([slots, kv_heads, capacity, head_dim], opts).to_kind(kind);
            let values = Tensor::randn([slots, kv_heads, capacity, head_dim], opts).to_kind(kind);
            let rows_slots = [4i64, 0, 5];
            let rows_positions = [17i64, 49, 0];
            let q = Tensor::randn([3, heads, 1, head_dim], opts).to_kind(kind);
            let cache = CacheLayer { keys: &keys, values: &values };
            let Some(ours) = decode(&q, &cache, &rows_slots, &rows_positions) else { panic!("decode refused valid input") };

            let idx = Tensor::from_slice(&rows_slots);
            let window = 50;
            let k = keys.index_select(0, &idx).to_kind(Kind::Float);
            let v = values.index_select(0, &idx).to_kind(Kind::Float);
            let key_pos = Tensor::arange(window, (Kind::Int64, Device::Cpu)).view([1, 1, 1, window]);
            let mask = key_pos.le_tensor(&Tensor::from_slice(&rows_positions).view([3, 1, 1, 1]));
            let reference = Tensor::scaled_dot_product_attention(&q.to_kind(Kind::Float), &k, &v, Some(&mask), 0.0, false, None, true).transpose(1, 2).reshape([3, 1, heads * head_dim]);
            assert_eq!(ours.kind(), kind);
            let diff = f64::try_from((ours.to_kind(Kind::Float) - &reference).abs().max()).unwrap_or(1.0);
            assert!(diff < tolerance, "{kind:?}, head_dim {head_dim}: differs from SDPA by {diff}");

            for row in 0..3 {
                let Some(alone) = decode(&q.narrow(0, row as i64, 1), &cache, &rows_slots[row..=row], &rows_positions[row..=row]) else { panic!("refused") };
                assert!(alone.equal(&ours.narrow(0, row as i64, 1)), "row {row} depends on its batch");
            }
            assert!(decode(&q, &cache, &[4, 0, 6], &rows_positions).is_none(), "a slot outside the cache must be refused");
            assert!(decode(&q, &cache, &rows_slots, &[17, 50, 0]).is_none(), "a position outside the cache must be refused");
        }
    }
}
