//! The network at scale, on one machine over loopback TCP: N nodes (default 50), each with its
//! own RocksDB store and swarm, in one process.
//!
//! - propagation: a record published on one node, time until every node has stored it
//!   (p50/p99 over R records, default 100);
//! - traffic: bytes sent on the loopback interface per record per node (TCP/IP included), with
//!   the idle traffic (heartbeats, gossip control) measured first and subtracted;
//! - catch-up: a new node joins a node holding C records (default 100,000) and pulls them all.
//!
//! Run: `cargo bench --profile dev -p metainf-node --bench network`
//! (`METAINF_BENCH_NODES`, `METAINF_BENCH_RECORDS`, `METAINF_BENCH_CATCHUP` override the sizes).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use metainf_node::net::{self, Client, NetworkConfig};
use metainf_node::replica::{Replica, route_events};
use metainf_node::store::Store;
use metainf_protocol::{Keypair, VerifiedRecord, fixtures};
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
    let store = Store::open(dir.join("store")).unwrap();
    let config = NetworkConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        mdns: false,
        nat: false,
        heartbeat_interval_s: 5,
        anti_entropy_interval_s: 3600,
        ..NetworkConfig::default()
    };
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

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let n = env("METAINF_BENCH_NODES", 50);
    let records = env("METAINF_BENCH_RECORDS", 100);
    let catchup = env("METAINF_BENCH_CATCHUP", 100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        propagation(n, records).await;
        catch_up(catchup).await;
    });
}
