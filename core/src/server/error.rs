//! The one place a status code is chosen: [`ApiError`] and its OpenAI-shaped body
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Client errors echo their cause; internal errors are logged once, when answered with a 500,
//! and answered generically.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use crate::engine::scheduler::SubmitError;
use crate::engine::EngineError;

/// An error answered to an API client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a parameter is invalid; `param` names it when known.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending parameter.
        param: Option<&'static str>,
    },
    /// 400: a field deep in the body is invalid; `param` is its path, e.g. `messages[0].role`.
    #[error("{message}")]
    InvalidField {
        /// What is wrong, starting with the path.
        message: String,
        /// The path of the offending field.
        param: String,
    },
    /// 401: missing or wrong API key.
    #[error("invalid API key: send 'Authorization: Bearer <key>'")]
    Unauthorized,
    /// 401: a route that changes the weights was called without the train key.
    #[error("this route changes the model's weights and needs the train key: send 'Authorization: Bearer <train key>' (the API key is not enough)")]
    TrainKeyRequired,
    /// 404: unknown route or object.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with recorded state (e.g. a second reward).
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than the configured limit.
    #[error("request body too large: {0}")]
    PayloadTooLarge(String),
    /// 429: the queue is full.
    #[error("{0}")]
    Busy(String),
    /// 500: our fault; details go to the log, not the client.
    #[error("internal error")]
    Internal(String),
    /// 502: the data-parallel replica that holds the object did not answer.
    #[error("{0}")]
    ReplicaUnavailable(String),
}

impl ApiError {
    /// A 400 naming the parameter.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), param: Some(param) }
    }

    /// A prompt error as `/v1/completions` names it: the engine's prompt errors name
    /// `messages` (the chat route's field); other errors are left as they are.
    pub fn for_prompt_field(self) -> Self {
        match self {
            Self::InvalidRequest { message, param: Some("messages") } => Self::InvalidRequest { message, param: Some("prompt") },
            other => other,
        }
    }

    /// A 400 naming a field known only at run time (a nested path, a client's field name).
    pub fn invalid_at(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField { message: message.into(), param: param.into() }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<&str>) {
        match self {
            Self::InvalidRequest { param, .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", *param),
            Self::InvalidField { param, .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", Some(param.as_str())),
            Self::Unauthorized | Self::TrainKeyRequired => (StatusCode::UNAUTHORIZED, "authentication_error", None),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found_error", None),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict_error", None),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", None),
            Self::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", None),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
            Self::ReplicaUnavailable(_) => (StatusCode::BAD_GATEWAY, "server_error", None),
        }
    }

    /// The OpenAI error object (also used inside a stream). Pure: whoever sends it decides
    /// whether it is worth a log line.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, param) = self.parts();
        // OpenAI's `code` is a short string or null, never the HTTP status.
        let code = match self {
            Self::Unauthorized | Self::TrainKeyRequired => Some("invalid_api_key"),
            Self::Busy(_) => Some("rate_limit_exceeded"),
            Self::InvalidRequest { message, .. } if message.contains("context limit") => Some("context_length_exceeded"),
            _ => None,
        };
        serde_json::json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        // The one place a 500 is built, so each internal error is logged exactly once.
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error answered with 500");
        }
        (status, Json(self.body())).into_response()
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::QueueFull { .. } => Self::Busy(err.to_string()),
            SubmitError::TooManyChoices { .. } => Self::invalid("n", err.to_string()),
            SubmitError::Invalid(inner) => inner.into(),
            SubmitError::Stopped => Self::Internal(err.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::PromptTooLong { .. } | EngineError::EmptyPrompt | EngineError::TokenOutOfRange { .. } => {
                Self::invalid("messages", err.to_string())
            }
            EngineError::InvalidParameter(message) => Self::InvalidRequest { message, param: None },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::tokenizer::TokenizerError> for ApiError {
    fn from(err: crate::tokenizer::TokenizerError) -> Self {
        Self::invalid("messages", err.to_string())
    }
}

/// `Json<T>` whose rejections (malformed JSON, wrong types, oversized bodies) are
/// OpenAI-shaped [`ApiError`]s. A body of the wrong shape names the offending field in
/// `param` (`messages[0].role`, `tools[0].function`), as OpenAI does.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::InvalidRequest { message: "expected a JSON body with 'Content-Type: application/json'".into(), param: None });
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|err| match err.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(err.body_text()),
            _ => ApiError::InvalidRequest { message: err.body_text(), param: None },
        })?;
        parse_json(&bytes).map(Self)
    }
}

/// `application/json` or any `application/*+json`, parameters (`; charset=utf-8`) ignored.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence.split_once('/').is_some_and(|(kind, sub)| kind == "application" && (sub == "json" || sub.ends_with("+json")))
}

/// Parses a body, tracking where in it a type error happened.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(json_error)?;
    deserializer.end().map_err(|err| ApiError::InvalidRequest { message: format!("invalid JSON: {err}"), param: None })?;
    Ok(value)
}

fn json_error(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner = err.inner().to_string();
    if err.inner().classify() != serde_json::error::Category::Data {
        return ApiError::InvalidRequest { message: format!("invalid JSON: {inner}"), param: None };
    }
    match field_path(&err.path().to_string(), &inner) {
        Some(param) => ApiError::InvalidField { message: format!("{param}: {inner}"), param },
        None => ApiError::InvalidRequest { message: format!("invalid request body: {inner}"), param: None },
    }
}

/// The path of the field at fault: where the error happened, or for a missing field (which
/// serde reports at the object that lacks it) the field inside that object. `None` at the
/// root, where no single field is to blame.
fn field_path(path: &str, inner: &str) -> Option<String> {
    let path = if path == "." { "" } else { path };
    let missing = inner.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
    match (path, missing) {
        ("", None) => None,
        ("", Some(field)) => Some(field.to_string()),
        (path, Some(field)) => Some(format!("{path}.{field}")),
        (path, None) => Some(path.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        model: String,
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Item {
        name: String,
    }

    fn param_of(json: &str) -> Option<String> {
        match parse_json::<Body>(json.as_bytes()) {
            Err(ApiError::InvalidField { param, .. }) => Some(param),
            Err(_) => None,
            Ok(body) => panic!("accepted {body:?}"),
        }
    }

    #[test]
    fn type_errors_name_the_field_path() {
        assert_eq!(param_of(r#"{"model": "m", "items": [{"name": "a"}, {"name": 3}]}"#).as_deref(), Some("items[1].name"));
        assert_eq!(param_of(r#"{"model": "m", "items": [{}]}"#).as_deref(), Some("items[0].name"));
        assert_eq!(param_of(r#"{"items": []}"#).as_deref(), Some("model"));
        assert_eq!(param_of(r#"{"model": "m", "items": ["#), None);
    }
}
