//! Rotary position embeddings: the cos/sin tables, computed once per model and device.
//!
//! Follows transformers' `rotate_half` convention (the two halves of a head are the pair).
//! GGUF files of the llama family store q/k rows permuted for llama.cpp's interleaved
//! convention; the GGUF loader undoes that so this single convention serves every source.

use tch::{Device, Kind, Tensor};

use super::config::{ModelConfig, RopeScaling};

/// Inverse frequencies, one per pair of head dimensions, after scaling.
pub(crate) fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    let scaled: Vec<f64> = match &cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Factors(divisors) => {
            base.iter().zip(divisors).map(|(f, d)| f / *d as f64).collect()
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

/// Precomputed `cos` and signed `sin`, each `(max_positions, head_dim)` in the model dtype.
///
/// `sin` carries the sign of `rotate_half` (`-sin` on the first half), so applying RoPE is
/// `x * cos + roll(x, head_dim / 2) * sin`: four kernels instead of seven, which matters when
/// a decode step is launch-bound.
#[derive(Debug)]
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    /// Builds the tables for positions `0..max_positions`.
    pub fn new(cfg: &ModelConfig, max_positions: usize, kind: Kind, device: Device) -> Self {
        let inv_freq = Tensor::from_slice(&inverse_frequencies(cfg)).to_device(device);
        let positions = Tensor::arange(max_positions as i64, (Kind::Float, device));
        // Outer product in f32 like transformers, then duplicated for the two halves.
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        let cos = Tensor::cat(&[freqs.cos(), freqs.cos()], -1);
        let sin = Tensor::cat(&[-freqs.sin(), freqs.sin()], -1);
        Self { cos: cos.to_kind(kind), sin: sin.to_kind(kind) }
    }

    /// Rows of the tables: positions is `(batch, seq)` int64; returns `(batch, 1, seq, head_dim)`.
    pub fn select(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let (b_sz, seq_len) = positions.size2().unwrap_or((1, 1));
        let flat = positions.reshape([-1]);
        let dim = self.cos.size()[1];
        let cos = self.cos.index_select(0, &flat).reshape([b_sz, 1, seq_len, dim]);
        let sin = self.sin.index_select(0, &flat).reshape([b_sz, 1, seq_len, dim]);
        (cos, sin)
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.size()[0] as usize
    }
}

/// Applies RoPE to `x` of shape `(batch, heads, seq, head_dim)` with tables from
/// [`RotaryTables::select`]: `rotate_half(x) = [-x2, x1] = roll(x, half) * sign`.
pub(crate) fn apply(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    x * cos + x.roll([half], [3]) * signed_sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roll_form_equals_rotate_half() {
        tch::manual_seed(1);
        let x = Tensor::randn([1, 2, 3, 8], (Kind::Float, Device::Cpu));
        let angles = Tensor::randn([1, 1, 3, 4], (Kind::Float, Device::Cpu));
        let (c, s) = (angles.cos(), angles.sin());
        let cos = Tensor::cat(&[&c, &c], 3);
        let rotate_half = Tensor::cat(&[x.narrow(3, 4, 4).neg(), x.narrow(3, 0, 4)], 3);
        let expected = &x * &cos + rotate_half * Tensor::cat(&[&s, &s], 3);
        let got = apply(&x, &cos, &Tensor::cat(&[-&s, s.shallow_clone()], 3));
        assert!(f64::try_from((got - expected).abs().max()).unwrap_or(1.0) < 1e-6);
    }
}
