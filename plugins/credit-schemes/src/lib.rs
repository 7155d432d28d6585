//! The built-in credit schemes as a plugin. Config selects one exactly as the trainer's
//! `[credit]` table does: `{"scheme": "grpo", "scale_by_std": true}`, `{"scheme": "dr_grpo"}`,
//! `{"scheme": "hicra", "alpha": 0.2}` (default), `{"scheme": "entropy_gated", ...}`.
//! Same code as the host's built-in schemes (shared source).

use hicra_sdk::serde_json::{self, Value};
use hicra_sdk::{export_credit_plugin, CreditGroup, CreditPlugin};

#[allow(dead_code, unreachable_pub)]
#[path = "../../../core/src/train/credit.rs"]
mod credit;

/// The configured scheme.
#[derive(Default)]
pub struct CreditSchemes {
    scheme: credit::CreditScheme,
}

impl CreditPlugin for CreditSchemes {
    const NAME: &'static str = "credit_schemes";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(&mut self, config: &Value) -> Result<(), String> {
        if config.as_object().is_some_and(|o| !o.is_empty()) {
            self.scheme = serde_json::from_value(config.clone()).map_err(|e| format!("invalid credit scheme: {e}"))?;
        }
        Ok(())
    }

    fn advantages(&self, group: &CreditGroup) -> Result<Vec<Vec<f32>>, String> {
        let masks: Vec<Vec<bool>> = group.planning_masks.iter().map(|m| m.iter().map(|&b| b != 0).collect()).collect();
        let entropies: Vec<Vec<f32>> = group.entropies.iter().map(|e| e.to_vec()).collect();
        let input = credit::GroupInput {
            rewards: group.rewards.as_slice(),
            planning_masks: &masks,
            entropies: if entropies.is_empty() { None } else { Some(&entropies) },
        };
        credit::assign(&self.scheme, &input).map(|a| a.per_token).map_err(|e| e.to_string())
    }
}

export_credit_plugin!(CreditSchemes);
