//! Plugins in a running server: a plugin library scores rollouts that then train the model,
//! is hot-swapped for another build at the same path without a restart, and a broken
//! replacement leaves the previous generation serving. Plugins that hang are cut off by the
//! time-out (at reload too), their leftover threads are capped, and failures are counted.

mod common;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{built_plugin, last_step, scratch_dir, start_server, tiny_model_file, wait_for_steps};
use reqwest::blocking::Client;
use serde_json::{json, Value};

fn call(client: &Client, method: &str, url: String, key: &str, body: Option<Value>) -> (u16, Value) {
    let request = match method {
        "GET" => client.get(url),
        _ => client.post(url).json(&body.unwrap_or(json!({}))),
    };
    let response = request.bearer_auth(key).send().expect("request");
    (response.status().as_u16(), response.json().unwrap_or(Value::Null))
}

/// The value of an unlabelled metric in `GET /metrics` (0 when absent).
fn metric(client: &Client, server_url: &str, name: &str) -> f64 {
    let text = client.get(format!("{server_url}/metrics")).send().expect("metrics").text().expect("text");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

/// Copies of a library named `{stem}.so` still on disk in any process's copies folder.
fn leftover_copies(stem: &str) -> Vec<PathBuf> {
    let Ok(folders) = std::fs::read_dir(std::env::temp_dir()) else { return Vec::new() };
    folders
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with("hicra-plugins-"))
        .filter_map(|f| std::fs::read_dir(f.path()).ok())
        .flat_map(|files| files.flatten().map(|f| f.path()))
        .filter(|f| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{stem}.gen"))))
        .collect()
}

/// The message of an API error body.
fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("")
}

#[test]
fn plugin_rewards_train_and_hot_swap_without_restart() {
    let dir = scratch_dir("plugins-e2e");
    let plugin_file = dir.join("libreward.so");
    std::fs::copy(built_plugin("hicra_test_misbehaving"), &plugin_file).expect("copy plugin");
    let config = dir.join("serve.toml");
    let toml = format!("plugins = [{:?}]\nadmin_key = \"admin\"\ntrain = true\nmax_context = 128\n\n[plugin_config.misbehaving]\nmode = \"length\"\n", plugin_file);
    std::fs::write(&config, toml).expect("config");
    let model = tiny_model_file();
    let server = start_server(&[OsString::from("--config"), config.into(), "--model".into(), model.into()]);
    let client = common::http_client();
    let url = |path: &str| format!("{}{path}", server.url);

    let (status, listed) = call(&client, "GET", url("/admin/plugins"), "admin", None);
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["plugins"][0]["name"], "misbehaving");
    let (status, _) = call(&client, "GET", url("/admin/plugins"), "wrong", None);
    assert_eq!(status, 401);

    // The plugin scores the 4 choices of one request; the 4th completes the group, which the
    // step worker then trains on.
    let (_, body) = call(&client, "POST", url("/v1/chat/completions"), "", Some(json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "n": 4, "temperature": 1.0, "max_tokens": 12, "seed": 9})));
    let ids: Vec<String> = body["choices"].as_array().expect("choices").iter().map(|c| c["hicra"]["rollout_id"].as_str().expect("id").to_string()).collect();
    let mut last = Value::Null;
    for id in &ids {
        let (status, scored) = call(&client, "POST", url(&format!("/v1/rollouts/{id}/score")), "", Some(json!({})));
        assert_eq!(status, 200, "{scored}");
        assert_eq!(scored["plugin"], "misbehaving");
        last = scored;
    }
    let training = &last["training"];
    assert_eq!(training["training"], true, "{last}");
    assert_eq!(training["accepted"], true, "{last}");
    assert_eq!(training["groups_completed"], 1, "{last}");
    assert_eq!(training["rewards"][0]["status"], "complete", "{last}");
    assert_eq!((training["rewards"][0]["rewarded"].as_u64(), training["rewards"][0]["size"].as_u64()), (Some(4), Some(4)), "{last}");
    let status = wait_for_steps(&server.url, None, 1);
    let step = last_step(&status);
    assert_eq!(step["updated"], true, "{status}");
    assert_eq!(step["group_ids"], json!([training["rewards"][0]["group_id"]]), "{status}");
    assert_eq!(status["counters"]["trained"], 1, "{status}");

    // Hot swap: another build at the same path, reloaded while requests keep succeeding.
    std::fs::copy(built_plugin("hicra_math_reward"), &plugin_file).expect("swap plugin");
    let chat_url = url("/v1/chat/completions");
    let reloaded = std::thread::scope(|scope| {
        let during: Vec<_> = (0..3)
            .map(|_| {
                let chat_url = chat_url.clone();
                scope.spawn(move || call(&common::http_client(), "POST", chat_url, "", Some(json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}))))
            })
            .collect();
        let reloaded = call(&client, "POST", url("/admin/plugins/reload"), "admin", None);
        for handle in during {
            assert_eq!(handle.join().expect("thread").0, 200);
        }
        reloaded
    });
    assert_eq!(reloaded.0, 200, "{}", reloaded.1);
    assert_eq!(reloaded.1["plugins"][0]["name"], "math");
    // Two sampled choices, so the scored rollout joins a group that can complete.
    let (_, body) = call(&client, "POST", url("/v1/chat/completions"), "", Some(json!({"model": "model", "messages": [{"role": "user", "content": "2+2?"}], "n": 2, "temperature": 1.0, "max_tokens": 6, "seed": 5})));
    let id = body["choices"][0]["hicra"]["rollout_id"].as_str().expect("id").to_string();
    let (status, scored) = call(&client, "POST", url(&format!("/v1/rollouts/{id}/score")), "", Some(json!({"metadata": {"answer": "4"}})));
    assert_eq!(status, 200, "{scored}");
    assert_eq!(scored["plugin"], "math");
    assert_eq!(scored["training"]["rewards"][0]["status"], "collecting", "{scored}");
    assert_eq!((scored["training"]["rewards"][0]["rewarded"].as_u64(), scored["training"]["rewards"][0]["size"].as_u64()), (Some(1), Some(2)), "{scored}");
    // A rollout is rewarded once: scoring it again is a conflict that changes nothing.
    let (status, again) = call(&client, "POST", url(&format!("/v1/rollouts/{id}/score")), "", Some(json!({"metadata": {"answer": "4"}})));
    assert_eq!(status, 409, "{again}");
    // Without the answer the math plugin fails the item: masked, reported, not scored 0.
    let other = body["choices"][1]["hicra"]["rollout_id"].as_str().expect("id").to_string();
    let (status, failed) = call(&client, "POST", url(&format!("/v1/rollouts/{other}/score")), "", Some(json!({})));
    assert_eq!(status, 400, "{failed}");
    assert!(failed["error"]["message"].as_str().unwrap_or("").contains("stays unrewarded"), "{failed}");

    // A broken replacement is refused and the math plugin keeps serving.
    std::fs::write(&plugin_file, b"not a library").expect("break plugin");
    let (status, refused) = call(&client, "POST", url("/admin/plugins/reload"), "admin", None);
    assert_eq!(status, 400, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap_or("").contains("previous plugins keep serving"));
    let (_, listed) = call(&client, "GET", url("/admin/plugins"), "admin", None);
    assert_eq!(listed["plugins"][0]["name"], "math");
    let metrics = client.get(url("/metrics")).send().expect("metrics").text().expect("text");
    assert!(metrics.contains("hicra_plugin_item_failures_total 1"), "{metrics}");
    // Three reloads, the last one failed: the copies they loaded were deleted once opened.
    assert_eq!(leftover_copies("libreward"), Vec::<PathBuf>::new());
}

#[test]
fn detector_and_credit_plugins_drive_online_training() {
    // The example variant, and the built-in entropy-gated scheme, which fails without per-token
    // entropies: its step proves the entropies recorded while sampling reach the plugin.
    let credits = [
        ("hicra_example_credit_variant", "hicra_variant", "up = 0.5\ndown = 0.1"),
        ("hicra_credit_schemes", "credit_schemes", "scheme = \"entropy_gated\""),
    ];
    for (library, name, credit_config) in credits {
        let dir = scratch_dir(&format!("plugins-credit-{name}"));
        let config = dir.join("serve.toml");
        let toml = format!(
            "plugins = [{:?}, {:?}]\ntrain = true\nmax_context = 128\nsg_plugin = \"phrases\"\ncredit_plugin = \"{name}\"\n\n[plugin_config.phrases]\nphrases = [\"let me check\"]\n\n[plugin_config.{name}]\n{credit_config}\n",
            built_plugin("hicra_example_phrase_detector"),
            built_plugin(library)
        );
        std::fs::write(&config, toml).expect("config");
        let model = tiny_model_file();
        let server = start_server(&[OsString::from("--config"), config.into(), "--model".into(), model.into()]);
        let client = common::http_client();
        let (_, body) = call(&client, "POST", format!("{}/v1/chat/completions", server.url), "", Some(json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "n": 4, "temperature": 1.0, "max_tokens": 8, "seed": 4})));
        let rewards: Vec<Value> = body["choices"].as_array().expect("choices").iter().enumerate().map(|(i, c)| json!({"rollout_id": c["hicra"]["rollout_id"], "reward": (i % 2) as f64})).collect();
        let (status, reply) = call(&client, "POST", format!("{}/v1/rewards", server.url), "", Some(json!({"rewards": rewards})));
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["groups_completed"], 1, "{name}: {reply}");
        let group = reply["rewards"][0]["group_id"].clone();
        let status = wait_for_steps(&server.url, None, 1);
        let step = last_step(&status);
        assert_eq!(step["updated"], true, "{name}: {status}");
        assert_eq!(step["trained_groups"], json!([group]), "{name}: {status}");
        assert_eq!(step["plugins"]["sg_detector"], "phrases", "{name}: {status}");
        assert_eq!(step["plugins"]["credit"], name, "{name}: {status}");
        assert_eq!(step["plugins"]["dropped_groups"], 0, "{name}: {status}");
    }
}

#[test]
fn a_plugin_that_panics_hangs_or_returns_garbage_at_serving_time_poisons_nothing() {
    let dir = scratch_dir("plugins-misbehave");
    let config = dir.join("serve.toml");
    let toml = format!("plugins = [{:?}]\ntrain = true\nmax_context = 128\nplugin_timeout_ms = 2000\n\n[plugin_config.misbehaving]\nmode = \"per_item\"\n", built_plugin("hicra_test_misbehaving"));
    std::fs::write(&config, toml).expect("config");
    let model = tiny_model_file();
    let server = start_server(&[OsString::from("--config"), config.into(), "--model".into(), model.into()]);
    let client = common::http_client();
    let url = |path: &str| format!("{}{path}", server.url);
    let (_, body) = call(&client, "POST", url("/v1/chat/completions"), "", Some(json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "n": 4, "temperature": 1.0, "max_tokens": 12, "seed": 21})));
    let ids: Vec<String> = body["choices"].as_array().expect("choices").iter().map(|c| c["hicra"]["rollout_id"].as_str().expect("id").to_string()).collect();

    // Each failure is a clear error for that call; the rollout stays unrewarded.
    let items_before = metric(&client, &server.url, "hicra_plugin_item_failures_total");
    let calls_before = metric(&client, &server.url, "hicra_plugin_call_failures_total");
    for (misbehave, expected) in [("panic", "deliberate panic"), ("hang", "timed out"), ("nan", "non-finite"), ("wrong_count", "2 results for 1 items")] {
        let (status, failed) = call(&client, "POST", url(&format!("/v1/rollouts/{}/score", ids[0])), "", Some(json!({"metadata": {"misbehave": misbehave}})));
        let message = failed["error"]["message"].as_str().unwrap_or("");
        assert_eq!(status, 400, "{misbehave}: {failed}");
        assert!(message.contains(expected) && message.contains("stays unrewarded"), "{misbehave}: {message}");
        // Still serving.
        let (status, _) = call(&client, "POST", url("/v1/chat/completions"), "", Some(json!({"model": "model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})));
        assert_eq!(status, 200, "after {misbehave}");
    }
    // Every failed item is counted; panic, hang and the wrong count failed their whole call.
    assert_eq!(metric(&client, &server.url, "hicra_plugin_item_failures_total") - items_before, 4.0);
    assert_eq!(metric(&client, &server.url, "hicra_plugin_call_failures_total") - calls_before, 3.0);
    // Then the same group is scored normally and trains: a finite, updating step.
    let mut last = Value::Null;
    for id in &ids {
        let (status, scored) = call(&client, "POST", url(&format!("/v1/rollouts/{id}/score")), "", Some(json!({})));
        assert_eq!(status, 200, "{scored}");
        last = scored;
    }
    assert_eq!(last["training"]["rewards"][0]["status"], "complete", "{last}");
    let status = wait_for_steps(&server.url, None, 1);
    assert_eq!(status["counters"]["failed_steps"], 0, "{status}");
    let step = last_step(&status);
    assert_eq!(step["updated"], true, "{status}");
    assert!(step["loss"].as_f64().is_some_and(f64::is_finite) && step["grad_norm"].as_f64().is_some_and(f64::is_finite), "{status}");
    let metrics = client.get(url("/metrics")).send().expect("metrics").text().expect("text");
    assert!(metrics.contains("hicra_plugin_item_failures_total"), "{metrics}");
}

#[test]
fn hung_plugin_calls_are_capped_and_a_hung_configure_fails_the_reload() {
    let dir = scratch_dir("plugins-hung");
    let (score_gate, configure_gate) = (dir.join("score-gate"), dir.join("configure-gate"));
    // A name of its own, to find this server's library copies.
    let plugin_file = dir.join("libhung_probe.so");
    std::fs::copy(built_plugin("hicra_test_misbehaving"), &plugin_file).expect("copy plugin");
    let config = dir.join("serve.toml");
    let toml = format!(
        "plugins = [{:?}]\nadmin_key = \"admin\"\nmax_context = 128\nplugin_timeout_ms = 2000\n\n[plugin_config.misbehaving]\nmode = \"per_item\"\nblock_configure_while = {:?}\n",
        plugin_file, configure_gate
    );
    std::fs::write(&config, toml).expect("config");
    let model = tiny_model_file();
    let server = start_server(&[OsString::from("--config"), config.into(), "--model".into(), model.into()]);
    let client = common::http_client();
    let url = |path: &str| format!("{}{path}", server.url);
    let (_, listed) = call(&client, "GET", url("/admin/plugins"), "admin", None);
    let (generation, cap) = (listed["plugins"][0]["generation"].clone(), listed["max_hung_calls"].as_u64().expect("cap") as usize);
    let (_, body) = call(&client, "POST", url("/v1/chat/completions"), "", Some(json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})));
    let score_url = url(&format!("/v1/rollouts/{}/score", body["choices"][0]["hicra"]["rollout_id"].as_str().expect("id")));
    let failures_before = metric(&client, &server.url, "hicra_plugin_item_failures_total");

    // As many calls as the cap hang at once: each times out and leaves its thread, counted.
    std::fs::write(&score_gate, b"").expect("gate");
    let blocked = json!({"metadata": {"misbehave": "block", "gate": score_gate}});
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..cap).map(|_| scope.spawn(|| call(&common::http_client(), "POST", score_url.clone(), "", Some(blocked.clone())))).collect();
        for handle in calls {
            let (status, failed) = handle.join().expect("thread");
            assert_eq!(status, 400, "{failed}");
            assert!(message(&failed).contains("plugin 'misbehaving': score timed out after 2000 ms"), "{failed}");
        }
    });
    let (_, listed) = call(&client, "GET", url("/admin/plugins"), "admin", None);
    assert_eq!((listed["plugins"][0]["hung_calls"].as_u64(), listed["hung_calls"].as_u64()), (Some(cap as u64), Some(cap as u64)), "{listed}");
    assert_eq!(metric(&client, &server.url, "hicra_plugin_hung_calls"), cap as f64);

    // Further calls fail fast, well under the time-out (the bound leaves room for a loaded
    // machine), and say why.
    for _ in 0..2 {
        let started = Instant::now();
        let (status, refused) = call(&client, "POST", score_url.clone(), "", Some(json!({})));
        assert!(started.elapsed() < Duration::from_millis(1000), "took {:?}", started.elapsed());
        assert_eq!(status, 400, "{refused}");
        let expected = format!("plugin 'misbehaving': {cap} calls are still hung after their time-out; refusing new calls until they return (reload the plugin)");
        assert!(message(&refused).contains(&expected), "{refused}");
    }
    assert_eq!(metric(&client, &server.url, "hicra_plugin_item_failures_total") - failures_before, (cap + 2) as f64);

    // A configure that hangs fails the reload, naming the plugin and the time-out; the serving
    // generation stays.
    std::fs::write(&configure_gate, b"").expect("gate");
    let started = Instant::now();
    let (status, refused) = call(&client, "POST", url("/admin/plugins/reload"), "admin", None);
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert_eq!(status, 400, "{refused}");
    assert!(message(&refused).contains("previous plugins keep serving: plugin 'misbehaving': configure timed out after 2000 ms"), "{refused}");
    let (_, listed) = call(&client, "GET", url("/admin/plugins"), "admin", None);
    assert_eq!(listed["plugins"][0]["generation"], generation, "{listed}");
    assert_eq!(listed["hung_calls"].as_u64(), Some(cap as u64 + 1), "{listed}");

    // Once the hung calls return the counts drop, the plugin serves again and reloads work.
    std::fs::remove_file(&score_gate).expect("open the gate");
    std::fs::remove_file(&configure_gate).expect("open the gate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&client, &server.url, "hicra_plugin_hung_calls") > 0.0 {
        assert!(Instant::now() < deadline, "hung calls never returned");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, scored) = call(&client, "POST", score_url.clone(), "", Some(json!({})));
    assert_eq!(status, 200, "{scored}");
    let (status, reloaded) = call(&client, "POST", url("/admin/plugins/reload"), "admin", None);
    assert_eq!(status, 200, "{reloaded}");
    assert!(reloaded["plugins"][0]["generation"].as_u64() > generation.as_u64(), "{reloaded}");

    // Four loads, two of them failed (a hung configure, then a broken file): no copy is left.
    std::fs::write(&plugin_file, b"not a library").expect("break plugin");
    let (status, refused) = call(&client, "POST", url("/admin/plugins/reload"), "admin", None);
    assert_eq!(status, 400, "{refused}");
    assert_eq!(leftover_copies("libhung_probe"), Vec::<PathBuf>::new());
}
