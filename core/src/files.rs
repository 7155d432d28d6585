//! Writing files so that readers never see a half-written one.

use std::path::{Path, PathBuf};

/// Writes `bytes` to `<path>.partial`, then renames it over `path`: after a crash `path` is
/// either its old content or the new one, never a prefix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}
