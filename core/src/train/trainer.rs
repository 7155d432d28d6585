//! One optimizer step from rewarded rollout groups: credit assignment, loss, AdamW, in place.
//!
//! groups -> (skip zero-variance groups) -> per-token advantages (the credit scheme, with the
//! planning masks) -> clipped policy loss with gradient accumulation -> gradient clipping ->
//! AdamW on the LoRA tensors inside the served model -> `policy_version += 1`. The next token
//! any engine samples from this model uses the new adapters: there is no copy to sync.
//!
//! Data-parallel replicas ([`Trainer::join`]) take every step together: each contributes the
//! groups it holds (possibly none), the loss is normalised by the tokens and sequences of all
//! replicas, and the gradients are summed with one all-reduce. Every replica then clips and
//! applies the same bits, so their adapters stay identical.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::credit::{self, CreditScheme, GroupInput};
use super::flat::FlatAdapters;
use crate::engine::constraint::Constraints;
use super::loss::{self, LossConfig, TrainSample};
use super::optimizer::{self, AdamW, OptimConfig};
use super::TrainError;
use crate::collective::ProcessGroup;
use crate::engine::sampler::SamplingParams;
use crate::model::lora::{self, LoraConfig};
use crate::model::Transformer;

/// Everything that shapes a training step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Adapters.
    pub lora: LoraConfig,
    /// Policy loss.
    pub loss: LossConfig,
    /// Optimizer and schedule.
    pub optim: OptimConfig,
    /// Credit assignment.
    pub credit: CreditScheme,
}

/// One rewarded completion of a group, with everything needed to score it exactly as it was
/// sampled: members of one group may come from different requests (client-named groups), so
/// each carries its own prompt and sampling parameters.
#[derive(Clone, Debug)]
pub struct GroupMember {
    /// The rollout's id (for reports and logs).
    pub id: String,
    /// Prompt ids as served.
    pub prompt_ids: Vec<u32>,
    /// How the completion was sampled.
    pub sampling: SamplingParams,
    /// Completion ids as served.
    pub completion_ids: Vec<u32>,
    /// Logprob of each completion token under the distribution it was drawn from (the
    /// behaviour policy: temperature, top-k and top-p applied).
    pub logprobs: Vec<f32>,
    /// Scalar reward.
    pub reward: f32,
    /// Planning-token mask over the completion tokens.
    pub planning_mask: Vec<bool>,
    /// Entropy of the sampling distribution at each completion token, as recorded when the
    /// tokens were drawn; empty when unknown (the entropy-gated scheme then measures it).
    pub entropies: Vec<f32>,
    /// Which completion tokens the model sampled (an agent episode interleaves tool results
    /// and user turns as context); empty when all were. Only sampled tokens carry loss.
    pub sampled_mask: Vec<bool>,
}

/// Completions compared with each other (GRPO's group), with their rewards.
#[derive(Clone, Debug)]
pub struct RolloutGroup {
    /// A label for reports (the request id or the client's group id).
    pub id: String,
    /// The completions.
    pub members: Vec<GroupMember>,
    /// Per-token advantages computed outside the trainer (a credit plugin); when `None` the
    /// configured scheme computes them.
    pub advantages: Option<Vec<Vec<f32>>>,
}

/// What a step did, for logs and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepReport {
    /// Optimizer steps taken so far (after this one).
    pub step: u64,
    /// Version of the weights now served.
    pub policy_version: u64,
    /// False when every group had equal rewards (no gradient, no update).
    pub updated: bool,
    /// Groups offered.
    pub groups: usize,
    /// Groups skipped for equal rewards.
    pub zero_variance_groups: usize,
    /// Groups refused on their own (invalid shapes, non-finite advantages, greedy members);
    /// the rest of the step trains without them.
    pub rejected_groups: Vec<RejectedGroup>,
    /// Ids of the groups whose tokens carried gradient in this step.
    pub trained_groups: Vec<String>,
    /// Mean reward over all offered completions.
    pub reward_mean: f64,
    /// Mean completion length in tokens.
    pub response_length: f64,
    /// Batch loss.
    pub loss: f64,
    /// Share of tokens where the clipped objective was active.
    pub clip_fraction: f64,
    /// Mean k3 KL to the base policy per token (0 without `kl_coef`).
    pub kl: f64,
    /// Mean of |ratio - 1| over the trained tokens, with ratio = exp(trainer logprob - sampler
    /// logprob) before the update: how far the trained policy is from the one that sampled. 0 up
    /// to rounding for rollouts of the current version; larger for stale ones, or when the
    /// sampler's arithmetic differs from the trainer's (bf16 kernels, batch shapes).
    pub ratio_deviation_mean: f64,
    /// The largest |ratio - 1| of the step.
    pub ratio_deviation_max: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Share of trained tokens that are planning tokens.
    pub planning_share: f64,
    /// Mean token entropy over planning tokens (NaN when there are none).
    pub entropy_planning: f64,
    /// Mean token entropy over execution tokens.
    pub entropy_execution: f64,
    /// Tokens trained on.
    pub tokens: usize,
    /// With data-parallel replicas, the CRC-32 of the adapters after the step
    /// ([`Trainer::adapter_hash`]): every replica reports the same value for the same step.
    /// 0 for a single process.
    pub adapter_hash: u32,
    /// Wall time of the step.
    pub step_seconds: f64,
    /// Of which in collectives with the other replicas (waiting for them included); 0 alone.
    pub collective_seconds: f64,
    /// Trained tokens per second.
    pub tokens_per_s: f64,
    /// Per trained member (by id), its per-token advantages (for rollout logs, not replies).
    #[serde(skip)]
    pub advantages: Vec<(String, Vec<f32>)>,
}

/// A group's training samples and each member's per-token advantages.
type GroupSamples = (Vec<TrainSample>, Vec<Vec<f32>>);

/// A group a step refused, and why.
#[derive(Clone, Debug, Serialize)]
pub struct RejectedGroup {
    /// The group's id.
    pub group: String,
    /// What was wrong with it.
    pub reason: String,
}

/// Checks advantages given from outside against the group's shape.
fn precomputed(given: &[Vec<f32>], rewards: &[f32], planning: &[Vec<bool>]) -> Result<credit::GroupAdvantages, TrainError> {
    if given.len() != planning.len() {
        return Err(TrainError::InvalidSample { index: 0, reason: format!("{} advantage rows for {} responses", given.len(), planning.len()) });
    }
    for (i, (row, mask)) in given.iter().zip(planning).enumerate() {
        if row.len() != mask.len() || row.iter().any(|a| !a.is_finite()) {
            return Err(TrainError::InvalidSample { index: i, reason: format!("{} advantages for {} tokens or a non-finite value", row.len(), mask.len()) });
        }
    }
    Ok(credit::GroupAdvantages {
        per_token: given.to_vec(),
        sequence: given.iter().map(|row| row.first().copied().unwrap_or(0.0)).collect(),
        zero_variance: rewards.windows(2).all(|w| w[0] == w[1]),
    })
}

/// Each row restricted to the tokens its mask marks sampled (an empty mask keeps the row).
fn only_sampled<T: Copy>(rows: &[Vec<T>], masks: &[&[bool]]) -> Vec<Vec<T>> {
    rows.iter()
        .zip(masks)
        .map(|(row, mask)| if mask.is_empty() { row.clone() } else { row.iter().zip(mask.iter()).filter(|(_, &s)| s).map(|(v, _)| *v).collect() })
        .collect()
}

/// The inverse of [`only_sampled`] for one row: values back at the sampled positions of a
/// completion of `len` tokens, 0 on context.
fn spread_over(values: Vec<f32>, mask: &[bool], len: usize) -> Vec<f32> {
    if mask.is_empty() {
        return values;
    }
    let mut values = values.into_iter();
    (0..len).map(|i| if mask.get(i).copied().unwrap_or(false) { values.next().unwrap_or(0.0) } else { 0.0 }).collect()
}

/// Mean and largest |exp(new - old) - 1| over the tokens that carry loss.
fn ratio_deviation(samples: &[TrainSample], new_logprobs: &[Vec<f32>]) -> (f64, f64) {
    let (mut sum, mut max, mut count) = (0.0f64, 0.0f64, 0usize);
    for (sample, new) in samples.iter().zip(new_logprobs) {
        for (i, (old, new)) in sample.old_logprobs.iter().zip(new).enumerate() {
            if sample.carries_loss(i) {
                let deviation = ((*new as f64 - *old as f64).exp() - 1.0).abs();
                sum += deviation;
                max = max.max(deviation);
                count += 1;
            }
        }
    }
    (sum / count.max(1) as f64, max)
}

/// Adapter tensors, optimizer state and the policy version of one served model.
pub struct Trainer {
    config: TrainerConfig,
    /// The adapters under PEFT names; their storage lives in `flat`.
    params: Vec<(String, Tensor)>,
    flat: FlatAdapters,
    optimizer: AdamW,
    policy_version: u64,
    /// The replicas this trainer steps with; `None` for a single process.
    group: Option<Arc<ProcessGroup>>,
    /// Compiles the constraints of constrained rollouts, to train them under their masks.
    constraints: Option<Arc<Constraints>>,
}

impl Trainer {
    /// Attaches fresh LoRA adapters to `model` and prepares the optimizer.
    pub fn new(model: &mut Transformer, config: TrainerConfig) -> Result<Self, TrainError> {
        lora::attach(model, &config.lora)?;
        Self::over(lora::parameters(model), config)
    }

    /// A trainer over `params`, whose storage moves into one flat buffer.
    fn over(params: Vec<(String, Tensor)>, config: TrainerConfig) -> Result<Self, TrainError> {
        if config.loss.activation_checkpointing && config.lora.dropout > 0.0 {
            // Recomputing a layer would draw new dropout masks: gradients of another network.
            return Err(TrainError::Model(crate::model::ModelError::InvalidConfig(format!(
                "loss.activation_checkpointing needs lora.dropout = 0 (it is {})",
                config.lora.dropout
            ))));
        }
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let flat = FlatAdapters::adopt(&tensors)?;
        let optimizer = AdamW::new(config.optim.clone(), flat.values());
        Ok(Self { config, params, flat, optimizer, policy_version: 0, group: None, constraints: None })
    }

    /// Lets the trainer replay constrained rollouts' grammars (`constraints` is built for the
    /// served model's tokenizer); without it such rollouts are refused as invalid samples.
    pub fn set_constraints(&mut self, constraints: Arc<Constraints>) {
        self.constraints = Some(constraints);
    }

    /// Steps together with the replicas of `group` from now on. Rank 0's adapters, optimizer
    /// moments, step count and policy version are first copied to every replica (a resumed
    /// rank 0 thus resumes them all). Every replica must call this at the same point.
    pub fn join(&mut self, group: Arc<ProcessGroup>) -> Result<(), TrainError> {
        // Every replica must hold the same adapters (model, rank, targets): compared first,
        // so that a mismatch fails clearly everywhere instead of copying garbage.
        let size = self.flat.values().numel() as i64;
        let rank0_size = group.broadcast_values(&[size], 0)?[0];
        let mismatches = group.sum_values(&[i64::from(rank0_size != size)])?[0];
        if mismatches != 0 {
            return Err(TrainError::Model(crate::model::ModelError::InvalidConfig(format!(
                "the replicas' adapters differ in size (this one {size} values, rank 0's {rank0_size}): every replica needs the same model and LoRA settings"
            ))));
        }
        let (m, v) = self.optimizer.moments();
        for tensor in [self.flat.values(), m, v] {
            group.broadcast(&mut tensor.shallow_clone(), 0)?;
        }
        let counters = group.broadcast_values(&[self.optimizer.step as i64, self.policy_version as i64], 0)?;
        self.optimizer.step = counters[0] as u64;
        self.policy_version = counters[1] as u64;
        self.group = Some(group);
        Ok(())
    }

    /// The replicas this trainer steps with, if any.
    pub fn group(&self) -> Option<&Arc<ProcessGroup>> {
        self.group.as_ref()
    }

    /// A CRC-32 of the adapters' bytes: equal on every replica after every step.
    pub fn adapter_hash(&self) -> u32 {
        let values = self.flat.values().to_device(tch::Device::Cpu).to_kind(tch::Kind::Float);
        let floats = Vec::<f32>::try_from(&values.reshape([-1])).unwrap_or_default();
        let mut hasher = crc32fast::Hasher::new();
        let mut bytes = Vec::with_capacity(4 * 4096);
        for chunk in floats.chunks(4096) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|value| value.to_le_bytes()));
            hasher.update(&bytes);
        }
        hasher.finalize()
    }

    /// Trains the adapters already attached to `model` (a PEFT adapter loaded with
    /// [`lora::load_peft`], whose shape is `lora`) with a fresh optimizer, at policy version 0.
    /// The adapter's rank, alpha and targets replace `config.lora`'s; dropout and seed stay.
    pub fn from_attached(model: &mut Transformer, lora: LoraConfig, config: TrainerConfig) -> Result<Self, TrainError> {
        let config = TrainerConfig { lora: LoraConfig { dropout: config.lora.dropout, seed: config.lora.seed, ..lora }, ..config };
        let params = lora::parameters(model);
        if params.is_empty() {
            return Err(TrainError::Model(crate::model::ModelError::InvalidConfig("the model has no LoRA adapters to train".into())));
        }
        Self::over(params, config)
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Version of the weights being served (0 before any step).
    pub fn policy_version(&self) -> u64 {
        self.policy_version
    }

    /// Adapter tensors under PEFT names (sharing storage with the model).
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The optimizer (its moments and step count go into checkpoints).
    pub fn optimizer(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// Clears the adapters' gradients (a step leaves them cleared; a loss computed outside a
    /// step leaves them to the caller).
    pub fn zero_grad(&self) {
        self.flat.zero_grad();
    }

    /// The optimizer's first and second moments of each adapter tensor, in [`Self::parameters`]
    /// order: views of the flat moments, so copying into them restores the optimizer.
    pub fn moments(&self) -> Vec<(Tensor, Tensor)> {
        let (m, v) = self.optimizer.moments();
        self.flat.split(m).into_iter().zip(self.flat.split(v)).collect()
    }

    /// Restores the policy version from a checkpoint.
    pub fn set_policy_version(&mut self, version: u64) {
        self.policy_version = version;
    }

    /// One group's training samples and per-member advantages, `None` for a zero-variance
    /// group, or why the group cannot be trained on.
    fn group_samples(&self, model: &Transformer, group: &RolloutGroup) -> Result<Option<GroupSamples>, TrainError> {
        let rewards: Vec<f32> = group.members.iter().map(|m| m.reward).collect();
        if let Some(r) = rewards.iter().find(|r| !r.is_finite()) {
            return Err(TrainError::InvalidSample { index: 0, reason: format!("reward {r} is not finite") });
        }
        let planning: Vec<Vec<bool>> = group.members.iter().map(|m| m.planning_mask.clone()).collect();
        let to_sample = |m: &GroupMember, advantages: Vec<f32>| TrainSample {
            prompt_ids: m.prompt_ids.clone(),
            completion_ids: m.completion_ids.clone(),
            old_logprobs: m.logprobs.clone(),
            advantages,
            sampling: m.sampling.clone(),
            sampled_mask: m.sampled_mask.clone(),
        };
        let probe: Vec<TrainSample> = group.members.iter().map(|m| to_sample(m, vec![0.0; m.completion_ids.len()])).collect();
        loss::validate(&probe, model.config().vocab_size, model.max_positions(), self.constraints.as_deref())?;
        let recorded = group.members.iter().all(|m| m.entropies.len() == m.completion_ids.len());
        let entropies = match self.config.credit {
            CreditScheme::EntropyGated { .. } if group.advantages.is_none() && recorded => Some(group.members.iter().map(|m| m.entropies.clone()).collect()),
            // Not recorded at sampling time: measure them with a no-grad pass.
            CreditScheme::EntropyGated { .. } if group.advantages.is_none() => Some(loss::token_entropies(model, &probe, self.config.loss.micro_batch)),
            _ => None,
        };
        let advantages = match &group.advantages {
            Some(given) => precomputed(given, &rewards, &planning)?,
            None => {
                // The schemes see the model's tokens only: an episode's context would count in
                // lengths and entropy quantiles. Their advantages are spread back, 0 on context.
                let sampled: Vec<&[bool]> = group.members.iter().map(|m| m.sampled_mask.as_slice()).collect();
                let planning = only_sampled(&planning, &sampled);
                let entropies = entropies.map(|rows| only_sampled(&rows, &sampled));
                let mut advantages = credit::assign(&self.config.credit, &GroupInput { rewards: &rewards, planning_masks: &planning, entropies: entropies.as_deref() })?;
                advantages.per_token = advantages.per_token.into_iter().zip(&sampled).zip(&group.members).map(|((row, mask), m)| spread_over(row, mask, m.completion_ids.len())).collect();
                advantages
            }
        };
        if advantages.zero_variance {
            return Ok(None);
        }
        if advantages.per_token.iter().flatten().any(|a| !a.is_finite()) {
            return Err(TrainError::NonFinite("advantages".into()));
        }
        let samples = group.members.iter().zip(&advantages.per_token).map(|(m, a)| to_sample(m, a.clone())).collect();
        Ok(Some((samples, advantages.per_token)))
    }

    /// Trains on `groups`: one optimizer step unless every group has equal rewards. A group
    /// that is invalid on its own is refused and reported; the others still train.
    pub fn step(&mut self, model: &Transformer, groups: &[RolloutGroup]) -> Result<StepReport, TrainError> {
        let result = self.train_on(model, groups);
        // The step's activations (GBs for long sequences) are freed by now; hand their pages
        // back, so a serving process does not keep the high-water mark of its largest step.
        crate::memory::release_free_memory();
        result
    }

    fn train_on(&mut self, model: &Transformer, groups: &[RolloutGroup]) -> Result<StepReport, TrainError> {
        let started = Instant::now();
        let mut report = StepReport { groups: groups.len(), ..StepReport::default() };
        let mut samples = Vec::new();
        let mut masks = Vec::new();
        let (mut reward_sum, mut members, mut length_sum) = (0.0f64, 0usize, 0usize);
        for group in groups {
            reward_sum += group.members.iter().map(|m| m.reward as f64).sum::<f64>();
            members += group.members.len();
            length_sum += group.members.iter().map(|m| m.completion_ids.len()).sum::<usize>();
            match self.group_samples(model, group) {
                Ok(None) => report.zero_variance_groups += 1,
                Ok(Some((group_samples, advantages))) => {
                    // Context tokens of an episode count as neither planning nor execution.
                    masks.extend(group.members.iter().map(|m| m.planning_mask.iter().enumerate().map(|(i, &p)| (p, m.sampled_mask.get(i).copied().unwrap_or(true))).collect::<Vec<_>>()));
                    samples.extend(group_samples);
                    report.trained_groups.push(group.id.clone());
                    report.advantages.extend(group.members.iter().map(|m| m.id.clone()).zip(advantages));
                }
                Err(err) => {
                    tracing::warn!(group = %group.id, %err, "group refused; the step trains without it");
                    report.rejected_groups.push(RejectedGroup { group: group.id.clone(), reason: err.to_string() });
                }
            }
        }
        report.reward_mean = if members > 0 { reward_sum / members as f64 } else { 0.0 };
        report.response_length = if members > 0 { length_sum as f64 / members as f64 } else { 0.0 };
        report.step = self.optimizer.step;
        report.policy_version = self.policy_version;
        let local_tokens: usize = samples.iter().map(TrainSample::loss_tokens).sum();
        let collective_started = Instant::now();
        let (total_tokens, total_sequences) = self.global_counts(local_tokens, samples.len())?;
        report.collective_seconds = collective_started.elapsed().as_secs_f64();
        if total_sequences == 0 {
            report.step_seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        self.flat.zero_grad();
        let mut stats = if samples.is_empty() { loss::LossStats::default() } else { loss::accumulate(model, &samples, &self.config.loss, self.constraints.as_deref(), total_tokens, total_sequences) };
        let collective_started = Instant::now();
        if let Err(err) = self.sum_over_replicas(&mut stats) {
            self.flat.zero_grad();
            return Err(err);
        }
        report.collective_seconds += collective_started.elapsed().as_secs_f64();
        if !stats.loss.is_finite() {
            self.flat.zero_grad();
            return Err(TrainError::NonFinite(format!("loss {}", stats.loss)));
        }
        (report.ratio_deviation_mean, report.ratio_deviation_max) = ratio_deviation(&samples, &stats.new_logprobs);
        report.grad_norm = optimizer::clip_grad_norm(self.flat.grads(), self.config.optim.max_grad_norm);
        if !report.grad_norm.is_finite() {
            self.flat.zero_grad();
            return Err(TrainError::NonFinite(format!("gradient norm {}", report.grad_norm)));
        }
        report.lr = self.optimizer.apply(self.flat.values(), self.flat.grads());
        self.flat.zero_grad();
        self.policy_version += 1;

        let (mut planning_h, mut planning_n, mut exec_h, mut exec_n) = (0.0f64, 0usize, 0.0f64, 0usize);
        for (entropies, mask) in stats.entropies.iter().zip(&masks) {
            for (h, &(is_planning, sampled)) in entropies.iter().zip(mask) {
                if !sampled {
                    continue;
                }
                if is_planning {
                    planning_h += *h as f64;
                    planning_n += 1;
                } else {
                    exec_h += *h as f64;
                    exec_n += 1;
                }
            }
        }
        report.updated = true;
        if self.group.is_some() {
            report.adapter_hash = self.adapter_hash();
        }
        report.step = self.optimizer.step;
        report.policy_version = self.policy_version;
        report.loss = stats.loss;
        report.tokens = stats.tokens;
        report.clip_fraction = stats.clipped_tokens as f64 / stats.tokens.max(1) as f64;
        report.kl = stats.kl_sum / stats.tokens.max(1) as f64;
        report.planning_share = planning_n as f64 / (planning_n + exec_n).max(1) as f64;
        report.entropy_planning = if planning_n > 0 { planning_h / planning_n as f64 } else { f64::NAN };
        report.entropy_execution = if exec_n > 0 { exec_h / exec_n as f64 } else { f64::NAN };
        report.step_seconds = started.elapsed().as_secs_f64();
        report.tokens_per_s = stats.tokens as f64 / report.step_seconds.max(1e-9);
        Ok(report)
    }

    /// The step's loss tokens and sequences over every replica (this process's alone without
    /// a group). Every replica calls it once per step, whatever it holds: it is also how they
    /// agree on whether the step happens.
    fn global_counts(&self, tokens: usize, sequences: usize) -> Result<(usize, usize), TrainError> {
        let Some(group) = &self.group else { return Ok((tokens, sequences)) };
        let counts = group.sum_values(&[tokens as i64, sequences as i64])?;
        Ok((counts[0] as usize, counts[1] as usize))
    }

    /// Sums the adapters' gradients and the loss statistics over the replicas. A replica whose
    /// own loss is not finite sends NaN gradients, so that every replica discards the step.
    fn sum_over_replicas(&self, stats: &mut loss::LossStats) -> Result<(), TrainError> {
        let Some(group) = &self.group else { return Ok(()) };
        if !stats.loss.is_finite() {
            let _ = self.flat.grads().shallow_clone().fill_(f64::NAN);
        }
        group.all_reduce_sum(&mut self.flat.grads().shallow_clone())?;
        let totals = group.sum_values(&[stats.loss, stats.tokens as f64, stats.clipped_tokens as f64, stats.kl_sum])?;
        stats.loss = totals[0];
        stats.tokens = totals[1] as usize;
        stats.clipped_tokens = totals[2] as usize;
        stats.kl_sum = totals[3];
        Ok(())
    }
}
