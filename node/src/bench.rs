//! `metainf-node bench`: the profiler's acceleration benchmark on this node's hardware, each
//! run signed as a [`PerfRecord`] and stored as soon as it ends (an interrupted benchmark keeps
//! the runs it finished). Stored records reach peers by gossip and anti-entropy when the node
//! runs.

use metainf_profiler::bench::{BenchRun, Plan, run_plan, total_requests};
use metainf_profiler::engine::{Engine, EngineOptions};
use metainf_profiler::{ProbeOptions, probe};
use metainf_protocol::{HardwareProfile, ModelDescriptor, PerfRecord, RecordId, RecordSource};

use crate::clock::now_ms;
use crate::config::EngineConfig;
use crate::daemon::Node;
use crate::error::{NodeError, Result};
use crate::signer::ENGINE_NAME;

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
    let signer = node.signer()?;
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
        let store_run = |run: &BenchRun| -> Result<RecordId> {
            let record = PerfRecord {
                origin: signer.origin(),
                seq: 0,
                measured_at_ms: now_ms(),
                hardware: hardware.clone(),
                model: descriptor.clone(),
                workload: run.workload.clone(),
                method: run.method.clone(),
                metrics: run.metrics.clone(),
                source: RecordSource::Benchmark,
                engine: ENGINE_NAME.to_owned(),
            };
            let (id, _) = signer
                .store_all(vec![record])?
                .pop()
                .ok_or_else(|| NodeError::Engine("no record stored".into()))?;
            Ok(id)
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
