//! The evaluation harness: the paper's Table 4 columns (selection accuracy, macro F1,
//! acceleration ratio), Fig. 3's mean rank of the true best, and regret against the oracle,
//! for every selector, on random splits or with whole hardware profiles, models or workloads
//! held out (the zero-shot setting of Table 5).
//!
//! Honest by construction: per fold, the feature space (vocabularies, SVD) and every learner
//! are fitted on the training cells only; test cells are scored once, by the fold that holds
//! them out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::dataset::Tensor;
use crate::embed::EmbeddingCache;
use crate::error::{Result, SchedulerError};
use crate::features::{FeatureConfig, FeatureSpace};
use crate::robust::{EntityIds, Z80};
use crate::selectors::{SelectorKind, TrainSet};
pub use crate::split::{Split, folds};

/// Pricing for the budget column: cost = price per compute-unit hour × compute units ×
/// runtime.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Most a cell's job may cost.
    pub limit: f64,
    /// Price of one compute unit (thread or SM) for an hour.
    pub price_per_unit_hour: f64,
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// How folds are made.
    pub split: Split,
    /// Number of folds (grouped splits use at most one fold per group).
    pub folds: usize,
    /// Seed of the random split.
    pub seed: u64,
    /// Features.
    pub features: FeatureConfig,
    /// Selectors to compare.
    pub selectors: Vec<SelectorKind>,
    /// Optional budget.
    pub budget: Option<Budget>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            split: Split::Random,
            folds: 5,
            seed: 42,
            features: FeatureConfig::default(),
            selectors: SelectorKind::ALL.to_vec(),
            budget: None,
        }
    }
}

/// One selector's row of the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelectorScore {
    /// Selector name.
    pub selector: String,
    /// Share of test cells where the chosen method was the true best.
    pub accuracy: f64,
    /// Macro-averaged F1 over the best-method classes.
    pub macro_f1: f64,
    /// Mean over cells of (mean runtime of all methods) / (runtime of the chosen method).
    pub acceleration: f64,
    /// Mean 1-based rank of the true best in the selector's ordering.
    pub mean_rank: f64,
    /// Mean over cells of runtime(chosen) / runtime(best) − 1.
    pub regret: f64,
    /// Share of cells where the chosen method is within 5 % of the best runtime: accuracy
    /// that does not count measurement noise between near-ties as a miss.
    pub near_best: f64,
    /// With a budget: share of cells where a choice was made and its measured cost fits.
    pub feasible: Option<f64>,
    /// For selectors that predict runtimes with an uncertainty: share of held-out
    /// measurements inside the predicted 80 % interval (ln runtime ± 1.28 σ).
    #[serde(default)]
    pub coverage_80: Option<f64>,
    /// Seconds spent fitting and scoring, over all folds.
    pub seconds: f64,
    /// Why the selector failed, if it did in any fold (its other columns then cover the
    /// folds where it worked).
    pub error: Option<String>,
}

/// The evaluation's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The split.
    pub split: Split,
    /// Folds actually run.
    pub folds: usize,
    /// Test cells scored (each once).
    pub cells: usize,
    /// Methods in the tensor.
    pub methods: usize,
    /// Distinct best methods among the test cells.
    pub distinct_best: usize,
    /// Features used.
    pub features: FeatureConfig,
    /// What described each entity kind (in the first fold; `auto` decides per fold).
    #[serde(default)]
    pub choices: BTreeMap<String, String>,
    /// What MetaInf's gate kept in each fold.
    #[serde(default)]
    pub gates: Vec<String>,
    /// One row per selector, then the oracle.
    pub rows: Vec<SelectorScore>,
}

#[derive(Default)]
struct Tally {
    correct: usize,
    n: usize,
    accel: f64,
    rank: f64,
    regret: f64,
    near: usize,
    feasible: usize,
    pairs: Vec<(usize, usize)>,
    seconds: f64,
    error: Option<String>,
    covered: usize,
    intervals: usize,
}

impl Tally {
    fn score(&self, name: &str, budget: bool) -> SelectorScore {
        if self.n == 0 {
            // Failed in every fold: no numbers rather than zeros (NaN prints as "NaN" and
            // serialises as null).
            return SelectorScore {
                selector: name.to_owned(),
                accuracy: f64::NAN,
                macro_f1: f64::NAN,
                acceleration: f64::NAN,
                mean_rank: f64::NAN,
                regret: f64::NAN,
                near_best: f64::NAN,
                feasible: budget.then_some(f64::NAN),
                coverage_80: None,
                seconds: self.seconds,
                error: self.error.clone(),
            };
        }
        let n = self.n as f64;
        SelectorScore {
            selector: name.to_owned(),
            accuracy: self.correct as f64 / n,
            macro_f1: macro_f1(&self.pairs),
            acceleration: self.accel / n,
            mean_rank: self.rank / n,
            regret: self.regret / n,
            near_best: self.near as f64 / n,
            feasible: budget.then(|| self.feasible as f64 / n),
            coverage_80: (self.intervals > 0).then(|| self.covered as f64 / self.intervals as f64),
            seconds: self.seconds,
            error: self.error.clone(),
        }
    }
}

/// Macro F1 over the classes that occur as truth or prediction.
pub fn macro_f1(pairs: &[(usize, usize)]) -> f64 {
    let classes: BTreeSet<usize> = pairs.iter().flat_map(|&(t, p)| [t, p]).collect();
    if classes.is_empty() {
        return 0.0;
    }
    let f1s: Vec<f64> = classes
        .iter()
        .map(|&c| {
            let tp = pairs.iter().filter(|&&(t, p)| t == c && p == c).count() as f64;
            let fp = pairs.iter().filter(|&&(t, p)| t != c && p == c).count() as f64;
            let fne = pairs.iter().filter(|&&(t, p)| t == c && p != c).count() as f64;
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fne)
            }
        })
        .collect();
    f1s.iter().sum::<f64>() / f1s.len() as f64
}

/// Whether a selector's scores are predicted ln runtimes (so a cost can be predicted).
fn predicts_runtime(kind: SelectorKind) -> bool {
    !matches!(
        kind,
        SelectorKind::GlobalBest
            | SelectorKind::Isac
            | SelectorKind::ArgoSmart
            | SelectorKind::Alors
    )
}

/// Runs the evaluation.
pub fn evaluate(
    tensor: &Tensor,
    config: &EvalConfig,
    cache: Option<&EmbeddingCache>,
) -> Result<EvalReport> {
    let comparable = tensor.comparable_cells(2);
    if comparable.len() < 2 {
        return Err(SchedulerError::Data(format!(
            "{} cells with at least two measured methods; evaluation needs 2 or more",
            comparable.len()
        )));
    }
    let fold_list = folds(tensor, &comparable, config.split, config.folds, config.seed);
    if fold_list.len() < 2 {
        return Err(SchedulerError::Data(format!(
            "the {:?} split gives {} group(s); holding one out needs at least 2",
            config.split,
            fold_list.len()
        )));
    }
    let cost = |c: usize, rt: f64| -> f64 {
        config.budget.map_or(0.0, |b| {
            let units = tensor.hardware[tensor.cells[c].hardware].spec.compute_units;
            b.price_per_unit_hour * f64::from(units) * rt / 3600.0
        })
    };
    let mut tallies: Vec<Tally> = config.selectors.iter().map(|_| Tally::default()).collect();
    let mut oracle = Tally::default();
    let mut distinct_best = BTreeSet::new();
    let ids = EntityIds::of(tensor)?;
    let mut choices = BTreeMap::new();
    let mut gates = Vec::new();
    for test in &fold_list {
        // Training: every cell outside the held-out groups (cells with one method still teach
        // runtimes; a grouped split holds its whole group out, comparable or not).
        let held_out: BTreeSet<usize> = test
            .iter()
            .map(|&c| config.split.group_of(tensor, c))
            .collect();
        let train: Vec<usize> = (0..tensor.cells.len())
            .filter(|&c| !held_out.contains(&config.split.group_of(tensor, c)))
            .collect();
        if train.is_empty() {
            continue;
        }
        let space = FeatureSpace::fit(tensor, &train, config.features, cache)?;
        if choices.is_empty() {
            choices = space.choices();
        }
        let contexts = space.tensor_contexts(tensor, cache)?;
        let methods = space.tensor_methods(tensor, cache)?;
        let set = TrainSet {
            tensor,
            cells: &train,
            contexts: &contexts,
            methods: &methods,
            ids: &ids,
            split: config.split,
        };
        for &c in test {
            let cell = &tensor.cells[c];
            if let (Some((best, best_rt)), Some(mean)) = (cell.best(), cell.mean_runtime()) {
                distinct_best.insert(best);
                oracle.n += 1;
                oracle.correct += 1;
                oracle.accel += mean / best_rt;
                oracle.rank += 1.0;
                oracle.near += 1;
                oracle.pairs.push((best, best));
                if config.budget.is_some_and(|b| cost(c, best_rt) <= b.limit) {
                    oracle.feasible += 1;
                }
            }
        }
        for (kind, tally) in config.selectors.iter().zip(&mut tallies) {
            let start = Instant::now();
            let scored = kind.fit_score(&set, test);
            tally.seconds += start.elapsed().as_secs_f64();
            let scored = match scored {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(selector = kind.name(), "skipped in a fold: {e}");
                    tally.error.get_or_insert_with(|| e.to_string());
                    continue;
                }
            };
            if *kind == SelectorKind::MetaInf
                && let Some(note) = &scored.note
            {
                gates.push(note.clone());
            }
            if let Some(predictions) = &scored.predictions {
                for (&c, p) in test.iter().zip(predictions) {
                    for (m, rt) in tensor.cells[c].measured() {
                        if let Some(p) = p.get(m) {
                            tally.intervals += 1;
                            let error = (rt.max(1e-9).ln() - p.log_runtime).abs();
                            tally.covered += usize::from(error <= Z80 * p.log_std);
                        }
                    }
                }
            }
            for (&c, s) in test.iter().zip(&scored.scores) {
                let cell = &tensor.cells[c];
                let (Some((best, best_rt)), Some(mean)) = (cell.best(), cell.mean_runtime()) else {
                    continue;
                };
                let mut order: Vec<(usize, f64)> = cell.measured().collect();
                order.sort_by(|a, b| s[a.0].total_cmp(&s[b.0]));
                // With a budget, a runtime-predicting selector takes its best pair predicted to
                // fit; when none is, it declines (and falls back to its best pair for the other
                // columns). The others choose as without a budget.
                let budgeted = config.budget.filter(|_| predicts_runtime(*kind));
                let fitting = budgeted.and_then(|b| {
                    order
                        .iter()
                        .find(|(m, _)| cost(c, s[*m].exp()) <= b.limit)
                        .copied()
                });
                let made = budgeted.is_none() || fitting.is_some();
                let rank = order.iter().position(|(m, _)| *m == best).unwrap_or(0) + 1;
                tally.n += 1;
                tally.rank += rank as f64;
                let Some((chosen, chosen_rt)) = fitting.or_else(|| order.first().copied()) else {
                    continue;
                };
                tally.correct += usize::from(chosen == best);
                tally.accel += mean / chosen_rt;
                tally.regret += chosen_rt / best_rt - 1.0;
                tally.near += usize::from(chosen_rt <= 1.05 * best_rt);
                tally.pairs.push((best, chosen));
                if config
                    .budget
                    .is_some_and(|b| made && cost(c, chosen_rt) <= b.limit)
                {
                    tally.feasible += 1;
                }
            }
        }
    }
    let budget = config.budget.is_some();
    let mut rows: Vec<SelectorScore> = config
        .selectors
        .iter()
        .zip(&tallies)
        .map(|(k, t)| t.score(k.name(), budget))
        .collect();
    rows.push(oracle.score("Oracle", budget));
    Ok(EvalReport {
        split: config.split,
        folds: fold_list.len(),
        cells: oracle.n,
        methods: tensor.methods.len(),
        distinct_best: distinct_best.len(),
        features: config.features,
        choices,
        gates,
        rows,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use metainf_protocol::{Keypair, PerfRecord, fixtures};

    /// 2 hardware × 5 workloads × 8 methods where the best method depends on the workload:
    /// prefix caching wins where prompts are shared, continuous batching elsewhere.
    fn structured() -> Tensor {
        let key = Keypair::generate_ed25519();
        let records: Vec<PerfRecord> = (0..80)
            .map(|v| {
                let mut r = fixtures::record(&key, v + 1, v);
                let shared = matches!(
                    r.workload.preset.as_deref(),
                    Some("few-shot" | "multi-turn")
                );
                r.workload.prefix_sharing = if shared { 0.8 } else { 0.05 };
                let units = f64::from(r.hardware.spec.compute_units);
                let mut rt = 10.0 / units;
                if r.method.short_name() == "pc" && shared {
                    rt *= 0.5;
                }
                if r.method.short_name() == "cb" && !shared {
                    rt *= 0.6;
                }
                r.metrics.wall_time_s = rt;
                r.metrics.throughput_tok_s = r.metrics.output_tokens as f64 / rt;
                r
            })
            .collect();
        Tensor::from_records(&records).unwrap()
    }

    #[test]
    fn folds_cover_each_cell_once_and_group_splits_hold_groups_out() {
        let t = structured();
        let cells: Vec<usize> = (0..t.cells.len()).collect();
        for split in [Split::Random, Split::Hardware, Split::Workload] {
            let f = folds(&t, &cells, split, 5, 1);
            let mut all: Vec<usize> = f.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, cells, "{split:?}");
        }
        let hw = folds(&t, &cells, Split::Hardware, 5, 1);
        assert_eq!(hw.len(), 2);
        for fold in &hw {
            let h: BTreeSet<usize> = fold.iter().map(|&c| t.cells[c].hardware).collect();
            assert_eq!(h.len(), 1);
        }
    }

    #[test]
    fn learners_beat_global_best_when_the_best_method_depends_on_the_workload() {
        let t = structured();
        let config = EvalConfig {
            selectors: vec![SelectorKind::MetaInf, SelectorKind::GlobalBest],
            ..EvalConfig::default()
        };
        let report = evaluate(&t, &config, None).unwrap();
        assert_eq!(report.cells, 10);
        assert_eq!(report.distinct_best, 2);
        let meta = &report.rows[0];
        let global = &report.rows[1];
        let oracle = &report.rows[2];
        assert_eq!(oracle.accuracy, 1.0);
        assert!(meta.accuracy >= 0.9, "{meta:?} {:?}", report.gates);
        assert!(global.accuracy <= 0.6, "{global:?}");
        assert!(meta.acceleration > global.acceleration);
        assert!(meta.regret < global.regret);
        assert!(meta.mean_rank < global.mean_rank);
        assert!(oracle.acceleration >= meta.acceleration - 1e-12);
        // Held-out hardware: the 2-unit machine was never seen, the workload effect carries.
        let held = evaluate(
            &t,
            &EvalConfig {
                split: Split::Hardware,
                ..config.clone()
            },
            None,
        )
        .unwrap();
        assert_eq!(held.folds, 2);
        assert!(held.rows[0].accuracy >= 0.9, "{:?}", held.rows[0]);
    }

    /// An imported-style table without numeric facts: hardware, models and a categorical
    /// workload known only by name. Method `a` wins on even hardware, `b` on odd hardware
    /// (by 30 %, so Global Best is right about half the time), `c` is always 2× slower; `noise`
    /// multiplies every runtime by up to e^±noise.
    fn named_table(noise: f64, structured: bool, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let mut csv = String::from("gpu,model,method,scenario,seconds\n");
        for h in 0..6 {
            for m in ["alpha", "beta", "gamma", "delta"] {
                for w in ["sharegpt", "short", "long"] {
                    let level: f64 = rng.gen_range(0.5..20.0);
                    let a_wins = if structured {
                        h % 2 == 0
                    } else {
                        rng.gen_bool(0.6)
                    };
                    for method in ["a", "b", "c"] {
                        let factor = match (method, a_wins) {
                            ("a", true) | ("b", false) => 1.0,
                            ("a", false) | ("b", true) => 1.3,
                            _ => 2.0,
                        };
                        let e: f64 = rng.gen_range(-noise..=noise);
                        let rt = level * factor * e.exp();
                        csv.push_str(&format!("gpu-{h},{m},{method},{w},{rt}\n"));
                    }
                }
            }
        }
        let map = crate::import::ColumnMap::parse(
            "hardware=gpu,model=model,method=method,metric=seconds,workload=scenario",
            false,
            "named",
        )
        .unwrap();
        let origin = Keypair::generate_ed25519().public().to_peer_id();
        let records = crate::import::csv_records(csv.as_bytes(), &map, origin, 1, 1).unwrap();
        Tensor::from_records(&records).unwrap()
    }

    fn row<'a>(r: &'a EvalReport, name: &str) -> &'a SelectorScore {
        r.rows.iter().find(|s| s.selector == name).unwrap()
    }

    #[test]
    fn learned_effects_find_structure_no_numeric_fact_shows() {
        let t = named_table(0.05, true, 3);
        assert_eq!(t.comparable_cells(2).len(), 72);
        let config = EvalConfig {
            selectors: vec![SelectorKind::MetaInf, SelectorKind::GlobalBest],
            ..EvalConfig::default()
        };
        let r = evaluate(&t, &config, None).unwrap();
        // Nothing numeric tells the hardware apart: auto says so.
        assert!(
            r.choices["hardware"].contains("learned effects only"),
            "{:?}",
            r.choices
        );
        assert!(r.choices["workload"].contains("numeric"), "{:?}", r.choices);
        let (meta, global) = (row(&r, "MetaInf"), row(&r, "Global Best"));
        assert!(global.accuracy < 0.7, "{global:?}");
        assert!(meta.accuracy > 0.95, "{meta:?} {:?}", r.gates);
        assert!(meta.regret < global.regret);
        assert!(
            r.gates.iter().all(|g| g.contains("entity effects")),
            "{:?}",
            r.gates
        );
        // The 80 % interval of its runtime predictions covers about 80 % of held-out runtimes.
        let cov = meta.coverage_80.unwrap();
        assert!((0.65..=0.95).contains(&cov), "coverage {cov}");
        assert!(global.coverage_80.is_none());
        // Held-out hardware: its effects are unknown, so MetaInf falls back on what carries
        // over, and is not worse than Global Best.
        let held = evaluate(
            &t,
            &EvalConfig {
                split: Split::Hardware,
                ..config.clone()
            },
            None,
        )
        .unwrap();
        let (meta, global) = (row(&held, "MetaInf"), row(&held, "Global Best"));
        assert!(meta.regret <= global.regret + 0.01, "{meta:?} {global:?}");
        assert!(
            meta.accuracy >= global.accuracy - 0.05,
            "{meta:?} {global:?}"
        );
    }

    #[test]
    fn without_structure_metainf_is_global_best_on_average() {
        // Pure noise around a usually-best method: whatever a fold's gate keeps, averaged over
        // tables MetaInf loses nothing to Global Best, and most folds keep Global Best itself.
        // (One table alone varies by ±0.07 in accuracy either way: 72 cells.)
        let (mut acc, mut regret, mut kept, mut gates) = (0.0, 0.0, 0, 0);
        let seeds = 1..=8u64;
        let n = seeds.clone().count() as f64;
        for seed in seeds {
            let t = named_table(0.2, false, seed);
            let config = EvalConfig {
                selectors: vec![SelectorKind::MetaInf, SelectorKind::GlobalBest],
                seed: seed + 50,
                ..EvalConfig::default()
            };
            let r = evaluate(&t, &config, None).unwrap();
            let (meta, global) = (row(&r, "MetaInf"), row(&r, "Global Best"));
            acc += (meta.accuracy - global.accuracy) / n;
            regret += (meta.regret - global.regret) / n;
            kept += r.gates.iter().filter(|g| *g == "Global Best").count();
            gates += r.gates.len();
        }
        assert!(
            acc >= -0.01 && regret <= 0.005,
            "mean Δaccuracy {acc}, Δregret {regret}"
        );
        assert!(
            kept * 10 >= gates * 6,
            "{kept} of {gates} folds kept Global Best"
        );
    }

    #[test]
    fn budget_column_counts_feasible_choices() {
        let t = structured();
        // 1 unit: ~10 s → 10/3600 per unit-hour price 1 ≈ 0.0028; 2 units: 5 s × 2 ≈ 0.0028.
        let config = EvalConfig {
            selectors: vec![SelectorKind::MetaInf],
            budget: Some(Budget {
                limit: 0.0025,
                price_per_unit_hour: 1.0,
            }),
            ..EvalConfig::default()
        };
        let report = evaluate(&t, &config, None).unwrap();
        let f = report.rows[0].feasible.unwrap();
        // Only the accelerated methods (0.5× or 0.6×) fit, and each cell has one.
        assert!(f > 0.8, "{:?}", report.rows[0]);
        assert_eq!(report.rows[1].feasible, Some(1.0));
        assert!(macro_f1(&[(0, 0), (1, 1)]) == 1.0 && macro_f1(&[(0, 1), (1, 0)]) == 0.0);
    }
}
