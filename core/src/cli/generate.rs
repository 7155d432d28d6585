//! `hicra generate`: one prompt in, one completion out (text, or tokens with logprobs as JSON).

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use crate::engine::{Engine, GenerationRequest, SamplingParams};
use crate::tokenizer::chat::ChatMessage;
use crate::tokenizer::Tokenizer;

/// Arguments of `hicra generate`.
#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// RNG seed: the same seed gives the same tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Alternatives to report per token with --json.
    #[arg(long, default_value_t = 0)]
    top_logprobs: usize,
    /// Print JSON: text, finish reason and every token with its logprob.
    #[arg(long)]
    json: bool,
}

/// Builds prompt ids: through the chat template with `--chat`, else the raw text.
pub(crate) fn prompt_ids(tokenizer: &Tokenizer, prompt: &str, chat: bool, system: Option<&str>) -> anyhow::Result<Vec<u32>> {
    if !chat {
        return Ok(tokenizer.encode(prompt, true)?);
    }
    let template = tokenizer.chat_template().context("--chat: this model has no chat template")?;
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", prompt));
    let text = template.render(&messages, None, true, None)?;
    Ok(tokenizer.encode(&text, false)?)
}

/// Runs `hicra generate`.
pub(crate) fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let ids = prompt_ids(&loaded.tokenizer, &args.prompt, args.chat, args.system.as_deref())?;
    let sampling = SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed, ..SamplingParams::default() };
    let mut request = GenerationRequest::new(ids, sampling, args.max_tokens, &loaded.tokenizer);
    request.stop_strings = args.stop;
    request.top_logprobs = args.top_logprobs;
    // Room for the prompt and the completion; the engine caps it at the context limit, so a
    // prompt over the limit is still reported as such.
    let capacity = request.prompt_ids.len() + args.max_tokens.max(1);
    let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, 1, capacity);
    let generation = engine.generate(std::slice::from_ref(&request))?.pop().context("engine returned no generation")?;
    if args.json {
        let tokens: Vec<serde_json::Value> = generation
            .tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": t.id,
                    "token": loaded.tokenizer.decode(&[t.id], false).unwrap_or_default(),
                    "text": t.text,
                    "logprob": t.logprob,
                    "top_logprobs": t.top_logprobs.iter().map(|(id, lp)| serde_json::json!({"id": id, "logprob": lp})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "model": loaded.name,
            "prompt_ids": request.prompt_ids,
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "tokens": tokens,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", generation.text);
    }
    Ok(())
}
