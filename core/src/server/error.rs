//! The one place a status code is chosen: [`ApiError`] and its OpenAI-shaped body
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Client errors echo their cause; internal errors are logged and answered generically.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
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
    /// 401: missing or wrong API key.
    #[error("invalid API key: send 'Authorization: Bearer <key>'")]
    Unauthorized,
    /// 404: unknown route or object.
    #[error("{0}")]
    NotFound(String),
    /// 413: the body is larger than the configured limit.
    #[error("request body too large: {0}")]
    PayloadTooLarge(String),
    /// 429: the queue is full.
    #[error("{0}")]
    Busy(String),
    /// 500: our fault; details go to the log, not the client.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming the parameter.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), param: Some(param) }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            Self::InvalidRequest { param, .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", *param),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "authentication_error", None),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found_error", None),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", None),
            Self::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", None),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        }
    }

    /// The OpenAI error object (also used inside a stream).
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, param) = self.parts();
        if let Self::Internal(detail) = self {
            tracing::error!(%detail, "internal error answered with 500");
        }
        // OpenAI's `code` is a short string or null, never the HTTP status.
        let code = match self {
            Self::Unauthorized => Some("invalid_api_key"),
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
/// OpenAI-shaped [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::BytesRejection(err)) if err.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge(err.body_text()))
            }
            Err(err) => Err(ApiError::InvalidRequest { message: err.body_text(), param: None }),
        }
    }
}
