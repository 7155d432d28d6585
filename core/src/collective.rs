//! Collectives across hicra processes: PyTorch's c10d, the engine inside `libtorch_cpu.so`.
//!
//! Data-parallel replicas take each optimizer step together: they sum their LoRA gradients
//! (a few MB) with one all-reduce, so every replica applies the same update and the adapters
//! stay identical without copying weights. The rendezvous is c10d's `TCPStore` and the
//! collectives are its `ProcessGroupGloo`, reached through a small C++ shim
//! (`core/cpp/c10d_shim.cpp`); tch does not bind them.
//!
//! Processes find each other by torchrun's environment variables ([`WorldConfig::from_env`]),
//! so torchrun, Slurm's `srun` and Kubernetes' PyTorchJob launch hicra unchanged.
//!
//! A lost peer surfaces as an error of the collective that needed it, at the latest after the
//! group's time-out; the group is then unusable ([`ProcessGroup::is_broken`]).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tch::Tensor;

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The torchrun-style variables are missing or malformed.
    #[error("distributed environment: {0}")]
    Environment(String),
    /// Joining the group failed (the store or a peer unreachable within the time-out).
    #[error("joining the process group (rank {rank} of {world_size} at {master}): {reason}")]
    Join {
        /// This process's rank.
        rank: usize,
        /// Processes in the group.
        world_size: usize,
        /// `MASTER_ADDR:MASTER_PORT`.
        master: String,
        /// What c10d reported.
        reason: String,
    },
    /// A collective failed: typically a peer exited or stopped answering.
    #[error("{operation} across {world_size} processes failed (a peer lost?): {reason}")]
    Failed {
        /// Which collective.
        operation: &'static str,
        /// Processes in the group.
        world_size: usize,
        /// What c10d reported.
        reason: String,
    },
    /// An earlier collective failed; the group cannot be used again.
    #[error("the process group is broken by an earlier failure")]
    Broken,
}

/// Where this process stands in a group of replicas: torchrun's variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldConfig {
    /// `RANK`: 0 for the replica that serves the store and writes checkpoints.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world_size: usize,
    /// `LOCAL_RANK`: the rank on this machine (which GPU); defaults to `RANK`.
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: replicas on this machine (they share its cores); default 1.
    pub local_world_size: usize,
    /// `MASTER_ADDR`: rank 0's host.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
    /// torchrun's agent already serves the rendezvous store at the master address
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): rank 0 then connects to it like the others.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: keys of a restarted attempt stay apart from earlier ones.
    pub restart: u64,
}

impl WorldConfig {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
    /// `MASTER_PORT` (and torchrun's `TORCHELASTIC_*`) from the environment. `None` when
    /// `WORLD_SIZE` is unset or 1: a single process.
    pub fn from_env() -> Result<Option<Self>, CollectiveError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any variable lookup.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, CollectiveError> {
        let Some(world_size) = var("WORLD_SIZE") else { return Ok(None) };
        let number = |name: &str, text: &str| text.trim().parse::<usize>().map_err(|_| CollectiveError::Environment(format!("{name}={text:?} is not a non-negative integer")));
        let world_size = number("WORLD_SIZE", &world_size)?;
        if world_size == 1 {
            return Ok(None);
        }
        let rank_text = var("RANK").ok_or_else(|| CollectiveError::Environment("WORLD_SIZE is set but RANK is not".into()))?;
        let rank = number("RANK", &rank_text)?;
        if world_size == 0 || rank >= world_size {
            return Err(CollectiveError::Environment(format!("RANK={rank} must be below WORLD_SIZE={world_size} (and WORLD_SIZE at least 1)")));
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(text) => number("LOCAL_RANK", &text)?,
            None => rank,
        };
        let local_world_size = match var("LOCAL_WORLD_SIZE") {
            Some(text) => number("LOCAL_WORLD_SIZE", &text)?.max(1),
            None => 1,
        };
        let master_addr = match var("MASTER_ADDR") {
            Some(addr) => addr,
            // All on this machine: loopback is right. Across machines, nobody can guess it.
            None if local_world_size >= world_size => "127.0.0.1".into(),
            None => return Err(CollectiveError::Environment(format!("MASTER_ADDR must name rank 0's host: WORLD_SIZE={world_size} replicas, only LOCAL_WORLD_SIZE={local_world_size} on this machine"))),
        };
        let port_text = var("MASTER_PORT").unwrap_or_else(|| "29500".into());
        let master_port = port_text.trim().parse::<u16>().map_err(|_| CollectiveError::Environment(format!("MASTER_PORT={port_text:?} is not a port")))?;
        if master_port == 0 {
            // torchrun --master-port 0 picks a port for its agent but tells the workers 0.
            return Err(CollectiveError::Environment("MASTER_PORT=0 names no port: give rank 0's store a port (e.g. torchrun --master-port 29500)".into()));
        }
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let restart = match var("TORCHELASTIC_RESTART_COUNT") {
            Some(text) => number("TORCHELASTIC_RESTART_COUNT", &text)? as u64,
            None => 0,
        };
        Ok(Some(Self { rank, world_size, local_rank, local_world_size, master_addr, master_port, agent_store, restart }))
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

mod ffi {
    use super::*;

    extern "C" {
        pub(super) fn hicra_gloo_new(master_addr: *const c_char, master_port: u16, rank: c_int, world_size: c_int, serve_store: c_int, prefix: *const c_char, timeout_ms: i64, err: *mut c_char, err_len: usize) -> *mut c_void;
        pub(super) fn hicra_gloo_all_reduce_sum(group: *mut c_void, tensor: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
        pub(super) fn hicra_gloo_broadcast(group: *mut c_void, tensor: *mut c_void, root: c_int, err: *mut c_char, err_len: usize) -> c_int;
        pub(super) fn hicra_store_set(group: *mut c_void, key: *const c_char, value: *const u8, len: usize, err: *mut c_char, err_len: usize) -> c_int;
        pub(super) fn hicra_store_get(group: *mut c_void, key: *const c_char, value: *mut *mut u8, len: *mut usize, err: *mut c_char, err_len: usize) -> c_int;
        pub(super) fn hicra_buffer_free(buffer: *mut u8);
        pub(super) fn hicra_gloo_free(group: *mut c_void);
    }
}

fn store_key(key: &str) -> Result<CString, CollectiveError> {
    CString::new(key).map_err(|_| CollectiveError::Environment(format!("store key {key:?} contains a NUL byte")))
}

/// Room for c10d's error text.
const ERROR_CAPACITY: usize = 2048;

/// Calls `f` with an error buffer; returns the text written into it.
fn with_error_buffer<T>(f: impl FnOnce(*mut c_char, usize) -> T) -> (T, String) {
    let mut buffer = vec![0 as c_char; ERROR_CAPACITY];
    let out = f(buffer.as_mut_ptr(), buffer.len());
    // SAFETY: the buffer is zeroed and the shim writes at most `len - 1` bytes and a NUL.
    let text = unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned();
    (out, text)
}

/// A joined group of processes over Gloo.
pub struct ProcessGroup {
    raw: NonNull<c_void>,
    rank: usize,
    world_size: usize,
    broken: AtomicBool,
}

// SAFETY: c10d's backends queue work from any thread and serialise it on their own workers;
// the handle is only freed by `Drop`.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above; every method takes the tensor it works on by `&mut`.
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup").field("rank", &self.rank).field("world_size", &self.world_size).finish()
    }
}

impl ProcessGroup {
    /// Joins the group `config` describes: rank 0 serves the rendezvous store, the others
    /// connect to it. Fails when a peer has not arrived within `timeout`, which also bounds
    /// every later collective.
    pub fn join(config: &WorldConfig, timeout: Duration) -> Result<Self, CollectiveError> {
        let join_error = |reason: String| CollectiveError::Join { rank: config.rank, world_size: config.world_size, master: config.master(), reason };
        if timeout.is_zero() {
            return Err(join_error("the time-out must be positive".into()));
        }
        let addr = CString::new(config.master_addr.as_str()).map_err(|_| join_error("MASTER_ADDR contains a NUL byte".into()))?;
        let prefix = store_key(&format!("hicra/{}/", config.restart))?;
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let serve_store = c_int::from(!config.agent_store);
        let (raw, reason) = with_error_buffer(|err, len| {
            // SAFETY: `addr`, `prefix` and the error buffer outlive the call; the shim copies
            // what it keeps.
            unsafe { ffi::hicra_gloo_new(addr.as_ptr(), config.master_port, config.rank as c_int, config.world_size as c_int, serve_store, prefix.as_ptr(), timeout_ms, err, len) }
        });
        let raw = NonNull::new(raw).ok_or_else(|| join_error(reason))?;
        Ok(Self { raw, rank: config.rank, world_size: config.world_size, broken: AtomicBool::new(false) })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Processes in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Whether a collective has failed (the group cannot be used again).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks the group unusable: this process can no longer keep its collectives in step
    /// with the others' (its engine failed), so it issues none again and the peers time out.
    pub fn abandon(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// Sums `tensor` (contiguous, on the CPU for Gloo) over every process, in place.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        self.call("all-reduce", |raw, err, len| {
            // SAFETY: `raw` is a live group; tch's tensor pointer is an `at::Tensor*`.
            unsafe { ffi::hicra_gloo_all_reduce_sum(raw, tensor.as_mut_ptr().cast(), err, len) }
        })
    }

    /// Copies rank `root`'s `tensor` into every process's, in place.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.call("broadcast", |raw, err, len| {
            // SAFETY: as in `all_reduce_sum`.
            unsafe { ffi::hicra_gloo_broadcast(raw, tensor.as_mut_ptr().cast(), root as c_int, err, len) }
        })
    }

    /// Sums a few host numbers (counts, statistics) over every process.
    pub fn sum_values<T: tch::kind::Element + Copy>(&self, values: &[T]) -> Result<Vec<T>, CollectiveError> {
        let mut tensor = Tensor::from_slice(values);
        self.all_reduce_sum(&mut tensor)?;
        self.host_values("all-reduce", &tensor)
    }

    /// Rank `root`'s values of a few host numbers, on every process.
    pub fn broadcast_values<T: tch::kind::Element + Copy>(&self, values: &[T], root: usize) -> Result<Vec<T>, CollectiveError> {
        let mut tensor = Tensor::from_slice(values);
        self.broadcast(&mut tensor, root)?;
        self.host_values("broadcast", &tensor)
    }

    fn host_values<T: tch::kind::Element + Copy>(&self, operation: &'static str, tensor: &Tensor) -> Result<Vec<T>, CollectiveError> {
        Vec::<T>::try_from(tensor).map_err(|e| CollectiveError::Failed { operation, world_size: self.world_size, reason: format!("reading the result back: {e}") })
    }

    /// Sets `key` to `value` in the group's rendezvous store (not a collective: any process,
    /// any time).
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<(), CollectiveError> {
        let key = store_key(key)?;
        let (status, reason) = with_error_buffer(|err, len| {
            // SAFETY: `raw` is a live group; `key` and `value` outlive the call, which copies them.
            unsafe { ffi::hicra_store_set(self.raw.as_ptr(), key.as_ptr(), value.as_ptr(), value.len(), err, len) }
        });
        match status {
            0 => Ok(()),
            _ => Err(CollectiveError::Failed { operation: "store set", world_size: self.world_size, reason }),
        }
    }

    /// Reads `key` from the rendezvous store, waiting for another process to set it (up to
    /// the group's time-out).
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>, CollectiveError> {
        let key = store_key(key)?;
        let (mut buffer, mut size) = (std::ptr::null_mut::<u8>(), 0usize);
        let (status, reason) = with_error_buffer(|err, len| {
            // SAFETY: `raw` is a live group; the out-pointers are valid for the call.
            unsafe { ffi::hicra_store_get(self.raw.as_ptr(), key.as_ptr(), &mut buffer, &mut size, err, len) }
        });
        if status != 0 || buffer.is_null() {
            return Err(CollectiveError::Failed { operation: "store get", world_size: self.world_size, reason });
        }
        // SAFETY: on success the shim returned a malloc'd buffer of `size` bytes, released once here.
        let bytes = unsafe { std::slice::from_raw_parts(buffer, size).to_vec() };
        // SAFETY: as above.
        unsafe { ffi::hicra_buffer_free(buffer) };
        Ok(bytes)
    }

    fn call(&self, operation: &'static str, f: impl FnOnce(*mut c_void, *mut c_char, usize) -> c_int) -> Result<(), CollectiveError> {
        if self.is_broken() {
            return Err(CollectiveError::Broken);
        }
        let (status, reason) = with_error_buffer(|err, len| f(self.raw.as_ptr(), err, len));
        if status == 0 {
            return Ok(());
        }
        self.broken.store(true, Ordering::Release);
        Err(CollectiveError::Failed { operation, world_size: self.world_size, reason })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `hicra_gloo_new` and is freed once.
        unsafe { ffi::hicra_gloo_free(self.raw.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn reads_torchrun_variables_and_names_what_is_wrong() -> Result<(), CollectiveError> {
        assert_eq!(WorldConfig::from_lookup(lookup(&[]))?, None);
        let config = WorldConfig::from_lookup(lookup(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29600")]))?;
        assert_eq!(config, Some(WorldConfig { rank: 1, world_size: 2, local_rank: 1, local_world_size: 1, master_addr: "10.0.0.1".into(), master_port: 29600, agent_store: false, restart: 0 }));
        assert_eq!(WorldConfig::from_lookup(lookup(&[("WORLD_SIZE", "1"), ("RANK", "0")]))?, None, "a world of one is a single process");
        let torchrun = WorldConfig::from_lookup(lookup(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_WORLD_SIZE", "2"), ("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "3")]))?;
        assert_eq!(torchrun.map(|c| (c.master_addr, c.agent_store, c.restart)), Some(("127.0.0.1".to_string(), true, 3)));
        for (vars, needle) in [
            (&[("WORLD_SIZE", "2")][..], "RANK is not"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "below WORLD_SIZE"),
            (&[("WORLD_SIZE", "two"), ("RANK", "0")][..], "WORLD_SIZE=\"two\""),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")][..], "MASTER_PORT"),
            (&[("WORLD_SIZE", "4"), ("RANK", "0"), ("LOCAL_WORLD_SIZE", "2")][..], "MASTER_ADDR must name"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "0")][..], "MASTER_PORT=0"),
        ] {
            match WorldConfig::from_lookup(lookup(vars)) {
                Err(err) => assert!(err.to_string().contains(needle), "{err} should mention {needle}"),
                Ok(config) => panic!("{vars:?} accepted as {config:?}"),
            }
        }
        Ok(())
    }

    /// Two ranks in threads of this process over loopback: the sum and the broadcast arrive.
    #[test]
    fn two_ranks_sum_and_broadcast_over_loopback() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || -> Result<(Vec<f32>, Vec<f32>), CollectiveError> {
                    let config = WorldConfig { rank, world_size: 2, local_rank: rank, local_world_size: 2, master_addr: "127.0.0.1".into(), master_port: port, agent_store: false, restart: 0 };
                    let group = ProcessGroup::join(&config, Duration::from_secs(30))?;
                    let mut summed = Tensor::from_slice(&[1.0f32 + rank as f32, 10.0 * (rank as f32 + 1.0), -0.5]);
                    group.all_reduce_sum(&mut summed)?;
                    let mut broadcast = Tensor::from_slice(&[rank as f32 + 7.0; 4]);
                    group.broadcast(&mut broadcast, 1)?;
                    group.store_set(&format!("greeting/{rank}"), format!("hello from {rank}").as_bytes())?;
                    let other = group.store_get(&format!("greeting/{}", 1 - rank))?;
                    assert_eq!(other, format!("hello from {}", 1 - rank).into_bytes());
                    Ok((Vec::<f32>::try_from(&summed).unwrap_or_default(), Vec::<f32>::try_from(&broadcast).unwrap_or_default()))
                })
            })
            .collect();
        for handle in ranks {
            let (summed, broadcast) = handle.join().expect("rank thread panicked").expect("collective failed");
            assert_eq!(summed, vec![3.0, 30.0, -1.0]);
            assert_eq!(broadcast, vec![8.0; 4]);
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(29511)
    }
}
