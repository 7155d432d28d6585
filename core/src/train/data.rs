//! Training data: JSONL files of prompts with reference answers, and two generated tasks that
//! need no download: bare arithmetic, and word problems of graded difficulty.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod word_problems;

/// One prompt and the answer its completions are scored against.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The question.
    pub prompt: String,
    /// The reference answer.
    pub answer: String,
}

/// Where examples come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// `a op b` questions with small operands, generated from a seed.
    Arithmetic {
        /// Number of examples.
        count: usize,
        /// Operands are drawn from `0..=max_operand`.
        max_operand: u32,
        /// Generator seed.
        seed: u64,
    },
    /// Word problems of graded difficulty, generated from a seed: a person starts with some
    /// items and then 1 to `max_steps` things happen (buys, gives away, gets boxes of). The
    /// number of events is the difficulty, drawn uniformly, so one file holds easy and hard
    /// problems and a model has something left to learn at every level.
    WordProblems {
        /// Number of examples.
        count: usize,
        /// The most events in one problem (1 to 6).
        max_steps: u32,
        /// Generator seed.
        seed: u64,
    },
    /// A JSONL file with a prompt field and an answer field per line.
    Jsonl {
        /// The file.
        path: PathBuf,
        /// Field holding the question.
        prompt_field: String,
        /// Field holding the reference answer.
        answer_field: String,
    },
}

impl Default for DataConfig {
    fn default() -> Self {
        Self::Arithmetic { count: 512, max_operand: 20, seed: 0 }
    }
}

/// Why data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a JSON object with the configured fields.
    #[error("{}:{line}: {reason}", path.display())]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No examples.
    #[error("the dataset is empty")]
    Empty,
    /// A generated task's parameters are out of range.
    #[error("{0}")]
    Parameters(String),
}

use crate::random::splitmix;

/// Loads or generates the examples.
pub fn load(config: &DataConfig) -> Result<Vec<Example>, DataError> {
    let examples = match config {
        DataConfig::Arithmetic { count, max_operand, seed } => arithmetic(*count, *max_operand, *seed),
        DataConfig::WordProblems { count, max_steps, seed } => word_problems::generate(*count, *max_steps, *seed)?,
        DataConfig::Jsonl { path, prompt_field, answer_field } => read_jsonl(path, prompt_field, answer_field)?,
    };
    if examples.is_empty() {
        return Err(DataError::Empty);
    }
    Ok(examples)
}

/// `train` without the examples whose prompt is also in `held_out`: a generated task can draw
/// the same problem for both sets, and held out must mean unseen.
pub fn without_held_out(train: Vec<Example>, held_out: &[Example]) -> Result<Vec<Example>, DataError> {
    let held_out: std::collections::HashSet<&str> = held_out.iter().map(|e| e.prompt.as_str()).collect();
    let before = train.len();
    let kept: Vec<Example> = train.into_iter().filter(|e| !held_out.contains(e.prompt.as_str())).collect();
    if kept.is_empty() {
        return Err(DataError::Parameters("every training example is also in eval_data: nothing is left to train on".into()));
    }
    if kept.len() < before {
        tracing::info!(dropped = before - kept.len(), "training examples that are also held out were left out of training");
    }
    Ok(kept)
}

fn arithmetic(count: usize, max_operand: u32, seed: u64) -> Vec<Example> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            let a = (splitmix(&mut state) % (max_operand as u64 + 1)) as i64;
            let b = (splitmix(&mut state) % (max_operand as u64 + 1)) as i64;
            let (symbol, value) = match splitmix(&mut state) % 3 {
                0 => ("+", a + b),
                1 => ("-", a - b),
                _ => ("*", a * b),
            };
            Example { prompt: format!("What is {a} {symbol} {b}?"), answer: value.to_string() }
        })
        .collect()
}

fn read_jsonl(path: &Path, prompt_field: &str, answer_field: &str) -> Result<Vec<Example>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| DataError::BadLine { path: path.to_path_buf(), line: i + 1, reason };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let field = |name: &str| -> Result<String, DataError> {
            match value.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                _ => Err(bad(format!("missing string field '{name}'"))),
            }
        };
        out.push(Example { prompt: field(prompt_field)?, answer: field(answer_field)? });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_deterministic_and_correct() {
        let a = arithmetic(50, 9, 3);
        assert_eq!(a, arithmetic(50, 9, 3));
        for e in &a {
            let parts: Vec<&str> = e.prompt.trim_start_matches("What is ").trim_end_matches('?').split(' ').collect();
            let (x, y): (i64, i64) = (parts[0].parse().unwrap_or(0), parts[2].parse().unwrap_or(0));
            let expected = match parts[1] { "+" => x + y, "-" => x - y, _ => x * y };
            assert_eq!(e.answer, expected.to_string());
        }
    }

    #[test]
    fn held_out_problems_never_train() {
        let train = word_problems::generate(3000, 1, 5).unwrap_or_default();
        let held_out = word_problems::generate(300, 1, 6).unwrap_or_default();
        let overlap = train.iter().filter(|t| held_out.iter().any(|h| h.prompt == t.prompt)).count();
        assert!(overlap > 0, "one-event problems repeat across seeds: the case this guards");
        let kept = without_held_out(train.clone(), &held_out).unwrap_or_default();
        assert_eq!(kept.len(), train.len() - overlap);
        assert!(kept.iter().all(|k| held_out.iter().all(|h| h.prompt != k.prompt)));
        assert!(without_held_out(held_out.clone(), &held_out).is_err(), "nothing left to train on");
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let path = std::env::temp_dir().join(format!("hicra-data-{}.jsonl", std::process::id()));
        std::fs::write(&path, "{\"question\": \"1+1?\", \"answer\": 2}\n{\"question\": 3}\n").unwrap_or(());
        let err = read_jsonl(&path, "question", "answer").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(":2:") && err.contains("answer"), "{err}");
    }
}
