//! The acceleration benchmark: every (workload, method) pair of a plan run on the engine, each
//! run summarised as the [`Metrics`] of a performance record.

use metainf_protocol::{Arrival, MethodConfig, Metrics, Percentiles, WorkloadDescriptor};

use crate::engine::{Engine, MethodSettings, Request, RunReport, Sampling};
use crate::error::{ProfilerError, Result};
use crate::workload::{Preset, Workload, generate};

/// How big a benchmark is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Small workloads with capped lengths: every method on every preset in under two minutes
    /// on two cores.
    Quick,
    /// The sweep that fills the performance tensor: every preset in three variants (the quick
    /// shape, twice the requests, and the other arrival pattern), each its own workload cell.
    /// About 8 minutes per hardware setting on two cores.
    Full,
    /// The presets at their natural lengths (minutes per pair on a CPU).
    Natural,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Workload presets.
    pub workloads: Vec<Preset>,
    /// Methods.
    pub methods: Vec<MethodSettings>,
    /// Quick, full or natural.
    pub size: Size,
    /// Seed of the workload generator.
    pub seed: u64,
}

impl Plan {
    /// Every preset × the eight standard methods.
    pub fn standard(size: Size) -> Self {
        Self {
            workloads: Preset::ALL.to_vec(),
            methods: MethodConfig::standard_methods()
                .iter()
                .filter_map(|m| MethodSettings::from_method(m).ok())
                .collect(),
            size,
            seed: 42,
        }
    }

    /// Number of runs.
    pub fn runs(&self) -> usize {
        self.workloads
            .iter()
            .map(|&p| workloads_for(p, self.size, self.seed).len())
            .sum::<usize>()
            * self.methods.len()
    }
}

/// The quick shape of a preset: (requests, output cap, prompt cap in characters, arrival).
/// The presets' shapes (shared prefixes, long versus short prompts and outputs) at a fraction
/// of their size. Long documents arrive one by one while earlier ones decode, the case chunked
/// prefill is for.
fn quick_shape(preset: Preset) -> (usize, u32, usize, Arrival) {
    match preset {
        Preset::Chat => (6, 16, usize::MAX, Arrival::AllAtOnce),
        Preset::MultiTurn => (4, 8, usize::MAX, Arrival::AllAtOnce),
        Preset::FewShot => (4, 6, usize::MAX, Arrival::AllAtOnce),
        Preset::Summarise => (3, 16, 1000, Arrival::Poisson { rate_per_s: 1.5 }),
        Preset::Reasoning => (2, 32, usize::MAX, Arrival::AllAtOnce),
    }
}

fn capped(
    preset: Preset,
    n: usize,
    cap: u32,
    chars: usize,
    arrival: Arrival,
    seed: u64,
) -> Workload {
    let mut w = generate(preset, n, arrival, seed);
    for r in &mut w.requests {
        r.max_new_tokens = r.max_new_tokens.min(cap);
        for m in &mut r.messages {
            if m.content.len() > chars {
                let mut end = chars;
                while !m.content.is_char_boundary(end) {
                    end -= 1;
                }
                m.content.truncate(end);
            }
        }
    }
    w
}

/// The workloads a preset gives at a size.
pub fn workloads_for(preset: Preset, size: Size, seed: u64) -> Vec<Workload> {
    match size {
        Size::Natural => {
            let (n, arrival) = match preset {
                Preset::Chat => (32, Arrival::AllAtOnce),
                Preset::MultiTurn => (16, Arrival::AllAtOnce),
                Preset::FewShot => (16, Arrival::AllAtOnce),
                Preset::Summarise => (8, Arrival::Poisson { rate_per_s: 0.5 }),
                Preset::Reasoning => (8, Arrival::AllAtOnce),
            };
            vec![generate(preset, n, arrival, seed)]
        }
        Size::Quick => {
            let (n, cap, chars, arrival) = quick_shape(preset);
            vec![capped(preset, n, cap, chars, arrival, seed)]
        }
        Size::Full => {
            let (n, cap, chars, arrival) = quick_shape(preset);
            // Requests arriving one by one where the quick shape has them all at once, and
            // the other way round.
            let other = match arrival {
                Arrival::AllAtOnce => Arrival::Poisson { rate_per_s: 2.0 },
                Arrival::Poisson { .. } => Arrival::AllAtOnce,
            };
            vec![
                capped(preset, n, cap, chars, arrival.clone(), seed),
                capped(preset, 2 * n, cap, chars, arrival, seed + 1),
                capped(preset, n, cap, chars, other, seed + 2),
            ]
        }
    }
}

/// Tokenizes a generated workload into engine requests (greedy, the model's stop tokens).
pub fn requests_for(engine: &Engine, workload: &Workload) -> Result<Vec<Request>> {
    let tok = engine.model().tokenizer();
    workload
        .requests
        .iter()
        .map(|r| {
            Ok(Request {
                prompt: tok.encode(&tok.chat_prompt(&r.messages)?)?,
                max_tokens: r.max_new_tokens,
                stop: tok.stop_ids().to_vec(),
                sampling: Sampling::default(),
                arrival_s: r.arrival_s,
            })
        })
        .collect()
}

/// The descriptor of a workload's requests.
pub fn describe(
    preset: Option<&str>,
    requests: &[Request],
    arrival: Arrival,
) -> WorkloadDescriptor {
    let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
    let max_new: Vec<u32> = requests.iter().map(|r| r.max_tokens).collect();
    let temperature = requests
        .first()
        .map_or(0.0, |r| f64::from(r.sampling.temperature));
    WorkloadDescriptor::from_prompts(
        preset.map(str::to_owned),
        &prompts,
        &max_new,
        arrival,
        temperature,
    )
}

fn percentiles(mut values_ms: Vec<f64>) -> Percentiles {
    if values_ms.is_empty() {
        return Percentiles::default();
    }
    values_ms.sort_by(f64::total_cmp);
    // Nearest rank: the smallest value with at least q of the values at or below it.
    let at = |q: f64| {
        let rank = (q * values_ms.len() as f64).ceil() as usize;
        values_ms[rank.clamp(1, values_ms.len()) - 1]
    };
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
    }
}

/// The record metrics of a run.
pub fn metrics(report: &RunReport) -> Result<Metrics> {
    let mut ttft = Vec::new();
    let mut itl = Vec::new();
    for c in &report.completions {
        if let Some(t) = c.ttft_s() {
            ttft.push(t * 1000.0);
        }
        itl.extend(c.token_times_s.windows(2).map(|w| (w[1] - w[0]) * 1000.0));
    }
    let wall = report.wall_s.max(1e-6);
    let output = report.output_tokens();
    let m = Metrics {
        wall_time_s: wall,
        requests: u32::try_from(report.completions.len()).unwrap_or(u32::MAX),
        prompt_tokens: report.prompt_tokens,
        output_tokens: output,
        throughput_tok_s: output as f64 / wall,
        ttft_ms: percentiles(ttft),
        itl_ms: percentiles(itl),
        peak_kv_bytes: report.peak_kv_bytes,
        energy_j: None,
        cost: None,
    };
    m.validate()
        .map_err(|e| ProfilerError::Measure(format!("run produced invalid metrics: {e}")))?;
    Ok(m)
}

/// One finished (workload, method) run.
#[derive(Clone, Debug)]
pub struct BenchRun {
    /// The preset.
    pub preset: Preset,
    /// The method, parameters included.
    pub method: MethodConfig,
    /// The workload as the records describe it.
    pub workload: WorkloadDescriptor,
    /// What was measured.
    pub metrics: Metrics,
    /// Prefix-cache hits (blocks).
    pub prefix_hits: u64,
}

/// Runs a plan. `on_progress(done_requests)` is called as requests finish over all runs
/// ([`total_requests`] is the total); `on_run` gets each run as it ends, and an error it
/// returns stops the plan.
pub fn run_plan(
    engine: &Engine,
    plan: &Plan,
    on_progress: &mut dyn FnMut(usize),
    on_run: &mut dyn FnMut(&BenchRun) -> std::result::Result<(), String>,
) -> Result<Vec<BenchRun>> {
    let mut runs = Vec::with_capacity(plan.runs());
    let mut done_before = 0;
    let workloads = plan.workloads.iter().flat_map(|&p| {
        workloads_for(p, plan.size, plan.seed)
            .into_iter()
            .map(move |w| (p, w))
    });
    for (preset, workload) in workloads {
        let requests = requests_for(engine, &workload)?;
        let descriptor = describe(Some(preset.name()), &requests, workload.arrival.clone());
        for method in &plan.methods {
            let report = engine
                .run_with_progress(&requests, method, &mut |n| on_progress(done_before + n))?;
            done_before += requests.len();
            let run = BenchRun {
                preset,
                method: method.to_method(),
                workload: descriptor.clone(),
                metrics: metrics(&report)?,
                prefix_hits: report.kv.hits,
            };
            on_run(&run).map_err(ProfilerError::Measure)?;
            runs.push(run);
        }
    }
    Ok(runs)
}

/// Requests a plan runs in all.
pub fn total_requests(plan: &Plan) -> usize {
    plan.workloads
        .iter()
        .flat_map(|&p| workloads_for(p, plan.size, plan.seed))
        .map(|w| w.requests.len() * plan.methods.len())
        .sum()
}
