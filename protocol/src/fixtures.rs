//! Deterministic sample data for tests and benchmarks (feature `fixtures`).
//!
//! The values are plausible but synthetic; they exercise storage, codecs and networking, never
//! the scheduler's conclusions.

use std::collections::BTreeMap;

use libp2p_identity::{Keypair, PeerId};

use crate::hardware::{CpuSpec, DeviceKind, HardwareMeasurements, HardwareProfile, HardwareSpec};
use crate::heartbeat::Heartbeat;
use crate::id::ContentId;
use crate::method::MethodConfig;
use crate::model::ModelDescriptor;
use crate::record::{Metrics, Percentiles, PerfRecord, RecordSource, SignedRecord};
use crate::workload::{Arrival, LengthStats, WorkloadDescriptor};

/// A CPU hardware profile with `threads` compute units.
pub fn cpu_hardware(threads: u32) -> HardwareProfile {
    HardwareProfile {
        spec: HardwareSpec {
            device: DeviceKind::Cpu,
            backend: "cpu".into(),
            name: "Sample CPU".into(),
            memory_bytes: 24 << 30,
            compute_units: threads,
            gpu: None,
            cpu: Some(CpuSpec {
                physical_cores: 2,
                logical_cpus: 2,
                simd: vec!["avx2".into()],
            }),
            attributes: BTreeMap::new(),
        },
        measured: Some(HardwareMeasurements {
            matmul_gflops: 20.0 * f64::from(threads),
            mem_bandwidth_gbs: 10.0,
        }),
        driver: None,
    }
}

/// The default model's descriptor.
pub fn smollm2() -> ModelDescriptor {
    ModelDescriptor {
        name: "SmolLM2-135M-Instruct".into(),
        architecture: "llama".into(),
        parameters: 134_515_008,
        quantization: "Q4_1".into(),
        bits_per_weight: 5.0,
        context_length: 8192,
        weights_digest: ContentId::of_bytes("metainf fixture", b"smollm2"),
    }
}

/// A workload of `requests` requests under a preset name.
pub fn workload(preset: &str, requests: u32) -> WorkloadDescriptor {
    WorkloadDescriptor {
        preset: Some(preset.into()),
        requests,
        prompt_tokens: LengthStats {
            min: 20,
            mean: 100.0,
            p50: 90,
            p95: 200,
            max: 256,
        },
        max_new_tokens: LengthStats {
            min: 64,
            mean: 64.0,
            p50: 64,
            p95: 64,
            max: 64,
        },
        prefix_sharing: 0.3,
        arrival: Arrival::AllAtOnce,
        temperature: 0.0,
        extra: Default::default(),
    }
}

/// A record of `origin`'s key with sequence number `seq`; `variant` spreads records over
/// 2 hardware settings × 5 workloads × 8 methods.
pub fn record(key: &Keypair, seq: u64, variant: u64) -> PerfRecord {
    let methods = MethodConfig::standard_methods();
    let presets = ["chat", "multi-turn", "few-shot", "summarise", "reasoning"];
    let method = methods[(variant % 8) as usize].clone();
    let preset = presets[((variant / 8) % 5) as usize];
    let threads = 1 + ((variant / 40) % 2) as u32;
    let wall = 1.0 + (seq % 97) as f64 / 10.0;
    let output_tokens = 1000 + seq % 1000;
    PerfRecord {
        origin: key.public().to_peer_id(),
        seq,
        measured_at_ms: 1_790_000_000_000 + seq,
        hardware: cpu_hardware(threads),
        model: smollm2(),
        workload: workload(preset, 16),
        method,
        metrics: Metrics {
            wall_time_s: wall,
            requests: 16,
            prompt_tokens: 1600,
            output_tokens,
            throughput_tok_s: output_tokens as f64 / wall,
            ttft_ms: Percentiles {
                p50: 50.0,
                p95: 90.0,
            },
            itl_ms: Percentiles {
                p50: 20.0,
                p95: 35.0,
            },
            peak_kv_bytes: 8 << 20,
            energy_j: None,
            cost: Some(0.001),
        },
        source: RecordSource::Benchmark,
        engine: "fixture".into(),
    }
}

/// [`record`], signed.
pub fn signed(key: &Keypair, seq: u64, variant: u64) -> SignedRecord {
    match SignedRecord::sign(record(key, seq, variant), key) {
        Ok(s) => s,
        Err(e) => panic!("fixture records are signed by their own origin: {e}"),
    }
}

/// An engine's live load: `running_seqs` running and `waiting_seqs` waiting of at most
/// `max_running` at once, in a pool of 100 blocks, nothing else announced.
pub fn host_load(running_seqs: u32, waiting_seqs: u32, max_running: u32) -> crate::HostLoad {
    crate::HostLoad {
        running_seqs,
        waiting_seqs,
        max_running,
        kv_blocks_total: 100,
        kv_blocks_used: 0,
        kv_blocks_cached: 0,
        decode_tok_s: 0.0,
        seq_s: 0.0,
        remaining_tokens: 0,
    }
}

/// A heartbeat of `peer` serving the default model on a one-thread CPU, sent at `sent_at_ms`.
pub fn heartbeat(peer: PeerId, sent_at_ms: u64) -> Heartbeat {
    let hardware = cpu_hardware(1);
    Heartbeat {
        peer,
        sent_at_ms,
        queue_depth: 0,
        running_jobs: 0,
        queue_capacity: 4,
        models: vec![smollm2()],
        price_per_hour: 0.1,
        free_memory_bytes: 1 << 30,
        hardware: match hardware.id() {
            Ok(id) => id,
            Err(e) => panic!("the fixture hardware has an id: {e}"),
        },
        profile: Some(hardware),
        records_seq: 0,
        load: None,
        cache: None,
        interval_s: 5,
    }
}
