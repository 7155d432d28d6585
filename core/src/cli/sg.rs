//! `hicra sg mine CORPUS.jsonl --out report.json [--list sg.txt]`: Strategic-Gram mining.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::files::write_atomically;
use crate::model::bert::{default_embedder_dir, SentenceEmbedder};
use crate::sg::{mine_observed, overlap, Clustering, MineConfig};
use crate::train::planning::StrategicGrams;

/// `hicra sg ...`
#[derive(Debug, Subcommand)]
pub(crate) enum SgCommand {
    /// Mine Strategic Grams from a JSONL corpus of correct solutions.
    Mine(MineArgs),
}

/// Arguments of `hicra sg mine`; flags override the `--config` file.
#[derive(Debug, Args)]
pub(crate) struct MineArgs {
    /// JSONL corpus: one solution per line (`completion`/`text`/`solution`/... field, optional
    /// `reward`: records below --min-reward are skipped).
    corpus: PathBuf,
    /// The JSON report (clusters, frequencies, the list).
    #[arg(long)]
    out: PathBuf,
    /// Also write the Strategic Grams one per line (usable as `strategic_grams` in run.toml).
    #[arg(long)]
    list: Option<PathBuf>,
    /// TOML with any MineConfig fields (min_n, max_n, min_doc_share, clustering, ...).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sentence-embedding model folder [default: .deps/models/all-minilm-l6-v2 or $HICRA_EMBEDDER].
    #[arg(long)]
    embedder: Option<PathBuf>,
    /// Shortest n-gram.
    #[arg(long)]
    min_n: Option<usize>,
    /// Longest n-gram.
    #[arg(long)]
    max_n: Option<usize>,
    /// Lowest reward of a correct solution.
    #[arg(long)]
    min_reward: Option<f64>,
    /// Share of solutions a candidate must appear in.
    #[arg(long)]
    min_doc_share: Option<f64>,
    /// Cosine threshold of agglomerative clustering.
    #[arg(long, conflicts_with = "kmeans")]
    threshold: Option<f32>,
    /// Cluster with k-means into this many clusters instead.
    #[arg(long)]
    kmeans: Option<usize>,
    /// Seed of k-means.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of clusters kept.
    #[arg(long)]
    keep_share: Option<f64>,
    /// Compare the mined list with this phrase file (one per line) [default: the paper's list].
    #[arg(long)]
    compare_with: Option<PathBuf>,
}

pub(crate) fn run(command: SgCommand) -> anyhow::Result<()> {
    match command {
        SgCommand::Mine(args) => run_mine(args),
    }
}

fn run_mine(args: MineArgs) -> anyhow::Result<()> {
    let mut config: MineConfig = match &args.config {
        Some(path) => toml::from_str(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?).with_context(|| format!("invalid mining config {}", path.display()))?,
        None => MineConfig::default(),
    };
    config.min_n = args.min_n.unwrap_or(config.min_n);
    config.max_n = args.max_n.unwrap_or(config.max_n);
    config.min_reward = args.min_reward.unwrap_or(config.min_reward);
    config.min_doc_share = args.min_doc_share.unwrap_or(config.min_doc_share);
    config.keep_share = args.keep_share.unwrap_or(config.keep_share);
    if let Some(threshold) = args.threshold {
        config.clustering = Clustering::Agglomerative { threshold };
    }
    if let Some(clusters) = args.kmeans {
        config.clustering = Clustering::Kmeans { clusters, iterations: 50, seed: args.seed };
    }
    let embedder_dir = args.embedder.clone().unwrap_or_else(default_embedder_dir);
    let device = crate::device::resolve(crate::device::DeviceChoice::Auto)?;
    let embedder = SentenceEmbedder::load(&embedder_dir, device)
        .with_context(|| format!("loading the sentence embedder from {} (scripts/setup.sh installs it; or pass --embedder)", embedder_dir.display()))?;
    // One bar per stage: bytes of the corpus for its three passes, phrases for the embedding.
    let mut bar: Option<(crate::sg::MineStage, super::progress::Progress)> = None;
    let report = mine_observed(&args.corpus, &config, &embedder, &mut |p| {
        if bar.as_ref().map(|(stage, _)| *stage) != Some(p.stage) {
            if let Some((_, old)) = bar.take() {
                old.finish();
            }
            bar = Some((p.stage, super::progress::Progress::new(p.stage.progress_label(), 0, p.total)));
        }
        if let Some((_, progress)) = &bar {
            progress.update(p.done);
        }
    })?;
    if let Some((_, last)) = bar {
        last.finish();
    }
    let (reference, phrases) = match &args.compare_with {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let phrases = crate::train::planning::phrases_in(&text);
            (StrategicGrams::from_phrases(&phrases), phrases)
        }
        None => (StrategicGrams::paper(), StrategicGrams::paper_phrases()),
    };
    let comparison = overlap(&report.strategic_grams, &reference, &phrases);
    let mut json = serde_json::to_value(&report)?;
    if let Some(object) = json.as_object_mut() {
        object.insert("overlap_with_reference".into(), serde_json::to_value(&comparison)?);
    }
    write_atomically(&args.out, serde_json::to_string_pretty(&json)?.as_bytes()).with_context(|| format!("writing {}", args.out.display()))?;
    if let Some(list) = &args.list {
        write_atomically(list, (report.strategic_grams.join("\n") + "\n").as_bytes()).with_context(|| format!("writing {}", list.display()))?;
    }
    println!(
        "{} solutions of {} records; {} candidates in {} clusters; {} Strategic Grams ({} contain a reference phrase) -> {}",
        report.solutions,
        report.records,
        report.candidates,
        report.clusters.len(),
        report.strategic_grams.len(),
        comparison.containing_reference,
        args.out.display()
    );
    Ok(())
}

