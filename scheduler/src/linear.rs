//! Shared linear pieces of the learners: z-score standardisation that tolerates unknown facts,
//! ridge regression, and dense matrices for smartcore.

use smartcore::linalg::basic::arrays::Array;
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linalg::traits::cholesky::CholeskyDecomposable;

use crate::error::{Result, SchedulerError};

/// z-score standardisation fitted on training rows. Missing values (NaN: unknown facts) are
/// left out of the fit and become the mean (0) when applied: the smartcore learners take no
/// NaN.
pub(crate) struct Standardizer {
    mean: Vec<f64>,
    std: Vec<f64>,
}

impl Standardizer {
    pub(crate) fn fit(rows: &[&[f64]]) -> Self {
        let d = rows.first().map_or(0, |r| r.len());
        let mut sum = vec![0.0; d];
        let mut count = vec![0.0f64; d];
        for r in rows {
            for ((s, n), v) in sum.iter_mut().zip(&mut count).zip(r.iter()) {
                if !v.is_nan() {
                    *s += v;
                    *n += 1.0;
                }
            }
        }
        let mean: Vec<f64> = sum
            .iter()
            .zip(&count)
            .map(|(s, n)| s / n.max(1.0))
            .collect();
        let mut var = vec![0.0; d];
        for r in rows {
            for ((s, v), m) in var.iter_mut().zip(r.iter()).zip(&mean) {
                if !v.is_nan() {
                    *s += (v - m).powi(2);
                }
            }
        }
        let std = var
            .into_iter()
            .zip(&count)
            .map(|(v, n)| v / n.max(1.0))
            .map(|v| if v > 1e-12 { v.sqrt() } else { 1.0 })
            .collect();
        Self { mean, std }
    }

    pub(crate) fn apply(&self, row: &[f64]) -> Vec<f64> {
        row.iter()
            .zip(&self.mean)
            .zip(&self.std)
            .map(|((v, m), s)| if v.is_nan() { 0.0 } else { (v - m) / s })
            .collect()
    }
}

pub(crate) fn matrix(rows: &[Vec<f64>], model: &str) -> Result<DenseMatrix<f64>> {
    DenseMatrix::from_2d_vec(&rows.to_vec()).map_err(|e| SchedulerError::model(model, e))
}

/// Ridge regression `(XᵀX + αI) w = Xᵀy` with an unpenalised intercept (X centred); `y` may
/// have several columns: weights d × t and intercepts t.
pub(crate) struct RidgeFit {
    w: Vec<Vec<f64>>,
    b: Vec<f64>,
}

impl RidgeFit {
    pub(crate) fn fit(x: &[Vec<f64>], y: &[Vec<f64>], alpha: f64) -> Result<Self> {
        let n = x.len();
        let d = x.first().map_or(0, Vec::len);
        let t = y.first().map_or(0, Vec::len);
        if n == 0 || d == 0 || t == 0 {
            return Err(SchedulerError::Data("ridge needs rows".into()));
        }
        let mean: Vec<f64> = (0..d)
            .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n as f64)
            .collect();
        let ymean: Vec<f64> = (0..t)
            .map(|j| y.iter().map(|r| r[j]).sum::<f64>() / n as f64)
            .collect();
        let mut xtx = vec![vec![0.0; d]; d];
        let mut xty = vec![vec![0.0; t]; d];
        for (row, yr) in x.iter().zip(y) {
            let xc: Vec<f64> = row.iter().zip(&mean).map(|(v, m)| v - m).collect();
            for i in 0..d {
                for j in i..d {
                    xtx[i][j] += xc[i] * xc[j];
                }
                for k in 0..t {
                    xty[i][k] += xc[i] * (yr[k] - ymean[k]);
                }
            }
        }
        for i in 0..d {
            let (upper, lower) = xtx.split_at_mut(i);
            for (j, row) in upper.iter().enumerate() {
                lower[0][j] = row[i];
            }
            lower[0][i] += alpha;
        }
        let a = matrix(&xtx, "Ridge")?;
        let b = matrix(&xty, "Ridge")?;
        let w = a
            .cholesky_solve_mut(b)
            .map_err(|e| SchedulerError::model("Ridge", e))?;
        let w: Vec<Vec<f64>> = (0..d)
            .map(|i| (0..t).map(|k| *w.get((i, k))).collect())
            .collect();
        let b = (0..t)
            .map(|k| ymean[k] - (0..d).map(|i| w[i][k] * mean[i]).sum::<f64>())
            .collect();
        Ok(Self { w, b })
    }

    pub(crate) fn predict(&self, row: &[f64]) -> Vec<f64> {
        (0..self.b.len())
            .map(|k| self.b[k] + row.iter().zip(&self.w).map(|(v, w)| v * w[k]).sum::<f64>())
            .collect()
    }
}
