//! Every adapter value in one flat f32 buffer, and every gradient in another.
//!
//! A model of 24 layers has 336 LoRA tensors. Updating them one by one costs hundreds of small
//! ops per step (each a kernel launch on a GPU) and, for clipping, a host sync per tensor. With
//! the values and the gradients each in one buffer, AdamW is a handful of whole-buffer ops and
//! the gradient norm is one reduction.
//!
//! The adapter tensors stay what they were: leaves that the model reads when it serves and that
//! autograd differentiates when it trains. [`FlatAdapters::adopt`] only moves their storage into
//! the value buffer (`set_` with an offset), and points each tensor's `.grad` at its span of the
//! gradient buffer. Autograd then accumulates into that span in place.
//!
//! Invariant: nothing may replace an adapter's `.grad` with a new tensor (only zero it in
//! place), or its gradients leave the buffer. [`FlatAdapters::check`] verifies the aliasing.

use tch::{Kind, Tensor};

use super::TrainError;

/// Where one adapter tensor lives inside the flat buffers.
#[derive(Clone, Debug)]
struct Span {
    offset: i64,
    shape: Vec<i64>,
}

impl Span {
    fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Strides of a contiguous tensor of this shape.
    fn strides(&self) -> Vec<i64> {
        let mut strides = vec![1i64; self.shape.len()];
        for i in (0..self.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.shape[i + 1];
        }
        strides
    }
}

/// The flat value and gradient buffers of a set of adapter tensors.
#[derive(Debug)]
pub struct FlatAdapters {
    values: Tensor,
    grads: Tensor,
    spans: Vec<Span>,
    /// The adapter tensors themselves, to check the aliasing.
    params: Vec<Tensor>,
}

impl FlatAdapters {
    /// Moves the storage of `params` (f32 leaves on one device) into one buffer, and their
    /// gradients into another. Values are kept.
    pub fn adopt(params: &[Tensor]) -> Result<Self, TrainError> {
        let invalid = |reason: String| TrainError::Model(crate::model::ModelError::InvalidConfig(reason));
        let Some(first) = params.first() else {
            return Err(invalid("no adapter tensors to train".into()));
        };
        let device = first.device();
        if let Some(p) = params.iter().find(|p| p.kind() != Kind::Float || p.device() != device || !p.requires_grad()) {
            return Err(invalid(format!("adapter tensors must be trainable f32 on {device:?}; found {:?} on {:?}", p.kind(), p.device())));
        }
        let mut spans = Vec::with_capacity(params.len());
        let mut offset = 0i64;
        for p in params {
            let span = Span { offset, shape: p.size() };
            offset += span.numel();
            spans.push(span);
        }
        let values = Tensor::zeros([offset], (Kind::Float, device));
        let grads = Tensor::zeros([offset], (Kind::Float, device));
        tch::no_grad(|| {
            for (p, span) in params.iter().zip(&spans) {
                values.narrow(0, span.offset, span.numel()).copy_(&p.detach().reshape([-1]));
                let _ = p.shallow_clone().set_source_tensor_storage_offset_(&values, span.offset, span.shape.as_slice(), span.strides().as_slice());
            }
        });
        // A `.grad` can only be created by a backward pass (tch has no setter): a zero-valued
        // one through every tensor gives each a gradient, which is then re-pointed at its span.
        let touch = params.iter().map(|p| p.sum(Kind::Float) * 0.0).fold(Tensor::zeros([], (Kind::Float, device)), |acc, x| acc + x);
        touch.backward();
        tch::no_grad(|| {
            for (p, span) in params.iter().zip(&spans) {
                let _ = p.grad().set_source_tensor_storage_offset_(&grads, span.offset, span.shape.as_slice(), span.strides().as_slice());
            }
            let _ = grads.shallow_clone().zero_();
        });
        let flat = Self { values, grads, spans, params: params.iter().map(Tensor::shallow_clone).collect() };
        flat.check()?;
        Ok(flat)
    }

    /// Every adapter value, in adoption order.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// Every gradient, aligned with [`Self::values`].
    pub fn grads(&self) -> &Tensor {
        &self.grads
    }

    /// Views of a buffer laid out like [`Self::values`] (an optimizer moment), shaped like the
    /// adapter tensors.
    pub fn split(&self, flat: &Tensor) -> Vec<Tensor> {
        self.spans.iter().map(|s| flat.narrow(0, s.offset, s.numel()).view(s.shape.as_slice())).collect()
    }

    /// Clears every gradient in place.
    pub fn zero_grad(&self) {
        let _ = self.grads.shallow_clone().zero_();
    }

    /// Fails if an adapter tensor's value or gradient no longer lives in the buffers.
    pub fn check(&self) -> Result<(), TrainError> {
        let element = self.values.kind().elt_size_in_bytes() as i64;
        for (p, span) in self.params.iter().zip(&self.spans) {
            let grad = p.grad();
            let value_ok = p.data_ptr() as i64 == self.values.data_ptr() as i64 + span.offset * element;
            let grad_ok = grad.defined() && grad.data_ptr() as i64 == self.grads.data_ptr() as i64 + span.offset * element;
            if !(value_ok && grad_ok) {
                return Err(TrainError::Model(crate::model::ModelError::InvalidConfig(format!(
                    "adapter tensor at offset {} left the flat buffers (value aliased: {value_ok}, gradient aliased: {grad_ok})",
                    span.offset
                ))));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn adopted_tensors_keep_their_values_and_accumulate_gradients_into_the_buffer() {
        tch::manual_seed(3);
        let a = Tensor::randn([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::randn([4, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let before: Vec<f32> = Vec::try_from(Tensor::cat(&[a.detach().reshape([-1]), b.detach().reshape([-1])], 0)).unwrap_or_default();
        let flat = FlatAdapters::adopt(&[a.shallow_clone(), b.shallow_clone()]).expect("adopt");
        assert_eq!(Vec::<f32>::try_from(flat.values()).unwrap_or_default(), before);

        // Two backward passes accumulate; the gradient buffer holds d/dx of (sum a + 2 sum b) twice.
        for _ in 0..2 {
            (a.sum(Kind::Float) + b.sum(Kind::Float) * 2.0).backward();
        }
        let grads: Vec<f32> = Vec::try_from(flat.grads()).unwrap_or_default();
        assert_eq!(grads, [vec![2.0; 6], vec![4.0; 8]].concat());
        flat.check().expect("still aliased after backward");

        // An in-place update of the buffer is what the model reads.
        tch::no_grad(|| {
            let _ = flat.values().shallow_clone().g_add_scalar_(1.0);
        });
        let a_now: Vec<f32> = Vec::try_from(a.detach().reshape([-1])).unwrap_or_default();
        assert_eq!(a_now, before[..6].iter().map(|v| v + 1.0).collect::<Vec<_>>());
        flat.zero_grad();
        assert_eq!(f64::try_from(a.grad().abs().sum(Kind::Double)).unwrap_or(1.0), 0.0);
    }

    #[test]
    fn refuses_tensors_it_cannot_train() {
        let half = Tensor::zeros([2], (Kind::Half, Device::Cpu)).set_requires_grad(true);
        assert!(FlatAdapters::adopt(&[half]).is_err());
        assert!(FlatAdapters::adopt(&[]).is_err());
    }
}
