//! A credit scheme for multi-turn episodes (SDK ABI 2): GRPO's group-mean baseline, scaled on
//! each sampled token by the number of its turn (1, 2, 3, ...); context tokens get 0. A test
//! reads the advantages back to check the plugin saw the episodes' turns.

use hicra_sdk::{export_credit_plugin, serde_json, CreditEpisodes, CreditGroup, CreditPlugin};

#[derive(Default)]
struct TurnCredit;

fn baseline(group: &CreditGroup) -> Vec<f32> {
    let mean = group.rewards.iter().sum::<f32>() / group.rewards.len().max(1) as f32;
    group.rewards.iter().map(|r| r - mean).collect()
}

impl CreditPlugin for TurnCredit {
    const NAME: &'static str = "turn_credit";
    const VERSION: &'static str = "0.1.0";

    fn configure(&mut self, _config: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }

    /// Single completions: plain GRPO.
    fn advantages(&self, group: &CreditGroup) -> Result<Vec<Vec<f32>>, String> {
        Ok(baseline(group).into_iter().zip(group.planning_masks.iter()).map(|(a, mask)| vec![a; mask.len()]).collect())
    }

    fn episode_advantages(&self, episodes: &CreditEpisodes) -> Result<Vec<Vec<f32>>, String> {
        let advantages = baseline(&episodes.group);
        let mut rows = Vec::with_capacity(advantages.len());
        for (i, a) in advantages.into_iter().enumerate() {
            let mut row = vec![0.0; episodes.group.planning_masks.get(i).map_or(0, |m| m.len())];
            for (turn, range) in episodes.turn_ranges(i).into_iter().enumerate() {
                for value in row.get_mut(range).ok_or("a turn outside the response")? {
                    *value = a * (turn + 1) as f32;
                }
            }
            rows.push(row);
        }
        Ok(rows)
    }
}

export_credit_plugin!(TurnCredit);
