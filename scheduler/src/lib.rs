//! The scheduler of a metainf node owns the decisions: features of workloads, methods and
//! hardware (text embeddings reduced with truncated SVD, plus exact numeric facts), the
//! meta-predictor and the paper's baselines, budget-constrained selection of a (host, method)
//! pair (Algorithm 2 extended to hosts), and the evaluation harness.
//!
//! It is pure logic: no network, no store. Its inputs are tensors of
//! [`metainf_protocol::PerfRecord`]s built in memory or loaded from files.

mod choice;
pub mod dataset;
pub mod embed;
pub mod error;
pub mod eval;
pub mod features;
pub mod gbdt;
pub mod import;
mod linear;
mod mlp;
pub mod predictor;
pub mod robust;
pub mod select;
pub mod selectors;
pub mod served;
pub mod split;

pub use dataset::{Cell, Metric, Tensor};
pub use embed::{Embedder, EmbeddingCache, PromptStyle};
pub use error::{Result, SchedulerError};
pub use eval::{Budget, EvalConfig, EvalReport, evaluate};
pub use features::{Encoding, FeatureConfig, FeatureSpace};
pub use predictor::{GbdtParams, MetaPredictor, Prediction};
pub use select::{Choice, Decision, Host, Query, SelectError, select};
pub use selectors::SelectorKind;
pub use split::Split;
