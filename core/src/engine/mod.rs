//! Running the model: KV cache, on-device sampling, batched generation and scoring.
//!
//! - [`kv_cache`]: preallocated keys/values in fixed batch slots.
//! - [`sampler`]: temperature / top-k / top-p / seeded sampling as tensor ops.
//! - [`generate`]: [`Engine`] admits requests into slots, prefills them in one batch and runs
//!   decode steps over every active slot until each sequence stops.
//! - [`score`]: teacher-forced logprobs of given completions (what the trainer computes).
//!
//! Invariant: a token's logprob reported at generation equals its teacher-forced logprob
//! under the same weights and temperature (to float rounding); tests hold us to 1e-4 in f32.

pub mod constraint;
pub mod generate;
pub mod kv_cache;
pub mod logits;
pub mod sampler;
pub mod scheduler;
pub mod score;

pub use generate::{validate_prompt, Engine, FinishReason, Generation, GenerationRequest, GeneratedToken};
pub use sampler::SamplingParams;
pub use score::{score_completions, score_prompt, PromptToken};

fn generation_note(generating: &bool) -> &'static str {
    if *generating { " (at least one position must remain for generation)" } else { "" }
}

/// Why a request cannot run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The prompt does not fit the context (with one position to spare when generating).
    #[error("prompt has {prompt_tokens} tokens but the context limit is {max_context}{}", generation_note(.generating))]
    PromptTooLong {
        /// Length of the prompt.
        prompt_tokens: usize,
        /// The context limit (model positions and KV cache capacity).
        max_context: usize,
        /// Whether the prompt was to be continued (then one position must remain).
        generating: bool,
    },
    /// A prompt was empty.
    #[error("prompt is empty: at least one token is required")]
    EmptyPrompt,
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter: {0}")]
    InvalidParameter(String),
    /// Detokenization failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// libtorch failed while reading results back.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}
