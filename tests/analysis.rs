//! `hicra analyze` on real runs: the offline loop logs its rollouts and the analysis replayed
//! from that log equals what the loop measured live (one code path); a training server's
//! `--rollout-log` is analysed the same way.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use hicra_core::model::{load, LoadOptions};
use hicra_core::train::data::DataConfig;
use hicra_core::train::run::{RewardKind, Run, RunConfig};
use serde_json::{json, Value};

fn scratch(tag: &str) -> PathBuf {
    common::scratch_dir(&format!("analysis-{tag}"))
}

fn analyze(args: &[&Path]) -> Vec<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_hicra")).arg("analyze").args(args).output().expect("hicra runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(String::from).collect()
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).expect("read").lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}

#[test]
fn the_offline_loop_logs_rollouts_and_the_replayed_analysis_equals_the_live_one() {
    let dir = scratch("offline");
    let mut config = RunConfig {
        model: common::tiny_model_file().to_string_lossy().into_owned(),
        steps: 2,
        prompts_per_step: 2,
        group_size: 4,
        max_new_tokens: 6,
        data: DataConfig::Arithmetic { count: 20, max_operand: 9, seed: 1 },
        reward: RewardKind::MathLastNumber,
        output_dir: dir.clone(),
        ..RunConfig::default()
    };
    config.trainer.lora.rank = 4;
    let loaded = load(&config.model, &LoadOptions::cpu()).expect("tiny model loads");
    let mut run = Run::new(config, loaded).expect("run set up");
    // Rewards that vary: the share of letters in the completion.
    run.set_reward_fn(|completion, _| completion.chars().filter(char::is_ascii_alphabetic).count() as f32 / completion.chars().count().max(1) as f32);
    run.run(0, |_| {}).expect("run");

    let rollouts = read_jsonl(&dir.join("rollouts.jsonl"));
    assert_eq!(rollouts.len(), 2 * 2 * 4, "every sampled completion is logged");
    assert!(rollouts.iter().all(|r| r["pieces"].as_array().map(Vec::len) == r["entropies"].as_array().map(Vec::len)));

    let written = analyze(&[&dir]);
    for chart in ["token_entropy.png", "relative_perplexity.png", "semantic_entropy.png", "response_length.png", "accuracy.png"] {
        assert!(written.iter().any(|w| w.ends_with(chart)), "{chart} missing from {written:?}");
    }
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("analysis/summary.json")).expect("summary")).expect("json");
    let steps = summary["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["relative_perplexity_execution"], 1.0);
    // The last step evaluated on held-out prompts: metrics.jsonl's evaluation joins it.
    assert!(steps[1]["eval_pass1"].is_number() && steps[1]["eval_pass_k"].is_number(), "{}", steps[1]);
    let live = read_jsonl(&dir.join("metrics.jsonl"));
    for (step, (replayed, live)) in steps.iter().zip(&live).enumerate() {
        for key in ["rollouts", "accuracy", "pass_at_k", "sampled_length", "sampled_entropy_execution", "perplexity_execution", "semantic_entropy", "strategic_grams"] {
            assert_eq!(replayed[key], live[key], "{key}: replayed {} vs live {}", replayed[key], live[key]);
        }
        // Both must also equal numbers computed here from the raw log, by other code.
        let records: Vec<&Value> = rollouts.iter().filter(|r| r["step"] == step as u64).collect();
        let expected = independent_analysis(&records);
        for (key, want) in expected {
            let got = live[key].as_f64().unwrap_or(f64::NAN);
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "step {step} {key}: analysis {got} vs independent {want}");
        }
    }
    // A broken log is refused with its line.
    std::fs::write(dir.join("broken.jsonl"), "{\"step\": 1}\n").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_hicra")).arg("analyze").arg(dir.join("broken.jsonl")).output().expect("hicra runs");
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("broken.jsonl:1"));
}

/// Step metrics recomputed from logged records with this file's own arithmetic: counts,
/// accuracy and pass@k from rewards, and execution-token entropy and perplexity with the
/// planning tokens found by the tests' independent Strategic-Gram matcher.
fn independent_analysis(records: &[&Value]) -> Vec<(&'static str, f64)> {
    let floats = |v: &Value| v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<f64>>()).unwrap_or_default();
    let (mut tokens, mut correct) = (0usize, 0usize);
    let mut groups: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let (mut entropy_sum, mut logprob_sum, mut execution) = (0.0f64, 0.0f64, 0usize);
    for record in records {
        let pieces: Vec<String> = record["pieces"].as_array().expect("pieces").iter().map(|p| p.as_str().unwrap_or("").to_string()).collect();
        let is_correct = record["reward"].as_f64().unwrap_or(0.0) >= 1.0;
        correct += is_correct as usize;
        *groups.entry(record["group"].as_str().unwrap_or("").to_string()).or_default() |= is_correct;
        tokens += pieces.len();
        let planning = common::strategic_gram_tokens(&pieces);
        for ((h, lp), p) in floats(&record["entropies"]).iter().zip(floats(&record["logprobs"])).zip(planning) {
            if !p {
                entropy_sum += h;
                logprob_sum += lp;
                execution += 1;
            }
        }
    }
    let n = records.len() as f64;
    vec![
        ("rollouts", n),
        ("accuracy", correct as f64 / n),
        ("pass_at_k", groups.values().filter(|&&c| c).count() as f64 / groups.len() as f64),
        ("sampled_length", tokens as f64 / n),
        ("sampled_entropy_execution", entropy_sum / execution as f64),
        ("perplexity_execution", (-logprob_sum / execution as f64).exp()),
    ]
}

#[test]
fn a_training_server_logs_each_steps_rollouts_for_analysis() {
    let dir = scratch("online");
    let log = dir.join("rollouts.jsonl");
    let server = common::start_server(&[OsString::from("--train"), "--max-context".into(), "128".into(), "--rollout-log".into(), log.clone().into(), "--model".into(), common::tiny_model_file().into()]);
    let client = common::http_client();
    let body: Value = client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "n": 4, "temperature": 1.0, "max_tokens": 8, "seed": 5}))
        .send()
        .expect("chat")
        .json()
        .expect("json");
    let rewards: Vec<Value> = body["choices"].as_array().expect("choices").iter().enumerate().map(|(i, c)| json!({"rollout_id": c["hicra"]["rollout_id"], "reward": (i % 2) as f64})).collect();
    let reply: Value = client.post(format!("{}/v1/rewards", server.url)).json(&json!({"rewards": rewards})).send().expect("rewards").json().expect("json");
    assert_eq!(reply["groups_completed"], 1, "{reply}");
    assert_eq!(common::last_step(&common::wait_for_steps(&server.url, None, 1))["updated"], true);
    let logged = read_jsonl(&log);
    assert_eq!(logged.len(), 4);
    assert!(logged.iter().all(|r| r["step"] == 0 && r["policy_version_first"] == 0), "sampled by policy version 0");
    assert!(logged.iter().all(|r| r["advantages"].as_array().map(Vec::len) == r["pieces"].as_array().map(Vec::len)), "each token's advantage is logged");
    let metrics = client.get(format!("{}/metrics", server.url)).send().expect("metrics").text().expect("text");
    assert!(metrics.contains("hicra_train_pass_at_k 1"), "{metrics}");
    let out = dir.join("analysis");
    analyze(&[&log, Path::new("--out"), &out]);
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    assert_eq!(summary["steps"][0]["rollouts"], 4);
    assert_eq!(summary["steps"][0]["accuracy"], 0.5);
}
