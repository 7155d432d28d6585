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
//! Logit bias, penalties and constraints are part of that distribution too: the trainer
//! replays each rollout's [`LogitState`] over its tokens (a constraint's grammar included) and
//! applies the same edits before temperature, so a constrained rollout's ratio is 1 as well.
//! Entropies and the KL term use the model's tempered distribution before any edit.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::TrainError;
use crate::engine::constraint::Constraints;
use crate::engine::logits::{EditsBuilder, LogitEdits, LogitState};
use crate::engine::sampler::{SamplingParams, Truncation};
use crate::engine::score::PaddedPairs;
use crate::model::transformer::CheckpointedPass;
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
    /// Token positions whose logits are computed at once; 0 picks as many as fit 64 MiB of
    /// f32 logits. Results do not depend on it, only peak memory does.
    pub logit_chunk_rows: usize,
    /// Keep only each layer's input during the forward pass and recompute the layer's
    /// activations in the backward pass: far less memory for long sequences, for one more
    /// forward pass of compute. Results do not depend on it. Incompatible with LoRA dropout.
    pub activation_checkpointing: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { clip_low: 0.2, clip_high: 0.28, kl_coef: 0.0, entropy_coef: 0.0, aggregation: Aggregation::Token, micro_batch: 4, logit_chunk_rows: 0, activation_checkpointing: false }
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
    /// A generation as it was sampled (its tokens and their behaviour logprobs) under
    /// `sampling`, every token with `advantage`.
    pub fn from_generation(prompt_ids: &[u32], generation: &crate::engine::Generation, sampling: &SamplingParams, advantage: f32) -> Self {
        Self {
            prompt_ids: prompt_ids.to_vec(),
            completion_ids: generation.tokens.iter().map(|t| t.id).collect(),
            old_logprobs: generation.tokens.iter().map(|t| t.sampling_logprob).collect(),
            advantages: vec![advantage; generation.tokens.len()],
            sampling: sampling.clone(),
            sampled_mask: Vec::new(),
        }
    }

    /// Whether completion token `i` carries loss (was sampled, not episode context).
    pub fn carries_loss(&self, i: usize) -> bool {
        self.sampled_mask.get(i).copied().unwrap_or(true)
    }

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
        (0..self.completion_ids.len()).map(|i| if self.carries_loss(i) { 1.0 } else { 0.0 })
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

/// Checks that every sample's vectors have the completion's length, and that a constrained
/// sample's tokens follow its constraint (`constraints` compiles them).
pub fn validate(samples: &[TrainSample], vocab_size: usize, max_positions: usize, constraints: Option<&Constraints>) -> Result<(), TrainError> {
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
        s.sampling.check_ranges().map_err(|e| TrainError::InvalidSample { index: i, reason: e.message })?;
        if s.sampling.edits_logits() {
            let mut replay = BehaviourReplay::new(std::slice::from_ref(s), constraints);
            replay.follow(n).map_err(|e| TrainError::InvalidSample { index: i, reason: format!("its tokens do not replay under its sampling: {e}") })?;
        }
    }
    Ok(())
}

/// Rebuilds, row by row (completion tokens of the samples in order), the logit edits each
/// token was sampled under: the sampler's [`LogitState`] replayed from the start of each span
/// the model sampled (one per turn of an episode; context tokens get none).
struct BehaviourReplay<'a> {
    samples: &'a [TrainSample],
    constraints: Option<&'a Constraints>,
    sample: usize,
    token: usize,
    state: Option<LogitState>,
}

impl<'a> BehaviourReplay<'a> {
    fn new(samples: &'a [TrainSample], constraints: Option<&'a Constraints>) -> Self {
        Self { samples, constraints, sample: 0, token: 0, state: None }
    }

    /// The edits of the next `rows` rows.
    fn next_rows(&mut self, rows: usize, vocab: usize, device: tch::Device) -> Result<Option<LogitEdits>, crate::engine::constraint::ConstraintError> {
        let mut builder = EditsBuilder::new(rows);
        self.walk(rows, Some(&mut builder))?;
        Ok(builder.build(vocab, device))
    }

    /// Follows `rows` rows without building edits (checks that the tokens replay).
    fn follow(&mut self, rows: usize) -> Result<(), crate::engine::constraint::ConstraintError> {
        self.walk(rows, None)
    }

    fn walk(&mut self, rows: usize, mut builder: Option<&mut EditsBuilder>) -> Result<(), crate::engine::constraint::ConstraintError> {
        for row in 0..rows {
            while self.samples.get(self.sample).is_some_and(|s| self.token >= s.completion_ids.len()) {
                self.sample += 1;
                self.token = 0;
                self.state = None;
            }
            let Some(s) = self.samples.get(self.sample) else { return Ok(()) };
            let t = self.token;
            self.token += 1;
            if !(s.sampling.edits_logits() && s.carries_loss(t)) {
                self.state = None;
                continue;
            }
            if self.state.is_none() {
                let context: Vec<u32> = s.prompt_ids.iter().chain(&s.completion_ids[..t]).copied().collect();
                self.state = LogitState::new(&s.sampling, &context, self.constraints)?;
            }
            if let Some(state) = &mut self.state {
                if let Some(builder) = builder.as_deref_mut() {
                    state.write_row(row, &s.sampling, builder);
                }
                state.push(&s.sampling, s.completion_ids[t])?;
            }
        }
        Ok(())
    }
}

/// Runs forward and backward over `samples` in micro-batches, accumulating gradients into the
/// adapters. Losses are divided so that the gradients of all calls of one optimizer step add up
/// to the gradient of the batch loss: `total_tokens` and `total_sequences` describe that batch.
///
/// Samples whose sampling edited logits (bias, penalties, constraint) are trained under the
/// same edits; a constraint needs `constraints`, and [`validate`] has checked their replay.
pub fn accumulate(model: &Transformer, samples: &[TrainSample], config: &LossConfig, constraints: Option<&Constraints>, total_tokens: usize, total_sequences: usize) -> LossStats {
    let mut stats = LossStats::default();
    for chunk in samples.chunks(config.micro_batch.max(1)) {
        stats.merge(micro_batch(model, chunk, config, constraints, total_tokens, total_sequences));
    }
    stats
}

/// Rows of logits computed at once: bounds each `(rows, vocab)` f32 temporary to 64 MiB,
/// however long the sequences (a full `tokens x vocab` tensor would be GBs at 8 x 1024 tokens
/// and a 152k vocabulary).
const CHUNK_ELEMENTS: i64 = 1 << 24;

/// The chunks' rows back in one tensor (empty when there were none).
fn cat_or_empty(parts: &[Tensor]) -> Tensor {
    if parts.is_empty() {
        return Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
    }
    Tensor::cat(parts, 0)
}

/// Rows per chunk: `configured`, or as many as fit [`CHUNK_ELEMENTS`] for a vocabulary of `vocab`.
fn chunk_rows(configured: usize, vocab: i64) -> i64 {
    match configured {
        0 => (CHUNK_ELEMENTS / vocab.max(1)).max(1),
        rows => rows as i64,
    }
}

/// The final hidden state predicting each completion token `(tokens, hidden)`, the completion
/// tokens `(tokens,)`, and each token's inverse logprob temperature `(tokens,)`.
fn completion_hidden(model: &Transformer, samples: &[TrainSample], use_lora: bool, training: bool) -> (Tensor, Tensor, Tensor) {
    let (hidden, targets, inv_t, _) = completion_pass(model, samples, use_lora, training, false);
    (hidden, targets, inv_t)
}

/// [`completion_hidden`], optionally with activation checkpointing: then the pass to finish
/// with [`Transformer::backward_checkpointed`] comes along.
fn completion_pass(model: &Transformer, samples: &[TrainSample], use_lora: bool, training: bool, checkpointed: bool) -> (Tensor, Tensor, Tensor, Option<CheckpointedPass>) {
    let device = model.device();
    let pairs: Vec<(&[u32], &[u32])> = samples.iter().map(|s| (s.prompt_ids.as_slice(), s.completion_ids.as_slice())).collect();
    let batch = PaddedPairs::new(&pairs, device);
    let inv_t: Vec<f32> = samples
        .iter()
        .flat_map(|s| std::iter::repeat_n((1.0 / s.sampling.logprob_temperature()) as f32, s.completion_ids.len()))
        .collect();
    let input = ForwardInput { tokens: &batch.tokens, positions: &batch.positions, use_lora, training };
    let (hidden, pass) = if checkpointed {
        let pass = model.forward_checkpointed(&input);
        (batch.predicting(pass.hidden()), Some(pass))
    } else {
        (batch.predicting(&model.forward_hidden(&input, None)), None)
    };
    (hidden, batch.targets, Tensor::from_slice(&inv_t).to_device(device), pass)
}

/// Float32 tempered scores `logits / T` of rows `start..start + len`.
fn chunk_scores(model: &Transformer, hidden: &Tensor, inv_t: &Tensor, start: i64, len: i64) -> Tensor {
    model.logits(&hidden.narrow(0, start, len)) * inv_t.narrow(0, start, len).unsqueeze(1)
}

/// `(rows,)` logprob of each target under its row's own sampling distribution: the tempered
/// scores cut to the row's top-k / top-p set (recomputed from these scores, the target always
/// kept), renormalised. Equal to `tempered` gathered when nothing is truncated.
fn policy_logprobs(scores: &Tensor, tempered: &Tensor, row_params: &[&SamplingParams], targets: &Tensor) -> Tensor {
    let targets = targets.unsqueeze(1);
    let vocab = scores.size()[1] as usize;
    let Some(truncation) = Truncation::new(row_params, vocab, scores.device()) else {
        return tempered.gather(1, &targets, false).squeeze_dim(1);
    };
    let outside = truncation.outside(scores).scatter_value(1, &targets, 0);
    scores.masked_fill(&outside, f64::NEG_INFINITY).log_softmax(-1, Kind::Float).gather(1, &targets, false).squeeze_dim(1)
}

/// Per-token entropy (nats) of the served policy over each sample's completion, without
/// gradients: what entropy-gated credit assignment needs before the loss exists.
pub fn token_entropies(model: &Transformer, samples: &[TrainSample], micro_batch: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(micro_batch.max(1)) {
        let entropies = tch::no_grad(|| {
            let (hidden, _, inv_t) = completion_hidden(model, chunk, true, false);
            let rows = hidden.size()[0];
            let step = chunk_rows(0, model.config().vocab_size as i64);
            let parts: Vec<Tensor> = (0..rows).step_by(step as usize).map(|start| entropy_of(&chunk_scores(model, &hidden, &inv_t, start, step.min(rows - start)).log_softmax(-1, Kind::Float))).collect();
            Tensor::cat(&parts, 0)
        });
        out.extend(per_sample(&entropies, chunk));
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

fn micro_batch(model: &Transformer, samples: &[TrainSample], config: &LossConfig, constraints: Option<&Constraints>, total_tokens: usize, total_sequences: usize) -> LossStats {
    let device = model.device();
    let (hidden, targets, inv_t, checkpointed) = completion_pass(model, samples, true, true, config.activation_checkpointing);
    // The reference policy (the base model) for KL, without gradients.
    let reference = (config.kl_coef != 0.0).then(|| tch::no_grad(|| completion_hidden(model, samples, false, false).0));
    // The logits are computed chunk by chunk from a detached copy of the hidden states: each
    // chunk's loss backpropagates into `detached.grad()`, and one backward pass through the
    // decoder follows. No `tokens x vocab` tensor ever exists whole.
    let detached = hidden.detach().set_requires_grad(hidden.requires_grad());
    let flat = |f: &dyn Fn(&TrainSample) -> &Vec<f32>| Tensor::from_slice(&samples.iter().flat_map(|s| f(s).iter().copied()).collect::<Vec<f32>>()).to_device(device);
    let old_lp = flat(&|s| &s.old_logprobs);
    let adv = flat(&|s| &s.advantages);
    // Context tokens of an episode (weight 0) were not sampled: no ratio, no loss, not counted.
    let weights = Tensor::from_slice(&samples.iter().flat_map(TrainSample::loss_weights).collect::<Vec<f32>>()).to_device(device);
    let (scale, normaliser) = match config.aggregation {
        Aggregation::Token => (Tensor::ones([targets.size()[0]], (Kind::Float, device)), total_tokens.max(1) as f64),
        Aggregation::SequenceMean => {
            let per_sequence: Vec<f32> = samples.iter().flat_map(|s| std::iter::repeat_n(1.0 / s.loss_tokens().max(1) as f32, s.completion_ids.len())).collect();
            (Tensor::from_slice(&per_sequence).to_device(device), total_sequences.max(1) as f64)
        }
    };
    let row_params: Vec<&SamplingParams> = samples.iter().flat_map(|s| std::iter::repeat_n(&s.sampling, s.completion_ids.len())).collect();
    let mut replay = samples.iter().any(|s| s.sampling.edits_logits()).then(|| BehaviourReplay::new(samples, constraints));
    let vocab = model.config().vocab_size;
    let rows = targets.size()[0];
    let step = chunk_rows(config.logit_chunk_rows, model.config().vocab_size as i64);
    let (mut loss, mut clipped_tokens, mut kl_sum) = (0.0f64, 0usize, 0.0f64);
    let (mut entropy_parts, mut logprob_parts) = (Vec::new(), Vec::new());
    for start in (0..rows).step_by(step as usize) {
        let len = step.min(rows - start);
        let range = |t: &Tensor| t.narrow(0, start, len);
        let logits = model.logits(&detached.narrow(0, start, len));
        let chunk_inv_t = inv_t.narrow(0, start, len).unsqueeze(1);
        let scores = &logits * &chunk_inv_t;
        let logprobs = scores.log_softmax(-1, Kind::Float);
        let targets = range(&targets);
        // The distribution each token was drawn from: the model's, edited as when sampled.
        let edits = match replay.as_mut().map(|r| r.next_rows(len as usize, vocab, device)) {
            Some(Ok(edits)) => edits,
            Some(Err(err)) => {
                tracing::warn!(%err, "replaying the sampling of a rollout failed after validation; training the rest of this micro-batch without its edits");
                replay = None;
                None
            }
            None => None,
        };
        let (behaviour, behaviour_lp) = match edits {
            Some(mut edits) => {
                edits.allow_targets(&targets);
                let behaviour = edits.apply(&logits) * &chunk_inv_t;
                let lp = behaviour.log_softmax(-1, Kind::Float);
                (behaviour, lp)
            }
            None => (scores.shallow_clone(), logprobs.shallow_clone()),
        };
        let new_lp = policy_logprobs(&behaviour, &behaviour_lp, &row_params[start as usize..(start + len) as usize], &targets);
        let ratio = (&new_lp - range(&old_lp)).exp();
        let unclipped = &ratio * range(&adv);
        let clipped = ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high) * range(&adv);
        let mut per_token = -unclipped.minimum(&clipped);
        let chunk_weights = range(&weights);
        clipped_tokens += i64::try_from(clipped.lt_tensor(&unclipped).logical_and(&chunk_weights.gt(0.0)).sum(Kind::Int64)).unwrap_or(0) as usize;
        // With an entropy bonus the entropy carries gradient; otherwise it is only reported.
        let entropy = if config.entropy_coef != 0.0 { entropy_of(&logprobs) } else { tch::no_grad(|| entropy_of(&logprobs.detach())) };
        if config.entropy_coef != 0.0 {
            per_token = per_token - &entropy * config.entropy_coef;
        }
        if let Some(reference) = &reference {
            let ref_lp = tch::no_grad(|| chunk_scores(model, reference, &inv_t, start, len).log_softmax(-1, Kind::Float).gather(1, &targets.unsqueeze(1), false).squeeze_dim(1));
            // KL between the tempered distributions (truncation would make it infinite).
            let log_ratio = ref_lp - logprobs.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
            let k3 = log_ratio.exp() - &log_ratio - 1.0;
            kl_sum += f64::try_from((k3.detach() * &chunk_weights).sum(Kind::Double)).unwrap_or(f64::NAN);
            per_token = per_token + k3 * config.kl_coef;
        }
        let chunk_loss = (per_token * &chunk_weights * range(&scale)).sum(Kind::Float) / normaliser;
        loss += f64::try_from(chunk_loss.detach()).unwrap_or(f64::NAN);
        // Under `no_grad` (evaluation, finite-difference checks) there is nothing to propagate.
        if chunk_loss.requires_grad() {
            chunk_loss.backward();
        }
        entropy_parts.push(entropy.detach());
        logprob_parts.push(new_lp.detach());
    }
    let grad = detached.grad();
    if hidden.requires_grad() && grad.defined() {
        // d(sum(hidden * g))/d(hidden) = g: the chunks' gradient enters the decoder in one pass
        // (with checkpointing, it stops at the last layer's output, and the layers follow).
        (&hidden * grad.detach()).sum(Kind::Float).backward();
        if let Some(pass) = checkpointed {
            model.backward_checkpointed(pass);
        }
    }
    LossStats {
        loss,
        tokens: samples.iter().map(TrainSample::loss_tokens).sum(),
        clipped_tokens,
        kl_sum,
        entropies: per_sample(&cat_or_empty(&entropy_parts), samples),
        new_logprobs: per_sample(&cat_or_empty(&logprob_parts), samples),
    }
}
