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

use super::cpu_gemv::{reduce_lanes, LANES};
use super::cpu_gemv_bf16::{bf16_to_f32, to_bf16};
use super::cpu_pool;

/// Whether [`decode`] applies to new tokens in `activations` (the queries or the fused
/// projection): f32 or bf16 on the CPU, no autograd, and a contiguous cache layer of the same
/// dtype. [`decode`] checks the shapes.
pub(crate) fn applies(activations: &Tensor, cache_keys: &Tensor) -> bool {
    activations.device() == Device::Cpu
        && matches!(activations.kind(), Kind::Float | Kind::BFloat16)
        && cache_keys.kind() == activations.kind()
        && cache_keys.is_contiguous()
        && !activations.requires_grad()
}

/// One layer of the cache: keys and values `(slots, kv_heads, capacity, head_dim)`,
/// contiguous, in the query's dtype.
pub(crate) struct CacheLayer<'a> {
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
}

/// A decode step's new tokens, one per row.
pub(crate) enum NewTokens<'a> {
    /// Queries `(b, heads, 1, head_dim)` after RoPE; the cache already holds the new keys
    /// and values.
    Queries(&'a Tensor),
    /// The fused q|k|v projection `(b, 1, (heads + 2 kv_heads) * head_dim)` before RoPE,
    /// contiguous, and each row's RoPE rows `cos`, signed `sin` `(b, 1, 1, head_dim)` (see
    /// [`super::rope`]): RoPE, the cache write and attention then happen in one pass, with
    /// libtorch's arithmetic for RoPE (`x * cos + roll(x, d / 2) * sin`, each operation
    /// rounded to the dtype).
    Projected { qkv: &'a Tensor, cos: &'a Tensor, sin: &'a Tensor },
}

/// Attention of the new tokens over the cache: row `i` reads slot `slots[i]` at positions
/// `0..=positions[i]` (with [`NewTokens::Projected`], after writing its new key and value at
/// `positions[i]`). Returns `(b, 1, heads * head_dim)`, or `None` when the shapes disagree
/// or a slot or position lies outside the cache or repeats (the caller's checks failed; the
/// generic path then reports it).
pub(crate) fn decode(new: NewTokens<'_>, heads: i64, cache: &CacheLayer<'_>, slots: &[i64], positions: &[i64]) -> Option<Tensor> {
    let [num_slots, kv_heads, capacity, head_dim] = cache.keys.size()[..] else { return None };
    let (kind, b_sz, source_ok) = match &new {
        NewTokens::Queries(q) => (q.kind(), q.size()[0], q.size() == [q.size()[0], heads, 1, head_dim]),
        NewTokens::Projected { qkv, cos, sin } => {
            let b = qkv.size()[0];
            let rows_ok = |t: &Tensor| t.size() == [b, 1, 1, head_dim] && t.is_contiguous() && t.kind() == qkv.kind();
            let fits = qkv.size() == [b, 1, (heads + 2 * kv_heads) * head_dim] && head_dim as usize <= MAX_HEAD_DIM;
            (qkv.kind(), b, fits && qkv.is_contiguous() && rows_ok(cos) && rows_ok(sin))
        }
    };
    let shapes_agree = source_ok
        && cache.keys.kind() == kind
        && cache.values.size() == cache.keys.size()
        && cache.values.kind() == kind
        && cache.keys.is_contiguous()
        && cache.values.is_contiguous()
        && kv_heads > 0
        && heads % kv_heads == 0
        && slots.len() == b_sz as usize
        && positions.len() == b_sz as usize;
    let in_cache = slots.iter().all(|s| (0..num_slots).contains(s)) && positions.iter().all(|p| (0..capacity).contains(p));
    // Tasks write their own row's cache cells: two rows in one slot would race.
    let distinct = slots.iter().enumerate().all(|(i, s)| !slots[..i].contains(s));
    if !shapes_agree || !in_cache || !distinct {
        return None;
    }
    let out = Tensor::empty([b_sz, 1, heads * head_dim], (kind, Device::Cpu));
    let queries = match &new {
        NewTokens::Queries(q) => q.contiguous(),
        NewTokens::Projected { qkv, .. } => qkv.shallow_clone(),
    };
    let projected = match &new {
        NewTokens::Queries(_) => None,
        NewTokens::Projected { cos, sin, .. } => Some((cos.data_ptr(), sin.data_ptr())),
    };
    let shape = Shape { heads: heads as usize, kv_heads: kv_heads as usize, capacity: capacity as usize, head_dim: head_dim as usize };
    let pointers = Pointers { queries: queries.data_ptr(), rope: projected, keys: cache.keys.data_ptr(), values: cache.values.data_ptr(), out: out.data_ptr() };
    match kind {
        Kind::Float => run::<f32>(pointers, shape, slots, positions),
        Kind::BFloat16 => run::<Bf16>(pointers, shape, slots, positions),
        _ => return None,
    }
    Some(out)
}

/// The tensors a job reads and writes, untyped.
struct Pointers {
    /// Queries `(b, heads, d)`, or with `rope` the fused projection `(b, (heads + 2 kv_heads) * d)`.
    queries: *mut std::ffi::c_void,
    /// Each row's `cos`, signed `sin` `(b, d)` for [`NewTokens::Projected`].
    rope: Option<(*mut std::ffi::c_void, *mut std::ffi::c_void)>,
    keys: *mut std::ffi::c_void,
    values: *mut std::ffi::c_void,
    out: *mut std::ffi::c_void,
}

#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
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
        bf16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        Bf16(to_bf16(value))
    }
}

fn run<T: Element>(pointers: Pointers, shape: Shape, slots: &[i64], positions: &[i64]) {
    let job = Job::<T> {
        queries: pointers.queries as *const T,
        rope: pointers.rope.map(|(cos, sin)| (cos as *const T, sin as *const T)),
        keys: pointers.keys as *mut T,
        values: pointers.values as *mut T,
        out: pointers.out as *mut T,
        slots,
        positions,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        capacity: shape.capacity,
        head_dim: shape.head_dim,
        scale: 1.0 / (shape.head_dim as f32).sqrt(),
    };
    cpu_pool::run(&|part, parts| job.run_part(part, parts));
}

/// One layer's decode attention, split into (row, key-value head) tasks.
struct Job<'a, T> {
    /// See [`Pointers::queries`].
    queries: *const T,
    /// See [`Pointers::rope`].
    rope: Option<(*const T, *const T)>,
    /// Written only with `rope`, at each row's own slot and position.
    keys: *mut T,
    values: *mut T,
    out: *mut T,
    slots: &'a [i64],
    positions: &'a [i64],
    heads: usize,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
    scale: f32,
}

// SAFETY: each task writes only its own row's output heads and, with `rope`, its own row's
// cache cells (`decode` checked that rows have distinct slots); everything else is read.
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
            self.queries_of(row, kv_head, slot_base + (keys_len - 1) * d, q);
            let keys = std::slice::from_raw_parts(self.keys.add(slot_base), keys_len * d);
            let values = std::slice::from_raw_parts(self.values.add(slot_base), keys_len * d);
            let out = std::slice::from_raw_parts_mut(self.out.add((row * self.heads + first_head) * d), group * d);
            for (j, key) in keys.chunks_exact(d).enumerate() {
                for (h, q_head) in q.chunks_exact(d).enumerate() {
                    scores[h * keys_len + j] = dot(q_head, key) * self.scale;
                }
            }
            for head_scores in scores.chunks_exact_mut(keys_len) {
                softmax_in_place(head_scores);
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

    /// The f32 queries of the heads sharing `kv_head` in `row`, into `q`. With projected new
    /// tokens it also applies RoPE and writes the row's new key and value at cache offset
    /// `new_at`.
    ///
    /// # Safety
    /// `row`, `kv_head` and `new_at` must lie inside the job's tensors (`decode` checks them).
    #[inline(always)]
    unsafe fn queries_of(&self, row: usize, kv_head: usize, new_at: usize, q: &mut [f32]) {
        let d = self.head_dim;
        let first_head = kv_head * (self.heads / self.kv_heads);
        // SAFETY: the caller's contract.
        unsafe {
            let Some((cos, sin)) = self.rope else {
                let stored = std::slice::from_raw_parts(self.queries.add((row * self.heads + first_head) * d), q.len());
                for (q, stored) in q.iter_mut().zip(stored) {
                    *q = stored.to_f32();
                }
                return;
            };
            let width = (self.heads + 2 * self.kv_heads) * d;
            let projected = std::slice::from_raw_parts(self.queries.add(row * width), width);
            let cos = std::slice::from_raw_parts(cos.add(row * d), d);
            let sin = std::slice::from_raw_parts(sin.add(row * d), d);
            let new_key = std::slice::from_raw_parts_mut(self.keys.add(new_at), d);
            rope(&projected[(self.heads + kv_head) * d..][..d], cos, sin, new_key);
            let new_value = std::slice::from_raw_parts_mut(self.values.add(new_at), d);
            new_value.copy_from_slice(&projected[(self.heads + self.kv_heads + kv_head) * d..][..d]);
            let mut rotated = [T::from_f32(0.0); MAX_HEAD_DIM];
            for (h, q_head) in q.chunks_exact_mut(d).enumerate() {
                rope(&projected[(first_head + h) * d..][..d], cos, sin, &mut rotated[..d]);
                for (q, r) in q_head.iter_mut().zip(&rotated[..d]) {
                    *q = r.to_f32();
                }
            }
        }
    }
}

/// Scores to probabilities: subtract the largest, exponentiate, normalise.
#[inline(always)]
fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// Largest head size [`NewTokens::Projected`] handles (Llama, Qwen: 64 or 128).
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// RoPE of one head as libtorch computes `x * cos + roll(x, d / 2) * sin` in the dtype: each
/// product and the sum rounded to it.
#[inline(always)]
fn rope<T: Element>(x: &[T], cos: &[T], sin: &[T], out: &mut [T]) {
    let half = x.len() / 2;
    for (i, o) in out.iter_mut().enumerate() {
        let rolled = x[(i + half) % x.len()];
        let a = T::from_f32(x[i].to_f32() * cos[i].to_f32()).to_f32();
        let b = T::from_f32(rolled.to_f32() * sin[i].to_f32()).to_f32();
        *o = T::from_f32(a + b);
    }
}

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
    reduce_lanes(acc) + tail
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
            let Some(ours) = decode(NewTokens::Queries(&q), heads, &cache, &rows_slots, &rows_positions) else { panic!("decode refused valid input") };

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
                let Some(alone) = decode(NewTokens::Queries(&q.narrow(0, row as i64, 1)), heads, &cache, &rows_slots[row..=row], &rows_positions[row..=row]) else { panic!("refused") };
                assert!(alone.equal(&ours.narrow(0, row as i64, 1)), "row {row} depends on its batch");
            }
            assert!(decode(NewTokens::Queries(&q), heads, &cache, &[4, 0, 6], &rows_positions).is_none(), "a slot outside the cache must be refused");
            assert!(decode(NewTokens::Queries(&q), heads, &cache, &rows_slots, &[17, 50, 0]).is_none(), "a position outside the cache must be refused");
        }
    }

    /// RoPE, the cache write and attention in one pass equal libtorch's RoPE, `index_put_`
    /// and the `Queries` path: the written keys and values exactly.
    #[test]
    fn projected_tokens_write_the_same_cache_and_attend_the_same() {
        tch::manual_seed(6);
        for kind in [Kind::Float, Kind::BFloat16] {
            let (slots, kv_heads, capacity, heads, d) = (5i64, 2i64, 40i64, 4i64, 64i64);
            let opts = (Kind::Float, Device::Cpu);
            let keys = Tensor::randn([slots, kv_heads, capacity, d], opts).to_kind(kind);
            let values = Tensor::randn([slots, kv_heads, capacity, d], opts).to_kind(kind);
            let (rows_slots, rows_positions) = ([3i64, 1], [12i64, 39]);
            let qkv = Tensor::randn([2, 1, (heads + 2 * kv_heads) * d], opts).to_kind(kind);
            let angles = Tensor::randn([2, 1, 1, d / 2], opts);
            let cos = Tensor::cat(&[angles.cos(), angles.cos()], -1).to_kind(kind);
            let sin = Tensor::cat(&[-angles.sin(), angles.sin()], -1).to_kind(kind);

            // libtorch: RoPE on q and k, k and v into the cache, then the Queries path.
            let (mut expected_keys, mut expected_values) = (keys.copy(), values.copy());
            let qk = qkv.narrow(-1, 0, (heads + kv_heads) * d).view([2, 1, heads + kv_heads, d]).transpose(1, 2);
            let qk = super::super::rope::apply(&qk, &cos, &sin);
            let (q, k) = (qk.narrow(1, 0, heads), qk.narrow(1, heads, kv_heads));
            let v = qkv.narrow(-1, (heads + kv_heads) * d, kv_heads * d).view([2, 1, kv_heads, d]).transpose(1, 2);
            let indices = [Some(Tensor::from_slice(&rows_slots).view([2, 1])), None, Some(Tensor::from_slice(&rows_positions).view([2, 1]))];
            let _ = expected_keys.index_put_(&indices, &k.transpose(1, 2), false);
            let _ = expected_values.index_put_(&indices, &v.transpose(1, 2), false);
            let expected_cache = CacheLayer { keys: &expected_keys, values: &expected_values };
            let Some(expected) = decode(NewTokens::Queries(&q), heads, &expected_cache, &rows_slots, &rows_positions) else { panic!("refused") };

            let cache = CacheLayer { keys: &keys, values: &values };
            let Some(fused) = decode(NewTokens::Projected { qkv: &qkv, cos: &cos, sin: &sin }, heads, &cache, &rows_slots, &rows_positions) else { panic!("refused") };
            assert!(keys.equal(&expected_keys), "{kind:?}: the written keys differ");
            assert!(values.equal(&expected_values), "{kind:?}: the written values differ");
            assert!(fused.equal(&expected), "{kind:?}: attention differs");
            assert!(decode(NewTokens::Projected { qkv: &qkv, cos: &cos, sin: &sin }, heads, &cache, &[3, 3], &rows_positions).is_none(), "two rows in one slot must be refused");
        }
    }
}
