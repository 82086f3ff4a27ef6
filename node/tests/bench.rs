//! `metainf-node generate` and `bench` on the real default model (fetched by
//! `scripts/fetch-model.sh`, which the test script runs): a real answer, and signed records of
//! every run in the node's store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{bin, run_ok};

use metainf_node::store::{RecordQuery, Store};

#[test]
fn generate_answers_on_the_default_model_and_unknown_models_are_clear_errors() {
    // SmolLM2's template adds its own system prompt when the chat has none, and the model
    // then answers in French (as llama.cpp's server does with that template): a plain one.
    let out = run_ok(bin().args([
        "generate",
        "--system",
        "You are a helpful assistant.",
        "What is the capital of France?",
    ]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "The capital of France is Paris."
    );
    let err = bin()
        .args(["--model", "/nonexistent/model.gguf", "generate", "hi"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        stderr.contains("/nonexistent/model.gguf") && stderr.contains("not found"),
        "{stderr}"
    );
    let err = bin()
        .args(["bench", "--methods", "speculative"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("speculative"));
}

#[test]
fn bench_stores_a_signed_record_for_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let out = run_ok(
        bin()
            .args([
                "bench",
                "--quick",
                "--workloads",
                "chat",
                "--methods",
                "none,cb+pc",
                "--json",
            ])
            .args(["--threads", "2", "--data-dir"])
            .arg(&data),
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["method"], "none");
    assert_eq!(rows[1]["method"], "cb+pc");
    for row in rows {
        assert_eq!(row["workload"], "chat");
        assert_eq!(row["metrics"]["requests"], 6);
        assert!(row["metrics"]["throughput_tok_s"].as_f64().unwrap() > 0.0);
        assert!(row["metrics"]["peak_kv_bytes"].as_u64().unwrap() > 0);
    }
    // The shared system prompt is computed once under prefix caching.
    assert!(rows[1]["prefix_cache_hits"].as_u64().unwrap() > 0);
    let id = run_ok(bin().args(["id", "--data-dir"]).arg(&data));
    let peer_id = String::from_utf8(id.stdout).unwrap().trim().to_owned();
    let store = Store::open_read_only(data.join("store")).unwrap();
    let scan = store.query(&RecordQuery::default()).unwrap();
    assert_eq!(scan.records.len(), 2);
    let mut seqs: Vec<u64> = scan.records.iter().map(|r| r.record.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2]);
    for r in &scan.records {
        assert_eq!(r.record.origin.to_string(), peer_id);
        assert_eq!(r.record.workload.preset.as_deref(), Some("chat"));
        assert_eq!(
            r.record.hardware.spec.compute_units, 2,
            "the thread limit is the hardware"
        );
        r.clone().verify().unwrap();
    }
}
