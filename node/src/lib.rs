//! The `metainf-node` daemon as a library: configuration, the node's identity, the RocksDB
//! store of the performance tensor, the tensor import/export tools and the running node.
//!
//! The binary (`src/main.rs`) only parses flags, starts logging and calls into this crate, so
//! every part can be driven by tests. Scheduling logic lives in `metainf-scheduler`, model math
//! in `metainf-profiler`, wire types in `metainf-protocol`.

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod error;
pub mod evaluation;
pub mod identity;
pub mod jobs;
pub mod loadgen;
pub mod logging;
pub mod net;
pub mod replica;
pub mod signer;
pub mod store;
pub mod tensor;

pub use config::Config;
pub use daemon::Node;
pub use error::{NodeError, Result};
pub use store::Store;
