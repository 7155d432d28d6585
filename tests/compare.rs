//! `hicra compare` end to end on the tiny model: two arms (GRPO, HICRA) x two seeds, the
//! comparison table, equal compute (the arms of a seed sample the same first step: same
//! prompts, same seeds, same weights), and a second call that skips the finished runs.

mod common;

use std::path::Path;

fn write_sweep(dir: &Path) -> std::path::PathBuf {
    let model = common::tiny_model_file();
    std::fs::write(
        dir.join("run.toml"),
        format!(
            r#"
model = "{model}"
steps = 2
prompts_per_step = 2
group_size = 4
max_new_tokens = 6
eval_every = 1
eval_prompts = 3
eval_samples = 2
eval_before_training = true
reward = "regex"
reward_pattern = "e"

[data]
kind = "word_problems"
count = 40
max_steps = 3
seed = 3

[eval_data]
kind = "word_problems"
count = 3
max_steps = 3
seed = 4

[trainer.optim]
lr = 0.01

[trainer.lora]
rank = 4
dropout = 0.0
"#,
            model = model.display()
        ),
    )
    .expect("run.toml");
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            r#"
base = "run.toml"
output_dir = "{out}"
seeds = [1, 2]

[[arms]]
name = "grpo"
set = {{ "trainer.credit" = {{ scheme = "grpo" }} }}

[[arms]]
name = "hicra"
set = {{ "trainer.credit" = {{ scheme = "hicra", alpha = 0.2 }} }}
"#,
            out = dir.join("out").display()
        ),
    )
    .expect("sweep.toml");
    sweep
}

/// The first step's rollouts of a run, as (group, pieces).
fn first_step_rollouts(run: &Path) -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(run.join("rollouts.jsonl")).unwrap_or_else(|e| panic!("{}: {e}", run.display()));
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("rollout line"))
        .filter(|r| r["step"] == 0)
        .map(|r| (r["group"].as_str().unwrap_or_default().to_string(), r["pieces"].as_array().map(|p| p.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()))
        .collect()
}

#[test]
fn two_arms_two_seeds_compared_at_equal_compute_and_resumed() {
    let dir = common::scratch_dir("compare");
    let sweep = write_sweep(&dir);
    let sweep = sweep.to_str().unwrap_or_default();
    let first = common::hicra(&["compare", "--device", "cpu", "--config", sweep]);
    assert!(first.success, "{}", first.stderr);
    // Not a terminal: progress comes as plain lines, one per step, without escape codes.
    assert!(first.stderr.contains("grpo seed 1 step 2/2: reward"), "{}", first.stderr);
    assert!(!first.stderr.contains('\u{1b}'), "escape codes in a pipe: {}", first.stderr);

    let out = dir.join("out");
    let table = std::fs::read_to_string(out.join("compare.md")).expect("compare.md");
    assert!(table.contains("| grpo | 2 | 2 |") && table.contains("| hicra | 2 | 2 |"), "{table}");
    assert!(table.contains("(baseline)"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).expect("compare.json")).expect("json");
    assert_eq!(json[1]["arm"], "hicra");
    assert_eq!(json[1]["steps"].as_array().map(Vec::len), Some(3), "evaluated before training and after each of the 2 steps");
    assert!(json[1]["final_pass1_vs_baseline"]["mean"].is_number());
    // Before any update every arm is the same model scored on the same held-out prompts with
    // the same sampling seed.
    assert_eq!(json[0]["steps"][0]["step"], 0);
    assert_eq!(json[0]["steps"][0]["pass1"], json[1]["steps"][0]["pass1"], "untrained evaluations differ between arms");
    // ...so it is measured once per seed: the second arm of each seed reuses it.
    assert_eq!(first.stderr.matches("reusing the untrained evaluation").count(), 2, "{}", first.stderr);
    for chart in ["pass1.png", "pass1.svg", "pass_k.png", "pass_k.svg"] {
        assert!(std::fs::metadata(out.join(chart)).map(|m| m.len() > 1000).unwrap_or(false), "{chart} missing");
    }
    let svg = std::fs::read_to_string(out.join("pass1.svg")).expect("svg");
    assert!(svg.contains("grpo (2 seeds)") && svg.contains("hicra (2 seeds)"), "the legend names the arms");

    // Equal compute: before any update the arms of a seed are the same policy on the same
    // prompts with the same sampling seeds, so they sample the same tokens; seeds differ.
    for seed in [1, 2] {
        let grpo = first_step_rollouts(&out.join(format!("grpo/seed-{seed}")));
        let hicra = first_step_rollouts(&out.join(format!("hicra/seed-{seed}")));
        assert_eq!(grpo.len(), 8, "2 prompts x 4 samples");
        assert_eq!(grpo, hicra, "seed {seed}: the arms sampled different first steps");
    }
    assert_ne!(first_step_rollouts(&out.join("grpo/seed-1")), first_step_rollouts(&out.join("grpo/seed-2")));

    let again = common::hicra(&["compare", "--device", "cpu", "--config", sweep]);
    assert!(again.success, "{}", again.stderr);
    assert_eq!(again.stderr.matches("finished earlier, skipped").count(), 4, "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(out.join("compare.md")).expect("compare.md"), table, "the same runs give the same table");
}
