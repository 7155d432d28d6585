//! Server-sent events: holding back text that may become a stop string, and the SSE plumbing.
//!
//! The engine cuts a completion before the first stop string, but by then pieces of the stop
//! string were already produced. [`StopHoldback`] emits only text that can no longer turn out
//! to be the start of a stop string, and at the end whatever of the final text is still
//! missing, so the concatenated deltas equal the non-streamed text exactly.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::error::ApiError;

/// Releases streamed text that cannot be part of a stop string.
#[derive(Debug, Default)]
pub(crate) struct StopHoldback {
    stops: Vec<String>,
    pending: String,
    emitted: usize,
}

impl StopHoldback {
    /// Holds back against these stop strings (empty ones are ignored).
    pub(crate) fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), ..Self::default() }
    }

    /// Adds a piece; returns the text now safe to send.
    pub(crate) fn push(&mut self, piece: &str) -> String {
        self.pending.push_str(piece);
        let keep_from = self.earliest_stop_prefix();
        let out: String = self.pending[..keep_from].to_string();
        self.pending.drain(..keep_from);
        self.emitted += out.len();
        out
    }

    /// Ends the stream: the part of `final_text` not yet sent.
    pub(crate) fn finish(&mut self, final_text: &str) -> String {
        self.pending.clear();
        let rest = final_text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted += rest.len();
        rest
    }

    /// Start of the shortest tail of `pending` that is a proper prefix of a stop string.
    fn earliest_stop_prefix(&self) -> usize {
        (0..self.pending.len())
            .filter(|&i| self.pending.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|stop| stop.len() > tail.len() && stop.starts_with(tail))
            })
            .unwrap_or(self.pending.len())
    }
}

/// An SSE response fed by a channel of JSON payloads; `[DONE]` ends it. The sender side
/// notices a disconnected client when `send` fails.
pub(crate) fn sse_channel() -> (UnboundedSender<String>, Response) {
    let (tx, rx) = unbounded_channel::<String>();
    let events = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|data| (Ok::<_, Infallible>(Event::default().data(data)), rx)) });
    (tx, sse_response(events))
}

/// Why a stream writer stopped before its end.
#[derive(Debug)]
pub(crate) enum StreamError {
    /// The client went away (closed the connection). Routine, not a server error: the
    /// dropped engine receiver makes the scheduler cancel the sequences.
    Disconnected,
    /// Generation failed; the client, still connected, gets this as an error event.
    Failed(ApiError),
}

impl From<ApiError> for StreamError {
    fn from(err: ApiError) -> Self {
        Self::Failed(err)
    }
}

/// Sends one payload; a failed send means the client disconnected.
pub(crate) fn send_event(tx: &UnboundedSender<String>, payload: String) -> Result<(), StreamError> {
    tx.send(payload).map_err(|_| StreamError::Disconnected)
}

/// Ends a stream after its writer returned: `[DONE]` for a client still there, after an
/// error event when generation failed; nothing (and a debug line) for a client that left.
pub(crate) fn finish_stream(tx: &UnboundedSender<String>, outcome: Result<(), StreamError>, id: &str) {
    match outcome {
        Ok(()) => {}
        Err(StreamError::Disconnected) => {
            tracing::debug!(%id, "client disconnected from its stream; sequences cancelled");
            return;
        }
        Err(StreamError::Failed(err)) => {
            // The status line (200) is long sent, so this is the only record of the failure.
            if let ApiError::Internal(detail) = &err {
                tracing::error!(%id, %detail, "internal error ended a stream");
            }
            if tx.send(err.body().to_string()).is_err() {
                return;
            }
        }
    }
    let _ = tx.send("[DONE]".to_string());
}

fn sse_response(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_possible_stop_prefixes_and_completes_exactly() {
        let mut h = StopHoldback::new(&["END".to_string()]);
        assert_eq!(h.push("hello E"), "hello ");
        assert_eq!(h.push("x"), "Ex");
        assert_eq!(h.push(" EN"), " ");
        // The engine saw "END" and cut the text before it.
        assert_eq!(h.finish("hello Ex "), "");
        let mut h = StopHoldback::new(&[]);
        assert_eq!(h.push("abc"), "abc");
        assert_eq!(h.finish("abcdef"), "def");
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let mut h = StopHoldback::new(&["éa".to_string()]);
        assert_eq!(h.push("xé"), "x");
        assert_eq!(h.push("b"), "éb");
    }
}
