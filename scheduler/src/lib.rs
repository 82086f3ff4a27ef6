//! The scheduler of a metainf node owns the decisions: features of workloads, methods and
//! hardware (text embeddings reduced with truncated SVD, plus exact numeric facts), the
//! meta-predictor and the paper's baselines, budget-constrained selection of a (host, method)
//! pair (Algorithm 2 extended to hosts), and the evaluation harness.
//!
//! It is pure logic: no network, no store. Its inputs are tensors of
//! [`metainf_protocol::PerfRecord`]s built in memory or loaded from files.
