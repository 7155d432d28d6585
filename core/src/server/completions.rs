//! `POST /v1/completions`: continue a text or token-id prompt (or a batch of them), with the
//! legacy OpenAI semantics vLLM implements: `echo` returns the prompt before the completion,
//! and with `logprobs` the prompt's own tokens are scored too (teacher-forced under the served
//! policy, the first token `null`); `max_tokens: 0` with `echo` scores the prompt only. This is
//! what lm-evaluation-harness's `local-completions` loglikelihood requests rely on.

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::{ApiError, ApiJson};
use super::openai::{ChoiceExtension, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Prompt, Usage};
use super::requests::{self, FinishedChoice};
use super::{fields, structured};
use super::stream::{sse_channel, StopHoldback};
use super::{unix_now, AppState};
use crate::engine::scheduler::SequenceEvent;
use crate::engine::PromptToken;
use crate::tokenizer::{DecodeStream, Tokenizer};

pub(super) async fn completions(State(state): State<AppState>, ApiJson(request): ApiJson<CompletionRequest>) -> Result<Response, ApiError> {
    let started = Instant::now();
    if request.model != state.engine.info.name {
        return Err(ApiError::invalid("model", format!("model '{}' is not served here (this server serves '{}')", request.model, state.engine.info.name)));
    }
    let ignored = fields::screen(&request.other)?;
    let plan = requests::plan(&request.sampling, request.logprobs)?;
    if let Some(constraint) = &plan.sampling.constraint {
        structured::check(&state, constraint, plan.constraint_field)?;
    }
    let score_only = plan.max_tokens == Some(0);
    if score_only && !request.echo {
        return Err(ApiError::invalid("max_tokens", "max_tokens 0 generates nothing: use it with echo (and logprobs) to score the prompt"));
    }
    if request.sampling.stream && (request.echo || score_only) {
        return Err(ApiError::invalid("echo", "echo (and max_tokens 0) cannot be streamed"));
    }
    let prompts = prompt_ids(&state.engine.tokenizer, request.prompt)?;
    if request.sampling.stream && prompts.len() != 1 {
        return Err(ApiError::invalid("prompt", "streaming takes exactly one prompt"));
    }
    if score_only {
        return Ok(fields::with_ignored_header(score_prompts(state, &request.logprobs, &plan, prompts).await?, &ignored));
    }
    // Submit every prompt before waiting, so they batch together in the engine; all or
    // nothing, so a refused batch leaves none of its prompts queued behind the 429.
    let groups = prompts.iter().map(|ids| requests::engine_requests(&plan, ids, &state)).collect();
    let submissions = state.engine.submit_all(groups).map_err(|e| ApiError::from(e).for_prompt_field())?;
    // Prompt logprobs for echo, computed on the engine thread between decode steps.
    let echoed = match (request.echo, request.logprobs) {
        (true, Some(_)) => Some(state.engine.score_prompts(prompts.clone(), plan.top_logprobs).await.map_err(|e| ApiError::from(e).for_prompt_field())?.prompts),
        _ => None,
    };
    let id = format!("cmpl-{}", state.rollouts.next_id());
    let created = unix_now();
    if request.sampling.stream {
        let Some((ids, events)) = prompts.into_iter().zip(submissions).next() else {
            return Err(ApiError::invalid("prompt", "no prompt"));
        };
        return Ok(fields::with_ignored_header(stream_completion(state, id, created, ids, plan, request.sampling.return_token_ids, request.sampling.user, events), &ignored));
    }
    let tokenizer = state.engine.tokenizer.clone();
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (prompt_index, (ids, events)) in prompts.iter().zip(submissions).enumerate() {
        // The echoed prompt is the same for every choice of this prompt: built once.
        let echo = match request.echo {
            true => Some(echoed_prompt(&tokenizer, ids, echoed.as_ref().map(|scored| scored[prompt_index].as_slice()))?),
            false => None,
        };
        let finished = requests::collect(events, plan.n, &state, started).await?;
        let context = requests::RolloutContext {
            prompt_ids: ids,
            sampling: &plan.sampling,
            user: request.sampling.user.as_ref(),
            return_token_ids: request.sampling.return_token_ids,
            group: format!("{id}-{prompt_index}"),
            group_size: plan.n,
        };
        usage.prompt_tokens += ids.len();
        for (index, choice) in finished.into_iter().enumerate() {
            usage.completion_tokens += choice.tokens.len();
            let finish_reason = requests::finish_reason_str(choice.reason);
            let hicra = requests::record_rollout(&state, &context, index, &choice, finish_reason);
            let (prompt_text, mut logprobs) = match &echo {
                Some((text, logprobs)) => (text.as_str(), logprobs.clone()),
                None => ("", request.logprobs.map(|_| CompletionLogprobs::default())),
            };
            if let Some(logprobs) = logprobs.as_mut() {
                append_generated(&tokenizer, logprobs, prompt_text.chars().count(), &choice);
            }
            let text = format!("{prompt_text}{}", choice.text);
            choices.push(CompletionChoice { index: choices.len(), text, logprobs, finish_reason, hicra });
        }
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    Ok(fields::with_ignored_header(Json(Completion { id, object: "text_completion", created, model: state.engine.info.name.clone(), choices, usage }).into_response(), &ignored))
}

/// Token ids of each prompt: text is tokenized with the model's special tokens (BOS where
/// the model adds one); ids are taken as given.
fn prompt_ids(tokenizer: &Tokenizer, prompt: Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let to_u32 = |ids: Vec<i64>| -> Result<Vec<u32>, ApiError> {
        ids.into_iter()
            .map(|id| u32::try_from(id).map_err(|_| ApiError::invalid("prompt", format!("token id {id} is not a valid id"))))
            .collect()
    };
    let prompts = match prompt {
        Prompt::Text(text) => vec![tokenizer.encode(&text, true)?],
        Prompt::Texts(texts) => texts.iter().map(|t| tokenizer.encode(t, true)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![to_u32(ids)?],
        Prompt::TokenBatches(batches) => batches.into_iter().map(to_u32).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    Ok(prompts)
}

/// `max_tokens: 0` with `echo`: each prompt returned as text, scored when `logprobs` is
/// given, `n` identical choices per prompt; nothing is generated or recorded as a rollout.
async fn score_prompts(state: AppState, logprobs: &Option<i64>, plan: &requests::Plan, prompts: Vec<Vec<u32>>) -> Result<Response, ApiError> {
    let tokenizer = state.engine.tokenizer.clone();
    let (scored, policy_version) = match logprobs {
        // `score_prompts` checks the prompts itself.
        Some(_) => {
            let scored = state.engine.score_prompts(prompts.clone(), plan.top_logprobs).await.map_err(|e| ApiError::from(e).for_prompt_field())?;
            (Some(scored.prompts), scored.policy_version)
        }
        None => {
            for ids in &prompts {
                crate::engine::validate_prompt(ids, state.engine.info.vocab_size, state.engine.info.max_context, false).map_err(|e| ApiError::from(e).for_prompt_field())?;
            }
            (None, state.engine.policy_version.load(std::sync::atomic::Ordering::Acquire))
        }
    };
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (prompt_index, ids) in prompts.iter().enumerate() {
        usage.prompt_tokens += ids.len();
        let (text, logprobs) = echoed_prompt(&tokenizer, ids, scored.as_ref().map(|scored| scored[prompt_index].as_slice()))?;
        let hicra = ChoiceExtension { policy_version, policy_version_first: policy_version, policy_version_last: policy_version, ..ChoiceExtension::default() };
        for _ in 0..plan.n {
            choices.push(CompletionChoice { index: choices.len(), text: text.clone(), logprobs: logprobs.clone(), finish_reason: "length", hicra: hicra.clone() });
        }
    }
    usage.total_tokens = usage.prompt_tokens;
    let id = format!("cmpl-{}", state.rollouts.next_id());
    Ok(Json(Completion { id, object: "text_completion", created: unix_now(), model: state.engine.info.name.clone(), choices, usage }).into_response())
}

/// An echoed prompt: its text and, when it was `scored`, its logprob entries.
fn echoed_prompt(tokenizer: &Tokenizer, ids: &[u32], scored: Option<&[PromptToken]>) -> Result<(String, Option<CompletionLogprobs>), ApiError> {
    match scored {
        Some(scored) => echo_logprobs(tokenizer, ids, scored).map(|(text, logprobs)| (text, Some(logprobs))),
        None => Ok((tokenizer.decode(ids, false)?, None)),
    }
}

/// The echoed prompt's text and its logprob entries: the first token `null`, each later one
/// its teacher-forced logprob and alternatives. The text is the tokens' incremental decoding,
/// so every `text_offset` points at its token's text.
fn echo_logprobs(tokenizer: &Tokenizer, ids: &[u32], scored: &[PromptToken]) -> Result<(String, CompletionLogprobs), ApiError> {
    let mut out = CompletionLogprobs::default();
    let mut text = String::new();
    let mut stream = DecodeStream::new(tokenizer, false);
    for (i, &id) in ids.iter().enumerate() {
        out.text_offset.push(text.chars().count());
        out.tokens.push(requests::token_text(tokenizer, id));
        match i.checked_sub(1).and_then(|j| scored.get(j)) {
            Some(token) => {
                out.token_logprobs.push(Some(f64::from(token.logprob)));
                let mut top: serde_json::Map<String, Value> = token.top.iter().map(|&(alt, lp)| (requests::token_text(tokenizer, alt), json!(lp))).collect();
                // As for generated tokens (and in OpenAI's and vLLM's answers), the prompt's own
                // token is among the alternatives even when it is not in the top k.
                if !token.top.is_empty() {
                    top.entry(requests::token_text(tokenizer, id)).or_insert(json!(token.logprob));
                }
                out.top_logprobs.push(Some(top));
            }
            None => {
                out.token_logprobs.push(None);
                out.top_logprobs.push(None);
            }
        }
        if let Some(piece) = stream.step(id)? {
            text.push_str(&piece);
        }
    }
    if let Some(rest) = stream.flush()? {
        text.push_str(&rest);
    }
    Ok((text, out))
}

/// Appends a generated choice's tokens to `out`, their offsets counted from `start`
/// (characters of the echoed prompt before them, or 0).
fn append_generated(tokenizer: &Tokenizer, out: &mut CompletionLogprobs, start: usize, choice: &FinishedChoice) {
    let mut offset = start;
    for token in &choice.tokens {
        out.text_offset.push(offset);
        offset += token.text.chars().count();
        out.tokens.push(requests::token_text(tokenizer, token.id));
        out.token_logprobs.push(Some(f64::from(token.logprob)));
        out.top_logprobs.push(Some(token.top_logprobs.iter().map(|&(id, lp)| (requests::token_text(tokenizer, id), json!(lp))).collect()));
    }
}

#[allow(clippy::too_many_arguments)]
fn stream_completion(
    state: AppState,
    id: String,
    created: u64,
    prompt_ids: Vec<u32>,
    plan: requests::Plan,
    return_token_ids: bool,
    user: Option<String>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<SequenceEvent>,
) -> Response {
    let (tx, response) = sse_channel();
    tokio::spawn(async move {
        let model = state.engine.info.name.clone();
        let chunk = |choices: Value| json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}).to_string();
        let mut holdbacks: Vec<StopHoldback> = (0..plan.n).map(|_| StopHoldback::new(&plan.stop)).collect();
        let mut finished: Vec<FinishedChoice> = (0..plan.n).map(|_| FinishedChoice::default()).collect();
        let mut remaining = plan.n;
        while remaining > 0 {
            let payload = match events.recv().await {
                Some(SequenceEvent::Token { choice, token, policy_version }) => {
                    let Some(holdback) = holdbacks.get_mut(choice) else { continue };
                    let text = holdback.push(&token.text);
                    finished[choice].push(token, policy_version);
                    if text.is_empty() {
                        continue;
                    }
                    chunk(json!([{"index": choice, "text": text, "logprobs": null, "finish_reason": null}]))
                }
                Some(SequenceEvent::Finished { choice, reason, text, policy_version }) => {
                    remaining -= 1;
                    let Some(c) = finished.get_mut(choice) else { continue };
                    c.reason = Some(reason);
                    c.policy_version = policy_version;
                    let rest = holdbacks[choice].finish(&text);
                    c.text = text;
                    let finish_reason = requests::finish_reason_str(Some(reason));
                    let context = requests::RolloutContext {
                        prompt_ids: &prompt_ids,
                        sampling: &plan.sampling,
                        user: user.as_ref(),
                        return_token_ids,
                        group: id.clone(),
                        group_size: plan.n,
                    };
                    let hicra = requests::record_rollout(&state, &context, choice, c, finish_reason);
                    chunk(json!([{"index": choice, "text": rest, "logprobs": null, "finish_reason": finish_reason, "hicra": hicra}]))
                }
                Some(SequenceEvent::Failed { message }) => ApiError::Internal(message).body().to_string(),
                None => break,
            };
            if tx.send(payload).is_err() {
                return;
            }
        }
        let _ = tx.send("[DONE]".to_string());
    });
    response
}
