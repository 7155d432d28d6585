//! Token sampling on the device: temperature, top-k, top-p and a counter-based RNG.
//!
//! Everything here is tensor arithmetic on the logits' device; nothing is copied to the host,
//! so a decode step stays free of synchronisation. Randomness comes from a hash of
//! `(seed, step, token id)` (SplitMix64's finaliser in int64 arithmetic) turned into Gumbel
//! noise: `argmax(logits / T + gumbel)` is an exact sample of `softmax(logits / T)`, and the
//! same seed gives the same tokens whatever else shares the batch, on CPU and CUDA alike.
//!
//! The reported logprob is under the distribution the token was drawn from *before*
//! truncation: `log_softmax(logits / T)` (T = 1 for greedy rows), as the trainer's teacher-
//! forced scorer computes it.

use tch::{Device, Kind, Tensor};

/// How one sequence picks its next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// RNG seed of the sequence.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Whether this draws randomly.
    pub fn is_sampled(&self) -> bool {
        self.temperature > 0.0
    }

    /// The temperature logprobs are reported under (1 for greedy).
    pub fn logprob_temperature(&self) -> f64 {
        if self.is_sampled() { self.temperature } else { 1.0 }
    }
}

/// Per-row sampling parameters as device tensors, built once per batch composition.
#[derive(Debug)]
pub struct BatchSampling {
    /// `(b, 1)` float: 1 / T (1 for greedy rows).
    inv_temperature: Tensor,
    /// `(b, 1)` float: 1 for sampled rows, 0 for greedy rows (scales the noise).
    noise_scale: Tensor,
    /// `(b, 1)` float.
    top_p: Tensor,
    /// `(b, 1)` int64, vocab size where disabled.
    top_k: Tensor,
    /// `(b, 1)` int64.
    seeds: Tensor,
    any_sampled: bool,
    any_truncated: bool,
}

/// One step's choice for every row.
#[derive(Debug)]
pub struct Sampled {
    /// `(b,)` int64.
    pub tokens: Tensor,
    /// `(b,)` float: logprob of each chosen token.
    pub logprobs: Tensor,
    /// `(b,)` float: entropy (nats) of each row's sampling distribution (temperature applied,
    /// before truncation), the per-token entropy HICRA's analyses and gated credit use.
    pub entropies: Tensor,
    /// `(b, k)` values and ids of the k best alternatives, when asked for.
    pub top: Option<(Tensor, Tensor)>,
}

impl BatchSampling {
    /// Packs per-row parameters for a batch on `device`.
    pub fn new(rows: &[&SamplingParams], vocab_size: usize, device: Device) -> Self {
        let col_f = |v: Vec<f32>| Tensor::from_slice(&v).view([-1, 1]).to_device(device);
        let col_i = |v: Vec<i64>| Tensor::from_slice(&v).view([-1, 1]).to_device(device);
        let vocab = vocab_size as i64;
        Self {
            inv_temperature: col_f(rows.iter().map(|p| (1.0 / p.logprob_temperature()) as f32).collect()),
            noise_scale: col_f(rows.iter().map(|p| if p.is_sampled() { 1.0 } else { 0.0 }).collect()),
            top_p: col_f(rows.iter().map(|p| p.top_p.clamp(0.0, 1.0) as f32).collect()),
            top_k: col_i(rows.iter().map(|p| if p.top_k == 0 { vocab } else { (p.top_k as i64).min(vocab) }).collect()),
            seeds: col_i(rows.iter().map(|p| p.seed as i64).collect()),
            any_sampled: rows.iter().any(|p| p.is_sampled()),
            any_truncated: rows.iter().any(|p| p.is_sampled() && (p.top_p < 1.0 || p.top_k > 0)),
        }
    }

    /// Picks one token per row from float32 `logits` `(b, vocab)`; `steps` `(b, 1)` int64 is
    /// each row's count of tokens generated so far (part of the RNG counter).
    pub fn sample(&self, logits: &Tensor, steps: &Tensor, top_logprobs: usize) -> Sampled {
        let scaled = logits * &self.inv_temperature;
        let logprobs_all = scaled.log_softmax(-1, Kind::Float);
        let tokens = if self.any_sampled {
            let mut scores = self.truncate(&scaled);
            let noise = gumbel_noise(&self.seeds, steps, logits.size()[1], logits.device());
            scores = scores + noise * &self.noise_scale;
            scores.argmax(-1, false)
        } else {
            scaled.argmax(-1, false)
        };
        let logprobs = logprobs_all.gather(1, &tokens.unsqueeze(1), false).squeeze_dim(1);
        let top = (top_logprobs > 0).then(|| logprobs_all.topk(top_logprobs as i64, -1, true, true));
        let entropies = -(logprobs_all.exp() * &logprobs_all).sum_dim_intlist(-1, false, Kind::Float);
        Sampled { tokens, logprobs, entropies, top }
    }

    /// Sets scores outside each row's top-k / top-p set to -inf.
    fn truncate(&self, scaled: &Tensor) -> Tensor {
        if !self.any_truncated {
            return scaled.shallow_clone();
        }
        let (sorted, order) = scaled.sort(-1, true);
        let vocab = scaled.size()[1];
        let rank = Tensor::arange(vocab, (Kind::Int64, scaled.device())).unsqueeze(0);
        // Top-k first, then top-p over the renormalised survivors (transformers' and vLLM's
        // order). The first token is always kept, so a row never loses every candidate.
        let beyond_k = rank.ge_tensor(&self.top_k);
        let probs = sorted.masked_fill(&beyond_k, f64::NEG_INFINITY).softmax(-1, Kind::Float);
        let mass_before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = mass_before.gt_tensor(&self.top_p).logical_or(&beyond_k);
        let drop = drop_sorted.zeros_like().scatter(1, &order, &drop_sorted);
        scaled.masked_fill(&drop, f64::NEG_INFINITY)
    }
}

// SplitMix64 constants as the two's-complement int64 values torch multiplies with.
const GOLDEN: i64 = 0x9E37_79B9_7F4A_7C15_u64 as i64;
const MIX1: i64 = 0xBF58_476D_1CE4_E5B9_u64 as i64;
const MIX2: i64 = 0x94D0_49BB_1331_11EB_u64 as i64;
const STEP_MUL: i64 = 0xD1B5_4A32_D192_ED03_u64 as i64;

/// Logical right shift of int64 lanes (torch's `>>` is arithmetic for signed types).
fn shift_right(x: &Tensor, bits: i64) -> Tensor {
    x.bitwise_right_shift_tensor_scalar(bits).bitwise_and((1i64 << (64 - bits)) - 1)
}

/// SplitMix64's finaliser, lane-wise; int64 multiplication wraps like u64.
fn mix(z: Tensor) -> Tensor {
    let z = z.bitwise_xor_tensor(&shift_right(&z, 30)) * MIX1;
    let z = z.bitwise_xor_tensor(&shift_right(&z, 27)) * MIX2;
    z.bitwise_xor_tensor(&shift_right(&z, 31))
}

/// Standard Gumbel noise `(b, vocab)` from `(seed, step, token id)`.
fn gumbel_noise(seeds: &Tensor, steps: &Tensor, vocab: i64, device: Device) -> Tensor {
    let ids = Tensor::arange(vocab, (Kind::Int64, device)).unsqueeze(0);
    let stream = mix(seeds * GOLDEN + steps * STEP_MUL);
    let bits = mix(stream + ids * GOLDEN);
    // 24 high bits -> uniform in (0, 1), never 0 or 1.
    let uniform = (shift_right(&bits, 40).to_kind(Kind::Float) + 0.5) * (1.0 / 16_777_216.0);
    -(-uniform.log()).log()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Tensor {
        Tensor::from_slice(&[2.0f32, 1.0, 0.5, -1.0, 0.0, 3.0]).view([1, 6])
    }

    fn draw(params: &SamplingParams, n: i64) -> Vec<i64> {
        let batch = BatchSampling::new(&[params], 6, Device::Cpu);
        (0..n)
            .map(|step| {
                let steps = Tensor::from_slice(&[step]).view([1, 1]);
                i64::try_from(batch.sample(&logits(), &steps, 0).tokens.get(0)).unwrap_or(-1)
            })
            .collect()
    }

    #[test]
    fn greedy_takes_argmax_and_reports_untempered_logprob() {
        let batch = BatchSampling::new(&[&SamplingParams::greedy()], 6, Device::Cpu);
        let out = batch.sample(&logits(), &Tensor::zeros([1, 1], (Kind::Int64, Device::Cpu)), 2);
        assert_eq!(i64::try_from(out.tokens.get(0)).ok(), Some(5));
        let expected = f64::try_from(logits().log_softmax(-1, Kind::Float).get(0).get(5)).unwrap_or(0.0);
        let got = f64::try_from(out.logprobs.get(0)).unwrap_or(1.0);
        assert!((expected - got).abs() < 1e-6);
        let (_, top_ids) = out.top.expect("asked for top-2");
        assert_eq!(Vec::<i64>::try_from(top_ids.get(0)).unwrap_or_default(), vec![5, 0]);
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_softmax() {
        let params = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 7 };
        let a = draw(&params, 4000);
        assert_eq!(a, draw(&params, 4000));
        let other = draw(&SamplingParams { seed: 8, ..params.clone() }, 4000);
        assert_ne!(a, other);
        let probs = Vec::<f32>::try_from(logits().softmax(-1, Kind::Float).get(0)).unwrap_or_default();
        for (token, p) in probs.iter().enumerate() {
            let freq = a.iter().filter(|&&t| t == token as i64).count() as f32 / a.len() as f32;
            assert!((freq - p).abs() < 0.03, "token {token}: frequency {freq} vs probability {p}");
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let top2 = draw(&SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 2, seed: 1 }, 500);
        assert!(top2.iter().all(|&t| t == 5 || t == 0));
        assert!(top2.contains(&5) && top2.contains(&0));
        // p(5) ~ 0.61, so top_p 0.5 keeps token 5 alone.
        let nucleus = draw(&SamplingParams { temperature: 1.0, top_p: 0.5, top_k: 0, seed: 1 }, 200);
        assert!(nucleus.iter().all(|&t| t == 5));
    }

    #[test]
    fn a_row_samples_the_same_whatever_shares_its_batch() {
        let p = SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 0, seed: 42 };
        let q = SamplingParams { temperature: 0.0, ..p.clone() };
        let alone = BatchSampling::new(&[&p], 6, Device::Cpu);
        let paired = BatchSampling::new(&[&q, &p], 6, Device::Cpu);
        for step in 0..50i64 {
            let a = alone.sample(&logits(), &Tensor::from_slice(&[step]).view([1, 1]), 0);
            let both = paired.sample(&Tensor::cat(&[logits(), logits()], 0), &Tensor::from_slice(&[step, step]).view([2, 1]), 0);
            assert_eq!(i64::try_from(a.tokens.get(0)).ok(), i64::try_from(both.tokens.get(1)).ok());
        }
    }
}
