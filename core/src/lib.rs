//! hicra-core: the engine behind the `hicra` binary.
//!
//! One process holds one copy of the weights. This crate loads real models (Hugging Face
//! folders and GGUF files of the Llama / Qwen2 / Qwen3 families) into libtorch through `tch`,
//! tokenizes and renders chat templates, and generates with a preallocated KV cache.
//!
//! Modules, each owning one concept:
//! - [`device`]: CUDA discovery (dlopen of `libtorch_cuda.so`) and `--device` parsing.
//! - [`model`]: configs, weight loading (safetensors, GGUF), the decoder, LoRA-ready linears.
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or GGUF metadata, chat templates.
//! - [`engine`]: KV cache, on-device sampler, batched generation, teacher-forced scoring.
//! - [`server`]: the OpenAI-compatible HTTP API in front of the engine thread.
//! - [`train`]: in-place LoRA training with GRPO/HICRA; [`plot`]: PNG curves of its metrics.
//! - [`plugins`]: loading reward, detector and credit plugins built against `hicra-sdk`, with guards.
//! - [`sg`]: Strategic-Gram mining; [`analysis`]: the paper's per-step analyses of rollouts.
//! - [`collective`]: c10d (TCPStore, Gloo) across data-parallel replicas.
//! - [`compare`]: statistics for comparing training arms over seeds.
//! - [`files`]: writing files atomically (temp file, then rename).
//! - [`memory`]: resident memory, and returning freed memory to the OS after a step.
//! - [`random`]: SplitMix64, for draws that must repeat exactly from a seed.
//! - [`cli`]: the `hicra` subcommands; the only place that uses `anyhow`.

// tch implements `x += y` in place: on tensors that alias others (shallow clones) or that
// autograd still needs, that would be a bug. `x = x + y` allocates on purpose.
#![allow(clippy::assign_op_pattern)]

pub mod analysis;
pub mod cli;
pub mod collective;
pub mod compare;
pub mod device;
pub mod engine;
pub mod files;
pub mod memory;
pub mod model;
pub mod plot;
pub mod plugins;
pub mod random;
pub mod server;
pub mod sg;
pub mod tokenizer;
pub mod train;
