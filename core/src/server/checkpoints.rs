//! The state folder and online checkpoints: when a training server saves its state, and how
//! a stop saves it one last time.
//!
//! The state folder (`hicra serve --state-dir`, `./hicra-state` by default) holds:
//! - `LOCK`: locked by the one server that uses the folder;
//! - `journal.sqlite` (with `-wal`, `-shm`): rollouts, rewards, groups, steps ([`super::journal`]);
//! - `checkpoint-NNNNNNNNN/`: the last K checkpoints, named by policy version, and the
//!   `checkpoint` link to the newest ([`crate::train::checkpoint`]).
//!
//! A checkpoint is written every N steps, every T seconds when the policy changed, on
//! `POST /admin/checkpoint`, and on SIGTERM/SIGINT before the server exits. Its snapshot is
//! taken under the step gate, so a checkpoint of version v always comes with the journal's
//! record of every step up to v (see the journal's exactly-once argument).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::train::checkpoint::{CheckpointStore, Restored};

/// A state folder, locked for this process.
#[derive(Debug)]
pub struct StateFolder {
    root: PathBuf,
    /// Holds the `flock`; released by the OS when the process ends, however it ends.
    _lock: File,
}

impl StateFolder {
    /// Creates `root` if needed and locks it; fails when another process holds it.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(root).map_err(|e| anyhow::anyhow!("cannot create the state folder {}: {e}", root.display()))?;
        let path = root.join("LOCK");
        let mut lock = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!("the state folder {} is in use by another hicra process (pid {}); give this one its own --state-dir", root.display(), holder.trim());
        }
        lock.set_len(0).and_then(|()| write!(lock, "{}", std::process::id())).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Self { root: root.to_path_buf(), _lock: lock })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The journal's database file.
    pub fn journal_path(&self) -> PathBuf {
        self.root.join("journal.sqlite")
    }
}

/// When checkpoints are written.
#[derive(Clone, Debug)]
pub struct CheckpointPolicy {
    /// After this many steps that changed the weights (0: not by steps).
    pub every_steps: u64,
    /// After this long, when the weights changed since the last one.
    pub every: Option<Duration>,
}

/// A written checkpoint, as `GET /v1/training` and `POST /admin/checkpoint` show it.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointInfo {
    /// Its folder.
    pub path: String,
    /// The policy version it holds.
    pub policy_version: u64,
    /// Optimizer steps it holds.
    pub step: u64,
    /// Unix seconds when it was written (or restored).
    pub at: u64,
    /// Seconds the write took (0 for a restored one).
    pub write_seconds: f64,
    /// `restored`, `steps`, `timer`, `admin` or `shutdown`.
    pub reason: String,
}

/// Writes the training server's checkpoints.
#[derive(Debug)]
pub struct Checkpointer {
    store: CheckpointStore,
    policy: CheckpointPolicy,
    base_model: String,
    /// One write at a time (writes prune the folder).
    writing: tokio::sync::Mutex<()>,
    last: Mutex<Option<CheckpointInfo>>,
    updates_since: AtomicU64,
    /// Set by the shutdown checkpoint: no checkpoint may follow it (steps are frozen).
    stopping: std::sync::atomic::AtomicBool,
    /// Checkpoints written by this process.
    pub written: AtomicU64,
}

impl Checkpointer {
    /// A checkpointer writing into `store`; `restored` is the checkpoint the server started from.
    pub fn new(store: CheckpointStore, policy: CheckpointPolicy, base_model: String, restored: Option<&Restored>) -> Self {
        let last = restored.map(|r| CheckpointInfo {
            path: r.path.display().to_string(),
            policy_version: r.policy_version,
            step: r.step,
            at: super::unix_now(),
            write_seconds: 0.0,
            reason: "restored".into(),
        });
        Self { store, policy, base_model, writing: tokio::sync::Mutex::new(()), last: Mutex::new(last), updates_since: AtomicU64::new(0), stopping: std::sync::atomic::AtomicBool::new(false), written: AtomicU64::new(0) }
    }

    /// The newest checkpoint written or restored.
    pub fn last(&self) -> Option<CheckpointInfo> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The folder's checkpoints, newest first.
    pub fn list(&self) -> Vec<String> {
        self.store.list().into_iter().map(|(_, p)| p.display().to_string()).collect()
    }

    /// The policy: steps and seconds between checkpoints.
    pub fn policy(&self) -> &CheckpointPolicy {
        &self.policy
    }
}

/// Writes a checkpoint of the served weights now. With `freeze`, no training step runs after
/// the snapshot for the rest of the process (the shutdown checkpoint is the last word).
pub async fn checkpoint_now(state: &AppState, reason: &str, freeze: bool) -> Result<CheckpointInfo, String> {
    let (Some(buffer), Some(checkpointer)) = (&state.training, &state.checkpoints) else {
        return Err("this server writes no checkpoints: it does not train".into());
    };
    let behind = "a step's outcome is missing from the journal (see the log); a checkpoint now could make its groups train twice after a restart";
    if buffer.journal_behind() {
        return Err(behind.into());
    }
    let _writing = checkpointer.writing.lock().await;
    if checkpointer.stopping.load(Ordering::Acquire) {
        return Err("the server is stopping; its last checkpoint is written".into());
    }
    let gate = buffer.step_gate.clone().lock_owned().await;
    // Again under the gate: the step that held it may just have failed to record itself.
    if buffer.journal_behind() {
        return Err(behind.into());
    }
    let snapshot = state.engine.snapshot().await?.ok_or("the engine has no trainer")?;
    checkpointer.updates_since.store(0, Ordering::Release);
    if freeze {
        checkpointer.stopping.store(true, Ordering::Release);
        // Dropping the guard never happens: steps wait on the gate until the process exits.
        std::mem::forget(gate);
    } else {
        drop(gate);
    }
    tracing::info!(policy_version = snapshot.policy_version, reason, "writing checkpoint");
    let started = Instant::now();
    let store = checkpointer.store.clone();
    let base_model = checkpointer.base_model.clone();
    let (version, step) = (snapshot.policy_version, snapshot.step);
    let path = tokio::task::spawn_blocking(move || {
        let written = store.write(version, &snapshot, &base_model, serde_json::json!({}));
        // The snapshot copies the adapters and the optimizer's moments (tens to hundreds of
        // MB); the allocator keeps what is freed (see `memory`), so hand it back now rather
        // than at the next step.
        drop(snapshot);
        crate::memory::release_free_memory();
        written
    })
        .await
        .map_err(|e| format!("the checkpoint writer panicked: {e}"))?
        .map_err(|e| e.to_string())?;
    let info = CheckpointInfo { path: path.display().to_string(), policy_version: version, step, at: super::unix_now(), write_seconds: started.elapsed().as_secs_f64(), reason: reason.into() };
    tracing::info!(path = %info.path, policy_version = version, reason, seconds = info.write_seconds, "checkpoint written");
    *checkpointer.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.clone());
    // Among replicas a restart resumes from rank 0's checkpoint, whatever this one wrote; the
    // step worker gives the other replicas' journals rank 0's version instead.
    if let (Some(journal), true) = (&state.journal, buffer.writes_periodic_checkpoints()) {
        journal.set_checkpoint_version(version);
    }
    checkpointer.written.fetch_add(1, Ordering::Relaxed);
    Ok(info)
}

/// Called by the step worker after a step that changed the weights: starts a checkpoint when
/// `every_steps` updates have accumulated.
pub fn after_update(state: &AppState) {
    let Some(checkpointer) = &state.checkpoints else { return };
    if !state.training.as_ref().is_some_and(|buffer| buffer.writes_periodic_checkpoints()) {
        return;
    }
    let every = checkpointer.policy.every_steps;
    if every == 0 || checkpointer.updates_since.fetch_add(1, Ordering::AcqRel) + 1 < every {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        if let Err(err) = checkpoint_now(&state, "steps", false).await {
            tracing::error!(%err, "checkpoint failed");
        }
    });
}

/// Writes a checkpoint every `every` seconds when the weights changed since the last one.
pub async fn run_timer(state: AppState) {
    let Some(every) = state.checkpoints.as_ref().and_then(|c| c.policy.every) else { return };
    if !state.training.as_ref().is_some_and(|buffer| buffer.writes_periodic_checkpoints()) {
        return;
    }
    loop {
        tokio::time::sleep(every).await;
        let version = state.engine.policy_version.load(Ordering::Acquire);
        let saved = state.checkpoints.as_ref().and_then(|c| c.last()).map(|c| c.policy_version);
        if saved != Some(version) {
            if let Err(err) = checkpoint_now(&state, "timer", false).await {
                tracing::error!(%err, "checkpoint failed");
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops the server cleanly");
            let _ = interrupt.await;
        }
    }
}

/// What a stop does before connections drain: the last checkpoint, then no more steps, then
/// the journal's queued rollouts are written.
pub async fn on_stop(state: &AppState) {
    if state.checkpoints.is_some() {
        match checkpoint_now(state, "shutdown", true).await {
            Ok(info) => eprintln!("checkpoint written: {} (policy version {})", info.path, info.policy_version),
            Err(err) => tracing::error!(%err, "the shutdown checkpoint failed; the next start resumes from the previous one"),
        }
    }
    if let Some(journal) = &state.journal {
        journal.close();
    }
}

/// `POST /admin/checkpoint`: writes one now and returns it.
pub(super) async fn admin_checkpoint(State(state): State<AppState>) -> Result<Json<CheckpointInfo>, ApiError> {
    if state.checkpoints.is_none() {
        return Err(ApiError::invalid("checkpoint", "this server does not train, so it has no checkpoints: start it with --train"));
    }
    checkpoint_now(&state, "admin", false).await.map(Json).map_err(ApiError::Internal)
}
