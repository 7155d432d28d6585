//! `POST /v1/completions`: continue a text or token-id prompt (or a batch of them).

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::{ApiError, ApiJson};
use super::openai::{Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Prompt, Usage};
use super::requests::{self, FinishedChoice};
use super::stream::{sse_channel, StopHoldback};
use super::{unix_now, AppState};
use crate::engine::scheduler::SequenceEvent;
use crate::tokenizer::Tokenizer;

pub(super) async fn completions(State(state): State<AppState>, ApiJson(request): ApiJson<CompletionRequest>) -> Result<Response, ApiError> {
    let started = Instant::now();
    if request.model != state.engine.info.name {
        return Err(ApiError::invalid("model", format!("model '{}' is not served here (this server serves '{}')", request.model, state.engine.info.name)));
    }
    let plan = requests::plan(&request.sampling, request.logprobs)?;
    let prompts = prompt_ids(&state.engine.tokenizer, request.prompt)?;
    if request.sampling.stream && prompts.len() != 1 {
        return Err(ApiError::invalid("prompt", "streaming takes exactly one prompt"));
    }
    // Submit every prompt before waiting, so they batch together in the engine; all or
    // nothing, so a refused batch leaves none of its prompts queued behind the 429.
    let groups = prompts.iter().map(|ids| requests::engine_requests(&plan, ids, &state)).collect();
    let submissions = state.engine.submit_all(groups)?;
    let id = format!("cmpl-{}", state.rollouts.next_id());
    let created = unix_now();
    if request.sampling.stream {
        let Some((ids, events)) = prompts.into_iter().zip(submissions).next() else {
            return Err(ApiError::invalid("prompt", "no prompt"));
        };
        return Ok(stream_completion(state, id, created, ids, plan, request.sampling.return_token_ids, request.sampling.user, events));
    }
    let tokenizer = state.engine.tokenizer.clone();
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (prompt_index, (ids, events)) in prompts.iter().zip(submissions).enumerate() {
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
            let logprobs = request.logprobs.map(|_| legacy_logprobs(&tokenizer, &choice));
            let mut text = choice.text;
            if request.echo {
                text = format!("{}{text}", tokenizer.decode(ids, false)?);
            }
            choices.push(CompletionChoice { index: choices.len(), text, logprobs, finish_reason, hicra });
        }
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    Ok(Json(Completion { id, object: "text_completion", created, model: state.engine.info.name.clone(), choices, usage }).into_response())
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

fn legacy_logprobs(tokenizer: &Tokenizer, choice: &FinishedChoice) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    for token in &choice.tokens {
        let text = requests::token_text(tokenizer, token.id);
        out.text_offset.push(offset);
        offset += token.text.len();
        out.tokens.push(text);
        out.token_logprobs.push(token.logprob);
        let top = token.top_logprobs.iter().map(|&(id, lp)| (requests::token_text(tokenizer, id), json!(lp))).collect();
        out.top_logprobs.push(top);
    }
    out
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
