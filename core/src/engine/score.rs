//! Teacher-forced scoring: the logprob of each given completion token under the model.
//!
//! This is the computation the trainer repeats with gradients; generation must report the
//! same numbers for the tokens it sampled.

use tch::{Kind, Tensor};

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
    let mut longest = 0;
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
        longest = longest.max(total);
    }
    let inv_t = if temperature > 0.0 { 1.0 / temperature } else { 1.0 };
    let b_sz = pairs.len() as i64;
    let mut ids = vec![0i64; pairs.len() * longest];
    for (row, (prompt, completion)) in pairs.iter().enumerate() {
        for (col, &id) in prompt.iter().chain(completion.iter()).enumerate() {
            ids[row * longest + col] = id as i64;
        }
    }
    let device = model.device();
    let tokens = Tensor::from_slice(&ids).view([b_sz, longest as i64]).to_device(device);
    let positions = Tensor::arange(longest as i64, (Kind::Int64, device)).unsqueeze(0).expand([b_sz, longest as i64], true);
    let hidden = tch::no_grad(|| {
        model.forward_hidden(&ForwardInput { tokens: &tokens, positions: &positions, use_lora, training: false }, None)
    });
    let mut out = Vec::with_capacity(pairs.len());
    for (row, (prompt, completion)) in pairs.iter().enumerate() {
        if completion.is_empty() {
            out.push(Vec::new());
            continue;
        }
        // Position p predicts token p + 1: completion token j is predicted at prompt_len - 1 + j.
        let start = prompt.len() as i64 - 1;
        let len = completion.len() as i64;
        let rows = hidden.get(row as i64).narrow(0, start, len);
        let logprobs = tch::no_grad(|| (model.logits(&rows) * inv_t).log_softmax(-1, Kind::Float));
        let targets = Tensor::from_slice(&completion.iter().map(|&id| id as i64).collect::<Vec<_>>()).to_device(device);
        let picked = logprobs.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1).to_device(tch::Device::Cpu);
        out.push(Vec::<f32>::try_from(picked)?);
    }
    Ok(out)
}
