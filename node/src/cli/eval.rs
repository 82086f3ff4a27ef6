//! `eval`: MetaInf's predictor and the paper's baselines on a performance tensor.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use metainf_scheduler::import::ColumnMap;
use metainf_scheduler::{EmbeddingCache, EvalConfig, evaluate};

use super::table::write_json;
use crate::config::Config;
use crate::evaluation::{ModelEmbedder, TensorSource, load_records};

/// `eval`: the predictor and the baselines on a tensor.
pub(crate) fn eval(
    config: &Config,
    source: &TensorSource,
    map: Option<&ColumnMap>,
    metric: metainf_scheduler::Metric,
    eval: &EvalConfig,
    skip_invalid: bool,
    json: bool,
) -> Result<ExitCode> {
    let records = load_records(source, map, skip_invalid)?;
    let tensor = metainf_scheduler::Tensor::from_records_with(&records, metric)?;
    eprintln!(
        "tensor of {metric:?}: {} records, {} cells ({} hardware, {} models, {} workloads, {} methods)",
        records.len(),
        tensor.cells.len(),
        tensor.hardware.len(),
        tensor.models.len(),
        tensor.workloads.len(),
        tensor.methods.len()
    );
    let cache = if eval.features.encoding.needs_text() {
        let path = config
            .engine
            .model_paths()?
            .into_iter()
            .next()
            .context("text features need a model (--model)")?;
        let embedder = ModelEmbedder::load(&path, config.engine.threads)?;
        Some(EmbeddingCache::with_file(
            Box::new(embedder),
            &config.data_dir()?.join("embeddings.json"),
        ))
    } else {
        None
    };
    let report = evaluate(&tensor, eval, cache.as_ref())?;
    if let Some(c) = &cache {
        c.save()?;
    }
    let mut out = std::io::stdout().lock();
    if json {
        return write_json(&mut out, &report);
    }
    writeln!(
        out,
        "split {:?}, {} folds, {} test cells, {} methods ({} distinct best), features {:?}/{:?}/k={}",
        report.split,
        report.folds,
        report.cells,
        report.methods,
        report.distinct_best,
        report.features.encoding,
        report.features.style,
        report.features.svd_k
    )?;
    for (kind, what) in &report.choices {
        writeln!(out, "  {kind:<9} {what}")?;
    }
    if !report.gates.is_empty() {
        writeln!(out, "MetaInf kept, per fold: {}", report.gates.join("; "))?;
    }
    let budget = eval.budget.is_some();
    write!(
        out,
        "{:<14} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "selector", "accuracy", "macro-F1", "accel", "mean rank", "regret", "≤5% off"
    )?;
    if budget {
        write!(out, " {:>9}", "feasible")?;
    }
    writeln!(out, " {:>8} {:>8}", "80% cov", "fit s")?;
    for r in &report.rows {
        write!(
            out,
            "{:<14} {:>8.3} {:>8.3} {:>8.3} {:>9.2} {:>8.3} {:>8.3}",
            r.selector, r.accuracy, r.macro_f1, r.acceleration, r.mean_rank, r.regret, r.near_best
        )?;
        if let Some(f) = r.feasible {
            write!(out, " {f:>9.3}")?;
        }
        match r.coverage_80 {
            Some(c) => write!(out, " {c:>8.3}")?,
            None => write!(out, " {:>8}", "-")?,
        }
        write!(out, " {:>8.2}", r.seconds)?;
        match &r.error {
            Some(e) => writeln!(out, "  (failed in some folds: {e})")?,
            None => writeln!(out)?,
        }
    }
    Ok(ExitCode::SUCCESS)
}
