//! MetaInf's selection model: Global Best's ranking plus learned corrections, each trusted only
//! as far as held-out training data supports it.
//!
//! A cell's log runtimes are split into a *level* (how slow the cell is) and *relative* effects
//! (which method is faster inside it). The relative part is what a selection ranks, and it is
//! built in layers, from the most to the least supported:
//!
//! 1. **A method prior** `b[m]`: a two-way fixed-effects fit `ln rt(c, m) = a[c] + b[m] + e`
//!    over the cells with a choice, alternating between cell levels and method effects, so a
//!    method measured only beside slow ones is not mistaken for a fast one (availability-aware,
//!    unlike a mean of within-cell deviations, which is what Global Best ranks by). Or **a
//!    regression prior**: the method terms of a ridge regression of ln runtime over every cell,
//!    single-method cells included.
//! 2. **Learned entity effects** `u_k[entity][m]`: per hardware, model and workload, how each
//!    method deviates from its prior there, backfitted and shrunk towards zero by support
//!    (`sum / (n + λ)`): entities seen in few cells move the ranking little, unseen ones not at
//!    all. They need no facts about the entity, only its identity, so they work on any
//!    imported table.
//! 3. **Boosted trees** on (context, method) features for what the prior (and the effects)
//!    leave, so that unseen entities with known facts (a new GPU, a longer prompt) still get
//!    corrections.
//!
//! A **gate** chooses, per fit and on the training cells only, among Global Best itself and
//! these layers ([`Gate::candidates`]): inner folds grouped like the evaluation's split
//! (held-out hardware is gated on held-out hardware), per-cell log regret and hits, and a
//! candidate replaces Global Best only with evidence beyond its standard errors
//! (the rule of `GateTally::choose`), weighted by that evidence. Where the data has no structure, MetaInf
//! *is* Global Best; where it has, the corrections are kept.
//!
//! The absolute prediction (level + relative) carries an uncertainty calibrated the same way:
//! a split-conformal multiplier on the ensemble spread, fitted on the inner folds' errors of the
//! blend kept, so that ± 1.28 σ covers about 80 % of held-out measurements.
//!
//! Only cells with at least two measured methods teach relative effects; a method missing from
//! a cell is neither a target nor a candidate there.

use std::collections::HashMap;

use metainf_protocol::ContentId;
use serde::{Deserialize, Serialize};

use crate::dataset::Tensor;
use crate::error::{Result, SchedulerError};
use crate::gbdt::{Gbdt, GbdtParams, Prediction};
use crate::linear::{RidgeFit, Standardizer};
use crate::split::{Split, folds};

/// The standard normal's 90 % quantile: ± this many σ is an 80 % interval.
pub const Z80: f64 = 1.281_551_565_545;

/// Shrinkage strengths of the entity effects the gate may choose from.
const LAMBDAS: [f64; 3] = [2.0, 8.0, 32.0];
/// The shrinkage under which the trees are fitted (to what those effects leave).
const TREE_LAMBDA: f64 = 8.0;
/// Backfitting sweeps over the three entity kinds.
const SWEEPS: usize = 4;
/// Alternations of the fixed-effects fit.
const ALTERNATIONS: usize = 20;
/// Standard errors by which a candidate must lower the inner folds' regret below Global
/// Best's: it is the best of several, so one would let noise through.
const GATE_SE: f64 = 2.5;
/// Standard errors by which a candidate must lower regret *and* raise accuracy, when it does
/// both.
const BOTH_SE: f64 = 1.5;
/// A candidate whose losses against Global Best (summed over cells) stay under this share of
/// its gains (almost) dominates it, and needs only one standard error.
const DOMINANT_LOSS: f64 = 0.1;
/// Comparable cells from which the inner folds are drawn once only.
const LARGE_TENSOR: usize = 500;
/// Fewest comparable training cells the gate needs to trust anything beyond Global Best.
const MIN_GATE_CELLS: usize = 4;

/// Content ids of every entity of a tensor, computed once.
#[derive(Clone, Debug)]
pub struct EntityIds {
    /// By hardware index.
    pub hardware: Vec<ContentId>,
    /// By model index.
    pub models: Vec<ContentId>,
    /// By workload index.
    pub workloads: Vec<ContentId>,
    /// By method index.
    pub methods: Vec<ContentId>,
}

impl EntityIds {
    /// Hashes every entity of `tensor`.
    pub fn of(tensor: &Tensor) -> Result<Self> {
        Ok(Self {
            hardware: tensor
                .hardware
                .iter()
                .map(|h| h.id())
                .collect::<std::result::Result<_, _>>()?,
            models: tensor
                .models
                .iter()
                .map(|m| m.id())
                .collect::<std::result::Result<_, _>>()?,
            workloads: tensor
                .workloads
                .iter()
                .map(|w| w.id())
                .collect::<std::result::Result<_, _>>()?,
            methods: tensor
                .methods
                .iter()
                .map(|m| m.id())
                .collect::<std::result::Result<_, _>>()?,
        })
    }

    /// The (hardware, model, workload) ids of a cell.
    pub fn context(&self, tensor: &Tensor, c: usize) -> ContextIds {
        let cell = &tensor.cells[c];
        ContextIds([
            Some(self.hardware[cell.hardware]),
            Some(self.models[cell.model]),
            Some(self.workloads[cell.workload]),
        ])
    }
}

/// The (hardware, model, workload) ids of a query context; `None` where the caller did not
/// compute one (its effects are then zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextIds(pub [Option<ContentId>; 3]);

/// What the relative part starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Base {
    /// Global Best's scores: each method's mean deviation from its cells' means.
    GlobalBest,
    /// The availability-aware method prior of the fixed-effects fit.
    Prior,
    /// The method terms of a ridge regression of ln runtime on (context, method) features
    /// over every cell, those with a single method included: where most cells measured one
    /// method, they still say how fast it is against the context's level.
    Regression,
}

/// Which layers a fitted model uses.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// What the ranking starts from.
    pub base: Base,
    /// Shrinkage of the entity effects, if they are used.
    pub lambda: Option<f64>,
    /// Weight of the trees' correction (0: not used).
    pub alpha: f64,
    /// How far the ranking moves from Global Best's towards these layers' (1: all the way):
    /// the strength of the held-out evidence for them.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl Gate {
    /// Global Best, unchanged: the gate's default.
    pub const GLOBAL_BEST: Gate = Gate {
        base: Base::GlobalBest,
        lambda: None,
        alpha: 0.0,
        weight: 1.0,
    };

    /// The heaviest candidate: prior, effects and the trees on what they leave.
    pub fn heaviest() -> Gate {
        Gate {
            base: Base::Prior,
            lambda: Some(TREE_LAMBDA),
            alpha: 1.0,
            weight: 1.0,
        }
    }

    /// The candidates the gate chooses from, the simplest first: Global Best, the prior, the
    /// prior with effects shrunk less and less, then with trees.
    pub fn candidates() -> Vec<Gate> {
        let mut out = vec![
            Self::GLOBAL_BEST,
            Gate {
                base: Base::Prior,
                lambda: None,
                alpha: 0.0,
                weight: 1.0,
            },
            Gate {
                base: Base::Regression,
                lambda: None,
                alpha: 0.0,
                weight: 1.0,
            },
        ];
        out.extend(LAMBDAS.iter().rev().map(|&l| Gate {
            base: Base::Prior,
            lambda: Some(l),
            alpha: 0.0,
            weight: 1.0,
        }));
        out.extend([0.5, 1.0].map(|alpha| Gate {
            base: Base::Prior,
            lambda: None,
            alpha,
            weight: 1.0,
        }));
        out.push(Self::heaviest());
        out
    }

    /// In words, for reports.
    pub fn describe(&self) -> String {
        let mut s = match self.base {
            Base::GlobalBest => "Global Best".to_owned(),
            Base::Prior => "method prior".to_owned(),
            Base::Regression => "regression prior".to_owned(),
        };
        if let Some(l) = self.lambda {
            s.push_str(&format!(" + entity effects (λ {l})"));
        }
        if self.alpha > 0.0 {
            let on = if self.lambda.is_some() {
                "trees on what they leave"
            } else {
                "trees"
            };
            s.push_str(&format!(" + {} × {on}", self.alpha));
        }
        if self.base != Base::GlobalBest && self.weight < 1.0 {
            s = format!(
                "{:.2} × ({s}) + {:.2} × Global Best",
                self.weight,
                1.0 - self.weight
            );
        }
        s
    }
}

/// Split-conformal calibration of the spread: `log_std = max(k · (σ + τ) / Z80, floor)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The 80 % quantile of |error| / (σ + τ) on held-out training cells.
    pub k: f64,
    /// Added to the ensemble spread (the median spread), so that a spread of zero still has
    /// an interval.
    pub tau: f64,
    /// Held-out errors the multiplier was fitted on (0: the uninformed default).
    pub samples: usize,
    /// Least `log_std`: where the inner folds could not hold out the kind of group the model
    /// will face (one left in training), the error on an unseen one cannot be measured, and
    /// knowing nothing of it, its level is taken to be as uncertain as the levels of the
    /// training cells are spread (their standard deviation); else 0.
    #[serde(default)]
    pub floor: f64,
}

impl Default for Calibration {
    fn default() -> Self {
        // Uninformed: one e-fold either way is the 80 % interval.
        Self {
            k: Z80,
            tau: 1.0,
            samples: 0,
            floor: 0.0,
        }
    }
}

impl Calibration {
    fn log_std(&self, spread: f64) -> f64 {
        (self.k * (spread.max(0.0) + self.tau) / Z80).max(self.floor)
    }

    fn fit(errors: &[(f64, f64)]) -> Self {
        if errors.len() < 10 {
            return Self::default();
        }
        let mut spreads: Vec<f64> = errors.iter().map(|e| e.1).collect();
        spreads.sort_by(f64::total_cmp);
        let tau = spreads[spreads.len() / 2].max(0.01);
        let mut ratios: Vec<f64> = errors.iter().map(|(e, s)| e.abs() / (s + tau)).collect();
        ratios.sort_by(f64::total_cmp);
        // The conformal quantile: the ⌈0.8 (n + 1)⌉-th smallest.
        let rank = ((0.8 * (ratios.len() + 1) as f64).ceil() as usize).clamp(1, ratios.len());
        Self {
            k: ratios[rank - 1].max(1e-6),
            tau,
            samples: errors.len(),
            floor: 0.0,
        }
    }
}

/// Entity effects per kind (hardware, model, workload): entity id → one value per slot.
type Effects = [HashMap<ContentId, Vec<f64>>; 3];

fn effect(effects: &Effects, ids: &ContextIds, slot: usize) -> f64 {
    effects
        .iter()
        .zip(&ids.0)
        .filter_map(|(map, id)| id.and_then(|id| map.get(&id)))
        .map(|v| v.get(slot).copied().unwrap_or(0.0))
        .sum()
}

/// One residual to explain: a cell's context ids, a slot (method, or 0 for levels), a value.
struct Residual {
    ids: ContextIds,
    slot: usize,
    value: f64,
}

/// Backfits shrunk additive effects per entity kind to `residuals`.
fn backfit(residuals: &[Residual], width: usize, lambda: f64) -> Effects {
    let mut effects: Effects = Default::default();
    for _ in 0..SWEEPS {
        for k in 0..3 {
            let mut sums: HashMap<ContentId, (Vec<f64>, Vec<f64>)> = HashMap::new();
            for r in residuals {
                let Some(id) = r.ids.0[k] else { continue };
                let others: f64 = (0..3)
                    .filter(|&j| j != k)
                    .filter_map(|j| r.ids.0[j].and_then(|id| effects[j].get(&id)))
                    .map(|v| v[r.slot])
                    .sum();
                let e = sums
                    .entry(id)
                    .or_insert_with(|| (vec![0.0; width], vec![0.0; width]));
                e.0[r.slot] += r.value - others;
                e.1[r.slot] += 1.0;
            }
            effects[k] = sums
                .into_iter()
                .map(|(id, (s, n))| {
                    let v = s.iter().zip(&n).map(|(s, n)| s / (n + lambda)).collect();
                    (id, v)
                })
                .collect();
        }
    }
    effects
}

/// What one fit needs to know about the tensor.
#[derive(Clone, Copy, Debug)]
pub struct FitData<'a> {
    /// The tensor.
    pub tensor: &'a Tensor,
    /// Context features of every cell.
    pub contexts: &'a [Vec<f64>],
    /// Features of every method.
    pub methods: &'a [Vec<f64>],
    /// Entity ids.
    pub ids: &'a EntityIds,
}

/// How the gate's inner folds are made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RobustConfig {
    /// Grouping of the inner folds: the split the model will face.
    pub split: Split,
    /// Inner folds.
    pub folds: usize,
    /// Times the inner folds are drawn (with seeds `seed`, `seed + 1`, …).
    pub repeats: usize,
    /// Seed of the inner folds.
    pub seed: u64,
    /// Trees of every fit.
    pub params: GbdtParams,
    /// Use these layers instead of letting the gate choose (the inner folds still calibrate
    /// the spread): for experiments and for timing the heaviest model.
    pub gate: Option<Gate>,
}

impl Default for RobustConfig {
    fn default() -> Self {
        Self {
            split: Split::Random,
            folds: 5,
            repeats: 2,
            seed: 17,
            params: GbdtParams::default(),
            gate: None,
        }
    }
}

/// Everything fitted on one set of training cells.
struct Parts {
    n_methods: usize,
    global_best: Vec<f64>,
    prior: Vec<f64>,
    /// The ridge regression's method terms ([`Base::Regression`]).
    regression: Vec<f64>,
    /// Entity effects under each of [`LAMBDAS`].
    effects: Vec<Effects>,
    /// The trees on the relative residuals.
    trees: Option<Gbdt>,
    /// The trees on what the [`TREE_LAMBDA`] effects leave of them.
    trees_fx: Option<Gbdt>,
    level_mean: f64,
    level_effects: Effects,
    level: Option<Gbdt>,
}

fn log_entries(tensor: &Tensor, c: usize) -> Vec<(usize, f64)> {
    tensor.cells[c]
        .measured()
        .map(|(m, rt)| (m, rt.max(1e-9).ln()))
        .collect()
}

/// The two-way fixed-effects fit: cell levels `a` (by position in `cells`) and method effects
/// `b` (centred over the measured methods; 0 for unmeasured ones).
fn fixed_effects(logs: &[Vec<(usize, f64)>], n_methods: usize) -> (Vec<f64>, Vec<f64>) {
    // A method's effect is identified only by cells where it meets another method; one seen
    // only alone keeps the average (0) and is not part of the centring.
    let mut b = vec![0.0; n_methods];
    let mut a = vec![0.0; logs.len()];
    for _ in 0..ALTERNATIONS {
        for (a, cell) in a.iter_mut().zip(logs) {
            if !cell.is_empty() {
                *a = cell.iter().map(|(m, l)| l - b[*m]).sum::<f64>() / cell.len() as f64;
            }
        }
        let mut sum = vec![0.0; n_methods];
        let mut n = vec![0.0; n_methods];
        for (a, cell) in a.iter().zip(logs).filter(|(_, c)| c.len() >= 2) {
            for (m, l) in cell {
                sum[*m] += l - a;
                n[*m] += 1.0;
            }
        }
        let measured: Vec<usize> = (0..n_methods).filter(|&m| n[m] > 0.0).collect();
        for &m in &measured {
            b[m] = sum[m] / n[m];
        }
        let centre = measured.iter().map(|&m| b[m]).sum::<f64>() / measured.len().max(1) as f64;
        for &m in &measured {
            b[m] -= centre;
        }
    }
    (a, b)
}

impl Parts {
    /// Fits the priors, effects and levels, and the trees `which` asks for.
    fn fit(
        data: &FitData<'_>,
        cells: &[usize],
        params: GbdtParams,
        which: WhichTrees,
    ) -> Result<Self> {
        let tensor = data.tensor;
        let n_methods = tensor.methods.len();
        let logs: Vec<Vec<(usize, f64)>> = cells.iter().map(|&c| log_entries(tensor, c)).collect();
        let (levels, prior) = fixed_effects(&logs, n_methods);
        let global_best = crate::dataset::mean_relative(tensor, cells.iter().copied());
        // Relative residuals of the cells with a choice, and the cell of each.
        let mut residuals = Vec::new();
        let mut residual_cells = Vec::new();
        let mut level_residuals = Vec::new();
        let mut level_cells = Vec::new();
        let level_mean = levels.iter().sum::<f64>() / levels.len().max(1) as f64;
        for ((&c, cell), a) in cells.iter().zip(&logs).zip(&levels) {
            if cell.is_empty() {
                continue;
            }
            let ids = data.ids.context(tensor, c);
            level_cells.push(c);
            level_residuals.push(Residual {
                ids,
                slot: 0,
                value: a - level_mean,
            });
            if cell.len() < 2 {
                continue;
            }
            for &(m, l) in cell {
                residual_cells.push(c);
                residuals.push(Residual {
                    ids,
                    slot: m,
                    value: l - a - prior[m],
                });
            }
        }
        let effects: Vec<Effects> = LAMBDAS
            .iter()
            .map(|&l| backfit(&residuals, n_methods, l))
            .collect();
        let tree_effects = &effects[LAMBDAS.iter().position(|&l| l == TREE_LAMBDA).unwrap_or(0)];
        let fit_residual_trees = |on_effects: bool| -> Result<Option<Gbdt>> {
            let mut rows = Vec::with_capacity(residuals.len());
            let mut y = Vec::with_capacity(residuals.len());
            for (c, r) in residual_cells.iter().zip(&residuals) {
                let mut row = data.contexts[*c].clone();
                row.extend_from_slice(&data.methods[r.slot]);
                rows.push(row);
                let fx = if on_effects {
                    effect(tree_effects, &r.ids, r.slot)
                } else {
                    0.0
                };
                y.push(r.value - fx);
            }
            fit_trees(&rows, &y, params)
        };
        let trees = if which.plain {
            fit_residual_trees(false)?
        } else {
            None
        };
        let trees_fx = if which.on_effects {
            fit_residual_trees(true)?
        } else {
            None
        };
        let level_effects = backfit(&level_residuals, 1, TREE_LAMBDA);
        let mut rows = Vec::with_capacity(level_residuals.len());
        let mut y = Vec::with_capacity(level_residuals.len());
        for (c, r) in level_cells.iter().zip(&level_residuals) {
            rows.push(data.contexts[*c].clone());
            y.push(r.value - effect(&level_effects, &r.ids, 0));
        }
        let level = fit_trees(&rows, &y, params)?;
        let regression = regression_prior(data, cells);
        Ok(Self {
            n_methods,
            global_best,
            prior,
            regression,
            effects,
            trees,
            trees_fx,
            level_mean,
            level_effects,
            level,
        })
    }

    /// Predictions `[context][method]` for methods (feature rows, and their slots among the
    /// training methods where they have one) in each context, under `gate`. Every tree model
    /// sees all its rows in one batch (the flat forest walks them 16 at a time).
    fn predict(
        &self,
        gate: &Gate,
        contexts: &[Vec<f64>],
        ids: &[ContextIds],
        methods: &[Vec<f64>],
        slots: &[Option<usize>],
        calibration: &Calibration,
    ) -> Vec<Vec<Prediction>> {
        let levels = self.levels(contexts, ids);
        let lambda_index = gate
            .lambda
            .and_then(|l| LAMBDAS.iter().position(|&x| x == l));
        let model = if gate.lambda.is_some() {
            &self.trees_fx
        } else {
            &self.trees
        };
        let trees = model.as_ref().filter(|_| gate.alpha > 0.0).map(|g| {
            let mut data = Vec::with_capacity(contexts.len() * methods.len() * g.cols());
            for c in contexts {
                for m in methods {
                    let at = data.len();
                    data.extend_from_slice(c);
                    data.extend_from_slice(m);
                    data.resize(at + g.cols(), 0.0);
                }
            }
            g.predict_flat(&data)
        });
        let method_slots: Vec<Option<usize>> = (0..methods.len())
            .map(|m| slots.get(m).copied().flatten())
            .collect();
        contexts
            .iter()
            .enumerate()
            .map(|(c, _)| {
                let (level, level_spread) = levels[c];
                let ids = ids.get(c).copied().unwrap_or_default();
                // This context's effect rows, looked up once (not once per method).
                let rows: [Option<&Vec<f64>>; 3] = match lambda_index {
                    Some(i) => {
                        std::array::from_fn(|k| ids.0[k].and_then(|id| self.effects[i][k].get(&id)))
                    }
                    None => [None; 3],
                };
                method_slots
                    .iter()
                    .enumerate()
                    .map(|(m, slot)| {
                        let base = slot
                            .and_then(|s| match gate.base {
                                Base::GlobalBest => self.global_best.get(s),
                                Base::Prior => self.prior.get(s),
                                Base::Regression => self.regression.get(s),
                            })
                            .copied()
                            .unwrap_or(0.0);
                        let fx: f64 = slot.map_or(0.0, |s| {
                            rows.iter()
                                .flatten()
                                .map(|r| r.get(s).copied().unwrap_or(0.0))
                                .sum()
                        });
                        let (t, t_spread) = trees
                            .as_ref()
                            .and_then(|p| p.get(c * methods.len() + m))
                            .map_or((0.0, 0.0), |p| (p.log_runtime, p.log_std));
                        let global_best = slot
                            .and_then(|s| self.global_best.get(s))
                            .copied()
                            .unwrap_or(0.0);
                        let relative = base + fx + gate.alpha * t;
                        let relative = global_best + gate.weight * (relative - global_best);
                        let spread = level_spread.hypot(gate.weight * gate.alpha * t_spread);
                        Prediction {
                            log_runtime: level + relative,
                            log_std: calibration.log_std(spread),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// (level, spread) of each context.
    fn levels(&self, contexts: &[Vec<f64>], ids: &[ContextIds]) -> Vec<(f64, f64)> {
        let trees = self.level.as_ref().map(|g| g.predict(contexts));
        (0..contexts.len())
            .map(|c| {
                let fx = ids
                    .get(c)
                    .map_or(0.0, |ids| effect(&self.level_effects, ids, 0));
                let (t, spread) = trees
                    .as_ref()
                    .and_then(|p| p.get(c))
                    .map_or((0.0, 0.0), |p| (p.log_runtime, p.log_std));
                (self.level_mean + fx + t, spread)
            })
            .collect()
    }
}

/// [`Base::Regression`]: ridge of ln runtime on standardised (context ++ method) rows of every
/// measured entry of `cells`; a method's term is its row's contribution beyond the context's,
/// centred over the methods. All zero (the average) where the fit is impossible.
fn regression_prior(data: &FitData<'_>, cells: &[usize]) -> Vec<f64> {
    let n_methods = data.tensor.methods.len();
    let mut rows = Vec::new();
    let mut y = Vec::new();
    for &c in cells {
        for (m, rt) in data.tensor.cells[c].measured() {
            let mut row = data.contexts[c].clone();
            row.extend_from_slice(&data.methods[m]);
            rows.push(row);
            y.push(vec![rt.max(1e-9).ln()]);
        }
    }
    let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
    let z = Standardizer::fit(&refs);
    let x: Vec<Vec<f64>> = refs.iter().map(|r| z.apply(r)).collect();
    let Ok(fit) = RidgeFit::fit(&x, &y, 1.0) else {
        return vec![0.0; n_methods];
    };
    // Any context row: the model is additive, so the method terms do not depend on it.
    let Some(&c) = cells.first() else {
        return vec![0.0; n_methods];
    };
    let scores: Vec<f64> = data
        .methods
        .iter()
        .map(|m| {
            let mut row = data.contexts[c].clone();
            row.extend_from_slice(m);
            fit.predict(&z.apply(&row)).first().copied().unwrap_or(0.0)
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    scores.iter().map(|s| s - mean).collect()
}

/// Which residual trees a fit makes.
#[derive(Clone, Copy, Debug)]
struct WhichTrees {
    /// On the relative residuals.
    plain: bool,
    /// On what the entity effects leave.
    on_effects: bool,
}

impl WhichTrees {
    const ALL: WhichTrees = WhichTrees {
        plain: true,
        on_effects: true,
    };

    fn for_gate(gate: &Gate) -> Self {
        Self {
            plain: gate.alpha > 0.0 && gate.lambda.is_none(),
            on_effects: gate.alpha > 0.0 && gate.lambda.is_some(),
        }
    }
}

/// Boosted trees, or none where there is nothing to split on.
fn fit_trees(rows: &[Vec<f64>], y: &[f64], params: GbdtParams) -> Result<Option<Gbdt>> {
    let cols = rows.first().map_or(0, Vec::len);
    if rows.len() < 8 || cols == 0 {
        return Ok(None);
    }
    Gbdt::fit(rows, y, params).map(Some)
}

/// Per held-out cell of the inner folds: regret and hit of each candidate.
#[derive(Default)]
struct GateTally {
    /// The inner folds could not hold out groups like the split faced (one group left in
    /// training) and held out cells instead: an easier problem, so the evidence counts half.
    fell_back: bool,
    regret: Vec<Vec<f64>>,
    hit: Vec<Vec<f64>>,
    errors: Vec<Vec<HeldOut>>,
}

/// One held-out measurement of the inner folds, against Global Best's prediction (which
/// shares the candidate's level), so that the error of any blend of the two follows.
#[derive(Clone, Copy, Debug)]
struct HeldOut {
    /// ln runtime − Global Best's prediction.
    residual: f64,
    /// The candidate's prediction − Global Best's.
    delta: f64,
    /// Global Best's spread (the level's).
    base_spread: f64,
    /// The candidate's spread.
    spread: f64,
}

impl HeldOut {
    /// (error, spread) of the prediction `weight` of the way from Global Best's to the
    /// candidate's, as [`Parts::predict`] blends them.
    fn blended(&self, weight: f64) -> (f64, f64) {
        let extra = (self.spread.powi(2) - self.base_spread.powi(2)).max(0.0);
        (
            self.residual - weight * self.delta,
            (self.base_spread.powi(2) + weight.powi(2) * extra).sqrt(),
        )
    }
}

impl GateTally {
    /// The candidate to keep (its index) and its weight.
    ///
    /// A candidate *qualifies* against Global Best (candidate 0) when, over the inner folds'
    /// cells, it lowers the log regret by more than [`GATE_SE`] standard errors of the paired
    /// difference (one where it almost never does worse on a cell) without losing accuracy
    /// beyond one standard error; or raises accuracy by [`GATE_SE`] standard errors without
    /// raising regret; or does both by [`BOTH_SE`] standard errors each. The qualified one with the
    /// lowest regret is kept; nothing qualifies: Global Best. (Keeping the simplest within one
    /// standard error of it instead was tried: on the public tables it kept too little.)
    ///
    /// The kept candidate's weight is its evidence beyond the bar: 0 when it just qualifies
    /// (the ranking is Global Best's), rising to 1 at twice the evidence the bar asks for,
    /// so that a marginal decision moves the ranking only marginally.
    fn choose(&self, candidates: &[Gate]) -> (usize, f64) {
        if self.regret.first().is_none_or(Vec::is_empty) {
            return (0, 1.0);
        }
        let paired =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
        // Per candidate: its evidence, ≥ 1 where it qualifies.
        let qualified: Vec<(usize, f64)> = (1..candidates.len())
            .filter_map(|i| {
                let gain = paired(&self.regret[0], &self.regret[i]);
                let won: f64 = gain.iter().filter(|g| **g > 0.0).sum();
                let lost: f64 = -gain.iter().filter(|g| **g < 0.0).sum::<f64>();
                let (gain, gain_se) = mean_se(&gain);
                let gain_se = gain_se.max(1e-4);
                let bar = if lost <= DOMINANT_LOSS * won {
                    gain_se
                } else {
                    GATE_SE * gain_se
                };
                let (hit_gain, hit_se) = mean_se(&paired(&self.hit[i], &self.hit[0]));
                let hit_se = hit_se.max(1e-3);
                let (z, zh) = (gain / gain_se, hit_gain / hit_se);
                let both = z.min(zh) / BOTH_SE;
                let lower = if zh >= -1.0 { gain / bar } else { 0.0 };
                let more_accurate = if gain > 0.0 { zh / GATE_SE } else { 0.0 };
                let mut evidence = both.max(lower).max(more_accurate);
                if self.fell_back {
                    evidence /= 2.0;
                }
                (evidence > 1.0 && gain > 1e-3).then_some((i, evidence))
            })
            .collect();
        let regret = |i: usize| mean_se(&self.regret[i]).0;
        qualified
            .iter()
            .min_by(|a, b| regret(a.0).total_cmp(&regret(b.0)))
            .map_or((0, 1.0), |&(i, evidence)| {
                (i, (evidence - 1.0).clamp(0.0, 1.0))
            })
    }
}

fn mean_se(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// The fitted selection model.
pub struct Robust {
    parts: Parts,
    gate: Gate,
    calibration: Calibration,
}

impl std::fmt::Debug for Robust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Robust")
            .field("gate", &self.gate)
            .field("calibration", &self.calibration)
            .finish()
    }
}

impl Robust {
    /// Fits on `cells` of `data`, the gate and the calibration on inner folds of them.
    pub fn fit(data: &FitData<'_>, cells: &[usize], config: RobustConfig) -> Result<Self> {
        if cells.is_empty() {
            return Err(SchedulerError::Data("no training cells".into()));
        }
        let tensor = data.tensor;
        let comparable: Vec<usize> = cells
            .iter()
            .copied()
            .filter(|&c| tensor.cells[c].measured().count() >= 2)
            .collect();
        let candidates = Gate::candidates();
        let all_slots: Vec<Option<usize>> = (0..tensor.methods.len()).map(Some).collect();
        // The inner fits are the final one's kind (same members), so that their spread is
        // calibrated for it.
        let inner = config.params;
        let mut tally = GateTally {
            fell_back: false,
            regret: vec![Vec::new(); candidates.len()],
            hit: vec![Vec::new(); candidates.len()],
            errors: vec![Vec::new(); candidates.len()],
        };
        if comparable.len() >= MIN_GATE_CELLS {
            // Per cell and candidate: (sum of log regrets, hits, times held out), over
            // repeats of the inner folds with different seeds (which cells share a fold is
            // itself noise on small tensors).
            let mut per_cell: std::collections::BTreeMap<usize, Vec<(f64, f64, f64)>> =
                std::collections::BTreeMap::new();
            // Large tensors: one draw is enough (and each costs as much as the final fit).
            let repeats = if comparable.len() >= LARGE_TENSOR {
                1
            } else {
                config.repeats.max(1)
            };
            for repeat in 0..repeats {
                let seed = config.seed.wrapping_add(repeat as u64);
                let mut split = config.split;
                let mut inner_folds = folds(tensor, &comparable, split, config.folds, seed);
                if inner_folds.len() < 2 {
                    // One group only (one hardware left in training): cells are held out
                    // instead.
                    split = Split::Random;
                    inner_folds = folds(tensor, &comparable, split, config.folds, seed);
                    tally.fell_back = config.split != Split::Random;
                }
                for test in &inner_folds {
                    let held: std::collections::BTreeSet<usize> =
                        test.iter().map(|&c| split.group_of(tensor, c)).collect();
                    let train: Vec<usize> = cells
                        .iter()
                        .copied()
                        .filter(|&c| !held.contains(&split.group_of(tensor, c)))
                        .collect();
                    if train.is_empty() {
                        continue;
                    }
                    let parts = Parts::fit(data, &train, inner, WhichTrees::ALL)?;
                    let raw = Calibration {
                        k: Z80,
                        tau: 0.0,
                        samples: 0,
                        floor: 0.0,
                    };
                    let test_contexts: Vec<Vec<f64>> =
                        test.iter().map(|&c| data.contexts[c].clone()).collect();
                    let test_ids: Vec<ContextIds> =
                        test.iter().map(|&c| data.ids.context(tensor, c)).collect();
                    let predictions: Vec<Vec<Vec<Prediction>>> = candidates
                        .iter()
                        .map(|gate| {
                            parts.predict(
                                gate,
                                &test_contexts,
                                &test_ids,
                                data.methods,
                                &all_slots,
                                &raw,
                            )
                        })
                        .collect();
                    for (t, &c) in test.iter().enumerate() {
                        let cell = &tensor.cells[c];
                        let Some((best, best_rt)) = cell.best() else {
                            continue;
                        };
                        let slot = per_cell
                            .entry(c)
                            .or_insert_with(|| vec![(0.0, 0.0, 0.0); candidates.len()]);
                        let global_best = &predictions[0][t];
                        for (i, candidate) in predictions.iter().enumerate() {
                            let p = &candidate[t];
                            let chosen = cell
                                .measured()
                                .min_by(|a, b| p[a.0].log_runtime.total_cmp(&p[b.0].log_runtime));
                            if let Some((m, rt)) = chosen {
                                // In logs: a few cells 10× off would otherwise decide alone.
                                slot[i].0 += (rt / best_rt).ln();
                                slot[i].1 += f64::from(u8::from(m == best));
                                slot[i].2 += 1.0;
                            }
                            for (m, rt) in cell.measured() {
                                let g = global_best[m];
                                tally.errors[i].push(HeldOut {
                                    residual: rt.max(1e-9).ln() - g.log_runtime,
                                    delta: p[m].log_runtime - g.log_runtime,
                                    base_spread: g.log_std,
                                    spread: p[m].log_std,
                                });
                            }
                        }
                    }
                }
            }
            for per_candidate in per_cell.values() {
                for (i, (regret, hit, n)) in per_candidate.iter().enumerate() {
                    if *n > 0.0 {
                        tally.regret[i].push(regret / n);
                        tally.hit[i].push(hit / n);
                    }
                }
            }
        }
        let (mut chosen, weight) = tally.choose(&candidates);
        let mut gate = Gate {
            weight,
            ..candidates[chosen]
        };
        if let Some(forced) = config.gate {
            gate = forced;
            chosen = candidates
                .iter()
                .position(|g| {
                    Gate {
                        weight: 1.0,
                        ..forced
                    } == *g
                })
                .unwrap_or(0);
        }
        let errors: Vec<(f64, f64)> = tally.errors[chosen]
            .iter()
            .map(|h| h.blended(gate.weight))
            .collect();
        let mut calibration = Calibration::fit(&errors);
        if tally.fell_back {
            let levels: Vec<f64> = cells
                .iter()
                .filter_map(|&c| {
                    let logs = log_entries(tensor, c);
                    (!logs.is_empty())
                        .then(|| logs.iter().map(|(_, l)| l).sum::<f64>() / logs.len() as f64)
                })
                .collect();
            let n = levels.len().max(1) as f64;
            let mean = levels.iter().sum::<f64>() / n;
            calibration.floor = (levels.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
        }
        let parts = Parts::fit(data, cells, config.params, WhichTrees::for_gate(&gate))?;
        Ok(Self {
            parts,
            gate,
            calibration,
        })
    }

    /// The layers chosen.
    pub fn gate(&self) -> Gate {
        self.gate
    }

    /// The calibration of the spread.
    pub fn calibration(&self) -> Calibration {
        self.calibration
    }

    /// Whether predictions look entity ids of `kind` (0 hardware, 1 model, 2 workload) up:
    /// a caller may skip hashing them otherwise.
    pub fn uses_ids(&self, kind: usize) -> bool {
        let effects = self.gate.lambda.is_some_and(|l| {
            LAMBDAS
                .iter()
                .position(|&x| x == l)
                .is_some_and(|i| !self.parts.effects[i][kind].is_empty())
        });
        effects || !self.parts.level_effects[kind].is_empty()
    }

    /// Predictions `[context][method]`: `methods` are feature rows, `slots` their indices
    /// among the training tensor's methods where they have one (a method never measured gets
    /// the average prior and no effects).
    pub fn predict(
        &self,
        contexts: &[Vec<f64>],
        ids: &[ContextIds],
        methods: &[Vec<f64>],
        slots: &[Option<usize>],
    ) -> Vec<Vec<Prediction>> {
        self.parts
            .predict(&self.gate, contexts, ids, methods, slots, &self.calibration)
    }

    /// Number of method slots (the training tensor's methods).
    pub fn methods(&self) -> usize {
        self.parts.n_methods
    }

    /// The saved form.
    pub(crate) fn save(&self) -> Result<SavedRobust> {
        let p = &self.parts;
        let trees = |g: &Option<Gbdt>| -> Result<Option<(usize, Vec<String>)>> {
            g.as_ref().map(|g| Ok((g.cols(), g.to_json()?))).transpose()
        };
        Ok(SavedRobust {
            n_methods: p.n_methods,
            global_best: p.global_best.clone(),
            prior: p.prior.clone(),
            regression: p.regression.clone(),
            effects: p.effects.clone(),
            trees: trees(&p.trees)?,
            trees_fx: trees(&p.trees_fx)?,
            level_mean: p.level_mean,
            level_effects: p.level_effects.clone(),
            level: trees(&p.level)?,
            gate: self.gate,
            calibration: self.calibration,
        })
    }

    /// Loads a saved model.
    pub(crate) fn load(saved: SavedRobust) -> Result<Self> {
        let trees = |t: Option<(usize, Vec<String>)>| -> Result<Option<Gbdt>> {
            t.map(|(cols, members)| Gbdt::from_json(&members, cols))
                .transpose()
        };
        if saved.effects.len() != LAMBDAS.len()
            || saved.global_best.len() != saved.n_methods
            || saved.prior.len() != saved.n_methods
            || saved.regression.len() != saved.n_methods
        {
            return Err(SchedulerError::Persist(
                "the saved selection model is inconsistent".into(),
            ));
        }
        Ok(Self {
            parts: Parts {
                n_methods: saved.n_methods,
                global_best: saved.global_best,
                prior: saved.prior,
                regression: saved.regression,
                effects: saved.effects,
                trees: trees(saved.trees)?,
                trees_fx: trees(saved.trees_fx)?,
                level_mean: saved.level_mean,
                level_effects: saved.level_effects,
                level: trees(saved.level)?,
            },
            gate: saved.gate,
            calibration: saved.calibration,
        })
    }
}

/// [`Robust`] as saved (JSON), trees as forust's own dumps.
#[derive(Serialize, Deserialize)]
pub(crate) struct SavedRobust {
    n_methods: usize,
    global_best: Vec<f64>,
    prior: Vec<f64>,
    regression: Vec<f64>,
    effects: Vec<Effects>,
    trees: Option<(usize, Vec<String>)>,
    trees_fx: Option<(usize, Vec<String>)>,
    level_mean: f64,
    level_effects: Effects,
    level: Option<(usize, Vec<String>)>,
    gate: Gate,
    calibration: Calibration,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::features::{FeatureConfig, FeatureSpace};
    use crate::import::{ColumnMap, csv_records};
    use metainf_protocol::Keypair;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn tensor(csv: &str) -> Tensor {
        let map = ColumnMap::parse(
            "hardware=gpu,model=model,method=method,metric=seconds,workload=w",
            false,
            "t",
        )
        .unwrap();
        let origin = Keypair::generate_ed25519().public().to_peer_id();
        Tensor::from_records(&csv_records(csv.as_bytes(), &map, origin, 1, 1).unwrap()).unwrap()
    }

    #[test]
    fn the_method_prior_is_not_fooled_by_which_methods_a_cell_has() {
        // `x` is measured only beside the very slow `s` (cells A) and beside `b`, which is 10 %
        // faster than it (cells B). Relative to their cells' means, `x` looks best; within the
        // cells where they meet, `b` is.
        let mut csv = String::from("gpu,model,method,w,seconds\n");
        for i in 0..6 {
            csv.push_str(&format!("g,m,x,{i},1.0\ng,m,s,{i},4.0\n"));
        }
        for i in 6..10 {
            csv.push_str(&format!("g,m,x,{i},1.0\ng,m,b,{i},0.9\ng,m,c,{i},1.1\n"));
        }
        let t = tensor(&csv);
        let cells: Vec<usize> = (0..t.cells.len()).collect();
        let space = FeatureSpace::fit(&t, &cells, FeatureConfig::default(), None).unwrap();
        let contexts = space.tensor_contexts(&t, None).unwrap();
        let methods = space.tensor_methods(&t, None).unwrap();
        let ids = EntityIds::of(&t).unwrap();
        let data = FitData {
            tensor: &t,
            contexts: &contexts,
            methods: &methods,
            ids: &ids,
        };
        let parts = Parts::fit(&data, &cells, GbdtParams::default(), WhichTrees::ALL).unwrap();
        let slot = |name: &str| t.methods.iter().position(|m| m.has(name)).unwrap();
        let (x, b) = (slot("x"), slot("b"));
        assert!(
            parts.global_best[x] < parts.global_best[b],
            "Global Best prefers x"
        );
        assert!(
            parts.prior[b] < parts.prior[x],
            "the prior prefers b: {:?}",
            parts.prior
        );
        // b is 10 % faster than x: the prior says so in log units.
        assert!((parts.prior[x] - parts.prior[b] - (1.0f64 / 0.9).ln()).abs() < 0.02);
    }

    #[test]
    fn the_calibrated_interval_covers_about_eighty_percent() {
        let mut rng = StdRng::seed_from_u64(5);
        // Errors whose scale is twice the ensemble's spread, plus a floor.
        let draw = |rng: &mut StdRng| {
            let spread: f64 = rng.gen_range(0.05..0.5);
            let normal: f64 = (0..12).map(|_| rng.gen_range(0.0..1.0)).sum::<f64>() - 6.0;
            (normal * (2.0 * spread + 0.1), spread)
        };
        let fit: Vec<(f64, f64)> = (0..2000).map(|_| draw(&mut rng)).collect();
        let cal = Calibration::fit(&fit);
        assert_eq!(cal.samples, 2000);
        let held: Vec<(f64, f64)> = (0..4000).map(|_| draw(&mut rng)).collect();
        let covered = held
            .iter()
            .filter(|(e, s)| e.abs() <= Z80 * cal.log_std(*s))
            .count() as f64
            / held.len() as f64;
        assert!((0.76..=0.84).contains(&covered), "coverage {covered}");
        // Too few errors: the uninformed default, one e-fold either way.
        assert_eq!(Calibration::fit(&fit[..5]), Calibration::default());
    }
}
