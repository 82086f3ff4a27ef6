//! The performance tensor P[workload, method, hardware] (and model) built from records.
//!
//! A *cell* is one (hardware, model, workload) combination; it holds the measured runtime of
//! every method tried there. Selection happens per cell: which method (and, with hosts, which
//! hardware) runs that workload fastest.

use std::collections::HashMap;

use metainf_protocol::{
    ContentId, HardwareProfile, MethodConfig, ModelDescriptor, PerfRecord, WorkloadDescriptor,
};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// One (hardware, model, workload) cell of the tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Index into [`Tensor::hardware`].
    pub hardware: usize,
    /// Index into [`Tensor::models`].
    pub model: usize,
    /// Index into [`Tensor::workloads`].
    pub workload: usize,
    /// Runtime in seconds per method (index into [`Tensor::methods`]); `None` where the method
    /// was not measured here. Repeated measurements are combined by their geometric mean.
    pub runtime_s: Vec<Option<f64>>,
}

impl Cell {
    /// Methods measured in this cell.
    pub fn measured(&self) -> impl Iterator<Item = (usize, f64)> + '_ {
        self.runtime_s
            .iter()
            .enumerate()
            .filter_map(|(m, r)| r.map(|r| (m, r)))
    }

    /// The fastest measured method and its runtime.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.measured().min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Mean runtime over the measured methods.
    pub fn mean_runtime(&self) -> Option<f64> {
        let (n, sum) = self
            .measured()
            .fold((0usize, 0.0), |(n, s), (_, r)| (n + 1, s + r));
        (n > 0).then(|| sum / n as f64)
    }
}

/// Which measurement of a record the tensor holds (lower is better for all of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Wall time of the whole job: what a batch job waits for (the paper's inference time).
    #[default]
    WallTime,
    /// Median time to first token: what an interactive user waits for.
    TtftP50,
    /// 95th percentile of the inter-token latency: how smooth streaming is.
    ItlP95,
}

impl Metric {
    /// The metric's value in a record, in seconds (`None` where it was not measured).
    pub fn of(self, r: &PerfRecord) -> Option<f64> {
        let v = match self {
            Metric::WallTime => r.metrics.wall_time_s,
            Metric::TtftP50 => r.metrics.ttft_ms.p50 / 1000.0,
            Metric::ItlP95 => r.metrics.itl_ms.p95 / 1000.0,
        };
        (v.is_finite() && v > 0.0).then_some(v)
    }
}

impl std::str::FromStr for Metric {
    type Err = crate::SchedulerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "wall" | "wall-time" => Ok(Self::WallTime),
            "ttft" | "ttft-p50" => Ok(Self::TtftP50),
            "itl" | "itl-p95" => Ok(Self::ItlP95),
            other => Err(crate::SchedulerError::invalid(
                "metric",
                format!("`{other}` (expected wall, ttft-p50 or itl-p95)"),
            )),
        }
    }
}

/// The performance tensor: distinct entities and the cells that combine them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// Hardware profiles.
    pub hardware: Vec<HardwareProfile>,
    /// Models.
    pub models: Vec<ModelDescriptor>,
    /// Workloads.
    pub workloads: Vec<WorkloadDescriptor>,
    /// Methods.
    pub methods: Vec<MethodConfig>,
    /// Cells, in the order first seen.
    pub cells: Vec<Cell>,
}

/// Interns entities by content id.
struct Interner<T> {
    index: HashMap<ContentId, usize>,
    items: Vec<T>,
}

impl<T: Clone> Interner<T> {
    fn new() -> Self {
        Self {
            index: HashMap::new(),
            items: Vec::new(),
        }
    }

    fn intern(&mut self, id: ContentId, item: &T) -> usize {
        *self.index.entry(id).or_insert_with(|| {
            self.items.push(item.clone());
            self.items.len() - 1
        })
    }
}

impl Tensor {
    /// Builds the tensor from records (benchmarks, jobs and imports alike). The runtime of a
    /// record is its wall time; records of the same (cell, method) are averaged
    /// geometrically.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a PerfRecord>) -> Result<Self> {
        Self::from_records_with(records, Metric::WallTime)
    }

    /// As [`Tensor::from_records`], holding `metric` instead of the wall time; records without
    /// that measurement are left out.
    pub fn from_records_with<'a>(
        records: impl IntoIterator<Item = &'a PerfRecord>,
        metric: Metric,
    ) -> Result<Self> {
        let mut hardware = Interner::new();
        let mut models = Interner::new();
        let mut workloads = Interner::new();
        let mut methods = Interner::new();
        // (hardware, model, workload) -> cell index; per cell and method: (sum of logs, count).
        let mut cell_index: HashMap<(usize, usize, usize), usize> = HashMap::new();
        let mut sums: Vec<HashMap<usize, (f64, u32)>> = Vec::new();
        let mut keys: Vec<(usize, usize, usize)> = Vec::new();
        for r in records {
            let Some(value) = metric.of(r) else {
                continue;
            };
            let ids = r.cell()?;
            let h = hardware.intern(ids.hardware, &r.hardware);
            let m = models.intern(ids.model, &r.model);
            let w = workloads.intern(ids.workload, &r.workload);
            let k = methods.intern(ids.method, &r.method);
            let c = *cell_index.entry((h, m, w)).or_insert_with(|| {
                keys.push((h, m, w));
                sums.push(HashMap::new());
                keys.len() - 1
            });
            let runtime = value.max(1e-9);
            let e = sums[c].entry(k).or_insert((0.0, 0));
            e.0 += runtime.ln();
            e.1 += 1;
        }
        let n_methods = methods.items.len();
        let cells = keys
            .into_iter()
            .zip(sums)
            .map(|((h, m, w), per_method)| {
                let mut runtime_s = vec![None; n_methods];
                for (k, (sum, n)) in per_method {
                    runtime_s[k] = Some((sum / f64::from(n)).exp());
                }
                Cell {
                    hardware: h,
                    model: m,
                    workload: w,
                    runtime_s,
                }
            })
            .collect();
        Ok(Self {
            hardware: hardware.items,
            models: models.items,
            workloads: workloads.items,
            methods: methods.items,
            cells,
        })
    }

    /// Number of measured (cell, method) entries.
    pub fn observations(&self) -> usize {
        self.cells.iter().map(|c| c.measured().count()).sum()
    }

    /// Cells where at least `min_methods` methods were measured: the ones a selection can be
    /// scored on.
    pub fn comparable_cells(&self, min_methods: usize) -> Vec<usize> {
        (0..self.cells.len())
            .filter(|&c| self.cells[c].measured().count() >= min_methods.max(1))
            .collect()
    }

    /// A short, human label of a cell: "preset/requests @ hardware (units) · model".
    pub fn cell_label(&self, c: usize) -> String {
        let cell = &self.cells[c];
        let w = &self.workloads[cell.workload];
        let h = &self.hardware[cell.hardware].spec;
        format!(
            "{}×{} @ {} ({} units) · {}",
            w.preset.as_deref().unwrap_or("workload"),
            w.requests,
            h.name,
            h.compute_units,
            self.models[cell.model].name
        )
    }
}

/// Relative log runtimes of a cell: ln(rt) minus the cell's mean ln(rt), `None` where missing.
pub(crate) fn relative(tensor: &Tensor, c: usize) -> Vec<Option<f64>> {
    let cell = &tensor.cells[c];
    let logs: Vec<Option<f64>> = cell.runtime_s.iter().map(|r| r.map(f64::ln)).collect();
    let known: Vec<f64> = logs.iter().flatten().copied().collect();
    let mean = known.iter().sum::<f64>() / known.len().max(1) as f64;
    logs.into_iter().map(|l| l.map(|l| l - mean)).collect()
}

/// Mean relative log runtime per method over `cells` (missing methods: 0): Global Best's
/// scores.
pub(crate) fn mean_relative(tensor: &Tensor, cells: impl Iterator<Item = usize>) -> Vec<f64> {
    let n = tensor.methods.len();
    let mut sum = vec![0.0; n];
    let mut count = vec![0u32; n];
    for c in cells {
        for (m, r) in relative(tensor, c).into_iter().enumerate() {
            if let Some(r) = r {
                sum[m] += r;
                count[m] += 1;
            }
        }
    }
    sum.iter()
        .zip(&count)
        .map(|(s, &k)| if k > 0 { s / f64::from(k) } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use metainf_protocol::Keypair;
    use metainf_protocol::fixtures::record;

    #[test]
    fn records_fold_into_cells_with_geometric_means() {
        let key = Keypair::generate_ed25519();
        // 2 hardware × 5 workloads × 8 methods.
        let mut records: Vec<PerfRecord> = (0..80).map(|v| record(&key, v + 1, v)).collect();
        // A repeat of the first record's cell and method, four times slower.
        let mut repeat = records[0].clone();
        repeat.seq = 1000;
        repeat.metrics.wall_time_s *= 4.0;
        repeat.metrics.throughput_tok_s /= 4.0;
        records.push(repeat);
        let t = Tensor::from_records(&records).unwrap();
        assert_eq!(t.hardware.len(), 2);
        assert_eq!(t.workloads.len(), 5);
        assert_eq!(t.methods.len(), 8);
        assert_eq!(t.cells.len(), 10);
        assert_eq!(t.observations(), 80);
        assert_eq!(t.comparable_cells(8).len(), 10);
        let first = &t.cells[0];
        let m0 = t
            .methods
            .iter()
            .position(|m| *m == records[0].method)
            .unwrap();
        let expected = records[0].metrics.wall_time_s * 2.0;
        assert!((first.runtime_s[m0].unwrap() - expected).abs() < 1e-9 * expected);
        // Another metric: the same cells holding TTFT (50 ms in every fixture record).
        let ttft = Tensor::from_records_with(&records, Metric::TtftP50).unwrap();
        assert_eq!(ttft.cells.len(), 10);
        assert!((ttft.cells[0].runtime_s[m0].unwrap() - 0.05).abs() < 1e-12);
        assert_eq!("itl-p95".parse::<Metric>().unwrap(), Metric::ItlP95);
        assert!("speed".parse::<Metric>().is_err());
        let (best, rt) = first.best().unwrap();
        assert!(first.measured().all(|(_, r)| r >= rt));
        assert!(first.runtime_s[best].is_some());
    }
}
