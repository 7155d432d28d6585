//! The real server on loopback, driven by a Rust HTTP client (reqwest): routes, auth, errors,
//! rollouts, n > 1, 32 concurrent requests that must equal the same requests sent alone,
//! admission under pressure, request validation and the train key.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{start_server, Server};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const KEY: &str = "test-key";
const TRAIN_KEY: &str = "train-key";
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
    // Greedy, logprobs to 1e-4: CPU kernels round differently with the batch size at the last
    // bit, so outputs can part ways where the two best tokens are within rounding of each
    // other; they are compared up to the first such near-tie (rare). Cross-talk between
    // requests would change whole tokens and logprobs.
    let requests: Vec<Value> = (0..32)
        .map(|i| {
            let prompt = format!("Tell me fact number {i} about {}.", ["cats", "the ocean in great detail", "Rust", "bread"][i % 4]);
            chat(&prompt, json!({"temperature": 0, "logprobs": true, "top_logprobs": 2, "max_tokens": 8 + (i % 5) * 8}))
        })
        .collect();
    let together: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests.iter().map(|r| scope.spawn(|| post(&server, "/v1/chat/completions", r))).collect();
        handles.into_iter().map(|h| h.join().expect("thread").1).collect()
    });
    // Read now: the one-at-a-time replays below would dilute the mean.
    let metrics = http.get(format!("{}/metrics", server.url)).send().expect("metrics").text().expect("text");
    let mean_batch: f64 = metrics.lines().find_map(|l| l.strip_prefix("hicra_mean_batch_size ")).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(mean_batch > 1.5, "requests were not batched: mean batch {mean_batch}");
    let mut near_ties = 0;
    for (request, concurrent) in requests.iter().zip(&together) {
        let (status, alone) = post(&server, "/v1/chat/completions", request);
        assert_eq!(status, 200);
        let (batched, single) = (served_tokens(concurrent), served_tokens(&alone));
        assert!(!single.is_empty(), "request {request}: {alone}");
        // Compared through the first near-tie of the one-at-a-time run (either token may win there).
        let tie = single.iter().position(|t| t.top2_gap < 1e-3);
        near_ties += usize::from(tie.is_some());
        let compared = match tie {
            Some(at) => at + 1,
            None => {
                assert_eq!(concurrent["usage"], alone["usage"], "request {request}");
                assert_eq!(batched.len(), single.len(), "request {request}");
                single.len()
            }
        };
        assert!(batched.len() >= compared.min(single.len()), "request {request}");
        for (at, (a, b)) in batched.iter().zip(&single).take(compared).enumerate() {
            assert!(a.token == b.token || Some(at) == tie, "request {request}: token {at} differs: {a:?} vs {b:?}");
            assert!((a.logprob - b.logprob).abs() <= 1e-4 || Some(at) == tie, "request {request}: token {at}: {a:?} vs {b:?}");
        }
    }
    assert!(near_ties <= 4, "{near_ties} of 32 outputs met a near-tie: the comparison lost its power");
}

/// One generated token as a chat completion reports it.
#[derive(Debug)]
struct ServedToken {
    token: String,
    logprob: f64,
    /// How far the best token's logprob is above the second best's.
    top2_gap: f64,
}

fn served_tokens(body: &Value) -> Vec<ServedToken> {
    let content = body["choices"][0]["logprobs"]["content"].as_array().cloned().unwrap_or_default();
    content
        .iter()
        .map(|t| {
            let top: Vec<f64> = t["top_logprobs"].as_array().map(|a| a.iter().filter_map(|c| c["logprob"].as_f64()).collect()).unwrap_or_default();
            ServedToken {
                token: t["token"].as_str().unwrap_or_default().to_string(),
                logprob: t["logprob"].as_f64().unwrap_or(f64::NAN),
                top2_gap: if top.len() > 1 { top[0] - top[1] } else { f64::INFINITY },
            }
        })
        .collect()
}

/// A `hicra serve` child whose stderr (logs included) is kept for the test to read.
struct LoggedServer(Server);

impl std::ops::Deref for LoggedServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl LoggedServer {
    /// `hicra serve --device cpu --port 0 ARGS`, logging warnings and the server's debug lines.
    fn start(args: &[&str]) -> Self {
        Self(common::start_server_logging(args, "warn,hicra_core::server=debug"))
    }

    fn post_with(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        let response = client().post(format!("{}{path}", self.url)).bearer_auth(key).json(body).send().expect("request");
        (response.status().as_u16(), response.json().unwrap_or(Value::Null))
    }

    /// Opens a stream and returns once its status line arrived (the response is kept open).
    fn open_stream(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        client().post(format!("{}{path}", self.url)).bearer_auth(KEY).json(body).send().expect("stream request")
    }

    fn metric(&self, name: &str) -> f64 {
        let text = client().get(format!("{}/metrics", self.url)).send().expect("metrics").text().expect("text");
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' '))).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    }

    /// Waits until `metric` satisfies `ok`, or fails after `seconds`.
    fn wait_for(&self, name: &str, seconds: u64, ok: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let value = self.metric(name);
            if ok(value) {
                return;
            }
            assert!(Instant::now() < deadline, "{name} stayed at {value}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reads server-sent events until `count` `data:` lines arrived.
fn read_events(response: &mut reqwest::blocking::Response, count: usize) {
    let mut reader = BufReader::new(response);
    let mut seen = 0;
    let mut line = String::new();
    while seen < count {
        line.clear();
        assert!(reader.read_line(&mut line).expect("read stream") > 0, "stream ended after {seen} events");
        seen += usize::from(line.starts_with("data:"));
    }
}

/// A text completion the model keeps going on (it counts), holding its batch slot for
/// seconds; streamed, so its status arrives as soon as it is admitted.
fn long_stream() -> Value {
    let numbers: Vec<String> = (1..=12).map(|i| i.to_string()).collect();
    json!({"model": MODEL, "prompt": format!("{},", numbers.join(", ")), "max_tokens": 450, "temperature": 0, "stream": true})
}

fn error_param(body: &Value) -> Option<&str> {
    body["error"]["param"].as_str()
}

/// Admission under pressure, with one batch slot and eight queue places: a refused batch
/// leaves nothing queued, a wave of concurrent requests never gets more than the queue
/// holds, a prompt-token budget counts the new request, and client disconnects are not
/// logged as errors.
#[test]
fn admission_is_all_or_nothing_and_never_over_the_limit() {
    let server = LoggedServer::start(&["--api-key", KEY, "--max-batch", "1", "--max-queue", "8", "--max-queue-tokens", "1000", "--max-context", "512"]);

    // A streaming chat client that leaves after two events: cancelled, logged at debug only.
    let story = chat("Write a long story about a dragon who learns to fly.", json!({"max_tokens": 300, "temperature": 0.8, "seed": 3, "stream": true}));
    let mut leaving = server.open_stream("/v1/chat/completions", &story);
    assert_eq!(leaving.status().as_u16(), 200);
    read_events(&mut leaving, 2);
    drop(leaving);
    server.wait_for("hicra_sequences_cancelled_total", 30, |v| v >= 1.0);
    server.wait_for("hicra_batch_size", 30, |v| v == 0.0);

    // One long stream takes the only slot.
    let occupier = server.open_stream("/v1/completions", &long_stream());
    assert_eq!(occupier.status().as_u16(), 200);
    server.wait_for("hicra_batch_size", 30, |v| v == 1.0);

    // 20 prompts cannot fit in 8 places: 429, and none of them stays queued.
    let prompts: Vec<String> = (0..20).map(|i| format!("Prompt number {i}")).collect();
    let (status, body) = server.post_with(KEY, "/v1/completions", &json!({"model": MODEL, "prompt": prompts, "max_tokens": 4}));
    assert_eq!(status, 429, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("20 queued sequences"), "{body}");
    assert_eq!(server.metric("hicra_queue_depth"), 0.0);
    assert_eq!(server.metric("hicra_queued_prompt_tokens"), 0.0);

    // 4 prompts of 300 tokens: 4 places are free, 1,200 tokens are more than the 1,000 allowed.
    let (status, body) = server.post_with(KEY, "/v1/completions", &json!({"model": MODEL, "prompt": vec![vec![100; 300]; 4], "max_tokens": 4}));
    assert_eq!(status, 429, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("prompt tokens"), "{body}");
    assert_eq!(server.metric("hicra_queue_depth"), 0.0);

    // 30 clients at once: with the slot busy, exactly the 8 queue places are granted.
    let barrier = Barrier::new(30);
    let wave: Vec<reqwest::blocking::Response> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..30)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    server.open_stream("/v1/completions", &long_stream())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let admitted = wave.iter().filter(|r| r.status().as_u16() == 200).count();
    let refused = wave.iter().filter(|r| r.status().as_u16() == 429).count();
    assert_eq!(admitted + refused, 30, "unexpected statuses: {:?}", wave.iter().map(|r| r.status()).collect::<Vec<_>>());
    // 9 only if the occupier ended (end of text) during the wave and one more got its slot.
    assert!((8..=9).contains(&admitted), "{admitted} of 30 admitted with 8 queue places");
    assert!(server.metric("hicra_queue_depth") <= 8.0);

    // Everyone leaves: the queue drains, and a small request is served at once.
    drop(wave);
    drop(occupier);
    server.wait_for("hicra_queue_depth", 60, |v| v == 0.0);
    server.wait_for("hicra_batch_size", 60, |v| v == 0.0);
    let (status, body) = server.post_with(KEY, "/v1/completions", &json!({"model": MODEL, "prompt": ["Hello", "Bye"], "max_tokens": 2}));
    assert_eq!(status, 200, "{body}");

    let log = server.log_lines();
    assert!(!log.iter().any(|l| l.contains("ERROR")), "errors logged:\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("client disconnected")), "disconnect not logged at debug:\n{}", log.join("\n"));
}

/// Message roles and tools are checked with the field named; a train key guards the routes
/// that change the weights, and the API key alone does not open them.
#[test]
fn roles_tools_and_the_train_key() {
    let model = common::tiny_model_file();
    let model = model.to_str().expect("utf-8 path");
    let server = LoggedServer::start(&["--model", model, "--max-context", "128", "--train", "--api-key", KEY, "--train-key", TRAIN_KEY]);
    let chat_to = |messages: Value, extra: Value| {
        let mut body = json!({"model": "model", "messages": messages, "max_tokens": 2});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        server.post_with(KEY, "/v1/chat/completions", &body)
    };

    let (status, body) = chat_to(json!([{"role": "wizard", "content": "hi"}]), json!({}));
    assert_eq!((status, error_param(&body)), (400, Some("messages[0].role")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("unknown role 'wizard'"), "{body}");
    let (status, body) = chat_to(json!([{"role": "user", "content": "hi"}, {"content": "no role"}]), json!({}));
    assert_eq!((status, error_param(&body)), (400, Some("messages[1].role")), "{body}");
    let (status, body) = chat_to(json!([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]), json!({}));
    assert_eq!(status, 200, "developer is OpenAI's system role: {body}");
    let (status, body) = chat_to(json!([{"role": "user", "content": "hi"}]), json!({"tools": [{"type": "function"}]}));
    assert_eq!((status, error_param(&body)), (400, Some("tools[0].function")), "{body}");
    let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}});
    let (status, body) = chat_to(json!([{"role": "user", "content": "hi"}]), json!({"tools": [tool]}));
    assert_eq!(status, 200, "{body}");

    // A rollout to reward.
    let (status, body) = server.post_with(KEY, "/v1/completions", &json!({"model": "model", "prompt": [5, 17, 99], "max_tokens": 4}));
    assert_eq!(status, 200, "{body}");
    let id = body["choices"][0]["hicra"]["rollout_id"].as_str().expect("rollout id").to_string();
    let reward = json!({"reward": 1.0});
    let (status, body) = server.post_with(KEY, &format!("/v1/rollouts/{id}/reward"), &reward);
    assert_eq!(status, 401, "the API key must not change the weights: {body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("train key"), "{body}");
    let (status, _) = server.post_with(KEY, "/v1/rewards", &json!({"rewards": [{"rollout_id": id, "reward": 1.0}]}));
    assert_eq!(status, 401);
    let (status, _) = server.post_with(KEY, &format!("/v1/rollouts/{id}/score"), &json!({}));
    assert_eq!(status, 401);
    let (status, body) = server.post_with(TRAIN_KEY, &format!("/v1/rollouts/{id}/reward"), &reward);
    assert!(status != 401 && status < 500, "the train key opens the reward route: {status} {body}");
    let (status, _) = server.post_with(TRAIN_KEY, "/v1/rollouts/ro-nope/reward", &reward);
    assert_eq!(status, 404, "past auth, the unknown rollout is the error");
    // The train key is for training only.
    let (status, _) = server.post_with(TRAIN_KEY, "/v1/completions", &json!({"model": "model", "prompt": [5], "max_tokens": 1}));
    assert_eq!(status, 401);
}
