//! Commands that ask a running node's HTTP API: `submit`, `jobs`, `status` and `peers --node`.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::table::{or_dash, write_wire_json, yes_no};
use crate::client::{ApiClient, SubmitOptions};

/// Runs one command's requests on a single-threaded runtime.
fn block_on(command: impl Future<Output = Result<ExitCode>>) -> Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(command)
}

/// `loadgen`: a load test of an OpenAI-compatible endpoint.
pub(crate) fn loadgen(config: crate::loadgen::LoadConfig, json: bool) -> Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(async move {
            let report = crate::loadgen::run(config).await?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", report.summary())?;
            }
            Ok(if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        })
}

/// `peers --node`: the peers the node knows, as its API lists them.
pub(crate) fn peers(node: &str, json: bool) -> Result<ExitCode> {
    block_on(async move {
        let peers = ApiClient::new(node)?.peers().await?.peers;
        let mut out = std::io::stdout().lock();
        if json {
            return write_wire_json(&mut out, &peers);
        }
        writeln!(
            out,
            "{:<54} {:>6} {:>8} {:>7} {:>8}  models",
            "peer", "alive", "price/h", "queue", "threads"
        )?;
        for p in &peers {
            writeln!(
                out,
                "{:<54} {:>6} {:>8} {:>7} {:>8}  {}",
                p.peer,
                yes_no(p.alive),
                or_dash(p.price_per_hour, |x| format!("{x:.3}")),
                or_dash(p.queue_depth.zip(p.queue_capacity), |(d, c)| format!(
                    "{d}/{c}"
                )),
                or_dash(p.hardware.as_ref(), |h| h.compute_units.to_string()),
                p.models.as_deref().unwrap_or_default().join(","),
            )?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// What `submit` sends, and how it prints the answer.
pub(crate) struct Submit {
    /// The node's API.
    pub(crate) node: String,
    /// One chat prompt…
    pub(crate) prompt: Option<String>,
    /// …or a JSONL file of prompts, run as one batch job.
    pub(crate) file: Option<PathBuf>,
    /// Routing and generation options.
    pub(crate) options: SubmitOptions,
    /// Print tokens as they come (`--prompt` only).
    pub(crate) stream: bool,
    /// Print the whole response as JSON.
    pub(crate) json: bool,
}

/// `submit`: one chat prompt, or a batch job of the prompts of a file.
pub(crate) fn submit(submit: Submit) -> Result<ExitCode> {
    let Submit {
        node,
        prompt,
        file,
        options,
        stream,
        json,
    } = submit;
    block_on(async move {
        let client = ApiClient::new(&node)?;
        let mut out = std::io::stdout().lock();
        if let Some(file) = file {
            let job = client.batch(&file, &options).await?;
            if json {
                return write_wire_json(&mut out, &job);
            }
            let result = job.result.as_ref();
            for (i, r) in result.map_or(&[][..], |r| &r.results).iter().enumerate() {
                writeln!(out, "[{i}] {}", r.text)?;
            }
            eprintln!(
                "ran on {} with {} in {:.2} s",
                job.host.as_deref().unwrap_or("?"),
                result.map_or("?", |r| r.method.as_str()),
                result.map_or(f64::NAN, |r| r.metrics.wall_time_s)
            );
            return Ok(ExitCode::SUCCESS);
        }
        let prompt = prompt.unwrap_or_default();
        let metainf = client.chat(&prompt, &options, stream, &mut out).await?;
        if json {
            return write_wire_json(&mut out, &metainf);
        }
        let m = metainf.as_ref();
        eprintln!(
            "ran on {} with {}: predicted {:.2} s, measured {:.2} s, cost {:.6}",
            m.map_or("?", |m| m.host.as_str()),
            m.map_or("?", |m| m.method.as_str()),
            m.map_or(f64::NAN, |m| m.predicted_runtime_s),
            m.map_or(f64::NAN, |m| m.measured_runtime_s),
            m.map_or(f64::NAN, |m| m.cost),
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `jobs`: the jobs the node accepted, newest first.
pub(crate) fn jobs(node: &str, json: bool) -> Result<ExitCode> {
    block_on(async move {
        let jobs = ApiClient::new(node)?.jobs().await?.data;
        let mut out = std::io::stdout().lock();
        if json {
            return write_wire_json(&mut out, &jobs);
        }
        writeln!(
            out,
            "{:<32} {:>8} {:>7} {:<10} {:>9}  host",
            "job", "status", "prompts", "method", "runtime"
        )?;
        for j in &jobs {
            let result = j.result.as_ref();
            // The prompt count is not padded to its column: it never was (it used to be
            // printed as a `serde_json::Value`, whose `Display` ignores the width).
            writeln!(
                out,
                "{:<32} {:>8} {} {:<10} {:>9}  {}",
                j.id,
                j.status.as_str(),
                j.prompts,
                result.map_or("-", |r| r.method.as_str()),
                or_dash(result, |r| format!("{:.2}s", r.metrics.wall_time_s)),
                j.host.as_deref().unwrap_or("-"),
            )?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `status`: the node's state, as JSON.
pub(crate) fn status(node: &str) -> Result<ExitCode> {
    block_on(async move {
        let status = ApiClient::new(node)?.status().await?;
        write_wire_json(&mut std::io::stdout().lock(), &status)
    })
}
