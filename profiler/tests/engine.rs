//! The engine on the real default model (fetched by `scripts/fetch-model.sh`, which the test
//! script runs): correct answers, and every acceleration method giving the baseline's tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::model_path;

use std::sync::OnceLock;

use metainf_profiler::engine::{
    Engine, EngineOptions, FinishReason, MethodSettings, Request, RunReport, Sampling,
};
use metainf_profiler::workload::{Preset, generate};
use metainf_protocol::{Arrival, ChatMessage, MethodConfig};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(&model_path(), EngineOptions::default()).unwrap())
}

fn request(messages: &[ChatMessage], max_tokens: u32) -> Request {
    common::chat_request(engine(), messages, max_tokens)
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }]
}

fn tokens(report: &RunReport) -> Vec<Vec<u32>> {
    report
        .completions
        .iter()
        .map(|c| c.tokens.clone())
        .collect()
}

/// Chat requests sharing a system prompt, few-shot requests sharing a long prefix, and turns
/// of one conversation, interleaved: with batches of 4 the second of each pair lands in the
/// second batch, where even static batching finds its prefix cached.
fn mixed_requests(max_tokens: u32) -> Vec<Request> {
    let per_preset: Vec<Vec<Request>> = [Preset::Chat, Preset::FewShot, Preset::MultiTurn]
        .into_iter()
        .map(|preset| {
            generate(preset, 2, Arrival::AllAtOnce, 5)
                .requests
                .iter()
                .map(|r| request(&r.messages, r.max_new_tokens.min(max_tokens)))
                .collect()
        })
        .collect();
    (0..2)
        .flat_map(|i| per_preset.iter().map(move |p| p[i].clone()))
        .collect()
}

fn settings(method: &MethodConfig) -> MethodSettings {
    MethodSettings {
        max_batch: 4,
        chunk_size: 24,
        block_size: 16,
        ..MethodSettings::from_method(method).unwrap()
    }
}

#[test]
fn greedy_decoding_answers_the_capital_of_france() {
    // Without a system message SmolLM2's template adds its own, after which the model
    // answers in French (llama.cpp's server too): a plain one instead. The ids are
    // llama-server's /tokenize of its /apply-template rendering.
    let mut chat = user("What is the capital of France?");
    chat.insert(
        0,
        ChatMessage {
            role: "system".into(),
            content: "You are a helpful assistant.".into(),
        },
    );
    let r = request(&chat, 24);
    assert_eq!(
        r.prompt,
        [
            1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 260,
            3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198
        ]
    );
    let report = engine().run(&[r], &MethodSettings::default()).unwrap();
    let c = &report.completions[0];
    let text = engine().model().tokenizer().decode(&c.tokens).unwrap();
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(c.tokens.last(), Some(&2), "ends with <|im_end|>");
    assert_eq!(c.finish, FinishReason::Stop);
    assert_eq!(c.token_times_s.len(), c.tokens.len());
    assert!(c.ttft_s().unwrap() > 0.0);
}

#[test]
fn the_thread_count_does_not_change_the_tokens() {
    // One thread splits every matmul and attention differently from the default pool (and
    // runs attention per head rather than per KV group): the tokens must not move.
    let one = Engine::load(&model_path(), EngineOptions { threads: Some(1) }).unwrap();
    let requests = mixed_requests(6);
    let cb = MethodSettings {
        continuous_batching: true,
        ..MethodSettings::default()
    };
    let a = one.run(&requests, &cb).unwrap();
    let b = engine().run(&requests, &cb).unwrap();
    assert!(a.completions.iter().all(|c| !c.tokens.is_empty()));
    assert_eq!(tokens(&a), tokens(&b));
}

#[test]
fn every_method_gives_exactly_the_baseline_tokens() {
    let requests = mixed_requests(10);
    let methods = MethodConfig::standard_methods();
    assert_eq!(methods.len(), 8);
    let baseline = engine().run(&requests, &settings(&methods[0])).unwrap();
    assert!(baseline.completions.iter().all(|c| !c.tokens.is_empty()));
    for m in &methods[1..] {
        let s = settings(m);
        let report = engine().run(&requests, &s).unwrap();
        assert_eq!(
            tokens(&report),
            tokens(&baseline),
            "{} changed the output",
            m.short_name()
        );
        if s.prefix_caching {
            assert!(
                report.kv.hits > 0,
                "{}: no prefix block was reused",
                m.short_name()
            );
        } else {
            assert_eq!(report.kv.hits, 0);
        }
        if s.chunked_prefill {
            // Prompts of ~100-300 tokens in chunks of 24 take more steps than whole prefill.
            assert!(
                report.steps > baseline.steps,
                "{}: {} vs {}",
                m.short_name(),
                report.steps,
                baseline.steps
            );
        }
    }
}

#[test]
fn prefix_cache_blocks_are_reused_and_evicted_under_the_budget() {
    // A system message of our own: with the template's default one the shared prefix ends
    // exactly on a block boundary (352 tokens), and reuse inside a block would not show.
    let few_shot: Vec<Request> = generate(Preset::FewShot, 3, Arrival::AllAtOnce, 9)
        .requests
        .iter()
        .map(|r| {
            let mut messages = vec![ChatMessage {
                role: "system".into(),
                content: "You are a helpful assistant.".into(),
            }];
            messages.extend(r.messages.iter().cloned());
            request(&messages, 4)
        })
        .collect();
    let reference = engine()
        .run(
            &few_shot,
            &MethodSettings {
                max_batch: 1,
                ..MethodSettings::default()
            },
        )
        .unwrap();
    // One sequence at a time: every request after the first finds the shared examples cached.
    let pc = MethodSettings {
        prefix_caching: true,
        continuous_batching: true,
        max_batch: 1,
        ..MethodSettings::default()
    };
    let report = engine().run(&few_shot, &pc).unwrap();
    assert_eq!(tokens(&report), tokens(&reference));
    assert_eq!(report.completions[0].cached_prompt_tokens, 0);
    let shared = report.completions[1].cached_prompt_tokens;
    assert!(
        shared >= 128,
        "only {shared} prompt tokens came from the cache"
    );
    // Reuse goes below block granularity (the shared rows of the block where the prompts part
    // are copied), but the last prompt token is always computed.
    for (c, r) in report.completions[1..].iter().zip(&few_shot[1..]) {
        assert!(
            c.cached_prompt_tokens < r.prompt.len(),
            "{} cached of {}",
            c.cached_prompt_tokens,
            r.prompt.len()
        );
    }
    assert!(
        report.completions[1..]
            .iter()
            .any(|c| c.cached_prompt_tokens % pc.block_size != 0),
        "some prompt reused rows inside a block: cached {:?} of prompts {:?}",
        report
            .completions
            .iter()
            .map(|c| c.cached_prompt_tokens)
            .collect::<Vec<_>>(),
        few_shot.iter().map(|r| r.prompt.len()).collect::<Vec<_>>()
    );
    assert_eq!(report.kv.evictions, 0);
    // A budget of little more than one request: cached blocks must be evicted to make room,
    // and the output still does not change.
    let per_token = engine().model().config.kv_bytes_per_token();
    let longest = few_shot.iter().map(|r| r.prompt.len() + 4).max().unwrap();
    let tight = MethodSettings {
        kv_budget_bytes: (longest + 2 * pc.block_size) * per_token,
        ..pc.clone()
    };
    // Distinct prompts after the cached ones push the cached blocks out.
    let mut mixed = few_shot.clone();
    mixed.extend(mixed_requests(4).into_iter().take(2));
    mixed.extend(few_shot.iter().cloned());
    let tight_report = engine().run(&mixed, &tight).unwrap();
    let loose_report = engine()
        .run(
            &mixed,
            &MethodSettings {
                max_batch: 1,
                ..MethodSettings::default()
            },
        )
        .unwrap();
    assert_eq!(tokens(&tight_report), tokens(&loose_report));
    assert!(tight_report.kv.evictions > 0, "{:?}", tight_report.kv);
    assert!(tight_report.peak_kv_bytes <= tight.kv_budget_bytes as u64);
}

#[test]
fn sampling_is_seeded_and_does_not_depend_on_the_batch() {
    let sampled = |seed: u64| Request {
        sampling: Sampling {
            temperature: 0.9,
            top_p: 0.95,
            seed,
        },
        ..request(&user("Write a short poem about the sea."), 24)
    };
    let alone = engine()
        .run(&[sampled(7)], &MethodSettings::default())
        .unwrap();
    let mut batch = mixed_requests(6);
    batch.insert(2, sampled(7));
    let all = MethodSettings {
        continuous_batching: true,
        prefix_caching: true,
        chunked_prefill: true,
        max_batch: 3,
        chunk_size: 16,
        ..MethodSettings::default()
    };
    let batched = engine().run(&batch, &all).unwrap();
    assert_eq!(batched.completions[2].tokens, alone.completions[0].tokens);
    let other = engine()
        .run(&[sampled(8)], &MethodSettings::default())
        .unwrap();
    assert_ne!(other.completions[0].tokens, alone.completions[0].tokens);
    // max_tokens bounds the output.
    let capped = engine()
        .run(
            &[request(&user("Tell me a long story."), 5)],
            &MethodSettings::default(),
        )
        .unwrap();
    assert_eq!(capped.completions[0].tokens.len(), 5);
    assert_eq!(capped.completions[0].finish, FinishReason::Length);
}

#[test]
fn requests_that_cannot_run_get_clear_errors() {
    let e = engine();
    let ctx = e.model().config.context_length;
    let too_long = request(&user("hi"), ctx as u32);
    let err = e
        .run(&[too_long], &MethodSettings::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceed the model's context"), "{err}");
    let small = MethodSettings {
        kv_budget_bytes: 1 << 20,
        ..MethodSettings::default()
    };
    let err = e
        .run(&[request(&user("hi"), 200)], &small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("KV cache") && err.contains("budget"), "{err}");
    let empty = Request {
        prompt: Vec::new(),
        ..request(&user("hi"), 4)
    };
    assert!(
        e.run(&[empty], &MethodSettings::default())
            .unwrap_err()
            .to_string()
            .contains("empty prompt")
    );
    let bad_token = Request {
        prompt: vec![u32::MAX],
        ..request(&user("hi"), 4)
    };
    assert!(
        e.run(&[bad_token], &MethodSettings::default())
            .unwrap_err()
            .to_string()
            .contains("vocabulary")
    );
    let missing = metainf_profiler::engine::Engine::load(
        std::path::Path::new("/nonexistent.gguf"),
        EngineOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(missing.contains("cannot open"), "{missing}");
}

#[test]
fn embeddings_are_unit_vectors_that_place_related_texts_closer() {
    let texts: Vec<String> = [
        "Hardware: GPU NVIDIA H100, 132 compute units, 80 GiB of memory.",
        "Hardware: GPU NVIDIA A100, 108 compute units, 40 GiB of memory.",
        "Method: prefix caching reuses the key-value blocks of shared prompt prefixes.",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let v = engine().embed(&texts, 512).unwrap();
    assert_eq!(v.len(), 3);
    let dim = engine().model().config.hidden;
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for e in &v {
        assert_eq!(e.len(), dim);
        assert!((cos(e, e) - 1.0).abs() < 1e-4);
    }
    assert!(
        cos(&v[0], &v[1]) > cos(&v[0], &v[2]),
        "{} vs {}",
        cos(&v[0], &v[1]),
        cos(&v[0], &v[2])
    );
    // Deterministic, and cut at the token limit rather than failing.
    assert_eq!(engine().embed(&texts[..1], 512).unwrap()[0], v[0]);
    let long = vec!["word ".repeat(5000)];
    assert_eq!(engine().embed(&long, 64).unwrap()[0].len(), dim);
    assert!(engine().embed(&[String::new()], 64).is_err());
}
