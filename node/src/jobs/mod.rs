//! Jobs end to end: the node that receives a job describes its workload, gathers the hosts
//! that serve the model (itself and live peers, from their heartbeats), lets the scheduler
//! choose host and method within the budget, and runs the job there, locally or over
//! `/metainf/job/1`. A host that is busy, fails or dies mid-job is replaced by the best of the
//! hosts not yet tried. Every job is persisted from acceptance to its end, every finished job
//! becomes a signed performance record, and the predictor retrains in the background as
//! records arrive.

mod admission;
mod config;
pub mod executor;
mod host;
pub mod learn;
pub mod metrics;
mod ops;
mod persist;
pub mod policy;
pub mod reputation;
mod route;
mod run;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use libp2p::PeerId;
use metainf_protocol::{HardwareProfile, MethodConfig, ModelDescriptor};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::{Client, InboundJob};
use crate::signer::RecordSigner;
use crate::store::Store;
pub use admission::AcceptFrom;
pub use config::{JobError, JobsConfig};
pub use executor::{Delta, EngineThread, ExecError, Executor, ServedModel};
use learn::count_records;
use learn::{DecisionLogBook, Learner};
pub use ops::{Load, PredictorInfo};
pub use route::Routed;
pub use run::Outcome;
pub use state::{JobEntry, JobState};

struct Inner {
    peer_id: PeerId,
    signer: RecordSigner,
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
    /// Where the network hands job calls from peers.
    peer_jobs: mpsc::Sender<InboundJob>,
    /// Which peers' jobs run here, and how many at once.
    admission: admission::Admission,
    /// What this node saw of the hosts it sent jobs to.
    reputation: reputation::Reputation,
    /// The node's tasks: every job runs on it, so shutdown waits for (or gives up on) each.
    tasks: TaskTracker,
    metrics: metrics::Metrics,
    started: Instant,
    /// Records in the store, as last counted.
    records: AtomicU64,
    /// Jobs (and their sequences) this node sent to each host that have not ended yet: a
    /// host's heartbeat is up to an interval old, and a burst of jobs must not all see the same
    /// empty queue.
    pending: std::sync::Mutex<std::collections::HashMap<PeerId, (u32, u32, u64)>>,
    /// Jobs the round-robin policy routed.
    round_robin: AtomicU64,
    /// When this node last started or ended a job on each host (Unix ms).
    dispatched: std::sync::Mutex<std::collections::HashMap<PeerId, u64>>,
}

/// The node's job service. Cheap to clone.
#[derive(Clone)]
pub struct JobService(Arc<Inner>);

impl JobService {
    /// Starts the service: serves job calls from peers, retrains in the background, and
    /// finishes or fails the jobs a previous run left pending.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        signer: RecordSigner,
        store: Store,
        net: Option<Client>,
        executor: Executor,
        profile: HardwareProfile,
        price_per_hour: f64,
        config: JobsConfig,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> crate::Result<Self> {
        let peer_id = signer.origin();
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
        let admission = config.admission().map_err(crate::NodeError::Engine)?;
        let (peer_jobs, peer_jobs_rx) = mpsc::channel(64);
        let learner = Learner::open(&store);
        let reputation = reputation::Reputation::load(&store);
        let records = count_records(&store);
        let inner = Inner {
            peer_id,
            signer,
            store,
            net: net.clone(),
            executor,
            profile,
            price_per_hour,
            decisions: DecisionLogBook::new(config.decisions_kept),
            config,
            methods,
            learner,
            peer_jobs,
            admission,
            reputation,
            tasks: tasks.clone(),
            metrics: metrics::Metrics::new(),
            started: Instant::now(),
            records: AtomicU64::new(records),
            pending: std::sync::Mutex::new(std::collections::HashMap::new()),
            round_robin: AtomicU64::new(0),
            dispatched: std::sync::Mutex::new(std::collections::HashMap::new()),
        };
        let service = Self(Arc::new(inner));
        if let Some(net) = &net {
            net.set_offer(service.0.executor.offer())
                .await
                .map_err(|e| crate::NodeError::Network(e.to_string()))?;
        }
        tasks.spawn(
            service
                .clone()
                .serve_peers(peer_jobs_rx, tasks.clone(), shutdown.clone()),
        );
        tasks.spawn(service.clone().retrain_loop(shutdown.clone()));
        service.prune_jobs();
        service.recover().await;
        Ok(service)
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.0.peer_id
    }

    /// Runs `task` on the node's tracker (awaited, within a limit, at shutdown).
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.tasks.spawn(task)
    }

    /// Where the network should hand job calls from peers (full: they are answered busy).
    pub fn peer_jobs(&self) -> mpsc::Sender<InboundJob> {
        self.0.peer_jobs.clone()
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
}
