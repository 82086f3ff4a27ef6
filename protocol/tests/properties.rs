//! Property tests: codec round trips, signatures that catch every tampering, and decoding of
//! arbitrary bytes that never panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use metainf_protocol::fixtures;
use metainf_protocol::{
    Heartbeat, JobRequest, JobResult, Keypair, MethodConfig, ParamValue, ProtocolError,
    SignedRecord, codec,
};
use proptest::prelude::*;

fn key(seed: u8) -> Keypair {
    let mut bytes = [seed; 32];
    bytes[0] = 1;
    Keypair::ed25519_from_bytes(bytes).unwrap()
}

fn arb_record() -> impl Strategy<Value = SignedRecord> {
    (
        0u8..4,
        1u64..1_000_000,
        0u64..80,
        0.0f64..1.0,
        1u32..10_000,
        proptest::collection::btree_map("[a-z_]{1,12}", any::<i64>(), 0..4),
        proptest::option::of(0.0f64..1e6),
    )
        .prop_map(|(k, seq, variant, sharing, requests, params, energy)| {
            let key = key(k);
            let mut r = fixtures::record(&key, seq, variant);
            r.workload.prefix_sharing = sharing;
            r.workload.requests = requests;
            r.metrics.energy_j = energy;
            for (name, v) in params {
                r.method = r.method.with_param(&name, ParamValue::Int(v));
            }
            SignedRecord::sign(r, &key).unwrap()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn signed_records_round_trip_and_verify(rec in arb_record()) {
        let wire = rec.to_wire().unwrap();
        let back = SignedRecord::from_wire(&wire).unwrap();
        prop_assert_eq!(&back, &rec);
        let verified = back.verify().unwrap();
        prop_assert_eq!(verified.id(), rec.record.id().unwrap());
        // JSON (the export format) round-trips too.
        let json = serde_json::to_string(&rec).unwrap();
        let from_json: SignedRecord = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(from_json, rec);
    }

    #[test]
    fn flipping_any_byte_never_yields_a_different_valid_record(
        rec in arb_record(),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut wire = rec.to_wire().unwrap();
        let i = pos.index(wire.len());
        wire[i] ^= 1 << bit;
        // Either it does not decode, or it does not verify, or it decodes to the same record
        // (a non-canonical encoding of equal values); never a different verified record.
        if let Ok(v) = SignedRecord::from_wire(&wire).and_then(SignedRecord::verify) {
            prop_assert_eq!(v.signed(), &rec);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = SignedRecord::from_wire(&bytes).map(|r| r.verify());
        let _ = codec::decode::<JobRequest>(&bytes);
        let _ = codec::decode::<JobResult>(&bytes);
        let _ = codec::decode::<Heartbeat>(&bytes);
        let _ = codec::decode::<Vec<SignedRecord>>(&bytes);
        let _ = codec::decode::<MethodConfig>(&bytes);
    }

    #[test]
    fn versioned_arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut msg = vec![codec::WIRE_VERSION];
        msg.extend_from_slice(&bytes);
        let _ = SignedRecord::from_wire(&msg).map(|r| r.verify());
        let _ = codec::decode::<JobRequest>(&msg);
        let _ = codec::decode::<Heartbeat>(&msg);
    }
}

#[test]
fn tampered_fields_fail_verification() {
    let k = key(1);
    let rec = fixtures::signed(&k, 7, 3);
    rec.clone().verify().unwrap();

    let mut t = rec.clone();
    t.record.metrics.wall_time_s *= 0.5;
    t.record.metrics.throughput_tok_s *= 2.0;
    assert!(matches!(t.verify(), Err(ProtocolError::BadSignature)));

    let mut t = rec.clone();
    t.record.seq += 1;
    assert!(matches!(t.verify(), Err(ProtocolError::BadSignature)));

    let mut t = rec.clone();
    t.signature[0] ^= 1;
    assert!(matches!(t.verify(), Err(ProtocolError::BadSignature)));
}

#[test]
fn padded_or_oversized_envelopes_are_refused() {
    let k = key(1);
    let rec = fixtures::signed(&k, 7, 3);
    // An unknown protobuf field after the key: decoders skip it, the signature does not cover
    // it; a second envelope of the same record.
    let mut padded = rec.clone();
    padded.signer.extend_from_slice(&[0x18, 0x01]);
    assert!(matches!(padded.verify(), Err(ProtocolError::InvalidKey(_))));
    let mut long = rec.clone();
    long.signer.extend(std::iter::repeat_n(0u8, 200));
    assert!(matches!(long.verify(), Err(ProtocolError::InvalidKey(_))));
    let mut long = rec.clone();
    long.signature.extend(std::iter::repeat_n(0u8, 200));
    assert!(matches!(long.verify(), Err(ProtocolError::InvalidKey(_))));
    rec.verify().unwrap();
}

#[test]
fn forged_origin_is_rejected() {
    let honest = key(1);
    let forger = key(2);
    // A record claiming `honest` as origin, signed by `forger`: sign() refuses...
    let claimed = fixtures::record(&honest, 1, 0);
    assert!(matches!(
        SignedRecord::sign(claimed.clone(), &forger),
        Err(ProtocolError::SignerNotOrigin { .. })
    ));
    // ...and a hand-built envelope is refused by verify().
    let mut forged = fixtures::signed(&forger, 1, 0);
    forged.record = claimed;
    assert!(matches!(
        forged.verify(),
        Err(ProtocolError::SignerNotOrigin { .. })
    ));
    // The forger's key swapped in as signer for honest's record: also refused.
    let mut swapped = fixtures::signed(&honest, 1, 0);
    swapped.signer = forger.public().encode_protobuf();
    assert!(matches!(
        swapped.verify(),
        Err(ProtocolError::SignerNotOrigin { .. })
    ));
    let mut garbage = fixtures::signed(&honest, 1, 0);
    garbage.signer = vec![1, 2, 3];
    assert!(matches!(
        garbage.verify(),
        Err(ProtocolError::InvalidKey(_))
    ));
}

#[test]
fn out_of_range_values_are_rejected_even_when_signed() {
    let k = key(3);
    type Mutation = Box<dyn Fn(&mut metainf_protocol::PerfRecord)>;
    let cases: Vec<Mutation> = vec![
        Box::new(|r| r.metrics.wall_time_s = f64::NAN),
        Box::new(|r| r.metrics.wall_time_s = -1.0),
        Box::new(|r| r.metrics.throughput_tok_s = 1e12),
        Box::new(|r| r.metrics.ttft_ms.p50 = 1e9),
        Box::new(|r| r.workload.prefix_sharing = 1.5),
        Box::new(|r| r.workload.requests = 0),
        Box::new(|r| r.seq = 0),
        Box::new(|r| r.hardware.spec.name = "x".repeat(10_000)),
        Box::new(|r| r.hardware.spec.compute_units = 0),
        Box::new(|r| r.model.bits_per_weight = 0.0),
        Box::new(|r| {
            r.method = r.method.clone().with_flag("Not A Flag");
        }),
        Box::new(|r| {
            r.source = metainf_protocol::RecordSource::Served(metainf_protocol::ServedLoad {
                mean_running_seqs: f64::INFINITY,
                mean_foreign_seqs: 0.0,
                cached_prompt_tokens: 0,
            })
        }),
        Box::new(|r| {
            r.source = metainf_protocol::RecordSource::Served(metainf_protocol::ServedLoad {
                mean_running_seqs: 1.0,
                mean_foreign_seqs: 2.0,
                cached_prompt_tokens: 0,
            })
        }),
        Box::new(|r| {
            r.source = metainf_protocol::RecordSource::Served(metainf_protocol::ServedLoad {
                mean_running_seqs: 1.0,
                mean_foreign_seqs: 0.0,
                cached_prompt_tokens: r.metrics.prompt_tokens + 1,
            })
        }),
    ];
    for (i, mutate) in cases.iter().enumerate() {
        let mut r = fixtures::record(&k, 5, 1);
        mutate(&mut r);
        let signed = SignedRecord::sign(r, &k).unwrap();
        let err = signed
            .verify()
            .expect_err(&format!("case {i} must be rejected"));
        assert!(
            matches!(err, ProtocolError::Invalid { .. }),
            "case {i}: {err}"
        );
    }
}

#[test]
fn a_served_record_with_its_co_load_verifies_and_old_sources_keep_their_bytes() {
    let k = key(4);
    let mut r = fixtures::record(&k, 2, 1);
    let benchmark_bytes = codec::canonical_bytes(&r).unwrap();
    r.source = metainf_protocol::RecordSource::Served(metainf_protocol::ServedLoad {
        mean_running_seqs: 6.5,
        mean_foreign_seqs: 5.5,
        cached_prompt_tokens: r.metrics.prompt_tokens / 2,
    });
    let signed = SignedRecord::sign(r.clone(), &k).unwrap();
    let back = SignedRecord::from_wire(&signed.to_wire().unwrap()).unwrap();
    assert_eq!(back, signed);
    back.verify().unwrap();
    // The new source is an appended variant: records of the older ones encode as before, so
    // their signatures (and the shipped tensor's) still hold.
    r.source = metainf_protocol::RecordSource::Benchmark;
    assert_eq!(codec::canonical_bytes(&r).unwrap(), benchmark_bytes);
}

#[test]
fn a_heartbeats_engine_load_is_range_checked() {
    let mut hb = Heartbeat {
        peer: key(5).public().to_peer_id(),
        sent_at_ms: 1,
        queue_depth: 0,
        running_jobs: 0,
        queue_capacity: 4,
        models: vec![fixtures::smollm2()],
        price_per_hour: 0.0,
        free_memory_bytes: 0,
        hardware: fixtures::cpu_hardware(1).id().unwrap(),
        profile: Some(fixtures::cpu_hardware(1)),
        records_seq: 0,
        load: Some(metainf_protocol::HostLoad {
            running_seqs: 3,
            waiting_seqs: 1,
            max_running: 8,
            kv_blocks_total: 100,
            kv_blocks_used: 40,
            kv_blocks_cached: 60,
            decode_tok_s: 120.0,
            seq_s: 2.0,
            remaining_tokens: 0,
        }),
        cache: Some(metainf_protocol::CacheSummary::new(
            "smollm2",
            16,
            &metainf_protocol::block_hashes(&[7; 640], 16),
        )),
        interval_s: 5,
    };
    hb.validate().unwrap();
    let back: Heartbeat = codec::decode(&codec::encode(&hb).unwrap()).unwrap();
    assert_eq!(back, hb);
    let ok = hb.load.unwrap();
    for bad in [
        metainf_protocol::HostLoad {
            kv_blocks_cached: 61,
            ..ok
        },
        metainf_protocol::HostLoad {
            running_seqs: 9,
            ..ok
        },
        metainf_protocol::HostLoad {
            decode_tok_s: f64::NAN,
            ..ok
        },
        metainf_protocol::HostLoad { seq_s: -1.0, ..ok },
    ] {
        hb.load = Some(bad);
        assert!(hb.validate().is_err(), "{bad:?}");
    }
    hb.load = Some(ok);
    hb.interval_s = 100_000;
    assert!(hb.validate().is_err(), "an interval past an hour");
    hb.interval_s = 5;
    // A cache summary past its bound is refused with the heartbeat that carries it.
    if let Some(c) = hb.cache.as_mut() {
        c.bits = vec![0xff; 2 * metainf_protocol::cache::MAX_SUMMARY_BYTES];
    }
    assert!(hb.validate().is_err());
}

#[test]
fn oversized_records_are_refused_before_decoding() {
    let k = key(4);
    let mut r = fixtures::record(&k, 1, 0);
    for i in 0..2000 {
        r.hardware
            .spec
            .attributes
            .insert(format!("key_{i}"), "v".repeat(100));
    }
    let signed = SignedRecord::sign(r, &k).unwrap();
    assert!(matches!(
        signed.to_wire(),
        Err(ProtocolError::TooLarge { .. })
    ));
    let bytes = codec::encode(&signed).unwrap();
    assert!(matches!(
        SignedRecord::from_wire(&bytes),
        Err(ProtocolError::TooLarge { .. })
    ));
}

#[test]
fn a_typical_record_stays_small_on_the_wire() {
    let k = key(5);
    let size = fixtures::signed(&k, 123_456, 17).to_wire().unwrap().len();
    eprintln!("a typical signed record is {size} bytes on the wire");
    // Tensors of millions of records are replicated to every node: keep records compact.
    assert!(size < 700, "{size} bytes");
}
