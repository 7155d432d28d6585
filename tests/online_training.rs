//! Online training end to end: a real server with `--train`, rewards posted over HTTP, steps
//! run by the server's step worker off the request path, and the next completions served by
//! the new policy. Also the reward lifecycle's rules: rewarded once, groups of at least two,
//! bounded and expiring pending state, staleness, and HICRA's credit on Strategic Grams.

mod common;

use std::ffi::OsString;

use common::{last_step, start_server, tiny_model_file, wait_for_steps, Server};
use reqwest::blocking::Client;
use serde_json::{json, Value};

fn start(extra: &[&str]) -> Server {
    // One file per server: tests start servers concurrently, and a shared file could be read
    // while another test rewrites it.
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let config = common::scratch_dir(&format!("online-{}", STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed))).join("trainer.toml");
    std::fs::write(&config, "[optim]\nlr = 0.05\n[lora]\nrank = 8\n").expect("write trainer config");
    let mut args: Vec<OsString> = vec!["--max-context".into(), "128".into(), "--train-config".into(), config.into(), "--model".into(), tiny_model_file().into()];
    args.extend(extra.iter().map(OsString::from));
    start_server(&args)
}

fn post(client: &Client, url: &str, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().expect("request");
    (response.status().as_u16(), response.json().unwrap_or(Value::Null))
}

fn training(client: &Client, server: &Server) -> Value {
    client.get(format!("{}/v1/training", server.url)).send().expect("training").json().expect("json")
}

fn completion_logprobs(client: &Client, server: &Server, prompt: &[u32]) -> (Vec<f64>, u64) {
    let (status, body) = post(client, &format!("{}/v1/completions", server.url), json!({"model": "model", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1}));
    assert_eq!(status, 200, "{body}");
    let lps = body["choices"][0]["logprobs"]["token_logprobs"].as_array().expect("logprobs").iter().filter_map(Value::as_f64).collect();
    (lps, body["choices"][0]["hicra"]["policy_version"].as_u64().expect("version"))
}

/// Rollout ids of a chat request with `n` sampled choices.
fn sample(client: &Client, server: &Server, content: &str, n: usize, extra: Value) -> Vec<String> {
    let mut body = json!({"model": "model", "messages": [{"role": "user", "content": content}], "n": n, "temperature": 1.0, "max_tokens": 8, "seed": 3});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let (status, body) = post(client, &format!("{}/v1/chat/completions", server.url), body);
    assert_eq!(status, 200, "{body}");
    body["choices"].as_array().expect("choices").iter().map(|c| c["hicra"]["rollout_id"].as_str().expect("id").to_string()).collect()
}

#[test]
fn rewards_train_the_served_model_in_place() {
    let server = start(&[]);
    let client = common::http_client();
    let probe = [5u32, 17, 99, 3];
    let (before, version) = completion_logprobs(&client, &server, &probe);
    assert_eq!(version, 0);

    // n = 4 choices form one group; it completes with its fourth reward.
    let ids = sample(&client, &server, "hi", 4, json!({"top_p": 0.9, "top_k": 20}));
    for (i, id) in ids.iter().take(3).enumerate() {
        let (status, reply) = post(&client, &format!("{}/v1/rollouts/{id}/reward", server.url), json!({"reward": (i % 2) as f64}));
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["rewards"][0]["status"], "collecting", "{reply}");
        assert_eq!(reply["rewards"][0]["rewarded"], i + 1);
    }
    let chat_url = format!("{}/v1/chat/completions", server.url);
    let reply = std::thread::scope(|scope| {
        let during: Vec<_> = (0..3)
            .map(|i| {
                let url = chat_url.clone();
                scope.spawn(move || post(&common::http_client(), &url, json!({"model": "model", "messages": [{"role": "user", "content": format!("q{i}")}], "max_tokens": 16})))
            })
            .collect();
        let (status, reply) = post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": [{"rollout_id": ids[3], "reward": 1.0}]}));
        assert_eq!(status, 200, "{reply}");
        for handle in during {
            let (status, body) = handle.join().expect("thread");
            assert_eq!(status, 200, "a request failed while training: {body}");
        }
        reply
    });
    assert_eq!(reply["rewards"][0]["status"], "complete", "{reply}");
    let status = wait_for_steps(&server.url, None, 1);
    let step = last_step(&status);
    assert_eq!(step["updated"], true, "{status}");
    // Truncated sampling is trained against its own distribution: the ratio starts at 1.
    assert_eq!(step["clip_fraction"], 0.0, "{step}");
    let deviation = step["ratio_deviation_max"].as_f64().expect("ratio_deviation_max");
    assert!(deviation < 1e-3 && step["ratio_deviation_mean"].as_f64().is_some_and(|m| m <= deviation), "{step}");
    assert_eq!(status["policy_version"], 1);
    assert_eq!(status["counters"]["trained"], 1);

    // The very next request is served by the new adapters.
    let (after, version) = completion_logprobs(&client, &server, &probe);
    assert_eq!(version, 1);
    let moved = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(moved > 1e-4, "served logprobs did not change: {before:?} vs {after:?}");

    // Equal rewards carry no signal: counted, no update.
    let ids = sample(&client, &server, "yo", 2, json!({}));
    let batch: Vec<Value> = ids.iter().map(|id| json!({"rollout_id": id, "reward": 0.5})).collect();
    post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": batch}));
    let status = wait_for_steps(&server.url, None, 2);
    assert_eq!(last_step(&status)["updated"], false, "{status}");
    assert_eq!(last_step(&status)["zero_variance_groups"], 1);
    assert_eq!(status["policy_version"], 1);

    let metrics = client.get(format!("{}/metrics", server.url)).send().expect("metrics").text().expect("text");
    assert!(metrics.contains("hicra_train_steps_total 2"), "{metrics}");
    assert!(metrics.contains("hicra_policy_version 1") && metrics.contains("hicra_training_groups_completed_total 2"), "{metrics}");
    for gauge in ["hicra_train_accuracy", "hicra_train_semantic_entropy", "hicra_train_entropy_planning", "hicra_train_clip_fraction", "hicra_train_tokens_per_second", "hicra_training_pending_groups"] {
        assert!(metrics.contains(gauge), "{gauge} missing from /metrics");
    }
    assert!(last_step(&status)["semantic_entropy"].is_number(), "{status}");
}

#[test]
fn rewards_are_validated_recorded_once_and_grouped_by_their_own_prompts() {
    let server = start(&[]);
    let client = common::http_client();
    let reward_url = |id: &str| format!("{}/v1/rollouts/{id}/reward", server.url);

    // Refused before anything is recorded: unknown, not a number, not finite in f32.
    let ids = sample(&client, &server, "a", 2, json!({}));
    assert_eq!(post(&client, &reward_url("ro-missing"), json!({"reward": 1.0})).0, 404);
    assert_eq!(post(&client, &reward_url(&ids[0]), json!({"reward": "high"})).0, 400);
    let (status, reply) = post(&client, &reward_url(&ids[0]), json!({"reward": 1e300}));
    assert!(status == 400 && reply["error"]["message"].as_str().unwrap_or("").contains("32-bit"), "{reply}");
    // A batch with one bad entry records nothing.
    let (status, _) = post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": [{"rollout_id": ids[0], "reward": 1.0}, {"rollout_id": ids[1], "reward": f32::MAX as f64 * 4.0}]}));
    assert_eq!(status, 400);
    assert_eq!(training(&client, &server)["counters"]["rewards"], 0);

    // Rewarded once: a second reward is a 409 that changes nothing.
    assert_eq!(post(&client, &reward_url(&ids[0]), json!({"reward": 1.0})).0, 200);
    let (status, reply) = post(&client, &reward_url(&ids[0]), json!({"reward": 0.0}));
    assert!(status == 409 && reply["error"]["message"].as_str().unwrap_or("").contains("already rewarded"), "{reply}");
    let stored: Value = client.get(format!("{}/v1/rollouts/{}", server.url, ids[0])).send().expect("get").json().expect("json");
    assert_eq!(stored["reward"], 1.0);
    assert_eq!(training(&client, &server)["counters"]["rewards"], 1);

    // Greedy rollouts have no behaviour distribution to train against.
    let greedy = sample(&client, &server, "g", 2, json!({"temperature": 0}));
    let (status, reply) = post(&client, &reward_url(&greedy[0]), json!({"reward": 1.0}));
    assert!(status == 400 && reply["error"]["message"].as_str().unwrap_or("").contains("greedily"), "{reply}");

    // n = 1 without a group can never complete one; the reply says how to group it.
    let single_a = sample(&client, &server, "first prompt", 1, json!({"top_k": 5}));
    let single_b = sample(&client, &server, "a different, longer second prompt", 1, json!({"temperature": 0.7}));
    let (status, reply) = post(&client, &reward_url(&single_a[0]), json!({"reward": 1.0}));
    let message = reply["error"]["message"].as_str().unwrap_or("");
    assert!(status == 400 && reply["error"]["param"] == "group_id" && message.contains("n >= 2") && message.contains("group_id"), "{reply}");
    // Named, the two single rollouts of different prompts and sampling form one group; each
    // member trains on its own prompt and its own sampling distribution.
    let (status, reply) = post(&client, &reward_url(&single_a[0]), json!({"reward": 1.0, "group_id": "pair", "group_size": 2}));
    assert!(status == 200 && reply["rewards"][0]["status"] == "collecting", "{reply}");
    let (status, reply) = post(&client, &reward_url(&single_b[0]), json!({"reward": 0.0, "group_id": "pair"}));
    assert!(status == 200 && reply["rewards"][0]["status"] == "complete", "{reply}");
    let status = wait_for_steps(&server.url, None, 1);
    let step = last_step(&status);
    assert!(step["updated"] == true && step["trained_groups"] == json!(["pair"]), "{status}");
    assert_eq!(step["clip_fraction"], 0.0, "each member's ratio starts at 1: {step}");
}

#[test]
fn pending_groups_are_bounded_and_expire() {
    // A group's clock starts at its first reward: sample everything first, so the rewards and
    // the checks fit well inside the timeout even on a loaded machine.
    let server = start(&["--max-pending-groups", "2", "--group-timeout-s", "6"]);
    let client = common::http_client();
    let sampled: Vec<Vec<String>> = (0..3).map(|k| sample(&client, &server, &format!("pending {k}"), 2, json!({}))).collect();
    let mut opened = Vec::new();
    for ids in sampled {
        let (status, reply) = post(&client, &format!("{}/v1/rollouts/{}/reward", server.url, ids[0]), json!({"reward": 1.0}));
        opened.push((status, ids, reply));
    }
    assert_eq!(opened.iter().map(|o| o.0).collect::<Vec<_>>(), vec![200, 200, 429], "{:?}", opened.iter().map(|o| &o.2).collect::<Vec<_>>());
    let status = training(&client, &server);
    assert!(status["pending_groups"] == 2 && status["counters"]["rewards"] == 2, "the 429 recorded nothing: {status}");
    let status = common::wait_for_training(&server.url, None, "expiry", |s| s["pending_groups"] == 0);
    assert!(status["counters"]["expired"] == 2 && status["counters"]["expired_rollouts"] == 2, "{status}");
    let (status, reply) = post(&client, &format!("{}/v1/rollouts/{}/reward", server.url, opened[2].1[0]), json!({"reward": 1.0}));
    assert_eq!(status, 200, "room again after expiry: {reply}");
    let metrics = client.get(format!("{}/metrics", server.url)).send().expect("metrics").text().expect("text");
    assert!(metrics.contains("hicra_training_groups_expired_total 2"), "{metrics}");
}

#[test]
fn steps_drop_rollouts_older_than_max_staleness_and_responses_name_both_versions() {
    let server = start(&["--max-staleness", "0"]);
    let client = common::http_client();
    let (status, body) = post(&client, &format!("{}/v1/chat/completions", server.url), json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "n": 2, "max_tokens": 4}));
    assert_eq!(status, 200);
    let hicra = &body["choices"][0]["hicra"];
    assert!(hicra["policy_version_first"] == 0 && hicra["policy_version_last"] == 0 && hicra["policy_version"] == 0, "{hicra}");
    let old = sample(&client, &server, "sampled at version 0", 2, json!({}));
    let fresh = sample(&client, &server, "also version 0", 2, json!({}));
    let batch: Vec<Value> = fresh.iter().enumerate().map(|(i, id)| json!({"rollout_id": id, "reward": i as f64})).collect();
    post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": batch}));
    assert_eq!(wait_for_steps(&server.url, None, 1)["policy_version"], 1);
    // Version 1 now; `old` was sampled at 0, beyond max_staleness 0: dropped and counted.
    let batch: Vec<Value> = old.iter().enumerate().map(|(i, id)| json!({"rollout_id": id, "reward": i as f64})).collect();
    post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": batch}));
    let status = common::wait_for_training(&server.url, None, "stale group", |s| s["counters"]["stale_groups"] == 1);
    assert!(status["counters"]["stale_rollouts"] == 2 && status["counters"]["stale_groups"] == 1 && status["policy_version"] == 1, "{status}");
    let stored: Value = client.get(format!("{}/v1/rollouts/{}", server.url, old[0])).send().expect("get").json().expect("json");
    assert!(stored["policy_version_first"] == 0 && stored["sampling"]["temperature"] == 1.0, "{stored}");
}

#[test]
fn hicra_amplifies_the_advantage_exactly_on_a_served_strategic_gram() {
    let dir = common::scratch_dir("hicra-sg");
    let log = dir.join("rollouts.jsonl");
    let server = start_server(&[OsString::from("--train"), "--max-context".into(), "256".into(), "--rollout-log".into(), log.clone().into()]);
    let client = common::http_client();
    // Repetition makes the continuation predictable; top_k = 1 keeps it to the best token.
    let prompt = "Let me verify this. Let me verify this. Let me verify this. Let me verify this. Let me";
    let (status, body) = post(&client, &format!("{}/v1/completions", server.url), json!({"model": "smollm2-135m-instruct", "prompt": prompt, "n": 4, "temperature": 1.0, "top_k": 1, "max_tokens": 12}));
    assert_eq!(status, 200, "{body}");
    let rewards: Vec<Value> = body["choices"].as_array().expect("choices").iter().enumerate().map(|(i, c)| json!({"rollout_id": c["hicra"]["rollout_id"], "reward": if i % 3 == 0 { 1.0 } else { 0.0 }})).collect();
    post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": rewards}));
    assert_eq!(last_step(&wait_for_steps(&server.url, None, 1))["updated"], true);

    let logged: Vec<Value> = std::fs::read_to_string(&log).expect("log").lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(logged.len(), 4);
    let mut planning_seen = 0;
    for record in &logged {
        let pieces: Vec<String> = record["pieces"].as_array().expect("pieces").iter().map(|p| p.as_str().unwrap_or("").to_string()).collect();
        let advantages: Vec<f64> = record["advantages"].as_array().expect("advantages logged").iter().filter_map(Value::as_f64).collect();
        assert_eq!(advantages.len(), pieces.len(), "{record}");
        let planning = common::strategic_gram_tokens(&pieces);
        assert!(planning.iter().any(|&p| p) && planning.iter().any(|&p| !p), "the completion must mix a gram and other tokens: {pieces:?}");
        planning_seen += planning.iter().filter(|&&p| p).count();
        // HICRA (alpha 0.2): A + 0.2 |A| on planning tokens, A elsewhere.
        let base = advantages.iter().zip(&planning).find(|(_, &p)| !p).map(|(a, _)| *a).expect("an execution token");
        assert!(base.abs() > 0.1, "{record}");
        for ((piece, a), is_planning) in pieces.iter().zip(&advantages).zip(&planning) {
            let want = if *is_planning { base + 0.2 * base.abs() } else { base };
            assert!((a - want).abs() < 1e-5, "token {piece:?} (planning: {is_planning}): advantage {a}, expected {want}; {pieces:?}");
        }
    }
    assert!(planning_seen >= 4, "each completion continues the repeated gram");
}

/// The server's resident memory, from its own `/metrics`.
fn resident_mib(client: &Client, server: &Server) -> f64 {
    let metrics = client.get(format!("{}/metrics", server.url)).send().expect("metrics").text().expect("text");
    let line = metrics.lines().find(|l| l.starts_with("process_resident_memory_bytes ")).expect("process_resident_memory_bytes in /metrics");
    line.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()).expect("a number") / (1024.0 * 1024.0)
}

#[test]
fn resident_memory_between_steps_stays_flat_when_step_shapes_vary() {
    // The default model: its steps allocate hundreds of MB of activations, so memory kept
    // after a step shows against the serving footprint (the tiny model's would not).
    let config = std::env::temp_dir().join(format!("hicra-memory-{}.toml", std::process::id()));
    std::fs::write(&config, "[optim]\nlr = 1e-4\n[loss]\nmicro_batch = 4\n").expect("write trainer config");
    // No checkpoints: one copies the trainer's state, and a read during its write would count it.
    let server = start_server(&[
        "--max-context".into(), "512".into(), "--groups-per-step".into(), "1".into(), "--train-config".into(), config.into_os_string(),
        "--checkpoint-every-steps".into(), "0".into(), "--checkpoint-every-s".into(), "0".into(),
    ]);
    let client = common::http_client();
    let mut resident = Vec::new();
    for step in 1..=20u64 {
        // Step 3 is four times longer than the others; the rest vary in size.
        let (n, words, max_tokens) = if step == 3 { (8, 160, 48) } else { (2 + (step as usize % 3) * 2, 5 + (step as usize % 4) * 5, 4 + (step % 5) * 2) };
        let content = format!("Count the words in this list, step {step}: {}", "apple pear plum ".repeat(words / 3));
        let ids = sample(&client, &server, &content, n, json!({"model": "smollm2-135m-instruct", "max_tokens": max_tokens, "seed": step}));
        let rewards: Vec<Value> = ids.iter().enumerate().map(|(i, id)| json!({"rollout_id": id, "reward": (i % 2) as f64})).collect();
        let (status, reply) = post(&client, &format!("{}/v1/rewards", server.url), json!({"rewards": rewards}));
        assert_eq!(status, 200, "{reply}");
        let status = wait_for_steps(&server.url, None, step);
        assert_eq!(last_step(&status)["updated"], true, "step {step}: {status}");
        resident.push(resident_mib(&client, &server));
    }
    let (after_2, after_20) = (resident[1], resident[19]);
    assert!(after_20 <= after_2 * 1.10, "resident memory grew from {after_2:.0} MiB after step 2 to {after_20:.0} MiB after step 20 (MiB by step: {resident:.0?})");
}
