//! Parity with Hugging Face transformers on tiny random models of every supported family.
//!
//! Fixtures (`core/tests/fixtures/parity/<case>/`) come from `scripts/fixtures/make_parity_fixtures.py`:
//! a checkpoint (safetensors, one case sharded; GGUF for llama and qwen2, with llama.cpp's q/k
//! permutation) and `reference.safetensors` holding transformers' log-softmax over the vocabulary
//! for two sequences of different lengths and 8 greedy tokens continuing each.
//!
//! On a GPU, `scripts/gpu-check.sh` runs these tests against transformers on the same GPU:
//! `HICRA_TEST_DEVICE=cuda`, `HICRA_TEST_DTYPE=f32|bf16`, and `HICRA_PARITY_REFERENCE_DIR` naming
//! references computed there by `scripts/gpu_parity_reference.py` (a case without one is skipped).

use std::path::{Path, PathBuf};

use hicra_core::engine::{score_completions, Engine, GenerationRequest, SamplingParams};
use hicra_core::model::{load_decoder, DType, ForwardInput, LoadOptions, ModelSource, Transformer};
use tch::{Kind, Tensor};

/// f32 forward passes agree with transformers' eager attention to this many nats.
const TOLERANCE: f64 = 1e-4;

/// In bf16 both engines round every activation to 8 bits of mantissa, in different kernels and
/// orders, so they differ from each other about as much as each differs from f32 (0.1-0.3 nats
/// on these models). The check is then on accuracy: hicra's bf16 logprobs may be at most this
/// many times further from the f32 reference than transformers' bf16 logprobs are.
const BF16_ERROR_RATIO: f64 = 1.5;

/// Generation and teacher forcing in bf16 run different kernels (one token against the cache
/// vs a whole sequence): their logprobs agree to this many nats.
const BF16_TOLERANCE: f64 = 0.5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

struct Reference {
    input_ids: Vec<Vec<u32>>,
    logprobs: Tensor,
    greedy: Vec<Vec<u32>>,
}

fn read_reference(path: &Path) -> Reference {
    let tensors = Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let get = |name: &str| {
        tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).unwrap_or_else(|| panic!("{} lacks {name}", path.display()))
    };
    let ids = get("input_ids");
    let lengths = Vec::<i64>::try_from(get("lengths")).expect("lengths");
    let greedy = get("greedy_tokens");
    let rows = |t: &Tensor, lens: Option<&[i64]>| -> Vec<Vec<u32>> {
        (0..t.size()[0])
            .map(|r| {
                let row = Vec::<i64>::try_from(t.get(r)).expect("int row");
                let len = lens.map(|l| l[r as usize] as usize).unwrap_or(row.len());
                row[..len].iter().map(|&v| v as u32).collect()
            })
            .collect()
    };
    Reference { input_ids: rows(&ids, Some(&lengths)), logprobs: get("logprobs"), greedy: rows(&greedy, None) }
}

impl Reference {
    /// Each sequence's log-softmax rows `(len, vocab)`, without the padding.
    fn logprob_rows(&self) -> Vec<Tensor> {
        self.input_ids.iter().enumerate().map(|(row, ids)| self.logprobs.get(row as i64).narrow(0, 0, ids.len() as i64)).collect()
    }
}

/// Largest |a - b| between per-sequence logprob rows and a reference's.
fn max_gap(rows: &[Tensor], reference: &Reference) -> f64 {
    rows.iter().zip(reference.logprob_rows()).map(|(a, b)| f64::try_from((a.to_kind(Kind::Float) - b).abs().max()).expect("scalar")).fold(0.0, f64::max)
}

/// Full log-softmax of one sequence, computed alone (no padding), `(len, vocab)`.
fn logprobs_of(model: &Transformer, ids: &[u32]) -> Tensor {
    let len = ids.len() as i64;
    let device = model.device();
    let tokens = Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>()).view([1, len]).to_device(device);
    let positions = Tensor::arange(len, (Kind::Int64, device)).view([1, len]);
    tch::no_grad(|| {
        let hidden = model.forward_hidden(&ForwardInput { tokens: &tokens, positions: &positions, use_lora: false, training: false }, None);
        model.logits(&hidden).get(0).log_softmax(-1, Kind::Float)
    })
}

/// CPU by default; `HICRA_TEST_DEVICE=cuda` runs the same checks on a GPU (f32, so the same
/// tolerance holds: libtorch leaves TF32 matmuls off unless asked).
/// `HICRA_TEST_DTYPE=bf16` runs them in bf16, against references made in bf16.
fn options() -> LoadOptions {
    let choice = std::env::var("HICRA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let choice = choice.parse().unwrap_or_else(|e| panic!("HICRA_TEST_DEVICE: {e}"));
    let device = hicra_core::device::resolve(choice).unwrap_or_else(|e| panic!("HICRA_TEST_DEVICE: {e}"));
    let dtype = match std::env::var("HICRA_TEST_DTYPE").as_deref() {
        Ok("bf16") => DType::Bf16,
        Ok("f32") | Err(_) => DType::F32,
        Ok(other) => panic!("HICRA_TEST_DTYPE: expected f32 or bf16, got '{other}'"),
    };
    LoadOptions { device, dtype, ..LoadOptions::cpu() }
}

/// The reference file of `case`: the fixture's own, or the one in `HICRA_PARITY_REFERENCE_DIR`
/// (`None` when that folder has none for this case).
fn reference_file(case: &str, file: &str) -> Option<PathBuf> {
    match std::env::var_os("HICRA_PARITY_REFERENCE_DIR") {
        Some(dir) => Some(PathBuf::from(dir).join(case).join(file)).filter(|p| p.exists()),
        None => Some(fixtures().join(case).join(file)),
    }
}

fn check(case: &str, source: ModelSource, reference: &str) {
    let Some(reference) = reference_file(case, reference) else {
        eprintln!("{case}: skipped, no {reference} in HICRA_PARITY_REFERENCE_DIR");
        return;
    };
    let options = options();
    let bf16 = options.dtype == DType::Bf16;
    let tolerance = if bf16 { BF16_TOLERANCE } else { TOLERANCE };
    let model = load_decoder(&source, &options).unwrap_or_else(|e| panic!("{case}: {e}"));
    let reference = read_reference(&reference);

    // 1. Full next-token distributions at every position.
    let ours: Vec<Tensor> = reference.input_ids.iter().map(|ids| logprobs_of(&model, ids).to_device(tch::Device::Cpu)).collect();
    let worst = max_gap(&ours, &reference);
    eprintln!("{case}: max |logprob - transformers| = {worst:.2e} ({:?} on {:?})", options.dtype, options.device);
    if bf16 {
        // The fixture's own reference is transformers in f32: the truth both bf16 runs round.
        let truth = read_reference(&fixtures().join(case).join("reference.safetensors"));
        let (our_error, their_error) = (max_gap(&ours, &truth), max_gap(&reference.logprob_rows(), &truth));
        eprintln!("{case}: bf16 error vs f32: hicra {our_error:.2e}, transformers {their_error:.2e}");
        assert!(our_error <= BF16_ERROR_RATIO * their_error, "{case}: hicra's bf16 logprobs are {our_error} from f32, transformers' {their_error}");
    } else {
        assert!(worst < tolerance, "{case}: logprobs differ from transformers by {worst}");
    }

    // 2. Greedy continuation through the KV cache, both sequences in one batch.
    let requests: Vec<GenerationRequest> = reference
        .input_ids
        .iter()
        .map(|ids| GenerationRequest {
            prompt_ids: ids.clone(),
            sampling: SamplingParams::greedy(),
            max_new_tokens: 8,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            top_logprobs: 0,
        })
        .collect();
    let mut engine = Engine::without_tokenizer(&model, 2, 64);
    let generations = engine.generate(&requests).unwrap_or_else(|e| panic!("{case}: {e}"));
    for (row, generation) in generations.iter().enumerate() {
        let ours: Vec<u32> = generation.tokens.iter().map(|t| t.id).collect();
        // A tiny random model's top tokens are near ties, which bf16 rounding may flip.
        if !bf16 {
            assert_eq!(ours, reference.greedy[row], "{case}: greedy tokens of sequence {row}");
        }
        // 3. The logprobs reported while generating equal the teacher-forced ones.
        let scored = score_completions(&model, &[(&requests[row].prompt_ids, &ours)], 0.0, false).expect("score");
        let reported: Vec<f32> = generation.tokens.iter().map(|t| t.logprob).collect();
        let gap = reported.iter().zip(&scored[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!((gap as f64) < tolerance, "{case}: generation vs teacher-forced logprobs differ by {gap}");
    }
}

fn hf(case: &str) -> ModelSource {
    ModelSource::HfFolder(fixtures().join(case))
}

fn gguf(case: &str, file: &str) -> ModelSource {
    ModelSource::Gguf(fixtures().join(case).join(file))
}

#[test]
fn llama_tied_embeddings() {
    check("llama", hf("llama"), "reference.safetensors");
}

#[test]
fn llama3_rope_scaling_untied() {
    check("llama3-scaled", hf("llama3-scaled"), "reference.safetensors");
}

#[test]
fn llama_linear_rope_scaling() {
    check("llama-linear-rope", hf("llama-linear-rope"), "reference.safetensors");
}

#[test]
fn qwen2_biases_sharded_safetensors() {
    check("qwen2", hf("qwen2"), "reference.safetensors");
}

#[test]
fn qwen3_qk_norm_explicit_head_dim() {
    check("qwen3", hf("qwen3"), "reference.safetensors");
}

#[test]
fn llama_gguf_with_permuted_qk() {
    check("llama", gguf("llama", "model.gguf"), "reference.safetensors");
}

#[test]
fn llama_gguf_q8_0() {
    check("llama", gguf("llama", "model-q8_0.gguf"), "reference-q8_0.safetensors");
}

#[test]
fn qwen2_gguf() {
    check("qwen2", gguf("qwen2", "model.gguf"), "reference.safetensors");
}
