//! The built-in Strategic-Gram detector as a plugin: the paper's 249 phrases (case- and
//! apostrophe-folded, word boundaries), or `{"phrases": [...]}` from config. Same matcher as the
//! host's built-in (shared source).

use hicra_sdk::serde_json::Value;
use hicra_sdk::{export_sg_detector_plugin, DetectItem, SgDetectorPlugin};

#[allow(dead_code, unreachable_pub)]
#[path = "../../../core/src/train/planning.rs"]
mod planning;

/// The phrase set in use.
pub struct StrategicGramDetector {
    grams: planning::StrategicGrams,
}

impl Default for StrategicGramDetector {
    fn default() -> Self {
        Self { grams: planning::StrategicGrams::paper() }
    }
}

impl SgDetectorPlugin for StrategicGramDetector {
    const NAME: &'static str = "strategic_grams";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(&mut self, config: &Value) -> Result<(), String> {
        if let Some(phrases) = config.get("phrases") {
            let list = phrases.as_array().ok_or("'phrases' must be an array of strings")?;
            let phrases: Vec<&str> = list.iter().map(|p| p.as_str().ok_or("'phrases' must be an array of strings")).collect::<Result<_, _>>()?;
            self.grams = planning::StrategicGrams::from_phrases(phrases);
        }
        Ok(())
    }

    fn detect(&self, items: &[DetectItem]) -> Vec<Result<Vec<bool>, String>> {
        items
            .iter()
            .map(|item| {
                let spans: Vec<(usize, usize)> = item.token_spans.iter().map(|t| (t.0 as usize, t.1 as usize)).collect();
                Ok(self.grams.token_mask(item.text.as_str(), &spans))
            })
            .collect()
    }
}

export_sg_detector_plugin!(StrategicGramDetector);
