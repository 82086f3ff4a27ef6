//! The real default model (fetched by `scripts/fetch-model.sh`, which the test script runs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

fn model_path() -> PathBuf {
    let path = std::env::var_os("METAINF_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/metainf/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

#[test]
fn the_default_model_is_described_from_its_gguf() {
    let m = metainf_profiler::model::describe(&model_path()).unwrap();
    m.validate().unwrap();
    assert_eq!(m.architecture, "llama");
    assert!(m.name.to_lowercase().contains("smollm2"), "{}", m.name);
    assert_eq!(m.quantization, "Q4_1");
    // 135M parameters (134.5M counted in the tensors), 5 bits per weight for Q4_1 blocks.
    assert!(
        (130_000_000..140_000_000).contains(&m.parameters),
        "{}",
        m.parameters
    );
    assert!(
        m.bits_per_weight > 4.5 && m.bits_per_weight < 6.0,
        "{}",
        m.bits_per_weight
    );
    assert_eq!(m.context_length, 8192);
    // The descriptor is stable: the same file gives the same model id.
    let again = metainf_profiler::model::describe(&model_path()).unwrap();
    assert_eq!(m.id().unwrap(), again.id().unwrap());
}
