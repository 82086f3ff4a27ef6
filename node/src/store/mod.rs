//! The node's RocksDB store: the performance tensor and everything else the node keeps.
//!
//! Column families:
//!
//! | family | key | value |
//! |---|---|---|
//! | `records` | hardware ‖ model ‖ workload ‖ method ‖ record id | the encoded [`SignedRecord`] |
//! | `by_origin` | origin ‖ seq | cell ‖ full record id (anti-entropy, conflict detection) |
//!
//! Ids inside keys are truncated to 128 bits (see `keys::SHORT`).
//! | `idx_model`, `idx_workload`, `idx_method` | id ‖ cell | empty: the cells holding an id, for queries that do not name the hardware |
//! | `origins` | origin | highest contiguous seq ‖ highest seq seen |
//! | `hardware` | hardware id | the encoded [`HardwareProfile`] |
//! | `peers` | peer id | the encoded [`PeerEntry`] |
//! | `jobs` | job id | the encoded [`JobEntry`] |
//! | `meta` | name | schema version, the trained predictor, ... |
//!
//! Writes go through one writer thread that merges every request waiting for it into a single
//! synced `WriteBatch` (group commit): a record is acknowledged only once the WAL holding it is
//! on disk, so it survives SIGKILL and power loss, while concurrent writers share one fsync.

mod error;
mod keys;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use metainf_protocol::{
    ContentId, HardwareId, HardwareProfile, Heartbeat, JobId, JobRequest, JobResult, MethodId,
    ModelId, PeerId, RecordId, SignedRecord, VerifiedRecord, WorkloadId, codec,
};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

pub use error::{Result, StoreError};

/// Schema version of the on-disk layout. Bump it when keys or values change incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

const CF_RECORDS: &str = "records";
const CF_BY_ORIGIN: &str = "by_origin";
const CF_IDX_MODEL: &str = "idx_model";
const CF_IDX_WORKLOAD: &str = "idx_workload";
const CF_IDX_METHOD: &str = "idx_method";
const CF_ORIGINS: &str = "origins";
const CF_HARDWARE: &str = "hardware";
const CF_PEERS: &str = "peers";
const CF_JOBS: &str = "jobs";
const CF_META: &str = "meta";
const ALL_CFS: [&str; 10] = [
    CF_RECORDS,
    CF_BY_ORIGIN,
    CF_IDX_MODEL,
    CF_IDX_WORKLOAD,
    CF_IDX_METHOD,
    CF_ORIGINS,
    CF_HARDWARE,
    CF_PEERS,
    CF_JOBS,
    CF_META,
];
const META_SCHEMA: &[u8] = b"schema_version";

/// Most records the writer merges into one batch.
const MAX_GROUP_RECORDS: usize = 16_384;
/// Requests that may wait for the writer before callers block (backpressure).
const WRITE_QUEUE: usize = 256;

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
}

/// A stored value that failed to decode: reported and skipped, never a panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptEntry {
    /// Column family.
    pub family: &'static str,
    /// Key, hex.
    pub key: String,
    /// Why it failed.
    pub error: String,
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

    fn matches(&self, cell: &keys::KeyCell) -> bool {
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

/// Per-origin replication state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginState {
    /// Every seq in 1..=contiguous is stored.
    pub contiguous: u64,
    /// Highest seq stored (above `contiguous` when there are gaps).
    pub max: u64,
}

/// Counts over the whole store.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    /// Schema version.
    pub schema_version: u32,
    /// Records.
    pub records: u64,
    /// Distinct origins.
    pub origins: u64,
    /// Distinct hardware cells.
    pub hardware: u64,
    /// Distinct models.
    pub models: u64,
    /// Distinct workloads.
    pub workloads: u64,
    /// Distinct methods.
    pub methods: u64,
    /// Distinct (hardware, model, workload, method) cells.
    pub cells: u64,
    /// Origins whose seq range has gaps.
    pub origins_with_gaps: u64,
    /// Values that failed to decode.
    pub corrupt: u64,
    /// Peers known.
    pub peers: u64,
    /// Jobs known.
    pub jobs: u64,
    /// Size of the SST files on disk, bytes.
    pub disk_bytes: u64,
}

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

/// Where a job stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, not yet running.
    Queued,
    /// Running on a host.
    Running {
        /// The host.
        host: PeerId,
    },
    /// Finished.
    Done(Box<JobResult>),
    /// Failed for good.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A job the node accepted, with its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    /// What the client asked for.
    pub request: JobRequest,
    /// Where it stands.
    pub state: JobState,
    /// Last state change, Unix milliseconds.
    pub updated_at_ms: u64,
    /// The router's choice for the current attempt, with its predictions.
    pub route: Option<metainf_scheduler::Choice>,
    /// Hosts tried so far.
    pub attempts: u32,
}

/// A raw key and value from RocksDB.
type KeyValue = (Box<[u8]>, Box<[u8]>);

struct WriteRequest {
    records: Vec<VerifiedRecord>,
    reply: SyncSender<Result<Vec<PutOutcome>>>,
}

struct Inner {
    db: Arc<DB>,
    path: PathBuf,
    writer: Option<SyncSender<WriteRequest>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it has answered every queued request.
        self.writer.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("store writer thread panicked");
        }
    }
}

/// The node's store. Cheap to clone; every clone shares one database and one writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("read_only", &self.inner.writer.is_none())
            .finish()
    }
}

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    opts.set_max_log_file_size(8 << 20);
    opts.set_bytes_per_sync(1 << 20);
    opts
}

fn cf_options() -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Point lookups (dedup, conflict checks, anti-entropy) mostly miss: bloom filters make a
    // miss cost no disk read.
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    opts
}

fn map_open_error(path: &Path, e: rocksdb::Error) -> StoreError {
    let msg = e.to_string();
    if msg.contains("LOCK") || msg.contains("lock") {
        StoreError::Locked {
            path: path.to_owned(),
        }
    } else {
        StoreError::Db(e)
    }
}

fn corrupt(family: &'static str, key: &[u8], error: impl ToString) -> CorruptEntry {
    let entry = CorruptEntry {
        family,
        key: hex::encode(key),
        error: error.to_string(),
    };
    warn!(family, key = %entry.key, error = %entry.error, "skipping a stored value that does not decode");
    entry
}

impl Store {
    /// Opens the store at `path` for reading and writing, creating it if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let exists = path.join("CURRENT").exists();
        if exists {
            let families =
                DB::list_cf(&Options::default(), &path).map_err(|e| map_open_error(&path, e))?;
            if !families.iter().any(|f| f == CF_META) {
                return Err(StoreError::NotAStore {
                    path,
                    reason: "it has no `meta` column family".into(),
                });
            }
        }
        let descriptors = ALL_CFS
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options()));
        let db = DB::open_cf_descriptors(&db_options(), &path, descriptors)
            .map_err(|e| map_open_error(&path, e))?;
        if !has_schema(&db, &path)? {
            if exists && !is_empty(&db)? {
                return Err(StoreError::NotAStore {
                    path,
                    reason: "it holds records but no schema version".into(),
                });
            }
            // New, or created by a process that died before writing the schema version.
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(
                cf(&db, CF_META),
                META_SCHEMA,
                SCHEMA_VERSION.to_be_bytes(),
                &wo,
            )?;
        }
        let db = Arc::new(db);
        let (tx, rx) = sync_channel(WRITE_QUEUE);
        let writer_db = Arc::clone(&db);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || Writer::new(writer_db).run(rx))
            .map_err(StoreError::Thread)?;
        debug!(path = %path.display(), "store opened");
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path,
                writer: Some(tx),
                thread: Some(thread),
            }),
        })
    }

    /// Opens an existing store read-only: works while a node has it open for writing, and sees
    /// the state as of opening.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        if !path.join("CURRENT").exists() {
            return Err(StoreError::Missing { path });
        }
        let families = DB::list_cf(&Options::default(), &path)?;
        for name in ALL_CFS {
            if !families.iter().any(|f| f == name) {
                return Err(StoreError::NotAStore {
                    path,
                    reason: format!("it has no `{name}` column family"),
                });
            }
        }
        let db = DB::open_cf_for_read_only(&Options::default(), &path, ALL_CFS, false)?;
        if !has_schema(&db, &path)? {
            return Err(StoreError::NotAStore {
                path,
                reason: "no schema version".into(),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                db: Arc::new(db),
                path,
                writer: None,
                thread: None,
            }),
        })
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn db(&self) -> &DB {
        &self.inner.db
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        cf(self.db(), name)
    }

    /// Stores verified records durably. Returns one outcome per record, in order, once every
    /// stored record is on disk. Blocks; from async code use [`Store::put_async`].
    pub fn put(&self, records: Vec<VerifiedRecord>) -> Result<Vec<PutOutcome>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let writer = self.inner.writer.as_ref().ok_or(StoreError::ReadOnly)?;
        let (reply, answer) = sync_channel(1);
        writer
            .send(WriteRequest { records, reply })
            .map_err(|_| StoreError::Closed)?;
        answer.recv().map_err(|_| StoreError::Closed)?
    }

    /// [`Store::put`] for async callers: runs on tokio's blocking pool.
    pub async fn put_async(&self, records: Vec<VerifiedRecord>) -> Result<Vec<PutOutcome>> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.put(records))
            .await
            .map_err(|_| StoreError::Closed)?
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

    /// The replication state of every origin.
    pub fn origin_states(&self) -> Result<BTreeMap<PeerId, OriginState>> {
        let mut out = BTreeMap::new();
        for item in self.prefix_iter(CF_ORIGINS, &[]) {
            let (key, value) = item?;
            let parsed = PeerId::from_bytes(&key)
                .ok()
                .zip(keys::decode_origin_state(&value));
            match parsed {
                Some((peer, (contiguous, max))) => {
                    out.insert(peer, OriginState { contiguous, max });
                }
                None => {
                    corrupt(CF_ORIGINS, &key, "undecodable origin state");
                }
            }
        }
        Ok(out)
    }

    /// The replication state of one origin (zero when none of its records is stored).
    pub fn origin_state(&self, origin: &PeerId) -> Result<OriginState> {
        Ok(self
            .db()
            .get_pinned_cf(self.cf(CF_ORIGINS), origin.to_bytes())?
            .and_then(|v| keys::decode_origin_state(&v))
            .map(|(contiguous, max)| OriginState { contiguous, max })
            .unwrap_or_default())
    }

    /// The version vector {origin → highest seq such that every seq up to it is stored}. A peer
    /// that has more of an origin's records sends what lies above; gaps are repaired too, since
    /// the vector never claims a seq it does not have.
    pub fn version_vector(&self) -> Result<BTreeMap<PeerId, u64>> {
        Ok(self
            .origin_states()?
            .into_iter()
            .map(|(peer, state)| (peer, state.contiguous))
            .collect())
    }

    /// The latest profile stored for a hardware id.
    pub fn hardware(&self, id: &HardwareId) -> Result<Option<HardwareProfile>> {
        self.get_decoded(CF_HARDWARE, id.as_bytes())
    }

    /// Every hardware profile known.
    pub fn all_hardware(&self) -> Result<Vec<(HardwareId, HardwareProfile)>> {
        let mut out = Vec::new();
        for item in self.prefix_iter(CF_HARDWARE, &[]) {
            let (key, value) = item?;
            match (ContentId::from_slice(&key), codec::decode(&value)) {
                (Ok(id), Ok(p)) => out.push((id, p)),
                (_, Err(e)) => {
                    corrupt(CF_HARDWARE, &key, e);
                }
                (Err(e), _) => {
                    corrupt(CF_HARDWARE, &key, e);
                }
            }
        }
        Ok(out)
    }

    /// Remembers a peer.
    pub fn put_peer(&self, entry: &PeerEntry) -> Result<()> {
        self.put_small(CF_PEERS, &entry.peer.to_bytes(), entry)
    }

    /// Every peer remembered.
    pub fn peers(&self) -> Result<Vec<PeerEntry>> {
        self.all_decoded(CF_PEERS)
    }

    /// Saves a job's state.
    pub fn put_job(&self, entry: &JobEntry) -> Result<()> {
        self.put_small(CF_JOBS, &entry.request.id.0, entry)
    }

    /// One job.
    pub fn job(&self, id: &JobId) -> Result<Option<JobEntry>> {
        self.get_decoded(CF_JOBS, &id.0)
    }

    /// Every job kept.
    pub fn jobs(&self) -> Result<Vec<JobEntry>> {
        self.all_decoded(CF_JOBS)
    }

    /// Forgets jobs, in one synced batch.
    pub fn delete_jobs(&self, ids: &[JobId]) -> Result<()> {
        if self.inner.writer.is_none() {
            return Err(StoreError::ReadOnly);
        }
        let mut batch = WriteBatch::default();
        for id in ids {
            batch.delete_cf(self.cf(CF_JOBS), id.0);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db().write_opt(batch, &wo)?;
        Ok(())
    }

    /// Stores a named blob in `meta` (for example the trained predictor).
    pub fn put_meta(&self, name: &str, value: &[u8]) -> Result<()> {
        if self.inner.writer.is_none() {
            return Err(StoreError::ReadOnly);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db()
            .put_cf_opt(self.cf(CF_META), meta_key(name), value, &wo)?;
        Ok(())
    }

    /// A named blob from `meta`.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db().get_cf(self.cf(CF_META), meta_key(name))?)
    }

    /// Counts over the whole store (a full scan: for operators, not hot paths).
    pub fn stats(&self) -> Result<StoreStats> {
        let mut stats = StoreStats {
            schema_version: SCHEMA_VERSION,
            ..StoreStats::default()
        };
        let mut models = HashSet::new();
        let mut workloads = HashSet::new();
        let mut methods = HashSet::new();
        let mut hardware = HashSet::new();
        let mut cells = HashSet::new();
        for item in self.prefix_iter(CF_RECORDS, &[]) {
            let (key, value) = item?;
            let cell = keys::cell_of_key(&key);
            match (cell, SignedRecord::from_wire(&value)) {
                (Some(cell), Ok(_)) => {
                    stats.records += 1;
                    hardware.insert(cell.part(0).to_vec());
                    models.insert(cell.part(1).to_vec());
                    workloads.insert(cell.part(2).to_vec());
                    methods.insert(cell.part(3).to_vec());
                    cells.insert(cell);
                }
                (_, Err(e)) => {
                    corrupt(CF_RECORDS, &key, e);
                    stats.corrupt += 1;
                }
                (None, _) => {
                    corrupt(CF_RECORDS, &key, "malformed key");
                    stats.corrupt += 1;
                }
            }
        }
        let origins = self.origin_states()?;
        stats.origins = origins.len() as u64;
        stats.origins_with_gaps = origins.values().filter(|s| s.max > s.contiguous).count() as u64;
        stats.hardware = hardware.len() as u64;
        stats.models = models.len() as u64;
        stats.workloads = workloads.len() as u64;
        stats.methods = methods.len() as u64;
        stats.cells = cells.len() as u64;
        stats.peers = self.prefix_iter(CF_PEERS, &[]).count() as u64;
        stats.jobs = self.prefix_iter(CF_JOBS, &[]).count() as u64;
        stats.disk_bytes = self
            .db()
            .property_int_value(rocksdb::properties::TOTAL_SST_FILES_SIZE)?
            .unwrap_or(0);
        for name in ALL_CFS {
            stats.disk_bytes += self
                .db()
                .property_int_value_cf(self.cf(name), rocksdb::properties::TOTAL_SST_FILES_SIZE)?
                .unwrap_or(0);
        }
        Ok(stats)
    }

    /// Flushes memtables to SST files (writes are already durable through the WAL; this makes
    /// the next open faster).
    pub fn flush(&self) -> Result<()> {
        if self.inner.writer.is_none() {
            return Ok(());
        }
        let cfs: Vec<&ColumnFamily> = ALL_CFS.iter().map(|n| self.cf(n)).collect();
        self.db()
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
        Ok(())
    }

    fn put_small<T: Serialize>(&self, family: &str, key: &[u8], value: &T) -> Result<()> {
        if self.inner.writer.is_none() {
            return Err(StoreError::ReadOnly);
        }
        let bytes = codec::encode(value)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db().put_cf_opt(self.cf(family), key, bytes, &wo)?;
        Ok(())
    }

    fn get_decoded<T: serde::de::DeserializeOwned>(
        &self,
        family: &'static str,
        key: &[u8],
    ) -> Result<Option<T>> {
        match self.db().get_cf(self.cf(family), key)? {
            Some(v) => match codec::decode(&v) {
                Ok(t) => Ok(Some(t)),
                Err(e) => {
                    corrupt(family, key, e);
                    Ok(None)
                }
            },
            None => Ok(None),
        }
    }

    fn all_decoded<T: serde::de::DeserializeOwned>(&self, family: &'static str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for item in self.prefix_iter(family, &[]) {
            let (key, value) = item?;
            match codec::decode(&value) {
                Ok(t) => out.push(t),
                Err(e) => {
                    corrupt(family, &key, e);
                }
            }
        }
        Ok(out)
    }

    fn prefix_iter<'a>(
        &'a self,
        family: &str,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue>> + 'a {
        let mut opts = ReadOptions::default();
        if let Some(upper) = keys::prefix_upper_bound(prefix) {
            opts.set_iterate_upper_bound(upper);
        }
        self.db()
            .iterator_cf_opt(
                self.cf(family),
                opts,
                IteratorMode::From(prefix, Direction::Forward),
            )
            .map(|item| item.map_err(StoreError::from))
    }

    #[cfg(test)]
    pub(crate) fn raw_put(&self, family: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.db().put_cf(self.cf(family), key, value)?;
        Ok(())
    }
}

fn is_empty(db: &DB) -> Result<bool> {
    let cf = cf(db, CF_RECORDS);
    Ok(db
        .iterator_cf(cf, IteratorMode::Start)
        .next()
        .transpose()?
        .is_none())
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut key = b"user/".to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

/// Checks the stored schema version; `false` when none is stored.
fn has_schema(db: &DB, path: &Path) -> Result<bool> {
    match db.get_cf(cf(db, CF_META), META_SCHEMA)? {
        Some(v) => check_schema(path, &v).map(|()| true),
        None => Ok(false),
    }
}

fn check_schema(path: &Path, value: &[u8]) -> Result<()> {
    let found = <[u8; 4]>::try_from(value)
        .map(u32::from_be_bytes)
        .map_err(|_| StoreError::NotAStore {
            path: path.to_owned(),
            reason: "malformed schema version".into(),
        })?;
    if found != SCHEMA_VERSION {
        return Err(StoreError::SchemaMismatch {
            path: path.to_owned(),
            found,
            expected: SCHEMA_VERSION,
        });
    }
    Ok(())
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    // Every family in ALL_CFS is created or checked when the store opens.
    #[allow(clippy::expect_used)]
    db.cf_handle(name)
        .expect("column families are created when the store opens")
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
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo)?;
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests;
