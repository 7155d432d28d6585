//! Data-parallel replicas over Gloo on loopback, as real processes of the `hicra` binary:
//! `hicra train --nproc 2` trains the adapter a single process trains on the union of the
//! same groups, with bit-identical adapters on both ranks; a killed rank is reported by its
//! peer, which saves its adapters.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;

/// The shared tiny run (`tests/fixtures/tiny-run.toml`) for `steps` steps, written to `dir`.
fn write_config(dir: &Path, steps: u64) -> PathBuf {
    let text = include_str!("fixtures/tiny-run.toml")
        .replace("MODEL", &common::tiny_model_file().display().to_string())
        .replace("STEPS", &steps.to_string())
        .replace("OUTPUT_DIR", &dir.join("out").display().to_string());
    let path = dir.join("run.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

fn metrics(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).expect("metrics line is JSON")).collect()
}

/// The adapter tensors of the checkpoint in `out`.
fn adapters(out: &Path) -> Vec<(String, Tensor)> {
    let file = out.join("checkpoint/adapter_model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn two_replicas_train_what_one_process_trains_on_the_union_of_their_groups() {
    let steps = 3;
    let single_dir = common::scratch_dir("dp-single");
    let single = common::hicra(&["train", "--device", "cpu", "--config", write_config(&single_dir, steps).to_str().unwrap_or_default()]);
    assert!(single.success, "single process failed:\n{}", single.stderr);

    let pair_dir = common::scratch_dir("dp-pair");
    let pair = common::hicra(&["train", "--device", "cpu", "--nproc", "2", "--config", write_config(&pair_dir, steps).to_str().unwrap_or_default()]);
    assert!(pair.success, "two replicas failed:\n{}", pair.stderr);

    let alone = metrics(&single_dir.join("out/metrics.jsonl"));
    let rank0 = metrics(&pair_dir.join("out/metrics.jsonl"));
    let rank1 = metrics(&pair_dir.join("out/rank-1/metrics.jsonl"));
    assert_eq!((alone.len(), rank0.len(), rank1.len()), (steps as usize, steps as usize, steps as usize));
    for (step, ((a, r0), r1)) in alone.iter().zip(&rank0).zip(&rank1).enumerate() {
        assert_eq!(a["updated"], true, "step {step} must update for the comparison to mean anything");
        assert_eq!(r0["updated"], true, "rank 0 step {step}");
        assert_ne!(r0["adapter_hash"], 0, "step {step}: replicas report their adapters' hash");
        assert_eq!(r0["adapter_hash"], r1["adapter_hash"], "step {step}: the replicas' adapters differ");
        // Each replica sampled half the prompts; together, the single process's groups.
        assert_eq!(r0["tokens"], a["tokens"], "step {step}: the replicas trained on other tokens than the single process");
        assert_eq!(r0["tokens"], r1["tokens"], "step {step}: the replicas disagree on the step's tokens");
    }

    let (expected, got) = (adapters(&single_dir.join("out")), adapters(&pair_dir.join("out")));
    assert_eq!(expected.len(), got.len());
    let moved: f64 = expected.iter().filter(|(n, _)| n.contains("lora_B")).map(|(_, t)| t.abs().sum(tch::Kind::Double).double_value(&[])).sum();
    assert!(moved > 0.0, "training must have moved the adapters");
    for ((name, a), (other, b)) in expected.iter().zip(&got) {
        assert_eq!(name, other);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{name}: two replicas differ from one process by {diff}");
    }
    assert!(!pair_dir.join("out/rank-1/checkpoint").exists(), "only rank 0 writes checkpoints");
}

#[test]
fn a_killed_replica_is_reported_and_its_peer_saves_its_adapters() {
    let dir = common::scratch_dir("dp-killed");
    let config = write_config(&dir, 1000);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
    let spawn = |rank: usize| {
        Command::new(env!("CARGO_BIN_EXE_hicra"))
            .args(["train", "--device", "cpu", "--dist-timeout", "120", "--config"])
            .arg(&config)
            .envs([("RANK", rank.to_string()), ("WORLD_SIZE", "2".into()), ("MASTER_ADDR", "127.0.0.1".into()), ("MASTER_PORT", port.to_string())])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("replica starts")
    };
    let survivor = spawn(0);
    let mut victim = spawn(1);
    // Wait until the pair has taken two steps together, then kill rank 1 outright.
    let rank1_metrics = dir.join("out/rank-1/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&rank1_metrics).map(|t| t.lines().count()).unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "the replicas took no two steps in 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = victim.kill();
    let _ = victim.wait();
    let killed_at = Instant::now();

    let out = survivor.wait_with_output().expect("survivor exits");
    let waited = killed_at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the survivor must fail the run, not train on alone:\n{stderr}");
    assert!(waited < Duration::from_secs(60), "the lost peer took {waited:?} to notice (time-out 120 s)");
    assert!(stderr.contains("a peer lost") || stderr.contains("replica was lost"), "the survivor must say a peer was lost:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let saved = dir.join("out/checkpoint/adapter_model.safetensors");
    assert!(saved.exists(), "the survivor must save its adapters:\n{stderr}");
    // The saved state continues after the last step both took: the one rank 0 logged last.
    let trained = metrics(&dir.join("out/metrics.jsonl"));
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out/checkpoint/trainer_state.json")).unwrap_or_default()).unwrap_or_default();
    assert!(trained.len() >= 2, "rank 0 logged {} steps", trained.len());
    assert_eq!(state["extra"]["next_step"].as_u64(), Some(trained.len() as u64), "the checkpoint must continue after the last logged step");
}

mod serving {
    use super::common::{self, last_step, Server};
    use reqwest::blocking::Client;
    use serde_json::{json, Value};
    use std::time::{Duration, Instant};

    /// Two `hicra serve --train` replicas of the tiny model (ranks 0 and 1 over loopback),
    /// stepping when they hold two complete groups between them. Started together: each waits
    /// for the other to join before it listens.
    fn start_pair(tag: &str) -> (Server, Server) {
        let config = common::scratch_dir(&format!("dp-serve-{tag}")).join("trainer.toml");
        std::fs::write(&config, "[optim]\nlr = 0.05\n[lora]\nrank = 4\n").expect("trainer config");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port").to_string();
        let model = common::tiny_model_file();
        let start = move |rank: &'static str, config: std::path::PathBuf, model: std::path::PathBuf, port: String| {
            let args = ["--max-context".into(), "128".into(), "--groups-per-step".into(), "2".into(), "--dist-timeout-s".into(), "60".into(), "--admin-key".into(), "adm".into(), "--train-config".into(), config.into_os_string(), "--model".into(), model.into_os_string()];
            let env = [("WORLD_SIZE", "2"), ("RANK", rank), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())];
            common::start_server_env(&args, "warn,hicra_core=info", &env)
        };
        let second = {
            let (config, model, port) = (config.clone(), model.clone(), port.clone());
            std::thread::spawn(move || start("1", config, model, port))
        };
        let first = start("0", config, model, port);
        (first, second.join().expect("rank 1 started"))
    }

    fn post(client: &Client, url: &str, body: Value) -> (u16, Value) {
        let response = client.post(url).json(&body).send().expect("request");
        (response.status().as_u16(), response.json().unwrap_or(Value::Null))
    }

    /// Rollout ids of `n` sampled choices served by `server`.
    fn sample(client: &Client, server: &Server, content: &str, n: usize) -> Vec<String> {
        let body = json!({"model": "model", "messages": [{"role": "user", "content": content}], "n": n, "temperature": 1.0, "max_tokens": 8, "seed": 5});
        let (status, reply) = post(client, &format!("{}/v1/chat/completions", server.url), body);
        assert_eq!(status, 200, "{reply}");
        reply["choices"].as_array().expect("choices").iter().map(|c| c["hicra"]["rollout_id"].as_str().expect("rollout id").to_string()).collect()
    }

    /// One group of two choices sampled on `server`, rewarded 1 and 0 through `rewarded_at`
    /// (which forwards them when they are another replica's); returns their rollout ids.
    fn rewarded_group(client: &Client, server: &Server, rewarded_at: &Server, content: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for (id, reward) in sample(client, server, content, 2).iter().zip([1.0, 0.0]) {
            let (status, reply) = post(client, &format!("{}/v1/rollouts/{id}/reward", rewarded_at.url), json!({"reward": reward}));
            assert_eq!(status, 200, "{reply}");
            ids.push(id.to_string());
        }
        ids
    }

    fn greedy_version(client: &Client, server: &Server) -> u64 {
        let (status, reply) = post(client, &format!("{}/v1/completions", server.url), json!({"model": "model", "prompt": [5, 17, 99], "max_tokens": 3, "temperature": 0}));
        assert_eq!(status, 200, "{reply}");
        reply["choices"][0]["hicra"]["policy_version"].as_u64().expect("policy_version")
    }

    #[test]
    fn replicas_rewarded_separately_take_one_step_together_with_identical_adapters() {
        let (first, second) = start_pair("step");
        let client = common::http_client();
        // One group on each replica: neither holds two, together they do.
        // A batch mixing the replicas' rollouts cannot be recorded as a whole: refused.
        let mixed = [sample(&client, &first, "mixed", 1), sample(&client, &second, "mixed", 1)].concat();
        let batch: Vec<Value> = mixed.iter().map(|id| json!({"rollout_id": id, "reward": 1.0})).collect();
        let (status, reply) = post(&client, &format!("{}/v1/rewards", first.url), json!({"rewards": batch}));
        assert_eq!(status, 400, "{reply}");
        assert!(reply.to_string().contains("replicas [0, 1]"), "{reply}");
        // One group on each replica: neither holds two, together they do. The second group is
        // rewarded through the first replica, which forwards each reward to its owner.
        rewarded_group(&client, &first, &first, "left");
        let ids = rewarded_group(&client, &second, &first, "right");
        assert!(ids.iter().all(|id| id.starts_with("ro-r1-")), "replica 1's ids name it: {ids:?}");
        let statuses: Vec<Value> = [&first, &second].iter().map(|s| common::wait_for_steps(&s.url, None, 1)).collect();
        let steps: Vec<&Value> = statuses.iter().map(last_step).collect();
        for (rank, step) in steps.iter().enumerate() {
            assert_eq!(step["updated"], true, "rank {rank}: {step}");
            assert_eq!(step["trained_groups"].as_array().map(Vec::len), Some(1), "rank {rank} trains its own group: {step}");
            assert_eq!(step["tokens"], steps[0]["tokens"], "the replicas disagree on the step's tokens");
        }
        assert_ne!(steps[0]["adapter_hash"], 0, "replicas report their adapters' hash");
        assert_eq!(steps[0]["adapter_hash"], steps[1]["adapter_hash"], "the replicas' adapters differ after the step");
        assert_eq!((greedy_version(&client, &first), greedy_version(&client, &second)), (1, 1));
        let replicas = &statuses[1]["replicas"];
        assert_eq!((replicas["rank"].as_u64(), replicas["world_size"].as_u64(), replicas["lost"].is_null()), (Some(1), Some(2), true));
    }

    #[test]
    fn a_pause_on_one_replica_holds_both_until_it_resumes() {
        let (first, second) = start_pair("pause");
        let client = common::http_client();
        let admin = |server: &Server, what: &str| {
            let response = client.post(format!("{}/admin/training/{what}", server.url)).bearer_auth("adm").send().expect("admin request");
            assert_eq!(response.status().as_u16(), 200);
            response.json::<Value>().expect("json")
        };
        let paused = admin(&second, "pause");
        assert_eq!((paused["paused"].as_bool(), paused["policy_version"].as_u64()), (Some(true), Some(0)), "{paused}");
        // Enough complete groups between them for a step, on both replicas.
        rewarded_group(&client, &first, &first, "left");
        rewarded_group(&client, &second, &second, "right");
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!((greedy_version(&client, &first), greedy_version(&client, &second)), (0, 0), "no replica may step while one is paused");
        let resumed = admin(&second, "resume");
        assert_eq!(resumed["paused"].as_bool(), Some(false), "{resumed}");
        for server in [&first, &second] {
            common::wait_for_steps(&server.url, None, 1);
        }
        assert_eq!((greedy_version(&client, &first), greedy_version(&client, &second)), (1, 1));
    }

    #[test]
    fn a_killed_replica_is_reported_and_the_survivor_keeps_serving() {
        let (first, second) = start_pair("killed");
        let client = common::http_client();
        second.kill();
        let killed_at = Instant::now();
        let status = common::wait_for_training(&first.url, None, "the lost replica reported", |s| !s["replicas"]["lost"].is_null());
        assert!(killed_at.elapsed() < Duration::from_secs(60), "noticed after {:?} (time-out 60 s)", killed_at.elapsed());
        assert!(status["replicas"]["lost"].as_str().is_some_and(|reason| !reason.is_empty()), "{status}");
        // Still serving, at the policy both had.
        assert_eq!(greedy_version(&client, &first), 0);
        let saved = first.state_dir.join("checkpoint/adapter_model.safetensors");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !saved.exists() {
            assert!(Instant::now() < deadline, "the survivor saved no checkpoint:\n{}", first.log_lines().join("\n"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
