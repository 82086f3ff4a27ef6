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

/// Records of one origin that count toward a (cell, method): its latest this many.
pub const PER_ORIGIN_LIMIT: usize = 256;

/// One (cell, method)'s records: per origin, (measured at, ln value).
type Observations = HashMap<metainf_protocol::PeerId, Vec<(u64, f64)>>;

/// How records of one (cell, method) become its value.
#[derive(Clone, Copy, Debug)]
enum Aggregation {
    /// The geometric mean of every record (trusted data: imports, evaluation).
    Mean,
    /// Per origin first, then a weighted median across origins (network data).
    Robust {
        trusted: Option<metainf_protocol::PeerId>,
    },
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, sum) = values.fold((0usize, 0.0), |(n, s), v| (n + 1, s + v));
    (n > 0).then(|| sum / n as f64)
}

/// An origin's value of a (cell, method): the mean log of its latest [`PER_ORIGIN_LIMIT`]
/// records.
fn origin_log(records: &[(u64, f64)]) -> Option<f64> {
    let mut latest = records.to_vec();
    latest.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
    latest.truncate(PER_ORIGIN_LIMIT);
    mean(latest.iter().map(|v| v.1))
}

/// The weighted median of the origins' values (ties between two middle values averaged).
fn robust_log(
    by_origin: &Observations,
    weights: &HashMap<metainf_protocol::PeerId, f64>,
) -> Option<f64> {
    let mut points: Vec<(f64, f64)> = by_origin
        .iter()
        .filter_map(|(o, r)| Some((origin_log(r)?, weights.get(o).copied().unwrap_or(1.0))))
        .filter(|(_, w)| *w > 0.0)
        .collect();
    points.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = points.iter().map(|p| p.1).sum();
    let mut below = 0.0;
    for (i, (v, w)) in points.iter().enumerate() {
        below += w;
        if below > total / 2.0 {
            return Some(*v);
        }
        if (below - total / 2.0).abs() <= f64::EPSILON * total {
            return Some(points.get(i + 1).map_or(*v, |next| (v + next.0) / 2.0));
        }
    }
    points.last().map(|p| p.0)
}

/// Each origin's weight from how far its values lie from `trusted`'s where both measured.
fn agreement_weights(
    values: &[HashMap<usize, Observations>],
    trusted: Option<metainf_protocol::PeerId>,
) -> HashMap<metainf_protocol::PeerId, f64> {
    let Some(trusted) = trusted else {
        return HashMap::new();
    };
    // Per origin: (sum of |log ratio| to the trusted value, count).
    let mut errors: HashMap<metainf_protocol::PeerId, (f64, u32)> = HashMap::new();
    for by_origin in values.iter().flat_map(|per_method| per_method.values()) {
        let Some(reference) = by_origin.get(&trusted).and_then(|r| origin_log(r)) else {
            continue;
        };
        for (origin, records) in by_origin {
            if *origin == trusted {
                continue;
            }
            if let Some(v) = origin_log(records) {
                let e = errors.entry(*origin).or_insert((0.0, 0));
                e.0 += (v - reference).abs();
                e.1 += 1;
            }
        }
    }
    errors
        .into_iter()
        .map(|(origin, (sum, n))| {
            let err = sum / f64::from(n.max(1)) / std::f64::consts::LN_2;
            (origin, 1.0 / (1.0 + err * err))
        })
        .collect()
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
        Self::build(records, metric, Aggregation::Mean)
    }

    /// As [`Tensor::from_records_with`], but robust to lying origins (what a node trains on
    /// from the network): each origin's records of a (cell, method) are first combined into one
    /// value (the geometric mean of its latest [`PER_ORIGIN_LIMIT`], so flooding a cell buys no
    /// weight), then the origins are combined by their weighted median, so a minority of liars
    /// cannot move a cell. An origin's weight falls with how far its values lie from `trusted`'s
    /// (this node's own measurements) where both measured: off by 2× on average halves it, by
    /// 4× leaves a fifth; origins that share no measurement with `trusted` weigh 1.
    pub fn from_records_robust<'a>(
        records: impl IntoIterator<Item = &'a PerfRecord>,
        metric: Metric,
        trusted: Option<metainf_protocol::PeerId>,
    ) -> Result<Self> {
        Self::build(records, metric, Aggregation::Robust { trusted })
    }

    fn build<'a>(
        records: impl IntoIterator<Item = &'a PerfRecord>,
        metric: Metric,
        aggregation: Aggregation,
    ) -> Result<Self> {
        let mut hardware = Interner::new();
        let mut models = Interner::new();
        let mut workloads = Interner::new();
        let mut methods = Interner::new();
        // (hardware, model, workload) -> cell index; per cell and method, per origin: the
        // records' (time, log value).
        let mut cell_index: HashMap<(usize, usize, usize), usize> = HashMap::new();
        let mut values: Vec<HashMap<usize, Observations>> = Vec::new();
        let mut keys: Vec<(usize, usize, usize)> = Vec::new();
        for r in records {
            let Some(value) = metric.of(r) else {
                continue;
            };
            let ids = r.cell()?;
            let h = hardware.intern(ids.hardware, &r.hardware);
            let m = models.intern(ids.model, &r.model);
            // A served job's cell is its workload as served (cache hits, co-load).
            let w = match &r.source {
                metainf_protocol::RecordSource::Served(load) => {
                    let served =
                        crate::served::served_workload(&r.workload, load, r.metrics.prompt_tokens);
                    workloads.intern(served.id()?, &served)
                }
                _ => workloads.intern(ids.workload, &r.workload),
            };
            let k = methods.intern(ids.method, &r.method);
            let c = *cell_index.entry((h, m, w)).or_insert_with(|| {
                keys.push((h, m, w));
                values.push(HashMap::new());
                keys.len() - 1
            });
            values[c]
                .entry(k)
                .or_default()
                .entry(r.origin)
                .or_default()
                .push((r.measured_at_ms, value.max(1e-9).ln()));
        }
        let weights = match aggregation {
            Aggregation::Mean => HashMap::new(),
            Aggregation::Robust { trusted } => agreement_weights(&values, trusted),
        };
        let n_methods = methods.items.len();
        let cells = keys
            .into_iter()
            .zip(values)
            .map(|((h, m, w), per_method)| {
                let mut runtime_s = vec![None; n_methods];
                for (k, by_origin) in per_method {
                    let log = match aggregation {
                        Aggregation::Mean => mean(by_origin.values().flatten().map(|v| v.1)),
                        Aggregation::Robust { .. } => robust_log(&by_origin, &weights),
                    };
                    runtime_s[k] = log.map(f64::exp);
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

    /// Records of one cell and method from several origins, with these wall times.
    fn claims(origins: &[(&Keypair, &[f64])]) -> Vec<PerfRecord> {
        let mut out = Vec::new();
        for (key, walls) in origins {
            for (i, wall) in walls.iter().enumerate() {
                let mut r = record(key, i as u64 + 1, 0);
                r.metrics.wall_time_s = *wall;
                r.metrics.throughput_tok_s = r.metrics.output_tokens as f64 / wall;
                out.push(r);
            }
        }
        out
    }

    fn value(t: &Tensor) -> f64 {
        t.cells[0].runtime_s[0].unwrap()
    }

    #[test]
    fn a_minority_of_lying_origins_cannot_move_a_cell_however_much_they_post() {
        let keys: Vec<Keypair> = (0..4).map(|_| Keypair::generate_ed25519()).collect();
        // Three honest origins measure ~2 s; one liar claims 0.01 s, ten thousand times.
        let liar_claims = vec![0.01; 10_000];
        let records = claims(&[
            (&keys[0], &[2.0, 2.0]),
            (&keys[1], &[1.8]),
            (&keys[2], &[2.2, 2.2, 2.2]),
            (&keys[3], &liar_claims),
        ]);
        let plain = Tensor::from_records(&records).unwrap();
        assert!(
            value(&plain) < 0.02,
            "the plain mean is the liar's: {}",
            value(&plain)
        );
        let robust = Tensor::from_records_robust(&records, Metric::WallTime, None).unwrap();
        assert!((1.8..=2.2).contains(&value(&robust)), "{}", value(&robust));
        // One origin alone is its own (geometric) mean, as before.
        let alone = claims(&[(&keys[0], &[1.0, 4.0])]);
        let t = Tensor::from_records_robust(&alone, Metric::WallTime, None).unwrap();
        assert!((value(&t) - 2.0).abs() < 1e-9);
        assert_eq!(value(&t), value(&Tensor::from_records(&alone).unwrap()));
    }

    #[test]
    fn origins_that_disagree_with_what_this_node_measured_lose_weight() {
        let me = Keypair::generate_ed25519();
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        // Two other origins against one own measurement: without trust, the median sides
        // with the pair of liars (both claim 0.5 s); trusting what this node measured (4 s),
        // each liar, 8× off, weighs 1/10 and the cell keeps the node's own value.
        let records = claims(&[(&me, &[4.0]), (&a, &[0.5]), (&b, &[0.5])]);
        let blind = Tensor::from_records_robust(&records, Metric::WallTime, None).unwrap();
        assert!((value(&blind) - 0.5).abs() < 1e-9);
        let trusting =
            Tensor::from_records_robust(&records, Metric::WallTime, Some(me.public().to_peer_id()))
                .unwrap();
        assert!(
            (value(&trusting) - 4.0).abs() < 1e-9,
            "{}",
            value(&trusting)
        );
        // Honest origins that agree keep their full weight.
        let weights = {
            let records = claims(&[(&me, &[4.0]), (&a, &[4.0])]);
            let t = Tensor::from_records_robust(
                &records,
                Metric::WallTime,
                Some(me.public().to_peer_id()),
            )
            .unwrap();
            value(&t)
        };
        assert!((weights - 4.0).abs() < 1e-9);
    }
}
