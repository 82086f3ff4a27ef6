//! Performance records: storing them (through the writer thread), point reads, queries by any
//! combination of cell ids, paging one origin's records for anti-entropy, and full walks.

use std::sync::mpsc::sync_channel;

use metainf_protocol::{
    ContentId, HardwareId, MethodId, ModelId, PeerId, PerfRecord, RecordId, SignedRecord,
    VerifiedRecord, WorkloadId,
};
use rocksdb::{Direction, IteratorMode, ReadOptions};

use super::writer::WriteRequest;
use super::{
    CF_BY_ORIGIN, CF_IDX_METHOD, CF_IDX_MODEL, CF_IDX_WORKLOAD, CF_RECORDS, CorruptEntry, Result,
    Store, StoreError, corrupt, keys,
};

/// What happened to one record offered to [`Store::put`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// New, now durable.
    Stored,
    /// Already stored (same content).
    Duplicate,
    /// The origin already has a *different* record under this seq: equivocation. Not stored.
    Conflict {
        /// The record already stored under (origin, seq).
        existing: RecordId,
    },
    /// The origin is convicted of equivocation: none of its records is accepted.
    Convicted,
}

/// Selects records by any combination of cell ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordQuery {
    /// Only this hardware.
    pub hardware: Option<HardwareId>,
    /// Only this model.
    pub model: Option<ModelId>,
    /// Only this workload.
    pub workload: Option<WorkloadId>,
    /// Only this method.
    pub method: Option<MethodId>,
    /// At most this many records.
    pub limit: Option<usize>,
}

impl RecordQuery {
    fn dims(&self) -> [Option<ContentId>; 4] {
        [self.hardware, self.model, self.workload, self.method]
    }

    pub(super) fn matches(&self, cell: &keys::KeyCell) -> bool {
        self.dims()
            .iter()
            .enumerate()
            .all(|(i, d)| d.is_none_or(|id| keys::short(&id) == cell.part(i)))
    }
}

/// Records found by a scan, and the entries that could not be decoded.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Decoded records, in key order.
    pub records: Vec<SignedRecord>,
    /// Entries skipped because they failed to decode.
    pub corrupt: Vec<CorruptEntry>,
}

/// A page of one origin's records, for anti-entropy.
#[derive(Clone, Debug, Default)]
pub struct OriginPage {
    /// Records in seq order.
    pub records: Vec<SignedRecord>,
    /// Seq to continue after, when more records exist.
    pub next_after: Option<u64>,
    /// Entries skipped because they failed to decode.
    pub corrupt: Vec<CorruptEntry>,
}

impl Store {
    /// Stores verified records durably. Returns one outcome per record, in order, once every
    /// stored record is on disk. Blocks; from async code use [`Store::put_async`].
    pub fn put(&self, records: Vec<VerifiedRecord>) -> Result<Vec<PutOutcome>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let writer = self.inner.writer.as_ref().ok_or(StoreError::ReadOnly)?;
        let (reply, answer) = sync_channel(1);
        writer
            .send(WriteRequest::Records { records, reply })
            .map_err(|_| StoreError::Closed)?;
        answer.recv().map_err(|_| StoreError::Closed)?
    }

    /// [`Store::put`] for async callers: runs on tokio's blocking pool.
    pub async fn put_async(&self, records: Vec<VerifiedRecord>) -> Result<Vec<PutOutcome>> {
        self.blocking(move |store| store.put(records)).await
    }

    /// The record `origin` numbered `seq`, if stored.
    pub fn get_by_origin(&self, origin: &PeerId, seq: u64) -> Result<Option<SignedRecord>> {
        let Some(value) = self
            .db()
            .get_cf(self.cf(CF_BY_ORIGIN), keys::origin_seq_key(origin, seq))?
        else {
            return Ok(None);
        };
        let Some((primary, _)) = keys::parse_origin_value(&value) else {
            corrupt(
                CF_BY_ORIGIN,
                &keys::origin_seq_key(origin, seq),
                "malformed value",
            );
            return Ok(None);
        };
        match self.db().get_cf(self.cf(CF_RECORDS), primary)? {
            Some(v) => match SignedRecord::from_wire(&v) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    corrupt(CF_RECORDS, &primary, e);
                    Ok(None)
                }
            },
            None => Ok(None),
        }
    }

    /// Records matching `query`, in key order. Uses the primary key when the hardware is named,
    /// else the index of the first named dimension, else a full scan.
    pub fn query(&self, query: &RecordQuery) -> Result<Scan> {
        let limit = query.limit.unwrap_or(usize::MAX);
        let mut scan = Scan::default();
        if limit == 0 {
            return Ok(scan);
        }
        if query.hardware.is_some()
            || (query.model.is_none() && query.workload.is_none() && query.method.is_none())
        {
            // Longest leading run of named dimensions is the primary-key prefix.
            let mut prefix = Vec::new();
            for part in [query.hardware, query.model, query.workload, query.method] {
                match part {
                    Some(id) => prefix.extend_from_slice(keys::short(&id)),
                    None => break,
                }
            }
            for item in self.prefix_iter(CF_RECORDS, &prefix) {
                let (key, value) = item?;
                if !keys::cell_of_key(&key).is_some_and(|c| query.matches(&c)) {
                    continue;
                }
                match SignedRecord::from_wire(&value) {
                    Ok(r) => scan.records.push(r),
                    Err(e) => scan.corrupt.push(corrupt(CF_RECORDS, &key, e)),
                }
                if scan.records.len() >= limit {
                    break;
                }
            }
            return Ok(scan);
        }
        let (family, id) = match (query.model, query.workload, query.method) {
            (Some(m), _, _) => (CF_IDX_MODEL, m),
            (None, Some(w), _) => (CF_IDX_WORKLOAD, w),
            (None, None, Some(m)) => (CF_IDX_METHOD, m),
            (None, None, None) => return Ok(scan),
        };
        // The index lists the cells holding the id; each matching cell is a prefix scan.
        let mut cells = Vec::new();
        for item in self.prefix_iter(family, keys::short(&id)) {
            let (key, _) = item?;
            match keys::cell_of_index_key(&key) {
                Some(cell) if query.matches(&cell) => cells.push(cell),
                Some(_) => {}
                None => scan
                    .corrupt
                    .push(corrupt(family, &key, "malformed index key")),
            }
        }
        'cells: for cell in cells {
            for item in self.prefix_iter(CF_RECORDS, &cell.0) {
                let (key, value) = item?;
                match SignedRecord::from_wire(&value) {
                    Ok(r) => scan.records.push(r),
                    Err(e) => scan.corrupt.push(corrupt(CF_RECORDS, &key, e)),
                }
                if scan.records.len() >= limit {
                    break 'cells;
                }
            }
        }
        Ok(scan)
    }

    fn fetch_into(&self, primaries: &mut Vec<Vec<u8>>, scan: &mut Scan) -> Result<()> {
        let cf = self.cf(CF_RECORDS);
        let values = self.db().batched_multi_get_cf(cf, primaries.iter(), false);
        for (key, value) in primaries.iter().zip(values) {
            match value? {
                Some(v) => match SignedRecord::from_wire(&v) {
                    Ok(r) => scan.records.push(r),
                    Err(e) => scan.corrupt.push(corrupt(CF_RECORDS, key, e)),
                },
                None => scan
                    .corrupt
                    .push(corrupt(CF_RECORDS, key, "index entry without a record")),
            }
        }
        primaries.clear();
        Ok(())
    }

    /// Calls `f` for every record in key order, without holding them all in memory. Entries
    /// that fail to decode are passed as `Err` (and logged). The first error `f` returns stops
    /// the walk and is returned.
    pub fn for_each_record<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(std::result::Result<SignedRecord, CorruptEntry>) -> Result<(), E>,
    ) -> Result<(), E> {
        for item in self.prefix_iter(CF_RECORDS, &[]) {
            let (key, value) = item?;
            match SignedRecord::from_wire(&value) {
                Ok(r) => f(Ok(r))?,
                Err(e) => f(Err(corrupt(CF_RECORDS, &key, e)))?,
            }
        }
        Ok(())
    }

    /// Every record that decodes, as the tensor's rows (corrupt entries are logged and
    /// skipped).
    pub fn perf_records(&self) -> Result<Vec<PerfRecord>> {
        let mut out = Vec::new();
        self.for_each_record::<StoreError>(|r| {
            if let Ok(r) = r {
                out.push(r.record);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Up to `limit` records of `origin` with seq above `after`, in seq order.
    pub fn records_after(&self, origin: &PeerId, after: u64, limit: usize) -> Result<OriginPage> {
        let prefix = keys::origin_prefix(origin);
        let start = keys::origin_seq_key(origin, after.saturating_add(1));
        let mut page = OriginPage::default();
        if limit == 0 || after == u64::MAX {
            return Ok(page);
        }
        let mut opts = ReadOptions::default();
        if let Some(upper) = keys::prefix_upper_bound(&prefix) {
            opts.set_iterate_upper_bound(upper);
        }
        let iter = self.db().iterator_cf_opt(
            self.cf(CF_BY_ORIGIN),
            opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut primaries = Vec::new();
        let mut last_seq = after;
        for item in iter {
            let (key, primary) = item?;
            if primaries.len() == limit {
                page.next_after = Some(last_seq);
                break;
            }
            if let Some((_, seq)) = keys::parse_origin_seq_key(&key) {
                last_seq = seq;
            }
            match keys::parse_origin_value(&primary) {
                Some((primary, _)) => primaries.push(primary.to_vec()),
                None => page
                    .corrupt
                    .push(corrupt(CF_BY_ORIGIN, &key, "malformed value")),
            }
        }
        let mut scan = Scan::default();
        self.fetch_into(&mut primaries, &mut scan)?;
        page.records = scan.records;
        page.corrupt = scan.corrupt;
        Ok(page)
    }
}
