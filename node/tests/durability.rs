//! Acknowledged writes survive SIGKILL: a child process writes records from several threads and
//! prints each acknowledgement; the parent kills it mid-stream with SIGKILL, reopens the store
//! and checks that every acknowledged record is there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use metainf_node::store::{PutOutcome, Store};
use metainf_protocol::{Keypair, PeerId, fixtures};

const CHILD_ENV: &str = "METAINF_DURABILITY_CHILD_DIR";

/// Run by the parent test as a child process; does nothing otherwise.
#[test]
#[ignore = "helper process for kill_9_loses_no_acknowledged_record"]
fn durability_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(&dir).unwrap();
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let key = Keypair::generate_ed25519();
                let origin = key.public().to_peer_id();
                let mut seq = 1;
                loop {
                    // Batches of 1 to 32 records, so group commits mix sizes.
                    let n = 1 + (seq * 7 + t) % 32;
                    let batch: Vec<_> = (seq..seq + n)
                        .map(|s| fixtures::signed(&key, s, s + t).verify().unwrap())
                        .collect();
                    let out = store.put(batch).unwrap();
                    assert!(out.iter().all(|o| *o == PutOutcome::Stored));
                    let mut stdout = std::io::stdout().lock();
                    for s in seq..seq + n {
                        writeln!(stdout, "ack {origin} {s}").unwrap();
                    }
                    stdout.flush().unwrap();
                    seq += n;
                }
            })
        })
        .collect();
    // The writers loop until the parent kills this process.
    for w in writers {
        let _ = w.join();
    }
}

#[test]
fn kill_9_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "durability_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut acked: Vec<(PeerId, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < 4000 && Instant::now() < deadline {
        let Some(line) = lines.next() else { break };
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("ack ") {
            let (origin, seq) = rest.split_once(' ').unwrap();
            acked.push((origin.parse().unwrap(), seq.parse().unwrap()));
        }
    }
    // SIGKILL while the writers are still going.
    child.kill().unwrap();
    // Acknowledgements printed before the kill are still in the pipe: they count too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some((origin, seq)) = line.strip_prefix("ack ").and_then(|r| r.split_once(' '))
            && let (Ok(o), Ok(s)) = (origin.parse(), seq.parse())
        {
            acked.push((o, s));
        }
    }
    let status = child.wait().unwrap();
    eprintln!("{} acknowledged records before SIGKILL", acked.len());
    assert!(!status.success(), "the child was killed, not finished");
    assert!(
        acked.len() >= 4000,
        "only {} acknowledgements before the deadline",
        acked.len()
    );

    let store = Store::open(&path).unwrap();
    let vv = store.version_vector().unwrap();
    for (origin, seq) in &acked {
        let rec = store.get_by_origin(origin, *seq).unwrap();
        let rec = rec.unwrap_or_else(|| panic!("acknowledged record {origin}/{seq} is lost"));
        rec.verify().unwrap();
        assert!(
            vv[origin] >= *seq,
            "version vector is behind an acknowledged record"
        );
    }
    let stats = store.stats().unwrap();
    assert_eq!(stats.corrupt, 0);
    assert!(stats.records >= acked.len() as u64);
}
