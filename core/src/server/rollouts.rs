//! The rollout store: what the server sampled, kept exactly so it can be rewarded and trained on.
//!
//! Every finished choice becomes a [`Rollout`]: the prompt and completion token ids as served
//! (never re-tokenized), all its sampling parameters, two logprobs per completion token (the
//! API's tempered one and the behaviour policy's, see [`crate::engine::sampler`]), and the
//! policy versions at its first and last token. The store is bounded; the oldest rollouts are
//! evicted first. A rollout's reward is set once.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::engine::SamplingParams;

/// One served completion.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rollout {
    /// `ro-...`, unique within the process.
    pub id: String,
    /// Model that produced it.
    pub model: String,
    /// Version of the weights that produced its last token (also `policy_version_last`).
    pub policy_version: u64,
    /// Version of the weights that produced its first token; a step that lands while a
    /// sequence decodes makes this older than `policy_version`.
    pub policy_version_first: u64,
    /// Exact prompt ids.
    pub prompt_token_ids: Vec<u32>,
    /// Exact completion ids, including a final end-of-turn token.
    pub completion_token_ids: Vec<u32>,
    /// Logprob of each completion token under the tempered distribution before truncation
    /// (what the API's `logprobs` report).
    pub logprobs: Vec<f32>,
    /// Logprob of each completion token under the distribution it was drawn from (temperature,
    /// top-k, top-p applied; 0 for greedy): the behaviour policy training divides by.
    pub sampling_logprobs: Vec<f32>,
    /// Entropy (nats) of the sampling distribution at each completion token.
    pub entropies: Vec<f32>,
    /// The text each completion token added (for planning-token masks).
    #[serde(skip)]
    pub token_texts: Vec<String>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: String,
    /// The decoded output as returned to the client.
    pub text: String,
    /// Every sampling parameter the choice was drawn with.
    pub sampling: SamplingParams,
    /// Unix seconds.
    pub created: u64,
    /// The request's `user`, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The GRPO group: the request's id (its choices) unless a reward names another.
    pub group: String,
    /// Choices of the request that produced it.
    pub group_size: usize,
    /// The reward, once given.
    pub reward: Option<f32>,
    /// Which completion tokens the model sampled, for an episode's rollout whose completion
    /// interleaves context (tool results, user turns); empty when every token was sampled.
    /// Only sampled tokens carry loss.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sampled_mask: Vec<bool>,
}

impl Rollout {
    /// The rollout as the analyses read it (`step`: the policy version of its last token),
    /// filed under `group`, with the advantages it trained with (empty when unknown).
    pub fn analysis_record(&self, group: &str, advantages: Vec<f32>) -> crate::analysis::RolloutRecord {
        crate::analysis::RolloutRecord {
            step: self.policy_version,
            group: group.to_string(),
            reward: self.reward.unwrap_or(0.0),
            pieces: self.token_texts.clone(),
            logprobs: self.logprobs.clone(),
            entropies: self.entropies.clone(),
            rollout_id: Some(self.id.clone()),
            policy_version_first: Some(self.policy_version_first),
            advantages,
        }
    }
}

/// A bounded map of rollouts by id, evicting the oldest.
#[derive(Debug)]
pub struct RolloutStore {
    capacity: usize,
    /// Distinguishes this process's ids from those of earlier runs (the journal keeps them).
    boot: String,
    inner: Mutex<StoreInner>,
}

#[derive(Debug, Default)]
struct StoreInner {
    by_id: HashMap<String, Rollout>,
    order: VecDeque<String>,
    next: u64,
    evicted: u64,
}

impl RolloutStore {
    /// A store holding at most `capacity` rollouts.
    pub fn new(capacity: usize) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let boot = format!("{:x}", (nanos ^ ((std::process::id() as u64) << 40)) & 0xff_ffff_ffff);
        Self { capacity: capacity.max(1), boot, inner: Mutex::new(StoreInner::default()) }
    }

    /// [`Self::new`] for data-parallel replica `rank`: its ids start `ro-r<rank>-`, so a load
    /// balancer can send a reward to the replica that holds the rollout by its path.
    pub fn for_replica(capacity: usize, rank: usize) -> Self {
        let store = Self::new(capacity);
        Self { boot: format!("r{rank}-{}", store.boot), ..store }
    }

    /// A fresh rollout id, unique across restarts (request ids derive from it too).
    pub fn next_id(&self) -> String {
        let mut inner = self.lock();
        inner.next += 1;
        format!("ro-{}-{}", self.boot, inner.next)
    }

    /// Keeps `rollout`, evicting the oldest if full.
    pub fn insert(&self, rollout: Rollout) {
        let mut inner = self.lock();
        while inner.order.len() >= self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.by_id.remove(&old);
                inner.evicted += 1;
            }
        }
        inner.order.push_back(rollout.id.clone());
        inner.by_id.insert(rollout.id.clone(), rollout);
    }

    /// A copy of rollout `id`, if still held.
    pub fn get(&self, id: &str) -> Option<Rollout> {
        self.lock().by_id.get(id).cloned()
    }

    /// Sets the reward (and optionally the group) of rollout `id` unless it already has one;
    /// returns the updated copy. Callers serialise rewards (the training buffer's lock), so a
    /// check with [`Self::get`] followed by this call cannot race another reward.
    pub fn set_reward(&self, id: &str, reward: f32, group: Option<String>) -> Result<Rollout, RewardRefusal> {
        let mut inner = self.lock();
        let rollout = inner.by_id.get_mut(id).ok_or(RewardRefusal::Unknown)?;
        if let Some(previous) = rollout.reward {
            return Err(RewardRefusal::AlreadyRewarded(previous));
        }
        rollout.reward = Some(reward);
        if let Some(group) = group {
            rollout.group = group;
        }
        Ok(rollout.clone())
    }

    /// Rollouts held and rollouts evicted so far.
    pub fn counts(&self) -> (usize, u64) {
        let inner = self.lock();
        (inner.order.len(), inner.evicted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters more than losing the server, so recover the guard.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why a reward could not be set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RewardRefusal {
    /// No such rollout (never served, or evicted).
    Unknown,
    /// It was rewarded before, with this value.
    AlreadyRewarded(f32),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(id: String) -> Rollout {
        Rollout {
            id,
            model: "m".into(),
            policy_version: 0,
            policy_version_first: 0,
            prompt_token_ids: vec![1],
            completion_token_ids: vec![2],
            logprobs: vec![-0.5],
            sampling_logprobs: vec![-0.4],
            entropies: vec![1.0],
            token_texts: vec!["x".into()],
            finish_reason: "stop".into(),
            text: String::new(),
            sampling: SamplingParams::default(),
            created: 0,
            user: None,
            group: "g".into(),
            group_size: 1,
            reward: None,
            sampled_mask: Vec::new(),
        }
    }

    #[test]
    fn evicts_the_oldest_beyond_capacity() {
        let store = RolloutStore::new(2);
        let ids: Vec<String> = (0..3).map(|_| store.next_id()).collect();
        for id in &ids {
            store.insert(rollout(id.clone()));
        }
        assert!(store.get(&ids[0]).is_none());
        assert!(store.get(&ids[1]).is_some() && store.get(&ids[2]).is_some());
        assert_eq!(store.counts(), (2, 1));
        assert_ne!(ids[1], ids[2]);
    }

    #[test]
    fn a_replicas_ids_name_its_rank() {
        let id = RolloutStore::for_replica(4, 3).next_id();
        assert!(id.starts_with("ro-r3-"), "{id}");
    }

    #[test]
    fn a_reward_is_set_once() {
        let store = RolloutStore::new(4);
        let id = store.next_id();
        store.insert(rollout(id.clone()));
        assert!(store.set_reward(&id, 1.0, None).is_ok());
        assert_eq!(store.set_reward(&id, 0.0, None).err(), Some(RewardRefusal::AlreadyRewarded(1.0)));
        assert_eq!(store.get(&id).and_then(|r| r.reward), Some(1.0));
        assert_eq!(store.set_reward("ro-missing", 1.0, None).err(), Some(RewardRefusal::Unknown));
    }
}
