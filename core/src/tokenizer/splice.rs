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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{load, LoadOptions};

    #[test]
    fn served_ids_replace_the_rendering_and_the_templates_own_end_of_turn() -> Result<(), Box<dyn std::error::Error>> {
        let loaded = load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parity/llama/model.gguf"), &LoadOptions::cpu())?;
        let tokenizer = &loaded.tokenizer;
        let template = tokenizer.chat_template().ok_or("the tiny model has a chat template")?;
        let im_end = tokenizer.encode("<|im_end|>", false)?;
        assert_eq!(im_end.len(), 1);
        assert!(tokenizer.eos_ids().contains(&im_end[0]), "<|im_end|> ends a turn");
        // Ids that re-tokenizing the answer's text would not give back: its pieces, split.
        let served = [tokenizer.encode("  fo", false)?, tokenizer.encode("ur ", false)?, im_end.clone()].concat();
        let messages = vec![ChatMessage::new("user", "q"), ChatMessage::new("assistant", "  four "), ChatMessage::new("user", "next")];
        let turn = SplicedTurn { message: 1, token_ids: served.clone(), end_text: end_text(tokenizer, &served) };
        assert_eq!(turn.end_text.as_deref(), Some("<|im_end|>"));
        let (ids, spliced) = spliced_prompt(template, tokenizer, &messages, None, vec![turn])?;
        assert_eq!(spliced, 1);
        // The first call's prompt, then the served ids, then the next turn without a second
        // <|im_end|>: the sequence extends what was served.
        let head = tokenizer.encode(&template.render(&messages[..1], None, true, None)?, false)?;
        assert_eq!(&ids[..head.len()], head.as_slice());
        assert_eq!(&ids[head.len()..head.len() + served.len()], served.as_slice());
        let tail = tokenizer.decode(&ids[head.len() + served.len()..], false)?;
        assert_eq!(tail, "\n<|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n");
        Ok(())
    }

    #[test]
    fn a_turn_the_template_drops_is_rendered_as_it_is() -> Result<(), Box<dyn std::error::Error>> {
        let loaded = load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parity/llama/model.gguf"), &LoadOptions::cpu())?;
        let tokenizer = &loaded.tokenizer;
        // A template that keeps only the last message.
        let template = ChatTemplate::new("{{ messages[-1]['content'] }}", None, None)?;
        let messages = vec![ChatMessage::new("assistant", "old"), ChatMessage::new("user", "new")];
        let turn = SplicedTurn { message: 0, token_ids: vec![1, 2, 3], end_text: None };
        let (ids, spliced) = spliced_prompt(&template, tokenizer, &messages, None, vec![turn])?;
        assert_eq!(spliced, 0);
        assert_eq!(ids, tokenizer.encode("new", false)?);
        Ok(())
    }
}
