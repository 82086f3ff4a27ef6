//! Jobs end to end on loopback, each node with its own store, engine (the default model) and
//! HTTP API: three nodes run in this process (on port 0, so nothing races for ports) for
//! routing within budgets from every node, an OpenAI-compatible streaming request through a
//! real HTTP client, the API's errors and a host stopped mid-job; a real `metainf-node` process,
//! SIGKILLed mid-job and restarted, for the pending job it finishes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use metainf_node::daemon::RunningNode;
use metainf_node::{Config, Node};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "SmolLM2-135M-Instruct";
const FRANCE: &str = "What is the capital of France?";
const SYSTEM: &str = "You are a helpful assistant.";

/// The configuration file every node of these tests starts from: `queue` sequences may wait
/// in its engine, and as many run at once.
fn node_toml(queue: u32) -> String {
    format!(
        "[network]\nheartbeat_interval_s = 1\npeer_timeout_s = 6\n\
         [engine]\nmax_running = {queue}\n\
         [jobs]\nqueue_capacity = {queue}\nretrain_check_s = 1\nretrain_after = 4\n\
         job_timeout_s = 120\n[api]\nmax_body_bytes = 65536\n"
    )
}

/// Where a node's HTTP API is.
trait Api {
    fn api(&self) -> &str;

    /// What to show when a wait fails (in-process nodes log through the test's output).
    fn log(&self) -> String {
        String::new()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api())
    }
}

/// A node running in this process, on loopback ports the system chose.
struct InProc {
    api: String,
    peer: String,
    p2p: String,
    shutdown: CancellationToken,
    running: Option<RunningNode>,
}

impl InProc {
    async fn start(
        dir: PathBuf,
        threads: usize,
        price: f64,
        queue: u32,
        bootstrap: Option<&str>,
    ) -> Self {
        Self::start_with(dir, threads, price, queue, bootstrap, |_| {}).await
    }

    /// The same, the configuration changed by `tweak` first.
    async fn start_with(
        dir: PathBuf,
        threads: usize,
        price: f64,
        queue: u32,
        bootstrap: Option<&str>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::from_toml(&node_toml(queue)).unwrap();
        config.data_dir = Some(dir);
        config.engine.threads = Some(threads);
        config.network.price_per_hour = price;
        config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        config.network.bootstrap = bootstrap.map(|b| b.parse().unwrap()).into_iter().collect();
        config.network.mdns = false;
        config.network.nat = false;
        config.api.listen = "127.0.0.1:0".parse().unwrap();
        tweak(&mut config);
        let node = tokio::task::spawn_blocking(move || Node::open(&config))
            .await
            .unwrap()
            .unwrap();
        let shutdown = CancellationToken::new();
        let running = node.start(shutdown.clone()).await.unwrap();
        let p2p = running.listen_addrs()[0].to_string();
        Self {
            api: format!("http://{}", running.api_addr().unwrap()),
            peer: running.peer_id().to_string(),
            p2p,
            shutdown,
            running: Some(running),
        }
    }

    /// Stops the node as a shutdown does: its connections close, its store is flushed.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await.unwrap();
        }
    }
}

impl Api for InProc {
    fn api(&self) -> &str {
        &self.api
    }
}

impl Drop for InProc {
    /// A test that fails leaves its nodes to the end of the runtime.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Logs of the nodes in this process, shown when a test fails (`TEST_LOG` filters them).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()))
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// A `metainf-node run` process, for what needs a real process: a SIGKILL mid-job.
struct NodeProc {
    child: Child,
    api: String,
    dir: PathBuf,
    args: Vec<String>,
    /// Length of the log when the running process started.
    log_start: usize,
}

impl NodeProc {
    async fn start(dir: &Path, threads: u32, price: f64, queue: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("node.toml");
        std::fs::write(&config, node_toml(queue)).unwrap();
        let args: Vec<String> = vec![
            "--config".into(),
            config.display().to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--threads".into(),
            threads.to_string(),
            "--price-per-hour".into(),
            price.to_string(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--api-listen".into(),
            "127.0.0.1:0".into(),
            "--no-mdns".into(),
            "--no-nat".into(),
        ];
        let (child, log_start) = spawn(dir, &args);
        let mut node = Self {
            child,
            api: String::new(),
            dir: dir.to_owned(),
            args,
            log_start,
        };
        node.wait_healthy().await;
        node
    }

    /// Waits for the running process to log where its API listens, and to answer there.
    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(addr) = self.bound_api() {
                self.api = format!("http://{addr}");
                if let Ok(r) = http().get(self.url("/healthz")).send().await
                    && r.status().is_success()
                {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("node exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "node not healthy: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The address the running process logged for its API ("HTTP API listening addr=...").
    fn bound_api(&self) -> Option<String> {
        let log = self.log();
        log.get(self.log_start..)?
            .lines()
            .filter(|l| l.contains("HTTP API listening"))
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .map(str::to_owned)
            })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn restart(&mut self) {
        self.kill();
        (self.child, self.log_start) = spawn(&self.dir, &self.args);
        self.wait_healthy().await;
    }
}

impl Api for NodeProc {
    fn api(&self) -> &str {
        &self.api
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `metainf-node run`, appending to the log; returns the log's length before.
fn spawn(dir: &Path, args: &[String]) -> (Child, usize) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .unwrap();
    let start = usize::try_from(log.metadata().unwrap().len()).unwrap();
    let child = common::bin()
        .args(args)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, start)
}

/// Runs the CLI (off the runtime's threads) and fails the test unless it succeeds.
async fn cli(args: &[&str]) -> Output {
    let mut cmd = common::bin();
    cmd.args(args.iter().map(OsStr::new));
    tokio::task::spawn_blocking(move || common::run_ok(&mut cmd))
        .await
        .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

async fn post(node: &impl Api, path: &str, body: &Value) -> (u16, Value) {
    let r = http().post(node.url(path)).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(node: &impl Api, path: &str) -> Value {
    http()
        .get(node.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn chat(max_tokens: u32, metainf: Value) -> Value {
    json!({
        "model": MODEL,
        // SmolLM2's template adds its own system prompt to a chat without one, after which
        // the model answers in French (as under llama-server): a plain one.
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FRANCE}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "metainf": metainf,
    })
}

/// Waits until `node` sees `hosts` hosts (itself included) serving the model.
async fn wait_hosts(node: &impl Api, hosts: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let models = get(node, "/v1/models").await;
        if models["data"][0]["metainf"]["hosts"].as_u64() >= Some(hosts) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{hosts} hosts never seen from {}: {models}\n{}",
            node.api(),
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn wait_job(node: &impl Api, id: &str, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let job = get(node, &format!("/v1/jobs/{id}")).await;
        if until(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} stuck at {}: {job}\n{}",
            node.api(),
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `node`'s `/metrics` text.
async fn metrics(node: &impl Api) -> String {
    http()
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A counter of `node`'s `/metrics`.
async fn metric(node: &impl Api, name: &str) -> f64 {
    metrics(node)
        .await
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_next_turn_goes_to_the_host_holding_its_prefix_unless_it_is_overloaded() {
    init_logs();
    let root = tempfile::tempdir().unwrap();
    // Two hosts of one hardware, A the cheaper (so without cache knowledge A wins every tie);
    // heartbeats 30 s apart, so what A holds of B is stale after any change and A must ask.
    let tweak = |c: &mut Config| {
        c.network.heartbeat_interval_s = 30;
        c.network.peer_timeout_s = 120;
        c.engine.max_running = Some(4);
        c.jobs.queue_capacity = 32;
    };
    let a = InProc::start_with(root.path().join("a"), 1, 0.5, 8, None, tweak).await;
    let b = InProc::start_with(root.path().join("b"), 1, 1.0, 8, Some(&a.p2p), tweak).await;
    wait_hosts(&a, 2).await;
    let system = format!(
        "You are the assistant of Northwind Traders. {}",
        "Answer questions about orders, shipping and returns politely and briefly. ".repeat(40)
    );
    let turn1 = json!([
        {"role": "system", "content": system},
        {"role": "user", "content": "Where is my order?"},
    ]);
    let job = |messages: &Value, extra: Value| {
        let mut body = json!({
            "model": MODEL,
            "prompts": [{"messages": messages}],
            "max_tokens": 12,
            "temperature": 0,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    // The first turn runs on B (pinned): B's cache now holds the conversation.
    let (status, v) = post(
        &a,
        "/v1/jobs",
        &job(&turn1, json!({"host": b.peer, "method": "cb+pc"})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let done = wait_job(&a, v["id"].as_str().unwrap(), |j| j["status"] == "done").await;
    let answer = done["results"][0]["text"].as_str().unwrap().to_owned();
    let mut turn2 = turn1.clone();
    turn2.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": answer}),
        json!({"role": "user", "content": "And when will it arrive?"}),
    ]);
    // The second turn, unpinned: A asks B for its state (stale) and follows the cache.
    let queries = metric(&a, "metainf_routing_state_queries_total").await;
    let (status, v) = post(&a, "/v1/jobs", &job(&turn2, json!({}))).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["metainf"]["host"], b.peer.as_str(), "{v}");
    assert!(
        v["metainf"]["cached_tokens"].as_u64().unwrap() >= 400,
        "B's cache holds most of the prompt: {v}"
    );
    assert!(
        metric(&a, "metainf_routing_state_queries_total").await > queries,
        "the stale state was asked for"
    );
    wait_job(&a, v["id"].as_str().unwrap(), |j| j["status"] == "done").await;
    // B served most of that prompt from its cache.
    assert!(metric(&b, "metainf_served_cached_prompt_tokens_total").await >= 400.0);
    // B overloaded (16 long sequences, 4 at a time): the same turn goes to A now.
    let long: Vec<Value> = (0..16)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("Write a long story about ship number {i}.")}]}))
        .collect();
    let (status, busy) = post(
        &a,
        "/v1/jobs",
        &json!({"model": MODEL, "prompts": long, "max_tokens": 200, "temperature": 0, "host": b.peer}),
    )
    .await;
    assert_eq!(status, 202, "{busy}");
    let (status, v) = post(&a, "/v1/jobs", &job(&turn2, json!({}))).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(
        v["metainf"]["host"],
        a.peer.as_str(),
        "B is overloaded: {v}"
    );
    // A baseline policy asked for by the request is the one that routes it.
    let (status, v) = post(
        &a,
        "/v1/jobs",
        &job(&turn2, json!({"policy": "prefix-affinity"})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["metainf"]["policy"], "prefix-affinity", "{v}");
    let (status, v) = post(&a, "/v1/jobs", &job(&turn2, json!({"policy": "fastest"}))).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("round-robin"),
        "{v}"
    );
    let _ = (a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_route_stream_refuse_and_survive_a_dead_host() {
    init_logs();
    let root = tempfile::tempdir().unwrap();
    // A and C: the same hardware (one thread), C at half A's price; B: two threads, very dear.
    let mut a = InProc::start(root.path().join("a"), 1, 1.0, 8, None).await;
    let (mut b, mut c) = tokio::join!(
        InProc::start(root.path().join("b"), 2, 1000.0, 8, Some(&a.p2p)),
        InProc::start(root.path().join("c"), 1, 0.5, 1, Some(&a.p2p)),
    );
    for n in [&a, &b, &c] {
        wait_hosts(n, 3).await;
    }
    let nodes = [&a, &b, &c];

    // A real job, answered correctly, with its decision and usage.
    let (status, v) = post(&a, "/v1/chat/completions", &chat(8, json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("The capital of France is"), "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], 27, "{v}");
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
        )
        .await;
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
        )
        .await;
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
        )
        .await;
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
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let sse = response.text().await.unwrap();
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
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["object"], "text_completion");

    // Bad requests get clear errors, as JSON.
    let raw = http()
        .post(a.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let v: Value = raw.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let mut unknown = chat(4, json!({}));
    unknown["model"] = json!("no-such-model");
    let (status, v) = post(&a, "/v1/chat/completions", &unknown).await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model")
    );
    assert_eq!(
        get(&a, &format!("/v1/models/{MODEL}")).await["metainf"]["hosts"],
        3
    );
    assert_eq!(
        get(&a, "/v1/models/nope").await["error"]["type"],
        "model_not_found"
    );
    let mut two = chat(4, json!({}));
    two["n"] = json!(2);
    assert_eq!(post(&a, "/v1/chat/completions", &two).await.0, 400);
    assert_eq!(
        post(&a, "/v1/chat/completions", &chat(0, json!({})))
            .await
            .0,
        400
    );
    let (status, v) = post(
        &a,
        "/v1/chat/completions",
        &chat(4, json!({"method": "warp-drive"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(
        &a,
        "/v1/chat/completions",
        &chat(
            4,
            json!({"host": "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"}),
        ),
    )
    .await;
    assert_eq!(status, 503, "{v}");
    let (status, v) = post(&a, "/v1/chat/completions", &chat(20_000, json!({}))).await;
    assert_eq!(status, 422, "longer than the context: {v}");
    let big =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    let (status, v) = post(&a, "/v1/chat/completions", &big).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["type"], "request_too_large");
    assert_eq!(
        get(&a, "/v1/jobs/00").await["error"]["type"],
        "invalid_request_error"
    );
    let missing = http()
        .get(a.url("/v1/jobs/00000000000000000000000000000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Concurrent chats on one host share its engine's batch and get the answers they get
    // alone (greedy decoding does not depend on company).
    let questions = [
        "What is the capital of Italy?",
        "Name a large ocean.",
        "What colour is the sky?",
        "How many legs does a spider have?",
    ];
    let ask = |q: &str| {
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": 12,
            "temperature": 0,
            "metainf": {"host": a.peer},
        })
    };
    let mut alone = Vec::new();
    for q in questions {
        let (status, v) = post(&a, "/v1/chat/completions", &ask(q)).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["message"]["content"].clone());
    }
    let together: Vec<_> = questions
        .iter()
        .map(|q| {
            let (url, body) = (a.url("/v1/chat/completions"), ask(q));
            tokio::spawn(async move {
                let v: Value = http()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v
            })
        })
        .collect();
    for (t, expected) in together.into_iter().zip(&alone) {
        let v = t.await.unwrap();
        assert_eq!(&v["choices"][0]["message"]["content"], expected, "{v}");
    }

    // C's engine runs one sequence and lets one wait: a burst pinned to it overflows into 429
    // with Retry-After.
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let url = a.url("/v1/chat/completions");
            let body = chat(24, json!({"host": c.peer}));
            tokio::spawn(async move { http().post(url).json(&body).send().await.unwrap() })
        })
        .collect();
    let mut statuses: Vec<(u16, Option<String>)> = Vec::new();
    for t in burst {
        let r = t.await.unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        statuses.push((r.status().as_u16(), retry));
    }
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
    assert!(
        statuses.iter().any(|(s, r)| *s == 429 && r.is_some()),
        "{statuses:?}"
    );

    // The operator's endpoints.
    let decisions = get(&a, "/v1/decisions").await;
    let recent = decisions["recent"].as_array().unwrap();
    assert!(recent.len() >= 5, "{decisions}");
    assert!(
        recent
            .iter()
            .any(|d| d["measured_runtime_s"].as_f64().is_some())
    );
    let metrics = metrics(&a).await;
    assert!(
        metrics.contains("metainf_jobs_total{outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("metainf_routing_seconds_bucket"),
        "{metrics}"
    );
    let peers = get(&a, "/v1/peers").await;
    assert_eq!(peers["peers"].as_array().unwrap().len(), 2, "{peers}");
    let status = get(&a, "/v1/status").await;
    assert_eq!(status["peer_id"], a.peer.as_str());

    // The CLI client.
    let out = cli(&[
        "submit",
        "--node",
        &a.api,
        "--system",
        SYSTEM,
        "--prompt",
        FRANCE,
        "--max-tokens",
        "8",
    ])
    .await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Paris"),
        "{out:?}"
    );
    let out = cli(&["jobs", "--node", &a.api]).await;
    assert!(String::from_utf8_lossy(&out.stdout).lines().count() > 5);
    let out = cli(&["status", "--node", &a.api]).await;
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["peers"]["alive"], 2, "{status}");
    assert_eq!(status["queue"]["capacity"], 8, "{status}");
    let out = cli(&["peers", "--node", &a.api]).await;
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
    let out = cli(&[
        "submit",
        "--node",
        &b.api,
        "--max-tokens",
        "6",
        "--file",
        jobs_file.to_str().unwrap(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[0]") && stdout.contains("[1]"), "{stdout}");

    // A burst at one gateway: each job accepted counts against its host's queue at once,
    // before any heartbeat could tell (B, with twice the threads, may rightly win all three).
    let mut burst: Vec<(String, String, f64, String, u64)> = Vec::new();
    for i in 0..3 {
        let prompts: Vec<Value> = (0..4)
            .map(|j| json!({"messages": [{"role": "user", "content": format!("Describe planet number {i}{j} in detail.")}]}))
            .collect();
        let (status, v) = post(
            &a,
            "/v1/jobs",
            &json!({"model": MODEL, "prompts": prompts, "max_tokens": 64, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 202, "{v}");
        let m = &v["metainf"];
        let latency =
            m["predicted_runtime_s"].as_f64().unwrap() + m["predicted_wait_s"].as_f64().unwrap();
        burst.push((
            v["id"].as_str().unwrap().to_owned(),
            m["host"].as_str().unwrap().to_owned(),
            latency,
            m["method"].as_str().unwrap().to_owned(),
            m["predictor_generation"].as_u64().unwrap(),
        ));
    }
    // The same (host, method) pair by the same predictor: predicted slower with each job it
    // was just given (another pair or a retrained predictor are other predictions).
    for pair in burst.windows(2) {
        let (x, y) = (&pair[0], &pair[1]);
        if (&x.1, &x.3, x.4) == (&y.1, &y.3, y.4) {
            assert!(
                y.2 > x.2,
                "a host chosen again must be predicted slower with the job it was just given: {burst:?}"
            );
        }
    }
    for (id, ..) in &burst {
        let job = wait_job(&a, id, |j| j["status"] == "done" || j["status"] == "failed").await;
        assert_eq!(job["status"], "done", "{job}");
    }

    // The cheapest host (C) stops mid-job, its connections closing: the batch job finishes on
    // another host.
    let prompts: Vec<Value> = (0..6)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("Write a long story about a robot number {i}.")}]}))
        .collect();
    let (status, v) = post(
        &a,
        "/v1/jobs",
        &json!({"model": MODEL, "prompts": prompts, "max_tokens": 200, "temperature": 0, "objective": "cost"}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["metainf"]["host"], c.peer.as_str(), "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    wait_job(&a, &id, |j| {
        j["status"] == "running" && j["host"] == c.peer.as_str()
    })
    .await;
    c.stop().await;
    let job = wait_job(&a, &id, |j| {
        j["status"] == "done" || j["status"] == "failed"
    })
    .await;
    assert_eq!(job["status"], "done", "{job}");
    assert_ne!(job["host"], c.peer.as_str());
    assert_eq!(job["attempts"], 2, "{job}");
    assert_eq!(job["results"].as_array().unwrap().len(), 6);

    // Every job's record reached the gateway, and the predictor has retrained on them.
    let decisions = get(&a, "/v1/decisions").await;
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
    tokio::join!(a.stop(), b.stop());
}

#[tokio::test]
async fn a_restarted_node_finishes_its_pending_batch_job() {
    let root = tempfile::tempdir().unwrap();
    let mut a = NodeProc::start(&root.path().join("a"), 1, 1.0, 8).await;
    let prompts: Vec<Value> = (0..3)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("Tell a long tale about the number {i}.")}]}))
        .collect();
    let (status, v) = post(
        &a,
        "/v1/jobs",
        &json!({"model": MODEL, "prompts": prompts, "max_tokens": 128, "temperature": 0,
                "policy": "least-loaded"}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let running = wait_job(&a, &id, |j| j["status"] == "running").await;
    assert_eq!(running["policy"], "least-loaded", "{running}");
    a.restart().await;
    let job = wait_job(&a, &id, |j| {
        j["status"] == "done" || j["status"] == "failed"
    })
    .await;
    assert_eq!(job["status"], "done", "{job}\n{}", a.log());
    assert_eq!(job["results"].as_array().unwrap().len(), 3);
    // Run again by the policy the client asked for, not the node's default.
    assert_eq!(job["policy"], "least-loaded", "{job}");
    assert!(
        a.log()
            .contains("running again a job left pending by a restart")
    );
}

/// A node serving two models (the default SmolLM2 and Gemma 3 270M, another architecture and
/// tokenizer) advertises both; a peer serving only one routes each request to a host with its
/// model, and the answer comes from that model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_serves_two_models_and_peers_route_each_to_its_hosts() {
    init_logs();
    let root = tempfile::tempdir().unwrap();
    let smollm = metainf_profiler::model::default_model_path().unwrap();
    let gemma =
        metainf_profiler::model::cached_model_path(metainf_profiler::model::GEMMA3_MODEL_FILE)
            .unwrap();
    assert!(
        gemma.exists(),
        "{} is missing: scripts/fetch-model.sh gemma3-270m (scripts/test.sh runs it)",
        gemma.display()
    );
    let mut a = InProc::start(root.path().join("a"), 1, 1.0, 4, None).await;
    let both = vec![smollm, gemma];
    let mut b = InProc::start_with(root.path().join("b"), 1, 1.0, 4, Some(&a.p2p), |c| {
        c.engine.models = both;
    })
    .await;
    const GEMMA: &str = "gemma-3-270m";
    // B lists both as its own; A sees SmolLM2 on two hosts and Gemma on one (B).
    let hosts = |models: &Value, name: &str| {
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == name)
            .and_then(|m| m["metainf"]["hosts"].as_u64())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let models = get(&a, "/v1/models").await;
        if hosts(&models, MODEL) == Some(2) && hosts(&models, GEMMA) == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never saw both models: {models}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let listed = get(&b, "/v1/models").await;
    assert_eq!(hosts(&listed, MODEL), Some(2), "{listed}");
    assert_eq!(hosts(&listed, GEMMA), Some(1), "{listed}");

    // A Gemma job sent to A runs on B, through Gemma's own chat template and tokenizer.
    let job = json!({
        "model": GEMMA,
        "messages": [{"role": "user", "content": "Complete: one, two, three,"}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let (status, v) = post(&a, "/v1/chat/completions", &job).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], GEMMA, "{v}");
    assert_eq!(
        v["metainf"]["host"],
        b.peer.as_str(),
        "only B serves Gemma: {v}"
    );
    // `<bos><start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n` in Gemma's tokens:
    // BOS, the turn markers and the text, far fewer ids than bytes.
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((10..30).contains(&prompt_tokens), "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{v}");
    assert!(
        !text.contains("<end_of_turn>"),
        "stop tokens are not text: {v}"
    );
    // The same job straight to B gives the same greedy answer.
    let (status, direct) = post(&b, "/v1/chat/completions", &job).await;
    assert_eq!(status, 200, "{direct}");
    assert_eq!(direct["choices"][0]["message"]["content"], text, "{direct}");
    // And SmolLM2 on B still answers as SmolLM2.
    let mut smol = chat(8, json!({"host": b.peer}));
    smol["model"] = json!(MODEL);
    let (status, v) = post(&a, "/v1/chat/completions", &smol).await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("The capital of France is"),
        "{v}"
    );
    // A model nobody serves is a clear error, not a guess.
    let mut unknown = job.clone();
    unknown["model"] = json!("no-such-model");
    let (status, v) = post(&a, "/v1/chat/completions", &unknown).await;
    assert_eq!(status, 404, "{v}");
    assert!(v.to_string().contains("no-such-model"), "{v}");
    b.stop().await;
    a.stop().await;
}
