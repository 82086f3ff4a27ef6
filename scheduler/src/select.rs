//! Algorithm 2, over hosts as well as methods: score every (host, method) pair with the
//! predictor, add the host's predicted queue wait, price the runtime, drop the pairs over the
//! budget, and choose by the objective. The decision carries the ranked alternatives with
//! their predictions so a user can see why.

use metainf_protocol::{
    HardwareProfile, HostLoad, MethodConfig, ModelDescriptor, Objective, WorkloadDescriptor,
};
use serde::{Deserialize, Serialize};

pub use crate::choice::{Choice, SelectError};
use crate::embed::EmbeddingCache;
use crate::error::Result;
use crate::predictor::{MetaPredictor, Prediction};

/// A host that could run the job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// Its name (the node's peer id).
    pub name: String,
    /// Its hardware.
    pub hardware: HardwareProfile,
    /// Price per hour of compute.
    pub price_per_hour: f64,
    /// Jobs (or, from a serving engine, sequences) waiting in its queue.
    pub queue_depth: u32,
    /// Jobs (or sequences) running on it now.
    pub running_jobs: u32,
    /// Average power draw while running, watts, where known (energy objective).
    pub power_w: Option<f64>,
    /// Live load of its serving engine, where it announces one.
    #[serde(default)]
    pub load: Option<HostLoad>,
    /// How much slower than predicted this host turned out to be, as the routing node measured
    /// it (≥ 1; 1 = as predicted): every prediction for it is scaled by this, so a host whose
    /// records or heartbeats promise more than it delivers is routed as what it delivers.
    #[serde(default = "no_slowdown")]
    pub slowdown: f64,
    /// Prompt tokens of this job its prefix cache would serve (from its cache summary).
    #[serde(default)]
    pub cached_tokens: u64,
}

fn no_slowdown() -> f64 {
    1.0
}

/// How much one more sequence in a batch slows every step, relative to a step's fixed cost:
/// a step of `b` sequences costs `1 + STEP_COST_PER_SEQ · b`. Measured on the 2-core machine of
/// BENCHMARKS.md (a decode step of 4 sequences took 2.2× one sequence's); an engine whose steps
/// are memory-bound (a GPU) shares far more cheaply, which the learned predictor refines.
pub const STEP_COST_PER_SEQ: f64 = 0.67;

/// What one generated token costs in prompt tokens prefilled, for a predictor that has not
/// learned what a cache hit saves: on the 2-core machine of BENCHMARKS.md a single stream
/// prefills ~350 tokens/s and decodes ~45, so a generated token costs about 8 prompt tokens.
pub const DECODE_COST_IN_PROMPT_TOKENS: f64 = 8.0;

/// The share of a job's time alone spent on prefilling its prompts (after in-job prefix
/// sharing), by [`DECODE_COST_IN_PROMPT_TOKENS`].
pub fn prefill_share(w: &WorkloadDescriptor) -> f64 {
    let prompt = w.prompt_tokens.mean.max(0.0) * (1.0 - w.prefix_sharing.clamp(0.0, 1.0));
    let decode = w.max_new_tokens.mean.max(0.0) * DECODE_COST_IN_PROMPT_TOKENS;
    if prompt + decode > 0.0 {
        prompt / (prompt + decode)
    } else {
        0.0
    }
}

/// The share of the prompt tokens `w` computes (after in-job prefix sharing) that
/// `cached_tokens` distinct cached tokens spare it (0..=1).
pub fn cache_saving(w: &WorkloadDescriptor, cached_tokens: u64) -> f64 {
    share_of(
        cached_tokens,
        prompt_total(w) * (1.0 - w.prefix_sharing.clamp(0.0, 1.0)),
    )
}

/// The share of `w`'s prompt tokens that `cached_tokens` are (0..=1).
pub fn cache_share(w: &WorkloadDescriptor, cached_tokens: u64) -> f64 {
    share_of(cached_tokens, prompt_total(w))
}

fn prompt_total(w: &WorkloadDescriptor) -> f64 {
    w.prompt_tokens.mean.max(0.0) * f64::from(w.requests)
}

fn share_of(tokens: u64, total: f64) -> f64 {
    if total > 0.0 {
        (tokens as f64 / total).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

impl Host {
    /// Predicted (wait, runtime) of a job of `seqs` sequences whose runtime alone would be
    /// `alone_s`.
    ///
    /// With a serving engine's load: the job waits while the sequences ahead of it (running
    /// and waiting, and its own past the engine's free places) drain, `max_running` at a time,
    /// each taking its share of the tokens the engine may still generate at its per-sequence
    /// decode rate (or, unannounced, the engine's recent mean sequence time); once in, it shares every step with
    /// the others in the batch, each step costing [`STEP_COST_PER_SEQ`] more per sequence.
    /// Without one: the jobs ahead, each taking as long as this one.
    pub fn predict(&self, seqs: u32, alone_s: f64) -> (f64, f64) {
        match &self.load {
            Some(l) if l.max_running > 0 => {
                let max = u64::from(l.max_running);
                let own = u64::from(seqs.max(1)).min(max);
                let ahead = u64::from(l.running_seqs) + u64::from(l.waiting_seqs);
                // Each sequence ahead takes its share of the work ahead at the engine's
                // per-sequence decode rate, where the host tells both; else its recent mean
                // sequence time (short recent jobs make it optimistic about a long queue).
                let running = f64::from(l.running_seqs.max(1));
                let per_seq = if l.remaining_tokens > 0 && l.decode_tok_s > 0.0 && ahead > 0 {
                    (l.remaining_tokens as f64 / ahead as f64) / (l.decode_tok_s / running)
                } else if l.seq_s > 0.0 {
                    l.seq_s
                } else {
                    alone_s
                };
                let over = (ahead + u64::from(seqs.max(1))).saturating_sub(max);
                let wait = over as f64 / max as f64 * per_seq;
                let others = ahead.min(max - own) as f64;
                let own = own as f64;
                let factor =
                    (1.0 + STEP_COST_PER_SEQ * (own + others)) / (1.0 + STEP_COST_PER_SEQ * own);
                (wait, alone_s * factor)
            }
            _ => {
                let ahead = f64::from(self.queue_depth) + f64::from(self.running_jobs);
                (ahead * alone_s, alone_s)
            }
        }
    }
}

/// What to decide.
#[derive(Clone, Debug)]
pub struct Query<'a> {
    /// The job's workload.
    pub workload: &'a WorkloadDescriptor,
    /// The model.
    pub model: &'a ModelDescriptor,
    /// The candidate hosts.
    pub hosts: &'a [Host],
    /// The candidate methods.
    pub methods: &'a [MethodConfig],
    /// Most the client will pay; `None` is no limit.
    pub budget: Option<f64>,
    /// What to minimise among the feasible pairs.
    pub objective: Objective,
    /// Optimism under uncertainty: pairs are ranked by their runtime scaled by
    /// exp(−explore × uncertainty), so little-known pairs get tried. 0 ranks by the mean.
    pub explore: f64,
}

/// Most alternatives a decision lists.
pub const MAX_ALTERNATIVES: usize = 16;

/// The router's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The chosen pair.
    pub chosen: Choice,
    /// The best feasible pairs, best first (the chosen one included), at most
    /// [`MAX_ALTERNATIVES`].
    pub ranked: Vec<Choice>,
    /// Pairs within the budget.
    pub feasible: usize,
    /// Pairs dropped for exceeding the budget.
    pub over_budget: usize,
}

/// Predicts runtimes for the router. [`MetaPredictor`] is the production model.
pub trait RuntimeModel {
    /// Predictions indexed `[host][method]`.
    fn predict_grid(
        &self,
        workload: &WorkloadDescriptor,
        model: &ModelDescriptor,
        hardware: &[&HardwareProfile],
        methods: &[MethodConfig],
    ) -> Result<Vec<Vec<Prediction>>>;

    /// Whether its predictions see the workload fact `key` (say, a host's cache share);
    /// where not, the caller accounts for it in its own way.
    fn sees(&self, _key: &str) -> bool {
        false
    }
}

/// A [`MetaPredictor`] with the embedding cache its features may need.
pub struct Predictor<'a> {
    /// The trained model.
    pub model: &'a MetaPredictor,
    /// Embeddings for text features (unused with numeric features).
    pub cache: Option<&'a EmbeddingCache>,
}

impl RuntimeModel for Predictor<'_> {
    fn predict_grid(
        &self,
        workload: &WorkloadDescriptor,
        model: &ModelDescriptor,
        hardware: &[&HardwareProfile],
        methods: &[MethodConfig],
    ) -> Result<Vec<Vec<Prediction>>> {
        self.model
            .predict_grid(workload, model, hardware, methods, self.cache)
    }

    fn sees(&self, key: &str) -> bool {
        self.model.features().sees_extra(key)
    }
}

/// Scores every pair and chooses (Algorithm 2).
///
/// Hosts with the same hardware share one prediction (fleets have many identical machines).
/// A host's predicted wait and slowdown come from its engine's live load ([`Host::predict`]).
pub fn select(model: &dyn RuntimeModel, query: &Query<'_>) -> Result<Decision> {
    if query.hosts.is_empty() {
        return Err(SelectError::NoCandidates("hosts").into());
    }
    if query.methods.is_empty() {
        return Err(SelectError::NoCandidates("methods").into());
    }
    // Distinct hardware, by content id: one prediction without the cache per hardware.
    let mut distinct: Vec<&HardwareProfile> = Vec::new();
    let mut ids = Vec::new();
    let mut host_hw = Vec::with_capacity(query.hosts.len());
    for h in query.hosts {
        let id = h.hardware.id()?;
        let idx = match ids.iter().position(|i| *i == id) {
            Some(i) => i,
            None => {
                ids.push(id);
                distinct.push(&h.hardware);
                ids.len() - 1
            }
        };
        host_hw.push(idx);
    }
    let base = model.predict_grid(query.workload, query.model, &distinct, query.methods)?;
    // Only a method with prefix caching reads the host's cache. Its saving is the cached share
    // of the prefill time; a predictor that learned what a hit saves (from served records)
    // also predicts each host with its cached share (hosts of one hardware and share bucket
    // share that prediction), and the lower of the two counts: a young predictor that has seen
    // few hits must not make a cached prefix worth nothing.
    let pc_pos: Vec<Option<usize>> = {
        let mut next = 0;
        query
            .methods
            .iter()
            .map(|m| {
                m.has(metainf_protocol::method::flags::PREFIX_CACHING)
                    .then(|| {
                        next += 1;
                        next - 1
                    })
            })
            .collect()
    };
    let with_cache: Vec<MethodConfig> = query
        .methods
        .iter()
        .zip(&pc_pos)
        .filter(|(_, p)| p.is_some())
        .map(|(m, _)| m.clone())
        .collect();
    let bucket =
        |h: &Host| -> u8 { (cache_share(query.workload, h.cached_tokens) * 10.0).round() as u8 };
    let mut learned: std::collections::HashMap<(usize, u8), Vec<Prediction>> =
        std::collections::HashMap::new();
    if model.sees(crate::served::CACHED_SHARE) && !with_cache.is_empty() {
        let mut by_bucket: std::collections::BTreeMap<u8, Vec<usize>> = Default::default();
        for (hi, h) in query.hosts.iter().enumerate() {
            let b = bucket(h);
            let hws = by_bucket.entry(b).or_default();
            if b > 0 && !hws.contains(&host_hw[hi]) {
                hws.push(host_hw[hi]);
            }
        }
        for (b, hws) in by_bucket {
            if hws.is_empty() {
                continue;
            }
            let w = crate::served::with_cache_share(query.workload, f64::from(b) / 10.0, 0.0);
            let hw: Vec<&HardwareProfile> = hws.iter().map(|&i| distinct[i]).collect();
            let grid = model.predict_grid(&w, query.model, &hw, &with_cache)?;
            for (i, row) in hws.into_iter().zip(grid) {
                learned.insert((i, b), row);
            }
        }
    }
    let prefill = prefill_share(query.workload);
    // Score every pair on plain numbers; only the ranked few become `Choice`s (which clone
    // names and methods).
    struct Scored {
        host: usize,
        method: usize,
        runtime_s: f64,
        wait_s: f64,
        ttft_s: f64,
        cost: f64,
        energy_j: Option<f64>,
        log_std: f64,
    }
    let mut all = Vec::with_capacity(query.hosts.len() * query.methods.len());
    for (hi, host) in query.hosts.iter().enumerate() {
        let hw = host_hw[hi];
        let saving = cache_saving(query.workload, host.cached_tokens);
        let saved = 1.0 - prefill * saving;
        let taught = learned.get(&(hw, bucket(host)));
        for (mi, p) in base[hw].iter().enumerate() {
            let alone = match pc_pos[mi] {
                Some(k) => {
                    let analytic = p.runtime_s() * saved;
                    taught
                        .and_then(|row| row.get(k))
                        .map_or(analytic, |l| analytic.min(l.runtime_s()))
                }
                None => p.runtime_s(),
            };
            let slowdown = if host.slowdown.is_finite() {
                host.slowdown.max(1.0)
            } else {
                1.0
            };
            // The first token comes once the prompt is prefilled: the time alone less its
            // decode part, which no cache shortens (the learned saving included).
            let decode = p.runtime_s() * (1.0 - prefill);
            let first_share = if alone > 0.0 {
                ((alone - decode) / alone).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let (wait_s, runtime_s) = host.predict(query.workload.requests, alone * slowdown);
            all.push(Scored {
                host: hi,
                method: mi,
                runtime_s,
                wait_s,
                ttft_s: wait_s + runtime_s * first_share,
                cost: host.price_per_hour.max(0.0) * runtime_s / 3600.0,
                energy_j: host.power_w.map(|w| w * runtime_s),
                log_std: p.log_std,
            });
        }
    }
    let choice = |s: &Scored| Choice {
        host: s.host,
        host_name: query.hosts[s.host].name.clone(),
        method: query.methods[s.method].clone(),
        runtime_s: s.runtime_s,
        wait_s: s.wait_s,
        ttft_s: s.ttft_s,
        cost: s.cost,
        energy_j: s.energy_j,
        log_std: s.log_std,
        cached_tokens: if pc_pos[s.method].is_some() {
            query.hosts[s.host].cached_tokens
        } else {
            0
        },
    };
    let total = all.len();
    let (mut feasible, over): (Vec<Scored>, Vec<Scored>) = all
        .into_iter()
        .partition(|c| query.budget.is_none_or(|b| c.cost <= b));
    if feasible.is_empty() {
        let cheapest = over
            .iter()
            .min_by(|a, b| {
                a.cost
                    .total_cmp(&b.cost)
                    .then(a.runtime_s.total_cmp(&b.runtime_s))
            })
            .ok_or(SelectError::NoCandidates("pairs"))?;
        return Err(SelectError::OverBudget {
            budget: query.budget.unwrap_or(0.0),
            cheapest: Box::new(choice(cheapest)),
        }
        .into());
    }
    let optimism = |log_std: f64| (-query.explore.max(0.0) * log_std).exp();
    let key = |s: &Scored| -> (f64, f64) {
        let o = optimism(s.log_std);
        let latency = s.wait_s + s.runtime_s;
        match query.objective {
            Objective::Runtime => (latency * o, s.cost),
            Objective::Cost => (s.cost * o, latency),
            // Unknown energy sorts after every known one.
            Objective::Energy => (s.energy_j.map_or(f64::INFINITY, |e| e * o), latency),
            // The wait counts in both: the person waits for the first token and for the end.
            Objective::Interactive => ((s.ttft_s + latency) * o, s.cost),
        }
    };
    let feasible_count = feasible.len();
    let mut keyed: Vec<((f64, f64), Scored)> = feasible.drain(..).map(|s| (key(&s), s)).collect();
    let by_key = |a: &((f64, f64), Scored), b: &((f64, f64), Scored)| {
        a.0.0.total_cmp(&b.0.0).then(a.0.1.total_cmp(&b.0.1))
    };
    let top = MAX_ALTERNATIVES.min(keyed.len());
    if keyed.len() > top {
        keyed.select_nth_unstable_by(top - 1, by_key);
        keyed.truncate(top);
    }
    keyed.sort_by(by_key);
    let ranked: Vec<Choice> = keyed.iter().map(|(_, s)| choice(s)).collect();
    Ok(Decision {
        chosen: ranked[0].clone(),
        feasible: feasible_count,
        over_budget: total - feasible_count,
        ranked,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::error::SchedulerError;
    use metainf_protocol::fixtures;

    /// A model from a function of (hardware, method) → (runtime s, log std) (unit test only).
    struct FnModel<F>(F);
    impl<F: Fn(&HardwareProfile, &MethodConfig) -> (f64, f64)> RuntimeModel for FnModel<F> {
        fn predict_grid(
            &self,
            _: &WorkloadDescriptor,
            _: &ModelDescriptor,
            hardware: &[&HardwareProfile],
            methods: &[MethodConfig],
        ) -> Result<Vec<Vec<Prediction>>> {
            Ok(hardware
                .iter()
                .map(|h| {
                    methods
                        .iter()
                        .map(|m| {
                            let (rt, log_std) = (self.0)(h, m);
                            Prediction {
                                log_runtime: rt.ln(),
                                log_std,
                            }
                        })
                        .collect()
                })
                .collect())
        }
    }

    type Rule = fn(&HardwareProfile, &MethodConfig) -> (f64, f64);

    /// Runtime = 10 s / compute units, halved by continuous batching.
    #[allow(non_upper_case_globals)]
    const Table: FnModel<Rule> = FnModel(|h, m| {
        let rt = 10.0 / f64::from(h.spec.compute_units);
        let cb = if m.has("continuous_batching") {
            0.5
        } else {
            1.0
        };
        (rt * cb, 0.1)
    });

    /// Host with 1 unit: 10 s, certain; 2 units: 12 s, uncertain.
    #[allow(non_upper_case_globals)]
    const Uncertain: FnModel<Rule> = FnModel(|h, _| {
        if h.spec.compute_units == 1 {
            (10.0, 0.0)
        } else {
            (12.0, 0.5)
        }
    });

    fn host(name: &str, units: u32, price: f64, queue: u32) -> Host {
        Host {
            name: name.into(),
            hardware: fixtures::cpu_hardware(units),
            price_per_hour: price,
            queue_depth: queue,
            running_jobs: 0,
            power_w: None,
            load: None,
            slowdown: 1.0,
            cached_tokens: 0,
        }
    }

    #[test]
    fn an_engines_live_load_sets_the_wait_and_the_slowdown() {
        let mut h = host("h", 1, 0.0, 5);
        // Without a live load: the five jobs ahead, each as long as this one.
        assert_eq!(h.predict(1, 2.0), (10.0, 2.0));
        let load = HostLoad {
            running_seqs: 8,
            waiting_seqs: 0,
            max_running: 16,
            kv_blocks_total: 100,
            kv_blocks_used: 10,
            kv_blocks_cached: 0,
            decode_tok_s: 50.0,
            seq_s: 4.0,
            remaining_tokens: 0,
        };
        let c = STEP_COST_PER_SEQ;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        h.load = Some(load);
        // Room for 4 more: no wait, but every step is shared with 8 others.
        let (wait, runtime) = h.predict(4, 2.0);
        assert_eq!(wait, 0.0);
        assert!(
            close(runtime, 2.0 * (1.0 + 12.0 * c) / (1.0 + 4.0 * c)),
            "{runtime}"
        );
        // An idle engine: no wait, no slowdown.
        h.load = Some(HostLoad {
            running_seqs: 0,
            ..load
        });
        assert_eq!(h.predict(4, 2.0), (0.0, 2.0));
        // 12 sequences beside 8: 4 past the free places wait a quarter of a 4 s sequence.
        h.load = Some(load);
        let (wait, _) = h.predict(12, 2.0);
        assert!(close(wait, 1.0), "{wait}");
        // A queue ahead waits too, even for one sequence, and the batch is full.
        h.load = Some(HostLoad {
            running_seqs: 16,
            waiting_seqs: 16,
            ..load
        });
        let (wait, runtime) = h.predict(1, 2.0);
        assert!(close(wait, 4.25), "{wait}");
        // With the work ahead announced: 3,200 tokens over 32 sequences, 64 tokens/s over 16
        // running (4 each): 25 s a sequence, 17 of them past the free places.
        let mut told = h.clone();
        told.load = Some(HostLoad {
            running_seqs: 16,
            waiting_seqs: 16,
            remaining_tokens: 3200,
            decode_tok_s: 64.0,
            ..load
        });
        let (long_wait, _) = told.predict(1, 2.0);
        assert!(close(long_wait, 17.0 / 16.0 * 25.0), "{long_wait}");
        assert!(
            close(runtime, 2.0 * (1.0 + 16.0 * c) / (1.0 + c)),
            "{runtime}"
        );
    }

    #[test]
    fn the_host_holding_a_jobs_prefix_wins_until_it_is_overloaded() {
        // A second turn: 800 prompt tokens, 64 new, one request.
        let mut w = fixtures::workload("chat", 1);
        w.requests = 1;
        w.prompt_tokens.mean = 800.0;
        w.max_new_tokens.mean = 64.0;
        w.prefix_sharing = 0.0;
        let m = fixtures::smollm2();
        let methods = MethodConfig::standard_methods();
        let mut warm = host("warm", 1, 0.0, 0);
        warm.cached_tokens = 768;
        let cold = host("cold", 1, 0.0, 0);
        let hosts = vec![cold.clone(), warm.clone()];
        let q = Query {
            workload: &w,
            model: &m,
            hosts: &hosts,
            methods: &methods,
            budget: None,
            objective: Objective::Runtime,
            explore: 0.0,
        };
        let d = select(&Table, &q).unwrap();
        assert_eq!(d.chosen.host_name, "warm");
        assert!(d.chosen.method.has("prefix_caching"));
        assert_eq!(d.chosen.cached_tokens, 768);
        // A method without prefix caching does not read the cache: no saving.
        let plain = |name: &str| {
            d.ranked
                .iter()
                .find(|c| c.host_name == name && !c.method.has("prefix_caching"))
                .map(|c| (c.method.clone(), c.runtime_s, c.cached_tokens))
        };
        if let (Some(w), Some(c)) = (plain("warm"), plain("cold"))
            && w.0 == c.0
        {
            assert_eq!((w.1, w.2), (c.1, 0));
        }
        // The saving is the cached share of the prefill: 800 / (800 + 8 · 64) of the time is
        // prefill, 96 % of it cached.
        let by = |name: &str| {
            d.ranked
                .iter()
                .find(|c| c.host_name == name && c.method == d.chosen.method)
                .map(|c| c.runtime_s)
                .unwrap()
        };
        let expected = 1.0 - (800.0 / 1312.0) * (768.0 / 800.0);
        assert!((by("warm") / by("cold") - expected).abs() < 1e-9);
        // A predictor that "learned" the cache share but predicts no saving from it (too few
        // hits seen) does not take the saving away.
        struct Blind;
        impl RuntimeModel for Blind {
            fn predict_grid(
                &self,
                w: &WorkloadDescriptor,
                m: &ModelDescriptor,
                hw: &[&HardwareProfile],
                methods: &[MethodConfig],
            ) -> Result<Vec<Vec<Prediction>>> {
                Table.predict_grid(w, m, hw, methods)
            }
            fn sees(&self, _: &str) -> bool {
                true
            }
        }
        let blind = select(&Blind, &q).unwrap();
        assert_eq!(blind.chosen.host_name, "warm");
        assert!((blind.chosen.runtime_s - d.chosen.runtime_s).abs() < 1e-12);
        // The warm host busy with a long queue: the cold one is faster now.
        warm.load = Some(HostLoad {
            running_seqs: 8,
            waiting_seqs: 24,
            max_running: 8,
            kv_blocks_total: 100,
            kv_blocks_used: 90,
            kv_blocks_cached: 10,
            decode_tok_s: 50.0,
            seq_s: 4.0,
            remaining_tokens: 0,
        });
        let hosts = vec![cold, warm];
        let d = select(&Table, &Query { hosts: &hosts, ..q }).unwrap();
        assert_eq!(d.chosen.host_name, "cold");
    }

    #[test]
    fn the_first_token_is_predicted_and_an_interactive_job_weighs_it() {
        // A second turn of 800 prompt tokens, 64 new: a slow host holding 768 of them, and a
        // host three times as fast holding none.
        let mut w = fixtures::workload("chat", 1);
        w.requests = 1;
        w.prompt_tokens.mean = 800.0;
        w.max_new_tokens.mean = 64.0;
        w.prefix_sharing = 0.0;
        let m = fixtures::smollm2();
        let methods: Vec<MethodConfig> = MethodConfig::standard_methods()
            .into_iter()
            .filter(|m| m.has("prefix_caching"))
            .collect();
        let mut warm = host("warm", 1, 0.0, 0);
        warm.cached_tokens = 768;
        let fast = host("fast", 3, 0.0, 0);
        let hosts = vec![warm, fast];
        let q = Query {
            workload: &w,
            model: &m,
            hosts: &hosts,
            methods: &methods,
            budget: None,
            objective: Objective::Runtime,
            explore: 0.0,
        };
        let d = select(&Table, &q).unwrap();
        let of = |d: &Decision, name: &str| {
            d.ranked
                .iter()
                .find(|c| c.host_name == name && c.method == d.chosen.method)
                .cloned()
                .unwrap()
        };
        // Prefill is 800 / 1312 of the time alone; the warm host computes 32 of its 800
        // prompt tokens: its first token comes after 32 / (32 + 512) of its runtime, the fast
        // host's after 800 / 1312 of its own.
        let (warm_c, fast_c) = (of(&d, "warm"), of(&d, "fast"));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b.max(1.0);
        assert!(close(warm_c.ttft_s, warm_c.runtime_s * 32.0 / 544.0));
        assert!(close(fast_c.ttft_s, fast_c.runtime_s * 800.0 / 1312.0));
        // To the end the fast host wins (a third of 10 s against 544 / 1312 of it, both halved
        // by batching alike); to the first token the warm one does by far.
        assert!(fast_c.latency_s() < warm_c.latency_s());
        assert!(warm_c.ttft_s < fast_c.ttft_s / 5.0);
        assert_eq!(d.chosen.host_name, "fast");
        // An interactive job weighs both: the warm host's first token in a fraction of the
        // time outweighs its slower end.
        let i = select(
            &Table,
            &Query {
                objective: Objective::Interactive,
                ..q.clone()
            },
        )
        .unwrap();
        assert_eq!(i.chosen.host_name, "warm");
        // A wait counts into the first token too.
        let mut hosts = hosts.clone();
        hosts[0].queue_depth = 3;
        let i = select(
            &Table,
            &Query {
                objective: Objective::Interactive,
                hosts: &hosts,
                ..q
            },
        )
        .unwrap();
        assert_eq!(i.chosen.host_name, "fast");
        assert!(of(&i, "warm").ttft_s > of(&i, "warm").wait_s);
    }

    #[test]
    fn chooses_fastest_within_budget_and_explains() {
        let w = fixtures::workload("chat", 8);
        let m = fixtures::smollm2();
        let methods = MethodConfig::standard_methods();
        // 4 units at 36/h: cb 1.25 s costs 0.0125; 1 unit at 3.6/h: cb 5 s costs 0.005.
        let hosts = vec![host("big", 4, 36.0, 0), host("small", 1, 3.6, 0)];
        let mut q = Query {
            workload: &w,
            model: &m,
            hosts: &hosts,
            methods: &methods,
            budget: None,
            objective: Objective::Runtime,
            explore: 0.0,
        };
        let d = select(&Table, &q).unwrap();
        assert_eq!(d.chosen.host_name, "big");
        assert!(d.chosen.method.has("continuous_batching"));
        assert_eq!(d.ranked.len(), 16);
        assert_eq!(d.feasible, 16);
        assert!(
            d.ranked
                .windows(2)
                .all(|p| p[0].latency_s() <= p[1].latency_s())
        );
        // A budget that only the small host meets.
        q.budget = Some(0.01);
        let d = select(&Table, &q).unwrap();
        assert_eq!(d.chosen.host_name, "small");
        assert!(d.chosen.cost <= 0.01);
        assert!(d.over_budget > 0);
        // The cost objective.
        q.budget = None;
        q.objective = Objective::Cost;
        let d = select(&Table, &q).unwrap();
        assert_eq!(d.chosen.host_name, "small");
        // A queue in front of the big host: 2 jobs ahead of 1.25 s each (3.75 s < 5 s).
        let busy = vec![host("big", 4, 36.0, 2), host("small", 1, 3.6, 0)];
        q.hosts = &busy;
        q.objective = Objective::Runtime;
        let d = select(&Table, &q).unwrap();
        assert_eq!(d.chosen.host_name, "big");
        assert!((d.chosen.wait_s - 2.5).abs() < 1e-9);
        let busier = vec![host("big", 4, 36.0, 4), host("small", 1, 3.6, 0)];
        q.hosts = &busier;
        assert_eq!(select(&Table, &q).unwrap().chosen.host_name, "small");
        // The big host turned out 5× slower than its records promise (1.25 s predicted, 6.25 s
        // observed): routed as what it delivers, it loses to the small one (5 s).
        let mut lying = vec![host("big", 4, 36.0, 0), host("small", 1, 3.6, 0)];
        lying[0].slowdown = 5.0;
        q.hosts = &lying;
        let d = select(&Table, &q).unwrap();
        assert_eq!(d.chosen.host_name, "small");
        assert!(
            (d.ranked
                .iter()
                .find(|c| c.host_name == "big")
                .unwrap()
                .runtime_s
                - 6.25)
                .abs()
                < 1e-9
        );
        // A nonsense correction (faster than predicted, not a number) is ignored.
        for nonsense in [0.01, f64::NAN] {
            let mut odd = vec![host("big", 4, 36.0, 0), host("small", 1, 3.6, 0)];
            odd[0].slowdown = nonsense;
            let q = Query { hosts: &odd, ..q };
            assert_eq!(select(&Table, &q).unwrap().chosen.host_name, "big");
        }
    }

    #[test]
    fn impossible_budget_names_the_cheapest_option() {
        let w = fixtures::workload("chat", 8);
        let m = fixtures::smollm2();
        let methods = MethodConfig::standard_methods();
        let hosts = vec![host("big", 4, 36.0, 0), host("small", 1, 3.6, 0)];
        let q = Query {
            workload: &w,
            model: &m,
            hosts: &hosts,
            methods: &methods,
            budget: Some(1e-6),
            objective: Objective::Runtime,
            explore: 0.0,
        };
        let err = select(&Table, &q).unwrap_err();
        let SchedulerError::Select(SelectError::OverBudget { cheapest, .. }) = &err else {
            panic!("{err}");
        };
        assert_eq!(cheapest.host_name, "small");
        assert!(err.to_string().contains("cheapest is cb"), "{err}");
        let none = Query { hosts: &[], ..q };
        assert!(select(&Table, &none).is_err());
    }

    #[test]
    fn exploration_tries_the_uncertain_pair() {
        let w = fixtures::workload("chat", 8);
        let m = fixtures::smollm2();
        let methods = vec![MethodConfig::baseline()];
        let hosts = vec![host("known", 1, 1.0, 0), host("unknown", 2, 1.0, 0)];
        let mut q = Query {
            workload: &w,
            model: &m,
            hosts: &hosts,
            methods: &methods,
            budget: None,
            objective: Objective::Runtime,
            explore: 0.0,
        };
        assert_eq!(select(&Uncertain, &q).unwrap().chosen.host_name, "known");
        q.explore = 1.0;
        let d = select(&Uncertain, &q).unwrap();
        assert_eq!(d.chosen.host_name, "unknown");
        assert!((d.chosen.runtime_s - 12.0).abs() < 1e-9);
    }
}
