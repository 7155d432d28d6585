//! The built-in math reward as a plugin: 1.0 when the completion's final answer (`\boxed{}` or
//! after `####`) equals `metadata.answer`, else 0.0; an item without `metadata.answer` is a
//! per-item failure (masked by the host), never a silent 0.
//!
//! Config: `{"last_number_fallback": bool}` (default false) also accepts the last number of a
//! completion that marks no answer.

use hicra_sdk::{export_reward_plugin, RewardItem, RewardPlugin, RewardScore};

// The verifier is the same source the core uses, compiled here without libtorch.
#[allow(dead_code, unreachable_pub)]
#[path = "../../../core/src/train/reward.rs"]
mod reward;

/// The plugin's state: its configuration.
#[derive(Default)]
pub struct MathReward {
    last_number_fallback: bool,
}

fn last_number(text: &str) -> Option<String> {
    let mut numbers = Vec::new();
    let mut current = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || (c == '-' && current.is_empty()) || (c == '.' && !current.is_empty()) {
            current.push(c);
        } else {
            if current.chars().any(|c| c.is_ascii_digit()) {
                numbers.push(current.trim_end_matches('.').to_string());
            }
            current.clear();
        }
    }
    numbers.pop()
}

impl RewardPlugin for MathReward {
    const NAME: &'static str = "math";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(&mut self, config: &hicra_sdk::serde_json::Value) -> Result<(), String> {
        match config.get("last_number_fallback") {
            None => {}
            Some(v) => self.last_number_fallback = v.as_bool().ok_or("last_number_fallback must be a boolean")?,
        }
        Ok(())
    }

    fn score_one(&self, item: &RewardItem) -> Result<RewardScore, String> {
        let metadata = item.metadata();
        let answer = match metadata.get("answer") {
            Some(hicra_sdk::serde_json::Value::String(s)) => s.clone(),
            Some(hicra_sdk::serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err("metadata has no 'answer'".to_string()),
        };
        let completion = item.completion.as_str();
        let marked = reward::extract_answer(completion).is_some();
        let score = match (marked, self.last_number_fallback, last_number(completion)) {
            (false, true, Some(n)) => reward::math_reward(&format!("#### {n}"), &answer),
            _ => reward::math_reward(completion, &answer),
        };
        let mut out = RewardScore::new(score);
        out.message = format!("answer marked: {marked}").into();
        Ok(out)
    }
}

export_reward_plugin!(MathReward);
