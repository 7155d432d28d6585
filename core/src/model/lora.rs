//! LoRA adapters on the served model, named and laid out as PEFT does.
//!
//! [`LoraConfig`] says which projections get adapters; [`attach`] creates them (A with PEFT's
//! Kaiming-uniform initialisation, B zero, both float32 whatever the base dtype, so the model's
//! outputs are unchanged until a step trains B). [`parameters`] lists them under PEFT's tensor
//! names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), which is also what
//! checkpoints store, so transformers/PEFT and vLLM load them.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::linear::{Linear, LoraAdapter};
use super::transformer::Transformer;
use super::ModelError;

/// Projections PEFT users target on Llama/Qwen models.
pub const ALL_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Which projections carry adapters and how large they are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// `lora_alpha`; the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapter input during training steps.
    pub dropout: f64,
    /// Projection names (`q_proj`, ..., `down_proj`).
    pub target_modules: Vec<String>,
    /// Seed of A's initialisation.
    pub seed: i64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, dropout: 0.0, target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(), seed: 0 }
    }
}

impl LoraConfig {
    /// Checks rank, dropout and module names.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.rank == 0 {
            return Err(ModelError::InvalidConfig("lora rank must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::InvalidConfig(format!("lora dropout must be in [0, 1), got {}", self.dropout)));
        }
        if let Some(bad) = self.target_modules.iter().find(|m| !ALL_TARGETS.contains(&m.as_str())) {
            return Err(ModelError::InvalidConfig(format!("unknown LoRA target module '{bad}' (known: {})", ALL_TARGETS.join(", "))));
        }
        Ok(())
    }

    /// PEFT's `adapter_config.json` for these adapters.
    pub fn peft_adapter_config(&self, base_model: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
        })
    }
}

/// A projection inside a (possibly fused) [`Linear`]: its module name and output rows.
pub(crate) struct Slot<'a> {
    /// `model.layers.N.self_attn` or `model.layers.N.mlp`.
    pub prefix: String,
    /// The fused layer.
    pub linear: &'a mut Linear,
    /// `(module name, first row, rows)` of each projection it holds.
    pub parts: Vec<(&'static str, i64, i64)>,
}

/// Adds zero-effect adapters to every targeted projection; fails if adapters exist already.
pub fn attach(model: &mut Transformer, config: &LoraConfig) -> Result<(), ModelError> {
    config.validate()?;
    let device = model.device();
    let generator_seed = config.seed;
    tch::manual_seed(generator_seed);
    let scale = config.alpha / config.rank as f64;
    for slot in model.lora_slots() {
        if !slot.linear.adapters.is_empty() {
            return Err(ModelError::InvalidConfig(format!("{} already has LoRA adapters", slot.prefix)));
        }
        let in_features = slot.linear.weight.size()[1];
        for (module, start, rows) in slot.parts {
            if !config.target_modules.iter().any(|t| t == module) {
                continue;
            }
            // PEFT: kaiming_uniform_(a = sqrt(5)) on A gives U(-1/sqrt(in), 1/sqrt(in)).
            let bound = 1.0 / (in_features as f64).sqrt();
            let a = (Tensor::rand([config.rank as i64, in_features], (Kind::Float, device)) * (2.0 * bound) - bound).set_requires_grad(true);
            let b = Tensor::zeros([rows, config.rank as i64], (Kind::Float, device)).set_requires_grad(true);
            slot.linear.adapters.push(LoraAdapter { module: format!("{}.{module}", slot.prefix), rows: start..start + rows, a, b, scale });
        }
    }
    model.set_lora_dropout(config.dropout);
    Ok(())
}

/// Every adapter tensor under its PEFT name, A then B per module, in model order. The tensors
/// share storage with the model: updating them in place updates what the model serves.
pub fn parameters(model: &mut Transformer) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for slot in model.lora_slots() {
        for adapter in &slot.linear.adapters {
            out.push((format!("base_model.model.{}.lora_A.weight", adapter.module), adapter.a.shallow_clone()));
            out.push((format!("base_model.model.{}.lora_B.weight", adapter.module), adapter.b.shallow_clone()));
        }
    }
    out
}

/// Number of trainable adapter values.
pub fn parameter_count(model: &mut Transformer) -> usize {
    parameters(model).iter().map(|(_, t)| t.numel()).sum()
}

/// Attaches the adapters of a PEFT LoRA checkpoint directory (`adapter_config.json` +
/// `adapter_model.safetensors`, as hicra's checkpoints and PEFT's `save_pretrained` write
/// them) to `model`; returns their configuration.
pub fn load_peft(model: &mut Transformer, dir: &std::path::Path) -> Result<LoraConfig, ModelError> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io { path: config_path.clone(), source })?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::InvalidJson { path: config_path.clone(), source })?;
    let bad = |what: &str| ModelError::InvalidConfig(format!("{}: {what}", config_path.display()));
    if raw.get("peft_type").and_then(|v| v.as_str()).is_some_and(|t| t != "LORA") {
        return Err(bad("peft_type is not LORA"));
    }
    if raw.get("use_dora").and_then(|v| v.as_bool()) == Some(true) || raw.get("use_rslora").and_then(|v| v.as_bool()) == Some(true) {
        return Err(bad("DoRA and rsLoRA adapters are not supported"));
    }
    let rank = raw.get("r").and_then(|v| v.as_u64()).ok_or_else(|| bad("missing 'r'"))? as usize;
    let targets = match raw.get("target_modules") {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        _ => return Err(bad("missing 'target_modules'")),
    };
    let config = LoraConfig {
        rank,
        alpha: raw.get("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(rank as f64),
        dropout: raw.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0),
        target_modules: targets,
        seed: 0,
    };
    attach(model, &config)?;
    let weights_path = dir.join("adapter_model.safetensors");
    let tensors = Tensor::read_safetensors(&weights_path)
        .map_err(|e| ModelError::Safetensors { path: weights_path.clone(), message: e.to_string() })?;
    load_parameters(model, &tensors)?;
    Ok(config)
}

/// Places `tensors` (PEFT names, as [`parameters`] lists them) into the model's adapters.
pub fn load_parameters(model: &mut Transformer, tensors: &[(String, Tensor)]) -> Result<(), ModelError> {
    let ours = parameters(model);
    for (name, target) in &ours {
        let (_, source) = tensors.iter().find(|(n, _)| n == name).ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
        if source.size() != target.size() {
            return Err(ModelError::ShapeMismatch { name: name.clone(), path: "adapter_model.safetensors".into(), expected: target.size(), found: source.size() });
        }
        tch::no_grad(|| {
            let mut target = target.shallow_clone();
            target.copy_(&source.to_kind(Kind::Float).to_device(target.device()));
        });
    }
    Ok(())
}
