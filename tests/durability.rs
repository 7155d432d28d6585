//! Durable continual learning: a training server's state folder survives SIGTERM and SIGKILL.
//!
//! - A stop (SIGTERM) writes a last checkpoint; the restarted server serves the same policy
//!   version and the same logprobs, keeps collecting its incomplete groups, and its journal
//!   pages through every rollout. `--adapter DIR --train` starts from a checkpoint's adapter.
//! - SIGKILL at random instants (while decoding, right after rewards complete groups so a step
//!   runs, and while a checkpoint is being written, which `HICRA_TEST_SLOW_CHECKPOINT_MS`
//!   slows down): every restart starts from a valid checkpoint and serves its logprobs, no
//!   acknowledged reward is lost, and in the journal every rewarded group is trained exactly
//!   once by the steps whose updates the weights kept.

mod common;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{scratch_dir, start_server_env, tiny_model_file, wait_for_training, Server};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const ADMIN: &str = "admin-key";
/// A fixed prompt whose greedy completion's logprobs fingerprint the served weights.
const PROBE: [u32; 4] = [5, 17, 99, 3];

fn trainer_config(tag: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("hicra-durability-{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, "[optim]\nlr = 0.05\n[lora]\nrank = 8\n").expect("write trainer config");
    path
}

/// The tiny test model, or `HICRA_CRASH_MODEL` (scripts/durability.sh measures the default
/// model's recovery time that way).
fn model() -> OsString {
    std::env::var_os("HICRA_CRASH_MODEL").unwrap_or_else(|| tiny_model_file().into())
}

/// The `model` requests name: the served model's name.
fn served_name() -> String {
    std::env::var("HICRA_CRASH_MODEL").unwrap_or_else(|_| "model".into())
}

fn server_args(state: &Path, config: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--model".into(),
        model(),
        "--max-context".into(),
        "160".into(),
        "--train-config".into(),
        config.into(),
        "--state-dir".into(),
        state.into(),
        "--max-staleness".into(),
        "none".into(),
        "--checkpoint-every-s".into(),
        "0".into(),
        "--admin-key".into(),
        ADMIN.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

fn post(client: &Client, url: &str, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().expect("request");
    (response.status().as_u16(), response.json().unwrap_or(Value::Null))
}

fn training(client: &Client, server: &Server) -> Value {
    client.get(format!("{}/v1/training", server.url)).send().expect("training").json().expect("json")
}

/// Greedy logprobs of the probe prompt and the policy version that served them; asks again
/// while a step lands mid-completion (its first and last tokens then differ in version).
fn probe(client: &Client, server: &Server) -> (Vec<f64>, u64) {
    loop {
        let (status, body) = post(client, &format!("{}/v1/completions", server.url), json!({"model": served_name(), "prompt": PROBE, "max_tokens": 8, "temperature": 0, "logprobs": 1}));
        assert_eq!(status, 200, "{body}");
        let hicra = &body["choices"][0]["hicra"];
        if hicra["policy_version_first"] != hicra["policy_version_last"] {
            continue;
        }
        let logprobs = body["choices"][0]["logprobs"]["token_logprobs"].as_array().expect("logprobs").iter().filter_map(Value::as_f64).collect();
        return (logprobs, hicra["policy_version"].as_u64().expect("version"));
    }
}

fn largest_gap(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "different completions: {a:?} vs {b:?}");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Rollout ids of one request with `n` sampled choices (one reward group).
fn sample(client: &Client, server: &Server, n: usize, seed: u64) -> Vec<String> {
    let prompt = [7u32, 11 + (seed % 50) as u32, 13, 2];
    let body = json!({"model": served_name(), "prompt": prompt, "n": n, "temperature": 1.0, "max_tokens": 6, "seed": seed});
    let (status, body) = post(client, &format!("{}/v1/completions", server.url), body);
    assert_eq!(status, 200, "{body}");
    body["choices"].as_array().expect("choices").iter().map(|c| c["hicra"]["rollout_id"].as_str().expect("id").to_string()).collect()
}

/// Rewards `ids` 0, 1, 2, ... (never all equal, so the group trains); returns the group id
/// once the reply acknowledged the group complete.
fn reward_all(client: &Client, server: &Server, ids: &[String]) -> String {
    let rewards: Vec<Value> = ids.iter().enumerate().map(|(i, id)| json!({"rollout_id": id, "reward": i as f64})).collect();
    let (status, reply) = post(client, &format!("{}/v1/rewards", server.url), json!({"rewards": rewards}));
    assert_eq!(status, 200, "{reply}");
    let last = &reply["rewards"][ids.len() - 1];
    assert_eq!(last["status"], "complete", "{reply}");
    last["group_id"].as_str().expect("group id").to_string()
}

fn admin_checkpoint(client: &Client, server: &Server) -> Value {
    let response = client.post(format!("{}/admin/checkpoint", server.url)).bearer_auth(ADMIN).send().expect("checkpoint");
    assert_eq!(response.status().as_u16(), 200);
    response.json().expect("json")
}

/// Labels of the checkpoint folders in `state`.
fn checkpoint_labels(state: &Path) -> Vec<u64> {
    std::fs::read_dir(state)
        .expect("state folder")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("checkpoint-").and_then(|l| l.parse().ok()))
        .collect()
}

/// Folders an interrupted write or deletion leaves behind.
fn leftovers(state: &Path) -> Vec<String> {
    std::fs::read_dir(state)
        .expect("state folder")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-") || n.starts_with(".trash-"))
        .collect()
}

#[test]
fn a_stopped_server_restarts_at_the_same_policy_with_its_groups_and_rollout_log() {
    let state = scratch_dir("durable-stop");
    let config = trainer_config("stop");
    let args = server_args(&state, &config, &[]);
    let client = common::http_client();

    let server = start_server_env(&args, "warn", &[]);
    let mut rewarded = Vec::new();
    for seed in 0..3 {
        let ids = sample(&client, &server, 2, seed);
        reward_all(&client, &server, &ids);
        rewarded.extend(ids);
    }
    wait_for_training(&server.url, None, "3 updates", |s| s["policy_version"] == 3);
    // One group is left half rewarded: it must keep collecting after the restart.
    let half = sample(&client, &server, 2, 9);
    let (status, _) = post(&client, &format!("{}/v1/rollouts/{}/reward", server.url, half[0]), json!({"reward": 1.0}));
    assert_eq!(status, 200);
    let (before, version) = probe(&client, &server);
    assert_eq!(version, 3);
    assert!(server.terminate(), "SIGTERM must stop the server cleanly");

    // The stop wrote a checkpoint of version 3, reachable through the `checkpoint` link.
    let link = std::fs::read_link(state.join("checkpoint")).expect("checkpoint link");
    assert_eq!(link, Path::new("checkpoint-000000003"));
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(state.join("checkpoint/trainer_state.json")).expect("state")).expect("json");
    assert_eq!((saved["policy_version"].as_u64(), saved["step"].as_u64()), (Some(3), Some(3)));
    assert_eq!(saved["config"]["optim"]["lr"], 0.05);

    let server = start_server_env(&args, "warn", &[]);
    let status = training(&client, &server);
    assert_eq!(status["policy_version"], 3);
    assert_eq!(status["checkpoint"]["last"]["reason"], "restored");
    assert_eq!(status["pending_groups"], 1, "{status}");
    assert_eq!(status["counters"]["rewards"], 7);
    let (after, version) = probe(&client, &server);
    assert_eq!(version, 3);
    let gap = largest_gap(&before, &after);
    assert!(gap <= 1e-6, "logprobs moved by {gap} across the restart: {before:?} vs {after:?}");

    // The sibling was served by the previous process; the journal still has it.
    let (status, reply) = post(&client, &format!("{}/v1/rollouts/{}/reward", server.url, half[1]), json!({"reward": 0.0}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["rewards"][0]["status"], "complete");
    wait_for_training(&server.url, None, "the recovered group's step", |s| s["policy_version"] == 4);
    let response = client.get(format!("{}/v1/rollouts/{}", server.url, rewarded[0])).send().expect("rollout");
    assert_eq!(response.status().as_u16(), 200, "a rollout served before the restart is still found");
    assert_eq!(response.json::<Value>().expect("json")["reward"], 0.0);

    // The rollout log pages through everything served, in order, exactly once.
    let mut seen = Vec::new();
    let mut after_seq = 0i64;
    loop {
        let page: Value = client.get(format!("{}/v1/rollouts?after={after_seq}&limit=3", server.url)).send().expect("page").json().expect("json");
        let data = page["data"].as_array().expect("data");
        for item in data {
            let seq = item["seq"].as_i64().expect("seq");
            assert!(seq > after_seq, "pages are ordered");
            after_seq = seq;
            seen.push(item.clone());
        }
        if !page["has_more"].as_bool().expect("has_more") {
            break;
        }
    }
    let served_ids: Vec<&str> = seen.iter().filter_map(|r| r["id"].as_str()).collect();
    for id in rewarded.iter().chain(&half) {
        assert!(served_ids.contains(&id.as_str()), "{id} missing from the rollout log");
    }
    let rewarded_page: Value = client.get(format!("{}/v1/rollouts?rewarded=true&limit=1000", server.url)).send().expect("page").json().expect("json");
    let rewarded_rows = rewarded_page["data"].as_array().expect("data");
    assert_eq!(rewarded_rows.len(), 8);
    assert!(rewarded_rows.iter().all(|r| r["group_state"] == "trained" && r["advantages"].as_array().is_some_and(|a| !a.is_empty())), "{rewarded_page}");
    let (status, _) = post(&client, &format!("{}/v1/rollouts/{}/reward", server.url, rewarded[0]), json!({"reward": 1.0}));
    assert_eq!(status, 409, "a reward from before the restart still counts as given");
    let response = client.get(format!("{}/v1/rollouts?limit=0", server.url)).send().expect("page");
    assert_eq!(response.status().as_u16(), 400);
    let (trained, version) = probe(&client, &server);
    assert_eq!(version, 4);
    assert!(server.terminate());

    // `hicra analyze` reads the journal directly.
    let out = state.join("analysis");
    let run = common::hicra(&["analyze", state.to_str().expect("utf-8 path"), "--out", out.to_str().expect("utf-8 path")]);
    assert!(run.success, "{}", run.stderr);
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    assert!(summary["steps"].as_array().is_some_and(|s| s.len() >= 2), "{summary}");

    // A state folder of another base model is refused, not loaded because shapes happen to fit.
    let other = scratch_dir("durable-other-model");
    let copied = other.join("checkpoint-000000004");
    std::fs::create_dir_all(&copied).expect("copy");
    for file in ["adapter_config.json", "adapter_model.safetensors", "trainer_state.safetensors"] {
        std::fs::copy(state.join("checkpoint-000000004").join(file), copied.join(file)).expect("copy");
    }
    let mut saved: Value = serde_json::from_str(&std::fs::read_to_string(state.join("checkpoint-000000004/trainer_state.json")).expect("state")).expect("json");
    saved["base_model"] = json!("another-model");
    std::fs::write(copied.join("trainer_state.json"), saved.to_string()).expect("write");
    let refused: Vec<String> = server_args(&other, &config, &[]).iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut command = vec!["serve", "--device", "cpu", "--port", "0"];
    command.extend(refused.iter().map(String::as_str));
    let run = common::hicra(&command);
    assert!(!run.success && run.stderr.contains("another-model"), "{}", run.stderr);

    // A checkpoint is a PEFT adapter: `--adapter DIR --train` serves it and trains on from it
    // (policy version 0, fresh optimizer) in a new state folder.
    let adapter = state.join("checkpoint-000000004");
    let fresh = scratch_dir("durable-adapter");
    let adapter_args = server_args(&fresh, &config, &["--adapter", adapter.to_str().expect("utf-8 path")]);
    let server = start_server_env(&adapter_args, "warn", &[]);
    let (served, version) = probe(&client, &server);
    assert_eq!(version, 0);
    let gap = largest_gap(&trained, &served);
    assert!(gap <= 1e-6, "the adapter serves what trained it: gap {gap}");
    let ids = sample(&client, &server, 2, 1);
    reward_all(&client, &server, &ids);
    wait_for_training(&server.url, None, "a step from the adapter", |s| s["policy_version"] == 1);
    assert!(server.terminate());

    // A damaged newest checkpoint (a disk error, not a crash: crashes cannot produce one) is
    // moved aside and the previous one is loaded.
    std::fs::write(state.join("checkpoint-000000004/adapter_model.safetensors"), b"not a safetensors file").expect("damage");
    let server = start_server_env(&args, "warn", &[]);
    assert_eq!(training(&client, &server)["policy_version"], 3);
    assert!(state.join("damaged-checkpoint-000000004").is_dir());
    assert!(server.terminate());

    // Settings that cannot be a duration are refused by name.
    let unused = scratch_dir("durable-bad-flag");
    let run = common::hicra(&["serve", "--device", "cpu", "--port", "0", "--train", "--state-dir", unused.to_str().expect("utf-8 path"), "--checkpoint-every-s", "1e300"]);
    assert!(!run.success && run.stderr.contains("--checkpoint-every-s"), "{}", run.stderr);
}

/// The optimizer state survives a stop: a server stopped and restarted between steps, fed the
/// same seeded requests and rewards, ends with the same weights as one that never stopped
/// (AdamW's moments shape every step after the first).
#[test]
fn a_restart_between_steps_trains_exactly_like_an_uninterrupted_server() {
    let config = trainer_config("same");
    let client = common::http_client();
    let run = |tag: &str, restart_before: Option<u64>| {
        let state = scratch_dir(tag);
        let args = server_args(&state, &config, &[]);
        let mut server = start_server_env(&args, "warn", &[]);
        for group in 0..4u64 {
            if restart_before == Some(group) {
                assert!(server.terminate());
                server = start_server_env(&args, "warn", &[]);
                assert_eq!(training(&client, &server)["policy_version"], group);
            }
            let ids = sample(&client, &server, 2, 100 + group);
            reward_all(&client, &server, &ids);
            wait_for_training(&server.url, None, "the group's step", |s| s["policy_version"] == group + 1);
        }
        let (logprobs, version) = probe(&client, &server);
        assert_eq!(version, 4);
        assert!(server.terminate());
        logprobs
    };
    let straight = run("durable-straight", None);
    let restarted = run("durable-restarted", Some(2));
    let gap = largest_gap(&straight, &restarted);
    assert!(gap <= 1e-6, "a restart changed training: {straight:?} vs {restarted:?}");
}

/// The kill schedule, reproducible from the seed the test prints.
struct Random(u64);

impl Random {
    fn millis(&mut self, below: u64) -> Duration {
        Duration::from_millis(hicra_core::random::splitmix(&mut self.0) % below.max(1))
    }
}

/// What the crash test measured (README's durability table).
#[derive(Debug, Default, serde::Serialize)]
struct Figures {
    model: String,
    seed: u64,
    kills: usize,
    kills_while_decoding: usize,
    kills_after_rewards: usize,
    kills_while_checkpointing: usize,
    restarts: usize,
    groups_acknowledged: usize,
    groups_recovered: u64,
    groups_retrained: u64,
    lost_steps: u64,
    logprob_checks: usize,
    worst_recovery_s: f64,
}

#[test]
fn sigkill_at_random_instants_loses_no_reward_and_trains_every_group_once() {
    const KILLS: usize = 24;
    let seed = std::env::var("HICRA_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("kill schedule seed {seed} (HICRA_CRASH_SEED={seed} repeats it)");
    let mut random = Random(seed);
    let state = scratch_dir("durable-crash");
    let config = trainer_config("crash");
    let args = server_args(&state, &config, &["--checkpoint-every-steps", "1", "--keep-checkpoints", "4"]);
    // Each checkpoint file takes 25 ms more, so a kill lands inside a write often.
    let slow = [("HICRA_TEST_SLOW_CHECKPOINT_MS", "25")];
    let client = Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
    let mut figures = Figures { seed, model: std::env::var("HICRA_CRASH_MODEL").unwrap_or_else(|_| "tiny test model".into()), ..Figures::default() };
    let mut acknowledged: Vec<String> = Vec::new();
    let mut rewards_acknowledged = 0u64;
    let mut durable: HashMap<u64, Vec<f64>> = HashMap::new();
    let mut probed: Option<(u64, Vec<f64>)> = None;
    let mut seeds = 0u64;

    for round in 0..=KILLS {
        // Every checkpoint folder is complete (the kill may have hit a write: only `.tmp-*`
        // can be partial), so the restart must resume from the newest.
        let newest = checkpoint_labels(&state).into_iter().max();
        let started = Instant::now();
        let server = start_server_env(&args, "warn,hicra_core::server::checkpoints=info", &slow);
        figures.worst_recovery_s = figures.worst_recovery_s.max(started.elapsed().as_secs_f64());
        figures.restarts += usize::from(round > 0);
        assert!(leftovers(&state).is_empty(), "round {round}: leftovers not swept: {:?}", leftovers(&state));
        let resumed = server.log_lines().iter().find_map(|l| l.strip_prefix("resumed from ").map(String::from));
        match newest {
            Some(label) => {
                let resumed = resumed.unwrap_or_else(|| panic!("round {round}: did not resume from checkpoint {label}: {:?}", server.log_lines()));
                assert!(resumed.contains(&format!("checkpoint-{label:09} (policy version {label},")), "round {round}: resumed from {resumed}, newest is {label}");
            }
            None => assert!(resumed.is_none(), "round {round}: resumed without a checkpoint"),
        }

        // No acknowledged reward is lost.
        let status = training(&client, &server);
        assert_eq!(status["counters"]["rewards"].as_u64(), Some(rewards_acknowledged), "round {round}: {status}");
        figures.groups_recovered += status["counters"]["recovered_groups"].as_u64().unwrap_or(0);
        figures.groups_retrained += status["counters"]["retrained_groups"].as_u64().unwrap_or(0);

        // It serves exactly what the same (checkpointed) version served before. Recovered
        // groups may already have trained, so the probe's own version is the key.
        let (logprobs, served) = probe(&client, &server);
        match durable.get(&served) {
            Some(reference) => {
                let gap = largest_gap(reference, &logprobs);
                assert!(gap <= 1e-6, "round {round}: version {served} serves logprobs {gap} away from before");
                figures.logprob_checks += 1;
            }
            None => probed = Some((served, logprobs)),
        }
        if round == KILLS {
            break;
        }

        match round % 3 {
            // While decoding: streams in flight, nothing rewarded. First the server settles and
            // checkpoints, and the probe taken then is what the next start must serve.
            0 => {
                wait_for_training(&server.url, None, "recovered groups trained", |s| s["ready_groups"] == 0);
                let saved = admin_checkpoint(&client, &server)["policy_version"].as_u64().expect("version");
                let (logprobs, served) = probe(&client, &server);
                if served == saved && !durable.contains_key(&saved) {
                    probed = Some((served, logprobs));
                }
                let url = server.url.clone();
                std::thread::spawn(move || {
                    let body = json!({"model": served_name(), "prompt": PROBE, "n": 4, "temperature": 1.0, "max_tokens": 120, "stream": true});
                    let _ = common::http_client().post(format!("{url}/v1/completions")).json(&body).send().and_then(|r| r.text());
                });
                std::thread::sleep(Duration::from_millis(20) + random.millis(150));
                figures.kills_while_decoding += 1;
            }
            // Right after rewards complete groups: the step worker is training on them.
            1 => {
                for _ in 0..2 {
                    seeds += 1;
                    let ids = sample(&client, &server, 2 + (seeds % 3) as usize, seeds);
                    acknowledged.push(reward_all(&client, &server, &ids));
                    rewards_acknowledged += ids.len() as u64;
                }
                std::thread::sleep(random.millis(40));
                figures.kills_after_rewards += 1;
            }
            // While a checkpoint is being written (4 files, each 25 ms slower).
            _ => {
                let before = server.log_lines().iter().filter(|l| l.contains("writing checkpoint")).count();
                seeds += 1;
                let ids = sample(&client, &server, 3, seeds);
                acknowledged.push(reward_all(&client, &server, &ids));
                rewards_acknowledged += ids.len() as u64;
                let deadline = Instant::now() + Duration::from_secs(30);
                while server.log_lines().iter().filter(|l| l.contains("writing checkpoint")).count() == before {
                    assert!(Instant::now() < deadline, "no checkpoint started: {:?}", server.log_lines());
                    std::thread::sleep(Duration::from_millis(2));
                }
                std::thread::sleep(random.millis(110));
                figures.kills_while_checkpointing += 1;
            }
        }
        server.kill();
        figures.kills += 1;
        // A probed version is a reference once its weights are in a checkpoint: only then can
        // no restart ever produce a different version of that number.
        if let Some((version, logprobs)) = probed.take() {
            if checkpoint_labels(&state).contains(&version) {
                durable.insert(version, logprobs);
            }
        }
    }

    // The last start trains what is still waiting; a stop checkpoints it.
    let server = start_server_env(&args, "warn", &[]);
    wait_for_training(&server.url, None, "the recovered groups' steps", |s| s["ready_groups"] == 0 && s["pending_groups"] == 0);
    let final_version = admin_checkpoint(&client, &server)["policy_version"].as_u64().expect("version");
    assert!(server.terminate());
    assert!(leftovers(&state).is_empty());

    // The journal's account: every acknowledged group trained, by exactly one step whose update
    // the weights kept; those steps made versions 1..=final, each exactly once.
    let db = rusqlite::Connection::open_with_flags(state.join("journal.sqlite"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("journal opens");
    let mut trained_by: HashMap<String, usize> = HashMap::new();
    let mut versions = Vec::new();
    let mut statement = db.prepare("SELECT policy_version, updated, lost, report FROM steps ORDER BY seq").expect("query");
    let steps = statement
        .query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, bool>(1)?, row.get::<_, bool>(2)?, row.get::<_, String>(3)?)))
        .expect("steps")
        .map(|r| r.expect("row"));
    for (version, updated, lost, report) in steps {
        figures.lost_steps += u64::from(lost);
        if lost || !updated {
            continue;
        }
        versions.push(version as u64);
        let report: Value = serde_json::from_str(&report).expect("report json");
        for group in report["trained_groups"].as_array().expect("trained_groups") {
            *trained_by.entry(group.as_str().expect("id").to_string()).or_default() += 1;
        }
    }
    for group in &acknowledged {
        let states: Vec<String> = db.prepare("SELECT state FROM groups WHERE id = ?1").expect("query").query_map([group], |r| r.get(0)).expect("rows").map(|r| r.expect("row")).collect();
        assert_eq!(states, vec!["trained".to_string()], "group {group}");
        assert_eq!(trained_by.get(group), Some(&1), "group {group} must be trained by exactly one kept step");
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=final_version).collect::<Vec<_>>(), "kept updates must be versions 1..={final_version}, each once");
    figures.groups_acknowledged = acknowledged.len();
    assert!(figures.logprob_checks >= KILLS / 3 - 1, "too few restarts compared logprobs: {figures:?}");
    assert!(figures.groups_retrained > 0 || figures.lost_steps == 0);

    eprintln!("durability figures: {}", serde_json::to_string(&figures).expect("json"));
    if let Ok(path) = std::env::var("HICRA_DURABILITY_REPORT") {
        std::fs::write(&path, serde_json::to_string_pretty(&figures).expect("json")).expect("write report");
    }
}
