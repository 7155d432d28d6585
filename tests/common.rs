//! Helpers shared by the end-to-end tests: the default model (loaded once per test binary)
//! and running the real `hicra` binary.

#![allow(dead_code)]

use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use hicra_core::model::{load, LoadOptions, LoadedModel};

/// The default model, SmolLM2-135M-Instruct from the GGUF that `scripts/setup.sh` installs.
/// Tensors are not `Sync`, so tests take turns through a mutex.
pub fn default_model() -> MutexGuard<'static, LoadedModel> {
    static MODEL: OnceLock<Mutex<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let loaded = load("smollm2-135m-instruct", &LoadOptions::cpu())
                .unwrap_or_else(|e| panic!("default model missing (run scripts/setup.sh): {e}"));
            Mutex::new(loaded)
        })
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Output of one `hicra` run.
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `hicra` binary built with this test, on the CPU.
pub fn hicra(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_hicra"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the hicra binary runs");
    let run = Run {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!run.stderr.contains("panicked"), "hicra panicked: {}", run.stderr);
    run
}
