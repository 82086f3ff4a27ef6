//! Jobs through real `metainf-node` processes on loopback (the default model):
//!
//! 1. routing overhead: end-to-end latency of small chat jobs minus the host's measured
//!    execution, p50 and p99, on one node and through a three-node network;
//! 2. throughput of a batch workload (concurrent batch jobs) on one node against three;
//! 3. the predictor's error as jobs feed it, from an empty tensor.
//!
//! `cargo bench -p metainf-node --bench jobs --profile dev` (needs `scripts/fetch-model.sh`).
//! Prints a Markdown summary for BENCHMARKS.md.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

struct NodeProc {
    child: Child,
    api: String,
    p2p: String,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, threads: u32, price: f64, bootstrap: Option<&str>) -> NodeProc {
    std::fs::create_dir_all(dir).expect("data dir");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        "[network]\nheartbeat_interval_s = 1\npeer_timeout_s = 6\n\
         [jobs]\nqueue_capacity = 64\nretrain_check_s = 1\nretrain_after = 4\n",
    )
    .expect("config");
    let bin = env!("CARGO_BIN_EXE_metainf-node");
    let id = Command::new(bin)
        .arg("--data-dir")
        .arg(dir)
        .arg("id")
        .output()
        .expect("id");
    let peer = String::from_utf8_lossy(&id.stdout).trim().to_owned();
    let (p2p_port, api_port) = (free_port(), free_port());
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir)
        .args(["--threads", &threads.to_string()])
        .args(["--price-per-hour", &price.to_string()])
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{p2p_port}")])
        .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
        .args(["--no-mdns", "--no-nat"])
        .env("RUST_LOG", "warn");
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let child = cmd
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let node = NodeProc {
        child,
        api: format!("http://127.0.0.1:{api_port}"),
        p2p: format!("/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{peer}"),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while reqwest::blocking::get(format!("{}/healthz", node.api)).is_err() {
        assert!(Instant::now() < deadline, "node did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    node
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client")
}

fn post(api: &str, path: &str, body: &Value) -> Value {
    client()
        .post(format!("{api}{path}"))
        .json(body)
        .send()
        .and_then(|r| r.json())
        .expect("post")
}

fn get(api: &str, path: &str) -> Value {
    client()
        .get(format!("{api}{path}"))
        .send()
        .and_then(|r| r.json())
        .expect("get")
}

fn wait_hosts(api: &str, hosts: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(api, "/v1/models")["data"][0]["metainf"]["hosts"].as_u64() < Some(hosts) {
        assert!(Instant::now() < deadline, "peers not seen");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Routing overhead of `n` sequential small chat jobs sent to `api`, in ms.
fn overhead(api: &str, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let body = json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": format!("Say the number {i}.")}],
                "max_tokens": 4,
                "temperature": 0,
            });
            let t = Instant::now();
            let v = post(api, "/v1/chat/completions", &body);
            let total = t.elapsed().as_secs_f64();
            let exec = v["metainf"]["measured_runtime_s"].as_f64().unwrap_or(0.0);
            (total - exec) * 1000.0
        })
        .collect()
}

/// Submits `jobs` batch jobs at once to the gateways in turn; returns (seconds until all are
/// done, output tokens).
fn batch(gateways: &[&str], jobs: usize) -> (f64, u64) {
    let t = Instant::now();
    let ids: Vec<(String, String)> = (0..jobs)
        .map(|j| {
            let api = gateways[j % gateways.len()];
            let prompts: Vec<Value> = (0..4)
                .map(|i| {
                    let text = format!("Write two sentences about city number {}.", j * 4 + i);
                    json!({"messages": [{"role": "user", "content": text}]})
                })
                .collect();
            let v = post(
                api,
                "/v1/jobs",
                &json!({"model": MODEL, "prompts": prompts, "max_tokens": 32, "temperature": 0}),
            );
            (
                api.to_owned(),
                v["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut tokens = 0;
    for (api, id) in ids {
        loop {
            let job = get(&api, &format!("/v1/jobs/{id}"));
            if job["status"] == "done" {
                tokens += job["metrics"]["output_tokens"].as_u64().unwrap_or(0);
                break;
            }
            assert!(job["status"] != "failed", "job failed: {job}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (t.elapsed().as_secs_f64(), tokens)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root: PathBuf = tempfile::tempdir().expect("tmp").keep();
    println!("## Jobs (node/benches/jobs.rs)\n");

    // One node.
    let solo = start(&root.join("solo"), 1, 1.0, None);
    let _ = overhead(&solo.api, 3);
    let o1 = overhead(&solo.api, 30);
    let (t1, tok1) = batch(&[&solo.api], 6);
    drop(solo);

    // Three nodes, fresh stores: the predictor starts from the prior.
    let a = start(&root.join("a"), 1, 1.0, None);
    let b = start(&root.join("b"), 1, 2.0, Some(&a.p2p));
    let c = start(&root.join("c"), 1, 3.0, Some(&a.p2p));
    for n in [&a, &b, &c] {
        wait_hosts(&n.api, 3);
    }
    let o3 = overhead(&a.api, 30);
    let (t3, tok3) = batch(&[&a.api, &b.api, &c.api], 6);

    println!("| routing overhead (end-to-end − execution) | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!(
        "| one node, 30 chat jobs | {:.1} | {:.1} |",
        percentile(o1.clone(), 0.5),
        percentile(o1, 0.99)
    );
    println!(
        "| three nodes (gateway A), 30 chat jobs | {:.1} | {:.1} |",
        percentile(o3.clone(), 0.5),
        percentile(o3, 0.99)
    );
    println!("\n| batch workload: 6 jobs × 4 prompts × 32 tokens | seconds | output tok/s |");
    println!("|---|---|---|");
    println!("| one node, 1 thread | {t1:.1} | {:.1} |", tok1 as f64 / t1);
    println!(
        "| three nodes, 1 thread each | {t3:.1} | {:.1} |",
        tok3 as f64 / t3
    );

    // The predictor's error as jobs feed it: twelve job shapes, three passes over them. The
    // first pass meets every shape for the first time (the prior, then early retrainings);
    // later passes are predicted by a model trained on the earlier jobs' records.
    let shapes: Vec<(Vec<Value>, u32)> = (0..12)
        .map(|j| {
            let n = 1 + (j % 4);
            let max_tokens = [8, 32, 96][j / 4];
            let prompts = (0..n)
                .map(|i| {
                    json!(format!(
                        "Item {j}-{i}: describe a small red house in detail."
                    ))
                })
                .collect();
            (prompts, max_tokens)
        })
        .collect();
    println!(
        "\n| pass over 12 job shapes (1–4 prompts × 8/32/96 tokens) | predictor generations | mean abs ln(measured/predicted) | median |"
    );
    println!("|---|---|---|---|");
    for pass in 1..=3 {
        let mut errors = Vec::new();
        let mut generations = Vec::new();
        for (prompts, max_tokens) in &shapes {
            let v = post(
                &a.api,
                "/v1/completions",
                &json!({"model": MODEL, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0}),
            );
            let m = &v["metainf"];
            let (p, r) = (
                m["predicted_runtime_s"].as_f64().unwrap_or(f64::NAN),
                m["measured_runtime_s"].as_f64().unwrap_or(f64::NAN),
            );
            errors.push((r / p).ln().abs());
            generations.push(m["predictor_generation"].as_u64().unwrap_or(0));
        }
        let mean = errors.iter().sum::<f64>() / errors.len() as f64;
        println!(
            "| {pass} | {}–{} | {mean:.3} | {:.3} |",
            generations.iter().min().unwrap_or(&0),
            generations.iter().max().unwrap_or(&0),
            percentile(errors, 0.5)
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
