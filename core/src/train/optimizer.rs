//! AdamW over the LoRA tensors, gradient-norm clipping, and the warm-up + cosine schedule.
//!
//! Written out rather than taken from `tch::nn` because the adapters live inside the served
//! model (not in a `VarStore`) and are updated in place: the very next decode step reads them.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Optimizer and schedule settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Adam's beta1.
    pub beta1: f64,
    /// Adam's beta2.
    pub beta2: f64,
    /// Adam's epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Gradients are scaled down to this global L2 norm (0 disables clipping).
    pub max_grad_norm: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// Steps of the cosine decay after warm-up (0: constant after warm-up).
    pub decay_steps: u64,
    /// The cosine ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 1.0, warmup_steps: 0, decay_steps: 0, min_lr_ratio: 0.1 }
    }
}

impl OptimConfig {
    /// Learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.decay_steps == 0 {
            return self.lr;
        }
        let progress = ((step - self.warmup_steps) as f64 / self.decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Debug)]
pub struct AdamW {
    config: OptimConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// First moments, one per parameter.
    pub exp_avg: Vec<Tensor>,
    /// Second moments, one per parameter.
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    /// Fresh state for `params`.
    pub fn new(config: OptimConfig, params: &[Tensor]) -> Self {
        let zeros = || params.iter().map(|p| p.zeros_like().set_requires_grad(false)).collect();
        Self { config, step: 0, exp_avg: zeros(), exp_avg_sq: zeros() }
    }

    /// The settings.
    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// Updates `params` in place from their `.grad()`; returns the learning rate used.
    pub fn apply(&mut self, params: &[Tensor]) -> f64 {
        let c = &self.config;
        let lr = c.lr_at(self.step);
        self.step += 1;
        let t = self.step as f64;
        let (bias1, bias2) = (1.0 - c.beta1.powf(t), 1.0 - c.beta2.powf(t));
        tch::no_grad(|| {
            for ((p, m), v) in params.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if c.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = m.g_mul_scalar_(c.beta1);
                let _ = m.g_add_(&(&grad * (1.0 - c.beta1)));
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.g_add_(&(&grad * &grad * (1.0 - c.beta2)));
                let denom = (&*v / bias2).sqrt() + c.eps;
                let update = &*m / &denom * (lr / bias1);
                let _ = p.g_sub_(&update);
            }
        });
        lr
    }
}

/// Clears the gradients of `params`.
pub fn zero_grad(params: &[Tensor]) {
    for p in params {
        let mut grad = p.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return 0.0;
    }
    // Every squared norm is summed on the device and read back once: one host sync per step,
    // not one per adapter tensor (hundreds, each a stall on a GPU).
    let squares: Vec<Tensor> = grads.iter().map(|g| g.square().sum(Kind::Double)).collect();
    let total = f64::try_from(Tensor::stack(&squares, 0).sum(Kind::Double).sqrt()).unwrap_or(f64::NAN);
    if max_norm > 0.0 && total > max_norm {
        let scale = max_norm / (total + 1e-6);
        tch::no_grad(|| {
            for g in &grads {
                let _ = g.shallow_clone().g_mul_scalar_(scale);
            }
        });
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = OptimConfig { lr: 1.0, warmup_steps: 4, decay_steps: 10, min_lr_ratio: 0.1, ..OptimConfig::default() };
        assert!((c.lr_at(0) - 0.25).abs() < 1e-12);
        assert!((c.lr_at(3) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(9) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[2.0f32, -0.5, 0.0])).sum(Kind::Float);
        loss.backward();
        let mut opt = AdamW::new(OptimConfig { lr: 0.1, max_grad_norm: 0.0, ..OptimConfig::default() }, &[p.shallow_clone()]);
        opt.apply(&[p.shallow_clone()]);
        let got = Vec::<f32>::try_from(p.detach().to_device(Device::Cpu)).unwrap_or_default();
        // Adam's first step is lr * sign(grad) (bias-corrected m/sqrt(v) = g/|g|); zero grad: no move.
        assert!((got[0] - 0.9).abs() < 1e-5 && (got[1] - -1.9).abs() < 1e-5 && (got[2] - 3.0).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let norm = clip_grad_norm(&[p.shallow_clone()], 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped = f64::try_from(p.grad().square().sum(Kind::Double)).unwrap_or(0.0).sqrt();
        assert!((clipped - 1.0).abs() < 1e-5);
    }
}
