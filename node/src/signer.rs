//! [`RecordSigner`]: the one place where this node makes performance records — benchmark runs,
//! finished jobs and imported tables alike. It numbers them (its own sequence, without gaps:
//! a number is used only once its record is stored, since anti-entropy counts contiguous
//! sequences), signs them with the node's key, stores them, and gossips them when the node is
//! on a network.

use std::sync::{Arc, Mutex, PoisonError};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use metainf_protocol::{PerfRecord, RecordId, SignedRecord, VerifiedRecord};
use tokio::sync::watch;

use crate::error::{NodeError, Result};
use crate::net::Client;
use crate::store::{PutOutcome, Store};

/// Name and version of the engine, written into every record this node measures.
pub const ENGINE_NAME: &str = concat!("metainf-candle/", env!("CARGO_PKG_VERSION"), " q8_0");

/// Numbers, signs, stores and gossips this node's records. Cheap to clone.
#[derive(Clone)]
pub struct RecordSigner(Arc<Inner>);

struct Inner {
    key: Keypair,
    origin: PeerId,
    store: Store,
    /// The highest sequence number stored; held while a batch is numbered and stored.
    last: Mutex<u64>,
    /// The same number, for the heartbeats.
    announced: watch::Sender<u64>,
}

impl std::fmt::Debug for RecordSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSigner")
            .field("origin", &self.0.origin)
            .field("last", &*self.0.announced.borrow())
            .finish_non_exhaustive()
    }
}

impl RecordSigner {
    /// A signer for `key`'s records in `store`, continuing after the highest sequence stored.
    pub fn open(key: Keypair, store: Store) -> Result<Self> {
        let origin = key.public().to_peer_id();
        let last = store.origin_state(&origin)?.max;
        Ok(Self(Arc::new(Inner {
            key,
            origin,
            store,
            last: Mutex::new(last),
            announced: watch::Sender::new(last),
        })))
    }

    /// The origin of every record signed here.
    pub fn origin(&self) -> PeerId {
        self.0.origin
    }

    /// The highest sequence number stored, kept current.
    pub fn last_seq(&self) -> watch::Receiver<u64> {
        self.0.announced.subscribe()
    }

    /// Numbers `records` consecutively after the last stored one (their `origin` and `seq` are
    /// overwritten), signs and stores them as one batch. Blocks on the store: call it from a
    /// blocking context. On any error nothing is numbered.
    pub fn store_all(&self, records: Vec<PerfRecord>) -> Result<Vec<(RecordId, PutOutcome)>> {
        Ok(self
            .store_verified(records)?
            .into_iter()
            .map(|(r, o)| (r.id(), o))
            .collect())
    }

    /// Numbers, signs and stores one record (off the runtime), then gossips it on `net`.
    pub async fn publish(&self, record: PerfRecord, net: Option<&Client>) -> Result<RecordId> {
        let signer = self.clone();
        let (verified, _) =
            tokio::task::spawn_blocking(move || signer.store_verified(vec![record]))
                .await
                .map_err(|e| NodeError::Engine(e.to_string()))??
                .pop()
                .ok_or_else(|| NodeError::Engine("no record stored".into()))?;
        if let Some(net) = net
            && let Err(e) = net.gossip(&verified).await
        {
            // Stored: anti-entropy spreads it.
            tracing::debug!(error = %e, "record stored but not gossiped");
        }
        Ok(verified.id())
    }

    fn store_verified(
        &self,
        records: Vec<PerfRecord>,
    ) -> Result<Vec<(VerifiedRecord, PutOutcome)>> {
        let mut last = self.0.last.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = *last;
        let verified = records
            .into_iter()
            .map(|mut r| {
                next = next
                    .checked_add(1)
                    .ok_or_else(|| NodeError::Engine("sequence numbers exhausted".into()))?;
                r.origin = self.0.origin;
                r.seq = next;
                SignedRecord::sign(r, &self.0.key)
                    .and_then(SignedRecord::verify)
                    .map_err(|e| NodeError::Engine(format!("cannot sign a record: {e}")))
            })
            .collect::<Result<Vec<VerifiedRecord>>>()?;
        let outcomes = self.0.store.put(verified.clone())?;
        // Every number up to `next` now names a stored record (a conflict means one was there
        // already): none may be used again.
        *last = next;
        self.0.announced.send_replace(next);
        if let Some(refused) = outcomes
            .iter()
            .find(|o| !matches!(o, PutOutcome::Stored | PutOutcome::Duplicate))
        {
            return Err(NodeError::Engine(format!(
                "the store refused a record: {refused:?}"
            )));
        }
        Ok(verified.into_iter().zip(outcomes).collect())
    }
}
