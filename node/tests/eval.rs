//! `metainf-node eval` and `tensor import-csv` through the binary: a tensor from a JSONL file
//! and from the store, an external CSV table signed into the store, held-out hardware, the
//! budget column, text features embedded by the real default model, and clear errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;

use common::{bin, run_ok};
use metainf_protocol::{Keypair, SignedRecord, fixtures};

/// 2 hardware × 5 workloads × 8 methods where the best method depends on the workload: prefix
/// caching where prompts are shared, continuous batching elsewhere. Written as signed JSONL.
fn write_tensor(path: &Path) {
    let key = Keypair::generate_ed25519();
    let mut f = std::fs::File::create(path).unwrap();
    for v in 0..80 {
        let mut r = fixtures::record(&key, v + 1, v);
        let shared = matches!(
            r.workload.preset.as_deref(),
            Some("few-shot" | "multi-turn")
        );
        r.workload.prefix_sharing = if shared { 0.8 } else { 0.05 };
        let mut rt = 10.0 / f64::from(r.hardware.spec.compute_units);
        match (r.method.short_name().as_str(), shared) {
            ("pc", true) => rt *= 0.5,
            ("cb", false) => rt *= 0.6,
            _ => {}
        }
        r.metrics.wall_time_s = rt;
        r.metrics.throughput_tok_s = r.metrics.output_tokens as f64 / rt;
        let signed = SignedRecord::sign(r, &key).unwrap();
        writeln!(f, "{}", serde_json::to_string(&signed).unwrap()).unwrap();
    }
    // A forged line: the evaluation skips it.
    writeln!(f, "{{\"record\": 1}}").unwrap();
}

fn row<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["selector"] == name)
        .unwrap_or_else(|| panic!("no row {name}: {report}"))
}

#[test]
fn eval_scores_every_selector_on_files_and_on_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let tensor = dir.path().join("tensor.jsonl");
    write_tensor(&tensor);
    let data = dir.path().join("node");
    let out = run_ok(
        bin()
            .args(["eval", "--json", "--tensor"])
            .arg(&tensor)
            .arg("--data-dir")
            .arg(&data),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cells"], 10);
    assert_eq!(report["rows"].as_array().unwrap().len(), 12);
    let meta = row(&report, "MetaInf");
    let global = row(&report, "Global Best");
    assert!(meta["accuracy"].as_f64().unwrap() >= 0.9, "{meta}");
    assert!(global["accuracy"].as_f64().unwrap() <= 0.6, "{global}");
    assert_eq!(row(&report, "Oracle")["accuracy"], 1.0);
    for r in report["rows"].as_array().unwrap() {
        let acc = r["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r}");
        assert!(r["acceleration"].as_f64().unwrap() > 0.5, "{r}");
    }

    // The same records through the store (the forged line is refused, the rest stored),
    // held-out hardware, with a budget.
    let import = bin()
        .args(["tensor", "import"])
        .arg(&tensor)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&import.stderr).contains("imported 80 new records"));
    let out = run_ok(
        bin()
            .args([
                "eval",
                "--split",
                "hardware",
                "--selectors",
                "metainf,global-best",
                "--budget",
                "0.0025",
                "--data-dir",
            ])
            .arg(&data),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("Hardware, 2 folds, 10 test cells"),
        "{table}"
    );
    assert!(
        table.contains("feasible") && table.contains("MetaInf"),
        "{table}"
    );

    // Another metric of the same records.
    let out = run_ok(
        bin()
            .args([
                "eval",
                "--json",
                "--metric",
                "itl-p95",
                "--selectors",
                "global-best",
                "--tensor",
            ])
            .arg(&tensor)
            .arg("--data-dir")
            .arg(&data),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cells"], 10);
    assert!(String::from_utf8_lossy(&out.stderr).contains("tensor of ItlP95"));

    // Text features from the real default model (descriptions embedded, SVD per fold).
    let out = run_ok(
        bin()
            .args([
                "eval",
                "--json",
                "--encoding",
                "text",
                "--style",
                "basic",
                "--svd-k",
                "4",
                "--selectors",
                "metainf",
                "--threads",
                "2",
                "--tensor",
            ])
            .arg(&tensor)
            .arg("--data-dir")
            .arg(&data),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["features"]["encoding"], "text");
    assert!(
        row(&report, "MetaInf")["accuracy"].as_f64().unwrap() >= 0.5,
        "{report}"
    );
    assert!(data.join("embeddings.json").exists());

    // Clear errors.
    let err = bin()
        .args(["eval", "--split", "colour", "--tensor"])
        .arg(&tensor)
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("colour"));
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let err = bin()
        .args(["eval", "--tensor"])
        .arg(&empty)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("not enough data"));
}

#[test]
fn csv_tables_import_as_signed_records_and_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("paper.csv");
    let mut table = String::from("gpu,model,method,batch,latency_ms\n");
    // Three GPUs × two models × two batch sizes × three methods; "vllm" is best at batch 64,
    // "tgi" at batch 1, everywhere.
    for gpu in ["A100", "H100", "T4"] {
        for model in ["Llama-2-7B", "Llama-2-13B"] {
            for batch in [1, 64] {
                for (method, factor) in [("vllm", 1.0), ("tgi", 1.2), ("hf", 2.0)] {
                    let f = if batch == 1 && method != "hf" {
                        2.2 - factor
                    } else {
                        factor
                    };
                    let base = if gpu == "T4" { 400.0 } else { 100.0 };
                    table.push_str(&format!("{gpu},{model},{method},{batch},{}\n", base * f));
                }
            }
        }
    }
    std::fs::write(&csv, &table).unwrap();
    let data = dir.path().join("node");
    let map = "hardware=gpu,model=model,method=method,metric=latency_ms";
    let out = run_ok(
        bin()
            .args(["tensor", "import-csv", "--map", map])
            .arg(&csv)
            .arg("--data-dir")
            .arg(&data),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 36 new records"));
    let stats = run_ok(
        bin()
            .args(["tensor", "stats", "--json", "--data-dir"])
            .arg(&data),
    );
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["records"], 36);
    // Evaluate the CSV file directly, holding out whole models.
    let out = run_ok(
        bin()
            .args([
                "eval", "--json", "--split", "model", "--map", map, "--tensor",
            ])
            .arg(&csv)
            .arg("--data-dir")
            .arg(&data),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cells"], 12);
    assert_eq!(report["distinct_best"], 2);
    assert!(
        row(&report, "MetaInf")["accuracy"].as_f64().unwrap() >= 0.9,
        "{report}"
    );
    // A bad map is an error that names the column; nothing is stored.
    let err = bin()
        .args([
            "tensor",
            "import-csv",
            "--map",
            "hardware=gpu,model=model,method=method,metric=speed",
        ])
        .arg(&csv)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no column `speed`"));
}

#[test]
fn the_committed_tensor_of_this_project_evaluates_as_benchmarks_md_says() {
    // `data/tensor-2vcpu.jsonl`: `bench --full` at 1, 2 and 3 threads (scripts/sweep.sh).
    let tensor = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tensor-2vcpu.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(
        bin()
            .args([
                "eval",
                "--json",
                "--metric",
                "ttft-p50",
                "--split",
                "hardware",
                "--selectors",
                "metainf,global-best",
                "--tensor",
            ])
            .arg(&tensor)
            .arg("--data-dir")
            .arg(dir.path()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("360 records, 45 cells (3 hardware, 1 models, 15 workloads, 8 methods)"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["folds"], 3);
    let meta = row(&report, "MetaInf");
    let global = row(&report, "Global Best");
    // Zero-shot on unseen hardware, MetaInf ranks the methods better than one global choice.
    assert!(
        meta["regret"].as_f64().unwrap() < global["regret"].as_f64().unwrap(),
        "{report}"
    );
    assert!(meta["mean_rank"].as_f64().unwrap() < global["mean_rank"].as_f64().unwrap());
}

#[test]
fn ordinary_public_tables_import_with_categorical_columns_unknown_sizes_and_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("public.csv");
    // A categorical workload column (`scenario`), models whose names carry no size, and on
    // line 3 a row without a metric: what public benchmark tables look like.
    let mut table = String::from("hardware,model,method,scenario,qps,ttft_s\n");
    table.push_str("H100 x4,Phi-1,vLLM,sharegpt,1,\n");
    for hw in ["H100 x4", "A100 x2", "L40S"] {
        for model in ["Phi-1", "Mixtral"] {
            for scenario in ["sharegpt", "short_input"] {
                for qps in [1, 8] {
                    // vLLM wins at low load, llm-d at high load.
                    for (method, low, high) in [("vLLM", 1.0, 3.0), ("llm-d", 1.5, 1.2)] {
                        let ttft = if qps == 1 { low } else { high };
                        table.push_str(&format!("{hw},{model},{method},{scenario},{qps},{ttft}\n"));
                    }
                }
            }
        }
    }
    std::fs::write(&csv, &table).unwrap();
    let data = dir.path().join("node");
    let map = "hardware=hardware,model=model,method=method,metric=ttft_s,workload=scenario;qps";
    // All or nothing by default: the bad row is named and nothing is evaluated.
    let err = bin()
        .args(["eval", "--map", map, "--tensor"])
        .arg(&csv)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("--skip-invalid"),
        "{stderr}"
    );
    // With --skip-invalid the rest is used; the choice of features is printed per kind.
    let out = run_ok(
        bin()
            .args(["eval", "--skip-invalid", "--map", map, "--tensor"])
            .arg(&csv)
            .arg("--data-dir")
            .arg(&data),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hardware  learned effects only"),
        "{stdout}"
    );
    assert!(stdout.contains("workload  numeric facts"), "{stdout}");
    let json = run_ok(
        bin()
            .args(["eval", "--json", "--skip-invalid", "--map", map, "--tensor"])
            .arg(&csv)
            .arg("--data-dir")
            .arg(&data),
    );
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["cells"], 24);
    let meta = row(&report, "MetaInf");
    let global = row(&report, "Global Best");
    assert!(meta["accuracy"].as_f64().unwrap() >= 0.9, "{report}");
    assert!(global["accuracy"].as_f64().unwrap() <= 0.6, "{report}");
    assert!(meta["coverage_80"].as_f64().is_some(), "{report}");
    // Import into the store: the good rows are signed and stored, the bad one reported, and
    // the exit status says some were left out.
    let import = bin()
        .args(["tensor", "import-csv", "--skip-invalid", "--map", map])
        .arg(&csv)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(import.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&import.stderr);
    assert!(
        stderr.contains("imported 48 new records from 49 rows")
            && stderr.contains("1 unusable rows left out"),
        "{stderr}"
    );
}
