//! The paper's analyses of a training run (hicra.md section 4), computed from rollouts: the
//! same function measures a step live (offline loop and server) and replays a run's rollout
//! log afterwards (`hicra analyze`).
//!
//! Per step, over the rollouts sampled for it:
//! - token entropy and perplexity of planning vs execution tokens (planning = inside a
//!   Strategic-Gram occurrence); relative perplexity divides by the run's first step;
//! - semantic entropy: Shannon entropy of the Strategic-Gram occurrence distribution;
//! - conditional entropy of the non-strategic n-gram (the next [`FOLLOWING_WORDS`] words,
//!   punctuation skipped) given the Strategic Gram just before it: low = each strategy is
//!   followed by the same execution, high = strategies are followed by varied continuations;
//! - response length, accuracy (reward >= 1) and pass@k (a group with any correct rollout).
//!
//! Entropies are those of the sampling distribution, recorded when each token was drawn.
//! Occurrences are counted at their longest: "but" inside "but wait" is one occurrence of
//! "but wait", not two occurrences.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::train::planning::{for_each_word, spans_from_pieces, SgMatch, StrategicGrams};

/// Words after a Strategic Gram that form the continuation n-gram.
pub const FOLLOWING_WORDS: usize = 3;

/// One rewarded rollout as logged (`rollouts.jsonl` of a run, or a server's `--rollout-log`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// Training step (offline) or the policy version that sampled it (online).
    pub step: u64,
    /// The group (prompt) it belongs to, for pass@k.
    pub group: String,
    /// Its reward.
    pub reward: f32,
    /// The text each completion token added.
    pub pieces: Vec<String>,
    /// Sampling logprob of each token.
    pub logprobs: Vec<f32>,
    /// Sampling entropy at each token (may be empty in old logs).
    #[serde(default)]
    pub entropies: Vec<f32>,
    /// The rollout's id, when it has one (online).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    /// Policy version at its first token, when known; `step` is the version at its last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version_first: Option<u64>,
    /// The advantage the step gave each token (empty when it was not trained on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advantages: Vec<f32>,
}

/// The analyses of one step. Means over no tokens are `null` in JSON.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepAnalysis {
    /// Rollouts analysed.
    pub rollouts: usize,
    /// Share of rollouts with reward >= 1.
    pub accuracy: f64,
    /// Share of groups with at least one rollout of reward >= 1.
    pub pass_at_k: f64,
    /// Rollouts per group (the k of pass@k), the largest seen.
    pub group_size: usize,
    /// Mean completion length in tokens.
    pub sampled_length: f64,
    /// Share of completion tokens that are planning tokens.
    pub sampled_planning_share: f64,
    /// Mean sampling entropy of planning tokens (nats).
    pub sampled_entropy_planning: Option<f64>,
    /// Mean sampling entropy of execution tokens (nats).
    pub sampled_entropy_execution: Option<f64>,
    /// exp(-mean logprob) over planning tokens.
    pub perplexity_planning: Option<f64>,
    /// exp(-mean logprob) over execution tokens.
    pub perplexity_execution: Option<f64>,
    /// Strategic-Gram occurrences.
    pub strategic_grams: usize,
    /// Shannon entropy (nats) of the Strategic-Gram occurrence distribution.
    pub semantic_entropy: f64,
    /// H(next non-strategic n-gram | preceding Strategic Gram), nats.
    pub conditional_entropy: Option<f64>,
}

/// Running sum and count.
#[derive(Default)]
struct Mean {
    sum: f64,
    count: usize,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.sum += x;
        self.count += 1;
    }
    fn value(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Analyses one step's rollouts with `grams` marking planning tokens.
pub fn analyze_step(rollouts: &[RolloutRecord], grams: &StrategicGrams) -> StepAnalysis {
    let (mut entropy_plan, mut entropy_exec, mut logprob_plan, mut logprob_exec) = (Mean::default(), Mean::default(), Mean::default(), Mean::default());
    let (mut tokens, mut planning_tokens) = (0usize, 0usize);
    let mut gram_counts: HashMap<String, usize> = HashMap::new();
    let mut followers: HashMap<String, HashMap<String, usize>> = HashMap::new();
    let mut groups: BTreeMap<&str, (usize, bool)> = BTreeMap::new();
    for rollout in rollouts {
        let pieces: Vec<&str> = rollout.pieces.iter().map(String::as_str).collect();
        let text = pieces.concat();
        let matches = longest_matches(grams.find(&text));
        let mask = grams.token_mask(&text, &spans_from_pieces(&pieces));
        for (i, &planning) in mask.iter().enumerate() {
            let (entropy, logprob) = if planning { (&mut entropy_plan, &mut logprob_plan) } else { (&mut entropy_exec, &mut logprob_exec) };
            if let Some(&h) = rollout.entropies.get(i) {
                entropy.add(h as f64);
            }
            if let Some(&lp) = rollout.logprobs.get(i) {
                logprob.add(lp as f64);
            }
        }
        tokens += mask.len();
        planning_tokens += mask.iter().filter(|&&p| p).count();
        for m in &matches {
            *gram_counts.entry(m.phrase.clone()).or_default() += 1;
            if let Some(next) = following_words(&text, m.end, &matches) {
                *followers.entry(m.phrase.clone()).or_default().entry(next).or_default() += 1;
            }
        }
        let group = groups.entry(rollout.group.as_str()).or_default();
        group.0 += 1;
        group.1 |= rollout.reward >= 1.0;
    }
    let n = rollouts.len();
    StepAnalysis {
        rollouts: n,
        accuracy: rollouts.iter().filter(|r| r.reward >= 1.0).count() as f64 / n.max(1) as f64,
        pass_at_k: groups.values().filter(|g| g.1).count() as f64 / groups.len().max(1) as f64,
        group_size: groups.values().map(|g| g.0).max().unwrap_or(0),
        sampled_length: tokens as f64 / n.max(1) as f64,
        sampled_planning_share: planning_tokens as f64 / tokens.max(1) as f64,
        sampled_entropy_planning: entropy_plan.value(),
        sampled_entropy_execution: entropy_exec.value(),
        perplexity_planning: logprob_plan.value().map(|m| (-m).exp()),
        perplexity_execution: logprob_exec.value().map(|m| (-m).exp()),
        strategic_grams: gram_counts.values().sum(),
        semantic_entropy: crate::train::planning::semantic_entropy(gram_counts.values()),
        conditional_entropy: conditional_entropy(&followers),
    }
}

/// Drops the matches that lie inside a longer one.
fn longest_matches(matches: Vec<SgMatch>) -> Vec<SgMatch> {
    let inside = |m: &SgMatch, other: &SgMatch| other.start <= m.start && m.end <= other.end && (other.end - other.start) > (m.end - m.start);
    matches.iter().filter(|m| !matches.iter().any(|other| inside(m, other))).cloned().collect()
}

/// The [`FOLLOWING_WORDS`] words (punctuation skipped) after byte offset `end`, unless a
/// Strategic Gram overlaps them (then the continuation is strategic, not execution) or the
/// text ends first.
fn following_words(text: &str, end: usize, matches: &[SgMatch]) -> Option<String> {
    let rest = text.get(end..)?;
    let mut words = Vec::new();
    let mut last_end = end;
    for_each_word(rest, |_, e, word| {
        if words.len() < FOLLOWING_WORDS && word.chars().any(char::is_alphanumeric) {
            words.push(word.to_string());
            last_end = end + e;
        }
    });
    let strategic = matches.iter().any(|m| m.end > end && m.start < last_end);
    (words.len() == FOLLOWING_WORDS && !strategic).then(|| words.join(" "))
}

/// H(Y | X) = sum over x of p(x) H(Y | X = x), from counts of (x, y).
fn conditional_entropy(counts: &HashMap<String, HashMap<String, usize>>) -> Option<f64> {
    let total: usize = counts.values().flat_map(|ys| ys.values()).sum();
    if total == 0 {
        return None;
    }
    let entropy = counts
        .values()
        .map(|ys| {
            let n: usize = ys.values().sum();
            let h: f64 = ys.values().map(|&c| {
                let p = c as f64 / n as f64;
                -p * p.ln()
            }).sum();
            n as f64 / total as f64 * h
        })
        .sum();
    Some(entropy)
}

/// A run's analyses, step by step, with relative perplexities.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunAnalysis {
    /// Where the rollouts came from.
    pub rollouts_file: PathBuf,
    /// One entry per step, in step order.
    pub steps: Vec<StepEntry>,
    /// First and last step side by side, for a quick read.
    pub first_vs_last: BTreeMap<String, (Option<f64>, Option<f64>)>,
}

/// One step of a [`RunAnalysis`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepEntry {
    /// The step.
    pub step: u64,
    /// Its analyses.
    #[serde(flatten)]
    pub analysis: StepAnalysis,
    /// Planning perplexity divided by the first step's (the first that has planning tokens).
    pub relative_perplexity_planning: Option<f64>,
    /// Execution perplexity divided by the first step's.
    pub relative_perplexity_execution: Option<f64>,
    /// Held-out pass@1 at this step, from the run's metrics.jsonl (when it evaluated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_pass1: Option<f64>,
    /// Held-out pass@k at this step, from the run's metrics.jsonl (when it evaluated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_pass_k: Option<f64>,
}

/// Why a rollout log could not be analysed.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a rollout record.
    #[error("{}:{line}: not a rollout record: {message}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parser's explanation.
        message: String,
    },
    /// The log holds no rollouts.
    #[error("{}: no rollouts to analyse", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Reads a rollout log (JSON lines of [`RolloutRecord`]) and analyses each step.
pub fn analyze_file(path: &Path, grams: &StrategicGrams) -> Result<RunAnalysis, AnalysisError> {
    let io = |source| AnalysisError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufRead::lines(std::io::BufReader::new(file)).enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(serde_json::from_str(&line).map_err(|e| AnalysisError::Record { path: path.to_path_buf(), line: i + 1, message: e.to_string() })?);
    }
    analyze_records(path, records, grams)
}

/// The per-step analyses of `records` (read from `source`: a rollout log or a journal).
pub fn analyze_records(source: &Path, records: Vec<RolloutRecord>, grams: &StrategicGrams) -> Result<RunAnalysis, AnalysisError> {
    let path = source;
    let mut by_step: BTreeMap<u64, Vec<RolloutRecord>> = BTreeMap::new();
    for record in records {
        by_step.entry(record.step).or_default().push(record);
    }
    if by_step.is_empty() {
        return Err(AnalysisError::Empty { path: path.to_path_buf() });
    }
    let mut steps: Vec<StepEntry> = by_step
        .into_iter()
        .map(|(step, rollouts)| StepEntry {
            step,
            analysis: analyze_step(&rollouts, grams),
            relative_perplexity_planning: None,
            relative_perplexity_execution: None,
            eval_pass1: None,
            eval_pass_k: None,
        })
        .collect();
    // Relative to the first step that has such tokens.
    let base_plan = steps.iter().find_map(|s| s.analysis.perplexity_planning);
    let base_exec = steps.iter().find_map(|s| s.analysis.perplexity_execution);
    for entry in &mut steps {
        entry.relative_perplexity_planning = entry.analysis.perplexity_planning.zip(base_plan).map(|(p, b)| p / b);
        entry.relative_perplexity_execution = entry.analysis.perplexity_execution.zip(base_exec).map(|(p, b)| p / b);
    }
    let first_vs_last = first_vs_last(&steps);
    Ok(RunAnalysis { rollouts_file: path.to_path_buf(), steps, first_vs_last })
}

/// Adds the held-out evaluations of a `hicra train` metrics.jsonl (`run_step`, `eval_pass1`,
/// `eval_pass_k`) to the steps they were measured at. Lines that are not JSON are skipped:
/// the rollout log is the analysis's source, metrics only add to it.
pub fn merge_evaluations(analysis: &mut RunAnalysis, metrics: &Path) -> Result<(), AnalysisError> {
    let text = std::fs::read_to_string(metrics).map_err(|source| AnalysisError::Io { path: metrics.to_path_buf(), source })?;
    for line in text.lines() {
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = row["run_step"].as_u64() else { continue };
        if let Some(entry) = analysis.steps.iter_mut().find(|e| e.step == step) {
            entry.eval_pass1 = row["eval_pass1"].as_f64().or(entry.eval_pass1);
            entry.eval_pass_k = row["eval_pass_k"].as_f64().or(entry.eval_pass_k);
        }
    }
    analysis.first_vs_last = first_vs_last(&analysis.steps);
    Ok(())
}

/// Every numeric field of the first and last step.
fn first_vs_last(steps: &[StepEntry]) -> BTreeMap<String, (Option<f64>, Option<f64>)> {
    let as_map = |entry: Option<&StepEntry>| -> serde_json::Map<String, serde_json::Value> {
        entry.and_then(|e| serde_json::to_value(e).ok()).and_then(|v| v.as_object().cloned()).unwrap_or_default()
    };
    let (first, last) = (as_map(steps.first()), as_map(steps.last()));
    first.keys().filter(|k| k.as_str() != "step").map(|k| (k.clone(), (first.get(k).and_then(|v| v.as_f64()), last.get(k).and_then(|v| v.as_f64())))).collect()
}

/// The charts `hicra analyze` draws: (file name, title, y axis label, series names).
pub const CHARTS: &[(&str, &str, &str, &[&str])] = &[
    ("token_entropy", "token entropy: planning vs execution", "entropy (nats)", &["sampled_entropy_planning", "sampled_entropy_execution"]),
    ("relative_perplexity", "relative perplexity: planning vs execution", "perplexity / first step's", &["relative_perplexity_planning", "relative_perplexity_execution"]),
    ("semantic_entropy", "semantic entropy of Strategic Grams", "entropy (nats)", &["semantic_entropy"]),
    ("conditional_entropy", "H(next n-gram | Strategic Gram)", "entropy (nats)", &["conditional_entropy"]),
    ("response_length", "response length", "tokens", &["sampled_length"]),
    ("accuracy", "accuracy and pass@k", "share correct", &["accuracy", "pass_at_k", "eval_pass1", "eval_pass_k"]),
];

/// Writes `summary.json` and the charts of `analysis` (PNG and SVG) into `out`; returns the files.
pub fn write_report(analysis: &RunAnalysis, out: &Path) -> Result<Vec<PathBuf>, AnalysisError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AnalysisError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let summary = out.join("summary.json");
    crate::files::write_atomically(&summary, serde_json::to_string_pretty(analysis).unwrap_or_default().as_bytes()).map_err(io(&summary))?;
    let mut written = vec![summary];
    let rows: Vec<serde_json::Value> = analysis.steps.iter().filter_map(|s| serde_json::to_value(s).ok()).collect();
    for (file_name, title, y_label, names) in CHARTS {
        let series: Vec<(&str, Vec<(f64, f64)>)> = names
            .iter()
            .map(|name| (*name, rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[*name].as_f64().filter(|v| v.is_finite())?))).collect()))
            .filter(|(_, points): &(&str, Vec<(f64, f64)>)| !points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let stem = out.join(file_name);
        let series = series.into_iter().map(|(name, points)| crate::plot::Series::line(name, points)).collect();
        let chart = crate::plot::Chart::over_steps(title, y_label, series);
        let files = chart.write(&stem).map_err(|e| AnalysisError::Io { path: stem.clone(), source: std::io::Error::other(e.to_string()) })?;
        written.extend(files);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, group: &str, reward: f32, pieces: &[&str], entropy: f32) -> RolloutRecord {
        RolloutRecord {
            step,
            group: group.into(),
            reward,
            pieces: pieces.iter().map(|p| p.to_string()).collect(),
            logprobs: vec![-1.0; pieces.len()],
            entropies: vec![entropy; pieces.len()],
            ..RolloutRecord::default()
        }
    }

    #[test]
    fn splits_planning_from_execution_and_counts_continuations() {
        let grams = StrategicGrams::from_phrases(["let me check", "but wait"]);
        // Tokens: "Let" " me" " check" " x" " is" " 4" "." — first three are planning.
        let a = record(0, "g1", 1.0, &["Let", " me", " check", " x", " is", " 4", "."], 2.0);
        let mut b = record(0, "g1", 0.0, &["But", " wait", " x", " is", " 5"], 1.0);
        b.logprobs = vec![-2.0; 5];
        let c = record(0, "g2", 0.0, &["Let", " me", " check", " y", " is", " 9"], 0.5);
        let step = analyze_step(&[a, b, c], &grams);
        assert_eq!(step.rollouts, 3);
        assert!((step.accuracy - 1.0 / 3.0).abs() < 1e-12);
        assert!((step.pass_at_k - 0.5).abs() < 1e-12, "g1 has a correct rollout, g2 none");
        assert_eq!(step.group_size, 2);
        assert_eq!(step.strategic_grams, 3);
        // Planning tokens: 3 (a) + 2 (b) + 3 (c); entropies 2, 1, 0.5.
        let expected_plan = (3.0 * 2.0 + 2.0 * 1.0 + 3.0 * 0.5) / 8.0;
        assert!((step.sampled_entropy_planning.unwrap_or(0.0) - expected_plan).abs() < 1e-9);
        // Semantic entropy of {let me check: 2, but wait: 1}.
        let p: [f64; 2] = [2.0 / 3.0, 1.0 / 3.0];
        assert!((step.semantic_entropy - p.iter().map(|p| -p * p.ln()).sum::<f64>()).abs() < 1e-9);
        // "let me check" is followed by "x is 4" and "y is 9" (H = ln 2); "but wait" by "x is 5"
        // (H = 0); weights 2/3 and 1/3.
        assert!((step.conditional_entropy.unwrap_or(0.0) - 2.0 / 3.0 * 2f64.ln()).abs() < 1e-9);
        // Execution perplexity: logprobs -1 (a, c) and -2 (b).
        assert!(step.perplexity_execution.unwrap_or(0.0) > 1f64.exp());
    }

    #[test]
    fn nested_grams_count_once_and_strategic_continuations_are_skipped() {
        let grams = StrategicGrams::from_phrases(["but", "but wait", "let me check"]);
        // "but wait" (not "but" too); its continuation "let me check" is strategic: skipped.
        let a = record(0, "g", 0.0, &["But", " wait", ",", " let", " me", " check", ":", " x", " is", " 5"], 1.0);
        let step = analyze_step(&[a], &grams);
        assert_eq!(step.strategic_grams, 2, "but wait + let me check");
        assert!((step.semantic_entropy - 2f64.ln()).abs() < 1e-9);
        // Only "let me check" -> "x is 5" (punctuation skipped) is counted: one pair, H = 0.
        assert_eq!(step.conditional_entropy, Some(0.0));
    }

    #[test]
    fn a_run_is_analysed_per_step_with_relative_perplexity_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("hicra-analysis-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("rollouts.jsonl");
        let mut later = record(1, "g", 1.0, &["Let", " me", " check", " it"], 1.0);
        later.logprobs = vec![-0.5; 4];
        let lines = [record(0, "g", 0.0, &["Let", " me", " check", " it"], 2.0), later].map(|r| serde_json::to_string(&r).unwrap_or_default());
        std::fs::write(&path, lines.join("\n")).expect("write");
        let run = analyze_file(&path, &StrategicGrams::from_phrases(["let me check"])).expect("analyse");
        assert_eq!(run.steps.len(), 2);
        assert_eq!(run.steps[0].relative_perplexity_planning, Some(1.0));
        let relative = run.steps[1].relative_perplexity_planning.unwrap_or(0.0);
        assert!((relative - (0.5f64).exp() / 1f64.exp()).abs() < 1e-9, "{relative}");
        let written = write_report(&run, &dir.join("out")).expect("report");
        assert!(written.iter().any(|p| p.ends_with("token_entropy.png")));
        std::fs::write(&path, "{\"step\": 0}\n").expect("write");
        let err = analyze_file(&path, &StrategicGrams::paper()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(":1: not a rollout record"), "{err}");
    }
}
