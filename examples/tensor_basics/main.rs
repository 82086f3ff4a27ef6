//! Make a performance record by hand, sign it with a node identity, verify it as a peer would,
//! store it in a RocksDB store and query the tensor back.

use std::collections::BTreeMap;

use anyhow::Result;
use metainf_node::store::{PutOutcome, RecordQuery, Store};
use metainf_protocol::{
    Arrival, ContentId, CpuSpec, DeviceKind, HardwareProfile, HardwareSpec, Keypair, MethodConfig,
    Metrics, ModelDescriptor, Percentiles, PerfRecord, RecordSource, SignedRecord,
    WorkloadDescriptor,
};

fn main() -> Result<()> {
    // Every node has an ed25519 identity; its peer id is the origin of the records it makes.
    let key = Keypair::generate_ed25519();
    let origin = key.public().to_peer_id();

    let hardware = HardwareProfile {
        spec: HardwareSpec {
            device: DeviceKind::Cpu,
            backend: "cpu".into(),
            name: "Example CPU".into(),
            memory_bytes: 16 << 30,
            compute_units: 2,
            gpu: None,
            cpu: Some(CpuSpec {
                physical_cores: 2,
                logical_cpus: 4,
                simd: vec!["avx2".into()],
            }),
            attributes: BTreeMap::new(),
        },
        measured: None,
        driver: None,
    };
    let model = ModelDescriptor {
        name: "SmolLM2-135M-Instruct".into(),
        architecture: "llama".into(),
        parameters: 134_515_008,
        quantization: "Q8_0".into(),
        bits_per_weight: 8.5,
        context_length: 8192,
        weights_digest: ContentId::of_bytes("example", b"weights"),
    };
    // A workload descriptor is computed from any job's tokenized prompts.
    let system: Vec<u32> = (0..64).collect();
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| [system.clone(), vec![1000 + i; 16]].concat())
        .collect();
    let workload = WorkloadDescriptor::from_prompts(
        Some("chat".into()),
        &prompts,
        &[64; 8],
        Arrival::AllAtOnce,
        0.0,
    );
    println!(
        "workload: {} requests, prompt p50 {} tokens, prefix sharing {:.2}",
        workload.requests, workload.prompt_tokens.p50, workload.prefix_sharing
    );

    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("store"))?;
    for (seq, method) in (1..).zip(MethodConfig::standard_methods()) {
        let wall = if method.has("prefix_caching") {
            2.0
        } else {
            3.0
        };
        let record = PerfRecord {
            origin,
            seq,
            measured_at_ms: 1_790_000_000_000,
            hardware: hardware.clone(),
            model: model.clone(),
            workload: workload.clone(),
            method,
            metrics: Metrics {
                wall_time_s: wall,
                requests: 8,
                prompt_tokens: 640,
                output_tokens: 512,
                throughput_tok_s: 512.0 / wall,
                ttft_ms: Percentiles {
                    p50: 40.0,
                    p95: 80.0,
                },
                itl_ms: Percentiles {
                    p50: 15.0,
                    p95: 25.0,
                },
                peak_kv_bytes: 4 << 20,
                energy_j: None,
                cost: None,
            },
            source: RecordSource::Benchmark,
            engine: "example".into(),
        };
        // Sign as the origin; a receiving peer verifies signature, origin and value ranges.
        let signed = SignedRecord::sign(record, &key)?;
        let wire = signed.to_wire()?;
        let verified = SignedRecord::from_wire(&wire)?.verify()?;
        let outcome = store.put(vec![verified])?;
        assert_eq!(outcome, vec![PutOutcome::Stored]);
    }

    // The tensor slice of this workload on this hardware: one record per method.
    let slice = store.query(&RecordQuery {
        hardware: Some(hardware.id()?),
        workload: Some(workload.id()?),
        ..RecordQuery::default()
    })?;
    let mut rows: Vec<(String, f64)> = slice
        .records
        .iter()
        .map(|r| (r.record.method.short_name(), r.record.metrics.wall_time_s))
        .collect();
    rows.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (method, wall) in &rows {
        println!("{method:<10} {wall:>5.1} s");
    }
    println!("version vector: {:?}", store.version_vector()?);
    Ok(())
}
