//! `hicra plot METRICS.jsonl [--out DIR]`: PNG curves of a training run.

use std::path::PathBuf;

use clap::Args;

use crate::plot;

/// Arguments of `hicra plot`.
#[derive(Debug, Args)]
pub(crate) struct PlotArgs {
    /// A metrics.jsonl written by `hicra train`.
    metrics: PathBuf,
    /// Output folder [default: the metrics file's folder + /plots].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Metrics to draw (default: reward, accuracy, eval, lengths, entropies, ...).
    #[arg(long, value_delimiter = ',')]
    series: Vec<String>,
}

/// Runs `hicra plot`.
pub(crate) fn run(args: PlotArgs) -> anyhow::Result<()> {
    let out = args.out.unwrap_or_else(|| args.metrics.parent().map(|p| p.join("plots")).unwrap_or_else(|| PathBuf::from("plots")));
    let names: Vec<&str> = if args.series.is_empty() { plot::DEFAULT_SERIES.to_vec() } else { args.series.iter().map(String::as_str).collect() };
    let written = plot::plot_file(&args.metrics, &out, &names)?;
    if written.is_empty() {
        anyhow::bail!("{} has none of the metrics {}", args.metrics.display(), names.join(", "));
    }
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}
