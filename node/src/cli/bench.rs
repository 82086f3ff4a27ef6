//! This machine's hardware and engine: `profile`, `generate` and `bench`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::table::write_json;
use crate::config::Config;
use crate::daemon::Node;

/// `profile`: probe and measure this machine's hardware.
pub(crate) fn profile(threads: Option<usize>, json: bool) -> Result<ExitCode> {
    let profile = metainf_profiler::probe(&metainf_profiler::ProbeOptions {
        threads,
        ..Default::default()
    })?;
    let id = profile.id()?;
    let mut out = std::io::stdout().lock();
    if json {
        let value = serde_json::json!({ "hardware_id": id.to_string(), "profile": profile });
        return write_json(&mut out, &value);
    }
    let spec = &profile.spec;
    writeln!(out, "hardware {} ({})", id.short(), spec.backend)?;
    writeln!(out, "  device          {}", spec.name)?;
    writeln!(
        out,
        "  memory          {:.1} GiB",
        spec.memory_bytes as f64 / f64::from(1u32 << 30)
    )?;
    writeln!(out, "  compute units   {}", spec.compute_units)?;
    if let Some(cpu) = &spec.cpu {
        writeln!(
            out,
            "  cores           {} physical, {} logical",
            cpu.physical_cores, cpu.logical_cpus
        )?;
        writeln!(out, "  simd            {}", cpu.simd.join(" "))?;
    }
    if let Some(gpu) = &spec.gpu {
        writeln!(
            out,
            "  compute cap.    {}.{}",
            gpu.compute_major, gpu.compute_minor
        )?;
        writeln!(
            out,
            "  clocks          {} MHz SM, {} MHz memory",
            gpu.max_sm_clock_mhz, gpu.max_mem_clock_mhz
        )?;
        writeln!(out, "  power limit     {:.0} W", gpu.power_limit_w)?;
        writeln!(
            out,
            "  PCIe            gen {} x{}",
            gpu.pcie_gen, gpu.pcie_width
        )?;
    }
    if let Some(m) = &profile.measured {
        writeln!(out, "  Q8_0 matmul     {:.1} GFLOP/s", m.matmul_gflops)?;
        writeln!(out, "  memory b/w      {:.1} GB/s", m.mem_bandwidth_gbs)?;
    }
    if let Some(d) = &profile.driver {
        writeln!(out, "  driver/kernel   {d}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench`: benchmark the engine's methods, storing every run as a signed record.
pub(crate) fn bench(
    config: &Config,
    size: metainf_profiler::bench::Size,
    workloads: Vec<metainf_profiler::workload::Preset>,
    methods: Vec<metainf_protocol::MethodConfig>,
    json: bool,
) -> Result<ExitCode> {
    use crate::bench::BenchEvent;
    use metainf_profiler::bench::Plan;
    use metainf_profiler::engine::MethodSettings;

    let mut plan = Plan::standard(size);
    if !workloads.is_empty() {
        plan.workloads = workloads;
    }
    if !methods.is_empty() {
        plan.methods = methods
            .iter()
            .map(MethodSettings::from_method)
            .collect::<Result<_, _>>()?;
    }
    let node = Node::open(config)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} requests, {elapsed}",
        )
        .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?
        .progress_chars("=> "),
    );
    let runs = plan.runs();
    let mut finished_runs = 0;
    let stored = crate::bench::bench(&node, &config.engine, &plan, &mut |event| match event {
        BenchEvent::Hardware(h) => {
            bar.println(format!(
                "hardware: {} ({} compute units)",
                h.spec.name, h.spec.compute_units
            ));
        }
        BenchEvent::Model { model, requests } => {
            bar.println(format!(
                "model: {} ({}, {:.0}M parameters)",
                model.name,
                model.quantization,
                model.parameters as f64 / 1e6
            ));
            bar.set_length(requests as u64);
            bar.set_position(0);
        }
        BenchEvent::Progress(n) => bar.set_position(n as u64),
        BenchEvent::Run(run, _) => {
            finished_runs += 1;
            bar.set_message(format!(
                "run {finished_runs}/{runs}: {} {}",
                run.preset,
                run.method.short_name()
            ));
        }
    })?;
    bar.finish_and_clear();
    node.store().flush()?;
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<_> = stored
            .iter()
            .map(|s| {
                serde_json::json!({
                    "model": s.model.name,
                    "workload": s.run.preset.name(),
                    "method": s.run.method.short_name(),
                    "record_id": s.record.to_string(),
                    "prefix_cache_hits": s.run.prefix_hits,
                    "metrics": s.run.metrics,
                })
            })
            .collect();
        return write_json(&mut out, &rows);
    }
    writeln!(
        out,
        "{:<11} {:<9} {:>8} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8}",
        "workload",
        "method",
        "tok/s",
        "TTFT p50",
        "TTFT p95",
        "ITL p50",
        "ITL p95",
        "wall s",
        "KV MiB"
    )?;
    for s in &stored {
        let m = &s.run.metrics;
        writeln!(
            out,
            "{:<11} {:<9} {:>8.1} {:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>7.2} {:>8.1}",
            s.run.preset.name(),
            s.run.method.short_name(),
            m.throughput_tok_s,
            m.ttft_ms.p50,
            m.ttft_ms.p95,
            m.itl_ms.p50,
            m.itl_ms.p95,
            m.wall_time_s,
            m.peak_kv_bytes as f64 / f64::from(1u32 << 20)
        )?;
    }
    writeln!(
        out,
        "{} signed records stored in {}",
        stored.len(),
        node.store().path().display()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `generate`: one reply to one prompt on this machine, with its timings.
pub(crate) fn generate(
    config: &Config,
    prompt: &str,
    system: Option<&str>,
    max_tokens: u32,
    temperature: f32,
    top_p: f32,
    seed: u64,
) -> Result<ExitCode> {
    use metainf_profiler::engine::{Engine, EngineOptions, MethodSettings, Request, Sampling};
    let paths = config.engine.model_paths()?;
    let path = paths.first().context("no model configured")?;
    let started = std::time::Instant::now();
    let engine = Engine::load(
        path,
        EngineOptions {
            threads: config.engine.threads,
        },
    )?;
    let load_s = started.elapsed().as_secs_f64();
    let tok = engine.model().tokenizer();
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(metainf_protocol::ChatMessage {
            role: "system".into(),
            content: system.into(),
        });
    }
    messages.push(metainf_protocol::ChatMessage {
        role: "user".into(),
        content: prompt.into(),
    });
    let text = tok.chat_prompt(&messages)?;
    let request = Request {
        prompt: tok.encode(&text)?,
        max_tokens,
        stop: tok.stop_ids().to_vec(),
        sampling: Sampling {
            temperature,
            top_p,
            seed,
        },
        arrival_s: 0.0,
    };
    let report = engine.run(std::slice::from_ref(&request), &MethodSettings::default())?;
    let c = report.completions.first().context("no completion")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", tok.decode(&c.tokens)?)?;
    let decode_s = c
        .token_times_s
        .last()
        .zip(c.token_times_s.first())
        .map_or(0.0, |(l, f)| l - f);
    eprintln!(
        "{} prompt + {} generated tokens; load {:.2} s, first token {:.0} ms, decode {:.1} tokens/s on {} threads",
        request.prompt.len(),
        c.tokens.len(),
        load_s,
        c.ttft_s().unwrap_or(0.0) * 1000.0,
        if decode_s > 0.0 {
            (c.tokens.len() - 1) as f64 / decode_s
        } else {
            0.0
        },
        engine.threads()
    );
    Ok(ExitCode::SUCCESS)
}
