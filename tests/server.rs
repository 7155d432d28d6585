//! The real server on loopback, driven by a Rust HTTP client (reqwest): routes, auth, errors,
//! rollouts, n > 1, and 32 concurrent requests that must equal the same requests sent alone.

mod common;

use std::time::Duration;

use common::{start_server, Server};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const KEY: &str = "test-key";
const MODEL: &str = "smollm2-135m-instruct";

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(300)).build().expect("client")
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let response = client().post(format!("{}{path}", server.url)).bearer_auth(KEY).json(body).send().expect("request");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn chat(prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

#[test]
fn serves_chat_errors_rollouts_and_concurrency() {
    let server = start_server(&["--api-key", KEY, "--max-batch", "32", "--max-context", "512"]);
    let http = client();

    // Health and models.
    let health: Value = http.get(format!("{}/health", server.url)).send().expect("health").json().expect("json");
    assert_eq!(health["status"], "ok");
    let models: Value = http.get(format!("{}/v1/models", server.url)).bearer_auth(KEY).send().expect("models").json().expect("json");
    assert_eq!(models["data"][0]["id"], MODEL);

    // Greedy chat with logprobs and token ids; the rollout holds the same.
    let (status, body) = post(&server, "/v1/chat/completions", &chat("What is the capital of France?", json!({"temperature": 0, "max_tokens": 24, "logprobs": true, "top_logprobs": 2, "return_token_ids": true})));
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert!(choice["message"]["content"].as_str().unwrap_or("").contains("Paris"), "{body}");
    let ids = choice["hicra"]["token_ids"].as_array().expect("token ids").clone();
    assert_eq!(body["usage"]["completion_tokens"].as_u64(), Some(ids.len() as u64));
    let rollout_id = choice["hicra"]["rollout_id"].as_str().expect("rollout id");
    let rollout: Value = http.get(format!("{}/v1/rollouts/{rollout_id}", server.url)).bearer_auth(KEY).send().expect("rollout").json().expect("json");
    assert_eq!(rollout["completion_token_ids"].as_array(), Some(&ids));
    assert_eq!(rollout["prompt_token_ids"], choice["hicra"]["prompt_token_ids"]);
    let served: Vec<f64> = choice["logprobs"]["content"].as_array().expect("logprobs").iter().map(|t| t["logprob"].as_f64().unwrap_or(1.0)).collect();
    let stored: Vec<f64> = rollout["logprobs"].as_array().expect("logprobs").iter().map(|v| v.as_f64().unwrap_or(1.0)).collect();
    assert_eq!(served.len(), stored.len());
    assert!(served.iter().zip(&stored).all(|(a, b)| (a - b).abs() < 1e-6));

    // n = 3 with a seed: reproducible, distinct choices, shared prompt counted once.
    let request = chat("Name a colour.", json!({"n": 3, "seed": 5, "temperature": 1.0, "max_tokens": 12}));
    let (_, first) = post(&server, "/v1/chat/completions", &request);
    let (_, second) = post(&server, "/v1/chat/completions", &request);
    let texts = |v: &Value| v["choices"].as_array().map(|c| c.iter().map(|x| x["message"]["content"].clone()).collect::<Vec<_>>()).unwrap_or_default();
    assert_eq!(texts(&first).len(), 3);
    assert_eq!(texts(&first), texts(&second));
    assert!(texts(&first).iter().any(|t| t != &texts(&first)[0]), "three samples all equal: {first}");

    // Errors: OpenAI shape and status.
    let unauthorized = http.post(format!("{}/v1/chat/completions", server.url)).bearer_auth("wrong").json(&chat("hi", json!({}))).send().expect("send");
    assert_eq!(unauthorized.status().as_u16(), 401);
    let (status, body) = post(&server, "/v1/chat/completions", &chat("hi", json!({"n": 17})));
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("n")));
    let (status, body) = post(&server, "/v1/chat/completions", &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("model")));
    let (status, body) = post(&server, "/v1/chat/completions", &chat(&"word ".repeat(600), json!({})));
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("context limit is 512"), "{body}");
    let malformed = http.post(format!("{}/v1/chat/completions", server.url)).bearer_auth(KEY).header("content-type", "application/json").body("{\"model\": ").send().expect("send");
    assert_eq!(malformed.status().as_u16(), 400);
    let body: Value = malformed.json().expect("json error body");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let missing = http.get(format!("{}/v1/rollouts/ro-nope", server.url)).bearer_auth(KEY).send().expect("send");
    assert_eq!(missing.status().as_u16(), 404);

    // 32 concurrent requests of mixed lengths equal the same requests sent one at a time.
    let requests: Vec<Value> = (0..32)
        .map(|i| {
            let prompt = format!("Tell me fact number {i} about {}.", ["cats", "the ocean in great detail", "Rust", "bread"][i % 4]);
            chat(&prompt, json!({"seed": 1000 + i, "temperature": 0.8, "max_tokens": 8 + (i % 5) * 8}))
        })
        .collect();
    let together: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests.iter().map(|r| scope.spawn(|| post(&server, "/v1/chat/completions", r))).collect();
        handles.into_iter().map(|h| h.join().expect("thread").1).collect()
    });
    for (request, concurrent) in requests.iter().zip(&together) {
        let (status, alone) = post(&server, "/v1/chat/completions", request);
        assert_eq!(status, 200);
        assert_eq!(concurrent["choices"][0]["message"]["content"], alone["choices"][0]["message"]["content"], "request {request}");
        assert_eq!(concurrent["usage"], alone["usage"]);
    }
    let metrics = http.get(format!("{}/metrics", server.url)).send().expect("metrics").text().expect("text");
    let mean_batch: f64 = metrics.lines().find_map(|l| l.strip_prefix("hicra_mean_batch_size ")).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(mean_batch > 1.5, "requests were not batched: mean batch {mean_batch}");
}
