//! Model configuration: the raw Hugging Face `config.json` and the resolved [`ModelConfig`].
//!
//! [`HfConfig`] mirrors the JSON (field names identical to `config.json`, optional keys as
//! `Option`). [`HfConfig::into_config`] resolves every fallback (head_dim, kv heads, tied
//! embeddings, rope scaling) into a plain [`ModelConfig`] that the decoder reads. GGUF files
//! build the same [`ModelConfig`] from their metadata (see `model::gguf_model`).

use serde::Deserialize;

use super::ModelError;

/// The decoder families hicra implements. They share one decoder (`model::transformer`) and
/// differ only in the flags of [`ModelConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM: no biases, no q/k norm.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: RMSNorm on q and k per head, explicit head_dim.
    Qwen3,
}

impl Architecture {
    /// Maps a `model_type` (HF) or `general.architecture` (GGUF) name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }
}

/// How rotary position frequencies are adjusted for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (`rope_type = "linear"`).
    Linear {
        /// Position divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (`rope_type = "llama3"`).
    Llama3 {
        /// Scale for low frequencies.
        factor: f64,
        /// Wavelength threshold, low side.
        low_freq_factor: f64,
        /// Wavelength threshold, high side.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors given directly (GGUF's `rope_freqs.weight`, which llama.cpp
    /// writes for Llama 3.1 instead of the parameters).
    Factors(Vec<f32>),
}

/// A resolved configuration: every value the decoder needs, no fallbacks left.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Which family's flags apply.
    pub architecture: Architecture,
    /// Rows of the embedding table.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling variant.
    pub rope_scaling: RopeScaling,
    /// Longest sequence the positions support.
    pub max_position_embeddings: usize,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v projections (Qwen2).
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k (Qwen3).
    pub qk_norm: bool,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens named by the config.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Checks the invariants the decoder relies on, naming the first one broken.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::InvalidConfig(what));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return bad("attention heads and head_dim must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return bad(format!("rope_freqs has {} entries, expected head_dim/2 = {}", f.len(), self.head_dim / 2));
            }
        }
        Ok(())
    }
}

/// `config.json` as Hugging Face writes it, for the families we support.
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    /// `llama`, `qwen2`, `qwen3`, ...
    pub model_type: String,
    /// Embedding rows.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (older configs; newer ones put it in `rope_parameters`).
    pub rope_theta: Option<f64>,
    /// RoPE scaling parameters (`rope_type` or legacy `type`).
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `{rope_type, rope_theta, factor, ...}` here instead.
    pub rope_parameters: Option<serde_json::Value>,
    /// Position limit.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Shared embedding / lm_head.
    pub tie_word_embeddings: Option<bool>,
    /// Llama's attention-bias flag.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama's MLP-bias flag.
    #[serde(default)]
    pub mlp_bias: bool,
    /// BOS id.
    pub bos_token_id: Option<u32>,
    /// EOS id or ids.
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl HfConfig {
    /// Resolves fallbacks into a [`ModelConfig`] and validates it.
    pub fn into_config(self) -> Result<ModelConfig, ModelError> {
        let architecture = Architecture::from_name(&self.model_type)
            .ok_or_else(|| ModelError::UnknownArchitecture(self.model_type.clone()))?;
        let heads = self.num_attention_heads.max(1);
        let rope = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref());
        let rope_theta = self
            .rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0);
        let config = ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling: parse_rope_scaling(rope)?,
            max_position_embeddings: self.max_position_embeddings,
            // transformers' PretrainedConfig defaults tie_word_embeddings to true; Qwen2 and
            // Qwen3 configs always state it.
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(true),
            attention_bias: architecture == Architecture::Qwen2 || self.attention_bias,
            mlp_bias: self.mlp_bias,
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id: self.bos_token_id,
            eos_token_ids: parse_token_ids(self.eos_token_id.as_ref()),
        };
        config.validate()?;
        Ok(config)
    }
}

/// `eos_token_id` may be a number, a list of numbers, or null.
pub(crate) fn parse_token_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(items)) => {
            items.iter().filter_map(|v| v.as_u64()).map(|id| id as u32).collect()
        }
        _ => Vec::new(),
    }
}

fn parse_rope_scaling(value: Option<&serde_json::Value>) -> Result<RopeScaling, ModelError> {
    let Some(obj) = value.and_then(|v| v.as_object()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, ModelError> {
        obj.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
            ModelError::InvalidConfig(format!("rope_scaling of type '{kind}' lacks numeric '{key}'"))
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(ModelError::InvalidConfig(format!(
            "rope_scaling type '{other}' is not supported (supported: default, linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, ModelError> {
        let raw: HfConfig = serde_json::from_str(json).map_err(|e| ModelError::InvalidConfig(e.to_string()))?;
        raw.into_config()
    }

    #[test]
    fn resolves_defaults() -> Result<(), ModelError> {
        let c = parse(r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"eos_token_id":[1,2]}"#)?;
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_kv_heads, 4);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        Ok(())
    }

    #[test]
    fn reads_transformers_5_rope_parameters() -> Result<(), ModelError> {
        let c = parse(r#"{"model_type":"qwen3","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"head_dim":32,
            "rope_parameters":{"rope_type":"linear","rope_theta":1000000.0,"factor":2.0}}"#)?;
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert!(c.qk_norm);
        Ok(())
    }

    #[test]
    fn rejects_unknown_architecture_and_rope() {
        let err = parse(r#"{"model_type":"gpt_neox","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4}"#);
        assert!(matches!(err, Err(ModelError::UnknownArchitecture(ref a)) if a == "gpt_neox"));
        let err = parse(r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"rope_scaling":{"rope_type":"yarn","factor":4}}"#);
        assert!(matches!(err, Err(ModelError::InvalidConfig(ref m)) if m.contains("yarn")));
        let err = parse(r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":3,"num_key_value_heads":2}"#);
        assert!(matches!(err, Err(ModelError::InvalidConfig(_))));
    }
}
