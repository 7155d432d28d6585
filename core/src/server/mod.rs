//! The OpenAI-compatible HTTP server.
//!
//! Handlers only translate: they validate a request, template and tokenize it, submit it to
//! the engine thread ([`crate::engine::scheduler`]) and turn token events into OpenAI
//! responses or server-sent events. They never touch tensors. Every finished choice is
//! recorded in the [`rollouts::RolloutStore`] with its exact token ids and sampling logprobs,
//! and in the state folder's [`journal`] when there is one; chat calls naming an episode go
//! through [`episodes`].
//!
//! Routes: `GET /health`, `GET /metrics` (open); `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/rollouts` (the journal, paged), `GET /v1/rollouts/{id}`,
//! `GET /v1/episodes/{id}`, `GET /v1/training` (behind the API key when one is set);
//! `POST /v1/rollouts/{id}/reward`, `POST /v1/rewards`, `POST /v1/rollouts/{id}/score`,
//! `POST /v1/episodes/{id}/reward`, which change the weights (behind the train key when one is
//! set, else the API key); `/admin/*` (plugins, `POST /admin/checkpoint`; behind the admin
//! key, refused without one).

mod chat;
pub mod checkpoints;
mod completions;
mod fields;
pub mod episodes;
pub mod plugins;
pub mod error;
pub mod journal;
pub mod metrics;
pub mod openai;
pub mod replicas;
mod requests;
pub mod rollouts;
mod stream;
mod structured;
pub mod training;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;

use crate::engine::scheduler::EngineHandle;
use error::ApiError;
use metrics::ServerMetrics;
use rollouts::RolloutStore;

/// Server settings that are not the engine's.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Bearer token required on `/v1/*`, if any.
    pub api_key: Option<String>,
    /// Bearer token required on `/admin/*`; admin routes refuse everything without one.
    pub admin_key: Option<String>,
    /// Bearer token required on the routes that change the weights (rewards, scores); when
    /// unset they take the API key like the rest of `/v1`.
    pub train_key: Option<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Completion length when a request gives none (capped by the context).
    pub default_max_tokens: usize,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The engine thread.
    pub engine: EngineHandle,
    /// Served completions.
    pub rollouts: Arc<RolloutStore>,
    /// Request metrics.
    pub metrics: Arc<ServerMetrics>,
    /// Settings.
    pub options: Arc<ServerOptions>,
    /// Reward collection, when the server trains online.
    pub training: Option<Arc<training::TrainingBuffer>>,
    /// Plugins (rewards, detectors, credit schemes), when configured.
    pub plugins: Option<Arc<plugins::PluginRegistry>>,
    /// The state folder's journal (served rollouts, rewards, groups, steps), when there is one.
    pub journal: Option<Arc<journal::Journal>>,
    /// Online checkpoints, when the server trains with a state folder.
    pub checkpoints: Option<Arc<checkpoints::Checkpointer>>,
    /// Agent episodes.
    pub episodes: Arc<episodes::EpisodeStore>,
    /// The data-parallel replicas to forward another replica's rollouts to, when training
    /// with replicas.
    pub replicas: Option<Arc<replicas::Replicas>>,
}

/// The router with every route and layer.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/rollouts", get(list_rollouts))
        .route("/v1/rollouts/{id}", get(get_rollout))
        .route("/v1/episodes/{id}", get(get_episode))
        .route("/v1/training", get(training::status))
        .route_layer(middleware::from_fn_with_state(state.clone(), replicas::forward_to_owner))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    // Rewards and scores move the weights, so they may need more than the inference key.
    let train = Router::new()
        .route("/v1/rollouts/{id}/reward", post(training::reward_one))
        .route("/v1/rewards", post(training::reward_batch))
        .route("/v1/rollouts/{id}/score", post(plugins::score))
        .route("/v1/episodes/{id}/reward", post(training::reward_episode))
        .route_layer(middleware::from_fn_with_state(state.clone(), replicas::forward_to_owner))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_train_key));
    let admin = Router::new()
        .route("/admin/plugins", get(plugins::list))
        .route("/admin/plugins/reload", post(plugins::reload))
        .route("/admin/checkpoint", post(checkpoints::admin_checkpoint))
        .route("/admin/training/pause", post(training::pause))
        .route("/admin/training/resume", post(training::resume))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin_key));
    Router::new()
        .route("/health", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/metrics", get(render_metrics))
        .merge(api)
        .merge(train)
        .merge(admin)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), record_request))
        .layer(DefaultBodyLimit::max(state.options.max_body_bytes))
        .with_state(state)
}

/// How long open connections may take to finish after a stop signal.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds `addr`, prints `listening on http://ADDR` to stderr, and serves until SIGTERM or
/// SIGINT. A stop writes the last checkpoint first (when training with a state folder), then
/// lets open connections finish for up to 10 s.
pub async fn serve(state: AppState, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if let Some(replicas) = &state.replicas {
        let url = advertised_url(local);
        replicas.publish(&url).map_err(|e| std::io::Error::other(format!("publishing this replica's address {url}: {e}")))?;
    }
    tracing::info!(%local, model = %state.engine.info.name, "serving");
    eprintln!("listening on http://{local}");
    if state.training.is_some() {
        // Steps run here, decoupled from the requests whose rewards completed their groups.
        tokio::spawn(training::run_steps(state.clone()));
        tokio::spawn(checkpoints::run_timer(state.clone()));
    }
    let (drain, drained) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(async {
        let _ = drained.await;
    });
    let stopping = async {
        checkpoints::stop_signal().await;
        eprintln!("stopping");
        checkpoints::on_stop(&state).await;
        let _ = drain.send(());
        tokio::time::sleep(DRAIN).await;
    };
    tokio::select! {
        served = server => served,
        () = stopping => {
            tracing::warn!("connections still open {} s after the stop signal; exiting", DRAIN.as_secs());
            Ok(())
        }
    }
}

/// The URL other replicas reach this one at: `HICRA_ADVERTISE_URL` when set, else the bound
/// address, with this machine's host name for a wildcard address (0.0.0.0, ::).
fn advertised_url(local: SocketAddr) -> String {
    if let Ok(url) = std::env::var("HICRA_ADVERTISE_URL") {
        return url.trim_end_matches('/').to_string();
    }
    if !local.ip().is_unspecified() {
        return format!("http://{local}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    format!("http://{host}:{}", local.port())
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(request: &Request) -> Option<&str> {
    request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether the request carries `key`. The comparison takes the same time wherever the bytes
/// differ, so response timing cannot reveal a key byte by byte; `ct_eq` returns early only on
/// a length mismatch, which leaks the key's length and nothing else (acceptable).
fn has_key(request: &Request, key: &str) -> bool {
    bearer(request).is_some_and(|given| bool::from(given.as_bytes().ct_eq(key.as_bytes())))
}

async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match &state.options.api_key {
        Some(key) if !has_key(&request, key) => ApiError::Unauthorized.into_response(),
        _ => next.run(request).await,
    }
}

/// With a train key, only it opens the weight-changing routes (the API key alone is a 401);
/// without one they are ordinary `/v1` routes.
async fn require_train_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match &state.options.train_key {
        Some(key) if !has_key(&request, key) => ApiError::TrainKeyRequired.into_response(),
        Some(_) => next.run(request).await,
        None => require_api_key(State(state), request, next).await,
    }
}

/// Admin routes refuse everything when no admin key is configured.
async fn require_admin_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match &state.options.admin_key {
        Some(key) if has_key(&request, key) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

async fn record_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "other".into());
    let started = Instant::now();
    let response = next.run(request).await;
    state.metrics.count_request(&endpoint, response.status().as_u16());
    if endpoint.starts_with("/v1/") && endpoint.ends_with("completions") {
        state.metrics.request_latency.observe(started.elapsed().as_secs_f64());
    }
    response
}

async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": state.engine.info.name,
            "object": "model",
            "created": 0,
            "owned_by": "hicra",
            "max_model_len": state.engine.info.max_context,
        }],
    }))
}

async fn get_rollout(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<rollouts::Rollout>, ApiError> {
    if let Some(rollout) = state.rollouts.get(&id) {
        return Ok(Json(rollout));
    }
    // Evicted from memory, or served before a restart: the journal still has it.
    let journaled = match &state.journal {
        Some(journal) => tokio::task::block_in_place(|| journal.rollout(&id)).map_err(|e| ApiError::Internal(e.to_string()))?,
        None => None,
    };
    journaled.map(Json).ok_or_else(|| ApiError::NotFound(format!("no rollout '{id}' (unknown or evicted)")))
}

/// `GET /v1/episodes/{id}`: the episode's segments, with each span marked sampled (logprobs,
/// policy versions, rollout) or context.
async fn get_episode(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    state.episodes.describe(&id).map(Json).ok_or_else(|| ApiError::NotFound(format!("no episode '{id}' (unknown, or dropped as least recently used)")))
}

/// Query of `GET /v1/rollouts`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutPage {
    /// Only rows after this one (the `last` of the previous page); 0 from the start.
    #[serde(default)]
    after: i64,
    /// Rows per page, at most 1000 [default: 100].
    limit: Option<usize>,
    /// Only rewarded rollouts.
    #[serde(default)]
    rewarded: bool,
}

/// Largest page of `GET /v1/rollouts`.
const MAX_PAGE: usize = 1000;

/// `GET /v1/rollouts?after=&limit=&rewarded=`: pages through the journal, oldest first.
async fn list_rollouts(State(state): State<AppState>, query: Result<axum::extract::Query<RolloutPage>, axum::extract::rejection::QueryRejection>) -> Result<Json<serde_json::Value>, ApiError> {
    let axum::extract::Query(page) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let Some(journal) = state.journal.clone() else {
        return Err(ApiError::NotFound("this server keeps no rollout log: start it with --train or --state-dir".into()));
    };
    let limit = page.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid("limit", format!("limit must be between 1 and {MAX_PAGE}, got {limit}")));
    }
    let (data, last) = tokio::task::spawn_blocking(move || journal.page(page.after, limit, page.rewarded))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let has_more = data.len() == limit;
    Ok(Json(serde_json::json!({"object": "list", "data": data, "last": last.unwrap_or(page.after), "has_more": has_more})))
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = state.metrics.render(&state.engine.stats, state.rollouts.counts());
    if let Some(registry) = &state.plugins {
        text.push_str(&registry.render_metrics());
    }
    let version = state.engine.policy_version.load(std::sync::atomic::Ordering::Acquire);
    metrics::write_metric(&mut text, "hicra_policy_version", "Version of the weights being served.", "gauge", version as f64);
    if let Some(buffer) = &state.training {
        text.push_str(&buffer.render_metrics());
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
