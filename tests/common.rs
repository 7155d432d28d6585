//! Helpers shared by the end-to-end tests: the default model (loaded once per test binary)
//! and running the real `hicra` binary.

#![allow(dead_code, unreachable_pub)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
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

/// A `hicra serve` child process on a free loopback port, killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hicra serve --device cpu --port 0 ARGS` and waits for its `listening on` line.
pub fn start_server<S: AsRef<OsStr>>(args: &[S]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hicra"))
        .args(["serve", "--device", "cpu", "--port", "0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("hicra serve starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let mut printed = Vec::new();
    let url = loop {
        let Some(Ok(line)) = lines.next() else { panic!("server exited before listening:\n{}", printed.join("\n")) };
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.trim().to_string();
        }
        printed.push(line);
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, url }
}

/// A fresh, empty temporary folder for one test, unique to this test process.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hicra-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The tiny random Llama checkpoint (GGUF) the end-to-end tests serve and train.
pub fn tiny_model_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/llama/model.gguf")
}

/// The plugin library `lib{name}.so` built by `cargo build --release --workspace` (which
/// scripts/test.sh runs first).
pub fn built_plugin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release").join(format!("lib{name}.{}", std::env::consts::DLL_EXTENSION));
    assert!(path.exists(), "{} missing: run cargo build --release --workspace first", path.display());
    path
}

