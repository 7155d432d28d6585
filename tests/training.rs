//! In-place LoRA training on a real (tiny) checkpoint: the invariants of architecture.md and
//! a learning test for GRPO and HICRA.

use std::path::Path;

use hicra_core::engine::{score_completions, Engine, Generation, GenerationRequest, SamplingParams};
use hicra_core::model::{load_decoder, LoadOptions, ModelSource, Transformer};
use hicra_core::train::credit::CreditScheme;
use hicra_core::train::loss::{self, LossConfig, TrainSample};
use hicra_core::train::optimizer::OptimConfig;
use hicra_core::train::trainer::{GroupMember, RolloutGroup, Trainer, TrainerConfig};

/// libtorch's random generator (LoRA init) is process-wide: tests take turns so each test's
/// draws, and so its outcome, are reproducible.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn tiny_model() -> Transformer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/llama");
    load_decoder(&ModelSource::HfFolder(dir), &LoadOptions::cpu()).expect("tiny llama fixture loads")
}

fn config(credit: CreditScheme, lr: f64) -> TrainerConfig {
    TrainerConfig {
        credit,
        optim: OptimConfig { lr, max_grad_norm: 1.0, ..OptimConfig::default() },
        loss: LossConfig { micro_batch: 8, ..LossConfig::default() },
        ..TrainerConfig::default()
    }
}

const PROMPT: [u32; 5] = [5, 17, 99, 3, 42];

/// Samples `g` completions of `len` tokens of PROMPT with the model as it is now (T = 1).
fn generate(model: &Transformer, g: usize, len: usize, seed: u64) -> Vec<Generation> {
    generate_with(model, &SamplingParams::default(), g, len, seed)
}

/// [`generate`] with `sampling` (its seed is replaced per completion).
fn generate_with(model: &Transformer, sampling: &SamplingParams, g: usize, len: usize, seed: u64) -> Vec<Generation> {
    let requests: Vec<GenerationRequest> = (0..g)
        .map(|i| GenerationRequest {
            prompt_ids: PROMPT.to_vec(),
            sampling: SamplingParams { seed: seed * 1000 + i as u64, ..sampling.clone() },
            max_new_tokens: len,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            top_logprobs: 0,
        })
        .collect();
    Engine::without_tokenizer(model, g, 64).generate(&requests).expect("generate")
}

/// (completion ids, sampling logprobs) of `generate`.
fn sample_group(model: &Transformer, g: usize, len: usize, seed: u64) -> Vec<(Vec<u32>, Vec<f32>)> {
    generate(model, g, len, seed).into_iter().map(|gen| (gen.tokens.iter().map(|t| t.id).collect(), gen.tokens.iter().map(|t| t.sampling_logprob).collect())).collect()
}

/// Largest gap between the trainer's logprobs (before its update) and the samples' recorded ones.
fn logprob_gap(stats: &loss::LossStats, samples: &[TrainSample]) -> f32 {
    stats.new_logprobs.iter().flatten().zip(samples.iter().flat_map(|s| &s.old_logprobs)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max)
}

/// The synthetic task: the share of completion tokens in the lower half of the vocabulary.
fn reward(ids: &[u32]) -> f32 {
    ids.iter().filter(|&&id| id < 160).count() as f32 / ids.len().max(1) as f32
}

fn group(samples: Vec<(Vec<u32>, Vec<f32>)>) -> RolloutGroup {
    RolloutGroup {
        id: "g".into(),
        members: samples
            .into_iter()
            .enumerate()
            .map(|(i, (ids, logprobs))| GroupMember {
                id: format!("member-{i}"),
                prompt_ids: PROMPT.to_vec(),
                sampling: SamplingParams::default(),
                reward: reward(&ids),
                // Synthetic planning tokens: the first two of each completion.
                planning_mask: (0..ids.len()).map(|i| i < 2).collect(),
                completion_ids: ids,
                logprobs,
                entropies: Vec::new(),
                sampled_mask: Vec::new(),
            })
            .collect(),
        advantages: None,
    }
}

#[test]
fn zero_initialised_lora_serves_base_logprobs_and_a_step_changes_only_the_adapters() {
    let _turn = serial();
    let mut model = tiny_model();
    let completion: Vec<u32> = vec![7, 8, 9, 10, 11, 12];
    let before_base = score_completions(&model, &[(&PROMPT, &completion)], 1.0, false).expect("score").remove(0);
    let mut trainer = Trainer::new(&mut model, config(CreditScheme::Grpo { scale_by_std: true }, 1e-2)).expect("attach");
    let with_zero_lora = score_completions(&model, &[(&PROMPT, &completion)], 1.0, true).expect("score").remove(0);
    assert_eq!(before_base, with_zero_lora, "zero-initialised B must leave outputs unchanged");

    let report = trainer.step(&model, &[group(sample_group(&model, 8, 8, 1))]).expect("step");
    assert!(report.updated && report.policy_version == 1, "{report:?}");
    let after_served = score_completions(&model, &[(&PROMPT, &completion)], 1.0, true).expect("score").remove(0);
    let after_base = score_completions(&model, &[(&PROMPT, &completion)], 1.0, false).expect("score").remove(0);
    assert_eq!(before_base, after_base, "base weights must not change");
    let moved = after_served.iter().zip(&before_base).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-4, "served logprobs did not move ({moved})");
}

#[test]
fn ratio_is_one_for_fresh_rollouts_and_equal_groups_are_skipped() {
    let _turn = serial();
    let mut model = tiny_model();
    let mut trainer = Trainer::new(&mut model, config(CreditScheme::default(), 1e-2)).expect("attach");
    // Make B non-zero so the adapters matter, then check sampler and trainer agree exactly.
    trainer.step(&model, &[group(sample_group(&model, 8, 8, 2))]).expect("step");
    let fresh = sample_group(&model, 4, 8, 3);
    let samples: Vec<TrainSample> = fresh
        .iter()
        .map(|(ids, lps)| TrainSample { prompt_ids: PROMPT.to_vec(), completion_ids: ids.clone(), old_logprobs: lps.clone(), advantages: vec![1.0; ids.len()], sampling: SamplingParams::default(), sampled_mask: Vec::new() })
        .collect();
    let stats = loss::accumulate(&model, &samples, &LossConfig::default(), None, 32, 4);
    let gap = logprob_gap(&stats, &samples);
    assert!(gap < 1e-4, "sampler and trainer logprobs differ by {gap}");
    assert_eq!(stats.clipped_tokens, 0);
    // The entropies recorded while sampling are the trainer's own measure of them.
    let recorded: Vec<f32> = generate(&model, 4, 8, 3).iter().flat_map(|g| g.tokens.iter().map(|t| t.entropy)).collect();
    let measured: Vec<f32> = loss::token_entropies(&model, &samples, 4).into_iter().flatten().collect();
    assert_eq!(recorded.len(), measured.len());
    let gap = recorded.iter().zip(&measured).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(gap < 1e-4 && recorded.iter().all(|h| *h > 0.0), "recorded and measured entropies differ by {gap}");
    trainer.zero_grad();

    let equal: Vec<(Vec<u32>, Vec<f32>)> = fresh.iter().map(|(ids, lps)| (vec![7u32; ids.len()], lps.clone())).collect();
    let report = trainer.step(&model, &[group(equal)]).expect("step");
    assert!(!report.updated && report.zero_variance_groups == 1 && report.policy_version == 1, "{report:?}");
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let _turn = serial();
    let mut model = tiny_model();
    let mut trainer = Trainer::new(&mut model, config(CreditScheme::Grpo { scale_by_std: false }, 1e-2)).expect("attach");
    trainer.step(&model, &[group(sample_group(&model, 8, 6, 4))]).expect("step makes B non-zero");
    let samples: Vec<TrainSample> = sample_group(&model, 3, 6, 5)
        .into_iter()
        .enumerate()
        .map(|(i, (ids, lps))| TrainSample { prompt_ids: PROMPT.to_vec(), advantages: vec![i as f32 - 1.0; ids.len()], completion_ids: ids, old_logprobs: lps, sampling: SamplingParams::default(), sampled_mask: Vec::new() })
        .collect();
    let params: Vec<_> = trainer.parameters().iter().map(|(_, t)| t.shallow_clone()).collect();
    let config = LossConfig { clip_low: 10.0, clip_high: 10.0, ..LossConfig::default() };
    trainer.zero_grad();
    let base = loss::accumulate(&model, &samples, &config, None, 18, 3).loss;
    // The B of q_proj in layer 0 (index 1: A then B).
    let b = params[1].shallow_clone();
    let grad = b.grad().flatten(0, -1).get(0).double_value(&[]);
    let eps = 1e-2;
    tch::no_grad(|| {
        let flat = b.flatten(0, -1);
        let _ = flat.get(0).g_add_scalar_(eps);
    });
    let bumped = tch::no_grad(|| loss::accumulate(&model, &samples, &config, None, 18, 3)).loss;
    let numeric = (bumped - base) / eps;
    assert!(grad.abs() > 1e-6, "gradient vanished");
    assert!((numeric - grad).abs() < 0.05 * grad.abs().max(1e-3), "analytic {grad} vs finite difference {numeric}");

    // Logits computed a few positions at a time (as long sequences are), and layers recomputed
    // in the backward pass (activation checkpointing), give the same loss and gradients as the
    // plain pass, KL and entropy terms included.
    let gradients = |chunk: usize, activation_checkpointing: bool| {
        let config = LossConfig { kl_coef: 0.1, entropy_coef: 0.01, logit_chunk_rows: chunk, activation_checkpointing, ..config.clone() };
        trainer.zero_grad();
        let stats = loss::accumulate(&model, &samples, &config, None, 18, 3);
        let grads = tch::Tensor::cat(&params.iter().map(|p| p.grad().reshape([-1])).collect::<Vec<_>>(), 0).copy();
        (stats.loss, stats.kl_sum, grads)
    };
    let whole = gradients(10_000, false);
    let scale = whole.2.abs().max().double_value(&[]);
    assert!(scale > 1e-6, "no gradient");
    for (label, other) in [("chunked logits", gradients(4, false)), ("activation checkpointing", gradients(4, true))] {
        assert!((whole.0 - other.0).abs() < 1e-6 && (whole.1 - other.1).abs() < 1e-6, "{label}: {:?} vs {:?}", (whole.0, whole.1), (other.0, other.1));
        let diff = (&whole.2 - &other.2).abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * scale, "{label}: gradients differ by {diff} (largest {scale})");
    }
}

fn learn(credit: CreditScheme) -> (f32, f32) {
    let mut model = tiny_model();
    let mut trainer = Trainer::new(&mut model, config(credit, 2e-2)).expect("attach");
    let mean = |g: &RolloutGroup| g.members.iter().map(|m| m.reward).sum::<f32>() / g.members.len() as f32;
    let first = mean(&group(sample_group(&model, 16, 8, 100)));
    for step in 0..25 {
        let groups: Vec<RolloutGroup> = (0..2).map(|k| group(sample_group(&model, 8, 8, 200 + step * 2 + k))).collect();
        trainer.step(&model, &groups).expect("step");
    }
    let last = mean(&group(sample_group(&model, 16, 8, 999)));
    (first, last)
}

#[test]
fn reward_rises_under_grpo_hicra_and_entropy_gated_hicra() {
    let _turn = serial();
    for credit in [
        CreditScheme::Grpo { scale_by_std: true },
        CreditScheme::default(),
        CreditScheme::EntropyGated { alpha: 0.2, entropy_quantile: 0.3, scale_by_std: true },
    ] {
        let (first, last) = learn(credit);
        eprintln!("{}: mean reward {first:.3} -> {last:.3}", credit.name());
        assert!(last > first + 0.25, "{}: reward {first} -> {last}", credit.name());
    }
}

#[test]
fn kl_to_the_base_policy_is_zero_before_training_and_positive_after() {
    let _turn = serial();
    let mut model = tiny_model();
    let mut trainer = Trainer::new(&mut model, config(CreditScheme::default(), 2e-2)).expect("attach");
    let samples = |model: &Transformer| -> Vec<TrainSample> {
        sample_group(model, 4, 6, 7)
            .into_iter()
            .map(|(ids, lps)| TrainSample { prompt_ids: PROMPT.to_vec(), advantages: vec![0.5; ids.len()], completion_ids: ids, old_logprobs: lps, sampling: SamplingParams::default(), sampled_mask: Vec::new() })
            .collect()
    };
    let with_kl = LossConfig { kl_coef: 0.1, entropy_coef: 0.01, ..LossConfig::default() };
    let before = tch::no_grad(|| loss::accumulate(&model, &samples(&model), &with_kl, None, 24, 4));
    assert!(before.kl_sum.abs() < 1e-6, "zero-initialised adapters: KL {}", before.kl_sum);
    for step in 0..3 {
        trainer.step(&model, &[group(sample_group(&model, 8, 8, 50 + step))]).expect("step");
    }
    trainer.zero_grad();
    let after = tch::no_grad(|| loss::accumulate(&model, &samples(&model), &with_kl, None, 24, 4));
    assert!(after.kl_sum > 1e-6, "trained adapters: KL {}", after.kl_sum);
    assert!(after.loss.is_finite() && after.entropies.iter().flatten().all(|h| *h >= 0.0));
}

#[test]
fn truncated_sampling_is_trained_against_the_distribution_it_was_drawn_from() {
    let _turn = serial();
    let mut model = tiny_model();
    let mut trainer = Trainer::new(&mut model, config(CreditScheme::default(), 1e-2)).expect("attach");
    trainer.step(&model, &[group(sample_group(&model, 8, 8, 2))]).expect("step makes B non-zero");
    let sampling = SamplingParams { temperature: 0.8, top_p: 0.6, top_k: 12, seed: 0, ..SamplingParams::default() };
    let generations = generate_with(&model, &sampling, 6, 8, 9);
    let samples: Vec<TrainSample> = generations.iter().map(|g| TrainSample::from_generation(&PROMPT, g, &sampling, 1.0)).collect();
    // The truncation is real: the behaviour logprobs are above the untruncated ones.
    let lifted = generations.iter().flat_map(|g| &g.tokens).filter(|t| t.sampling_logprob > t.logprob + 1e-3).count();
    assert!(lifted > 0, "top-k/top-p should renormalise some draws");
    let stats = loss::accumulate(&model, &samples, &LossConfig::default(), None, 48, 6);
    let gap = logprob_gap(&stats, &samples);
    assert!(gap < 1e-4, "trainer and sampler disagree on the truncated distribution by {gap}");
    assert_eq!(stats.clipped_tokens, 0);
    trainer.zero_grad();
    // Greedy members are refused on their own, and the rest of the step trains.
    let mut greedy = group(sample_group(&model, 4, 6, 8));
    greedy.id = "greedy".into();
    greedy.members.iter_mut().for_each(|m| m.sampling = SamplingParams::greedy());
    let report = trainer.step(&model, &[greedy, group(sample_group(&model, 8, 6, 9))]).expect("step");
    assert!(report.updated && report.trained_groups == vec!["g".to_string()], "{report:?}");
    assert!(report.rejected_groups.len() == 1 && report.rejected_groups[0].reason.contains("greedy"), "{report:?}");
}
