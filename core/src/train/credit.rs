//! Credit assignment: per-token advantages for one group of G responses to the same prompt.
//!
//! Every scheme starts from the group-relative sequence advantage `A_i = R_i - mean(R)`
//! (optionally divided by the group std) and then decides how much of it each token gets.
//! This module is pure arithmetic on `f32` slices: no tensors, no tokenizer. The caller supplies
//! the planning mask (see [`super::planning`]) and, for the entropy-gated scheme, per-token
//! entropies from the scoring pass.
//!
//! Conventions, chosen to match verl (the paper's code base) so results are comparable:
//! - the group std is the *unbiased* sample std (`torch.std` default, divisor `G - 1`), and the
//!   scaled advantage is `(R_i - mean) / (std + 1e-6)`;
//! - a group whose rewards are all equal yields exactly zero advantages and
//!   `zero_variance = true`, never NaN. A group of one response counts as zero-variance (there is
//!   no baseline to compare against); verl instead passes its raw reward through, which would
//!   train on an unbaselined reward.
//!
//! Arithmetic runs in `f64` and is rounded to `f32` at the end, so the mean and std of large
//! groups do not drift.

/// Added to the group std before dividing, as verl's `epsilon` does.
const STD_EPS: f64 = 1e-6;

/// How a group's sequence rewards become per-token advantages.
///
/// Serialised with an internal `scheme` tag, e.g. `{"scheme": "hicra", "alpha": 0.2}`; omitted
/// fields take the paper's defaults (alpha 0.2, std scaling on, top-30% entropy band).
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "scheme", rename_all = "snake_case")]
pub enum CreditScheme {
    /// GRPO: `A_i = R_i - mean(R)`, broadcast to every token; with `scale_by_std`, divided by
    /// `std(R) + 1e-6` (unbiased std, as the original GRPO and verl do).
    Grpo {
        /// Divide by the group's unbiased std.
        #[serde(default = "default_true")]
        scale_by_std: bool,
    },
    /// Dr.GRPO: `A_i = R_i - mean(R)`, no std scaling. Dr.GRPO's other fix (no per-sequence
    /// length normalisation) belongs to the loss aggregation, not to credit assignment.
    DrGrpo,
    /// HICRA (the paper's method): `A'_{i,t} = A_i + alpha * |A_i|` on planning tokens, `A_i`
    /// elsewhere, so planning tokens get `(1 + alpha) A_i` when `A_i > 0` and `(1 - alpha) A_i`
    /// when `A_i < 0`. `A_i` is the GRPO advantage with `scale_by_std` as configured.
    Hicra {
        /// Amplification factor; the paper uses 0.2 in every experiment.
        #[serde(default = "default_alpha")]
        alpha: f32,
        /// Divide `A_i` by the group's unbiased std before shaping.
        #[serde(default = "default_true")]
        scale_by_std: bool,
    },
    /// *Unverified* variant described by TRL PR #4997 (hicra.md section 2). Per sequence, tokens
    /// whose entropy is at or above the `1 - entropy_quantile` quantile (linear interpolation,
    /// as `torch.quantile`) are high-entropy. Only responses with `A_i > 0` and a length strictly
    /// above the group's mean length are shaped; in those, tokens that are high-entropy OR
    /// planning get `A_i * (1 + alpha * sign(A_i))`. Requires [`GroupInput::entropies`].
    EntropyGated {
        /// Amplification factor (0.2 in the described code).
        #[serde(default = "default_alpha")]
        alpha: f32,
        /// Fraction of each sequence's tokens counted as high-entropy (0.3 = top 30%).
        #[serde(default = "default_entropy_quantile")]
        entropy_quantile: f32,
        /// Divide `A_i` by the group's unbiased std before shaping.
        #[serde(default = "default_true")]
        scale_by_std: bool,
    },
}

fn default_true() -> bool {
    true
}

fn default_alpha() -> f32 {
    0.2
}

fn default_entropy_quantile() -> f32 {
    0.3
}

impl Default for CreditScheme {
    /// The paper's setting: HICRA with alpha 0.2 on std-scaled GRPO advantages.
    fn default() -> Self {
        CreditScheme::Hicra { alpha: 0.2, scale_by_std: true }
    }
}

impl CreditScheme {
    /// The scheme's serde tag, for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            CreditScheme::Grpo { .. } => "grpo",
            CreditScheme::DrGrpo => "dr_grpo",
            CreditScheme::Hicra { .. } => "hicra",
            CreditScheme::EntropyGated { .. } => "entropy_gated",
        }
    }

    fn scale_by_std(&self) -> bool {
        match *self {
            CreditScheme::Grpo { scale_by_std }
            | CreditScheme::Hicra { scale_by_std, .. }
            | CreditScheme::EntropyGated { scale_by_std, .. } => scale_by_std,
            CreditScheme::DrGrpo => false,
        }
    }
}

/// One group of G responses to the same prompt.
#[derive(Clone, Copy, Debug)]
pub struct GroupInput<'a> {
    /// One scalar reward per response (G entries).
    pub rewards: &'a [f32],
    /// Per response, per completion token: is the token a planning token. Its length defines
    /// the response's token count.
    pub planning_masks: &'a [Vec<bool>],
    /// Per response, per completion token: policy entropy at that position. Required by
    /// [`CreditScheme::EntropyGated`]; when given to other schemes it is still length-checked.
    pub entropies: Option<&'a [Vec<f32>]>,
}

/// Advantages for one group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupAdvantages {
    /// Per response, per completion token (same shape as the planning masks).
    pub per_token: Vec<Vec<f32>>,
    /// `A_i` per response, before any token-level shaping.
    pub sequence: Vec<f32>,
    /// All rewards were equal: every advantage is zero and the group carries no signal.
    pub zero_variance: bool,
}

/// Why a group's advantages could not be computed. Each variant names the offending response.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CreditError {
    /// The group has no responses.
    #[error("empty group: no rewards")]
    EmptyGroup,
    /// `planning_masks` has a different count than `rewards`.
    #[error("{rewards} rewards but {masks} planning masks")]
    MaskCountMismatch {
        /// Number of rewards.
        rewards: usize,
        /// Number of planning masks.
        masks: usize,
    },
    /// `entropies` has a different count than `rewards`.
    #[error("{rewards} rewards but {entropies} entropy sequences")]
    EntropyCountMismatch {
        /// Number of rewards.
        rewards: usize,
        /// Number of entropy sequences.
        entropies: usize,
    },
    /// A response's entropies and planning mask have different token counts.
    #[error("response {index}: planning mask has {mask_len} tokens but entropies have {entropy_len}")]
    LengthMismatch {
        /// Response index in the group.
        index: usize,
        /// Tokens in the planning mask.
        mask_len: usize,
        /// Tokens in the entropy sequence.
        entropy_len: usize,
    },
    /// A reward is NaN or infinite (a broken reward function must mask the sample, not score it).
    #[error("response {index}: reward {value} is not finite")]
    NonFiniteReward {
        /// Response index in the group.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// An entropy is NaN or infinite.
    #[error("response {index}, token {token}: entropy {value} is not finite")]
    NonFiniteEntropy {
        /// Response index in the group.
        index: usize,
        /// Token position in the response.
        token: usize,
        /// The offending value.
        value: f32,
    },
    /// The entropy-gated scheme was asked for without entropies.
    #[error("scheme {scheme} needs per-token entropies but none were given")]
    MissingEntropies {
        /// The scheme's name.
        scheme: &'static str,
    },
    /// A scheme parameter is out of range (alpha not finite, quantile outside [0, 1]).
    #[error("invalid {name} = {value}: {why}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// The offending value.
        value: f32,
        /// The accepted range.
        why: &'static str,
    },
}

/// Computes per-token advantages for one group under `scheme`.
///
/// Validates everything first (counts, lengths, finiteness, parameters), so a malformed group
/// never yields partially shaped advantages.
pub fn assign(scheme: &CreditScheme, input: &GroupInput) -> Result<GroupAdvantages, CreditError> {
    validate(scheme, input)?;
    let (sequence, zero_variance) = sequence_advantages(input.rewards, scheme.scale_by_std());
    let per_token = match *scheme {
        CreditScheme::Grpo { .. } | CreditScheme::DrGrpo => {
            input.planning_masks.iter().zip(&sequence).map(|(mask, &a)| vec![a; mask.len()]).collect()
        }
        CreditScheme::Hicra { alpha, .. } => input
            .planning_masks
            .iter()
            .zip(&sequence)
            .map(|(mask, &a)| {
                let planning = a + alpha * a.abs();
                mask.iter().map(|&p| if p { planning } else { a }).collect()
            })
            .collect(),
        CreditScheme::EntropyGated { alpha, entropy_quantile, .. } => {
            // `validate` guarantees entropies are present for this scheme.
            let entropies = input.entropies.unwrap_or(&[]);
            entropy_gated(input.planning_masks, entropies, &sequence, alpha, entropy_quantile)
        }
    };
    Ok(GroupAdvantages { per_token, sequence, zero_variance })
}

fn validate(scheme: &CreditScheme, input: &GroupInput) -> Result<(), CreditError> {
    let g = input.rewards.len();
    if g == 0 {
        return Err(CreditError::EmptyGroup);
    }
    if input.planning_masks.len() != g {
        return Err(CreditError::MaskCountMismatch { rewards: g, masks: input.planning_masks.len() });
    }
    if let Some((index, &value)) = input.rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(CreditError::NonFiniteReward { index, value });
    }
    if let Some(entropies) = input.entropies {
        if entropies.len() != g {
            return Err(CreditError::EntropyCountMismatch { rewards: g, entropies: entropies.len() });
        }
        for (index, (mask, ent)) in input.planning_masks.iter().zip(entropies).enumerate() {
            if mask.len() != ent.len() {
                return Err(CreditError::LengthMismatch {
                    index,
                    mask_len: mask.len(),
                    entropy_len: ent.len(),
                });
            }
            if let Some((token, &value)) = ent.iter().enumerate().find(|(_, e)| !e.is_finite()) {
                return Err(CreditError::NonFiniteEntropy { index, token, value });
            }
        }
    }
    match *scheme {
        CreditScheme::Hicra { alpha, .. } => check_alpha(alpha),
        CreditScheme::EntropyGated { alpha, entropy_quantile, .. } => {
            check_alpha(alpha)?;
            if !(0.0..=1.0).contains(&entropy_quantile) {
                return Err(CreditError::InvalidParameter {
                    name: "entropy_quantile",
                    value: entropy_quantile,
                    why: "must lie in [0, 1]",
                });
            }
            if input.entropies.is_none() {
                return Err(CreditError::MissingEntropies { scheme: scheme.name() });
            }
            Ok(())
        }
        CreditScheme::Grpo { .. } | CreditScheme::DrGrpo => Ok(()),
    }
}

fn check_alpha(alpha: f32) -> Result<(), CreditError> {
    if alpha.is_finite() {
        Ok(())
    } else {
        Err(CreditError::InvalidParameter { name: "alpha", value: alpha, why: "must be finite" })
    }
}

/// `A_i` for each reward and whether the group is zero-variance.
///
/// Zero variance is decided on exact equality of the rewards rather than on `std < eps`, so a
/// group with tiny but real differences still trains (with std scaling they become O(1)).
fn sequence_advantages(rewards: &[f32], scale_by_std: bool) -> (Vec<f32>, bool) {
    let first = rewards[0];
    if rewards.iter().all(|&r| r == first) {
        return (vec![0.0; rewards.len()], true);
    }
    let n = rewards.len() as f64;
    let mean = rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
    // n >= 2 here: a single reward is always "all equal".
    let divisor = if scale_by_std {
        let ss: f64 = rewards.iter().map(|&r| (f64::from(r) - mean).powi(2)).sum();
        (ss / (n - 1.0)).sqrt() + STD_EPS
    } else {
        1.0
    };
    let adv = rewards.iter().map(|&r| ((f64::from(r) - mean) / divisor) as f32).collect();
    (adv, false)
}

/// Token shaping for [`CreditScheme::EntropyGated`].
fn entropy_gated(
    masks: &[Vec<bool>],
    entropies: &[Vec<f32>],
    sequence: &[f32],
    alpha: f32,
    quantile: f32,
) -> Vec<Vec<f32>> {
    let mean_len = masks.iter().map(Vec::len).sum::<usize>() as f64 / masks.len() as f64;
    masks
        .iter()
        .zip(entropies)
        .zip(sequence)
        .map(|((mask, ent), &a)| {
            if !(a > 0.0 && mask.len() as f64 > mean_len) {
                return vec![a; mask.len()];
            }
            // sign(A) = +1 here because only positive responses are shaped.
            let boosted = a * (1.0 + alpha);
            let threshold = high_entropy_threshold(ent, quantile);
            mask.iter()
                .zip(ent)
                .map(|(&p, &e)| if p || threshold.is_some_and(|t| e >= t) { boosted } else { a })
                .collect()
        })
        .collect()
}

/// The entropy at or above which a token is "high-entropy": `torch.quantile(ent, 1 - q)` with
/// linear interpolation. `None` when no token qualifies (empty sequence or `q == 0`, where
/// torch's rule would still select the maximum).
fn high_entropy_threshold(ent: &[f32], quantile: f32) -> Option<f32> {
    if ent.is_empty() || quantile <= 0.0 {
        return None;
    }
    let mut sorted = ent.to_vec();
    sorted.sort_by(f32::total_cmp);
    let pos = (1.0 - f64::from(quantile)) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    let t = f64::from(sorted[lo]) + (f64::from(sorted[hi]) - f64::from(sorted[lo])) * frac;
    Some(t as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    fn masks(lens: &[usize]) -> Vec<Vec<bool>> {
        lens.iter().map(|&n| vec![false; n]).collect()
    }

    fn run(scheme: CreditScheme, rewards: &[f32], m: &[Vec<bool>]) -> GroupAdvantages {
        assign(&scheme, &GroupInput { rewards, planning_masks: m, entropies: None }).expect("valid group")
    }

    #[test]
    fn grpo_without_std_1001() {
        // mean([1,0,0,1]) = 0.5 -> A = [0.5, -0.5, -0.5, 0.5]
        let out = run(CreditScheme::Grpo { scale_by_std: false }, &[1., 0., 0., 1.], &masks(&[2, 1, 3, 2]));
        assert_eq!(out.sequence, vec![0.5, -0.5, -0.5, 0.5]);
        assert_eq!(out.per_token[2], vec![-0.5; 3]);
        assert!(!out.zero_variance);
    }

    #[test]
    fn grpo_with_std_1001() {
        // deviations ±0.5; unbiased var = 4 * 0.25 / 3 = 1/3; std = 0.577350
        // A = ±0.5 / (0.577350 + 1e-6) = ±0.866024
        let out = run(CreditScheme::Grpo { scale_by_std: true }, &[1., 0., 0., 1.], &masks(&[1; 4]));
        let expect = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-6);
        assert!(close(out.sequence[0], expect as f32), "{:?}", out.sequence);
        assert!(close(out.sequence[0], 0.866_024));
        assert!(close(out.sequence[1], -0.866_024));
    }

    #[test]
    fn grpo_1000_with_and_without_std() {
        // mean = 0.25 -> A = [0.75, -0.25, -0.25, -0.25]
        let raw = run(CreditScheme::Grpo { scale_by_std: false }, &[1., 0., 0., 0.], &masks(&[1; 4]));
        assert_eq!(raw.sequence, vec![0.75, -0.25, -0.25, -0.25]);
        // sum of squares = 0.5625 + 3 * 0.0625 = 0.75; unbiased var = 0.75 / 3 = 0.25; std = 0.5
        // A = [0.75 / 0.5, -0.25 / 0.5] = [1.5, -0.5] (up to the 1e-6 epsilon)
        let scaled = run(CreditScheme::Grpo { scale_by_std: true }, &[1., 0., 0., 0.], &masks(&[1; 4]));
        assert!(close(scaled.sequence[0], 1.5) && close(scaled.sequence[3], -0.5), "{:?}", scaled.sequence);
    }

    #[test]
    fn dr_grpo_never_scales() {
        // Same as unscaled GRPO: mean(2, 0) = 1 -> [1, -1], even though std = sqrt(2).
        let out = run(CreditScheme::DrGrpo, &[2., 0.], &masks(&[3, 1]));
        assert_eq!(out.per_token, vec![vec![1.0; 3], vec![-1.0]]);
    }

    #[test]
    fn hicra_amplifies_planning_tokens_by_sign() {
        // Unscaled: A = [0.5, -0.5]. Planning tokens: 0.5 + 0.2*0.5 = 0.6 = (1+0.2)*0.5 and
        // -0.5 + 0.2*0.5 = -0.4 = (1-0.2)*(-0.5). Execution tokens keep ±0.5.
        let m = vec![vec![true, false, true], vec![false, true]];
        let out = run(CreditScheme::Hicra { alpha: 0.2, scale_by_std: false }, &[1., 0.], &m);
        assert!(close(out.per_token[0][0], 0.6) && close(out.per_token[0][2], 0.6));
        assert_eq!(out.per_token[0][1], 0.5);
        assert_eq!(out.per_token[1][0], -0.5);
        assert!(close(out.per_token[1][1], -0.4));
        assert_eq!(out.sequence, vec![0.5, -0.5]);
    }

    #[test]
    fn hicra_default_scales_by_std() {
        // [1, 0]: mean 0.5, unbiased std = sqrt(0.5) = 0.707107; A = ±0.707106.
        // Planning on the positive one: 1.2 * 0.707106 = 0.848528.
        assert_eq!(CreditScheme::default(), CreditScheme::Hicra { alpha: 0.2, scale_by_std: true });
        let out = run(CreditScheme::default(), &[1., 0.], &[vec![true], vec![true]]);
        assert!(close(out.sequence[0], std::f32::consts::FRAC_1_SQRT_2));
        assert!(close(out.per_token[0][0], 0.848_528));
        assert!(close(out.per_token[1][0], -0.565_685)); // 0.8 * -0.707106
    }

    #[test]
    fn equal_rewards_give_zero_and_no_nan() {
        for scheme in
            [CreditScheme::Grpo { scale_by_std: true }, CreditScheme::DrGrpo, CreditScheme::default()]
        {
            let out = run(scheme, &[1., 1., 1.], &[vec![true, false], vec![true], vec![]]);
            assert!(out.zero_variance);
            assert!(out.per_token.iter().flatten().chain(&out.sequence).all(|&a| a == 0.0));
        }
        let single = run(CreditScheme::default(), &[0.7], &[vec![true]]);
        assert!(single.zero_variance && single.sequence == vec![0.0]);
    }

    #[test]
    fn entropy_gated_selects_long_positive_high_entropy() {
        // Rewards [1, 1, 0], unscaled: mean 2/3 -> A = [1/3, 1/3, -2/3].
        // Lengths [10, 2, 12]: mean 8, so response 0 (A>0, 10>8) is shaped; response 1 (short)
        // and response 2 (A<0) are not.
        // Response 0 entropies 0..9 (sorted already): quantile 0.7 at position 0.7*9 = 6.3
        // -> threshold 6.3, so tokens with entropy 7, 8, 9 (top 30%) are high-entropy.
        // Token 1 is planning. Shaped value: (1/3) * 1.2 = 0.4.
        let mut m = masks(&[10, 2, 12]);
        m[0][1] = true;
        m[1][0] = true;
        m[2][0] = true;
        let ent: Vec<Vec<f32>> = vec![(0..10).map(|x| x as f32).collect(), vec![9.0; 2], vec![9.0; 12]];
        let scheme = CreditScheme::EntropyGated { alpha: 0.2, entropy_quantile: 0.3, scale_by_std: false };
        let input =
            GroupInput { rewards: &[1., 1., 0.], planning_masks: &m, entropies: Some(ent.as_slice()) };
        let out = assign(&scheme, &input).expect("valid");
        let third = 1.0f32 / 3.0;
        let boosted: Vec<usize> = (0..10).filter(|&t| !close(out.per_token[0][t], third)).collect();
        assert_eq!(boosted, vec![1, 7, 8, 9]);
        assert!(close(out.per_token[0][7], 0.4));
        assert!(out.per_token[1].iter().all(|&a| close(a, third)));
        assert!(out.per_token[2].iter().all(|&a| close(a, -2.0 * third)));
    }

    #[test]
    fn errors_name_the_response() {
        let scheme = CreditScheme::default();
        let m = masks(&[1, 1]);
        let err = |r: &[f32], m: &[Vec<bool>], e: Option<&[Vec<f32>]>, s: &CreditScheme| {
            assign(s, &GroupInput { rewards: r, planning_masks: m, entropies: e }).expect_err("must fail")
        };
        assert_eq!(err(&[], &[], None, &scheme), CreditError::EmptyGroup);
        assert_eq!(err(&[1.], &m, None, &scheme), CreditError::MaskCountMismatch { rewards: 1, masks: 2 });
        assert!(matches!(
            err(&[1., f32::NAN], &m, None, &scheme),
            CreditError::NonFiniteReward { index: 1, .. }
        ));
        let ent = vec![vec![0.5], vec![0.5, 0.1]];
        assert_eq!(
            err(&[1., 0.], &m, Some(ent.as_slice()), &scheme),
            CreditError::LengthMismatch { index: 1, mask_len: 1, entropy_len: 2 }
        );
        let gated = CreditScheme::EntropyGated { alpha: 0.2, entropy_quantile: 0.3, scale_by_std: true };
        assert_eq!(
            err(&[1., 0.], &m, None, &gated),
            CreditError::MissingEntropies { scheme: "entropy_gated" }
        );
        let bad_q = CreditScheme::EntropyGated { alpha: 0.2, entropy_quantile: 1.5, scale_by_std: true };
        let ok_ent = vec![vec![0.5], vec![0.5]];
        assert!(matches!(
            err(&[1., 0.], &m, Some(ok_ent.as_slice()), &bad_q),
            CreditError::InvalidParameter { .. }
        ));
        let inf_ent = vec![vec![0.5], vec![f32::INFINITY]];
        assert!(matches!(
            err(&[1., 0.], &m, Some(inf_ent.as_slice()), &gated),
            CreditError::NonFiniteEntropy { index: 1, token: 0, .. }
        ));
    }

    #[test]
    fn serde_tag_and_defaults() {
        let s: CreditScheme = serde_json::from_str(r#"{"scheme":"hicra"}"#).expect("parses");
        assert_eq!(s, CreditScheme::default());
        let s: CreditScheme = serde_json::from_str(r#"{"scheme":"dr_grpo"}"#).expect("parses");
        assert_eq!(s.name(), "dr_grpo");
        let json = serde_json::to_string(&CreditScheme::Grpo { scale_by_std: false }).expect("serialises");
        assert_eq!(json, r#"{"scheme":"grpo","scale_by_std":false}"#);
    }
}
