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

/// AdamW state over one flat buffer of values (see [`super::flat`]): first and second moments
/// laid out like the values, and the step count.
#[derive(Debug)]
pub struct AdamW {
    config: OptimConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// First moments, laid out like the values.
    exp_avg: Tensor,
    /// Second moments, laid out like the values.
    exp_avg_sq: Tensor,
}

impl AdamW {
    /// Fresh state for the flat buffer `values`.
    pub fn new(config: OptimConfig, values: &Tensor) -> Self {
        let zeros = || values.zeros_like().set_requires_grad(false);
        Self { config, step: 0, exp_avg: zeros(), exp_avg_sq: zeros() }
    }

    /// The settings.
    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// The first and second moments (flat, laid out like the values).
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Updates `values` in place from `grads` (same layout); returns the learning rate used.
    /// Eight whole-buffer ops, whatever the number of adapter tensors. Every value moves, like
    /// PyTorch's AdamW over parameters that all received a gradient (every adapter is in the
    /// forward pass of every step).
    pub fn apply(&mut self, values: &Tensor, grads: &Tensor) -> f64 {
        let c = &self.config;
        let lr = c.lr_at(self.step);
        self.step += 1;
        let t = self.step as f64;
        let (bias1, bias2) = (1.0 - c.beta1.powf(t), 1.0 - c.beta2.powf(t));
        tch::no_grad(|| {
            let mut p = values.shallow_clone();
            if c.weight_decay > 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = self.exp_avg.g_mul_scalar_(c.beta1);
            let _ = self.exp_avg.g_add_(&(grads * (1.0 - c.beta1)));
            let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = self.exp_avg_sq.g_add_(&(grads * grads * (1.0 - c.beta2)));
            let denom = (&self.exp_avg_sq / bias2).sqrt() + c.eps;
            let update = &self.exp_avg / &denom * (lr / bias1);
            let _ = p.g_sub_(&update);
        });
        lr
    }
}

/// Scales `grads` (one flat buffer) so their L2 norm is at most `max_norm` (0: no clipping);
/// returns the norm before. One reduction and one host sync per step.
pub fn clip_grad_norm(grads: &Tensor, max_norm: f64) -> f64 {
    let total = f64::try_from(grads.square().sum(Kind::Double).sqrt()).unwrap_or(f64::NAN);
    if max_norm > 0.0 && total > max_norm {
        let scale = max_norm / (total + 1e-6);
        tch::no_grad(|| {
            let _ = grads.shallow_clone().g_mul_scalar_(scale);
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
        let grads = Tensor::from_slice(&[2.0f32, -0.5, 0.0]);
        let mut opt = AdamW::new(OptimConfig { lr: 0.1, max_grad_norm: 0.0, ..OptimConfig::default() }, &p);
        opt.apply(&p, &grads);
        let got = Vec::<f32>::try_from(p.detach().to_device(Device::Cpu)).unwrap_or_default();
        // Adam's first step is lr * sign(grad) (bias-corrected m/sqrt(v) = g/|g|); zero grad: no move.
        assert!((got[0] - 0.9).abs() < 1e-5 && (got[1] - -1.9).abs() < 1e-5 && (got[2] - 3.0).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let grads = Tensor::from_slice(&[3.0f32, 4.0]);
        let norm = clip_grad_norm(&grads, 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped = f64::try_from(grads.square().sum(Kind::Double)).unwrap_or(0.0).sqrt();
        assert!((clipped - 1.0).abs() < 1e-5);
    }

    /// The textbook per-tensor AdamW with global-norm clipping, one tensor at a time: what the
    /// flat-buffer optimizer must equal.
    fn per_tensor_step(params: &[Tensor], m: &mut [Tensor], v: &mut [Tensor], c: &OptimConfig, step: u64) {
        let norm = params.iter().map(|p| f64::try_from(p.grad().square().sum(Kind::Double)).unwrap_or(0.0)).sum::<f64>().sqrt();
        let scale = if c.max_grad_norm > 0.0 && norm > c.max_grad_norm { c.max_grad_norm / (norm + 1e-6) } else { 1.0 };
        let lr = c.lr_at(step);
        let t = (step + 1) as f64;
        let (bias1, bias2) = (1.0 - c.beta1.powf(t), 1.0 - c.beta2.powf(t));
        tch::no_grad(|| {
            for ((p, m), v) in params.iter().zip(m.iter_mut()).zip(v.iter_mut()) {
                let grad = p.grad() * scale;
                let mut p = p.shallow_clone();
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                let _ = m.g_mul_scalar_(c.beta1);
                let _ = m.g_add_(&(&grad * (1.0 - c.beta1)));
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.g_add_(&(&grad * &grad * (1.0 - c.beta2)));
                let denom = (&*v / bias2).sqrt() + c.eps;
                let _ = p.g_sub_(&(&*m / &denom * (lr / bias1)));
                let _ = p.grad().zero_();
            }
        });
    }

    #[test]
    fn flat_buffer_adamw_equals_the_per_tensor_one_over_ten_steps() {
        tch::manual_seed(11);
        let shapes: [&[i64]; 6] = [&[16, 64], &[96, 16], &[16, 64], &[32, 16], &[8, 200], &[200, 8]];
        let make = || shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)) * 0.1).collect::<Vec<_>>();
        let initial = make();
        let flat_params: Vec<Tensor> = initial.iter().map(|t| t.copy().set_requires_grad(true)).collect();
        let reference: Vec<Tensor> = initial.iter().map(|t| t.copy().set_requires_grad(true)).collect();
        let flat = crate::train::flat::FlatAdapters::adopt(&flat_params).expect("adopt");
        // Clipping active, weight decay on, warm-up then cosine: every branch of the step.
        let config = OptimConfig { lr: 1e-2, weight_decay: 0.1, max_grad_norm: 0.5, warmup_steps: 3, decay_steps: 5, ..OptimConfig::default() };
        let mut optimizer = AdamW::new(config.clone(), flat.values());
        let mut m: Vec<Tensor> = reference.iter().map(|p| p.detach().zeros_like()).collect();
        let mut v: Vec<Tensor> = reference.iter().map(|p| p.detach().zeros_like()).collect();
        for step in 0..10 {
            // A loss whose gradient differs per tensor and per step, and depends on the weights.
            let targets: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect();
            let loss = |params: &[Tensor]| params.iter().zip(&targets).map(|(p, t)| (p * t + p.square()).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
            loss(&flat_params).backward();
            loss(&reference).backward();
            clip_grad_norm(flat.grads(), config.max_grad_norm);
            optimizer.apply(flat.values(), flat.grads());
            flat.zero_grad();
            per_tensor_step(&reference, &mut m, &mut v, &config, step);
        }
        flat.check().expect("still aliased");
        for (ours, theirs) in flat_params.iter().zip(&reference) {
            let diff = f64::try_from((ours - theirs).abs().max()).unwrap_or(1.0);
            assert!(diff < 1e-6, "flat and per-tensor AdamW differ by {diff}");
        }
        let initial_flat = Tensor::cat(&initial.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
        assert!(f64::try_from((flat.values() - initial_flat).abs().max()).unwrap_or(0.0) > 1e-3, "the weights must have moved");
    }
}
