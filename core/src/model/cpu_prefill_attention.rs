//! Attention of a prefill's new tokens over the KV cache, on the CPU: f32, AVX-512.
//!
//! A prefill of `t` tokens attends every new query to the keys at or before its position.
//! libtorch's CPU flash attention does that with MKL's GEMM (a generic path on AMD CPUs) on
//! OpenMP threads, while the pass's products run on [`super::cpu_pool`]: at 1024-token prompts
//! it took about a third of the prefill, a good part of it OpenMP workers spinning. Here the
//! work runs on the pool, reading the cache in place (so a continuation of an earlier prefix,
//! a multi-turn episode, is the same call as a fresh prompt):
//!
//! 1. each (sequence, key-value head) gets its keys transposed once into panels of 16 keys,
//!    `(key / 16, dim, key % 16)`, so that a score computation broadcasts one query value and
//!    multiplies it with 16 keys at once, with no horizontal sums;
//! 2. each task is 8 consecutive queries of one head: their scores against every key up to the
//!    last query's position, an exact softmax per query over its own keys `0..=p`, then the
//!    values weighted 32 dimensions at a time. Tasks are handed out longest first.
//!
//! Invariant: a query's output is computed by the same arithmetic in the same order whatever
//! else is in the batch: it reads its own slot, positions `0..=p` for its position `p`, its own
//! query, and nothing else.

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_loadu_ps, _mm512_mask_loadu_ps, _mm512_max_ps, _mm512_maskz_mov_ps, _mm512_mul_ps,
    _mm512_reduce_add_ps, _mm512_reduce_max_ps, _mm512_roundscale_ps, _mm512_scalef_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps, _mm512_sub_ps,
    _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tch::{Device, Kind, Tensor};

use super::cpu_attention::CacheLayer;
use super::cpu_pool;

/// Keys per panel: one AVX-512 register of f32 scores.
const PANEL_KEYS: usize = 16;
/// Queries per task: eight score registers, sixteen value accumulators.
const TASK_QUERIES: usize = 8;
/// Head dimensions accumulated per pass over the values (two registers).
const VALUE_CHUNK: usize = 32;

/// Whether [`attend`] applies: f32 queries on the CPU without autograd, a contiguous f32
/// cache, and a CPU with AVX-512 (elsewhere libtorch's kernel runs).
fn applies(queries: &Tensor, cache_keys: &Tensor) -> bool {
    queries.device() == Device::Cpu
        && queries.kind() == Kind::Float
        && cache_keys.kind() == Kind::Float
        && cache_keys.is_contiguous()
        && !queries.requires_grad()
        && std::arch::is_x86_feature_detected!("avx512f")
}

/// Attention of `queries` `(b, heads, t, head_dim)` (after RoPE; any strides with the last
/// dimension contiguous) over the cache, whose slots already hold the new keys and values:
/// query `(i, j)` reads slot `slots[i]` at positions `0..=positions[i * t + j]`. Returns
/// `(b, t, heads * head_dim)`, or `None` when the shapes disagree, a slot or position lies
/// outside the cache, or the head size is not a multiple of 32 (the generic path then runs).
pub(crate) fn attend(queries: &Tensor, cache: &CacheLayer<'_>, slots: &[i64], positions: &[i64]) -> Option<Tensor> {
    let [num_slots, kv_heads, capacity, head_dim] = cache.keys.size()[..] else { return None };
    let [b_sz, heads, t, q_dim] = queries.size()[..] else { return None };
    let strides = queries.stride();
    let shapes_agree = applies(queries, cache.keys)
        && q_dim == head_dim
        && strides[3] == 1
        && (head_dim as usize).is_multiple_of(VALUE_CHUNK)
        && cache.values.size() == cache.keys.size()
        && cache.values.kind() == Kind::Float
        && cache.values.is_contiguous()
        && kv_heads > 0
        && heads % kv_heads == 0
        && slots.len() == b_sz as usize
        && positions.len() == (b_sz * t) as usize;
    let in_cache = slots.iter().all(|s| (0..num_slots).contains(s)) && positions.iter().all(|p| (0..capacity).contains(p));
    if !shapes_agree || !in_cache || t == 0 {
        return None;
    }
    let out = Tensor::empty([b_sz, t, heads * head_dim], (Kind::Float, Device::Cpu));
    let shape = Shape { t: t as usize, heads: heads as usize, kv_heads: kv_heads as usize, capacity: capacity as usize, head_dim: head_dim as usize };
    let keys_per_row: Vec<usize> = positions.chunks_exact(shape.t).map(|row| row.iter().max().map_or(0, |&p| p as usize + 1)).collect();
    PANELS.with_borrow_mut(|panels| {
        let mut panel_offsets = Vec::with_capacity(slots.len());
        let mut total = 0;
        for &keys in &keys_per_row {
            panel_offsets.push(total);
            total += shape.kv_heads * keys.div_ceil(PANEL_KEYS) * PANEL_KEYS * shape.head_dim;
        }
        if panels.len() < total {
            panels.resize(total, 0.0);
        }
        let job = Job {
            queries: queries.data_ptr() as *const f32,
            query_strides: [strides[0] as usize, strides[1] as usize, strides[2] as usize],
            keys: cache.keys.data_ptr() as *const f32,
            values: cache.values.data_ptr() as *const f32,
            panels: panels.as_mut_ptr(),
            out: out.data_ptr() as *mut f32,
            slots,
            positions,
            keys_per_row: &keys_per_row,
            panel_offsets: &panel_offsets,
            shape,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
            next_task: AtomicUsize::new(0),
        };
        cpu_pool::run(&|part, parts| job.transpose_part(part, parts));
        cpu_pool::run(&|_, _| job.attend_tasks());
    });
    Some(out)
}

thread_local! {
    /// The calling thread's key panels, reused across layers and passes.
    static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread scores and scaled queries, reused across tasks.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Clone, Copy)]
struct Shape {
    t: usize,
    heads: usize,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
}

/// One layer's prefill attention.
struct Job<'a> {
    queries: *const f32,
    /// Element strides of the queries' batch, head and token dimensions.
    query_strides: [usize; 3],
    /// The cache layer `(slots, kv_heads, capacity, head_dim)`, read only.
    keys: *const f32,
    values: *const f32,
    /// Row `i`'s panels start at `panel_offsets[i]`: per key-value head,
    /// `(keys_per_row[i] / 16 rounded up, head_dim, 16)`.
    panels: *mut f32,
    /// `(b, t, heads * head_dim)`.
    out: *mut f32,
    slots: &'a [i64],
    positions: &'a [i64],
    /// One past each row's largest position: the keys its panels hold.
    keys_per_row: &'a [usize],
    panel_offsets: &'a [usize],
    shape: Shape,
    scale: f32,
    /// The next attention task to hand out.
    next_task: AtomicUsize,
}

// SAFETY: transposition tasks write disjoint panels (one per row and key-value head); attention
// tasks read the panels only after the transposition job has returned, and write disjoint
// output rows (one head of eight tokens each). The cache is only read.
unsafe impl Sync for Job<'_> {}

impl Job<'_> {
    /// Start of `row`'s keys or values of `kv_head` in the cache layer.
    fn cache_base(&self, row: usize, kv_head: usize) -> usize {
        (self.slots[row] as usize * self.shape.kv_heads + kv_head) * self.shape.capacity * self.shape.head_dim
    }

    /// Start of `row`'s panels of `kv_head`.
    fn panel_base(&self, row: usize, kv_head: usize) -> usize {
        let padded = self.keys_per_row[row].div_ceil(PANEL_KEYS) * PANEL_KEYS;
        self.panel_offsets[row] + kv_head * padded * self.shape.head_dim
    }

    /// Transposes the keys of (row, key-value head) pairs `part, part + parts, ...` into
    /// panels; keys past the row's last one are zero.
    fn transpose_part(&self, part: usize, parts: usize) {
        let d = self.shape.head_dim;
        let pairs = self.slots.len() * self.shape.kv_heads;
        for pair in (part..pairs).step_by(parts.max(1)) {
            let (row, kv_head) = (pair / self.shape.kv_heads, pair % self.shape.kv_heads);
            let keys_len = self.keys_per_row[row];
            let padded = keys_len.div_ceil(PANEL_KEYS) * PANEL_KEYS;
            // SAFETY: `attend` checked the slot and positions against the cache, so the row's
            // keys `0..keys_len` lie in the cache layer; the panels were sized for every row.
            unsafe {
                let keys = std::slice::from_raw_parts(self.keys.add(self.cache_base(row, kv_head)), keys_len * d);
                let panels = std::slice::from_raw_parts_mut(self.panels.add(self.panel_base(row, kv_head)), padded * d);
                for (block, panel) in panels.chunks_exact_mut(PANEL_KEYS * d).enumerate() {
                    for lane in 0..PANEL_KEYS {
                        let key = block * PANEL_KEYS + lane;
                        for dim in 0..d {
                            panel[dim * PANEL_KEYS + lane] = if key < keys_len { keys[key * d + dim] } else { 0.0 };
                        }
                    }
                }
            }
        }
    }

    /// Runs attention tasks until none is left. Task order: the queries furthest into the
    /// prompt first (they cost the most), so that the threads finish together.
    fn attend_tasks(&self) {
        let heads = self.shape.heads;
        let blocks = self.shape.t.div_ceil(TASK_QUERIES);
        let per_block = self.slots.len() * heads;
        let tasks = blocks * per_block;
        SCRATCH.with_borrow_mut(|scratch| loop {
            let task = self.next_task.fetch_add(1, Ordering::Relaxed);
            if task >= tasks {
                return;
            }
            let block = blocks - 1 - task / per_block;
            let (row, head) = ((task % per_block) / heads, task % heads);
            // SAFETY: `applies` (checked by `attend`) found AVX-512 on this CPU.
            unsafe { self.task(row, head, block * TASK_QUERIES, scratch) };
        })
    }

    /// Attention of one head's queries `first..first + 8` (the last repeated past `t`) in `row`.
    #[target_feature(enable = "avx512f")]
    unsafe fn task(&self, row: usize, head: usize, first: usize, scratch: &mut Vec<f32>) {
        let Shape { t, heads, kv_heads, head_dim: d, .. } = self.shape;
        let kv_head = head / (heads / kv_heads);
        let tokens: [usize; TASK_QUERIES] = std::array::from_fn(|r| (first + r).min(t - 1));
        let limits: [usize; TASK_QUERIES] = std::array::from_fn(|r| self.positions[row * t + tokens[r]] as usize + 1);
        let keys_len = limits.iter().copied().max().unwrap_or(1);
        let padded = keys_len.div_ceil(PANEL_KEYS) * PANEL_KEYS;
        scratch.clear();
        scratch.resize(TASK_QUERIES * (padded + d), 0.0);
        let (scores, queries) = scratch.split_at_mut(TASK_QUERIES * padded);
        let [row_stride, head_stride, token_stride] = self.query_strides;
        // SAFETY: `attend` checked shapes, slots and positions: the query rows, the row's
        // `keys_len <= keys_per_row[row]` keys and values, its panels and its output rows lie
        // inside their buffers; no other task writes this (row, head, tokens) output.
        unsafe {
            for (r, &token) in tokens.iter().enumerate() {
                let query = std::slice::from_raw_parts(self.queries.add(row * row_stride + head * head_stride + token * token_stride), d);
                for (scaled, &q) in queries[r * d..(r + 1) * d].iter_mut().zip(query) {
                    *scaled = q * self.scale;
                }
            }
            let panels = self.panels.add(self.panel_base(row, kv_head));
            scores_of(queries, panels, padded / PANEL_KEYS, d, scores, padded);
            let mut inverse_sums = [0.0f32; TASK_QUERIES];
            for (r, row_scores) in scores.chunks_exact_mut(padded).enumerate() {
                inverse_sums[r] = 1.0 / softmax_numerators(row_scores, limits[r]);
            }
            let values = self.values.add(self.cache_base(row, kv_head));
            let valid = (t - first).min(TASK_QUERIES);
            let out_row = |r: usize| self.out.add((row * t + tokens[r]) * heads * d + head * d);
            weighted_values(scores, padded, values, keys_len, d, &inverse_sums, valid, out_row);
        }
    }
}

/// `scores[r * stride + k] = queries[r] · key k` for 8 queries and `blocks` panels of 16 keys.
#[target_feature(enable = "avx512f")]
unsafe fn scores_of(queries: &[f32], panels: *const f32, blocks: usize, d: usize, scores: &mut [f32], stride: usize) {
    for block in 0..blocks {
        let mut acc: [__m512; TASK_QUERIES] = [_mm512_setzero_ps(); TASK_QUERIES];
        // SAFETY: the caller's panels hold `blocks` panels of `16 * d` values.
        let panel = unsafe { panels.add(block * PANEL_KEYS * d) };
        for dim in 0..d {
            // SAFETY: as above.
            let keys = unsafe { _mm512_loadu_ps(panel.add(dim * PANEL_KEYS)) };
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(queries[r * d + dim]), keys, *acc);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let at = &mut scores[r * stride + block * PANEL_KEYS..][..PANEL_KEYS];
            // SAFETY: `at` holds 16 values.
            unsafe { _mm512_storeu_ps(at.as_mut_ptr(), *acc) };
        }
    }
}

/// Replaces `scores[..limit]` by `exp(score - max)` and the rest by zero; returns their sum.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_numerators(scores: &mut [f32], limit: usize) -> f32 {
    let lane_mask = |block: usize| -> u16 {
        let left = limit.saturating_sub(block * PANEL_KEYS);
        if left >= PANEL_KEYS { u16::MAX } else { ((1u32 << left) - 1) as u16 }
    };
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for block in 0..limit.div_ceil(PANEL_KEYS) {
        // SAFETY: `scores` is padded to whole blocks; lanes past `limit` are not read.
        let s = unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), lane_mask(block), scores.as_ptr().add(block * PANEL_KEYS)) };
        max = _mm512_max_ps(max, s);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let mut sum = _mm512_setzero_ps();
    for (block, chunk) in scores.chunks_exact_mut(PANEL_KEYS).enumerate() {
        let mask = lane_mask(block);
        // SAFETY: `chunk` holds 16 values.
        unsafe {
            let e = _mm512_maskz_mov_ps(mask, exp_non_positive(_mm512_sub_ps(_mm512_loadu_ps(chunk.as_ptr()), max)));
            _mm512_storeu_ps(chunk.as_mut_ptr(), e);
            sum = _mm512_add_ps(sum, e);
        }
    }
    _mm512_reduce_add_ps(sum)
}

/// `out_row(r)[..d] = inverse_sums[r] * Σ_k weights[r * stride + k] * value k` for the first
/// `valid` of 8 queries, over keys `0..keys_len`, 32 dimensions at a time.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_values(
    weights: &[f32],
    stride: usize,
    values: *const f32,
    keys_len: usize,
    d: usize,
    inverse_sums: &[f32; TASK_QUERIES],
    valid: usize,
    out_row: impl Fn(usize) -> *mut f32,
) {
    for chunk in (0..d).step_by(VALUE_CHUNK) {
        let mut acc: [[__m512; 2]; TASK_QUERIES] = [[_mm512_setzero_ps(); 2]; TASK_QUERIES];
        for key in 0..keys_len {
            // SAFETY: the caller's values hold `keys_len` rows of `d`.
            let (low, high) = unsafe {
                let at = values.add(key * d + chunk);
                (_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)))
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let weight = _mm512_set1_ps(weights[r * stride + key]);
                acc[0] = _mm512_fmadd_ps(weight, low, acc[0]);
                acc[1] = _mm512_fmadd_ps(weight, high, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate().take(valid) {
            let scale = _mm512_set1_ps(inverse_sums[r]);
            // SAFETY: the caller's output rows hold `d` values.
            unsafe {
                let out = out_row(r).add(chunk);
                _mm512_storeu_ps(out, _mm512_mul_ps(acc[0], scale));
                _mm512_storeu_ps(out.add(16), _mm512_mul_ps(acc[1], scale));
            }
        }
    }
}

/// `exp(x)` for `x <= 0` (Cephes' `expf`: `x = n ln 2 + r`, a degree-6 polynomial in `r`,
/// scaled by `2^n`); within two units in the last place, 0 below -87.3.
#[target_feature(enable = "avx512f")]
fn exp_non_positive(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.336_55));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // 1 + r + r² p
    let p = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys and values for `slots` slots of `capacity` positions, and queries `(b, heads, t, d)`
    /// cut out of a wider tensor, as the model's RoPE output is.
    fn inputs(slots: i64, kv_heads: i64, capacity: i64, heads: i64, b: i64, t: i64, d: i64) -> (Tensor, Tensor, Tensor) {
        let opts = (Kind::Float, Device::Cpu);
        let keys = Tensor::randn([slots, kv_heads, capacity, d], opts);
        let values = Tensor::randn([slots, kv_heads, capacity, d], opts);
        // Scores of several units, so that the softmax is far from uniform.
        let queries = (Tensor::randn([b, heads + kv_heads, t, d], opts) * 3.0).narrow(1, 0, heads);
        (keys, values, queries)
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap_or(f64::INFINITY)
    }

    /// A fresh prefill (every row from position 0, causal) equals libtorch's causal SDPA over
    /// the rows' keys, with grouped-query heads, a token count that is not a multiple of 8
    /// and key counts that are not multiples of 16; each row alone computes the same bits.
    #[test]
    fn a_fresh_prefill_matches_causal_sdpa_and_is_batch_invariant() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        tch::manual_seed(7);
        for (heads, kv_heads, d, t) in [(6i64, 2i64, 64i64, 37i64), (4, 4, 128, 70), (9, 3, 64, 300)] {
            let (slots, capacity, b) = (5i64, 320i64, 3i64);
            let (keys, values, queries) = inputs(slots, kv_heads, capacity, heads, b, t, d);
            let rows_slots = [3i64, 0, 4];
            let positions: Vec<i64> = (0..b).flat_map(|_| 0..t).collect();
            let cache = CacheLayer { keys: &keys, values: &values };
            let Some(ours) = attend(&queries, &cache, &rows_slots, &positions) else { panic!("refused valid input") };

            let idx = Tensor::from_slice(&rows_slots);
            let k = keys.index_select(0, &idx).narrow(2, 0, t);
            let v = values.index_select(0, &idx).narrow(2, 0, t);
            let reference = Tensor::scaled_dot_product_attention::<Tensor>(&queries, &k, &v, None, 0.0, true, None, true).transpose(1, 2).reshape([b, t, heads * d]);
            let diff = max_difference(&ours, &reference);
            assert!(diff < 2e-5, "heads {heads}/{kv_heads}, d {d}, t {t}: differs from SDPA by {diff}");

            for row in 0..b as usize {
                let alone = attend(&queries.narrow(0, row as i64, 1), &cache, &rows_slots[row..=row], &positions[..t as usize]);
                let Some(alone) = alone else { panic!("refused") };
                assert!(alone.equal(&ours.narrow(0, row as i64, 1)), "row {row} depends on its batch");
            }
        }
    }

    /// A continuation (new tokens after an earlier prefix in the slot, rows at different
    /// offsets) equals SDPA over the cache window with the position mask.
    #[test]
    fn a_continuation_matches_masked_sdpa_over_the_cache() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        tch::manual_seed(8);
        let (slots, kv_heads, capacity, heads, d, b, t) = (4i64, 3i64, 200i64, 9i64, 64i64, 2i64, 21i64);
        let (keys, values, queries) = inputs(slots, kv_heads, capacity, heads, b, t, d);
        let rows_slots = [2i64, 1];
        let starts = [150i64, 5];
        let positions: Vec<i64> = starts.iter().flat_map(|&s| s..s + t).collect();
        let cache = CacheLayer { keys: &keys, values: &values };
        let Some(ours) = attend(&queries, &cache, &rows_slots, &positions) else { panic!("refused valid input") };

        let window = starts[0] + t;
        let idx = Tensor::from_slice(&rows_slots);
        let k = keys.index_select(0, &idx).narrow(2, 0, window);
        let v = values.index_select(0, &idx).narrow(2, 0, window);
        let key_pos = Tensor::arange(window, (Kind::Int64, Device::Cpu)).view([1, 1, 1, window]);
        let mask = key_pos.le_tensor(&Tensor::from_slice(&positions).view([b, 1, t, 1]));
        let reference = Tensor::scaled_dot_product_attention(&queries, &k, &v, Some(&mask), 0.0, false, None, true).transpose(1, 2).reshape([b, t, heads * d]);
        let diff = max_difference(&ours, &reference);
        assert!(diff < 2e-5, "differs from masked SDPA by {diff}");
    }

    #[test]
    fn refuses_slots_and_positions_outside_the_cache_and_odd_head_sizes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let (keys, values, queries) = inputs(2, 1, 16, 2, 1, 4, 64);
        let cache = CacheLayer { keys: &keys, values: &values };
        assert!(attend(&queries, &cache, &[0], &[0, 1, 2, 3]).is_some());
        assert!(attend(&queries, &cache, &[2], &[0, 1, 2, 3]).is_none(), "a slot outside the cache");
        assert!(attend(&queries, &cache, &[1], &[13, 14, 15, 16]).is_none(), "a position outside the cache");
        assert!(attend(&queries, &cache, &[1], &[0, 1, 2]).is_none(), "positions for fewer tokens than the queries");
        let (keys, values, queries) = inputs(2, 1, 16, 2, 1, 4, 40);
        assert!(attend(&queries, &CacheLayer { keys: &keys, values: &values }, &[0], &[0, 1, 2, 3]).is_none(), "a head size that is not a multiple of 32");
    }
}
