//! Jobs end to end: the node that receives a job describes its workload, gathers the hosts
//! that serve the model (itself and live peers, from their heartbeats), lets the scheduler
//! choose host and method within the budget, and runs the job there, locally or over
//! `/metainf/job/1`. A host that is busy, fails or dies mid-job is replaced by the best of the
//! hosts not yet tried. Every job is persisted from acceptance to its end, every finished job
//! becomes a signed performance record, and the predictor retrains in the background as
//! records arrive.

pub mod executor;
pub mod learn;
pub mod metrics;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use metainf_protocol::{
    Arrival, HardwareProfile, JobId, JobRequest, JobResult, MethodConfig, ModelDescriptor,
    PerfRecord, RecordSource, SignedRecord, WorkloadDescriptor,
};
use metainf_scheduler::select::{Choice, Decision, Host, Query, SelectError};
use metainf_scheduler::{GbdtParams, SchedulerError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bench::{ENGINE_NAME, now_ms};
use crate::net::{Client, DeltaAck, InboundJob, JobCall, JobDelta, JobReply};
use crate::store::{JobEntry, JobState, PutOutcome, Store};
pub use executor::{Delta, ExecError, Executor, ServedModel};
use learn::{Current, DecisionLog, DecisionLogBook, Learner};

/// Job settings (the `[jobs]` section of the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Jobs that may wait in this host's queue; more are refused as busy (HTTP 429).
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
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 16,
            retrain_after: 8,
            retrain_check_s: 5,
            job_timeout_s: 600,
            max_attempts: 3,
            explore: 0.1,
            decisions_kept: 512,
            methods: Vec::new(),
            keep_jobs: 10_000,
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
    /// The client went away.
    #[error("cancelled")]
    Cancelled,
    /// A local fault (500).
    #[error("{0}")]
    Internal(String),
}

/// A job routed and ready to run.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The job (id assigned).
    pub request: JobRequest,
    /// The scheduler's decision.
    pub decision: Decision,
    /// Peer of each host index of the decision.
    pub hosts: Vec<PeerId>,
    /// Predictor generation that decided (0 = the prior).
    pub generation: u64,
    /// Seconds spent routing.
    pub routing_s: f64,
}

/// A finished job.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What the host returned.
    pub result: JobResult,
    /// The choice that ran it.
    pub choice: Choice,
    /// Hosts tried before.
    pub retries: u32,
    /// Seconds from acceptance to the result.
    pub latency_s: f64,
}

/// A candidate host with the peer that runs it.
struct Candidate {
    peer: PeerId,
    host: Host,
}

struct Inner {
    peer_id: PeerId,
    key: Keypair,
    store: Store,
    net: Option<Client>,
    executor: Executor,
    profile: HardwareProfile,
    price_per_hour: f64,
    config: JobsConfig,
    /// The methods routed among.
    methods: Vec<MethodConfig>,
    learner: Learner,
    decisions: DecisionLogBook,
    seq: tokio::sync::Mutex<u64>,
    metrics: metrics::Metrics,
    started: Instant,
    /// Records in the store, as last counted.
    records: AtomicU64,
    /// Jobs this node sent to each host that have not ended yet: a host's heartbeat is up to
    /// an interval old, and a burst of jobs must not all see the same empty queue.
    pending: std::sync::Mutex<std::collections::HashMap<PeerId, u32>>,
}

/// The node's job service. Cheap to clone.
#[derive(Clone)]
pub struct JobService(Arc<Inner>);

impl JobService {
    /// Starts the service: serves job calls from peers, retrains in the background, and
    /// finishes or fails the jobs a previous run left pending.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        key: Keypair,
        store: Store,
        net: Option<Client>,
        executor: Executor,
        profile: HardwareProfile,
        price_per_hour: f64,
        config: JobsConfig,
        shutdown: CancellationToken,
    ) -> crate::Result<Self> {
        let peer_id = key.public().to_peer_id();
        let methods = if config.methods.is_empty() {
            MethodConfig::standard_methods()
        } else {
            config
                .methods
                .iter()
                .map(|m| m.parse::<MethodConfig>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| crate::NodeError::Engine(format!("[jobs] methods: {e}")))?
        };
        let seq = store.origin_state(&peer_id)?.max;
        let learner = Learner::open(&store);
        let records = count_records(&store);
        let inner = Inner {
            peer_id,
            key,
            store,
            net: net.clone(),
            executor,
            profile,
            price_per_hour,
            decisions: DecisionLogBook::new(config.decisions_kept),
            config,
            methods,
            learner,
            seq: tokio::sync::Mutex::new(seq),
            metrics: metrics::Metrics::new(),
            started: Instant::now(),
            records: AtomicU64::new(records),
            pending: std::sync::Mutex::new(std::collections::HashMap::new()),
        };
        let service = Self(Arc::new(inner));
        if let Some(net) = &net {
            let (tx, rx) = mpsc::channel(64);
            net.serve_jobs(tx)
                .await
                .map_err(|e| crate::NodeError::Network(e.to_string()))?;
            net.set_offer(service.0.executor.offer())
                .await
                .map_err(|e| crate::NodeError::Network(e.to_string()))?;
            tokio::spawn(service.clone().serve_peers(rx, shutdown.clone()));
        }
        tokio::spawn(service.clone().retrain_loop(shutdown.clone()));
        service.prune_jobs();
        service.recover().await;
        Ok(service)
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.0.peer_id
    }

    /// The executor (served models, load).
    pub fn executor(&self) -> &Executor {
        &self.0.executor
    }

    /// The network, when it runs.
    pub fn net(&self) -> Option<&Client> {
        self.0.net.as_ref()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.0.metrics
    }

    /// The learner (current predictor).
    pub fn learner(&self) -> &Learner {
        &self.0.learner
    }

    /// Recent decisions.
    pub fn decisions(&self) -> &DecisionLogBook {
        &self.0.decisions
    }

    /// Seconds since the service started.
    pub fn uptime_s(&self) -> f64 {
        self.0.started.elapsed().as_secs_f64()
    }

    /// Records in the store, as last counted.
    pub fn records(&self) -> u64 {
        self.0.records.load(Ordering::Relaxed)
    }

    /// This node's price per hour.
    pub fn price_per_hour(&self) -> f64 {
        self.0.price_per_hour
    }

    /// This node's hardware.
    pub fn profile(&self) -> &HardwareProfile {
        &self.0.profile
    }

    /// Every model served by this node or a live peer: (descriptor, hosts serving it).
    pub async fn models(&self) -> Vec<(ModelDescriptor, usize)> {
        let mut out: Vec<(ModelDescriptor, usize)> = Vec::new();
        let mut add = |m: &ModelDescriptor| match out.iter_mut().find(|(d, _)| d.name == m.name) {
            Some((_, n)) => *n += 1,
            None => out.push((m.clone(), 1)),
        };
        for m in self.0.executor.models() {
            add(&m.descriptor);
        }
        for p in self.live_peers().await {
            if let Some(h) = &p.heartbeat {
                for m in &h.models {
                    add(m);
                }
            }
        }
        out
    }

    async fn live_peers(&self) -> Vec<crate::net::PeerStatus> {
        match &self.0.net {
            Some(net) => net
                .peers()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.alive && p.connected && p.peer != self.0.peer_id)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Hosts that serve `model`, and its descriptor.
    async fn candidates(&self, model: &str) -> (Option<ModelDescriptor>, Vec<Candidate>) {
        let mut descriptor = None;
        let mut out = Vec::new();
        if let Some(m) = self.0.executor.model(model) {
            descriptor = Some(m.descriptor.clone());
            let (queued, running) = self.0.executor.load();
            let mine = self.pending_on(&self.0.peer_id);
            out.push(Candidate {
                peer: self.0.peer_id,
                host: Host {
                    name: self.0.peer_id.to_string(),
                    hardware: self.0.profile.clone(),
                    price_per_hour: self.0.price_per_hour,
                    queue_depth: queued.max(mine.saturating_sub(running)),
                    running_jobs: running,
                    power_w: None,
                },
            });
        }
        for p in self.live_peers().await {
            let Some(h) = p.heartbeat else { continue };
            let Some(m) = h.models.iter().find(|m| m.name == model) else {
                continue;
            };
            let Some(profile) = h.profile.clone() else {
                continue;
            };
            descriptor.get_or_insert_with(|| m.clone());
            out.push(Candidate {
                peer: p.peer,
                host: Host {
                    name: p.peer.to_string(),
                    hardware: profile,
                    price_per_hour: h.price_per_hour,
                    queue_depth: h
                        .queue_depth
                        .max(self.pending_on(&p.peer).saturating_sub(h.running_jobs)),
                    running_jobs: h.running_jobs,
                    power_w: None,
                },
            });
        }
        (descriptor, out)
    }

    /// Gives a new job its id and acceptance time.
    pub fn new_request(mut request: JobRequest) -> JobRequest {
        request.id = JobId(rand::random());
        request.submitted_at_ms = now_ms();
        request
    }

    /// Routes a job: validates it, describes its workload, and asks the scheduler.
    pub async fn route(&self, request: JobRequest) -> Result<Routed, JobError> {
        self.route_excluding(request, &HashSet::new()).await
    }

    async fn route_excluding(
        &self,
        request: JobRequest,
        exclude: &HashSet<PeerId>,
    ) -> Result<Routed, JobError> {
        let started = Instant::now();
        request
            .validate()
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        let (descriptor, mut candidates) = self.candidates(&request.model).await;
        let Some(model) = descriptor else {
            return Err(JobError::UnknownModel {
                model: request.model.clone(),
                served: self
                    .models()
                    .await
                    .into_iter()
                    .map(|(m, _)| m.name)
                    .collect(),
            });
        };
        candidates.retain(|c| !exclude.contains(&c.peer));
        if let Some(pin) = request.pin_host {
            candidates.retain(|c| c.peer == pin);
            if candidates.is_empty() {
                return Err(JobError::NoHost(format!(
                    "host {pin} is not alive or does not serve {:?}",
                    request.model
                )));
            }
        }
        if candidates.is_empty() {
            return Err(JobError::NoHost(format!(
                "no live host serves {:?} now",
                request.model
            )));
        }
        let workload = match self.0.executor.model(&request.model) {
            Some(m) => m
                .describe(&request)
                .map_err(|e| JobError::Invalid(e.to_string()))?,
            None => approximate_workload(&request),
        };
        let methods = match &request.pin_method {
            // Refused here rather than by a host, with the reason.
            Some(m) => {
                metainf_profiler::engine::MethodSettings::from_method(m)
                    .map_err(|e| JobError::Invalid(format!("method {m}: {e}")))?;
                vec![m.clone()]
            }
            None => self.0.methods.clone(),
        };
        let hosts: Vec<Host> = candidates.iter().map(|c| c.host.clone()).collect();
        let trained = self.0.learner.current();
        let generation = trained.as_ref().map_or(0, |t| t.generation);
        let query = Query {
            workload: &workload,
            model: &model,
            hosts: &hosts,
            methods: &methods,
            budget: request.budget,
            objective: request.objective,
            explore: self.0.config.explore,
        };
        let decision = match metainf_scheduler::select(&Current(trained), &query) {
            Ok(d) => d,
            // A predictor that cannot score this job (say, a model it never saw) falls back
            // to the prior rather than refusing the job.
            Err(SchedulerError::Select(e @ SelectError::OverBudget { .. })) => {
                return Err(over_budget(e));
            }
            Err(e) => {
                warn!(error = %e, "the predictor failed; routing with the prior");
                metainf_scheduler::select(&Current(None), &query).map_err(|e| match e {
                    SchedulerError::Select(e @ SelectError::OverBudget { .. }) => over_budget(e),
                    other => JobError::Internal(other.to_string()),
                })?
            }
        };
        let routing_s = started.elapsed().as_secs_f64();
        self.0.metrics.routing_seconds.observe(routing_s);
        Ok(Routed {
            request,
            hosts: candidates.iter().map(|c| c.peer).collect(),
            decision,
            generation,
            routing_s,
        })
    }

    /// Persists a job's state (a synced write, off the async runtime).
    async fn save(&self, entry: JobEntry) {
        let store = self.0.store.clone();
        let id = entry.request.id;
        let saved = tokio::task::spawn_blocking(move || store.put_job(&entry)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(job = %id, error = %e, "cannot persist the job's state"),
            Err(e) => warn!(job = %id, error = %e, "cannot persist the job's state"),
        }
    }

    fn pending_on(&self, peer: &PeerId) -> u32 {
        self.0
            .pending
            .lock()
            .map(|p| p.get(peer).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn count_pending(&self, peer: PeerId, up: bool) {
        if let Ok(mut p) = self.0.pending.lock() {
            let n = p.entry(peer).or_insert(0);
            *n = if up { *n + 1 } else { n.saturating_sub(1) };
            if *n == 0 {
                p.remove(&peer);
            }
        }
    }

    /// Forgets the oldest finished jobs beyond `keep_jobs`.
    fn prune_jobs(&self) {
        let Ok(jobs) = self.0.store.jobs() else {
            return;
        };
        let mut finished: Vec<(u64, JobId)> = jobs
            .iter()
            .filter(|j| matches!(j.state, JobState::Done(_) | JobState::Failed { .. }))
            .map(|j| (j.updated_at_ms, j.request.id))
            .collect();
        if finished.len() <= self.0.config.keep_jobs {
            return;
        }
        finished.sort_unstable();
        let drop: Vec<JobId> = finished[..finished.len() - self.0.config.keep_jobs]
            .iter()
            .map(|(_, id)| *id)
            .collect();
        match self.0.store.delete_jobs(&drop) {
            Ok(()) => info!(forgotten = drop.len(), "forgot the oldest finished jobs"),
            Err(e) => warn!(error = %e, "cannot forget old jobs"),
        }
    }

    /// Persists an accepted job as queued, and counts it against its host until it ends.
    pub async fn accept(&self, routed: &Routed) {
        if let Some(&peer) = routed.hosts.get(routed.decision.chosen.host) {
            self.count_pending(peer, true);
        }
        self.save(JobEntry {
            request: routed.request.clone(),
            state: JobState::Queued,
            updated_at_ms: now_ms(),
            route: Some(routed.decision.chosen.clone()),
            attempts: 0,
        })
        .await;
    }

    /// Runs a routed (and accepted) job to its end, retrying on other hosts when one is busy,
    /// fails or dies. Text deltas of every prompt go to `deltas`, each character once.
    pub async fn execute(
        &self,
        routed: Routed,
        deltas: Option<mpsc::Sender<Delta>>,
    ) -> Result<Outcome, JobError> {
        let accepted = Instant::now();
        let request = routed.request.clone();
        let id = request.id;
        let sent = Arc::new(std::sync::Mutex::new(vec![0usize; request.prompts.len()]));
        let mut tried: HashSet<PeerId> = HashSet::new();
        let mut routed = routed;
        let mut attempts = 0u32;
        let mut all_busy = true;
        let mut last_error;
        // The host this job is counted against (`accept` counted the first choice).
        let mut counted = routed.hosts.get(routed.decision.chosen.host).copied();
        let result = loop {
            let choice = routed.decision.chosen.clone();
            let Some(&peer) = routed.hosts.get(choice.host) else {
                break Err(JobError::Internal(
                    "the decision names an unknown host".into(),
                ));
            };
            if counted != Some(peer) {
                if let Some(old) = counted.replace(peer) {
                    self.count_pending(old, false);
                }
                self.count_pending(peer, true);
            }
            attempts += 1;
            tried.insert(peer);
            self.save(JobEntry {
                request: request.clone(),
                state: JobState::Running { host: peer },
                updated_at_ms: now_ms(),
                route: Some(choice.clone()),
                attempts,
            })
            .await;
            let attempt_deltas = deltas
                .as_ref()
                .map(|d| dedup_deltas(d.clone(), Arc::clone(&sent)));
            let outcome = if peer == self.0.peer_id {
                self.run_local(request.clone(), choice.method.clone(), attempt_deltas, None)
                    .await
            } else {
                self.run_remote(peer, &request, &choice, attempt_deltas)
                    .await
            };
            match outcome {
                Ok(result) => {
                    break Ok(Outcome {
                        result,
                        choice,
                        retries: attempts - 1,
                        latency_s: 0.0,
                    });
                }
                Err(ExecError::Rejected(reason)) => break Err(JobError::Rejected(reason)),
                Err(ExecError::Cancelled) => break Err(JobError::Cancelled),
                Err(ExecError::Busy) => {
                    last_error = format!("host {peer} is busy");
                }
                Err(ExecError::Failed(reason)) => {
                    all_busy = false;
                    warn!(job = %id, host = %peer, %reason, "attempt failed; trying another host");
                    last_error = format!("host {peer}: {reason}");
                }
            }
            self.0.metrics.retries.inc();
            if attempts >= self.0.config.max_attempts.max(1)
                || deltas.as_ref().is_some_and(|d| d.is_closed())
            {
                break Err(exhausted(all_busy, attempts, &last_error));
            }
            routed = match self.route_excluding(request.clone(), &tried).await {
                Ok(r) => r,
                Err(JobError::NoHost(_)) => {
                    break Err(exhausted(all_busy, attempts, &last_error));
                }
                Err(e) => break Err(e),
            };
        };
        if let Some(peer) = counted {
            self.count_pending(peer, false);
        }
        let latency_s = accepted.elapsed().as_secs_f64();
        let choice = match &result {
            Ok(o) => o.choice.clone(),
            Err(_) => routed.decision.chosen.clone(),
        };
        let mut log = DecisionLog {
            job: id.to_string(),
            at_ms: request.submitted_at_ms,
            host: choice.host_name.clone(),
            method: choice.method.short_name(),
            predicted_runtime_s: choice.runtime_s,
            predicted_wait_s: choice.wait_s,
            predicted_cost: choice.cost,
            measured_runtime_s: None,
            abs_log_error: None,
            predictor_generation: routed.generation,
            feasible: routed.decision.feasible,
            over_budget: routed.decision.over_budget,
            retries: attempts.saturating_sub(1),
            error: None,
        };
        let state = match &result {
            Ok(o) => {
                let measured = o.result.metrics.wall_time_s;
                let err = (measured.max(1e-6) / o.choice.runtime_s.max(1e-6))
                    .ln()
                    .abs();
                self.0.metrics.abs_log_error.observe(err);
                log.measured_runtime_s = Some(measured);
                log.abs_log_error = Some(err);
                JobState::Done(Box::new(o.result.clone()))
            }
            Err(e) => {
                log.error = Some(e.to_string());
                JobState::Failed {
                    reason: e.to_string(),
                }
            }
        };
        self.0.metrics.job_finished(result.is_ok(), latency_s);
        self.0.decisions.push(log);
        self.save(JobEntry {
            request: request.clone(),
            state,
            updated_at_ms: now_ms(),
            route: Some(choice),
            attempts,
        })
        .await;
        result.map(|o| Outcome { latency_s, ..o })
    }

    /// Runs a job on this node's engine and makes a signed record of it.
    async fn run_local(
        &self,
        request: JobRequest,
        method: MethodConfig,
        deltas: Option<mpsc::Sender<Delta>>,
        cancel: Option<CancellationToken>,
    ) -> Result<JobResult, ExecError> {
        let id = request.id;
        let exec = self
            .0
            .executor
            .run(request, method.clone(), deltas, cancel.unwrap_or_default())
            .await?;
        let metrics = metainf_profiler::bench::metrics(&exec.report)
            .map_err(|e| ExecError::Failed(e.to_string()))?;
        let record = match self.record(&exec, &method, &metrics).await {
            Ok(id) => Some(id),
            Err(e) => {
                // The client still gets its result; the tensor misses one measurement.
                warn!(job = %id, error = %e, "cannot record the job's measurement");
                None
            }
        };
        Ok(JobResult {
            id,
            host: self.0.peer_id,
            method,
            completions: exec.completions,
            metrics,
            record,
        })
    }

    async fn record(
        &self,
        exec: &executor::Execution,
        method: &MethodConfig,
        metrics: &metainf_protocol::Metrics,
    ) -> Result<metainf_protocol::RecordId, String> {
        let mut seq = self.0.seq.lock().await;
        let record = PerfRecord {
            origin: self.0.peer_id,
            seq: *seq + 1,
            measured_at_ms: now_ms(),
            hardware: self.0.profile.clone(),
            model: exec.model.clone(),
            workload: exec.workload.clone(),
            method: method.clone(),
            metrics: metrics.clone(),
            source: RecordSource::Job,
            engine: ENGINE_NAME.to_owned(),
        };
        let verified = SignedRecord::sign(record, &self.0.key)
            .and_then(SignedRecord::verify)
            .map_err(|e| e.to_string())?;
        let id = verified.id();
        match &self.0.net {
            Some(net) => net.publish(verified).await.map_err(|e| e.to_string())?,
            None => match self.0.store.put_async(vec![verified]).await {
                Ok(o) if matches!(o.first(), Some(PutOutcome::Stored | PutOutcome::Duplicate)) => {}
                Ok(o) => return Err(format!("the store refused the record: {o:?}")),
                Err(e) => return Err(e.to_string()),
            },
        }
        *seq += 1;
        self.0.metrics.records_made.inc();
        Ok(id)
    }

    async fn run_remote(
        &self,
        peer: PeerId,
        request: &JobRequest,
        choice: &Choice,
        deltas: Option<mpsc::Sender<Delta>>,
    ) -> Result<JobResult, ExecError> {
        let Some(net) = &self.0.net else {
            return Err(ExecError::Failed("the network is off".into()));
        };
        let sink = deltas.map(|d| {
            let (tx, mut rx) = mpsc::channel::<JobDelta>(16);
            tokio::spawn(async move {
                while let Some(delta) = rx.recv().await {
                    if d.send((delta.prompt, delta.text)).await.is_err() {
                        break;
                    }
                }
            });
            tx
        });
        let call = JobCall {
            request: request.clone(),
            method: choice.method.clone(),
        };
        self.0.metrics.forwarded.inc();
        let timeout = Duration::from_secs(self.0.config.job_timeout_s.max(1));
        let reply = tokio::time::timeout(timeout, net.call_job(peer, call, sink))
            .await
            .map_err(|_| ExecError::Failed(format!("no answer within {} s", timeout.as_secs())))?
            .map_err(|e| ExecError::Failed(e.to_string()))?;
        match reply {
            JobReply::Done(result) => {
                if result.id != request.id
                    || result.host != peer
                    || result.completions.len() != request.prompts.len()
                {
                    return Err(ExecError::Failed(
                        "the host answered with a result that does not match the job".into(),
                    ));
                }
                Ok(*result)
            }
            JobReply::Busy { .. } => Err(ExecError::Busy),
            JobReply::Rejected(reason) => Err(ExecError::Rejected(reason)),
            JobReply::Failed(reason) => Err(ExecError::Failed(reason)),
        }
    }

    /// Answers job calls from peers.
    async fn serve_peers(self, mut rx: mpsc::Receiver<InboundJob>, shutdown: CancellationToken) {
        loop {
            let job = tokio::select! {
                () = shutdown.cancelled() => break,
                job = rx.recv() => match job { Some(j) => j, None => break },
            };
            tokio::spawn(self.clone().serve_peer(job));
        }
    }

    async fn serve_peer(self, job: InboundJob) {
        let peer = job.peer;
        let request = job.call.request.clone();
        let method = job.call.method.clone();
        if let Err(e) = request.validate().and_then(|()| method.validate()) {
            job.respond(JobReply::Rejected(e.to_string())).await;
            return;
        }
        let cancel = CancellationToken::new();
        let (deltas, streamer) = if request.stream {
            let (tx, rx) = mpsc::channel::<Delta>(64);
            let streamer = tokio::spawn(stream_to_peer(
                self.0.net.clone(),
                peer,
                request.id,
                rx,
                cancel.clone(),
            ));
            (Some(tx), Some(streamer))
        } else {
            (None, None)
        };
        info!(job = %request.id, from = %peer, method = %method.short_name(), "running a job for a peer");
        let result = self.run_local(request, method, deltas, Some(cancel)).await;
        if let Some(s) = streamer {
            // Every delta is delivered before the result.
            let _ = s.await;
        }
        let reply = match result {
            Ok(r) => JobReply::Done(Box::new(r)),
            Err(ExecError::Busy) => JobReply::Busy { retry_after_s: 2 },
            Err(ExecError::Rejected(r)) => JobReply::Rejected(r),
            Err(ExecError::Failed(r)) => JobReply::Failed(r),
            Err(ExecError::Cancelled) => JobReply::Failed("cancelled".into()),
        };
        job.respond(reply).await;
    }

    /// Retrains when enough new records have arrived.
    async fn retrain_loop(self, shutdown: CancellationToken) {
        let mut tick =
            tokio::time::interval(Duration::from_secs(self.0.config.retrain_check_s.max(1)));
        let mut hourly = tokio::time::interval(Duration::from_secs(3600));
        hourly.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = hourly.tick() => {
                    let service = self.clone();
                    let _ = tokio::task::spawn_blocking(move || service.prune_jobs()).await;
                    continue;
                }
                _ = tick.tick() => {}
            }
            let store = self.0.store.clone();
            let count = tokio::task::spawn_blocking(move || count_records(&store))
                .await
                .unwrap_or(0);
            self.0.records.store(count, Ordering::Relaxed);
            self.0
                .metrics
                .records
                .set(i64::try_from(count).unwrap_or(i64::MAX));
            let trained = self.0.learner.trained_records();
            let due = count > 0
                && (self.0.learner.current().is_none()
                    || count >= trained + self.0.config.retrain_after.max(1));
            if !due {
                continue;
            }
            let service = self.clone();
            let done = tokio::task::spawn_blocking(move || {
                service
                    .0
                    .learner
                    .retrain(&service.0.store, GbdtParams::default(), count)
            })
            .await;
            match done {
                Ok(Ok(Some(generation))) => {
                    self.0
                        .metrics
                        .predictor_generation
                        .set(i64::try_from(generation).unwrap_or(i64::MAX));
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => warn!(error = %e, "retraining failed; keeping the current predictor"),
                Err(e) => warn!(error = %e, "retraining panicked; keeping the current predictor"),
            }
        }
    }

    /// Jobs a previous run left pending: batch jobs are run again; streaming ones, whose
    /// client has gone with the old process, are failed explicitly.
    async fn recover(&self) {
        let jobs = match self.0.store.jobs() {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "cannot read the persisted jobs");
                return;
            }
        };
        for entry in jobs {
            if !matches!(entry.state, JobState::Queued | JobState::Running { .. }) {
                continue;
            }
            let id = entry.request.id;
            if entry.request.stream {
                info!(job = %id, "failing a streaming job left pending by a restart");
                self.save(JobEntry {
                    state: JobState::Failed {
                        reason: "the node restarted while the job ran; its streaming client \
                                 was disconnected"
                            .into(),
                    },
                    updated_at_ms: now_ms(),
                    ..entry
                })
                .await;
                continue;
            }
            info!(job = %id, "running again a job left pending by a restart");
            let service = self.clone();
            tokio::spawn(async move {
                // Peers announce themselves within a heartbeat or two.
                tokio::time::sleep(Duration::from_secs(2)).await;
                match service.route(entry.request.clone()).await {
                    Ok(routed) => {
                        service.accept(&routed).await;
                        let _ = service.execute(routed, None).await;
                    }
                    Err(e) => {
                        service
                            .save(JobEntry {
                                state: JobState::Failed {
                                    reason: format!("after a restart: {e}"),
                                },
                                updated_at_ms: now_ms(),
                                ..entry
                            })
                            .await
                    }
                }
            });
        }
    }
}

/// Sends a local job's deltas to the peer that forwarded it, one at a time, merging what
/// piles up meanwhile; stops (and cancels the job) when the peer no longer listens.
async fn stream_to_peer(
    net: Option<Client>,
    peer: PeerId,
    job: JobId,
    mut rx: mpsc::Receiver<Delta>,
    cancel: CancellationToken,
) {
    let Some(net) = net else { return };
    while let Some((prompt, mut text)) = rx.recv().await {
        let mut next = None;
        while let Ok((p, t)) = rx.try_recv() {
            if p == prompt {
                text.push_str(&t);
            } else {
                next = Some((p, t));
                break;
            }
        }
        for (prompt, text) in std::iter::once((prompt, text)).chain(next) {
            match net.send_delta(peer, JobDelta { job, prompt, text }).await {
                Ok(DeltaAck::Ok) => {}
                Ok(DeltaAck::Stop) | Err(_) => {
                    cancel.cancel();
                    // Drain, so the engine never blocks on a full channel.
                    while rx.recv().await.is_some() {}
                    return;
                }
            }
        }
    }
}

/// Forwards deltas to `out`, dropping the text of each prompt that an earlier attempt of the
/// job already sent (a retry regenerates it from the start).
fn dedup_deltas(
    out: mpsc::Sender<Delta>,
    sent: Arc<std::sync::Mutex<Vec<usize>>>,
) -> mpsc::Sender<Delta> {
    let (tx, mut rx) = mpsc::channel::<Delta>(64);
    tokio::spawn(async move {
        let mut seen: Vec<usize> = Vec::new();
        while let Some((prompt, text)) = rx.recv().await {
            let i = prompt as usize;
            if seen.len() <= i {
                seen.resize(i + 1, 0);
            }
            let start = seen[i];
            seen[i] += text.len();
            let already = sent
                .lock()
                .map(|s| s.get(i).copied().unwrap_or(0))
                .unwrap_or(0);
            let skip = already.saturating_sub(start).min(text.len());
            if skip == text.len() || !text.is_char_boundary(skip) {
                continue;
            }
            let fresh = text[skip..].to_owned();
            if let Ok(mut s) = sent.lock()
                && let Some(v) = s.get_mut(i)
            {
                *v = seen[i];
            }
            if out.send((prompt, fresh)).await.is_err() {
                break;
            }
        }
    });
    tx
}

/// The error of a job no host could run: busy everywhere (429) or failing (502).
fn exhausted(all_busy: bool, attempts: u32, last_error: &str) -> JobError {
    if all_busy {
        JobError::Overloaded { retry_after_s: 2 }
    } else {
        JobError::Failed(format!(
            "the job failed on {attempts} host(s); last: {last_error}"
        ))
    }
}

fn over_budget(e: SelectError) -> JobError {
    let message = e.to_string();
    match e {
        SelectError::OverBudget { cheapest, .. } => JobError::OverBudget { message, cheapest },
        other => JobError::Internal(other.to_string()),
    }
}

/// Records in the store (the sum of every origin's contiguous records).
fn count_records(store: &Store) -> u64 {
    store
        .origin_states()
        .map(|s| s.values().map(|o| o.max).sum())
        .unwrap_or(0)
}

/// A workload descriptor for a model this node cannot tokenize: about four bytes per token.
fn approximate_workload(request: &JobRequest) -> WorkloadDescriptor {
    let prompts: Vec<Vec<u32>> = request
        .prompts
        .iter()
        .map(|p| {
            let text = match p {
                metainf_protocol::Prompt::Text(t) => t.clone(),
                metainf_protocol::Prompt::Chat(m) => metainf_profiler::tokenizer::chat_template(m),
            };
            text.as_bytes()
                .chunks(4)
                .map(|c| {
                    c.iter()
                        .fold(0u32, |a, b| a.wrapping_mul(257) ^ u32::from(*b))
                })
                .collect()
        })
        .collect();
    let max_new = vec![request.params.max_tokens; prompts.len()];
    WorkloadDescriptor::from_prompts(
        None,
        &prompts,
        &max_new,
        Arrival::AllAtOnce,
        request.params.temperature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(rx: &mut mpsc::Receiver<Delta>) -> Delta {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_retry_streams_only_the_text_the_client_has_not_seen() {
        let (out, mut rx) = mpsc::channel(16);
        let sent = Arc::new(std::sync::Mutex::new(vec![0usize; 2]));
        let first = dedup_deltas(out.clone(), Arc::clone(&sent));
        first.send((0, "Hello".into())).await.unwrap();
        first.send((1, "A".into())).await.unwrap();
        assert_eq!(next(&mut rx).await, (0, "Hello".into()));
        assert_eq!(next(&mut rx).await, (1, "A".into()));
        drop(first);
        // The retry regenerates from the start, in other pieces.
        let second = dedup_deltas(out.clone(), Arc::clone(&sent));
        for d in [(0, "Hel"), (0, "lo wor"), (0, "ld"), (1, "AB")] {
            second.send((d.0, d.1.into())).await.unwrap();
        }
        assert_eq!(next(&mut rx).await, (0, " wor".into()));
        assert_eq!(next(&mut rx).await, (0, "ld".into()));
        assert_eq!(next(&mut rx).await, (1, "B".into()));
        drop(second);
        drop(out);
        assert!(rx.recv().await.is_none(), "nothing else was sent");
    }

    #[test]
    fn a_workload_is_approximated_for_a_model_this_node_cannot_tokenize() {
        let request = JobRequest {
            id: JobId([1; 16]),
            model: "elsewhere".into(),
            prompts: vec![
                metainf_protocol::Prompt::Text("x".repeat(400)),
                metainf_protocol::Prompt::Text("x".repeat(400)),
            ],
            params: metainf_protocol::GenerationParams::default(),
            budget: None,
            objective: metainf_protocol::Objective::Runtime,
            pin_method: None,
            pin_host: None,
            stream: false,
            submitted_at_ms: 0,
        };
        let w = approximate_workload(&request);
        assert_eq!(w.requests, 2);
        assert_eq!(w.prompt_tokens.max, 100);
        assert!(
            w.prefix_sharing > 0.4,
            "identical prompts share their prefix"
        );
    }
}
