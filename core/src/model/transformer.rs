//! The decoder shared by Llama, Qwen2 and Qwen3.
//!
//! Pre-norm transformer: RMSNorm -> grouped-query attention with RoPE -> residual -> RMSNorm ->
//! SwiGLU MLP -> residual; final RMSNorm and `lm_head` (tied to the embeddings or not). The
//! families differ only in flags of [`ModelConfig`]: q/k/v biases (Qwen2), per-head q/k RMSNorm
//! (Qwen3), explicit `head_dim` (Qwen3). Reference: transformers' `modeling_llama.py`,
//! `modeling_qwen2.py`, `modeling_qwen3.py`.
//!
//! Shapes in comments: `b` batch rows, `t` new tokens per row, `w` attended key window.
//! Forward passes never fail: every weight shape is checked at construction and callers
//! (the engine) check token ids and positions against the vocabulary and the cache first.

use tch::{Device, Kind, Tensor};

use super::config::ModelConfig;
use super::{cpu_attention, cpu_pool};
use super::linear::Linear;
use super::rope::{self, RotaryTables};
use super::weights::Weights;
use super::ModelError;
use crate::engine::kv_cache::CacheView;

/// One decoder layer's attention block.
#[derive(Debug)]
struct Attention {
    /// Fused `q_proj | k_proj | v_proj`.
    qkv: Linear,
    o_proj: Linear,
    /// Qwen3's `q_norm` and `k_norm` weights stacked per head: `(h + kvh, d)`.
    qk_norm: Option<Tensor>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    eps: f64,
}

impl Attention {
    fn new(cfg: &ModelConfig, w: &mut Weights, prefix: &str) -> Result<Self, ModelError> {
        let (h, kvh, d, hidden) =
            (cfg.num_heads as i64, cfg.num_kv_heads as i64, cfg.head_dim as i64, cfg.hidden_size as i64);
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for (name, rows) in [("q_proj", h * d), ("k_proj", kvh * d), ("v_proj", kvh * d)] {
            weights.push(w.take(&format!("{prefix}.{name}.weight"), &[rows, hidden])?);
            if cfg.attention_bias {
                biases.push(w.take(&format!("{prefix}.{name}.bias"), &[rows])?);
            }
        }
        let qkv_bias = (!biases.is_empty()).then(|| Tensor::cat(&biases, 0));
        let qkv = Linear::new(Tensor::cat(&weights, 0), qkv_bias);
        let o_bias = w.take_optional(&format!("{prefix}.o_proj.bias"), &[hidden])?;
        let o_proj = Linear::new(w.take(&format!("{prefix}.o_proj.weight"), &[hidden, h * d])?, o_bias);
        let qk_norm = if cfg.qk_norm {
            let q_norm = w.take(&format!("{prefix}.q_norm.weight"), &[d])?;
            let k_norm = w.take(&format!("{prefix}.k_norm.weight"), &[d])?;
            Some(Tensor::cat(&[q_norm.unsqueeze(0).expand([h, d], false), k_norm.unsqueeze(0).expand([kvh, d], false)], 0))
        } else {
            None
        };
        Ok(Self { qkv, o_proj, qk_norm, num_heads: h, num_kv_heads: kvh, head_dim: d, eps: cfg.rms_norm_eps })
    }

    /// `x`: `(b, t, hidden)` -> `(b, t, hidden)`.
    fn forward(&self, x: &Tensor, ctx: &StepContext, cache: Option<(&mut CacheView<'_>, usize)>, use_lora: bool, training: bool) -> Tensor {
        let (b_sz, seq_len, _) = x.size3().unwrap_or((1, 1, 1));
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut cache = cache;
        let qkv = self.qkv.forward(x, use_lora, training);
        if let (Some((view, layer)), Some(rows), None) = (cache.as_mut(), ctx.cpu_decode_rows(), &self.qk_norm) {
            // A CPU decode step: RoPE, the cache write and attention in one pass.
            let new = cpu_attention::NewTokens::Projected { qkv: &qkv, cos: &ctx.cos, sin: &ctx.sin };
            if let Some(attended) = self.cpu_decode(new, view, *layer, rows) {
                return self.o_proj.forward(&attended, use_lora, training);
            }
        }
        // q and k go through norm and RoPE together as h + kvh heads: fewer kernels per layer.
        let qk = qkv.narrow(-1, 0, (h + kvh) * d).view([b_sz, seq_len, h + kvh, d]);
        let qk = match &self.qk_norm {
            Some(weight) => qk.rms_norm([d], None::<Tensor>, self.eps) * weight,
            None => qk,
        };
        let qk = rope::apply(&qk.transpose(1, 2), &ctx.cos, &ctx.sin);
        // (b, heads, t, d)
        let q = qk.narrow(1, 0, h);
        let k = qk.narrow(1, h, kvh);
        let v = qkv.narrow(-1, (h + kvh) * d, kvh * d).view([b_sz, seq_len, kvh, d]).transpose(1, 2);

        let attended = match (cache, &ctx.mask) {
            (Some((view, layer)), mask) => {
                view.write(layer, &k, &v, &ctx.positions);
                if let Some(attended) = self.cpu_cached_attention(&q, view, layer, ctx) {
                    return self.o_proj.forward(&attended, use_lora, training);
                }
                match mask {
                    Some(mask) => {
                        let (keys, values) = view.read(layer);
                        long_attention(seq_len, || Tensor::scaled_dot_product_attention(&q, &keys, &values, Some(mask), 0.0, false, None, true))
                    }
                    // A fresh prefill: the new keys are all there is to attend to.
                    None => long_attention(seq_len, || Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, true)),
                }
            }
            (None, _) => Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, true),
        };
        let attended = attended.transpose(1, 2).reshape([b_sz, seq_len, h * d]);
        self.o_proj.forward(&attended, use_lora, training)
    }
}

/// New tokens per row from which a CPU prefill's attention in libtorch (where the pool's
/// kernel does not apply: bf16, no AVX-512) gets every core back.
///
/// A CPU pass whose products run on [`super::cpu_gemv`] lowers libtorch to one thread (its
/// OpenMP workers would spin against the kernel's). Attention grows with the square of the
/// prompt: from about a thousand tokens it outweighs the spinning
/// (default model, 2 cores: a 4096-token prefill went from 393 to 565 tok/s; a 128-token one
/// fell from 1000 to 520, so short prompts keep one thread).
const LONG_ATTENTION_TOKENS: i64 = 1024;

fn long_attention(seq_len: i64, attention: impl FnOnce() -> Tensor) -> Tensor {
    if seq_len >= LONG_ATTENTION_TOKENS {
        cpu_pool::with_libtorch_threads(attention)
    } else {
        attention()
    }
}

impl Attention {
    /// [`cpu_attention::decode`] of a CPU decode step's new tokens over `layer` of the cache,
    /// `(b, 1, heads * head_dim)`; `None` where it does not apply (the generic path runs).
    fn cpu_decode(&self, new: cpu_attention::NewTokens<'_>, view: &mut CacheView<'_>, layer: usize, rows: &CacheRows) -> Option<Tensor> {
        let activations = match &new {
            cpu_attention::NewTokens::Queries(q) => *q,
            cpu_attention::NewTokens::Projected { qkv, .. } => *qkv,
        };
        let (keys, values) = view.layer_storage(layer);
        if !cpu_attention::applies(activations, keys) {
            return None;
        }
        cpu_attention::decode(new, self.num_heads, &cpu_attention::CacheLayer { keys, values }, &rows.slots, &rows.positions)
    }

    /// Attention of queries `(b, heads, t, head_dim)`, whose keys and values are already in
    /// the cache, by the CPU kernels that read it in place: a decode step's or a prompt's.
    /// Returns `(b, t, heads * head_dim)`, or `None` where they do not apply.
    fn cpu_cached_attention(&self, q: &Tensor, view: &mut CacheView<'_>, layer: usize, ctx: &StepContext) -> Option<Tensor> {
        let rows = ctx.cpu_rows.as_ref()?;
        if rows.decode {
            return self.cpu_decode(cpu_attention::NewTokens::Queries(q), view, layer, rows);
        }
        let (keys, values) = view.layer_storage(layer);
        cpu_prefill(q, &cpu_attention::CacheLayer { keys, values }, rows)
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_prefill(q: &Tensor, cache: &cpu_attention::CacheLayer<'_>, rows: &CacheRows) -> Option<Tensor> {
    // `attend` checks that it applies (f32, no autograd, AVX-512) and the shapes.
    super::cpu_prefill_attention::attend(q, cache, &rows.slots, &rows.positions)
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_prefill(_q: &Tensor, _cache: &cpu_attention::CacheLayer<'_>, _rows: &CacheRows) -> Option<Tensor> {
    None
}

/// Per-pass tensors every layer shares, built once per forward.
#[derive(Debug)]
struct StepContext {
    /// RoPE rows for the pass's positions, `(b, 1, t, head_dim)`.
    cos: Tensor,
    sin: Tensor,
    /// `(b, t)` absolute positions.
    positions: Tensor,
    /// `(b, 1, t, w)`: query at position p sees cached keys at positions <= p. `None` when
    /// attention is causal over the new tokens alone.
    mask: Option<Tensor>,
    /// A CPU pass over the cache: each row's slot and positions, for the kernels that read
    /// the cache in place.
    cpu_rows: Option<CacheRows>,
}

impl StepContext {
    /// The rows of a CPU decode step (one new token per row over the cache).
    fn cpu_decode_rows(&self) -> Option<&CacheRows> {
        self.cpu_rows.as_ref().filter(|rows| rows.decode)
    }
}

/// Host copies of a CPU pass's cache slots and positions.
#[derive(Debug)]
struct CacheRows {
    /// The slot of each row.
    slots: Vec<i64>,
    /// `(b * t)` absolute positions, row after row.
    positions: Vec<i64>,
    /// One new token per row over earlier keys: a decode step.
    decode: bool,
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
struct Mlp {
    /// Fused `gate_proj | up_proj`.
    gate_up: Linear,
    down_proj: Linear,
    intermediate: i64,
}

impl Mlp {
    fn new(cfg: &ModelConfig, w: &mut Weights, prefix: &str) -> Result<Self, ModelError> {
        let (hidden, inter) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let gate = w.take(&format!("{prefix}.gate_proj.weight"), &[inter, hidden])?;
        let up = w.take(&format!("{prefix}.up_proj.weight"), &[inter, hidden])?;
        let (gate_up_bias, down_bias) = if cfg.mlp_bias {
            let gb = w.take(&format!("{prefix}.gate_proj.bias"), &[inter])?;
            let ub = w.take(&format!("{prefix}.up_proj.bias"), &[inter])?;
            (Some(Tensor::cat(&[gb, ub], 0)), Some(w.take(&format!("{prefix}.down_proj.bias"), &[hidden])?))
        } else {
            (None, None)
        };
        let down = w.take(&format!("{prefix}.down_proj.weight"), &[hidden, inter])?;
        Ok(Self {
            gate_up: Linear::new(Tensor::cat(&[gate, up], 0), gate_up_bias),
            down_proj: Linear::new(down, down_bias),
            intermediate: inter,
        })
    }

    fn forward(&self, x: &Tensor, use_lora: bool, training: bool) -> Tensor {
        let gate_up = self.gate_up.forward(x, use_lora, training);
        let gate = gate_up.narrow(-1, 0, self.intermediate);
        let up = gate_up.narrow(-1, self.intermediate, self.intermediate);
        self.down_proj.forward(&(gate.silu() * up), use_lora, training)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    hidden: i64,
    eps: f64,
}

impl DecoderLayer {
    /// `x`: `(b, t, hidden)` -> `(b, t, hidden)`.
    fn forward(&self, x: &Tensor, ctx: &StepContext, cache: Option<(&mut CacheView<'_>, usize)>, use_lora: bool, training: bool) -> Tensor {
        let normed = x.rms_norm([self.hidden], Some(&self.input_layernorm), self.eps);
        let x = x + self.self_attn.forward(&normed, ctx, cache, use_lora, training);
        let normed = x.rms_norm([self.hidden], Some(&self.post_attention_layernorm), self.eps);
        &x + self.mlp.forward(&normed, use_lora, training)
    }
}

/// A training pass with activation checkpointing, between its forward and its backward: only
/// each layer's input is kept (`tokens x hidden` per layer), and each layer's activations are
/// recomputed during the backward pass, one layer at a time. Memory no longer grows with
/// layers x activations, for one more forward pass of compute.
#[derive(Debug)]
pub struct CheckpointedPass {
    /// Each layer's input, computed without gradients.
    layer_inputs: Vec<Tensor>,
    /// The last layer's output, a leaf whose gradient the loss fills.
    top: Tensor,
    /// Final-normed hidden states `(b, t, hidden)`, differentiable back to `top`.
    hidden: Tensor,
    ctx: StepContext,
    use_lora: bool,
    training: bool,
}

impl CheckpointedPass {
    /// Final-normed hidden states `(b, t, hidden)`; backpropagate the loss into them, then call
    /// [`Transformer::backward_checkpointed`].
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }
}

/// What one forward pass reads.
#[derive(Debug)]
pub struct ForwardInput<'a> {
    /// `(b, t)` int64 token ids, all `< vocab_size`.
    pub tokens: &'a Tensor,
    /// `(b, t)` int64 absolute positions, all `< max_positions`.
    pub positions: &'a Tensor,
    /// Adapters on (`true`) or the base model (`false`, the free reference policy).
    pub use_lora: bool,
    /// A training pass: adapter dropout applies.
    pub training: bool,
}

/// A causal language model of the Llama / Qwen2 / Qwen3 family.
#[derive(Debug)]
pub struct Transformer {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    rotary: RotaryTables,
    kind: Kind,
    device: Device,
}

impl Transformer {
    /// Builds the model from checkpoint tensors named like Hugging Face's, all already in
    /// `kind` on `device`. `max_positions` bounds the RoPE tables (the context limit).
    pub fn new(config: ModelConfig, mut w: Weights, kind: Kind, device: Device, max_positions: usize) -> Result<Self, ModelError> {
        config.validate()?;
        let (vocab, hidden) = (config.vocab_size as i64, config.hidden_size as i64);
        let embed_tokens = w.take("model.embed_tokens.weight", &[vocab, hidden])?;
        let layers = (0..config.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(DecoderLayer {
                    input_layernorm: w.take(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                    self_attn: Attention::new(&config, &mut w, &format!("{p}.self_attn"))?,
                    post_attention_layernorm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                    mlp: Mlp::new(&config, &mut w, &format!("{p}.mlp"))?,
                    hidden,
                    eps: config.rms_norm_eps,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let norm = w.take("model.norm.weight", &[hidden])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(w.take("lm_head.weight", &[vocab, hidden])?)
        };
        let leftovers = w.remaining();
        if !leftovers.is_empty() {
            tracing::debug!(count = leftovers.len(), first = %leftovers[0], "checkpoint tensors not used by the model");
        }
        let rotary = RotaryTables::new(&config, max_positions, kind, device);
        Ok(Self { config, embed_tokens, layers, norm, lm_head, rotary, kind, device })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of weights and activations.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Longest sequence (prompt + completion) the position tables cover.
    pub fn max_positions(&self) -> usize {
        self.rotary.max_positions()
    }

    /// Runs the decoder and returns final-normed hidden states `(b, t, hidden)`.
    ///
    /// With `cache`, new keys/values are written at `positions` and attention reads the cache
    /// window, so `t` new tokens may continue earlier ones (prefill and decode are the same
    /// call). Without it the pass is causal over `tokens` alone (scoring and training).
    pub fn forward_hidden(&self, input: &ForwardInput<'_>, mut cache: Option<&mut CacheView<'_>>) -> Tensor {
        let ctx = self.step_context(input, cache.as_deref());
        let mut x = Tensor::embedding(&self.embed_tokens, input.tokens, -1, false, false);
        for (index, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|view| (view, index));
            x = layer.forward(&x, &ctx, layer_cache, input.use_lora, input.training);
        }
        self.final_norm(&x)
    }

    fn final_norm(&self, x: &Tensor) -> Tensor {
        x.rms_norm([self.config.hidden_size as i64], Some(&self.norm), self.config.rms_norm_eps)
    }

    /// The forward half of a training pass with activation checkpointing (causal over
    /// `tokens`, no cache): runs the layers without gradients, keeping only their inputs.
    pub fn forward_checkpointed(&self, input: &ForwardInput<'_>) -> CheckpointedPass {
        let ctx = self.step_context(input, None);
        let mut layer_inputs = Vec::with_capacity(self.layers.len());
        let top = tch::no_grad(|| {
            let mut x = Tensor::embedding(&self.embed_tokens, input.tokens, -1, false, false);
            for layer in &self.layers {
                layer_inputs.push(x.shallow_clone());
                x = layer.forward(&x, &ctx, None, input.use_lora, input.training);
            }
            x
        })
        .set_requires_grad(true);
        let hidden = self.final_norm(&top);
        CheckpointedPass { layer_inputs, top, hidden, ctx, use_lora: input.use_lora, training: input.training }
    }

    /// The backward half: once the loss has been backpropagated into `pass.hidden()`, runs each
    /// layer again with gradients, last to first, and backpropagates through it. The adapters'
    /// gradients then equal those of an ordinary pass. Adapter dropout would draw new masks
    /// when recomputing, so the trainer refuses it together with checkpointing.
    pub fn backward_checkpointed(&self, pass: CheckpointedPass) {
        let mut grad = pass.top.grad();
        for (layer, input) in self.layers.iter().zip(pass.layer_inputs).rev() {
            if !grad.defined() {
                return;
            }
            let input = input.set_requires_grad(true);
            let output = layer.forward(&input, &pass.ctx, None, pass.use_lora, pass.training);
            // d(sum(output * g))/d(output) = g: the gradient arriving from above enters the layer.
            (output * grad.detach()).sum(Kind::Float).backward();
            grad = input.grad();
        }
    }

    fn step_context(&self, input: &ForwardInput<'_>, cache: Option<&CacheView<'_>>) -> StepContext {
        let (cos, sin) = self.rotary.select(input.positions);
        let mask = cache.filter(|view| !view.is_fresh()).map(|view| {
            let (b_sz, seq_len) = input.positions.size2().unwrap_or((1, 1));
            let window = view.window();
            let key_pos = Tensor::arange(window, (Kind::Int64, self.device)).view([1, 1, 1, window]);
            key_pos.le_tensor(&input.positions.view([b_sz, 1, seq_len, 1]))
        });
        let one_token_per_row = input.positions.size().get(1) == Some(&1);
        let cpu_rows = cache.filter(|_| self.device == Device::Cpu).map(|view| CacheRows {
            slots: view.slot_ids(),
            positions: Vec::<i64>::try_from(input.positions.reshape([-1])).unwrap_or_default(),
            decode: !view.is_fresh() && one_token_per_row,
        });
        StepContext { cos, sin, positions: input.positions.shallow_clone(), mask, cpu_rows }
    }

    /// Every fused linear layer with the projections it holds, for LoRA.
    pub(crate) fn lora_slots(&mut self) -> Vec<super::lora::Slot<'_>> {
        let (h, kvh, d) = (self.config.num_heads as i64, self.config.num_kv_heads as i64, self.config.head_dim as i64);
        let (hidden, inter) = (self.config.hidden_size as i64, self.config.intermediate_size as i64);
        let mut slots = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let attn = format!("model.layers.{i}.self_attn");
            let mlp = format!("model.layers.{i}.mlp");
            slots.push(super::lora::Slot { prefix: attn.clone(), linear: &mut layer.self_attn.qkv, parts: vec![("q_proj", 0, h * d), ("k_proj", h * d, kvh * d), ("v_proj", (h + kvh) * d, kvh * d)] });
            slots.push(super::lora::Slot { prefix: attn, linear: &mut layer.self_attn.o_proj, parts: vec![("o_proj", 0, hidden)] });
            slots.push(super::lora::Slot { prefix: mlp.clone(), linear: &mut layer.mlp.gate_up, parts: vec![("gate_proj", 0, inter), ("up_proj", inter, inter)] });
            slots.push(super::lora::Slot { prefix: mlp, linear: &mut layer.mlp.down_proj, parts: vec![("down_proj", 0, hidden)] });
        }
        slots
    }

    /// Sets the adapter dropout of every layer.
    pub(crate) fn set_lora_dropout(&mut self, p: f64) {
        for slot in self.lora_slots() {
            slot.linear.dropout = p;
        }
    }

    /// Bytes of weights one decode step reads: every projection and the output head once
    /// (embedding rows and norm vectors are negligible). Divided by the memory's read
    /// bandwidth, it is the floor under a bandwidth-bound decode step.
    pub fn decode_weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let layers: usize = self.layers.iter().map(|l| bytes(&l.self_attn.qkv.weight) + bytes(&l.self_attn.o_proj.weight) + bytes(&l.mlp.gate_up.weight) + bytes(&l.mlp.down_proj.weight)).sum();
        layers + bytes(self.lm_head.as_ref().unwrap_or(&self.embed_tokens))
    }

    /// Projects hidden states `(..., hidden)` to float32 logits `(..., vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        if super::cpu_gemv::applies(hidden, head) {
            return super::cpu_gemv::linear(hidden, head, None).to_kind(Kind::Float);
        }
        hidden.linear::<Tensor>(head, None).to_kind(Kind::Float)
    }
}
