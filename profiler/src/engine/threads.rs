//! How many threads the engine runs.

/// Most engine threads per logical CPU honoured by [`engine_threads`].
pub const MAX_THREADS_PER_CPU: usize = 4;

/// The engine threads for a `--threads` request: every logical CPU by default. More threads
/// than CPUs are honoured (up to [`MAX_THREADS_PER_CPU`] per CPU): oversubscription is a
/// genuinely different, slower setting, and the profile must say what the engine really runs.
pub fn engine_threads(requested: Option<usize>) -> usize {
    let logical = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads = requested
        .unwrap_or(logical)
        .clamp(1, MAX_THREADS_PER_CPU * logical);
    if threads > logical {
        tracing::warn!(
            threads,
            logical,
            "more engine threads than logical CPUs (oversubscribed)"
        );
    }
    threads
}
