//! The statistics of a comparison between training arms: a mean over seeds with its 95%
//! bootstrap interval, the paired difference against a baseline arm, and the area under an
//! evaluation curve.
//!
//! The bootstrap resamples seeds (the unit that varies between runs of one arm). With few
//! seeds, which is the usual case (3 to 6), every one of the `n^n` resamples is enumerated, so
//! an interval is exact, reproducible and checkable by hand. Beyond [`EXACT_LIMIT`] resamples
//! it draws [`DRAWN_RESAMPLES`] of them with a fixed seed.
//!
//! Intervals use the percentile method: the 2.5% and 97.5% points of the resampled means,
//! taken as nearest ranks of the sorted means.

use crate::random::splitmix;

/// Largest number of resamples enumerated exactly (6 seeds: 46,656).
pub const EXACT_LIMIT: usize = 50_000;
/// Resamples drawn when there are too many to enumerate.
pub const DRAWN_RESAMPLES: usize = 20_000;

/// A mean and its bootstrap interval.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// The mean of the samples.
    pub mean: f64,
    /// Lower end of the 95% interval.
    pub low: f64,
    /// Upper end of the 95% interval.
    pub high: f64,
    /// Samples (seeds) behind it.
    pub samples: usize,
}

/// The mean of `values` (NaN for none).
pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The mean of `values` with its 95% percentile-bootstrap interval. One sample gives a
/// degenerate interval (the value itself); none gives NaN everywhere.
pub fn bootstrap_mean(values: &[f64]) -> Estimate {
    let n = values.len();
    let mut means = resampled_means(values);
    means.sort_by(f64::total_cmp);
    let (low, high) = percentile_interval(&means, 0.95);
    Estimate { mean: mean(values), low, high, samples: n }
}

/// The paired difference `arm - baseline` over seeds present in both (matched by position:
/// `arm[i]` and `baseline[i]` come from the same seed), with its bootstrap interval.
/// Pairing removes what the seed changes for both arms (data order, sampling).
pub fn paired_difference(arm: &[f64], baseline: &[f64]) -> Estimate {
    let differences: Vec<f64> = arm.iter().zip(baseline).map(|(a, b)| a - b).collect();
    bootstrap_mean(&differences)
}

/// The area under the curve through `points` (step, value), divided by the steps it spans:
/// the curve's mean height, by the trapezoid rule. One point gives its value; none, NaN.
pub fn mean_height(points: &[(f64, f64)]) -> f64 {
    match points {
        [] => f64::NAN,
        [(_, value)] => *value,
        [first, .., last] => {
            let area: f64 = points.windows(2).map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0).sum();
            let span = last.0 - first.0;
            if span > 0.0 { area / span } else { mean(&points.iter().map(|p| p.1).collect::<Vec<_>>()) }
        }
    }
}

/// The mean of every resample of `values` with replacement: all `n^n` when that is at most
/// [`EXACT_LIMIT`], else [`DRAWN_RESAMPLES`] drawn with a fixed seed.
fn resampled_means(values: &[f64]) -> Vec<f64> {
    let n = values.len();
    if n == 0 {
        return vec![f64::NAN];
    }
    let exact = u32::try_from(n).ok().and_then(|power| (n as u64).checked_pow(power)).filter(|&count| count <= EXACT_LIMIT as u64);
    match exact {
        Some(count) => (0..count)
            .map(|mut index| {
                // `index` in base n names one resample: digit k picks the k-th draw.
                let mut sum = 0.0;
                for _ in 0..n {
                    sum += values[(index % n as u64) as usize];
                    index /= n as u64;
                }
                sum / n as f64
            })
            .collect(),
        None => {
            let mut state = 0x5EED_B007_u64;
            (0..DRAWN_RESAMPLES)
                .map(|_| (0..n).map(|_| values[(splitmix(&mut state) % n as u64) as usize]).sum::<f64>() / n as f64)
                .collect()
        }
    }
}

/// The `(1 - level) / 2` and `(1 + level) / 2` points of `sorted`, as nearest ranks.
fn percentile_interval(sorted: &[f64], level: f64) -> (f64, f64) {
    let m = sorted.len();
    if m == 0 {
        return (f64::NAN, f64::NAN);
    }
    let tail = (1.0 - level) / 2.0;
    let low = ((tail * m as f64).floor() as usize).min(m - 1);
    let high = (((1.0 - tail) * m as f64).ceil() as usize).clamp(1, m) - 1;
    (sorted[low], sorted[high])
}


#[cfg(test)]
mod tests {
    use super::*;

    /// Two seeds, 0.2 and 0.6: the four resamples have means 0.2, 0.4, 0.4, 0.6, so the 2.5%
    /// and 97.5% points are 0.2 and 0.6.
    #[test]
    fn two_seeds_by_hand() {
        let e = bootstrap_mean(&[0.2, 0.6]);
        assert!((e.mean - 0.4).abs() < 1e-12);
        assert_eq!((e.low, e.high, e.samples), (0.2, 0.6, 2));
    }

    /// Three seeds 0, 0, 0.9: of the 27 resamples, 8 draw no 0.9 (mean 0), 12 draw it once
    /// (0.3), 6 twice (0.6), 1 three times (0.9). Sorted, the 2.5% point is rank
    /// floor(0.025 * 27) = 0 -> 0, and the 97.5% point rank ceil(0.975 * 27) - 1 = 26 -> 0.9.
    /// With a 50% level the points are ranks floor(0.25 * 27) = 6 -> 0 (ranks 0-7 are 0) and
    /// ceil(0.75 * 27) - 1 = 20 -> 0.6 (ranks 8-19 are 0.3, 20-25 are 0.6).
    #[test]
    fn three_seeds_by_hand() {
        let values = [0.0, 0.0, 0.9];
        let mut means = resampled_means(&values);
        assert_eq!(means.len(), 27);
        means.sort_by(f64::total_cmp);
        let count = |v: f64| means.iter().filter(|m| (**m - v).abs() < 1e-12).count();
        assert_eq!((count(0.0), count(0.3), count(0.6), count(0.9)), (8, 12, 6, 1));
        assert_eq!(percentile_interval(&means, 0.95), (0.0, 0.9));
        let (low, high) = percentile_interval(&means, 0.5);
        assert!(low.abs() < 1e-12 && (high - 0.6).abs() < 1e-12, "{low} {high}");
        let e = bootstrap_mean(&values);
        assert!((e.mean - 0.3).abs() < 1e-12);
    }

    #[test]
    fn equal_values_give_a_point_and_one_value_a_degenerate_interval() {
        assert_eq!(bootstrap_mean(&[0.5, 0.5, 0.5]), Estimate { mean: 0.5, low: 0.5, high: 0.5, samples: 3 });
        assert_eq!(bootstrap_mean(&[0.7]), Estimate { mean: 0.7, low: 0.7, high: 0.7, samples: 1 });
        assert!(bootstrap_mean(&[]).mean.is_nan());
    }

    /// Eight seeds (16.7 M resamples) are drawn, not enumerated: the interval still contains
    /// the mean, lies within the values, and is the same on every call.
    #[test]
    fn many_seeds_are_drawn_reproducibly() {
        let values = [0.1, 0.4, 0.35, 0.2, 0.5, 0.3, 0.25, 0.45];
        let (a, b) = (bootstrap_mean(&values), bootstrap_mean(&values));
        assert_eq!(a, b);
        assert!(a.low <= a.mean && a.mean <= a.high && a.low >= 0.1 && a.high <= 0.5, "{a:?}");
        assert!(a.high - a.low < 0.3, "the interval of 8 seeds is narrower than their range: {a:?}");
    }

    /// Pairing: an arm that is 0.05 better on every seed differs by exactly 0.05, however much
    /// the seeds themselves vary.
    #[test]
    fn a_paired_difference_removes_the_seed_effect() {
        let baseline = [0.1, 0.5, 0.3];
        let arm = [0.15, 0.55, 0.35];
        let d = paired_difference(&arm, &baseline);
        assert!((d.mean - 0.05).abs() < 1e-12 && (d.low - 0.05).abs() < 1e-12 && (d.high - 0.05).abs() < 1e-12, "{d:?}");
    }

    /// Points (0, 0), (2, 1), (4, 1): area 1 + 2 = 3 over 4 steps, mean height 0.75.
    #[test]
    fn the_curve_mean_height_by_hand() {
        assert!((mean_height(&[(0.0, 0.0), (2.0, 1.0), (4.0, 1.0)]) - 0.75).abs() < 1e-12);
        assert_eq!(mean_height(&[(3.0, 0.4)]), 0.4);
        assert!(mean_height(&[]).is_nan());
    }
}
