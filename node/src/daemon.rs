//! The running node: data directory, identity and store, kept until shutdown.
//!
//! Networking (the libp2p swarm), the profiler, the scheduler and the HTTP API attach to
//! [`Node`] as tasks that share its cancellation token; `run` waits for that token.

use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{NodeError, Result};
use crate::identity;
use crate::jobs::{Executor, JobService, ServedModel};
use crate::net;
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

    /// Runs until `shutdown` is cancelled, then flushes the store: probes the hardware, loads
    /// the served models, joins the network, serves jobs from peers and the HTTP API.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
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
        let executor = Executor::start(served, self.config.jobs.queue_capacity);
        let network = if self.config.network.enabled {
            let (client, event_loop) = net::start(
                self.key.clone(),
                self.store.clone(),
                profile.clone(),
                self.config.network.clone(),
            )
            .map_err(|e| NodeError::Network(e.to_string()))?;
            let token = shutdown.child_token();
            Some((client, tokio::spawn(event_loop.run(token))))
        } else {
            None
        };
        let service = JobService::start(
            self.key.clone(),
            self.store.clone(),
            network.as_ref().map(|(c, _)| c.clone()),
            executor,
            profile,
            self.config.network.price_per_hour,
            self.config.jobs.clone(),
            shutdown.child_token(),
        )
        .await?;
        let api = if self.config.api.enabled {
            let listener = tokio::net::TcpListener::bind(self.config.api.listen)
                .await
                .map_err(|e| {
                    NodeError::Api(format!("cannot listen on {}: {e}", self.config.api.listen))
                })?;
            Some(tokio::spawn(crate::api::serve(
                listener,
                service.clone(),
                self.config.api.max_body_bytes,
                shutdown.child_token(),
            )))
        } else {
            None
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
        shutdown.cancelled().await;
        info!("shutting down");
        if let Some(api) = api {
            // Open event streams would hold a graceful shutdown forever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), api).await;
        }
        drop(service);
        if let Some((_client, task)) = network {
            let _ = task.await;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|_| crate::store::StoreError::Closed)??;
        drop(self);
        info!("stopped cleanly");
        Ok(())
    }
}
