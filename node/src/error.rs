//! The node library's error type.

use std::path::PathBuf;

use crate::store::StoreError;

/// What can go wrong in the node outside the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The identity key file is readable by others.
    #[error(
        "identity key {path} has permissions {mode:o}, readable by other users; \
         run `chmod 600 {path}` (the key is the node's identity on the network)"
    )]
    KeyPermissions {
        /// Key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The identity key file does not hold a key.
    #[error("identity key {path} is not a valid key: {reason}")]
    BadKey {
        /// Key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("configuration {path}: {reason}")]
    Config {
        /// Config file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The hardware could not be probed.
    #[error("hardware probe: {0}")]
    Hardware(String),
    /// The network could not start.
    #[error("network: {0}")]
    Network(String),
    /// No data directory was given and none could be derived.
    #[error("no data directory: pass --data-dir or set METAINF_DATA_DIR (no home directory found)")]
    NoDataDir,
    /// A model is missing or cannot be loaded.
    #[error("model: {0}")]
    Model(String),
    /// The HTTP API could not start.
    #[error("HTTP API: {0}")]
    Api(String),
    /// The engine or a benchmark failed.
    #[error("engine: {0}")]
    Engine(String),
    /// The scheduler (features, predictor, evaluation, import) failed.
    #[error(transparent)]
    Scheduler(#[from] metainf_scheduler::SchedulerError),
}

impl NodeError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NodeError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the node library.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;
