//! A full disk: writes fail with a clear error, nothing unacknowledged is reported as stored,
//! and every acknowledged record is still there afterwards.
//!
//! Needs permission to mount a small tmpfs (root, as in CI); elsewhere it says so and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use metainf_node::store::{Store, StoreError};
use metainf_protocol::{Keypair, SignedRecord, fixtures};

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Option<Mount> {
    std::fs::create_dir_all(at).ok()?;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(at.to_owned()))
}

/// A record padded with incompressible attributes (~12 KiB), so the disk fills quickly.
fn big_record(key: &Keypair, seq: u64) -> SignedRecord {
    let mut r = fixtures::record(key, seq, seq);
    let mut state = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in 0..60 {
        let mut value = String::with_capacity(200);
        while value.len() < 200 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            value.push_str(&format!("{state:016x}"));
        }
        value.truncate(200);
        r.hardware.spec.attributes.insert(format!("pad_{i}"), value);
    }
    SignedRecord::sign(r, key).unwrap()
}

#[test]
fn full_disk_fails_writes_clearly_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small-disk");
    let Some(_mount) = mount_tmpfs(&mnt, "16m") else {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs this test as root)");
        return;
    };
    let path = mnt.join("store");
    let key = Keypair::generate_ed25519();
    let origin = key.public().to_peer_id();
    let store = Store::open(&path).unwrap();
    let mut acked = 0u64;
    let mut failure = None;
    for batch in 0..10_000u64 {
        let records = (1..=20)
            .map(|i| big_record(&key, batch * 20 + i).verify().unwrap())
            .collect();
        match store.put(records) {
            Ok(_) => acked += 20,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let err = failure.expect("a 16 MiB disk fills up");
    eprintln!("disk full after {acked} acknowledged records: {err}");
    assert!(matches!(err, StoreError::WriteFailed(_)), "{err}");
    assert!(
        err.to_string().contains("space"),
        "the error says why: {err}"
    );
    assert!(
        acked > 100,
        "some batches were acknowledged before the disk filled"
    );
    // Further writes keep failing cleanly rather than hanging or panicking.
    assert!(
        store
            .put(vec![big_record(&key, acked + 1_000).verify().unwrap()])
            .is_err()
    );
    drop(store);

    // Every acknowledged record is readable from the full disk.
    let reader = Store::open_read_only(&path).unwrap();
    for seq in 1..=acked {
        let rec = reader.get_by_origin(&origin, seq).unwrap();
        assert!(
            rec.is_some(),
            "acknowledged record {seq} of {acked} is lost"
        );
    }
    assert!(reader.version_vector().unwrap()[&origin] >= acked);
}
