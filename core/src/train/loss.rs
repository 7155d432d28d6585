//! The policy loss: PPO's clipped surrogate with clip-higher, against the logprobs recorded
//! when the tokens were sampled, plus optional KL to the base policy and an entropy bonus.
//!
//! The "old" policy is the distribution each token was actually drawn from: the sampler
//! records its logprob after temperature, top-k and top-p (`sampling_logprob`). The "new"
//! policy is the same family under the current weights: each sample's own temperature, and its
//! own top-k / top-p set recomputed from the current logits, with the sampled token always kept
//! in it (a token the current set would exclude still gets a finite logprob and a gradient).
//! Sampler and trainer are the same forward code and cut distributions with the same
//! [`Truncation`], so the ratio is exactly 1 for rollouts of the current version (up to float
//! rounding), and the clip range only matters for stale rollouts or later micro-steps.
//! Entropies and the KL term use the tempered distribution before truncation.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::TrainError;
use crate::engine::sampler::{SamplingParams, Truncation};
use crate::engine::score::PaddedPairs;
use crate::model::{ForwardInput, Transformer};

/// How per-token losses become the batch loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Sum over every token of the batch divided by the batch's token count (DAPO).
    Token,
    /// Mean over each sequence's tokens, then mean over sequences (original GRPO).
    SequenceMean,
}

/// Loss settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Lower clip: ratios below `1 - clip_low` stop helping negative advantages.
    pub clip_low: f64,
    /// Upper clip ("clip-higher"): ratios above `1 + clip_high` stop helping positive ones.
    pub clip_high: f64,
    /// Weight of the k3 KL estimate to the base policy (adapters off); 0 skips its forward.
    pub kl_coef: f64,
    /// Weight of the entropy bonus.
    pub entropy_coef: f64,
    /// Token-level or sequence-mean aggregation.
    pub aggregation: Aggregation,
    /// Sequences per forward/backward pass (gradients accumulate across them).
    pub micro_batch: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { clip_low: 0.2, clip_high: 0.28, kl_coef: 0.0, entropy_coef: 0.0, aggregation: Aggregation::Token, micro_batch: 4 }
    }
}

/// One completion to learn from.
#[derive(Clone, Debug)]
pub struct TrainSample {
    /// Exact prompt ids as served.
    pub prompt_ids: Vec<u32>,
    /// Exact completion ids as served.
    pub completion_ids: Vec<u32>,
    /// Logprob of each completion token under the distribution it was drawn from.
    pub old_logprobs: Vec<f32>,
    /// Advantage of each completion token.
    pub advantages: Vec<f32>,
    /// How the completion was sampled (temperature, top-k, top-p; the seed is unused).
    pub sampling: SamplingParams,
    /// Which completion tokens carry loss: those the model sampled, when the completion
    /// interleaves context (an agent episode's tool results and user turns). Empty: all.
    pub sampled_mask: Vec<bool>,
}

impl TrainSample {
    /// Tokens that carry loss.
    pub fn loss_tokens(&self) -> usize {
        if self.sampled_mask.is_empty() {
            self.completion_ids.len()
        } else {
            self.sampled_mask.iter().filter(|&&m| m).count()
        }
    }

    /// 1.0 for each completion token that carries loss, 0.0 for context.
    fn loss_weights(&self) -> impl Iterator<Item = f32> + '_ {
        (0..self.completion_ids.len()).map(|i| if self.sampled_mask.get(i).copied().unwrap_or(true) { 1.0 } else { 0.0 })
    }
}

/// What a backward pass over some samples measured.
#[derive(Debug, Default, Clone)]
pub struct LossStats {
    /// Loss contributed (already divided by the batch normaliser).
    pub loss: f64,
    /// Tokens seen.
    pub tokens: usize,
    /// Tokens whose clipped objective was the active one.
    pub clipped_tokens: usize,
    /// Sum of per-token k3 KL to the base policy (0 when `kl_coef` is 0).
    pub kl_sum: f64,
    /// Per sample, per token entropy of the current policy (nats).
    pub entropies: Vec<Vec<f32>>,
    /// Per sample, per token logprob under the current policy before the update.
    pub new_logprobs: Vec<Vec<f32>>,
}

impl LossStats {
    fn merge(&mut self, other: LossStats) {
        self.loss += other.loss;
        self.tokens += other.tokens;
        self.clipped_tokens += other.clipped_tokens;
        self.kl_sum += other.kl_sum;
        self.entropies.extend(other.entropies);
        self.new_logprobs.extend(other.new_logprobs);
    }
}

/// Checks that every sample's vectors have the completion's length.
pub fn validate(samples: &[TrainSample], vocab_size: usize, max_positions: usize) -> Result<(), TrainError> {
    for (i, s) in samples.iter().enumerate() {
        let n = s.completion_ids.len();
        if s.prompt_ids.is_empty() || n == 0 {
            return Err(TrainError::InvalidSample { index: i, reason: "empty prompt or completion".into() });
        }
        if s.old_logprobs.len() != n || s.advantages.len() != n {
            return Err(TrainError::InvalidSample { index: i, reason: format!("{n} tokens but {} logprobs and {} advantages", s.old_logprobs.len(), s.advantages.len()) });
        }
        if !s.sampled_mask.is_empty() && s.sampled_mask.len() != n {
            return Err(TrainError::InvalidSample { index: i, reason: format!("{n} tokens but a sampled mask of {}", s.sampled_mask.len()) });
        }
        if s.loss_tokens() == 0 {
            return Err(TrainError::InvalidSample { index: i, reason: "no sampled token to train on".into() });
        }
        if s.prompt_ids.len() + n > max_positions {
            return Err(TrainError::InvalidSample { index: i, reason: format!("{} tokens exceed the context {max_positions}", s.prompt_ids.len() + n) });
        }
        if let Some(id) = s.prompt_ids.iter().chain(&s.completion_ids).find(|&&id| id as usize >= vocab_size) {
            return Err(TrainError::InvalidSample { index: i, reason: format!("token id {id} outside the vocabulary") });
        }
        if s.old_logprobs.iter().chain(&s.advantages).any(|v| !v.is_finite()) {
            return Err(TrainError::InvalidSample { index: i, reason: "non-finite logprob or advantage".into() });
        }
        let t = s.sampling.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(TrainError::InvalidSample { index: i, reason: format!("temperature {t}: greedy or invalid sampling has no behaviour distribution to train against") });
        }
        if !(s.sampling.top_p > 0.0 && s.sampling.top_p <= 1.0) {
            return Err(TrainError::InvalidSample { index: i, reason: format!("top_p {} outside (0, 1]", s.sampling.top_p) });
        }
    }
    Ok(())
}

/// Runs forward and backward over `samples` in micro-batches, accumulating gradients into the
/// adapters. Losses are divided so that the gradients of all calls of one optimizer step add up
/// to the gradient of the batch loss: `total_tokens` and `total_sequences` describe that batch.
pub fn accumulate(model: &Transformer, samples: &[TrainSample], config: &LossConfig, total_tokens: usize, total_sequences: usize) -> LossStats {
    let mut stats = LossStats::default();
    for chunk in samples.chunks(config.micro_batch.max(1)) {
        stats.merge(micro_batch(model, chunk, config, total_tokens, total_sequences));
    }
    stats
}

/// Float32 tempered scores `logits / T` `(tokens, vocab)` predicting each completion token
/// (each sample under its own temperature), and the completion tokens `(tokens,)`.
fn completion_scores(model: &Transformer, samples: &[TrainSample], use_lora: bool, training: bool) -> (Tensor, Tensor) {
    let device = model.device();
    let pairs: Vec<(&[u32], &[u32])> = samples.iter().map(|s| (s.prompt_ids.as_slice(), s.completion_ids.as_slice())).collect();
    let batch = PaddedPairs::new(&pairs, device);
    let inv_t: Vec<f32> = samples
        .iter()
        .flat_map(|s| std::iter::repeat_n((1.0 / s.sampling.logprob_temperature()) as f32, s.completion_ids.len()))
        .collect();
    let hidden = model.forward_hidden(&ForwardInput { tokens: &batch.tokens, positions: &batch.positions, use_lora, training }, None);
    let inv_t = Tensor::from_slice(&inv_t).to_device(device).unsqueeze(1);
    (model.logits(&batch.predicting(&hidden)) * inv_t, batch.targets)
}

/// Float32 log-softmax rows `(tokens, vocab)` of the tempered distributions, and the targets.
fn completion_logprobs(model: &Transformer, samples: &[TrainSample], use_lora: bool, training: bool) -> (Tensor, Tensor) {
    let (scores, targets) = completion_scores(model, samples, use_lora, training);
    (scores.log_softmax(-1, Kind::Float), targets)
}

/// `(tokens,)` logprob of each target under its sample's own sampling distribution: the
/// tempered scores cut to the sample's top-k / top-p set (recomputed from these scores, the
/// target always kept), renormalised. Equal to `tempered` gathered when nothing is truncated.
fn policy_logprobs(scores: &Tensor, tempered: &Tensor, samples: &[TrainSample], targets: &Tensor) -> Tensor {
    let targets = targets.unsqueeze(1);
    let params: Vec<&SamplingParams> = samples.iter().map(|s| &s.sampling).collect();
    let vocab = scores.size()[1] as usize;
    let Some(truncation) = Truncation::new(&params, vocab, scores.device()) else {
        return tempered.gather(1, &targets, false).squeeze_dim(1);
    };
    let counts: Vec<i64> = samples.iter().map(|s| s.completion_ids.len() as i64).collect();
    let per_token = truncation.repeat_rows(&Tensor::from_slice(&counts).to_device(scores.device()));
    let outside = per_token.outside(scores).scatter_value(1, &targets, 0);
    scores.masked_fill(&outside, f64::NEG_INFINITY).log_softmax(-1, Kind::Float).gather(1, &targets, false).squeeze_dim(1)
}

/// Per-token entropy (nats) of the served policy over each sample's completion, without
/// gradients: what entropy-gated credit assignment needs before the loss exists.
pub fn token_entropies(model: &Transformer, samples: &[TrainSample], micro_batch: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(micro_batch.max(1)) {
        let (logprobs, _) = tch::no_grad(|| completion_logprobs(model, chunk, true, false));
        out.extend(per_sample(&entropy_of(&logprobs), chunk));
    }
    out
}

/// Entropy of each row of log-probabilities `(tokens, vocab)` -> `(tokens,)`.
fn entropy_of(logprobs: &Tensor) -> Tensor {
    -(logprobs.exp() * logprobs).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
}

/// Splits a flat per-token tensor over the samples' completions.
fn per_sample(flat: &Tensor, samples: &[TrainSample]) -> Vec<Vec<f32>> {
    let all = Vec::<f32>::try_from(flat.detach().to_device(tch::Device::Cpu)).unwrap_or_default();
    let mut out = Vec::with_capacity(samples.len());
    let mut at = 0;
    for s in samples {
        let end = (at + s.completion_ids.len()).min(all.len());
        out.push(all[at..end].to_vec());
        at = end;
    }
    out
}

fn micro_batch(model: &Transformer, samples: &[TrainSample], config: &LossConfig, total_tokens: usize, total_sequences: usize) -> LossStats {
    let device = model.device();
    let (scores, targets) = completion_scores(model, samples, true, true);
    let logprobs = scores.log_softmax(-1, Kind::Float);
    let new_lp = policy_logprobs(&scores, &logprobs, samples, &targets);
    let flat = |f: &dyn Fn(&TrainSample) -> &Vec<f32>| Tensor::from_slice(&samples.iter().flat_map(|s| f(s).iter().copied()).collect::<Vec<f32>>()).to_device(device);
    let old_lp = flat(&|s| &s.old_logprobs);
    let adv = flat(&|s| &s.advantages);

    // Context tokens of an episode (weight 0) were not sampled: no ratio, no loss, not counted.
    let weights = Tensor::from_slice(&samples.iter().flat_map(TrainSample::loss_weights).collect::<Vec<f32>>()).to_device(device);
    let ratio = (&new_lp - &old_lp).exp();
    let unclipped = &ratio * &adv;
    let clipped = ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high) * &adv;
    let mut per_token = -unclipped.minimum(&clipped);
    let clipped_active = clipped.lt_tensor(&unclipped).logical_and(&weights.gt(0.0));
    let entropy = entropy_of(&logprobs);
    if config.entropy_coef != 0.0 {
        per_token = per_token - &entropy * config.entropy_coef;
    }
    let mut kl_sum = 0.0;
    if config.kl_coef != 0.0 {
        let (ref_logprobs, _) = tch::no_grad(|| completion_logprobs(model, samples, false, false));
        let ref_lp = ref_logprobs.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
        // KL between the tempered distributions (truncation would make it infinite).
        let log_ratio = ref_lp - logprobs.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
        let k3 = log_ratio.exp() - &log_ratio - 1.0;
        kl_sum = f64::try_from((k3.detach() * &weights).sum(Kind::Double)).unwrap_or(f64::NAN);
        per_token = per_token + k3 * config.kl_coef;
    }
    let per_token = per_token * &weights;
    let loss = match config.aggregation {
        Aggregation::Token => per_token.sum(Kind::Float) / total_tokens.max(1) as f64,
        Aggregation::SequenceMean => {
            let per_sequence: Vec<f32> = samples.iter().flat_map(|s| std::iter::repeat_n(1.0 / s.loss_tokens().max(1) as f32, s.completion_ids.len())).collect();
            (per_token * Tensor::from_slice(&per_sequence).to_device(device)).sum(Kind::Float) / total_sequences.max(1) as f64
        }
    };
    // Under `no_grad` (evaluation, finite-difference checks) there is nothing to propagate.
    if loss.requires_grad() {
        loss.backward();
    }
    LossStats {
        loss: f64::try_from(loss.detach()).unwrap_or(f64::NAN),
        tokens: samples.iter().map(TrainSample::loss_tokens).sum(),
        clipped_tokens: i64::try_from(clipped_active.sum(Kind::Int64)).unwrap_or(0) as usize,
        kl_sum,
        entropies: per_sample(&entropy, samples),
        new_logprobs: per_sample(&new_lp, samples),
    }
}
