//! Online training end to end: a real server with `--train` on a tiny real checkpoint, rewards
//! posted over HTTP, an in-place step, and the next completions served by the new policy.

mod common;

use std::ffi::OsString;
use std::path::Path;

use common::{start_server, Server};
use reqwest::blocking::Client;
use serde_json::{json, Value};

fn start() -> Server {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/llama/model.gguf");
    let config = std::env::temp_dir().join(format!("hicra-online-{}.toml", std::process::id()));
    std::fs::write(&config, "[optim]\nlr = 0.05\n[lora]\nrank = 8\n").expect("write trainer config");
    start_server(&[OsString::from("--max-context"), "128".into(), "--train-config".into(), config.into(), "--model".into(), model.into()])
}

fn post(client: &Client, url: &str, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().expect("request");
    (response.status().as_u16(), response.json().unwrap_or(Value::Null))
}

fn completion_logprobs(client: &Client, server: &Server, prompt: &[u32]) -> (Vec<f64>, u64) {
    let (status, body) = post(client, &format!("{}/v1/completions", server.url), json!({"model": "model", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1}));
    assert_eq!(status, 200, "{body}");
    let lps = body["choices"][0]["logprobs"]["token_logprobs"].as_array().expect("logprobs").iter().filter_map(Value::as_f64).collect();
    (lps, body["choices"][0]["hicra"]["policy_version"].as_u64().expect("version"))
}

#[test]
fn rewards_train_the_served_model_in_place() {
    let server = start();
    let client = Client::new();
    let probe = [5u32, 17, 99, 3];
    let (before, version) = completion_logprobs(&client, &server, &probe);
    assert_eq!(version, 0);

    // n = 4 choices form one group; reward two of them.
    let (status, body) = post(&client, &format!("{}/v1/chat/completions", server.url), json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "n": 4, "temperature": 1.0, "max_tokens": 8, "seed": 3}));
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = body["choices"].as_array().expect("choices").iter().map(|c| c["hicra"]["rollout_id"].as_str().expect("id").to_string()).collect();
    for (i, id) in ids.iter().take(3).enumerate() {
        let (status, reply) = post(&client, &format!("{}/v1/rollouts/{id}/reward", server.url), json!({"reward": (i % 2) as f64}));
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["steps"].as_array().map(Vec::len), Some(0), "group incomplete: no step yet");
    }
    // The last reward triggers the step; requests sent meanwhile must still succeed.
    let chat_url = format!("{}/v1/chat/completions", server.url);
    let (status, reply) = std::thread::scope(|scope| {
        let during: Vec<_> = (0..3)
            .map(|i| {
                let url = chat_url.clone();
                scope.spawn(move || post(&Client::new(), &url, json!({"model": "model", "messages": [{"role": "user", "content": format!("q{i}")}], "max_tokens": 16})))
            })
            .collect();
        let stepped = post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": [{"rollout_id": ids[3], "reward": 1.0}]}));
        for handle in during {
            let (status, body) = handle.join().expect("thread");
            assert_eq!(status, 200, "a request failed while training: {body}");
        }
        stepped
    });
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["steps"][0]["updated"], true, "{reply}");
    assert_eq!(reply["policy_version"], 1);

    // The very next request is served by the new adapters.
    let (after, version) = completion_logprobs(&client, &server, &probe);
    assert_eq!(version, 1);
    let moved = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(moved > 1e-4, "served logprobs did not change: {before:?} vs {after:?}");

    // Equal rewards carry no signal: counted, no update.
    let (_, body) = post(&client, &format!("{}/v1/chat/completions", server.url), json!({"model": "model", "messages": [{"role": "user", "content": "yo"}], "n": 2, "max_tokens": 4}));
    let batch: Vec<Value> = body["choices"].as_array().expect("choices").iter().map(|c| json!({"rollout_id": c["hicra"]["rollout_id"], "reward": 0.5})).collect();
    let (_, reply) = post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": batch}));
    assert_eq!(reply["steps"][0]["updated"], false, "{reply}");
    assert_eq!(reply["steps"][0]["zero_variance_groups"], 1);
    assert_eq!(reply["policy_version"], 1);

    // Bad rewards are refused before anything is recorded.
    let (status, _) = post(&client, &format!("{}/v1/rollouts/ro-missing/reward", server.url), json!({"reward": 1.0}));
    assert_eq!(status, 404);
    let (status, _) = post(&client, &format!("{}/v1/rollouts/{}/reward", server.url, ids[0]), json!({"reward": "high"}));
    assert_eq!(status, 400);
    let metrics = client.get(format!("{}/metrics", server.url)).send().expect("metrics").text().expect("text");
    assert!(metrics.contains("hicra_train_steps_total 2"), "{metrics}");
    for gauge in ["hicra_train_accuracy", "hicra_train_semantic_entropy", "hicra_train_entropy_planning", "hicra_train_clip_fraction", "hicra_train_tokens_per_second"] {
        assert!(metrics.contains(gauge), "{gauge} missing from /metrics");
    }
    assert!(reply["steps"][0]["semantic_entropy"].is_number(), "{reply}");
}
