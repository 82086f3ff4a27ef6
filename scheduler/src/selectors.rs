//! Every selector the evaluation compares: MetaInf's boosted trees and the paper's baselines
//! (Global Best, ISAC, ARGOSMART, ALORS, Ridge, Random Forest, SVR, KNN, MLP).
//!
//! A selector scores every method of a cell, lower is better (predicted log runtime for the
//! regressors, a relative log runtime for the others), from training cells only.

use std::collections::HashMap;
use std::str::FromStr;

use smartcore::cluster::kmeans::{KMeans, KMeansParameters};
use smartcore::ensemble::random_forest_regressor::{
    RandomForestRegressor, RandomForestRegressorParameters,
};
use smartcore::linalg::basic::arrays::Array;
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linalg::traits::svd::SVDDecomposable;
use smartcore::neighbors::knn_regressor::{KNNRegressor, KNNRegressorParameters};
use smartcore::svm::Kernels;
use smartcore::svm::svr::{SVR, SVRParameters};

use crate::dataset::{Tensor, mean_relative, relative};
use crate::error::{Result, SchedulerError};
use crate::gbdt::{GbdtParams, Prediction, TwoStage, training_rows};
use crate::linear::{RidgeFit, Standardizer, matrix};
use crate::robust::{EntityIds, FitData, Robust, RobustConfig};
use crate::split::Split;

/// What a selector learns from.
#[derive(Clone, Copy, Debug)]
pub struct TrainSet<'a> {
    /// The whole tensor.
    pub tensor: &'a Tensor,
    /// Cells it may learn from.
    pub cells: &'a [usize],
    /// Context features of every cell of the tensor.
    pub contexts: &'a [Vec<f64>],
    /// Features of every method of the tensor.
    pub methods: &'a [Vec<f64>],
    /// Entity ids of the tensor (for learned per-entity effects).
    pub ids: &'a EntityIds,
    /// The split the selection will face (MetaInf gates its corrections on inner folds held
    /// out the same way).
    pub split: Split,
}

/// A selector's output for query cells.
#[derive(Clone, Debug, Default)]
pub struct Scored {
    /// Scores (lower is better) of every tensor method, per query cell.
    pub scores: Vec<Vec<f64>>,
    /// Absolute predictions with calibrated uncertainty, where the selector makes them.
    pub predictions: Option<Vec<Vec<Prediction>>>,
    /// What the selector chose while fitting, in words.
    pub note: Option<String>,
}

impl From<Vec<Vec<f64>>> for Scored {
    fn from(scores: Vec<Vec<f64>>) -> Self {
        Self {
            scores,
            ..Self::default()
        }
    }
}

/// The selectors of the evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelectorKind {
    /// MetaInf: Global Best plus learned corrections (method prior, shrunk per-entity effects,
    /// boosted trees), each gated on held-out training cells ([`crate::robust`]).
    MetaInf,
    /// The earlier MetaInf: two boosted ensembles regressing the level and the within-cell
    /// deviation of log runtime, used as they come (no prior, no gate).
    MetaInfLevel,
    /// The method fastest on average over the training cells.
    GlobalBest,
    /// Cluster the training contexts (k-means), best method per cluster.
    Isac,
    /// Nearest training context, its best method.
    ArgoSmart,
    /// Factorise the cell × method matrix, regress features to the latent factors.
    Alors,
    /// Ridge regression on (context, method) features.
    Ridge,
    /// Random forest regression.
    RandomForest,
    /// Support-vector regression (RBF kernel).
    Svr,
    /// k-nearest-neighbour regression.
    Knn,
    /// A two-layer perceptron.
    Mlp,
}

impl SelectorKind {
    /// All selectors, MetaInf first.
    pub const ALL: [SelectorKind; 11] = [
        SelectorKind::MetaInf,
        SelectorKind::MetaInfLevel,
        SelectorKind::GlobalBest,
        SelectorKind::Isac,
        SelectorKind::ArgoSmart,
        SelectorKind::Alors,
        SelectorKind::Ridge,
        SelectorKind::RandomForest,
        SelectorKind::Svr,
        SelectorKind::Knn,
        SelectorKind::Mlp,
    ];

    /// Display name, as in the paper's tables.
    pub fn name(self) -> &'static str {
        match self {
            SelectorKind::MetaInf => "MetaInf",
            SelectorKind::MetaInfLevel => "MetaInf-level",
            SelectorKind::GlobalBest => "Global Best",
            SelectorKind::Isac => "ISAC",
            SelectorKind::ArgoSmart => "ARGOSMART",
            SelectorKind::Alors => "ALORS",
            SelectorKind::Ridge => "Ridge",
            SelectorKind::RandomForest => "Random Forest",
            SelectorKind::Svr => "SVR",
            SelectorKind::Knn => "KNN",
            SelectorKind::Mlp => "MLP",
        }
    }

    /// Scores (lower is better) of every tensor method in each query cell.
    pub fn fit_score(self, train: &TrainSet<'_>, queries: &[usize]) -> Result<Scored> {
        if train.cells.is_empty() {
            return Err(SchedulerError::Data("no training cells".into()));
        }
        // smartcore asserts on some inputs (SVR on a few rows of imported tables did); a
        // learner that panics is an error of that learner, never a crash of the node.
        let run = std::panic::AssertUnwindSafe(|| match self {
            SelectorKind::GlobalBest => Ok(global_best(train, queries).into()),
            SelectorKind::Isac => isac(train, queries).map(Scored::from),
            SelectorKind::ArgoSmart => argosmart(train, queries).map(Scored::from),
            SelectorKind::Alors => alors(train, queries).map(Scored::from),
            SelectorKind::MetaInf => meta_inf(train, queries),
            SelectorKind::MetaInfLevel => meta_inf_level(train, queries).map(Scored::from),
            _ => regression(self, train, queries).map(Scored::from),
        });
        std::panic::catch_unwind(run).unwrap_or_else(|panic| {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(SchedulerError::model(
                self.name(),
                format!("the learner failed: {reason}"),
            ))
        })
    }
}

impl FromStr for SelectorKind {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self> {
        let norm: String = s
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_lowercase();
        SelectorKind::ALL
            .into_iter()
            .find(|k| {
                k.name()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect::<String>()
                    .to_lowercase()
                    == norm
            })
            .ok_or_else(|| SchedulerError::invalid("selector", format!("unknown `{s}`")))
    }
}

fn global_best(train: &TrainSet<'_>, queries: &[usize]) -> Vec<Vec<f64>> {
    let scores = mean_relative(train.tensor, train.cells.iter().copied());
    vec![scores; queries.len()]
}

/// The training cells' contexts, standardised, and the standardiser for queries.
fn standardized_contexts(train: &TrainSet<'_>) -> (Standardizer, Vec<Vec<f64>>) {
    let refs: Vec<&[f64]> = train
        .cells
        .iter()
        .map(|&c| train.contexts[c].as_slice())
        .collect();
    let z = Standardizer::fit(&refs);
    let x = refs.iter().map(|r| z.apply(r)).collect();
    (z, x)
}

fn isac(train: &TrainSet<'_>, queries: &[usize]) -> Result<Vec<Vec<f64>>> {
    let (z, x) = standardized_contexts(train);
    let fallback = mean_relative(train.tensor, train.cells.iter().copied());
    // About one cluster per five training cells, at least 2 and at most 8.
    let k = (train.cells.len() / 5).clamp(2, 8).min(train.cells.len());
    if k < 2 {
        return Ok(vec![fallback; queries.len()]);
    }
    let xm = matrix(&x, "ISAC")?;
    let km: KMeans<f64, usize, DenseMatrix<f64>, Vec<usize>> = KMeans::fit(
        &xm,
        KMeansParameters::default().with_k(k).with_max_iter(100),
    )
    .map_err(|e| SchedulerError::model("ISAC", e))?;
    let labels = km
        .predict(&xm)
        .map_err(|e| SchedulerError::model("ISAC", e))?;
    let mut per_cluster: HashMap<usize, Vec<usize>> = HashMap::new();
    for (&c, &l) in train.cells.iter().zip(&labels) {
        per_cluster.entry(l).or_default().push(c);
    }
    let scores: HashMap<usize, Vec<f64>> = per_cluster
        .into_iter()
        .map(|(l, cells)| (l, mean_relative(train.tensor, cells.into_iter())))
        .collect();
    let q: Vec<Vec<f64>> = queries
        .iter()
        .map(|&c| z.apply(&train.contexts[c]))
        .collect();
    let qm = matrix(&q, "ISAC")?;
    let ql = km
        .predict(&qm)
        .map_err(|e| SchedulerError::model("ISAC", e))?;
    Ok(ql
        .iter()
        .map(|l| scores.get(l).cloned().unwrap_or_else(|| fallback.clone()))
        .collect())
}

fn argosmart(train: &TrainSet<'_>, queries: &[usize]) -> Result<Vec<Vec<f64>>> {
    let (z, x) = standardized_contexts(train);
    let fallback = mean_relative(train.tensor, train.cells.iter().copied());
    Ok(queries
        .iter()
        .map(|&q| {
            let qv = z.apply(&train.contexts[q]);
            let nearest = x
                .iter()
                .enumerate()
                .map(|(i, r)| (i, r.iter().zip(&qv).map(|(a, b)| (a - b).powi(2)).sum()))
                .min_by(|a: &(usize, f64), b| a.1.total_cmp(&b.1))
                .map(|(i, _)| train.cells[i]);
            match nearest {
                Some(n) => relative(train.tensor, n)
                    .into_iter()
                    .zip(&fallback)
                    .map(|(r, f)| r.unwrap_or(*f))
                    .collect(),
                None => fallback.clone(),
            }
        })
        .collect())
}

fn alors(train: &TrainSet<'_>, queries: &[usize]) -> Result<Vec<Vec<f64>>> {
    let n_methods = train.tensor.methods.len();
    let fallback = mean_relative(train.tensor, train.cells.iter().copied());
    // The training matrix of relative log runtimes, gaps filled with the method's mean.
    let r: Vec<Vec<f64>> = train
        .cells
        .iter()
        .map(|&c| {
            relative(train.tensor, c)
                .into_iter()
                .zip(&fallback)
                .map(|(v, f)| v.unwrap_or(*f))
                .collect()
        })
        .collect();
    let rank = 3.min(n_methods).min(train.cells.len());
    if rank == 0 {
        return Ok(vec![fallback; queries.len()]);
    }
    // R = U S Vᵀ; a cell's latent factors are its row of U S, a method's its row of V.
    let rm = matrix(&r, "ALORS")?;
    let svd = if train.cells.len() >= n_methods {
        rm.svd().map_err(|e| SchedulerError::model("ALORS", e))?
    } else {
        return Ok(vec![fallback; queries.len()]);
    };
    let mut order: Vec<usize> = (0..svd.s.len()).collect();
    order.sort_by(|&a, &b| svd.s[b].total_cmp(&svd.s[a]));
    let top: Vec<usize> = order.into_iter().take(rank).collect();
    let latent: Vec<Vec<f64>> = (0..train.cells.len())
        .map(|i| top.iter().map(|&k| *svd.U.get((i, k)) * svd.s[k]).collect())
        .collect();
    let v: Vec<Vec<f64>> = (0..n_methods)
        .map(|m| top.iter().map(|&k| *svd.V.get((m, k))).collect())
        .collect();
    let (z, x) = standardized_contexts(train);
    let ridge = RidgeFit::fit(&x, &latent, 1.0)?;
    Ok(queries
        .iter()
        .map(|&q| {
            let u = ridge.predict(&z.apply(&train.contexts[q]));
            v.iter()
                .map(|vm| vm.iter().zip(&u).map(|(a, b)| a * b).sum())
                .collect()
        })
        .collect())
}

/// MetaInf: the gated model the router uses ([`Robust`]), predicted ln runtimes as scores.
fn meta_inf(train: &TrainSet<'_>, queries: &[usize]) -> Result<Scored> {
    let data = FitData {
        tensor: train.tensor,
        contexts: train.contexts,
        methods: train.methods,
        ids: train.ids,
    };
    let model = Robust::fit(
        &data,
        train.cells,
        RobustConfig {
            split: train.split,
            ..RobustConfig::default()
        },
    )?;
    let contexts: Vec<Vec<f64>> = queries.iter().map(|&c| train.contexts[c].clone()).collect();
    let ids: Vec<_> = queries
        .iter()
        .map(|&c| train.ids.context(train.tensor, c))
        .collect();
    let slots: Vec<Option<usize>> = (0..train.methods.len()).map(Some).collect();
    let predictions = model.predict(&contexts, &ids, train.methods, &slots);
    Ok(Scored {
        scores: predictions
            .iter()
            .map(|row| row.iter().map(|p| p.log_runtime).collect())
            .collect(),
        predictions: Some(predictions),
        note: Some(model.gate().describe()),
    })
}

/// The earlier MetaInf: the two-stage boosted trees, predicted ln runtimes as scores.
fn meta_inf_level(train: &TrainSet<'_>, queries: &[usize]) -> Result<Vec<Vec<f64>>> {
    let model = TwoStage::fit(
        train.tensor,
        train.cells,
        train.contexts,
        train.methods,
        GbdtParams::default(),
    )?;
    let contexts: Vec<Vec<f64>> = queries.iter().map(|&c| train.contexts[c].clone()).collect();
    Ok(model
        .predict(&contexts, train.methods)
        .into_iter()
        .map(|row| row.into_iter().map(|p| p.log_runtime).collect())
        .collect())
}

/// Most training rows SVR is fitted on.
const SVR_ROWS: usize = 1500;

/// The smartcore regressors and the MLP: rows (context ++ method) → ln runtime.
fn regression(
    kind: SelectorKind,
    train: &TrainSet<'_>,
    queries: &[usize],
) -> Result<Vec<Vec<f64>>> {
    let (rows, y) = training_rows(train.tensor, train.cells, train.contexts, train.methods);
    if rows.is_empty() {
        return Err(SchedulerError::Data("no measured training entries".into()));
    }
    let n_methods = train.methods.len();
    let query_rows: Vec<Vec<f64>> = queries
        .iter()
        .flat_map(|&c| {
            train.methods.iter().map(move |m| {
                let mut row = train.contexts[c].clone();
                row.extend_from_slice(m);
                row
            })
        })
        .collect();
    let flat: Vec<f64> = {
        let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
        let z = Standardizer::fit(&refs);
        let x: Vec<Vec<f64>> = rows.iter().map(|r| z.apply(r)).collect();
        let q: Vec<Vec<f64>> = query_rows.iter().map(|r| z.apply(r)).collect();
        let name = kind.name();
        match kind {
            SelectorKind::Ridge => {
                let yy: Vec<Vec<f64>> = y.iter().map(|v| vec![*v]).collect();
                let fit = RidgeFit::fit(&x, &yy, 1.0)?;
                q.iter().map(|r| fit.predict(r)[0]).collect()
            }
            SelectorKind::RandomForest => {
                let xm = matrix(&x, name)?;
                let rf = RandomForestRegressor::fit(
                    &xm,
                    &y,
                    RandomForestRegressorParameters::default()
                        .with_n_trees(100)
                        .with_max_depth(12)
                        .with_seed(7),
                )
                .map_err(|e| SchedulerError::model(name, e))?;
                rf.predict(&matrix(&q, name)?)
                    .map_err(|e| SchedulerError::model(name, e))?
            }
            SelectorKind::Svr => {
                // smartcore 0.7's SVR sizes each support vector by the number of *rows*
                // (`Vec::from_iterator(row, n)` in `Optimizer::new`): with fewer rows than
                // features the vectors are cut short and prediction panics.
                let cols = x.first().map_or(0, Vec::len);
                if x.len() <= cols {
                    return Err(SchedulerError::model(
                        name,
                        format!(
                            "{} training rows for {cols} features; smartcore's SVR needs more rows than features",
                            x.len()
                        ),
                    ));
                }
                // Its fit grows with the square of the rows (45-50 s per split on 5k rows
                // here): an even subsample of at most SVR_ROWS rows.
                let stride = x.len().div_ceil(SVR_ROWS).max(1);
                let x: Vec<Vec<f64>> = x.iter().step_by(stride).cloned().collect();
                let y: Vec<f64> = y.iter().step_by(stride).copied().collect();
                let xm = matrix(&x, name)?;
                let gamma = 1.0 / x.first().map_or(1, Vec::len).max(1) as f64;
                let params = SVRParameters::default()
                    .with_c(10.0)
                    .with_eps(0.05)
                    .with_kernel(Kernels::rbf().with_gamma(gamma));
                let svr = SVR::fit(&xm, &y, &params).map_err(|e| SchedulerError::model(name, e))?;
                let qm = matrix(&q, name)?;
                svr.predict(&qm)
                    .map_err(|e| SchedulerError::model(name, e))?
            }
            SelectorKind::Knn => {
                let xm = matrix(&x, name)?;
                let k = 5.min(x.len());
                let knn = KNNRegressor::fit(&xm, &y, KNNRegressorParameters::default().with_k(k))
                    .map_err(|e| SchedulerError::model(name, e))?;
                knn.predict(&matrix(&q, name)?)
                    .map_err(|e| SchedulerError::model(name, e))?
            }
            SelectorKind::Mlp => crate::mlp::fit_predict(&x, &y, &q, 7)?,
            _ => return Err(SchedulerError::model(name, "not a regressor")),
        }
    };
    Ok(flat.chunks(n_methods.max(1)).map(<[f64]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::features::{FeatureConfig, FeatureSpace};
    use metainf_protocol::{Keypair, fixtures};

    #[test]
    fn every_selector_scores_every_method_of_every_query() {
        let key = Keypair::generate_ed25519();
        let mut records: Vec<_> = (0..80).map(|v| fixtures::record(&key, v + 1, v)).collect();
        // Make "cb" clearly fastest everywhere.
        for r in &mut records {
            if r.method.short_name() == "cb" {
                r.metrics.wall_time_s = 0.2;
                r.metrics.throughput_tok_s = r.metrics.output_tokens as f64 / 0.2;
            }
        }
        let t = Tensor::from_records(&records).unwrap();
        let all: Vec<usize> = (0..t.cells.len()).collect();
        let fs = FeatureSpace::fit(&t, &all, FeatureConfig::default(), None).unwrap();
        let contexts = fs.tensor_contexts(&t, None).unwrap();
        let methods = fs.tensor_methods(&t, None).unwrap();
        let (train, test) = all.split_at(7);
        let ids = EntityIds::of(&t).unwrap();
        let set = TrainSet {
            tensor: &t,
            cells: train,
            contexts: &contexts,
            methods: &methods,
            ids: &ids,
            split: Split::Random,
        };
        let cb = t
            .methods
            .iter()
            .position(|m| m.short_name() == "cb")
            .unwrap();
        for kind in SelectorKind::ALL {
            let scores = kind.fit_score(&set, test).unwrap().scores;
            assert_eq!(scores.len(), test.len(), "{}", kind.name());
            for s in &scores {
                assert_eq!(s.len(), 8);
                assert!(s.iter().all(|v| v.is_finite()), "{}: {s:?}", kind.name());
                let best = (0..8).min_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap();
                if !matches!(kind, SelectorKind::Svr | SelectorKind::Knn) {
                    assert_eq!(best, cb, "{} chose {}", kind.name(), t.methods[best]);
                }
            }
            assert_eq!(kind.name().parse::<SelectorKind>().unwrap(), kind);
        }
    }
}
