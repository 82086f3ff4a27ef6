//! Learning from use: the router's runtime model, retrained in the background as records
//! arrive (from this node's jobs and benchmarks and from every peer), and the log of recent
//! decisions with their predicted and measured runtimes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};

use metainf_protocol::{HardwareProfile, MethodConfig, ModelDescriptor, WorkloadDescriptor};
use metainf_scheduler::predictor::Prediction;
use metainf_scheduler::select::{Predictor, RuntimeModel};
use metainf_scheduler::{FeatureConfig, GbdtParams, MetaPredictor, Metric, Tensor};
use serde::Serialize;
use tracing::{info, warn};

use crate::store::Store;

/// Name of the trained predictor in the store's `meta` family.
pub const PREDICTOR_META: &str = "predictor";

/// A trained predictor and where it came from.
pub struct Trained {
    /// The model.
    pub predictor: MetaPredictor,
    /// Counts up with every retraining (1 = the first).
    pub generation: u64,
    /// Records in the store when it was trained.
    pub records: u64,
}

/// The current predictor, swapped atomically when a retraining finishes.
#[derive(Default)]
pub struct Learner {
    current: RwLock<Option<Arc<Trained>>>,
    training: Mutex<()>,
}

impl Learner {
    /// Loads the predictor saved in `store`, if any.
    pub fn open(store: &Store) -> Self {
        let learner = Self::default();
        match store.meta(PREDICTOR_META) {
            Ok(Some(bytes)) => match decode_saved(&bytes) {
                Some(t) => {
                    info!(
                        generation = t.generation,
                        records = t.records,
                        "loaded the saved predictor"
                    );
                    learner.set(t);
                }
                None => warn!("the saved predictor is unreadable; it will be retrained"),
            },
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read the saved predictor"),
        }
        learner
    }

    fn set(&self, trained: Trained) {
        if let Ok(mut current) = self.current.write() {
            *current = Some(Arc::new(trained));
        }
    }

    /// The current predictor.
    pub fn current(&self) -> Option<Arc<Trained>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    /// Records the current predictor was trained with (0 without one).
    pub fn trained_records(&self) -> u64 {
        self.current().map_or(0, |t| t.records)
    }

    /// Trains on every record in `store` (blocking: call it off the async runtime), saves the
    /// result in the store and makes it current; `count` is the store's record count as the
    /// caller measures it, kept to decide the next retraining. The tensor is built robustly
    /// ([`Tensor::from_records_robust`]): per origin first, then the origins' weighted median,
    /// weighted by how well each agrees with `trusted` (this node's own records). Returns the
    /// new generation, or `None` when another training is running or there is nothing to train
    /// on.
    pub fn retrain(
        &self,
        store: &Store,
        params: GbdtParams,
        count: u64,
        trusted: Option<libp2p::PeerId>,
    ) -> Result<Option<u64>, String> {
        let _guard = match self.training.try_lock() {
            Ok(guard) => guard,
            // A training that panicked (a learner's bug on some data) poisoned the lock; it
            // must not stop every later one.
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        let records = store.perf_records().map_err(|e| e.to_string())?;
        if records.is_empty() {
            return Ok(None);
        }
        let tensor = Tensor::from_records_robust(records.iter(), Metric::WallTime, trusted)
            .map_err(|e| e.to_string())?;
        if tensor.cells.is_empty() {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let predictor = MetaPredictor::train(&tensor, None, FeatureConfig::default(), params, None)
            .map_err(|e| e.to_string())?;
        let generation = self.current().map_or(0, |t| t.generation) + 1;
        let bytes = predictor.to_bytes().map_err(|e| e.to_string())?;
        let mut saved = Vec::with_capacity(bytes.len() + 16);
        saved.extend_from_slice(&generation.to_le_bytes());
        saved.extend_from_slice(&count.to_le_bytes());
        saved.extend_from_slice(&bytes);
        if let Err(e) = store.put_meta(PREDICTOR_META, &saved) {
            warn!(error = %e, "cannot save the predictor; it is used but not kept");
        }
        info!(
            generation,
            records = records.len(),
            cells = tensor.cells.len(),
            ms = started.elapsed().as_millis() as u64,
            "predictor retrained"
        );
        self.set(Trained {
            predictor,
            generation,
            records: count,
        });
        Ok(Some(generation))
    }
}

fn decode_saved(bytes: &[u8]) -> Option<Trained> {
    let generation = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let records = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    let predictor = MetaPredictor::from_bytes(bytes.get(16..)?).ok()?;
    Some(Trained {
        predictor,
        generation,
        records,
    })
}

/// The runtime model before any record exists: decode-bound generation at a rate that scales
/// with the hardware's measured matmul throughput (or its compute units), prefill 8× faster,
/// methods alike, and very uncertain, so that the first jobs explore.
pub struct Prior;

impl Prior {
    fn runtime_s(
        workload: &WorkloadDescriptor,
        model: &ModelDescriptor,
        hw: &HardwareProfile,
    ) -> f64 {
        // One token costs ~2 FLOP per parameter; CPUs reach a fraction of the measured peak.
        let gflops = hw
            .measured
            .as_ref()
            .map(|m| m.matmul_gflops)
            .filter(|g| *g > 0.0)
            .unwrap_or(10.0 * f64::from(hw.spec.compute_units));
        let flop_per_token = 2.0 * model.parameters.max(1) as f64;
        let decode_tok_s = (0.3 * gflops * 1e9 / flop_per_token).max(1.0);
        let requests = f64::from(workload.requests.max(1));
        let output = requests * workload.max_new_tokens.mean.max(1.0) * 0.6;
        let prompt = requests * workload.prompt_tokens.mean;
        // Batching overlaps requests: the batch decodes at about √requests the single rate.
        (output / (decode_tok_s * requests.sqrt()) + prompt / (8.0 * decode_tok_s)).max(1e-3)
    }
}

impl RuntimeModel for Prior {
    fn predict_grid(
        &self,
        workload: &WorkloadDescriptor,
        model: &ModelDescriptor,
        hardware: &[&HardwareProfile],
        methods: &[MethodConfig],
    ) -> metainf_scheduler::Result<Vec<Vec<Prediction>>> {
        Ok(hardware
            .iter()
            .map(|hw| {
                let p = Prediction {
                    log_runtime: Self::runtime_s(workload, model, hw).ln(),
                    log_std: 1.0,
                };
                vec![p; methods.len()]
            })
            .collect())
    }
}

/// The trained predictor where there is one, else the [`Prior`].
pub struct Current(pub Option<Arc<Trained>>);

impl RuntimeModel for Current {
    fn predict_grid(
        &self,
        workload: &WorkloadDescriptor,
        model: &ModelDescriptor,
        hardware: &[&HardwareProfile],
        methods: &[MethodConfig],
    ) -> metainf_scheduler::Result<Vec<Vec<Prediction>>> {
        match &self.0 {
            Some(t) => Predictor {
                model: &t.predictor,
                cache: None,
            }
            .predict_grid(workload, model, hardware, methods),
            None => Prior.predict_grid(workload, model, hardware, methods),
        }
    }
}

/// One routed job: what was predicted, and what was measured.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionLog {
    /// The job.
    pub job: String,
    /// When it was decided, Unix milliseconds.
    pub at_ms: u64,
    /// Host that ran it (after any retries).
    pub host: String,
    /// Method it ran with.
    pub method: String,
    /// Predicted runtime there, seconds.
    pub predicted_runtime_s: f64,
    /// Predicted queue wait, seconds.
    pub predicted_wait_s: f64,
    /// Predicted cost.
    pub predicted_cost: f64,
    /// Measured runtime, seconds (absent while running or when it failed).
    pub measured_runtime_s: Option<f64>,
    /// |ln(measured / predicted)|: 0.1 is about 10 % off.
    pub abs_log_error: Option<f64>,
    /// Predictor generation that decided (0 = the prior).
    pub predictor_generation: u64,
    /// Pairs within the budget, and over it.
    pub feasible: usize,
    /// Pairs over the budget.
    pub over_budget: usize,
    /// Hosts tried before the one that ran it.
    pub retries: u32,
    /// Error, when the job failed.
    pub error: Option<String>,
}

/// Mean error of the decisions of one predictor generation.
#[derive(Clone, Debug, Serialize)]
pub struct GenerationError {
    /// The generation (0 = the prior).
    pub generation: u64,
    /// Finished jobs it decided.
    pub jobs: usize,
    /// Mean |ln(measured / predicted)|.
    pub mean_abs_log_error: f64,
}

/// Recent decisions, newest last.
pub struct DecisionLogBook {
    entries: Mutex<VecDeque<DecisionLog>>,
    keep: usize,
}

impl DecisionLogBook {
    /// Keeps the last `keep` decisions.
    pub fn new(keep: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            keep: keep.max(1),
        }
    }

    /// Adds a finished (or failed) decision.
    pub fn push(&self, entry: DecisionLog) {
        if let Ok(mut e) = self.entries.lock() {
            if e.len() == self.keep {
                e.pop_front();
            }
            e.push_back(entry);
        }
    }

    /// The last `limit` decisions, newest first.
    pub fn recent(&self, limit: usize) -> Vec<DecisionLog> {
        self.entries
            .lock()
            .map(|e| e.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default()
    }

    /// Mean error per predictor generation, oldest generation first.
    pub fn by_generation(&self) -> Vec<GenerationError> {
        let Ok(entries) = self.entries.lock() else {
            return Vec::new();
        };
        let mut out: Vec<GenerationError> = Vec::new();
        for e in entries.iter() {
            let Some(err) = e.abs_log_error else { continue };
            match out
                .iter_mut()
                .find(|g| g.generation == e.predictor_generation)
            {
                Some(g) => {
                    g.mean_abs_log_error += (err - g.mean_abs_log_error) / (g.jobs + 1) as f64;
                    g.jobs += 1;
                }
                None => out.push(GenerationError {
                    generation: e.predictor_generation,
                    jobs: 1,
                    mean_abs_log_error: err,
                }),
            }
        }
        out.sort_by_key(|g| g.generation);
        out
    }
}

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::JobService;

impl JobService {
    /// Retrains when enough new records have arrived.
    pub(super) async fn retrain_loop(self, shutdown: CancellationToken) {
        let mut tick =
            tokio::time::interval(Duration::from_secs(self.0.config.retrain_check_s.max(1)));
        let mut hourly = tokio::time::interval(Duration::from_secs(3600));
        hourly.tick().await;
        let mut last_training: Option<(Instant, Duration)> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = hourly.tick() => {
                    let service = self.clone();
                    let _ = tokio::task::spawn_blocking(move || service.prune_jobs()).await;
                    continue;
                }
                _ = tick.tick() => {}
            }
            let store = self.0.store.clone();
            let count = tokio::task::spawn_blocking(move || count_records(&store))
                .await
                .unwrap_or(0);
            self.0.records.store(count, Ordering::Relaxed);
            self.0
                .metrics
                .records
                .set(i64::try_from(count).unwrap_or(i64::MAX));
            let trained = self.0.learner.trained_records();
            let due = retrain_due(
                count,
                trained,
                self.0.learner.current().is_some(),
                self.0.config.retrain_after,
            );
            // And training takes at most a fifth of the time: a training of d seconds is
            // followed by at least 4d without one.
            if !due
                || last_training
                    .is_some_and(|(end, took): (Instant, Duration)| end.elapsed() < took * 4)
            {
                continue;
            }
            let started = Instant::now();
            let service = self.clone();
            let done = tokio::task::spawn_blocking(move || {
                service.0.learner.retrain(
                    &service.0.store,
                    GbdtParams::default(),
                    count,
                    Some(service.0.peer_id),
                )
            })
            .await;
            last_training = Some((Instant::now(), started.elapsed()));
            match done {
                Ok(Ok(Some(generation))) => {
                    self.0
                        .metrics
                        .predictor_generation
                        .set(i64::try_from(generation).unwrap_or(i64::MAX));
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => warn!(error = %e, "retraining failed; keeping the current predictor"),
                Err(e) => warn!(error = %e, "retraining panicked; keeping the current predictor"),
            }
        }
    }
}

/// Records in the store, counted as the sum of every origin's contiguous records: a lower
/// bound that a hostile origin cannot inflate (a record with seq `u64::MAX` is valid, and
/// counting the highest seq would make one record count as 2⁶⁴ and trigger retraining at will;
/// `contiguous = n` needs n stored records).
pub(super) fn count_records(store: &Store) -> u64 {
    store
        .origin_states()
        .map(|s| s.values().fold(0u64, |n, o| n.saturating_add(o.contiguous)))
        .unwrap_or(0)
}

/// Whether `count` records call for a new training after one on `trained` records: at least
/// `retrain_after` new ones, and at least a tenth more than last time, so that a flood of
/// records costs each node a training per 10 % growth, not one per `retrain_after` records.
fn retrain_due(count: u64, trained: u64, has_predictor: bool, retrain_after: u64) -> bool {
    if count == 0 {
        return false;
    }
    if !has_predictor {
        return true;
    }
    let step = retrain_after.max(1).max(trained / 10);
    count.saturating_sub(trained) >= step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_with_the_largest_sequence_numbers_do_not_overflow_the_count() {
        use metainf_protocol::{Keypair, SignedRecord, fixtures};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let records = (1u8..=2)
            .map(|i| {
                let key = Keypair::ed25519_from_bytes([i; 32]).unwrap();
                let mut r = fixtures::record(&key, 1, u64::from(i));
                r.seq = u64::MAX;
                SignedRecord::sign(r, &key).unwrap().verify().unwrap()
            })
            .collect();
        store.put(records).unwrap();
        // Neither overflows nor counts a record as 2⁶⁴ of them: seq 1 is missing for both.
        assert_eq!(count_records(&store), 0);
        let key = Keypair::ed25519_from_bytes([1; 32]).unwrap();
        let first = SignedRecord::sign(fixtures::record(&key, 1, 9), &key)
            .unwrap()
            .verify()
            .unwrap();
        store.put(vec![first]).unwrap();
        assert_eq!(count_records(&store), 1);
    }

    #[test]
    fn retraining_slows_down_as_the_tensor_grows() {
        assert!(!retrain_due(0, 0, false, 8));
        assert!(retrain_due(1, 0, false, 8));
        assert!(!retrain_due(7, 0, true, 8));
        assert!(retrain_due(8, 0, true, 8));
        // At a million records, 8 more are not worth a training; 100,000 are.
        assert!(!retrain_due(1_000_008, 1_000_000, true, 8));
        assert!(retrain_due(1_100_000, 1_000_000, true, 8));
        assert!(!retrain_due(u64::MAX, u64::MAX, true, 8));
    }

    #[test]
    fn a_training_that_panicked_does_not_stop_later_ones() {
        use metainf_protocol::{Keypair, SignedRecord, fixtures};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let key = Keypair::ed25519_from_bytes([3; 32]).unwrap();
        let records = (0..16)
            .map(|v| {
                let r = fixtures::record(&key, v + 1, v);
                SignedRecord::sign(r, &key).unwrap().verify().unwrap()
            })
            .collect();
        store.put(records).unwrap();
        let learner = Learner::default();
        // Poison the training lock the way a panicking learner would.
        let poisoned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = learner.training.lock().unwrap();
            panic!("a learner failed");
        }));
        assert!(poisoned.is_err() && learner.training.is_poisoned());
        let generation = learner
            .retrain(&store, GbdtParams::default(), 16, None)
            .unwrap();
        assert_eq!(generation, Some(1));
        assert!(learner.current().is_some());
    }

    fn log(generation: u64, err: f64) -> DecisionLog {
        DecisionLog {
            job: "j".into(),
            at_ms: 0,
            host: "h".into(),
            method: "none".into(),
            predicted_runtime_s: 1.0,
            predicted_wait_s: 0.0,
            predicted_cost: 0.0,
            measured_runtime_s: Some(1.0),
            abs_log_error: Some(err),
            predictor_generation: generation,
            feasible: 1,
            over_budget: 0,
            retries: 0,
            error: None,
        }
    }

    #[test]
    fn the_prior_favours_faster_hardware_and_grows_with_the_work() {
        use metainf_protocol::fixtures;
        let model = fixtures::smollm2();
        let small = fixtures::workload("chat", 4);
        let big = fixtures::workload("chat", 16);
        let (one, four) = (fixtures::cpu_hardware(1), fixtures::cpu_hardware(4));
        let methods = MethodConfig::standard_methods();
        let grid = Prior
            .predict_grid(&small, &model, &[&one, &four], &methods)
            .unwrap();
        assert!(grid[1][0].log_runtime < grid[0][0].log_runtime);
        assert_eq!(grid[0].len(), methods.len());
        let bigger = Prior.predict_grid(&big, &model, &[&one], &methods).unwrap();
        assert!(bigger[0][0].log_runtime > grid[0][0].log_runtime);
        assert!(grid[0][0].log_std >= 1.0, "the prior is uncertain");
    }

    #[test]
    fn the_book_keeps_the_last_entries_and_averages_per_generation() {
        let book = DecisionLogBook::new(3);
        for (g, e) in [(0, 9.0), (0, 1.0), (0, 0.5), (2, 0.1)] {
            book.push(log(g, e));
        }
        let recent = book.recent(10);
        assert_eq!(recent.len(), 3);
        assert_eq!(recent[0].predictor_generation, 2);
        let by = book.by_generation();
        assert_eq!(by.len(), 2);
        assert_eq!(by[0].jobs, 2);
        assert!((by[0].mean_abs_log_error - 0.75).abs() < 1e-12);
        assert!((by[1].mean_abs_log_error - 0.1).abs() < 1e-12);
    }
}
