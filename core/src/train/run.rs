//! The offline loop behind `hicra train --config run.toml`: sample G completions per prompt
//! from the model being trained, reward them, assign HICRA credit, step, evaluate, checkpoint.
//!
//! Sampling and training use the same weights in the same process: each step's rollouts come
//! from the policy version the previous step produced, with their sampling logprobs as the
//! PPO "old" policy. Sampling seeds derive from `(seed, step, prompt, sample)`, so a resumed
//! run repeats exactly what an uninterrupted one does.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CheckpointStore, TrainerSnapshot};
use super::data::{self, DataConfig, Example};
use super::environment::{Environment, EnvironmentConfig, Retry};
use super::episodes::{play, Table};
use super::planning::StrategicGrams;
use super::reward;
use super::trainer::{StepReport, Trainer, TrainerConfig};
use super::TrainError;
use crate::collective::{CollectiveError, ProcessGroup};
use crate::engine::{Engine, Generation, GenerationRequest, SamplingParams};
use crate::analysis::{analyze_step, RolloutRecord, StepAnalysis};
use crate::plugins::step::{ScoredCompletion, StepPlugins};
use hicra_sdk::PluginKind;
use crate::model::LoadedModel;
use crate::tokenizer::chat::ChatMessage;

/// How completions are scored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// The answer in `\boxed{}` or after `####` must equal the reference.
    #[default]
    Math,
    /// Like `math`, but a completion without a marked answer is judged by its last number.
    MathLastNumber,
    /// The whole completion must equal the reference (whitespace-normalised).
    ExactMatch,
    /// The completion must contain a match of `reward_pattern` (a regular expression).
    Regex,
}

/// A training run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Model name, folder or file (as `--model`).
    pub model: String,
    /// Seed of sampling and data order.
    pub seed: u64,
    /// Optimizer steps to run.
    pub steps: u64,
    /// Prompts per step.
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Sampling temperature.
    pub temperature: f64,
    /// Completion length limit.
    pub max_new_tokens: usize,
    /// Wrap prompts in the chat template as a user message.
    pub chat: bool,
    /// Optional system message.
    pub system_prompt: Option<String>,
    /// Text appended to every question (e.g. how to format the answer).
    pub instruction: String,
    /// Data source.
    pub data: DataConfig,
    /// Share of examples held out for evaluation (when `eval_data` is absent).
    pub eval_fraction: f64,
    /// Held-out examples from their own source (e.g. GSM8K's held-out file), evaluated in file
    /// order whatever the seed; all of `data` then trains and `eval_fraction` is ignored.
    pub eval_data: Option<DataConfig>,
    /// Evaluate once before the first step too, so a curve starts at the untrained model
    /// (step 0's metrics line carries it as `eval_start_pass1`, `eval_start_pass_k`).
    pub eval_before_training: bool,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Held-out prompts per evaluation.
    pub eval_prompts: usize,
    /// Samples per held-out prompt (pass@k uses all of them).
    pub eval_samples: usize,
    /// Scoring.
    pub reward: RewardKind,
    /// For `reward = "regex"`: the pattern a completion must contain to score 1.
    pub reward_pattern: Option<String>,
    /// Draw a group again (up to this many times) when all its rewards are equal (0: skip it).
    pub resample_equal_groups: usize,
    /// A reward plugin library scoring completions instead of `reward` (the example's answer
    /// goes to it as `metadata.answer`); items it fails are masked out of their group.
    pub reward_plugin: Option<PathBuf>,
    /// Configuration passed to the reward plugin.
    pub reward_plugin_config: Option<toml::Table>,
    /// A Strategic-Gram detector plugin marking planning tokens instead of `strategic_grams`;
    /// completions it fails are masked out of their group.
    pub sg_plugin: Option<PathBuf>,
    /// Configuration passed to the detector plugin.
    pub sg_plugin_config: Option<toml::Table>,
    /// A credit plugin computing per-token advantages instead of `trainer.credit`; groups it
    /// fails are dropped from the step.
    pub credit_plugin: Option<PathBuf>,
    /// Configuration passed to the credit plugin.
    pub credit_plugin_config: Option<toml::Table>,
    /// Strategic-Gram phrase file (one per line); the paper's list when absent.
    pub strategic_grams: Option<PathBuf>,
    /// Where metrics and checkpoints go.
    pub output_dir: PathBuf,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept in the output folder, newest first (at least 1).
    pub keep_checkpoints: usize,
    /// A multi-turn environment: each sample is an episode of several answers with the
    /// environment's replies between them, trained as one sequence (chat models only).
    pub environment: Option<EnvironmentConfig>,
    /// Append every rewarded rollout to `rollouts.jsonl` in the output folder (`hicra analyze`
    /// reads it).
    pub log_rollouts: bool,
    /// The trainer (LoRA, loss, optimizer, credit scheme).
    pub trainer: TrainerConfig,
}

impl RunConfig {
    /// What the untrained model's held-out evaluation depends on: this configuration without
    /// the settings that act only once training starts (credit, optimizer, loss, step sizes,
    /// detectors, output). Runs with equal keys measure the same step-0 evaluation.
    pub fn start_evaluation_key(&self) -> serde_json::Value {
        let mut key = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(map) = key.as_object_mut() {
            for training_only in ["steps", "prompts_per_step", "group_size", "resample_equal_groups", "sg_plugin", "sg_plugin_config", "credit_plugin", "credit_plugin_config", "strategic_grams", "output_dir", "checkpoint_every", "keep_checkpoints", "eval_every", "log_rollouts"] {
                map.remove(training_only);
            }
            if let Some(trainer) = map.get_mut("trainer").and_then(serde_json::Value::as_object_mut) {
                for training_only in ["credit", "optim", "loss"] {
                    trainer.remove(training_only);
                }
            }
        }
        key
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            model: crate::model::source::DEFAULT_MODEL.to_string(),
            seed: 0,
            steps: 20,
            prompts_per_step: 4,
            group_size: 8,
            temperature: 1.0,
            max_new_tokens: 64,
            chat: true,
            system_prompt: None,
            instruction: String::new(),
            data: DataConfig::default(),
            eval_fraction: 0.1,
            eval_data: None,
            eval_before_training: false,
            eval_every: 0,
            eval_prompts: 16,
            eval_samples: 4,
            reward: RewardKind::default(),
            reward_pattern: None,
            resample_equal_groups: 0,
            reward_plugin: None,
            reward_plugin_config: None,
            sg_plugin: None,
            sg_plugin_config: None,
            credit_plugin: None,
            credit_plugin_config: None,
            strategic_grams: None,
            output_dir: PathBuf::from("runs/default"),
            checkpoint_every: 0,
            keep_checkpoints: 2,
            environment: None,
            log_rollouts: true,
            trainer: TrainerConfig::default(),
        }
    }
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Data could not be loaded.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// Generation failed.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// A step failed.
    #[error(transparent)]
    Train(#[from] super::TrainError),
    /// A checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// Templating or tokenizing a prompt failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// Writing metrics failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid run configuration: {0}")]
    Config(String),
    /// The replicas could not agree (a peer lost).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    /// Loop step (0-based); `step` (from the trainer) counts optimizer updates.
    pub run_step: u64,
    /// The trainer's report.
    #[serde(flatten)]
    pub train: StepReport,
    /// The paper's analyses of this step's rollouts (accuracy, pass@k, planning vs execution
    /// entropy and perplexity, semantic and conditional entropy), as `hicra analyze` computes them.
    #[serde(flatten)]
    pub analysis: StepAnalysis,
    /// Groups drawn again because their rewards were all equal.
    pub resampled_groups: usize,
    /// Completions a reward or detector plugin failed, left out of training.
    pub masked_items: usize,
    /// Groups left out of training: a credit plugin failed them, or fewer than 2 completions
    /// remained after masking.
    pub dropped_groups: usize,
    /// Held-out pass@1 when evaluated this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_pass1: Option<f64>,
    /// Held-out pass@k when evaluated this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_pass_k: Option<f64>,
    /// Held-out pass@1 before any training (step 0 with `eval_before_training`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_start_pass1: Option<f64>,
    /// Held-out pass@k before any training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_start_pass_k: Option<f64>,
    /// Seconds spent sampling.
    pub sample_seconds: f64,
}

/// Scores one completion with a built-in verifier. `Regex` needs the pattern `Run::new`
/// compiles, so [`Run`] dispatches it before calling this; here it never matches.
pub(crate) fn score(kind: RewardKind, completion: &str, answer: &str) -> f32 {
    match kind {
        RewardKind::Math => reward::math_reward(completion, answer),
        RewardKind::MathLastNumber if reward::extract_answer(completion).is_some() => reward::math_reward(completion, answer),
        RewardKind::MathLastNumber => match last_number(completion) {
            Some(n) => reward::math_reward(&format!("#### {n}"), answer),
            None => 0.0,
        },
        RewardKind::ExactMatch => reward::exact_match_reward(completion, answer, true),
        RewardKind::Regex => 0.0,
    }
}

/// The last integer or decimal in `text` (with a leading minus sign).
fn last_number(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut end = None;
    for i in (0..bytes.len()).rev() {
        if bytes[i].is_ascii_digit() {
            end = Some(i + 1);
            break;
        }
    }
    let end = end?;
    let mut start = end;
    while start > 0 && (bytes[start - 1].is_ascii_digit() || bytes[start - 1] == b'.' || bytes[start - 1] == b',') {
        start -= 1;
    }
    if start > 0 && bytes[start - 1] == b'-' {
        start -= 1;
    }
    Some(text[start..end].trim_start_matches(['.', ',']).replace(',', ""))
}

/// A run in progress: model, trainer, data and where it is.
pub struct Run {
    config: RunConfig,
    loaded: LoadedModel,
    trainer: Trainer,
    train: Vec<Example>,
    eval: Vec<Example>,
    grams: StrategicGrams,
    metrics_path: PathBuf,
    /// Replaces `config.reward` when set (library users with their own verifier).
    custom_reward: Option<RewardFn>,
    /// The compiled `reward_pattern` for `reward = "regex"`.
    pattern: Option<regex::Regex>,
    /// The loaded `reward_plugin`.
    plugin: Option<crate::plugins::Plugin>,
    /// The loaded `sg_plugin` and `credit_plugin`.
    step_plugins: StepPlugins,
    /// Replaces `config.environment` when set (library users with their own environment).
    custom_environment: Option<(usize, EnvironmentFactory)>,
    /// This process's share of the prompts: (rank, world size); (0, 1) alone.
    replica: (usize, usize),
    /// Step 0's untrained evaluation `(pass@1, pass@k)`, when another run with the same
    /// [`RunConfig::start_evaluation_key`] already measured it (see [`Run::reuse_start_evaluation`]).
    known_start_evaluation: Option<(f64, f64)>,
}

/// A library user's environment: one per episode, for its example.
type EnvironmentFactory = Box<dyn Fn(&Example) -> Box<dyn Environment>>;

/// A library user's verifier: `reward(completion, answer)`.
type RewardFn = Box<dyn Fn(&str, &str) -> f32>;

/// A prompt's ids and the completions sampled for it.
type PromptSamples = (Vec<u32>, Vec<Generation>);

/// A prompt's ids and its scored completions (or episodes): one group.
type ScoredGroup = (Vec<u32>, Vec<ScoredCompletion>);

/// Loads the plugin library at `path` (if any) with its configuration, refusing one of
/// another kind than the setting it was named in.
fn load_plugin(path: &Option<PathBuf>, config: &Option<toml::Table>, kind: PluginKind) -> Result<Option<crate::plugins::Plugin>, RunError> {
    let Some(path) = path else { return Ok(None) };
    let config = serde_json::to_value(config.clone().unwrap_or_default()).map_err(|e| RunError::Config(format!("{}: {e}", path.display())))?;
    let plugin = crate::plugins::load(path, &config).map_err(|e| RunError::Config(e.to_string()))?;
    if plugin.kind != kind {
        return Err(RunError::Config(format!("{}: plugin '{}' is a {:?} plugin, expected {kind:?}", path.display(), plugin.name, plugin.kind)));
    }
    Ok(Some(plugin))
}

impl Run {
    /// Sets up a run on an already loaded model (adapters are attached here).
    pub fn new(config: RunConfig, mut loaded: LoadedModel) -> Result<Self, RunError> {
        if config.group_size < 2 || config.prompts_per_step == 0 {
            return Err(RunError::Config("group_size must be >= 2 and prompts_per_step >= 1".into()));
        }
        if !(config.temperature.is_finite() && config.temperature > 0.0) {
            return Err(RunError::Config(format!("temperature must be > 0 to train (got {}): greedy decoding draws from no distribution", config.temperature)));
        }
        let mut examples = data::load(&config.data)?;
        let mut state = config.seed ^ 0xD1B5_4A32_D192_ED03;
        for i in (1..examples.len()).rev() {
            let j = (crate::random::splitmix(&mut state) % (i as u64 + 1)) as usize;
            examples.swap(i, j);
        }
        let (train, eval) = match &config.eval_data {
            Some(source) => {
                let eval = data::load(source)?;
                (data::without_held_out(examples, &eval)?, eval)
            }
            None => {
                let held_out = ((examples.len() as f64 * config.eval_fraction).round() as usize).min(examples.len().saturating_sub(1));
                let train = examples.split_off(held_out);
                (train, examples)
            }
        };
        let grams = match &config.strategic_grams {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| RunError::Io { path: path.clone(), source })?;
                StrategicGrams::from_phrases(text.lines())
            }
            None => StrategicGrams::paper(),
        };
        let pattern = match (config.reward, &config.reward_pattern) {
            (RewardKind::Regex, Some(p)) => Some(regex::Regex::new(p).map_err(|e| RunError::Config(format!("reward_pattern: {e}")))?),
            (RewardKind::Regex, None) => return Err(RunError::Config("reward = \"regex\" needs reward_pattern".into())),
            _ => None,
        };
        let plugin = load_plugin(&config.reward_plugin, &config.reward_plugin_config, PluginKind::Reward)?;
        let step_plugins = StepPlugins {
            detector: load_plugin(&config.sg_plugin, &config.sg_plugin_config, PluginKind::SgDetector)?,
            credit: load_plugin(&config.credit_plugin, &config.credit_plugin_config, PluginKind::Credit)?,
            ..StepPlugins::built_in()
        };
        let trainer = Trainer::new(&mut loaded.model, config.trainer.clone())?;
        std::fs::create_dir_all(&config.output_dir).map_err(|source| RunError::Io { path: config.output_dir.clone(), source })?;
        let metrics_path = config.output_dir.join("metrics.jsonl");
        Ok(Self { config, loaded, trainer, train, eval, grams, metrics_path, custom_reward: None, pattern, plugin, step_plugins, custom_environment: None, replica: (0, 1), known_start_evaluation: None })
    }

    /// Trains together with the other replicas of `group` (data parallel): each samples its
    /// share of every step's prompts, and the replicas take each step together. Rank 0's
    /// `start` (the step `resume` found) and trainer state go to every replica. Rank 0 writes
    /// checkpoints and evaluates; rank `r > 0` writes its metrics and rollouts to
    /// `<output_dir>/rank-<r>/`. Returns the step to start from. Every replica calls it once.
    pub fn join(&mut self, group: Arc<ProcessGroup>, start: u64) -> Result<u64, RunError> {
        let start = group.broadcast_values(&[start as i64], 0)?[0] as u64;
        self.replica = (group.rank(), group.world_size());
        self.trainer.join(group)?;
        let dir = self.rank_dir();
        std::fs::create_dir_all(&dir).map_err(|source| RunError::Io { path: dir.clone(), source })?;
        self.metrics_path = dir.join("metrics.jsonl");
        Ok(start)
    }

    /// Where this replica's metrics and rollouts go: the output folder for rank 0.
    fn rank_dir(&self) -> PathBuf {
        match self.replica.0 {
            0 => self.config.output_dir.clone(),
            rank => self.config.output_dir.join(format!("rank-{rank}")),
        }
    }

    /// This replica's prompts of a step of `n`: a contiguous share `first..first + count`.
    fn shard(&self, n: usize) -> (usize, usize) {
        let (rank, world) = self.replica;
        let (first, end) = (rank * n / world, (rank + 1) * n / world);
        (first, end - first)
    }

    /// Plays each sample as a multi-turn episode of at most `max_turns` answers against an
    /// environment `make` builds per episode, instead of `config.environment`.
    pub fn set_environment(&mut self, max_turns: usize, make: impl Fn(&Example) -> Box<dyn Environment> + 'static) {
        self.custom_environment = Some((max_turns, Box::new(make)));
    }

    /// Scores completions with `reward(completion, answer)` instead of the configured kind.
    pub fn set_reward_fn(&mut self, reward: impl Fn(&str, &str) -> f32 + 'static) {
        self.custom_reward = Some(Box::new(reward));
    }

    fn reward(&self, completion: &str, answer: &str) -> f32 {
        match (&self.custom_reward, &self.pattern) {
            (Some(f), _) => f(completion, answer),
            (None, Some(pattern)) => reward::regex_reward(completion, pattern),
            (None, None) => score(self.config.reward, completion, answer),
        }
    }

    /// The newest checkpoint (a link to `checkpoint-<next step>` in the output folder).
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.config.output_dir.join("checkpoint")
    }

    fn checkpoints(&self) -> Result<CheckpointStore, RunError> {
        Ok(CheckpointStore::open(&self.config.output_dir, self.config.keep_checkpoints)?)
    }

    /// Restores the newest valid checkpoint; returns the loop step to continue from (steps
    /// whose groups all had equal rewards advance the loop but not the optimizer). Without
    /// any checkpoint (a run killed before its first one) the run starts over at step 0.
    pub fn resume(&mut self) -> Result<u64, RunError> {
        match self.checkpoints()?.load_newest(&mut self.trainer, &self.loaded.name)? {
            Some(restored) => Ok(restored.extra.get("next_step").and_then(|v| v.as_u64()).unwrap_or(restored.label)),
            None => {
                tracing::warn!(dir = %self.config.output_dir.display(), "no checkpoint to resume from; starting at step 0");
                Ok(0)
            }
        }
    }

    /// The trainer (for tests and tools).
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    fn prompt_ids(&self, example: &Example) -> Result<Vec<u32>, RunError> {
        let tokenizer = &self.loaded.tokenizer;
        let template = tokenizer.chat_template().filter(|_| self.config.chat);
        let Some(template) = template else { return Ok(tokenizer.encode(&format!("{}{}", example.prompt, self.config.instruction), true)?) };
        Ok(tokenizer.encode(&template.render(&self.opening(example), None, true, None)?, false)?)
    }

    /// An example's opening messages: the system prompt, if any, and the question.
    fn opening(&self, example: &Example) -> Vec<ChatMessage> {
        let mut messages = Vec::new();
        if let Some(system) = &self.config.system_prompt {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", format!("{}{}", example.prompt, self.config.instruction)));
        messages
    }

    /// Whether samples are multi-turn episodes, and at most how many answers they have.
    fn episode_turns(&self) -> Option<usize> {
        match (&self.custom_environment, &self.config.environment) {
            (Some((turns, _)), _) => Some(*turns),
            (None, Some(config)) => Some(config.max_turns()),
            (None, None) => None,
        }
    }

    /// The environment of one episode of `example`.
    fn environment(&self, example: &Example) -> Box<dyn Environment + '_> {
        match (&self.custom_environment, &self.config.environment) {
            (Some((_, make)), _) => make(example),
            (None, Some(EnvironmentConfig::Retry { turns, message })) => {
                let answer = example.answer.clone();
                Box::new(Retry::new(*turns, message.clone(), move |text: &str| self.reward(text, &answer) > 0.5))
            }
            (None, None) => Box::new(Retry::new(1, String::new(), |_: &str| false)),
        }
    }

    /// Plays `samples` episodes per example (seeds from `(seed, tag, example, sample, turn)`)
    /// and returns each example's opening prompt ids and its scored episodes.
    /// `first` is the first example's index in the step (seeds are the same whichever replica
    /// plays it).
    fn sample_episodes(&self, examples: &[&Example], first: usize, samples: usize, tag: u64, max_turns: usize) -> Result<Vec<ScoredGroup>, RunError> {
        let tokenizer = &self.loaded.tokenizer;
        let template = tokenizer.chat_template().filter(|_| self.config.chat).ok_or_else(|| RunError::Config("a multi-turn environment needs a chat model (a chat template and chat = true)".into()))?;
        let mut episodes = Vec::new();
        for example in examples {
            for _ in 0..samples {
                episodes.push((self.opening(example), self.environment(example)));
            }
        }
        let seed = self.config.seed;
        let temperature = self.config.temperature;
        let sampling = |episode: usize, turn: usize| {
            let mut state = seed ^ tag.wrapping_mul(0x9E37_79B9) ^ (((first + episode / samples) as u64) << 20) ^ (episode % samples) as u64 ^ ((turn as u64) << 40);
            SamplingParams { temperature, top_p: 1.0, top_k: 0, seed: crate::random::splitmix(&mut state), ..SamplingParams::default() }
        };
        let table = Table { model: &self.loaded.model, tokenizer, template, max_new_tokens: self.config.max_new_tokens, max_turns };
        let played = play(&table, episodes, sampling)?;
        let mut played = played.into_iter();
        let mut out = Vec::with_capacity(examples.len());
        for example in examples {
            let prompt = self.prompt_ids(example)?;
            let members = played
                .by_ref()
                .take(samples)
                .enumerate()
                .map(|(index, e)| ScoredCompletion {
                    id: format!("episode-{index}"),
                    prompt_ids: e.prompt_ids,
                    sampling: SamplingParams { temperature, ..SamplingParams::default() },
                    pieces: e.pieces,
                    completion_ids: e.completion_ids,
                    logprobs: e.logprobs,
                    entropies: e.entropies,
                    reward: e.reward,
                    sampled_mask: e.sampled_mask,
                })
                .collect();
            out.push((prompt, members));
        }
        Ok(out)
    }

    /// Samples `samples` completions for each example, seeds from `(seed, tag, example, sample)`
    /// with examples numbered from `first`.
    fn sample(&self, examples: &[&Example], first: usize, samples: usize, tag: u64, temperature: f64) -> Result<Vec<PromptSamples>, RunError> {
        let mut requests = Vec::new();
        let mut prompts = Vec::new();
        for (p, example) in examples.iter().enumerate() {
            let ids = self.prompt_ids(example)?;
            for s in 0..samples {
                let mut state = self.config.seed ^ tag.wrapping_mul(0x9E37_79B9) ^ (((first + p) as u64) << 20) ^ s as u64;
                let sampling = SamplingParams { temperature, top_p: 1.0, top_k: 0, seed: crate::random::splitmix(&mut state), ..SamplingParams::default() };
                requests.push(GenerationRequest::new(ids.clone(), sampling, self.config.max_new_tokens, &self.loaded.tokenizer));
            }
            prompts.push(ids);
        }
        let capacity = prompts.iter().map(Vec::len).max().unwrap_or(1) + self.config.max_new_tokens + 1;
        let slots = requests.len().min(64);
        let mut engine = Engine::new(&self.loaded.model, &self.loaded.tokenizer, slots, capacity);
        let mut generations = engine.generate(&requests)?.into_iter();
        Ok(prompts.into_iter().map(|ids| (ids, generations.by_ref().take(samples).collect())).collect())
    }

    /// Runs steps `start..config.steps`, writing metrics and checkpoints. `metrics.jsonl` and
    /// `rollouts.jsonl` are first cut back to the steps before `start`, so a resumed run never
    /// repeats a line; a checkpoint newer than `start` (an earlier run's) is refused rather
    /// than overwritten.
    pub fn run(&mut self, start: u64, mut progress: impl FnMut(&StepMetrics)) -> Result<Vec<StepMetrics>, RunError> {
        let checkpoints = self.checkpoints()?;
        let newer = checkpoints.list().into_iter().find(|(label, _)| *label > start).filter(|_| self.replica.0 == 0);
        if let Some((label, path)) = newer {
            return Err(RunError::Config(format!(
                "{} holds a checkpoint of step {label} from an earlier run; continue it with --resume or choose another output_dir",
                path.display()
            )));
        }
        keep_lines_before(&self.metrics_path, "run_step", start)?;
        keep_lines_before(&self.rank_dir().join("rollouts.jsonl"), "step", start)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.metrics_path)
            .map_err(|source| RunError::Io { path: self.metrics_path.clone(), source })?;
        let rollouts_path = self.rank_dir().join("rollouts.jsonl");
        let mut rollout_log = match self.config.log_rollouts {
            true => Some(std::fs::OpenOptions::new().create(true).append(true).open(&rollouts_path).map_err(|source| RunError::Io { path: rollouts_path.clone(), source })?),
            false => None,
        };
        let mut all = Vec::new();
        for step in start..self.config.steps {
            let (metrics, rollouts) = match self.step(step) {
                Err(RunError::Train(TrainError::Collective(err))) => {
                    self.checkpoint_after_lost_peer(step);
                    return Err(RunError::Collective(err));
                }
                other => other?,
            };
            if let Some(log) = rollout_log.as_mut() {
                let lines: String = rollouts.iter().map(|r| serde_json::to_string(r).unwrap_or_default() + "\n").collect();
                log.write_all(lines.as_bytes()).map_err(|source| RunError::Io { path: rollouts_path.clone(), source })?;
            }
            let line = serde_json::to_string(&metrics).unwrap_or_default();
            writeln!(file, "{line}").map_err(|source| RunError::Io { path: self.metrics_path.clone(), source })?;
            progress(&metrics);
            let last = step + 1 == self.config.steps;
            let due = last || (self.config.checkpoint_every > 0 && (step + 1) % self.config.checkpoint_every == 0);
            if due && self.replica.0 == 0 {
                let snapshot = TrainerSnapshot::capture(&mut self.trainer);
                checkpoints.write(step + 1, &snapshot, &self.loaded.name, serde_json::json!({"next_step": step + 1}))?;
            }
            all.push(metrics);
        }
        Ok(all)
    }

    /// After a peer was lost: this replica's adapters are those of the last step every replica
    /// took, so it saves them (in its own folder) before the run stops, to resume from.
    fn checkpoint_after_lost_peer(&mut self, step: u64) {
        let dir = self.rank_dir();
        let snapshot = TrainerSnapshot::capture(&mut self.trainer);
        let written = CheckpointStore::open(&dir, self.config.keep_checkpoints).and_then(|store| store.write(step, &snapshot, &self.loaded.name, serde_json::json!({"next_step": step})));
        match written {
            Ok(path) => tracing::error!(checkpoint = %path.display(), step, "a replica was lost; this one saved its adapters and stops training"),
            Err(err) => tracing::error!(dir = %dir.display(), %err, "a replica was lost, and saving this one's adapters failed"),
        }
    }

    /// Rewards and planning masks of one prompt's completions.
    /// Rewards from the plugin, one per generation; `None` marks an item the plugin failed
    /// (masked out, never scored 0). A whole-batch failure masks every item.
    fn plugin_rewards(&self, plugin: &crate::plugins::Plugin, example: &Example, prompt: &str, generations: &[Generation]) -> Vec<Option<f32>> {
        let metadata = serde_json::json!({"answer": example.answer}).to_string();
        let items = generations
            .iter()
            .map(|g| hicra_sdk::RewardItem {
                prompt: prompt.into(),
                completion: g.text.as_str().into(),
                token_ids: g.tokens.iter().map(|t| t.id).collect(),
                metadata_json: metadata.as_str().into(),
            })
            .collect();
        match plugin.score(items, std::time::Duration::from_secs(30)) {
            Ok(results) => results.into_iter().map(|r| r.ok().map(|s| s.score)).collect(),
            Err(err) => {
                tracing::warn!(%err, "reward plugin failed a batch; its items are masked");
                vec![None; generations.len()]
            }
        }
    }

    /// Rewards of one prompt's completions; the second value counts items a reward plugin
    /// failed (left out of the group).
    fn score_group(&self, example: &Example, prompt_ids: &[u32], generations: Vec<Generation>) -> (Vec<ScoredCompletion>, usize) {
        let rewards: Vec<Option<f32>> = match &self.plugin {
            Some(plugin) => {
                let prompt = self.loaded.tokenizer.decode(prompt_ids, false).unwrap_or_default();
                self.plugin_rewards(plugin, example, &prompt, &generations)
            }
            None => generations.iter().map(|g| Some(self.reward(&g.text, &example.answer))).collect(),
        };
        let masked = rewards.iter().filter(|r| r.is_none()).count();
        let completions = generations
            .into_iter()
            .zip(rewards)
            .enumerate()
            .filter_map(|(index, (generation, reward))| {
                let reward = reward?;
                let pieces: Vec<String> = generation.tokens.iter().map(|t| t.text.clone()).collect();
                Some(ScoredCompletion {
                    id: format!("sample-{index}"),
                    prompt_ids: prompt_ids.to_vec(),
                    sampling: SamplingParams { temperature: self.config.temperature, ..SamplingParams::default() },
                    pieces,
                    completion_ids: generation.tokens.iter().map(|t| t.id).collect(),
                    logprobs: generation.tokens.iter().map(|t| t.sampling_logprob).collect(),
                    entropies: generation.tokens.iter().map(|t| t.entropy).collect(),
                    reward,
                    sampled_mask: Vec::new(),
                })
            })
            .collect();
        (completions, masked)
    }

    /// Takes step 0's untrained evaluation from another run instead of measuring it again:
    /// valid for a run whose [`RunConfig::start_evaluation_key`] is the same (before any step
    /// the adapters add nothing, so only the model, the held-out set, the sampling and the
    /// scoring decide it). `hicra compare` uses it for the arms of one seed.
    pub fn reuse_start_evaluation(&mut self, pass1: f64, pass_k: f64) {
        self.known_start_evaluation = Some((pass1, pass_k));
    }

    /// One loop step: sample, score, train; returns its metrics and its rewarded rollouts.
    fn step(&mut self, step: u64) -> Result<(StepMetrics, Vec<RolloutRecord>), RunError> {
        // libtorch's generator drives LoRA dropout; seeding it from (seed, step) makes a resumed
        // run draw what an uninterrupted one draws, with nothing extra in the checkpoint.
        // Replicas draw their own masks (rank 0's are a single process's).
        tch::manual_seed((self.config.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((self.replica.0 as u64) << 56)) as i64);
        let n = self.config.prompts_per_step;
        // With replicas, each samples its share; indices stay those of the whole step.
        let (first, count) = self.shard(n);
        let batch: Vec<&Example> = (first..first + count).map(|i| &self.train[(step as usize * n + i) % self.train.len()]).collect();
        let (eval_start_pass1, eval_start_pass_k) = match (step == 0 && self.config.eval_before_training && !self.eval.is_empty(), self.known_start_evaluation) {
            (true, Some((pass1, pass_k))) => (Some(pass1), Some(pass_k)),
            (true, None) => self.evaluate(0).map(|(a, b)| (Some(a), Some(b)))?,
            (false, _) => (None, None),
        };
        let started = Instant::now();
        let (scored, masked): (Vec<ScoredGroup>, usize) = match self.episode_turns() {
            Some(turns) => (self.sample_episodes(&batch, first, self.config.group_size, step, turns)?, 0),
            None => {
                let sampled = self.sample(&batch, first, self.config.group_size, step, self.config.temperature)?;
                let mut masked = 0;
                let scored = batch
                    .iter()
                    .zip(sampled)
                    .map(|(example, (prompt_ids, generations))| {
                        let (members, m) = self.score_group(example, &prompt_ids, generations);
                        masked += m;
                        (prompt_ids, members)
                    })
                    .collect();
                (scored, masked)
            }
        };
        let mut groups = Vec::new();
        let mut rollouts = Vec::new();
        let (mut resampled, mut masked_items) = (0, masked);
        let mut plugin_report = self.step_plugins.report();
        for (local, (example, (prompt_ids, members))) in batch.iter().zip(scored).enumerate() {
            let p = first + local;
            let mut members = members;
            // Equal rewards carry no GRPO signal: draw the group again, a bounded number of times
            // (single-turn samples only).
            let resample = if self.episode_turns().is_some() { 0 } else { self.config.resample_equal_groups };
            for attempt in 1..=resample {
                if members.windows(2).all(|w| w[0].reward == w[1].reward) {
                    let tag = step ^ ((attempt as u64) << 40) ^ ((p as u64) << 48);
                    let again = self.sample(&[*example], 0, self.config.group_size, tag, self.config.temperature)?;
                    let generations = again.into_iter().next().map(|(_, g)| g).unwrap_or_default();
                    let (again, masked) = self.score_group(example, &prompt_ids, generations);
                    members = again;
                    masked_items += masked;
                    resampled += 1;
                }
            }
            let group = format!("{step}-{p}");
            // The analyses look at the model's own tokens: an episode's context is left out.
            let sampled = |m: &ScoredCompletion, i: usize| m.sampled_mask.get(i).copied().unwrap_or(true);
            rollouts.extend(members.iter().map(|m| RolloutRecord {
                step,
                group: group.clone(),
                reward: m.reward,
                pieces: m.pieces.iter().enumerate().filter(|&(i, _)| sampled(m, i)).map(|(_, p)| p.clone()).collect(),
                logprobs: m.logprobs.iter().enumerate().filter(|&(i, _)| sampled(m, i)).map(|(_, v)| *v).collect(),
                entropies: m.entropies.iter().enumerate().filter(|&(i, _)| sampled(m, i)).map(|(_, v)| *v).collect(),
                ..RolloutRecord::default()
            }));
            groups.extend(self.step_plugins.build_group(group, members, &self.grams, &mut plugin_report));
        }
        let sample_seconds = started.elapsed().as_secs_f64();
        let train = self.trainer.step(&self.loaded.model, &groups)?;
        let evaluate = (self.config.eval_every > 0 && (step + 1).is_multiple_of(self.config.eval_every)) || step + 1 == self.config.steps;
        let (eval_pass1, eval_pass_k) = if evaluate && !self.eval.is_empty() { self.evaluate(step + 1).map(|(a, b)| (Some(a), Some(b)))? } else { (None, None) };
        let metrics = StepMetrics {
            run_step: step,
            train,
            analysis: analyze_step(&rollouts, &self.grams),
            resampled_groups: resampled,
            masked_items: masked_items + plugin_report.masked_items,
            dropped_groups: plugin_report.dropped_groups,
            eval_pass1,
            eval_pass_k,
            eval_start_pass1,
            eval_start_pass_k,
            sample_seconds,
        };
        Ok((metrics, rollouts))
    }

    /// pass@1 (mean correctness) and pass@k (any correct among k) on held-out prompts after
    /// `after_steps` optimizer steps; the sampling seed depends on that count only, so every
    /// arm of a comparison draws alike at the same step. With replicas each evaluates its share
    /// of the prompts and the sums are all-reduced (every replica calls this at the same steps).
    pub fn evaluate(&self, after_steps: u64) -> Result<(f64, f64), RunError> {
        let all: Vec<&Example> = self.eval.iter().take(self.config.eval_prompts.max(1)).collect();
        let (first, count) = self.shard(all.len());
        let examples = &all[first..first + count];
        let k = self.config.eval_samples.max(1);
        let sampled = self.sample(examples, first, k, u64::MAX - after_steps, self.config.temperature.clamp(0.0, 0.6))?;
        let (mut pass1, mut pass_k) = (0.0, 0.0);
        for (example, (_, generations)) in examples.iter().zip(sampled) {
            let scores: Vec<f32> = generations.iter().map(|g| self.reward(&g.text, &example.answer)).collect();
            pass1 += scores.iter().map(|&s| (s >= 1.0) as u32 as f64).sum::<f64>() / k as f64;
            pass_k += scores.iter().any(|&s| s >= 1.0) as u32 as f64;
        }
        if let Some(group) = self.trainer.group() {
            let sums = group.sum_values(&[pass1, pass_k])?;
            (pass1, pass_k) = (sums[0], sums[1]);
        }
        let n = all.len().max(1) as f64;
        Ok((pass1 / n, pass_k / n))
    }
}

/// Rewrites the JSON-lines file `path` keeping only lines whose `field` is below `before`
/// (a torn last line from a kill is dropped too). Written to a temporary file, fsynced and
/// renamed over the old one, so a crash leaves either version.
fn keep_lines_before(path: &std::path::Path, field: &str, before: u64) -> Result<(), RunError> {
    let io = |source| RunError::Io { path: path.to_path_buf(), source };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io(err)),
    };
    let kept: String = text
        .lines()
        .filter(|line| serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v[field].as_u64()).is_some_and(|step| step < before))
        .map(|line| format!("{line}\n"))
        .collect();
    if kept.len() == text.len() {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(kept.as_bytes()).and_then(|()| file.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
    }
    tracing::info!(path = %path.display(), before, "log cut back to the resumed step");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_evaluation_key_ignores_what_acts_only_once_training_starts() {
        let base = RunConfig::default();
        let other_credit = RunConfig { trainer: TrainerConfig { credit: crate::train::credit::CreditScheme::Grpo { scale_by_std: false }, ..base.trainer.clone() }, steps: 99, output_dir: "elsewhere".into(), ..base.clone() };
        assert_eq!(base.start_evaluation_key(), other_credit.start_evaluation_key());
        for changed in [RunConfig { temperature: 0.5, ..base.clone() }, RunConfig { eval_samples: 9, ..base.clone() }, RunConfig { seed: 3, ..base.clone() }, RunConfig { model: "other".into(), ..base.clone() }] {
            assert_ne!(base.start_evaluation_key(), changed.start_evaluation_key());
        }
    }

    #[test]
    fn last_number_reward_reads_the_final_number() {
        assert_eq!(last_number("so 3 + 4 = 7."), Some("7".into()));
        assert_eq!(last_number("the answer is -12"), Some("-12".into()));
        assert_eq!(last_number("1,234 apples"), Some("1234".into()));
        assert_eq!(last_number("none"), None);
        assert_eq!(score(RewardKind::MathLastNumber, "It is 7", "7"), 1.0);
        assert_eq!(score(RewardKind::Math, "It is 7", "7"), 0.0);
        assert_eq!(score(RewardKind::Math, "#### 7", "7"), 1.0);
        let pattern = regex::Regex::new(r"\bParis\b").expect("valid pattern");
        assert_eq!(reward::regex_reward("It is Paris.", &pattern), 1.0);
        assert_eq!(reward::regex_reward("Parisian", &pattern), 0.0);
    }
}
