//! The `[jobs]` section of the configuration, and why a job can fail.

use metainf_scheduler::select::Choice;
use serde::{Deserialize, Serialize};

/// Job settings (the `[jobs]` section of the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Sequences (prompts) that may wait for a place in this host's engine; more are refused
    /// as busy (HTTP 429 with `Retry-After`), never queued without bound.
    pub queue_capacity: u32,
    /// Retrain the predictor when this many records arrived since the last training.
    pub retrain_after: u64,
    /// Seconds between checks for new records.
    pub retrain_check_s: u64,
    /// Most seconds one attempt of a job may take on a host before it is tried elsewhere.
    pub job_timeout_s: u64,
    /// Most hosts one job is tried on.
    pub max_attempts: u32,
    /// Optimism for little-known (host, method) pairs, so that routing keeps learning
    /// (0 = always the predicted best).
    pub explore: f64,
    /// Recent decisions kept for `GET /v1/decisions`.
    pub decisions_kept: usize,
    /// Methods the router chooses among (`none`, `cb`, `cb+pc`, ...); empty = the eight
    /// standard methods.
    pub methods: Vec<String>,
    /// Finished jobs kept for `GET /v1/jobs` (the oldest are forgotten first, at start and
    /// hourly); pending jobs are always kept.
    pub keep_jobs: usize,
    /// Whose jobs this host runs: `"any"` peer, or only those in `peer_allowlist`.
    pub accept_jobs_from: super::admission::AcceptFrom,
    /// Peer ids whose jobs this host runs when `accept_jobs_from = "allowlist"`.
    pub peer_allowlist: Vec<String>,
    /// Most sequences (prompts) of peers' jobs this host holds at once, shared fairly among
    /// the peers; unset = half of `queue_capacity`, so the rest is always left to this node's
    /// own API clients.
    pub peer_sequences: Option<u32>,
    /// How jobs choose their host when the request does not say: `metainf` (the predictor,
    /// with every host's cache, load and speed), `round-robin`, `random`, `least-loaded` or
    /// `prefix-affinity`.
    pub routing: super::policy::RoutingPolicy,
    /// Milliseconds after which a host's announced state counts as stale: a decision asks its
    /// best few candidates with stale state for their state now (`/metainf/state/1`).
    pub state_stale_ms: u64,
}

impl JobsConfig {
    /// The admission of peers' jobs these settings describe.
    pub(crate) fn admission(&self) -> Result<super::admission::Admission, String> {
        let allowlist = self
            .peer_allowlist
            .iter()
            .map(|p| {
                p.parse::<libp2p::PeerId>()
                    .map_err(|e| format!("[jobs] peer_allowlist: {p:?} is not a peer id: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let capacity = self
            .peer_sequences
            .unwrap_or(self.queue_capacity / 2)
            .clamp(1, self.queue_capacity.max(1));
        Ok(super::admission::Admission::new(
            self.accept_jobs_from,
            allowlist,
            capacity,
        ))
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            retrain_after: 8,
            retrain_check_s: 5,
            job_timeout_s: 600,
            max_attempts: 3,
            explore: 0.1,
            decisions_kept: 512,
            methods: Vec::new(),
            keep_jobs: 10_000,
            accept_jobs_from: super::admission::AcceptFrom::Any,
            peer_allowlist: Vec::new(),
            peer_sequences: None,
            routing: super::policy::RoutingPolicy::Metainf,
            state_stale_ms: 1000,
        }
    }
}

/// Why a job could not be run; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The request is malformed (400).
    #[error("{0}")]
    Invalid(String),
    /// No node serves the model (404).
    #[error("model {model:?} is not served by any live node; served: {served:?}")]
    UnknownModel {
        /// The model asked for.
        model: String,
        /// Models that are served.
        served: Vec<String>,
    },
    /// Every host and method costs more than the budget (402).
    #[error("{message}")]
    OverBudget {
        /// The scheduler's explanation, naming the cheapest option.
        message: String,
        /// The cheapest pair.
        cheapest: Box<Choice>,
    },
    /// Every host that could run it is busy (429).
    #[error("every host that serves the model is busy; retry in {retry_after_s} s")]
    Overloaded {
        /// Suggested wait.
        retry_after_s: u32,
    },
    /// No live host serves the model (503).
    #[error("{0}")]
    NoHost(String),
    /// The job cannot run on the model (too long for its context, ...) (422).
    #[error("{0}")]
    Rejected(String),
    /// Every host tried failed (502).
    #[error("{0}")]
    Failed(String),
    /// The job could not be persisted (a full or failing disk) and was not started (503).
    #[error("cannot keep the job's state, so it was not started: {0}")]
    Unpersisted(String),
    /// The client went away.
    #[error("cancelled")]
    Cancelled,
    /// A local fault (500).
    #[error("{0}")]
    Internal(String),
}
