//! Request fields hicra does not act on. For RL a field the client believes shaped the
//! sampling, but that did not, makes the recorded behaviour policy a lie; so:
//!
//! - a known OpenAI field that hicra does not implement is refused (400 naming it) when it is
//!   set to anything but its "off" value;
//! - a few known fields that change nothing about the tokens (`metadata`, `store`, ...) are
//!   accepted as they are;
//! - any other field is unknown: it is logged once per name and listed in the response
//!   header `x-hicra-ignored-fields`, so a client can see it was ignored.

use std::collections::HashSet;
use std::sync::Mutex;

use serde_json::{Map, Value};

use super::error::ApiError;

/// The response header listing the request's ignored (unknown) fields, comma-separated.
pub(crate) const IGNORED_FIELDS_HEADER: &str = "x-hicra-ignored-fields";

/// OpenAI fields hicra does not implement, with why, refused unless off.
const REFUSED: &[(&str, &str)] = &[
    ("audio", "audio output is not supported: this server generates text"),
    ("modalities", "only the text modality is supported"),
    ("prediction", "predicted outputs are not supported"),
    ("web_search_options", "web search is not supported"),
    ("functions", "the deprecated functions field is not supported: use tools"),
    ("function_call", "the deprecated function_call field is not supported: use tool_choice"),
    ("reasoning_effort", "reasoning effort is not supported"),
    ("verbosity", "verbosity is not supported"),
    ("best_of", "best_of is not supported: ask for n choices"),
    ("suffix", "suffix (insertion) is not supported"),
];

/// Known fields that do not change the tokens: accepted silently.
const NO_EFFECT: &[&str] = &["metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls", "stream_options"];

/// What a request's unhandled fields came to: the unknown names, for the header.
#[derive(Debug, Default)]
pub(crate) struct IgnoredFields(pub Vec<String>);

impl IgnoredFields {
    /// The header value, when any field was ignored.
    pub(crate) fn header_value(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.join(", "))
    }
}

/// Adds the ignored-fields header to a response, when there are any.
pub(crate) fn with_ignored_header(mut response: axum::response::Response, ignored: &IgnoredFields) -> axum::response::Response {
    if let Some(value) = ignored.header_value().and_then(|v| axum::http::HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(IGNORED_FIELDS_HEADER, value);
    }
    response
}

/// Screens the fields the request types did not claim: a refused field set to something
/// else than its off value is a 400; unknown ones are returned (and logged once per name).
pub(crate) fn screen(other: &Map<String, Value>) -> Result<IgnoredFields, ApiError> {
    let mut ignored = Vec::new();
    for (name, value) in other {
        if let Some((_, why)) = REFUSED.iter().find(|(refused, _)| refused == name) {
            if !is_off(name, value) {
                return Err(ApiError::invalid_at(name, format!("{name}: {why}")));
            }
            continue;
        }
        if NO_EFFECT.contains(&name.as_str()) {
            continue;
        }
        log_once(name);
        ignored.push(name.clone());
    }
    ignored.sort();
    Ok(IgnoredFields(ignored))
}

/// Whether a refused field's value asks for nothing: null, false, empty, or the default.
fn is_off(name: &str, value: &Value) -> bool {
    match (name, value) {
        (_, Value::Null) | (_, Value::Bool(false)) => true,
        ("modalities", Value::Array(list)) => list.iter().all(|m| m.as_str() == Some("text")),
        ("best_of", Value::Number(n)) => n.as_i64() == Some(1),
        ("suffix", Value::String(s)) => s.is_empty(),
        (_, Value::Array(list)) => list.is_empty(),
        _ => false,
    }
}

fn log_once(name: &str) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.get_or_insert_with(HashSet::new).insert(name.to_string()) {
        tracing::warn!(field = name, header = IGNORED_FIELDS_HEADER, "ignoring an unknown request field (listed in the response header; logged once)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn refused_fields_are_400s_unless_off_and_unknown_ones_are_listed() {
        let err = screen(&fields(serde_json::json!({"audio": {"voice": "alloy"}}))).expect_err("audio");
        assert!(err.to_string().contains("audio"), "{err}");
        let ok = screen(&fields(serde_json::json!({"audio": null, "modalities": ["text"], "best_of": 1, "metadata": {"a": "b"}, "store": true}))).expect("all off or harmless");
        assert!(ok.header_value().is_none(), "{ok:?}");
        let ignored = screen(&fields(serde_json::json!({"zeta_field": 1, "alpha_field": true}))).expect("unknown");
        assert_eq!(ignored.header_value().as_deref(), Some("alpha_field, zeta_field"));
    }
}
