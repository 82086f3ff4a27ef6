//! What selection produces and how it fails: a scored (host, method) pair, and the error that
//! no pair fits. Kept out of [`crate::select`] so that [`crate::error`] can name the selection
//! error without the two modules importing each other; both are used through `crate::select`,
//! which re-exports them.

use metainf_protocol::MethodConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One scored (host, method) pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Index into the query's hosts.
    pub host: usize,
    /// The host's name.
    pub host_name: String,
    /// The method.
    pub method: MethodConfig,
    /// Predicted execution time, seconds.
    pub runtime_s: f64,
    /// Predicted wait in the host's queue, seconds.
    pub wait_s: f64,
    /// Predicted time to the first token from now, seconds: the wait and the prefill of what
    /// the host's cache does not hold.
    #[serde(default)]
    pub ttft_s: f64,
    /// Predicted cost: price × runtime.
    pub cost: f64,
    /// Predicted energy, joules, where the host's power is known.
    pub energy_j: Option<f64>,
    /// Uncertainty of the runtime (standard deviation of ln runtime over the ensemble).
    pub log_std: f64,
    /// Prompt tokens the host's prefix cache would serve.
    #[serde(default)]
    pub cached_tokens: u64,
}

impl Choice {
    /// Predicted time until the result: wait plus runtime.
    pub fn latency_s(&self) -> f64 {
        self.wait_s + self.runtime_s
    }
}

/// Why no pair could be chosen.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum SelectError {
    /// No host or no method to choose from.
    #[error("no candidate {0}")]
    NoCandidates(&'static str),
    /// Every pair costs more than the budget.
    #[error(
        "no host and method fit the budget of {budget}: the cheapest is {} on {} at a predicted cost of {:.6} ({:.2} s)",
        cheapest.method, cheapest.host_name, cheapest.cost, cheapest.runtime_s
    )]
    OverBudget {
        /// The budget.
        budget: f64,
        /// The cheapest pair.
        cheapest: Box<Choice>,
    },
}
