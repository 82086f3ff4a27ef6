//! The running node: data directory, identity and store, kept until shutdown.
//!
//! [`Node::start`] binds every listener and starts the parts as tasks on one tracker (the
//! network's event loop, the replica, the job service, the HTTP API) plus the engine thread;
//! the [`RunningNode`] it returns reports the bound addresses and, once the shutdown token is
//! cancelled, [`RunningNode::wait`] stops them all in order and awaits each.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{NodeError, Result};
use crate::identity;
use crate::jobs::{EngineThread, Executor, JobService, ServedModel};
use crate::net;
use crate::replica::{Replica, route_events};
use crate::signer::RecordSigner;
use crate::store::Store;

/// File name of the identity key inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// Directory of the RocksDB store inside the data directory.
pub const STORE_DIR: &str = "store";

/// Creates the data directory (mode 0700) if needed.
pub fn prepare_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| NodeError::io("cannot create data directory", dir, e))
}

/// An open node.
pub struct Node {
    data_dir: PathBuf,
    key: Keypair,
    store: Store,
    config: Config,
}

impl Node {
    /// Opens (or initialises) the node's data directory: identity key and store.
    pub fn open(config: &Config) -> Result<Self> {
        let data_dir = config.data_dir()?;
        prepare_data_dir(&data_dir)?;
        let (key, _) = identity::load_or_create(&data_dir.join(IDENTITY_FILE))?;
        let store = Store::open(data_dir.join(STORE_DIR))?;
        Ok(Self {
            data_dir,
            key,
            store,
            config: config.clone(),
        })
    }

    /// The node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.key.public().to_peer_id()
    }

    /// The node's key.
    pub fn key(&self) -> &Keypair {
        &self.key
    }

    /// The node's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The signer of this node's records, continuing its sequence in the store.
    pub fn signer(&self) -> Result<RecordSigner> {
        RecordSigner::open(self.key.clone(), self.store.clone())
    }

    /// Runs until `shutdown` is cancelled, then stops every part and flushes the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        self.start(shutdown).await?.wait().await
    }

    /// Starts every part: probes the hardware, loads the served models, joins the network,
    /// serves jobs from peers and the HTTP API. Returns once every listener is bound, with their
    /// addresses (configure port 0 to let the system choose: tests run several nodes in one
    /// process this way). Stop it by cancelling `shutdown`, then [`RunningNode::wait`].
    pub async fn start(self, shutdown: CancellationToken) -> Result<RunningNode> {
        let threads = self.config.engine.threads;
        let profile = tokio::task::spawn_blocking(move || {
            metainf_profiler::probe(&metainf_profiler::ProbeOptions {
                threads,
                ..Default::default()
            })
        })
        .await
        .map_err(|e| NodeError::Hardware(e.to_string()))?
        .map_err(|e| NodeError::Hardware(e.to_string()))?;
        let paths = match self.config.engine.model_paths() {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "serving no model: this node routes jobs to its peers only");
                Vec::new()
            }
        };
        let served = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|p| {
                    ServedModel::load(p, threads)
                        .map_err(|e| NodeError::Model(format!("{}: {e}", p.display())))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| NodeError::Model(e.to_string()))??;
        for m in &served {
            info!(model = %m.descriptor.name, quantization = %m.descriptor.quantization, "serving");
        }
        // Bound first: a port in use fails the start before anything runs.
        let api_listener = if self.config.api.enabled {
            Some(
                tokio::net::TcpListener::bind(self.config.api.listen)
                    .await
                    .map_err(|e| {
                        NodeError::Api(format!("cannot listen on {}: {e}", self.config.api.listen))
                    })?,
            )
        } else {
            None
        };
        let tasks = TaskTracker::new();
        // Every part stops on this token: the caller's shutdown, or a failed start.
        let stop = shutdown.child_token();
        match self
            .start_parts(profile, served, api_listener, &tasks, &stop)
            .await
        {
            Ok(running) => Ok(running),
            Err(e) => {
                stop.cancel();
                tasks.close();
                let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
                Err(e)
            }
        }
    }

    async fn start_parts(
        &self,
        profile: metainf_protocol::HardwareProfile,
        served: Vec<ServedModel>,
        api_listener: Option<tokio::net::TcpListener>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<RunningNode> {
        let tasks = tasks.clone();
        let signer = self.signer()?;
        let sched = self
            .config
            .engine
            .sched(self.config.jobs.queue_capacity as usize)?;
        let (executor, engine_thread) =
            Executor::start(served, sched).map_err(NodeError::Engine)?;
        let network = if self.config.network.enabled {
            let (client, event_loop, events) = net::start(
                self.key.clone(),
                profile.clone(),
                self.config.network.clone(),
            )
            .map_err(|e| NodeError::Network(e.to_string()))?;
            tasks.spawn(event_loop.run(stop.child_token()));
            client
                .set_records_seq(signer.last_seq())
                .await
                .map_err(|e| NodeError::Network(e.to_string()))?;
            // Origins convicted of equivocation stay banned across restarts.
            for origin in self.store.convicted()? {
                client
                    .ban(origin)
                    .await
                    .map_err(|e| NodeError::Network(e.to_string()))?;
            }
            Some((client, events))
        } else {
            None
        };
        let service = JobService::start(
            signer,
            self.store.clone(),
            network.as_ref().map(|(c, _)| c.clone()),
            executor,
            profile,
            self.config.network.price_per_hour,
            self.config.jobs.clone(),
            tasks.clone(),
            stop.child_token(),
        )
        .await?;
        let mut listen_addrs = Vec::new();
        let mut client = None;
        if let Some((net, events)) = network {
            let replica = Replica::start(self.store.clone(), net.clone(), tasks.clone());
            tasks.spawn(route_events(events, replica, Some(service.peer_jobs())));
            // Circuit addresses open later, once their relay is connected.
            let direct = self.config.network.listen.iter().any(|a| {
                !a.iter()
                    .any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
            });
            listen_addrs = bound_addresses(&net, direct).await;
            client = Some(net);
        }
        let api_addr = match api_listener {
            Some(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(|e| NodeError::Api(format!("the API listener: {e}")))?;
                let api_config = self.config.api.clone();
                let service = service.clone();
                let token = stop.child_token();
                let api =
                    async move { crate::api::serve(listener, service, &api_config, token).await };
                tasks.spawn(async move {
                    if let Err(e) = api.await {
                        warn!(error = %e, "the HTTP API stopped");
                    }
                });
                Some(addr)
            }
            None => None,
        };
        let states = self.store.origin_states()?;
        let records: u64 = states.values().map(|s| s.contiguous).sum();
        info!(
            peer_id = %self.peer_id(),
            data_dir = %self.data_dir.display(),
            origins = states.len(),
            records,
            "node running; press Ctrl-C to stop"
        );
        Ok(RunningNode {
            peer_id: self.peer_id(),
            api_addr,
            listen_addrs,
            client,
            service: Some(service),
            store: self.store.clone(),
            tasks,
            engine_thread,
            shutdown: stop.clone(),
        })
    }
}

/// The addresses the swarm listens on, once it reports them (within a few seconds).
async fn bound_addresses(net: &net::Client, expect: bool) -> Vec<Multiaddr> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let addrs = net.listen_addrs().await.unwrap_or_default();
        if !expect || !addrs.is_empty() || tokio::time::Instant::now() >= deadline {
            return addrs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A started node: its addresses, and every task and thread it runs.
pub struct RunningNode {
    peer_id: PeerId,
    api_addr: Option<SocketAddr>,
    listen_addrs: Vec<Multiaddr>,
    client: Option<net::Client>,
    service: Option<JobService>,
    store: Store,
    tasks: TaskTracker,
    engine_thread: EngineThread,
    shutdown: CancellationToken,
}

impl RunningNode {
    /// The node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Where the HTTP API listens (none when `[api] enabled = false`).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// Where the swarm listens, each ending in this node's `/p2p/` id (for `--bootstrap`).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs
            .iter()
            .map(|a| {
                a.clone()
                    .with(libp2p::multiaddr::Protocol::P2p(self.peer_id))
            })
            .collect()
    }

    /// The network, when the node is on one.
    pub fn client(&self) -> Option<&net::Client> {
        self.client.as_ref()
    }

    /// The node's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Waits for the shutdown token, then stops in order: the API (open event streams get 5 s),
    /// the network and the replica, the job service's tasks, the engine thread; then flushes
    /// the store.
    pub async fn wait(mut self) -> Result<()> {
        self.shutdown.cancelled().await;
        info!("shutting down");
        self.tasks.close();
        drop(self.service.take());
        drop(self.client.take());
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = self.tasks.len(),
                "tasks still running at shutdown; not waiting for them"
            );
        }
        self.engine_thread.join(Duration::from_secs(10)).await;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|_| crate::store::StoreError::Closed)??;
        info!("stopped cleanly");
        Ok(())
    }
}
