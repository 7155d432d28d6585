//! A reward plugin that misbehaves on purpose, so tests can check that the host survives it.
//! Config `{"mode": "ok" | "length" | "panic" | "hang" | "nan" | "wrong_count" | "reject" |
//! "per_item"}`; `"ok"` scores every item `constant` (default 0.5), `"length"` scores completion
//! chars / 100, and `"per_item"` takes the misbehaviour from the first item's metadata
//! (`{"misbehave": "panic"}`, ...; none: `"length"`), so a server can load it (its smoke call
//! behaves) and tests can trigger each failure at serving time.

use hicra_sdk::{export_reward_plugin, serde_json::Value, RewardItem, RewardPlugin, RewardScore};

/// The configured misbehaviour.
#[derive(Default)]
pub struct Misbehaving {
    mode: String,
    constant: f32,
}

impl RewardPlugin for Misbehaving {
    const NAME: &'static str = "misbehaving";
    const VERSION: &'static str = "0.0.1";

    fn configure(&mut self, config: &Value) -> Result<(), String> {
        self.mode = config.get("mode").and_then(Value::as_str).unwrap_or("ok").to_string();
        self.constant = config.get("constant").and_then(Value::as_f64).unwrap_or(0.5) as f32;
        if self.mode == "reject" {
            return Err("configured to reject its configuration".into());
        }
        Ok(())
    }

    fn score(&self, items: &[RewardItem]) -> Vec<Result<RewardScore, String>> {
        let requested = items.first().and_then(|i| i.metadata().get("misbehave").and_then(Value::as_str).map(str::to_string));
        let mode = match (self.mode.as_str(), requested) {
            ("per_item", Some(mode)) => mode,
            ("per_item", None) => "length".to_string(),
            (mode, _) => mode.to_string(),
        };
        match mode.as_str() {
            "panic" => panic!("deliberate panic"),
            "hang" => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            "nan" => items.iter().map(|_| Ok(RewardScore::new(f32::NAN))).collect(),
            // One result too many, whatever the batch size.
            "wrong_count" => (0..=items.len()).map(|_| Ok(RewardScore::new(1.0))).collect(),
            "length" => items.iter().map(|i| Ok(RewardScore::new(i.completion.chars().count() as f32 / 100.0))).collect(),
            _ => items.iter().map(|_| Ok(RewardScore::new(self.constant))).collect(),
        }
    }
}

export_reward_plugin!(Misbehaving);
