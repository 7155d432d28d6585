//! Online training: clients reward served rollouts; complete groups train the served model.
//!
//! The lifecycle of a reward, and what the client is told at each point:
//! 1. `POST /v1/rollouts/{id}/reward` `{"reward": r, "group_id"?: "...", "group_size"?: G}` (or a
//!    batch at `POST /v1/rewards` `{"rewards": [{"rollout_id", "reward", "group_id"?,
//!    "group_size"?}]}`) is validated as a whole before anything is recorded: the reward must be
//!    finite in f32, the rollout must exist, be sampled (greedy rollouts have no behaviour
//!    distribution) and not yet rewarded (a second reward is a 409 that changes nothing), and
//!    it must be able to join a group of at least two.
//! 2. The rollout joins its group: by default the `n` choices of its request, complete once all
//!    `n` are rewarded; or the client-named `group_id`, complete at `group_size` members (the
//!    first reward of a named group fixes its size; `--group-size` by default). The reply
//!    returns at once with each group's status.
//! 3. A complete group waits in the ready queue. The step worker (one task per server) takes
//!    `groups_per_step` of them, drops members older than `max_staleness` policy versions,
//!    builds masks and advantages (plugins run here), and queues one step on the engine thread,
//!    which runs it between decode steps whatever HTTP clients do. A group that is invalid on
//!    its own is rejected and reported; the rest of the step trains.
//! 4. Incomplete groups expire after `group_timeout`; both queues are bounded and a reward that
//!    would overflow them is answered 429 with nothing recorded.
//! 5. With a state folder, every reward is committed to the [`super::journal`] before the
//!    reply, and every step's outcome per group after the step, under the step gate
//!    (see [`super::checkpoints`]): a restart re-queues exactly the groups the restored
//!    weights have not learned from.
//!
//! An agent episode (`POST /v1/episodes/{id}/reward`) enters this lifecycle as one rollout:
//! its last segment, with the model's sampled tokens marked (see [`super::episodes`]).
//!
//! `GET /v1/training` (and `/metrics`) shows the policy version, the queues, every counter and
//! the last steps' reports.
//!
//! Data-parallel replicas (`TrainingSettings::replicas`) step together: every tick each step
//! worker offers how many complete groups it holds in one all-reduce; when the replicas hold
//! `groups_per_step` between them, every replica steps with the groups it has (possibly none)
//! and the trainer sums their gradients. A lost peer stops the stepping on the survivors,
//! which save a checkpoint and keep serving.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{ApiError, ApiJson};
use super::metrics::write_metric;
use super::plugins::PluginRegistry;
use super::journal::{self, GroupOutcome, GroupRef, Journal, NewGroup, Recovery, RewardRow, StepRecord};
use super::rollouts::{RewardRefusal, Rollout, RolloutStore};
use super::AppState;
use crate::collective::ProcessGroup;
use crate::analysis::{analyze_step, RolloutRecord, StepAnalysis};
use crate::plugins::step::{ScoredCompletion, StepPluginReport, StepPlugins};
use crate::train::planning::StrategicGrams;
use crate::train::trainer::{RolloutGroup, StepReport};

/// Largest group a client may name.
const MAX_GROUP_SIZE: usize = 256;
/// Step reports kept for `GET /v1/training`.
const HISTORY: usize = 16;

/// How online training groups and schedules rewards.
#[derive(Clone, Debug)]
pub struct TrainingSettings {
    /// Complete groups per optimizer step.
    pub groups_per_step: usize,
    /// Members of a client-named group whose first reward gives no `group_size`.
    pub group_size: usize,
    /// An incomplete group expires this long after its first reward.
    pub group_timeout: Duration,
    /// Rollouts whose first token is more than this many policy versions older than the
    /// weights about to be updated are dropped at step time; `None` keeps every rollout.
    pub max_staleness: Option<u64>,
    /// Incomplete groups held at once; a reward that would open one more is answered 429.
    pub max_pending_groups: usize,
    /// Complete groups waiting for a step; beyond it rewards are answered 429.
    pub max_ready_groups: usize,
    /// A loaded planning-token detector plugin to use instead of the paper's list.
    pub sg_plugin: Option<String>,
    /// A loaded credit plugin to compute advantages instead of the trainer's scheme.
    pub credit_plugin: Option<String>,
    /// Appends each step's rollouts here (JSON lines for `hicra analyze`), when set.
    pub rollout_log: Option<std::path::PathBuf>,
    /// The data-parallel replicas this server steps with (the trainer's group), if any.
    pub replicas: Option<Arc<ProcessGroup>>,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        Self {
            groups_per_step: 1,
            group_size: 4,
            group_timeout: Duration::from_secs(900),
            max_staleness: Some(4),
            max_pending_groups: 4096,
            max_ready_groups: 256,
            sg_plugin: None,
            credit_plugin: None,
            rollout_log: None,
            replicas: None,
        }
    }
}

/// Everything counted since start.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupCounters {
    /// Rewards recorded.
    pub rewards: u64,
    /// Groups that became complete.
    pub completed: u64,
    /// Groups whose tokens carried gradient in a step.
    pub trained: u64,
    /// Complete groups whose rewards were all equal (no signal; skipped by the trainer).
    pub zero_variance: u64,
    /// Incomplete groups that expired.
    pub expired: u64,
    /// Rewarded rollouts inside expired groups.
    pub expired_rollouts: u64,
    /// Rollouts dropped at step time for exceeding `max_staleness`.
    pub stale_rollouts: u64,
    /// Groups dropped because fewer than two members were fresh enough.
    pub stale_groups: u64,
    /// Groups the trainer refused on their own (reasons in the step reports).
    pub rejected: u64,
    /// Groups the plugins dropped (failed credit, or too few members left after masking).
    pub plugin_dropped: u64,
    /// Steps that ran.
    pub steps: u64,
    /// Steps that failed as a whole (their groups are counted here, not trained).
    pub failed_steps: u64,
    /// Complete groups found waiting in the journal at start (including `retrained`).
    pub recovered_groups: u64,
    /// Groups trained by steps after the checkpoint the server restarted from: that training
    /// was lost with the process, so they were queued again.
    pub retrained_groups: u64,
}

/// A group still collecting rewards.
#[derive(Debug)]
struct PendingGroup {
    /// The id clients see (the request id or their own group id).
    id: String,
    /// Its row in the journal, when the server has a state folder.
    seq: Option<i64>,
    members: Vec<Rollout>,
    expected: usize,
    opened: Instant,
}

/// A complete group waiting for a step.
#[derive(Debug)]
struct ReadyGroup {
    id: String,
    seq: Option<i64>,
    members: Vec<Rollout>,
}

#[derive(Debug, Default)]
struct BufferState {
    /// Keyed by `request/ID` or `named/ID`, so a client's name never merges with a request.
    pending: HashMap<String, PendingGroup>,
    ready: VecDeque<ReadyGroup>,
    counters: GroupCounters,
    history: VecDeque<Value>,
    /// The policy version before the step that is with the engine now, until that step is
    /// recorded in `history`. The engine publishes the new version as soon as the weights
    /// change; until the step is in the journal and the history, `GET /v1/training` keeps
    /// showing the version before it, so a version there always comes with its step.
    step_in_flight: Option<u64>,
}

impl BufferState {
    /// Rewarded rollouts waiting in incomplete groups.
    fn pending_rollouts(&self) -> usize {
        self.pending.values().map(|g| g.members.len()).sum()
    }
}

/// The 409 for a rollout that already has a reward (`previous`): a rollout is rewarded once.
pub(super) fn already_rewarded(id: &str, previous: f32) -> ApiError {
    ApiError::Conflict(format!("rollout '{id}' was already rewarded ({previous}); a rollout is rewarded once"))
}

/// One reward as a client sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RewardEntry {
    rollout_id: String,
    reward: f64,
    group_id: Option<String>,
    group_size: Option<usize>,
}

/// Body of a single reward (the rollout id is in the path).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RewardBody {
    reward: f64,
    group_id: Option<String>,
    group_size: Option<usize>,
}

/// Body of the batch form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchBody {
    rewards: Vec<RewardEntry>,
}

/// Where a validated reward goes.
struct Placement {
    /// The rollout, not yet rewarded.
    rollout: Rollout,
    reward: f32,
    key: String,
    group_id: String,
    expected: usize,
    named: bool,
}

impl Placement {
    /// The rollout as it is once this reward is recorded.
    fn rewarded(&self) -> Rollout {
        let mut rollout = self.rollout.clone();
        rollout.reward = Some(self.reward);
        if self.named {
            rollout.group = self.group_id.clone();
        }
        rollout
    }
}

/// Complete groups waiting and incomplete groups collecting rewards, plus the step history.
#[derive(Debug)]
pub struct TrainingBuffer {
    /// Settings.
    pub settings: TrainingSettings,
    grams: StrategicGrams,
    state: Mutex<BufferState>,
    wake: tokio::sync::Notify,
    /// Where rewards, groups and steps are made durable, when the server has a state folder.
    journal: Option<Arc<Journal>>,
    /// Held across a step (the engine's update and its journal record) and across a
    /// checkpoint's snapshot, so a checkpoint of version v always comes with the journal's
    /// record of every step up to v.
    pub(super) step_gate: Arc<tokio::sync::Mutex<()>>,
    /// Set when the journal failed to record an update (see [`Self::journal_step`]).
    journal_behind: std::sync::atomic::AtomicBool,
    /// Why the replicas stopped stepping together (a peer lost), once they have.
    replicas_lost: Mutex<Option<String>>,
    /// Set by `POST /admin/training/pause`: no step starts (rewards are still recorded and
    /// groups still complete) until `POST /admin/training/resume`.
    paused: std::sync::atomic::AtomicBool,
}

impl TrainingBuffer {
    /// A buffer with `settings`; with a `journal`, every reward, group and step is recorded
    /// there before it takes effect.
    pub fn new(settings: TrainingSettings, journal: Option<Arc<Journal>>) -> Self {
        let settings = TrainingSettings { groups_per_step: settings.groups_per_step.max(1), group_size: settings.group_size.max(2), ..settings };
        Self {
            settings,
            grams: StrategicGrams::paper(),
            state: Mutex::new(BufferState::default()),
            wake: tokio::sync::Notify::new(),
            journal,
            step_gate: Arc::new(tokio::sync::Mutex::new(())),
            journal_behind: std::sync::atomic::AtomicBool::new(false),
            paused: std::sync::atomic::AtomicBool::new(false),
            replicas_lost: Mutex::new(None),
        }
    }

    /// Whether this server writes the periodic checkpoints: alone, or as rank 0 of its
    /// replicas (the others write one when they stop or lose a peer).
    pub fn writes_periodic_checkpoints(&self) -> bool {
        self.settings.replicas.as_ref().is_none_or(|group| group.rank() == 0)
    }

    /// Why the replicas stopped stepping, if they did.
    pub fn replicas_lost(&self) -> Option<String> {
        self.replicas_lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many complete groups wait for a step.
    fn ready_count(&self) -> usize {
        let mut state = self.lock();
        self.expire(&mut state, Instant::now());
        state.ready.len()
    }

    /// Puts the groups of a step that could not run back at the front of the ready queue.
    fn requeue(&self, groups: Vec<ReadyGroup>) {
        let mut state = self.lock();
        for group in groups.into_iter().rev() {
            state.ready.push_front(group);
        }
    }

    /// Up to `groups_per_step` complete groups (possibly none): this replica's share of a
    /// step the replicas agreed on.
    fn take_share(&self) -> Vec<ReadyGroup> {
        let mut state = self.lock();
        let count = state.ready.len().min(self.settings.groups_per_step);
        drain_step(&mut state, count)
    }

    /// The journal, when the server has a state folder.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// Refills the queues from what the journal held at start: incomplete groups keep
    /// collecting (their time-out counts from their first reward), complete ones wait for steps.
    pub fn restore(&self, recovery: Recovery) {
        let mut state = self.lock();
        let now_unix = journal::now();
        let counts = |name: &str| recovery.counts.get(name).copied().unwrap_or(0);
        let c = &mut state.counters;
        c.rewards = counts("rewards");
        c.steps = counts("steps");
        c.trained = counts("trained");
        c.zero_variance = counts("zero_variance");
        c.expired = counts("expired");
        c.stale_groups = counts("stale");
        c.rejected = counts("rejected");
        c.plugin_dropped = counts("plugin_dropped");
        c.completed = ["ready", "trained", "zero_variance", "stale", "rejected", "plugin_dropped", "failed"].iter().map(|s| counts(s)).sum();
        c.recovered_groups = recovery.ready.len() as u64;
        c.retrained_groups = recovery.retrained_groups as u64;
        for group in recovery.pending {
            let age = Duration::try_from_secs_f64(now_unix - group.opened_at).unwrap_or_default();
            let opened = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let replaced = state.pending.insert(group.key, PendingGroup { id: group.id, seq: Some(group.seq), members: group.members, expected: group.expected, opened });
            // Two pending rows of one key (an expiry that failed to record): the newer wins,
            // the older is expired now.
            if let (Some(older), Some(journal)) = (replaced, &self.journal) {
                if let Err(err) = journal.expire(&older.seq.into_iter().collect::<Vec<_>>()) {
                    tracing::warn!(%err, group = %older.id, "a duplicate pending group could not be expired");
                }
            }
        }
        for group in recovery.ready {
            state.ready.push_back(ReadyGroup { id: group.id, seq: Some(group.seq), members: group.members });
        }
        if !state.ready.is_empty() {
            self.wake.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BufferState> {
        // Every update below leaves the maps consistent between statements that can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates every entry, then records them all (or nothing) and returns each one's group
    /// status. Rewards are serialised by this lock, so "rewarded once" cannot race.
    fn record(&self, store: &RolloutStore, entries: Vec<RewardEntry>) -> Result<Vec<Value>, ApiError> {
        let mut state = self.lock();
        self.expire(&mut state, Instant::now());
        let placements = self.validate(&state, store, entries)?;
        let seqs = self.journal_rewards(&state, &placements)?;
        let mut outcomes = Vec::with_capacity(placements.len());
        for (placement, seq) in placements.into_iter().zip(seqs) {
            outcomes.push(self.place(&mut state, store, placement, seq));
        }
        if state.ready.len() >= self.settings.groups_per_step {
            self.wake.notify_one();
        }
        Ok(outcomes)
    }

    fn validate(&self, state: &BufferState, store: &RolloutStore, entries: Vec<RewardEntry>) -> Result<Vec<Placement>, ApiError> {
        if entries.is_empty() {
            return Err(ApiError::invalid("rewards", "no rewards given"));
        }
        let mut seen = HashSet::new();
        let mut placements = Vec::with_capacity(entries.len());
        for entry in entries {
            if !seen.insert(entry.rollout_id.clone()) {
                return Err(ApiError::invalid("rollout_id", format!("rollout '{}' appears twice in this batch", entry.rollout_id)));
            }
            placements.push(self.validate_one(state, store, entry)?);
        }
        self.check_capacity(state, &placements)?;
        self.check_group_sizes(state, &placements)?;
        Ok(placements)
    }

    fn validate_one(&self, state: &BufferState, store: &RolloutStore, entry: RewardEntry) -> Result<Placement, ApiError> {
        let id = &entry.rollout_id;
        let reward = entry.reward as f32;
        if !reward.is_finite() {
            return Err(ApiError::invalid("reward", format!("reward {} for '{id}' is not a finite 32-bit float (|r| must be below 3.4e38)", entry.reward)));
        }
        let journaled = || match &self.journal {
            // Evicted from memory, or served before a restart.
            Some(journal) => journal.rollout(id).map_err(|e| ApiError::Internal(e.to_string())),
            None => Ok(None),
        };
        let rollout = match store.get(id) {
            Some(rollout) => rollout,
            None => journaled()?.ok_or_else(|| ApiError::NotFound(format!("no rollout '{id}' (unknown or evicted)")))?,
        };
        if let Some(previous) = rollout.reward {
            return Err(already_rewarded(id, previous));
        }
        if !rollout.sampling.is_sampled() {
            return Err(ApiError::invalid("rollout_id", format!("rollout '{id}' was decoded greedily (temperature 0): its tokens were not drawn from a distribution, so there is no behaviour policy to train against; sample with temperature > 0 to train")));
        }
        if rollout.completion_token_ids.is_empty() {
            return Err(ApiError::invalid("rollout_id", format!("rollout '{id}' has no completion tokens to train on")));
        }
        let (key, group_id, expected, named) = match entry.group_id {
            Some(name) if name.is_empty() => return Err(ApiError::invalid("group_id", "group_id must not be empty")),
            Some(name) => {
                let size = entry.group_size.unwrap_or(self.settings.group_size);
                if !(2..=MAX_GROUP_SIZE).contains(&size) {
                    return Err(ApiError::invalid("group_size", format!("group_size must be between 2 and {MAX_GROUP_SIZE}, got {size}")));
                }
                (format!("named/{name}"), name, size, true)
            }
            None if entry.group_size.is_some() => return Err(ApiError::invalid("group_size", "group_size needs a group_id: a request's own group has its n choices")),
            None if rollout.group_size < 2 => {
                return Err(ApiError::invalid("group_id", format!(
                    "rollout '{id}' can never complete a group: its request asked for n = {} choice, and GRPO compares each reward with its group's. \
                     Ask for n >= 2 choices per prompt, or reward rollouts of the same prompt with a shared \"group_id\" (and \"group_size\", default {})",
                    rollout.group_size, self.settings.group_size
                )));
            }
            None => (format!("request/{}", rollout.group), rollout.group.clone(), rollout.group_size, false),
        };
        if let Some(pending) = state.pending.get(&key) {
            if named && pending.expected != expected && entry.group_size.is_some() {
                return Err(ApiError::invalid("group_size", format!("group '{group_id}' was opened with group_size {}, not {expected}", pending.expected)));
            }
        }
        Ok(Placement { rollout, reward, key, group_id, expected, named })
    }

    /// Refuses the batch (429) when it would overflow the pending or ready queues.
    fn check_capacity(&self, state: &BufferState, placements: &[Placement]) -> Result<(), ApiError> {
        let opening: HashSet<&str> = placements.iter().map(|p| p.key.as_str()).filter(|k| !state.pending.contains_key(*k)).collect();
        if state.pending.len() + opening.len() > self.settings.max_pending_groups {
            return Err(ApiError::Busy(format!(
                "{} groups are still collecting rewards (limit {}); complete them or let them expire ({} s) before opening new ones",
                state.pending.len(),
                self.settings.max_pending_groups,
                self.settings.group_timeout.as_secs()
            )));
        }
        if state.ready.len() >= self.settings.max_ready_groups {
            return Err(ApiError::Busy(format!("training is behind: {} complete groups wait for steps (limit {}); retry shortly", state.ready.len(), self.settings.max_ready_groups)));
        }
        Ok(())
    }

    /// A batch must not give one named group more members than its size.
    fn check_group_sizes(&self, state: &BufferState, placements: &[Placement]) -> Result<(), ApiError> {
        let mut joining: HashMap<&str, usize> = HashMap::new();
        for p in placements {
            *joining.entry(&p.key).or_default() += 1;
        }
        for p in placements.iter().filter(|p| p.named) {
            let (have, expected) = state.pending.get(&p.key).map(|g| (g.members.len(), g.expected)).unwrap_or((0, p.expected));
            if have + joining[p.key.as_str()] > expected {
                return Err(ApiError::invalid("group_id", format!("group '{}' has {expected} members; this batch would add more", p.group_id)));
            }
        }
        Ok(())
    }

    /// Commits a validated batch to the journal (one synchronous transaction) before anything
    /// changes in memory; returns each placement's group row. Without a journal, `None`s.
    fn journal_rewards(&self, state: &BufferState, placements: &[Placement]) -> Result<Vec<Option<i64>>, ApiError> {
        let Some(journal) = &self.journal else { return Ok(vec![None; placements.len()]) };
        let mut new_groups: Vec<NewGroup> = Vec::new();
        let mut members: HashMap<&str, (GroupRef, usize, usize)> = HashMap::new();
        let mut refs = Vec::with_capacity(placements.len());
        for p in placements {
            let entry = members.entry(p.key.as_str()).or_insert_with(|| match state.pending.get(&p.key) {
                Some(PendingGroup { seq: Some(seq), members, expected, .. }) => (GroupRef::Journaled(*seq), members.len(), *expected),
                pending => {
                    // With a journal every pending group has a row; one without is given one.
                    let (have, expected) = pending.map(|g| (g.members.len(), g.expected)).unwrap_or((0, p.expected));
                    new_groups.push(NewGroup { key: p.key.clone(), id: p.group_id.clone(), expected, named: p.named, opened_at: journal::now() });
                    (GroupRef::New(new_groups.len() - 1), have, expected)
                }
            });
            entry.1 += 1;
            refs.push(entry.0);
        }
        let completed: Vec<GroupRef> = members.values().filter(|(_, have, expected)| have >= expected).map(|(r, _, _)| *r).collect();
        let rewarded: Vec<Rollout> = placements.iter().map(Placement::rewarded).collect();
        let rows: Vec<RewardRow<'_>> = rewarded.iter().zip(&refs).map(|(rollout, group)| RewardRow { rollout, group: *group }).collect();
        let opened = journal.record_rewards(&new_groups, &rows, &completed).map_err(|err| {
            tracing::error!(%err, "rewards not recorded");
            ApiError::Internal(format!("the rewards could not be recorded durably, so none was accepted: {err}"))
        })?;
        Ok(refs
            .into_iter()
            .map(|r| match r {
                GroupRef::Journaled(seq) => Some(seq),
                GroupRef::New(i) => opened.get(i).copied(),
            })
            .collect())
    }

    /// Records one validated reward and files it into its group.
    fn place(&self, state: &mut BufferState, store: &RolloutStore, placement: Placement, seq: Option<i64>) -> Value {
        let Placement { mut rollout, reward, key, group_id, expected, named } = placement;
        // The store may have evicted the rollout since validation; the buffer's copy is what
        // trains, so the reward still counts.
        match store.set_reward(&rollout.id, reward, named.then(|| group_id.clone())) {
            Ok(updated) => rollout = updated,
            Err(RewardRefusal::Unknown | RewardRefusal::AlreadyRewarded(_)) => {
                rollout.reward = Some(reward);
                rollout.group = group_id.clone();
            }
        }
        state.counters.rewards += 1;
        let rollout_id = rollout.id.clone();
        let group = state.pending.entry(key.clone()).or_insert_with(|| PendingGroup { id: group_id.clone(), seq, members: Vec::new(), expected, opened: Instant::now() });
        group.members.push(rollout);
        let (rewarded, size) = (group.members.len(), group.expected);
        if rewarded >= size {
            if let Some(done) = state.pending.remove(&key) {
                state.ready.push_back(ReadyGroup { id: done.id, seq: done.seq, members: done.members });
                state.counters.completed += 1;
            }
        }
        let status = if rewarded >= size { "complete" } else { "collecting" };
        json!({"rollout_id": rollout_id, "group_id": group_id, "status": status, "rewarded": rewarded, "size": size})
    }

    /// Drops incomplete groups older than the time-out.
    fn expire(&self, state: &mut BufferState, now: Instant) {
        let timeout = self.settings.group_timeout;
        let expired: Vec<String> = state.pending.iter().filter(|(_, g)| now.duration_since(g.opened) >= timeout).map(|(k, _)| k.clone()).collect();
        if expired.is_empty() {
            return;
        }
        if let Some(journal) = &self.journal {
            let rows: Vec<i64> = expired.iter().filter_map(|k| state.pending.get(k).and_then(|g| g.seq)).collect();
            if let Err(err) = journal.expire(&rows) {
                // Not fatal: a restart finds them pending and expires them again.
                tracing::warn!(%err, "expired groups not recorded in the journal");
            }
        }
        for key in expired {
            if let Some(group) = state.pending.remove(&key) {
                tracing::info!(group = %group.id, rewarded = group.members.len(), expected = group.expected, "incomplete group expired");
                state.counters.expired += 1;
                state.counters.expired_rollouts += group.members.len() as u64;
            }
        }
    }

    /// Whether steps are paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The next step's groups, when enough are ready.
    fn take_batch(&self) -> Option<Vec<ReadyGroup>> {
        let mut state = self.lock();
        self.expire(&mut state, Instant::now());
        if state.ready.len() < self.settings.groups_per_step {
            return None;
        }
        Some(drain_step(&mut state, self.settings.groups_per_step))
    }

    /// Drops members whose first token is older than `max_staleness` versions before
    /// `version`, and groups left with fewer than two members (their journal rows are
    /// collected in `dropped`).
    fn drop_stale(&self, groups: Vec<ReadyGroup>, version: u64, dropped: &mut Vec<(i64, GroupOutcome)>) -> Vec<ReadyGroup> {
        let Some(max) = self.settings.max_staleness else { return groups };
        let (mut stale_rollouts, mut stale_groups) = (0u64, 0u64);
        let fresh: Vec<ReadyGroup> = groups
            .into_iter()
            .filter_map(|mut group| {
                let before = group.members.len();
                group.members.retain(|m| version.saturating_sub(m.policy_version_first) <= max);
                stale_rollouts += (before - group.members.len()) as u64;
                if group.members.len() < 2 {
                    stale_groups += 1;
                    dropped.extend(group.seq.map(|seq| (seq, GroupOutcome::Stale)));
                    tracing::info!(group = %group.id, version, max_staleness = max, "group dropped: too few rollouts within max_staleness");
                    return None;
                }
                Some(group)
            })
            .collect();
        let mut state = self.lock();
        state.counters.stale_rollouts += stale_rollouts;
        state.counters.stale_groups += stale_groups;
        fresh
    }

    /// Turns groups into training groups: planning masks from the detector plugin (or the
    /// paper's list), advantages from the credit plugin (or the trainer's scheme). Blocking:
    /// plugin calls run here.
    fn build_groups(&self, ready: &[ReadyGroup], plugins: Option<&PluginRegistry>) -> (Vec<RolloutGroup>, StepPluginReport) {
        let generation = plugins.map(|p| p.current()).unwrap_or_default();
        let find = |name: &Option<String>| name.as_ref().and_then(|n| generation.iter().find(|p| &p.name == n).cloned());
        let step_plugins = StepPlugins {
            detector: find(&self.settings.sg_plugin),
            credit: find(&self.settings.credit_plugin),
            timeout: plugins.map(|p| p.timeout).unwrap_or(StepPlugins::built_in().timeout),
        };
        let mut report = step_plugins.report();
        let mut groups = Vec::new();
        for group in ready {
            let completions = group.members.iter().map(scored_completion).collect();
            groups.extend(step_plugins.build_group(group.id.clone(), completions, &self.grams, &mut report));
        }
        (groups, report)
    }

    /// Records what a step did with its groups in the journal. If that fails after the weights
    /// changed, the journal no longer describes them: checkpoints are refused from then on
    /// (a checkpoint would make those groups look untrained after a restart, and train them
    /// twice). Called by the step worker on the runtime; the write blocks, so it runs in
    /// `block_in_place`.
    fn journal_step(&self, version_before: u64, step: Option<(&StepReport, &Value)>, outcomes: &[(i64, GroupOutcome)], advantages: &[(String, Vec<f32>)]) {
        let Some(journal) = &self.journal else { return };
        let record = StepRecord {
            version_before,
            policy_version: step.map(|(r, _)| r.policy_version).unwrap_or(version_before),
            updated: step.is_some_and(|(r, _)| r.updated),
            report: step.map(|(_, entry)| entry),
            outcomes,
            advantages,
        };
        if let Err(err) = tokio::task::block_in_place(|| journal.record_step(&record)) {
            tracing::error!(%err, "a step's outcome was not recorded in the journal; checkpoints are off until restart");
            if record.updated {
                self.journal_behind.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// Whether a step's update is missing from the journal (checkpoints must not be written).
    pub fn journal_behind(&self) -> bool {
        self.journal_behind.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records a finished (or failed) step in the counters and the history.
    fn record_step(&self, entry: Value, report: Option<&StepReport>, plugin_report: &StepPluginReport) {
        let mut state = self.lock();
        let counters = &mut state.counters;
        counters.plugin_dropped += plugin_report.dropped_groups as u64;
        match report {
            Some(report) => {
                counters.steps += 1;
                counters.trained += report.trained_groups.len() as u64;
                counters.zero_variance += report.zero_variance_groups as u64;
                counters.rejected += report.rejected_groups.len() as u64;
            }
            None => counters.failed_steps += 1,
        }
        state.history.push_back(entry);
        while state.history.len() > HISTORY {
            state.history.pop_front();
        }
        state.step_in_flight = None;
    }

    /// Marks a step as handed to the engine, from `version_before`; [`Self::record_step`]
    /// ends the mark.
    fn step_started(&self, version_before: u64) {
        self.lock().step_in_flight = Some(version_before);
    }

    /// The whole state as `GET /v1/training` shows it; `engine_version` is the version the
    /// engine serves, read under the state's lock (see [`BufferState::step_in_flight`]).
    fn snapshot(&self, engine_version: &std::sync::atomic::AtomicU64) -> Value {
        let mut state = self.lock();
        let policy_version = state.step_in_flight.unwrap_or_else(|| engine_version.load(std::sync::atomic::Ordering::Acquire));
        // Expiry is applied on every read, so what is shown never lags the worker's tick.
        self.expire(&mut state, Instant::now());
        let pending_rollouts = state.pending_rollouts();
        let s = &self.settings;
        json!({
            "training": true,
            "paused": self.is_paused(),
            "policy_version": policy_version,
            "pending_groups": state.pending.len(),
            "pending_rollouts": pending_rollouts,
            "ready_groups": state.ready.len(),
            "counters": state.counters,
            "settings": {
                "groups_per_step": s.groups_per_step,
                "group_size": s.group_size,
                "group_timeout_s": s.group_timeout.as_secs_f64(),
                "max_staleness": s.max_staleness,
                "max_pending_groups": s.max_pending_groups,
                "max_ready_groups": s.max_ready_groups,
            },
            "last_steps": state.history,
            "replicas": self.settings.replicas.as_ref().map(|group| json!({
                "rank": group.rank(),
                "world_size": group.world_size(),
                "lost": self.replicas_lost.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            })),
        })
    }

    /// Prometheus lines for the queues and counters.
    pub fn render_metrics(&self) -> String {
        let mut state = self.lock();
        self.expire(&mut state, Instant::now());
        let c = &state.counters;
        let pending_rollouts = state.pending_rollouts();
        let lines: [(&str, &str, &str, f64); 14] = [
            ("hicra_training_pending_groups", "gauge", "Groups still collecting rewards.", state.pending.len() as f64),
            ("hicra_training_pending_rollouts", "gauge", "Rewarded rollouts in incomplete groups.", pending_rollouts as f64),
            ("hicra_training_ready_groups", "gauge", "Complete groups waiting for a step.", state.ready.len() as f64),
            ("hicra_training_rewards_total", "counter", "Rewards recorded.", c.rewards as f64),
            ("hicra_training_groups_completed_total", "counter", "Groups that became complete.", c.completed as f64),
            ("hicra_training_groups_trained_total", "counter", "Groups trained on.", c.trained as f64),
            ("hicra_training_groups_zero_variance_total", "counter", "Complete groups with equal rewards (skipped).", c.zero_variance as f64),
            ("hicra_training_groups_expired_total", "counter", "Incomplete groups that expired.", c.expired as f64),
            ("hicra_training_rollouts_expired_total", "counter", "Rewarded rollouts in expired groups.", c.expired_rollouts as f64),
            ("hicra_training_rollouts_stale_total", "counter", "Rollouts dropped for exceeding max_staleness.", c.stale_rollouts as f64),
            ("hicra_training_groups_stale_total", "counter", "Groups dropped for too few fresh rollouts.", c.stale_groups as f64),
            ("hicra_training_groups_rejected_total", "counter", "Groups the trainer refused on their own.", c.rejected as f64),
            ("hicra_training_groups_plugin_dropped_total", "counter", "Groups the detector or credit plugin dropped.", c.plugin_dropped as f64),
            ("hicra_training_steps_failed_total", "counter", "Steps that failed as a whole.", c.failed_steps as f64),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in lines {
            write_metric(&mut out, name, help, kind, value);
        }
        out
    }
}

/// The first `count` ready groups, as one step's batch. Outcomes are matched by id: a client
/// reusing a group name must not make two groups of one step indistinguishable.
fn drain_step(state: &mut BufferState, count: usize) -> Vec<ReadyGroup> {
    let mut batch: Vec<ReadyGroup> = state.ready.drain(..count).collect();
    let mut seen = HashSet::new();
    for (i, group) in batch.iter_mut().enumerate() {
        if !seen.insert(group.id.clone()) {
            group.id = format!("{}#{}", group.id, group.seq.map_or(i as i64, |s| s));
            seen.insert(group.id.clone());
        }
    }
    batch
}

/// What the step builder needs of a rollout.
fn scored_completion(rollout: &Rollout) -> ScoredCompletion {
    ScoredCompletion {
        id: rollout.id.clone(),
        prompt_ids: rollout.prompt_token_ids.clone(),
        sampling: rollout.sampling.clone(),
        pieces: rollout.token_texts.clone(),
        completion_ids: rollout.completion_token_ids.clone(),
        logprobs: rollout.sampling_logprobs.clone(),
        entropies: rollout.entropies.clone(),
        reward: rollout.reward.unwrap_or(0.0),
        sampled_mask: rollout.sampled_mask.clone(),
    }
}

/// A step's rollouts as analysis records (`step` = the policy version of the last token);
/// their advantages are filled in once the step has run.
fn records(groups: &[ReadyGroup]) -> Vec<RolloutRecord> {
    groups
        .iter()
        .flat_map(|g| g.members.iter().map(move |r| r.analysis_record(&g.id, Vec::new())))
        .collect()
}

/// Appends records to the rollout log; a failure is logged, never fatal.
fn append_log(path: &std::path::Path, records: &[RolloutRecord]) {
    let lines: String = records.iter().filter_map(|r| serde_json::to_string(r).ok()).map(|l| l + "\n").collect();
    let written = std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()));
    if let Err(err) = written {
        tracing::warn!(path = %path.display(), %err, "could not append to the rollout log");
    }
}

/// The step worker: waits for complete groups and trains on them, one step at a time, for
/// as long as the server runs. Started once by the server when it trains.
pub async fn run_steps(state: AppState) {
    let Some(buffer) = state.training.clone() else { return };
    if let Some(group) = buffer.settings.replicas.clone() {
        return run_steps_with_replicas(state, buffer, group).await;
    }
    loop {
        // Woken by a reward that completes enough groups; the tick also expires old groups.
        let _ = tokio::time::timeout(Duration::from_secs(1), buffer.wake.notified()).await;
        // `take_batch` may record expiries in the journal: blocking work.
        while let Some(batch) = tokio::task::block_in_place(|| (!buffer.is_paused()).then(|| buffer.take_batch()).flatten()) {
            if step_once(&state, &buffer, batch).await {
                super::checkpoints::after_update(&state);
            }
        }
    }
}

/// The step worker of a replica: every tick (or reward) the replicas agree in one all-reduce
/// whether they hold `groups_per_step` complete groups between them; if so each steps with its
/// share. The rounds are collectives, so every replica runs them in the same order: a replica
/// that is ahead waits for the others. A failed round or step (a peer lost) stops stepping
/// here: the survivor reports it, saves a checkpoint and keeps serving.
async fn run_steps_with_replicas(state: AppState, buffer: Arc<TrainingBuffer>, group: Arc<ProcessGroup>) {
    let mut stepped = false;
    loop {
        // Right after a step, more groups may already wait: no pause then.
        if !stepped {
            let _ = tokio::time::timeout(Duration::from_secs(1), buffer.wake.notified()).await;
        }
        let ready = tokio::task::block_in_place(|| buffer.ready_count());
        // Rank 0 also tells the others which version its last checkpoint holds: theirs are
        // not what a restart resumes from, so their journals keep what rank 0's would need.
        let checkpointed = match (group.rank(), &state.checkpoints) {
            (0, Some(checkpointer)) => checkpointer.last().map_or(0, |c| c.policy_version),
            _ => 0,
        };
        // A pause on any replica (the one the admin call reached) holds every replica's steps.
        // The round holds the step gate from its agreement through its step: a pause arriving
        // meanwhile answers after that step (with its version), and the next round sees it.
        let gate = buffer.step_gate.lock().await;
        let agreed = tokio::task::block_in_place(|| group.sum_values(&[ready as i64, checkpointed as i64, buffer.is_paused() as i64]));
        let (held_by_all, rank0_checkpoint, paused_anywhere) = match agreed.as_deref() {
            Ok([held, version, paused]) => (*held, *version as u64, *paused > 0),
            Ok(_) => (0, 0, true),
            Err(err) => {
                // Its checkpoint takes the gate.
                drop(gate);
                return lose_replicas(&state, &buffer, err.to_string()).await;
            }
        };
        if let (true, Some(journal)) = (group.rank() > 0, &state.journal) {
            journal.set_checkpoint_version(rank0_checkpoint);
        }
        stepped = held_by_all >= buffer.settings.groups_per_step as i64 && !paused_anywhere;
        if !stepped {
            continue;
        }
        let share = tokio::task::block_in_place(|| buffer.take_share());
        let updated = step_holding_gate(&state, &buffer, share).await;
        drop(gate);
        if updated {
            super::checkpoints::after_update(&state);
        }
        if group.is_broken() {
            return lose_replicas(&state, &buffer, "a training step across the replicas failed (see the log)".into()).await;
        }
    }
}

/// Stops stepping with the replicas after `reason`: reported in `GET /v1/training` and the log,
/// and the weights of the last step taken together are saved.
async fn lose_replicas(state: &AppState, buffer: &Arc<TrainingBuffer>, reason: String) {
    tracing::error!(%reason, "lost a replica: training stops here; serving goes on");
    *buffer.replicas_lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    if state.checkpoints.is_some() {
        match super::checkpoints::checkpoint_now(state, "replica lost", false).await {
            Ok(info) => tracing::warn!(path = %info.path, policy_version = info.policy_version, "checkpoint after losing a replica"),
            Err(err) => tracing::error!(%err, "the checkpoint after losing a replica failed"),
        }
    }
}

/// Runs one step on `batch` and records its outcome; never loses the report. The step gate
/// is held from before the update until the journal has recorded it. With replicas the
/// engine steps even with no groups of its own: the step is taken together.
async fn step_once(state: &AppState, buffer: &Arc<TrainingBuffer>, batch: Vec<ReadyGroup>) -> bool {
    let _gate = buffer.step_gate.lock().await;
    step_holding_gate(state, buffer, batch).await
}

/// [`step_once`] for a caller that holds the step gate (a replica's round holds it from the
/// agreement on).
async fn step_holding_gate(state: &AppState, buffer: &Arc<TrainingBuffer>, batch: Vec<ReadyGroup>) -> bool {
    // A pause that took the gate between `take_batch` and here has answered with the current
    // version: keep that promise and put the groups back. (Replicas agreed on this step
    // together and must take it; their rounds hold the gate, so no pause lands in between.)
    if buffer.is_paused() && buffer.settings.replicas.is_none() {
        buffer.requeue(batch);
        return false;
    }
    let version = state.engine.policy_version.load(std::sync::atomic::Ordering::Acquire);
    let mut outcomes = Vec::new();
    let batch = buffer.drop_stale(batch, version, &mut outcomes);
    if batch.is_empty() && buffer.settings.replicas.is_none() {
        buffer.journal_step(version, None, &outcomes, &[]);
        return false;
    }
    let registry = state.plugins.clone();
    let builder = buffer.clone();
    let built = tokio::task::spawn_blocking(move || {
        let records = records(&batch);
        let analysis = analyze_step(&records, &builder.grams);
        let (groups, report) = builder.build_groups(&batch, registry.as_deref());
        (batch, records, groups, report, analysis)
    })
    .await;
    let (batch, mut records, groups, plugin_report, analysis) = match built {
        Ok(built) => built,
        Err(err) => {
            // The groups stay ready in the journal: a restart offers them again.
            tracing::error!(%err, "building a training step panicked; its groups are counted as a failed step");
            buffer.record_step(json!({"error": "building the step failed"}), None, &StepPluginReport::default());
            if buffer.settings.replicas.is_some() {
                // The others are stepping: take part with no groups, or their collectives and
                // ours fall out of step.
                return matches!(state.engine.train(Vec::new()).await, Ok(report) if report.updated);
            }
            return false;
        }
    };
    let group_ids: Vec<String> = batch.iter().map(|g| g.id.clone()).collect();
    let offered: HashSet<String> = groups.iter().map(|g| g.id.clone()).collect();
    buffer.step_started(version);
    match state.engine.train(groups).await {
        Ok(report) => {
            state.metrics.record_step(&report, &analysis);
            let mut advantages: HashMap<&str, &Vec<f32>> = report.advantages.iter().map(|(id, a)| (id.as_str(), a)).collect();
            for record in &mut records {
                if let Some(given) = record.rollout_id.as_deref().and_then(|id| advantages.remove(id)) {
                    record.advantages = given.clone();
                }
            }
            if let Some(path) = &buffer.settings.rollout_log {
                append_log(path, &records);
            }
            let trained: HashSet<&str> = report.trained_groups.iter().map(String::as_str).collect();
            let rejected: HashSet<&str> = report.rejected_groups.iter().map(|r| r.group.as_str()).collect();
            for group in &batch {
                let outcome = match group.id.as_str() {
                    id if !offered.contains(id) => GroupOutcome::PluginDropped,
                    id if trained.contains(id) => GroupOutcome::Trained,
                    id if rejected.contains(id) => GroupOutcome::Rejected,
                    _ => GroupOutcome::ZeroVariance,
                };
                outcomes.extend(group.seq.map(|seq| (seq, outcome)));
            }
            let entry = step_entry(&report, &analysis, &plugin_report, &group_ids);
            buffer.journal_step(version, Some((&report, &entry)), &outcomes, &report.advantages);
            buffer.record_step(entry, Some(&report), &plugin_report);
            report.updated
        }
        Err(message) if buffer.settings.replicas.as_ref().is_some_and(|group| group.is_broken() || !symmetric_failure(&message)) => {
            // A peer was lost, or this engine failed in a way the others did not see (its
            // collectives may be out of step with theirs, so it takes no further part): not
            // these groups' fault. They wait again (their journal rows stay ready, so a restart
            // offers them too).
            if let Some(group) = &buffer.settings.replicas {
                group.abandon();
            }
            tracing::error!(%message, groups = ?group_ids, "the step across the replicas failed; its groups wait again");
            buffer.journal_step(version, None, &outcomes, &[]);
            buffer.requeue(batch);
            buffer.record_step(json!({"error": message, "groups": group_ids}), None, &plugin_report);
            false
        }
        Err(message) => {
            tracing::error!(%message, groups = ?group_ids, "training step failed; its groups are not trained");
            for group in &batch {
                let outcome = if offered.contains(&group.id) { GroupOutcome::Failed } else { GroupOutcome::PluginDropped };
                outcomes.extend(group.seq.map(|seq| (seq, outcome)));
            }
            let entry = json!({"error": message, "groups": group_ids});
            buffer.journal_step(version, None, &outcomes, &[]);
            buffer.record_step(entry, None, &plugin_report);
            false
        }
    }
}

/// Whether a failed step failed on every replica alike: a non-finite loss or gradient norm is
/// decided on values the replicas summed together, so all of them discard the step and stay in
/// step. Anything else (the engine thread gone, a panic) happened here alone.
fn symmetric_failure(message: &str) -> bool {
    message.starts_with("non-finite ")
}

/// One history entry: the trainer's report, the step's analyses and the plugins' report.
fn step_entry(report: &StepReport, analysis: &StepAnalysis, plugins: &StepPluginReport, groups: &[String]) -> Value {
    let mut entry = serde_json::to_value(report).unwrap_or_default();
    if let (Some(object), Ok(Value::Object(extra))) = (entry.as_object_mut(), serde_json::to_value(analysis)) {
        object.extend(extra);
        object.insert("plugins".into(), serde_json::to_value(plugins).unwrap_or_default());
        object.insert("group_ids".into(), json!(groups));
    }
    entry
}

pub(super) async fn reward_one(State(state): State<AppState>, Path(id): Path<String>, ApiJson(body): ApiJson<RewardBody>) -> Result<Json<Value>, ApiError> {
    let entry = RewardEntry { rollout_id: id, reward: body.reward, group_id: body.group_id, group_size: body.group_size };
    reward_off_runtime(state, vec![entry]).await.map(Json)
}

pub(super) async fn reward_batch(State(state): State<AppState>, ApiJson(body): ApiJson<BatchBody>) -> Result<Json<Value>, ApiError> {
    reward_off_runtime(state, body.rewards).await.map(Json)
}

/// [`reward_many`] on a blocking thread: recording a reward waits for the journal's fsync,
/// which must not stall the runtime's few worker threads.
async fn reward_off_runtime(state: AppState, entries: Vec<RewardEntry>) -> Result<Value, ApiError> {
    tokio::task::spawn_blocking(move || reward_many(&state, entries)).await.map_err(|e| ApiError::Internal(format!("recording the rewards panicked: {e}")))?
}

/// `POST /v1/episodes/{id}/reward` `{"reward": r, "group_id": "task", "group_size"?: G}`:
/// rewards the episode's last segment as one rollout whose sampled tokens carry the loss;
/// episodes sharing a `group_id` form a GRPO group whatever their number of turns.
pub(super) async fn reward_episode(State(state): State<AppState>, Path(id): Path<String>, ApiJson(body): ApiJson<RewardBody>) -> Result<Json<Value>, ApiError> {
    if state.training.is_none() {
        return Err(ApiError::invalid("reward", "this server does not train: start it with --train"));
    }
    if body.group_id.is_none() {
        return Err(ApiError::invalid("group_id", "an episode is compared with other episodes of its task: pass \"group_id\" (and \"group_size\") shared by those episodes"));
    }
    let nonce = state.rollouts.next_id();
    let rollout = state.episodes.take_training_rollout(&id, &state.engine.info.name, nonce.trim_start_matches("ro-"))?;
    let rollout_id = rollout.id.clone();
    state.rollouts.insert(rollout);
    let entry = RewardEntry { rollout_id, reward: body.reward, group_id: body.group_id, group_size: body.group_size };
    let episodes = state.episodes.clone();
    match reward_off_runtime(state, vec![entry]).await {
        Ok(mut reply) => {
            reply["episode_id"] = json!(id);
            Ok(Json(reply))
        }
        Err(err) => {
            // Refused (a full queue, a bad group): the episode may be rewarded again.
            episodes.release(&id);
            Err(err)
        }
    }
}

/// `POST /admin/training/pause`: no training step starts until resumed; rewards are still
/// recorded and complete groups wait (up to `max_ready_groups`). Answers once any step in
/// flight has finished, with the policy version that then serves every request until resume:
/// the way to evaluate a fixed policy while rewards keep arriving.
pub(super) async fn pause(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    set_paused(&state, true).await
}

/// `POST /admin/training/resume`: steps start again (at once if complete groups wait).
pub(super) async fn resume(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    set_paused(&state, false).await
}

async fn set_paused(state: &AppState, paused: bool) -> Result<Json<Value>, ApiError> {
    let Some(buffer) = &state.training else {
        return Err(ApiError::invalid("training", "this server does not train: start it with --train"));
    };
    let was = buffer.paused.swap(paused, std::sync::atomic::Ordering::AcqRel);
    // A step holds the gate from start to journal record: once we hold it, none is in flight
    // and (paused) none starts after.
    drop(buffer.step_gate.lock().await);
    if !paused {
        buffer.wake.notify_one();
    }
    tracing::info!(paused, was, "training steps {}", if paused { "paused" } else { "resumed" });
    Ok(Json(json!({"paused": paused, "was_paused": was, "policy_version": state.engine.policy_version.load(std::sync::atomic::Ordering::Acquire)})))
}

/// `GET /v1/training`.
pub(super) async fn status(State(state): State<AppState>) -> Json<Value> {
    match &state.training {
        Some(buffer) => {
            let mut snapshot = buffer.snapshot(&state.engine.policy_version);
            if let Some(checkpointer) = &state.checkpoints {
                snapshot["checkpoint"] = json!({
                    "last": checkpointer.last(),
                    "kept": checkpointer.list(),
                    "written": checkpointer.written.load(std::sync::atomic::Ordering::Relaxed),
                    "every_steps": checkpointer.policy().every_steps,
                    "every_s": checkpointer.policy().every.map(|d| d.as_secs_f64()),
                });
            }
            if let Some(journal) = &state.journal {
                snapshot["journal"] = json!(journal.path().display().to_string());
            }
            Json(snapshot)
        }
        None => Json(json!({"training": false, "policy_version": state.engine.policy_version.load(std::sync::atomic::Ordering::Acquire)})),
    }
}

fn reward_many(state: &AppState, entries: Vec<RewardEntry>) -> Result<Value, ApiError> {
    let Some(buffer) = &state.training else {
        return Err(ApiError::invalid("reward", "this server does not train: start it with --train"));
    };
    let rewards = buffer.record(&state.rollouts, entries)?;
    let completed = rewards.iter().filter(|r| r["status"] == "complete").count();
    Ok(json!({
        "accepted": true,
        "rewards": rewards,
        "groups_completed": completed,
        "policy_version": state.engine.policy_version.load(std::sync::atomic::Ordering::Acquire),
    }))
}

/// Records a reward computed by a plugin (`POST /v1/rollouts/{id}/score`). Without training
/// the reward is only stored on the rollout (once).
pub(super) async fn record_reward(state: &AppState, id: &str, reward: f64, group: Option<String>, group_size: Option<usize>) -> Result<Value, ApiError> {
    if state.training.is_none() {
        return match state.rollouts.set_reward(id, reward as f32, group) {
            Ok(_) => Ok(json!({"training": false})),
            Err(RewardRefusal::Unknown) => Err(ApiError::NotFound(format!("no rollout '{id}' (unknown or evicted)"))),
            Err(RewardRefusal::AlreadyRewarded(previous)) => Err(already_rewarded(id, previous)),
        };
    }
    let entry = RewardEntry { rollout_id: id.to_string(), reward, group_id: group, group_size };
    let mut reply = reward_off_runtime(state.clone(), vec![entry]).await?;
    reply["training"] = json!(true);
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The engine publishes a step's version the moment the weights change; the status keeps
    /// the version before it until the step is in the history, so a reader never sees a new
    /// version without the step that made it.
    #[test]
    fn the_status_shows_a_version_only_with_its_step() {
        let buffer = TrainingBuffer::new(TrainingSettings::default(), None);
        let engine_version = AtomicU64::new(3);
        assert_eq!(buffer.snapshot(&engine_version)["policy_version"], 3);

        buffer.step_started(3);
        engine_version.store(4, Ordering::Release);
        let during = buffer.snapshot(&engine_version);
        assert_eq!(during["policy_version"], 3);
        assert_eq!(during["last_steps"].as_array().map(Vec::len), Some(0));

        buffer.record_step(json!({"policy_version": 4}), None, &StepPluginReport::default());
        let after = buffer.snapshot(&engine_version);
        assert_eq!(after["policy_version"], 4);
        assert_eq!(after["last_steps"][0]["policy_version"], 4);
    }
}
