//! `hicra bench`: prefill and decode throughput at several batch sizes on one model.
//!
//! Decode runs greedy with stop tokens disabled so every sequence generates exactly
//! `--decode-tokens`; prefill is timed as the batched forward over the prompts plus the first
//! sampled token. `scripts/bench.sh` runs this next to transformers and llama.cpp. With a
//! dtype other than f32 it also loads the model in f32 and reports how far the log-probabilities
//! drift from it.

use std::time::Instant;

use clap::Args;

use tch::{Kind, Tensor};

use super::{ModelArgs, ShapeArgs};
use crate::engine::constraint::{with_compact_whitespace, Constraint, Constraints};
use crate::engine::{Engine, GenerationRequest, SamplingParams};
use crate::model::{DType, ForwardInput, Transformer};

/// Arguments of `hicra bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per sequence in the decode measurement.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Untimed rounds before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Measured rounds; the fastest is reported (as scripts/bench_reference.py does).
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Print one JSON object per batch size instead of a table.
    #[arg(long)]
    json: bool,
    /// Also measure each batch with every row under a JSON grammar (structured outputs):
    /// the cost of computing and applying the masks.
    #[arg(long)]
    constrained: bool,
}

/// The grammar of `--constrained`: JSON records one per line, without end, so every step of
/// the measurement computes a mask inside a JSON value (an end-of-sequence token does not
/// end the grammar: the engine does not feed it to the matcher).
fn bench_constraint() -> Constraint {
    let record = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    });
    Constraint::Lark { grammar: format!("start: (%json {} \"\\n\")+", with_compact_whitespace(record)) }
}

/// One measurement.
#[derive(Debug, serde::Serialize)]
struct BenchResult {
    batch: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    decode_ms_per_step: f64,
    decode_steps: usize,
}

/// A reported row: the measurement and the floor under it.
#[derive(Debug, serde::Serialize)]
struct BenchRow {
    #[serde(flatten)]
    result: BenchResult,
    /// Weight bytes per decode step / measured read bandwidth: no bandwidth-bound decode step
    /// can be faster.
    bandwidth_floor_ms: f64,
    /// The read bandwidth that floor assumes, GB/s.
    read_bandwidth_gb_s: f64,
    /// For a dtype other than f32: its distance from the same model in f32.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    drift: Option<Drift>,
    /// With `--constrained`: the same decode with every row under a grammar.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    constrained: Option<ConstrainedCost>,
}

/// What constrained decoding adds to a decode step.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct ConstrainedCost {
    constrained_decode_ms_per_step: f64,
    constrained_decode_tokens_per_s: f64,
    /// (constrained - unconstrained ms/step) / batch: the mask's cost per generated token.
    constrained_extra_ms_per_token: f64,
}

impl ConstrainedCost {
    fn new(plain: &BenchResult, constrained: &BenchResult) -> Self {
        Self {
            constrained_decode_ms_per_step: constrained.decode_ms_per_step,
            constrained_decode_tokens_per_s: constrained.decode_tokens_per_s,
            constrained_extra_ms_per_token: (constrained.decode_ms_per_step - plain.decode_ms_per_step) / plain.batch.max(1) as f64,
        }
    }
}

/// Prose for the drift measurement: a few unrelated sentences, numbers and a little code.
const DRIFT_TEXT: &str = "In 1887 the lighthouse keeper wrote that the storm had lasted nine days. \
Photosynthesis converts light, water and carbon dioxide into glucose and oxygen. \
To compute the mean of a list in Python, write sum(xs) / len(xs), but check that the list is not empty first. \
The committee postponed its decision until the spring, citing the cost of the new bridge. \
If 3x + 7 = 22, then x = 5, because 3 * 5 + 7 = 22. \
She packed a map, two lanterns and a jar of honey, then set off before dawn.";

/// How far a lower-precision model's log-probabilities are from the same weights in f32,
/// teacher-forced on the benchmark prompt (every position predicting the next prompt token).
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Drift {
    /// Mean |logprob - logprob in f32| of the next prompt token.
    logprob_drift_mean: f64,
    /// Largest such difference.
    logprob_drift_max: f64,
    /// Share of positions whose most likely next token is the same in both.
    argmax_agreement: f64,
}

/// The drift of `model` from its f32 version on `prompt`; `None` for an f32 model.
fn drift_vs_f32(args: &BenchArgs, model: &Transformer, prompt: &[u32]) -> anyhow::Result<Option<Drift>> {
    if model.kind() == Kind::Float || prompt.len() < 2 {
        return Ok(None);
    }
    let mut reference_args = args.model.clone();
    reference_args.dtype = Some(DType::F32);
    let reference = reference_args.load_for_bench(&args.shape)?;
    let device = model.device();
    let ids: Vec<i64> = prompt.iter().map(|&id| i64::from(id)).collect();
    let tokens = Tensor::from_slice(&ids).to_device(device).unsqueeze(0);
    let positions = Tensor::arange(ids.len() as i64, (Kind::Int64, device)).unsqueeze(0);
    let logprobs = |m: &Transformer| {
        tch::no_grad(|| {
            let hidden = m.forward_hidden(&ForwardInput { tokens: &tokens, positions: &positions, use_lora: false, training: false }, None);
            m.logits(&hidden).squeeze_dim(0).log_softmax(-1, Kind::Float)
        })
    };
    let (ours, theirs) = (logprobs(model), logprobs(&reference.model));
    let predicting = ids.len() as i64 - 1;
    let next = Tensor::from_slice(&ids[1..]).to_device(device).unsqueeze(1);
    let picked = |lp: &Tensor| lp.narrow(0, 0, predicting).gather(1, &next, false);
    let diff = (picked(&ours) - picked(&theirs)).abs();
    let agreement = ours.argmax(-1, false).eq_tensor(&theirs.argmax(-1, false)).to_kind(Kind::Float).mean(Kind::Float);
    Ok(Some(Drift {
        logprob_drift_mean: f64::try_from(diff.mean(Kind::Float))?,
        logprob_drift_max: f64::try_from(diff.max())?,
        argmax_agreement: f64::try_from(agreement)?,
    }))
}

/// Read bandwidth of the device's memory in GB/s: the best of three sums over 1 GiB (each
/// byte read once, libtorch's threads), the way a decode step reads its weights.
fn read_bandwidth_gb_s(device: tch::Device) -> f64 {
    let buffer = tch::Tensor::ones([1 << 28], (tch::Kind::Float, device));
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let started = Instant::now();
        let _ = f64::try_from(buffer.sum(tch::Kind::Float));
        best = best.min(started.elapsed().as_secs_f64());
    }
    (buffer.numel() * 4) as f64 / best / 1e9
}

/// Runs `hicra bench`.
pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    let loaded = args.model.load_for_bench(&args.shape)?;
    let prompt = match &loaded.tokenizer {
        Some(tokenizer) => {
            let text = "The quick brown fox jumps over the lazy dog while the river keeps running to the sea. ";
            let mut prompt = tokenizer.encode(&text.repeat(1 + args.prompt_tokens / 8), false)?;
            prompt.truncate(args.prompt_tokens);
            prompt
        }
        // Random weights have no tokenizer: deterministic pseudo-random ids.
        None => {
            let vocab = loaded.model.config().vocab_size;
            (0..args.prompt_tokens as u64).map(|i| crate::model::shapes::synthetic_token_id(i, vocab)).collect()
        }
    };
    // Drift is measured on varied prose (the throughput prompt repeats itself, and a model
    // is sure of a repetition in any dtype).
    let drift_text = match &loaded.tokenizer {
        Some(tokenizer) => tokenizer.encode(DRIFT_TEXT, false)?,
        None => prompt.clone(),
    };
    let drift = drift_vs_f32(&args, &loaded.model, &drift_text)?;
    let bandwidth = read_bandwidth_gb_s(loaded.model.device());
    let weight_bytes = loaded.model.decode_weight_bytes() as f64;
    let floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3;
    if !args.json {
        println!("model {} on {:?} ({:?}), prompt {} tokens, decode {} tokens", loaded.name, loaded.model.device(), loaded.model.kind(), prompt.len(), args.decode_tokens);
        println!("weights read per decode step {:.0} MB at {bandwidth:.1} GB/s: floor {floor_ms:.1} ms/step", weight_bytes / 1e6);
        if let Some(d) = drift {
            println!(
                "log-probabilities vs f32 on the prompt: mean |diff| {:.2e}, max {:.2e}, same most likely token at {:.1}% of positions",
                d.logprob_drift_mean,
                d.logprob_drift_max,
                100.0 * d.argmax_agreement
            );
        }
        println!("{:>6} {:>16} {:>16} {:>14}", "batch", "prefill tok/s", "decode tok/s", "ms/step");
    }
    let rounds_per_batch = (args.warmup + args.repeats.max(1)) as u64;
    let progress = super::progress::Progress::new("round", 0, args.batch.len() as u64 * rounds_per_batch * if args.constrained { 2 } else { 1 });
    let mut round = 0;
    let mut timed = |engine: &mut Engine<'_>, requests: &[GenerationRequest], what: &str| -> anyhow::Result<BenchResult> {
        let result = measure(engine, requests)?;
        round += 1;
        progress.reached(round, &format!("batch {} {what}: prefill {:.0} tok/s, decode {:.0} tok/s", requests.len(), result.prefill_tokens_per_s, result.decode_tokens_per_s));
        Ok(result)
    };
    // Warm-up rounds, then the fastest prefill and the fastest decode of the measured rounds.
    let mut fastest = |engine: &mut Engine<'_>, requests: &[GenerationRequest], (warm_up, measured): (&str, &str)| -> anyhow::Result<BenchResult> {
        for _ in 0..args.warmup {
            timed(engine, requests, warm_up)?;
        }
        let mut best = timed(engine, requests, measured)?;
        for _ in 1..args.repeats {
            let again = timed(engine, requests, measured)?;
            best.prefill_tokens_per_s = best.prefill_tokens_per_s.max(again.prefill_tokens_per_s);
            if again.decode_tokens_per_s > best.decode_tokens_per_s {
                best.decode_tokens_per_s = again.decode_tokens_per_s;
                best.decode_ms_per_step = again.decode_ms_per_step;
            }
        }
        Ok(best)
    };
    for &batch in &args.batch {
        let capacity = prompt.len() + args.decode_tokens + 1;
        let mut engine = match &loaded.tokenizer {
            Some(tokenizer) => Engine::new(&loaded.model, tokenizer, batch, capacity),
            None => Engine::without_tokenizer(&loaded.model, batch, capacity),
        };
        // Distinct prompts (rotations of one text): identical ones would share one prefill.
        let requests: Vec<GenerationRequest> = (0..batch)
            .map(|i| GenerationRequest {
                prompt_ids: prompt.iter().cycle().skip(i % prompt.len().max(1)).take(prompt.len()).copied().collect(),
                sampling: SamplingParams { seed: i as u64, ..SamplingParams::greedy() },
                max_new_tokens: args.decode_tokens,
                stop_token_ids: Vec::new(),
                stop_strings: Vec::new(),
                top_logprobs: 0,
            })
            .collect();
        let result = fastest(&mut engine, &requests, ("warm-up", "measured"))?;
        let constrained = match (&loaded.tokenizer, args.constrained) {
            (Some(tokenizer), true) => {
                engine.set_constraints(std::sync::Arc::new(Constraints::new(std::sync::Arc::new(tokenizer.clone()), loaded.model.config().vocab_size)));
                let requests: Vec<GenerationRequest> = requests.iter().map(|r| GenerationRequest { sampling: SamplingParams { constraint: Some(bench_constraint()), ..r.sampling.clone() }, ..r.clone() }).collect();
                let best = fastest(&mut engine, &requests, ("constrained warm-up", "constrained"))?;
                Some(ConstrainedCost::new(&result, &best))
            }
            _ => None,
        };
        let row = match args.json {
            true => serde_json::to_string(&BenchRow { result, bandwidth_floor_ms: floor_ms, read_bandwidth_gb_s: bandwidth, drift, constrained })?,
            false => {
                let mut line = format!("{:>6} {:>16.1} {:>16.1} {:>14.2}", batch, result.prefill_tokens_per_s, result.decode_tokens_per_s, result.decode_ms_per_step);
                if let Some(c) = &constrained {
                    line += &format!("   constrained: {:.2} ms/step, +{:.3} ms per token", c.constrained_decode_ms_per_step, c.constrained_extra_ms_per_token);
                }
                line
            }
        };
        progress.suspend(|| println!("{row}"));
    }
    progress.finish();
    Ok(())
}

fn measure(engine: &mut Engine<'_>, requests: &[GenerationRequest]) -> anyhow::Result<BenchResult> {
    let batch = requests.len();
    let prompt_tokens = requests.first().map(|r| r.prompt_ids.len()).unwrap_or(0);
    let decode_tokens = requests.first().map(|r| r.max_new_tokens).unwrap_or(0);
    let started = Instant::now();
    engine.admit(requests.iter().cloned().enumerate().map(|(i, r)| (i as u64, r)).collect())?;
    let prefill_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut steps = 0usize;
    while engine.active() > 0 {
        engine.step()?;
        steps += 1;
    }
    let decode_s = started.elapsed().as_secs_f64();
    Ok(BenchResult {
        batch,
        prompt_tokens,
        decode_tokens,
        prefill_tokens_per_s: (batch * prompt_tokens) as f64 / prefill_s,
        decode_tokens_per_s: (batch * steps) as f64 / decode_s.max(1e-9),
        decode_ms_per_step: 1e3 * decode_s / steps.max(1) as f64,
        decode_steps: steps,
    })
}
