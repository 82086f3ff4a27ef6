//! A whole node in the test process: `Node::start` binds port 0 and reports what it bound,
//! serves, and on shutdown stops every task and thread it started (the store's lock is free
//! again); a start that cannot bind fails with a clear error and leaves nothing running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use metainf_node::{Config, Node, Store};
use tokio_util::sync::CancellationToken;

/// A node on loopback port 0, serving no model (it routes only), without mDNS or NAT.
fn config(dir: &Path, api: &str) -> Config {
    let mut c = Config {
        data_dir: Some(dir.to_owned()),
        ..Config::default()
    };
    c.api.listen = api.parse().unwrap();
    c.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.network.mdns = false;
    c.network.nat = false;
    c.engine.models = vec![dir.join("no-such-model.gguf")];
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_on_port_0_reports_its_addresses_and_stops_whole() {
    let dir = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let node = Node::open(&config(dir.path(), "127.0.0.1:0")).unwrap();
    let peer = node.peer_id();
    let running = node.start(token.clone()).await.unwrap();
    let api = running.api_addr().expect("the API is on");
    assert_ne!(
        api.port(),
        0,
        "the bound port is reported, not the configured 0"
    );
    let addrs = running.listen_addrs();
    assert!(
        !addrs.is_empty(),
        "the swarm's bound addresses are reported"
    );
    assert!(
        addrs
            .iter()
            .all(|a| a.to_string().ends_with(&peer.to_string())),
        "{addrs:?}"
    );

    let health: serde_json::Value = reqwest::get(format!("http://{api}/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["peer_id"], peer.to_string());

    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .expect("the node stops")
        .unwrap();
    // Every task and thread that held the store has ended: it opens again at once.
    Store::open(dir.path().join("store")).expect("the store is free after shutdown");
    assert!(
        reqwest::get(format!("http://{api}/healthz")).await.is_err(),
        "the API is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_api_port_is_taken_fails_to_start_and_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let node = Node::open(&config(dir.path(), &addr)).unwrap();
    let err = match node.start(CancellationToken::new()).await {
        Ok(_) => panic!("started on a port in use"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("cannot listen on") && err.contains(&addr),
        "{err}"
    );
    Store::open(dir.path().join("store")).expect("the store is free after a failed start");
}
