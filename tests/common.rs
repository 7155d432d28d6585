//! Helpers shared by the end-to-end tests: the default model (loaded once per test binary)
//! and running the real `hicra` binary.

#![allow(dead_code, unreachable_pub)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

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

/// A `hicra serve` child process on a free loopback port, killed on drop. Its stderr lines are
/// kept (the pipe is always drained, so the child never blocks on it).
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its state folder (`--state-dir`): a fresh one per server unless the test gave one.
    pub state_dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Kills the server with SIGKILL (no chance to save anything) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the server to exit; returns whether it exited with 0.
    pub fn terminate(mut self) -> bool {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().map(|s| s.success()).unwrap_or(false);
        assert!(sent, "kill -TERM failed");
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Everything the server wrote to stderr so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Starts `hicra serve --device cpu --port 0 ARGS` and waits for its `listening on` line.
/// Without `--state-dir` in ARGS the server gets a fresh one of its own, so tests running in
/// parallel never share (or resume from) each other's state.
pub fn start_server<S: AsRef<OsStr>>(args: &[S]) -> Server {
    start_server_logging(args, "warn")
}

/// [`start_server`] with `RUST_LOG` set to `filter`.
pub fn start_server_logging<S: AsRef<OsStr>>(args: &[S], filter: &str) -> Server {
    start_server_env(args, filter, &[])
}

/// [`start_server_logging`] with extra environment variables.
pub fn start_server_env<S: AsRef<OsStr>>(args: &[S], filter: &str, env: &[(&str, &str)]) -> Server {
    static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let given = args.iter().position(|a| a.as_ref() == "--state-dir").and_then(|i| args.get(i + 1)).map(|d| PathBuf::from(d.as_ref()));
    let state_dir = given.clone().unwrap_or_else(|| scratch_dir(&format!("state-{}", SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed))));
    let mut command = Command::new(env!("CARGO_BIN_EXE_hicra"));
    command.args(["serve", "--device", "cpu", "--port", "0"]).args(args);
    if given.is_none() {
        command.arg("--state-dir").arg(&state_dir);
    }
    let mut child = command
        .env("RUST_LOG", filter)
        .envs(env.iter().copied())
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
    let log = Arc::new(Mutex::new(printed));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
    Server { child, url, state_dir, log }
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


/// An HTTP client for talking to test servers. reqwest's default 30 s time-out is too short
/// for a request to the default model while other servers of the same test binary train.
pub fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(300)).build().expect("HTTP client")
}

/// Polls `GET /v1/training` until at least `steps` training steps have finished (ran or
/// failed) and returns its last answer. Steps run off the reward requests, so tests wait here.
pub fn wait_for_steps(url: &str, key: Option<&str>, steps: u64) -> serde_json::Value {
    wait_for_training(url, key, &format!("step {steps}"), |status| {
        let counters = &status["counters"];
        counters["steps"].as_u64().unwrap_or(0) + counters["failed_steps"].as_u64().unwrap_or(0) >= steps
    })
}

/// Polls `GET /v1/training` until `done` holds (at most 180 s, else the test fails naming
/// `what`) and returns that answer.
pub fn wait_for_training(url: &str, key: Option<&str>, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let client = http_client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let mut request = client.get(format!("{url}/v1/training"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let status: serde_json::Value = request.send().and_then(|r| r.json()).expect("GET /v1/training");
        if done(&status) {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "no {what} within 180 s: {status}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The newest step report of a `GET /v1/training` answer.
pub fn last_step(status: &serde_json::Value) -> &serde_json::Value {
    status["last_steps"].as_array().and_then(|s| s.last()).unwrap_or(&serde_json::Value::Null)
}

/// Which tokens of a completion fall inside a phrase of the paper's Strategic-Gram list, computed
/// here independently of the server's matcher: words are runs of letters and digits
/// (apostrophes dropped), every other visible character is a word of its own, matching is
/// case-folded and whole-word, and a token is planning when its text overlaps a match.
pub fn strategic_gram_tokens(pieces: &[String]) -> Vec<bool> {
    let list = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/strategic_grams.txt")).expect("SG list");
    let phrases: Vec<Vec<String>> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "#" && !l.starts_with("# "))
        .map(|l| words_of(l).into_iter().map(|(_, _, w)| w).collect())
        .collect();
    let text: String = pieces.concat();
    let words = words_of(&text);
    let mut covered = vec![false; text.len()];
    for start in 0..words.len() {
        for phrase in &phrases {
            let Some(window) = words.get(start..start + phrase.len()) else { continue };
            if !phrase.is_empty() && window.iter().zip(phrase).all(|(w, p)| &w.2 == p) {
                covered[window[0].0..window[phrase.len() - 1].1].iter_mut().for_each(|c| *c = true);
            }
        }
    }
    let mut at = 0;
    pieces
        .iter()
        .map(|piece| {
            let span = at..at + piece.len();
            at += piece.len();
            covered[span].iter().any(|&c| c)
        })
        .collect()
}

/// `(start, end, folded word)` of every word of `text`, by the rule above.
fn words_of(text: &str) -> Vec<(usize, usize, String)> {
    let mut out: Vec<(usize, usize, String)> = Vec::new();
    let mut current: Option<(usize, usize, String)> = None;
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        if c.is_alphanumeric() {
            let word = current.get_or_insert((i, end, String::new()));
            word.1 = end;
            word.2.extend(c.to_lowercase());
        } else if c == '\'' || c == '\u{2019}' {
            if let Some(word) = current.as_mut() {
                word.1 = end;
            }
        } else {
            out.extend(current.take());
            if !c.is_whitespace() {
                out.push((i, end, c.to_lowercase().collect()));
            }
        }
    }
    out.extend(current);
    out
}
