//! Jobs end to end on real `metainf-node` processes on loopback, each with its own store,
//! engine (the default model) and HTTP API: routing within budgets from every node, an
//! OpenAI-compatible streaming request through a real HTTP client, the API's errors, a host
//! killed mid-job, and a node restarted with a pending job.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct";
const FRANCE: &str = "What is the capital of France?";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct NodeProc {
    child: Child,
    api: String,
    peer: String,
    p2p: String,
    dir: PathBuf,
    args: Vec<String>,
}

impl NodeProc {
    fn start(dir: &Path, threads: u32, price: f64, queue: u32, bootstrap: Option<&str>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[network]\nheartbeat_interval_s = 1\npeer_timeout_s = 6\n\
                 [jobs]\nqueue_capacity = {queue}\nretrain_check_s = 1\nretrain_after = 4\n\
                 job_timeout_s = 120\n[api]\nmax_body_bytes = 65536\n"
            ),
        )
        .unwrap();
        let out = common::run_ok(common::bin().arg("--data-dir").arg(dir).arg("id"));
        let peer = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let (p2p_port, api_port) = (free_port(), free_port());
        let p2p = format!("/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{peer}");
        let mut args: Vec<String> = vec![
            "--config".into(),
            config.display().to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--threads".into(),
            threads.to_string(),
            "--price-per-hour".into(),
            price.to_string(),
            "--listen".into(),
            format!("/ip4/127.0.0.1/tcp/{p2p_port}"),
            "--api-listen".into(),
            format!("127.0.0.1:{api_port}"),
            "--no-mdns".into(),
            "--no-nat".into(),
        ];
        if let Some(b) = bootstrap {
            args.push("--bootstrap".into());
            args.push(b.into());
        }
        let mut node = Self {
            child: spawn(dir, &args),
            api: format!("http://127.0.0.1:{api_port}"),
            peer,
            p2p,
            dir: dir.to_owned(),
            args,
        };
        node.wait_healthy();
        node
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = reqwest::blocking::get(format!("{}/healthz", self.api))
                && r.status().is_success()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("node exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "node not healthy: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.dir, &self.args);
        self.wait_healthy();
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .unwrap();
    common::bin()
        .args(args)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

fn post(node: &NodeProc, path: &str, body: &Value) -> (u16, Value) {
    let r = http().post(node.url(path)).json(body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn get(node: &NodeProc, path: &str) -> Value {
    http().get(node.url(path)).send().unwrap().json().unwrap()
}

fn chat(max_tokens: u32, metainf: Value) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": FRANCE}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "metainf": metainf,
    })
}

/// Waits until `node` sees `hosts` hosts (itself included) serving the model.
fn wait_hosts(node: &NodeProc, hosts: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let models = get(node, "/v1/models");
        if models["data"][0]["metainf"]["hosts"].as_u64() >= Some(hosts) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} hosts never seen: {models}\n{}",
            hosts,
            node.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn wait_job(node: &NodeProc, id: &str, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let job = get(node, &format!("/v1/jobs/{id}"));
        if until(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} stuck: {job}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_nodes_route_stream_refuse_and_survive_a_dead_host() {
    let root = tempfile::tempdir().unwrap();
    // A and C: the same hardware (one thread), C at half A's price; B: two threads, very dear.
    let a = NodeProc::start(&root.path().join("a"), 1, 1.0, 8, None);
    let b = NodeProc::start(&root.path().join("b"), 2, 1000.0, 8, Some(&a.p2p));
    let mut c = NodeProc::start(&root.path().join("c"), 1, 0.5, 1, Some(&a.p2p));
    for n in [&a, &b, &c] {
        wait_hosts(n, 3);
    }
    let nodes = [&a, &b, &c];

    // A real job, answered correctly, with its decision and usage.
    let (status, v) = post(&a, "/v1/chat/completions", &chat(8, json!({})));
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("The capital of France is"), "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], 16, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 8);
    let host = v["metainf"]["host"].as_str().unwrap();
    assert!(nodes.iter().any(|n| n.peer == host), "{v}");
    assert!(v["metainf"]["measured_runtime_s"].as_f64().unwrap() > 0.0);
    assert!(
        v["metainf"]["record"].is_string(),
        "every finished job is recorded: {v}"
    );

    // Budgets, sent to each node: the cheapest host when cost is the objective; within a
    // budget that B's price cannot meet, never B; below every option, 402 naming the cheapest.
    for n in nodes {
        let (status, v) = post(
            n,
            "/v1/chat/completions",
            &chat(4, json!({"objective": "cost"})),
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["metainf"]["host"],
            c.peer.as_str(),
            "cost objective from {}: {v}",
            n.peer
        );
        let cheapest_cost = v["metainf"]["predicted_cost"].as_f64().unwrap();
        assert!(cheapest_cost > 0.0);

        let budget = cheapest_cost * 20.0;
        let (status, v) = post(
            n,
            "/v1/chat/completions",
            &chat(4, json!({"budget": budget})),
        );
        assert_eq!(status, 200, "{v}");
        assert_ne!(
            v["metainf"]["host"],
            b.peer.as_str(),
            "B is over budget: {v}"
        );
        assert!(v["metainf"]["predicted_cost"].as_f64().unwrap() <= budget);

        let (status, v) = post(
            n,
            "/v1/chat/completions",
            &chat(4, json!({"budget": 1e-12})),
        );
        assert_eq!(status, 402, "{v}");
        assert_eq!(v["error"]["type"], "budget_exceeded");
        assert_eq!(
            v["error"]["metainf"]["cheapest"]["host"],
            c.peer.as_str(),
            "{v}"
        );
        assert!(v["error"]["message"].as_str().unwrap().contains("cheapest"));
    }

    // Streaming through a real HTTP client, forwarded to another host (pinned to B).
    let mut body = chat(12, json!({"host": b.peer}));
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = http()
        .post(a.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let sse = response.text().unwrap();
    let events: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{sse}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert!(
        content_chunks >= 2,
        "tokens arrive as they are generated: {sse}"
    );
    assert!(
        streamed.starts_with("The capital of France is Paris"),
        "{sse}"
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["object"], "chat.completion.chunk");
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert_eq!(last["metainf"]["host"], b.peer.as_str(), "{last}");
    assert!(
        last["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{last}"
    );

    // Text completions: several prompts are one job.
    let (status, v) = post(
        &b,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": ["The sky is", "One, two,"], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["object"], "text_completion");

    // Bad requests get clear errors, as JSON.
    let raw = http()
        .post(a.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(raw.status(), 400);
    let v: Value = raw.json().unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let mut unknown = chat(4, json!({}));
    unknown["model"] = json!("no-such-model");
    let (status, v) = post(&a, "/v1/chat/completions", &unknown);
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model")
    );
    assert_eq!(
        get(&a, &format!("/v1/models/{MODEL}"))["metainf"]["hosts"],
        3
    );
    assert_eq!(
        get(&a, "/v1/models/nope")["error"]["type"],
        "model_not_found"
    );
    let mut two = chat(4, json!({}));
    two["n"] = json!(2);
    assert_eq!(post(&a, "/v1/chat/completions", &two).0, 400);
    assert_eq!(post(&a, "/v1/chat/completions", &chat(0, json!({}))).0, 400);
    let (status, v) = post(
        &a,
        "/v1/chat/completions",
        &chat(4, json!({"method": "warp-drive"})),
    );
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(
        &a,
        "/v1/chat/completions",
        &chat(
            4,
            json!({"host": "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"}),
        ),
    );
    assert_eq!(status, 503, "{v}");
    let (status, v) = post(&a, "/v1/chat/completions", &chat(20_000, json!({})));
    assert_eq!(status, 422, "longer than the context: {v}");
    let big =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    let (status, v) = post(&a, "/v1/chat/completions", &big);
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["type"], "request_too_large");
    assert_eq!(
        get(&a, "/v1/jobs/00")["error"]["type"],
        "invalid_request_error"
    );
    let missing = http()
        .get(a.url("/v1/jobs/00000000000000000000000000000000"))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);

    // C's queue holds one job: a burst pinned to it overflows into 429 with Retry-After.
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let url = a.url("/v1/chat/completions");
            let body = chat(24, json!({"host": c.peer}));
            std::thread::spawn(move || http().post(url).json(&body).send().unwrap())
        })
        .collect();
    let statuses: Vec<(u16, Option<String>)> = burst
        .into_iter()
        .map(|t| {
            let r = t.join().unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), retry)
        })
        .collect();
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
    assert!(
        statuses.iter().any(|(s, r)| *s == 429 && r.is_some()),
        "{statuses:?}"
    );

    // The operator's endpoints.
    let decisions = get(&a, "/v1/decisions");
    let recent = decisions["recent"].as_array().unwrap();
    assert!(recent.len() >= 5, "{decisions}");
    assert!(
        recent
            .iter()
            .any(|d| d["measured_runtime_s"].as_f64().is_some())
    );
    let metrics = http()
        .get(a.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("metainf_jobs_total{outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("metainf_routing_seconds_bucket"),
        "{metrics}"
    );
    let peers = get(&a, "/v1/peers");
    assert_eq!(peers["peers"].as_array().unwrap().len(), 2, "{peers}");
    let status = get(&a, "/v1/status");
    assert_eq!(status["peer_id"], a.peer.as_str());

    // The CLI client.
    let out = common::run_ok(common::bin().args([
        "submit",
        "--node",
        &a.api,
        "--prompt",
        FRANCE,
        "--max-tokens",
        "8",
    ]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Paris"),
        "{out:?}"
    );
    let out = common::run_ok(common::bin().args(["jobs", "--node", &a.api]));
    assert!(String::from_utf8_lossy(&out.stdout).lines().count() > 5);
    let out = common::run_ok(common::bin().args(["status", "--node", &a.api]));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["peers"]["alive"], 2, "{status}");
    assert_eq!(status["queue"]["capacity"], 8, "{status}");
    let out = common::run_ok(common::bin().args(["peers", "--node", &a.api]));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&b.peer));
    let jobs_file = root.path().join("jobs.jsonl");
    let mut f = std::fs::File::create(&jobs_file).unwrap();
    writeln!(f, "\"Name a colour.\"").unwrap();
    writeln!(
        f,
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"Say hi.\"}}]}}"
    )
    .unwrap();
    drop(f);
    let out = common::run_ok(
        common::bin()
            .args(["submit", "--node", &b.api, "--max-tokens", "6"])
            .arg("--file")
            .arg(&jobs_file),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[0]") && stdout.contains("[1]"), "{stdout}");

    // A burst at one gateway spreads over the hosts: each job accepted counts against its
    // host's queue at once, before any heartbeat could tell.
    let burst: Vec<(String, String)> = (0..3)
        .map(|i| {
            let prompts: Vec<Value> = (0..4)
                .map(|j| json!({"messages": [{"role": "user", "content": format!("Describe planet number {i}{j} in detail.")}]}))
                .collect();
            let (status, v) = post(
                &a,
                "/v1/jobs",
                &json!({"model": MODEL, "prompts": prompts, "max_tokens": 64, "temperature": 0}),
            );
            assert_eq!(status, 202, "{v}");
            (
                v["id"].as_str().unwrap().to_owned(),
                v["metainf"]["host"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let distinct: std::collections::HashSet<&String> = burst.iter().map(|(_, h)| h).collect();
    assert!(
        distinct.len() >= 2,
        "three jobs at once all went to one host: {burst:?}"
    );
    for (id, _) in &burst {
        let job = wait_job(&a, id, |j| j["status"] == "done" || j["status"] == "failed");
        assert_eq!(job["status"], "done", "{job}");
    }

    // The cheapest host (C) dies mid-job: the batch job finishes on another host.
    let prompts: Vec<Value> = (0..6)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("Write a long story about a robot number {i}.")}]}))
        .collect();
    let (status, v) = post(
        &a,
        "/v1/jobs",
        &json!({"model": MODEL, "prompts": prompts, "max_tokens": 200, "temperature": 0, "objective": "cost"}),
    );
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["metainf"]["host"], c.peer.as_str(), "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    wait_job(&a, &id, |j| {
        j["status"] == "running" && j["host"] == c.peer.as_str()
    });
    c.kill();
    let job = wait_job(&a, &id, |j| {
        j["status"] == "done" || j["status"] == "failed"
    });
    assert_eq!(job["status"], "done", "{job}\n{}", a.log());
    assert_ne!(job["host"], c.peer.as_str());
    assert_eq!(job["attempts"], 2, "{job}");
    assert_eq!(job["results"].as_array().unwrap().len(), 6);

    // Every job's record reached the gateway, and the predictor has retrained on them.
    let decisions = get(&a, "/v1/decisions");
    assert!(
        decisions["predictor"]["generation"].as_u64().unwrap() >= 1,
        "{decisions}"
    );
    assert!(
        decisions["predictor"]["trained_on_records"]
            .as_u64()
            .unwrap()
            >= 4
    );
}

#[test]
fn a_restarted_node_finishes_its_pending_batch_job() {
    let root = tempfile::tempdir().unwrap();
    let mut a = NodeProc::start(&root.path().join("a"), 1, 1.0, 8, None);
    let prompts: Vec<Value> = (0..3)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("Tell a long tale about the number {i}.")}]}))
        .collect();
    let (status, v) = post(
        &a,
        "/v1/jobs",
        &json!({"model": MODEL, "prompts": prompts, "max_tokens": 128, "temperature": 0}),
    );
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    wait_job(&a, &id, |j| j["status"] == "running");
    a.restart();
    let job = wait_job(&a, &id, |j| {
        j["status"] == "done" || j["status"] == "failed"
    });
    assert_eq!(job["status"], "done", "{job}\n{}", a.log());
    assert_eq!(job["results"].as_array().unwrap().len(), 3);
    assert!(
        a.log()
            .contains("running again a job left pending by a restart")
    );
}
