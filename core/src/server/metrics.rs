//! Prometheus text exposition for `GET /metrics`: request counts, queue depth, batch size,
//! throughput, and latency histograms. Hand-written: a few atomics need no metrics crate.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::collections::BTreeMap;

use crate::engine::scheduler::SchedulerStats;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A cumulative histogram of durations in seconds.
#[derive(Debug)]
pub struct Histogram {
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    total: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0), total: AtomicU64::new(0) }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", count.load(Ordering::Relaxed));
        }
        let total = self.total.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// The server's own metrics (the engine's live in [`SchedulerStats`]).
#[derive(Debug, Default)]
pub struct ServerMetrics {
    /// Requests by (endpoint, HTTP status).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Whole-request latency.
    pub request_latency: Histogram,
    /// Time from request arrival to the first generated token.
    pub time_to_first_token: Histogram,
    /// The last training step's report, as JSON fields.
    last_step: Mutex<Option<(crate::train::trainer::StepReport, crate::analysis::StepAnalysis)>>,
    /// Training steps run online.
    train_steps: AtomicU64,
    /// Items a reward plugin failed (masked, never scored 0), alone or with their whole call.
    plugin_failures: AtomicU64,
    /// Reward plugin calls that failed as a whole (panic, error, time-out, refused while hung).
    plugin_call_failures: AtomicU64,
}

impl ServerMetrics {
    /// Counts one finished request.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// Counts an item a plugin failed.
    pub fn count_plugin_failure(&self) {
        self.plugin_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a reward plugin call that failed as a whole (its items count as item failures).
    pub fn count_plugin_call_failure(&self) {
        self.plugin_call_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Remembers a training step for `/metrics`.
    pub fn record_step(&self, report: &crate::train::trainer::StepReport, batch: &crate::analysis::StepAnalysis) {
        self.train_steps.fetch_add(1, Ordering::Relaxed);
        *self.last_step.lock().unwrap_or_else(|p| p.into_inner()) = Some((report.clone(), batch.clone()));
    }

    /// The exposition text of the request and engine metrics.
    pub fn render(&self, engine: &SchedulerStats, rollouts: (usize, u64)) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP hicra_requests_total HTTP requests by endpoint and status.\n# TYPE hicra_requests_total counter");
        for ((endpoint, status), count) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "hicra_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {count}");
        }
        let gauge = write_metric;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        gauge(&mut out, "hicra_queue_depth", "Sequences waiting for a batch slot.", "gauge", engine.queued_sequences.load(Ordering::Relaxed) as f64);
        gauge(&mut out, "hicra_queued_prompt_tokens", "Prompt tokens waiting.", "gauge", engine.queued_tokens.load(Ordering::Relaxed) as f64);
        gauge(&mut out, "hicra_batch_size", "Sequences in the running batch.", "gauge", engine.active_sequences.load(Ordering::Relaxed) as f64);
        let steps = load(&engine.decode_steps);
        gauge(&mut out, "hicra_mean_batch_size", "Mean sequences per decode step since start.", "gauge", if steps > 0.0 { load(&engine.decode_batch_sum) / steps } else { 0.0 });
        gauge(&mut out, "hicra_tokens_per_second", "Generated tokens per second over the last busy second.", "gauge", engine.recent_tokens_per_s());
        gauge(&mut out, "hicra_generated_tokens_total", "Tokens generated.", "counter", load(&engine.generated_tokens));
        gauge(&mut out, "hicra_prompt_tokens_total", "Prompt tokens prefilled.", "counter", load(&engine.prefilled_tokens));
        gauge(&mut out, "hicra_prefix_reused_tokens_total", "Prompt tokens whose keys and values a slot still held (not prefilled again).", "counter", load(&engine.reused_prefix_tokens));
        gauge(&mut out, "hicra_decode_steps_total", "Decode steps run.", "counter", steps);
        gauge(&mut out, "hicra_sequences_cancelled_total", "Sequences cancelled because the client went away.", "counter", load(&engine.cancelled_sequences));
        gauge(&mut out, "hicra_rollouts_stored", "Rollouts held in the store.", "gauge", rollouts.0 as f64);
        gauge(&mut out, "hicra_rollouts_evicted_total", "Rollouts evicted from the store.", "counter", rollouts.1 as f64);
        if let Some(bytes) = crate::memory::resident_bytes() {
            gauge(&mut out, "process_resident_memory_bytes", "Resident memory size in bytes.", "gauge", bytes as f64);
        }
        gauge(&mut out, "hicra_train_steps_total", "Online training steps run.", "counter", load(&self.train_steps));
        gauge(&mut out, "hicra_plugin_item_failures_total", "Items a reward plugin failed, alone or with their whole call (masked, not scored).", "counter", load(&self.plugin_failures));
        gauge(&mut out, "hicra_plugin_call_failures_total", "Reward plugin calls that failed as a whole (panic, error, time-out, refused while hung).", "counter", load(&self.plugin_call_failures));
        if let Some((step, batch)) = self.last_step.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            for (name, help, value) in [
                ("hicra_train_accuracy", "Share of the last step's rollouts with reward >= 1.", batch.accuracy),
                ("hicra_train_pass_at_k", "Share of the last step's groups with a rollout of reward >= 1.", batch.pass_at_k),
                ("hicra_train_semantic_entropy", "Entropy of the Strategic-Gram distribution in the last step's rollouts.", batch.semantic_entropy),
                ("hicra_train_conditional_entropy", "Entropy of the n-gram after a Strategic Gram given the Strategic Gram, last step.", batch.conditional_entropy.unwrap_or(f64::NAN)),
                ("hicra_train_sampled_entropy_planning", "Mean sampling entropy of planning tokens in the last step's rollouts.", batch.sampled_entropy_planning.unwrap_or(f64::NAN)),
                ("hicra_train_sampled_entropy_execution", "Mean sampling entropy of execution tokens in the last step's rollouts.", batch.sampled_entropy_execution.unwrap_or(f64::NAN)),
                ("hicra_train_perplexity_planning", "Sampling perplexity of planning tokens in the last step's rollouts.", batch.perplexity_planning.unwrap_or(f64::NAN)),
                ("hicra_train_perplexity_execution", "Sampling perplexity of execution tokens in the last step's rollouts.", batch.perplexity_execution.unwrap_or(f64::NAN)),
                ("hicra_train_zero_variance_share", "Share of the last step's groups with equal rewards.", step.zero_variance_groups as f64 / step.groups.max(1) as f64),
                ("hicra_train_response_length", "Mean completion length in the last step.", step.response_length),
                ("hicra_train_policy_version", "Policy version after the last step.", step.policy_version as f64),
                ("hicra_train_reward_mean", "Mean reward of the last step's rollouts.", step.reward_mean),
                ("hicra_train_zero_variance_groups", "Equal-reward groups skipped in the last step.", step.zero_variance_groups as f64),
                ("hicra_train_loss", "Loss of the last step.", step.loss),
                ("hicra_train_clip_fraction", "Clipped-token share of the last step.", step.clip_fraction),
                ("hicra_train_kl", "Mean KL to the base policy in the last step.", step.kl),
                ("hicra_train_ratio_deviation_mean", "Mean |trainer/sampler probability ratio - 1| over the last step's tokens, before its update.", step.ratio_deviation_mean),
                ("hicra_train_ratio_deviation_max", "Largest |trainer/sampler probability ratio - 1| in the last step, before its update.", step.ratio_deviation_max),
                ("hicra_train_grad_norm", "Gradient norm of the last step.", step.grad_norm),
                ("hicra_train_planning_share", "Planning-token share of the last step.", step.planning_share),
                ("hicra_train_entropy_planning", "Mean planning-token entropy of the last step.", step.entropy_planning),
                ("hicra_train_entropy_execution", "Mean execution-token entropy of the last step.", step.entropy_execution),
                ("hicra_train_step_seconds", "Duration of the last step.", step.step_seconds),
                ("hicra_train_tokens_per_second", "Trained tokens per second in the last step.", step.tokens_per_s),
            ] {
                gauge(&mut out, name, help, "gauge", value);
            }
        }
        self.request_latency.render(&mut out, "hicra_request_duration_seconds", "Request latency.");
        self.time_to_first_token.render(&mut out, "hicra_time_to_first_token_seconds", "Time to the first generated token.");
        out
    }
}

/// Appends one metric in Prometheus' text format: its help line, its `kind` (`gauge` or
/// `counter`) and its value. Every unlabelled metric the server exports is written here.
pub(crate) fn write_metric(out: &mut String, name: &str, help: &str, kind: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}
