//! The group-commit writer thread: every record reaches disk through it. It merges every request
//! waiting for it into one synced `WriteBatch`, so concurrent writers share one fsync, and keeps
//! each origin's replication state in memory to detect duplicates and equivocation cheaply.
//!
//! A conviction (proof that an origin equivocated) goes through it too, alone in its batch: it
//! stores the proof, deletes every record of the origin and its replication state, and from then
//! on the origin's records are refused ([`PutOutcome::Convicted`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use metainf_protocol::{HardwareId, PeerId, RecordId, VerifiedEquivocation, VerifiedRecord, codec};
use rocksdb::{DB, Direction, IteratorMode, ReadOptions, WriteBatch};
use tracing::warn;

use super::{
    CF_BY_ORIGIN, CF_HARDWARE, CF_IDX_METHOD, CF_IDX_MODEL, CF_IDX_WORKLOAD, CF_META, CF_ORIGINS,
    CF_RECORDS, OriginState, PutOutcome, Result, StoreError, cf, corrupt, evidence, keys, synced,
};

/// Most records the writer merges into one batch.
const MAX_GROUP_RECORDS: usize = 16_384;
/// Requests that may wait for the writer before callers block (backpressure).
const WRITE_QUEUE: usize = 256;

/// What the writer is asked to do, and where to send the answer.
pub(super) enum WriteRequest {
    /// Store records; one outcome per record.
    Records {
        records: Vec<VerifiedRecord>,
        reply: SyncSender<Result<Vec<PutOutcome>>>,
    },
    /// Convict an origin; `true` when it was not convicted before.
    Convict {
        evidence: Box<VerifiedEquivocation>,
        reply: SyncSender<Result<bool>>,
    },
}

/// A group of record requests committed together.
struct Group {
    records: Vec<Vec<VerifiedRecord>>,
    replies: Vec<SyncSender<Result<Vec<PutOutcome>>>>,
}

/// Starts the writer thread over `db`. It ends once every sender is dropped, after answering
/// every queued request.
pub(super) fn spawn(db: Arc<DB>) -> Result<(SyncSender<WriteRequest>, JoinHandle<()>)> {
    let (tx, rx) = sync_channel(WRITE_QUEUE);
    let thread = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || Writer::new(db).run(rx))
        .map_err(StoreError::Thread)?;
    Ok((tx, thread))
}

/// The writer thread: merges waiting requests into one synced batch.
struct Writer {
    db: Arc<DB>,
    origins: HashMap<PeerId, OriginState>,
    /// Origins proven to equivocate (their proofs are in `meta`).
    convicted: HashSet<PeerId>,
}

impl Writer {
    fn new(db: Arc<DB>) -> Self {
        let convicted = evidence::convicted_in(&db).unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the convicted origins; their records are accepted until their proof arrives again");
            HashSet::new()
        });
        Self {
            db,
            origins: HashMap::new(),
            convicted,
        }
    }

    fn run(mut self, rx: Receiver<WriteRequest>) {
        let mut held = None;
        loop {
            let first = match held.take() {
                Some(r) => r,
                None => match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                },
            };
            let (records, reply) = match first {
                WriteRequest::Records { records, reply } => (records, reply),
                WriteRequest::Convict { evidence, reply } => {
                    let result = self.convict(&evidence);
                    if let Err(e) = &result {
                        self.origins.clear();
                        warn!(error = %e, origin = %evidence.origin(), "cannot store a conviction");
                    }
                    let _ = reply.send(result);
                    continue;
                }
            };
            let mut count = records.len();
            let mut group = Group {
                records: vec![records],
                replies: vec![reply],
            };
            // Records waiting behind the first join its batch; a conviction waits for the
            // next one.
            while count < MAX_GROUP_RECORDS {
                match rx.try_recv() {
                    Ok(WriteRequest::Records { records, reply }) => {
                        count += records.len();
                        group.records.push(records);
                        group.replies.push(reply);
                    }
                    Ok(convict) => {
                        held = Some(convict);
                        break;
                    }
                    Err(_) => break,
                }
            }
            match self.commit(&group.records) {
                Ok(outcomes) => {
                    for (reply, out) in group.replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(out));
                    }
                }
                Err(e) => {
                    // Nothing of the group was written; forget cached state it touched.
                    self.origins.clear();
                    let msg = e.to_string();
                    warn!(error = %msg, records = count, "store write failed; nothing acknowledged");
                    for reply in group.replies {
                        let _ = reply.send(Err(StoreError::WriteFailed(msg.clone())));
                    }
                }
            }
        }
    }

    /// Stores the proof, then deletes the origin's records and replication state, in one
    /// synced batch. Index entries name cells, not records, and are left.
    fn convict(&mut self, proof: &VerifiedEquivocation) -> Result<bool> {
        let origin = proof.origin();
        if self.convicted.contains(&origin) {
            return Ok(false);
        }
        let db = Arc::clone(&self.db);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&db, CF_META), evidence::key(&origin), proof.to_wire()?);
        let prefix = keys::origin_prefix(&origin);
        let mut opts = ReadOptions::default();
        if let Some(upper) = keys::prefix_upper_bound(&prefix) {
            opts.set_iterate_upper_bound(upper);
        }
        let (records_cf, by_origin_cf) = (cf(&db, CF_RECORDS), cf(&db, CF_BY_ORIGIN));
        for item in db.iterator_cf_opt(
            by_origin_cf,
            opts,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (key, value) = item?;
            if let Some((primary, _)) = keys::parse_origin_value(&value) {
                batch.delete_cf(records_cf, primary);
            }
            batch.delete_cf(by_origin_cf, key);
        }
        batch.delete_cf(cf(&db, CF_ORIGINS), origin.to_bytes());
        db.write_opt(batch, &synced())?;
        self.origins.remove(&origin);
        self.convicted.insert(origin);
        Ok(true)
    }

    fn origin_state(&mut self, origin: &PeerId) -> Result<OriginState> {
        if let Some(s) = self.origins.get(origin) {
            return Ok(*s);
        }
        let state = match self
            .db
            .get_cf(cf(&self.db, CF_ORIGINS), origin.to_bytes())?
        {
            Some(v) => match keys::decode_origin_state(&v) {
                Some((contiguous, max, Some(chain))) => OriginState {
                    contiguous,
                    max,
                    chain,
                },
                // Written before chains existed (the store upgrades these when it opens).
                Some((_, _, None)) => super::origins::scan_origin_state(&self.db, origin)?,
                None => {
                    corrupt(CF_ORIGINS, &origin.to_bytes(), "undecodable; rebuilding it");
                    super::origins::scan_origin_state(&self.db, origin)?
                }
            },
            None => OriginState::default(),
        };
        self.origins.insert(*origin, state);
        Ok(state)
    }

    fn commit(&mut self, group: &[Vec<VerifiedRecord>]) -> Result<Vec<Vec<PutOutcome>>> {
        let db = Arc::clone(&self.db);
        let (records_cf, by_origin_cf) = (cf(&db, CF_RECORDS), cf(&db, CF_BY_ORIGIN));
        let mut batch = WriteBatch::default();
        // (origin, seq) → record id written in this batch.
        let mut pending: HashMap<(PeerId, u64), RecordId> = HashMap::new();
        let mut touched: HashSet<PeerId> = HashSet::new();
        let mut hardware_written: HashSet<HardwareId> = HashSet::new();
        let mut cells_written: HashSet<keys::KeyCell> = HashSet::new();
        let mut outcomes = Vec::with_capacity(group.len());
        for records in group {
            let mut out = Vec::with_capacity(records.len());
            for rec in records {
                let (origin, seq, id, cell) = (rec.origin(), rec.seq(), rec.id(), rec.cell());
                if self.convicted.contains(&origin) {
                    out.push(PutOutcome::Convicted);
                    continue;
                }
                let key_cell = keys::KeyCell::of(&cell);
                let primary = keys::record_key(&key_cell, &id);
                if let Some(existing) = pending.get(&(origin, seq)) {
                    out.push(if *existing == id {
                        PutOutcome::Duplicate
                    } else {
                        PutOutcome::Conflict {
                            existing: *existing,
                        }
                    });
                    continue;
                }
                let origin_key = keys::origin_seq_key(&origin, seq);
                let mut state = self.origin_state(&origin)?;
                // Every stored seq of an origin is at most its `max`, so a higher seq (the
                // common, in-order case) needs no lookup.
                let lookup = if seq <= state.max {
                    db.get_cf(by_origin_cf, &origin_key)?
                } else {
                    None
                };
                if let Some(existing_key) = lookup {
                    let existing = keys::parse_origin_value(&existing_key).map(|(_, id)| id);
                    match existing {
                        Some(e) if e == id => {
                            out.push(PutOutcome::Duplicate);
                            continue;
                        }
                        Some(e) => {
                            out.push(PutOutcome::Conflict { existing: e });
                            continue;
                        }
                        // A malformed index entry: the new record replaces it below.
                        None => {
                            corrupt(CF_BY_ORIGIN, &origin_key, "malformed primary key");
                        }
                    }
                }
                let value = rec.signed().to_wire()?;
                batch.put_cf(records_cf, primary, value);
                batch.put_cf(
                    by_origin_cf,
                    &origin_key,
                    keys::origin_value(&key_cell, &id),
                );
                // Index entries name cells, not records: written once per cell and batch.
                if cells_written.insert(key_cell) {
                    for (family, dim) in
                        [(CF_IDX_MODEL, 1), (CF_IDX_WORKLOAD, 2), (CF_IDX_METHOD, 3)]
                    {
                        batch.put_cf(
                            cf(&db, family),
                            keys::index_key(key_cell.part(dim), &key_cell.0),
                            [],
                        );
                    }
                }
                if hardware_written.insert(cell.hardware) {
                    batch.put_cf(
                        cf(&db, CF_HARDWARE),
                        cell.hardware.as_bytes(),
                        codec::encode(&rec.record().hardware)?,
                    );
                }
                pending.insert((origin, seq), id);
                state.max = state.max.max(seq);
                // Advance the contiguous prefix (and its chain) over this and any records
                // already stored.
                while state.contiguous < state.max {
                    let next = state.contiguous + 1;
                    let id = match pending.get(&(origin, next)) {
                        Some(id) => Some(*id),
                        None => db
                            .get_pinned_cf(by_origin_cf, keys::origin_seq_key(&origin, next))?
                            .and_then(|v| keys::parse_origin_value(&v).map(|(_, id)| id)),
                    };
                    let Some(id) = id else {
                        break;
                    };
                    state.contiguous = next;
                    state.chain = keys::chain_next(&state.chain, &id);
                }
                self.origins.insert(origin, state);
                touched.insert(origin);
                out.push(PutOutcome::Stored);
            }
            outcomes.push(out);
        }
        for origin in &touched {
            if let Some(state) = self.origins.get(origin) {
                batch.put_cf(
                    cf(&db, CF_ORIGINS),
                    origin.to_bytes(),
                    keys::encode_origin_state(state.contiguous, state.max, &state.chain),
                );
            }
        }
        if !batch.is_empty() {
            db.write_opt(batch, &synced())?;
        }
        Ok(outcomes)
    }
}
