//! The bag of named tensors a checkpoint provides, and the safetensors reader that fills it.
//!
//! Names follow Hugging Face's checkpoint keys (`model.layers.0.self_attn.q_proj.weight`);
//! the GGUF loader translates its names into these, so the decoder has one naming scheme.
//! Tensors are consumed with [`Weights::take`], which checks the shape and names the tensor
//! and the file it came from when something is missing or the wrong size.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use super::ModelError;

/// Named tensors already converted to the model dtype and placed on the model device.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, (Tensor, PathBuf)>,
}

impl Weights {
    /// Adds a tensor read from `origin`.
    pub fn insert(&mut self, name: String, tensor: Tensor, origin: &Path) {
        self.tensors.insert(name, (tensor, origin.to_path_buf()));
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns `name`, checking that its shape is `shape`.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        let (tensor, origin) = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
        if tensor.size() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                path: origin,
                expected: shape.to_vec(),
                found: tensor.size(),
            });
        }
        Ok(tensor)
    }

    /// Like [`Weights::take`] but `None` when absent.
    pub fn take_optional(&mut self, name: &str, shape: &[i64]) -> Result<Option<Tensor>, ModelError> {
        if self.contains(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Renames `PREFIX.name` to `name` for every tensor that has the prefix.
    pub fn strip_prefix(&mut self, prefix: &str) {
        let prefixed: Vec<String> = self.tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        for name in prefixed {
            if let Some(entry) = self.tensors.remove(&name) {
                self.tensors.insert(name[prefix.len()..].to_string(), entry);
            }
        }
    }

    /// Names not consumed yet, for a warning after the model is built.
    pub fn remaining(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// The safetensors files of a Hugging Face folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(ModelError::MissingFile {
            path: single,
            what: "weights (model.safetensors or model.safetensors.index.json)",
        });
    }
    let text = std::fs::read_to_string(&index_path)
        .map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|source| ModelError::InvalidJson { path: index_path.clone(), source })?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        ModelError::InvalidConfig(format!("{} has no 'weight_map' object", index_path.display()))
    })?;
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    let files: Vec<PathBuf> = shards.into_iter().map(|name| dir.join(name)).collect();
    for file in &files {
        if !file.is_file() {
            return Err(ModelError::MissingFile { path: file.clone(), what: "weight shard named in model.safetensors.index.json" });
        }
    }
    Ok(files)
}

/// Reads every tensor of the given safetensors files into `kind` on `device`.
pub fn load_safetensors(files: &[PathBuf], kind: Kind, device: Device) -> Result<Weights, ModelError> {
    let mut weights = Weights::default();
    for path in files {
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        // SAFETY: the map is read-only and lives only while this loop iteration copies out of it;
        // a concurrent truncation of the file by another process is outside our contract.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let source_kind = match view.dtype() {
                Dtype::F32 => Kind::Float,
                Dtype::F16 => Kind::Half,
                Dtype::BF16 => Kind::BFloat16,
                // Integer buffers saved beside the weights (BERT's `position_ids`) are not
                // parameters; a model that needed one would report it missing.
                Dtype::I64 | Dtype::I32 if name.ends_with("_ids") => continue,
                other => {
                    return Err(ModelError::UnsupportedDtype { path: path.clone(), tensor: name, dtype: format!("{other:?}") })
                }
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let tensor = Tensor::f_from_data_size(view.data(), &shape, source_kind)
                .and_then(|t| t.f_to_kind(kind))
                .and_then(|t| t.f_to_device(device))
                .map_err(|e| ModelError::Torch { context: format!("tensor '{name}' of {}", path.display()), source: e })?;
            weights.insert(name, tensor, path);
        }
    }
    Ok(weights)
}
