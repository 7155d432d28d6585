//! Running untrusted generated code for rewards: a subprocess with limits.
//!
//! [`run_python`] writes the program into a fresh temporary directory and runs `python3` there
//! with CPU-time, address-space and file-size limits (`ulimit`), a wall-clock time-out, no
//! inherited environment beyond `PATH`, and no network where the OS allows it (a new network
//! namespace through `unshare --net`; without that the run goes on and says so in
//! [`SandboxOutcome::network_isolated`]). It is a guard against accidents and runaway code, not a
//! security boundary against a determined attacker.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Limits of one run.
#[derive(Clone, Debug)]
pub struct SandboxLimits {
    /// Wall-clock limit.
    pub timeout: Duration,
    /// CPU seconds.
    pub cpu_seconds: u64,
    /// Address space in MiB.
    pub memory_mib: u64,
    /// Largest file the program may write, in KiB.
    pub file_size_kib: u64,
    /// Python interpreter.
    pub python: String,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(10), cpu_seconds: 5, memory_mib: 512, file_size_kib: 1024, python: "python3".into() }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SandboxStatus {
    /// Exit code 0.
    Passed,
    /// A non-zero exit code (failed assertion, exception, memory error...).
    Failed(i32),
    /// Killed by a signal (e.g. the CPU-time limit's SIGXCPU / SIGKILL).
    Killed(i32),
    /// The wall-clock limit ran out; the process was killed.
    TimedOut,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct SandboxOutcome {
    /// How it ended.
    pub status: SandboxStatus,
    /// Standard output (truncated to 64 KiB).
    pub stdout: String,
    /// Standard error (truncated to 64 KiB).
    pub stderr: String,
    /// Whether the run had no network.
    pub network_isolated: bool,
    /// Wall time.
    pub elapsed: Duration,
}

fn shell_limits(limits: &SandboxLimits) -> String {
    format!(
        "ulimit -t {} && ulimit -v {} && ulimit -f {} && exec \"$0\" -I -S program.py",
        limits.cpu_seconds,
        limits.memory_mib * 1024,
        limits.file_size_kib
    )
}

fn network_isolation_available() -> bool {
    Command::new("unshare").args(["--net", "true"]).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

/// Runs `program` (Python source) under `limits`; `Err` only when the sandbox itself fails.
pub fn run_python(program: &str, limits: &SandboxLimits) -> Result<SandboxOutcome, String> {
    let dir = std::env::temp_dir().join(format!("hicra-sandbox-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let result = run_in(&dir, program, limits);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn run_in(dir: &PathBuf, program: &str, limits: &SandboxLimits) -> Result<SandboxOutcome, String> {
    std::fs::write(dir.join("program.py"), program).map_err(|e| format!("cannot write the program: {e}"))?;
    let isolated = network_isolation_available();
    let mut command = if isolated {
        let mut c = Command::new("unshare");
        c.args(["--net", "sh", "-c"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg("-c");
        c
    };
    command.arg(shell_limits(limits)).arg(&limits.python);
    command.current_dir(dir).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| format!("cannot start the sandbox: {e}"))?;
    let mut stdout_pipe = child.stdout.take();
    let mut stderr_pipe = child.stderr.take();
    let out_reader = std::thread::spawn(move || read_capped(stdout_pipe.as_mut()));
    let err_reader = std::thread::spawn(move || read_capped(stderr_pipe.as_mut()));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= limits.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for the sandbox: {e}")),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let status = match status {
        None => SandboxStatus::TimedOut,
        Some(s) if s.success() => SandboxStatus::Passed,
        Some(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            (Some(code), _) => SandboxStatus::Failed(code),
            (None, Some(signal)) => SandboxStatus::Killed(signal),
            (None, None) => SandboxStatus::Failed(-1),
        },
    };
    Ok(SandboxOutcome { status, stdout, stderr, network_isolated: isolated, elapsed: started.elapsed() })
}

fn read_capped(pipe: Option<&mut impl Read>) -> String {
    let mut buffer = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.take(64 * 1024).read_to_end(&mut buffer);
    }
    String::from_utf8_lossy(&buffer).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> SandboxLimits {
        SandboxLimits { timeout: Duration::from_secs(5), cpu_seconds: 2, memory_mib: 256, ..SandboxLimits::default() }
    }

    #[test]
    fn passing_and_failing_programs() {
        let ok = run_python("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n", &quick()).expect("sandbox");
        assert_eq!(ok.status, SandboxStatus::Passed);
        assert_eq!(ok.stdout.trim(), "ok");
        let bad = run_python("assert 1 == 2\n", &quick()).expect("sandbox");
        assert_eq!(bad.status, SandboxStatus::Failed(1));
        assert!(bad.stderr.contains("AssertionError"));
    }

    #[test]
    fn infinite_loops_and_unbounded_allocation_are_stopped() {
        let looping = run_python("while True:\n    pass\n", &quick()).expect("sandbox");
        assert!(matches!(looping.status, SandboxStatus::Killed(_) | SandboxStatus::TimedOut), "{looping:?}");
        // Stopped by its CPU limit or the 5 s wall clock, not left running (the margin is for
        // spawning and reaping on a loaded machine).
        assert!(looping.elapsed < Duration::from_secs(10), "{looping:?}");
        let hungry = run_python("x = []\nwhile True:\n    x.append(' ' * 10_000_000)\n", &quick()).expect("sandbox");
        assert!(!matches!(hungry.status, SandboxStatus::Passed), "{hungry:?}");
        assert!(hungry.stderr.contains("MemoryError") || matches!(hungry.status, SandboxStatus::Killed(_)), "{hungry:?}");
    }

    #[test]
    fn network_is_unreachable_when_isolation_is_available() {
        let probe = "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('93.184.216.34', 80))\nprint('connected')\n";
        let outcome = run_python(probe, &quick()).expect("sandbox");
        if outcome.network_isolated {
            assert!(!matches!(outcome.status, SandboxStatus::Passed), "{outcome:?}");
            assert!(!outcome.stdout.contains("connected"));
        } else {
            eprintln!("note: no network namespaces here; the sandbox ran without network isolation");
        }
    }
}
