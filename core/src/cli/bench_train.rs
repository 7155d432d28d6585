//! `hicra bench-train`: time of one in-place training step (forward, backward, AdamW on LoRA)
//! on synthetic groups, for comparison with transformers + PEFT doing the same step
//! (`scripts/bench_train_reference.py`, run side by side by `scripts/bench_train.sh`).
//!
//! With data-parallel replicas (`--nproc N`, or torchrun's variables) the batch is split
//! across them and each step ends in the gradient all-reduce; rank 0 reports the step time,
//! the share spent in collectives, and the time of the gradient all-reduce alone
//! (`scripts/bench_scaling.sh`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::{ModelArgs, ShapeArgs};
use crate::collective::{ProcessGroup, WorldConfig};
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
    /// Split the batch across this many data-parallel replicas on this machine.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
}

/// Timed all-reduces of the gradient buffer, after the steps.
const ALLREDUCE_REPEATS: usize = 20;

/// Runs `hicra bench-train`.
pub(crate) fn run(mut args: BenchTrainArgs) -> anyhow::Result<()> {
    let world = WorldConfig::from_env()?;
    if args.nproc > 1 {
        anyhow::ensure!(world.is_none(), "--nproc starts its own replicas: do not combine it with WORLD_SIZE");
        return super::replicas::launch(args.nproc, &["bench-train"]);
    }
    crate::model::share_cores_among(world.as_ref().map_or(1, |w| w.local_world_size));
    let (rank, world_size) = world.as_ref().map_or((0, 1), |w| (w.rank, w.world_size));
    anyhow::ensure!(args.batch >= 2 * world_size, "--batch {} leaves some of {world_size} replicas fewer than 2 sequences", args.batch);
    args.model.local_rank = world.as_ref().map_or(0, |w| w.local_rank);
    let mut loaded = args.model.load_for_bench(&args.shape)?;
    let mut config = TrainerConfig::default();
    config.lora.rank = args.rank;
    config.lora.alpha = 2.0 * args.rank as f64;
    config.loss.micro_batch = args.micro_batch;
    config.loss.logit_chunk_rows = args.logit_chunk_rows;
    config.loss.activation_checkpointing = args.activation_checkpointing;
    let mut trainer = Trainer::new(&mut loaded.model, config)?;
    let replicas = match &world {
        Some(world) => {
            let replicas = Arc::new(ProcessGroup::join(world, Duration::from_secs(300))?);
            trainer.join(replicas.clone())?;
            Some(replicas)
        }
        None => None,
    };
    // This replica's share of the batch's sequences.
    let members = (rank * args.batch / world_size)..((rank + 1) * args.batch / world_size);
    let vocab = loaded.model.config().vocab_size;
    // Deterministic pseudo-random ids; rewards alternate so the group carries signal.
    let id = |i: usize| crate::model::shapes::synthetic_token_id(i as u64, vocab);
    let prompt_ids: Vec<u32> = (0..args.prompt_tokens).map(id).collect();
    let group = RolloutGroup {
        id: "bench".into(),
        members: members
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
    let mut collective_s = 0.0;
    // Only rank 0 reports: replicas' bars would interleave.
    let progress = (rank == 0).then(|| super::progress::Progress::new("timed step", 0, args.steps as u64));
    let started = Instant::now();
    for step in 0..args.steps {
        let report = trainer.step(&loaded.model, std::slice::from_ref(&group))?;
        collective_s += report.collective_seconds;
        rss_mib.push(resident_mib());
        if let Some(progress) = &progress {
            progress.reached(step as u64 + 1, &format!("{:.2} s", report.step_seconds));
        }
    }
    if let Some(progress) = progress {
        progress.finish();
    }
    let step_s = started.elapsed().as_secs_f64() / args.steps.max(1) as f64;
    let collective_s = collective_s / args.steps.max(1) as f64;
    let allreduce_s = match &replicas {
        Some(replicas) => gradient_allreduce_seconds(replicas, &trainer)?,
        None => 0.0,
    };
    if rank != 0 {
        return Ok(());
    }
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
        "world_size": world_size,
        "step_seconds": step_s,
        "collective_seconds": collective_s,
        "gradient_allreduce_seconds": allreduce_s,
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

/// Median time of an all-reduce of a buffer the size of the adapters' gradients, alone (no
/// replica waiting for another's backward pass).
fn gradient_allreduce_seconds(group: &ProcessGroup, trainer: &Trainer) -> anyhow::Result<f64> {
    let values: i64 = trainer.parameters().iter().map(|(_, t)| t.numel() as i64).sum();
    let device = trainer.parameters().first().map_or(tch::Device::Cpu, |(_, t)| t.device());
    let mut buffer = tch::Tensor::ones([values], (tch::Kind::Float, device));
    let mut times = Vec::with_capacity(ALLREDUCE_REPEATS);
    for _ in 0..ALLREDUCE_REPEATS + 2 {
        let started = Instant::now();
        group.all_reduce_sum(&mut buffer)?;
        times.push(started.elapsed().as_secs_f64());
    }
    // The first two warm the connections up.
    let mut times = times.split_off(2);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Resident memory now, in MiB (0 where unknown).
fn resident_mib() -> f64 {
    crate::memory::resident_bytes().map_or(0.0, |b| b as f64 / (1024.0 * 1024.0))
}

/// Highest resident memory so far, in MiB (0 where unknown).
fn peak_resident_mib() -> f64 {
    crate::memory::peak_resident_bytes().map_or(0.0, |b| b as f64 / (1024.0 * 1024.0))
}
