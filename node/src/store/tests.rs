use super::*;
use metainf_protocol::fixtures;
use metainf_protocol::{
    CellIds, ContentId, JobId, Keypair, MethodConfig, PeerId, RecordId, VerifiedRecord, codec,
};
use rocksdb::{DB, Options};

fn key(seed: u8) -> Keypair {
    let mut bytes = [seed; 32];
    bytes[31] = 7;
    Keypair::ed25519_from_bytes(bytes).unwrap()
}

fn verified(k: &Keypair, seq: u64, variant: u64) -> VerifiedRecord {
    fixtures::signed(k, seq, variant).verify().unwrap()
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

#[test]
fn put_is_idempotent_and_detects_equivocation() {
    let (_dir, store) = open();
    let k = key(1);
    let a = verified(&k, 1, 0);
    assert_eq!(
        store.put(vec![a.clone()]).unwrap(),
        vec![PutOutcome::Stored]
    );
    assert_eq!(
        store.put(vec![a.clone()]).unwrap(),
        vec![PutOutcome::Duplicate]
    );
    // Same (origin, seq), different content: refused, the first one stays.
    let b = verified(&k, 1, 5);
    assert_eq!(
        store.put(vec![b]).unwrap(),
        vec![PutOutcome::Conflict { existing: a.id() }]
    );
    // Duplicates and conflicts inside one batch.
    let c = verified(&k, 2, 0);
    let c2 = verified(&k, 2, 1);
    assert_eq!(
        store.put(vec![c.clone(), c.clone(), c2]).unwrap(),
        vec![
            PutOutcome::Stored,
            PutOutcome::Duplicate,
            PutOutcome::Conflict { existing: c.id() }
        ]
    );
    assert_eq!(store.stats().unwrap().records, 2);
    assert_eq!(
        store
            .get_by_origin(&k.public().to_peer_id(), 1)
            .unwrap()
            .as_ref(),
        Some(a.signed())
    );
    assert!(
        store
            .get_by_origin(&k.public().to_peer_id(), 3)
            .unwrap()
            .is_none()
    );
}

#[test]
fn queries_match_a_brute_force_filter() {
    let (_dir, store) = open();
    let keys: Vec<Keypair> = (1..=3).map(key).collect();
    let mut all = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let batch: Vec<VerifiedRecord> = (1..=120)
            .map(|seq| verified(k, seq, seq * 7 + i as u64))
            .collect();
        all.extend(batch.iter().cloned());
        store.put(batch).unwrap();
    }
    let cells: Vec<CellIds> = all.iter().map(VerifiedRecord::cell).collect();
    let sample = cells[17];
    let queries = [
        RecordQuery::default(),
        RecordQuery {
            hardware: Some(sample.hardware),
            ..Default::default()
        },
        RecordQuery {
            hardware: Some(sample.hardware),
            model: Some(sample.model),
            workload: Some(sample.workload),
            ..Default::default()
        },
        RecordQuery {
            hardware: Some(sample.hardware),
            method: Some(sample.method),
            ..Default::default()
        },
        RecordQuery {
            model: Some(sample.model),
            ..Default::default()
        },
        RecordQuery {
            workload: Some(sample.workload),
            ..Default::default()
        },
        RecordQuery {
            method: Some(sample.method),
            ..Default::default()
        },
        RecordQuery {
            workload: Some(sample.workload),
            method: Some(sample.method),
            ..Default::default()
        },
    ];
    for q in &queries {
        let mut expected: Vec<RecordId> = all
            .iter()
            .filter(|r| q.matches(&keys::KeyCell::of(&r.cell())))
            .map(VerifiedRecord::id)
            .collect();
        expected.sort();
        let scan = store.query(q).unwrap();
        assert!(scan.corrupt.is_empty());
        let mut got: Vec<RecordId> = scan
            .records
            .iter()
            .map(|r| r.record.id().unwrap())
            .collect();
        got.sort();
        assert!(!expected.is_empty(), "{q:?} selects something");
        assert_eq!(got, expected, "{q:?}");
        let limited = store
            .query(&RecordQuery {
                limit: Some(5),
                ..q.clone()
            })
            .unwrap();
        assert_eq!(limited.records.len(), expected.len().min(5));
    }
    let nothing = RecordQuery {
        method: Some(MethodConfig::baseline().with_flag("nope").id().unwrap()),
        ..Default::default()
    };
    assert!(store.query(&nothing).unwrap().records.is_empty());
}

#[test]
fn version_vector_counts_only_contiguous_seqs_and_pages_resume() {
    let (_dir, store) = open();
    let k = key(2);
    let origin = k.public().to_peer_id();
    store
        .put(vec![
            verified(&k, 1, 0),
            verified(&k, 2, 1),
            verified(&k, 4, 2),
            verified(&k, 6, 3),
        ])
        .unwrap();
    assert_eq!(store.version_vector().unwrap()[&origin], 2);
    let state = store.origin_state(&origin).unwrap();
    assert_eq!((state.contiguous, state.max), (2, 6));
    // The chain covers records 1 and 2, in order.
    let ids = [verified(&k, 1, 0).id(), verified(&k, 2, 1).id()];
    let chain = keys::chain_next(&keys::chain_next(&[0; 32], &ids[0]), &ids[1]);
    assert_eq!(state.chain, chain);
    let stranger = key(99).public().to_peer_id();
    assert_eq!(
        store.origin_state(&stranger).unwrap(),
        OriginState::default()
    );
    assert_eq!(store.origin_states().unwrap()[&origin], state);
    store.put(vec![verified(&k, 3, 4)]).unwrap();
    assert_eq!(store.version_vector().unwrap()[&origin], 4);
    store.put(vec![verified(&k, 5, 5)]).unwrap();
    assert_eq!(store.version_vector().unwrap()[&origin], 6);

    let more: Vec<VerifiedRecord> = (7..=25).map(|s| verified(&k, s, s)).collect();
    store.put(more).unwrap();
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = store.records_after(&origin, after, 10).unwrap();
        seen.extend(page.records.iter().map(|r| r.record.seq));
        match page.next_after {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    assert_eq!(
        store.records_after(&origin, 20, 100).unwrap().records.len(),
        5
    );
    assert!(
        store
            .records_after(&key(9).public().to_peer_id(), 0, 10)
            .unwrap()
            .records
            .is_empty()
    );
}

#[test]
fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let k = key(3);
    let peer = PeerEntry {
        peer: k.public().to_peer_id(),
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        last_seen_ms: 42,
        heartbeat: None,
    };
    {
        let store = Store::open(&path).unwrap();
        store
            .put((1..=50).map(|s| verified(&k, s, s)).collect())
            .unwrap();
        store.put_peer(&peer).unwrap();
        store.put_meta("predictor", b"weights").unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.stats().unwrap().records, 50);
    assert_eq!(store.version_vector().unwrap()[&peer.peer], 50);
    assert_eq!(store.peers().unwrap(), vec![peer]);
    assert_eq!(
        store.meta("predictor").unwrap().as_deref(),
        Some(&b"weights"[..])
    );
    assert_eq!(store.all_hardware().unwrap().len(), 2);
    // Writing after reopen continues the contiguous range from disk.
    store.put(vec![verified(&k, 51, 0)]).unwrap();
    assert_eq!(
        store.version_vector().unwrap()[&k.public().to_peer_id()],
        51
    );
}

#[test]
fn corrupt_values_are_reported_and_skipped() {
    let (_dir, store) = open();
    let k = key(4);
    let good: Vec<VerifiedRecord> = (1..=3).map(|s| verified(&k, s, s)).collect();
    store.put(good.clone()).unwrap();
    let cell = good[0].cell();
    let bogus_key = keys::record_key(&keys::KeyCell::of(&cell), &ContentId([0xab; 32]));
    store
        .raw_put(CF_RECORDS, &bogus_key, b"\x01not a record")
        .unwrap();
    store.raw_put(CF_ORIGINS, b"garbage", b"x").unwrap();

    let scan = store
        .query(&RecordQuery {
            hardware: Some(cell.hardware),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(scan.corrupt.len(), 1);
    assert_eq!(scan.corrupt[0].key, hex::encode(bogus_key));
    assert!(scan.records.iter().all(|r| r.clone().verify().is_ok()));
    let stats = store.stats().unwrap();
    assert_eq!((stats.records, stats.corrupt), (3, 1));
    let mut seen = (0, 0);
    store
        .for_each_record(|r| -> Result<()> {
            match r {
                Ok(_) => seen.0 += 1,
                Err(_) => seen.1 += 1,
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, (3, 1));
    // The garbage origin entry is skipped; the real one is there.
    assert_eq!(store.version_vector().unwrap().len(), 1);
}

#[test]
fn other_schema_versions_and_foreign_databases_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let store = Store::open(&path).unwrap();
        store
            .raw_put(CF_META, META_SCHEMA, &99u32.to_be_bytes())
            .unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(
        err,
        StoreError::SchemaMismatch {
            found: 99,
            expected: SCHEMA_VERSION,
            ..
        }
    ));
    assert!(err.to_string().contains("schema version 99"));
    assert!(matches!(
        Store::open_read_only(&path),
        Err(StoreError::SchemaMismatch { .. })
    ));

    let foreign = dir.path().join("foreign");
    {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, &foreign).unwrap();
        db.put(b"k", b"v").unwrap();
    }
    assert!(matches!(
        Store::open(&foreign),
        Err(StoreError::NotAStore { .. })
    ));
    assert!(matches!(
        Store::open_read_only(dir.path().join("nothing")),
        Err(StoreError::Missing { .. })
    ));
}

#[test]
fn second_writer_is_refused_but_readers_are_welcome() {
    let (dir, store) = open();
    let k = key(5);
    store.put(vec![verified(&k, 1, 0)]).unwrap();
    let path = dir.path().join("store");
    assert!(matches!(Store::open(&path), Err(StoreError::Locked { .. })));
    let reader = Store::open_read_only(&path).unwrap();
    assert_eq!(reader.stats().unwrap().records, 1);
    assert!(matches!(
        reader.put(vec![verified(&k, 2, 0)]),
        Err(StoreError::ReadOnly)
    ));
    assert!(matches!(
        reader.put_meta("x", b"y"),
        Err(StoreError::ReadOnly)
    ));
}

#[test]
fn concurrent_writers_share_commits_and_lose_nothing() {
    let (_dir, store) = open();
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let k = key(10 + t);
                for seq in 1..=100 {
                    let out = store.put(vec![verified(&k, seq, seq)]).unwrap();
                    assert_eq!(out, vec![PutOutcome::Stored]);
                }
                k.public().to_peer_id()
            })
        })
        .collect();
    let origins: Vec<PeerId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let vv = store.version_vector().unwrap();
    for o in origins {
        assert_eq!(vv[&o], 100);
    }
    assert_eq!(store.stats().unwrap().records, 400);
}

#[test]
fn a_corrupt_origin_state_is_rebuilt_and_still_catches_equivocation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let k = key(6);
    let origin = k.public().to_peer_id();
    {
        let store = Store::open(&path).unwrap();
        store
            .put((1..=5).map(|s| verified(&k, s, s)).collect())
            .unwrap();
        store.raw_put(CF_ORIGINS, &origin.to_bytes(), b"x").unwrap();
    }
    let store = Store::open(&path).unwrap();
    let original = verified(&k, 3, 3);
    assert_eq!(
        store.put(vec![verified(&k, 3, 40)]).unwrap(),
        vec![PutOutcome::Conflict {
            existing: original.id()
        }]
    );
    assert_eq!(
        store.put(vec![original]).unwrap(),
        vec![PutOutcome::Duplicate]
    );
    store.put(vec![verified(&k, 6, 6)]).unwrap();
    assert_eq!(store.version_vector().unwrap()[&origin], 6);
    // The rebuilt chain is the one a fresh store computes for the same records.
    let (_d, fresh) = open();
    fresh
        .put((1..=6).map(|s| verified(&k, s, s)).collect())
        .unwrap();
    assert_eq!(
        store.version_chains().unwrap()[&origin],
        fresh.version_chains().unwrap()[&origin]
    );
}

#[test]
fn replicas_with_a_different_record_under_one_seq_have_different_chains() {
    let (_a, a) = open();
    let (_b, b) = open();
    let k = key(8);
    let origin = k.public().to_peer_id();
    a.put((1..=5).map(|s| verified(&k, s, s)).collect())
        .unwrap();
    let mut other: Vec<_> = (1..=5).map(|s| verified(&k, s, s)).collect();
    other[2] = verified(&k, 3, 99);
    b.put(other).unwrap();
    let (va, vb) = (a.version_chains().unwrap(), b.version_chains().unwrap());
    assert_eq!(va[&origin].0, vb[&origin].0);
    assert_ne!(va[&origin].1, vb[&origin].1);
    // An old store's 16-byte states get their chains when it opens.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let store = Store::open(&path).unwrap();
        store
            .put((1..=5).map(|s| verified(&k, s, s)).collect())
            .unwrap();
        let old = keys::encode_origin_state(5, 5, &[0; 32]);
        store
            .raw_put(CF_ORIGINS, &origin.to_bytes(), &old[..16])
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.version_chains().unwrap()[&origin], va[&origin]);
}

#[test]
fn jobs_are_opaque_values_kept_across_reopen_and_forgotten_on_request() {
    // The typed round trip of `JobEntry` is tested in `crate::jobs::state`.
    let dir = tempfile::tempdir().unwrap();
    let id = |n: u8| JobId([n; 16]);
    {
        let store = Store::open(dir.path().join("store")).unwrap();
        for n in 1..=3 {
            store.put_job_raw(&id(n), &[n; 5]).unwrap();
        }
        store.put_job_raw(&id(2), b"replaced").unwrap();
    }
    let store = Store::open(dir.path().join("store")).unwrap();
    assert_eq!(
        store.jobs_raw().unwrap(),
        vec![
            (id(1), vec![1; 5]),
            (id(2), b"replaced".to_vec()),
            (id(3), vec![3; 5]),
        ]
    );
    assert_eq!(store.job_raw(&id(3)).unwrap(), Some(vec![3; 5]));
    assert_eq!(store.stats().unwrap().jobs, 3);
    store.delete_jobs(&[id(1), id(2)]).unwrap();
    assert_eq!(store.jobs_raw().unwrap(), vec![(id(3), vec![3; 5])]);
    assert_eq!(store.job_raw(&id(1)).unwrap(), None);
    // A key that is no job id is skipped.
    store.raw_put(CF_JOBS, b"short", b"x").unwrap();
    assert_eq!(store.jobs_raw().unwrap().len(), 1);
}

#[test]
fn peer_batches_replace_by_peer_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let entry = |seed: u8, seen: u64| PeerEntry {
        peer: key(seed).public().to_peer_id(),
        addrs: vec![format!("/ip4/127.0.0.{seed}/tcp/4001")],
        last_seen_ms: seen,
        heartbeat: None,
    };
    {
        let store = Store::open(&path).unwrap();
        store.put_peers(&[]).unwrap();
        store
            .put_peers(&[entry(1, 1), entry(2, 2), entry(1, 3)])
            .unwrap();
        store.put_peer(&entry(3, 4)).unwrap();
        // The peer table holds exactly what `put_peer` always wrote.
        assert_eq!(
            store
                .db()
                .get_cf(store.cf(CF_PEERS), entry(2, 2).peer.to_bytes())
                .unwrap(),
            Some(codec::encode(&entry(2, 2)).unwrap())
        );
    }
    let store = Store::open(&path).unwrap();
    let mut peers = store.peers().unwrap();
    peers.sort_by_key(|p| p.last_seen_ms);
    assert_eq!(peers, vec![entry(2, 2), entry(1, 3), entry(3, 4)]);
    drop(store);
    let reader = Store::open_read_only(&path).unwrap();
    assert!(matches!(
        reader.put_peers(&[entry(4, 5)]),
        Err(StoreError::ReadOnly)
    ));
    assert!(matches!(
        reader.put_job_raw(&JobId([1; 16]), b"x"),
        Err(StoreError::ReadOnly)
    ));
}

#[tokio::test]
async fn async_small_table_writes_land() {
    let (_dir, store) = open();
    let peer = PeerEntry {
        peer: key(5).public().to_peer_id(),
        addrs: Vec::new(),
        last_seen_ms: 7,
        heartbeat: None,
    };
    store.put_peer_async(peer.clone()).await.unwrap();
    store
        .put_peers_async(vec![PeerEntry {
            last_seen_ms: 8,
            ..peer.clone()
        }])
        .await
        .unwrap();
    assert_eq!(store.peers().unwrap()[0].last_seen_ms, 8);
    store
        .put_meta_async("predictor".into(), b"w".to_vec())
        .await
        .unwrap();
    assert_eq!(store.meta("predictor").unwrap(), Some(b"w".to_vec()));
    store
        .put_job_raw_async(JobId([1; 16]), b"j".to_vec())
        .await
        .unwrap();
    store.delete_jobs_async(vec![JobId([1; 16])]).await.unwrap();
    assert!(store.jobs_raw().unwrap().is_empty());
}

#[test]
fn a_conflict_convicts_its_origin_for_good_and_leaves_others_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (liar, honest) = (key(3), key(4));
    let liar_id = liar.public().to_peer_id();
    let expected_proof;
    {
        let store = Store::open(&path).unwrap();
        let mine: Vec<_> = (1..=5).map(|s| verified(&liar, s, s)).collect();
        store.put(mine).unwrap();
        store
            .put((1..=3).map(|s| verified(&honest, s, s)).collect())
            .unwrap();
        // The second version of seq 4 convicts the liar: proof kept, records gone.
        let report = store
            .put_convicting(vec![verified(&liar, 4, 9), verified(&honest, 4, 4)])
            .unwrap();
        assert_eq!(report.outcomes[1], PutOutcome::Stored);
        assert!(matches!(report.outcomes[0], PutOutcome::Conflict { .. }));
        assert_eq!(report.convicted.len(), 1);
        assert_eq!(report.convicted[0].origin(), liar_id);
        assert_eq!(report.convicted[0].seq(), 4);
        expected_proof = report.convicted[0].to_unverified();
        assert!(store.get_by_origin(&liar_id, 1).unwrap().is_none());
        assert!(!store.version_vector().unwrap().contains_key(&liar_id));
        let stats = store.stats().unwrap();
        assert_eq!((stats.records, stats.convicted), (4, 1));
        // Later records of the liar are refused, a second proof is no news.
        assert_eq!(
            store.put(vec![verified(&liar, 6, 6)]).unwrap(),
            vec![PutOutcome::Convicted]
        );
        assert!(!store.convict(report.convicted[0].clone()).unwrap());
    }
    // Across a restart: still convicted, the same proof.
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.put(vec![verified(&liar, 1, 1)]).unwrap(),
        vec![PutOutcome::Convicted]
    );
    assert_eq!(store.convicted().unwrap(), [liar_id].into());
    assert_eq!(store.evidence_of(&liar_id).unwrap(), Some(expected_proof));
    assert_eq!(store.evidence().unwrap().len(), 1);
    assert_eq!(
        store.version_vector().unwrap()[&honest.public().to_peer_id()],
        4
    );
    drop(store);
    let ro = Store::open_read_only(&path).unwrap();
    assert_eq!(ro.convicted().unwrap().len(), 1);
}
