//! A reward plugin that misbehaves on purpose, so tests can check that the host survives it.
//! Config `{"mode": "ok" | "length" | "panic" | "hang" | "nan" | "wrong_count" | "reject" |
//! "per_item"}`; `"ok"` scores every item `constant` (default 0.5), `"length"` scores completion
//! chars / 100, and `"per_item"` takes the misbehaviour from the first item's metadata
//! (`{"misbehave": "panic"}`, ...; none: `"length"`), so a server can load it (its smoke call
//! behaves) and tests can trigger each failure at serving time.
//!
//! Hangs the tests can end: `{"misbehave": "block", "gate": PATH}` in an item's metadata blocks
//! that call while the file PATH exists, and config `"block_configure_while": PATH` blocks
//! `configure` the same way (a load while the file is absent behaves, a later reload hangs).

use std::path::Path;
use std::time::Duration;

use hicra_sdk::{export_reward_plugin, serde_json::Value, RewardItem, RewardPlugin, RewardScore};

/// Blocks while the file at `gate` exists (a test removes it to let the call return).
fn block_while(gate: &str) {
    while Path::new(gate).exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

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
        if let Some(gate) = config.get("block_configure_while").and_then(Value::as_str) {
            block_while(gate);
        }
        self.mode = config.get("mode").and_then(Value::as_str).unwrap_or("ok").to_string();
        self.constant = config.get("constant").and_then(Value::as_f64).unwrap_or(0.5) as f32;
        if self.mode == "reject" {
            return Err("configured to reject its configuration".into());
        }
        Ok(())
    }

    fn score(&self, items: &[RewardItem]) -> Vec<Result<RewardScore, String>> {
        let metadata = items.first().map(RewardItem::metadata).unwrap_or(Value::Null);
        let requested = metadata.get("misbehave").and_then(Value::as_str).map(str::to_string);
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
            "block" => {
                block_while(metadata.get("gate").and_then(Value::as_str).unwrap_or_default());
                items.iter().map(|_| Ok(RewardScore::new(self.constant))).collect()
            }
            "nan" => items.iter().map(|_| Ok(RewardScore::new(f32::NAN))).collect(),
            // One result too many, whatever the batch size.
            "wrong_count" => (0..=items.len()).map(|_| Ok(RewardScore::new(1.0))).collect(),
            "length" => items.iter().map(|i| Ok(RewardScore::new(i.completion.chars().count() as f32 / 100.0))).collect(),
            _ => items.iter().map(|_| Ok(RewardScore::new(self.constant))).collect(),
        }
    }
}

export_reward_plugin!(Misbehaving);
