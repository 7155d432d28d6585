//! Episodes: an agent's calls tied into one token sequence, so the whole task can be rewarded
//! and trained on exactly the tokens that were served.
//!
//! A client names the episode with `"hicra": {"episode_id": ...}` in the body (`extra_body`
//! in the `openai` client) or the `x-hicra-episode-id` header, and keeps sending plain
//! `messages`. The server recognises its own earlier completions in the history (by the tool
//! call ids it issued, else by the content it returned) and splices their exact served token
//! ids in place of the chat template's re-rendering, which may differ: templates strip
//! reasoning, reformat tool-call JSON, trim whitespace, and re-tokenizing text need not give
//! the sampled ids back.
//!
//! An episode is a list of segments. A segment is one token sequence: context spans (system,
//! user, tool and template tokens) and sampled spans (the model's tokens, with their logprobs
//! and policy versions). A call continues the last segment when its spliced prompt extends it
//! and it samples with the same temperature / top-k / top-p (a segment trains under one
//! sampling distribution); otherwise it starts a new segment, and the reply says why.
//!
//! Rewarding an episode trains its last segment: every sampled token carries the episode's
//! advantage (shaped by HICRA over all assistant turns), context tokens carry no loss.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use super::error::ApiError;
use super::rollouts::Rollout;
use crate::engine::{GeneratedToken, SamplingParams};
use crate::tokenizer::chat::{ChatMessage, ChatTemplate};
use crate::tokenizer::splice::{end_text, spliced_prompt, SplicedTurn};
use crate::tokenizer::Tokenizer;

/// The header that names an episode (the body's `hicra.episode_id` wins).
pub const EPISODE_HEADER: &str = "x-hicra-episode-id";
/// Episodes held; the least recently used is dropped beyond it.
const MAX_EPISODES: usize = 10_000;
/// Longest episode id.
const MAX_ID_LEN: usize = 256;

/// What a span of a segment is.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    /// Given to the model: system, user, tool and template tokens, and anything not sampled.
    Context,
    /// Drawn by the model.
    Sampled,
}

/// A run of tokens of one kind.
#[derive(Clone, Debug, Serialize)]
pub struct Span {
    /// First token (index into the segment's tokens).
    pub start: usize,
    /// One past the last token.
    pub end: usize,
    /// Context or sampled.
    pub kind: SpanKind,
    /// The rollout of a sampled span (the call that drew it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    /// Per sampled token: logprob under the tempered distribution (the API's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<f32>,
    /// Per sampled token: logprob under the distribution it was drawn from (the behaviour
    /// policy of training).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sampling_logprobs: Vec<f32>,
    /// Per sampled token: entropy of its distribution.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entropies: Vec<f32>,
    /// Policy version at the span's first sampled token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_version_first: Option<u64>,
    /// Policy version at its last sampled token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_version_last: Option<u64>,
}

impl Span {
    fn context(start: usize, end: usize) -> Self {
        Self { start, end, kind: SpanKind::Context, rollout_id: None, logprobs: Vec::new(), sampling_logprobs: Vec::new(), entropies: Vec::new(), policy_version_first: None, policy_version_last: None }
    }
}

/// One consistent token sequence of an episode.
#[derive(Clone, Debug, Serialize)]
pub struct Segment {
    /// Position in the episode.
    pub index: usize,
    /// Why it started (the first call, an edited history, other sampling parameters).
    pub started_because: String,
    /// Sampling parameters of its turns.
    pub sampling: SamplingParams,
    /// Every token, prompt and completions.
    pub tokens: Vec<u32>,
    /// Context and sampled spans covering `tokens` in order.
    pub spans: Vec<Span>,
    /// The text of each token (for planning-token detection).
    #[serde(skip)]
    pieces: Vec<String>,
    /// Whether its training rollout was taken (a segment is rewarded once; later calls of the
    /// episode start a new segment).
    pub rewarded: bool,
}

/// A completion the server returned in this episode, to be recognised in later histories.
#[derive(Clone, Debug)]
struct ServedTurn {
    /// The content returned (after tool calls were split off), if any.
    content: Option<String>,
    /// Ids of the tool calls returned.
    tool_call_ids: Vec<String>,
    /// The exact sampled ids.
    token_ids: Vec<u32>,
    /// Text of its final end-of-turn token, if it sampled one.
    end_text: Option<String>,
}

/// An agent's episode.
#[derive(Debug, Default)]
struct Episode {
    segments: Vec<Segment>,
    served: Vec<ServedTurn>,
}

/// What [`EpisodeStore::prepare`] decided for one call.
#[derive(Clone, Debug)]
pub struct PreparedTurn {
    /// The episode.
    pub episode_id: String,
    /// The prompt, with served turns spliced in.
    pub prompt_ids: Vec<u32>,
    /// Earlier completions recognised and spliced.
    pub spliced_turns: usize,
    /// Segment the call belongs to.
    pub segment: usize,
    /// Why a new segment starts with this call (`None`: it continues the last one).
    pub new_segment: Option<String>,
    /// Tokens of the segment the prompt extends (to detect a concurrent call).
    base_len: usize,
}

/// The episode part of a reply.
#[derive(Clone, Debug, Serialize)]
pub struct EpisodeReply {
    /// The episode.
    pub id: String,
    /// The segment this call belongs to.
    pub segment: usize,
    /// Whether this call started that segment.
    pub new_segment: bool,
    /// Why, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Earlier completions of the episode recognised in the history and spliced as served.
    pub spliced_turns: usize,
}

impl PreparedTurn {
    /// The reply's episode object.
    pub fn reply(&self) -> EpisodeReply {
        EpisodeReply {
            id: self.episode_id.clone(),
            segment: self.segment,
            new_segment: self.new_segment.is_some(),
            reason: self.new_segment.clone(),
            spliced_turns: self.spliced_turns,
        }
    }
}

/// The last segment as [`EpisodeStore::prepare`] decides against it.
struct SegmentHead {
    index: usize,
    sampling: SamplingParams,
    tokens: Vec<u32>,
}

/// The characters of [`crate::tokenizer::splice`]'s markers.
const MARKER_CHARS: [char; 2] = ['\u{E000}', '\u{E001}'];
/// Segments kept per episode (only the last is trained; older ones stay for inspection).
const MAX_SEGMENTS: usize = 16;
/// Served turns remembered per episode for recognition.
const MAX_TURNS: usize = 4096;

/// The episodes of a server, least recently used dropped first.
#[derive(Debug, Default)]
pub struct EpisodeStore {
    inner: Mutex<(HashMap<String, Episode>, VecDeque<String>)>,
}

/// Validates a client's episode id.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(ApiError::invalid("hicra.episode_id", format!("episode_id must be 1 to {MAX_ID_LEN} bytes of printable characters")));
    }
    Ok(())
}

/// Same sampling distribution: every parameter, penalties and constraint included (the
/// seed does not matter). The trainer replays one segment under one `SamplingParams`.
fn same_distribution(a: &SamplingParams, b: &SamplingParams) -> bool {
    SamplingParams { seed: 0, ..a.clone() } == SamplingParams { seed: 0, ..b.clone() }
}

impl ServedTurn {
    /// Whether an assistant message of a history is this turn: by the tool call ids this
    /// server issued, else by the exact content it returned.
    fn is(&self, message: &ChatMessage) -> bool {
        let first_call = match &message.tool_calls {
            Some(Value::Array(calls)) => calls.first().and_then(|c| c.get("id")).and_then(Value::as_str),
            _ => None,
        };
        match first_call {
            Some(id) => self.tool_call_ids.iter().any(|own| own == id),
            None => self.tool_call_ids.is_empty() && self.content.is_some() && message.content.as_ref().and_then(Value::as_str) == self.content.as_deref(),
        }
    }
}

impl Episode {
    /// The assistant messages of `messages` that are served turns of this episode, as
    /// (message index, turn). Histories are chronological, so each message is looked for
    /// after the previous match: two equal answers ("5", "5") map to their own turns.
    fn recognise(&self, messages: &[ChatMessage]) -> Vec<SplicedTurn> {
        let mut found = Vec::new();
        let mut from = 0;
        for (i, message) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            if let Some(offset) = self.served[from..].iter().position(|turn| turn.is(message)) {
                let turn = &self.served[from + offset];
                found.push(SplicedTurn { message: i, token_ids: turn.token_ids.clone(), end_text: turn.end_text.clone() });
                from += offset + 1;
            }
        }
        found
    }
}

impl EpisodeStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Episode>, VecDeque<String>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds the prompt of a call of episode `id`: the conversation rendered by `template`,
    /// with every earlier completion of the episode found in `messages` replaced by its served
    /// token ids; and decides the segment.
    pub fn prepare(&self, id: &str, template: &ChatTemplate, tokenizer: &Tokenizer, messages: &[ChatMessage], tools: Option<&[Value]>, sampling: &SamplingParams) -> Result<PreparedTurn, ApiError> {
        check_id(id)?;
        // What the episode holds is copied out: rendering and tokenizing happen unlocked.
        let (recognised, last) = {
            let mut inner = self.lock();
            if !inner.0.contains_key(id) {
                inner.0.insert(id.to_string(), Episode::default());
            }
            touch(&mut inner.1, id);
            evict(&mut inner);
            let episode = inner.0.get(id);
            let recognised = episode.map(|e| e.recognise(messages)).unwrap_or_default();
            let last = episode.and_then(|e| e.segments.last()).map(|s| SegmentHead { index: s.index, sampling: s.sampling.clone(), tokens: s.tokens.clone() });
            (recognised, last)
        };
        // A message holding the marker characters could redirect the splice: splice nothing.
        let marked = messages.iter().any(|m| m.content.as_ref().and_then(Value::as_str).is_some_and(|c| c.contains(MARKER_CHARS)));
        let recognised = if marked { Vec::new() } else { recognised };
        let (prompt_ids, spliced_turns) = spliced_prompt(template, tokenizer, messages, tools, recognised)?;
        let (segment, base_len, new_segment) = match &last {
            None => (0, 0, Some("the episode's first call".to_string())),
            Some(last) if !same_distribution(&last.sampling, sampling) => {
                (last.index + 1, 0, Some(format!("sampling changed (a sampling parameter or the constraint differs from segment {}'s); a segment trains under one distribution", last.index)))
            }
            Some(last) if prompt_ids.starts_with(&last.tokens) => (last.index, last.tokens.len(), None),
            Some(last) => {
                let at = prompt_ids.iter().zip(&last.tokens).take_while(|(a, b)| a == b).count();
                (last.index + 1, 0, Some(format!("the history differs from what segment {} served at token {at} of {} (an edited, dropped or unrecognised message)", last.index, last.tokens.len())))
            }
        };
        Ok(PreparedTurn { episode_id: id.to_string(), prompt_ids, spliced_turns, segment, new_segment, base_len })
    }

    /// Records a finished call: its new context tokens and sampled tokens join the segment,
    /// and the completion becomes recognisable in later histories. Returns the episode part
    /// of the reply: the segment the call really joined.
    #[allow(clippy::too_many_arguments)]
    pub fn record(&self, prepared: &PreparedTurn, tokenizer: &Tokenizer, sampling: &SamplingParams, rollout_id: &str, tokens: &[GeneratedToken], versions: (u64, u64), content: Option<String>, tool_call_ids: Vec<String>) -> EpisodeReply {
        let mut inner = self.lock();
        touch(&mut inner.1, &prepared.episode_id);
        let episode = inner.0.entry(prepared.episode_id.clone()).or_default();
        // The segment the call was prepared against, unchanged since, and really extended by
        // its prompt (a concurrent call, or an eviction, may have changed the episode).
        let continues = prepared.new_segment.is_none()
            && episode.segments.last().is_some_and(|s| s.index == prepared.segment && s.tokens.len() == prepared.base_len && !s.rewarded && prepared.prompt_ids.starts_with(&s.tokens));
        let mut reply = prepared.reply();
        if !continues {
            let reason = prepared.new_segment.clone().unwrap_or_else(|| "another call of the episode changed it meanwhile (or it was rewarded)".into());
            let index = episode.segments.last().map_or(0, |s| s.index + 1);
            reply = EpisodeReply { segment: index, new_segment: true, reason: Some(reason.clone()), ..reply };
            episode.segments.push(Segment { index, started_because: reason, sampling: sampling.clone(), tokens: Vec::new(), spans: Vec::new(), pieces: Vec::new(), rewarded: false });
            if episode.segments.len() > MAX_SEGMENTS {
                episode.segments.remove(0);
            }
        }
        let Some(segment) = episode.segments.last_mut() else { return reply };
        let context = &prepared.prompt_ids[segment.tokens.len().min(prepared.prompt_ids.len())..];
        if !context.is_empty() {
            let start = segment.tokens.len();
            segment.tokens.extend_from_slice(context);
            segment.pieces.extend(context.iter().map(|&id| tokenizer.decode(&[id], false).unwrap_or_default()));
            segment.spans.push(Span::context(start, segment.tokens.len()));
        }
        let start = segment.tokens.len();
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        segment.tokens.extend_from_slice(&ids);
        segment.pieces.extend(tokens.iter().map(|t| t.text.clone()));
        if !ids.is_empty() {
            segment.spans.push(Span {
                start,
                end: segment.tokens.len(),
                kind: SpanKind::Sampled,
                rollout_id: Some(rollout_id.to_string()),
                logprobs: tokens.iter().map(|t| t.logprob).collect(),
                sampling_logprobs: tokens.iter().map(|t| t.sampling_logprob).collect(),
                entropies: tokens.iter().map(|t| t.entropy).collect(),
                policy_version_first: Some(versions.0),
                policy_version_last: Some(versions.1),
            });
        }
        let end_text = end_text(tokenizer, &ids);
        episode.served.push(ServedTurn { content, tool_call_ids, token_ids: ids, end_text });
        if episode.served.len() > MAX_TURNS {
            episode.served.remove(0);
        }
        reply
    }

    /// The episode as `GET /v1/episodes/{id}` shows it.
    pub fn describe(&self, id: &str) -> Option<Value> {
        let inner = self.lock();
        let episode = inner.0.get(id)?;
        Some(serde_json::json!({
            "id": id,
            "object": "episode",
            "turns": episode.served.len(),
            "segments": episode.segments,
        }))
    }

    /// Takes the last segment of episode `id` as one training rollout: the tokens before its
    /// first sampled span are the prompt; the rest, up to its last sampled token, the
    /// completion, with a mask of the sampled tokens. The segment is marked rewarded (a second
    /// reward is a 409; [`Self::release`] undoes the mark when the reward is refused). `nonce`
    /// makes the rollout id unique across episode ids reused after eviction or a restart.
    pub fn take_training_rollout(&self, id: &str, model: &str, nonce: &str) -> Result<Rollout, ApiError> {
        let mut inner = self.lock();
        let episode = inner.0.get_mut(id).ok_or_else(|| ApiError::NotFound(format!("no episode '{id}' (unknown, or dropped as least recently used)")))?;
        let segment = episode.segments.last_mut().ok_or_else(|| ApiError::invalid("episode_id", format!("episode '{id}' has no finished call yet")))?;
        if segment.rewarded {
            return Err(ApiError::Conflict(format!("episode '{id}' segment {} was already rewarded; an episode is rewarded once (its later calls start a new segment)", segment.index)));
        }
        let sampled: Vec<&Span> = segment.spans.iter().filter(|s| matches!(s.kind, SpanKind::Sampled)).collect();
        let (Some(first), Some(last)) = (sampled.first(), sampled.last()) else {
            return Err(ApiError::invalid("episode_id", format!("episode '{id}' has no sampled tokens to train on")));
        };
        let (from, to) = (first.start, last.end);
        let mut mask = vec![false; to - from];
        let mut sampling_logprobs = vec![0.0; to - from];
        let mut logprobs = vec![0.0; to - from];
        let mut entropies = vec![0.0; to - from];
        for span in &sampled {
            for (k, i) in (span.start..span.end).enumerate() {
                mask[i - from] = true;
                sampling_logprobs[i - from] = span.sampling_logprobs.get(k).copied().unwrap_or(0.0);
                logprobs[i - from] = span.logprobs.get(k).copied().unwrap_or(0.0);
                entropies[i - from] = span.entropies.get(k).copied().unwrap_or(0.0);
            }
        }
        let versions = sampled.iter().filter_map(|s| s.policy_version_first.zip(s.policy_version_last));
        let (first_version, last_version) = versions.fold((u64::MAX, 0), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)));
        let pieces = &segment.pieces[from..to];
        segment.rewarded = true;
        Ok(Rollout {
            id: format!("episode-{id}-{}-{nonce}", segment.index),
            model: model.to_string(),
            policy_version: last_version,
            policy_version_first: first_version.min(last_version),
            prompt_token_ids: segment.tokens[..from].to_vec(),
            completion_token_ids: segment.tokens[from..to].to_vec(),
            logprobs,
            sampling_logprobs,
            entropies,
            token_texts: pieces.to_vec(),
            finish_reason: "episode".into(),
            text: pieces.concat(),
            sampling: segment.sampling.clone(),
            created: super::unix_now(),
            user: None,
            group: format!("episode-{id}"),
            group_size: 1,
            reward: None,
            sampled_mask: mask,
        })
    }
}

impl EpisodeStore {
    /// Undoes [`Self::take_training_rollout`]'s mark when the reward was refused (it may be
    /// sent again).
    pub fn release(&self, id: &str) {
        if let Some(segment) = self.lock().0.get_mut(id).and_then(|e| e.segments.last_mut()) {
            segment.rewarded = false;
        }
    }
}

fn touch(order: &mut VecDeque<String>, id: &str) {
    if let Some(at) = order.iter().position(|e| e == id) {
        order.remove(at);
    }
    order.push_back(id.to_string());
}

fn evict(inner: &mut (HashMap<String, Episode>, VecDeque<String>)) {
    while inner.1.len() > MAX_EPISODES {
        if let Some(old) = inner.1.pop_front() {
            inner.0.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(content: Option<&str>, calls: &[&str], ids: &[u32]) -> ServedTurn {
        ServedTurn { content: content.map(String::from), tool_call_ids: calls.iter().map(|c| c.to_string()).collect(), token_ids: ids.to_vec(), end_text: None }
    }

    #[test]
    fn turns_are_recognised_by_call_ids_or_content_in_order() {
        let episode = Episode { segments: Vec::new(), served: vec![served(Some("5"), &[], &[1]), served(None, &["call_a"], &[2]), served(Some("5"), &[], &[3])] };
        let mut with_calls = ChatMessage::new("assistant", "");
        with_calls.content = None;
        // The client reformatted the arguments: the call id is what identifies the turn.
        with_calls.tool_calls = Some(serde_json::json!([{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{ }"}}]));
        let messages = vec![
            ChatMessage::new("user", "q"),
            ChatMessage::new("assistant", "5"),
            with_calls,
            ChatMessage::new("tool", "result"),
            ChatMessage::new("assistant", "5"),
            ChatMessage::new("assistant", "edited"),
        ];
        let found: Vec<(usize, Vec<u32>)> = episode.recognise(&messages).into_iter().map(|t| (t.message, t.token_ids)).collect();
        // Two equal answers map to their own turns; the edited one is not recognised.
        assert_eq!(found, vec![(1, vec![1]), (2, vec![2]), (4, vec![3])]);
    }
}
