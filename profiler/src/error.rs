//! The profiler's error type.

/// What can go wrong while profiling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfilerError {
    /// A candle operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A model file is missing, unreadable or unsupported.
    #[error("model: {0}")]
    Model(String),
    /// A measurement could not be taken.
    #[error("measurement failed: {0}")]
    Measure(String),
    /// The run was cancelled by its observer.
    #[error("the run was cancelled")]
    Cancelled,
}

/// Result alias of the profiler.
pub type Result<T, E = ProfilerError> = std::result::Result<T, E>;
