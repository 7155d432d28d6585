//! `hicra compare --config sweep.toml`: every arm x seed of a sweep (see
//! [`crate::compare::sweep`]), one after the other, then the comparison
//! (`<output_dir>/compare.md`, `compare.json`, and the charts `pass1` and `pass_k` as PNG and
//! SVG).
//!
//! Finished runs are skipped and interrupted ones resume from their checkpoint, so the command
//! can be stopped and started again at any point; `--report-only` summarises what is finished.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use crate::compare::report::{self, Curve};
use crate::compare::sweep::SweepConfig;
use crate::device::DeviceChoice;
use crate::train::run::Run;

/// Arguments of `hicra compare`.
#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// The sweep file (base run, arms, grid, seeds, output_dir).
    #[arg(long)]
    config: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Run nothing: summarise the runs already finished.
    #[arg(long)]
    report_only: bool,
    /// Change the base run for every arm alike, `KEY=VALUE` with a dotted key and a TOML value
    /// (repeatable): the same sweep on another model or budget, e.g.
    /// `--set model=Qwen/Qwen2.5-7B-Instruct --set steps=200`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Write the runs and the report here instead of the sweep's `output_dir`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `hicra compare`.
pub(crate) fn run(args: CompareArgs) -> anyhow::Result<()> {
    let (mut sweep, mut base) = SweepConfig::load(&args.config)?;
    for assignment in &args.overrides {
        base.override_with(assignment)?;
    }
    if let Some(out) = args.out {
        sweep.output_dir = out;
    }
    let plan = sweep.plan(&base)?;
    let total = plan.len();
    // The untrained model's evaluation, measured once per distinct configuration (in
    // practice: once per seed; the arms differ only in what acts from the first step on).
    let mut start_evaluations: Vec<(serde_json::Value, (f64, f64))> = Vec::new();
    for (index, planned) in plan.iter().enumerate() {
        let label = format!("[{}/{total}] {} seed {}", index + 1, planned.arm, planned.seed);
        let dir = &planned.config.output_dir;
        let key = planned.config.start_evaluation_key();
        if finished(dir, planned.config.steps) {
            eprintln!("{label}: finished earlier, skipped");
            remember_start_evaluation(&mut start_evaluations, key, dir);
            continue;
        }
        if args.report_only {
            continue;
        }
        eprintln!("{label}: training {} steps in {}", planned.config.steps, dir.display());
        let model = ModelArgs { model: planned.config.model.clone(), device: args.device, dtype: None, max_context: 4096, adapter: None, local_rank: 0 }.load()?;
        let mut run = Run::new(planned.config.clone(), model)?;
        if let Some((_, (pass1, pass_k))) = start_evaluations.iter().find(|(k, _)| *k == key) {
            eprintln!("{label}: reusing the untrained evaluation of an earlier arm with this seed (pass@1 {pass1:.3})");
            run.reuse_start_evaluation(*pass1, *pass_k);
        }
        let start = if dir.join("checkpoint").exists() { run.resume().with_context(|| format!("{label}: resuming"))? } else { 0 };
        let progress = super::progress::Progress::new(&format!("{} seed {} step", planned.arm, planned.seed), start, planned.config.steps);
        run.run(start, |m| {
            let eval = m.eval_pass1.map(|p| format!(", held-out pass@1 {p:.3}")).unwrap_or_default();
            progress.reached(m.run_step + 1, &format!("reward {:.3}{eval}", m.train.reward_mean));
        })
        .with_context(|| label.clone())?;
        progress.finish();
        remember_start_evaluation(&mut start_evaluations, key, dir);
    }

    let mut curves: BTreeMap<(String, u64), Curve> = BTreeMap::new();
    let mut arms: Vec<String> = Vec::new();
    for planned in &plan {
        if !arms.contains(&planned.arm) {
            arms.push(planned.arm.clone());
        }
        if finished(&planned.config.output_dir, planned.config.steps) {
            curves.insert((planned.arm.clone(), planned.seed), report::read_curve(&planned.config.output_dir.join("metrics.jsonl"))?);
        }
    }
    let summaries = report::summarise(&arms, &curves);
    let table = report::markdown(&summaries);
    std::fs::create_dir_all(&sweep.output_dir).with_context(|| format!("creating {}", sweep.output_dir.display()))?;
    let json = serde_json::to_string_pretty(&summaries)?;
    crate::files::write_atomically(&sweep.output_dir.join("compare.json"), json.as_bytes()).context("writing compare.json")?;
    crate::files::write_atomically(&sweep.output_dir.join("compare.md"), table.as_bytes()).context("writing compare.md")?;
    report::write_charts(&summaries, &sweep.output_dir)?;
    println!("{table}");
    eprintln!("comparison of {} finished runs of {total} written to {}", curves.len(), sweep.output_dir.join("compare.md").display());
    Ok(())
}

/// Keeps the step-0 evaluation the run in `dir` logged (if any) for later runs with `key`.
fn remember_start_evaluation(known: &mut Vec<(serde_json::Value, (f64, f64))>, key: serde_json::Value, dir: &Path) {
    if known.iter().any(|(k, _)| *k == key) {
        return;
    }
    let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl")) else { return };
    let first = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|row| row["run_step"].as_u64() == Some(0));
    if let Some((Some(pass1), Some(pass_k))) = first.map(|row| (row["eval_start_pass1"].as_f64(), row["eval_start_pass_k"].as_f64())) {
        known.push((key, (pass1, pass_k)));
    }
}

/// Whether the run in `dir` has logged its last step.
fn finished(dir: &Path, steps: u64) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl")) else { return false };
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).any(|row| row["run_step"].as_u64() == Some(steps.saturating_sub(1)))
}
