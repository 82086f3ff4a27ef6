//! Engine speed on the default model, in the shapes llama.cpp's benchmarks measure, so the two
//! can run side by side (`scripts/bench-kernels.sh` pairs them):
//!
//! | shape | metainf | llama.cpp |
//! |---|---|---|
//! | `decode` | 128 tokens after a 16-token prompt, rate after the first | `llama-bench -p 0 -n 128` |
//! | `prefill` | one 512-token prompt, prompt tokens / time to first token | `llama-bench -p 512 -n 0` |
//! | `batched` | 4 × (128 prompt + 64 generated), all tokens / wall | `llama-batched-bench -npp 128 -ntg 64 -npl 4`, `S t/s` |
//! | `shared` | 16 sequences sharing one 128-token prompt, 64 generated each, all tokens (the prompt once) / wall | `llama-batched-bench -npp 128 -ntg 64 -npl 16 -pps`, `S t/s` |
//!
//! With the roofline beside each rate: decode's weight bytes per second, prefill's GFLOP/s of
//! the matrices. Run with
//! `cargo bench --profile dev -p metainf-profiler --bench engine -- [--threads N] [--shape S] [--reps R] [--triad]`
//! (defaults: 1 and 2 threads, every shape, 3 repetitions after one unmeasured warm-up run, as
//! llama-bench warms up); `--quick` is one repetition.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::time::Instant;

use metainf_profiler::engine::{Engine, EngineOptions, MethodSettings, Request, Sampling};

fn model_path() -> PathBuf {
    std::env::var_os("METAINF_MODEL").map_or_else(
        || metainf_profiler::model::default_model_path().expect("HOME is set"),
        PathBuf::from,
    )
}

/// `n` tokens of ordinary text; stop tokens are disabled so every sequence generates exactly
/// `generate` tokens.
fn request(engine: &Engine, prompt_tokens: usize, generate: u32, salt: usize) -> Request {
    let tok = engine.model().tokenizer();
    let text = format!(
        "Request {salt}. The network of nodes measures the latency of every model on every machine and shares the records with its peers. "
    )
    .repeat(prompt_tokens / 20 + 1);
    let mut prompt = tok.encode(&text).unwrap();
    prompt.truncate(prompt_tokens);
    Request {
        prompt,
        max_tokens: generate,
        stop: Vec::new(),
        sampling: Sampling::default(),
        arrival_s: 0.0,
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A STREAM-style triad `a = b + s·c` over three 512 MiB arrays on `threads` threads: bytes
/// moved (two read, one written) per second.
fn triad_gbs(threads: usize) -> f64 {
    const N: usize = 64 << 20; // f64s per array: 512 MiB each
    let chunk = N / threads;
    let mut a = vec![0f64; N];
    let b = vec![1f64; N];
    let c = vec![2f64; N];
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for ((a, b), c) in a
                .chunks_mut(chunk)
                .zip(b.chunks(chunk))
                .zip(c.chunks(chunk))
            {
                s.spawn(move || {
                    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + 3.0 * c;
                    }
                });
            }
        });
        std::hint::black_box(&a);
        best = best.max((3 * N * 8) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps: usize = arg("--reps").map_or(if quick { 1 } else { 3 }, |r| r.parse().unwrap());
    let threads: Vec<usize> = arg("--threads").map_or(vec![1, 2], |t| vec![t.parse().unwrap()]);
    let shapes: Vec<String> = arg("--shape").map_or(
        ["decode", "prefill", "batched", "shared"]
            .map(String::from)
            .to_vec(),
        |s| s.split(',').map(String::from).collect(),
    );
    let path = model_path();
    for &threads in &threads {
        if std::env::args().any(|a| a == "--triad") {
            println!("triad threads={threads} gbs={:.1}", triad_gbs(threads));
        }
        let started = std::time::Instant::now();
        let engine = Engine::load(
            &path,
            EngineOptions {
                threads: Some(threads),
            },
        )
        .unwrap();
        let load_s = started.elapsed().as_secs_f64();
        let model = engine.model();
        // Resident memory once loaded (the pages the weights and tables occupy), next to
        // the file's size.
        let rss_mb = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kb| kb / 1024.0);
        let file_mb = std::fs::metadata(&path).map_or(f64::NAN, |m| m.len() as f64 / 1048576.0);
        println!(
            "load threads={threads} arch={} load_s={load_s:.2} rss_mib={rss_mb:.0} file_mib={file_mb:.0}",
            model.config.arch.name()
        );
        let bytes = model.weight_bytes_per_step() as f64;
        let flops = 2.0 * model.matmul_params() as f64;
        let formats: Vec<String> = model
            .weight_formats()
            .iter()
            .map(|(f, b)| format!("{f}:{:.1}MB", *b as f64 / 1e6))
            .collect();
        println!("weights {}", formats.join(","));
        let cb = MethodSettings {
            continuous_batching: true,
            ..MethodSettings::default()
        };
        let pc = MethodSettings {
            continuous_batching: true,
            prefix_caching: true,
            ..MethodSettings::default()
        };
        for shape in &shapes {
            let mut rates = Vec::new();
            // One unmeasured run first, as llama-bench does (first-touch page faults of the
            // step buffers and the KV pool are not the kernels' speed).
            for rep in 0..=reps {
                let rate = match shape.as_str() {
                    "decode" => {
                        let r = engine.run(&[request(&engine, 16, 128, rep)], &cb).unwrap();
                        let t = &r.completions[0].token_times_s;
                        (t.len() - 1) as f64 / (t[t.len() - 1] - t[0])
                    }
                    "prefill" => {
                        let r = engine.run(&[request(&engine, 512, 1, rep)], &cb).unwrap();
                        512.0 / r.completions[0].ttft_s().unwrap()
                    }
                    "batched" => {
                        let reqs: Vec<Request> = (0..4)
                            .map(|i| request(&engine, 128, 64, 10 * rep + i))
                            .collect();
                        let r = engine.run(&reqs, &cb).unwrap();
                        (4.0 * (128.0 + 64.0)) / r.wall_s
                    }
                    "shared" => {
                        let one = request(&engine, 128, 64, 100 + rep);
                        let reqs: Vec<Request> = (0..16).map(|_| one.clone()).collect();
                        let r = engine.run(&reqs, &pc).unwrap();
                        (128.0 + r.output_tokens() as f64) / r.wall_s
                    }
                    other => panic!("unknown shape {other}"),
                };
                if rep > 0 {
                    rates.push(rate);
                }
            }
            rates.sort_by(f64::total_cmp);
            let med = rates[rates.len() / 2];
            let roof = match shape.as_str() {
                "decode" => format!(" weight_gbs={:.1}", med * bytes / 1e9),
                "prefill" => format!(" matmul_gflops={:.1}", med * flops / 1e9),
                _ => String::new(),
            };
            let all: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
            println!(
                "engine threads={threads} shape={shape} tok_s={med:.1}{roof} runs={}",
                all.join(",")
            );
        }
    }
}
