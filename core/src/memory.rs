//! The process's resident memory, and handing freed memory back to the OS.
//!
//! A training step allocates GBs of activations for a few seconds. glibc's allocator keeps
//! what is freed in its heaps for reuse, so without help a serving process would stay at the
//! high-water mark of its largest step forever, and creep up as step shapes vary (each shape
//! fragments the heap differently). [`release_free_memory`] after each step returns the freed
//! pages, so between steps the process holds what serving needs.
//!
//! Within a step the opposite is wanted: glibc serves every block over 32 MiB with its own
//! `mmap` and unmaps it on free, so each large activation is page-faulted and zeroed by the
//! kernel anew, 10-18% of a CPU training step. [`reuse_freed_memory`] (called once at start-up)
//! keeps large blocks in the heap for reuse, and the trim after the step gives them back.

/// Resident memory now, in bytes (Linux; `None` elsewhere).
pub fn resident_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// Highest resident memory since the process started, in bytes (Linux; `None` elsewhere).
/// The kernel updates it lazily, so it may lag a peak that just happened.
pub fn peak_resident_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// A `/proc/self/status` field in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| line.strip_prefix(field)).and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Serves large blocks from the heap (no `mmap` per block) and never trims the heap on `free`,
/// so memory freed within a training step is reused without page faults; the step's
/// [`release_free_memory`] returns it afterwards. Call once, before other threads start.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called at start-up, before any other
    // thread allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Returns memory the allocator holds but nothing uses to the OS (glibc's `malloc_trim`);
/// a no-op on other platforms. Takes milliseconds; call it after large, short-lived work.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and shrinks the allocator's own free lists; it is
    // thread-safe (it takes each arena's lock) and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process that does the measuring.
    const CHILD: &str = "HICRA_MEMORY_TEST_CHILD";

    /// Resident memory is the whole process's, and the other tests of this binary allocate
    /// and free GBs at the same time, so the measurement runs alone: this test re-runs the
    /// test binary for itself only, in a child process, and checks that it passed.
    #[test]
    fn trimming_returns_freed_memory_to_the_os() {
        if std::env::var_os(CHILD).is_some() {
            measure_trim();
            return;
        }
        let test_binary = std::env::current_exe().expect("the test binary's path");
        let output = std::process::Command::new(test_binary)
            .args(["--exact", "memory::tests::trimming_returns_freed_memory_to_the_os", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            // One arena, the heap that the trim threshold governs: a thread's own arena
            // unmaps a sub-heap that empties whether or not anyone trims.
            .env("MALLOC_ARENA_MAX", "1")
            .output()
            .expect("re-running the test binary");
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "the measuring child failed:\n{printed}");
        assert!(printed.contains("1 passed"), "the child ran no test:\n{printed}");
    }

    fn measure_trim() {
        // As the server runs: freeing alone keeps the memory (the test can see a trim that
        // does nothing); only the trim returns it.
        reuse_freed_memory();
        let Some(before) = resident_bytes() else { return };
        // Many allocations small enough for the heap (not mmap), touched so they are resident.
        const MIB: u64 = 1024 * 1024;
        let blocks: Vec<Vec<u8>> = (0..8192).map(|i| vec![(i % 251) as u8 + 1; 64 * 1024]).collect();
        let held = resident_bytes().unwrap_or(0);
        assert!(held > before + 400 * MIB, "512 MiB of blocks should be resident: {before} -> {held}");
        drop(blocks);
        release_free_memory();
        let after = resident_bytes().unwrap_or(u64::MAX);
        assert!(after < held - 384 * MIB, "freed blocks stayed resident: {held} -> {after}");
    }
}
