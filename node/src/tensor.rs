//! `metainf-node tensor`: JSONL export and import of signed records, and statistics.
//!
//! The JSONL format is one [`SignedRecord`] per line, as `serde_json` writes it (peer ids in
//! base58, keys and signatures in hex). Import verifies every record exactly as records from
//! the network are verified, so a file can carry the tensor between nodes without trust.

use std::io::{BufRead, Write};

use metainf_protocol::{SignedRecord, VerifiedRecord};
use serde::Serialize;

use crate::store::{PutOutcome, Store, StoreError};

/// Longest line accepted by import; a signed record is far smaller.
pub const MAX_LINE_BYTES: usize = 1 << 20;
const IMPORT_BATCH: usize = 1000;

/// What an import did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    /// Non-empty lines read.
    pub lines: u64,
    /// Records newly stored.
    pub stored: u64,
    /// Records already present.
    pub duplicates: u64,
    /// Records refused because their origin already signed a different record under that seq.
    pub conflicts: u64,
    /// Lines refused, with their line number and reason.
    pub invalid: Vec<(u64, String)>,
}

impl ImportReport {
    /// Counts one record the store answered for.
    pub(crate) fn count(&mut self, outcome: &PutOutcome) {
        match outcome {
            PutOutcome::Stored => self.stored += 1,
            PutOutcome::Duplicate => self.duplicates += 1,
            PutOutcome::Conflict { .. } | PutOutcome::Convicted => self.conflicts += 1,
        }
    }
}

/// Writes every record as a JSON line. Returns how many were written and how many stored
/// values were skipped because they do not decode.
pub fn export(store: &Store, out: &mut dyn Write) -> Result<(u64, u64), ExportError> {
    let mut written = 0;
    let mut skipped = 0;
    store.for_each_record(|item| -> Result<(), ExportError> {
        match item {
            Ok(record) => {
                serde_json::to_writer(&mut *out, &record).map_err(std::io::Error::other)?;
                out.write_all(b"\n")?;
                written += 1;
            }
            Err(_) => skipped += 1,
        }
        Ok(())
    })?;
    out.flush()?;
    Ok((written, skipped))
}

/// Errors of export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the output failed.
    #[error("cannot write the export: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads JSON lines of signed records with the line-size bound, verifies each, and passes the
/// valid ones to `on_record`. Returns the non-empty lines read and the refused ones (line
/// number, reason). An error of `on_record` stops the read.
pub fn read_verified<E: From<std::io::Error>>(
    input: &mut dyn BufRead,
    mut on_record: impl FnMut(VerifiedRecord) -> Result<(), E>,
) -> Result<(u64, Vec<(u64, String)>), E> {
    let mut lines = 0u64;
    let mut invalid = Vec::new();
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let status = read_bounded_line(input, &mut buf)?;
        if status == LineStatus::Eof {
            break;
        }
        line_no += 1;
        if status == LineStatus::TooLong {
            lines += 1;
            invalid.push((line_no, format!("line longer than {MAX_LINE_BYTES} bytes")));
            continue;
        }
        let text = buf.trim_ascii();
        if text.is_empty() {
            continue;
        }
        lines += 1;
        let parsed = serde_json::from_slice::<SignedRecord>(text)
            .map_err(|e| format!("not a signed record: {e}"))
            .and_then(|r| r.verify().map_err(|e| format!("rejected: {e}")));
        match parsed {
            Ok(v) => on_record(v)?,
            Err(reason) => invalid.push((line_no, reason)),
        }
    }
    Ok((lines, invalid))
}

/// Reads JSON lines, verifies each record and stores the valid ones in batches. Invalid lines
/// are reported with their number and skipped; a failing store write stops the import with an
/// error (what was acknowledged before stays).
pub fn import(store: &Store, input: &mut dyn BufRead) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport::default();
    let mut batch: Vec<VerifiedRecord> = Vec::with_capacity(IMPORT_BATCH);
    let (lines, invalid) = read_verified(input, |v| {
        batch.push(v);
        if batch.len() >= IMPORT_BATCH {
            store_batch(store, &mut batch, &mut report)?;
        }
        Ok::<(), ImportError>(())
    })?;
    store_batch(store, &mut batch, &mut report)?;
    report.lines = lines;
    report.invalid = invalid;
    Ok(report)
}

/// Stores a batch of verified records, counting the outcomes into `report`.
pub(crate) fn store_batch(
    store: &Store,
    batch: &mut Vec<VerifiedRecord>,
    report: &mut ImportReport,
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    for outcome in store.put(std::mem::take(batch))? {
        report.count(&outcome);
    }
    Ok(())
}

#[derive(PartialEq, Eq)]
enum LineStatus {
    Line,
    TooLong,
    Eof,
}

/// Reads one line of at most [`MAX_LINE_BYTES`]; the rest of a longer line is discarded.
fn read_bounded_line(input: &mut dyn BufRead, buf: &mut Vec<u8>) -> std::io::Result<LineStatus> {
    let mut too_long = false;
    let mut any = false;
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok(if !any {
                LineStatus::Eof
            } else if too_long {
                LineStatus::TooLong
            } else {
                LineStatus::Line
            });
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > MAX_LINE_BYTES + 1 {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        input.consume(take);
        if done {
            return Ok(if too_long {
                LineStatus::TooLong
            } else {
                LineStatus::Line
            });
        }
    }
}

/// Errors of import.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Writing to the store failed; records acknowledged before are kept.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the input failed.
    #[error("cannot read the import file: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use metainf_protocol::{Keypair, fixtures};

    #[test]
    fn export_import_round_trip_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path().join("a")).unwrap();
        let k = Keypair::generate_ed25519();
        let records: Vec<_> = (1..=30)
            .map(|s| fixtures::signed(&k, s, s).verify().unwrap())
            .collect();
        a.put(records).unwrap();
        let mut out = Vec::new();
        assert_eq!(export(&a, &mut out).unwrap(), (30, 0));
        let mut text = String::from_utf8(out).unwrap();
        // A tampered line, garbage, a blank line and an overlong line.
        let first = text.lines().next().unwrap().to_owned();
        let tampered = first.replace("\"engine\":\"fixture\"", "\"engine\":\"forged\"");
        assert_ne!(tampered, first);
        text.push_str(&tampered);
        text.push_str("\n{not json}\n\n");
        text.push_str(&"x".repeat(MAX_LINE_BYTES + 10));
        text.push('\n');
        let b = Store::open(dir.path().join("b")).unwrap();
        let report = import(&b, &mut text.as_bytes()).unwrap();
        assert_eq!(report.stored, 30);
        assert_eq!(report.lines, 33);
        let bad_lines: Vec<u64> = report.invalid.iter().map(|(l, _)| *l).collect();
        assert_eq!(bad_lines, vec![31, 32, 34]);
        assert!(
            report.invalid[0].1.contains("signature"),
            "{:?}",
            report.invalid
        );
        // Importing again stores nothing new.
        let again = import(&b, &mut text.as_bytes()).unwrap();
        assert_eq!((again.stored, again.duplicates), (0, 30));
        assert_eq!(b.stats().unwrap().records, 30);
    }
}
