//! Training: in-place LoRA policy-gradient steps with HICRA credit assignment.
//!
//! - [`reward`]: verifiable rewards (math answers, exact match).
//! - [`planning`]: Strategic-Gram detection -> planning-token masks.
//! - [`credit`]: GRPO, Dr.GRPO, HICRA and the entropy-gated variant -> per-token advantages.
//! - [`loss`]: clipped surrogate (clip-higher) against the sampling logprobs, KL, entropy.
//! - [`flat`]: the adapters' values and gradients, each in one buffer.
//! - [`optimizer`]: AdamW over those buffers, gradient clipping, warm-up + cosine.
//! - [`trainer`]: one step from rewarded groups, updating the served adapters in place.
//!
//! Invariant: a failing step (bad sample, non-finite loss) leaves the weights untouched.

pub mod checkpoint;
pub mod credit;
pub mod data;
pub mod environment;
pub mod episodes;
pub mod flat;
pub mod loss;
pub mod optimizer;
pub mod planning;
pub mod reward;
pub mod run;
pub mod trainer;

/// Why a training step did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A sample is malformed.
    #[error("training sample {index}: {reason}")]
    InvalidSample {
        /// Position in the batch.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Credit assignment rejected a group.
    #[error(transparent)]
    Credit(#[from] credit::CreditError),
    /// The loss or gradients are not finite; the step was discarded.
    #[error("non-finite {0}; step discarded, weights unchanged")]
    NonFinite(String),
    /// Adapters could not be attached.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The replicas could not take the step together (a peer lost); weights unchanged.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
}
