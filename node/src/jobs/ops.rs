//! What the API asks of the service, as typed operations: nothing outside `jobs` reaches through
//! the service into its store, network, executor, learner or metrics.

use metainf_protocol::JobId;

use super::learn::{DecisionLog, GenerationError};
use super::state::{JobEntry, JobStore as _};
use super::{JobError, JobService};
use crate::net::{NetError, PeerStatus};

/// The engine queue's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Jobs waiting.
    pub waiting: u32,
    /// Jobs running.
    pub running: u32,
    /// Jobs that may wait.
    pub capacity: u32,
}

/// The predictor in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PredictorInfo {
    /// Its generation (0 = the prior, before any training).
    pub generation: u64,
    /// Records it was trained on.
    pub trained_on_records: u64,
}

impl JobService {
    /// Names of the models this node serves.
    pub fn served_models(&self) -> Vec<String> {
        self.0
            .executor
            .models()
            .iter()
            .map(|m| m.descriptor.name.clone())
            .collect()
    }

    /// This node's engine queue.
    pub fn load(&self) -> Load {
        let (waiting, running) = self.0.executor.load();
        Load {
            waiting,
            running,
            capacity: self.0.executor.capacity(),
        }
    }

    /// The predictor routing uses now.
    pub fn predictor(&self) -> PredictorInfo {
        self.0
            .learner
            .current()
            .map_or_else(PredictorInfo::default, |t| PredictorInfo {
                generation: t.generation,
                trained_on_records: t.records,
            })
    }

    /// The `limit` latest decisions, newest first.
    pub fn recent_decisions(&self, limit: usize) -> Vec<DecisionLog> {
        self.0.decisions.recent(limit)
    }

    /// The prediction error of each predictor generation, over the decisions kept.
    pub fn error_by_generation(&self) -> Vec<GenerationError> {
        self.0.decisions.by_generation()
    }

    /// Every peer this node has heard from (none without a network).
    /// What this node saw of the hosts it sent jobs to (see [`super::reputation`]), each with
    /// the factor routing scales its predictions by.
    pub fn reputations(
        &self,
    ) -> std::collections::HashMap<libp2p::PeerId, (super::reputation::HostRecord, f64)> {
        self.0.reputation.all()
    }

    /// Every peer the network knows, with liveness (none without a network).
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, NetError> {
        match &self.0.net {
            Some(net) => net.peers().await,
            None => Ok(Vec::new()),
        }
    }

    /// A job this node accepted, read off the runtime.
    pub async fn job(&self, id: JobId) -> Result<Option<JobEntry>, JobError> {
        let store = self.0.store.clone();
        tokio::task::spawn_blocking(move || store.job(&id))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?
            .map_err(|e| JobError::Internal(e.to_string()))
    }

    /// The `limit` most recently submitted jobs this node accepted, newest first.
    pub async fn recent_jobs(&self, limit: usize) -> Result<Vec<JobEntry>, JobError> {
        let store = self.0.store.clone();
        let mut jobs = tokio::task::spawn_blocking(move || store.jobs())
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?
            .map_err(|e| JobError::Internal(e.to_string()))?;
        jobs.sort_by_key(|j| std::cmp::Reverse(j.request.submitted_at_ms));
        jobs.truncate(limit);
        Ok(jobs)
    }

    /// Counts one answered HTTP request.
    pub fn count_http(&self, route: String, status: u16) {
        self.0
            .metrics
            .http_requests
            .get_or_create(&super::metrics::HttpLabel { route, status })
            .inc();
    }

    /// The metrics in the OpenMetrics text format, the gauges brought up to date first.
    pub async fn metrics_text(&self) -> String {
        let m = &self.0.metrics;
        let load = self.load();
        m.queue_depth.set(i64::from(load.waiting));
        m.running_jobs.set(i64::from(load.running));
        if let Some(l) = self.0.executor.host_load() {
            m.kv_blocks_used.set(i64::from(l.kv_blocks_used));
            m.kv_blocks_cached.set(i64::from(l.kv_blocks_cached));
            m.kv_blocks_total.set(i64::from(l.kv_blocks_total));
        }
        if self.0.net.is_some() {
            let alive = self
                .peers()
                .await
                .map(|p| p.iter().filter(|p| p.alive).count())
                .unwrap_or(0);
            m.peers_alive.set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
        if let Some(net) = &self.0.net
            && let Ok(c) = net.counters().await
        {
            m.net_counters(&c);
        }
        m.encode()
    }
}
