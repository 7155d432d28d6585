//! Random-weight models of real shapes, built without any download: benchmarks and device
//! checks need the sizes of real models (their matmuls, KV caches and vocabularies), not their
//! weights. `hicra bench --shape qwen2.5-0.5b --seed 1` and `hicra bench-train --shape ...`
//! use them; a GPU machine then needs nothing but the binary.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::{Architecture, ModelConfig, RopeScaling};
use super::transformer::Transformer;
use super::weights::Weights;
use super::ModelError;

/// A model shape, as its Hugging Face `config.json` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Qwen/Qwen2.5-0.5B: 24 layers, 896 wide, GQA 14/2, biased q/k/v, tied embeddings.
    Qwen25_05B,
    /// Qwen/Qwen3-0.6B: 28 layers, 1024 wide, GQA 16/8, head_dim 128, q/k norm.
    Qwen3_06B,
    /// meta-llama/Llama-3.2-1B: 16 layers, 2048 wide, GQA 32/8, Llama 3 RoPE scaling.
    Llama32_1B,
    /// Qwen/Qwen2.5-1.5B: 28 layers, 1536 wide, GQA 12/2, head_dim 128.
    Qwen25_15B,
}

/// Every shape with its name, for `--shape` and error messages.
pub const SHAPES: [(&str, Shape); 4] =
    [("qwen2.5-0.5b", Shape::Qwen25_05B), ("qwen3-0.6b", Shape::Qwen3_06B), ("llama-3.2-1b", Shape::Llama32_1B), ("qwen2.5-1.5b", Shape::Qwen25_15B)];

impl std::str::FromStr for Shape {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        SHAPES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, s)| *s).ok_or_else(|| {
            let names: Vec<&str> = SHAPES.iter().map(|(n, _)| *n).collect();
            format!("unknown shape '{name}': expected one of {}", names.join(", "))
        })
    }
}

impl Shape {
    /// The shape's name (`qwen2.5-0.5b`).
    pub fn name(self) -> &'static str {
        SHAPES.iter().find(|(_, s)| *s == self).map_or("?", |(n, _)| n)
    }

    /// The shape's configuration.
    pub fn config(self) -> ModelConfig {
        let qwen = |hidden, intermediate, layers, heads, kv_heads, head_dim, architecture| ModelConfig {
            architecture,
            vocab_size: 151_936,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 32_768,
            tie_word_embeddings: true,
            attention_bias: architecture == Architecture::Qwen2,
            mlp_bias: false,
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id: None,
            eos_token_ids: vec![151_643, 151_645],
        };
        match self {
            Self::Qwen25_05B => qwen(896, 4864, 24, 14, 2, 64, Architecture::Qwen2),
            Self::Qwen3_06B => ModelConfig { max_position_embeddings: 40_960, ..qwen(1024, 3072, 28, 16, 8, 128, Architecture::Qwen3) },
            Self::Qwen25_15B => qwen(1536, 8960, 28, 12, 2, 128, Architecture::Qwen2),
            Self::Llama32_1B => ModelConfig {
                architecture: Architecture::Llama,
                vocab_size: 128_256,
                hidden_size: 2048,
                intermediate_size: 8192,
                num_layers: 16,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 500_000.0,
                rope_scaling: RopeScaling::Llama3 { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 },
                max_position_embeddings: 131_072,
                tie_word_embeddings: true,
                attention_bias: false,
                mlp_bias: false,
                qk_norm: false,
                bos_token_id: Some(128_000),
                eos_token_ids: vec![128_001],
            },
        }
    }

    /// Parameters of the shape (embeddings counted once when tied).
    pub fn parameter_count(self) -> usize {
        weight_shapes(&self.config()).iter().map(|(_, s)| s.iter().product::<i64>() as usize).sum()
    }
}

/// The `i`-th token id of the deterministic pseudo-random sequences benchmarks feed a model
/// with no tokenizer (ids 1..vocab, so never 0); `scripts/shapes.py` makes the same ones for
/// the transformers references.
pub fn synthetic_token_id(i: u64, vocab_size: usize) -> u32 {
    (i.wrapping_mul(2_654_435_761) % (vocab_size as u64 - 1) + 1) as u32
}

/// Every tensor the decoder takes for `config`, by Hugging Face name, with its shape.
fn weight_shapes(config: &ModelConfig) -> Vec<(String, Vec<i64>)> {
    let (vocab, hidden, inter) = (config.vocab_size as i64, config.hidden_size as i64, config.intermediate_size as i64);
    let (h, kvh, d) = (config.num_heads as i64, config.num_kv_heads as i64, config.head_dim as i64);
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden]), ("model.norm.weight".to_string(), vec![hidden])];
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    }
    for i in 0..config.num_layers {
        let p = format!("model.layers.{i}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        for (name, rows) in [("q_proj", h * d), ("k_proj", kvh * d), ("v_proj", kvh * d)] {
            shapes.push((format!("{p}.self_attn.{name}.weight"), vec![rows, hidden]));
            if config.attention_bias {
                shapes.push((format!("{p}.self_attn.{name}.bias"), vec![rows]));
            }
        }
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![hidden, h * d]));
        if config.qk_norm {
            shapes.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
            shapes.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        }
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
    }
    shapes
}

/// A decoder of `shape` with random weights drawn from `seed`: norms at 1, everything else
/// normal with standard deviation 0.02 (the initialisers' scale), in `kind` on `device`.
pub fn random_model(shape: Shape, seed: u64, kind: Kind, device: Device, max_positions: usize) -> Result<Transformer, ModelError> {
    let config = shape.config();
    tch::manual_seed(seed as i64);
    let mut weights = Weights::default();
    let origin = Path::new(shape.name());
    for (name, dims) in weight_shapes(&config) {
        let tensor = if name.ends_with("norm.weight") {
            Tensor::ones(dims.as_slice(), (kind, device))
        } else {
            (Tensor::randn(dims.as_slice(), (Kind::Float, device)) * 0.02).to_kind(kind)
        };
        weights.insert(name, tensor, origin);
    }
    let max_positions = max_positions.min(config.max_position_embeddings);
    Transformer::new(config, weights, kind, device, max_positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_their_published_parameter_counts() {
        // Hugging Face's counts (tied embeddings counted once), to within 1%.
        for (shape, published) in [(Shape::Qwen25_05B, 494_032_768usize), (Shape::Qwen3_06B, 596_049_920), (Shape::Llama32_1B, 1_235_814_400), (Shape::Qwen25_15B, 1_543_714_304)] {
            let count = shape.parameter_count();
            let off = (count as f64 - published as f64).abs() / published as f64;
            assert!(off < 0.01, "{}: {count} parameters, published {published}", shape.name());
        }
        assert_eq!("Qwen2.5-0.5B".parse::<Shape>(), Ok(Shape::Qwen25_05B));
        assert!("gpt-5".parse::<Shape>().err().is_some_and(|e| e.contains("qwen2.5-0.5b")));
    }

    #[test]
    fn a_random_model_of_a_real_shape_runs_a_forward_pass() -> Result<(), ModelError> {
        let model = random_model(Shape::Qwen3_06B, 7, Kind::BFloat16, Device::Cpu, 64)?;
        let tokens = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        let positions = Tensor::arange(4, (Kind::Int64, Device::Cpu)).view([1, 4]);
        let hidden = tch::no_grad(|| model.forward_hidden(&super::super::transformer::ForwardInput { tokens: &tokens, positions: &positions, use_lora: false, training: false }, None));
        assert_eq!(hidden.size(), vec![1, 4, 1024]);
        let logits = tch::no_grad(|| model.logits(&hidden.view([4, 1024])));
        assert_eq!(logits.size(), vec![4, 151_936]);
        assert!(logits.isfinite().all().int64_value(&[]) == 1);
        Ok(())
    }
}
