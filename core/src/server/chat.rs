//! `POST /v1/chat/completions`: template the conversation, generate, answer as a whole or as
//! server-sent chunks, parse tool calls where the template defines a format.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::{ApiError, ApiJson};
use super::episodes::{PreparedTurn, EPISODE_HEADER};
use super::{fields, structured};
use super::openai::{AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChatLogprobs, ChoiceExtension, FunctionCall, ToolCall, Usage};
use super::requests::{self, FinishedChoice, Plan};
use super::stream::{finish_stream, send_event, sse_channel, StopHoldback, StreamError};
use super::{unix_now, AppState};
use crate::engine::scheduler::SequenceEvent;
use crate::tokenizer::tool_calls::{parse_tool_calls, ToolCallFormat};

/// Everything about one accepted chat request that answering it needs.
struct ChatJob {
    id: String,
    created: u64,
    prompt_ids: Vec<u32>,
    plan: Plan,
    logprobs: bool,
    tool_format: Option<ToolCallFormat>,
    include_usage: bool,
    return_token_ids: bool,
    user: Option<String>,
    started: Instant,
    /// The agent episode this call continues, when it names one.
    episode: Option<PreparedTurn>,
    /// The prompt's tokens scored, with `prompt_logprobs`.
    prompt_logprobs: Option<Vec<crate::engine::PromptToken>>,
}

impl ChatJob {
    fn rollout_context(&self) -> requests::RolloutContext<'_> {
        requests::RolloutContext {
            prompt_ids: &self.prompt_ids,
            sampling: &self.plan.sampling,
            user: self.user.as_ref(),
            return_token_ids: self.return_token_ids,
            group: self.id.clone(),
            group_size: self.plan.n,
        }
    }
}

pub(super) async fn chat_completions(State(state): State<AppState>, headers: HeaderMap, ApiJson(request): ApiJson<ChatCompletionRequest>) -> Result<Response, ApiError> {
    let started = Instant::now();
    if request.model != state.engine.info.name {
        return Err(ApiError::invalid("model", format!("model '{}' is not served here (this server serves '{}')", request.model, state.engine.info.name)));
    }
    if request.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    if request.top_logprobs.is_some_and(|k| k > 0) && !request.logprobs {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs requires logprobs: true"));
    }
    let ignored = fields::screen(&request.other)?;
    let mut plan = requests::plan(&request.sampling, request.top_logprobs)?;
    if plan.max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1, got 0"));
    }
    let prompt_top_k = match request.prompt_logprobs {
        Some(k) if !(0..=requests::MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::invalid("prompt_logprobs", format!("prompt_logprobs must be between 0 and {}, got {k}", requests::MAX_TOP_LOGPROBS)));
        }
        Some(_) if request.sampling.stream => return Err(ApiError::invalid("prompt_logprobs", "prompt_logprobs cannot be streamed")),
        other => other.map(|k| k as usize),
    };
    let tokenizer = state.engine.tokenizer.clone();
    let template = tokenizer.chat_template().ok_or_else(|| ApiError::invalid("messages", "this model has no chat template; use /v1/completions"))?;
    let tools_off = request.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
    let tools = request.tools.as_deref().filter(|t| !t.is_empty() && !tools_off);
    let tool_format = force_tool_calls(&request, tools, template.source(), &mut plan)?;
    if let Some(constraint) = &plan.sampling.constraint {
        let param = if tool_format.constrained { "tools" } else { plan.constraint_field };
        structured::check(&state, constraint, param)?;
    }
    let episode_id = request.hicra.as_ref().and_then(|h| h.episode_id.clone()).or_else(|| headers.get(EPISODE_HEADER).and_then(|v| v.to_str().ok()).map(String::from));
    let (prompt_ids, episode) = match episode_id {
        Some(id) => {
            if plan.n != 1 {
                return Err(ApiError::invalid("n", "an episode call takes n = 1: an episode is one trajectory (run several episodes of a task and reward them with a shared group_id)"));
            }
            let prepared = state.episodes.prepare(&id, template, &tokenizer, &request.messages, tools, &plan.sampling)?;
            (prepared.prompt_ids.clone(), Some(prepared))
        }
        None => (tokenizer.encode(&template.render(&request.messages, tools, true, None)?, false)?, None),
    };
    let engine_requests = requests::engine_requests(&plan, &prompt_ids, &state);
    let events = state.engine.submit(engine_requests)?;
    let prompt_logprobs = match prompt_top_k {
        Some(k) => state.engine.score_prompts(vec![prompt_ids.clone()], k).await?.prompts.pop(),
        None => None,
    };
    let job = ChatJob {
        id: format!("chatcmpl-{}", state.rollouts.next_id()),
        created: unix_now(),
        prompt_ids,
        plan,
        logprobs: request.logprobs,
        tool_format: tool_format.format,
        include_usage: request.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage),
        return_token_ids: request.sampling.return_token_ids,
        user: request.sampling.user.clone(),
        started,
        episode,
        prompt_logprobs,
    };
    if request.sampling.stream {
        return Ok(fields::with_ignored_header(stream_chat(state, job, events), &ignored));
    }
    let choices = requests::collect(events, job.plan.n, &state, started).await?;
    Ok(fields::with_ignored_header(Json(whole_response(&state, &job, choices)).into_response(), &ignored))
}

/// How the answer's tool calls are written, and whether the request forces one.
struct ToolFormat {
    /// The format to parse calls in; `None` when tools are off or the template has none.
    format: Option<ToolCallFormat>,
    /// The tools constrain the output (a call `tool_choice` requires, or strict tools).
    constrained: bool,
}

/// Turns a `tool_choice` that requires a call (`required`, or a named function) into the
/// plan's constraint, in the template's tool-call format (Hermes where the template has none,
/// so that any chat model can be made to call a tool); with `auto`, tools marked `strict`
/// make every call the model chooses to write valid.
fn force_tool_calls(request: &ChatCompletionRequest, tools: Option<&[Value]>, template_source: &str, plan: &mut Plan) -> Result<ToolFormat, ApiError> {
    let detected = ToolCallFormat::detect(template_source);
    let Some(tools) = tools else {
        if request.tool_choice.as_ref().is_some_and(|c| c.is_object() || c.as_str() == Some("required")) {
            return Err(ApiError::invalid("tool_choice", "tool_choice requires a tool call but the request has no tools"));
        }
        return Ok(ToolFormat { format: None, constrained: false });
    };
    let format = detected.unwrap_or(ToolCallFormat::Hermes);
    let parallel = request.other.get("parallel_tool_calls").and_then(Value::as_bool).unwrap_or(true);
    // A call `tool_choice` requires, else (auto) tools marked strict, which make any call the
    // model writes valid (a template without a tool format never has its output read as
    // calls: nothing to enforce there).
    let (constraint, format, param, conflict) = match structured::tool_call_constraint(tools, request.tool_choice.as_ref(), format, parallel)? {
        Some(constraint) => (constraint, Some(format), "tool_choice", "tool_choice forces a tool call, so the output cannot also follow response_format"),
        None => match detected.and_then(|format| structured::strict_tools_constraint(tools, format)) {
            Some(constraint) => (constraint, detected, "tools", "tools marked strict constrain the output, so it cannot also follow response_format"),
            None => return Ok(ToolFormat { format: detected, constrained: false }),
        },
    };
    if plan.sampling.constraint.is_some() {
        return Err(ApiError::invalid(param, conflict));
    }
    plan.sampling.constraint = Some(constraint);
    Ok(ToolFormat { format, constrained: true })
}

/// Records a finished choice as a rollout and, for an episode call, as the episode's next turn.
fn record_choice(state: &AppState, job: &ChatJob, index: usize, choice: &FinishedChoice, finish_reason: &str, content: &Option<String>, tool_calls: &[ToolCall]) -> ChoiceExtension {
    let mut hicra = requests::record_rollout(state, &job.rollout_context(), index, choice, finish_reason);
    if let Some(prepared) = &job.episode {
        let versions = (choice.policy_version_first.unwrap_or(choice.policy_version), choice.policy_version);
        let call_ids = tool_calls.iter().map(|c| c.id.clone()).collect();
        hicra.episode = Some(state.episodes.record(prepared, &state.engine.tokenizer, &job.plan.sampling, &hicra.rollout_id, &choice.tokens, versions, content.clone(), call_ids));
    }
    hicra
}

/// Content and tool calls of a finished text, per the template's tool format.
fn split_tool_calls(job: &ChatJob, text: &str, choice_index: usize) -> (Option<String>, Vec<ToolCall>) {
    let Some(format) = job.tool_format else { return (Some(text.to_string()), Vec::new()) };
    let parsed = parse_tool_calls(format, text);
    let calls = parsed
        .tool_calls
        .into_iter()
        .enumerate()
        .map(|(i, call)| ToolCall {
            id: format!("call_{}_{choice_index}_{i}", job.id.trim_start_matches("chatcmpl-")),
            kind: "function",
            function: FunctionCall { name: call.name, arguments: call.arguments },
        })
        .collect();
    (parsed.content, calls)
}

fn whole_response(state: &AppState, job: &ChatJob, choices: Vec<FinishedChoice>) -> ChatCompletion {
    let tokenizer = &state.engine.tokenizer;
    let completion_tokens = choices.iter().map(|c| c.tokens.len()).sum();
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, choice)| {
            let (content, tool_calls) = split_tool_calls(job, &choice.text, index);
            let finish_reason = if tool_calls.is_empty() { requests::finish_reason_str(choice.reason) } else { "tool_calls" };
            let hicra = record_choice(state, job, index, &choice, finish_reason, &content, &tool_calls);
            let logprobs = job.logprobs.then(|| ChatLogprobs { content: choice.tokens.iter().map(|t| requests::token_logprob(tokenizer, t)).collect() });
            ChatChoice { index, message: AssistantMessage { role: "assistant", content, tool_calls }, logprobs, finish_reason, hicra }
        })
        .collect();
    let prompt_tokens = job.prompt_ids.len();
    ChatCompletion {
        id: job.id.clone(),
        object: "chat.completion",
        created: job.created,
        model: state.engine.info.name.clone(),
        choices,
        usage: Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens },
        prompt_logprobs: job.prompt_logprobs.as_ref().map(|scored| vllm_prompt_logprobs(tokenizer, &job.prompt_ids, scored)),
    }
}

/// vLLM's `prompt_logprobs`: `null` for the first token, then per token a map from token id
/// to `{logprob, rank, decoded_token}` holding the prompt's token and its alternatives.
fn vllm_prompt_logprobs(tokenizer: &crate::tokenizer::Tokenizer, ids: &[u32], scored: &[crate::engine::PromptToken]) -> Vec<Option<serde_json::Map<String, Value>>> {
    let entry = |logprob: f32, rank: u32, id: u32| serde_json::json!({"logprob": logprob, "rank": rank, "decoded_token": requests::token_text(tokenizer, id)});
    std::iter::once(None)
        .chain(ids.iter().skip(1).zip(scored).map(|(&id, token)| {
            let mut position = serde_json::Map::new();
            position.insert(id.to_string(), entry(token.logprob, token.rank, id));
            for (rank, &(alt, logprob)) in token.top.iter().enumerate() {
                position.entry(alt.to_string()).or_insert_with(|| entry(logprob, rank as u32 + 1, alt));
            }
            Some(position)
        }))
        .collect()
}

fn stream_chat(state: AppState, job: ChatJob, events: UnboundedReceiver<SequenceEvent>) -> Response {
    let (tx, response) = sse_channel();
    tokio::spawn(async move {
        let mut writer = ChunkWriter { state, job, tx };
        let outcome = writer.run(events).await;
        finish_stream(&writer.tx, outcome, &writer.job.id);
    });
    response
}

/// Turns engine events into `chat.completion.chunk`s.
struct ChunkWriter {
    state: AppState,
    job: ChatJob,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
}

impl ChunkWriter {
    fn send(&self, choices: Value, usage: Option<Value>) -> Result<(), StreamError> {
        let mut chunk = json!({
            "id": self.job.id, "object": "chat.completion.chunk", "created": self.job.created,
            "model": self.state.engine.info.name, "choices": choices,
        });
        if self.job.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        // A failed send means the client disconnected; returning drops the engine receiver,
        // which makes the scheduler cancel the sequences.
        send_event(&self.tx, chunk.to_string())
    }

    async fn run(&mut self, mut events: UnboundedReceiver<SequenceEvent>) -> Result<(), StreamError> {
        let n = self.job.plan.n;
        let mut holdbacks: Vec<StopHoldback> = (0..n).map(|_| StopHoldback::new(&self.job.plan.stop)).collect();
        let mut finished: Vec<FinishedChoice> = (0..n).map(|_| FinishedChoice::default()).collect();
        for index in 0..n {
            self.send(json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None)?;
        }
        let mut remaining = n;
        let mut first = true;
        while remaining > 0 {
            match events.recv().await {
                Some(SequenceEvent::Token { choice, token, policy_version }) => {
                    if first {
                        self.state.metrics.time_to_first_token.observe(self.job.started.elapsed().as_secs_f64());
                        first = false;
                    }
                    let Some(holdback) = holdbacks.get_mut(choice) else { continue };
                    // With tools, content is parsed at the end, so nothing is released early.
                    let text = if self.job.tool_format.is_some() { String::new() } else { holdback.push(&token.text) };
                    let logprobs = self.job.logprobs.then(|| json!({"content": [requests::token_logprob(&self.state.engine.tokenizer, &token)]}));
                    if !text.is_empty() || logprobs.is_some() {
                        self.send(json!([{"index": choice, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null}]), None)?;
                    }
                    if let Some(c) = finished.get_mut(choice) {
                        c.push(token, policy_version);
                    }
                }
                Some(SequenceEvent::Finished { choice, reason, text, policy_version }) => {
                    remaining -= 1;
                    let Some(c) = finished.get_mut(choice) else { continue };
                    c.reason = Some(reason);
                    c.text = text;
                    c.policy_version = policy_version;
                    self.finish_choice(choice, &finished[choice], &mut holdbacks[choice])?;
                }
                Some(SequenceEvent::Failed { message }) => return Err(ApiError::Internal(message).into()),
                None => return Err(ApiError::Internal("engine closed the event stream".into()).into()),
            }
        }
        if self.job.include_usage {
            let completion_tokens: usize = finished.iter().map(|c| c.tokens.len()).sum();
            let prompt_tokens = self.job.prompt_ids.len();
            let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
            self.send(json!([]), Some(usage))?;
        }
        Ok(())
    }

    fn finish_choice(&self, index: usize, choice: &FinishedChoice, holdback: &mut StopHoldback) -> Result<(), StreamError> {
        let (content, tool_calls) = if self.job.tool_format.is_some() {
            split_tool_calls(&self.job, &choice.text, index)
        } else {
            (Some(holdback.finish(&choice.text)), Vec::new())
        };
        // What the client ends up holding: the whole text (the stream sent it in pieces).
        let whole_content = if self.job.tool_format.is_some() { content.clone() } else { Some(choice.text.clone()) };
        let finish_reason = if tool_calls.is_empty() { requests::finish_reason_str(choice.reason) } else { "tool_calls" };
        let mut delta = json!({});
        if let Some(content) = content.filter(|c| !c.is_empty()) {
            delta["content"] = json!(content);
        }
        if !tool_calls.is_empty() {
            let calls: Vec<Value> = tool_calls
                .iter()
                .enumerate()
                .map(|(i, call)| json!({"index": i, "id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}))
                .collect();
            delta["tool_calls"] = json!(calls);
        }
        let hicra = record_choice(&self.state, &self.job, index, choice, finish_reason, &whole_content, &tool_calls);
        self.send(json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish_reason, "hicra": hicra}]), None)
    }
}
