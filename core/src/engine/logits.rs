//! What changes a sequence's logits before temperature, and depends on what came before:
//! OpenAI's `logit_bias`, the repetition, frequency and presence penalties, and a
//! constraint's mask of allowed tokens.
//!
//! Order (vLLM's): logit bias, then the repetition penalty (logits of tokens seen in the
//! prompt or the output divided by `r` when positive, multiplied when negative), then
//! frequency and presence penalties (over the output only, as OpenAI defines them), then the
//! constraint (disallowed tokens get `-inf`). Temperature, min-p, top-k and top-p follow in
//! the sampler.
//!
//! The host keeps each sequence's [`LogitState`] (what it has seen, its grammar position)
//! and writes one step's changes for all rows into an [`EditsBuilder`]: a few sparse
//! `(row, token, value)` lists and one bitmask per constrained row. [`LogitEdits`] applies
//! them on the logits' device. The trainer replays the same states over a rollout's tokens,
//! so the policy it trains is the distribution the tokens were drawn from.

use std::collections::{HashMap, HashSet};

use tch::{Device, Kind, Tensor};

use super::constraint::{ConstraintError, ConstraintMatcher, Constraints};
use super::sampler::SamplingParams;

/// One sequence's history as the processors see it.
#[derive(Debug)]
pub struct LogitState {
    /// Every token of the prompt and the output (the repetition penalty's set).
    seen: HashSet<u32>,
    /// How often each token occurs in the output (frequency and presence penalties).
    output_counts: HashMap<u32, u32>,
    matcher: Option<ConstraintMatcher>,
}

impl LogitState {
    /// The state at the start of an output that follows `context`; `None` when `params` change
    /// no logits. A constraint needs `constraints` (the tokenizer's compiler).
    pub fn new(params: &SamplingParams, context: &[u32], constraints: Option<&Constraints>) -> Result<Option<Self>, ConstraintError> {
        if !params.edits_logits() {
            return Ok(None);
        }
        let matcher = match &params.constraint {
            Some(constraint) => {
                let constraints = constraints.ok_or_else(|| ConstraintError::Vocabulary("no tokenizer to compile the constraint with".into()))?;
                Some(constraints.matcher(constraint)?)
            }
            None => None,
        };
        let seen = if params.penalises_repetition() { context.iter().copied().collect() } else { HashSet::new() };
        Ok(Some(Self { seen, output_counts: HashMap::new(), matcher }))
    }

    /// Follows a token of the output.
    pub fn push(&mut self, params: &SamplingParams, token: u32) -> Result<(), ConstraintError> {
        if params.penalises_repetition() {
            self.seen.insert(token);
        }
        if params.penalises_output() {
            *self.output_counts.entry(token).or_default() += 1;
        }
        match &mut self.matcher {
            Some(matcher) => matcher.advance(token),
            None => Ok(()),
        }
    }

    /// Writes this row's changes for the next token. A failed grammar allows only
    /// end-of-sequence ([`ConstraintMatcher::allowed_or_end`]).
    pub fn write_row(&mut self, row: usize, params: &SamplingParams, edits: &mut EditsBuilder) {
        let mask = self.next_mask();
        self.write_row_with_mask(row, params, mask, edits);
    }

    /// The grammar's mask for the next token, if constrained: the expensive part of a row's
    /// changes, which rows compute independently (see [`write_rows`]).
    fn next_mask(&mut self) -> Option<Vec<u32>> {
        self.matcher.as_mut().map(ConstraintMatcher::allowed_or_end)
    }

    fn write_row_with_mask(&self, row: usize, params: &SamplingParams, mask: Option<Vec<u32>>, edits: &mut EditsBuilder) {
        let row = row as i64;
        for &(token, bias) in &params.logit_bias {
            edits.bias.push(row, token, bias);
        }
        if params.penalises_repetition() {
            for &token in &self.seen {
                edits.repeat.push(row, token, params.repetition_penalty as f32);
            }
        }
        if params.penalises_output() {
            for (&token, &count) in &self.output_counts {
                let penalty = params.frequency_penalty * count as f64 + params.presence_penalty;
                edits.penalty.push(row, token, -penalty as f32);
            }
        }
        if let Some(mask) = mask {
            edits.masks.push((row, mask));
        }
    }
}

/// Constrained rows from which masks are computed on several threads: below it, threads
/// cost more than they save (a mask takes ~0.1 ms; starting a thread ~0.02 ms).
const PARALLEL_MASK_ROWS: usize = 4;

/// [`LogitState::write_row`] for many rows `(row, state, params)`, the grammars' masks
/// computed in parallel across the machine's cores (each row's matcher is its own).
pub fn write_rows(rows: &mut [(usize, &mut LogitState, &SamplingParams)], edits: &mut EditsBuilder) {
    let constrained = rows.iter().filter(|(_, state, _)| state.matcher.is_some()).count();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(constrained / PARALLEL_MASK_ROWS).max(1);
    let masks: Vec<Option<Vec<u32>>> = if threads > 1 {
        let per_thread = rows.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = rows.chunks_mut(per_thread).map(|chunk| scope.spawn(move || chunk.iter_mut().map(|(_, state, _)| state.next_mask()).collect::<Vec<_>>())).collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        })
    } else {
        rows.iter_mut().map(|(_, state, _)| state.next_mask()).collect()
    };
    for ((row, state, params), mask) in rows.iter().zip(masks) {
        state.write_row_with_mask(*row, params, mask, edits);
    }
}

/// `(row, token, value)` triples.
#[derive(Debug, Default)]
struct Sparse {
    rows: Vec<i64>,
    tokens: Vec<i64>,
    values: Vec<f32>,
}

impl Sparse {
    fn push(&mut self, row: i64, token: u32, value: f32) {
        self.rows.push(row);
        self.tokens.push(token as i64);
        self.values.push(value);
    }

    /// On `device`, dropping tokens outside the vocabulary; `None` when empty.
    fn to_device(&self, vocab: usize, device: Device) -> Option<SparseTensors> {
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&i| (self.tokens[i] as usize) < vocab).collect();
        if keep.is_empty() {
            return None;
        }
        let pick_i = |v: &[i64]| Tensor::from_slice(&keep.iter().map(|&i| v[i]).collect::<Vec<i64>>()).to_device(device);
        Some(SparseTensors {
            rows: pick_i(&self.rows),
            tokens: pick_i(&self.tokens),
            values: Tensor::from_slice(&keep.iter().map(|&i| self.values[i]).collect::<Vec<f32>>()).to_device(device),
        })
    }
}

#[derive(Debug)]
struct SparseTensors {
    rows: Tensor,
    tokens: Tensor,
    values: Tensor,
}

/// One step's changes for every row, collected on the host.
#[derive(Debug)]
pub struct EditsBuilder {
    rows: usize,
    bias: Sparse,
    repeat: Sparse,
    penalty: Sparse,
    /// `(row, allowed-token bitmask)` of constrained rows.
    masks: Vec<(i64, Vec<u32>)>,
}

impl EditsBuilder {
    /// Changes for a batch of `rows` rows; rows nobody writes are left as they are.
    pub fn new(rows: usize) -> Self {
        Self { rows, bias: Sparse::default(), repeat: Sparse::default(), penalty: Sparse::default(), masks: Vec::new() }
    }

    /// Adds a row's mask directly (tests of the sampler, without a grammar).
    #[cfg(test)]
    pub(crate) fn push_mask_for_tests(&mut self, row: usize, mask: Vec<u32>) {
        self.masks.push((row as i64, mask));
    }

    /// The changes as tensors on `device` for `vocab` logits per row; `None` when nothing
    /// changes.
    pub fn build(self, vocab: usize, device: Device) -> Option<LogitEdits> {
        let allowed = (!self.masks.is_empty()).then(|| {
            let words = vocab.div_ceil(32);
            // Unconstrained rows allow everything.
            let mut bits = vec![-1i32; self.rows * words];
            for (row, mask) in &self.masks {
                let start = *row as usize * words;
                for (w, &word) in mask.iter().take(words).enumerate() {
                    bits[start + w] = word as i32;
                }
            }
            let packed = Tensor::from_slice(&bits).view([self.rows as i64, words as i64]).to_device(device);
            unpack_bits(&packed, vocab as i64)
        });
        let edits = LogitEdits {
            bias: self.bias.to_device(vocab, device),
            repeat: self.repeat.to_device(vocab, device),
            penalty: self.penalty.to_device(vocab, device),
            allowed,
        };
        edits.changes_anything().then_some(edits)
    }
}

/// `(rows, words)` int32 bitmasks -> `(rows, vocab)` bool, on the masks' device.
fn unpack_bits(packed: &Tensor, vocab: i64) -> Tensor {
    let (rows, words) = (packed.size()[0], packed.size()[1]);
    let shifts = Tensor::arange(32, (Kind::Int, packed.device()));
    packed.unsqueeze(-1).bitwise_right_shift(&shifts).bitwise_and(1).view([rows, words * 32]).narrow(1, 0, vocab).to_kind(Kind::Bool)
}

/// One step's changes on the device.
#[derive(Debug)]
pub struct LogitEdits {
    bias: Option<SparseTensors>,
    repeat: Option<SparseTensors>,
    penalty: Option<SparseTensors>,
    /// `(rows, vocab)` bool: tokens the constraints allow.
    allowed: Option<Tensor>,
}

impl LogitEdits {
    fn changes_anything(&self) -> bool {
        self.bias.is_some() || self.repeat.is_some() || self.penalty.is_some() || self.allowed.is_some()
    }

    /// Makes `targets` `(rows,)` allowed whatever the masks say: the trainer scores tokens
    /// that were sampled under these masks, so they were allowed (a replay that disagrees
    /// must not turn a loss into `-inf`).
    pub fn allow_targets(&mut self, targets: &Tensor) {
        if let Some(allowed) = &self.allowed {
            self.allowed = Some(allowed.scatter_value(1, &targets.unsqueeze(1), 1));
        }
    }

    /// The changed logits (float, `(rows, vocab)`); differentiable in `logits`.
    pub fn apply(&self, logits: &Tensor) -> Tensor {
        let mut out = logits.shallow_clone();
        if let Some(bias) = &self.bias {
            out = out.index_put(&[Some(&bias.rows), Some(&bias.tokens)], &bias.values.to_kind(out.kind()), true);
        }
        if let Some(repeat) = &self.repeat {
            let index = [Some(&repeat.rows), Some(&repeat.tokens)];
            let values = out.index(&index);
            let penalty = repeat.values.to_kind(values.kind());
            let changed = (&values / &penalty).where_self(&values.gt(0.0), &(&values * &penalty));
            out = out.index_put(&index, &changed, false);
        }
        if let Some(penalty) = &self.penalty {
            out = out.index_put(&[Some(&penalty.rows), Some(&penalty.tokens)], &penalty.values.to_kind(out.kind()), true);
        }
        if let Some(allowed) = &self.allowed {
            out = out.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.view([-1])).unwrap_or_default()
    }

    #[test]
    fn unchanged_params_need_no_state_and_no_edits() {
        assert!(LogitState::new(&params(), &[1, 2], None).expect("state").is_none());
        assert!(EditsBuilder::new(3).build(8, Device::Cpu).is_none());
    }

    #[test]
    fn bias_then_repetition_then_frequency_and_presence_as_vllm_orders_them() {
        let p = SamplingParams { logit_bias: vec![(0, 1.0), (7, -100.0)], repetition_penalty: 2.0, frequency_penalty: 0.5, presence_penalty: 0.25, ..params() };
        // Prompt [1, 2]; output so far [2, 2, 3].
        let mut state = LogitState::new(&p, &[1, 2], None).expect("state").expect("edits");
        for token in [2, 2, 3] {
            state.push(&p, token).expect("push");
        }
        let mut builder = EditsBuilder::new(2);
        state.write_row(1, &p, &mut builder);
        let edits = builder.build(8, Device::Cpu).expect("edits");
        let logits = Tensor::from_slice(&[0.5f32, 1.0, 4.0, -2.0, 3.0, 0.0, 0.0, 0.0, 0.5, 1.0, 4.0, -2.0, 3.0, 0.0, 0.0, 0.0]).view([2, 8]);
        let out = values(&edits.apply(&logits));
        // Row 0 untouched.
        assert_eq!(&out[..8], &[0.5, 1.0, 4.0, -2.0, 3.0, 0.0, 0.0, 0.0]);
        // Token 0: bias +1 only (never seen). Token 1: prompt only: 1.0 / 2.
        // Token 2: 4 / 2 = 2, then twice in the output: - 0.5 * 2 - 0.25 = 0.75.
        // Token 3: negative, seen: -2 * 2 = -4, once in the output: - 0.75 = -4.75.
        // Token 7: biased by -100.
        let want = [1.5, 0.5, 0.75, -4.75, 3.0, 0.0, 0.0, -100.0];
        for (got, want) in out[8..].iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?} vs {want:?}", &out[8..]);
        }
    }

    #[test]
    fn masks_unpack_bit_for_bit_and_unconstrained_rows_allow_everything() {
        let vocab = 70;
        let mut mask = vec![0u32; 3];
        for id in [0u32, 31, 32, 63, 69] {
            mask[id as usize / 32] |= 1 << (id % 32);
        }
        let mut builder = EditsBuilder::new(2);
        builder.masks.push((1, mask));
        let edits = builder.build(vocab, Device::Cpu).expect("edits");
        let out = values(&edits.apply(&Tensor::zeros([2, vocab as i64], (Kind::Float, Device::Cpu))));
        assert!(out[..vocab].iter().all(|v| *v == 0.0), "row 0 keeps everything");
        let allowed: Vec<usize> = (0..vocab).filter(|&i| out[vocab + i].is_finite()).collect();
        assert_eq!(allowed, vec![0, 31, 32, 63, 69]);
    }

    #[test]
    fn masks_computed_in_parallel_equal_the_serial_ones_row_for_row() {
        let Some(tok) = crate::tokenizer::default_model_tokenizer() else { return };
        let vocab = 49_152;
        let constraints = super::super::constraint::Constraints::new(tok.clone(), vocab);
        let digits = SamplingParams { constraint: Some(super::super::constraint::Constraint::Regex { pattern: "[0-9]{1,3}(,[0-9]{1,3})*".into() }), frequency_penalty: 0.5, ..params() };
        let words = SamplingParams { constraint: Some(super::super::constraint::Constraint::Regex { pattern: "[a-z ]+".into() }), ..params() };
        // Twelve rows at different points of two grammars (and one unconstrained neighbour).
        let make = || -> Vec<(SamplingParams, LogitState)> {
            (0..12)
                .map(|i| {
                    let p = if i % 2 == 0 { digits.clone() } else { words.clone() };
                    let mut state = LogitState::new(&p, &[1, 2, 3], Some(&constraints)).expect("compiles").expect("edits");
                    let text = if i % 2 == 0 { "12,3".chars().take(i / 2).collect::<String>() } else { "ab c".chars().take(i / 2).collect() };
                    for id in tok.encode(&text, false).expect("encode") {
                        state.push(&p, id).expect("allowed");
                    }
                    (p, state)
                })
                .collect()
        };
        let mut serial = make();
        let mut serial_edits = EditsBuilder::new(13);
        for (row, (p, state)) in serial.iter_mut().enumerate() {
            state.write_row(row, p, &mut serial_edits);
        }
        let mut parallel = make();
        let mut parallel_edits = EditsBuilder::new(13);
        let mut rows: Vec<(usize, &mut LogitState, &SamplingParams)> = parallel.iter_mut().enumerate().map(|(row, (p, state))| (row, state, &*p)).collect();
        write_rows(&mut rows, &mut parallel_edits);
        let zeros = Tensor::zeros([13, vocab as i64], (Kind::Float, Device::Cpu));
        let a = serial_edits.build(vocab, Device::Cpu).expect("edits").apply(&zeros);
        let b = parallel_edits.build(vocab, Device::Cpu).expect("edits").apply(&zeros);
        assert!(a.isfinite().eq_tensor(&b.isfinite()).all().int64_value(&[]) == 1, "masks differ");
        assert!(a.nan_to_num(0.0, 0.0, 0.0).eq_tensor(&b.nan_to_num(0.0, 0.0, 0.0)).all().int64_value(&[]) == 1, "penalties differ");
        assert!(a.get(12).isfinite().all().int64_value(&[]) == 1, "the unconstrained row keeps everything");
    }

    #[test]
    fn tokens_outside_the_vocabulary_are_ignored_not_an_index_error() {
        let p = SamplingParams { logit_bias: vec![(3, 2.0), (1_000_000, 5.0)], ..params() };
        let mut state = LogitState::new(&p, &[], None).expect("state").expect("edits");
        let mut builder = EditsBuilder::new(1);
        state.write_row(0, &p, &mut builder);
        let out = values(&builder.build(4, Device::Cpu).expect("edits").apply(&Tensor::zeros([1, 4], (Kind::Float, Device::Cpu))));
        assert_eq!(out, vec![0.0, 0.0, 0.0, 2.0]);
    }
}
