//! The `hicra` subcommands. Each is a small function that calls library modules; this is the
//! only place (with the binary) that uses `anyhow`.

mod analyze;
mod bench;
mod bench_train;
mod compare;
mod generate;
mod plot;
mod progress;
mod replicas;
mod serve;
mod sg;
mod train;

use clap::{Args, Parser, Subcommand};

use crate::device::DeviceChoice;
use crate::model::{self, DType, LoadOptions, LoadedModel};

/// hicra: serve a language model and train it online with HICRA.
#[derive(Debug, Parser)]
#[command(name = "hicra", version, about)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

// `serve` has many flags; the command is parsed once at start-up, so its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a completion for one prompt.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode throughput.
    Bench(bench::BenchArgs),
    /// Measure one in-place LoRA training step.
    BenchTrain(bench_train::BenchTrainArgs),
    /// Serve the model through an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Train LoRA adapters with GRPO/HICRA on a dataset (offline loop).
    Train(train::TrainArgs),
    /// Compare credit schemes (or any settings) over seeds at equal compute: a sweep of runs
    /// and a table with bootstrap intervals.
    Compare(compare::CompareArgs),
    /// Draw PNG curves from a training run's metrics.jsonl.
    Plot(plot::PlotArgs),
    /// The paper's analyses of a training run's rollouts: JSON summary and PNG charts.
    Analyze(analyze::AnalyzeArgs),
    /// Strategic Grams: mine them from a corpus of correct solutions.
    #[command(subcommand)]
    Sg(sg::SgCommand),
}

/// Where the model comes from and how it is placed.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A model name (smollm2-135m-instruct), a Hugging Face folder, a .gguf file, or a hub id
    /// found in the local Hugging Face cache.
    #[arg(long, default_value = model::source::DEFAULT_MODEL)]
    pub model: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Context limit in tokens (prompt + completion), capped by the model's own.
    #[arg(long, default_value_t = 4096)]
    pub max_context: usize,
    /// A PEFT LoRA adapter directory to apply (e.g. a `hicra train` checkpoint).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// This process's `LOCAL_RANK` among data-parallel replicas: `--device auto` then picks
    /// that GPU.
    #[arg(skip)]
    pub local_rank: usize,
}

impl ModelArgs {
    /// Resolves the device and loads the model.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let device = crate::device::resolve_for_replica(self.device, self.local_rank)?;
        let dtype = self.dtype.unwrap_or_else(|| DType::default_for(device));
        let options = LoadOptions { device, dtype, max_context: self.max_context };
        let started = std::time::Instant::now();
        let mut loaded = model::load(&self.model, &options)?;
        if let Some(dir) = &self.adapter {
            let lora = model::lora::load_peft(&mut loaded.model, dir)?;
            tracing::info!(adapter = %dir.display(), rank = lora.rank, "LoRA adapter applied");
        }
        tracing::info!(model = %loaded.name, ?device, ?dtype, secs = started.elapsed().as_secs_f32(), "model loaded");
        Ok(loaded)
    }
}

/// What a benchmark measures: a real model (`--model`), or random weights of a real shape
/// (`--shape`, no download), which has no tokenizer unless `--tokenizer` gives one.
pub(crate) struct BenchModel {
    pub model: model::Transformer,
    pub tokenizer: Option<crate::tokenizer::Tokenizer>,
    pub name: String,
}

/// `--shape` and `--seed` of the benchmarks.
#[derive(Debug, Args)]
pub(crate) struct ShapeArgs {
    /// Random weights of a real model's shape instead of `--model`: qwen2.5-0.5b, qwen3-0.6b,
    /// llama-3.2-1b or qwen2.5-1.5b (nothing is downloaded).
    #[arg(long)]
    pub shape: Option<model::shapes::Shape>,
    /// Seed of the random weights of `--shape`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// With `--shape`: a `tokenizer.json` to pair with the random weights (its vocabulary must
    /// fit the shape's), for what needs text (`bench --constrained`).
    #[arg(long, requires = "shape")]
    pub tokenizer: Option<std::path::PathBuf>,
}

impl ModelArgs {
    /// The model to benchmark: `shape`'s random weights when given, else `--model`.
    pub(crate) fn load_for_bench(&self, shape: &ShapeArgs) -> anyhow::Result<BenchModel> {
        let Some(which) = shape.shape else {
            let loaded = self.load()?;
            return Ok(BenchModel { model: loaded.model, tokenizer: Some(loaded.tokenizer), name: loaded.name });
        };
        let device = crate::device::resolve(self.device)?;
        let dtype = self.dtype.unwrap_or_else(|| DType::default_for(device));
        let started = std::time::Instant::now();
        let model = model::shapes::random_model(which, shape.seed, dtype.kind(), device, self.max_context)?;
        tracing::info!(shape = which.name(), parameters = which.parameter_count(), ?device, ?dtype, secs = started.elapsed().as_secs_f32(), "random-weight model built");
        let tokenizer = match &shape.tokenizer {
            Some(path) => {
                let config = path.with_file_name("tokenizer_config.json");
                let tokenizer = crate::tokenizer::Tokenizer::from_hf_files(path, config.is_file().then_some(config.as_path()))?;
                let vocab = model.config().vocab_size;
                anyhow::ensure!(tokenizer.vocab_size() <= vocab, "{}: {} tokens do not fit the {} logits of {}", path.display(), tokenizer.vocab_size(), vocab, which.name());
                Some(tokenizer)
            }
            None => None,
        };
        Ok(BenchModel { model, tokenizer, name: format!("{} (random weights, seed {})", which.name(), shape.seed) })
    }
}

/// Sets up `tracing` to stderr.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn,hicra_core=info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchTrain(args) => bench_train::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Train(args) => train::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Sg(command) => sg::run(command),
        Command::Analyze(args) => analyze::run(args),
    }
}
