//! The network at scale, on one machine over loopback TCP: N nodes (default 50), each with its
//! own RocksDB store and swarm, in one process.
//!
//! - propagation: a record published on one node, time until every node has stored it
//!   (p50/p99 over R records, default 100);
//! - traffic: bytes sent on the loopback interface per record per node (TCP/IP included), with
//!   the idle traffic (heartbeats, gossip control) measured first and subtracted;
//! - catch-up: a new node joins a node holding C records (default 100,000) and pulls them all;
//! - flood: one peer gossips valid records of many origins (1,000 identities) and heartbeats to
//!   a node at 2,000, 5,000 and 10,000 messages a second; the node's loop is asked a command
//!   every 5 ms meanwhile (round-trip p50/p99/max), and the records stored by the end of the
//!   flood and after it are counted.
//!
//! - idle: per-node idle traffic of 50, 100 and 200 hosts announcing a model and a cache
//!   summary, with the fixed 5 s heartbeat interval and with the interval that grows with the
//!   network (`heartbeat_budget_per_s` = 2): loopback bytes sent per second per node, and the
//!   heartbeats each node received per second, and the connections each node holds; every
//!   node keeps at most `max_peers` peers (`METAINF_BENCH_MAX_PEERS`, default 32, 0 = no limit:
//!   without a limit 200 nodes on one loopback hold ~40,000 sockets, past a 20,000 open-file
//!   limit).
//!
//! Run: `cargo bench --profile dev --workspace --bench network`
//! (`METAINF_BENCH_NODES`, `METAINF_BENCH_RECORDS`, `METAINF_BENCH_CATCHUP` override the sizes;
//! `METAINF_BENCH_ONLY=flood` or `=idle` runs only that part; `METAINF_BENCH_IDLE_S` sets the
//! idle window (default 40 s, at least two heartbeat intervals), after at least
//! `METAINF_BENCH_SETTLE_S` (default 40 s) to settle and then until no connection is opened
//! (fewer than 0.5 per node per minute) and two windows of an interval agree within 15 % (at
//! most `METAINF_BENCH_SETTLE_MAX_S`, 900 s); the window's connection churn and what drives it
//! (trims, state queries, sync requests, Kademlia bootstraps) are printed from the transport's
//! counters; `METAINF_BENCH_IDLE_FIXED=1` measures the fixed interval at 50
//! and 100 nodes instead of the growing one at 50, 100 and 200; `METAINF_BENCH_IDLE_SIZES=100,200`
//! keeps only those sizes).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use metainf_node::net::{self, Client, NetworkConfig, Topic};
use metainf_node::replica::{Replica, route_events};
use metainf_node::store::Store;
use metainf_protocol::{Keypair, VerifiedRecord, codec, fixtures};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Bench {
    client: Client,
    store: Store,
    addr: libp2p::Multiaddr,
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loopback_tx_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|rest| rest.split_whitespace().nth(8))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn start(
    dir: &std::path::Path,
    bootstrap: Vec<libp2p::Multiaddr>,
    token: &CancellationToken,
) -> Bench {
    start_with(dir, bootstrap, token, |_| {}).await
}

async fn start_with(
    dir: &std::path::Path,
    bootstrap: Vec<libp2p::Multiaddr>,
    token: &CancellationToken,
    tweak: impl FnOnce(&mut NetworkConfig),
) -> Bench {
    let store = Store::open(dir.join("store")).unwrap();
    let mut config = NetworkConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        mdns: false,
        nat: false,
        heartbeat_interval_s: 5,
        anti_entropy_interval_s: 3600,
        ..NetworkConfig::default()
    };
    tweak(&mut config);
    let hardware = fixtures::cpu_hardware(1);
    let key = Keypair::generate_ed25519();
    let (client, event_loop, events) = net::start(key, hardware, config).unwrap();
    tokio::spawn(event_loop.run(token.clone()));
    let replica = Replica::start(store.clone(), client.clone(), TaskTracker::new());
    tokio::spawn(route_events(events, replica, None));
    let addr = loop {
        if let Some(a) = client.listen_addrs().await.unwrap().into_iter().next() {
            break a.with(libp2p::multiaddr::Protocol::P2p(client.peer_id()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Bench {
        client,
        store,
        addr,
    }
}

fn make_records(per_origin: u64, origins: u64) -> Vec<VerifiedRecord> {
    let keys: Vec<Keypair> = (0..origins).map(|_| Keypair::generate_ed25519()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .chunks(origins.div_ceil(2) as usize)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .flat_map(|k| {
                            (1..=per_origin)
                                .map(move |seq| fixtures::signed(k, seq, seq).verify().unwrap())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

async fn propagation(n: usize, records: usize) {
    let dir = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let mut nodes: Vec<Bench> = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        // Each node dials up to three earlier nodes: a connected, irregular graph.
        let mut boot: Vec<_> = [i.wrapping_sub(1), i / 2, i / 3]
            .into_iter()
            .filter(|&j| j < i)
            .map(|j| nodes[j].addr.clone())
            .collect();
        boot.dedup();
        nodes.push(start(&dir.path().join(format!("n{i}")), boot, &token).await);
    }
    let up = started.elapsed();
    // Let connections, subscriptions and the gossip mesh settle.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut degrees = Vec::new();
    for node in &nodes {
        let peers = node.client.peers().await.unwrap();
        degrees.push(peers.iter().filter(|p| p.connected).count());
    }
    println!(
        "{n} nodes up in {:.1} s; connections per node: min {} / max {}",
        up.as_secs_f64(),
        degrees.iter().min().unwrap(),
        degrees.iter().max().unwrap()
    );

    let idle_window = Duration::from_secs(5);
    let before = loopback_tx_bytes();
    tokio::time::sleep(idle_window).await;
    let idle_rate = (loopback_tx_bytes() - before) as f64 / idle_window.as_secs_f64();

    let maker = Keypair::generate_ed25519();
    let origin = maker.public().to_peer_id();
    let mut latencies = Vec::with_capacity(records);
    let bytes_before = loopback_tx_bytes();
    let window = Instant::now();
    for r in 0..records {
        let seq = r as u64 + 1;
        let record = fixtures::signed(&maker, seq, seq).verify().unwrap();
        let publisher = &nodes[r * 7 % n];
        let t0 = Instant::now();
        publisher
            .store
            .put_async(vec![record.clone()])
            .await
            .unwrap();
        publisher.client.gossip(&record).await.unwrap();
        let deadline = t0 + Duration::from_secs(30);
        let mut missing: Vec<usize> = (0..n).collect();
        while !missing.is_empty() {
            missing.retain(|&i| {
                nodes[i]
                    .store
                    .get_by_origin(&origin, seq)
                    .unwrap()
                    .is_none()
            });
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "record {seq} did not reach {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(t0.elapsed());
    }
    let elapsed = window.elapsed().as_secs_f64();
    let sent = (loopback_tx_bytes() - bytes_before) as f64 - idle_rate * elapsed;
    latencies.sort();
    println!(
        "propagation to all {n} nodes over {records} records: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "traffic: {:.0} bytes per record per node (idle traffic {:.0} B/s for the whole network subtracted; record is {} bytes)",
        sent / (records * n) as f64,
        idle_rate,
        fixtures::signed(&maker, 1, 1).to_wire().unwrap().len()
    );
    token.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Per-node idle traffic of a network of `n` hosts, each offering a model with a cache summary
/// in its heartbeats: loopback bytes sent per second over a window, divided by `n`, and the
/// heartbeats each node received per second. `budget_per_s` 0 is the fixed 5 s interval.
async fn idle(n: usize, budget_per_s: f64, window: Duration, max_peers: u32) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let mut nodes: Vec<Bench> = Vec::with_capacity(n);
    let mut offers = Vec::with_capacity(n);
    for i in 0..n {
        let boot: Vec<_> = [i.wrapping_sub(1), i / 2]
            .into_iter()
            .filter(|&j| j < i)
            .map(|j| nodes[j].addr.clone())
            .collect();
        let node = start_with(&dir.path().join(format!("n{i}")), boot, &token, |c| {
            c.heartbeat_budget_per_s = budget_per_s;
            c.max_peers = max_peers;
        })
        .await;
        let blocks: Vec<_> = (0..300u32)
            .map(|b| metainf_protocol::cache::chain_hash(None, &[i as u32, b]))
            .collect();
        let (tx, rx) = tokio::sync::watch::channel(net::Offer {
            models: vec![fixtures::smollm2()],
            queue_depth: 0,
            running_jobs: 0,
            queue_capacity: 64,
            load: None,
            cache: Some(std::sync::Arc::new(metainf_protocol::CacheSummary::new(
                "SmolLM2-135M-Instruct",
                16,
                &blocks,
            ))),
        });
        node.client.set_offer(rx).await.unwrap();
        offers.push(tx);
        nodes.push(node);
    }
    // Connections, subscriptions, the mesh and every node's interval settle: at least
    // `METAINF_BENCH_SETTLE_S`, then until two windows of one heartbeat interval (at least
    // 20 s) in a row send within 15 % of each other (Kademlia's start-up walks at 200 nodes
    // take minutes on 2 cores), at most `METAINF_BENCH_SETTLE_MAX_S`.
    let settle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(env("METAINF_BENCH_SETTLE_S", 40) as u64)).await;
    let settle_max = Duration::from_secs(env("METAINF_BENCH_SETTLE_MAX_S", 900) as u64);
    // Nodes started together announce in phase: a window shorter than the interval sees a
    // burst or a gap. Windows span whole intervals.
    let interval_s = if budget_per_s > 0.0 {
        (n as f64 / budget_per_s).max(5.0)
    } else {
        5.0
    };
    let probe = Duration::from_secs_f64(interval_s.max(20.0));
    let window = window.max(Duration::from_secs_f64(2.0 * interval_s));
    let mut last = f64::NAN;
    loop {
        let before = loopback_tx_bytes();
        let counted_before = counted(&nodes).await;
        tokio::time::sleep(probe).await;
        let rate = (loopback_tx_bytes() - before) as f64 / probe.as_secs_f64();
        let churn = Churn::between(&counted_before, &counted(&nodes).await, probe, n);
        // Settled: no connection churn left (the start-up's Kademlia walks and the trims
        // they cause die out over minutes at 200 nodes, and two windows of a decaying tail
        // can agree within 15 %), and two windows that agree.
        let settled = churn.get("connections_opened") < 0.5 && (rate - last).abs() <= 0.15 * last;
        eprintln!(
            "idle {n}: {:.0} s in, {:.0} B/s per node, {churn}{}",
            settle_started.elapsed().as_secs_f64(),
            rate / n as f64,
            if settled { " (settled)" } else { "" }
        );
        if settled || settle_started.elapsed() >= settle_max {
            break;
        }
        last = rate;
    }
    let before = loopback_tx_bytes();
    let counted_before = counted(&nodes).await;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = t0.elapsed();
    let per_node = (loopback_tx_bytes() - before) as f64 / elapsed.as_secs_f64() / n as f64;
    let churn = Churn::between(&counted_before, &counted(&nodes).await, elapsed, n);
    let beats = churn.get("heartbeats_received") / 60.0;
    // What the window's traffic was besides heartbeats: connection churn (each new connection
    // costs a handshake, identify, a sync summary and a state answer) and what drives it.
    eprintln!("idle {n}: the window: {churn}");
    let mut connections = 0usize;
    for b in &nodes {
        let peers = b.client.peers().await.unwrap_or_default();
        connections += peers.iter().filter(|p| p.connected).count();
    }
    token.cancel();
    drop(offers);
    tokio::time::sleep(Duration::from_millis(500)).await;
    (per_node, beats, connections as f64 / n as f64)
}

/// What the nodes' transports did over a window, per node per minute, by counter.
struct Churn([(&'static str, f64); 9]);

impl Churn {
    fn between(before: &[u64; 9], after: &[u64; 9], window: Duration, n: usize) -> Self {
        let names = net::NetCounters::default().named();
        Self(std::array::from_fn(|i| {
            let d = after[i].saturating_sub(before[i]);
            (
                names[i].0,
                d as f64 * 60.0 / window.as_secs_f64() / n as f64,
            )
        }))
    }

    fn get(&self, name: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, v)| *v)
    }
}

impl std::fmt::Display for Churn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "per node per minute:")?;
        for (name, v) in &self.0 {
            write!(f, " {name} {v:.2}")?;
        }
        Ok(())
    }
}

/// The transport counters of every node, summed (in the order of `NetCounters::named`).
async fn counted(nodes: &[Bench]) -> [u64; 9] {
    let mut total = [0u64; 9];
    for b in nodes {
        let c = b.client.counters().await.unwrap_or_default();
        for (t, (_, v)) in total.iter_mut().zip(c.named()) {
            *t += v;
        }
    }
    total
}

async fn catch_up(count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let origins = 10u64;
    let per_origin = (count as u64).div_ceil(origins);
    let t = Instant::now();
    let records = make_records(per_origin, origins);
    let total = records.len() as u64;
    println!(
        "signed {total} records in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let seed = start(&dir.path().join("seed"), vec![], &token).await;
    for chunk in records.chunks(10_000) {
        seed.store.put(chunk.to_vec()).unwrap();
    }
    drop(records);
    let t0 = Instant::now();
    let newcomer = start(&dir.path().join("new"), vec![seed.addr.clone()], &token).await;
    loop {
        let have: u64 = newcomer.store.version_vector().unwrap().values().sum();
        if have >= total {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "catch-up stalled at {have}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "catch-up: a new node pulled and verified {total} records in {secs:.1} s ({:.0} records/s)",
        total as f64 / secs
    );
    token.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// One peer floods `target` with `rate` messages a second for `seconds`: records of `origins`
/// identities, and one heartbeat in every 20 messages.
async fn flood(rate: usize, origins: u64, seconds: u64) {
    let dir = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let target = start(&dir.path().join("target"), vec![], &token).await;
    let flooder = start(
        &dir.path().join("flooder"),
        vec![target.addr.clone()],
        &token,
    )
    .await;
    let total = rate as u64 * seconds;
    let records = make_records(total.div_ceil(origins), origins);
    let wires: Vec<Vec<u8>> = records
        .iter()
        .map(|r| r.signed().to_wire().unwrap())
        .collect();
    // Wait for the mesh.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = records[0].clone();
    while target
        .store
        .get_by_origin(&first.origin(), first.seq())
        .unwrap()
        .is_none()
    {
        let _ = flooder.client.publish_bytes(wires[0].clone()).await;
        assert!(Instant::now() < deadline, "no mesh");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let me = flooder.client.peer_id();
    let sender = flooder.client.clone();
    let per_tick = rate / 100;
    let wires_sent = wires.clone();
    let flood = tokio::spawn(async move {
        let start = Instant::now();
        let (mut sent, mut records_sent) = (0usize, 1u64);
        for (tick, chunk) in wires_sent[1..].chunks(per_tick.max(1)).enumerate() {
            for (i, w) in chunk.iter().enumerate() {
                if i % 20 == 19 {
                    let beat = fixtures::heartbeat(me, metainf_node::clock::now_ms() + sent as u64);
                    let _ = sender
                        .publish_raw(Topic::Heartbeats, codec::encode(&beat).unwrap())
                        .await;
                } else {
                    let _ = sender.publish_bytes(w.clone()).await;
                    records_sent += 1;
                }
                sent += 1;
            }
            let next = start + Duration::from_millis(10 * (tick as u64 + 1));
            tokio::time::sleep_until(next.into()).await;
        }
        (sent, records_sent, start.elapsed())
    });
    let mut latencies = Vec::new();
    while !flood.is_finished() {
        let t0 = Instant::now();
        target.client.listen_addrs().await.unwrap();
        latencies.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (sent, expected, took) = flood.await.unwrap();
    let stored = |store: &Store| -> u64 { store.stats().unwrap().records };
    let during = stored(&target.store);
    let settle = Instant::now();
    while stored(&target.store) < expected && settle.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    println!(
        "flood {rate}/s ({origins} origins, {sent} messages in {:.1} s): loop round trip p50 {:?} p99 {:?} max {:?} ({} samples); records stored {during} by the end, {} of {expected} after {:.1} s more",
        took.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        latencies.len(),
        stored(&target.store),
        settle.elapsed().as_secs_f64()
    );
    token.cancel();
}

fn main() {
    // `RUST_LOG=metainf_node=debug` shows what the nodes do (to stderr).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let n = env("METAINF_BENCH_NODES", 50);
    let records = env("METAINF_BENCH_RECORDS", 100);
    let catchup = env("METAINF_BENCH_CATCHUP", 100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::var("METAINF_BENCH_ONLY").unwrap_or_default();
    runtime.block_on(async {
        if only.is_empty() {
            propagation(n, records).await;
            catch_up(catchup).await;
        }
        if only.is_empty() || only == "idle" {
            let window = Duration::from_secs(env("METAINF_BENCH_IDLE_S", 40) as u64);
            let mut sizes: Vec<(usize, f64)> = match std::env::var("METAINF_BENCH_IDLE_FIXED") {
                Ok(_) => vec![(50, 0.0), (100, 0.0)],
                Err(_) => vec![(50, 2.0), (100, 2.0), (200, 2.0)],
            };
            if let Ok(only) = std::env::var("METAINF_BENCH_IDLE_SIZES") {
                let keep: Vec<usize> = only.split(',').filter_map(|n| n.trim().parse().ok()).collect();
                sizes.retain(|(n, _)| keep.contains(n));
            }
            let max_peers = env("METAINF_BENCH_MAX_PEERS", 32) as u32;
            for (n, budget) in sizes {
                let (bytes, beats, conns) = idle(n, budget, window, max_peers).await;
                let mode = if budget > 0.0 {
                    "interval max(5 s, N / 2 per s)"
                } else {
                    "fixed 5 s interval"
                };
                println!(
                    "idle, {n} nodes, {mode}, max_peers {max_peers}: {:.0} B/s sent per node, {beats:.2} heartbeats/s received per node, {conns:.1} connections per node",
                    bytes
                );
            }
        }
        if only.is_empty() || only == "flood" {
            for rate in [2_000, 5_000, 10_000] {
                flood(rate, 1_000, 3).await;
            }
        }
    });
}
