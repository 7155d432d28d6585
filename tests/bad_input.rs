//! Bad input gets a clear error naming the file, tensor or limit, and never a panic
//! (`common::hicra` fails the test if the binary panics).

mod common;

use std::path::{Path, PathBuf};

use common::hicra;

fn parity_fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity").join(case)
}

/// A scratch copy of a fixture folder that the test may damage.
fn scratch_copy(case: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hicra-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for entry in std::fs::read_dir(parity_fixture(case)).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    dir
}

fn generate_with(model: &Path) -> common::Run {
    hicra(&["generate", "--device", "cpu", "--model", model.to_str().expect("utf-8 path"), "--prompt", "hi", "--max-tokens", "2"])
}

fn truncate(path: &Path) {
    let len = std::fs::metadata(path).expect("metadata").len();
    let file = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    file.set_len(len / 2).expect("truncate");
}

#[test]
fn missing_weights_name_the_file() {
    let dir = scratch_copy("llama", "missing");
    std::fs::remove_file(dir.join("model.safetensors")).expect("remove");
    let run = generate_with(&dir);
    assert!(!run.success);
    assert!(run.stderr.contains("model.safetensors") && run.stderr.contains("missing"), "{}", run.stderr);
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = scratch_copy("llama", "trunc-st");
    truncate(&dir.join("model.safetensors"));
    let run = generate_with(&dir);
    assert!(!run.success);
    assert!(run.stderr.contains("model.safetensors") && run.stderr.contains("invalid safetensors"), "{}", run.stderr);
}

#[test]
fn truncated_gguf_names_the_file() {
    let dir = scratch_copy("llama", "trunc-gguf");
    let gguf = dir.join("model.gguf");
    truncate(&gguf);
    let run = generate_with(&gguf);
    assert!(!run.success);
    assert!(run.stderr.contains("model.gguf"), "{}", run.stderr);
}

#[test]
fn not_a_gguf_file_is_named() {
    let dir = scratch_copy("llama", "notgguf");
    let run = generate_with(&dir.join("config.json"));
    assert!(!run.success);
    assert!(run.stderr.contains("config.json") && run.stderr.contains("not a GGUF file"), "{}", run.stderr);
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string(&config).expect("json")).expect("write");
}

#[test]
fn unknown_architecture_is_named() {
    let dir = scratch_copy("llama", "arch");
    edit_config(&dir, |c| c["model_type"] = "gpt_neox".into());
    let run = generate_with(&dir);
    assert!(!run.success);
    assert!(run.stderr.contains("unknown architecture 'gpt_neox'"), "{}", run.stderr);
}

#[test]
fn mismatched_shapes_name_the_tensor() {
    let dir = scratch_copy("llama", "shape");
    edit_config(&dir, |c| c["intermediate_size"] = 128.into());
    let run = generate_with(&dir);
    assert!(!run.success);
    assert!(run.stderr.contains("gate_proj.weight") && run.stderr.contains("shape"), "{}", run.stderr);
}

#[test]
fn prompt_over_the_context_names_the_limit() {
    let long = "word ".repeat(64);
    let run = hicra(&["generate", "--device", "cpu", "--max-context", "32", "--prompt", &long, "--max-tokens", "4"]);
    assert!(!run.success);
    assert!(run.stderr.contains("context limit is 32"), "{}", run.stderr);
}

#[test]
fn unknown_model_and_device_are_explained() {
    let run = hicra(&["generate", "--model", "no-such-model", "--prompt", "hi"]);
    assert!(!run.success);
    assert!(run.stderr.contains("model 'no-such-model' not found"), "{}", run.stderr);
    let run = hicra(&["generate", "--device", "tpu", "--prompt", "hi"]);
    assert!(!run.success);
    assert!(run.stderr.contains("invalid device 'tpu'"), "{}", run.stderr);
}
