//! A linear layer whose output rows may carry LoRA adapters.
//!
//! Projections that read the same input are fused into one matrix (q|k|v, gate|up) because on
//! a launch-bound GPU, and for small models on the CPU, one matmul beats three. Each adapter
//! still belongs to one named projection (`q_proj`, `v_proj`, ...) and covers that projection's
//! row range of the fused output, so adapters keep PEFT's per-module identity.
//!
//! Invariant: with `B` zero-initialised, or with LoRA switched off for the forward pass, the
//! output equals the base layer exactly (the adapter term is skipped, not added as zeros).

use std::ops::Range;

use tch::{Kind, Tensor};

/// A low-rank update `scale * (x A^T) B^T` added to rows `rows` of the layer's output.
#[derive(Debug)]
pub struct LoraAdapter {
    /// The projection this adapter belongs to (`q_proj`, `up_proj`, ...).
    pub module: String,
    /// Output rows of the fused layer that the projection occupies.
    pub rows: Range<i64>,
    /// `(rank, in_features)`, trainable, f32.
    pub a: Tensor,
    /// `(rows.len(), rank)`, trainable, f32, zero at initialisation.
    pub b: Tensor,
    /// `lora_alpha / rank`.
    pub scale: f64,
}

/// One (possibly fused) linear layer: `y = x W^T + bias (+ LoRA)`.
#[derive(Debug)]
pub struct Linear {
    /// `(out_features, in_features)` in the model dtype; never trained.
    pub weight: Tensor,
    /// `(out_features,)` when the checkpoint has biases.
    pub bias: Option<Tensor>,
    /// Adapters over disjoint row ranges.
    pub adapters: Vec<LoraAdapter>,
    /// Dropout on the adapters' input in training passes.
    pub dropout: f64,
}

impl Linear {
    /// A layer without adapters.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, adapters: Vec::new(), dropout: 0.0 }
    }

    /// Output width.
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// Applies the layer to `x` of shape `(..., in_features)`; `training` enables dropout on
    /// the adapter input.
    pub fn forward(&self, x: &Tensor, use_lora: bool, training: bool) -> Tensor {
        let base = if super::cpu_gemv::applies(x, &self.weight) {
            super::cpu_gemv::linear(x, &self.weight, self.bias.as_ref())
        } else {
            x.linear(&self.weight, self.bias.as_ref())
        };
        if !use_lora || self.adapters.is_empty() {
            return base;
        }
        self.add_adapters(x, base, training)
    }

    fn add_adapters(&self, x: &Tensor, base: Tensor, training: bool) -> Tensor {
        let out_kind = base.kind();
        let mut x32 = x.to_kind(Kind::Float);
        if training && self.dropout > 0.0 {
            x32 = x32.dropout(self.dropout, true);
        }
        let mut pieces: Vec<Tensor> = Vec::new();
        let mut cursor = 0;
        let mut sorted: Vec<&LoraAdapter> = self.adapters.iter().collect();
        sorted.sort_by_key(|a| a.rows.start);
        for adapter in sorted {
            if adapter.rows.start > cursor {
                pieces.push(base.narrow(-1, cursor, adapter.rows.start - cursor));
            }
            let delta = x32.linear::<Tensor>(&adapter.a, None).linear::<Tensor>(&adapter.b, None) * adapter.scale;
            let len = adapter.rows.end - adapter.rows.start;
            let rows = base.narrow(-1, adapter.rows.start, len);
            pieces.push((rows.to_kind(Kind::Float) + delta).to_kind(out_kind));
            cursor = adapter.rows.end;
        }
        let out = self.out_features();
        if cursor < out {
            pieces.push(base.narrow(-1, cursor, out - cursor));
        }
        Tensor::cat(&pieces, -1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn zero_b_adapter_leaves_output_unchanged_and_trained_b_changes_only_its_rows() {
        tch::manual_seed(0);
        let w = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
        let mut layer = Linear::new(w, None);
        let x = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        let base = layer.forward(&x, true, false);
        layer.adapters.push(LoraAdapter {
            module: "k_proj".into(),
            rows: 2..4,
            a: Tensor::randn([2, 4], (Kind::Float, Device::Cpu)),
            b: Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
            scale: 2.0,
        });
        let with_zero = layer.forward(&x, true, false);
        assert_eq!(f64::try_from((&with_zero - &base).abs().max()).unwrap_or(1.0), 0.0);

        let _ = layer.adapters[0].b.fill_(0.5);
        let changed = layer.forward(&x, true, false);
        let diff = (&changed - &base).abs().sum_dim_intlist([0i64, 1].as_slice(), false, Kind::Float);
        let per_row: Vec<f32> = Vec::<f32>::try_from(diff).unwrap_or_default();
        assert_eq!(per_row[0], 0.0);
        assert_eq!(per_row[1], 0.0);
        assert!(per_row[2] > 0.0 && per_row[3] > 0.0);
        assert_eq!(per_row[4], 0.0);
        let off = layer.forward(&x, false, false);
        assert_eq!(f64::try_from((&off - &base).abs().max()).unwrap_or(1.0), 0.0);
    }
}
