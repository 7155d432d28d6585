//! Batched generation over fixed KV-cache slots.
//!
//! [`Engine::admit`] places new requests in free slots and prefills them together (prompts
//! right-padded into one forward pass); [`Engine::step`] runs one decode step over every active
//! slot, whatever its length, and reports the new token of each. A finished sequence frees its
//! slot at once, so a scheduler can admit newcomers between steps (continuous batching).
//! [`Engine::generate`] is the simple loop on top: admit everything, step until done.
//!
//! Per step the host sends the last tokens and positions (a few bytes) and reads back the
//! sampled ids and logprobs; the forward pass and the sampling themselves never wait on
//! the host.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::constraint::Constraints;
use super::kv_cache::{KvCache, SlotSelection};
use super::logits::{EditsBuilder, LogitState};
use super::sampler::{BatchSampling, Sampled, SamplingParams};
use super::EngineError;
use crate::model::{ForwardInput, Transformer};
use crate::tokenizer::Tokenizer;

/// One completion to produce.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// Prompt token ids (already templated and tokenized).
    pub prompt_ids: Vec<u32>,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Token ids that end the sequence (they are kept in `tokens`, not in `text`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the sequence; `text` is cut before the first match.
    pub stop_strings: Vec<String>,
    /// How many alternatives to report per token (0 = none).
    pub top_logprobs: usize,
}

impl GenerationRequest {
    /// A request with the tokenizer's end-of-sequence ids as stop tokens.
    pub fn new(prompt_ids: Vec<u32>, sampling: SamplingParams, max_new_tokens: usize, tokenizer: &Tokenizer) -> Self {
        Self {
            prompt_ids,
            sampling,
            max_new_tokens,
            stop_token_ids: tokenizer.eos_ids().to_vec(),
            stop_strings: Vec::new(),
            top_logprobs: 0,
        }
    }
}

/// One generated token.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GeneratedToken {
    /// Token id.
    pub id: u32,
    /// The text this token added to the output (empty while a UTF-8 character is incomplete,
    /// and for special tokens).
    pub text: String,
    /// Natural-log probability under the tempered distribution before top-k / top-p
    /// truncation (`log_softmax(logits / T)`, T = 1 for greedy): what the API reports and
    /// teacher-forced scoring computes.
    pub logprob: f32,
    /// Natural-log probability under the distribution the token was actually drawn from
    /// (temperature, top-k and top-p applied, renormalised; 0 for greedy): the behaviour policy
    /// the trainer's importance ratio uses.
    pub sampling_logprob: f32,
    /// Entropy (nats) of the distribution this token was drawn from (same distribution as
    /// `logprob`).
    pub entropy: f32,
    /// The most likely alternatives `(id, logprob)`, best first, if asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens` or the context limit.
    Length,
}

/// A finished completion.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Every sampled token, including a final stop token.
    pub tokens: Vec<GeneratedToken>,
    /// Decoded output, special tokens skipped, cut before a stop string.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// What one step produced for one sequence.
#[derive(Clone, Debug)]
pub struct TokenEvent {
    /// The caller's id for the sequence.
    pub sequence_id: u64,
    /// The new token.
    pub token: GeneratedToken,
    /// Set when this token ended the sequence; the slot is free again.
    pub finished: Option<FinishReason>,
    /// With `finished`: the whole decoded output, cut before a stop string.
    pub final_text: Option<String>,
}

/// A sequence occupying a slot.
#[derive(Debug)]
struct Sequence {
    id: u64,
    request: GenerationRequest,
    /// All token ids so far: prompt then generated.
    ids: Vec<u32>,
    generated: usize,
    /// Incremental detokenization state: text of ids[prefix..read] is already emitted.
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    /// The engine's weight generation when the sequence started (see [`Engine::invalidate_prefixes`]).
    weights: u64,
    /// Logit bias, penalties and constraint position, when its sampling uses any.
    logits: Option<LogitState>,
}

/// What a free slot's cache still holds from the sequence that used it last: keys and values
/// for `ids` (its prompt and all but its last token, which was never fed back), computed by
/// the current weights. A next prompt that extends `ids` (an agent's next turn) prefills only
/// its new tokens there.
#[derive(Debug)]
struct CachedPrefix {
    ids: Vec<u32>,
    /// Engine clock at its last use, for least-recently-used eviction.
    last_used: u64,
}

/// The model, its tokenizer and a KV cache with `slots` sequences of `capacity` positions.
pub struct Engine<'m> {
    model: &'m Transformer,
    /// Without one, tokens carry no text (parity tests on bare checkpoints).
    tokenizer: Option<&'m Tokenizer>,
    cache: KvCache,
    slots: Vec<Option<Sequence>>,
    /// Sampling tensors for the current set of active slots.
    sampling: Option<(Vec<usize>, BatchSampling)>,
    /// Per slot: the finished sequence whose keys and values it still holds.
    cached: Vec<Option<CachedPrefix>>,
    /// Reuse cached prefixes (on by default).
    prefix_reuse: bool,
    /// Bumped when the weights change: cached keys and values of older weights are stale.
    weights: u64,
    /// Ticks once per admission, for LRU.
    clock: u64,
    /// Prompt tokens whose prefill a cached prefix saved, since start.
    reused_tokens: u64,
    /// Compiles requests' constraints (structured outputs); without it they are refused.
    constraints: Option<Arc<Constraints>>,
}

impl<'m> Engine<'m> {
    /// An engine with `slots` batch slots of `capacity` positions each (prompt + completion;
    /// capped by the model's context). The KV cache is allocated here, once.
    pub fn new(model: &'m Transformer, tokenizer: &'m Tokenizer, slots: usize, capacity: usize) -> Self {
        Self::build(model, Some(tokenizer), slots, capacity)
    }

    /// An engine that produces token ids and logprobs but no text.
    pub fn without_tokenizer(model: &'m Transformer, slots: usize, capacity: usize) -> Self {
        Self::build(model, None, slots, capacity)
    }

    fn build(model: &'m Transformer, tokenizer: Option<&'m Tokenizer>, slots: usize, capacity: usize) -> Self {
        let cfg = model.config();
        let capacity = capacity.clamp(2, model.max_positions().max(2));
        let cache = KvCache::new(cfg.num_layers, slots.max(1), cfg.num_kv_heads, capacity, cfg.head_dim, model.kind(), model.device());
        let slots = slots.max(1);
        Self {
            model,
            tokenizer,
            cache,
            slots: (0..slots).map(|_| None).collect(),
            sampling: None,
            cached: (0..slots).map(|_| None).collect(),
            prefix_reuse: true,
            weights: 0,
            clock: 0,
            reused_tokens: 0,
            constraints: None,
        }
    }

    /// Lets requests carry constraints, compiled by `constraints` (built for this model's
    /// tokenizer and vocabulary).
    pub fn set_constraints(&mut self, constraints: Arc<Constraints>) {
        self.constraints = Some(constraints);
    }

    /// Turns reuse of cached prefixes on or off (off: every prompt is prefilled whole).
    pub fn set_prefix_reuse(&mut self, on: bool) {
        self.prefix_reuse = on;
        if !on {
            self.cached.iter_mut().for_each(|c| *c = None);
        }
    }

    /// The weights changed (a training step): every cached prefix, and the prefix of every
    /// sequence in flight, was computed by the old ones and must not be reused.
    pub fn invalidate_prefixes(&mut self) {
        self.weights += 1;
        self.cached.iter_mut().for_each(|c| *c = None);
    }

    /// Prompt tokens whose prefill was saved by cached prefixes, since start.
    pub fn reused_tokens(&self) -> u64 {
        self.reused_tokens
    }

    /// Bytes held by the KV cache.
    pub fn kv_cache_bytes(&self) -> usize {
        self.cache.size_bytes()
    }

    /// Slots not holding a sequence.
    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_none()).count()
    }

    /// Sequences in progress.
    pub fn active(&self) -> usize {
        self.slots.len() - self.free_slots()
    }

    /// Checks a request against the model before it takes a slot.
    pub fn validate(&self, request: &GenerationRequest) -> Result<(), EngineError> {
        validate_request(request, self.model.config().vocab_size, self.cache.capacity())
    }

    /// Puts requests into free slots and prefills them in one batch; returns each one's first
    /// token. Requests with identical prompts (e.g. the `n` samples of one chat request) share
    /// one prefill: its keys/values are copied to the other slots. Fails without side effects
    /// if any request is invalid or slots are short.
    pub fn admit(&mut self, requests: Vec<(u64, GenerationRequest)>) -> Result<Vec<TokenEvent>, EngineError> {
        for (_, request) in &requests {
            self.validate(request)?;
        }
        let free: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].is_none()).collect();
        if requests.len() > free.len() {
            return Err(EngineError::InvalidParameter(format!("{} requests but {} free slots", requests.len(), free.len())));
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut states = Vec::with_capacity(requests.len());
        for (_, request) in &requests {
            let state = LogitState::new(&request.sampling, &request.prompt_ids, self.constraints.as_deref()).map_err(|e| EngineError::InvalidParameter(e.to_string()))?;
            states.push(state);
        }
        self.clock += 1;
        let (reusing, fresh) = self.plan_slots(&requests, &free);
        let mut placed = Vec::with_capacity(requests.len());
        let mut hidden_rows = Vec::new();
        if !fresh.is_empty() {
            let fresh_requests: Vec<&GenerationRequest> = fresh.iter().map(|&(i, _)| &requests[i].1).collect();
            let fresh_slots: Vec<usize> = fresh.iter().map(|&(_, slot)| slot).collect();
            hidden_rows.push(self.prefill_fresh(&fresh_slots, &fresh_requests));
            placed.extend(fresh.iter().copied());
        }
        for &(i, slot, reused) in &reusing {
            hidden_rows.push(self.prefill_suffix(slot, &requests[i].1.prompt_ids, reused));
            self.reused_tokens += reused as u64;
            placed.push((i, slot));
        }
        let hidden = Tensor::cat(&hidden_rows, 0);
        let slots: Vec<usize> = placed.iter().map(|&(_, slot)| slot).collect();
        let mut requests: Vec<Option<(u64, GenerationRequest)>> = requests.into_iter().map(Some).collect();
        for &(i, slot) in &placed {
            let Some((id, request)) = requests[i].take() else { continue };
            let ids = request.prompt_ids.clone();
            let read_offset = ids.len();
            self.cached[slot] = None;
            let logits = states[i].take();
            self.slots[slot] = Some(Sequence { id, request, ids, generated: 0, prefix_offset: read_offset, read_offset, text: String::new(), weights: self.weights, logits });
        }
        self.sample_and_advance(&slots, &hidden)
    }

    /// Chooses slots: a request whose prompt extends a free slot's cached prefix (by at least
    /// one token, and not shared with another request of the batch) goes there and reuses it,
    /// as `(request, slot, reused tokens)`; the others get free slots without a cached prefix
    /// first, then the least recently used ones, as `(request, slot)`.
    #[allow(clippy::type_complexity)]
    fn plan_slots(&self, requests: &[(u64, GenerationRequest)], free: &[usize]) -> (Vec<(usize, usize, usize)>, Vec<(usize, usize)>) {
        let mut taken = vec![false; self.slots.len()];
        let mut reusing = Vec::new();
        let mut rest = Vec::new();
        for (i, (_, request)) in requests.iter().enumerate() {
            let prompt = &request.prompt_ids;
            let shared = requests.iter().filter(|(_, r)| &r.prompt_ids == prompt).count() > 1;
            let best = free
                .iter()
                .filter(|&&slot| !taken[slot])
                .filter_map(|&slot| {
                    let cached = self.cached[slot].as_ref()?;
                    let len = cached.ids.len();
                    (len > 0 && len < prompt.len() && prompt[..len] == cached.ids[..]).then_some((slot, len))
                })
                .max_by_key(|&(_, len)| len);
            match best {
                Some((slot, len)) if self.prefix_reuse && !shared => {
                    taken[slot] = true;
                    reusing.push((i, slot, len));
                }
                _ => rest.push(i),
            }
        }
        let mut spare: Vec<usize> = free.iter().copied().filter(|&slot| !taken[slot]).collect();
        // Empty slots first, then cached prefixes from the least recently used.
        spare.sort_by_key(|&slot| self.cached[slot].as_ref().map_or(0, |c| c.last_used + 1));
        let fresh = rest.into_iter().zip(spare).collect();
        (reusing, fresh)
    }

    /// Prefills whole prompts into `slots` (identical prompts once, copied to the others);
    /// returns the last position's hidden state per request, `(requests, hidden)`.
    fn prefill_fresh(&mut self, slots: &[usize], requests: &[&GenerationRequest]) -> Tensor {
        // unique[k] = index of the first request with the k-th distinct prompt.
        let mut unique: Vec<usize> = Vec::new();
        let mut prompt_of: Vec<usize> = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            match unique.iter().position(|&u| requests[u].prompt_ids == request.prompt_ids) {
                Some(k) => prompt_of.push(k),
                None => {
                    prompt_of.push(unique.len());
                    unique.push(i);
                }
            }
        }
        let leaders: Vec<usize> = unique.iter().map(|&i| slots[i]).collect();
        let prompts: Vec<&[u32]> = unique.iter().map(|&i| requests[i].prompt_ids.as_slice()).collect();
        let hidden_last = self.prefill(&leaders, &prompts);
        for (i, &slot) in slots.iter().enumerate() {
            let leader = leaders[prompt_of[i]];
            if leader != slot {
                self.cache.copy_slot(leader as i64, slot as i64, requests[i].prompt_ids.len() as i64);
            }
        }
        let rows: Vec<i64> = prompt_of.iter().map(|&k| k as i64).collect();
        hidden_last.index_select(0, &Tensor::from_slice(&rows).to_device(self.model.device()))
    }

    /// Prefills `prompt[reused..]` into `slot`, whose cache holds the keys and values of
    /// `prompt[..reused]`; returns the last position's hidden state, `(1, hidden)`.
    fn prefill_suffix(&mut self, slot: usize, prompt: &[u32], reused: usize) -> Tensor {
        let device = self.model.device();
        let suffix: Vec<i64> = prompt[reused..].iter().map(|&id| id as i64).collect();
        let t = suffix.len() as i64;
        let tokens = Tensor::from_slice(&suffix).view([1, t]).to_device(device);
        let positions = Tensor::arange_start(reused as i64, prompt.len() as i64, (Kind::Int64, device)).view([1, t]);
        let selection = SlotSelection::Range { start: slot as i64, len: 1 };
        let _threads = IntraOpThreads::for_rows(self.model, t);
        let hidden = tch::no_grad(|| {
            let mut view = self.cache.view(selection, prompt.len() as i64, false);
            self.model.forward_hidden(&ForwardInput { tokens: &tokens, positions: &positions, use_lora: true, training: false }, Some(&mut view))
        });
        hidden.narrow(1, t - 1, 1).view([1, -1])
    }

    /// Runs `prompts` (right-padded into one batch) into `slots`' cache; returns the hidden
    /// state of each prompt's last position, `(prompts, hidden)`.
    fn prefill(&mut self, slots: &[usize], prompts: &[&[u32]]) -> Tensor {
        let device = self.model.device();
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
        let b_sz = prompts.len() as i64;
        let mut padded = vec![0i64; prompts.len() * longest];
        for (row, prompt) in prompts.iter().enumerate() {
            for (col, &id) in prompt.iter().enumerate() {
                padded[row * longest + col] = id as i64;
            }
        }
        let tokens = Tensor::from_slice(&padded).view([b_sz, longest as i64]).to_device(device);
        let positions = Tensor::arange(longest as i64, (Kind::Int64, device)).unsqueeze(0).expand([b_sz, longest as i64], true);
        let selection = selection_for(slots, device);
        let _threads = IntraOpThreads::for_rows(self.model, b_sz * longest as i64);
        let hidden = tch::no_grad(|| {
            let mut view = self.cache.view(selection, longest as i64, true);
            self.model.forward_hidden(&ForwardInput { tokens: &tokens, positions: &positions, use_lora: true, training: false }, Some(&mut view))
        });
        // The last real prompt position of each row predicts its first new token.
        let last: Vec<i64> = prompts.iter().enumerate().map(|(row, p)| (row * longest + p.len() - 1) as i64).collect();
        hidden.view([b_sz * longest as i64, -1]).index_select(0, &Tensor::from_slice(&last).to_device(device))
    }

    /// Ends a sequence early (its client went away); returns whether it was running.
    pub fn cancel(&mut self, sequence_id: u64) -> bool {
        let found = self.slots.iter().position(|s| s.as_ref().is_some_and(|q| q.id == sequence_id));
        if let Some(slot) = found {
            self.slots[slot] = None;
            self.cached[slot] = None;
            self.sampling = None;
        }
        found.is_some()
    }

    /// One decode step over every active slot.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>, EngineError> {
        let active: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].is_some()).collect();
        if active.is_empty() {
            return Ok(Vec::new());
        }
        let device = self.model.device();
        let mut last_tokens = Vec::with_capacity(active.len());
        let mut positions = Vec::with_capacity(active.len());
        for seq in active.iter().filter_map(|&slot| self.slots[slot].as_ref()) {
            last_tokens.push(seq.ids.last().copied().unwrap_or(0) as i64);
            positions.push(seq.ids.len() as i64 - 1);
        }
        let window = positions.iter().copied().max().unwrap_or(0) + 1;
        let b_sz = active.len() as i64;
        let tokens = Tensor::from_slice(&last_tokens).view([b_sz, 1]).to_device(device);
        let positions = Tensor::from_slice(&positions).view([b_sz, 1]).to_device(device);
        let selection = selection_for(&active, device);
        let _threads = IntraOpThreads::for_rows(self.model, b_sz);
        let hidden = tch::no_grad(|| {
            let mut view = self.cache.view(selection, window, false);
            self.model.forward_hidden(&ForwardInput { tokens: &tokens, positions: &positions, use_lora: true, training: false }, Some(&mut view))
        });
        self.sample_and_advance(&active, &hidden.view([b_sz, -1]))
    }

    /// Generates every request to completion, `slots` at a time, results in request order.
    pub fn generate(&mut self, requests: &[GenerationRequest]) -> Result<Vec<Generation>, EngineError> {
        for request in requests {
            self.validate(request)?;
        }
        let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
        let mut tokens: Vec<Vec<GeneratedToken>> = vec![Vec::new(); requests.len()];
        let mut next = 0;
        while next < requests.len() || self.active() > 0 {
            let room = self.free_slots().min(requests.len() - next);
            let events = if room > 0 {
                let batch: Vec<(u64, GenerationRequest)> =
                    (next..next + room).map(|i| (i as u64, requests[i].clone())).collect();
                next += room;
                self.admit(batch)?
            } else {
                self.step()?
            };
            for event in events {
                let index = event.sequence_id as usize;
                tokens[index].push(event.token);
                if let Some(reason) = event.finished {
                    results[index] = Some(Generation {
                        prompt_tokens: requests[index].prompt_ids.len(),
                        tokens: std::mem::take(&mut tokens[index]),
                        text: event.final_text.unwrap_or_default(),
                        finish_reason: reason,
                    });
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Samples from `hidden` `(b, hidden)` for the sequences in `slots`, appends the tokens,
    /// applies stop conditions and frees finished slots.
    fn sample_and_advance(&mut self, slots: &[usize], hidden: &Tensor) -> Result<Vec<TokenEvent>, EngineError> {
        let device = self.model.device();
        let logits = tch::no_grad(|| self.model.logits(hidden));
        let steps: Vec<i64> = slots.iter().filter_map(|&s| self.slots[s].as_ref()).map(|q| q.generated as i64).collect();
        let steps = Tensor::from_slice(&steps).view([-1, 1]).to_device(device);
        let top_k = slots.iter().filter_map(|&s| self.slots[s].as_ref()).map(|q| q.request.top_logprobs).max().unwrap_or(0);
        // Host work (masks from the grammars) while the device computes the logits.
        let edits = self.logit_edits(slots);
        let sampled = self.sampling_for(slots).sample(&logits, edits.as_ref(), &steps, top_k);
        let StepReadBack { ids, logprobs, sampling_logprobs, entropies, top } = read_back(&sampled)?;
        let mut events = Vec::with_capacity(slots.len());
        for (row, &slot) in slots.iter().enumerate() {
            let Some(seq) = self.slots[slot].as_mut() else { continue };
            let id = ids[row] as u32;
            if let Some(state) = seq.logits.as_mut() {
                // The mask allowed this token, so its grammar accepts it; if it still fails,
                // the next mask ends this output (never the batch).
                if let Err(err) = state.push(&seq.request.sampling, id) {
                    tracing::warn!(%err, sequence = seq.id, "the constraint did not accept a sampled token");
                }
            }
            seq.ids.push(id);
            seq.generated += 1;
            let text = next_text_piece(self.tokenizer, seq)?;
            seq.text.push_str(&text);
            let finished = finish_reason(seq, id, self.cache.capacity());
            let top_logprobs = top
                .as_ref()
                .map(|(values, indices)| {
                    let k = seq.request.top_logprobs;
                    (0..k).map(|j| (indices[row * top_k + j] as u32, values[row * top_k + j])).collect()
                })
                .unwrap_or_default();
            let final_text = finished.map(|_| std::mem::take(&mut seq.text));
            events.push(TokenEvent {
                sequence_id: seq.id,
                token: GeneratedToken { id, text, logprob: logprobs[row], sampling_logprob: sampling_logprobs[row], entropy: entropies[row], top_logprobs },
                finished,
                final_text,
            });
            if finished.is_some() {
                let done = self.slots[slot].take();
                self.sampling = None;
                // Its cache holds every id but the last (never fed back), all by the current
                // weights unless a step landed while it decoded.
                self.cached[slot] = done.filter(|seq| self.prefix_reuse && seq.weights == self.weights && seq.ids.len() > 1).map(|mut seq| {
                    seq.ids.pop();
                    CachedPrefix { ids: seq.ids, last_used: self.clock }
                });
            }
        }
        Ok(events)
    }

    /// This step's logit bias, penalties and constraint masks of the rows in `slots`.
    fn logit_edits(&mut self, slots: &[usize]) -> Option<super::logits::LogitEdits> {
        let mut rows: Vec<(usize, &mut LogitState, &SamplingParams)> = Vec::new();
        let mut row_of_slot = vec![usize::MAX; self.slots.len()];
        for (row, &slot) in slots.iter().enumerate() {
            row_of_slot[slot] = row;
        }
        for (slot, seq) in self.slots.iter_mut().enumerate() {
            let Some(seq) = seq.as_mut() else { continue };
            if let (Some(state), true) = (seq.logits.as_mut(), row_of_slot[slot] != usize::MAX) {
                rows.push((row_of_slot[slot], state, &seq.request.sampling));
            }
        }
        if rows.is_empty() {
            return None;
        }
        let mut builder = EditsBuilder::new(slots.len());
        super::logits::write_rows(&mut rows, &mut builder);
        builder.build(self.model.config().vocab_size, self.model.device())
    }

    fn sampling_for(&mut self, slots: &[usize]) -> &BatchSampling {
        if !matches!(&self.sampling, Some((cached, _)) if cached == slots) {
            self.sampling = None;
        }
        let (model, sequences) = (self.model, &self.slots);
        &self
            .sampling
            .get_or_insert_with(|| {
                let params: Vec<&SamplingParams> =
                    slots.iter().filter_map(|&s| sequences[s].as_ref()).map(|q| &q.request.sampling).collect();
                (slots.to_vec(), BatchSampling::new(&params, model.config().vocab_size, model.device()))
            })
            .1
    }
}

/// The checks every prompt must pass, to be continued (`generating`) or scored: not empty,
/// within `max_context` (one position to spare when generating), ids inside the vocabulary.
pub fn validate_prompt(prompt_ids: &[u32], vocab_size: usize, max_context: usize, generating: bool) -> Result<(), EngineError> {
    if prompt_ids.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if prompt_ids.len() + usize::from(generating) > max_context {
        return Err(EngineError::PromptTooLong { prompt_tokens: prompt_ids.len(), max_context, generating });
    }
    if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(EngineError::TokenOutOfRange { id, vocab_size });
    }
    Ok(())
}

/// The checks a request must pass before it takes a slot: its prompt's
/// ([`validate_prompt`]) and sane sampling parameters. Shared by the engine and by the
/// scheduler's early refusal.
pub fn validate_request(request: &GenerationRequest, vocab_size: usize, max_context: usize) -> Result<(), EngineError> {
    validate_prompt(&request.prompt_ids, vocab_size, max_context, true)?;
    let s = &request.sampling;
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(EngineError::InvalidParameter(format!("temperature must be >= 0, got {}", s.temperature)));
    }
    s.check_ranges().map_err(|e| EngineError::InvalidParameter(e.message))?;
    if let Some((token, _)) = s.logit_bias.iter().find(|(token, _)| *token as usize >= vocab_size) {
        return Err(EngineError::InvalidParameter(format!("logit_bias: token {token} is outside the vocabulary (ids below {vocab_size})")));
    }
    if request.top_logprobs > vocab_size {
        return Err(EngineError::InvalidParameter(format!("top_logprobs {} exceeds the vocabulary", request.top_logprobs)));
    }
    Ok(())
}

/// Drops libtorch to one intra-op thread while a CPU forward pass runs its products on
/// [`crate::model::cpu_gemv`]'s workers (libtorch's OpenMP workers would spin on the same
/// cores), and restores the count afterwards.
struct IntraOpThreads(Option<i32>);

impl IntraOpThreads {
    fn for_rows(model: &Transformer, rows: i64) -> Self {
        if !crate::model::cpu_gemv::handles_rows(model.device(), model.kind(), rows) {
            return Self(None);
        }
        let previous = tch::get_num_threads();
        tch::set_num_threads(1);
        Self(Some(previous))
    }
}

impl Drop for IntraOpThreads {
    fn drop(&mut self) {
        if let Some(previous) = self.0 {
            tch::set_num_threads(previous);
        }
    }
}

/// Contiguous slots are read as a view; others through an index.
fn selection_for(slots: &[usize], device: Device) -> SlotSelection {
    let start = slots.first().copied().unwrap_or(0);
    let contiguous = slots.iter().enumerate().all(|(i, &s)| s == start + i);
    if contiguous {
        SlotSelection::Range { start: start as i64, len: slots.len() as i64 }
    } else {
        let idx: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        SlotSelection::Indices(Tensor::from_slice(&idx).to_device(device))
    }
}

/// One step's results on the host.
struct StepReadBack {
    ids: Vec<i64>,
    logprobs: Vec<f32>,
    sampling_logprobs: Vec<f32>,
    entropies: Vec<f32>,
    /// Flattened `(b, k)` values and ids of the best alternatives, when asked for.
    top: Option<(Vec<f32>, Vec<i64>)>,
}

/// Copies the step's results to the host: the one synchronisation per step.
fn read_back(sampled: &Sampled) -> Result<StepReadBack, EngineError> {
    let ids = Vec::<i64>::try_from(sampled.tokens.to_device(Device::Cpu))?;
    let logprobs = Vec::<f32>::try_from(sampled.logprobs.to_device(Device::Cpu))?;
    let sampling_logprobs = Vec::<f32>::try_from(sampled.sampling_logprobs.to_device(Device::Cpu))?;
    let entropies = Vec::<f32>::try_from(sampled.entropies.to_device(Device::Cpu))?;
    let top = match &sampled.top {
        Some((values, indices)) => Some((
            Vec::<f32>::try_from(values.to_device(Device::Cpu).reshape([-1]))?,
            Vec::<i64>::try_from(indices.to_device(Device::Cpu).reshape([-1]))?,
        )),
        None => None,
    };
    Ok(StepReadBack { ids, logprobs, sampling_logprobs, entropies, top })
}

/// The text the newest token adds, holding back incomplete UTF-8 (TGI's/vLLM's scheme:
/// decode a short window before and after the token and emit the difference).
fn next_text_piece(tokenizer: Option<&Tokenizer>, seq: &mut Sequence) -> Result<String, EngineError> {
    let Some(tokenizer) = tokenizer else { return Ok(String::new()) };
    let before = tokenizer.decode(&seq.ids[seq.prefix_offset..seq.read_offset], true)?;
    let after = tokenizer.decode(&seq.ids[seq.prefix_offset..], true)?;
    if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len()) {
        let piece = after[before.len()..].to_string();
        seq.prefix_offset = seq.read_offset;
        seq.read_offset = seq.ids.len();
        Ok(piece)
    } else {
        Ok(String::new())
    }
}

/// Applies stop tokens, stop strings and length limits after a token was appended.
fn finish_reason(seq: &mut Sequence, id: u32, capacity: usize) -> Option<FinishReason> {
    if seq.request.stop_token_ids.contains(&id) {
        return Some(FinishReason::Stop);
    }
    if let Some(cut) = seq.request.stop_strings.iter().filter(|s| !s.is_empty()).filter_map(|s| seq.text.find(s.as_str())).min() {
        seq.text.truncate(cut);
        return Some(FinishReason::Stop);
    }
    if seq.generated >= seq.request.max_new_tokens || seq.ids.len() >= capacity {
        return Some(FinishReason::Length);
    }
    None
}
