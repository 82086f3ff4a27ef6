//! Shared by the integration tests that run the real default model.

use std::path::PathBuf;

/// The default model, fetched by `scripts/fetch-model.sh` (which the test script runs).
pub(crate) fn model_path() -> PathBuf {
    let path = metainf_profiler::model::default_model_path().expect("HOME is set");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        path.display()
    );
    path
}
