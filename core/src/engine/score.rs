//! Teacher-forced scoring: the logprob of each given completion token under the model.
//!
//! This is the computation the trainer repeats with gradients; generation must report the
//! same numbers for the tokens it sampled.

use tch::{Device, Kind, Tensor};

use super::EngineError;
use crate::model::{ForwardInput, Transformer};

/// Logprobs of `completion` tokens after `prompt`, per pair, at `temperature` (0 = greedy,
/// reported like 1). One right-padded batch, no KV cache, LoRA as `use_lora` says.
pub fn score_completions(
    model: &Transformer,
    pairs: &[(&[u32], &[u32])],
    temperature: f64,
    use_lora: bool,
) -> Result<Vec<Vec<f32>>, EngineError> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = model.config().vocab_size;
    let limit = model.max_positions();
    for (prompt, completion) in pairs {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&id) = prompt.iter().chain(completion.iter()).find(|&&id| id as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { id, vocab_size: vocab });
        }
        let total = prompt.len() + completion.len();
        if total > limit {
            return Err(EngineError::PromptTooLong { prompt_tokens: total, max_context: limit });
        }
    }
    let inv_t = if temperature > 0.0 { 1.0 / temperature } else { 1.0 };
    let device = model.device();
    let batch = PaddedPairs::new(pairs, device);
    let logprobs = tch::no_grad(|| {
        let hidden = model.forward_hidden(&ForwardInput { tokens: &batch.tokens, positions: &batch.positions, use_lora, training: false }, None);
        (model.logits(&batch.predicting(&hidden)) * inv_t).log_softmax(-1, Kind::Float)
    });
    let picked = logprobs.gather(1, &batch.targets.unsqueeze(1), false).squeeze_dim(1).to_device(tch::Device::Cpu);
    let flat = Vec::<f32>::try_from(picked)?;
    let mut out = Vec::with_capacity(pairs.len());
    let mut at = 0;
    for (_, completion) in pairs {
        out.push(flat[at..at + completion.len()].to_vec());
        at += completion.len();
    }
    Ok(out)
}

/// Prompt + completion pairs as one right-padded batch, with the hidden-state rows that
/// predict each completion token (position p predicts token p + 1, so completion token j of a
/// pair is predicted at `prompt_len - 1 + j`). Every prompt must be non-empty.
pub(crate) struct PaddedPairs {
    /// `(b, longest)` token ids, zero-padded on the right.
    pub(crate) tokens: Tensor,
    /// `(b, longest)` positions.
    pub(crate) positions: Tensor,
    /// Flat `(b * longest)` indices of the predicting hidden states, pair by pair.
    predicting_rows: Tensor,
    /// The completion tokens, pair by pair (what `predicting_rows` predict).
    pub(crate) targets: Tensor,
}

impl PaddedPairs {
    /// Packs `pairs` on `device`.
    pub(crate) fn new(pairs: &[(&[u32], &[u32])], device: Device) -> Self {
        let longest = pairs.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(1).max(1);
        let b = pairs.len();
        let mut ids = vec![0i64; b * longest];
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (r, (prompt, completion)) in pairs.iter().enumerate() {
            for (c, &id) in prompt.iter().chain(completion.iter()).enumerate() {
                ids[r * longest + c] = id as i64;
            }
            let start = r * longest + prompt.len().saturating_sub(1);
            rows.extend((start..start + completion.len()).map(|i| i as i64));
            targets.extend(completion.iter().map(|&id| id as i64));
        }
        let shape = [b as i64, longest as i64];
        Self {
            tokens: Tensor::from_slice(&ids).view(shape).to_device(device),
            positions: Tensor::arange(longest as i64, (Kind::Int64, device)).unsqueeze(0).expand(shape, true),
            predicting_rows: Tensor::from_slice(&rows).to_device(device),
            targets: Tensor::from_slice(&targets).to_device(device),
        }
    }

    /// The rows of `hidden` `(b, longest, h)` that predict completion tokens: `(tokens, h)`.
    pub(crate) fn predicting(&self, hidden: &Tensor) -> Tensor {
        let width = hidden.size().last().copied().unwrap_or(0);
        hidden.reshape([-1, width]).index_select(0, &self.predicting_rows)
    }
}
