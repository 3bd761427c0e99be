//! Process-wide settings for training on the CPU: the allocator and candle's worker spinning.
//! The binaries call [`setup`] first thing in `main`.
//!
//! A training step allocates and frees the same large activation and gradient buffers every
//! step. glibc's defaults hand large blocks back to the kernel as soon as they are freed and
//! map fresh ones for the next request, so each step pays for millions of page faults and
//! for the kernel zeroing every page again: about a fifth of a SmolLM2-135M step on two
//! cores (measured with `perf stat`). [`keep_freed_memory`] makes freed blocks stay in the
//! process for reuse instead. The resident size then stays at the high-water mark, which is
//! what a training run reaches every step anyway.

/// Both settings below; call once at the start of `main`, before other threads start.
pub fn setup() {
    keep_freed_memory();
    limit_candle_spinning();
}

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

/// How long candle's CPU helper thread busy-waits for its next task, in pause instructions,
/// unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is already set.
pub const CANDLE_SPIN_LIMIT: u32 = 200;

/// Shortens the busy-wait of candle's CPU helper thread (its "barrier pool", which runs
/// candle's elementwise ops next to the main thread).
///
/// By default that thread spins for 25,000 pause instructions (about a millisecond) after
/// every candle op before it sleeps, and the matrix products that follow run on the rayon
/// threads: on a machine with as many cores as rayon threads, the spinning thread takes a
/// core away from them. With a short spin the SmolLM2-135M training step of `ganpo-bench` ran
/// 170 -> 185 tokens/s on two cores (median of repeated runs); no spin at all was slower
/// (157), each op then paying for a wake-up. Must run before the first candle op on the CPU.
pub fn limit_candle_spinning() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Called from `setup` at the start of `main`, before any other thread exists, so no
        // thread can be reading the environment concurrently.
        std::env::set_var(VAR, CANDLE_SPIN_LIMIT.to_string());
    }
}
