//! The allocator setting for CPU training (glibc), for programs to call once at the start.

/// Keeps the memory a training step frees for the next step instead of handing it back to the
/// system, on Linux with glibc; call it once at the start of a program that trains on a CPU
/// backend. Returns whether the setting took effect (`false` elsewhere, where it does nothing).
///
/// A SAM step allocates two model-sized tensors a base step does not (the ascent and the PSF).
/// With glibc's default thresholds, memory freed at the end of a step is returned to the system
/// and faulted in again at the next step; on this project's benchmark that made a SAM step cost
/// 1.20–1.34 times two base steps instead of 0.97–1.06 (`docs/benchmarks.md`). This sets glibc's
/// `M_MMAP_THRESHOLD` to 32 MiB (its largest value: blocks up to that size come from the heap,
/// larger ones are mapped as before) and `M_TRIM_THRESHOLD` to 2 GiB (free memory at the top of
/// the heap is kept), process-wide. It is the same as starting the program with
/// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647`.
/// The process keeps its peak heap size for its lifetime.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: `mallopt` only sets glibc's allocation thresholds; it may be called at any time
        // from any thread and reports failure through its return value (1 on success).
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeping_freed_memory_takes_effect_on_glibc() {
        assert_eq!(super::keep_freed_memory(), cfg!(all(target_os = "linux", target_env = "gnu")));
    }
}
