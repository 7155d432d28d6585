//! `hicra analyze RUN_DIR | ROLLOUTS.jsonl | STATE_DIR | journal.sqlite [--out DIR]`: the
//! paper's analyses of a training run
//! (per step: planning vs execution entropy and relative perplexity, semantic and conditional
//! entropy, response length, accuracy, pass@k) as `summary.json` plus PNG charts.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::analysis::{analyze_file, analyze_records, merge_evaluations, write_report};
use crate::server::journal::trained_records;
use crate::train::planning::StrategicGrams;

/// Arguments of `hicra analyze`.
#[derive(Debug, Args)]
pub(crate) struct AnalyzeArgs {
    /// A `hicra train` output folder (its rollouts.jsonl), a rollout log (`--rollout-log` of
    /// `hicra serve`), or a server's state folder / its journal.sqlite (the trained groups).
    run: PathBuf,
    /// Output folder [default: <run folder>/analysis].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Strategic-Gram phrase file (one per line) marking planning tokens [default: the paper's].
    #[arg(long)]
    strategic_grams: Option<PathBuf>,
}

/// Runs `hicra analyze`.
pub(crate) fn run(args: AnalyzeArgs) -> anyhow::Result<()> {
    let journal = if args.run.is_dir() { args.run.join("journal.sqlite") } else { args.run.clone() };
    let is_journal = journal.is_file() && journal.extension().is_some_and(|e| e == "sqlite" || e == "db");
    let (rollouts, folder) = if args.run.is_dir() {
        (args.run.join("rollouts.jsonl"), args.run.clone())
    } else {
        (args.run.clone(), args.run.parent().map(PathBuf::from).unwrap_or_default())
    };
    let grams = match &args.strategic_grams {
        Some(path) => StrategicGrams::from_phrases(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.lines()),
        None => StrategicGrams::paper(),
    };
    let mut analysis = if is_journal {
        analyze_records(&journal, trained_records(&journal)?, &grams)?
    } else {
        analyze_file(&rollouts, &grams)?
    };
    let metrics = folder.join("metrics.jsonl");
    if args.run.is_dir() && metrics.exists() {
        merge_evaluations(&mut analysis, &metrics)?;
    }
    let out = args.out.unwrap_or_else(|| folder.join("analysis"));
    for path in write_report(&analysis, &out)? {
        println!("{}", path.display());
    }
    Ok(())
}
