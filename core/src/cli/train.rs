//! `hicra train --config run.toml [--resume] [--nproc N]`: the offline HICRA loop with live
//! progress.
//!
//! Under torchrun's variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) the process
//! is one data-parallel replica of the run (see [`crate::collective`]); `--nproc N` starts N
//! such replicas on this machine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use crate::collective::{ProcessGroup, WorldConfig};
use crate::device::DeviceChoice;
use crate::train::run::{Run, RunConfig};

/// Arguments of `hicra train`.
#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    /// The run's TOML file (see README: model, data, steps, trainer.{lora,loss,optim,credit}).
    #[arg(long)]
    config: PathBuf,
    /// Continue from `<output_dir>/checkpoint`.
    #[arg(long)]
    resume: bool,
    /// Override the number of steps.
    #[arg(long)]
    steps: Option<u64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Start this many data-parallel replicas on this machine (torchrun-style variables set
    /// for each); they split every step's prompts and train one adapter.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// Seconds a replica waits for its peers (to join, then in every step) before it reports
    /// them lost.
    #[arg(long, default_value_t = 300)]
    dist_timeout: u64,
}

/// Runs `hicra train`.
pub(crate) fn run(args: TrainArgs) -> anyhow::Result<()> {
    let world = WorldConfig::from_env()?;
    if args.nproc > 1 {
        anyhow::ensure!(world.is_none(), "--nproc starts its own replicas: do not combine it with WORLD_SIZE (a launcher such as torchrun)");
        return super::replicas::launch(args.nproc, &["train"]);
    }
    let text = std::fs::read_to_string(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    let mut config: RunConfig = toml::from_str(&text).with_context(|| format!("invalid run configuration {}", args.config.display()))?;
    if let Some(steps) = args.steps {
        config.steps = steps;
    }
    let local_rank = world.as_ref().map_or(0, |w| w.local_rank);
    crate::model::share_cores_among(world.as_ref().map_or(1, |w| w.local_world_size));
    let model = ModelArgs { model: config.model.clone(), device: args.device, dtype: None, max_context: 4096, adapter: None, local_rank }.load()?;
    let steps = config.steps;
    let mut run = Run::new(config, model)?;
    let rank = world.as_ref().map_or(0, |w| w.rank);
    // Only rank 0 reads the checkpoint; joining hands its state to the others.
    let mut start = if args.resume && rank == 0 { run.resume().context("--resume")? } else { 0 };
    if let Some(world) = &world {
        let group = ProcessGroup::join(world, Duration::from_secs(args.dist_timeout))?;
        start = run.join(Arc::new(group), start)?;
        eprintln!("replica {} of {} (master {})", world.rank, world.world_size, world.master());
    }
    eprintln!("training steps {start}..{steps} ({} adapter values)", run.trainer().parameters().iter().map(|(_, t)| t.numel()).sum::<usize>());
    let progress = super::progress::Progress::new("step", start, steps);
    run.run(start, |m| {
        let eval = match (m.eval_pass1, m.eval_pass_k) {
            (Some(p1), Some(pk)) => format!(" | eval pass@1 {p1:.3} pass@k {pk:.3}"),
            _ => String::new(),
        };
        let report = format!(
            "v{} reward {:.3} acc {:.3} len {:.0} loss {:+.4} clip {:.3} |g| {:.3} planning {:.3} H(plan) {:.2} H(exec) {:.2} sem-H {:.2} zero-var {} sample {:.1}s step {:.1}s{eval}",
            m.train.policy_version, m.train.reward_mean, m.analysis.accuracy, m.train.response_length, m.train.loss, m.train.clip_fraction,
            m.train.grad_norm, m.train.planning_share, m.train.entropy_planning, m.train.entropy_execution, m.analysis.semantic_entropy,
            m.train.zero_variance_groups, m.sample_seconds, m.train.step_seconds,
        );
        progress.reached(m.run_step + 1, &report);
    })?;
    progress.finish();
    Ok(())
}
