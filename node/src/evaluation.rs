//! The node's side of the scheduler: the text embedder backed by the engine, loading tensors
//! from the store or from files (JSONL records, CSV tables), and CSV import into the store.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use metainf_profiler::engine::{Engine, EngineOptions};
use metainf_protocol::PerfRecord;
use metainf_scheduler::import::{ColumnMap, CsvTable, csv_table};
use metainf_scheduler::{Embedder, SchedulerError};

use crate::error::{NodeError, Result};
use crate::signer::RecordSigner;
use crate::store::Store;
use crate::tensor::ImportReport;

/// Longest description embedded, in tokens.
const MAX_EMBED_TOKENS: usize = 512;

/// Text embeddings from a GGUF model run by the engine: the mean of its final hidden states.
pub struct ModelEmbedder {
    engine: Mutex<Engine>,
    id: String,
}

impl ModelEmbedder {
    /// Loads the model at `path` with `threads` engine threads.
    pub fn load(path: &Path, threads: Option<usize>) -> Result<Self> {
        let descriptor =
            metainf_profiler::model::describe(path).map_err(|e| NodeError::Model(e.to_string()))?;
        let engine = Engine::load(path, EngineOptions { threads })
            .map_err(|e| NodeError::Model(e.to_string()))?;
        Ok(Self {
            engine: Mutex::new(engine),
            id: format!("gguf-mean-pool/{}", descriptor.weights_digest),
        })
    }
}

impl Embedder for ModelEmbedder {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn embed(&self, texts: &[String]) -> metainf_scheduler::Result<Vec<Vec<f32>>> {
        let engine = self
            .engine
            .lock()
            .map_err(|_| SchedulerError::Embed("the engine lock is poisoned".into()))?;
        engine
            .embed(texts, MAX_EMBED_TOKENS)
            .map_err(|e| SchedulerError::Embed(e.to_string()))
    }
}

/// Line numbers of rejected lines, with the reason.
pub type Rejected = Vec<(u64, String)>;

/// Records of a JSONL file of signed records, read and verified as `tensor import` does;
/// invalid lines are returned with their numbers.
pub fn jsonl_records(path: &Path) -> Result<(Vec<PerfRecord>, Rejected)> {
    let file = std::fs::File::open(path).map_err(|e| NodeError::io("cannot open", path, e))?;
    let mut records = Vec::new();
    let (_, invalid) = crate::tensor::read_verified(&mut std::io::BufReader::new(file), |v| {
        records.push(v.into_signed().record);
        Ok::<(), std::io::Error>(())
    })
    .map_err(|e| NodeError::io("cannot read", path, e))?;
    Ok((records, invalid))
}

/// Where a tensor comes from.
#[derive(Clone, Debug)]
pub enum TensorSource {
    /// A file: `.csv` (needs a column map) or JSON lines of signed records.
    File(PathBuf),
    /// The store in a data directory.
    Store(PathBuf),
}

/// Rows of a table that cannot be used: all-or-nothing unless `skip_invalid`, when they are
/// reported (the first few with their lines) and left out.
fn check_rows(table: CsvTable, skip_invalid: bool, what: &str) -> Result<Vec<PerfRecord>> {
    if let Some((line, reason)) = table.rejected.first() {
        if !skip_invalid {
            return Err(NodeError::Scheduler(SchedulerError::Import {
                location: format!("{what} line {line}"),
                reason: format!(
                    "{reason} ({} unusable rows in all; --skip-invalid leaves them out)",
                    table.rejected.len()
                ),
            }));
        }
        for (line, reason) in table.rejected.iter().take(10) {
            tracing::warn!("{what}:{line}: {reason}");
        }
        tracing::warn!(
            "left out {} unusable rows of {what}; {} rows used",
            table.rejected.len(),
            table.records.len()
        );
    }
    Ok(table.records)
}

/// Loads the records of a source. A CSV needs `map`; its records are attributed to a throwaway
/// origin (they are evaluated, not stored). `skip_invalid`: a CSV's unusable rows are
/// reported and left out instead of failing the load.
pub fn load_records(
    source: &TensorSource,
    map: Option<&ColumnMap>,
    skip_invalid: bool,
) -> Result<Vec<PerfRecord>> {
    match source {
        TensorSource::Store(dir) => Ok(Store::open_read_only(dir)?.perf_records()?),
        TensorSource::File(path) if path.extension().is_some_and(|e| e == "csv") => {
            let map = map.ok_or_else(|| {
                NodeError::Scheduler(SchedulerError::invalid_input(
                    "a CSV tensor needs --map hardware=COL,model=COL,method=COL,metric=COL",
                ))
            })?;
            let file =
                std::fs::File::open(path).map_err(|e| NodeError::io("cannot open", path, e))?;
            let origin = metainf_protocol::Keypair::generate_ed25519()
                .public()
                .to_peer_id();
            let table = csv_table(file, map, origin, 1, crate::clock::now_ms())?;
            check_rows(table, skip_invalid, &path.display().to_string())
        }
        TensorSource::File(path) => {
            let (records, invalid) = jsonl_records(path)?;
            for (line, reason) in invalid.iter().take(5) {
                tracing::warn!("{}:{line}: {reason}", path.display());
            }
            if !invalid.is_empty() {
                tracing::warn!(
                    "skipped {} invalid lines of {}",
                    invalid.len(),
                    path.display()
                );
            }
            Ok(records)
        }
    }
}

/// Reads a CSV table through `map`, signs every row as a record of this node
/// (source `imported`) and stores them. Rows are all-or-nothing: a bad row fails the import
/// before anything is stored, unless `skip_invalid`, when bad rows are reported in
/// [`ImportReport::invalid`] and the others stored.
pub fn import_csv(
    signer: &RecordSigner,
    input: impl Read,
    map: &ColumnMap,
    skip_invalid: bool,
) -> Result<ImportReport> {
    // Numbered again by the signer; the parse only needs some origin.
    let table = csv_table(input, map, signer.origin(), 1, crate::clock::now_ms())?;
    let rejected = table.rejected.clone();
    let lines = (table.records.len() + rejected.len()) as u64;
    let records = check_rows(table, skip_invalid, "the table")?;
    let mut report = ImportReport {
        lines,
        invalid: rejected,
        ..ImportReport::default()
    };
    for (_, outcome) in signer.store_all(records)? {
        report.count(&outcome);
    }
    Ok(report)
}
