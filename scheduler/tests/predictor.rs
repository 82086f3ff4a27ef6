//! The meta-predictor end to end on records built in memory: it learns which method and which
//! hardware are fast, survives a save and reload bit for bit, and drives Algorithm 2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use metainf_protocol::{Keypair, MethodConfig, Objective, PerfRecord, fixtures};
use metainf_scheduler::select::{Predictor, SelectError};
use metainf_scheduler::{
    FeatureConfig, GbdtParams, Host, MetaPredictor, Query, SchedulerError, Tensor, select,
};

/// 1, 2 and 4 threads × 5 workloads × 8 methods: runtime 12 s / threads, halved by continuous
/// batching on chat and by prefix caching on few-shot.
fn records() -> Vec<PerfRecord> {
    let key = Keypair::generate_ed25519();
    let mut out = Vec::new();
    let mut seq = 0;
    for threads in [1u32, 2, 4] {
        for (i, preset) in ["chat", "multi-turn", "few-shot", "summarise", "reasoning"]
            .into_iter()
            .enumerate()
        {
            for m in MethodConfig::standard_methods() {
                seq += 1;
                let mut r = fixtures::record(&key, seq, 0);
                r.hardware = fixtures::cpu_hardware(threads);
                r.workload = workload(preset, i);
                let mut rt = 12.0 / f64::from(threads);
                if (preset == "chat" && m.short_name() == "cb")
                    || (preset == "few-shot" && m.short_name() == "pc")
                {
                    rt /= 2.0;
                }
                r.method = m;
                r.metrics.wall_time_s = rt;
                r.metrics.throughput_tok_s = r.metrics.output_tokens as f64 / rt;
                out.push(r);
            }
        }
    }
    out
}

/// The fixture workload with a preset-specific shape (numeric features tell them apart).
fn workload(preset: &str, i: usize) -> metainf_protocol::WorkloadDescriptor {
    let mut w = fixtures::workload(preset, 16);
    w.prefix_sharing = 0.1 + 0.15 * i as f64;
    w.prompt_tokens.mean = 60.0 + 20.0 * i as f64;
    w
}

#[test]
fn predictor_learns_saves_reloads_and_routes() {
    let tensor = Tensor::from_records(&records()).unwrap();
    let model = MetaPredictor::train(
        &tensor,
        None,
        FeatureConfig::default(),
        GbdtParams::default(),
        None,
    )
    .unwrap();
    assert_eq!(model.trained_on(), 120);
    let methods = MethodConfig::standard_methods();
    let chat = workload("chat", 0);
    let few = workload("few-shot", 2);
    let smol = fixtures::smollm2();
    let hw: Vec<_> = [1, 4].map(fixtures::cpu_hardware).into_iter().collect();
    let refs: Vec<_> = hw.iter().collect();
    let grid = model
        .predict_grid(&chat, &smol, &refs, &methods, None)
        .unwrap();
    let best = |row: &[metainf_scheduler::Prediction]| {
        (0..row.len())
            .min_by(|&a, &b| row[a].log_runtime.total_cmp(&row[b].log_runtime))
            .unwrap()
    };
    assert_eq!(methods[best(&grid[0])].short_name(), "cb");
    // 4 threads predicted faster than 1, by about 4×.
    let ratio = grid[0][0].runtime_s() / grid[1][0].runtime_s();
    assert!(ratio > 2.5 && ratio < 5.5, "{ratio}");
    let few_grid = model
        .predict_grid(&few, &smol, &refs, &methods, None)
        .unwrap();
    assert_eq!(methods[best(&few_grid[1])].short_name(), "pc");

    // Saved and reloaded: the same predictions.
    let bytes = model.to_bytes().unwrap();
    let again = MetaPredictor::from_bytes(&bytes).unwrap();
    assert_eq!(
        again
            .predict_grid(&chat, &smol, &refs, &methods, None)
            .unwrap(),
        grid
    );
    assert!(MetaPredictor::from_bytes(b"{\"version\": 99}").is_err());
    assert!(MetaPredictor::from_bytes(&bytes[..bytes.len() / 2]).is_err());

    // Routing: fast expensive host against slow cheap one.
    let hosts = vec![
        Host {
            name: "fast".into(),
            hardware: fixtures::cpu_hardware(4),
            price_per_hour: 36.0,
            queue_depth: 0,
            running_jobs: 0,
            power_w: None,
            load: None,
            slowdown: 1.0,
            cached_tokens: 0,
        },
        Host {
            name: "cheap".into(),
            hardware: fixtures::cpu_hardware(1),
            price_per_hour: 1.0,
            queue_depth: 0,
            running_jobs: 0,
            power_w: None,
            load: None,
            slowdown: 1.0,
            cached_tokens: 0,
        },
    ];
    let predictor = Predictor {
        model: &again,
        cache: None,
    };
    let mut q = Query {
        workload: &chat,
        model: &smol,
        hosts: &hosts,
        methods: &methods,
        budget: None,
        objective: Objective::Runtime,
        explore: 0.0,
    };
    let d = select(&predictor, &q).unwrap();
    assert_eq!(
        (
            d.chosen.host_name.as_str(),
            d.chosen.method.short_name().as_str()
        ),
        ("fast", "cb")
    );
    assert_eq!(d.ranked.len(), 16);
    // fast+cb costs about 36 × 1.5 s / 3600 = 0.015; cheap+cb about 1 × 6 s / 3600 = 0.0017.
    q.budget = Some(0.005);
    let d = select(&predictor, &q).unwrap();
    assert_eq!(
        (
            d.chosen.host_name.as_str(),
            d.chosen.method.short_name().as_str()
        ),
        ("cheap", "cb")
    );
    q.budget = Some(1e-5);
    match select(&predictor, &q) {
        Err(SchedulerError::Select(SelectError::OverBudget { cheapest, .. })) => {
            assert_eq!(cheapest.host_name, "cheap");
        }
        other => panic!("{other:?}"),
    }
}
