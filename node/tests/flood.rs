//! The swarm loop does no disk I/O: while a peer floods a node with valid records (2,000 a
//! second, each to be verified and stored) and heartbeats, the node's loop still answers its
//! own commands at once, and every record ends up stored.
//!
//! Alone in its own test binary so that no other test competes for the two cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use metainf_node::net::{self, Client, NetworkConfig, Topic};
use metainf_node::replica::{Replica, route_events};
use metainf_node::store::Store;
use metainf_protocol::{Keypair, codec, fixtures};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

async fn node(
    dir: &std::path::Path,
    bootstrap: Vec<libp2p::Multiaddr>,
    tasks: &TaskTracker,
    token: &CancellationToken,
) -> (Client, Store, libp2p::Multiaddr) {
    let store = Store::open(dir).unwrap();
    let config = NetworkConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        mdns: false,
        nat: false,
        heartbeat_interval_s: 1,
        anti_entropy_interval_s: 3600,
        ..NetworkConfig::default()
    };
    let key = Keypair::generate_ed25519();
    let (client, event_loop, events) = net::start(key, fixtures::cpu_hardware(1), config).unwrap();
    tasks.spawn(event_loop.run(token.clone()));
    let replica = Replica::start(store.clone(), client.clone(), tasks.clone());
    tasks.spawn(route_events(events, replica, None));
    let addr = loop {
        if let Some(a) = client.listen_addrs().await.unwrap().into_iter().next() {
            break a.with(libp2p::multiaddr::Protocol::P2p(client.peer_id()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    (client, store, addr)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_node_answers_commands_within_50_ms() {
    const RATE: u64 = 2_000;
    const SECONDS: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (target, target_store, addr) =
        node(&dir.path().join("target"), vec![], &tasks, &token).await;
    let (flooder, _, _) = node(&dir.path().join("flooder"), vec![addr], &tasks, &token).await;

    // Valid records of one maker, signed beforehand so the flooder only sends.
    let maker = Keypair::generate_ed25519();
    let origin = maker.public().to_peer_id();
    let total = RATE * SECONDS;
    let wires: Vec<Vec<u8>> = (1..=total)
        .map(|seq| fixtures::signed(&maker, seq, seq).to_wire().unwrap())
        .collect();
    // Wait for the mesh: a first record arrives.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = flooder.publish_bytes(wires[0].clone()).await;
        if target_store.get_by_origin(&origin, 1).unwrap().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two nodes never formed a mesh"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let flood = {
        let flooder = flooder.clone();
        let wires = wires.clone();
        let me = flooder.peer_id();
        tokio::spawn(async move {
            let start = Instant::now();
            // 20 records and one heartbeat every 10 ms.
            for (tick, chunk) in wires[1..].chunks((RATE / 100) as usize).enumerate() {
                for w in chunk {
                    flooder.publish_bytes(w.clone()).await.unwrap();
                }
                let heartbeat =
                    fixtures::heartbeat(me, metainf_node::clock::now_ms() + tick as u64);
                let _ = flooder
                    .publish_raw(Topic::Heartbeats, codec::encode(&heartbeat).unwrap())
                    .await;
                let next = start + Duration::from_millis(10 * (tick as u64 + 1));
                tokio::time::sleep_until(next.into()).await;
            }
        })
    };

    // Round trips through the target's loop while the flood lasts.
    let mut latencies = Vec::new();
    while !flood.is_finished() {
        let t0 = Instant::now();
        target.listen_addrs().await.unwrap();
        latencies.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    flood.await.unwrap();
    let stored_during_flood = target_store.origin_state(&origin).unwrap().contiguous;

    // Everything arrives and is stored.
    let deadline = Instant::now() + Duration::from_secs(60);
    while target_store.origin_state(&origin).unwrap().contiguous < total {
        assert!(
            Instant::now() < deadline,
            "stored {} of {total} records",
            target_store.origin_state(&origin).unwrap().contiguous
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    let p50 = percentile(&latencies, 0.5);
    let p99 = percentile(&latencies, 0.99);
    eprintln!(
        "{} round trips during the flood: p50 {p50:?}, p99 {p99:?}, max {:?}; {stored_during_flood} records stored by its end",
        latencies.len(),
        latencies.last().unwrap()
    );
    assert!(
        latencies.len() > 100,
        "too few samples: {}",
        latencies.len()
    );
    assert!(
        stored_during_flood > total / 2,
        "the node fell behind: {stored_during_flood} of {total} stored while the flood lasted"
    );
    assert!(
        p99 < Duration::from_millis(50),
        "command round trip p99 {p99:?}"
    );
    token.cancel();
    tasks.close();
    tasks.wait().await;
}
