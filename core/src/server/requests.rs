//! What chat and text completions share: turning OpenAI sampling fields into engine requests,
//! collecting a submission's events into finished choices, and recording rollouts.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::openai::{ChoiceExtension, SamplingFields, TokenLogprob, TopLogprob};
use super::rollouts::Rollout;
use super::AppState;
use crate::engine::scheduler::SequenceEvent;
use crate::engine::{FinishReason, GeneratedToken, GenerationRequest, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Most choices one request may ask for.
pub(crate) const MAX_CHOICES: i64 = 16;
/// Most alternatives per token.
pub(crate) const MAX_TOP_LOGPROBS: i64 = 20;

/// Validated sampling fields, before a prompt is attached.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub n: usize,
    pub sampling: SamplingParams,
    /// `None`: up to the context limit (capped by the server's default).
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub top_logprobs: usize,
    /// The request field that asked for `sampling.constraint` (errors name it).
    pub constraint_field: &'static str,
}

/// Checks the sampling fields; errors name the parameter.
pub(crate) fn plan(fields: &SamplingFields, top_logprobs: Option<i64>) -> Result<Plan, ApiError> {
    let n = fields.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::invalid("n", format!("n must be between 1 and {MAX_CHOICES}, got {n}")));
    }
    let temperature = fields.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=100.0).contains(&temperature)) {
        return Err(ApiError::invalid("temperature", format!("temperature must be >= 0, got {temperature}")));
    }
    let top_p = fields.top_p.unwrap_or(1.0);
    let top_k = fields.top_k.unwrap_or(0);
    if top_k < 0 {
        return Err(ApiError::invalid("top_k", format!("top_k must be >= 0 (0 disables it), got {top_k}")));
    }
    // 0 is legal only for text completions with echo (scoring the prompt); they check it.
    let max_tokens = match fields.max_completion_tokens.or(fields.max_tokens) {
        Some(m) if m < 0 => return Err(ApiError::invalid("max_tokens", format!("max_tokens must be at least 1, got {m}"))),
        Some(m) => Some(m as usize),
        None => None,
    };
    let logit_bias = logit_bias(fields.logit_bias.as_ref())?;
    let (constraint_field, constraint) = match super::structured::requested_constraint(fields)? {
        Some((field, constraint)) => (field, Some(constraint)),
        None => ("response_format", None),
    };
    let top_logprobs = top_logprobs.unwrap_or(0);
    if !(0..=MAX_TOP_LOGPROBS).contains(&top_logprobs) {
        return Err(ApiError::invalid("top_logprobs", format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}")));
    }
    let stop = fields.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 8 {
        return Err(ApiError::invalid("stop", "at most 8 stop strings"));
    }
    let seed = match fields.seed {
        Some(seed) => seed as u64,
        None => random_seed(),
    };
    let sampling = SamplingParams {
        temperature,
        top_p,
        top_k: top_k as usize,
        seed,
        min_p: fields.min_p.unwrap_or(0.0),
        logit_bias,
        presence_penalty: fields.presence_penalty.unwrap_or(0.0),
        frequency_penalty: fields.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: fields.repetition_penalty.unwrap_or(1.0),
        constraint,
    };
    sampling.check_ranges().map_err(|e| ApiError::invalid(e.param, e.message))?;
    Ok(Plan {
        n: n as usize,
        sampling,
        max_tokens,
        stop,
        top_logprobs: top_logprobs as usize,
        constraint_field,
    })
}

/// OpenAI's `logit_bias`: token ids as string keys, numbers as biases (their range is
/// [`SamplingParams::check_ranges`]'s); sorted by id.
fn logit_bias(map: Option<&serde_json::Map<String, serde_json::Value>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut out = Vec::new();
    for (key, value) in map.into_iter().flatten() {
        let id: u32 = key.parse().map_err(|_| ApiError::invalid("logit_bias", format!("logit_bias key '{key}' is not a token id")))?;
        let bias = value.as_f64().ok_or_else(|| ApiError::invalid("logit_bias", format!("logit_bias for token {id} must be a number between -100 and 100, got {value}")))?;
        out.push((id, bias as f32));
    }
    out.sort_by_key(|&(id, _)| id);
    Ok(out)
}

/// A seed for requests that gave none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    hasher.finish()
}

/// The seed of choice `index`: distinct per choice, fixed by the request's seed.
fn choice_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// One engine request per choice.
pub(crate) fn engine_requests(plan: &Plan, prompt_ids: &[u32], state: &AppState) -> Vec<GenerationRequest> {
    // A prompt over the context leaves no room; `submit` refuses it with the limit named.
    let room = state.engine.info.max_context.saturating_sub(prompt_ids.len()).max(1);
    let max_new_tokens = plan.max_tokens.unwrap_or(state.options.default_max_tokens).min(room);
    let tokenizer = &state.engine.tokenizer;
    (0..plan.n)
        .map(|i| GenerationRequest {
            prompt_ids: prompt_ids.to_vec(),
            sampling: SamplingParams { seed: choice_seed(plan.sampling.seed, i), ..plan.sampling.clone() },
            max_new_tokens,
            stop_token_ids: tokenizer.eos_ids().to_vec(),
            stop_strings: plan.stop.clone(),
            top_logprobs: plan.top_logprobs,
        })
        .collect()
}

/// A finished choice.
#[derive(Debug, Default)]
pub(crate) struct FinishedChoice {
    pub tokens: Vec<GeneratedToken>,
    pub text: String,
    pub reason: Option<FinishReason>,
    /// Policy version at the first token.
    pub policy_version_first: Option<u64>,
    /// Policy version at the last token.
    pub policy_version: u64,
}

impl FinishedChoice {
    /// Appends a token produced by weights of `policy_version`.
    pub(crate) fn push(&mut self, token: GeneratedToken, policy_version: u64) {
        self.policy_version_first.get_or_insert(policy_version);
        self.policy_version = policy_version;
        self.tokens.push(token);
    }
}

/// Waits for every choice of a submission to finish.
pub(crate) async fn collect(mut events: UnboundedReceiver<SequenceEvent>, n: usize, state: &AppState, started: Instant) -> Result<Vec<FinishedChoice>, ApiError> {
    let mut choices: Vec<FinishedChoice> = (0..n).map(|_| FinishedChoice::default()).collect();
    let mut remaining = n;
    let mut first_token = true;
    while remaining > 0 {
        match events.recv().await {
            Some(SequenceEvent::Token { choice, token, policy_version }) => {
                if first_token {
                    state.metrics.time_to_first_token.observe(started.elapsed().as_secs_f64());
                    first_token = false;
                }
                if let Some(c) = choices.get_mut(choice) {
                    c.push(token, policy_version);
                }
            }
            Some(SequenceEvent::Finished { choice, reason, text, policy_version }) => {
                if let Some(c) = choices.get_mut(choice) {
                    c.text = text;
                    c.reason = Some(reason);
                    c.policy_version = policy_version;
                }
                remaining -= 1;
            }
            Some(SequenceEvent::Failed { message }) => return Err(ApiError::Internal(message)),
            None => return Err(ApiError::Internal("engine closed the event stream".into())),
        }
    }
    Ok(choices)
}

/// What a request contributes to each of its rollouts.
pub(crate) struct RolloutContext<'a> {
    pub prompt_ids: &'a [u32],
    /// The request's sampling parameters (each choice's seed is derived from its index).
    pub sampling: &'a SamplingParams,
    pub user: Option<&'a String>,
    pub return_token_ids: bool,
    /// The request's choices form one group for GRPO unless rewards name another.
    pub group: String,
    pub group_size: usize,
}

/// Records a finished choice as a rollout and returns its extension object.
pub(crate) fn record_rollout(state: &AppState, ctx: &RolloutContext<'_>, index: usize, choice: &FinishedChoice, finish_reason: &str) -> ChoiceExtension {
    let id = state.rollouts.next_id();
    let completion: Vec<u32> = choice.tokens.iter().map(|t| t.id).collect();
    let first = choice.policy_version_first.unwrap_or(choice.policy_version);
    let rollout = Rollout {
        id: id.clone(),
        model: state.engine.info.name.clone(),
        policy_version: choice.policy_version,
        policy_version_first: first,
        prompt_token_ids: ctx.prompt_ids.to_vec(),
        completion_token_ids: completion.clone(),
        logprobs: choice.tokens.iter().map(|t| t.logprob).collect(),
        sampling_logprobs: choice.tokens.iter().map(|t| t.sampling_logprob).collect(),
        entropies: choice.tokens.iter().map(|t| t.entropy).collect(),
        token_texts: choice.tokens.iter().map(|t| t.text.clone()).collect(),
        finish_reason: finish_reason.to_string(),
        text: choice.text.clone(),
        sampling: SamplingParams { seed: choice_seed(ctx.sampling.seed, index), ..ctx.sampling.clone() },
        created: super::unix_now(),
        user: ctx.user.cloned(),
        group: ctx.group.clone(),
        group_size: ctx.group_size,
        reward: None,
        sampled_mask: Vec::new(),
    };
    if let Some(journal) = &state.journal {
        journal.served(&rollout);
    }
    state.rollouts.insert(rollout);
    ChoiceExtension {
        rollout_id: id,
        policy_version: choice.policy_version,
        policy_version_first: first,
        policy_version_last: choice.policy_version,
        prompt_token_ids: ctx.return_token_ids.then(|| ctx.prompt_ids.to_vec()),
        token_ids: ctx.return_token_ids.then_some(completion),
        episode: None,
    }
}

/// `stop` or `length`.
pub(crate) fn finish_reason_str(reason: Option<FinishReason>) -> &'static str {
    match reason {
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// A token's text as OpenAI shows it in logprobs (the token alone, special tokens included).
pub(crate) fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Chat-format logprob entry of one token.
pub(crate) fn token_logprob(tokenizer: &Tokenizer, token: &GeneratedToken) -> TokenLogprob {
    let text = token_text(tokenizer, token.id);
    TokenLogprob {
        bytes: text.as_bytes().to_vec(),
        token: text,
        logprob: token.logprob,
        top_logprobs: token
            .top_logprobs
            .iter()
            .map(|&(id, logprob)| {
                let t = token_text(tokenizer, id);
                TopLogprob { bytes: t.as_bytes().to_vec(), token: t, logprob }
            })
            .collect(),
    }
}
