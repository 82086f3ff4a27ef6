//! Proofs of equivocation, kept in `meta` under `evidence/` ‖ origin: the proof's wire bytes
//! (the same on every node). Storing one convicts its origin: the writer deletes the origin's
//! records and refuses every later one (see `writer.rs`).

use std::collections::{BTreeMap, HashSet};

use metainf_protocol::{Equivocation, PeerId, VerifiedEquivocation, VerifiedRecord};
use rocksdb::DB;
use tracing::warn;

use super::writer::WriteRequest;
use super::{CF_META, PutOutcome, Result, Store, StoreError, cf, corrupt, keys};

const PREFIX: &[u8] = b"evidence/";

/// The `meta` key of an origin's proof.
pub(super) fn key(origin: &PeerId) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(&origin.to_bytes());
    key
}

fn origin_of(key: &[u8]) -> Option<PeerId> {
    PeerId::from_bytes(key.strip_prefix(PREFIX)?).ok()
}

/// Every convicted origin, read straight from the database (the writer's start).
pub(super) fn convicted_in(db: &DB) -> Result<HashSet<PeerId>> {
    let mut opts = rocksdb::ReadOptions::default();
    if let Some(upper) = keys::prefix_upper_bound(PREFIX) {
        opts.set_iterate_upper_bound(upper);
    }
    let mut out = HashSet::new();
    let iter = db.iterator_cf_opt(
        cf(db, CF_META),
        opts,
        rocksdb::IteratorMode::From(PREFIX, rocksdb::Direction::Forward),
    );
    for item in iter {
        let (key, _) = item?;
        match origin_of(&key) {
            Some(origin) => {
                out.insert(origin);
            }
            None => {
                corrupt(CF_META, &key, "malformed evidence key");
            }
        }
    }
    Ok(out)
}

impl Store {
    /// Stores a proof of equivocation and convicts its origin: its records are deleted and
    /// every later one is refused. Returns `false` when the origin was convicted already.
    pub fn convict(&self, evidence: VerifiedEquivocation) -> Result<bool> {
        let writer = self.inner.writer.as_ref().ok_or(StoreError::ReadOnly)?;
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        writer
            .send(WriteRequest::Convict {
                evidence: Box::new(evidence),
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        answer.recv().map_err(|_| StoreError::Closed)?
    }

    /// [`Store::convict`] for async callers: runs on tokio's blocking pool.
    pub async fn convict_async(&self, evidence: VerifiedEquivocation) -> Result<bool> {
        self.blocking(move |store| store.convict(evidence)).await
    }

    /// Every convicted origin with its proof, in origin order (a proof that no longer decodes
    /// is reported and left out; its origin stays convicted).
    pub fn evidence(&self) -> Result<BTreeMap<PeerId, Equivocation>> {
        let mut out = BTreeMap::new();
        for item in self.prefix_iter(CF_META, PREFIX) {
            let (key, value) = item?;
            match (origin_of(&key), Equivocation::from_wire(&value)) {
                (Some(origin), Ok(proof)) => {
                    out.insert(origin, proof);
                }
                (_, Err(e)) => {
                    corrupt(CF_META, &key, e);
                }
                (None, _) => {
                    corrupt(CF_META, &key, "malformed evidence key");
                }
            }
        }
        Ok(out)
    }

    /// The proof against `origin`, if it is convicted.
    pub fn evidence_of(&self, origin: &PeerId) -> Result<Option<Equivocation>> {
        match self.db().get_cf(self.cf(CF_META), key(origin))? {
            Some(v) => match Equivocation::from_wire(&v) {
                Ok(p) => Ok(Some(p)),
                Err(e) => {
                    corrupt(CF_META, &key(origin), e);
                    Ok(None)
                }
            },
            None => Ok(None),
        }
    }

    /// Every convicted origin.
    pub fn convicted(&self) -> Result<HashSet<PeerId>> {
        convicted_in(self.db())
    }
}

/// What [`Store::put_convicting`] did.
#[derive(Debug, Default)]
pub struct PutReport {
    /// One outcome per record, in order.
    pub outcomes: Vec<PutOutcome>,
    /// Proofs of equivocation this put produced (origins convicted just now).
    pub convicted: Vec<VerifiedEquivocation>,
}

impl Store {
    /// [`Store::put`], then for every record that conflicts with a stored one: the two make a
    /// proof of equivocation, and the origin is convicted ([`Store::convict`]).
    pub fn put_convicting(&self, records: Vec<VerifiedRecord>) -> Result<PutReport> {
        let copies = records.clone();
        let outcomes = self.put(records)?;
        let mut convicted = Vec::new();
        for (record, outcome) in copies.into_iter().zip(&outcomes) {
            if !matches!(outcome, PutOutcome::Conflict { .. }) {
                continue;
            }
            let Some(stored) = self.get_by_origin(&record.origin(), record.seq())? else {
                continue;
            };
            let proof = stored
                .verify()
                .and_then(|stored| VerifiedEquivocation::new(stored, record));
            match proof {
                Ok(proof) => {
                    if self.convict(proof.clone())? {
                        warn!(origin = %proof.origin(), seq = proof.seq(), "origin convicted of equivocation: two records under one seq");
                        convicted.push(proof);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "a stored record does not make a proof with its conflict")
                }
            }
        }
        Ok(PutReport {
            outcomes,
            convicted,
        })
    }

    /// [`Store::put_convicting`] for async callers: runs on tokio's blocking pool.
    pub async fn put_convicting_async(&self, records: Vec<VerifiedRecord>) -> Result<PutReport> {
        self.blocking(move |store| store.put_convicting(records))
            .await
    }
}
