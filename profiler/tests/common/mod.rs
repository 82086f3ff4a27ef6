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

/// Gemma 3 270M (`scripts/fetch-model.sh gemma3-270m`, which the test script runs).
#[allow(dead_code)]
pub(crate) fn gemma_path() -> PathBuf {
    let path =
        metainf_profiler::model::cached_model_path(metainf_profiler::model::GEMMA3_MODEL_FILE)
            .expect("HOME is set");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh gemma3-270m (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A greedy request for `messages` through the engine's chat template, its stop tokens the
/// model's.
#[allow(dead_code)]
pub(crate) fn chat_request(
    engine: &metainf_profiler::engine::Engine,
    messages: &[metainf_protocol::ChatMessage],
    max_tokens: u32,
) -> metainf_profiler::engine::Request {
    let tok = engine.model().tokenizer();
    metainf_profiler::engine::Request {
        prompt: tok
            .encode(&tok.chat_prompt(messages).unwrap())
            .expect("the prompt tokenizes"),
        max_tokens,
        stop: tok.stop_ids().to_vec(),
        sampling: metainf_profiler::engine::Sampling::default(),
        arrival_s: 0.0,
    }
}
