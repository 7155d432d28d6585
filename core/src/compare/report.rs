//! The comparison of a finished sweep: per arm and evaluation step, held-out pass@1 and pass@k
//! over seeds with bootstrap intervals; the mean height of each run's pass@1 curve; and each
//! arm's paired difference against the first arm. Written as JSON and a markdown table.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::stats::{self, Estimate};
use super::sweep::SweepError;

/// One run's evaluations: (step, pass@1, pass@k), from its `metrics.jsonl`.
pub type Curve = Vec<(u64, f64, f64)>;

/// Reads the evaluations in a run's `metrics.jsonl` (`run_step + 1` is the step they follow;
/// an evaluation before training is step 0).
pub fn read_curve(metrics: &Path) -> Result<Curve, SweepError> {
    let text = std::fs::read_to_string(metrics).map_err(|source| SweepError::Io { path: metrics.to_path_buf(), source })?;
    let mut curve = Vec::new();
    for line in text.lines() {
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let (Some(pass1), Some(pass_k)) = (row["eval_start_pass1"].as_f64(), row["eval_start_pass_k"].as_f64()) {
            curve.push((0, pass1, pass_k));
        }
        if let (Some(step), Some(pass1), Some(pass_k)) = (row["run_step"].as_u64(), row["eval_pass1"].as_f64(), row["eval_pass_k"].as_f64()) {
            curve.push((step + 1, pass1, pass_k));
        }
    }
    Ok(curve)
}

/// One arm over its seeds.
#[derive(Clone, Debug, Serialize)]
pub struct ArmSummary {
    /// The arm.
    pub arm: String,
    /// Seeds with a complete run.
    pub seeds: Vec<u64>,
    /// Per evaluation step: pass@1 and pass@k over seeds.
    pub steps: Vec<StepSummary>,
    /// The mean height of the pass@1 curve (area under it over the steps it spans).
    pub pass1_curve_mean: Estimate,
    /// Final pass@1 minus the baseline arm's, seed by seed (`None` for the baseline).
    pub final_pass1_vs_baseline: Option<Estimate>,
    /// Curve mean height minus the baseline arm's, seed by seed.
    pub curve_mean_vs_baseline: Option<Estimate>,
}

/// One evaluation step of an arm.
#[derive(Clone, Debug, Serialize)]
pub struct StepSummary {
    /// Optimizer steps before the evaluation.
    pub step: u64,
    /// Held-out pass@1.
    pub pass1: Estimate,
    /// Held-out pass@k.
    pub pass_k: Estimate,
}

/// Summarises `curves` (arm -> seed -> curve), arms in the given order; the first arm is the
/// baseline. Only seeds present for both arms enter a paired difference.
pub fn summarise(arms: &[String], curves: &BTreeMap<(String, u64), Curve>) -> Vec<ArmSummary> {
    let seeds_of = |arm: &str| -> Vec<u64> { curves.keys().filter(|(a, _)| a == arm).map(|(_, s)| *s).collect() };
    let final_pass1 = |arm: &str, seed: u64| curves.get(&(arm.to_string(), seed)).and_then(|c| c.last()).map(|p| p.1);
    let curve_mean = |arm: &str, seed: u64| {
        curves.get(&(arm.to_string(), seed)).map(|c| stats::mean_height(&c.iter().map(|&(s, p1, _)| (s as f64, p1)).collect::<Vec<_>>()))
    };
    let baseline = arms.first().cloned().unwrap_or_default();
    arms.iter()
        .map(|arm| {
            let seeds = seeds_of(arm);
            let mut by_step: BTreeMap<u64, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
            for &seed in &seeds {
                for &(step, pass1, pass_k) in &curves[&(arm.clone(), seed)] {
                    let entry = by_step.entry(step).or_default();
                    entry.0.push(pass1);
                    entry.1.push(pass_k);
                }
            }
            let steps = by_step.into_iter().map(|(step, (p1, pk))| StepSummary { step, pass1: stats::bootstrap_mean(&p1), pass_k: stats::bootstrap_mean(&pk) }).collect();
            let means: Vec<f64> = seeds.iter().filter_map(|&s| curve_mean(arm, s)).collect();
            let paired = |value: &dyn Fn(&str, u64) -> Option<f64>| -> Option<Estimate> {
                if *arm == baseline {
                    return None;
                }
                let pairs: Vec<(f64, f64)> = seeds.iter().filter_map(|&s| Some((value(arm, s)?, value(&baseline, s)?))).collect();
                let (ours, theirs): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
                Some(stats::paired_difference(&ours, &theirs))
            };
            ArmSummary {
                arm: arm.clone(),
                final_pass1_vs_baseline: paired(&final_pass1),
                curve_mean_vs_baseline: paired(&curve_mean),
                pass1_curve_mean: stats::bootstrap_mean(&means),
                steps,
                seeds,
            }
        })
        .collect()
}

/// Draws held-out pass@1 and pass@k over steps (`pass1` and `pass_k`, PNG and SVG): one line
/// per arm, the mean over seeds, inside its 95% bootstrap band; returns the files.
pub fn write_charts(summaries: &[ArmSummary], out: &Path) -> Result<Vec<std::path::PathBuf>, crate::plot::PlotError> {
    let mut written = Vec::new();
    type Pick = fn(&StepSummary) -> &Estimate;
    let metrics: [(&str, &str, Pick); 2] = [("pass1", "pass@1", |s| &s.pass1), ("pass_k", "pass@k", |s| &s.pass_k)];
    for (file, label, pick) in metrics {
        let series = summaries
            .iter()
            .filter(|arm| !arm.steps.is_empty())
            .map(|arm| crate::plot::Series {
                name: format!("{} ({} seeds)", arm.arm, arm.seeds.len()),
                points: arm.steps.iter().map(|s| (s.step as f64, pick(s).mean)).collect(),
                band: arm.steps.iter().map(|s| (s.step as f64, pick(s).low, pick(s).high)).collect(),
            })
            .collect();
        let title = format!("held-out {label}: mean over seeds, 95% bootstrap band");
        written.extend(crate::plot::Chart::over_steps(&title, label, series).write(&out.join(file))?);
    }
    Ok(written)
}

fn estimate(e: &Estimate) -> String {
    if e.samples == 0 || e.mean.is_nan() {
        return "-".into();
    }
    format!("{:.3} [{:.3}, {:.3}]", e.mean, e.low, e.high)
}

fn signed(e: &Estimate) -> String {
    if e.samples == 0 || e.mean.is_nan() {
        return "-".into();
    }
    format!("{:+.3} [{:+.3}, {:+.3}]", e.mean, e.low, e.high)
}

/// The markdown table: final pass@1 and pass@k, the curve mean, and the paired differences.
pub fn markdown(summaries: &[ArmSummary]) -> String {
    let baseline = summaries.first().map_or("-", |s| s.arm.as_str());
    let mut out = String::new();
    out.push_str("Mean over seeds [95% bootstrap interval]; differences are paired by seed against ");
    out.push_str(&format!("`{baseline}`.\n\n"));
    out.push_str("| arm | seeds | final step | pass@1 | pass@k | pass@1 curve mean | final pass@1 - baseline | curve mean - baseline |\n");
    out.push_str("|---|---:|---:|---|---|---|---|---|\n");
    for s in summaries {
        let last = s.steps.last();
        let diff = |d: &Option<Estimate>| d.as_ref().map_or("(baseline)".to_string(), signed);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.arm,
            s.seeds.len(),
            last.map_or("-".into(), |l| l.step.to_string()),
            last.map_or("-".into(), |l| estimate(&l.pass1)),
            last.map_or("-".into(), |l| estimate(&l.pass_k)),
            estimate(&s.pass1_curve_mean),
            diff(&s.final_pass1_vs_baseline),
            diff(&s.curve_mean_vs_baseline),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_pair_seeds_against_the_first_arm() {
        let mut curves = BTreeMap::new();
        curves.insert(("grpo".to_string(), 1), vec![(4, 0.2, 0.5), (8, 0.4, 0.6)]);
        curves.insert(("grpo".to_string(), 2), vec![(4, 0.3, 0.5), (8, 0.5, 0.7)]);
        curves.insert(("hicra".to_string(), 1), vec![(4, 0.3, 0.5), (8, 0.5, 0.6)]);
        curves.insert(("hicra".to_string(), 2), vec![(4, 0.4, 0.6), (8, 0.6, 0.7)]);
        let arms = ["grpo".to_string(), "hicra".to_string()];
        let s = summarise(&arms, &curves);
        assert_eq!(s[0].seeds, vec![1, 2]);
        assert!((s[0].steps[1].pass1.mean - 0.45).abs() < 1e-12);
        assert!(s[0].final_pass1_vs_baseline.is_none());
        // hicra is 0.1 better on both seeds at every step.
        let d = s[1].final_pass1_vs_baseline.unwrap_or(Estimate { mean: f64::NAN, low: f64::NAN, high: f64::NAN, samples: 0 });
        assert!((d.mean - 0.1).abs() < 1e-12 && (d.low - 0.1).abs() < 1e-12 && (d.high - 0.1).abs() < 1e-12, "{d:?}");
        // Curve means: grpo seed 1 = (0.2 + 0.4) / 2 = 0.3, seed 2 = 0.4.
        assert!((s[0].pass1_curve_mean.mean - 0.35).abs() < 1e-12);
        let table = markdown(&s);
        assert!(table.contains("| hicra | 2 | 8 | 0.550 [0.500, 0.600]"), "{table}");
        assert!(table.contains("+0.100 [+0.100, +0.100]"), "{table}");
    }
}
