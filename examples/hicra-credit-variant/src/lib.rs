//! Example credit scheme: HICRA with separate amplifications. A_i = R_i - mean(R) (no std
//! scaling); planning tokens get A_i * (1 + up) when A_i > 0 and A_i * (1 - down) when A_i < 0,
//! execution tokens A_i. Config `{"up": 0.2, "down": 0.5}` (HICRA itself is up = down = alpha).

use hicra_sdk::serde_json::Value;
use hicra_sdk::{export_credit_plugin, CreditGroup, CreditPlugin};

/// The two amplifications.
#[derive(Default)]
pub struct HicraVariant {
    up: f32,
    down: f32,
}

impl CreditPlugin for HicraVariant {
    const NAME: &'static str = "hicra_variant";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(&mut self, config: &Value) -> Result<(), String> {
        let read = |key: &str, default: f64| -> Result<f32, String> {
            match config.get(key) {
                None => Ok(default as f32),
                Some(v) => v.as_f64().map(|x| x as f32).filter(|x| x.is_finite()).ok_or(format!("'{key}' must be a number")),
            }
        };
        self.up = read("up", 0.2)?;
        self.down = read("down", 0.2)?;
        Ok(())
    }

    fn advantages(&self, group: &CreditGroup) -> Result<Vec<Vec<f32>>, String> {
        if group.rewards.len() != group.planning_masks.len() {
            return Err(format!("{} rewards but {} masks", group.rewards.len(), group.planning_masks.len()));
        }
        let mean = group.rewards.iter().sum::<f32>() / group.rewards.len().max(1) as f32;
        Ok(group
            .rewards
            .iter()
            .zip(group.planning_masks.iter())
            .map(|(&r, mask)| {
                let a = r - mean;
                let planning = if a > 0.0 { a * (1.0 + self.up) } else { a * (1.0 - self.down) };
                mask.iter().map(|&m| if m != 0 { planning } else { a }).collect()
            })
            .collect())
    }
}

export_credit_plugin!(HicraVariant);
