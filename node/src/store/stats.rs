//! Counts over the whole store, for operators (`metainf-node tensor stats`).

use std::collections::HashSet;

use metainf_protocol::SignedRecord;
use serde::Serialize;

use super::{ALL_CFS, CF_JOBS, CF_PEERS, CF_RECORDS, Result, SCHEMA_VERSION, Store, corrupt, keys};

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
    /// Origins convicted of equivocation (their records are gone).
    pub convicted: u64,
    /// Values that failed to decode.
    pub corrupt: u64,
    /// Peers known.
    pub peers: u64,
    /// Jobs known.
    pub jobs: u64,
    /// Size of the SST files on disk, bytes.
    pub disk_bytes: u64,
}

impl Store {
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
        stats.convicted = self.convicted()?.len() as u64;
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
}
