//! Example Strategic-Gram detector for a new domain: the phrases come from configuration
//! (`{"phrases": ["let me check", "the tests fail"]}`), matched case-insensitively on word
//! boundaries; a token is a planning token when its span overlaps a match.

use hicra_sdk::serde_json::Value;
use hicra_sdk::{export_sg_detector_plugin, DetectItem, SgDetectorPlugin};

/// The configured phrases, lower-cased.
#[derive(Default)]
pub struct PhraseDetector {
    phrases: Vec<String>,
}

fn is_word(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric())
}

impl PhraseDetector {
    /// Byte spans of every phrase occurrence (ASCII case-folding keeps byte offsets intact).
    fn matches(&self, text: &str) -> Vec<(usize, usize)> {
        let lower = text.to_ascii_lowercase();
        let mut spans = Vec::new();
        for phrase in &self.phrases {
            let mut from = 0;
            while let Some(at) = lower[from..].find(phrase.as_str()) {
                let (start, end) = (from + at, from + at + phrase.len());
                if !is_word(lower[..start].chars().last()) && !is_word(lower[end..].chars().next()) {
                    spans.push((start, end));
                }
                from = start + phrase.len().max(1);
                if from > lower.len() {
                    break;
                }
            }
        }
        spans
    }
}

impl SgDetectorPlugin for PhraseDetector {
    const NAME: &'static str = "phrases";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(&mut self, config: &Value) -> Result<(), String> {
        let phrases = config.get("phrases").and_then(Value::as_array).ok_or("config needs a 'phrases' array")?;
        self.phrases = phrases.iter().map(|p| p.as_str().map(|s| s.trim().to_ascii_lowercase()).ok_or("phrases must be strings")).collect::<Result<_, _>>()?;
        self.phrases.retain(|p| !p.is_empty());
        Ok(())
    }

    fn detect(&self, items: &[DetectItem]) -> Vec<Result<Vec<bool>, String>> {
        items
            .iter()
            .map(|item| {
                let spans = self.matches(item.text.as_str());
                Ok(item
                    .token_spans
                    .iter()
                    .map(|t| {
                        let (start, end) = (t.0 as usize, t.1 as usize);
                        start < end && spans.iter().any(|&(s, e)| s < end && start < e)
                    })
                    .collect())
            })
            .collect()
    }
}

export_sg_detector_plugin!(PhraseDetector);
