//! `metainf-node bench`: the profiler's acceleration benchmark on this node's hardware, each
//! run signed as a [`PerfRecord`] and stored as soon as it ends (an interrupted benchmark keeps
//! the runs it finished). Stored records reach peers by gossip and anti-entropy when the node
//! runs.

use std::time::{SystemTime, UNIX_EPOCH};

use metainf_profiler::bench::{BenchRun, Plan, run_plan, total_requests};
use metainf_profiler::engine::{Engine, EngineOptions};
use metainf_profiler::{ProbeOptions, probe};
use metainf_protocol::{
    HardwareProfile, ModelDescriptor, PerfRecord, RecordId, RecordSource, SignedRecord,
};

use crate::config::EngineConfig;
use crate::daemon::Node;
use crate::error::{NodeError, Result};
use crate::store::PutOutcome;

/// Name and version of the engine, written into every record.
pub const ENGINE_NAME: &str = concat!("metainf-candle/", env!("CARGO_PKG_VERSION"), " q8_0");

/// What the benchmark reports while it runs.
#[derive(Debug)]
pub enum BenchEvent<'a> {
    /// The hardware was probed.
    Hardware(&'a HardwareProfile),
    /// A model was loaded; `requests` is the number of requests its plan runs.
    Model {
        /// The model.
        model: &'a ModelDescriptor,
        /// Requests over all runs of the plan.
        requests: usize,
    },
    /// Requests finished so far in this model's plan.
    Progress(usize),
    /// A run ended and its record is stored.
    Run(&'a BenchRun, RecordId),
}

/// One stored run.
#[derive(Clone, Debug)]
pub struct StoredRun {
    /// The model it ran.
    pub model: ModelDescriptor,
    /// The run.
    pub run: BenchRun,
    /// Its record's id.
    pub record: RecordId,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs `plan` for every configured model and stores a signed record per run.
pub fn bench(
    node: &Node,
    engine: &EngineConfig,
    plan: &Plan,
    on_event: &mut dyn FnMut(BenchEvent<'_>),
) -> Result<Vec<StoredRun>> {
    let models = engine.model_paths()?;
    let hardware = probe(&ProbeOptions {
        threads: engine.threads,
        ..ProbeOptions::default()
    })
    .map_err(|e| NodeError::Hardware(e.to_string()))?;
    on_event(BenchEvent::Hardware(&hardware));
    let origin = node.peer_id();
    let mut seq = node.store().origin_state(&origin)?.max;
    let mut stored = Vec::new();
    for path in &models {
        let descriptor =
            metainf_profiler::model::describe(path).map_err(|e| NodeError::Model(e.to_string()))?;
        let engine = Engine::load(
            path,
            EngineOptions {
                threads: engine.threads,
            },
        )
        .map_err(|e| NodeError::Model(e.to_string()))?;
        on_event(BenchEvent::Model {
            model: &descriptor,
            requests: total_requests(plan),
        });
        let mut store_run = |run: &BenchRun| -> Result<RecordId> {
            seq += 1;
            let record = PerfRecord {
                origin,
                seq,
                measured_at_ms: now_ms(),
                hardware: hardware.clone(),
                model: descriptor.clone(),
                workload: run.workload.clone(),
                method: run.method.clone(),
                metrics: run.metrics.clone(),
                source: RecordSource::Benchmark,
                engine: ENGINE_NAME.to_owned(),
            };
            let verified = SignedRecord::sign(record, node.key())
                .and_then(SignedRecord::verify)
                .map_err(|e| NodeError::Engine(format!("cannot sign the record: {e}")))?;
            let id = verified.id();
            match node.store().put(vec![verified])?.first() {
                Some(PutOutcome::Stored | PutOutcome::Duplicate) => Ok(id),
                other => Err(NodeError::Engine(format!(
                    "the store refused the record: {other:?}"
                ))),
            }
        };
        let mut runs = Vec::new();
        let events = std::cell::RefCell::new(&mut *on_event);
        run_plan(
            &engine,
            plan,
            &mut |n| (events.borrow_mut())(BenchEvent::Progress(n)),
            &mut |run| {
                let id = store_run(run).map_err(|e| e.to_string())?;
                (events.borrow_mut())(BenchEvent::Run(run, id));
                runs.push((run.clone(), id));
                Ok(())
            },
        )
        .map_err(|e| NodeError::Engine(e.to_string()))?;
        stored.extend(runs.into_iter().map(|(run, record)| StoredRun {
            model: descriptor.clone(),
            run,
            record,
        }));
    }
    Ok(stored)
}
