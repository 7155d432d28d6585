//! Structured outputs: the request fields that ask for a shape of output, turned into the
//! engine's [`Constraint`], which the sampler enforces token by token.
//!
//! - OpenAI's `response_format`: `text`, `json_object`, or `json_schema` (`strict` or not, the
//!   schema is enforced either way, as vLLM does);
//! - vLLM's extensions: `guided_json`, `guided_regex`, `guided_grammar` (Lark, llguidance's
//!   dialect), `guided_choice`, and their newer form `structured_outputs: {json | regex |
//!   grammar | choice}`;
//! - tool calls that must happen (`tool_choice: "required"` or a named function): the call is
//!   written in the chat template's tool-call format with arguments valid against the
//!   function's parameters.
//!
//! At most one of these may be given. Every constraint is compiled before the request is
//! queued, so a bad schema is a 400 that names the problem.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::openai::SamplingFields;
use super::AppState;
use crate::engine::constraint::{with_compact_whitespace, Constraint};
use crate::tokenizer::tool_calls::ToolCallFormat;

/// The constraint the request's structured-output fields ask for, if any, with the field
/// that asked.
pub(crate) fn requested_constraint(fields: &SamplingFields) -> Result<Option<(&'static str, Constraint)>, ApiError> {
    let mut found: Vec<(&'static str, Constraint)> = Vec::new();
    if let Some(format) = fields.response_format.as_ref().filter(|v| !v.is_null()) {
        if let Some(c) = response_format(format)? {
            found.push(("response_format", c));
        }
    }
    let guided = [("guided_json", "json", &fields.guided_json), ("guided_regex", "regex", &fields.guided_regex), ("guided_grammar", "grammar", &fields.guided_grammar), ("guided_choice", "choice", &fields.guided_choice)];
    for (name, kind, value) in guided {
        if let Some(value) = value.as_ref().filter(|v| !v.is_null()) {
            found.push((name, vllm_constraint(kind, name, value)?));
        }
    }
    if let Some(outputs) = fields.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        found.push(("structured_outputs", structured_outputs(outputs)?));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => {
            let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
            Err(ApiError::invalid_at(names[1], format!("give one structured-output field, not {}", names.join(" and "))))
        }
    }
}

/// OpenAI's `response_format`.
fn response_format(format: &Value) -> Result<Option<Constraint>, ApiError> {
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| ApiError::invalid_at("response_format.type", "response_format needs a type: text, json_object or json_schema"))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint::JsonObject)),
        "json_schema" => {
            let spec = format.get("json_schema").ok_or_else(|| ApiError::invalid_at("response_format.json_schema", "a json_schema response format needs a json_schema object"))?;
            let schema = spec.get("schema").filter(|s| s.is_object() || s.is_boolean()).ok_or_else(|| ApiError::invalid_at("response_format.json_schema.schema", "json_schema.schema must be a JSON Schema object"))?;
            Ok(Some(Constraint::JsonSchema { schema: schema.clone() }))
        }
        other => Err(ApiError::invalid_at("response_format.type", format!("unknown response_format type '{other}': expected text, json_object or json_schema"))),
    }
}

/// One of vLLM's kinds of constraint (`json`, `regex`, `grammar` or `choice`), given in the
/// request field `name` (`guided_json`, `structured_outputs.json`, ...).
fn vllm_constraint(kind: &str, name: &str, value: &Value) -> Result<Constraint, ApiError> {
    match kind {
        "json" => Ok(Constraint::JsonSchema { schema: json_schema_value(name, value)? }),
        "regex" => Ok(Constraint::Regex { pattern: string_field(name, value)? }),
        "grammar" => Ok(Constraint::Lark { grammar: string_field(name, value)? }),
        _ => choice_constraint(name, value),
    }
}

/// vLLM's `structured_outputs: {"json": ..} | {"regex": ..} | {"grammar": ..} | {"choice": [..]}`.
fn structured_outputs(value: &Value) -> Result<Constraint, ApiError> {
    let object = value.as_object().ok_or_else(|| ApiError::invalid_at("structured_outputs", "structured_outputs must be an object with json, regex, grammar or choice"))?;
    let given: Vec<(&String, &Value)> = object.iter().filter(|(k, v)| !v.is_null() && ["json", "regex", "grammar", "choice"].contains(&k.as_str())).collect();
    match given.as_slice() {
        [(kind, value)] => vllm_constraint(kind, &format!("structured_outputs.{kind}"), value),
        [] => Err(ApiError::invalid_at("structured_outputs", "structured_outputs needs one of json, regex, grammar or choice")),
        _ => Err(ApiError::invalid_at("structured_outputs", "structured_outputs takes exactly one of json, regex, grammar or choice")),
    }
}

/// A schema given as an object or as JSON text.
fn json_schema_value(name: &str, value: &Value) -> Result<Value, ApiError> {
    match value {
        Value::String(text) => serde_json::from_str(text).map_err(|e| ApiError::invalid_at(name, format!("{name} is not valid JSON: {e}"))),
        Value::Object(_) | Value::Bool(_) => Ok(value.clone()),
        _ => Err(ApiError::invalid_at(name, format!("{name} must be a JSON Schema object"))),
    }
}

fn string_field(name: &str, value: &Value) -> Result<String, ApiError> {
    value.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid_at(name, format!("{name} must be a string")))
}

/// One of a list of strings, exactly.
fn choice_constraint(name: &str, value: &Value) -> Result<Constraint, ApiError> {
    let choices: Vec<&str> = value.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if choices.is_empty() || value.as_array().is_some_and(|a| a.len() != choices.len()) {
        return Err(ApiError::invalid_at(name, format!("{name} must be a non-empty list of strings")));
    }
    let alternatives: Vec<String> = choices.iter().map(|c| serde_json::to_string(c).unwrap_or_default()).collect();
    Ok(Constraint::Lark { grammar: format!("start: {}", alternatives.join(" | ")) })
}

/// The constraint a forced tool call needs: `tool_choice` `"required"` (one or more calls of
/// any tool) or `{"type": "function", "function": {"name": ..}}` (calls of that one).
/// `None` for `auto`, `none` or no tools.
pub(crate) fn tool_call_constraint(tools: &[Value], tool_choice: Option<&Value>, format: ToolCallFormat, parallel: bool) -> Result<Option<Constraint>, ApiError> {
    let functions: Vec<&Value> = tools.iter().filter_map(|t| t.get("function")).collect();
    let chosen: Vec<&Value> = match tool_choice {
        Some(Value::String(choice)) if choice == "required" => functions,
        Some(Value::String(choice)) if choice == "auto" || choice == "none" => return Ok(None),
        Some(Value::String(other)) => return Err(ApiError::invalid_at("tool_choice", format!("unknown tool_choice '{other}': expected none, auto, required or a function"))),
        Some(Value::Object(choice)) => {
            let name = choice.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| ApiError::invalid_at("tool_choice.function.name", "a named tool_choice needs function.name"))?;
            let found: Vec<&Value> = functions.into_iter().filter(|f| f.get("name").and_then(Value::as_str) == Some(name)).collect();
            if found.is_empty() {
                return Err(ApiError::invalid_at("tool_choice.function.name", format!("tool_choice names '{name}', which is not in tools")));
            }
            found
        }
        _ => return Ok(None),
    };
    if chosen.is_empty() {
        return Err(ApiError::invalid_at("tool_choice", "tool_choice requires a tool call but tools lists no function"));
    }
    let call = any_call_schema(&chosen, format);
    let grammar = match (format, parallel) {
        (ToolCallFormat::Hermes, true) => format!("start: call (\"\\n\" call)*\ncall: \"<tool_call>\\n\" %json {call} \"\\n</tool_call>\""),
        (ToolCallFormat::Hermes, false) => format!("start: \"<tool_call>\\n\" %json {call} \"\\n</tool_call>\""),
        (ToolCallFormat::LlamaJson, _) => format!("start: %json {call}"),
    };
    Ok(Some(Constraint::Lark { grammar }))
}

/// The JSON text of a schema for a call of any of `functions` in `format` (Hermes names the
/// arguments `arguments`, Llama 3 `parameters`), written compactly.
fn any_call_schema(functions: &[&Value], format: ToolCallFormat) -> String {
    let arguments_key = match format {
        ToolCallFormat::Hermes => "arguments",
        ToolCallFormat::LlamaJson => "parameters",
    };
    let calls: Vec<Value> = functions.iter().map(|f| call_schema(f, arguments_key)).collect();
    let call = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
    serde_json::to_string(&with_compact_whitespace(call)).unwrap_or_default()
}

/// `{"name": <the function>, "<arguments key>": <its parameters>}`, nothing else. Objects of
/// the parameters that list `properties` without saying whether others are allowed take only
/// those (OpenAI's strict mode makes clients say so; most tool definitions leave it out, and
/// a model left free invents keys until it runs out of tokens).
fn call_schema(function: &Value, arguments_key: &str) -> Value {
    let name = function.get("name").cloned().unwrap_or(Value::Null);
    let mut parameters = function.get("parameters").filter(|p| p.is_object()).cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    close_objects(&mut parameters);
    let mut properties = Map::new();
    properties.insert("name".into(), json!({"const": name}));
    properties.insert(arguments_key.into(), parameters);
    json!({"type": "object", "properties": properties, "required": ["name", arguments_key], "additionalProperties": false})
}

/// With `tool_choice` `auto` and tools marked `strict`: the model may write text or calls,
/// and a call it writes (of any tool, in `format`) must be valid. Hermes: the text before a
/// call is free and the grammar takes over at the call's opening tag. Llama JSON (the whole
/// turn is the call): text that does not open a JSON object is free. `None` when no tool is
/// strict.
pub(crate) fn strict_tools_constraint(tools: &[Value], format: ToolCallFormat) -> Option<Constraint> {
    let functions: Vec<&Value> = tools.iter().filter_map(|t| t.get("function")).collect();
    if !functions.iter().any(|f| f.get("strict").and_then(Value::as_bool) == Some(true)) {
        return None;
    }
    let call = any_call_schema(&functions, format);
    let grammar = match format {
        // FREE never holds the opening tag; `opening` ends at the first one (a lazy match),
        // after which only a valid call may follow.
        ToolCallFormat::Hermes => format!(
            "start: FREE | opening calls\nFREE: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/\nopening[lazy]: /(?s:.*)<tool_call>/\ncalls: body (\"\\n<tool_call>\" body)*\nbody: \"\\n\" %json {call} \"\\n</tool_call>\""
        ),
        ToolCallFormat::LlamaJson => format!("start: FREE | %json {call}\nFREE: /(?s:[^{{].*)/"),
    };
    Some(Constraint::Lark { grammar })
}

/// Adds `additionalProperties: false` to every object schema with `properties` and no word
/// on other keys, at any depth.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("properties").is_some_and(Value::is_object) && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// Compiles `constraint` once, so that a bad schema, pattern or grammar is a 400 naming it
/// (`param`) before anything is queued. The first use builds the tokenizer's token trie,
/// which takes a moment: off the async workers.
pub(crate) fn check(state: &AppState, constraint: &Constraint, param: &str) -> Result<(), ApiError> {
    let constraints = state.engine.constraints.clone();
    tokio::task::block_in_place(|| constraints.matcher(constraint)).map(|_| ()).map_err(|e| ApiError::invalid_at(param, format!("{param}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::constraint::{ConstraintMatcher, Constraints};
    use crate::tokenizer::Tokenizer;

    fn tools() -> Vec<Value> {
        vec![json!({"type": "function", "function": {"name": "get_weather", "strict": true, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})]
    }

    /// Feeds `text` token by token; `Ok(true)` when it ends where end-of-sequence is allowed.
    fn feed(tok: &Tokenizer, matcher: &mut ConstraintMatcher, text: &str) -> Result<bool, String> {
        for id in tok.encode(text, false).map_err(|e| e.to_string())? {
            let mask = matcher.allowed().map_err(|e| e.to_string())?;
            if mask[id as usize / 32] >> (id % 32) & 1 == 0 {
                return Err(format!("token {id} ({:?}) not allowed after part of {text:?}", tok.decode(&[id], false).unwrap_or_default()));
            }
            matcher.advance(id).map_err(|e| e.to_string())?;
        }
        let mask = matcher.allowed().map_err(|e| e.to_string())?;
        Ok(tok.eos_ids().iter().any(|&e| mask[e as usize / 32] >> (e % 32) & 1 == 1))
    }

    #[test]
    fn strict_tools_in_auto_mode_allow_free_text_and_valid_calls_only() {
        let Some(tok) = crate::tokenizer::default_model_tokenizer() else { return };
        let constraints = Constraints::new(tok.clone(), 49_152);
        let constraint = strict_tools_constraint(&tools(), ToolCallFormat::Hermes).expect("a strict tool");
        let mut plain = constraints.matcher(&constraint).expect("compiles");
        assert_eq!(feed(&tok, &mut plain, "It is sunny < and > warm."), Ok(true));
        let mut call = constraints.matcher(&constraint).expect("compiles");
        assert_eq!(feed(&tok, &mut call, "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"), Ok(true));
        let mut bad = constraints.matcher(&constraint).expect("compiles");
        let err = feed(&tok, &mut bad, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"town\": \"Oslo\"}}").expect_err("an unknown argument");
        assert!(err.contains("not allowed"), "{err}");
        // Once the tag is written, nothing but a call may follow it.
        let mut stray = constraints.matcher(&constraint).expect("compiles");
        assert!(feed(&tok, &mut stray, "Hi <tool_call> there").is_err());
        // Llama 3's JSON format: the whole turn is the call, or plain text.
        let llama = strict_tools_constraint(&tools(), ToolCallFormat::LlamaJson).expect("a strict tool");
        let mut plain = constraints.matcher(&llama).expect("compiles");
        assert_eq!(feed(&tok, &mut plain, "It is sunny."), Ok(true));
        let mut call = constraints.matcher(&llama).expect("compiles");
        assert_eq!(feed(&tok, &mut call, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}"), Ok(true));
        let mut bad = constraints.matcher(&llama).expect("compiles");
        assert!(feed(&tok, &mut bad, "{\"name\": \"get_time\"").is_err());
        // Without a strict tool nothing is constrained.
        let mut loose = tools();
        loose[0]["function"]["strict"] = json!(false);
        assert!(strict_tools_constraint(&loose, ToolCallFormat::Hermes).is_none());
    }
}
