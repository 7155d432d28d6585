//! Plugins in the server: a registry swapped atomically on reload, the admin routes,
//! and `POST /v1/rollouts/{id}/score` which rewards a rollout with a plugin.
//!
//! A reload loads every configured library as a new generation, smoke-tests it, and only then
//! replaces the registry; any failure keeps the previous generation serving. Calls in flight
//! keep the `Arc` of the generation they started with. Every plugin call of a reload (opening,
//! `configure`, the smoke test) runs under the same time-out as serving calls, so a plugin that
//! hangs fails the reload instead of hanging it.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiJson};
use super::metrics::write_metric;
use super::AppState;
use crate::plugins::{self, Plugin, PluginError};
use abi_stable::std_types::RVec;
use hicra_sdk::{CreditGroup, DetectItem, PluginKind, RewardItem};

/// The plugins a server was configured with and the generation now serving.
#[derive(Debug)]
pub struct PluginRegistry {
    /// Libraries named one by one.
    sources: Vec<PathBuf>,
    /// A folder whose libraries are loaded too (listed anew at every reload).
    folder: Option<PathBuf>,
    /// Plugin name -> configuration (JSON object).
    configs: Value,
    current: RwLock<Arc<Vec<Plugin>>>,
    /// Per-call time-out.
    pub timeout: Duration,
    /// Generations loaded so far (libraries are never unloaded; each pins its code).
    loaded: std::sync::atomic::AtomicUsize,
    /// Held for a whole reload, so the watcher and the admin route never interleave (the later
    /// one to finish could otherwise swap in a set listed before the earlier one's change).
    reloading: std::sync::Mutex<()>,
}

impl PluginRegistry {
    /// Loads every source and the folder's libraries; fails if any fails (at start-up a bad
    /// plugin is a configuration error).
    pub fn new(sources: Vec<PathBuf>, folder: Option<PathBuf>, configs: Value, timeout: Duration) -> Result<Self, PluginError> {
        let registry = Self { sources, folder, configs, current: RwLock::new(Arc::new(Vec::new())), timeout, loaded: Default::default(), reloading: Default::default() };
        registry.reload()?;
        Ok(registry)
    }

    /// The named libraries, then the folder's.
    fn all_sources(&self) -> Result<Vec<PathBuf>, PluginError> {
        let mut all = self.sources.clone();
        if let Some(folder) = &self.folder {
            all.extend(plugins::libraries_in(folder)?);
        }
        Ok(all)
    }

    /// The generation serving now.
    pub fn current(&self) -> Arc<Vec<Plugin>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads a new generation of every plugin, smoke-tests it, then swaps it in.
    pub fn reload(&self) -> Result<Arc<Vec<Plugin>>, PluginError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh: Vec<Plugin> = Vec::new();
        for source in &self.all_sources()? {
            let plugin = plugins::open(source, self.timeout)?;
            // Mapped from here on, whatever happens next.
            self.loaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(other) = fresh.iter().find(|p| p.name == plugin.name) {
                return Err(PluginError::Load { path: source.clone(), message: format!("another library ({}) is also named '{}'", other.source.display(), plugin.name) });
            }
            plugin.configure(self.configs.get(&plugin.name).unwrap_or(&json!({})), self.timeout)?;
            smoke_test(&plugin, self.timeout)?;
            fresh.push(plugin);
        }
        let fresh = Arc::new(fresh);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    /// Library generations loaded since start (each stays mapped).
    pub fn generations_loaded(&self) -> usize {
        self.loaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Prometheus lines for the generations held, the memory they pin and the call threads
    /// still hung.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        let loaded = self.generations_loaded() as f64;
        write_metric(&mut out, "hicra_plugin_generations_loaded", "Plugin library generations loaded since start (never unloaded).", "gauge", loaded);
        let hung = plugins::hung_calls() as f64;
        write_metric(&mut out, "hicra_plugin_hung_calls", "Plugin calls still running after their time-out, over all generations.", "gauge", hung);
        if let Some(bytes) = plugins::pinned_bytes() {
            write_metric(&mut out, "hicra_plugin_pinned_bytes", "Address space mapped from loaded plugin libraries.", "gauge", bytes as f64);
        }
        out
    }

    /// Size and modification time of every source, to notice a changed or added library.
    fn fingerprint(&self) -> Vec<(PathBuf, Option<(u64, std::time::SystemTime)>)> {
        let sources = self.all_sources().unwrap_or_else(|_| self.sources.clone());
        sources
            .into_iter()
            .map(|path| {
                let stamp = std::fs::metadata(&path).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
                (path, stamp)
            })
            .collect()
    }

    /// Polls the sources every `interval` and reloads when they changed and then stayed
    /// unchanged for one more poll (a library still being written is not loaded). A failed
    /// reload keeps the serving generation and waits for the next change. The thread ends
    /// when the registry is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        let registry = Arc::downgrade(self);
        let mut loaded = self.fingerprint();
        let mut previous = loaded.clone();
        std::thread::Builder::new().name("plugin-watch".into()).spawn(move || loop {
            std::thread::sleep(interval);
            let Some(registry) = registry.upgrade() else { return };
            let now = registry.fingerprint();
            if now != loaded && now == previous {
                match registry.reload() {
                    Ok(fresh) => tracing::info!(plugins = fresh.len(), "plugins changed on disk: reloaded"),
                    Err(err) => tracing::warn!(%err, "plugins changed on disk but the reload failed; the previous plugins keep serving"),
                }
                loaded = now.clone();
            }
            previous = now;
        })?;
        Ok(())
    }
}

/// One harmless call of the plugin's kind: a library that cannot answer it is not swapped in.
/// Per-item failures are fine here (a reward may need metadata the probe lacks).
fn smoke_test(plugin: &Plugin, timeout: Duration) -> Result<(), PluginError> {
    match plugin.kind {
        PluginKind::Reward => plugin.score(vec![RewardItem { metadata_json: "{}".into(), ..RewardItem::default() }], timeout).map(drop),
        PluginKind::SgDetector => plugin.detect(vec![DetectItem::default()], timeout).map(drop),
        PluginKind::Credit => {
            let group = CreditGroup {
                rewards: vec![1.0, 0.0].into(),
                planning_masks: vec![RVec::from(vec![1u8]), RVec::from(vec![0u8])].into(),
                entropies: vec![RVec::from(vec![0.5f32]), RVec::from(vec![0.5f32])].into(),
            };
            plugin.credit(group, timeout).map(drop)
        }
    }
}

fn describe(registry: &PluginRegistry, plugins: &[Plugin]) -> Value {
    json!({
        "plugins": plugins.iter().map(|p| json!({
            "name": p.name, "kind": format!("{:?}", p.kind), "version": p.version,
            "generation": p.generation, "source": p.source, "hung_calls": p.hung_calls(),
        })).collect::<Vec<_>>(),
        "generations_loaded": registry.generations_loaded(),
        // Over all generations, discarded ones included; each generation refuses calls at the cap.
        "hung_calls": plugins::hung_calls(),
        "max_hung_calls": plugins::MAX_HUNG_CALLS,
        "pinned_bytes": plugins::pinned_bytes(),
    })
}

pub(super) async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let registry = state.plugins.as_ref().ok_or_else(|| ApiError::NotFound("no plugins configured".into()))?;
    Ok(Json(describe(registry, &registry.current())))
}

pub(super) async fn reload(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let registry = state.plugins.clone().ok_or_else(|| ApiError::NotFound("no plugins configured".into()))?;
    // Loading runs plugin code: keep it off the async workers.
    let result = tokio::task::spawn_blocking(move || registry.reload().map(|fresh| (registry, fresh)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match result {
        Ok((registry, fresh)) => Ok(Json(describe(&registry, &fresh))),
        Err(err) => Err(ApiError::InvalidRequest { message: format!("reload failed, previous plugins keep serving: {err}"), param: None }),
    }
}

/// Body of `POST /v1/rollouts/{id}/score`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScoreBody {
    /// Plugin name (the only plugin when omitted).
    plugin: Option<String>,
    /// Passed to the plugin as `metadata_json` (e.g. the reference answer).
    #[serde(default)]
    metadata: Value,
    /// A client-named training group, as in a reward.
    group_id: Option<String>,
    /// Members of that group (its first reward fixes it).
    group_size: Option<usize>,
}

pub(super) async fn score(State(state): State<AppState>, Path(id): Path<String>, ApiJson(body): ApiJson<ScoreBody>) -> Result<Response, ApiError> {
    let registry = state.plugins.clone().ok_or_else(|| ApiError::invalid("plugin", "no reward plugins configured (--plugin)"))?;
    let rollout = state.rollouts.get(&id).ok_or_else(|| ApiError::NotFound(format!("no rollout '{id}' (unknown or evicted)")))?;
    if let Some(previous) = rollout.reward {
        return Err(super::training::already_rewarded(&id, previous));
    }
    let generation = registry.current();
    let plugin = match &body.plugin {
        Some(name) => generation.iter().find(|p| &p.name == name),
        None if generation.len() == 1 => generation.first(),
        None => None,
    }
    .cloned()
    .ok_or_else(|| ApiError::invalid("plugin", format!("name one of: {}", generation.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "))))?;
    let item = RewardItem {
        prompt: state.engine.tokenizer.decode(&rollout.prompt_token_ids, false).unwrap_or_default().into(),
        completion: rollout.text.clone().into(),
        token_ids: rollout.completion_token_ids.clone().into(),
        metadata_json: if body.metadata.is_null() { "{}".to_string() } else { body.metadata.to_string() }.into(),
    };
    let timeout = registry.timeout;
    let outcome = tokio::task::spawn_blocking(move || plugin.score(vec![item], timeout).map(|r| (plugin, r)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let (plugin, mut results) = outcome.map_err(|e| {
        // The whole call failed, and with it the item: both are counted.
        state.metrics.count_plugin_call_failure();
        state.metrics.count_plugin_failure();
        ApiError::InvalidRequest { message: format!("{e}; the rollout stays unrewarded"), param: Some("plugin") }
    })?;
    let score = match results.pop() {
        Some(Ok(score)) => score,
        Some(Err(message)) => {
            state.metrics.count_plugin_failure();
            return Err(ApiError::InvalidRequest { message: format!("plugin '{}' failed this item: {message}; the rollout stays unrewarded", plugin.name), param: Some("plugin") });
        }
        None => return Err(ApiError::Internal("plugin returned no result".into())),
    };
    let reward = super::training::record_reward(&state, &id, score.score as f64, body.group_id.clone(), body.group_size).await?;
    Ok(Json(json!({
        "rollout_id": id,
        "plugin": plugin.name,
        "generation": plugin.generation,
        "score": score.score,
        "message": score.message.as_str(),
        "subscores": score.subscores.iter().map(|t| json!({"name": t.0.as_str(), "value": t.1})).collect::<Vec<_>>(),
        "training": reward,
    }))
    .into_response())
}
