//! The offline loop (`hicra train`) on a tiny real checkpoint: metrics and an atomic PEFT
//! checkpoint are written, and resuming reproduces an uninterrupted run exactly.

mod common;

use std::path::PathBuf;

use hicra_core::model::{load, LoadOptions};
use hicra_core::train::data::DataConfig;
use hicra_core::train::run::{RewardKind, Run, RunConfig};
use hicra_core::train::trainer::TrainerConfig;
use tch::Tensor;

fn config(output_dir: PathBuf, steps: u64) -> RunConfig {
    let model = common::tiny_model_file();
    let mut trainer = TrainerConfig::default();
    trainer.optim.lr = 1e-2;
    trainer.lora.rank = 4;
    // Dropout draws from libtorch's generator: resume must reproduce those draws too.
    trainer.lora.dropout = 0.1;
    RunConfig {
        model: model.to_string_lossy().into_owned(),
        steps,
        prompts_per_step: 2,
        group_size: 4,
        max_new_tokens: 6,
        data: DataConfig::Arithmetic { count: 40, max_operand: 9, seed: 1 },
        reward: RewardKind::MathLastNumber,
        eval_prompts: 2,
        eval_samples: 2,
        output_dir,
        trainer,
        ..RunConfig::default()
    }
}

/// The tiny random model cannot do arithmetic, so rewards must vary some other way for the
/// steps to update: the share of ASCII letters in the completion.
fn letters(completion: &str, _answer: &str) -> f32 {
    completion.chars().filter(char::is_ascii_alphabetic).count() as f32 / completion.chars().count().max(1) as f32
}

fn run(config: RunConfig, resume: bool) -> Vec<(String, Tensor)> {
    let loaded = load(&config.model, &LoadOptions::cpu()).expect("tiny model loads");
    let mut run = Run::new(config, loaded).expect("run set up");
    run.set_reward_fn(letters);
    let start = if resume { run.resume().expect("resume") } else { 0 };
    let metrics = run.run(start, |_| {}).expect("run");
    assert!(metrics.iter().all(|m| m.train.updated), "every step must update for the comparison to mean anything");
    run.trainer().parameters().iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect()
}

/// libtorch's random generator (LoRA init, dropout) is process-wide: tests in this binary
/// take turns so each run's draws are its own.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn scratch(tag: &str) -> PathBuf {
    common::scratch_dir(&format!("offline-{tag}"))
}

#[test]
fn two_steps_resume_two_steps_equals_four_steps() {
    let _turn = serial();
    let straight = scratch("straight");
    let four = run(config(straight.clone(), 4), false);

    let split = scratch("split");
    run(config(split.clone(), 2), false);
    let resumed = run(config(split.clone(), 4), true);

    assert_eq!(four.len(), resumed.len());
    let b_norm: f64 = four.iter().filter(|(n, _)| n.contains("lora_B")).map(|(_, t)| t.abs().sum(tch::Kind::Double).double_value(&[])).sum();
    assert!(b_norm > 0.0, "training must have moved the adapters");
    for ((name, a), (_, b)) in four.iter().zip(&resumed) {
        assert!(a.equal(b), "{name} differs after resume");
    }

    // The checkpoint is PEFT-shaped and complete; no temporary directory is left behind.
    let checkpoint = straight.join("checkpoint");
    let adapter_config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(checkpoint.join("adapter_config.json")).expect("config")).expect("json");
    assert_eq!(adapter_config["peft_type"], "LORA");
    assert_eq!(adapter_config["r"], 4);
    let tensors = Tensor::read_safetensors(checkpoint.join("adapter_model.safetensors")).expect("adapters");
    assert!(tensors.iter().any(|(n, _)| n == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let leftovers: Vec<_> = std::fs::read_dir(&straight).expect("dir").filter_map(Result::ok).map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A fresh model with the checkpoint applied (as `--adapter` does) serves what the trained
    // model serves.
    let mut reloaded = load(&config(straight.clone(), 4).model, &LoadOptions::cpu()).expect("load");
    let lora = hicra_core::model::lora::load_peft(&mut reloaded.model, &checkpoint).expect("load PEFT adapter");
    assert_eq!(lora.rank, 4);
    let mut trained = load(&config(straight.clone(), 4).model, &LoadOptions::cpu()).expect("load");
    hicra_core::model::lora::attach(&mut trained.model, &lora).expect("attach");
    hicra_core::model::lora::load_parameters(&mut trained.model, &four).expect("params");
    let (prompt, completion) = ([5u32, 17, 99, 3], [7u32, 8, 9, 10, 11]);
    let a = hicra_core::engine::score_completions(&reloaded.model, &[(&prompt, &completion)], 1.0, true).expect("score");
    let b = hicra_core::engine::score_completions(&trained.model, &[(&prompt, &completion)], 1.0, true).expect("score");
    let base = hicra_core::engine::score_completions(&trained.model, &[(&prompt, &completion)], 1.0, false).expect("score");
    assert_eq!(a, b);
    assert_ne!(a, base, "the adapter must change what is served");
    eprintln!("checkpoint kept for inspection: {}\nhicra adapter logprobs {a:?}\nhicra base logprobs {base:?}", checkpoint.display());

    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).expect("metrics");
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().all(|l| l["reward_mean"].is_number() && l["semantic_entropy"].is_number() && l["clip_fraction"].is_number()));
    assert!(lines[3]["eval_pass1"].is_number() && lines[3]["eval_pass_k"].is_number());
}

#[test]
fn resume_continues_after_steps_that_did_not_update() {
    let _turn = serial();
    let dir = scratch("flat");
    let start = |steps: u64, resume: bool| {
        let config = config(dir.clone(), steps);
        let loaded = load(&config.model, &LoadOptions::cpu()).expect("tiny model loads");
        let mut run = Run::new(config, loaded).expect("run set up");
        run.set_reward_fn(|_, _| 0.0);
        let from = if resume { run.resume().expect("resume") } else { 0 };
        (from, run.run(from, |_| {}).expect("run"))
    };
    let (_, first) = start(2, false);
    assert!(first.iter().all(|m| !m.train.updated), "equal rewards must not update");
    let (from, second) = start(3, true);
    assert_eq!(from, 2, "resume continues at the next loop step, not at the optimizer step");
    assert_eq!(second.iter().map(|m| m.run_step).collect::<Vec<_>>(), vec![2]);
}

#[test]
fn equal_reward_groups_are_resampled_when_configured() {
    let _turn = serial();
    let mut config = config(scratch("resample"), 1);
    config.resample_equal_groups = 2;
    let loaded = load(&config.model, &LoadOptions::cpu()).expect("tiny model loads");
    let mut run = Run::new(config, loaded).expect("run set up");
    run.set_reward_fn(|_, _| 1.0);
    let metrics = run.run(0, |_| {}).expect("run");
    // Two prompts, both groups flat on every draw: each is drawn again twice, then skipped.
    assert_eq!(metrics[0].resampled_groups, 4);
    assert!(!metrics[0].train.updated);
    assert_eq!(metrics[0].train.zero_variance_groups, 2);
}

#[test]
fn a_reward_plugin_scores_the_offline_loop_and_its_failures_are_masked() {
    let _turn = serial();
    let plugin = common::built_plugin("hicra_test_misbehaving");
    let run_with = |mode: &str| {
        let mut config = config(scratch(mode), 1);
        config.reward_plugin = Some(plugin.clone());
        config.reward_plugin_config = Some(toml::from_str(&format!("mode = \"{mode}\"")).expect("toml"));
        let loaded = load(&config.model, &LoadOptions::cpu()).expect("tiny model loads");
        Run::new(config, loaded).expect("run set up").run(0, |_| {}).expect("run").remove(0)
    };
    // Completion length varies, so rewards do: the step trains on the plugin's scores.
    let scored = run_with("length");
    assert!(scored.train.updated && scored.masked_items == 0, "{scored:?}");
    // NaN scores are item failures: masked out, counted, nothing trained, nothing scored 0.
    let failed = run_with("nan");
    assert_eq!(failed.masked_items, 8);
    assert!(!failed.train.updated && failed.train.groups == 0, "{failed:?}");
}

#[test]
fn detector_and_credit_plugins_shape_the_offline_loop() {
    let _turn = serial();
    let built = common::built_plugin;
    let mut config = config(scratch("step-plugins"), 1);
    config.sg_plugin = Some(built("hicra_example_phrase_detector"));
    config.sg_plugin_config = Some(toml::from_str("phrases = [\"let me check\"]").expect("toml"));
    // The entropy-gated scheme fails without per-token entropies: a group it accepts proves the
    // sampler's entropies reached the plugin.
    config.credit_plugin = Some(built("hicra_credit_schemes"));
    config.credit_plugin_config = Some(toml::from_str("scheme = \"entropy_gated\"").expect("toml"));
    let loaded = load(&config.model, &LoadOptions::cpu()).expect("tiny model loads");
    let mut run = Run::new(config.clone(), loaded).expect("run set up");
    run.set_reward_fn(letters);
    let metrics = run.run(0, |_| {}).expect("run").remove(0);
    assert!(metrics.train.updated, "{metrics:?}");
    assert_eq!((metrics.masked_items, metrics.dropped_groups, metrics.train.groups), (0, 0, 2), "{metrics:?}");

    // A plugin named in the wrong setting is refused before anything runs.
    config.credit_plugin = config.sg_plugin.clone();
    config.credit_plugin_config = config.sg_plugin_config.clone();
    let loaded = load(&config.model, &LoadOptions::cpu()).expect("tiny model loads");
    let err = Run::new(config, loaded).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("expected Credit"), "{err}");
}

/// `hicra train` killed with SIGKILL at random instants (steps, checkpoint writes slowed by the
/// test knob) and resumed each time: every resume works (also after a kill inside the first
/// checkpoint), `metrics.jsonl` and `rollouts.jsonl` hold each step exactly once, no temporary
/// folder is left, and the final adapters equal an uninterrupted run's bit for bit.
#[test]
fn killed_and_resumed_runs_equal_an_uninterrupted_one() {
    let _turn = serial();
    const STEPS: u64 = 16;
    let write_config = |dir: &std::path::Path| {
        let text = format!(
            "model = {model:?}\nsteps = {STEPS}\nprompts_per_step = 2\ngroup_size = 4\nmax_new_tokens = 6\nreward = \"regex\"\nreward_pattern = \"[aeiou]\"\n\
             checkpoint_every = 1\noutput_dir = {dir:?}\n[data]\nkind = \"arithmetic\"\ncount = 40\nmax_operand = 9\nseed = 1\n\
             [trainer.optim]\nlr = 0.01\n[trainer.lora]\nrank = 4\ndropout = 0.1\n",
            model = common::tiny_model_file(),
        );
        let path = dir.join("run.toml");
        std::fs::write(&path, text).expect("write run config");
        path
    };
    let train = |config: &std::path::Path, resume: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hicra"));
        command.args(["train", "--device", "cpu", "--config"]).arg(config).env("RUST_LOG", "warn").env("HICRA_TEST_SLOW_CHECKPOINT_MS", "25");
        if resume {
            command.arg("--resume");
        }
        command.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().expect("hicra train starts")
    };

    let straight = scratch("kill-straight");
    let status = train(&write_config(&straight), false).wait_with_output().expect("run");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));

    let killed = scratch("kill-resumed");
    let config = write_config(&killed);
    let seed = std::env::var("HICRA_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("kill schedule seed {seed} (HICRA_CRASH_SEED={seed} repeats it)");
    let mut random = seed;
    let (mut kills, mut attempt) = (0, 0);
    loop {
        let mut child = train(&config, attempt > 0);
        attempt += 1;
        let draw = hicra_core::random::splitmix(&mut random);
        // The first kill lands early (often inside the first checkpoint); later ones anywhere.
        let delay = if kills == 0 { 150 + draw % 300 } else { 100 + draw % 500 };
        std::thread::sleep(std::time::Duration::from_millis(delay));
        if kills < 5 && child.try_wait().expect("poll").is_none() {
            child.kill().expect("SIGKILL");
            let _ = child.wait();
            kills += 1;
            continue;
        }
        let output = child.wait_with_output().expect("run");
        assert!(output.status.success(), "attempt {attempt} after {kills} kills (seed {seed}): {}", String::from_utf8_lossy(&output.stderr));
        break;
    }
    assert!(kills >= 3, "only {kills} kills landed before the run finished (seed {seed})");

    let steps_of = |file: &str, field: &str| -> Vec<u64> {
        let text = std::fs::read_to_string(killed.join(file)).expect("log");
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).expect("whole JSON lines only")[field].as_u64().expect("step")).collect()
    };
    assert_eq!(steps_of("metrics.jsonl", "run_step"), (0..STEPS).collect::<Vec<_>>(), "each step's metrics exactly once, in order");
    let rollout_steps = steps_of("rollouts.jsonl", "step");
    for step in 0..STEPS {
        assert_eq!(rollout_steps.iter().filter(|&&s| s == step).count(), 8, "step {step}: 2 prompts x 4 samples, once");
    }
    let names: Vec<String> = std::fs::read_dir(&killed).expect("dir").filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp-") && !n.starts_with(".trash-")), "{names:?}");
    assert_eq!(names.iter().filter(|n| n.starts_with("checkpoint-")).count(), 2, "the last 2 checkpoints are kept: {names:?}");
    // Sorted by name: a safetensors file lists its tensors in no particular order.
    let adapters = |dir: &PathBuf| {
        let mut tensors = Tensor::read_safetensors(dir.join("checkpoint/adapter_model.safetensors")).expect("final adapters");
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors
    };
    let (a, b) = (adapters(&straight), adapters(&killed));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{name} differs after {kills} kills and resumes");
    }
}

/// A scripted environment: replies "again" after each answer until `turns` answers, reward =
/// answers seen.
struct Scripted {
    turns: usize,
    answers: usize,
}

impl hicra_core::train::environment::Environment for Scripted {
    fn reply(&mut self, turn: usize, _answer: &str) -> Option<String> {
        self.answers = turn + 1;
        (turn + 1 < self.turns).then(|| "Not quite. Again:".to_string())
    }
    fn reward(&self) -> f32 {
        self.answers as f32
    }
}

/// An offline multi-turn episode is one token sequence: the answers' tokens, spliced as sampled,
/// are exactly the sampled ones, and the environment's replies sit between them as context.
#[test]
fn offline_episodes_are_one_sequence_with_only_the_answers_sampled() {
    let _turn = serial();
    use hicra_core::engine::SamplingParams;
    use hicra_core::tokenizer::chat::ChatMessage;
    use hicra_core::train::episodes::{play, Table};
    let loaded = load(&common::tiny_model_file().to_string_lossy(), &LoadOptions::cpu()).expect("tiny model loads");
    let template = loaded.tokenizer.chat_template().expect("the tiny model has a chat template");
    let table = Table { model: &loaded.model, tokenizer: &loaded.tokenizer, template, max_new_tokens: 5, max_turns: 4 };
    let episodes: Vec<(Vec<ChatMessage>, Box<dyn hicra_core::train::environment::Environment>)> =
        (0..3).map(|i| (vec![ChatMessage::new("user", format!("question {i}"))], Box::new(Scripted { turns: 3, answers: 0 }) as Box<_>)).collect();
    let played = play(&table, episodes, |e, t| SamplingParams { temperature: 1.0, seed: (e * 10 + t) as u64, ..SamplingParams::default() }).expect("play");
    assert_eq!(played.len(), 3);
    for episode in &played {
        assert_eq!(episode.answers.len(), 3);
        assert_eq!(episode.reward, 3.0);
        let n = episode.completion_ids.len();
        assert!(episode.sampled_mask.len() == n && episode.logprobs.len() == n && episode.pieces.len() == n);
        assert!(episode.sampled_mask[0] && episode.sampled_mask[n - 1], "the completion runs from the first answer to the last");
        // Three sampled runs (the answers) with context (the replies) between them.
        let runs = episode.sampled_mask.windows(2).filter(|w| !w[0] && w[1]).count() + 1;
        assert_eq!(runs, 3);
        let context: String = episode.pieces.iter().zip(&episode.sampled_mask).filter(|(_, &s)| !s).map(|(p, _)| p.as_str()).collect();
        assert_eq!(context.matches("Not quite. Again:").count(), 2, "{context:?}");
        assert!(episode.logprobs.iter().zip(&episode.sampled_mask).all(|(&l, &s)| if s { l < 0.0 } else { l == 0.0 }));
    }
}

/// `hicra train` with `[environment] kind = "retry"` trains on multi-turn episodes: steps
/// run, and the trained tokens are the sampled ones only.
#[test]
fn the_offline_loop_trains_on_multi_turn_episodes() {
    let _turn = serial();
    let mut config = config(scratch("episodes"), 2);
    config.environment = Some(hicra_core::train::environment::EnvironmentConfig::Retry { turns: 3, message: "Try again.".into() });
    let loaded = load(&config.model, &LoadOptions::cpu()).expect("tiny model loads");
    let mut run = Run::new(config, loaded).expect("run set up");
    // Right when most of the answer is letters: some episodes end early, some run 3 turns.
    run.set_reward_fn(|completion, _| if letters(completion, "") > 0.5 { 1.0 } else { 0.0 });
    let metrics = run.run(0, |_| {}).expect("run");
    assert_eq!(metrics.len(), 2);
    for m in &metrics {
        // 2 prompts x 4 episodes x at most 3 answers of at most 6 tokens.
        assert!(m.train.tokens <= 2 * 4 * 3 * 6, "{} trained tokens: context was trained", m.train.tokens);
    }
    assert!(metrics.iter().any(|m| m.train.updated), "episode rewards must differ somewhere to train");
}
