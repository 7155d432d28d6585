//! The engine thread: one thread owns the model and its KV cache and runs continuous batching.
//!
//! HTTP handlers never touch tensors. They [`EngineHandle::submit`] a group of requests (the
//! `n` choices of one API call) and read [`SequenceEvent`]s from a channel. The thread loops:
//! take new submissions, admit as many queued sequences as there are free slots (one batched
//! prefill, identical prompts prefilled once), run one decode step over every active slot, and
//! dispatch the tokens. Sequences join and leave the batch at token boundaries. When a
//! receiver is gone (the client disconnected) the group's sequences are cancelled and their
//! slots freed.
//!
//! Backpressure: submissions beyond `max_queued_requests` waiting sequences, or
//! `max_queued_tokens` waiting prompt tokens, are refused at once ([`SubmitError::QueueFull`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::generate::{validate_request, Engine, FinishReason, GeneratedToken, GenerationRequest, TokenEvent};
use super::EngineError;
use crate::model::LoadedModel;
use crate::train::checkpoint::TrainerSnapshot;
use crate::train::trainer::{RolloutGroup, StepReport, Trainer, TrainerConfig};
use crate::tokenizer::Tokenizer;
use super::constraint::Constraints;

/// Limits of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Batch slots: sequences decoded together.
    pub max_batch: usize,
    /// Positions per slot (prompt + completion).
    pub capacity: usize,
    /// Sequences that may wait for a slot before submissions are refused.
    pub max_queued_requests: usize,
    /// Prompt tokens that may wait before submissions are refused.
    pub max_queued_tokens: usize,
    /// Reuse the keys and values a finished sequence left in its slot when a next prompt
    /// extends it (an agent's next turn), until the weights change.
    pub prefix_reuse: bool,
}

/// What a sequence reports to its submitter.
#[derive(Clone, Debug)]
pub enum SequenceEvent {
    /// A new token of choice `choice`.
    Token {
        /// Index of the request within its submission.
        choice: usize,
        /// The token.
        token: GeneratedToken,
        /// Policy version of the weights that produced it.
        policy_version: u64,
    },
    /// Choice `choice` ended; `text` is its whole output (cut before a stop string).
    Finished {
        /// Index of the request within its submission.
        choice: usize,
        /// Why it ended.
        reason: FinishReason,
        /// The decoded output.
        text: String,
        /// Policy version of the weights that produced the last token.
        policy_version: u64,
    },
    /// The submission could not run; no more events follow.
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Too much work is waiting.
    #[error("server is busy: this request needs {requested} queued {unit}, {waiting} of at most {limit} are taken")]
    QueueFull {
        /// What ran out: "sequences" or "prompt tokens".
        unit: &'static str,
        /// What is waiting now.
        waiting: usize,
        /// What the refused request needed.
        requested: usize,
        /// The configured limit.
        limit: usize,
    },
    /// More choices than batch slots.
    #[error("n = {n} exceeds the batch size {max_batch}")]
    TooManyChoices {
        /// Requested choices.
        n: usize,
        /// Batch slots.
        max_batch: usize,
    },
    /// A request is invalid for this model.
    #[error(transparent)]
    Invalid(#[from] EngineError),
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// Live counters the server exports.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Sequences waiting for a slot.
    pub queued_sequences: AtomicUsize,
    /// Prompt tokens waiting.
    pub queued_tokens: AtomicUsize,
    /// Sequences in the running batch.
    pub active_sequences: AtomicUsize,
    /// Tokens generated since start.
    pub generated_tokens: AtomicU64,
    /// Prompt tokens prefilled since start.
    pub prefilled_tokens: AtomicU64,
    /// Prompt tokens not prefilled because a slot still held their keys and values.
    pub reused_prefix_tokens: AtomicU64,
    /// Decode steps run.
    pub decode_steps: AtomicU64,
    /// Sum over decode steps of the batch size (mean batch = this / decode_steps).
    pub decode_batch_sum: AtomicU64,
    /// Sequences cancelled because their client went away.
    pub cancelled_sequences: AtomicU64,
    /// Generation throughput over the last busy second, in tokens/s (f64 bits).
    pub recent_tokens_per_s_bits: AtomicU64,
}

impl SchedulerStats {
    /// Generation throughput over the last busy second.
    pub fn recent_tokens_per_s(&self) -> f64 {
        f64::from_bits(self.recent_tokens_per_s_bits.load(Ordering::Relaxed))
    }

    /// Reserves queue room for `sequences` sequences holding `tokens` prompt tokens, all of it
    /// or none.
    fn reserve_queue(&self, sequences: usize, tokens: usize, config: &SchedulerConfig) -> Result<(), SubmitError> {
        reserve(&self.queued_sequences, sequences, config.max_queued_requests, "sequences")?;
        if let Err(err) = reserve(&self.queued_tokens, tokens, config.max_queued_tokens, "prompt tokens") {
            // Meanwhile these sequences may have made a concurrent submitter fail: refusing
            // too much for an instant is safe, exceeding the limit is not.
            self.queued_sequences.fetch_sub(sequences, Ordering::AcqRel);
            return Err(err);
        }
        Ok(())
    }

    /// Gives queue room back: when the engine takes a submission off the queue, or when a
    /// reserved submission could not be handed to the engine.
    fn release_queue(&self, sequences: usize, tokens: usize) {
        self.queued_sequences.fetch_sub(sequences, Ordering::AcqRel);
        self.queued_tokens.fetch_sub(tokens, Ordering::AcqRel);
    }
}

/// Adds `amount` to `counter` unless the sum would pass `limit`. `fetch_update` is a
/// compare-exchange loop, so the check and the add are one atomic step: two submitters can
/// no longer both see room for one and both take it.
fn reserve(counter: &AtomicUsize, amount: usize, limit: usize, unit: &'static str) -> Result<(), SubmitError> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| waiting.checked_add(amount).filter(|&total| total <= limit))
        .map(|_| ())
        .map_err(|waiting| SubmitError::QueueFull { unit, waiting, requested: amount, limit })
}

/// Prompt tokens of a group, the unit of `max_queued_tokens`.
fn prompt_tokens(requests: &[GenerationRequest]) -> usize {
    requests.iter().map(|r| r.prompt_ids.len()).sum()
}

/// Facts about the served model that handlers need without touching it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// Name clients use in `model`.
    pub name: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Positions per sequence.
    pub max_context: usize,
}

struct Submission {
    requests: Vec<GenerationRequest>,
    events: UnboundedSender<SequenceEvent>,
}

/// Work for the engine thread.
enum Command {
    /// Generate these requests.
    Generate(Submission),
    /// Run one training step on these groups between decode steps.
    Train(Vec<RolloutGroup>, tokio::sync::oneshot::Sender<Result<StepReport, String>>),
    /// Copy the trainer's state for a checkpoint, between decode steps.
    Snapshot(tokio::sync::oneshot::Sender<Option<TrainerSnapshot>>),
    /// Teacher-forced logprobs of these prompts' tokens, with this many alternatives each.
    ScorePrompts(Vec<Vec<u32>>, usize, tokio::sync::oneshot::Sender<Result<ScoredPrompts, EngineError>>),
}

/// [`EngineHandle::score_prompts`]'s answer.
#[derive(Clone, Debug)]
pub struct ScoredPrompts {
    /// Per prompt, its tokens after the first (the first has no context to score it by).
    pub prompts: Vec<Vec<crate::engine::PromptToken>>,
    /// The policy version that scored them (no training step runs in between).
    pub policy_version: u64,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    config: Arc<SchedulerConfig>,
    /// Live counters.
    pub stats: Arc<SchedulerStats>,
    /// The served model.
    pub info: Arc<ModelInfo>,
    /// The tokenizer, shared read-only with handlers for templating and decoding.
    pub tokenizer: Arc<Tokenizer>,
    /// Compiles structured-output constraints: handlers check a request's before submitting.
    pub constraints: Arc<Constraints>,
    /// Incremented by each optimizer step.
    pub policy_version: Arc<AtomicU64>,
    /// Set when the engine trains online.
    trainer_config: Option<Arc<TrainerConfig>>,
}

impl EngineHandle {
    /// Queues a group of requests; events arrive on the returned receiver. Refuses at once
    /// when the queue is full, the group is larger than the batch, or a request is invalid.
    pub fn submit(&self, requests: Vec<GenerationRequest>) -> Result<UnboundedReceiver<SequenceEvent>, SubmitError> {
        self.submit_all(vec![requests])?.pop().ok_or(SubmitError::Stopped)
    }

    /// Queues several groups (the prompts of one batch request) all or nothing: queue room
    /// for every group is reserved in one step before any is queued, so a refused batch
    /// leaves nothing behind. Receivers come back in the order of `groups`.
    pub fn submit_all(&self, groups: Vec<Vec<GenerationRequest>>) -> Result<Vec<UnboundedReceiver<SequenceEvent>>, SubmitError> {
        for requests in &groups {
            self.submit_check(requests)?;
        }
        let mut sequences: usize = groups.iter().map(Vec::len).sum();
        let mut tokens: usize = groups.iter().map(|g| prompt_tokens(g)).sum();
        self.stats.reserve_queue(sequences, tokens, &self.config)?;
        let mut receivers = Vec::with_capacity(groups.len());
        for requests in groups {
            let (group_sequences, group_tokens) = (requests.len(), prompt_tokens(&requests));
            let (events, receiver) = unbounded_channel();
            if self.commands.send(Command::Generate(Submission { requests, events })).is_err() {
                // The engine thread is gone and will admit nothing: return the room of what
                // it did not receive (the engine releases what it takes off its queue).
                self.stats.release_queue(sequences, tokens);
                return Err(SubmitError::Stopped);
            }
            sequences -= group_sequences;
            tokens -= group_tokens;
            receivers.push(receiver);
        }
        Ok(receivers)
    }

    /// The checks made before queueing, so errors are immediate: the group fits the batch and
    /// every request passes the engine's own validation.
    fn submit_check(&self, requests: &[GenerationRequest]) -> Result<(), SubmitError> {
        if requests.len() > self.config.max_batch {
            return Err(SubmitError::TooManyChoices { n: requests.len(), max_batch: self.config.max_batch });
        }
        for request in requests {
            validate_request(request, self.info.vocab_size, self.info.max_context)?;
        }
        Ok(())
    }

    /// Whether the engine was started with a trainer.
    pub fn can_train(&self) -> bool {
        self.trainer_config.is_some()
    }

    /// The training configuration, when training is on.
    pub fn trainer_config(&self) -> Option<&TrainerConfig> {
        self.trainer_config.as_deref()
    }

    /// Runs a training step on the engine thread between decode steps; the served adapters
    /// change in place and `policy_version` increments when it updates.
    pub async fn train(&self, groups: Vec<RolloutGroup>) -> Result<StepReport, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands.send(Command::Train(groups, reply)).map_err(|_| "the engine has stopped".to_string())?;
        answer.await.map_err(|_| "the engine dropped the training step".to_string())?
    }

    /// Teacher-forced logprobs of every token of each prompt (after its first) under the
    /// served policy, with `top_k` alternatives per position, computed on the engine thread
    /// between decode steps: the numbers a sampler at temperature 1 would report for them.
    /// A prompt that is empty, over the context or outside the vocabulary is
    /// [`SubmitError::Invalid`], checked here before the engine sees it.
    pub async fn score_prompts(&self, prompts: Vec<Vec<u32>>, top_k: usize) -> Result<ScoredPrompts, SubmitError> {
        for prompt in &prompts {
            crate::engine::validate_prompt(prompt, self.info.vocab_size, self.info.max_context, false)?;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands.send(Command::ScorePrompts(prompts, top_k, reply)).map_err(|_| SubmitError::Stopped)?;
        Ok(answer.await.map_err(|_| SubmitError::Stopped)??)
    }

    /// A copy of the trainer's state (adapters, optimizer, versions) taken between decode
    /// steps, for a checkpoint; `None` without training.
    pub async fn snapshot(&self) -> Result<Option<TrainerSnapshot>, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands.send(Command::Snapshot(reply)).map_err(|_| "the engine has stopped".to_string())?;
        answer.await.map_err(|_| "the engine dropped the snapshot".to_string())
    }
}

/// Starts the engine thread, which takes ownership of the model. With a `trainer` (built on
/// this model, adapters attached and possibly restored from a checkpoint) the thread accepts
/// training steps and serves from the trainer's policy version on.
pub fn spawn(loaded: LoadedModel, config: SchedulerConfig, trainer: Option<Trainer>) -> std::io::Result<EngineHandle> {
    let capacity = config.capacity.min(loaded.model.max_positions());
    let config = SchedulerConfig { capacity, max_batch: config.max_batch.max(1), ..config };
    let info = Arc::new(ModelInfo { name: loaded.name.clone(), vocab_size: loaded.model.config().vocab_size, max_context: capacity });
    let stats = Arc::new(SchedulerStats::default());
    let policy_version = Arc::new(AtomicU64::new(trainer.as_ref().map(Trainer::policy_version).unwrap_or(0)));
    let (commands, inbox) = mpsc::channel();
    let LoadedModel { model, tokenizer, .. } = loaded;
    let training = trainer.as_ref().map(|t| t.config().clone());
    let tokenizer = Arc::new(tokenizer);
    let constraints = Arc::new(Constraints::new(tokenizer.clone(), model.config().vocab_size));
    let mut trainer = trainer;
    if let Some(trainer) = trainer.as_mut() {
        trainer.set_constraints(constraints.clone());
    }
    let handle = EngineHandle {
        constraints: constraints.clone(),
        commands,
        config: Arc::new(config.clone()),
        stats: stats.clone(),
        info,
        tokenizer: tokenizer.clone(),
        policy_version: policy_version.clone(),
        trainer_config: training.map(Arc::new),
    };
    let (ready, started) = mpsc::channel();
    std::thread::Builder::new().name("hicra-engine".into()).spawn(move || {
        let mut engine = Engine::new(&model, &tokenizer, config.max_batch, config.capacity);
        engine.set_prefix_reuse(config.prefix_reuse);
        engine.set_constraints(constraints);
        tracing::info!(slots = config.max_batch, capacity = config.capacity, kv_cache_mib = engine.kv_cache_bytes() >> 20, training = trainer.is_some(), "engine ready");
        let _ = ready.send(());
        Scheduler {
            engine,
            model: &model,
            trainer,
            inbox,
            stats,
            policy_version,
            waiting: VecDeque::new(),
            routes: HashMap::new(),
            groups: HashMap::new(),
            next_id: 0,
        }
        .run();
    })?;
    // Serve only once the KV cache exists, so a healthy server answers at full speed.
    started.recv().map_err(|_| std::io::Error::other("the engine thread died while allocating its KV cache"))?;
    Ok(handle)
}

/// Where a running sequence's events go.
struct Route {
    group: u64,
    choice: usize,
}

struct Scheduler<'m> {
    engine: Engine<'m>,
    model: &'m crate::model::Transformer,
    trainer: Option<Trainer>,
    inbox: mpsc::Receiver<Command>,
    stats: Arc<SchedulerStats>,
    policy_version: Arc<AtomicU64>,
    /// Submissions waiting for slots, whole (the n choices of a request start together).
    waiting: VecDeque<(u64, Submission)>,
    routes: HashMap<u64, Route>,
    /// Group id -> (event sender, sequences still running).
    groups: HashMap<u64, (UnboundedSender<SequenceEvent>, usize)>,
    next_id: u64,
}

impl Scheduler<'_> {
    fn run(mut self) {
        let mut window_started = Instant::now();
        let mut window_tokens = 0u64;
        loop {
            if !self.take_submissions() {
                return;
            }
            let produced = match self.admit_waiting() {
                Some(events) => self.dispatch(events),
                None => 0,
            };
            let produced = produced + if self.engine.active() > 0 { self.decode() } else { 0 };
            window_tokens += produced as u64;
            let elapsed = window_started.elapsed().as_secs_f64();
            if elapsed >= 1.0 || self.engine.active() == 0 {
                let rate = if elapsed > 0.0 { window_tokens as f64 / elapsed } else { 0.0 };
                self.stats.recent_tokens_per_s_bits.store(rate.to_bits(), Ordering::Relaxed);
                window_started = Instant::now();
                window_tokens = 0;
            }
            self.stats.active_sequences.store(self.engine.active(), Ordering::Relaxed);
        }
    }

    /// Moves new submissions into the waiting queue; blocks when there is nothing to do.
    /// Returns false when every handle is gone and no work remains.
    fn take_submissions(&mut self) -> bool {
        if self.engine.active() == 0 && self.waiting.is_empty() {
            match self.inbox.recv() {
                Ok(command) => self.handle(command),
                Err(_) => return false,
            }
        }
        while let Ok(command) = self.inbox.try_recv() {
            self.handle(command);
        }
        true
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Generate(submission) => self.enqueue(submission),
            Command::Train(groups, reply) => {
                // Between decode steps: sequences in flight continue on the new weights.
                let result = match &mut self.trainer {
                    Some(trainer) => trainer.step(self.model, &groups).map_err(|e| e.to_string()),
                    None => Err("this server was started without training".to_string()),
                };
                if let Ok(report) = &result {
                    self.policy_version.store(report.policy_version, Ordering::Release);
                    if report.updated {
                        self.engine.invalidate_prefixes();
                    }
                }
                let _ = reply.send(result);
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(self.trainer.as_mut().map(TrainerSnapshot::capture));
            }
            Command::ScorePrompts(prompts, top_k, reply) => {
                let scored: Result<Vec<_>, _> = prompts.iter().map(|ids| crate::engine::score_prompt(self.model, ids, top_k)).collect();
                let policy_version = self.policy_version.load(Ordering::Acquire);
                let _ = reply.send(scored.map(|prompts| ScoredPrompts { prompts, policy_version }));
            }
        }
    }

    fn enqueue(&mut self, submission: Submission) {
        let group = self.next_id;
        self.next_id += 1;
        self.waiting.push_back((group, submission));
    }

    /// Admits waiting submissions, first come first served, while their choices fit.
    fn admit_waiting(&mut self) -> Option<Vec<TokenEvent>> {
        let mut batch = Vec::new();
        let mut free = self.engine.free_slots();
        while let Some((_, front)) = self.waiting.front() {
            if front.requests.len() > free {
                break;
            }
            let Some((group, submission)) = self.waiting.pop_front() else { break };
            let tokens = prompt_tokens(&submission.requests);
            self.stats.release_queue(submission.requests.len(), tokens);
            if submission.events.is_closed() {
                continue;
            }
            free -= submission.requests.len();
            self.stats.prefilled_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
            self.groups.insert(group, (submission.events, submission.requests.len()));
            for (choice, request) in submission.requests.into_iter().enumerate() {
                let id = self.next_id;
                self.next_id += 1;
                self.routes.insert(id, Route { group, choice });
                batch.push((id, request));
            }
        }
        if batch.is_empty() {
            return None;
        }
        let ids: Vec<u64> = batch.iter().map(|(id, _)| *id).collect();
        match self.engine.admit(batch) {
            Ok(events) => {
                self.stats.reused_prefix_tokens.store(self.engine.reused_tokens(), Ordering::Relaxed);
                Some(events)
            }
            Err(err) => {
                // Requests were validated on submit; reaching here is an engine fault. Fail the
                // affected groups rather than the whole server.
                self.fail(&ids, &err.to_string());
                None
            }
        }
    }

    fn decode(&mut self) -> usize {
        let batch = self.engine.active();
        match self.engine.step() {
            Ok(events) => {
                self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
                self.stats.decode_batch_sum.fetch_add(batch as u64, Ordering::Relaxed);
                self.dispatch(events)
            }
            Err(err) => {
                let ids: Vec<u64> = self.routes.keys().copied().collect();
                self.fail(&ids, &err.to_string());
                0
            }
        }
    }

    /// Sends events to their submitters; cancels the groups whose receivers are gone.
    fn dispatch(&mut self, events: Vec<TokenEvent>) -> usize {
        let produced = events.len();
        self.stats.generated_tokens.fetch_add(produced as u64, Ordering::Relaxed);
        let version = self.policy_version.load(Ordering::Relaxed);
        let mut gone = Vec::new();
        for event in events {
            let Some(route) = self.routes.get(&event.sequence_id) else { continue };
            let (group, choice) = (route.group, route.choice);
            let Some((sender, running)) = self.groups.get_mut(&group) else { continue };
            let mut delivered = sender.send(SequenceEvent::Token { choice, token: event.token, policy_version: version }).is_ok();
            if let Some(reason) = event.finished {
                let text = event.final_text.unwrap_or_default();
                delivered &= sender.send(SequenceEvent::Finished { choice, reason, text, policy_version: version }).is_ok();
                self.routes.remove(&event.sequence_id);
                *running -= 1;
                if *running == 0 {
                    self.groups.remove(&group);
                }
            }
            if !delivered {
                gone.push(group);
            }
        }
        for group in gone {
            self.cancel_group(group);
        }
        produced
    }

    fn cancel_group(&mut self, group: u64) {
        let ids: Vec<u64> = self.routes.iter().filter(|(_, r)| r.group == group).map(|(id, _)| *id).collect();
        for id in ids {
            self.routes.remove(&id);
            if self.engine.cancel(id) {
                self.stats.cancelled_sequences.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.groups.remove(&group);
    }

    fn fail(&mut self, ids: &[u64], message: &str) {
        tracing::error!(%message, sequences = ids.len(), "engine failure; failing the affected requests");
        let groups: Vec<u64> = ids.iter().filter_map(|id| self.routes.get(id).map(|r| r.group)).collect();
        for group in groups {
            if let Some((sender, _)) = self.groups.get(&group) {
                let _ = sender.send(SequenceEvent::Failed { message: message.to_string() });
            }
            self.cancel_group(group);
        }
    }
}
