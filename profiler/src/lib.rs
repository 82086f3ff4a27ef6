//! The profiler of a metainf node owns everything that measures: the hardware probe (NVML
//! through `nvml-wrapper`, with a CPU fallback), the candle inference engine with its
//! acceleration methods (continuous batching, prefix caching, chunked prefill), the workload
//! generators, and the benchmark runner that turns each run into a
//! [`metainf_protocol::PerfRecord`].
//!
//! It owns no networking and no storage: records leave this crate as values, and the node
//! signs, stores and gossips them.

pub mod bench;
pub mod engine;
pub mod error;
mod gguf;
pub mod hardware;
pub mod model;
pub mod tokenizer;
pub mod workload;

pub use error::{ProfilerError, Result};
pub use hardware::{ProbeOptions, probe};
