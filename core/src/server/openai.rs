//! OpenAI's request and response bodies, as serde types.
//!
//! Requests accept the fields OpenAI clients send; fields hicra does not implement are
//! refused or reported (`server::fields`). hicra's extensions: `top_k`, `min_p`,
//! `repetition_penalty`, vLLM's structured-output fields and `return_token_ids` in requests,
//! a `hicra` object on each choice naming the rollout and the policy version that produced it.

use std::ops::Deref;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::tokenizer::chat::ChatMessage;

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    /// A single stop string.
    One(String),
    /// Up to a few stop strings.
    Many(Vec<String>),
}

impl StopStrings {
    /// The strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with usage and no choices.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and text completions.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingFields {
    /// Choices to generate (1 by default).
    pub n: Option<i64>,
    /// Softmax temperature; 0 is greedy (OpenAI's default is 1).
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// Extension: keep the k most likely tokens.
    pub top_k: Option<i64>,
    /// Completion length limit.
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<i64>,
    /// Stop strings.
    pub stop: Option<StopStrings>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// End user id (recorded with the rollout).
    pub user: Option<String>,
    /// Extension: return prompt and completion token ids in `choices[i].hicra`.
    #[serde(default)]
    pub return_token_ids: bool,
    /// Subtracted from the logits of tokens the output already holds, in [-2, 2].
    pub presence_penalty: Option<f64>,
    /// Subtracted once per occurrence in the output, in [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string key) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Extension (vLLM's): drop tokens less likely than this share of the best one.
    pub min_p: Option<f64>,
    /// Extension (vLLM's, transformers'): CTRL's repetition penalty, > 0 (1 is off).
    pub repetition_penalty: Option<f64>,
    /// `text`, `json_object` or `json_schema` (see `server::structured`).
    pub response_format: Option<Value>,
    /// Extension (vLLM's): output valid against this JSON Schema.
    pub guided_json: Option<Value>,
    /// Extension (vLLM's): output matching this regular expression.
    pub guided_regex: Option<Value>,
    /// Extension (vLLM's): output of this Lark grammar (llguidance's dialect).
    pub guided_grammar: Option<Value>,
    /// Extension (vLLM's): output exactly one of these strings.
    pub guided_choice: Option<Value>,
    /// Extension (vLLM's newer form): `{json | regex | grammar | choice}`.
    pub structured_outputs: Option<Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// The served model's id.
    pub model: String,
    /// The conversation, roles checked.
    pub messages: Messages,
    /// Tools the model may call, rendered through the chat template; each has a `function`.
    pub tools: Option<Tools>,
    /// `none`, `auto`, `required` or a specific function.
    pub tool_choice: Option<Value>,
    /// Return per-token logprobs.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token (0..=20), needs `logprobs`.
    pub top_logprobs: Option<i64>,
    /// vLLM's extension: score the prompt's tokens too, with this many alternatives each
    /// (0..=20); answered in the response's `prompt_logprobs`.
    pub prompt_logprobs: Option<i64>,
    /// Sampling and output controls.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// hicra's own options (`extra_body={"hicra": {...}}` in the `openai` client).
    pub hicra: Option<HicraOptions>,
    /// Every other field: refused or reported by `server::fields`.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// hicra's request options.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HicraOptions {
    /// Ties this call to an agent episode (see `server::episodes`).
    pub episode_id: Option<String>,
}

/// The roles a request may use. Templates see `developer` as `system`: OpenAI introduced it
/// as the system role of newer models, and the templates served here know only `system`
/// (several treat it specially, e.g. as the first turn or a default system prompt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "system" | "developer" => Ok(Self::System),
            "user" => Ok(Self::User),
            "assistant" => Ok(Self::Assistant),
            "tool" => Ok(Self::Tool),
            // Template output for an unknown role is undefined (most print it verbatim, some
            // raise): refuse it here, where the error can name the field.
            other => Err(D::Error::custom(format!("unknown role '{other}': expected system, user, assistant, tool or developer"))),
        }
    }
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// A message as a request sends it: [`ChatMessage`]'s fields with the role checked where it
/// is parsed, so an error's path is `messages[i].role`.
#[derive(Deserialize)]
struct RequestMessage {
    role: Role,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Value>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl RequestMessage {
    /// The message for the template, its content as text: a list of content parts becomes
    /// the concatenation of its text parts (`refusal` parts count as text).
    fn into_chat_message(self, index: usize) -> Result<ChatMessage, String> {
        let content = match self.content {
            Some(Value::Array(parts)) => Some(Value::String(joined_text(&parts, index)?)),
            other => other,
        };
        Ok(ChatMessage { role: self.role.as_str().to_string(), content, tool_calls: self.tool_calls, tool_call_id: self.tool_call_id, name: self.name, extra: self.extra })
    }
}

/// The text of content parts, in order; a part of another modality is an error naming it.
fn joined_text(parts: &[Value], message: usize) -> Result<String, String> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        let field = match kind {
            "text" | "input_text" => "text",
            "refusal" => "refusal",
            "image_url" | "input_image" | "image" | "input_audio" | "audio" | "file" | "input_file" | "video_url" => {
                return Err(format!("messages[{message}].content[{j}]: '{kind}' parts are not supported: the served model reads text only"));
            }
            "" => return Err(format!("messages[{message}].content[{j}]: a content part needs a type (text)")),
            other => return Err(format!("messages[{message}].content[{j}]: unknown content part type '{other}' (text is supported)")),
        };
        let piece = part.get(field).and_then(Value::as_str).ok_or_else(|| format!("messages[{message}].content[{j}]: a '{kind}' part needs a string '{field}'"))?;
        text.push_str(piece);
    }
    Ok(text)
}

/// `messages`: the conversation, every role one the templates know.
#[derive(Clone, Debug, Default)]
pub struct Messages(Vec<ChatMessage>);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let messages = Vec::<RequestMessage>::deserialize(deserializer)?;
        let messages = messages.into_iter().enumerate().map(|(i, m)| m.into_chat_message(i)).collect::<Result<_, _>>().map_err(D::Error::custom)?;
        Ok(Self(messages))
    }
}

impl Deref for Messages {
    type Target = [ChatMessage];

    fn deref(&self) -> &[ChatMessage] {
        &self.0
    }
}

/// `tools`: JSON tool schemas, each `{"type": "function", "function": {"name": ..}}`. Kept
/// as given (key order included) for the template.
#[derive(Clone, Debug, Default)]
pub struct Tools(Vec<Value>);

/// One entry of `tools`, checked and kept as given.
struct Tool(Value);

impl<'de> Deserialize<'de> for Tool {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let tool = Value::deserialize(deserializer)?;
        check_tool(&tool).map_err(D::Error::custom)?;
        Ok(Self(tool))
    }
}

/// What a template needs of a tool: a `function` object with a string `name`. Without it
/// templates fail obscurely or render an empty tool. Messages use serde's "missing field `x`"
/// form, which [`super::error::ApiJson`] turns into the path `tools[i].x`.
fn check_tool(tool: &Value) -> Result<(), String> {
    const SHAPE: &str = r#"a tool is {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}"#;
    let Some(object) = tool.as_object() else { return Err(format!("invalid type: expected a tool object; {SHAPE}")) };
    if let Some(kind) = object.get("type").filter(|k| k.as_str() != Some("function")) {
        return Err(format!("invalid tool type {kind}: only \"function\" is supported; {SHAPE}"));
    }
    let Some(function) = object.get("function") else { return Err(format!("missing field `function`; {SHAPE}")) };
    if !function.get("name").is_some_and(Value::is_string) {
        return Err(format!("missing field `function.name` (a string); {SHAPE}"));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for Tools {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let tools = Vec::<Tool>::deserialize(deserializer)?;
        Ok(Self(tools.into_iter().map(|t| t.0).collect()))
    }
}

impl Deref for Tools {
    type Target = [Value];

    fn deref(&self) -> &[Value] {
        &self.0
    }
}

/// A prompt given as text, token ids, or a batch of either.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text prompt.
    Text(String),
    /// Several text prompts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<i64>),
    /// Several prompts as token ids.
    TokenBatches(Vec<Vec<i64>>),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The served model's id.
    pub model: String,
    /// What to continue.
    pub prompt: Prompt,
    /// Legacy logprobs: number of alternatives per token (0..=5 in OpenAI, 20 here).
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the output text.
    #[serde(default)]
    pub echo: bool,
    /// Sampling and output controls.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every other field: refused or reported by `server::fields`.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Token counts of a response.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Usage {
    /// Prompt tokens (per prompt, counted once however many choices share it).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices, including a final end-of-turn token.
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
}

/// One alternative in `top_logprobs`.
#[derive(Clone, Debug, Serialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One token in chat `logprobs.content`.
#[derive(Clone, Debug, Serialize)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability under the sampling distribution.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The best alternatives.
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat `logprobs`.
#[derive(Clone, Debug, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprob>,
}

/// A tool call in an assistant message.
#[derive(Clone, Debug, Serialize)]
pub struct ToolCall {
    /// `call_...`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function and its JSON arguments.
    pub function: FunctionCall,
}

/// The function part of a tool call.
#[derive(Clone, Debug, Serialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as JSON text.
    pub arguments: String,
}

/// hicra's per-choice extension: which rollout this is and which weights produced it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChoiceExtension {
    /// Id to reward this completion with later (`GET /v1/rollouts/{id}`); absent when nothing
    /// was generated (`max_tokens: 0`, prompt scoring only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rollout_id: String,
    /// Policy version of the weights that generated its last token (kept for older clients;
    /// equal to `policy_version_last`).
    pub policy_version: u64,
    /// Policy version at its first token.
    pub policy_version_first: u64,
    /// Policy version at its last token; differs from the first when a training step landed
    /// while it was decoding.
    pub policy_version_last: u64,
    /// Prompt token ids, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Completion token ids, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// The episode this call belongs to, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub episode: Option<super::episodes::EpisodeReply>,
}

/// The assistant message of a chat choice.
#[derive(Clone, Debug, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The text, or null when the answer is only tool calls.
    pub content: Option<String>,
    /// Parsed tool calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// One chat choice.
#[derive(Clone, Debug, Serialize)]
pub struct ChatChoice {
    /// Position among the `n` choices.
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// Per-token logprobs, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'static str,
    /// hicra's extension.
    pub hicra: ChoiceExtension,
}

/// A whole chat completion.
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// With `prompt_logprobs`, per prompt token as vLLM reports it: `null` for the first, then
    /// `{"<token id>": {"logprob", "rank", "decoded_token"}}` for the token and its alternatives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<serde_json::Map<String, Value>>>>,
}

/// Legacy completions logprobs. With `echo` the prompt's tokens come first, the first of them
/// with `null` logprob and alternatives (nothing precedes it to predict it).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their logprobs, as f64 like the alternatives' (a client comparing a token's logprob with
    /// the best alternative's, as lm-evaluation-harness does to tell greedy continuations,
    /// must see the same number for the same value, not an f32 and an f64 rendering of it).
    pub token_logprobs: Vec<Option<f64>>,
    /// Alternatives per position, token text -> logprob.
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    /// Offset of each token in the returned text, in characters (as OpenAI and vLLM count).
    pub text_offset: Vec<usize>,
}

/// One text-completion choice.
#[derive(Clone, Debug, Serialize)]
pub struct CompletionChoice {
    /// Position among all choices (prompt-major).
    pub index: usize,
    /// The generated text.
    pub text: String,
    /// Per-token logprobs, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// hicra's extension.
    pub hicra: ChoiceExtension,
}

/// A whole text completion.
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
}
