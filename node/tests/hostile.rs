//! Hostile peers against real nodes: each hostile peer is a real libp2p swarm (the node's own
//! transport, `net::start`) whose behaviour the test scripts — it announces what it likes in its
//! heartbeats, holds job calls without answering, floods a host with job calls. The nodes are
//! whole (`Node::start`: store, engine with the default model, HTTP API) and in this process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metainf_node::daemon::RunningNode;
use metainf_node::net::{self, Client, JobCall, JobReply, NetEvent, NetworkConfig, Offer};
use metainf_node::{Config, Node};
use metainf_protocol::{
    GenerationParams, JobId, JobRequest, Keypair, MethodConfig, Objective, PeerId, Prompt, fixtures,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const MODEL: &str = "SmolLM2-135M-Instruct";

struct InProc {
    api: String,
    peer: PeerId,
    p2p: libp2p::Multiaddr,
    shutdown: CancellationToken,
    running: Option<RunningNode>,
}

impl InProc {
    async fn start(dir: PathBuf, extra_jobs: &str) -> Self {
        let toml = format!(
            "[network]\nheartbeat_interval_s = 1\npeer_timeout_s = 6\n\
             [engine]\nmax_running = 8\n\
             [jobs]\nqueue_capacity = 8\njob_timeout_s = 2\nmax_attempts = 1\n{extra_jobs}\n"
        );
        let mut config = Config::from_toml(&toml).unwrap();
        config.data_dir = Some(dir);
        config.engine.threads = Some(2);
        config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        config.network.mdns = false;
        config.network.nat = false;
        config.api.listen = "127.0.0.1:0".parse().unwrap();
        let node = tokio::task::spawn_blocking(move || Node::open(&config))
            .await
            .unwrap()
            .unwrap();
        let shutdown = CancellationToken::new();
        let running = node.start(shutdown.clone()).await.unwrap();
        let p2p = running.listen_addrs()[0].clone();
        Self {
            api: format!("http://{}", running.api_addr().unwrap()),
            peer: running.peer_id(),
            p2p,
            shutdown,
            running: Some(running),
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await.unwrap();
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A hostile peer: its heartbeats claim `profile_units` compute units, price 0 and an empty
/// queue for the default model; job calls it receives are held unanswered (counted).
struct Hostile {
    client: Client,
    calls: Arc<AtomicUsize>,
    token: CancellationToken,
    tasks: TaskTracker,
    _offer: tokio::sync::watch::Sender<Offer>,
}

impl Hostile {
    async fn start(bootstrap: &libp2p::Multiaddr) -> Self {
        let config = NetworkConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: vec![bootstrap.clone()],
            mdns: false,
            nat: false,
            heartbeat_interval_s: 1,
            peer_timeout_s: 6,
            anti_entropy_interval_s: 3600,
            ..NetworkConfig::default()
        };
        let (client, event_loop, mut events) = net::start(
            Keypair::generate_ed25519(),
            fixtures::cpu_hardware(64),
            config,
        )
        .unwrap();
        let token = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(event_loop.run(token.clone()));
        let (offer, offered) = tokio::sync::watch::channel(Offer {
            models: vec![fixtures::smollm2()],
            queue_depth: 0,
            running_jobs: 0,
            queue_capacity: 64,
            load: None,
            cache: None,
        });
        client.set_offer(offered).await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        tasks.spawn(async move {
            // Held, never answered: the caller's request stays open until it gives up.
            let mut held = Vec::new();
            while let Some(event) = events.recv().await {
                if let NetEvent::Job(job) = event {
                    counted.fetch_add(1, Ordering::SeqCst);
                    held.push(job);
                }
            }
        });
        Self {
            client,
            calls,
            token,
            tasks,
            _offer: offer,
        }
    }

    async fn stop(self) {
        self.token.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn chat(node: &InProc, host: Option<PeerId>) -> (u16, Value) {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 4,
        "temperature": 0,
        "metainf": {"host": host.map(|h| h.to_string())},
    });
    let r = http()
        .post(format!("{}/v1/chat/completions", node.api))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn peers(node: &InProc) -> Value {
    http()
        .get(format!("{}/v1/peers", node.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A job of `prompts` prompts that runs for a second or two.
fn job_call(prompts: usize) -> JobCall {
    JobCall {
        request: JobRequest {
            id: JobId(rand_id()),
            model: MODEL.into(),
            prompts: vec![Prompt::Text("Once upon a time".into()); prompts],
            params: GenerationParams {
                max_tokens: 48,
                ..GenerationParams::default()
            },
            budget: None,
            objective: Objective::Runtime,
            pin_method: None,
            pin_host: None,
            stream: false,
            submitted_at_ms: 0,
        },
        method: "cb".parse::<MethodConfig>().unwrap(),
    }
}

fn rand_id() -> [u8; 16] {
    let bytes = PeerId::random().to_bytes();
    bytes[bytes.len() - 16..].try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_host_is_excluded_and_a_flooding_peer_gets_only_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = InProc::start(dir.path().join("gateway"), "").await;
    let hostile = Hostile::start(&gateway.p2p).await;
    let hostile_id = hostile.client.peer_id();
    wait_for("the gateway to see the hostile host", async || {
        peers(&gateway).await["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["peer"] == hostile_id.to_string() && p["models"][0] == MODEL)
    })
    .await;

    // Three jobs sent to it hang until the gateway's timeout; then it is excluded.
    for _ in 0..3 {
        let (status, body) = chat(&gateway, Some(hostile_id)).await;
        assert_eq!(status, 502, "{body}");
    }
    assert_eq!(hostile.calls.load(Ordering::SeqCst), 3);
    let (status, body) = chat(&gateway, Some(hostile_id)).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("excluded"),
        "{body}"
    );
    let view = peers(&gateway).await;
    let seen = view["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == hostile_id.to_string())
        .unwrap()
        .clone();
    assert_eq!(seen["reputation"]["failed"], 3, "{seen}");
    assert!(
        seen["reputation"]["excluded_until_ms"].as_u64().is_some(),
        "{seen}"
    );
    // Unpinned jobs, however good its heartbeats look, do not reach it any more.
    for _ in 0..2 {
        let (status, body) = chat(&gateway, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["metainf"]["host"], gateway.peer.to_string());
    }
    assert_eq!(hostile.calls.load(Ordering::SeqCst), 3);

    // The same peer floods the gateway with job calls: peers share half of its 8-sequence
    // queue, so of 12 two-prompt calls at once at most two run and the rest are told busy...
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let client = hostile.client.clone();
            let host = gateway.peer;
            tokio::spawn(async move { client.call_job(host, job_call(2), None).await })
        })
        .collect();
    // ...while the gateway's own API client is served.
    let (status, body) = chat(&gateway, None).await;
    assert_eq!(status, 200, "{body}");
    let mut done = 0;
    let mut busy = 0;
    for call in calls {
        match call.await.unwrap().unwrap() {
            JobReply::Done(_) => done += 1,
            JobReply::Busy { .. } => busy += 1,
            other => panic!("unexpected answer to a flood call: {other:?}"),
        }
    }
    assert!(done >= 1 && busy >= 8, "done {done}, busy {busy}");
    // A call larger than the peers' whole share runs alone: told busy while another peer job
    // runs here, taken once the host holds none.
    let running = {
        let client = hostile.client.clone();
        let host = gateway.peer;
        tokio::spawn(async move { client.call_job(host, job_call(2), None).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    match hostile
        .client
        .call_job(gateway.peer, job_call(5), None)
        .await
        .unwrap()
    {
        JobReply::Busy { .. } => {}
        other => panic!("expected busy, got {other:?}"),
    }
    assert!(matches!(running.await.unwrap().unwrap(), JobReply::Done(_)));
    match hostile
        .client
        .call_job(gateway.peer, job_call(5), None)
        .await
        .unwrap()
    {
        JobReply::Done(result) => assert_eq!(result.completions.len(), 5),
        other => panic!("expected it to run alone, got {other:?}"),
    }
    hostile.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_with_an_allowlist_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let friend = Keypair::generate_ed25519().public().to_peer_id();
    let host = InProc::start(
        dir.path().join("host"),
        &format!("accept_jobs_from = \"allowlist\"\npeer_allowlist = [\"{friend}\"]"),
    )
    .await;
    let stranger = Hostile::start(&host.p2p).await;
    let reply = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match stranger.client.call_job(host.peer, job_call(1), None).await {
                Ok(reply) => break reply,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot reach the host: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    };
    match reply {
        JobReply::Rejected(reason) => assert!(reason.contains("allowlist"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Its own API still runs jobs here (pinned: the stranger's heartbeats claim a faster,
    // free host, and routing to it is another test's subject).
    let (status, body) = chat(&host, Some(host.peer)).await;
    assert_eq!(status, 200, "{body}");
    stranger.stop().await;
    host.stop().await;
}
