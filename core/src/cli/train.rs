//! `hicra train --config run.toml [--resume]`: the offline HICRA loop with live progress.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
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
}

/// Runs `hicra train`.
pub(crate) fn run(args: TrainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    let mut config: RunConfig = toml::from_str(&text).with_context(|| format!("invalid run configuration {}", args.config.display()))?;
    if let Some(steps) = args.steps {
        config.steps = steps;
    }
    let model = ModelArgs { model: config.model.clone(), device: args.device, dtype: None, max_context: 4096, adapter: None }.load()?;
    let steps = config.steps;
    let mut run = Run::new(config, model)?;
    let start = if args.resume { run.resume().context("--resume")? } else { 0 };
    eprintln!("training steps {start}..{steps} ({} adapter values)", run.trainer().parameters().iter().map(|(_, t)| t.numel()).sum::<usize>());
    run.run(start, |m| {
        let eval = match (m.eval_pass1, m.eval_pass_k) {
            (Some(p1), Some(pk)) => format!(" | eval pass@1 {p1:.3} pass@k {pk:.3}"),
            _ => String::new(),
        };
        let done = (m.run_step + 1).min(steps) as usize;
        let bar: String = (0..20).map(|i| if i * steps as usize / 20 < done { '#' } else { '.' }).collect();
        eprintln!(
            "[{bar}] step {:>4}/{steps} v{} reward {:.3} acc {:.3} len {:.0} loss {:+.4} clip {:.3} |g| {:.3} planning {:.3} H(plan) {:.2} H(exec) {:.2} sem-H {:.2} zero-var {} sample {:.1}s step {:.1}s{eval}",
            m.run_step + 1, m.train.policy_version, m.train.reward_mean, m.analysis.accuracy, m.train.response_length, m.train.loss, m.train.clip_fraction,
            m.train.grad_norm, m.train.planning_share, m.train.entropy_planning, m.train.entropy_execution, m.analysis.semantic_entropy,
            m.train.zero_variance_groups, m.sample_seconds, m.train.step_seconds,
        );
    })?;
    Ok(())
}
