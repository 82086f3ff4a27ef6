//! Engine speed on the default model: single-stream decode and prefill at 1 and 2 threads,
//! and the batched shapes of llama.cpp's `llama-batched-bench` (4 sequences of 128 prompt +
//! 64 generated tokens; 16 sequences sharing one prompt). Run with
//! `cargo bench --profile dev -p metainf-profiler --bench engine`; numbers go to BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;

use metainf_profiler::engine::{Engine, EngineOptions, MethodSettings, Request, Sampling};

fn model_path() -> PathBuf {
    metainf_profiler::model::default_model_path().expect("HOME is set")
}

/// `n` tokens of ordinary text, no stop token reachable before `max_tokens` matters little:
/// stop tokens are disabled so every sequence generates exactly `gen` tokens.
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

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 1 } else { 3 };
    if std::env::args().any(|a| a == "--decode-only") {
        // For profiling the decode path alone.
        let engine = Engine::load(&model_path(), EngineOptions { threads: Some(1) }).unwrap();
        let r = engine
            .run(&[request(&engine, 16, 256, 0)], &MethodSettings::default())
            .unwrap();
        let t = &r.completions[0].token_times_s;
        println!(
            "decode {:.1} tok/s",
            (t.len() - 1) as f64 / (t[t.len() - 1] - t[0])
        );
        return;
    }
    for threads in [1usize, 2] {
        let engine = Engine::load(
            &model_path(),
            EngineOptions {
                threads: Some(threads),
            },
        )
        .unwrap();
        let cb = MethodSettings {
            continuous_batching: true,
            ..MethodSettings::default()
        };
        // Single stream: decode rate after the first token; prefill rate of a 512-token prompt.
        let mut decode = Vec::new();
        let mut prefill = Vec::new();
        for rep in 0..reps {
            let r = engine.run(&[request(&engine, 16, 128, rep)], &cb).unwrap();
            let t = &r.completions[0].token_times_s;
            decode.push((t.len() - 1) as f64 / (t[t.len() - 1] - t[0]));
            let r = engine.run(&[request(&engine, 512, 1, rep)], &cb).unwrap();
            prefill.push(512.0 / r.completions[0].ttft_s().unwrap());
        }
        // Batched: 4 x (128 + 64), total tokens (prompt + generated) per second as
        // llama-batched-bench reports them.
        let mut batched = Vec::new();
        for rep in 0..reps {
            let reqs: Vec<Request> = (0..4)
                .map(|i| request(&engine, 128, 64, 10 * rep + i))
                .collect();
            let r = engine.run(&reqs, &cb).unwrap();
            batched.push((4.0 * (128.0 + 64.0)) / r.wall_s);
        }
        // 16 sequences sharing one 128-token prompt, 64 generated each: generation rate.
        let mut shared = Vec::new();
        for rep in 0..reps {
            let one = request(&engine, 128, 64, 100 + rep);
            let reqs: Vec<Request> = (0..16).map(|_| one.clone()).collect();
            let pc = MethodSettings {
                continuous_batching: true,
                prefix_caching: true,
                ..MethodSettings::default()
            };
            let r = engine.run(&reqs, &pc).unwrap();
            shared.push(r.output_tokens() as f64 / r.wall_s);
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "threads {threads}: decode {:.1} tok/s, prefill {:.0} tok/s, batched 4x(128+64) {:.0} tok/s total, 16 shared-prompt sequences {:.0} generated tok/s",
            med(decode),
            med(prefill),
            med(batched),
            med(shared)
        );
    }
}
