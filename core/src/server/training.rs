//! Online training: clients reward served rollouts; complete groups train the served model.
//!
//! `POST /v1/rollouts/{id}/reward` `{"reward": r, "group_id": optional}` (or a batch at
//! `POST /v1/rewards` `{"rewards": [{"rollout_id", "reward", "group_id"}]}`). By default the
//! `n` choices of one request form a GRPO group, complete once all `n` are rewarded; a client
//! may name its own `group_id` instead, complete at `group_size` members. When
//! `groups_per_step` groups are complete, the engine thread runs one step between decode
//! steps, on the exact token ids and sampling logprobs the server recorded.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiJson};
use super::rollouts::Rollout;
use super::AppState;
use super::plugins::PluginRegistry;
use crate::analysis::{analyze_step, RolloutRecord, StepAnalysis};
use crate::plugins::step::{ScoredCompletion, StepPluginReport, StepPlugins};
use crate::train::planning::StrategicGrams;
use crate::train::trainer::RolloutGroup;

/// Complete groups waiting for a step, and groups still collecting rewards.
#[derive(Debug)]
pub struct TrainingBuffer {
    /// Groups per optimizer step.
    pub groups_per_step: usize,
    /// Members of a client-named group.
    pub group_size: usize,
    /// A loaded planning-token detector plugin to use instead of the paper's list.
    pub sg_plugin: Option<String>,
    /// A loaded credit plugin to compute advantages instead of the trainer's scheme.
    pub credit_plugin: Option<String>,
    /// Appends each step's rollouts here (JSON lines for `hicra analyze`), when set.
    pub rollout_log: Option<std::path::PathBuf>,
    grams: StrategicGrams,
    state: Mutex<BufferState>,
}

#[derive(Debug, Default)]
struct BufferState {
    collecting: HashMap<String, Vec<Rollout>>,
    ready: Vec<Vec<Rollout>>,
}

impl TrainingBuffer {
    /// A buffer stepping every `groups_per_step` complete groups.
    pub fn new(groups_per_step: usize, group_size: usize) -> Self {
        Self {
            groups_per_step: groups_per_step.max(1),
            group_size: group_size.max(2),
            sg_plugin: None,
            credit_plugin: None,
            rollout_log: None,
            grams: StrategicGrams::paper(),
            state: Mutex::new(BufferState::default()),
        }
    }

    /// Adds a rewarded rollout; returns whether its group completed, and the groups of a full
    /// step when one is ready.
    fn add(&self, rollout: Rollout, named_group: bool) -> (bool, Option<Vec<Vec<Rollout>>>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let expected = if named_group { self.group_size } else { rollout.group_size };
        let key = rollout.group.clone();
        let members = state.collecting.entry(key.clone()).or_default();
        members.retain(|m| m.id != rollout.id);
        members.push(rollout);
        if members.len() < expected {
            return (false, None);
        }
        let members = state.collecting.remove(&key).unwrap_or_default();
        state.ready.push(members);
        if state.ready.len() >= self.groups_per_step {
            return (true, Some(std::mem::take(&mut state.ready)));
        }
        (true, None)
    }

    /// The step's rollouts as analysis records (step = the policy version that sampled them).
    fn records(raw: &[Vec<Rollout>]) -> Vec<RolloutRecord> {
        raw.iter()
            .flatten()
            .map(|r| RolloutRecord {
                step: r.policy_version,
                group: r.group.clone(),
                reward: r.reward.unwrap_or(0.0),
                pieces: r.token_texts.clone(),
                logprobs: r.logprobs.clone(),
                entropies: r.entropies.clone(),
            })
            .collect()
    }

    /// Analyses the step's rollouts and appends them to the rollout log. Blocking.
    fn analyze_and_log(&self, raw: &[Vec<Rollout>]) -> StepAnalysis {
        let records = Self::records(raw);
        if let Some(path) = &self.rollout_log {
            let lines: String = records.iter().map(|r| serde_json::to_string(r).unwrap_or_default() + "\n").collect();
            let written = std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()));
            if let Err(err) = written {
                tracing::warn!(path = %path.display(), %err, "could not append to the rollout log");
            }
        }
        analyze_step(&records, &self.grams)
    }

    /// Turns complete groups into training groups: planning masks from the detector plugin
    /// (or the paper's list), advantages from the credit plugin (or, later, the trainer's
    /// scheme). Blocking: plugin calls run here.
    fn build_groups(&self, raw: Vec<Vec<Rollout>>, plugins: Option<&PluginRegistry>) -> (Vec<RolloutGroup>, StepPluginReport) {
        let generation = plugins.map(|p| p.current()).unwrap_or_default();
        let find = |name: &Option<String>| name.as_ref().and_then(|n| generation.iter().find(|p| &p.name == n).cloned());
        let step_plugins = StepPlugins {
            detector: find(&self.sg_plugin),
            credit: find(&self.credit_plugin),
            timeout: plugins.map(|p| p.timeout).unwrap_or(StepPlugins::built_in().timeout),
        };
        let mut report = step_plugins.report();
        let mut groups = Vec::new();
        for members in raw {
            let prompt_ids = members.first().map(|m| m.prompt_token_ids.clone()).unwrap_or_default();
            let temperature = members.first().map(|m| m.temperature).unwrap_or(1.0);
            let completions = members
                .into_iter()
                .map(|m| ScoredCompletion { pieces: m.token_texts, completion_ids: m.completion_token_ids, logprobs: m.logprobs, entropies: m.entropies, reward: m.reward.unwrap_or(0.0) })
                .collect();
            groups.extend(step_plugins.build_group(prompt_ids, temperature, completions, &self.grams, &mut report));
        }
        (groups, report)
    }
}

/// Body of a single reward.
#[derive(Debug, Deserialize)]
pub(super) struct RewardBody {
    reward: f64,
    group_id: Option<String>,
}

/// One entry of the batch form.
#[derive(Debug, Deserialize)]
pub(super) struct BatchEntry {
    rollout_id: String,
    reward: f64,
    group_id: Option<String>,
}

/// Body of the batch form.
#[derive(Debug, Deserialize)]
pub(super) struct BatchBody {
    rewards: Vec<BatchEntry>,
}

pub(super) async fn reward_one(State(state): State<AppState>, Path(id): Path<String>, ApiJson(body): ApiJson<RewardBody>) -> Result<Json<Value>, ApiError> {
    let entries = vec![BatchEntry { rollout_id: id, reward: body.reward, group_id: body.group_id }];
    reward_many(state, entries).await
}

pub(super) async fn reward_batch(State(state): State<AppState>, ApiJson(body): ApiJson<BatchBody>) -> Result<Json<Value>, ApiError> {
    reward_many(state, body.rewards).await
}

async fn reward_many(state: AppState, entries: Vec<BatchEntry>) -> Result<Json<Value>, ApiError> {
    if state.training.is_none() {
        return Err(ApiError::invalid("reward", "this server does not train: start it with --train"));
    }
    // Validate everything before recording anything.
    for entry in &entries {
        if !entry.reward.is_finite() {
            return Err(ApiError::invalid("reward", format!("reward for '{}' must be a finite number", entry.rollout_id)));
        }
        if state.rollouts.get(&entry.rollout_id).is_none() {
            return Err(ApiError::NotFound(format!("no rollout '{}' (unknown or evicted)", entry.rollout_id)));
        }
    }
    let mut completed = 0;
    let mut steps = Vec::new();
    for entry in entries {
        let outcome = record_reward(&state, &entry.rollout_id, entry.reward, entry.group_id).await?;
        completed += outcome["group_completed"].as_bool().unwrap_or(false) as usize;
        if let Some(more) = outcome["steps"].as_array() {
            steps.extend(more.iter().cloned());
        }
    }
    Ok(Json(json!({
        "accepted": true,
        "groups_completed": completed,
        "policy_version": state.engine.policy_version.load(std::sync::atomic::Ordering::Acquire),
        "steps": steps,
    })))
}

/// Stores a rollout's reward and, when the server trains, files it into its group and runs a
/// step if that completes one. Returns what happened, as JSON.
pub(super) async fn record_reward(state: &AppState, id: &str, reward: f64, group: Option<String>) -> Result<Value, ApiError> {
    if !reward.is_finite() {
        return Err(ApiError::invalid("reward", format!("reward for '{id}' must be a finite number")));
    }
    let named = group.is_some();
    let rollout = state.rollouts.set_reward(id, reward as f32, group).ok_or_else(|| ApiError::NotFound(format!("no rollout '{id}' (unknown or evicted)")))?;
    let Some(buffer) = state.training.clone() else {
        return Ok(json!({"training": false}));
    };
    let (group_completed, ready) = buffer.add(rollout, named);
    let mut steps = Vec::new();
    if let Some(raw) = ready {
        let registry = state.plugins.clone();
        let builder = buffer.clone();
        let (groups, plugin_report, batch) = tokio::task::spawn_blocking(move || {
            let batch = builder.analyze_and_log(&raw);
            let (groups, report) = builder.build_groups(raw, registry.as_deref());
            (groups, report, batch)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        let report = state.engine.train(groups).await.map_err(ApiError::Internal)?;
        state.metrics.record_step(&report, &batch);
        let mut entry = serde_json::to_value(&report).unwrap_or_default();
        if let (Some(object), Ok(Value::Object(extra))) = (entry.as_object_mut(), serde_json::to_value(&batch)) {
            object.extend(extra);
            object.insert("plugins".into(), serde_json::to_value(&plugin_report).unwrap_or_default());
        }
        steps.push(entry);
    }
    Ok(json!({"training": true, "group_completed": group_completed, "steps": steps}))
}
