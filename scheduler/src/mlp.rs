//! The MLP baseline: one hidden layer of 64 ReLU units, trained full-batch with Adam on squared
//! error, through candle's automatic differentiation.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::error::{Result, SchedulerError};

const HIDDEN: usize = 64;
const EPOCHS: usize = 400;
const LEARNING_RATE: f64 = 0.01;
const WEIGHT_DECAY: f64 = 1e-4;

fn err(e: candle_core::Error) -> SchedulerError {
    SchedulerError::model("MLP", e)
}

fn flat(rows: &[Vec<f64>]) -> Vec<f32> {
    rows.iter().flatten().map(|&v| v as f32).collect()
}

/// Fits on standardised rows `x` and targets `y`; predicts `queries`.
pub(crate) fn fit_predict(
    x: &[Vec<f64>],
    y: &[f64],
    queries: &[Vec<f64>],
    seed: u64,
) -> Result<Vec<f64>> {
    let dev = Device::Cpu;
    let n = x.len();
    let d = x.first().map_or(0, Vec::len);
    if n == 0 || d == 0 || y.len() != n {
        return Err(SchedulerError::Data("MLP needs rows".into()));
    }
    let y_mean = y.iter().sum::<f64>() / n as f64;
    let xt = Tensor::from_vec(flat(x), (n, d), &dev).map_err(err)?;
    let yt = Tensor::from_vec(
        y.iter().map(|v| (v - y_mean) as f32).collect::<Vec<_>>(),
        (n, 1),
        &dev,
    )
    .map_err(err)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut init = |rows: usize, cols: usize| -> Result<Var> {
        let scale = (2.0 / rows as f64).sqrt();
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.gen_range(-1.0..1.0) * scale) as f32)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &dev).map_err(err)?).map_err(err)
    };
    let w1 = init(d, HIDDEN)?;
    let w2 = init(HIDDEN, 1)?;
    let b1 = Var::zeros(HIDDEN, DType::F32, &dev).map_err(err)?;
    let b2 = Var::zeros(1, DType::F32, &dev).map_err(err)?;
    let params = [w1, b1, w2, b2];
    let forward = |x: &Tensor| -> candle_core::Result<Tensor> {
        x.matmul(params[0].as_tensor())?
            .broadcast_add(params[1].as_tensor())?
            .relu()?
            .matmul(params[2].as_tensor())?
            .broadcast_add(params[3].as_tensor())
    };
    let mut m: Vec<Tensor> = params
        .iter()
        .map(|p| p.as_tensor().zeros_like())
        .collect::<candle_core::Result<_>>()
        .map_err(err)?;
    let mut v = m.clone();
    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    for step in 1..=EPOCHS {
        let loss = (forward(&xt).map_err(err)? - &yt)
            .and_then(|e| e.sqr())
            .and_then(|e| e.mean_all())
            .map_err(err)?;
        let grads = loss.backward().map_err(err)?;
        let c1 = 1.0 - beta1.powi(step as i32);
        let c2 = 1.0 - beta2.powi(step as i32);
        for (i, p) in params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = (g + p.as_tensor().affine(WEIGHT_DECAY, 0.0).map_err(err)?).map_err(err)?;
            m[i] = (m[i].affine(beta1, 0.0).map_err(err)?
                + g.affine(1.0 - beta1, 0.0).map_err(err)?)
            .map_err(err)?;
            v[i] = (v[i].affine(beta2, 0.0).map_err(err)?
                + g.sqr()
                    .and_then(|s| s.affine(1.0 - beta2, 0.0))
                    .map_err(err)?)
            .map_err(err)?;
            let m_hat = m[i].affine(1.0 / c1, 0.0).map_err(err)?;
            let v_hat = v[i]
                .affine(1.0 / c2, 0.0)
                .and_then(|t| t.sqrt())
                .and_then(|t| t.affine(1.0, eps))
                .map_err(err)?;
            let update = (m_hat / v_hat)
                .and_then(|u| u.affine(LEARNING_RATE, 0.0))
                .map_err(err)?;
            p.set(&(p.as_tensor() - update).map_err(err)?)
                .map_err(err)?;
        }
    }
    if queries.is_empty() {
        return Ok(Vec::new());
    }
    let q = Tensor::from_vec(flat(queries), (queries.len(), d), &dev).map_err(err)?;
    let out = forward(&q)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)?;
    Ok(out.into_iter().map(|v| f64::from(v) + y_mean).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn learns_a_smooth_function() {
        let x: Vec<Vec<f64>> = (0..200)
            .map(|i| {
                let a = f64::from(i) / 100.0 - 1.0;
                vec![a, a * a]
            })
            .collect();
        let y: Vec<f64> = x.iter().map(|r| 2.0 * r[0] - r[1] + 3.0).collect();
        let q = vec![vec![0.5, 0.25], vec![-0.5, 0.25]];
        let p = fit_predict(&x, &y, &q, 1).unwrap();
        assert!((p[0] - 3.75).abs() < 0.2, "{p:?}");
        assert!((p[1] - 1.75).abs() < 0.2, "{p:?}");
    }
}
