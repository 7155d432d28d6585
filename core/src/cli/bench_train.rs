//! `hicra bench-train`: time of one in-place training step (forward, backward, AdamW on LoRA)
//! on synthetic groups, for comparison with transformers + PEFT doing the same step
//! (`scripts/bench_train_reference.py`, run side by side by `scripts/bench_train.sh`).

use std::time::Instant;

use clap::Args;

use super::{ModelArgs, ShapeArgs};
use crate::train::trainer::{GroupMember, RolloutGroup, Trainer, TrainerConfig};

/// Arguments of `hicra bench-train`.
#[derive(Debug, Args)]
pub(crate) struct BenchTrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Sequences per step (one group).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Completion tokens per sequence (the trained tokens).
    #[arg(long, default_value_t = 64)]
    completion_tokens: usize,
    /// LoRA rank (all seven projections, alpha = 2 x rank).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Sequences per forward/backward pass.
    #[arg(long, default_value_t = 8)]
    micro_batch: usize,
    /// Token positions whose logits are computed at once (0: as many as fit 64 MiB).
    #[arg(long, default_value_t = 0)]
    logit_chunk_rows: usize,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    #[arg(long)]
    activation_checkpointing: bool,
    /// Skip the untimed warm-up step (for steps that take minutes).
    #[arg(long)]
    no_warmup: bool,
    /// Timed steps (after one warm-up step); the mean is reported.
    #[arg(long, default_value_t = 3)]
    steps: usize,
}

/// Runs `hicra bench-train`.
pub(crate) fn run(args: BenchTrainArgs) -> anyhow::Result<()> {
    let mut loaded = args.model.load_for_bench(&args.shape)?;
    let mut config = TrainerConfig::default();
    config.lora.rank = args.rank;
    config.lora.alpha = 2.0 * args.rank as f64;
    config.loss.micro_batch = args.micro_batch;
    config.loss.logit_chunk_rows = args.logit_chunk_rows;
    config.loss.activation_checkpointing = args.activation_checkpointing;
    let mut trainer = Trainer::new(&mut loaded.model, config)?;
    let vocab = loaded.model.config().vocab_size;
    // Deterministic pseudo-random ids; rewards alternate so the group carries signal.
    let id = |i: usize| crate::model::shapes::synthetic_token_id(i as u64, vocab);
    let prompt_ids: Vec<u32> = (0..args.prompt_tokens).map(id).collect();
    let group = RolloutGroup {
        id: "bench".into(),
        members: (0..args.batch)
            .map(|b| GroupMember {
                id: format!("member-{b}"),
                prompt_ids: prompt_ids.clone(),
                sampling: crate::engine::SamplingParams::default(),
                completion_ids: (0..args.completion_tokens).map(|t| id(10_000 + b * 1000 + t)).collect(),
                logprobs: vec![-2.0; args.completion_tokens],
                reward: (b % 2) as f32,
                planning_mask: (0..args.completion_tokens).map(|t| t % 10 == 0).collect(),
                entropies: Vec::new(),
                sampled_mask: Vec::new(),
            })
            .collect(),
        advantages: None,
    };
    if !args.no_warmup {
        trainer.step(&loaded.model, std::slice::from_ref(&group))?;
    }
    let mut rss_mib = vec![resident_mib()];
    let started = Instant::now();
    for _ in 0..args.steps {
        trainer.step(&loaded.model, std::slice::from_ref(&group))?;
        rss_mib.push(resident_mib());
    }
    let step_s = started.elapsed().as_secs_f64() / args.steps.max(1) as f64;
    let tokens = args.batch * args.completion_tokens;
    let result = serde_json::json!({
        "engine": "hicra",
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "rank": args.rank,
        "logit_chunk_rows": args.logit_chunk_rows,
        "activation_checkpointing": args.activation_checkpointing,
        "micro_batch": args.micro_batch,
        "step_seconds": step_s,
        "trained_tokens_per_s": tokens as f64 / step_s,
        "sequence_tokens_per_s": (args.batch * (args.prompt_tokens + args.completion_tokens)) as f64 / step_s,
        "adapter_values": trainer.parameters().iter().map(|(_, t)| t.numel()).sum::<usize>(),
        // Before the first timed step, then after each: flat when steps leak nothing.
        "rss_mib_by_step": rss_mib,
        "peak_rss_mib": peak_resident_mib(),
    });
    println!("{result}");
    Ok(())
}

/// Resident memory now, in MiB (0 where unknown).
fn resident_mib() -> f64 {
    crate::memory::resident_bytes().map_or(0.0, |b| b as f64 / (1024.0 * 1024.0))
}

/// Highest resident memory so far, in MiB (0 where unknown).
fn peak_resident_mib() -> f64 {
    crate::memory::peak_resident_bytes().map_or(0.0, |b| b as f64 / (1024.0 * 1024.0))
}
