//! Detector and credit plugins inside a training step, shared by online (server) and offline
//! (`hicra train`) training: planning masks from a detector plugin (or the built-in
//! Strategic-Gram list) and per-token advantages from a credit plugin (or the trainer's
//! configured scheme).
//!
//! Failures never become numbers: an item the detector fails is left out of its group, and a
//! group the credit plugin fails is dropped. Both are counted in [`StepPluginReport`].

use std::time::Duration;

use abi_stable::std_types::{RVec, Tuple2};
use hicra_sdk::{CreditEpisodes, CreditGroup, DetectItem};

use super::Plugin;
use crate::engine::SamplingParams;
use crate::train::planning::{spans_from_pieces, StrategicGrams};
use crate::train::trainer::{GroupMember, RolloutGroup};

/// The plugins a step uses; `None` means the built-in.
#[derive(Debug, Clone)]
pub struct StepPlugins {
    /// Marks planning tokens instead of the built-in Strategic-Gram list.
    pub detector: Option<Plugin>,
    /// Computes advantages instead of the trainer's credit scheme.
    pub credit: Option<Plugin>,
    /// Per-call time-out.
    pub timeout: Duration,
}

/// What the plugins did in one step.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepPluginReport {
    /// Name of the detector used.
    pub sg_detector: String,
    /// Name of the credit scheme used (`trainer` for the configured built-in).
    pub credit: String,
    /// Completions the detector failed, left out of training.
    pub masked_items: usize,
    /// Groups left out: the credit plugin failed them, or fewer than 2 members remained.
    pub dropped_groups: usize,
}

/// A completion as the step sees it: what each token added to the text, plus what the
/// trainer needs.
#[derive(Debug, Clone)]
pub struct ScoredCompletion {
    /// The rollout's id.
    pub id: String,
    /// Prompt ids as served.
    pub prompt_ids: Vec<u32>,
    /// How it was sampled.
    pub sampling: SamplingParams,
    /// The text each completion token added.
    pub pieces: Vec<String>,
    /// Completion ids.
    pub completion_ids: Vec<u32>,
    /// Logprobs under the distribution each token was drawn from.
    pub logprobs: Vec<f32>,
    /// Sampling entropies (may be empty when unknown).
    pub entropies: Vec<f32>,
    /// The reward.
    pub reward: f32,
    /// Which completion tokens were sampled (an episode interleaves context); empty: all.
    pub sampled_mask: Vec<bool>,
}

/// `planning` restricted to the sampled tokens (`sampled` empty: every token was sampled).
fn only_sampled(planning: Vec<bool>, sampled: &[bool]) -> Vec<bool> {
    if sampled.is_empty() {
        return planning;
    }
    planning.iter().zip(sampled).map(|(&p, &s)| p && s).collect()
}

impl StepPlugins {
    /// No plugins: the built-in detector and the trainer's scheme.
    pub fn built_in() -> Self {
        Self { detector: None, credit: None, timeout: Duration::from_secs(30) }
    }

    /// Builds training group `id` from its completions, or `None` when it is dropped. `grams`
    /// marks planning tokens when no detector plugin is set. Blocking: plugin calls run here.
    pub fn build_group(&self, id: String, completions: Vec<ScoredCompletion>, grams: &StrategicGrams, report: &mut StepPluginReport) -> Option<RolloutGroup> {
        let masks = self.planning_masks(&completions, grams);
        let mut members = Vec::with_capacity(completions.len());
        for (completion, mask) in completions.into_iter().zip(masks) {
            match mask {
                Some(planning_mask) => members.push(GroupMember {
                    id: completion.id,
                    prompt_ids: completion.prompt_ids,
                    sampling: completion.sampling,
                    completion_ids: completion.completion_ids,
                    logprobs: completion.logprobs,
                    reward: completion.reward,
                    // Planning tokens are the model's own: a Strategic Gram in a tool result or
                    // a user turn is context, not planning.
                    planning_mask: only_sampled(planning_mask, &completion.sampled_mask),
                    entropies: completion.entropies,
                    sampled_mask: completion.sampled_mask,
                }),
                None => report.masked_items += 1,
            }
        }
        if members.len() < 2 {
            report.dropped_groups += 1;
            return None;
        }
        let advantages = match self.advantages(&members) {
            Ok(advantages) => advantages,
            Err(err) => {
                tracing::warn!(%err, "credit plugin failed a group; it is dropped");
                report.dropped_groups += 1;
                return None;
            }
        };
        Some(RolloutGroup { id, members, advantages })
    }

    /// A fresh report naming the plugins in use.
    pub fn report(&self) -> StepPluginReport {
        StepPluginReport {
            sg_detector: self.detector.as_ref().map(|p| p.name.clone()).unwrap_or_else(|| "strategic_grams (built-in)".into()),
            credit: self.credit.as_ref().map(|p| p.name.clone()).unwrap_or_else(|| "trainer".into()),
            ..StepPluginReport::default()
        }
    }

    /// One mask per completion; `None` for a completion the detector failed.
    fn planning_masks(&self, completions: &[ScoredCompletion], grams: &StrategicGrams) -> Vec<Option<Vec<bool>>> {
        let texts: Vec<(String, Vec<(usize, usize)>)> = completions
            .iter()
            .map(|c| {
                let pieces: Vec<&str> = c.pieces.iter().map(String::as_str).collect();
                (pieces.concat(), spans_from_pieces(&pieces))
            })
            .collect();
        let Some(detector) = &self.detector else {
            return texts.iter().map(|(text, spans)| Some(grams.token_mask(text, spans))).collect();
        };
        let items = texts
            .iter()
            .map(|(text, spans)| DetectItem { text: text.as_str().into(), token_spans: spans.iter().map(|&(a, b)| Tuple2(a as u32, b as u32)).collect() })
            .collect();
        match detector.detect(items, self.timeout) {
            Ok(results) => results.into_iter().map(Result::ok).collect(),
            Err(err) => {
                tracing::warn!(%err, "detector plugin failed a batch; its items are masked");
                vec![None; completions.len()]
            }
        }
    }

    /// Advantages from the credit plugin (`Ok(None)` without one). Entropies go along when
    /// every member has them for every token, else the plugin gets none.
    fn advantages(&self, members: &[GroupMember]) -> Result<Option<Vec<Vec<f32>>>, super::PluginError> {
        let Some(plugin) = &self.credit else { return Ok(None) };
        let complete = members.iter().all(|m| m.entropies.len() == m.completion_ids.len());
        let group = CreditGroup {
            rewards: members.iter().map(|m| m.reward).collect(),
            planning_masks: members.iter().map(|m| m.planning_mask.iter().map(|&b| b as u8).collect()).collect(),
            entropies: if complete { members.iter().map(|m| RVec::from(m.entropies.clone())).collect() } else { RVec::new() },
        };
        if members.iter().all(|m| m.sampled_mask.is_empty()) {
            return plugin.credit(group, self.timeout).map(Some);
        }
        // Episodes: the plugin sees which tokens the model sampled, and the turns they form.
        let sampled: Vec<Vec<u8>> = members
            .iter()
            .map(|m| (0..m.completion_ids.len()).map(|i| u8::from(m.sampled_mask.get(i).copied().unwrap_or(true))).collect())
            .collect();
        let turns = sampled.iter().map(|mask| turn_ranges(mask).into_iter().map(|r| Tuple2(r.start as u32, r.end as u32)).collect()).collect();
        let episodes = CreditEpisodes { group, sampled: sampled.into_iter().map(RVec::from).collect(), turns };
        plugin.credit_episodes(episodes, self.timeout).map(Some)
    }
}

/// The maximal runs of sampled tokens (1s) in `mask`: an episode's turns.
fn turn_ranges(mask: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut turns = Vec::new();
    let mut start = None;
    for (i, &sampled) in mask.iter().chain(std::iter::once(&0)).enumerate() {
        match (sampled == 1, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                turns.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    turns
}
