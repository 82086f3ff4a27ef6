//! Errors of the store.

use std::path::PathBuf;

/// What can go wrong opening or using the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (usually a running node) holds the store open.
    #[error(
        "the store at {path} is in use by another process (is a metainf-node running on this data directory?)"
    )]
    Locked {
        /// Store directory.
        path: PathBuf,
    },
    /// The store was written by a build with another schema.
    #[error(
        "the store at {path} has schema version {found}, this build reads version {expected}; \
         export it with a matching metainf-node and import it here, or use a new data directory"
    )]
    SchemaMismatch {
        /// Store directory.
        path: PathBuf,
        /// Version on disk.
        found: u32,
        /// Version this build uses.
        expected: u32,
    },
    /// The directory holds a RocksDB database that is not a metainf store.
    #[error("{path} is not a metainf store: {reason}")]
    NotAStore {
        /// Store directory.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// No store exists where one was to be opened read-only.
    #[error("no store at {path} (run `metainf-node run` once, or pass the right --data-dir)")]
    Missing {
        /// Store directory.
        path: PathBuf,
    },
    /// The store was opened read-only.
    #[error("the store was opened read-only")]
    ReadOnly,
    /// The writer thread is gone (the store is shutting down).
    #[error("the store is shutting down")]
    Closed,
    /// A write failed (for example the disk is full); nothing of it was acknowledged.
    #[error("storage write failed, nothing was acknowledged: {0}")]
    WriteFailed(String),
    /// The writer thread could not be started.
    #[error("cannot start the store writer: {0}")]
    Thread(std::io::Error),
    /// An error from RocksDB (I/O, a full disk, corruption).
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
    /// A value could not be encoded.
    #[error("cannot encode value: {0}")]
    Encode(#[from] metainf_protocol::ProtocolError),
}

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
