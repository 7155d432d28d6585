//! Token sampling on the device: temperature, top-k, top-p and a counter-based RNG.
//!
//! Everything here is tensor arithmetic on the logits' device; nothing is copied to the host,
//! so a decode step stays free of synchronisation. Each sampled row draws by inverting its
//! cumulative distribution: one uniform variate per row, from a hash of `(seed, step)`
//! (SplitMix64's finaliser in int64 arithmetic), is located in the row's float64 cumulative
//! sum of probabilities. The same seed gives the same tokens whatever else shares the batch,
//! on CPU and CUDA alike, and a step costs one hash per row instead of one per vocabulary entry
//! (the Gumbel-max draw this replaces hashed every token id, in int64 arithmetic that CPUs
//! cannot vectorise).
//!
//! Invariants (each has a test at a real vocabulary size):
//! - a sampled token is always inside its row's top-k / top-p set: tokens outside it have
//!   probability exactly 0, so their cumulative sum is flat and the search can never stop on
//!   them (the uniform is strictly inside (0, 1), and a rounding overshoot falls back to the
//!   row's best token);
//! - greedy rows take the argmax and never see the draw, whatever shares their batch;
//! - two logprobs are reported per token:
//!   - [`Sampled::logprobs`]: `log_softmax(logits / T)` before truncation (T = 1 for greedy),
//!     what the OpenAI API returns and what teacher-forced scoring computes;
//!   - [`Sampled::sampling_logprobs`]: the logprob under the distribution the token was
//!     actually drawn from (temperature, then top-k, then top-p, renormalised); 0 for greedy
//!     rows, whose "distribution" is a point mass. This is the behaviour policy the trainer's
//!     importance ratio divides by.

use tch::{Device, Kind, Tensor};

use super::constraint::Constraint;
use super::logits::LogitEdits;

/// How one sequence picks its next token.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// RNG seed of the sequence.
    pub seed: u64,
    /// Drop tokens less likely than `min_p` times the most likely one (after temperature);
    /// 0 disables it.
    #[serde(default)]
    pub min_p: f64,
    /// Added to the logits of these token ids (OpenAI's `logit_bias`), sorted by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// Subtracted from the logit of every token the output already holds (OpenAI's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub presence_penalty: f64,
    /// Subtracted once per occurrence in the output (OpenAI's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub frequency_penalty: f64,
    /// Logits of tokens in the prompt or the output are divided by it when positive and
    /// multiplied when negative (CTRL's, as transformers and vLLM apply it); 1 disables it.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub repetition_penalty: f64,
    /// What the output must match (structured outputs), enforced by masking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 0, min_p: 0.0, logit_bias: Vec::new(), presence_penalty: 0.0, frequency_penalty: 0.0, repetition_penalty: 1.0, constraint: None }
    }
}

/// A sampling parameter outside its range.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InvalidSampling {
    /// The parameter, as the OpenAI API names it.
    pub param: &'static str,
    /// What is wrong, with the value.
    pub message: String,
}

impl SamplingParams {
    /// Checks the ranges of top-p, min-p, the penalties and the logit biases (the same for
    /// every caller: the HTTP API names the parameter, the engine refuses what reaches it).
    /// Logit-bias token ids are checked against the vocabulary by the engine.
    pub fn check_ranges(&self) -> Result<(), InvalidSampling> {
        let invalid = |param, message| Err(InvalidSampling { param, message });
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid("min_p", format!("min_p must be between 0 and 1, got {}", self.min_p));
        }
        for (param, value) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&value) {
                return invalid(param, format!("{param} must be between -2 and 2, got {value}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid("repetition_penalty", format!("repetition_penalty must be > 0 (1 is off), got {}", self.repetition_penalty));
        }
        if let Some((token, bias)) = self.logit_bias.iter().find(|(_, bias)| !(-100.0..=100.0).contains(bias)) {
            return invalid("logit_bias", format!("logit_bias for token {token} must be a number between -100 and 100, got {bias}"));
        }
        Ok(())
    }

    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Whether this draws randomly.
    pub fn is_sampled(&self) -> bool {
        self.temperature > 0.0
    }

    /// The temperature logprobs are reported under (1 for greedy).
    pub fn logprob_temperature(&self) -> f64 {
        if self.is_sampled() { self.temperature } else { 1.0 }
    }

    /// Whether min-p, top-k or top-p cut the distribution of a sampled row.
    pub fn is_truncated(&self) -> bool {
        self.is_sampled() && (self.top_p < 1.0 || self.top_k > 0 || self.min_p > 0.0)
    }

    /// Whether logit bias, penalties or a constraint change the logits (see
    /// [`super::logits`]); such rows sample from changed logits, greedy ones too.
    pub fn edits_logits(&self) -> bool {
        !self.logit_bias.is_empty() || self.penalises_repetition() || self.penalises_output() || self.constraint.is_some()
    }

    /// Whether the repetition penalty is on (it needs every token seen so far).
    pub fn penalises_repetition(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    /// Whether frequency or presence penalties are on (they need the output's token counts).
    pub fn penalises_output(&self) -> bool {
        self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }
}

/// Per-row min-p / top-k / top-p limits as device tensors, shared by the sampler and the
/// trainer so both cut a distribution exactly the same way.
#[derive(Debug)]
pub struct Truncation {
    /// `(rows, 1)` float: `ln(min_p)`, `-inf` where min-p is off.
    log_min_p: Tensor,
    /// Whether any row uses min-p.
    any_min_p: bool,
    /// `(rows, 1)` int64, the vocabulary size where top-k is off.
    top_k: Tensor,
    /// `(rows, 1)` float; 2 where top-p is off, so rounding in the cumulative sum can never
    /// drop a tail token of an untruncated row.
    top_p: Tensor,
    /// Whether any row uses top-p (which needs a full sort; top-k alone needs only `topk`).
    any_top_p: bool,
    /// Largest k among rows (top-k alone is computed with one `topk` of this size).
    max_k: i64,
}

impl Truncation {
    /// Limits for rows with these parameters; `None` when no row is truncated. Greedy rows are
    /// never truncated (their argmax is always kept anyway).
    pub fn new(rows: &[&SamplingParams], vocab_size: usize, device: Device) -> Option<Self> {
        if !rows.iter().any(|p| p.is_truncated()) {
            return None;
        }
        let vocab = vocab_size as i64;
        let k_of = |p: &SamplingParams| if p.is_truncated() && p.top_k > 0 { (p.top_k as i64).min(vocab) } else { vocab };
        let p_of = |p: &SamplingParams| if p.is_truncated() && p.top_p < 1.0 { p.top_p as f32 } else { 2.0 };
        let min_p_of = |p: &SamplingParams| if p.is_truncated() && p.min_p > 0.0 { (p.min_p as f32).ln() } else { f32::NEG_INFINITY };
        let top_k: Vec<i64> = rows.iter().map(|p| k_of(p)).collect();
        let top_p: Vec<f32> = rows.iter().map(|p| p_of(p)).collect();
        let log_min_p: Vec<f32> = rows.iter().map(|p| min_p_of(p)).collect();
        Some(Self {
            any_min_p: log_min_p.iter().any(|v| v.is_finite()),
            log_min_p: Tensor::from_slice(&log_min_p).view([-1, 1]).to_device(device),
            any_top_p: top_p.iter().any(|&p| p < 1.0),
            // Over the rows that use top-k: an untruncated neighbour (k = vocab) must not
            // switch the cut off for everyone.
            max_k: top_k.iter().copied().filter(|&k| k < vocab).max().unwrap_or(vocab),
            top_k: Tensor::from_slice(&top_k).view([-1, 1]).to_device(device),
            top_p: Tensor::from_slice(&top_p).view([-1, 1]).to_device(device),
        })
    }

    /// The same limits repeated for consecutive runs of rows: row `i` is used `counts[i]`
    /// times (the trainer has one row per completion token).
    pub fn repeat_rows(&self, counts: &Tensor) -> Self {
        Self {
            log_min_p: self.log_min_p.repeat_interleave_self_tensor(counts, 0, None),
            any_min_p: self.any_min_p,
            top_k: self.top_k.repeat_interleave_self_tensor(counts, 0, None),
            top_p: self.top_p.repeat_interleave_self_tensor(counts, 0, None),
            any_top_p: self.any_top_p,
            max_k: self.max_k,
        }
    }

    /// `(rows, vocab)` bool: true for tokens outside each row's set of the tempered `scores`.
    /// Min-p first (vLLM's order), then top-k, then top-p over the renormalised survivors
    /// (transformers' and vLLM's order). Each row's best token is always kept. Ties at the
    /// top-k boundary keep every tied token.
    pub fn outside(&self, scores: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let scores = scores.detach();
            if !self.any_min_p {
                return self.outside_top_k_p(&scores);
            }
            // p < min_p * p_max  <=>  score < max score + ln(min_p).
            let below = scores.lt_tensor(&(scores.amax(-1, true) + &self.log_min_p));
            self.outside_top_k_p(&scores.masked_fill(&below, f64::NEG_INFINITY)).logical_or(&below)
        })
    }

    fn outside_top_k_p(&self, scores: &Tensor) -> Tensor {
        let vocab = scores.size()[1];
        if !self.any_top_p {
            if self.max_k >= vocab {
                return scores.zeros_like().to_kind(Kind::Bool);
            }
            if self.max_k == 1 {
                // `topk` sorts its candidates; the best score alone is one reduction.
                return scores.lt_tensor(&scores.amax(-1, true)).logical_and(&self.top_k.lt(vocab));
            }
            // The k-th best score of each row is its threshold; rows without top-k (k =
            // vocab) keep everything, whatever k their batch-mates use.
            let (best, _) = scores.topk(self.max_k, -1, true, true);
            let kth = best.gather(1, &(self.top_k.clamp_max(self.max_k) - 1), false);
            return scores.lt_tensor(&kth).logical_and(&self.top_k.lt(vocab));
        }
        let (sorted, order) = scores.sort(-1, true);
        // By value, as in the top-k-only path, so a row's set never depends on its batch.
        let kth = sorted.gather(1, &(self.top_k.clamp_max(vocab) - 1), false);
        let beyond_k = sorted.lt_tensor(&kth);
        let probs = sorted.masked_fill(&beyond_k, f64::NEG_INFINITY).softmax(-1, Kind::Float);
        let mass_before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = mass_before.gt_tensor(&self.top_p).logical_or(&beyond_k);
        drop_sorted.zeros_like().scatter(1, &order, &drop_sorted)
    }
}

/// Per-row sampling parameters as device tensors, built once per batch composition.
#[derive(Debug)]
pub struct BatchSampling {
    /// `(b, 1)` float: 1 / T (1 for greedy rows).
    inv_temperature: Tensor,
    /// `(b, 1)` bool: the row draws randomly (greedy rows get no noise).
    sampled_rows: Tensor,
    /// `(b, 1)` int64.
    seeds: Tensor,
    truncation: Option<Truncation>,
    any_sampled: bool,
    /// A greedy row shares a batch that samples (it then needs its own argmax).
    any_greedy: bool,
}

/// One step's choice for every row.
#[derive(Debug)]
pub struct Sampled {
    /// `(b,)` int64.
    pub tokens: Tensor,
    /// `(b,)` float: `log_softmax(logits / T)` of each chosen token, before truncation.
    pub logprobs: Tensor,
    /// `(b,)` float: logprob of each chosen token under the distribution it was drawn from
    /// (truncated and renormalised; 0 for greedy rows).
    pub sampling_logprobs: Tensor,
    /// `(b,)` float: entropy (nats) of each row's tempered distribution before truncation, the
    /// per-token entropy HICRA's analyses and gated credit use.
    pub entropies: Tensor,
    /// `(b, k)` values and ids of the k best alternatives (same scale as `logprobs`), when
    /// asked for.
    pub top: Option<(Tensor, Tensor)>,
}

impl BatchSampling {
    /// Packs per-row parameters for a batch on `device`.
    pub fn new(rows: &[&SamplingParams], vocab_size: usize, device: Device) -> Self {
        let col_f = |v: Vec<f32>| Tensor::from_slice(&v).view([-1, 1]).to_device(device);
        Self {
            inv_temperature: col_f(rows.iter().map(|p| (1.0 / p.logprob_temperature()) as f32).collect()),
            sampled_rows: Tensor::from_slice(&rows.iter().map(|p| p.is_sampled()).collect::<Vec<bool>>()).view([-1, 1]).to_device(device),
            seeds: Tensor::from_slice(&rows.iter().map(|p| p.seed as i64).collect::<Vec<i64>>()).view([-1, 1]).to_device(device),
            truncation: Truncation::new(rows, vocab_size, device),
            any_sampled: rows.iter().any(|p| p.is_sampled()),
            any_greedy: rows.iter().any(|p| !p.is_sampled()),
        }
    }

    /// Picks one token per row from float32 `logits` `(b, vocab)`; `edits` are the rows' logit
    /// bias, penalties and constraint masks for this step ([`super::logits`]); `steps` `(b, 1)`
    /// int64 is each row's count of tokens generated so far (part of the RNG counter).
    ///
    /// Reported logprobs, alternatives and entropies are the model's own (`logits / T`, before
    /// any edit or truncation); the draw, and `sampling_logprobs`, use the edited and
    /// truncated distribution.
    pub fn sample(&self, logits: &Tensor, edits: Option<&LogitEdits>, steps: &Tensor, top_logprobs: usize) -> Sampled {
        let scaled = logits * &self.inv_temperature;
        let logprobs_all = scaled.log_softmax(-1, Kind::Float);
        let behaviour = match edits {
            Some(edits) => edits.apply(logits) * &self.inv_temperature,
            None => scaled.shallow_clone(),
        };
        let (tokens, sampling_logprobs) = if self.any_sampled {
            let drawn_from = match &self.truncation {
                Some(truncation) => behaviour.masked_fill(&truncation.outside(&behaviour), f64::NEG_INFINITY).log_softmax(-1, Kind::Float),
                None if edits.is_some() => behaviour.log_softmax(-1, Kind::Float),
                None => logprobs_all.shallow_clone(),
            };
            let drawn = inverse_cdf(&drawn_from, &uniform(&self.seeds, steps));
            // Greedy rows take the argmax of their untruncated scores (their best token is in
            // every set anyway) and report a point mass.
            let tokens = match self.any_greedy {
                true => drawn.where_self(&self.sampled_rows, &behaviour.argmax(-1, true)),
                false => drawn,
            }
            .squeeze_dim(1);
            let picked = drawn_from.gather(1, &tokens.unsqueeze(1), false);
            let picked = picked.where_self(&self.sampled_rows, &picked.zeros_like()).squeeze_dim(1);
            (tokens, picked)
        } else {
            let tokens = behaviour.argmax(-1, false);
            let zeros = Tensor::zeros([logits.size()[0]], (Kind::Float, logits.device()));
            (tokens, zeros)
        };
        let logprobs = logprobs_all.gather(1, &tokens.unsqueeze(1), false).squeeze_dim(1);
        let top = (top_logprobs > 0).then(|| logprobs_all.topk(top_logprobs as i64, -1, true, true));
        let entropies = -(logprobs_all.exp() * &logprobs_all).sum_dim_intlist(-1, false, Kind::Float);
        Sampled { tokens, logprobs, sampling_logprobs, entropies, top }
    }
}

// SplitMix64 constants as the two's-complement int64 values torch multiplies with.
const GOLDEN: i64 = 0x9E37_79B9_7F4A_7C15_u64 as i64;
const MIX1: i64 = 0xBF58_476D_1CE4_E5B9_u64 as i64;
const MIX2: i64 = 0x94D0_49BB_1331_11EB_u64 as i64;
const STEP_MUL: i64 = 0xD1B5_4A32_D192_ED03_u64 as i64;

/// Logical right shift of int64 lanes (torch's `>>` is arithmetic for signed types).
fn shift_right(x: &Tensor, bits: i64) -> Tensor {
    x.bitwise_right_shift_tensor_scalar(bits).bitwise_and((1i64 << (64 - bits)) - 1)
}

/// SplitMix64's finaliser, lane-wise; int64 multiplication wraps like u64.
fn mix(z: Tensor) -> Tensor {
    let z = z.bitwise_xor_tensor(&shift_right(&z, 30)) * MIX1;
    let z = z.bitwise_xor_tensor(&shift_right(&z, 27)) * MIX2;
    z.bitwise_xor_tensor(&shift_right(&z, 31))
}

/// One uniform variate per row `(b, 1)` float64, strictly inside (0, 1), from `(seed, step)`.
fn uniform(seeds: &Tensor, steps: &Tensor) -> Tensor {
    uniform_from_bits(&mix(mix(seeds * GOLDEN + steps * STEP_MUL) + GOLDEN))
}

/// Bits of uniform resolution taken from each hash: float64 holds 53, and `2^52 - 0.5` is
/// still exact, so the variate can never round to 0 or 1.
const UNIFORM_BITS: i64 = 52;

/// Maps 64 random bits to `(top 52 bits + 0.5) / 2^52`, in `[2^-53, 1 - 2^-53]` for every input.
fn uniform_from_bits(bits: &Tensor) -> Tensor {
    let scale = 1.0 / (1u64 << UNIFORM_BITS) as f64;
    (shift_right(bits, 64 - UNIFORM_BITS).to_kind(Kind::Double) + 0.5) * scale
}

/// Draws one token per row of `logprobs` `(b, vocab)` (rows may hold `-inf`) by inverting the
/// float64 cumulative distribution at `uniform` `(b, 1)`; returns `(b, 1)` int64 ids.
///
/// `searchsorted(.., right)` returns the first index whose cumulative sum exceeds the target,
/// which is never a zero-probability token: its cumulative sum equals its predecessor's (or 0
/// at index 0, never above a positive target). A target that rounds up to the total (possible
/// only at the extreme top of the uniform's range) would run past the end; such rows take
/// their most probable token instead.
fn inverse_cdf(logprobs: &Tensor, uniform: &Tensor) -> Tensor {
    let vocab = logprobs.size()[1];
    let weights = logprobs.exp().to_kind(Kind::Double);
    let cdf = weights.cumsum(-1, Kind::Double);
    let total = cdf.narrow(1, vocab - 1, 1);
    let target = uniform * &total;
    let index = target.searchsorted(&cdf, false, true, "right", None::<Tensor>);
    let overshoot = index.ge(vocab);
    index.clamp_max(vocab - 1).where_self(&overshoot.logical_not(), &weights.argmax(-1, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2/Qwen3's vocabulary size: the out-of-set bug grew with it.
    const REAL_VOCAB: i64 = 151_936;

    fn logits() -> Tensor {
        Tensor::from_slice(&[2.0f32, 1.0, 0.5, -1.0, 0.0, 3.0]).view([1, 6])
    }

    /// Synthetic logits at a real vocabulary size: a head of 24 clear candidates over a long
    /// random tail that still carries real mass.
    ///
    /// The tail is drawn from a local generator: libtorch's is process-wide, and other tests
    /// reseed and draw from it concurrently, which would make this fixture vary between runs.
    fn real_logits() -> Tensor {
        let mut state = 11;
        let normal = |state: &mut u64| {
            // Box-Muller.
            let (u, v) = (1.0 - crate::random::uniform(state), crate::random::uniform(state));
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        };
        let tail_values: Vec<f32> = (0..REAL_VOCAB).map(|_| normal(&mut state) - 3.0).collect();
        let tail = Tensor::from_slice(&tail_values);
        let head = Tensor::linspace(6.0, 2.0, 24, (Kind::Float, Device::Cpu));
        tail.slice(0, 0, 24, 1).copy_(&head);
        tail.view([1, REAL_VOCAB])
    }

    fn first_i64(t: &Tensor) -> i64 {
        i64::try_from(t.get(0)).unwrap_or(-1)
    }

    fn draw(params: &SamplingParams, n: i64) -> Vec<i64> {
        let batch = BatchSampling::new(&[params], 6, Device::Cpu);
        (0..n).map(|step| first_i64(&batch.sample(&logits(), None, &Tensor::from_slice(&[step]).view([1, 1]), 0).tokens)).collect()
    }

    /// Draws `draws` tokens from one row of `logits` with `params`: `rows` sequences per batch
    /// (distinct seeds), stepping each. Returns the tokens and their sampling logprobs.
    fn draw_many(logits: &Tensor, params: &SamplingParams, draws: usize, rows: usize) -> (Vec<i64>, Vec<f32>) {
        let vocab = logits.size()[1];
        let per_row: Vec<SamplingParams> = (0..rows).map(|r| SamplingParams { seed: params.seed.wrapping_add(r as u64 * 7919), ..params.clone() }).collect();
        let refs: Vec<&SamplingParams> = per_row.iter().collect();
        let batch = BatchSampling::new(&refs, vocab as usize, Device::Cpu);
        let block = logits.expand([rows as i64, vocab], true);
        let (mut tokens, mut logprobs) = (Vec::with_capacity(draws), Vec::with_capacity(draws));
        let mut step = 0i64;
        while tokens.len() < draws {
            let steps = Tensor::full([rows as i64, 1], step, (Kind::Int64, Device::Cpu));
            let out = batch.sample(&block, None, &steps, 0);
            tokens.extend(Vec::<i64>::try_from(&out.tokens).unwrap_or_default());
            logprobs.extend(Vec::<f32>::try_from(&out.sampling_logprobs).unwrap_or_default());
            step += 1;
        }
        tokens.truncate(draws);
        logprobs.truncate(draws);
        (tokens, logprobs)
    }

    /// The truncated distribution computed independently on the host in f64: temperature,
    /// top-k, then top-p over the survivors, renormalised. Returns `(token, probability)`
    /// pairs of the kept set, best first.
    fn truncated_reference(logits: &Tensor, temperature: f64, top_k: usize, top_p: f64) -> Vec<(usize, f64)> {
        let values = Vec::<f32>::try_from(logits.view([-1])).unwrap_or_default();
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        let keep_k = if top_k == 0 { values.len() } else { top_k };
        let kept: Vec<usize> = order[..keep_k].to_vec();
        let max = values[kept[0]] as f64 / temperature;
        let weights: Vec<f64> = kept.iter().map(|&t| (values[t] as f64 / temperature - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut mass_before = 0.0;
        let mut nucleus = Vec::new();
        for (&t, w) in kept.iter().zip(&weights) {
            if mass_before > top_p {
                break;
            }
            nucleus.push((t, w / total));
            mass_before += w / total;
        }
        let norm: f64 = nucleus.iter().map(|(_, p)| p).sum();
        nucleus.into_iter().map(|(t, p)| (t, p / norm)).collect()
    }

    #[test]
    fn the_uniform_variate_is_strictly_inside_the_unit_interval_for_every_extreme_bit_pattern() {
        let bits = Tensor::from_slice(&[-1i64, 0, 1, i64::MAX, i64::MIN, -2, 0xFFFF_FF80_0000_0000_u64 as i64]);
        let values = Vec::<f64>::try_from(uniform_from_bits(&bits)).unwrap_or_default();
        assert_eq!(values.len(), 7);
        assert!(values.iter().all(|&u| u > 0.0 && u < 1.0), "{values:?}");
    }

    #[test]
    fn the_inverse_cdf_never_stops_on_a_zero_probability_token_even_at_the_extremes() {
        // Allowed tokens 1 and 3 only; the extreme uniforms land on their edges.
        let logprobs = Tensor::from_slice(&[f32::NEG_INFINITY, 0.5f32.ln(), f32::NEG_INFINITY, 0.5f32.ln(), f32::NEG_INFINITY]).view([1, 5]);
        for u in [f64::MIN_POSITIVE, 1e-300, 0.5, 0.5 + 1e-16, 1.0 - 1e-16, 1.0 - f64::EPSILON / 2.0, 1.0] {
            let token = first_i64(&inverse_cdf(&logprobs, &Tensor::from_slice(&[u]).view([1, 1])).view([-1]));
            assert!(token == 1 || token == 3, "u = {u}: drew token {token}");
        }
    }

    #[test]
    fn greedy_takes_argmax_and_reports_untempered_logprob() {
        let batch = BatchSampling::new(&[&SamplingParams::greedy()], 6, Device::Cpu);
        let out = batch.sample(&logits(), None, &Tensor::zeros([1, 1], (Kind::Int64, Device::Cpu)), 2);
        assert_eq!(first_i64(&out.tokens), 5);
        let expected = f64::try_from(logits().log_softmax(-1, Kind::Float).get(0).get(5)).unwrap_or(0.0);
        let got = f64::try_from(out.logprobs.get(0)).unwrap_or(1.0);
        assert!((expected - got).abs() < 1e-6);
        assert_eq!(f64::try_from(out.sampling_logprobs.get(0)).ok(), Some(0.0), "a point mass has logprob 0");
        let (_, top_ids) = out.top.expect("asked for top-2");
        assert_eq!(Vec::<i64>::try_from(top_ids.get(0)).unwrap_or_default(), vec![5, 0]);
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_softmax() {
        let params = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 7, ..SamplingParams::default() };
        let a = draw(&params, 4000);
        assert_eq!(a, draw(&params, 4000));
        assert_ne!(a, draw(&SamplingParams { seed: 8, ..params.clone() }, 4000));
        let probs = Vec::<f32>::try_from(logits().softmax(-1, Kind::Float).get(0)).unwrap_or_default();
        for (token, p) in probs.iter().enumerate() {
            let freq = a.iter().filter(|&&t| t == token as i64).count() as f32 / a.len() as f32;
            assert!((freq - p).abs() < 0.03, "token {token}: frequency {freq} vs probability {p}");
        }
    }

    #[test]
    fn top_k_one_equals_greedy_over_ten_thousand_draws_at_a_real_vocabulary() {
        let logits = real_logits() + Tensor::randn([1, REAL_VOCAB], (Kind::Float, Device::Cpu)) * 2.0;
        let best = first_i64(&logits.argmax(-1, false));
        let (tokens, logprobs) = draw_many(&logits, &SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 1, seed: 3, ..SamplingParams::default() }, 10_000, 500);
        let off: Vec<&i64> = tokens.iter().filter(|&&t| t != best).collect();
        assert!(off.is_empty(), "{} of 10000 draws left the top-1 set, e.g. {:?}", off.len(), &off[..off.len().min(5)]);
        assert!(logprobs.iter().all(|&lp| lp == 0.0), "top_k=1 draws from a point mass");
    }

    #[test]
    fn truncated_draws_follow_the_truncated_softmax_chi_square() {
        let logits = real_logits();
        for (top_k, top_p, temperature) in [(0usize, 0.8f64, 1.0f64), (12, 0.95, 0.7), (5, 1.0, 1.3)] {
            let params = SamplingParams { temperature, top_p, top_k, seed: 99, ..SamplingParams::default() };
            let reference = truncated_reference(&logits, temperature, top_k, top_p);
            let draws = 2_500;
            let (tokens, logprobs) = draw_many(&logits, &params, draws, 500);
            let mut counts = std::collections::HashMap::<i64, usize>::new();
            for &t in &tokens {
                *counts.entry(t).or_default() += 1;
            }
            let allowed: std::collections::HashSet<i64> = reference.iter().map(|&(t, _)| t as i64).collect();
            let outside: Vec<_> = counts.keys().filter(|t| !allowed.contains(t)).collect();
            assert!(outside.is_empty(), "k={top_k} p={top_p}: drew tokens outside the set: {outside:?}");
            // Pearson's chi-square; cells with expected count under 5 are pooled.
            let (mut chi2, mut cells, mut pooled_obs, mut pooled_exp) = (0.0f64, 0usize, 0.0f64, 0.0f64);
            for &(t, p) in &reference {
                let expected = p * draws as f64;
                let observed = *counts.get(&(t as i64)).unwrap_or(&0) as f64;
                if expected < 5.0 {
                    pooled_obs += observed;
                    pooled_exp += expected;
                } else {
                    chi2 += (observed - expected).powi(2) / expected;
                    cells += 1;
                }
            }
            if pooled_exp > 0.0 {
                chi2 += (pooled_obs - pooled_exp).powi(2) / pooled_exp.max(1e-9);
                cells += 1;
            }
            // Critical value at p = 0.001 (Wilson-Hilferty approximation).
            let dof = (cells.max(2) - 1) as f64;
            let z = 3.09;
            let critical = dof * (1.0 - 2.0 / (9.0 * dof) + z * (2.0 / (9.0 * dof)).sqrt()).powi(3);
            assert!(chi2 < critical, "k={top_k} p={top_p} T={temperature}: chi2 {chi2:.1} over {cells} cells >= {critical:.1}");
            // Each draw reports the logprob of the distribution it came from.
            let expected_lp: std::collections::HashMap<i64, f64> = reference.iter().map(|&(t, p)| (t as i64, p.ln())).collect();
            for (t, lp) in tokens.iter().zip(&logprobs).take(500) {
                let want = expected_lp[t];
                assert!((want - *lp as f64).abs() < 1e-4, "token {t}: sampling logprob {lp} vs {want}");
            }
        }
    }

    #[test]
    fn no_token_outside_the_nucleus_over_a_million_draws() {
        // 1,024 ids keep a million draws quick; the old sampler's failure rate was one per 2^24
        // lanes, ~61 expected escapes here.
        tch::manual_seed(5);
        let logits = Tensor::randn([1, 1024], (Kind::Float, Device::Cpu)) * 3.0;
        let reference = truncated_reference(&logits, 1.0, 0, 0.5);
        let allowed: std::collections::HashSet<i64> = reference.iter().map(|&(t, _)| t as i64).collect();
        let (tokens, _) = draw_many(&logits, &SamplingParams { temperature: 1.0, top_p: 0.5, top_k: 0, seed: 1, ..SamplingParams::default() }, 1_000_000, 4_000);
        let escaped = tokens.iter().filter(|t| !allowed.contains(t)).count();
        assert_eq!(escaped, 0, "{escaped} of 1,000,000 draws fell outside the top-p set of {} tokens", allowed.len());
    }

    #[test]
    fn mixed_batches_keep_greedy_exact_and_seeds_independent_at_a_real_vocabulary() {
        let base = real_logits();
        let sampled = SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 40, seed: 42, ..SamplingParams::default() };
        let nucleus_only = SamplingParams { temperature: 1.1, top_p: 0.9, top_k: 0, seed: 43, ..SamplingParams::default() };
        let greedy = SamplingParams { seed: 44, ..SamplingParams::greedy() };
        let alone = BatchSampling::new(&[&sampled], REAL_VOCAB as usize, Device::Cpu);
        let mixed = BatchSampling::new(&[&greedy, &sampled, &nucleus_only, &greedy], REAL_VOCAB as usize, Device::Cpu);
        for step in 0..60i64 {
            tch::manual_seed(step);
            let logits = &base + Tensor::randn([4, REAL_VOCAB], (Kind::Float, Device::Cpu));
            let steps = Tensor::full([4, 1], step, (Kind::Int64, Device::Cpu));
            let out = mixed.sample(&logits, None, &steps, 0);
            let single = alone.sample(&logits.narrow(0, 1, 1), None, &steps.narrow(0, 1, 1), 0);
            let tokens = Vec::<i64>::try_from(&out.tokens).unwrap_or_default();
            let best = Vec::<i64>::try_from(logits.argmax(-1, false)).unwrap_or_default();
            assert_eq!((tokens[0], tokens[3]), (best[0], best[3]), "greedy rows take the argmax");
            assert_eq!(tokens[1], first_i64(&single.tokens), "a row samples the same whatever shares its batch");
            for values in [&out.logprobs, &out.sampling_logprobs, &out.entropies] {
                let values = Vec::<f32>::try_from(values).unwrap_or_default();
                assert!(values.iter().all(|v| v.is_finite()), "step {step}: {values:?}");
            }
        }
    }

    #[test]
    fn top_k_rows_and_untruncated_rows_keep_their_own_distributions_in_one_batch() {
        let logits = real_logits();
        let plain = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 77, ..SamplingParams::default() };
        for k in [1usize, 40] {
            let neighbour = SamplingParams { top_k: k, seed: 78, ..plain.clone() };
            let alone = BatchSampling::new(&[&plain], REAL_VOCAB as usize, Device::Cpu);
            let paired = BatchSampling::new(&[&neighbour, &plain], REAL_VOCAB as usize, Device::Cpu);
            let both = logits.expand([2, REAL_VOCAB], true);
            for step in 0..40i64 {
                let a = alone.sample(&logits, None, &Tensor::full([1, 1], step, (Kind::Int64, Device::Cpu)), 0);
                let b = paired.sample(&both, None, &Tensor::full([2, 1], step, (Kind::Int64, Device::Cpu)), 0);
                assert_eq!(first_i64(&a.tokens), i64::try_from(b.tokens.get(1)).unwrap_or(-1), "k={k} step {step}");
                let (la, lb) = (f64::try_from(a.sampling_logprobs.get(0)).unwrap_or(0.0), f64::try_from(b.sampling_logprobs.get(1)).unwrap_or(1.0));
                assert!((la - lb).abs() < 1e-6, "k={k} step {step}: the untruncated row's distribution changed ({la} vs {lb})");
                // And the neighbour keeps its own cut: within its k best.
                let drawn = i64::try_from(b.tokens.get(0)).unwrap_or(-1);
                let (_, best) = logits.topk(k as i64, -1, true, true);
                assert!(Vec::<i64>::try_from(best.view([-1])).unwrap_or_default().contains(&drawn), "k={k} step {step}: drew {drawn} outside the top {k}");
            }
        }
    }

    #[test]
    fn min_p_keeps_exactly_the_tokens_within_its_share_of_the_best_at_a_real_vocabulary() {
        let logits = real_logits();
        let params = SamplingParams { temperature: 0.8, min_p: 0.05, seed: 4, ..SamplingParams::default() };
        let probs = Vec::<f32>::try_from((&logits / 0.8).softmax(-1, Kind::Float).view([-1])).unwrap_or_default();
        let best = probs.iter().copied().fold(0.0f32, f32::max);
        let kept: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] >= 0.05 * best).collect();
        let mass: f32 = kept.iter().map(|&i| probs[i]).sum();
        let (tokens, logprobs) = draw_many(&logits, &params, 5_000, 500);
        for (t, lp) in tokens.iter().zip(&logprobs) {
            let t = *t as usize;
            assert!(probs[t] >= 0.05 * best, "drew token {t} with p {} < min_p * p_max {}", probs[t], 0.05 * best);
            let want = (probs[t] / mass).ln();
            assert!((want - lp).abs() < 1e-4, "token {t}: sampling logprob {lp} vs renormalised {want}");
        }
        assert!(kept.len() > 1 && kept.len() < 100, "the cut should keep a handful: {}", kept.len());
    }

    #[test]
    fn edited_rows_draw_only_allowed_tokens_and_greedy_rows_take_the_edited_argmax() {
        use crate::engine::logits::{EditsBuilder, LogitState};
        // A mask of five ids (two of them in the far tail) on row 1, and a bias on row 0.
        let allowed = [3usize, 7, 20, 90_000, 150_000];
        let mut mask = vec![0u32; (REAL_VOCAB as usize).div_ceil(32)];
        for &id in &allowed {
            mask[id / 32] |= 1 << (id % 32);
        }
        let logits = real_logits().expand([2, REAL_VOCAB], true);
        let greedy_biased = SamplingParams { logit_bias: vec![(150_000, 100.0)], ..SamplingParams::greedy() };
        let sampled = SamplingParams { seed: 8, ..SamplingParams::default() };
        let batch = BatchSampling::new(&[&greedy_biased, &sampled], REAL_VOCAB as usize, Device::Cpu);
        let mut state = LogitState::new(&greedy_biased, &[], None).expect("state").expect("a bias edits");
        let probs = Vec::<f32>::try_from(real_logits().softmax(-1, Kind::Float).view([-1])).unwrap_or_default();
        let mass: f32 = allowed.iter().map(|&i| probs[i]).sum();
        let mut counts = std::collections::HashMap::<i64, usize>::new();
        for step in 0..2_000i64 {
            let mut builder = EditsBuilder::new(2);
            state.write_row(0, &greedy_biased, &mut builder);
            builder.push_mask_for_tests(1, mask.clone());
            let edits = builder.build(REAL_VOCAB as usize, Device::Cpu).expect("edits");
            let out = batch.sample(&logits, Some(&edits), &Tensor::full([2, 1], step, (Kind::Int64, Device::Cpu)), 0);
            let tokens = Vec::<i64>::try_from(&out.tokens).unwrap_or_default();
            assert_eq!(tokens[0], 150_000, "the greedy row takes the argmax after its bias");
            *counts.entry(tokens[1]).or_default() += 1;
            let lp = Vec::<f32>::try_from(&out.sampling_logprobs).unwrap_or_default()[1];
            let want = (probs[tokens[1] as usize] / mass).ln();
            assert!((lp - want).abs() < 1e-4, "logprob under the masked distribution: {lp} vs {want}");
            // Reported logprobs stay the model's own.
            let reported = Vec::<f32>::try_from(&out.logprobs).unwrap_or_default()[1];
            assert!((reported - probs[tokens[1] as usize].ln()).abs() < 1e-4);
        }
        let outside: Vec<_> = counts.keys().filter(|t| !allowed.contains(&(**t as usize))).collect();
        assert!(outside.is_empty(), "drew tokens the mask forbids: {outside:?}");
        for &id in &allowed[..3] {
            let freq = counts.get(&(id as i64)).copied().unwrap_or(0) as f32 / 2_000.0;
            assert!((freq - probs[id] / mass).abs() < 0.04, "token {id}: frequency {freq} vs {}", probs[id] / mass);
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let top2 = draw(&SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 2, seed: 1, ..SamplingParams::default() }, 500);
        assert!(top2.iter().all(|&t| t == 5 || t == 0));
        assert!(top2.contains(&5) && top2.contains(&0));
        // p(5) ~ 0.61, so top_p 0.5 keeps token 5 alone.
        let nucleus = draw(&SamplingParams { temperature: 1.0, top_p: 0.5, top_k: 0, seed: 1, ..SamplingParams::default() }, 200);
        assert!(nucleus.iter().all(|&t| t == 5));
    }
}
