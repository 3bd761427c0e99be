//! Process-wide allocator settings for training on the CPU.
//!
//! A training step allocates and frees the same large activation and gradient buffers every
//! step. glibc's defaults hand large blocks back to the kernel as soon as they are freed and
//! map fresh ones for the next request, so each step pays for millions of page faults and
//! for the kernel zeroing every page again: about a fifth of a SmolLM2-135M step on two
//! cores (measured with `perf stat`). [`keep_freed_memory`] makes freed blocks stay in the
//! process for reuse instead. The resident size then stays at the high-water mark, which is
//! what a training run reaches every step anyway.

/// Keeps freed memory in the process for reuse (glibc on Linux; a no-op elsewhere, or when
/// the environment variable `GANPO_SYSTEM_MALLOC` is set). Call it once, at the start of
/// `main`, before other threads start; the binaries do.
pub fn keep_freed_memory() {
    if std::env::var_os("GANPO_SYSTEM_MALLOC").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning parameters; called before other
    // threads allocate, as glibc asks.
    unsafe {
        // Serve every size from the heap (not per-block mappings), keep its top when freed,
        // grow it in large steps, and use one arena so threads share the freed blocks.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
