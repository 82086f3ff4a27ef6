//! Gradient-boosted trees (forust-ml, XGBoost's algorithm; 40× faster to fit here than
//! smartcore's `XGRegressor` at the same error) as an ensemble whose spread is the
//! uncertainty: each member sees a different row subsample and seed; the prediction is the
//! members' mean. Flattened for prediction ([`Gbdt::predict_flat`]); and the earlier two-stage
//! model built from them ([`TwoStage`], the `MetaInf-level` selector).

use forust_ml::GradientBooster;
use forust_ml::data::Matrix;
use forust_ml::objective::ObjectiveType;
use forust_ml::sampler::SampleMethod;
use serde::{Deserialize, Serialize};

use crate::dataset::Tensor;
use crate::error::{Result, SchedulerError};

/// Hyper-parameters of the boosted ensemble.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GbdtParams {
    /// Ensemble members.
    pub members: usize,
    /// Trees per member.
    pub trees: usize,
    /// Depth of each tree.
    pub depth: usize,
    /// Shrinkage.
    pub learning_rate: f32,
    /// Share of rows each tree sees.
    pub subsample: f32,
    /// Seed of the first member (member i uses seed + i).
    pub seed: u64,
}

impl Default for GbdtParams {
    fn default() -> Self {
        Self {
            members: 4,
            trees: 20,
            depth: 6,
            learning_rate: 0.3,
            subsample: 0.8,
            seed: 7,
        }
    }
}

/// A predicted log runtime with its uncertainty.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Mean over the ensemble of ln(runtime in seconds).
    pub log_runtime: f64,
    /// Standard deviation over the ensemble, in the same log units.
    pub log_std: f64,
}

impl Prediction {
    /// Predicted runtime in seconds.
    pub fn runtime_s(&self) -> f64 {
        self.log_runtime.exp()
    }
}

/// Gradient-boosted trees, an ensemble of members.
pub struct Gbdt {
    members: Vec<GradientBooster>,
    cols: usize,
    flat: FlatForest,
}

/// One node of a [`FlatForest`]. A leaf points to itself on both sides, so every row can take
/// the same number of steps through a tree without a branch.
#[derive(Clone, Copy, Debug)]
struct FlatNode {
    threshold: f64,
    feature: u32,
    left: u32,
    right: u32,
    /// Where a missing value (NaN: an unknown fact) goes, as forust learned it.
    missing: u32,
    value: f32,
}

/// The ensemble's trees flattened into one array for prediction: rows go through each tree
/// in lockstep blocks, branch-free, so their dependent loads overlap. forust's own
/// `predict` walks 80-byte nodes one row at a time with a branch per level (6 ms for a routing
/// decision of 800 rows here, against 1 ms allowed).
#[derive(Clone, Debug, Default)]
struct FlatForest {
    nodes: Vec<FlatNode>,
    /// Per tree: root index, depth, member.
    trees: Vec<(u32, u32, u32)>,
    /// Per member: base score.
    base: Vec<f64>,
}

/// Rows traversing a tree together.
const LOCKSTEP: usize = 16;

impl FlatForest {
    fn build(members: &[GradientBooster], cols: usize) -> Result<Self> {
        let mut f = FlatForest::default();
        for (m, b) in members.iter().enumerate() {
            f.base.push(b.base_score);
            let n_trees = b
                .prediction_iteration
                .unwrap_or(b.trees.len())
                .min(b.trees.len());
            for tree in &b.trees[..n_trees] {
                if tree.nodes.is_empty() {
                    continue;
                }
                let offset = f.nodes.len() as u32;
                // Nodes are addressed by their number `num`; map numbers to positions.
                let pos: std::collections::HashMap<usize, u32> = tree
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.num, offset + i as u32))
                    .collect();
                let mut depth = 0;
                for (i, n) in tree.nodes.iter().enumerate() {
                    let me = offset + i as u32;
                    let child = |c: usize| pos.get(&c).copied().unwrap_or(me);
                    depth = depth.max(n.depth as u32);
                    if !n.is_leaf && n.split_feature >= cols {
                        return Err(SchedulerError::Persist(format!(
                            "a tree splits on feature {} of {cols}",
                            n.split_feature
                        )));
                    }
                    f.nodes.push(if n.is_leaf {
                        FlatNode {
                            threshold: 0.0,
                            feature: 0,
                            left: me,
                            right: me,
                            missing: me,
                            value: n.weight_value,
                        }
                    } else {
                        FlatNode {
                            threshold: n.split_value,
                            feature: n.split_feature as u32,
                            left: child(n.left_child),
                            right: child(n.right_child),
                            missing: child(n.missing_node),
                            value: 0.0,
                        }
                    });
                }
                let root = pos.get(&0).copied().unwrap_or(offset);
                f.trees.push((root, depth, m as u32));
            }
        }
        Ok(f)
    }

    /// Sum of leaf values per member for each row of the row-major `data` (`cols` values per
    /// row): `out[row * members + member]`.
    fn predict(&self, data: &[f64], cols: usize, out: &mut Vec<f64>) {
        let k = self.base.len();
        let n = data.len().checked_div(cols).unwrap_or(0);
        out.clear();
        out.reserve(n * k);
        for _ in 0..n {
            out.extend_from_slice(&self.base);
        }
        let mut start = 0;
        while start < n {
            // A full block always: the last one repeats its final row (results not kept).
            let offsets: [usize; LOCKSTEP] = std::array::from_fn(|r| (start + r).min(n - 1) * cols);
            let live = LOCKSTEP.min(n - start);
            for &(root, depth, member) in &self.trees {
                let mut idx = [root; LOCKSTEP];
                for _ in 0..depth {
                    for (i, off) in idx.iter_mut().zip(&offsets) {
                        let node = &self.nodes[*i as usize];
                        // `feature < cols` is checked when the forest is built.
                        let v = data[off + node.feature as usize];
                        let next = if v < node.threshold {
                            node.left
                        } else {
                            node.right
                        };
                        *i = if v.is_nan() { node.missing } else { next };
                    }
                }
                for (r, i) in idx.iter().take(live).enumerate() {
                    out[(start + r) * k + member as usize] +=
                        f64::from(self.nodes[*i as usize].value);
                }
            }
            start += LOCKSTEP;
        }
    }
}

impl std::fmt::Debug for Gbdt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gbdt")
            .field("members", &self.members.len())
            .field("cols", &self.cols)
            .field("trees", &self.flat.trees.len())
            .finish()
    }
}

fn column_major(rows: &[Vec<f64>], cols: usize) -> Vec<f64> {
    let mut data = vec![0.0; rows.len() * cols];
    for (r, row) in rows.iter().enumerate() {
        for (c, v) in row.iter().enumerate().take(cols) {
            data[c * rows.len() + r] = *v;
        }
    }
    data
}

impl Gbdt {
    /// Fits the ensemble to `rows` (all of one length) and targets `y`.
    pub fn fit(rows: &[Vec<f64>], y: &[f64], params: GbdtParams) -> Result<Self> {
        let cols = rows.first().map_or(0, Vec::len);
        if rows.is_empty() || rows.len() != y.len() || rows.iter().any(|r| r.len() != cols) {
            return Err(SchedulerError::Data(format!(
                "{} feature rows for {} targets",
                rows.len(),
                y.len()
            )));
        }
        if params.members == 0 || params.trees == 0 || params.depth == 0 {
            return Err(SchedulerError::invalid(
                "gbdt parameters",
                "members, trees and depth must be at least 1",
            ));
        }
        let data = column_major(rows, cols);
        let matrix = Matrix::new(&data, rows.len(), cols);
        // Row subsampling also breaks the ties of XOR-like interactions (a method that wins
        // only at one batch size), where every single split has zero gain on the full data.
        let subsample = params.subsample;
        let members = (0..params.members)
            .map(|i| {
                let mut b = GradientBooster::default()
                    .set_objective_type(ObjectiveType::SquaredLoss)
                    .set_iterations(params.trees)
                    .set_max_depth(params.depth)
                    .set_learning_rate(params.learning_rate)
                    .set_sample_method(if params.members > 1 && subsample < 1.0 {
                        SampleMethod::Random
                    } else {
                        SampleMethod::None
                    })
                    .set_subsample(if params.members > 1 { subsample } else { 1.0 })
                    .set_seed(params.seed + i as u64)
                    .set_min_leaf_weight(1.0)
                    .set_parallel(rows.len() > 2000);
                b.fit_unweighted(&matrix, y, None)
                    .map_err(|e| SchedulerError::model("gbdt", e))?;
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        let flat = FlatForest::build(&members, cols)?;
        Ok(Self {
            members,
            cols,
            flat,
        })
    }

    /// Mean and standard deviation over the members for each row.
    pub fn predict(&self, rows: &[Vec<f64>]) -> Vec<Prediction> {
        let mut data = Vec::with_capacity(rows.len() * self.cols);
        for r in rows {
            let end = data.len() + self.cols;
            data.extend(r.iter().take(self.cols));
            data.resize(end, 0.0);
        }
        self.predict_flat(&data)
    }

    /// As [`Gbdt::predict`], for row-major `data` of [`Gbdt::cols`] values per row.
    pub fn predict_flat(&self, data: &[f64]) -> Vec<Prediction> {
        let mut sums = Vec::new();
        self.flat.predict(data, self.cols, &mut sums);
        let k = self.flat.base.len().max(1);
        sums.chunks(k)
            .map(|per_member| {
                let n = per_member.len().max(1) as f64;
                let mean = per_member.iter().sum::<f64>() / n;
                let var = per_member.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / n;
                Prediction {
                    log_runtime: mean,
                    log_std: var.sqrt(),
                }
            })
            .collect()
    }

    /// Feature columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// forust's own prediction, for checking the flat forest against it.
    #[cfg(test)]
    fn predict_reference(&self, rows: &[Vec<f64>]) -> Vec<f64> {
        let data = column_major(rows, self.cols);
        let matrix = Matrix::new(&data, rows.len(), self.cols);
        let per_member: Vec<Vec<f64>> = self
            .members
            .iter()
            .map(|b| b.predict(&matrix, false))
            .collect();
        (0..rows.len())
            .map(|r| per_member.iter().map(|p| p[r]).sum::<f64>() / per_member.len() as f64)
            .collect()
    }

    pub(crate) fn to_json(&self) -> Result<Vec<String>> {
        self.members
            .iter()
            .map(|b| {
                b.json_dump()
                    .map_err(|e| SchedulerError::Persist(e.to_string()))
            })
            .collect()
    }

    pub(crate) fn from_json(members: &[String], cols: usize) -> Result<Self> {
        let members = members
            .iter()
            .map(|j| {
                GradientBooster::from_json(j).map_err(|e| SchedulerError::Persist(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        if members.is_empty() {
            return Err(SchedulerError::Persist("no ensemble members".into()));
        }
        let flat = FlatForest::build(&members, cols)?;
        Ok(Self {
            members,
            cols,
            flat,
        })
    }
}

/// Rows (context ++ method features) and ln runtime targets of every measured (cell, method)
/// among `cells`.
pub fn training_rows(
    tensor: &Tensor,
    cells: &[usize],
    contexts: &[Vec<f64>],
    methods: &[Vec<f64>],
) -> (Vec<Vec<f64>>, Vec<f64>) {
    let mut rows = Vec::new();
    let mut y = Vec::new();
    for &c in cells {
        for (m, rt) in tensor.cells[c].measured() {
            let mut row = contexts[c].clone();
            row.extend_from_slice(&methods[m]);
            rows.push(row);
            y.push(rt.max(1e-9).ln());
        }
    }
    (rows, y)
}

/// Log runtime as a *level* per context plus a *relative* effect per method: ln rt(c, m) =
/// level(c) + rel(c, m), two boosted ensembles. Most of the variance of ln runtime lies between
/// contexts (workload size, threads); a single model spends its splits there and has little
/// left for the method differences inside a context, which are what a selection ranks. The
/// relative model is trained on ln rt − the cell's mean over its measured methods.
pub struct TwoStage {
    level: Gbdt,
    relative: Gbdt,
}

impl std::fmt::Debug for TwoStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwoStage")
            .field("level", &self.level)
            .field("relative", &self.relative)
            .finish()
    }
}

impl TwoStage {
    /// Fits both stages on the measured entries of `cells`.
    pub fn fit(
        tensor: &Tensor,
        cells: &[usize],
        contexts: &[Vec<f64>],
        methods: &[Vec<f64>],
        params: GbdtParams,
    ) -> Result<Self> {
        let mut level_rows = Vec::new();
        let mut level_y = Vec::new();
        let mut rel_rows = Vec::new();
        let mut rel_y = Vec::new();
        for &c in cells {
            let logs: Vec<(usize, f64)> = tensor.cells[c]
                .measured()
                .map(|(m, rt)| (m, rt.max(1e-9).ln()))
                .collect();
            if logs.is_empty() {
                continue;
            }
            let mean = logs.iter().map(|(_, l)| l).sum::<f64>() / logs.len() as f64;
            level_rows.push(contexts[c].clone());
            level_y.push(mean);
            for (m, l) in logs {
                let mut row = contexts[c].clone();
                row.extend_from_slice(&methods[m]);
                rel_rows.push(row);
                rel_y.push(l - mean);
            }
        }
        Ok(Self {
            level: Gbdt::fit(&level_rows, &level_y, params)?,
            relative: Gbdt::fit(&rel_rows, &rel_y, params)?,
        })
    }

    /// Predictions `[context][method]` for context rows and method rows.
    pub fn predict(&self, contexts: &[Vec<f64>], methods: &[Vec<f64>]) -> Vec<Vec<Prediction>> {
        let level = self.level.predict(contexts);
        let cols = self.relative.cols();
        let mut data = Vec::with_capacity(contexts.len() * methods.len() * cols);
        for c in contexts {
            for m in methods {
                let at = data.len();
                data.extend_from_slice(c);
                data.extend_from_slice(m);
                data.resize(at + cols, 0.0);
            }
        }
        let rel = self.relative.predict_flat(&data);
        level
            .iter()
            .zip(rel.chunks(methods.len().max(1)))
            .map(|(l, rs)| {
                rs.iter()
                    .map(|r| Prediction {
                        log_runtime: l.log_runtime + r.log_runtime,
                        log_std: l.log_std.hypot(r.log_std),
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn boosted_trees_learn_a_nonlinear_function_and_report_spread() {
        let mut rng = StdRng::seed_from_u64(1);
        let rows: Vec<Vec<f64>> = (0..600)
            .map(|_| vec![rng.gen_range(0.0..4.0), rng.gen_range(0.0..1.0)])
            .collect();
        let f = |r: &[f64]| if r[1] > 0.5 { r[0] * r[0] } else { 3.0 - r[0] };
        let y: Vec<f64> = rows.iter().map(|r| f(r)).collect();
        let g = Gbdt::fit(&rows, &y, GbdtParams::default()).unwrap();
        let test = vec![vec![3.0, 0.9], vec![3.0, 0.1], vec![1.0, 0.9]];
        let p = g.predict(&test);
        for (row, pred) in test.iter().zip(&p) {
            assert!((pred.log_runtime - f(row)).abs() < 0.6, "{row:?} {pred:?}");
        }
        assert!(p.iter().all(|p| p.log_std >= 0.0));
        assert!(p.iter().any(|p| p.log_std > 0.0), "members must differ");
        // The flat forest agrees with forust's own prediction.
        let reference = g.predict_reference(&rows[..100]);
        for (a, b) in g.predict(&rows[..100]).iter().zip(&reference) {
            assert!((a.log_runtime - b).abs() < 1e-9, "{a:?} {b}");
        }
        assert!(Gbdt::fit(&rows, &y[..3], GbdtParams::default()).is_err());
        let saved = g.to_json().unwrap();
        let again = Gbdt::from_json(&saved, 2).unwrap();
        assert_eq!(again.predict(&test), p);
    }
}

#[cfg(test)]
mod small_data {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn an_interaction_is_learned_from_eighteen_rows() {
        // 3 "hardware" × 2 batch sizes × 3 methods; the best method flips with the batch.
        let mut rows = Vec::new();
        let mut y = Vec::new();
        for hw in [0.0, 1.0, 2.0] {
            for batch in [0.69, 4.17] {
                for (m, (small, large)) in [(0, (0.18, 0.0)), (1, (0.0, 0.18)), (2, (0.69, 0.69))] {
                    let mut r = vec![hw, batch, 0.0, 0.0, 0.0];
                    r[2 + m] = 1.0;
                    rows.push(r);
                    y.push(if batch < 1.0 { small } else { large });
                }
            }
        }
        let g = Gbdt::fit(&rows, &y, GbdtParams::default()).unwrap();
        let p = g.predict(&rows);
        for ((r, want), got) in rows.iter().zip(&y).zip(&p) {
            assert!(
                (got.log_runtime - want).abs() < 0.08,
                "{r:?}: {want} vs {got:?}"
            );
        }
    }
}
