//! The node's RocksDB store: the performance tensor and everything else the node keeps.
//!
//! Column families:
//!
//! | family | key | value |
//! |---|---|---|
//! | `records` | hardware ‖ model ‖ workload ‖ method ‖ record id | the encoded [`SignedRecord`](metainf_protocol::SignedRecord) |
//! | `by_origin` | origin ‖ seq | cell ‖ full record id (anti-entropy, conflict detection) |
//! | `idx_model`, `idx_workload`, `idx_method` | id ‖ cell | empty: the cells holding an id, for queries that do not name the hardware |
//! | `origins` | origin | highest contiguous seq ‖ highest seq seen |
//! | `hardware` | hardware id | the encoded [`HardwareProfile`](metainf_protocol::HardwareProfile) |
//! | `peers` | peer id | the encoded [`PeerEntry`] |
//! | `jobs` | job id | an opaque value: the jobs module's encoded [`crate::jobs::JobEntry`] |
//! | `meta` | name | schema version, the trained predictor, proofs of equivocation (`evidence/` ‖ origin), ... |
//!
//! Ids inside keys are truncated to 128 bits (see `keys::SHORT`).
//!
//! Records are written by one writer thread (`writer.rs`) that merges every request waiting for
//! it into a single synced `WriteBatch` (group commit): a record is acknowledged only once the
//! WAL holding it is on disk, so it survives SIGKILL and power loss, while concurrent writers
//! share one fsync. The small tables (`tables.rs`) are written directly, each method saying how
//! durable it is; every blocking method has an `_async` form for callers on the async runtime.
//!
//! The files of this module:
//!
//! - `mod.rs`: the [`Store`] handle, opening, the schema check, flushing;
//! - `records.rs`: storing, reading and querying performance records;
//! - `writer.rs`: the group-commit writer thread;
//! - `origins.rs`: per-origin replication state, the version vector, hardware profiles;
//! - `tables.rs`: the peers, jobs and meta tables;
//! - `evidence.rs`: proofs of equivocation and the origins they convict;
//! - `stats.rs`: counts over the whole store;
//! - `keys.rs`, `error.rs`: key layouts and errors.

mod error;
mod evidence;
mod keys;
mod origins;
mod records;
mod stats;
mod tables;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::thread::JoinHandle;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions,
    WriteOptions,
};
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

pub use error::{Result, StoreError};
pub use evidence::PutReport;
pub use origins::OriginState;
pub use records::{OriginPage, PutOutcome, RecordQuery, Scan};
pub use stats::StoreStats;
pub use tables::PeerEntry;

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

/// A raw key and value from RocksDB.
type KeyValue = (Box<[u8]>, Box<[u8]>);

struct Inner {
    db: Arc<DB>,
    path: PathBuf,
    writer: Option<SyncSender<writer::WriteRequest>>,
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

/// Reports (logs) a stored value that does not decode.
fn corrupt(family: &'static str, key: &[u8], error: impl ToString) -> CorruptEntry {
    let entry = CorruptEntry {
        family,
        key: hex::encode(key),
        error: error.to_string(),
    };
    warn!(family, key = %entry.key, error = %entry.error, "skipping a stored value that does not decode");
    entry
}

/// Write options of a write acknowledged only once it is on disk.
fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
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
            db.put_cf_opt(
                cf(&db, CF_META),
                META_SCHEMA,
                SCHEMA_VERSION.to_be_bytes(),
                &synced(),
            )?;
        }
        let upgraded = origins::upgrade_chains(&db)?;
        if upgraded > 0 {
            debug!(
                origins = upgraded,
                "gave the origins of an older store their chain hashes"
            );
        }
        let db = Arc::new(db);
        let (tx, thread) = writer::spawn(Arc::clone(&db))?;
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

    fn db(&self) -> &DB {
        &self.inner.db
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        cf(self.db(), name)
    }

    /// Refuses writes to a store opened read-only.
    fn writable(&self) -> Result<()> {
        match self.inner.writer {
            Some(_) => Ok(()),
            None => Err(StoreError::ReadOnly),
        }
    }

    /// Runs a blocking store call on tokio's blocking pool, on a clone of this handle, so that
    /// async callers never block a runtime worker.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || call(&store))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    fn get_decoded<T: DeserializeOwned>(
        &self,
        family: &'static str,
        key: &[u8],
    ) -> Result<Option<T>> {
        match self.db().get_cf(self.cf(family), key)? {
            Some(v) => match metainf_protocol::codec::decode(&v) {
                Ok(t) => Ok(Some(t)),
                Err(e) => {
                    corrupt(family, key, e);
                    Ok(None)
                }
            },
            None => Ok(None),
        }
    }

    fn all_decoded<T: DeserializeOwned>(&self, family: &'static str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for item in self.prefix_iter(family, &[]) {
            let (key, value) = item?;
            match metainf_protocol::codec::decode(&value) {
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

#[cfg(test)]
mod tests;
