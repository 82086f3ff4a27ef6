//! The `metainf-node` binary end to end: run and stop, identity, configuration precedence,
//! JSON logs, and the tensor commands on real stores.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

mod common;

use common::{bin, run_ok};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metainf_node::store::Store;
use metainf_protocol::{Keypair, fixtures};

/// A running node, killed when dropped: a failing test leaves no process behind (one that
/// did once held the default API port of the next run).
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `run` and waits for the "node running" log line; returns the node and the lines.
fn start(data_dir: &Path, extra: &[&str]) -> (Running, Vec<String>) {
    let mut child = bin()
        .args(["run", "--data-dir"])
        .arg(data_dir)
        .args(["--no-mdns", "--no-nat"])
        .args(if extra.contains(&"--listen") {
            &[][..]
        } else {
            &["--listen", "/ip4/127.0.0.1/tcp/0"][..]
        })
        // Each node its own API port: tests run side by side.
        .args(["--api-listen", "127.0.0.1:0"])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let done = line.contains("node running");
            lines.push(line);
            if done {
                // Keep draining in the background so the child never blocks on stderr.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return (Running(child), lines);
            }
        }
    }
    let _ = child.kill();
    panic!("node did not start: {lines:?}");
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "node did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_logs_peer_id_stops_cleanly_and_keeps_its_identity() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let (mut child, lines) = start(&data, &[]);
    let id_out = run_ok(bin().args(["id", "--data-dir"]).arg(&data));
    let peer_id = String::from_utf8(id_out.stdout).unwrap().trim().to_owned();
    assert!(peer_id.starts_with("12D3KooW"), "{peer_id}");
    assert!(
        lines.iter().any(|l| l.contains(&peer_id)),
        "the log names the peer id: {lines:?}"
    );
    // While it runs, its store can be inspected but not written by another process.
    let stats = run_ok(
        bin()
            .args(["tensor", "stats", "--json", "--data-dir"])
            .arg(&data),
    );
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["records"], 0);
    let busy = bin()
        .args(["tensor", "import", "/dev/null", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use by another process"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );

    signal(&child, "-TERM");
    assert!(wait_exit(&mut child).success());
    let mode = std::fs::metadata(data.join("identity.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);

    // Restart: same identity; Ctrl-C (SIGINT) also stops it cleanly.
    let (mut child, lines) = start(&data, &["--log-format", "json"]);
    let running = lines.iter().find(|l| l.contains("node running")).unwrap();
    let json: serde_json::Value = serde_json::from_str(running).expect("JSON log line");
    assert_eq!(json["peer_id"], peer_id.as_str());
    assert_eq!(json["level"], "INFO");
    signal(&child, "-INT");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn configuration_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "data_dir = \"/from/file\"\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    let show = |cmd: &mut Command| String::from_utf8(run_ok(cmd).stdout).unwrap();
    let from_file = show(bin().arg("config").arg("--config").arg(&file));
    assert!(
        from_file.contains("data_dir = \"/from/file\""),
        "{from_file}"
    );
    assert!(from_file.contains("format = \"json\""));
    let from_env = show(
        bin()
            .arg("config")
            .env("METAINF_CONFIG", &file)
            .env("METAINF_DATA_DIR", "/from/env"),
    );
    assert!(from_env.contains("data_dir = \"/from/env\""), "{from_env}");
    let from_flag = show(
        bin()
            .args(["config", "--data-dir", "/from/flag", "--log-format", "text"])
            .env("METAINF_CONFIG", &file)
            .env("METAINF_DATA_DIR", "/from/env"),
    );
    assert!(
        from_flag.contains("data_dir = \"/from/flag\""),
        "{from_flag}"
    );
    assert!(from_flag.contains("format = \"text\""));

    std::fs::write(&file, "data_dir = 5\n").unwrap();
    let bad = bin()
        .arg("config")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("node.toml"));
    let help = run_ok(bin().args(["run", "--help"]));
    let help = String::from_utf8(help.stdout).unwrap();
    for option in ["--config", "--data-dir", "--log-format", "METAINF_DATA_DIR"] {
        assert!(help.contains(option), "--help documents {option}");
    }
}

#[test]
fn tensor_export_import_and_stats_between_data_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    {
        let store = Store::open(a.join("store")).unwrap();
        for t in 0..3 {
            let key = Keypair::generate_ed25519();
            let records = (1..=40)
                .map(|s| fixtures::signed(&key, s, s * 3 + t).verify().unwrap())
                .collect();
            store.put(records).unwrap();
        }
    }
    let file = dir.path().join("tensor.jsonl");
    let export = run_ok(
        bin()
            .args(["tensor", "export"])
            .arg(&file)
            .arg("--data-dir")
            .arg(&a),
    );
    assert!(String::from_utf8_lossy(&export.stderr).contains("exported 120 records"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 120);

    // A forged line: a record re-signed by another key but claiming the original origin.
    let mut forged: metainf_protocol::SignedRecord =
        serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let other = Keypair::generate_ed25519();
    forged.record.metrics.wall_time_s /= 2.0;
    forged.record.metrics.throughput_tok_s *= 2.0;
    forged.signer = other.public().encode_protobuf();
    let mut with_bad = text.clone();
    with_bad.push_str(&serde_json::to_string(&forged).unwrap());
    with_bad.push_str("\nnot json at all\n");
    let bad_file = dir.path().join("bad.jsonl");
    std::fs::write(&bad_file, with_bad).unwrap();

    let import = bin()
        .args(["tensor", "import"])
        .arg(&bad_file)
        .arg("--data-dir")
        .arg(&b)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&import.stderr);
    assert_eq!(import.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(":121: rejected: record claims origin"),
        "{stderr}"
    );
    assert!(stderr.contains(":122: not a signed record"), "{stderr}");
    assert!(stderr.contains("imported 120 new records"), "{stderr}");

    let stats = |data: &Path| -> serde_json::Value {
        let out = run_ok(
            bin()
                .args(["tensor", "stats", "--json", "--data-dir"])
                .arg(data),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (sa, sb) = (stats(&a), stats(&b));
    for field in [
        "records",
        "origins",
        "hardware",
        "workloads",
        "methods",
        "cells",
    ] {
        assert_eq!(sa[field], sb[field], "{field}");
    }
    assert_eq!(sb["records"], 120);
    assert_eq!(sb["origins"], 3);
    let table = run_ok(bin().args(["tensor", "stats", "--data-dir"]).arg(&b));
    assert!(String::from_utf8_lossy(&table.stdout).contains("records"));

    // Stats on a directory without a store: a clear error.
    let missing = bin()
        .args(["tensor", "stats", "--data-dir"])
        .arg(dir.path().join("nothing"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no store at"));
}

#[test]
fn two_nodes_find_each_other_and_peers_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let a_id = String::from_utf8(run_ok(bin().args(["id", "--data-dir"]).arg(&a)).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a_addr = format!("/ip4/127.0.0.1/tcp/{port}");
    let (mut node_a, _) = start(&a, &["--listen", &a_addr, "--price-per-hour", "0.25"]);
    let bootstrap = format!("{a_addr}/p2p/{a_id}");
    let (mut node_b, _) = start(&b, &["--bootstrap", &bootstrap]);
    let b_id = String::from_utf8(run_ok(bin().args(["id", "--data-dir"]).arg(&b)).stdout)
        .unwrap()
        .trim()
        .to_owned();

    // Each lists the other, alive, with its heartbeat (read from the store, beside the node).
    let deadline = Instant::now() + Duration::from_secs(30);
    for (data, other, price) in [(&a, &b_id, 0.0), (&b, &a_id, 0.25)] {
        loop {
            let out = run_ok(bin().args(["peers", "--json", "--data-dir"]).arg(data));
            let peers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let found = peers
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["peer"] == other.as_str());
            if let Some(p) = found
                && p["alive"] == true
            {
                assert_eq!(p["heartbeat"]["price_per_hour"], price);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{other} not listed by {data:?}: {peers}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let table = run_ok(bin().args(["peers", "--data-dir"]).arg(&a));
    assert!(String::from_utf8_lossy(&table.stdout).contains(&b_id));
    for child in [&mut node_a, &mut node_b] {
        signal(child, "-TERM");
        assert!(wait_exit(child).success());
    }
}

#[test]
fn profile_reports_the_cpu_with_its_thread_limit() {
    let out = run_ok(bin().args(["profile", "--json", "--threads", "1"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["profile"]["spec"]["compute_units"], 1);
    assert!(v["profile"]["measured"]["matmul_gflops"].as_f64().unwrap() > 0.0);
    assert_eq!(v["hardware_id"].as_str().unwrap().len(), 64);
    let text = run_ok(bin().args(["profile", "--threads", "1"]));
    assert!(String::from_utf8_lossy(&text.stdout).contains("GFLOP/s"));
}
