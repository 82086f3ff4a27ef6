//! The running node: data directory, identity and store, kept until shutdown.
//!
//! Networking (the libp2p swarm), the profiler, the scheduler and the HTTP API attach to
//! [`Node`] as tasks that share its cancellation token; `run` waits for that token.

use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::error::{NodeError, Result};
use crate::identity;
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

    /// Runs until `shutdown` is cancelled, then flushes the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let network = if self.config.network.enabled {
            // The spec identifies the hardware cell; `metainf-node profile` measures it.
            let probe = metainf_profiler::ProbeOptions {
                measure: false,
                ..Default::default()
            };
            let hardware = metainf_profiler::probe(&probe)
                .map_err(|e| NodeError::Hardware(e.to_string()))?
                .id()
                .map_err(|e| NodeError::Hardware(e.to_string()))?;
            let (client, event_loop) = net::start(
                self.key.clone(),
                self.store.clone(),
                hardware,
                self.config.network.clone(),
            )
            .map_err(|e| NodeError::Network(e.to_string()))?;
            let token = shutdown.child_token();
            Some((client, tokio::spawn(event_loop.run(token))))
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
