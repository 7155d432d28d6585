//! Tool calls read back out of generated text, in the format the chat template asked for.
//!
//! A chat template that supports tools tells the model how to write a call; this module owns
//! recognising that format ([`ToolCallFormat::detect`]) and splitting a finished completion into
//! plain content and OpenAI-style tool calls ([`parse_tool_calls`]).
//!
//! Invariants:
//! - Parsing never fails. A block that does not hold a well-formed call (bad JSON, no `name`,
//!   arguments that are not an object) stays in the content as the text the model wrote, so no
//!   generated text is ever lost.
//! - `arguments` is always the JSON text of an object: an object is serialised compactly with
//!   its keys in the model's order (serde_json's `preserve_order` is on in this workspace), a
//!   string holding such a text is passed through unchanged.
//!
//! This module works on decoded text only; it never sees token ids or tensors.

use serde::Serialize;
use serde_json::{Map, Value};

/// Opening tag of a Hermes-style call block.
const HERMES_OPEN: &str = "<tool_call>";
/// Closing tag of a Hermes-style call block.
const HERMES_CLOSE: &str = "</tool_call>";
/// Llama 3.1's marker for "the rest of this turn is a tool call".
const PYTHON_TAG: &str = "<|python_tag|>";
/// Llama 3 end-of-message tokens that may survive decoding when special tokens are kept.
const LLAMA_TRAILERS: &[&str] = &["<|eom_id|>", "<|eot_id|>"];

/// How a chat template asks the model to write tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// Qwen2.5/Qwen3/Hermes: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
    /// (one or more blocks, possibly after some text).
    Hermes,
    /// Llama 3.1/3.2 JSON: `{"name": ..., "parameters": {...}}` (optionally after
    /// `<|python_tag|>`), as the whole output, or several objects one per line or separated
    /// by `;`.
    LlamaJson,
}

impl ToolCallFormat {
    /// Guesses the format from a chat template's source.
    ///
    /// Hermes if the template mentions `<tool_call>`; Llama JSON if it mentions `"parameters"`
    /// together with `<|python_tag|>` or the `ipython` role; `None` for templates without tool
    /// support (the model's output is then never parsed for calls).
    ///
    /// # Examples
    ///
    /// ```
    /// use hicra_core::tokenizer::tool_calls::ToolCallFormat;
    ///
    /// let qwen = "{%- if tools %}...<tool_call>\\n{\"name\": <function-name>, ...}</tool_call>";
    /// assert_eq!(ToolCallFormat::detect(qwen), Some(ToolCallFormat::Hermes));
    /// let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n";
    /// assert_eq!(ToolCallFormat::detect(chatml), None);
    /// ```
    pub fn detect(template_source: &str) -> Option<Self> {
        if template_source.contains(HERMES_OPEN) {
            Some(Self::Hermes)
        } else if template_source.contains("\"parameters\"")
            && (template_source.contains(PYTHON_TAG) || template_source.contains("ipython"))
        {
            Some(Self::LlamaJson)
        } else {
            None
        }
    }
}

/// One tool call found in the output, shaped like OpenAI's `function` object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParsedToolCall {
    /// The function's name, as the model wrote it.
    pub name: String,
    /// JSON text of the arguments object, compact, as OpenAI returns it.
    pub arguments: String,
}

/// A completion split into text for the user and tool calls.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedOutput {
    /// Text outside tool-call blocks, trimmed; `None` if nothing is left.
    pub content: Option<String>,
    /// The calls, in the order the model wrote them.
    pub tool_calls: Vec<ParsedToolCall>,
}

impl ParsedOutput {
    /// No calls: the whole text is content.
    fn plain(text: &str) -> Self {
        Self {
            content: non_empty(text),
            tool_calls: Vec::new(),
        }
    }
}

/// Splits generated text into content and tool calls written in `format`.
///
/// Never fails: a malformed block stays in the content as plain text.
///
/// # Examples
///
/// ```
/// use hicra_core::tokenizer::tool_calls::{parse_tool_calls, ToolCallFormat};
///
/// let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \
///             \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
/// let out = parse_tool_calls(ToolCallFormat::Hermes, text);
/// assert_eq!(out.content.as_deref(), Some("Let me check."));
/// assert_eq!(out.tool_calls[0].name, "get_weather");
/// assert_eq!(out.tool_calls[0].arguments, r#"{"city":"Paris"}"#);
/// ```
pub fn parse_tool_calls(format: ToolCallFormat, text: &str) -> ParsedOutput {
    match format {
        ToolCallFormat::Hermes => parse_hermes(text),
        ToolCallFormat::LlamaJson => parse_llama_json(text),
    }
}

/// Hermes blocks anywhere in the text. A final block whose closing tag is missing (generation
/// stopped at end-of-turn right after the JSON) still counts when its JSON is a valid call.
fn parse_hermes(text: &str) -> ParsedOutput {
    let mut content = String::new();
    let mut tool_calls = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find(HERMES_OPEN) {
        content.push_str(&rest[..open]);
        let after_open = &rest[open + HERMES_OPEN.len()..];
        let (body, block_len, next) = match after_open.find(HERMES_CLOSE) {
            Some(close) => (
                &after_open[..close],
                open + HERMES_OPEN.len() + close + HERMES_CLOSE.len(),
                &after_open[close + HERMES_CLOSE.len()..],
            ),
            None => (after_open, rest.len(), ""),
        };
        match call_from_json_text(body.trim(), &["arguments", "parameters"]) {
            Some(call) => tool_calls.push(call),
            None => content.push_str(&rest[open..block_len]),
        }
        rest = next;
    }
    content.push_str(rest);
    ParsedOutput {
        content: non_empty(&content),
        tool_calls,
    }
}

/// Llama JSON calls: the whole output (after an optional `<|python_tag|>`) must be one or more
/// call objects, or a JSON array of them. Anything else, including text before the JSON, means
/// the model answered in prose, so the output is all content (as vLLM's `llama3_json` parser).
fn parse_llama_json(text: &str) -> ParsedOutput {
    let mut body = text.trim();
    for trailer in LLAMA_TRAILERS {
        body = body.strip_suffix(trailer).unwrap_or(body).trim_end();
    }
    let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim_start();
    if !body.starts_with('{') && !body.starts_with('[') {
        return ParsedOutput::plain(text);
    }
    match llama_calls(body) {
        Some(tool_calls) if !tool_calls.is_empty() => ParsedOutput {
            content: None,
            tool_calls,
        },
        _ => ParsedOutput::plain(text),
    }
}

/// Reads a sequence of JSON values separated by whitespace and/or `;`; `None` unless every
/// value is a call (or an array of calls).
fn llama_calls(body: &str) -> Option<Vec<ParsedToolCall>> {
    const KEYS: &[&str] = &["parameters", "arguments"];
    let mut calls = Vec::new();
    let mut rest = body;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            return Some(calls);
        }
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = values.next()?.ok()?;
        rest = &rest[values.byte_offset()..];
        match value {
            Value::Object(obj) => calls.push(call_from_object(obj, KEYS)?),
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::Object(obj) => calls.push(call_from_object(obj, KEYS)?),
                        _ => return None,
                    }
                }
            }
            _ => return None,
        }
    }
}

/// One call from the JSON text of a block, `None` if it is not a well-formed call.
fn call_from_json_text(body: &str, argument_keys: &[&str]) -> Option<ParsedToolCall> {
    match serde_json::from_str::<Value>(body).ok()? {
        Value::Object(obj) => call_from_object(obj, argument_keys),
        _ => None,
    }
}

/// A call from `{"name": "...", <argument key>: {...}}`. The first of `argument_keys` present
/// holds the arguments: an object, or a string holding the JSON text of an object (some models
/// write OpenAI's wire form back). Missing arguments mean a call without parameters (`{}`).
fn call_from_object(mut obj: Map<String, Value>, argument_keys: &[&str]) -> Option<ParsedToolCall> {
    let name = match obj.remove("name")? {
        Value::String(name) if !name.trim().is_empty() => name,
        _ => return None,
    };
    let args = argument_keys.iter().find_map(|key| obj.remove(*key));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::Object(map)) => serde_json::to_string(&map).ok()?,
        Some(Value::String(s)) => match serde_json::from_str::<Value>(&s) {
            Ok(Value::Object(_)) => s,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ParsedToolCall { name, arguments })
}

/// The trimmed text, or `None` when only whitespace is left.
fn non_empty(text: &str) -> Option<String> {
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> ParsedToolCall {
        ParsedToolCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn detects_formats_from_real_templates() {
        // Excerpts of Qwen2.5-Instruct, Llama 3.1 Instruct and SmolLM2 (ChatML) templates.
        let qwen = "{%- if tools %}\n{{- '<|im_start|>system\\n' }}\n...For each function call, \
                    return a json object with function name and arguments within <tool_call>\
                    </tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \
                    \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}";
        let llama = "{{- 'Respond in the format {\"name\": function name, \"parameters\": \
                     dictionary of argument name and its value}.' }}\n{%- elif message.role == \
                     \"tool\" or message.role == \"ipython\" %}{{- \"<|start_header_id|>ipython\
                     <|end_header_id|>\\n\\n\" }}{{- '<|python_tag|>' + tool_call.name }}";
        let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
        assert_eq!(ToolCallFormat::detect(qwen), Some(ToolCallFormat::Hermes));
        assert_eq!(
            ToolCallFormat::detect(llama),
            Some(ToolCallFormat::LlamaJson)
        );
        assert_eq!(ToolCallFormat::detect(chatml), None);
        // "parameters" alone (a JSON-schema example in prose) is not enough.
        assert_eq!(ToolCallFormat::detect("{\"parameters\": {}}"), None);
    }

    #[test]
    fn hermes_single_block() {
        let text = "<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": \
                    {\"location\": \"San Francisco, CA, USA\", \"unit\": \"celsius\"}}\n</tool_call>";
        let out = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(out.content, None);
        assert_eq!(
            out.tool_calls,
            vec![call(
                "get_current_temperature",
                r#"{"location":"San Francisco, CA, USA","unit":"celsius"}"#
            )]
        );
    }

    #[test]
    fn hermes_multiple_blocks_keep_order_and_key_order() {
        let text = "<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": \
                    {\"location\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n\
                    <tool_call>\n{\"name\": \"get_temperature_date\", \"arguments\": \
                    {\"location\": \"Paris\", \"date\": \"2024-10-01\", \"unit\": \"celsius\"}}\n\
                    </tool_call>";
        let out = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(out.content, None);
        assert_eq!(
            out.tool_calls,
            vec![
                call(
                    "get_current_temperature",
                    r#"{"location":"Paris","unit":"celsius"}"#
                ),
                call(
                    "get_temperature_date",
                    r#"{"location":"Paris","date":"2024-10-01","unit":"celsius"}"#
                ),
            ]
        );
    }

    #[test]
    fn hermes_text_before_and_between_blocks_is_content() {
        let text = "I'll look that up for you.\n\n<tool_call>\n{\"name\": \"search\", \
                    \"arguments\": {\"query\": \"rust\"}}\n</tool_call>\nThen:\n<tool_call>\n\
                    {\"name\": \"search\", \"arguments\": {\"query\": \"tch\"}}\n</tool_call>\n";
        let out = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(
            out.content.as_deref(),
            Some("I'll look that up for you.\n\n\nThen:")
        );
        assert_eq!(out.tool_calls.len(), 2);
        assert_eq!(out.tool_calls[1], call("search", r#"{"query":"tch"}"#));
    }

    #[test]
    fn hermes_malformed_json_stays_content() {
        // Trailing comma, then a block with single quotes: neither is JSON.
        let text =
            "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1,}}\n</tool_call>\n\
                    <tool_call>\n{'name': 'g', 'arguments': {}}\n</tool_call>";
        let out = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert!(out.tool_calls.is_empty());
        assert_eq!(out.content.as_deref(), Some(text));
    }

    #[test]
    fn hermes_mixed_good_and_bad_blocks() {
        let text = "<tool_call>\n{\"name\": \"ok\", \"arguments\": {}}\n</tool_call>\n\
                    <tool_call>\n{\"arguments\": {\"x\": 1}}\n</tool_call>";
        let out = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(out.tool_calls, vec![call("ok", "{}")]);
        assert_eq!(
            out.content.as_deref(),
            Some("<tool_call>\n{\"arguments\": {\"x\": 1}}\n</tool_call>")
        );
    }

    #[test]
    fn hermes_arguments_as_json_string() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                    \"{\\\"city\\\": \\\"Berlin\\\"}\"}\n</tool_call>";
        let out = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(out.content, None);
        assert_eq!(
            out.tool_calls,
            vec![call("get_weather", "{\"city\": \"Berlin\"}")]
        );

        // A string that is not the JSON text of an object keeps the block as content.
        for bad in ["\"city=Berlin\"", "\"[1, 2]\"", "42", "[{}]"] {
            let text =
                format!("<tool_call>\n{{\"name\": \"f\", \"arguments\": {bad}}}\n</tool_call>");
            let out = parse_tool_calls(ToolCallFormat::Hermes, &text);
            assert!(out.tool_calls.is_empty(), "{bad}");
            assert_eq!(out.content.as_deref(), Some(text.as_str()));
        }
    }

    #[test]
    fn hermes_missing_arguments_and_unclosed_final_block() {
        let text = "<tool_call>\n{\"name\": \"get_time\"}\n</tool_call>\n<tool_call>\n\
                    {\"name\": \"get_date\", \"arguments\": {\"tz\": \"UTC\"}}";
        let out = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(out.content, None);
        assert_eq!(
            out.tool_calls,
            vec![call("get_time", "{}"), call("get_date", r#"{"tz":"UTC"}"#)]
        );

        // An unclosed block cut off mid-JSON (max_tokens) stays content.
        let cut = "<tool_call>\n{\"name\": \"get_date\", \"argum";
        let out = parse_tool_calls(ToolCallFormat::Hermes, cut);
        assert!(out.tool_calls.is_empty());
        assert_eq!(out.content.as_deref(), Some(cut));
    }

    #[test]
    fn hermes_unicode_arguments() {
        let text = "<tool_call>\n{\"name\": \"translate\", \"arguments\": {\"text\": \
                    \"Grüße aus Zürich 🇨🇭\", \"target\": \"日本語\", \"escaped\": \"\\u00e9\"}}\n\
                    </tool_call>";
        let out = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(
            out.tool_calls,
            vec![call(
                "translate",
                r#"{"text":"Grüße aus Zürich 🇨🇭","target":"日本語","escaped":"é"}"#
            )]
        );
        let back: Value = serde_json::from_str(&out.tool_calls[0].arguments).expect("json");
        assert_eq!(back["target"], "日本語");
    }

    #[test]
    fn no_tool_calls_is_all_content() {
        for format in [ToolCallFormat::Hermes, ToolCallFormat::LlamaJson] {
            let out = parse_tool_calls(format, "  The capital of France is Paris.\n");
            assert_eq!(
                out,
                ParsedOutput {
                    content: Some("The capital of France is Paris.".into()),
                    tool_calls: vec![],
                }
            );
            assert_eq!(parse_tool_calls(format, " \n ").content, None);
        }
    }

    #[test]
    fn llama_json_whole_output() {
        let text = "{\"name\": \"get_current_conditions\", \"parameters\": {\"location\": \
                    \"San Francisco, CA\", \"unit\": \"Fahrenheit\"}}";
        let out = parse_tool_calls(ToolCallFormat::LlamaJson, text);
        assert_eq!(out.content, None);
        assert_eq!(
            out.tool_calls,
            vec![call(
                "get_current_conditions",
                r#"{"location":"San Francisco, CA","unit":"Fahrenheit"}"#
            )]
        );
    }

    #[test]
    fn llama_json_after_python_tag() {
        let text = "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \
                    \"München\"}}<|eom_id|>";
        let out = parse_tool_calls(ToolCallFormat::LlamaJson, text);
        assert_eq!(out.content, None);
        assert_eq!(
            out.tool_calls,
            vec![call("get_weather", r#"{"city":"München"}"#)]
        );
    }

    #[test]
    fn llama_json_several_calls() {
        let lines = "{\"name\": \"a\", \"parameters\": {\"x\": \"1;2\"}}\n\
                     {\"name\": \"b\", \"parameters\": {}}";
        let semis = "{\"name\": \"a\", \"parameters\": {\"x\": \"1;2\"}}; \
                     {\"name\": \"b\", \"arguments\": {}}";
        let array = "[{\"name\": \"a\", \"parameters\": {\"x\": \"1;2\"}}, \
                     {\"name\": \"b\", \"parameters\": {}}]";
        for text in [lines, semis, array] {
            let out = parse_tool_calls(ToolCallFormat::LlamaJson, text);
            assert_eq!(out.content, None, "{text}");
            assert_eq!(
                out.tool_calls,
                vec![call("a", r#"{"x":"1;2"}"#), call("b", "{}")],
                "{text}"
            );
        }
    }

    #[test]
    fn llama_json_prose_or_partial_json_is_content() {
        let cases = [
            // Prose that mentions JSON is an answer, not a call.
            "Here is the call: {\"name\": \"f\", \"parameters\": {}}",
            // Valid JSON that is not a call.
            "{\"answer\": 42}",
            // One good object followed by garbage: all or nothing.
            "{\"name\": \"f\", \"parameters\": {}}\nand then some text",
            // Cut off by max_tokens.
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"q\": \"wea",
            // Llama's built-in tools use Python syntax after the tag.
            "<|python_tag|>brave_search.call(query=\"weather in Paris\")",
            // Parameters given as a string that is not an object's JSON text.
            "{\"name\": \"f\", \"parameters\": \"x=1\"}",
        ];
        for text in cases {
            let out = parse_tool_calls(ToolCallFormat::LlamaJson, text);
            assert!(out.tool_calls.is_empty(), "{text}");
            assert_eq!(out.content.as_deref(), Some(text.trim()), "{text}");
        }
    }

    #[test]
    fn llama_json_parameters_as_json_string() {
        let text = "{\"name\": \"f\", \"parameters\": \"{\\\"q\\\": \\\"ß\\\"}\"}";
        let out = parse_tool_calls(ToolCallFormat::LlamaJson, text);
        assert_eq!(out.tool_calls, vec![call("f", "{\"q\": \"ß\"}")]);
    }

    #[test]
    fn parsed_tool_call_serializes_like_openai_function() {
        let json = serde_json::to_value(call("f", r#"{"a":1}"#)).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({"name": "f", "arguments": "{\"a\":1}"})
        );
    }
}
