//! Example reward plugin for tool use. The completion's tool call is read from Hermes-style
//! `<tool_call>{...}</tool_call>` text or from OpenAI `tool_calls` JSON (an array of
//! `{"function": {"name", "arguments"}}`, arguments as an object or as JSON text). It is scored
//! against `metadata.expected` (`{"name", "arguments"}`) and `metadata.schema` (the tool's
//! parameters as JSON Schema) in four equal parts, reported as sub-scores: the call parses,
//! the name matches, the arguments satisfy the schema, the arguments equal the expected ones.
//!
//! The schema check covers the keywords tool definitions use: `type`, `properties`,
//! `required`, `enum`, `items`, `additionalProperties: false`.

use hicra_sdk::abi_stable::std_types::{RString, Tuple2};
use hicra_sdk::serde_json::{self, Value};
use hicra_sdk::{export_reward_plugin, RewardItem, RewardPlugin, RewardScore};

/// The plugin (no configuration).
#[derive(Default)]
pub struct ToolUseReward;

/// The first tool call in `completion`: `(name, arguments)`.
pub fn parse_call(completion: &str) -> Option<(String, Value)> {
    let call: Value = if let Some(start) = completion.find("<tool_call>") {
        let body = &completion[start + "<tool_call>".len()..];
        let body = body.split("</tool_call>").next().unwrap_or(body);
        serde_json::from_str(body.trim()).ok()?
    } else {
        let value: Value = serde_json::from_str(completion.trim()).ok()?;
        let first = match value {
            Value::Array(mut calls) if !calls.is_empty() => calls.swap_remove(0),
            other => other,
        };
        first.get("function").cloned().unwrap_or(first)
    };
    let name = call.get("name")?.as_str()?.to_string();
    let arguments = match call.get("arguments").or_else(|| call.get("parameters")) {
        Some(Value::String(text)) => serde_json::from_str(text).ok()?,
        Some(object @ Value::Object(_)) => object.clone(),
        None => Value::Object(Default::default()),
        Some(_) => return None,
    };
    Some((name, arguments))
}

/// Whether `value` satisfies `schema` (the subset tool definitions use); the error says where not.
pub fn check_schema(value: &Value, schema: &Value, at: &str) -> Result<(), String> {
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => true,
        };
        if !ok {
            return Err(format!("{at}: expected {kind}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{at}: not one of the allowed values"));
        }
    }
    if let (Some(object), Some(properties)) = (value.as_object(), schema.get("properties").and_then(Value::as_object)) {
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !object.contains_key(name) {
                return Err(format!("{at}.{name}: required"));
            }
        }
        for (key, field) in object {
            match properties.get(key) {
                Some(sub) => check_schema(field, sub, &format!("{at}.{key}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}.{key}: not allowed"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(item_schema)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check_schema(item, item_schema, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

impl RewardPlugin for ToolUseReward {
    const NAME: &'static str = "tool_use";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(&mut self, _config: &Value) -> Result<(), String> {
        Ok(())
    }

    fn score_one(&self, item: &RewardItem) -> Result<RewardScore, String> {
        let metadata = item.metadata();
        let expected = metadata.get("expected").ok_or("metadata has no 'expected' call")?;
        let expected_name = expected.get("name").and_then(Value::as_str).ok_or("expected call has no name")?;
        let schema = metadata.get("schema").cloned().unwrap_or(Value::Null);
        let call = parse_call(item.completion.as_str());
        let parsed = call.is_some() as u8 as f32;
        let (name_ok, schema_ok, args_ok, message) = match &call {
            None => (0.0, 0.0, 0.0, "no parsable tool call".to_string()),
            Some((name, arguments)) => {
                let schema_result = if schema.is_null() { Ok(()) } else { check_schema(arguments, &schema, "arguments") };
                (
                    (name == expected_name) as u8 as f32,
                    schema_result.is_ok() as u8 as f32,
                    (Some(arguments) == expected.get("arguments")) as u8 as f32,
                    schema_result.err().unwrap_or_else(|| format!("called {name}")),
                )
            }
        };
        let parts = [("parsed", parsed), ("name", name_ok), ("schema", schema_ok), ("arguments", args_ok)];
        Ok(RewardScore {
            score: parts.iter().map(|(_, v)| v).sum::<f32>() / 4.0,
            subscores: parts.iter().map(|(n, v)| Tuple2(RString::from(*n), *v)).collect(),
            message: message.into(),
        })
    }
}

export_reward_plugin!(ToolUseReward);

#[cfg(test)]
mod tests {
    use super::*;
    use hicra_sdk::serde_json::json;

    fn item(completion: &str) -> RewardItem {
        let metadata = json!({
            "expected": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
            "schema": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"], "additionalProperties": false},
        });
        RewardItem { completion: completion.into(), metadata_json: metadata.to_string().into(), ..RewardItem::default() }
    }

    fn score(completion: &str) -> f32 {
        ToolUseReward.score(&[item(completion)]).remove(0).map(|s| s.score).unwrap_or(-1.0)
    }

    #[test]
    fn scores_hermes_and_openai_calls_in_four_parts() {
        assert_eq!(score(r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>"#), 1.0);
        assert_eq!(score(r#"[{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]"#), 1.0);
        // Right tool, valid but different arguments.
        assert_eq!(score(r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>"#), 0.75);
        // Schema violation (unit not allowed) and wrong arguments.
        assert_eq!(score(r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}</tool_call>"#), 0.5);
        assert_eq!(score(r#"<tool_call>{"name": "search", "arguments": {"q": 1}}</tool_call>"#), 0.25);
        assert_eq!(score("The weather is nice."), 0.0);
        assert!(ToolUseReward.score(&[RewardItem::default()])[0].is_err(), "no expected call: a failed item");
    }
}
