//! One routing decision (Algorithm 2) over 8 methods × 100 hosts with distinct hardware, with
//! the default meta-predictor (4 × 30 trees of depth 6) trained on 2,000 records (a third of
//! them served jobs with cache hits and co-load); again with every host's live load and a
//! different cached share of the job per host (the predictor sees the share); and training
//! that predictor on 10,000 records.
//!
//! `cargo bench --profile dev -p metainf-scheduler --bench select`
//!
//! Besides criterion's estimates of the mean, the decision's p50 and p99 over 5,000 timed
//! single decisions are printed (the target is a p99).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use metainf_protocol::{
    HostLoad, Keypair, MethodConfig, Objective, PerfRecord, RecordSource, ServedLoad, fixtures,
};
use metainf_scheduler::robust::{Gate, RobustConfig};
use metainf_scheduler::select::Predictor;
use metainf_scheduler::{FeatureConfig, GbdtParams, Host, MetaPredictor, Query, Tensor, select};

/// `hardware` profiles × 5 workloads × 8 methods.
fn records(hardware: u32) -> Vec<PerfRecord> {
    let key = Keypair::generate_ed25519();
    let methods = MethodConfig::standard_methods();
    let mut out = Vec::new();
    let mut seq = 0;
    for units in 1..=hardware {
        for (w, preset) in ["chat", "multi-turn", "few-shot", "summarise", "reasoning"]
            .iter()
            .enumerate()
        {
            for (mi, m) in methods.iter().enumerate() {
                seq += 1;
                let mut r = fixtures::record(&key, seq, 0);
                r.hardware = fixtures::cpu_hardware(units);
                r.workload = fixtures::workload(preset, 8 + 4 * w as u32);
                r.workload.prefix_sharing = 0.1 * w as f64;
                r.method = m.clone();
                let mut wall =
                    20.0 / f64::from(units).sqrt() * (1.0 + 0.1 * ((mi * 7 + w * 3) % 5) as f64);
                if seq % 3 == 0 {
                    // A served job: part of its prompt from the cache, beside other jobs.
                    let tenths = seq % 10;
                    r.source = RecordSource::Served(ServedLoad {
                        mean_running_seqs: 6.0,
                        mean_foreign_seqs: 2.0,
                        cached_prompt_tokens: r.metrics.prompt_tokens * tenths / 10,
                    });
                    wall *= 1.0 - 0.05 * tenths as f64;
                }
                r.metrics.wall_time_s = wall;
                r.metrics.throughput_tok_s = r.metrics.output_tokens as f64 / wall;
                out.push(r);
            }
        }
    }
    out
}

/// p50, p99 and max of 5,000 timed single decisions with `model`, printed with the layers its
/// gate kept.
fn percentiles(model: &MetaPredictor, query: &Query<'_>, what: &str) {
    let predictor = Predictor { model, cache: None };
    let mut times: Vec<f64> = (0..5000)
        .map(|_| {
            let start = std::time::Instant::now();
            std::hint::black_box(select(&predictor, std::hint::black_box(query)).unwrap());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "select 8 methods x 100 hosts{what} over 5000 decisions ({}): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        model.model().gate().describe(),
        times[2500],
        times[4950],
        times[4999]
    );
}

fn bench(c: &mut Criterion) {
    let tensor = Tensor::from_records(&records(50)).unwrap();
    let model = MetaPredictor::train(
        &tensor,
        None,
        FeatureConfig::default(),
        GbdtParams::default(),
        None,
    )
    .unwrap();
    let hosts: Vec<Host> = (1..=100u32)
        .map(|i| Host {
            name: format!("host-{i}"),
            hardware: fixtures::cpu_hardware(i),
            price_per_hour: 0.1 * f64::from(i),
            queue_depth: i % 4,
            running_jobs: i % 2,
            power_w: None,
            load: None,
            slowdown: 1.0,
            cached_tokens: 0,
        })
        .collect();
    let methods = MethodConfig::standard_methods();
    let workload = fixtures::workload("chat", 16);
    let m = fixtures::smollm2();
    let predictor = Predictor {
        model: &model,
        cache: None,
    };
    let query = Query {
        workload: &workload,
        model: &m,
        hosts: &hosts,
        methods: &methods,
        budget: Some(0.05),
        objective: Objective::Runtime,
        explore: 0.0,
    };
    percentiles(&model, &query, "");
    println!(
        "the predictor sees the cache share: {}",
        predictor
            .model
            .features()
            .sees_extra(metainf_scheduler::served::CACHED_SHARE)
    );
    // Every host with its live load and its own cached share of the job.
    let total = (workload.prompt_tokens.mean * f64::from(workload.requests)) as u64;
    let loaded: Vec<Host> = hosts
        .iter()
        .zip(1u32..)
        .map(|(h, i)| Host {
            load: Some(HostLoad {
                running_seqs: i % 9,
                waiting_seqs: i % 3,
                max_running: 8,
                kv_blocks_total: 1000,
                kv_blocks_used: 10 * (i % 9),
                kv_blocks_cached: 100,
                decode_tok_s: 50.0,
                seq_s: 2.0,
                remaining_tokens: 0,
            }),
            cached_tokens: total * u64::from(i % 11) / 10,
            ..h.clone()
        })
        .collect();
    let with_state = Query {
        hosts: &loaded,
        ..query.clone()
    };
    percentiles(&model, &with_state, " with load and cache per host");
    // The heaviest model the gate can keep: every layer, both tree ensembles evaluated.
    let heavy = MetaPredictor::train_with(
        &tensor,
        None,
        FeatureConfig::default(),
        RobustConfig {
            gate: Some(Gate::heaviest()),
            ..RobustConfig::default()
        },
        None,
    )
    .unwrap();
    percentiles(&heavy, &query, "");
    percentiles(&heavy, &with_state, " with load and cache per host");
    c.bench_function("select 8 methods x 100 hosts", |b| {
        b.iter(|| select(&predictor, std::hint::black_box(&query)).unwrap())
    });
    c.bench_function("select 8 methods x 100 hosts with load and cache", |b| {
        b.iter(|| select(&predictor, std::hint::black_box(&with_state)).unwrap())
    });
    let big = Tensor::from_records(&records(250)).unwrap();
    let mut group = c.benchmark_group("train");
    group.sample_size(10);
    group.bench_function("meta-predictor on 10,000 records", |b| {
        b.iter(|| {
            MetaPredictor::train(
                &big,
                None,
                FeatureConfig::default(),
                GbdtParams::default(),
                None,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
