//! Models: where they come from, how they are read, and the decoder that runs them.
//!
//! - [`source`]: turns `--model` (a name, a folder, a `.gguf` file, a hub id) into files.
//! - [`config`]: `config.json` / GGUF metadata -> [`ModelConfig`].
//! - [`weights`] and [`gguf_model`]: tensors under Hugging Face names, on the target device.
//! - [`transformer`]: the Llama / Qwen2 / Qwen3 decoder; [`linear`]: LoRA-ready layers.
//! - [`bert`]: a BERT encoder and sentence embedder (all-MiniLM-L6-v2, for Strategic-Gram mining).
//!
//! [`load`] ties these together and returns a [`LoadedModel`]: the decoder plus its tokenizer.
//! Every failure is a [`ModelError`] that names the file, tensor or limit involved.

pub mod bert;
pub mod config;
pub mod cpu_attention;
pub mod cpu_gemv;
mod cpu_gemv_bf16;
mod cpu_pool;
#[cfg(target_arch = "x86_64")]
mod cpu_prefill_attention;
pub mod gguf;
pub mod gguf_model;
pub mod linear;
pub mod lora;
pub mod rope;
pub mod shapes;
pub mod source;
pub mod transformer;
pub mod weights;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tch::{Device, Kind};

pub use config::{Architecture, ModelConfig};
pub use source::ModelSource;
pub use cpu_pool::share_cores_among;
pub use transformer::{ForwardInput, Transformer};

use crate::tokenizer::{Tokenizer, TokenizerError};

/// Everything that can go wrong finding, reading or assembling a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file the model needs does not exist.
    #[error("{}: missing {what}", path.display())]
    MissingFile {
        /// Where it was expected.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
    },
    /// A JSON file did not parse.
    #[error("{}: invalid JSON: {source}", path.display())]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The configuration is inconsistent or unsupported.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// `model_type` / `general.architecture` names a family we do not implement.
    #[error("unknown architecture '{0}' (supported: llama, qwen2, qwen3)")]
    UnknownArchitecture(String),
    /// A safetensors file is malformed or truncated.
    #[error("{}: invalid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The reader's explanation.
        message: String,
    },
    /// A tensor is stored in a dtype we do not read.
    #[error("{}: tensor '{tensor}' has unsupported dtype {dtype}", path.display())]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
    },
    /// The checkpoint lacks a tensor the architecture needs.
    #[error("checkpoint has no tensor '{name}'")]
    MissingTensor {
        /// Hugging Face name of the tensor.
        name: String,
    },
    /// A tensor's shape disagrees with the configuration.
    #[error("{}: tensor '{name}' has shape {found:?}, the configuration implies {expected:?}", path.display())]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// The file it came from.
        path: PathBuf,
        /// Shape the config implies.
        expected: Vec<i64>,
        /// Shape in the file.
        found: Vec<i64>,
    },
    /// The GGUF reader failed.
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// `--model` names nothing we can find.
    #[error("model '{name}' not found: {hint}")]
    NotFound {
        /// What was asked for.
        name: String,
        /// Where we looked and what to do.
        hint: String,
    },
    /// libtorch rejected an operation while loading.
    #[error("libtorch error while loading {context}: {source}")]
    Torch {
        /// What was being loaded.
        context: String,
        /// The libtorch error.
        #[source]
        source: tch::TchError,
    },
}

/// Floating-point type of weights and activations (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 32-bit floats: exact parity with references; the CPU default.
    F32,
    /// bfloat16: the CUDA default.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl DType {
    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            Self::F32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
            Self::F16 => Kind::Half,
        }
    }

    /// f32 on the CPU, bf16 on CUDA.
    pub fn default_for(device: Device) -> Self {
        if device.is_cuda() { Self::Bf16 } else { Self::F32 }
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            _ => Err(format!("invalid dtype '{s}': expected f32, bf16 or f16")),
        }
    }
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where the weights go.
    pub device: Device,
    /// Their dtype.
    pub dtype: DType,
    /// Upper bound on the context (prompt + completion); the model's own limit applies too.
    pub max_context: usize,
}

impl LoadOptions {
    /// CPU, f32, up to 4096 positions.
    pub fn cpu() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, max_context: 4096 }
    }
}

/// A model ready to run: the decoder, its tokenizer and where it came from.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder with its weights on the device.
    pub model: Transformer,
    /// The tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// Display name (`smollm2-135m-instruct`, a folder name, a file stem).
    pub name: String,
    /// Files the model was read from.
    pub source: ModelSource,
}

/// Finds and loads `spec` (see [`source::resolve`]) with `options`.
pub fn load(spec: &str, options: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let source = source::resolve(spec)?;
    load_source(source, options)
}

/// Loads an already resolved source.
pub fn load_source(source: ModelSource, options: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let started = std::time::Instant::now();
    let model = load_decoder(&source, options)?;
    tracing::debug!(secs = started.elapsed().as_secs_f32(), "decoder loaded");
    let started = std::time::Instant::now();
    let mut tokenizer = match &source {
        ModelSource::HfFolder(dir) => load_hf_tokenizer(dir)?,
        ModelSource::Gguf(path) => {
            let file = gguf::GgufFile::open(path)?;
            Tokenizer::from_gguf_spec(crate::tokenizer::gguf::spec_from_gguf(&file)?)?
        }
    };
    tracing::debug!(secs = started.elapsed().as_secs_f32(), "tokenizer loaded");
    tokenizer.add_eos_ids(&model.config().eos_token_ids);
    Ok(LoadedModel { model, tokenizer, name: source.display_name(), source })
}

/// Loads only the decoder (no tokenizer needed): what parity tests and scoring tools use.
pub fn load_decoder(source: &ModelSource, options: &LoadOptions) -> Result<Transformer, ModelError> {
    let kind = options.dtype.kind();
    let (config, weights) = match source {
        ModelSource::HfFolder(dir) => {
            let config = read_hf_config(dir)?;
            let files = weights::safetensors_files(dir)?;
            (config, weights::load_safetensors(&files, kind, options.device)?)
        }
        ModelSource::Gguf(path) => {
            let file = gguf::GgufFile::open(path)?;
            let config = gguf_model::config_from_gguf(&file)?;
            let weights = gguf_model::weights_from_gguf(&file, &config, kind, options.device)?;
            (config, weights)
        }
    };
    let max_positions = options.max_context.min(config.max_position_embeddings).max(1);
    Transformer::new(config, weights, kind, options.device, max_positions)
}

fn read_hf_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile { path: path.clone(), what: "model configuration" },
        _ => ModelError::Io { path: path.clone(), source },
    })?;
    let raw: config::HfConfig =
        serde_json::from_str(&text).map_err(|source| ModelError::InvalidJson { path: path.clone(), source })?;
    raw.into_config()
}

fn load_hf_tokenizer(dir: &Path) -> Result<Tokenizer, ModelError> {
    let tokenizer_json = dir.join("tokenizer.json");
    if !tokenizer_json.is_file() {
        return Err(ModelError::MissingFile { path: tokenizer_json, what: "tokenizer (tokenizer.json)" });
    }
    let config = dir.join("tokenizer_config.json");
    let mut tokenizer = Tokenizer::from_hf_files(&tokenizer_json, config.is_file().then_some(config.as_path()))?;
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        let text = std::fs::read_to_string(&generation).map_err(|source| ModelError::Io { path: generation.clone(), source })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::InvalidJson { path: generation.clone(), source })?;
        tokenizer.add_eos_ids(&config::parse_token_ids(value.get("eos_token_id")));
    }
    // transformers >= 4.47 saves the template in a file of its own and, when both exist,
    // prefers it to the one in tokenizer_config.json; so do we.
    let template_file = dir.join("chat_template.jinja");
    if template_file.is_file() {
        let source = std::fs::read_to_string(&template_file).map_err(|source| ModelError::Io { path: template_file.clone(), source })?;
        tokenizer.set_chat_template(&source)?;
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder with a word-level `tokenizer.json` and the given extra files.
    fn tokenizer_folder(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        use tokenizers::models::wordlevel::WordLevel;
        let dir = std::env::temp_dir().join(format!("hicra-hf-tok-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let vocab = [("<unk>".to_string(), 0), ("hi".to_string(), 1)].into_iter().collect();
        let model = WordLevel::builder().vocab(vocab).unk_token("<unk>".into()).build().expect("word level");
        tokenizers::Tokenizer::new(model).save(dir.join("tokenizer.json"), false).expect("save tokenizer.json");
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("write file");
        }
        dir
    }

    #[test]
    fn chat_template_jinja_file_is_loaded_and_wins_over_the_config() {
        let config = r#"{"chat_template": "config:{{ messages[0].content }}"}"#;
        let dir = tokenizer_folder("jinja", &[("tokenizer_config.json", config), ("chat_template.jinja", "file:{{ messages[0].content }}")]);
        let tokenizer = load_hf_tokenizer(&dir).expect("load");
        std::fs::remove_dir_all(&dir).ok();
        let template = tokenizer.chat_template().expect("a chat template");
        let rendered = template.render(&[crate::tokenizer::ChatMessage::new("user", "hi")], None, false, None).expect("render");
        assert_eq!(rendered, "file:hi");
    }

    #[test]
    fn broken_chat_template_jinja_is_an_error_naming_the_template() {
        let dir = tokenizer_folder("broken", &[("chat_template.jinja", "{% for m in messages %}")]);
        let err = load_hf_tokenizer(&dir).expect_err("an unclosed loop");
        std::fs::remove_dir_all(&dir).ok();
        assert!(err.to_string().contains("template"), "{err}");
    }
}
