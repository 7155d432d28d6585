//! The default model end to end: the CLI answers, sampling is reproducible, batching does not
//! change results, and generation-time logprobs equal teacher-forced ones.

mod common;

use common::{default_model, hicra};
use hicra_core::engine::{score_completions, Engine, FinishReason, GenerationRequest, SamplingParams};

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
    let sampling = SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 50, seed: 5 };
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
            let sampling = if i == 1 { SamplingParams { temperature: 0.8, top_p: 1.0, top_k: 0, seed: 99 } } else { SamplingParams::greedy() };
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
