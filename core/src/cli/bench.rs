//! `hicra bench`: prefill and decode throughput at several batch sizes on one model.
//!
//! Decode runs greedy with stop tokens disabled so every sequence generates exactly
//! `--decode-tokens`; prefill is timed as the batched forward over the prompts plus the first
//! sampled token. `scripts/bench.sh` runs this next to transformers and llama.cpp.

use std::time::Instant;

use clap::Args;

use super::{ModelArgs, ShapeArgs};
use crate::engine::{Engine, GenerationRequest, SamplingParams};

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
    let bandwidth = read_bandwidth_gb_s(loaded.model.device());
    let weight_bytes = loaded.model.decode_weight_bytes() as f64;
    let floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3;
    if !args.json {
        println!("model {} on {:?} ({:?}), prompt {} tokens, decode {} tokens", loaded.name, loaded.model.device(), loaded.model.kind(), prompt.len(), args.decode_tokens);
        println!("weights read per decode step {:.0} MB at {bandwidth:.1} GB/s: floor {floor_ms:.1} ms/step", weight_bytes / 1e6);
        println!("{:>6} {:>16} {:>16} {:>14}", "batch", "prefill tok/s", "decode tok/s", "ms/step");
    }
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
        for _ in 0..args.warmup {
            measure(&mut engine, &requests)?;
        }
        let mut result = measure(&mut engine, &requests)?;
        for _ in 1..args.repeats {
            let again = measure(&mut engine, &requests)?;
            result.prefill_tokens_per_s = result.prefill_tokens_per_s.max(again.prefill_tokens_per_s);
            if again.decode_tokens_per_s > result.decode_tokens_per_s {
                result.decode_tokens_per_s = again.decode_tokens_per_s;
                result.decode_ms_per_step = again.decode_ms_per_step;
            }
        }
        if args.json {
            println!("{}", serde_json::to_string(&BenchRow { result, bandwidth_floor_ms: floor_ms, read_bandwidth_gb_s: bandwidth })?);
        } else {
            println!("{:>6} {:>16.1} {:>16.1} {:>14.2}", batch, result.prefill_tokens_per_s, result.decode_tokens_per_s, result.decode_ms_per_step);
        }
    }
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
