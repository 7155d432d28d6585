//! Building a model from a GGUF file: its metadata becomes a [`ModelConfig`], its tensors are
//! dequantized and renamed to Hugging Face keys so the one decoder serves both sources.
//!
//! llama.cpp's converter permutes the rows of `attn_q` and `attn_k` for the llama architecture
//! (its RoPE pairs adjacent dimensions, transformers pairs the two halves of a head). We undo
//! that permutation here; qwen2/qwen3 files are written unpermuted.

use tch::{Device, Kind, Tensor};

use super::config::{parse_token_ids, Architecture, ModelConfig, RopeScaling};
use super::gguf::GgufFile;
use super::weights::Weights;
use super::ModelError;

/// Reads the architecture and hyper-parameters from GGUF metadata.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
    let arch_name = file.get_str("general.architecture").ok_or_else(|| missing(file, "general.architecture"))?;
    let architecture =
        Architecture::from_name(arch_name).ok_or_else(|| ModelError::UnknownArchitecture(arch_name.to_string()))?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let required = |k: &str| -> Result<usize, ModelError> {
        file.get_u64(&key(k)).map(|v| v as usize).ok_or_else(|| missing(file, &key(k)))
    };
    let hidden_size = required("embedding_length")?;
    let num_heads = required("attention.head_count")?;
    let embedding = file.tensor_info("token_embd.weight").ok_or_else(|| ModelError::MissingTensor { name: "token_embd.weight".into() })?;
    let vocab_size = embedding.shape().first().copied().unwrap_or(0);
    let head_dim = match file.get_u64(&key("attention.key_length")) {
        Some(d) => d as usize,
        None => hidden_size / num_heads.max(1),
    };
    let rope_scaling = rope_scaling_from_gguf(file, arch_name)?;
    let eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| file.get_u64(k))
        .map(|id| id as u32)
        .collect();
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_layers: required("block_count")?,
        num_heads,
        num_kv_heads: file.get_u64(&key("attention.head_count_kv")).map(|v| v as usize).unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: file.get_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: file.get_u64(&key("context_length")).map(|v| v as usize).unwrap_or(2048),
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        attention_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
        mlp_bias: file.tensor_info("blk.0.ffn_up.bias").is_some(),
        qk_norm: file.tensor_info("blk.0.attn_q_norm.weight").is_some(),
        bos_token_id: file.get_u64("tokenizer.ggml.bos_token_id").map(|id| id as u32),
        eos_token_ids: parse_token_ids(Some(&serde_json::json!(eos))),
    };
    config.validate()?;
    Ok(config)
}

fn missing(file: &GgufFile, key: &str) -> ModelError {
    ModelError::InvalidConfig(format!("{}: GGUF metadata key '{key}' is missing", file.path().display()))
}

fn rope_scaling_from_gguf(file: &GgufFile, arch: &str) -> Result<RopeScaling, ModelError> {
    if file.tensor_info("rope_freqs.weight").is_some() {
        let factors = file.dequantize("rope_freqs.weight")?;
        return Ok(RopeScaling::Factors(factors));
    }
    match file.get_str(&format!("{arch}.rope.scaling.type")) {
        None | Some("none") => Ok(RopeScaling::None),
        Some("linear") => {
            let factor = file.get_f64(&format!("{arch}.rope.scaling.factor")).unwrap_or(1.0);
            Ok(RopeScaling::Linear { factor })
        }
        Some(other) => Err(ModelError::InvalidConfig(format!(
            "{}: rope scaling '{other}' is not supported (supported: none, linear, rope_freqs)",
            file.path().display()
        ))),
    }
}

/// The Hugging Face key for a GGUF tensor name, or `None` for tensors the decoder does not use.
fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

/// Undoes llama.cpp's `permute(w, n_head)` on the rows of a q or k projection (or its bias).
fn unpermute_rows(t: Tensor, n_head: i64) -> Tensor {
    let shape = t.size();
    let rows = shape[0];
    let cols: i64 = shape[1..].iter().product();
    t.reshape([n_head, rows / n_head / 2, 2, cols]).transpose(1, 2).reshape(shape.as_slice())
}

/// Dequantizes every tensor the decoder uses into `kind` on `device`, under HF names.
pub fn weights_from_gguf(file: &GgufFile, cfg: &ModelConfig, kind: Kind, device: Device) -> Result<Weights, ModelError> {
    let mut weights = Weights::default();
    for info in file.tensors() {
        let Some(name) = hf_name(&info.name) else { continue };
        let values = file.dequantize(&info.name)?;
        let shape: Vec<i64> = info.shape().iter().map(|&d| d as i64).collect();
        let mut tensor = Tensor::from_slice(&values).reshape(shape.as_slice());
        if cfg.architecture == Architecture::Llama {
            let module = info.name.split('.').nth(2).unwrap_or("");
            let heads = match module {
                "attn_q" => Some(cfg.num_heads as i64),
                "attn_k" => Some(cfg.num_kv_heads as i64),
                _ => None,
            };
            if let Some(n_head) = heads {
                let rows = shape.first().copied().unwrap_or(0);
                if rows % (2 * n_head) != 0 {
                    return Err(ModelError::ShapeMismatch {
                        name: info.name.clone(),
                        path: file.path().to_path_buf(),
                        expected: vec![n_head * cfg.head_dim as i64],
                        found: shape.clone(),
                    });
                }
                tensor = unpermute_rows(tensor, n_head);
            }
        }
        let tensor = tensor.to_kind(kind).to_device(device);
        weights.insert(name, tensor, file.path());
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_gguf_names_to_hf_keys() {
        assert_eq!(hf_name("blk.3.attn_q.weight").as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
        assert_eq!(hf_name("blk.0.ffn_down.weight").as_deref(), Some("model.layers.0.mlp.down_proj.weight"));
        assert_eq!(hf_name("blk.1.attn_k.bias").as_deref(), Some("model.layers.1.self_attn.k_proj.bias"));
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, rows, cols) = (2i64, 8i64, 3i64);
        let w = Tensor::arange(rows * cols, (Kind::Float, Device::Cpu)).reshape([rows, cols]);
        let permuted = w.reshape([n_head, 2, rows / n_head / 2, cols]).transpose(1, 2).reshape([rows, cols]);
        let restored = unpermute_rows(permuted, n_head);
        assert!(restored.equal(&w));
    }
}
