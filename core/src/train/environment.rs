//! Multi-turn environments for the offline loop (`hicra train`): what the environment says
//! after each answer, and the episode's reward.
//!
//! An episode is one conversation: the example's prompt, the model's answer, the environment's
//! reply, the model's next answer, and so on until the environment ends it. Training sees the
//! whole conversation as one token sequence (earlier answers spliced in exactly as sampled, see
//! [`crate::tokenizer::splice`]); only the model's tokens carry loss.

use serde::{Deserialize, Serialize};

/// One episode's environment. [`crate::train::run::Run::set_environment`] takes a factory
/// that makes one per episode.
pub trait Environment {
    /// The user's next message after the model's answer of turn `turn` (0-based), or `None`
    /// to end the episode.
    fn reply(&mut self, turn: usize, answer: &str) -> Option<String>;
    /// The episode's reward, asked once it has ended.
    fn reward(&self) -> f32;
}

/// A built-in environment, from the run's TOML (`[environment]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EnvironmentConfig {
    /// Asks again after a wrong answer, up to `turns` answers in all; the episode's reward is
    /// 1 when an answer is right (by the run's reward), else 0.
    Retry {
        /// Answers allowed.
        turns: usize,
        /// What the environment says after a wrong answer.
        #[serde(default = "default_retry_message")]
        message: String,
    },
}

fn default_retry_message() -> String {
    "That is not right. Try again.".into()
}

impl EnvironmentConfig {
    /// Most answers an episode can have.
    pub fn max_turns(&self) -> usize {
        match self {
            Self::Retry { turns, .. } => (*turns).max(1),
        }
    }
}

/// [`EnvironmentConfig::Retry`] for one episode; `is_right` scores an answer.
pub struct Retry<F: Fn(&str) -> bool> {
    turns: usize,
    message: String,
    is_right: F,
    solved: bool,
}

impl<F: Fn(&str) -> bool> Retry<F> {
    /// An episode allowing `turns` answers.
    pub fn new(turns: usize, message: String, is_right: F) -> Self {
        Self { turns: turns.max(1), message, is_right, solved: false }
    }
}

impl<F: Fn(&str) -> bool> Environment for Retry<F> {
    fn reply(&mut self, turn: usize, answer: &str) -> Option<String> {
        self.solved = (self.is_right)(answer);
        (!self.solved && turn + 1 < self.turns).then(|| self.message.clone())
    }

    fn reward(&self) -> f32 {
        f32::from(u8::from(self.solved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_ends_on_a_right_answer_or_when_turns_run_out() {
        let mut env = Retry::new(3, "again".into(), |a: &str| a.contains('7'));
        assert_eq!(env.reply(0, "6").as_deref(), Some("again"));
        assert_eq!(env.reply(1, "7"), None);
        assert_eq!(env.reward(), 1.0);
        let mut env = Retry::new(2, "again".into(), |a: &str| a.contains('7'));
        assert!(env.reply(0, "1").is_some());
        assert_eq!(env.reply(1, "2"), None);
        assert_eq!(env.reward(), 0.0);
    }
}
