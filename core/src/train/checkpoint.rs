//! Checkpoints: the adapters in PEFT's format plus the trainer state, written atomically.
//!
//! A checkpoint directory holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's
//! file names and tensor names, so `PeftModel.from_pretrained` and vLLM load it), and
//! `trainer_state.json` + `trainer_state.safetensors` (optimizer moments, step, policy version,
//! configuration, and whatever the caller adds, e.g. its data position). Everything is written
//! into `<dir>.tmp-<pid>` first, synced, then renamed into place, so after a crash `<dir>` is
//! either the old complete checkpoint or the new complete one.

use std::fs;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::trainer::{Trainer, TrainerConfig};

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

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, path).map_err(|e| CheckpointError::Tensors { path: path.to_path_buf(), message: e.to_string() })?;
    sync_file(path)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    fs::write(path, text).map_err(io(path))?;
    sync_file(path)
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// Writes `trainer`'s adapters and state to `dir` atomically. `extra` lands in
/// `trainer_state.json` under `"extra"` (e.g. the data loader's position).
pub fn save(dir: &Path, trainer: &mut Trainer, base_model: &str, extra: serde_json::Value) -> Result<(), CheckpointError> {
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write_json(&tmp.join("adapter_config.json"), &trainer.config().lora.peft_adapter_config(base_model))?;
    write_tensors(&tmp.join("adapter_model.safetensors"), trainer.parameters())?;
    let optimizer = trainer.optimizer();
    let mut moments = Vec::new();
    for (i, (m, v)) in optimizer.exp_avg.iter().zip(&optimizer.exp_avg_sq).enumerate() {
        moments.push((format!("exp_avg.{i}"), m.shallow_clone()));
        moments.push((format!("exp_avg_sq.{i}"), v.shallow_clone()));
    }
    let step = optimizer.step;
    write_tensors(&tmp.join("trainer_state.safetensors"), &moments)?;
    let state = serde_json::json!({
        "step": step,
        "policy_version": trainer.policy_version(),
        "config": trainer.config(),
        "parameter_names": trainer.parameters().iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "extra": extra,
    });
    write_json(&tmp.join("trainer_state.json"), &state)?;
    fs::File::open(&tmp).and_then(|d| d.sync_all()).map_err(io(&tmp))?;
    // Swap in: the old checkpoint moves aside first, so `dir` is never a half-written directory.
    let old = dir.with_extension(format!("old-{}", std::process::id()));
    if dir.exists() {
        fs::rename(dir, &old).map_err(io(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io(dir))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if let Some(parent) = dir.parent() {
        let _ = fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// What [`load`] restored besides the tensors.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Optimizer steps taken.
    pub step: u64,
    /// Policy version served after the restore.
    pub policy_version: u64,
    /// The caller's extra state.
    pub extra: serde_json::Value,
    /// The configuration the checkpoint was trained with.
    pub config: Option<TrainerConfig>,
}

/// Restores adapters, optimizer moments, step and policy version from `dir` into `trainer`.
pub fn load(dir: &Path, trainer: &mut Trainer) -> Result<Restored, CheckpointError> {
    let state_path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: serde_json::Value = serde_json::from_str(&text).map_err(|e| CheckpointError::Mismatch { path: state_path.clone(), reason: format!("invalid JSON: {e}") })?;
    let read = |name: &str| {
        let path = dir.join(name);
        Tensor::read_safetensors(&path).map_err(|e| CheckpointError::Tensors { path, message: e.to_string() })
    };
    let adapters = read("adapter_model.safetensors")?;
    let moments = read("trainer_state.safetensors")?;
    let mismatch = |reason: String| CheckpointError::Mismatch { path: dir.to_path_buf(), reason };
    tch::no_grad(|| -> Result<(), CheckpointError> {
        for (name, target) in trainer.parameters() {
            let (_, source) = adapters.iter().find(|(n, _)| n == name).ok_or_else(|| mismatch(format!("adapter '{name}' missing")))?;
            if source.size() != target.size() {
                return Err(mismatch(format!("adapter '{name}' has shape {:?}, expected {:?}", source.size(), target.size())));
            }
            target.shallow_clone().copy_(source);
        }
        let optimizer = trainer.optimizer();
        for (i, (m, v)) in optimizer.exp_avg.iter_mut().zip(optimizer.exp_avg_sq.iter_mut()).enumerate() {
            for (target, name) in [(m, format!("exp_avg.{i}")), (v, format!("exp_avg_sq.{i}"))] {
                let (_, source) = moments.iter().find(|(n, _)| *n == name).ok_or_else(|| mismatch(format!("optimizer state '{name}' missing")))?;
                if source.size() != target.size() {
                    return Err(mismatch(format!("optimizer state '{name}' has the wrong shape")));
                }
                target.copy_(source);
            }
        }
        Ok(())
    })?;
    let step = state["step"].as_u64().ok_or_else(|| mismatch("trainer_state.json lacks 'step'".into()))?;
    let policy_version = state["policy_version"].as_u64().unwrap_or(step);
    trainer.optimizer().step = step;
    trainer.set_policy_version(policy_version);
    Ok(Restored { step, policy_version, extra: state["extra"].clone(), config: serde_json::from_value(state["config"].clone()).ok() })
}
