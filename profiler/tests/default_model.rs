//! The real default model (fetched by `scripts/fetch-model.sh`, which the test script runs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::model_path;

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

#[test]
fn the_tokenizer_from_the_gguf_matches_the_reference_ids() {
    use candle_core::quantized::gguf_file;
    use metainf_profiler::tokenizer::ModelTokenizer;
    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tok = ModelTokenizer::from_gguf(&content).unwrap();
    // The GGUF's own template (SmolLM2's adds its system prompt when the chat has none).
    assert_eq!(tok.template_origin(), "gguf");
    let chat = tok
        .chat_prompt(&[metainf_protocol::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }])
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(prompt).unwrap();
    assert_eq!(
        ids,
        [
            1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198
        ]
    );
    // Digits are split one by one; decoding gives the text back.
    let text = "In 2024, 365 days.";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert!(
        tok.stop_ids().contains(&2),
        "<|im_end|> (2) ends a turn: {:?}",
        tok.stop_ids()
    );
}

#[test]
fn workload_presets_have_their_shape_in_real_tokens() {
    use candle_core::quantized::gguf_file;
    use metainf_profiler::tokenizer::ModelTokenizer;
    use metainf_profiler::workload::{Preset, generate};
    use metainf_protocol::{Arrival, WorkloadDescriptor};
    let mut file = std::fs::File::open(model_path()).unwrap();
    let tok = ModelTokenizer::from_gguf(&gguf_file::Content::read(&mut file).unwrap()).unwrap();
    let describe = |p: Preset| {
        let w = generate(p, 32, Arrival::AllAtOnce, 42);
        let prompts: Vec<Vec<u32>> = w
            .requests
            .iter()
            .map(|r| tok.encode(&tok.chat_prompt(&r.messages).unwrap()).unwrap())
            .collect();
        let max_new: Vec<u32> = w.requests.iter().map(|r| r.max_new_tokens).collect();
        let d = WorkloadDescriptor::from_prompts(
            Some(p.name().into()),
            &prompts,
            &max_new,
            Arrival::AllAtOnce,
            0.0,
        );
        d.validate().unwrap();
        eprintln!(
            "{:<11} prompt tokens mean {:>6.1} (p95 {:>4}), max new mean {:>5.1}, prefix sharing {:.2}",
            p.name(),
            d.prompt_tokens.mean,
            d.prompt_tokens.p95,
            d.max_new_tokens.mean,
            d.prefix_sharing
        );
        d
    };
    let chat = describe(Preset::Chat);
    let multi = describe(Preset::MultiTurn);
    let few = describe(Preset::FewShot);
    let doc = describe(Preset::Summarise);
    let reason = describe(Preset::Reasoning);
    // Shared system prompt / examples / conversation history show up as prefix sharing.
    assert!(chat.prefix_sharing > 0.5, "chat {}", chat.prefix_sharing);
    assert!(
        multi.prefix_sharing > 0.5,
        "multi-turn {}",
        multi.prefix_sharing
    );
    assert!(few.prefix_sharing > 0.8, "few-shot {}", few.prefix_sharing);
    assert!(doc.prefix_sharing < 0.1, "summarise {}", doc.prefix_sharing);
    // Long documents with short outputs; short problems with long outputs.
    assert!(doc.prompt_tokens.mean > 500.0, "{:?}", doc.prompt_tokens);
    assert!(doc.max_new_tokens.mean < 64.0);
    assert!(
        reason.prompt_tokens.mean < 60.0,
        "{:?}",
        reason.prompt_tokens
    );
    assert!(reason.max_new_tokens.mean > 190.0);
    // Multi-turn prompts grow with the conversation.
    assert!(multi.prompt_tokens.max > 2 * multi.prompt_tokens.min);
}
