//! The default model end to end: the CLI answers, sampling is reproducible, batching does not
//! change results, and generation-time logprobs equal teacher-forced ones.

mod common;

use common::{default_model, hicra};
use hicra_core::engine::constraint::{Constraint, Constraints};
use hicra_core::engine::{score_completions, Engine, FinishReason, GenerationRequest, SamplingParams};
use hicra_core::train::loss::{self, LossConfig, TrainSample};

#[test]
fn greedy_chat_answers_paris() {
    let run = hicra(&["generate", "--device", "cpu", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "32"]);
    assert!(run.success, "{}", run.stderr);
    assert!(run.stdout.contains("Paris"), "answer was: {}", run.stdout);
}

fn json_tokens(seed: &str) -> Vec<(u64, f64)> {
    let run = hicra(&[
        "generate", "--device", "cpu", "--prompt", "Once upon a time", "--max-tokens", "16",
        "--temperature", "0.9", "--top-p", "0.95", "--seed", seed, "--json",
    ]);
    assert!(run.success, "{}", run.stderr);
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("--json prints JSON");
    value["tokens"]
        .as_array()
        .expect("tokens array")
        .iter()
        .map(|t| (t["id"].as_u64().expect("id"), t["logprob"].as_f64().expect("logprob")))
        .collect()
}

#[test]
fn same_seed_gives_same_tokens_and_logprobs_are_valid() {
    let first = json_tokens("11");
    assert_eq!(first.len(), 16);
    assert_eq!(first, json_tokens("11"));
    assert_ne!(first, json_tokens("12"));
    assert!(first.iter().all(|(_, lp)| lp.is_finite() && *lp <= 0.0));
}

#[test]
fn generation_logprobs_equal_teacher_forced_logprobs() {
    let loaded = default_model();
    let prompt = loaded.tokenizer.encode("The three primary colours are", false).expect("encode");
    let sampling = SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 50, seed: 5, ..SamplingParams::default() };
    let request = GenerationRequest::new(prompt.clone(), sampling, 24, &loaded.tokenizer);
    let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, 1, 256);
    let generation = engine.generate(&[request]).expect("generate").remove(0);
    let ids: Vec<u32> = generation.tokens.iter().map(|t| t.id).collect();
    let scored = score_completions(&loaded.model, &[(&prompt, &ids)], 0.7, true).expect("score").remove(0);
    let gap = generation.tokens.iter().zip(&scored).map(|(t, s)| (t.logprob - s).abs()).fold(0.0f32, f32::max);
    eprintln!("max |generation - teacher forced| = {gap:.2e} over {} tokens", ids.len());
    assert!(gap < 1e-4, "logprob gap {gap}");
}

#[test]
fn a_sequence_decodes_the_same_alone_in_8_and_in_32() {
    // Batch sizes take different kernel paths (one row, 4 x 4 register tiles, remainders);
    // each must give a sequence the same tokens and logprobs whatever shares its batch.
    let loaded = default_model();
    let requests: Vec<GenerationRequest> = (0..32)
        .map(|i| {
            let prompt = format!("Question {i}: what is {} plus {}? Answer:", i * 7 % 13, "nine ".repeat(i % 5));
            GenerationRequest::new(loaded.tokenizer.encode(&prompt, false).expect("encode"), SamplingParams::greedy(), 8, &loaded.tokenizer)
        })
        .collect();
    let run = |count: usize| Engine::new(&loaded.model, &loaded.tokenizer, count, 128).generate(&requests[..count]).expect("generate");
    let (thirty_two, eight, one) = (run(32), run(8), run(1));
    let same = |a: &hicra_core::engine::Generation, b: &hicra_core::engine::Generation, what: &str| {
        assert_eq!(a.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), b.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), "{what}");
        let gap = a.tokens.iter().zip(&b.tokens).map(|(x, y)| (x.logprob - y.logprob).abs()).fold(0.0f32, f32::max);
        assert!(gap < 2e-5, "{what}: logprobs differ by {gap}");
    };
    for (i, (a, b)) in eight.iter().zip(&thirty_two).enumerate() {
        same(a, b, &format!("sequence {i} in a batch of 8 vs 32"));
    }
    same(&one[0], &thirty_two[0], "sequence 0 alone vs in a batch of 32");
}

#[test]
fn batching_sequences_of_different_lengths_changes_nothing() {
    let loaded = default_model();
    let prompts = ["Hi", "The history of the Roman Empire begins", "List three fruits:\n1."];
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids = loaded.tokenizer.encode(p, false).expect("encode");
            let sampling = if i == 1 { SamplingParams { temperature: 0.8, top_p: 1.0, top_k: 0, seed: 99, ..SamplingParams::default() } } else { SamplingParams::greedy() };
            GenerationRequest::new(ids, sampling, 12, &loaded.tokenizer)
        })
        .collect();
    let batched = Engine::new(&loaded.model, &loaded.tokenizer, 3, 256).generate(&requests).expect("batched");
    for (request, together) in requests.iter().zip(&batched) {
        let alone = Engine::new(&loaded.model, &loaded.tokenizer, 1, 256).generate(std::slice::from_ref(request)).expect("alone").remove(0);
        let ids = |g: &hicra_core::engine::Generation| g.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(together), ids(&alone));
        assert_eq!(together.text, alone.text);
        for (a, b) in together.tokens.iter().zip(&alone.tokens) {
            assert!((a.logprob - b.logprob).abs() < 1e-4);
        }
    }
}

#[test]
fn stop_strings_cut_the_text_and_top_logprobs_are_sorted() {
    let loaded = default_model();
    let ids = loaded.tokenizer.encode("Count: one, two, three, four, five, six,", false).expect("encode");
    let mut request = GenerationRequest::new(ids, SamplingParams::greedy(), 40, &loaded.tokenizer);
    request.stop_strings = vec![" nine".to_string()];
    request.top_logprobs = 3;
    let generation = Engine::new(&loaded.model, &loaded.tokenizer, 1, 256).generate(&[request]).expect("generate").remove(0);
    assert_eq!(generation.finish_reason, FinishReason::Stop, "text: {}", generation.text);
    assert!(!generation.text.contains("nine"), "{}", generation.text);
    assert!(generation.text.contains("eight"), "{}", generation.text);
    for token in &generation.tokens {
        assert_eq!(token.top_logprobs.len(), 3);
        // Greedy: the chosen token is the best alternative.
        assert_eq!(token.top_logprobs[0].0, token.id);
        assert!(token.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

#[test]
fn max_tokens_ends_with_length() {
    let loaded = default_model();
    let ids = loaded.tokenizer.encode("Write a long story about a dragon.", false).expect("encode");
    let mut request = GenerationRequest::new(ids, SamplingParams::greedy(), 5, &loaded.tokenizer);
    request.stop_token_ids.clear();
    let generation = Engine::new(&loaded.model, &loaded.tokenizer, 1, 256).generate(&[request]).expect("generate").remove(0);
    assert_eq!(generation.tokens.len(), 5);
    assert_eq!(generation.finish_reason, FinishReason::Length);
}

/// The constraint compiler for the loaded model's tokenizer and vocabulary.
fn constraints_for(loaded: &hicra_core::model::LoadedModel) -> Constraints {
    Constraints::new(std::sync::Arc::new(loaded.tokenizer.clone()), loaded.model.config().vocab_size)
}

/// Samples `n` completions of `prompt` under `sampling` with constraints enabled.
fn sample_constrained(loaded: &hicra_core::model::LoadedModel, prompt: &[u32], sampling: &SamplingParams, n: usize, max_tokens: usize) -> Vec<hicra_core::engine::Generation> {
    let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, n, 512);
    engine.set_constraints(std::sync::Arc::new(constraints_for(loaded)));
    let requests: Vec<GenerationRequest> = (0..n as u64).map(|i| GenerationRequest::new(prompt.to_vec(), SamplingParams { seed: 100 + i, ..sampling.clone() }, max_tokens, &loaded.tokenizer)).collect();
    engine.generate(&requests).expect("generate")
}

#[test]
fn constrained_sampling_at_temperature_one_gives_schema_valid_json_and_trains_at_ratio_one() {
    let loaded = default_model();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "population": {"type": "integer"}, "coastal": {"type": "boolean"}},
        "required": ["city", "population", "coastal"],
        "additionalProperties": false
    });
    let prompt = loaded.tokenizer.encode("Describe a city as JSON:", false).expect("encode");
    // Every processor at once: the trainer must rebuild all of them.
    let sampling = SamplingParams {
        temperature: 1.0,
        min_p: 0.02,
        logit_bias: vec![(28, 1.5)],
        frequency_penalty: 0.4,
        presence_penalty: 0.2,
        repetition_penalty: 1.1,
        constraint: Some(Constraint::JsonSchema { schema: schema.clone() }),
        ..SamplingParams::default()
    };
    let generations = sample_constrained(&loaded, &prompt, &sampling, 8, 96);
    for g in &generations {
        if g.finish_reason == FinishReason::Length {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{:?} is not JSON: {e}", g.text));
        let object = value.as_object().unwrap_or_else(|| panic!("{value} is not an object"));
        assert_eq!(object.len(), 3, "{value}");
        assert!(value["city"].as_str().is_some_and(|c| c.chars().count() <= 12) && value["coastal"].is_boolean(), "{value}");
        assert!(value["population"].as_f64().is_some_and(|p| p.fract() == 0.0), "{value}");
    }
    let finished = generations.iter().filter(|g| g.finish_reason == FinishReason::Stop).count();
    assert!(finished >= 6, "only {finished} of 8 completions closed their JSON");
    let samples: Vec<TrainSample> = generations.iter().map(|g| TrainSample::from_generation(&prompt, g, &sampling, 1.0)).collect();
    let constraints = constraints_for(&loaded);
    let vocab = loaded.model.config().vocab_size;
    loss::validate(&samples, vocab, loaded.model.max_positions(), Some(&constraints)).expect("the rollouts replay under their sampling");
    let tokens: usize = samples.iter().map(|s| s.completion_ids.len()).sum();
    let gap = |stats: &loss::LossStats| stats.new_logprobs.iter().flatten().zip(samples.iter().flat_map(|s| &s.old_logprobs)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let stats = tch::no_grad(|| loss::accumulate(&loaded.model, &samples, &LossConfig::default(), Some(&constraints), tokens, samples.len()));
    eprintln!("constrained: largest |trainer - sampler| logprob gap {:.2e} over {tokens} tokens", gap(&stats));
    assert!(gap(&stats) < 1e-4, "the trainer evaluates another distribution than the sampler drew from: gap {}", gap(&stats));
    assert_eq!(stats.clipped_tokens, 0);
    // The same tokens judged without the mask and penalties are far off: the check can fail.
    let unedited: Vec<TrainSample> = samples.iter().map(|s| TrainSample { sampling: SamplingParams { temperature: 1.0, min_p: 0.02, ..SamplingParams::default() }, ..s.clone() }).collect();
    let plain = tch::no_grad(|| loss::accumulate(&loaded.model, &unedited, &LossConfig::default(), None, tokens, samples.len()));
    assert!(gap(&plain) > 0.1, "without the edits the gap should be large, got {}", gap(&plain));
}

#[test]
fn a_rollout_whose_tokens_break_its_constraint_is_an_invalid_sample() {
    let loaded = default_model();
    let constraints = constraints_for(&loaded);
    let completion = loaded.tokenizer.encode("hello", false).expect("encode");
    let sample = TrainSample {
        prompt_ids: vec![1, 2, 3],
        old_logprobs: vec![-1.0; completion.len()],
        advantages: vec![1.0; completion.len()],
        completion_ids: completion,
        sampling: SamplingParams { constraint: Some(Constraint::Regex { pattern: "[0-9]+".into() }), ..SamplingParams::default() },
        sampled_mask: Vec::new(),
    };
    let err = loss::validate(&[sample], loaded.model.config().vocab_size, loaded.model.max_positions(), Some(&constraints)).expect_err("letters are not digits");
    assert!(err.to_string().contains("replay"), "{err}");
}

#[test]
fn a_two_turn_episode_sampled_under_a_constraint_and_penalties_replays_turn_by_turn() {
    // Turn 2's prompt holds turn 1's output and some context (a tool result): the trainer
    // must restart the grammar and the output counts at each turn, and keep every earlier
    // token in the repetition penalty's set, exactly as the sampler saw them.
    let loaded = default_model();
    let sampling = SamplingParams {
        temperature: 1.0,
        frequency_penalty: 0.8,
        repetition_penalty: 1.2,
        constraint: Some(Constraint::Regex { pattern: "[A-Z][a-z]{1,8}( [a-z]{1,8}){1,5}\\.".into() }),
        ..SamplingParams::default()
    };
    let first_prompt = loaded.tokenizer.encode("Write a short sentence about the sea.", false).expect("encode");
    let first = sample_constrained(&loaded, &first_prompt, &sampling, 1, 24).remove(0);
    let first_ids: Vec<u32> = first.tokens.iter().map(|t| t.id).collect();
    let context = loaded.tokenizer.encode("\nTool: the sea is calm today.\nAnother one:", false).expect("encode");
    let second_prompt: Vec<u32> = first_prompt.iter().chain(&first_ids).chain(&context).copied().collect();
    let second = sample_constrained(&loaded, &second_prompt, &SamplingParams { seed: 77, ..sampling.clone() }, 1, 24).remove(0);
    for g in [&first, &second] {
        assert!(g.text.ends_with('.') && g.text.chars().next().is_some_and(char::is_uppercase), "{:?} breaks the regex", g.text);
    }
    let completion: Vec<u32> = first_ids.iter().chain(&context).chain(second.tokens.iter().map(|t| &t.id)).copied().collect();
    let sampled_mask: Vec<bool> = std::iter::repeat_n(true, first_ids.len()).chain(std::iter::repeat_n(false, context.len())).chain(std::iter::repeat_n(true, second.tokens.len())).collect();
    let old_logprobs: Vec<f32> = first.tokens.iter().map(|t| t.sampling_logprob).chain(std::iter::repeat_n(0.0, context.len())).chain(second.tokens.iter().map(|t| t.sampling_logprob)).collect();
    let sample = TrainSample { prompt_ids: first_prompt.clone(), advantages: vec![1.0; completion.len()], completion_ids: completion, old_logprobs, sampling: sampling.clone(), sampled_mask };
    let constraints = constraints_for(&loaded);
    loss::validate(std::slice::from_ref(&sample), loaded.model.config().vocab_size, loaded.model.max_positions(), Some(&constraints)).expect("both turns replay");
    let stats = tch::no_grad(|| loss::accumulate(&loaded.model, std::slice::from_ref(&sample), &LossConfig::default(), Some(&constraints), sample.loss_tokens(), 1));
    let gap = stats.new_logprobs[0]
        .iter()
        .zip(&sample.old_logprobs)
        .zip(&sample.sampled_mask)
        .filter(|(_, &sampled)| sampled)
        .map(|((new, old), _)| (new - old).abs())
        .fold(0.0f32, f32::max);
    eprintln!("two-turn episode: largest |trainer - sampler| gap {gap:.2e} over {} sampled tokens", sample.loss_tokens());
    assert!(gap < 1e-4, "turn-by-turn replay differs from sampling by {gap}");
}
