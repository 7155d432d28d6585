//! The plugin tutorial's starting point (README, "Writing a plugin"): a reward for concise
//! answers. A completion within `max_chars` characters earns 1; a longer one earns
//! `max_chars / length`. Configure it in the server's TOML:
//!
//! ```toml
//! plugins = ["target/release/libhicra_example_reward_starter.so"]
//! [plugin_config.concise]
//! max_chars = 200
//! ```

use hicra_sdk::serde_json::Value;
use hicra_sdk::{export_reward_plugin, RewardItem, RewardPlugin, RewardScore};

/// The configured budget.
pub struct Concise {
    max_chars: usize,
}

impl Default for Concise {
    fn default() -> Self {
        Self { max_chars: 200 }
    }
}

impl RewardPlugin for Concise {
    const NAME: &'static str = "concise";
    const VERSION: &'static str = "1.0.0";

    /// Called once per load with the plugin's TOML table as JSON; an error refuses the load.
    fn configure(&mut self, config: &Value) -> Result<(), String> {
        if let Some(value) = config.get("max_chars") {
            self.max_chars = value.as_u64().filter(|&n| n > 0).ok_or("max_chars must be a positive integer")? as usize;
        }
        Ok(())
    }

    /// Scores one completion. An `Err` fails just that item: the server leaves it out of
    /// training instead of scoring it 0. (Override `score` instead to see the whole batch.)
    fn score_one(&self, item: &RewardItem) -> Result<RewardScore, String> {
        let length = item.completion.chars().count();
        Ok(RewardScore::new(concise_score(length, self.max_chars)))
    }
}

/// 1 within the budget, then the budget's share of the length.
fn concise_score(length: usize, max_chars: usize) -> f32 {
    if length <= max_chars {
        1.0
    } else {
        max_chars as f32 / length as f32
    }
}

export_reward_plugin!(Concise);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_budget_earns_one_and_longer_earns_the_budget_share() {
        let mut plugin = Concise::default();
        plugin.configure(&hicra_sdk::serde_json::json!({"max_chars": 4})).expect("valid config");
        let item = |text: &str| RewardItem { completion: text.into(), ..RewardItem::default() };
        let scores: Vec<f32> = plugin.score(&[item("abc"), item("abcdefgh")]).into_iter().map(|r| r.map(|s| s.score).unwrap_or(f32::NAN)).collect();
        assert_eq!(scores, vec![1.0, 0.5]);
        assert!(plugin.configure(&hicra_sdk::serde_json::json!({"max_chars": 0})).is_err());
    }
}
