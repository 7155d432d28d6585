//! Checkpoints: the adapters in PEFT's format plus the whole trainer state, written atomically
//! into a folder that keeps the last K.
//!
//! Layout of a checkpoint folder `<root>/checkpoint-<label>` (`label`: the policy version
//! online, the next loop step offline, zero-padded so names sort):
//! - `adapter_config.json`, `adapter_model.safetensors`: PEFT's file and tensor names, so
//!   `PeftModel.from_pretrained`, vLLM and `hicra serve --adapter` load the folder as it is;
//! - `trainer_state.safetensors`: AdamW's moments;
//! - `trainer_state.json`: optimizer step, policy version, trainer configuration, parameter
//!   names and the caller's extra state. Written last.
//!
//! `<root>/checkpoint` is a symbolic link to the newest one, for people and tools.
//!
//! Invariant: a folder named `checkpoint-<label>` is always complete. A checkpoint is written
//! into `<root>/.tmp-checkpoint-<label>-<pid>`, every file and the folder are fsynced, one
//! `rename` gives it its name, and the root is fsynced. Old ones are renamed to `.trash-*`
//! before they are deleted, so a crash never leaves a half-deleted folder under a valid name.
//! A crash at any instant therefore leaves every earlier checkpoint loadable; leftovers of an
//! interrupted write are swept when the store is opened. [`CheckpointStore::load_newest`]
//! validates every tensor before it changes the trainer, and falls back to older checkpoints.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tch::{Kind, Tensor};

use super::trainer::{Trainer, TrainerConfig};

/// Name prefix of checkpoint folders, and the name of the link to the newest.
const PREFIX: &str = "checkpoint";
/// Test-only: milliseconds to sleep after each file of a checkpoint, to widen the window in
/// which crash tests kill the writer.
const SLOW_WRITE_ENV: &str = "HICRA_TEST_SLOW_CHECKPOINT_MS";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Filesystem failure, naming the path.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tensor file could not be written or read.
    #[error("{}: {message}", path.display())]
    Tensors {
        /// The file.
        path: PathBuf,
        /// libtorch's explanation.
        message: String,
    },
    /// A file of the checkpoint is unreadable or malformed (damaged on disk).
    #[error("{}: {reason}", path.display())]
    Damaged {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint does not match this trainer.
    #[error("{}: {reason}", path.display())]
    Mismatch {
        /// The checkpoint directory.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// A copy of everything a checkpoint holds, taken between steps. Capturing is quick (the
/// engine thread copies a few MB of adapter and moment tensors); writing it, which fsyncs,
/// can then happen on another thread while the engine serves.
pub struct TrainerSnapshot {
    /// Adapter tensors under PEFT names, on the CPU, detached copies.
    pub adapters: Vec<(String, Tensor)>,
    /// `exp_avg.{i}` and `exp_avg_sq.{i}`, on the CPU.
    pub moments: Vec<(String, Tensor)>,
    /// Optimizer steps taken.
    pub step: u64,
    /// Version of the weights the adapters are.
    pub policy_version: u64,
    /// The trainer's configuration.
    pub config: TrainerConfig,
}

/// A deep CPU copy: the training thread keeps updating the original in place.
fn cpu_copy(tensor: &Tensor) -> Tensor {
    tensor.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).copy()
}

impl TrainerSnapshot {
    /// Copies `trainer`'s state.
    pub fn capture(trainer: &mut Trainer) -> Self {
        let adapters = trainer.parameters().iter().map(|(name, t)| (name.clone(), cpu_copy(t))).collect();
        let policy_version = trainer.policy_version();
        let config = trainer.config().clone();
        let mut moments = Vec::new();
        for (i, (m, v)) in trainer.moments().iter().enumerate() {
            moments.push((format!("exp_avg.{i}"), cpu_copy(m)));
            moments.push((format!("exp_avg_sq.{i}"), cpu_copy(v)));
        }
        Self { adapters, moments, step: trainer.optimizer().step, policy_version, config }
    }
}

/// What [`CheckpointStore::load_newest`] restored besides the tensors.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The checkpoint folder.
    pub path: PathBuf,
    /// Its label.
    pub label: u64,
    /// Optimizer steps taken.
    pub step: u64,
    /// Policy version served after the restore.
    pub policy_version: u64,
    /// The caller's extra state.
    pub extra: serde_json::Value,
    /// The configuration the checkpoint was trained with.
    pub config: Option<TrainerConfig>,
}

/// A folder of checkpoints, newest kept, oldest deleted beyond `keep`.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: PathBuf,
    keep: usize,
    slow_write: Option<Duration>,
}

impl CheckpointStore {
    /// Opens (creating) `root`, keeping the newest `keep` checkpoints (at least 1), and sweeps
    /// what interrupted writes and deletions left behind.
    pub fn open(root: &Path, keep: usize) -> Result<Self, CheckpointError> {
        fs::create_dir_all(root).map_err(io(root))?;
        let slow_write = std::env::var(SLOW_WRITE_ENV).ok().and_then(|v| v.parse().ok()).map(Duration::from_millis);
        let store = Self { root: root.to_path_buf(), keep: keep.max(1), slow_write };
        store.sweep()?;
        Ok(store)
    }

    /// The folder holding the checkpoints.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes `.tmp-*` and `.trash-*` folders, and the `checkpoint.tmp-*` / `checkpoint.old-*`
    /// siblings earlier versions left.
    fn sweep(&self) -> Result<(), CheckpointError> {
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let leftover = name.starts_with(".tmp-") || name.starts_with(".trash-") || name.starts_with("checkpoint.tmp-") || name.starts_with("checkpoint.old-");
            if leftover {
                tracing::info!(path = %entry.path().display(), "removing what an interrupted checkpoint write left");
                fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
            }
        }
        Ok(())
    }

    fn folder(&self, label: u64) -> PathBuf {
        self.root.join(format!("{PREFIX}-{label:09}"))
    }

    /// Checkpoints by label, newest first.
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let mut found: Vec<(u64, PathBuf)> = fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let label = name.strip_prefix(PREFIX)?.strip_prefix('-')?.parse().ok()?;
                        e.file_type().ok()?.is_dir().then(|| (label, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort_by_key(|(label, _)| std::cmp::Reverse(*label));
        found
    }

    /// Writes `snapshot` as checkpoint `label` atomically, points the `checkpoint` link at it and
    /// deletes checkpoints beyond the newest `keep`. A complete checkpoint with this label can
    /// only hold this same state (labels are policy versions or loop steps, and a damaged one
    /// was moved aside by [`Self::load_newest`]), so it is kept as it is.
    pub fn write(&self, label: u64, snapshot: &TrainerSnapshot, base_model: &str, extra: serde_json::Value) -> Result<PathBuf, CheckpointError> {
        let target = self.folder(label);
        if target.is_dir() {
            tracing::debug!(path = %target.display(), "checkpoint exists already");
            return Ok(target);
        }
        let tmp = self.root.join(format!(".tmp-{PREFIX}-{label:09}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let lora = snapshot.config.lora.peft_adapter_config(base_model);
        self.write_json(&tmp.join("adapter_config.json"), &lora)?;
        self.write_tensors(&tmp.join("adapter_model.safetensors"), &snapshot.adapters)?;
        self.write_tensors(&tmp.join("trainer_state.safetensors"), &snapshot.moments)?;
        let state = serde_json::json!({
            "step": snapshot.step,
            "policy_version": snapshot.policy_version,
            "label": label,
            "base_model": base_model,
            "config": snapshot.config,
            "parameter_names": snapshot.adapters.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            "extra": extra,
        });
        self.write_json(&tmp.join("trainer_state.json"), &state)?;
        sync(&tmp)?;
        // The one step that makes the checkpoint exist.
        fs::rename(&tmp, &target).map_err(io(&target))?;
        sync(&self.root)?;
        self.point_link(&target);
        // The checkpoint exists from here on: a failed clean-up is not a failed checkpoint.
        if let Err(err) = self.prune() {
            tracing::warn!(%err, "old checkpoints could not be deleted");
        }
        Ok(target)
    }

    fn pause(&self) {
        if let Some(pause) = self.slow_write {
            std::thread::sleep(pause);
        }
    }

    fn write_json(&self, path: &Path, value: &serde_json::Value) -> Result<(), CheckpointError> {
        let text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::Mismatch { path: path.to_path_buf(), reason: e.to_string() })?;
        fs::write(path, text).map_err(io(path))?;
        sync(path)?;
        self.pause();
        Ok(())
    }

    fn write_tensors(&self, path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
        Tensor::write_safetensors(tensors, path).map_err(|e| CheckpointError::Tensors { path: path.to_path_buf(), message: e.to_string() })?;
        sync(path)?;
        self.pause();
        Ok(())
    }

    /// Re-points `<root>/checkpoint` at `target` (a new link renamed over the old one, so the
    /// link is never missing). Best effort: the link is a convenience, resume never reads it.
    fn point_link(&self, target: &Path) {
        let link = self.root.join(PREFIX);
        let Some(name) = target.file_name() else { return };
        let tmp = self.root.join(format!(".tmp-link-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let linked = std::os::unix::fs::symlink(name, &tmp).and_then(|()| fs::rename(&tmp, &link));
        if let Err(err) = linked {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(link = %link.display(), %err, "could not point the checkpoint link at the newest checkpoint");
        }
    }

    /// Deletes all but the newest `keep` checkpoints, each renamed away first.
    fn prune(&self) -> Result<(), CheckpointError> {
        for (label, path) in self.list().into_iter().skip(self.keep) {
            let trash = self.root.join(format!(".trash-{PREFIX}-{label:09}-{}", std::process::id()));
            fs::rename(&path, &trash).map_err(io(&path))?;
            fs::remove_dir_all(&trash).map_err(io(&trash))?;
        }
        Ok(())
    }

    /// Restores the newest checkpoint of `base_model` that loads completely into `trainer`;
    /// `None` when there is none. A damaged checkpoint (unreadable or malformed files) is
    /// moved aside to `damaged-checkpoint-<label>` and the next older one is tried; one of
    /// another base model or LoRA shape is an error (older ones would not fit either).
    pub fn load_newest(&self, trainer: &mut Trainer, base_model: &str) -> Result<Option<Restored>, CheckpointError> {
        let mut last_error = None;
        for (label, path) in self.list() {
            match load(&path, trainer, Some(base_model)) {
                Ok(restored) => return Ok(Some(Restored { label, ..restored })),
                Err(err @ CheckpointError::Mismatch { .. }) => return Err(err),
                Err(err) => {
                    let aside = self.root.join(format!("damaged-{PREFIX}-{label:09}"));
                    tracing::warn!(path = %path.display(), %err, aside = %aside.display(), "checkpoint is damaged; moved aside, trying an older one");
                    let _ = fs::remove_dir_all(&aside);
                    fs::rename(&path, &aside).map_err(io(&path))?;
                    last_error = Some(err);
                }
            }
        }
        match last_error {
            // Every checkpoint was damaged: starting over silently would throw their training away.
            Some(err) => Err(err),
            None => Ok(None),
        }
    }
}

/// fsyncs a file or a folder (a folder's entries: the names of its files).
fn sync(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// Restores adapters, optimizer moments, step and policy version from checkpoint folder `dir`
/// into `trainer`. Every tensor is read and checked before any is copied, so a damaged or
/// mismatched checkpoint leaves the trainer as it was. With `base_model`, a checkpoint that
/// records another base model is refused (same shapes would load silently).
pub fn load(dir: &Path, trainer: &mut Trainer, base_model: Option<&str>) -> Result<Restored, CheckpointError> {
    let state_path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let mismatch = |reason: String| CheckpointError::Mismatch { path: dir.to_path_buf(), reason };
    let damaged = |reason: String| CheckpointError::Damaged { path: dir.to_path_buf(), reason };
    let state: serde_json::Value = serde_json::from_str(&text).map_err(|e| damaged(format!("trainer_state.json is not valid JSON: {e}")))?;
    let step = state["step"].as_u64().ok_or_else(|| damaged("trainer_state.json lacks 'step'".into()))?;
    let policy_version = state["policy_version"].as_u64().unwrap_or(step);
    if let (Some(expected), Some(recorded)) = (base_model, state["base_model"].as_str()) {
        if expected != recorded {
            return Err(mismatch(format!("trained on base model '{recorded}', not '{expected}': use another state or output folder for another model")));
        }
    }
    let read = |name: &str| {
        let path = dir.join(name);
        Tensor::read_safetensors(&path).map_err(|e| CheckpointError::Tensors { path, message: e.to_string() })
    };
    let adapters = read("adapter_model.safetensors")?;
    let moments = read("trainer_state.safetensors")?;
    let find = |from: &[(String, Tensor)], name: &str, target: &Tensor| -> Result<Tensor, CheckpointError> {
        // A missing tensor means other target modules: a configuration change, not damage.
        let (_, source) = from.iter().find(|(n, _)| n == name).ok_or_else(|| mismatch(format!("'{name}' missing (another LoRA configuration?)")))?;
        if source.size() != target.size() {
            return Err(mismatch(format!("'{name}' has shape {:?}, this trainer's is {:?} (another LoRA configuration?)", source.size(), target.size())));
        }
        Ok(source.shallow_clone())
    };
    // Phase 1: find and check everything.
    let mut copies = Vec::new();
    for (name, target) in trainer.parameters() {
        copies.push((target.shallow_clone(), find(&adapters, name, target)?));
    }
    for (i, (m, v)) in trainer.moments().into_iter().enumerate() {
        let (m_source, v_source) = (find(&moments, &format!("exp_avg.{i}"), &m)?, find(&moments, &format!("exp_avg_sq.{i}"), &v)?);
        copies.push((m, m_source));
        copies.push((v, v_source));
    }
    // Phase 2: copy.
    tch::no_grad(|| {
        for (mut target, source) in copies {
            target.copy_(&source.to_kind(target.kind()).to_device(target.device()));
        }
    });
    trainer.optimizer().step = step;
    trainer.set_policy_version(policy_version);
    let label = state["label"].as_u64().unwrap_or(policy_version);
    Ok(Restored { path: dir.to_path_buf(), label, step, policy_version, extra: state["extra"].clone(), config: serde_json::from_value(state["config"].clone()).ok() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hicra-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn leftovers_of_interrupted_writes_are_swept_and_never_listed() -> Result<(), CheckpointError> {
        let root = scratch("sweep");
        fs::create_dir_all(root.join(".tmp-checkpoint-000000003-77")).map_err(io(&root))?;
        fs::create_dir_all(root.join(".trash-checkpoint-000000001-77")).map_err(io(&root))?;
        fs::create_dir_all(root.join("checkpoint.tmp-12")).map_err(io(&root))?;
        fs::create_dir_all(root.join("checkpoint.old-12")).map_err(io(&root))?;
        fs::create_dir_all(root.join("checkpoint-000000002")).map_err(io(&root))?;
        let store = CheckpointStore::open(&root, 2)?;
        let names: Vec<String> = fs::read_dir(&root).map_err(io(&root))?.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["checkpoint-000000002".to_string()]);
        assert_eq!(store.list().iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![2]);
        fs::remove_dir_all(&root).map_err(io(&root))
    }
}
