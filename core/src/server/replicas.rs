//! Requests about another replica's rollout, forwarded to that replica.
//!
//! A rollout lives in the memory and journal of the replica that served it. Replica r's
//! rollout ids start `ro-r<r>-`. A load balancer spreads requests without knowing that, so a
//! reward (or a score, or a rollout lookup) can reach the wrong replica. That replica forwards
//! the request as it came (method, path, headers, body) to the owner and relays the answer.
//! Replicas publish their HTTP address in the rendezvous store when they start listening.
//!
//! A batch of rewards (`POST /v1/rewards`) is validated as a whole before anything is recorded,
//! which only one replica can do: a batch for one other replica is forwarded, a batch mixing
//! replicas is refused with a message saying how to split it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::collective::ProcessGroup;

/// Marks a forwarded request, so that it is never forwarded again.
const FORWARDED: &str = "x-hicra-forwarded-by";

/// The replicas' HTTP addresses and the client that forwards to them.
pub struct Replicas {
    group: Arc<ProcessGroup>,
    client: reqwest::Client,
    /// Addresses read from the store so far, by rank.
    addresses: Mutex<HashMap<usize, String>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas").field("rank", &self.group.rank()).field("world_size", &self.group.world_size()).finish()
    }
}

fn address_key(rank: usize) -> String {
    format!("hicra/http/{rank}")
}

impl Replicas {
    /// Forwarding between the replicas of `group`.
    pub fn new(group: Arc<ProcessGroup>) -> Self {
        Self { group, client: reqwest::Client::new(), addresses: Mutex::new(HashMap::new()) }
    }

    /// Publishes this replica's base URL (`http://host:port`) for the others.
    pub fn publish(&self, url: &str) -> Result<(), crate::collective::CollectiveError> {
        self.group.store_set(&address_key(self.group.rank()), url.as_bytes())
    }

    /// The replica whose rollout id this is, when it is another replica's.
    fn other_owner(&self, rollout_id: &str) -> Option<usize> {
        let rank = owner_of(rollout_id)?;
        (rank != self.group.rank() && rank < self.group.world_size()).then_some(rank)
    }

    /// Replica `rank`'s base URL (waits for it to publish, up to the group's time-out).
    async fn address(&self, rank: usize) -> Result<String, ApiError> {
        if let Some(known) = self.addresses.lock().unwrap_or_else(|p| p.into_inner()).get(&rank) {
            return Ok(known.clone());
        }
        let group = self.group.clone();
        let read = tokio::task::spawn_blocking(move || group.store_get(&address_key(rank))).await;
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(err)) => return Err(ApiError::ReplicaUnavailable(format!("replica {rank}'s address: {err}"))),
            Err(err) => return Err(ApiError::Internal(format!("reading replica {rank}'s address panicked: {err}"))),
        };
        let url = String::from_utf8_lossy(&bytes).into_owned();
        self.addresses.lock().unwrap_or_else(|p| p.into_inner()).insert(rank, url.clone());
        Ok(url)
    }

    /// Sends `request` (its body already read) to replica `rank` and relays the answer.
    async fn forward(&self, rank: usize, parts: axum::http::request::Parts, body: axum::body::Bytes) -> Result<Response, ApiError> {
        let base = self.address(rank).await?;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut outgoing = self.client.request(parts.method.clone(), format!("{base}{path}")).body(body);
        for (name, value) in &parts.headers {
            if name != axum::http::header::HOST && name != axum::http::header::CONTENT_LENGTH {
                outgoing = outgoing.header(name, value);
            }
        }
        outgoing = outgoing.header(HeaderName::from_static(FORWARDED), self.group.rank().to_string());
        let answer = outgoing.send().await.map_err(|e| ApiError::ReplicaUnavailable(format!("forwarding to replica {rank} at {base}: {e}")))?;
        let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = answer.headers().get(reqwest::header::CONTENT_TYPE).cloned();
        let bytes = answer.bytes().await.map_err(|e| ApiError::ReplicaUnavailable(format!("reading replica {rank}'s answer: {e}")))?;
        let mut response = (status, Body::from(bytes)).into_response();
        if let Some(content_type) = content_type {
            response.headers_mut().insert(axum::http::header::CONTENT_TYPE, content_type);
        }
        Ok(response)
    }
}

/// The rank in a replica's rollout id `ro-r<rank>-...`.
pub fn owner_of(rollout_id: &str) -> Option<usize> {
    let rest = rollout_id.strip_prefix("ro-r")?;
    let (rank, _) = rest.split_once('-')?;
    rank.parse().ok()
}

/// Middleware on the routes that name a rollout: another replica's goes to that replica.
pub(super) async fn forward_to_owner(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(replicas) = state.replicas.clone() else { return next.run(request).await };
    if request.headers().contains_key(FORWARDED) {
        return next.run(request).await;
    }
    let owner = match rollout_in_path(request.uri().path()) {
        Some(id) => replicas.other_owner(id),
        None if request.uri().path() == "/v1/rewards" => return forward_batch(&replicas, state.options.max_body_bytes, request, next).await,
        None => None,
    };
    let Some(owner) = owner else { return next.run(request).await };
    let (parts, body) = request.into_parts();
    let body = match to_bytes(body, state.options.max_body_bytes).await {
        Ok(body) => body,
        Err(err) => return ApiError::invalid("body", format!("reading the request body: {err}")).into_response(),
    };
    replicas.forward(owner, parts, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// The rollout id in `/v1/rollouts/{id}` and `/v1/rollouts/{id}/...`.
fn rollout_in_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/rollouts/")?;
    Some(rest.split('/').next().unwrap_or(rest)).filter(|id| !id.is_empty())
}

/// `POST /v1/rewards`: kept when every rollout is this replica's (or unknown), forwarded when
/// all are one other replica's, refused when they are several replicas'.
async fn forward_batch(replicas: &Replicas, max_body_bytes: usize, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let body = match to_bytes(body, max_body_bytes).await {
        Ok(body) => body,
        Err(err) => return ApiError::invalid("body", format!("reading the request body: {err}")).into_response(),
    };
    let ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("rewards").and_then(|r| r.as_array()).map(|items| items.iter().filter_map(|i| i.get("rollout_id")?.as_str().map(str::to_string)).collect()))
        .unwrap_or_default();
    let mut owners: Vec<usize> = ids.iter().map(|id| owner_of(id).unwrap_or(replicas.group.rank())).collect();
    owners.sort_unstable();
    owners.dedup();
    match owners.as_slice() {
        [rank] if *rank != replicas.group.rank() && *rank < replicas.group.world_size() => replicas.forward(*rank, parts, body).await.unwrap_or_else(IntoResponse::into_response),
        [] | [_] => next.run(Request::from_parts(parts, Body::from(body))).await,
        several => ApiError::invalid(
            "rewards",
            format!("the batch rewards rollouts of replicas {several:?}; a batch is recorded as a whole by one replica, so post each replica's rewards (ids starting ro-r<rank>-) in its own batch"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_owner_from_the_id_and_the_id_from_the_path() {
        assert_eq!(owner_of("ro-r3-1a2b-7"), Some(3));
        assert_eq!(owner_of("ro-1a2b-7"), None, "ids of a server without replicas name no owner");
        assert_eq!(owner_of("ro-rx-1"), None);
        assert_eq!(rollout_in_path("/v1/rollouts/ro-r1-ab-2/reward"), Some("ro-r1-ab-2"));
        assert_eq!(rollout_in_path("/v1/rollouts/ro-r1-ab-2"), Some("ro-r1-ab-2"));
        assert_eq!(rollout_in_path("/v1/rollouts"), None);
    }
}
