//! Splicing served token ids into a re-rendered conversation.
//!
//! A multi-turn conversation comes back with its earlier assistant turns as text, and the chat
//! template renders them again: it may strip reasoning, reformat tool-call JSON or trim
//! whitespace, and even identical text need not tokenize back to the ids that were sampled.
//! [`spliced_prompt`] renders the conversation with a marker in place of each served turn's
//! content, tokenizes the text between markers, and puts the served ids where the markers are.
//! The result extends the token sequence that was served, so training sees exactly the tokens
//! the model produced, and a cached prefix stays valid.

use serde_json::Value;

use super::chat::{ChatMessage, ChatTemplate};
use super::{Tokenizer, TokenizerError};

/// An assistant message of a conversation whose served ids replace its rendering.
#[derive(Clone, Debug)]
pub struct SplicedTurn {
    /// Index of the message in the conversation.
    pub message: usize,
    /// The ids the model sampled for it.
    pub token_ids: Vec<u32>,
    /// Text of its final end-of-turn token, when it ended with one ([`end_text`]): the
    /// template writes its own after the content, which the splice then skips.
    pub end_text: Option<String>,
}

/// The text of `ids`' last token when it is an end-of-turn token (for [`SplicedTurn::end_text`]).
pub fn end_text(tokenizer: &Tokenizer, ids: &[u32]) -> Option<String> {
    ids.last().filter(|id| tokenizer.eos_ids().contains(id)).and_then(|&id| tokenizer.decode(&[id], false).ok()).filter(|t| !t.is_empty())
}

/// A marker the template copies where a served turn's content goes: private-use characters
/// and digits, which case changes and trimming leave as they are.
fn marker(i: usize) -> String {
    format!("\u{E000}{i}\u{E001}")
}

/// The prompt ids of `messages` (with the generation prompt) with each of `turns` spliced in
/// as served; returns them and how many turns were spliced. A template that drops or rewrites
/// a turn's marker (it may omit old turns) renders that message as it is instead.
pub fn spliced_prompt(template: &ChatTemplate, tokenizer: &Tokenizer, messages: &[ChatMessage], tools: Option<&[Value]>, turns: Vec<SplicedTurn>) -> Result<(Vec<u32>, usize), TokenizerError> {
    let (text, turns) = render_with_markers(template, messages, tools, turns)?;
    let mut ids = Vec::new();
    let mut rest = text.as_str();
    for (i, turn) in turns.iter().enumerate() {
        let marker = marker(i);
        // Every marker is in the text (render_with_markers checked) and in message order.
        let Some(at) = rest.find(&marker) else { break };
        ids.extend(tokenizer.encode(&rest[..at], false)?);
        ids.extend_from_slice(&turn.token_ids);
        rest = &rest[at + marker.len()..];
        if let Some(end) = &turn.end_text {
            rest = rest.strip_prefix(end.as_str()).unwrap_or(rest);
        }
    }
    ids.extend(tokenizer.encode(rest, false)?);
    Ok((ids, turns.len()))
}

/// Renders `messages` with each turn's content replaced by its marker, dropping (and rendering
/// as they are) the turns whose markers the template does not copy.
fn render_with_markers(template: &ChatTemplate, messages: &[ChatMessage], tools: Option<&[Value]>, mut turns: Vec<SplicedTurn>) -> Result<(String, Vec<SplicedTurn>), TokenizerError> {
    turns.retain(|t| t.message < messages.len());
    loop {
        let mut history = messages.to_vec();
        for (k, turn) in turns.iter().enumerate() {
            let message = &mut history[turn.message];
            message.content = Some(Value::String(marker(k)));
            message.tool_calls = None;
            // The served ids hold the reasoning already; a template must not add it again.
            message.extra.remove("reasoning_content");
            message.extra.remove("reasoning");
        }
        let text = template.render(&history, tools, true, None)?;
        let before = turns.len();
        let mut k = 0;
        turns.retain(|_| {
            let kept = text.contains(&marker(k));
            k += 1;
            kept
        });
        if turns.len() == before {
            return Ok((text, turns));
        }
    }
}
