//! The group-commit writer thread: every record reaches disk through it. It merges every request
//! waiting for it into one synced `WriteBatch`, so concurrent writers share one fsync, and keeps
//! each origin's replication state in memory to detect duplicates and equivocation cheaply.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use metainf_protocol::{HardwareId, PeerId, RecordId, VerifiedRecord, codec};
use rocksdb::{DB, Direction, IteratorMode, ReadOptions, WriteBatch};
use tracing::warn;

use super::{
    CF_BY_ORIGIN, CF_HARDWARE, CF_IDX_METHOD, CF_IDX_MODEL, CF_IDX_WORKLOAD, CF_ORIGINS,
    CF_RECORDS, OriginState, PutOutcome, Result, StoreError, cf, corrupt, keys, synced,
};

/// Most records the writer merges into one batch.
const MAX_GROUP_RECORDS: usize = 16_384;
/// Requests that may wait for the writer before callers block (backpressure).
const WRITE_QUEUE: usize = 256;

/// Records to store, and where to send their outcomes.
pub(super) struct WriteRequest {
    pub(super) records: Vec<VerifiedRecord>,
    pub(super) reply: SyncSender<Result<Vec<PutOutcome>>>,
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
}

impl Writer {
    fn new(db: Arc<DB>) -> Self {
        Self {
            db,
            origins: HashMap::new(),
        }
    }

    fn run(mut self, rx: Receiver<WriteRequest>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            let mut count = group[0].records.len();
            while count < MAX_GROUP_RECORDS {
                match rx.try_recv() {
                    Ok(next) => {
                        count += next.records.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            match self.commit(&group) {
                Ok(outcomes) => {
                    for (req, out) in group.into_iter().zip(outcomes) {
                        let _ = req.reply.send(Ok(out));
                    }
                }
                Err(e) => {
                    // Nothing of the group was written; forget cached state it touched.
                    self.origins.clear();
                    let msg = e.to_string();
                    warn!(error = %msg, records = count, "store write failed; nothing acknowledged");
                    for req in group {
                        let _ = req.reply.send(Err(StoreError::WriteFailed(msg.clone())));
                    }
                }
            }
        }
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
                Some((contiguous, max)) => OriginState { contiguous, max },
                None => {
                    corrupt(CF_ORIGINS, &origin.to_bytes(), "undecodable; rebuilding it");
                    self.rebuild_origin_state(origin)?
                }
            },
            None => OriginState::default(),
        };
        self.origins.insert(*origin, state);
        Ok(state)
    }

    /// Recomputes an origin's state from its `by_origin` entries.
    fn rebuild_origin_state(&self, origin: &PeerId) -> Result<OriginState> {
        let prefix = keys::origin_prefix(origin);
        let mut opts = ReadOptions::default();
        if let Some(upper) = keys::prefix_upper_bound(&prefix) {
            opts.set_iterate_upper_bound(upper);
        }
        let mut state = OriginState::default();
        let iter = self.db.iterator_cf_opt(
            cf(&self.db, CF_BY_ORIGIN),
            opts,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (key, _) = item?;
            if let Some((_, seq)) = keys::parse_origin_seq_key(&key) {
                if seq == state.contiguous + 1 {
                    state.contiguous = seq;
                }
                state.max = state.max.max(seq);
            }
        }
        Ok(state)
    }

    fn commit(&mut self, group: &[WriteRequest]) -> Result<Vec<Vec<PutOutcome>>> {
        let db = Arc::clone(&self.db);
        let (records_cf, by_origin_cf) = (cf(&db, CF_RECORDS), cf(&db, CF_BY_ORIGIN));
        let mut batch = WriteBatch::default();
        // (origin, seq) → record id written in this batch.
        let mut pending: HashMap<(PeerId, u64), RecordId> = HashMap::new();
        let mut touched: HashSet<PeerId> = HashSet::new();
        let mut hardware_written: HashSet<HardwareId> = HashSet::new();
        let mut cells_written: HashSet<keys::KeyCell> = HashSet::new();
        let mut outcomes = Vec::with_capacity(group.len());
        for req in group {
            let mut out = Vec::with_capacity(req.records.len());
            for rec in &req.records {
                let (origin, seq, id, cell) = (rec.origin(), rec.seq(), rec.id(), rec.cell());
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
                // Advance the contiguous prefix over this and any records already stored.
                while state.contiguous < state.max {
                    let next = state.contiguous + 1;
                    let present = pending.contains_key(&(origin, next))
                        || db
                            .get_pinned_cf(by_origin_cf, keys::origin_seq_key(&origin, next))?
                            .is_some();
                    if !present {
                        break;
                    }
                    state.contiguous = next;
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
                    keys::encode_origin_state(state.contiguous, state.max),
                );
            }
        }
        if !batch.is_empty() {
            db.write_opt(batch, &synced())?;
        }
        Ok(outcomes)
    }
}
