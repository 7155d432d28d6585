//! Choosing where tensors live: CPU or a CUDA device.
//!
//! The linker drops `libtorch_cuda.so` from the binary because no symbol of ours refers to it,
//! and without it libtorch reports no CUDA device. [`init_cuda`] dlopens it at start-up so the
//! same binary runs on CPU-only machines and on GPU machines that have libtorch 2.11: the library
//! is found through the binary's RUNPATH (set by `build.rs`) or `LD_LIBRARY_PATH`.

use std::ffi::CString;
use std::str::FromStr;
use std::sync::OnceLock;

/// The `--device` choice: `auto` picks CUDA when one is available, else CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 if libtorch sees one, else CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

/// A `--device` value that is not `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The text did not parse.
    #[error("invalid device '{0}': expected auto, cpu, cuda or cuda:N")]
    Invalid(String),
    /// CUDA was asked for but libtorch sees no such device.
    #[error("CUDA device {ordinal} requested but {available} CUDA device(s) available ({detail})")]
    CudaUnavailable {
        /// The requested ordinal.
        ordinal: usize,
        /// How many devices libtorch reports.
        available: usize,
        /// Why CUDA is missing, as far as we know.
        detail: String,
    },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Invalid(text.to_string())),
        }
    }
}

static CUDA_LOAD: OnceLock<Result<(), String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` once per process; returns why it failed, if it did.
///
/// Safe to call many times. On a machine without CUDA this fails quietly and libtorch keeps
/// working on the CPU.
pub fn init_cuda() -> Result<(), String> {
    CUDA_LOAD
        .get_or_init(|| {
            let mut errors = Vec::new();
            for name in ["libtorch_cuda.so", "libtorch_cuda.so.1"] {
                match dlopen_global(name) {
                    Ok(()) => return Ok(()),
                    Err(err) => errors.push(err),
                }
            }
            Err(errors.join("; "))
        })
        .clone()
}

fn dlopen_global(name: &str) -> Result<(), String> {
    let c_name = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is deliberately kept open
    // for the life of the process (libtorch registers its CUDA backend from static
    // initialisers and must never be unloaded).
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let msg = unsafe {
            let err = libc::dlerror();
            if err.is_null() {
                "unknown dlopen error".to_string()
            } else {
                std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned()
            }
        };
        return Err(msg);
    }
    Ok(())
}

/// Resolves a [`DeviceChoice`] to a `tch::Device`, loading CUDA support first.
pub fn resolve(choice: DeviceChoice) -> Result<tch::Device, DeviceError> {
    resolve_for_replica(choice, 0)
}

/// [`resolve`] for the replica with `LOCAL_RANK` `local_rank`: `auto` picks that CUDA device
/// (one GPU per replica, as torchrun lays them out).
pub fn resolve_for_replica(choice: DeviceChoice, local_rank: usize) -> Result<tch::Device, DeviceError> {
    let loaded = init_cuda();
    let available = if loaded.is_ok() { tch::Cuda::device_count() as usize } else { 0 };
    match choice {
        DeviceChoice::Cpu => Ok(tch::Device::Cpu),
        DeviceChoice::Auto if available > 0 => Ok(tch::Device::Cuda(local_rank % available)),
        DeviceChoice::Auto => Ok(tch::Device::Cpu),
        DeviceChoice::Cuda(ordinal) if ordinal < available => Ok(tch::Device::Cuda(ordinal)),
        DeviceChoice::Cuda(ordinal) => Err(DeviceError::CudaUnavailable {
            ordinal,
            available,
            detail: match loaded {
                Ok(()) => "libtorch_cuda.so loaded".to_string(),
                Err(e) => format!("libtorch_cuda.so not loaded: {e}"),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse::<DeviceChoice>().ok(), Some(DeviceChoice::Auto));
        assert_eq!("CPU".parse::<DeviceChoice>().ok(), Some(DeviceChoice::Cpu));
        assert_eq!("cuda".parse::<DeviceChoice>().ok(), Some(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceChoice>().ok(), Some(DeviceChoice::Cuda(3)));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn cpu_always_resolves() {
        assert_eq!(resolve(DeviceChoice::Cpu).ok(), Some(tch::Device::Cpu));
    }
}
