//! The small tables: peers (a cache of what the network layer last heard), jobs (opaque values
//! owned by the jobs module) and meta (named blobs such as the trained predictor).
//!
//! These writes bypass the writer thread: each is one RocksDB write of its own, synced unless
//! its method says otherwise. Every write blocks the calling thread; callers on the async
//! runtime use the `_async` forms, which run the same write on tokio's blocking pool.

use metainf_protocol::{Heartbeat, JobId, PeerId, codec};
use rocksdb::{WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

use super::{CF_JOBS, CF_META, CF_PEERS, Result, Store, corrupt, synced};

/// A known peer, as the network layer last saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// The peer.
    pub peer: PeerId,
    /// Addresses it was reached at.
    pub addrs: Vec<String>,
    /// Last time anything was heard from it, Unix milliseconds.
    pub last_seen_ms: u64,
    /// Its latest heartbeat.
    pub heartbeat: Option<Heartbeat>,
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut key = b"user/".to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

impl Store {
    /// Remembers a peer, in a synced write.
    pub fn put_peer(&self, entry: &PeerEntry) -> Result<()> {
        self.put_small(CF_PEERS, &entry.peer.to_bytes(), entry)
    }

    /// [`Store::put_peer`] for async callers: runs on tokio's blocking pool.
    pub async fn put_peer_async(&self, entry: PeerEntry) -> Result<()> {
        self.blocking(move |store| store.put_peer(&entry)).await
    }

    /// Remembers many peers in one batch that is *not* synced: it costs no fsync, and it
    /// survives the process being killed (it is in the WAL), but an OS crash or a power loss
    /// may lose it. That is fine for the peer table, a cache of heartbeats that the next
    /// heartbeats refill; a later entry of a peer replaces an earlier one, in `entries` too.
    pub fn put_peers(&self, entries: &[PeerEntry]) -> Result<()> {
        self.writable()?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(
                self.cf(CF_PEERS),
                entry.peer.to_bytes(),
                codec::encode(entry)?,
            );
        }
        self.db().write_opt(batch, &WriteOptions::default())?;
        Ok(())
    }

    /// [`Store::put_peers`] for async callers: runs on tokio's blocking pool.
    pub async fn put_peers_async(&self, entries: Vec<PeerEntry>) -> Result<()> {
        self.blocking(move |store| store.put_peers(&entries)).await
    }

    /// Every peer remembered.
    pub fn peers(&self) -> Result<Vec<PeerEntry>> {
        self.all_decoded(CF_PEERS)
    }

    /// Forgets the peers last seen before `before_ms` (Unix milliseconds) and those whose
    /// entries do not decode; returns how many were forgotten. The table is a cache of
    /// heartbeats: without this, every identity ever heard of would stay in it for good.
    pub fn prune_peers(&self, before_ms: u64) -> Result<usize> {
        self.writable()?;
        let mut batch = WriteBatch::default();
        let mut forgotten = 0;
        for item in self.prefix_iter(CF_PEERS, &[]) {
            let (key, value) = item?;
            let stale =
                codec::decode::<PeerEntry>(&value).map_or(true, |e| e.last_seen_ms < before_ms);
            if stale {
                batch.delete_cf(self.cf(CF_PEERS), key);
                forgotten += 1;
            }
        }
        if forgotten > 0 {
            self.db().write_opt(batch, &WriteOptions::default())?;
        }
        Ok(forgotten)
    }

    /// Saves a job's state, in a synced write. The value is opaque to the store: the jobs
    /// module encodes and decodes it (see `crate::jobs::state`).
    pub fn put_job_raw(&self, id: &JobId, value: &[u8]) -> Result<()> {
        self.writable()?;
        self.db()
            .put_cf_opt(self.cf(CF_JOBS), id.0, value, &synced())?;
        Ok(())
    }

    /// [`Store::put_job_raw`] for async callers: runs on tokio's blocking pool.
    pub async fn put_job_raw_async(&self, id: JobId, value: Vec<u8>) -> Result<()> {
        self.blocking(move |store| store.put_job_raw(&id, &value))
            .await
    }

    /// One job's stored value.
    pub fn job_raw(&self, id: &JobId) -> Result<Option<Vec<u8>>> {
        Ok(self.db().get_cf(self.cf(CF_JOBS), id.0)?)
    }

    /// Every job kept, with its stored value, in id order. Entries whose key is not a job id
    /// are reported and skipped.
    pub fn jobs_raw(&self) -> Result<Vec<(JobId, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.prefix_iter(CF_JOBS, &[]) {
            let (key, value) = item?;
            match <[u8; 16]>::try_from(&key[..]) {
                Ok(id) => out.push((JobId(id), value.into_vec())),
                Err(_) => {
                    corrupt(CF_JOBS, &key, "malformed job id");
                }
            }
        }
        Ok(out)
    }

    /// Forgets jobs, in one synced batch.
    pub fn delete_jobs(&self, ids: &[JobId]) -> Result<()> {
        self.writable()?;
        let mut batch = WriteBatch::default();
        for id in ids {
            batch.delete_cf(self.cf(CF_JOBS), id.0);
        }
        self.db().write_opt(batch, &synced())?;
        Ok(())
    }

    /// [`Store::delete_jobs`] for async callers: runs on tokio's blocking pool.
    pub async fn delete_jobs_async(&self, ids: Vec<JobId>) -> Result<()> {
        self.blocking(move |store| store.delete_jobs(&ids)).await
    }

    /// Stores a named blob in `meta` (for example the trained predictor), in a synced write.
    pub fn put_meta(&self, name: &str, value: &[u8]) -> Result<()> {
        self.writable()?;
        self.db()
            .put_cf_opt(self.cf(CF_META), meta_key(name), value, &synced())?;
        Ok(())
    }

    /// [`Store::put_meta`] for async callers: runs on tokio's blocking pool.
    pub async fn put_meta_async(&self, name: String, value: Vec<u8>) -> Result<()> {
        self.blocking(move |store| store.put_meta(&name, &value))
            .await
    }

    /// A named blob from `meta`.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db().get_cf(self.cf(CF_META), meta_key(name))?)
    }

    fn put_small<T: Serialize>(&self, family: &str, key: &[u8], value: &T) -> Result<()> {
        self.writable()?;
        let bytes = codec::encode(value)?;
        self.db()
            .put_cf_opt(self.cf(family), key, bytes, &synced())?;
        Ok(())
    }
}
