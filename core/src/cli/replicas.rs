//! `--nproc N`: N data-parallel replicas of this command on this machine, started the way
//! torchrun starts them (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`).
//!
//! Each child runs this binary with the same arguments minus `--nproc`; its stderr lines come
//! out prefixed with `[rank r]`. The launcher waits for all of them. When one fails, it stops
//! the others at once (they would otherwise wait for their lost peer until the time-out) and
//! reports which failed.
//!
//! `LOCAL_WORLD_SIZE` tells each replica how many share the machine: they divide its cores
//! (see [`crate::model::share_cores_among`]).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// Starts `nproc` replicas of the running command (`subcommand` names it in messages).
pub(crate) fn launch(nproc: usize, subcommand: &[&str]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the hicra binary to start replicas")?;
    let args = without_nproc(std::env::args().skip(1));
    let port = free_port()?;
    eprintln!("starting {nproc} replicas of `hicra {}` (master 127.0.0.1:{port})", subcommand.join(" "));
    let mut children: Vec<(usize, Child, Option<std::thread::JoinHandle<()>>)> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let spawned = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                stop_all(&mut children);
                return Err(err).with_context(|| format!("starting replica {rank}"));
            }
        };
        let prefixer = child.stderr.take().map(|stderr| {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[rank {rank}] {line}");
                }
            })
        });
        children.push((rank, child, prefixer));
    }
    let failed = wait_all(&mut children);
    for (_, _, prefixer) in children {
        if let Some(prefixer) = prefixer {
            let _ = prefixer.join();
        }
    }
    anyhow::ensure!(failed.is_empty(), "replicas failed: {}", failed.join(", "));
    Ok(())
}

/// Waits until every child has exited; after the first failure, kills the rest. Returns the
/// failures, `rank r: status`.
fn wait_all(children: &mut [(usize, Child, Option<std::thread::JoinHandle<()>>)]) -> Vec<String> {
    let mut failed = Vec::new();
    let mut running: Vec<usize> = (0..children.len()).collect();
    while !running.is_empty() {
        running.retain(|&i| {
            let (rank, child, _) = &mut children[i];
            match child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    if !status.success() {
                        failed.push(format!("rank {rank}: {status}"));
                    }
                    false
                }
                Err(err) => {
                    failed.push(format!("rank {rank}: {err}"));
                    false
                }
            }
        });
        if !failed.is_empty() {
            stop_all(children);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    failed
}

/// Kills and reaps every child still running.
fn stop_all(children: &mut [(usize, Child, Option<std::thread::JoinHandle<()>>)]) {
    for (_, child, _) in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The arguments without `--nproc N` / `--nproc=N`.
fn without_nproc(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
        } else if arg == "--nproc" {
            skip_value = true;
        } else if !arg.starts_with("--nproc=") {
            kept.push(arg);
        }
    }
    kept
}

/// A port free on loopback now, for rank 0's store.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the replicas' store")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_only_the_nproc_flag() {
        let args = ["train", "--config", "run.toml", "--nproc", "2", "--steps", "3", "--nproc=4"].map(String::from);
        assert_eq!(without_nproc(args.into_iter()), ["train", "--config", "run.toml", "--steps", "3"]);
    }
}
