//! Example reward plugin for code: the completion's Python (the last ```python block, or the
//! whole text) runs with the unit tests from `metadata.tests` in the SDK's sandbox; all tests
//! passing scores 1.0, anything else 0.0 with the reason in the message. A sandbox that cannot
//! start is an item failure (masked by the host), not a 0.
//!
//! Build: `cargo build --release -p hicra-example-code-reward`, then
//! `hicra serve --plugin target/release/libhicra_example_code_reward.so` and score rollouts with
//! `POST /v1/rollouts/{id}/score {"metadata": {"tests": "assert add(1, 2) == 3"}}`.
//! Config: `{"timeout_ms": 10000, "memory_mib": 512}`.

use std::time::Duration;

use hicra_sdk::sandbox::{run_python, SandboxLimits, SandboxStatus};
use hicra_sdk::serde_json::Value;
use hicra_sdk::{export_reward_plugin, RewardItem, RewardPlugin, RewardScore};

/// The plugin: sandbox limits from its configuration.
#[derive(Default)]
pub struct CodeReward {
    limits: SandboxLimits,
}

/// The code to run: the last fenced Python block, else the whole completion.
pub fn extract_code(completion: &str) -> &str {
    for fence in ["```python", "```py", "```"] {
        if let Some(start) = completion.rfind(fence) {
            let body = &completion[start + fence.len()..];
            if let Some(end) = body.find("```") {
                return body[..end].trim_start_matches('\n');
            }
        }
    }
    completion
}

impl RewardPlugin for CodeReward {
    const NAME: &'static str = "code";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(&mut self, config: &Value) -> Result<(), String> {
        if let Some(ms) = config.get("timeout_ms") {
            self.limits.timeout = Duration::from_millis(ms.as_u64().ok_or("timeout_ms must be a positive integer")?);
        }
        if let Some(mib) = config.get("memory_mib") {
            self.limits.memory_mib = mib.as_u64().ok_or("memory_mib must be a positive integer")?;
        }
        Ok(())
    }

    fn score_one(&self, item: &RewardItem) -> Result<RewardScore, String> {
        let metadata = item.metadata();
        let tests = metadata.get("tests").and_then(Value::as_str).ok_or("metadata has no 'tests'")?;
        let program = format!("{}\n\n{}\n", extract_code(item.completion.as_str()), tests);
        let outcome = run_python(&program, &self.limits)?;
        let (score, why) = match &outcome.status {
            SandboxStatus::Passed => (1.0, "all tests passed".to_string()),
            SandboxStatus::Failed(code) => (0.0, format!("exit {code}: {}", outcome.stderr.lines().last().unwrap_or(""))),
            SandboxStatus::Killed(signal) => (0.0, format!("killed by signal {signal} (a resource limit)")),
            SandboxStatus::TimedOut => (0.0, "timed out".to_string()),
        };
        let mut result = RewardScore::new(score);
        result.message = why.into();
        Ok(result)
    }
}

export_reward_plugin!(CodeReward);

#[cfg(test)]
mod tests {
    use super::*;

    fn item(completion: &str, tests: &str) -> RewardItem {
        RewardItem { completion: completion.into(), metadata_json: hicra_sdk::serde_json::json!({"tests": tests}).to_string().into(), ..RewardItem::default() }
    }

    #[test]
    fn scores_generated_functions_against_their_tests() {
        let mut plugin = CodeReward::default();
        plugin.configure(&hicra_sdk::serde_json::json!({"timeout_ms": 4000})).expect("config");
        let tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0";
        let results = plugin.score(&[
            item("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```", tests),
            item("def add(a, b):\n    return a - b", tests),
            item("def add(a, b):\n    while True:\n        pass", tests),
            RewardItem::default(),
        ]);
        assert_eq!(results[0].as_ref().map(|s| s.score).ok(), Some(1.0));
        assert_eq!(results[1].as_ref().map(|s| s.score).ok(), Some(0.0));
        assert_eq!(results[2].as_ref().map(|s| s.score).ok(), Some(0.0));
        assert!(results[3].is_err(), "no tests: a failed item, not a zero");
    }
}
