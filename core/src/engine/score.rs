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
            return Err(EngineError::PromptTooLong { prompt_tokens: total, max_context: limit, generating: false });
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

/// One prompt token's teacher-forced logprob and its most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptToken {
    /// log p(token | the tokens before it).
    pub logprob: f32,
    /// 1 + the number of tokens more likely than it at its position (1: the most likely).
    pub rank: u32,
    /// The `top_k` most likely tokens at its position, most likely first: (id, logprob).
    pub top: Vec<(u32, f32)>,
}

/// Rows of logits computed at once when scoring a prompt: bounds the `(rows, vocab)` tensor
/// (49k vocabulary x 256 rows x 4 bytes = 50 MB) whatever the prompt's length.
const PROMPT_LOGIT_ROWS: i64 = 256;

/// Teacher-forced logprobs of every prompt token after the first (the first has no context),
/// with LoRA on (what the server samples from) at temperature 1, plus `top_k` alternatives per
/// position. Returns `prompt.len() - 1` entries.
pub fn score_prompt(model: &Transformer, prompt: &[u32], top_k: usize) -> Result<Vec<PromptToken>, EngineError> {
    score_prompt_in_chunks(model, prompt, top_k, PROMPT_LOGIT_ROWS)
}

fn score_prompt_in_chunks(model: &Transformer, prompt: &[u32], top_k: usize, chunk_rows: i64) -> Result<Vec<PromptToken>, EngineError> {
    let Some((first, rest)) = prompt.split_first() else { return Err(EngineError::EmptyPrompt) };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = model.config().vocab_size;
    super::validate_prompt(prompt, vocab, model.max_positions(), false)?;
    let batch = PaddedPairs::new(&[(std::slice::from_ref(first), rest)], model.device());
    let top_k = top_k.min(vocab) as i64;
    tch::no_grad(|| -> Result<Vec<PromptToken>, EngineError> {
        let hidden = model.forward_hidden(&ForwardInput { tokens: &batch.tokens, positions: &batch.positions, use_lora: true, training: false }, None);
        let predicting = batch.predicting(&hidden);
        let mut out = Vec::with_capacity(rest.len());
        let rows = rest.len() as i64;
        for start in (0..rows).step_by(chunk_rows as usize) {
            let len = chunk_rows.min(rows - start);
            let logprobs = model.logits(&predicting.narrow(0, start, len)).log_softmax(-1, Kind::Float);
            let targets = batch.targets.narrow(0, start, len).unsqueeze(1);
            let picked = logprobs.gather(1, &targets, false);
            let ranks = Vec::<i64>::try_from(logprobs.gt_tensor(&picked).sum_dim_intlist(-1, false, Kind::Int64).to_device(Device::Cpu))?;
            let picked = Vec::<f32>::try_from(picked.squeeze_dim(1).to_device(Device::Cpu))?;
            let (top_values, top_ids) = match top_k {
                0 => (Vec::new(), Vec::new()),
                k => {
                    let (values, ids) = logprobs.topk(k, -1, true, true);
                    (Vec::<f32>::try_from(values.reshape([-1]).to_device(Device::Cpu))?, Vec::<i64>::try_from(ids.reshape([-1]).to_device(Device::Cpu))?)
                }
            };
            for (row, logprob) in picked.into_iter().enumerate() {
                let at = row * top_k as usize..(row + 1) * top_k as usize;
                let top = match top_k {
                    0 => Vec::new(),
                    _ => top_ids[at.clone()].iter().zip(&top_values[at]).map(|(&id, &lp)| (id as u32, lp)).collect(),
                };
                out.push(PromptToken { logprob, rank: ranks[row] as u32 + 1, top });
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_model() -> Transformer {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parity/llama/model.gguf");
        crate::model::load(path, &crate::model::LoadOptions::cpu()).unwrap_or_else(|e| panic!("{path}: {e}")).model
    }

    #[test]
    fn prompt_scores_equal_teacher_forcing_across_logit_chunks() {
        let model = tiny_model();
        let prompt: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % 320).collect();
        let reference = score_completions(&model, &[(&prompt[..1], &prompt[1..])], 1.0, true).unwrap_or_default().remove(0);
        // Chunks of 7 rows: 14 full chunks and a partial one; a chunk offset error shifts rows.
        let scored = score_prompt_in_chunks(&model, &prompt, 4, 7).unwrap_or_default();
        assert_eq!(scored.len(), prompt.len() - 1);
        for (i, (token, expected)) in scored.iter().zip(&reference).enumerate() {
            assert!((token.logprob - expected).abs() < 1e-5, "position {}: {} vs {expected}", i + 1, token.logprob);
            assert_eq!(token.top.len(), 4);
            assert!(token.top.windows(2).all(|w| w[0].1 >= w[1].1), "alternatives most likely first");
            // The rank agrees with the alternatives: rank r means r - 1 more likely tokens.
            match token.top.iter().position(|&(id, _)| id == prompt[i + 1]) {
                Some(at) => assert_eq!(token.rank as usize, at + 1),
                None => assert!(token.rank > 4 && token.logprob <= token.top[3].1),
            }
        }
        assert_eq!(score_prompt(&model, &prompt[..1], 2).unwrap_or_default(), Vec::new(), "one token: nothing to score");
        assert!(score_prompt(&model, &[5, 999], 0).is_err(), "an id outside the vocabulary is refused");
    }
}
