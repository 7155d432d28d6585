//! `hicra serve`: the OpenAI-compatible server. Every flag can also be set in a TOML file
//! (`--config`); flags given on the command line win over the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use super::ModelArgs;
use crate::collective::{ProcessGroup, WorldConfig};
use crate::device::DeviceChoice;
use crate::engine::scheduler::{self, SchedulerConfig};
use crate::model::{source::DEFAULT_MODEL, DType};
use crate::model::LoadedModel;
use crate::server::checkpoints::{CheckpointPolicy, Checkpointer, StateFolder};
use crate::server::journal::Journal;
use crate::server::training::TrainingBuffer;
use crate::server::{self, metrics::ServerMetrics, rollouts::RolloutStore, AppState, ServerOptions};
use crate::train::checkpoint::{CheckpointStore, Restored};
use crate::train::trainer::{Trainer, TrainerConfig};

/// Arguments of `hicra serve`; unset ones come from `--config`, then from the defaults.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServeArgs {
    /// TOML file with any of these settings (same names, underscores for dashes).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Model name, folder or .gguf file [default: smollm2-135m-instruct].
    #[arg(long)]
    model: Option<String>,
    /// Address to bind [default: 127.0.0.1, loopback only].
    #[arg(long)]
    host: Option<String>,
    /// Port to bind; 0 picks a free one [default: 8000].
    #[arg(long)]
    port: Option<u16>,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long)]
    api_key: Option<String>,
    /// auto, cpu, cuda or cuda:N [default: auto].
    #[arg(long)]
    device: Option<String>,
    /// f32, bf16 or f16 [default: f32 on CPU, bf16 on CUDA].
    #[arg(long)]
    dtype: Option<String>,
    /// Context limit per sequence, prompt + completion [default: 2048]. The KV cache holds
    /// max_batch x max_context positions, allocated at start.
    #[arg(long)]
    max_context: Option<usize>,
    /// Sequences decoded together (batch slots) [default: 16].
    #[arg(long)]
    max_batch: Option<usize>,
    /// Sequences that may wait for a slot before requests get 429 [default: 256].
    #[arg(long)]
    max_queue: Option<usize>,
    /// Prompt tokens that may wait before requests get 429 [default: 262144].
    #[arg(long)]
    max_queue_tokens: Option<usize>,
    /// Prefill every prompt whole, even when a slot still holds the keys and values of its
    /// beginning (an agent's previous turn).
    #[arg(long)]
    #[serde(default)]
    no_prefix_reuse: bool,
    /// Largest request body in bytes [default: 8388608].
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Rollouts kept for /v1/rollouts and training [default: 10000].
    #[arg(long)]
    rollout_capacity: Option<usize>,
    /// Completion length when a request sets none [default: 2048].
    #[arg(long)]
    default_max_tokens: Option<usize>,
    /// A PEFT LoRA adapter directory to serve; with --train, training starts from it (fresh
    /// optimizer) unless the state folder already holds a checkpoint.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The state folder: journal of rollouts, rewards, groups and steps, and checkpoints; a
    /// restarted server continues from it [default: ./hicra-state when training].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Write a checkpoint after this many weight updates; 0 disables [default: 10].
    #[arg(long)]
    checkpoint_every_steps: Option<u64>,
    /// Write a checkpoint this often when the weights changed; 0 disables [default: 300].
    #[arg(long)]
    checkpoint_every_s: Option<f64>,
    /// Checkpoints kept in the state folder, newest first [default: 3].
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// Rollouts the journal keeps, oldest pruned first (those of groups still collecting or
    /// waiting are kept) [default: 200000].
    #[arg(long)]
    journal_retention: Option<usize>,
    /// Plugin libraries: rewards, detectors, credit schemes (repeatable); `plugin_config.<name>` in
    /// the TOML configures them.
    #[arg(long = "plugin")]
    #[serde(default)]
    plugins: Vec<PathBuf>,
    /// Per-plugin configuration tables, by plugin name (TOML file only).
    #[arg(skip)]
    plugin_config: Option<toml::Table>,
    /// A folder of plugin libraries, all loaded (listed again at every reload).
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
    /// Reload plugins by themselves when a library file or the folder changes.
    #[arg(long)]
    #[serde(default)]
    watch_plugins: bool,
    /// Time-out of one plugin call in milliseconds [default: 10000].
    #[arg(long)]
    plugin_timeout_ms: Option<u64>,
    /// Name of a loaded planning-token detector plugin for online training.
    #[arg(long)]
    sg_plugin: Option<String>,
    /// Name of a loaded credit plugin for online training.
    #[arg(long)]
    credit_plugin: Option<String>,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Bearer token for /admin routes (plugin listing and reload); none disables them.
    #[arg(long)]
    admin_key: Option<String>,
    /// Bearer token for the routes that change the weights (POST /v1/rollouts/{id}/reward,
    /// /v1/rewards, /v1/rollouts/{id}/score); the API key alone no longer opens them. Unset:
    /// they take the API key like the other /v1 routes.
    #[arg(long)]
    train_key: Option<String>,
    /// Train LoRA adapters online from rewards posted to /v1/rollouts/{id}/reward.
    #[arg(long)]
    #[serde(default)]
    train: bool,
    /// TOML file with the trainer settings (lora, loss, optim, credit); implies --train.
    #[arg(long)]
    train_config: Option<PathBuf>,
    /// Complete groups per optimizer step [default: 1].
    #[arg(long)]
    groups_per_step: Option<usize>,
    /// Members of a client-named reward group [default: 4].
    #[arg(long)]
    group_size: Option<usize>,
    /// Append every training step's rollouts to this JSON-lines file (read by `hicra analyze`).
    #[arg(long)]
    rollout_log: Option<PathBuf>,
    /// Seconds an incomplete reward group waits for its other members before it expires
    /// [default: 900].
    #[arg(long)]
    group_timeout_s: Option<f64>,
    /// Drop rollouts whose first token is more than this many policy versions older than the
    /// weights a step updates; "none" keeps all [default: 4].
    #[arg(long)]
    max_staleness: Option<String>,
    /// Incomplete reward groups held at once; more are answered 429 [default: 4096].
    #[arg(long)]
    max_pending_groups: Option<usize>,
    /// With data-parallel replicas (torchrun's WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT in
    /// the environment): seconds to wait for the peers, to join and in every step, before
    /// reporting them lost [default: 300].
    #[arg(long)]
    dist_timeout_s: Option<u64>,
}

impl ServeArgs {
    /// Fills unset fields from `--config`.
    fn merged(self) -> anyhow::Result<Self> {
        let Some(path) = &self.config else { return Ok(self) };
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        let file: ServeArgs = toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
        Ok(Self {
            config: self.config,
            model: self.model.or(file.model),
            host: self.host.or(file.host),
            port: self.port.or(file.port),
            api_key: self.api_key.or(file.api_key),
            device: self.device.or(file.device),
            dtype: self.dtype.or(file.dtype),
            max_context: self.max_context.or(file.max_context),
            max_batch: self.max_batch.or(file.max_batch),
            max_queue: self.max_queue.or(file.max_queue),
            max_queue_tokens: self.max_queue_tokens.or(file.max_queue_tokens),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes),
            no_prefix_reuse: self.no_prefix_reuse || file.no_prefix_reuse,
            rollout_capacity: self.rollout_capacity.or(file.rollout_capacity),
            default_max_tokens: self.default_max_tokens.or(file.default_max_tokens),
            adapter: self.adapter.or(file.adapter),
            chat_template: self.chat_template.or(file.chat_template),
            state_dir: self.state_dir.or(file.state_dir),
            checkpoint_every_steps: self.checkpoint_every_steps.or(file.checkpoint_every_steps),
            checkpoint_every_s: self.checkpoint_every_s.or(file.checkpoint_every_s),
            keep_checkpoints: self.keep_checkpoints.or(file.keep_checkpoints),
            journal_retention: self.journal_retention.or(file.journal_retention),
            plugins: if self.plugins.is_empty() { file.plugins } else { self.plugins },
            plugin_config: self.plugin_config.or(file.plugin_config),
            plugin_dir: self.plugin_dir.or(file.plugin_dir),
            watch_plugins: self.watch_plugins || file.watch_plugins,
            plugin_timeout_ms: self.plugin_timeout_ms.or(file.plugin_timeout_ms),
            admin_key: self.admin_key.or(file.admin_key),
            train_key: self.train_key.or(file.train_key),
            sg_plugin: self.sg_plugin.or(file.sg_plugin),
            credit_plugin: self.credit_plugin.or(file.credit_plugin),
            train: self.train || file.train,
            train_config: self.train_config.or(file.train_config),
            groups_per_step: self.groups_per_step.or(file.groups_per_step),
            group_size: self.group_size.or(file.group_size),
            rollout_log: self.rollout_log.or(file.rollout_log),
            group_timeout_s: self.group_timeout_s.or(file.group_timeout_s),
            max_staleness: self.max_staleness.or(file.max_staleness),
            max_pending_groups: self.max_pending_groups.or(file.max_pending_groups),
            dist_timeout_s: self.dist_timeout_s.or(file.dist_timeout_s),
        })
    }
}

/// Runs `hicra serve` until Ctrl-C.
pub(crate) fn run(args: ServeArgs) -> anyhow::Result<()> {
    let args = args.merged()?;
    let device: DeviceChoice = args.device.as_deref().unwrap_or("auto").parse()?;
    let dtype = args.dtype.as_deref().map(str::parse::<DType>).transpose().map_err(anyhow::Error::msg)?;
    let max_context = args.max_context.unwrap_or(2048);
    let training_requested = args.train || args.train_config.is_some();
    // Checked before the model loads, so a typo fails at once.
    let (mut settings, policy) = (training_settings(&args)?, checkpoint_policy(&args)?);
    // Replicas only matter to training: inference replicas need nothing from each other.
    let world = if training_requested { WorldConfig::from_env()? } else { None };
    crate::model::share_cores_among(world.as_ref().map_or(1, |w| w.local_world_size));
    // With training, the adapter is the trainer's starting point (see `start_trainer`).
    let adapter = if training_requested { None } else { args.adapter.clone() };
    let local_rank = world.as_ref().map_or(0, |w| w.local_rank);
    let model_args = ModelArgs { model: args.model.clone().unwrap_or_else(|| DEFAULT_MODEL.to_string()), device, dtype, max_context, adapter, local_rank };
    let host = args.host.clone().unwrap_or_else(|| "127.0.0.1".into());
    let addr: SocketAddr = format!("{host}:{}", args.port.unwrap_or(8000))
        .parse()
        .or_else(|_| format!("[{host}]:{}", args.port.unwrap_or(8000)).parse())
        .with_context(|| format!("invalid --host '{host}'"))?;
    let trainer_config = match (&args.train_config, training_requested) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some(toml::from_str::<TrainerConfig>(&text).with_context(|| format!("invalid trainer configuration {}", path.display()))?)
        }
        (None, true) => Some(TrainerConfig::default()),
        (None, false) => None,
    };
    let folder = match (&args.state_dir, training_requested, &world) {
        (Some(dir), _, _) => Some(StateFolder::open(dir)?),
        // Replicas on one machine must not share a folder (it is locked): one per rank.
        (None, true, Some(world)) if world.rank > 0 => Some(StateFolder::open(Path::new(&format!("{DEFAULT_STATE_DIR}-rank-{}", world.rank)))?),
        (None, true, _) => Some(StateFolder::open(Path::new(DEFAULT_STATE_DIR))?),
        (None, false, _) => None,
    };
    let mut loaded = model_args.load()?;
    if let Some(path) = &args.chat_template {
        let source = std::fs::read_to_string(path).with_context(|| format!("reading --chat-template {}", path.display()))?;
        loaded.tokenizer.set_chat_template(&source).with_context(|| format!("--chat-template {}", path.display()))?;
    }
    let (trainer, restored) = match trainer_config {
        Some(config) => {
            let (mut trainer, restored) = start_trainer(&mut loaded, config, args.adapter.as_deref(), folder.as_ref(), args.keep_checkpoints.unwrap_or(3))?;
            if let Some(world) = &world {
                let timeout = std::time::Duration::from_secs(args.dist_timeout_s.unwrap_or(300));
                let group = Arc::new(ProcessGroup::join(world, timeout)?);
                // Rank 0's adapters, optimizer and policy version go to every replica.
                trainer.join(group.clone())?;
                eprintln!("replica {} of {} (master {}): policy version {}", world.rank, world.world_size, world.master(), trainer.policy_version());
                settings.replicas = Some(group);
            }
            (Some(trainer), restored)
        }
        None => (None, None),
    };
    let start_version = trainer.as_ref().map_or(0, Trainer::policy_version);
    let journal = match &folder {
        Some(folder) => Some(Journal::open(&folder.journal_path(), args.journal_retention.unwrap_or(200_000))?),
        None => None,
    };
    let max_batch = args.max_batch.unwrap_or(16);
    let engine = scheduler::spawn(
        loaded,
        SchedulerConfig {
            max_batch,
            capacity: max_context,
            max_queued_requests: args.max_queue.unwrap_or(256),
            max_queued_tokens: args.max_queue_tokens.unwrap_or(262_144),
            prefix_reuse: !args.no_prefix_reuse,
        },
        trainer,
    )?;
    let plugins = if args.plugins.is_empty() && args.plugin_dir.is_none() {
        None
    } else {
        let configs = serde_json::to_value(args.plugin_config.clone().unwrap_or_default())?;
        let timeout = std::time::Duration::from_millis(args.plugin_timeout_ms.unwrap_or(10_000));
        let registry = Arc::new(crate::server::plugins::PluginRegistry::new(args.plugins.clone(), args.plugin_dir.clone(), configs, timeout)?);
        if args.watch_plugins {
            registry.watch(std::time::Duration::from_secs(1))?;
        }
        Some(registry)
    };
    for (flag, name, kind) in [("--sg-plugin", &args.sg_plugin, hicra_sdk::PluginKind::SgDetector), ("--credit-plugin", &args.credit_plugin, hicra_sdk::PluginKind::Credit)] {
        let Some(name) = name else { continue };
        let loaded = plugins.as_ref().map(|r| r.current()).unwrap_or_default();
        match loaded.iter().find(|p| &p.name == name) {
            Some(p) if p.kind == kind => {}
            Some(p) => anyhow::bail!("{flag} {name}: that plugin is a {:?} plugin, not {kind:?}", p.kind),
            None => anyhow::bail!("{flag} {name}: no loaded plugin has that name (load it with --plugin)"),
        }
    }
    let state = AppState {
        engine,
        rollouts: Arc::new(match &world {
            Some(world) => RolloutStore::for_replica(args.rollout_capacity.unwrap_or(10_000), world.rank),
            None => RolloutStore::new(args.rollout_capacity.unwrap_or(10_000)),
        }),
        metrics: Arc::new(ServerMetrics::default()),
        options: Arc::new(ServerOptions {
            api_key: args.api_key.clone(),
            admin_key: args.admin_key.clone(),
            train_key: args.train_key.clone(),
            max_body_bytes: args.max_body_bytes.unwrap_or(8 << 20),
            default_max_tokens: args.default_max_tokens.unwrap_or(2048),
        }),
        training: None,
        plugins,
        journal: journal.clone(),
        checkpoints: None,
        episodes: Arc::new(crate::server::episodes::EpisodeStore::default()),
        replicas: settings.replicas.clone().map(|group| Arc::new(crate::server::replicas::Replicas::new(group))),
    };
    let state = match (training_requested, &folder) {
        (true, Some(folder)) => {
            // The trainer's version: the restored checkpoint's, or rank 0's among replicas.
            let version = start_version;
            let buffer = TrainingBuffer::new(settings, journal.clone());
            if let Some(journal) = &journal {
                journal.set_checkpoint_version(version);
                let recovery = journal.recover(version)?;
                eprintln!(
                    "journal {}: {} complete groups waiting ({} retrained: their step came after the checkpoint), {} collecting",
                    journal.path().display(),
                    recovery.ready.len(),
                    recovery.retrained_groups,
                    recovery.pending.len()
                );
                buffer.restore(recovery);
            }
            let store = CheckpointStore::open(folder.root(), args.keep_checkpoints.unwrap_or(3))?;
            let checkpointer = Checkpointer::new(store, policy, state.engine.info.name.clone(), restored.as_ref());
            AppState { training: Some(Arc::new(buffer)), checkpoints: Some(Arc::new(checkpointer)), ..state }
        }
        _ => state,
    };
    // Keeps the state folder locked until the server has stopped.
    let _folder = folder;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(server::serve(state, addr))?;
    Ok(())
}

/// The state folder used when training without `--state-dir`.
const DEFAULT_STATE_DIR: &str = "hicra-state";

/// Builds the trainer: fresh adapters, or `adapter`'s (optimizer fresh); then, when the state
/// folder holds a checkpoint, everything it saved (adapters, optimizer, versions).
fn start_trainer(loaded: &mut LoadedModel, config: TrainerConfig, adapter: Option<&Path>, folder: Option<&StateFolder>, keep: usize) -> anyhow::Result<(Trainer, Option<Restored>)> {
    let mut trainer = match adapter {
        Some(dir) => {
            let lora = crate::model::lora::load_peft(&mut loaded.model, dir).with_context(|| format!("--adapter {}", dir.display()))?;
            Trainer::from_attached(&mut loaded.model, lora, config)?
        }
        None => Trainer::new(&mut loaded.model, config)?,
    };
    let Some(folder) = folder else { return Ok((trainer, None)) };
    let store = CheckpointStore::open(folder.root(), keep)?;
    let restored = store.load_newest(&mut trainer, &loaded.name).with_context(|| format!("resuming from the state folder {}", folder.root().display()))?;
    match (&restored, adapter) {
        (Some(r), Some(dir)) => eprintln!("resumed from {} (policy version {}); --adapter {} was its starting point", r.path.display(), r.policy_version, dir.display()),
        (Some(r), None) => eprintln!("resumed from {} (policy version {}, optimizer step {})", r.path.display(), r.policy_version, r.step),
        (None, _) => eprintln!("state folder {}: no checkpoint yet, training starts at policy version 0", folder.root().display()),
    }
    Ok((trainer, restored))
}

/// When checkpoints are written, from the flags.
fn checkpoint_policy(args: &ServeArgs) -> anyhow::Result<CheckpointPolicy> {
    let every = match args.checkpoint_every_s {
        None => Some(std::time::Duration::from_secs(300)),
        Some(0.0) => None,
        Some(s) => Some(std::time::Duration::try_from_secs_f64(s).ok().filter(|d| !d.is_zero()).with_context(|| format!("--checkpoint-every-s must be a positive number of seconds or 0, got {s}"))?),
    };
    Ok(CheckpointPolicy { every_steps: args.checkpoint_every_steps.unwrap_or(10), every })
}

/// Online training settings from the flags, defaults where unset.
fn training_settings(args: &ServeArgs) -> anyhow::Result<crate::server::training::TrainingSettings> {
    let defaults = crate::server::training::TrainingSettings::default();
    let group_timeout = match args.group_timeout_s {
        Some(s) => std::time::Duration::try_from_secs_f64(s).ok().filter(|d| !d.is_zero()).with_context(|| format!("--group-timeout-s must be a positive number of seconds, got {s}"))?,
        None => defaults.group_timeout,
    };
    let max_staleness = match args.max_staleness.as_deref() {
        None => defaults.max_staleness,
        Some("none") => None,
        Some(text) => Some(text.parse::<u64>().with_context(|| format!("--max-staleness must be a number of policy versions or \"none\", got '{text}'"))?),
    };
    Ok(crate::server::training::TrainingSettings {
        groups_per_step: args.groups_per_step.unwrap_or(defaults.groups_per_step),
        group_size: args.group_size.unwrap_or(defaults.group_size),
        group_timeout,
        max_staleness,
        max_pending_groups: args.max_pending_groups.unwrap_or(defaults.max_pending_groups).max(1),
        sg_plugin: args.sg_plugin.clone(),
        credit_plugin: args.credit_plugin.clone(),
        rollout_log: args.rollout_log.clone(),
        ..defaults
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_unknown_keys_are_rejected() -> anyhow::Result<()> {
        let path = std::env::temp_dir().join(format!("hicra-serve-{}.toml", std::process::id()));
        std::fs::write(&path, "port = 9001\nhost = \"0.0.0.0\"\nmax_batch = 4\n")?;
        let args = ServeArgs { config: Some(path.clone()), port: Some(7000), ..ServeArgs::default() }.merged()?;
        assert_eq!(args.port, Some(7000));
        assert_eq!(args.host.as_deref(), Some("0.0.0.0"));
        assert_eq!(args.max_batch, Some(4));
        std::fs::write(&path, "prot = 1\n")?;
        let err = ServeArgs { config: Some(path), ..ServeArgs::default() }.merged();
        assert!(format!("{:#}", err.expect_err("typo rejected")).contains("prot"));
        Ok(())
    }
}
