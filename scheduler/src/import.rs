//! Import of external benchmark tables: a CSV whose columns name the hardware, the model, the
//! method and a metric, plus any numeric workload columns, becomes performance records through
//! a column mapping.
//!
//! Every row is one measurement. The records are unsigned here; the node signs them with its
//! own key and marks them [`RecordSource::Imported`]. A lower-is-better metric (latency,
//! seconds) becomes the record's wall time as is; a higher-is-better one (throughput) becomes
//! its reciprocal, so that ranking and acceleration ratios are preserved.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use metainf_protocol::{
    Arrival, ContentId, DeviceKind, HardwareProfile, HardwareSpec, LengthStats, MethodConfig,
    Metrics, ModelDescriptor, PeerId, Percentiles, PerfRecord, RecordSource, WorkloadDescriptor,
};

use crate::error::{Result, SchedulerError};

/// Which columns mean what.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnMap {
    /// Column naming the hardware.
    pub hardware: String,
    /// Column naming the model.
    pub model: String,
    /// Column naming the method.
    pub method: String,
    /// Column holding the metric.
    pub metric: String,
    /// Whether larger metric values are better (throughput) rather than smaller (latency).
    pub higher_is_better: bool,
    /// Numeric workload columns; empty: every other column whose values are all numbers.
    pub workload: Vec<String>,
    /// Label of the source, kept in the records.
    pub label: String,
}

impl ColumnMap {
    /// Parses `hardware=COL,model=COL,method=COL,metric=COL[,workload=COL;COL…]`.
    pub fn parse(spec: &str, higher_is_better: bool, label: &str) -> Result<Self> {
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                SchedulerError::invalid("column map", format!("`{part}` is not ROLE=COLUMN"))
            })?;
            if fields.insert(k.trim(), v.trim()).is_some() {
                return Err(SchedulerError::invalid(
                    "column map",
                    format!("`{k}` given twice"),
                ));
            }
        }
        let mut take = |role: &'static str| -> Result<String> {
            fields.remove(role).map(str::to_owned).ok_or_else(|| {
                SchedulerError::invalid("column map", format!("missing `{role}=COLUMN`"))
            })
        };
        let map = Self {
            hardware: take("hardware")?,
            model: take("model")?,
            method: take("method")?,
            metric: take("metric")?,
            higher_is_better,
            workload: fields
                .remove("workload")
                .map(|w| {
                    w.split(';')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            label: label.to_owned(),
        };
        if let Some(k) = fields.keys().next() {
            return Err(SchedulerError::invalid(
                "column map",
                format!("unknown role `{k}` (expected hardware, model, method, metric, workload)"),
            ));
        }
        Ok(map)
    }
}

/// Lowercases and replaces what a protocol key cannot hold with `_`.
fn key_of(s: &str) -> String {
    let k: String = s
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if k.is_empty() { "unnamed".into() } else { k }
}

/// "7B", "135M", "llama-2-13b" → parameters.
fn parameters_from_name(name: &str) -> u64 {
    let lower = name.to_lowercase();
    let bytes = lower.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let scale = match b {
            b'b' => 1e9,
            b'm' => 1e6,
            _ => continue,
        };
        let start = bytes[..i]
            .iter()
            .rposition(|c| !(c.is_ascii_digit() || *c == b'.'))
            .map_or(0, |p| p + 1);
        let followed_by_letter = bytes.get(i + 1).is_some_and(u8::is_ascii_alphabetic);
        if start < i
            && !followed_by_letter
            && let Ok(v) = lower[start..i].parse::<f64>()
        {
            return (v * scale) as u64;
        }
    }
    0
}

fn hardware(name: &str, label: &str) -> HardwareProfile {
    let lower = name.to_lowercase();
    let gpu = [
        "nvidia", "gpu", "rtx", "tesla", "a100", "h100", "h200", "v100", "a10", "l4", "t4", "l40",
        "mi2", "mi3", "radeon",
    ]
    .iter()
    .any(|g| lower.contains(g));
    HardwareProfile {
        spec: HardwareSpec {
            device: if gpu {
                DeviceKind::Gpu
            } else {
                DeviceKind::Cpu
            },
            backend: "imported".into(),
            name: name.to_owned(),
            memory_bytes: 0,
            compute_units: 1,
            gpu: None,
            cpu: None,
            attributes: BTreeMap::from([("source".to_owned(), key_of(label))]),
        },
        measured: None,
        driver: None,
    }
}

fn model(name: &str) -> ModelDescriptor {
    ModelDescriptor {
        name: name.to_owned(),
        architecture: "unknown".into(),
        parameters: parameters_from_name(name),
        quantization: "unknown".into(),
        bits_per_weight: 16.0,
        context_length: 0,
        weights_digest: ContentId::of_bytes("metainf imported model", name.as_bytes()),
    }
}

fn method(value: &str) -> MethodConfig {
    value
        .parse::<MethodConfig>()
        .ok()
        .filter(|m| m.validate().is_ok())
        .unwrap_or_else(|| MethodConfig::baseline().with_flag(&key_of(value)))
}

/// A table read through a column map: the records of its usable rows, and the rows it could
/// not use with their line numbers and why.
#[derive(Clone, Debug, Default)]
pub struct CsvTable {
    /// One record per usable row, numbered in order.
    pub records: Vec<PerfRecord>,
    /// (line, reason) of every row left out.
    pub rejected: Vec<(u64, String)>,
}

/// Reads a CSV table into records of `origin` numbered from `first_seq`, measured at `now_ms`;
/// the first unusable row fails the whole table, naming its line.
pub fn csv_records(
    input: impl Read,
    map: &ColumnMap,
    origin: PeerId,
    first_seq: u64,
    now_ms: u64,
) -> Result<Vec<PerfRecord>> {
    let table = csv_table(input, map, origin, first_seq, now_ms)?;
    match table.rejected.first() {
        Some((line, reason)) => Err(SchedulerError::Import {
            location: format!("line {line}"),
            reason: reason.clone(),
        }),
        None => Ok(table.records),
    }
}

/// How a workload column's values become facts.
enum WorkloadColumn {
    /// Every value is a number (or empty: unknown).
    Numeric,
    /// Some value is not: each distinct value is a 0/1 fact `column.value`.
    Categorical,
}

/// Reads a CSV table as [`csv_records`] does, keeping every usable row: a row that cannot be
/// used (a metric that is not a positive number, an empty key column, a malformed line) is
/// reported in [`CsvTable::rejected`] and the rest stays usable. Only a table whose header
/// lacks a mapped column fails as a whole.
///
/// A workload column whose values are not all numbers is categorical (`scenario` =
/// `sharegpt` becomes the fact `scenario.sharegpt` = 1); an empty workload value is an
/// unknown fact, left out. Facts the table does not give (a model name without a size) stay
/// unknown rather than invalid.
pub fn csv_table(
    input: impl Read,
    map: &ColumnMap,
    origin: PeerId,
    first_seq: u64,
    now_ms: u64,
) -> Result<CsvTable> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(input);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| SchedulerError::Import {
            location: "header".into(),
            reason: e.to_string(),
        })?
        .iter()
        .map(str::to_owned)
        .collect();
    let col = |name: &str| -> Result<usize> {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| SchedulerError::Import {
                location: "header".into(),
                reason: format!("no column `{name}` (columns: {})", headers.join(", ")),
            })
    };
    let (hw, md, me, mt) = (
        col(&map.hardware)?,
        col(&map.model)?,
        col(&map.method)?,
        col(&map.metric)?,
    );
    let mut table = CsvTable::default();
    let mut rows: Vec<(u64, csv::StringRecord)> = Vec::new();
    for (i, r) in reader.records().enumerate() {
        let fallback = i as u64 + 2;
        match r {
            Ok(r) => rows.push((r.position().map_or(fallback, |p| p.line()), r)),
            Err(e) => {
                let line = e.position().map_or(fallback, |p| p.line());
                table.rejected.push((line, e.to_string()));
            }
        }
    }
    let roles = [hw, md, me, mt];
    let numeric = |c: usize| {
        rows.iter().all(|(_, r)| {
            r.get(c)
                .is_some_and(|v| v.is_empty() || v.parse::<f64>().is_ok_and(f64::is_finite))
        })
    };
    let workload_cols: Vec<(usize, WorkloadColumn)> = if map.workload.is_empty() {
        (0..headers.len())
            .filter(|c| !roles.contains(c))
            .filter(|&c| numeric(c))
            .map(|c| (c, WorkloadColumn::Numeric))
            .collect()
    } else {
        map.workload
            .iter()
            .map(|w| {
                let c = col(w)?;
                let kind = if numeric(c) {
                    WorkloadColumn::Numeric
                } else {
                    WorkloadColumn::Categorical
                };
                Ok((c, kind))
            })
            .collect::<Result<_>>()?
    };
    for (line, row) in &rows {
        let field = |c: usize| row.get(c).unwrap_or("");
        let value: f64 = match field(mt).parse() {
            Ok(v) => v,
            Err(_) => {
                table
                    .rejected
                    .push((*line, format!("metric `{}` is not a number", field(mt))));
                continue;
            }
        };
        if !(value.is_finite() && value > 0.0) {
            table
                .rejected
                .push((*line, format!("metric {value} is not a positive number")));
            continue;
        }
        if let Some((_, what)) = [(hw, "hardware"), (md, "model"), (me, "method")]
            .into_iter()
            .find(|(c, _)| field(*c).is_empty())
        {
            table.rejected.push((*line, format!("empty {what}")));
            continue;
        }
        let wall = if map.higher_is_better {
            1.0 / value
        } else {
            value
        };
        let mut extra = BTreeMap::new();
        for (c, kind) in &workload_cols {
            let v = field(*c);
            if v.is_empty() {
                continue;
            }
            match kind {
                WorkloadColumn::Numeric => {
                    if let Ok(v) = v.parse::<f64>() {
                        extra.insert(key_of(&headers[*c]), v);
                    }
                }
                WorkloadColumn::Categorical => {
                    extra.insert(key_of(&format!("{}.{v}", headers[*c])), 1.0);
                }
            }
        }
        let record = PerfRecord {
            origin,
            seq: first_seq.saturating_add(table.records.len() as u64),
            measured_at_ms: now_ms,
            hardware: hardware(field(hw), &map.label),
            model: model(field(md)),
            workload: WorkloadDescriptor {
                preset: Some(key_of(&map.label)),
                requests: 1,
                prompt_tokens: LengthStats::default(),
                max_new_tokens: LengthStats::default(),
                prefix_sharing: 0.0,
                arrival: Arrival::AllAtOnce,
                temperature: 0.0,
                extra,
            },
            method: method(field(me)),
            metrics: Metrics {
                wall_time_s: wall,
                requests: 1,
                prompt_tokens: 0,
                output_tokens: 0,
                throughput_tok_s: 0.0,
                ttft_ms: Percentiles::default(),
                itl_ms: Percentiles::default(),
                peak_kv_bytes: 0,
                energy_j: None,
                cost: None,
            },
            source: RecordSource::Imported(map.label.clone()),
            engine: format!("imported:{}", map.label),
        };
        match record.validate() {
            Ok(()) => table.records.push(record),
            Err(e) => table.rejected.push((*line, e.to_string())),
        }
    }
    table.rejected.sort_by_key(|(line, _)| *line);
    Ok(table)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::dataset::Tensor;
    use metainf_protocol::Keypair;

    const TABLE: &str = "\
gpu,model,method,batch_size,seq_len,latency_ms,notes
A100,Llama-2-7B,vllm,8,512,120.5,x
A100,Llama-2-7B,cb+pc,8,512,100.0,x
A100,Llama-2-7B,vllm,16,512,200.0,y
A100,Llama-2-7B,cb+pc,16,512,230.0,y
T4,Llama-2-7B,vllm,8,512,900.0,z
";

    #[test]
    fn a_table_becomes_records_and_cells() {
        let map = ColumnMap::parse(
            "hardware=gpu,model=model,method=method,metric=latency_ms",
            false,
            "paper-table",
        )
        .unwrap();
        let origin = Keypair::generate_ed25519().public().to_peer_id();
        let records = csv_records(TABLE.as_bytes(), &map, origin, 5, 1).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[0].seq, 5);
        assert_eq!(records[0].model.parameters, 7_000_000_000);
        assert_eq!(records[0].hardware.spec.device, DeviceKind::Gpu);
        assert!(records[0].method.has("vllm"));
        assert!(records[1].method.has("prefix_caching"));
        assert_eq!(records[0].workload.extra.len(), 2);
        assert_eq!(records[0].workload.extra["batch_size"], 8.0);
        let t = Tensor::from_records(&records).unwrap();
        // (A100, bs 8), (A100, bs 16), (T4, bs 8).
        assert_eq!(t.cells.len(), 3);
        assert_eq!(t.comparable_cells(2).len(), 2);
        let throughput = ColumnMap::parse(
            "hardware=gpu,model=model,method=method,metric=latency_ms,workload=batch_size",
            true,
            "t",
        )
        .unwrap();
        let r = csv_records(TABLE.as_bytes(), &throughput, origin, 1, 1).unwrap();
        assert!((r[1].metrics.wall_time_s - 0.01).abs() < 1e-12);
        assert_eq!(r[0].workload.extra.len(), 1);
    }

    #[test]
    fn bad_tables_and_maps_say_where() {
        let origin = Keypair::generate_ed25519().public().to_peer_id();
        let map = ColumnMap::parse(
            "hardware=gpu,model=model,method=method,metric=nope",
            false,
            "t",
        )
        .unwrap();
        let e = csv_records(TABLE.as_bytes(), &map, origin, 1, 1).unwrap_err();
        assert!(e.to_string().contains("no column `nope`"), "{e}");
        let map = ColumnMap::parse(
            "hardware=gpu,model=model,method=method,metric=latency_ms",
            false,
            "t",
        )
        .unwrap();
        let bad = "gpu,model,method,latency_ms\nA100,m,cb,fast\n";
        let e = csv_records(bad.as_bytes(), &map, origin, 1, 1).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let neg = "gpu,model,method,latency_ms\nA100,m,cb,-3\n";
        assert!(csv_records(neg.as_bytes(), &map, origin, 1, 1).is_err());
        assert!(ColumnMap::parse("hardware=gpu", false, "t").is_err());
        assert!(
            ColumnMap::parse("hardware=a,model=b,method=c,metric=d,colour=e", false, "t").is_err()
        );
        assert_eq!(parameters_from_name("SmolLM2-135M-Instruct"), 135_000_000);
        assert_eq!(parameters_from_name("gpt"), 0);
    }

    #[test]
    fn ordinary_public_tables_import_categorical_unknown_and_bad_rows() {
        let origin = Keypair::generate_ed25519().public().to_peer_id();
        // A categorical workload column, a model whose name has no size, one row whose metric
        // is missing and one with too few fields.
        let table = "\
hardware,model,method,scenario,qps,ttft
H100,Phi-1,vLLM,sharegpt,1,0.5
H100,Phi-1,llm-d,sharegpt,1,0.4
H100,Phi-1,vLLM,short_input,,0.2
H100,Phi-1,llm-d,short_input,2,
H100,Phi-1
";
        let map = ColumnMap::parse(
            "hardware=hardware,model=model,method=method,metric=ttft,workload=scenario;qps",
            false,
            "llmd",
        )
        .unwrap();
        let t = csv_table(table.as_bytes(), &map, origin, 1, 1).unwrap();
        assert_eq!(t.records.len(), 3, "{:?}", t.rejected);
        let lines: Vec<u64> = t.rejected.iter().map(|r| r.0).collect();
        assert_eq!(lines, [5, 6], "{:?}", t.rejected);
        assert!(t.rejected[0].1.contains("not a number"), "{:?}", t.rejected);
        // Numbered without gaps.
        let seqs: Vec<u64> = t.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        let w = &t.records[0].workload.extra;
        assert_eq!(w.get("scenario.sharegpt"), Some(&1.0));
        assert_eq!(w.get("qps"), Some(&1.0));
        // An empty numeric value is an unknown fact, not a zero.
        let w = &t.records[2].workload.extra;
        assert_eq!(w.get("scenario.short_input"), Some(&1.0));
        assert!(!w.contains_key("qps"));
        // No size in the name: unknown, and still a valid record.
        assert_eq!(t.records[0].model.parameters, 0);
        assert!(t.records[0].validate().is_ok());
        let tensor = Tensor::from_records(&t.records).unwrap();
        assert_eq!(tensor.comparable_cells(2).len(), 1);
        // Strict reading fails on the first bad row and names it.
        let e = csv_records(table.as_bytes(), &map, origin, 1, 1).unwrap_err();
        assert!(e.to_string().contains("line 5"), "{e}");
    }
}
