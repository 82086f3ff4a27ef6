//! Both shipped models against llama.cpp on the same file: token ids of several prompts
//! (Unicode, digits, code, whitespace, special tokens) and the first 32 greedy tokens.
//!
//! The references in `tests/data/reference-*.json` were made by `scripts/llama-reference.sh`
//! (llama-server from llama-cpp-python 0.3.36's vendored llama.cpp; the command is in each
//! file). Token ids must be equal. Greedy tokens must be equal up to where floats may part
//! the two engines: a near-tie between the two best logits (llama.cpp quantizes activations
//! in other blocks for K-quants, and rounds differently), which the test checks is a near-tie
//! in this engine too, rather than accepting any difference.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use metainf_profiler::engine::{Engine, EngineOptions, MethodSettings, Request, Sampling};

struct Case {
    prompt: String,
    ids: Vec<u32>,
    /// llama.cpp's default (flash attention on for the CPU).
    greedy: Vec<u32>,
    /// llama.cpp without flash attention: where it parts from its own default, floats
    /// decided a near-tie.
    greedy_fa_off: Vec<u32>,
}

fn reference(name: &str) -> (serde_json::Value, Vec<Case>) {
    let path = format!(
        "{}/tests/data/reference-{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_owned(),
            ids: ids(&c["ids"]),
            greedy: ids(&c["greedy"]),
            greedy_fa_off: ids(&c["greedy_fa_off"]),
        })
        .collect();
    (json, cases)
}

/// The largest logit gap between the engine's token and llama.cpp's at the point they part
/// that counts as a tie floats may break either way (logits here span tens of units; llama.cpp
/// with and without flash attention parts on such ties after as few as 2 tokens).
const NEAR_TIE: f32 = 0.5;

fn check(name: &str, path: &std::path::Path) {
    let (json, cases) = reference(name);
    let engine = Engine::load(path, EngineOptions { threads: Some(2) }).unwrap();
    let tok = engine.model().tokenizer();
    for c in &cases {
        assert_eq!(
            tok.encode(&c.prompt).unwrap(),
            c.ids,
            "{name}: token ids of {:?}",
            c.prompt
        );
    }
    let requests: Vec<Request> = cases
        .iter()
        .map(|c| Request {
            prompt: c.ids.clone(),
            max_tokens: json["generated"].as_u64().unwrap() as u32,
            stop: tok.stop_ids().to_vec(),
            sampling: Sampling::default(),
            arrival_s: 0.0,
        })
        .collect();
    let report = engine.run(&requests, &MethodSettings::default()).unwrap();
    let stops = tok.stop_ids();
    let content =
        |t: &[u32]| -> Vec<u32> { t.iter().copied().filter(|t| !stops.contains(t)).collect() };
    let agree = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let mut summary = Vec::new();
    for (c, done) in cases.iter().zip(&report.completions) {
        let ours = content(&done.tokens);
        let theirs = content(&c.greedy);
        let same = agree(&ours, &theirs);
        let own = agree(&theirs, &content(&c.greedy_fa_off));
        summary.push(format!(
            "{:?}: {same} tokens equal (llama.cpp with/without flash attention: {own})",
            c.prompt.chars().take(24).collect::<String>()
        ));
        if same == ours.len().min(theirs.len()) {
            continue;
        }
        // Parted at `same`: the two candidates must be a near-tie here, as they are where
        // llama.cpp parts from itself.
        let mut context = c.ids.clone();
        context.extend_from_slice(&ours[..same]);
        let logits = engine.logits(&context).unwrap();
        let (a, b) = (ours[same] as usize, theirs[same] as usize);
        let best = logits.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        assert_eq!(
            logits[a], best,
            "{name}: the engine's own greedy token is its argmax"
        );
        let gap = logits[a] - logits[b];
        assert!(
            gap < NEAR_TIE,
            "{name}: {:?} parts from llama.cpp at token {same} ({a} vs {b}) with a logit gap \
             of {gap}, not a near-tie\n ours   {ours:?}\n theirs {theirs:?}",
            c.prompt
        );
        summary.push(format!("  parted at a near-tie: gap {gap:.3}"));
    }
    eprintln!("{name}:\n{}", summary.join("\n"));
    // The chat template llama.cpp renders from the file (with --jinja), where it has one.
    if let Some(expected) = json["chat"]["prompt"].as_str()
        && tok.template_origin() == "gguf"
    {
        let messages: Vec<metainf_protocol::ChatMessage> =
            serde_json::from_value(json["chat"]["messages"].clone()).unwrap();
        let ours = tok.chat_prompt(&messages).unwrap();
        assert_eq!(
            tok.encode(&ours).unwrap(),
            tok.encode(expected).unwrap(),
            "{name}: chat prompt {ours:?} vs llama.cpp's {expected:?}"
        );
    }
}

#[test]
fn smollm2_tokens_and_greedy_output_equal_llama_cpp() {
    check("smollm2", &common::model_path());
}

#[test]
fn gemma3_tokens_and_greedy_output_equal_llama_cpp() {
    check("gemma3-270m", &common::gemma_path());
}

/// Tiny random-weight models of the architectures no shipped model covers, written with the
/// default model's GPT-2 vocabulary under another pre-tokenizer: Qwen 2 (QKV biases, `qwen2`
/// pre-tokenizer, tied output), Qwen 3 (head norms, heads of 32 with 4 × 32 ≠ hidden 64, an F16
/// output head), Llama 3 (RoPE frequency factors and a linear scale of 2, `llama-bpe`). The
/// weights come from a fixed generator, so the files are the same on every machine; their
/// references were made by llama.cpp on these files (`scripts/llama-reference.sh` writes them
/// with `METAINF_TINY_OUT` set).
mod tiny {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    pub(super) const VARIANTS: [&str; 3] = ["qwen2", "qwen3", "llama3"];

    struct Rng(u64);
    impl Rng {
        /// Uniform in [-1, 1).
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn values(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
            (0..n).map(|_| offset + scale * self.next()).collect()
        }
    }

    fn tensor(rng: &mut Rng, dims: &[usize], dtype: GgmlDType, scale: f32, offset: f32) -> QTensor {
        let n = dims.iter().product();
        let t = Tensor::from_vec(rng.values(n, scale, offset), dims, &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }

    pub(super) type Meta = Vec<(String, Value)>;
    pub(super) type Tensors = Vec<(String, QTensor)>;

    /// Writes the `variant` model to `path`.
    pub(super) fn write(variant: &str, vocab_of: &std::path::Path, path: &std::path::Path) {
        write_edited(variant, vocab_of, path, |_, _| {});
    }

    /// A 2-D F32 tensor of `rows × cols` from the fixed generator.
    pub(super) fn matrix(rows: usize, cols: usize) -> QTensor {
        tensor(&mut Rng(7), &[rows, cols], GgmlDType::F32, 0.3, 0.0)
    }

    /// Writes the `variant` model to `path` after `edit` has changed its metadata or tensors.
    pub(super) fn write_edited(
        variant: &str,
        vocab_of: &std::path::Path,
        path: &std::path::Path,
        edit: impl FnOnce(&mut Meta, &mut Tensors),
    ) {
        let (hidden, heads, kv_heads, ffn, layers) = (64usize, 4usize, 2usize, 256usize, 2usize);
        let (arch, pre, head_dim) = match variant {
            "qwen2" => ("qwen2", "qwen2", 16),
            "qwen3" => ("qwen3", "qwen2", 32),
            _ => ("llama", "llama-bpe", 16),
        };
        let mut file = std::fs::File::open(vocab_of).unwrap();
        let source = gguf_file::Content::read(&mut file).unwrap();
        let mut meta: Vec<(String, Value)> = source
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") && k.as_str() != "tokenizer.chat_template")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, v) in &mut meta {
            if k == "tokenizer.ggml.pre" {
                *v = Value::String(pre.into());
            }
        }
        let vocab = match source.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => panic!("no vocabulary"),
        };
        let k = |s: &str| format!("{arch}.{s}");
        meta.extend([
            (
                "general.architecture".to_owned(),
                Value::String(arch.into()),
            ),
            (
                "general.name".to_owned(),
                Value::String(format!("tiny-{variant}")),
            ),
            (k("context_length"), Value::U32(512)),
            (k("embedding_length"), Value::U32(hidden as u32)),
            (k("block_count"), Value::U32(layers as u32)),
            (k("feed_forward_length"), Value::U32(ffn as u32)),
            (k("attention.head_count"), Value::U32(heads as u32)),
            (k("attention.head_count_kv"), Value::U32(kv_heads as u32)),
            (k("attention.key_length"), Value::U32(head_dim as u32)),
            (k("attention.value_length"), Value::U32(head_dim as u32)),
            (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
            (k("rope.freq_base"), Value::F32(10_000.0)),
        ]);
        if variant == "llama3" {
            meta.push((k("rope.scaling.type"), Value::String("linear".into())));
            meta.push((k("rope.scaling.factor"), Value::F32(2.0)));
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ variant.len() as u64);
        let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
        let mut tensors: Vec<(String, QTensor)> = vec![(
            "token_embd.weight".into(),
            tensor(&mut rng, &[vocab, hidden], GgmlDType::Q8_0, 1.0, 0.0),
        )];
        tensors.push((
            "output_norm.weight".into(),
            tensor(&mut rng, &[hidden], GgmlDType::F32, 0.2, 1.0),
        ));
        if variant == "qwen3" {
            tensors.push((
                "output.weight".into(),
                tensor(&mut rng, &[vocab, hidden], GgmlDType::F16, 1.0, 0.0),
            ));
        }
        if variant == "llama3" {
            let factors: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 + i as f32 * 0.5).collect();
            let t = Tensor::from_vec(factors, head_dim / 2, &Device::Cpu).unwrap();
            tensors.push((
                "rope_freqs.weight".into(),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            ));
        }
        let w = 0.3;
        for i in 0..layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let mut add =
                |name: String, dims: &[usize], dtype: GgmlDType, scale: f32, offset: f32| {
                    tensors.push((name, tensor(&mut rng, dims, dtype, scale, offset)));
                };
            add(p("attn_norm.weight"), &[hidden], GgmlDType::F32, 0.2, 1.0);
            add(
                p("attn_q.weight"),
                &[q_dim, hidden],
                GgmlDType::Q8_0,
                w,
                0.0,
            );
            add(
                p("attn_k.weight"),
                &[kv_dim, hidden],
                GgmlDType::Q8_0,
                w,
                0.0,
            );
            add(
                p("attn_v.weight"),
                &[kv_dim, hidden],
                GgmlDType::Q8_0,
                w,
                0.0,
            );
            add(
                p("attn_output.weight"),
                &[hidden, q_dim],
                GgmlDType::Q4_0,
                w,
                0.0,
            );
            add(p("ffn_norm.weight"), &[hidden], GgmlDType::F32, 0.2, 1.0);
            add(
                p("ffn_gate.weight"),
                &[ffn, hidden],
                GgmlDType::Q4_1,
                w,
                0.0,
            );
            add(p("ffn_up.weight"), &[ffn, hidden], GgmlDType::Q5_0, w, 0.0);
            add(p("ffn_down.weight"), &[hidden, ffn], GgmlDType::Q4K, w, 0.0);
            match variant {
                "qwen2" => {
                    add(p("attn_q.bias"), &[q_dim], GgmlDType::F32, 0.5, 0.0);
                    add(p("attn_k.bias"), &[kv_dim], GgmlDType::F32, 0.5, 0.0);
                    add(p("attn_v.bias"), &[kv_dim], GgmlDType::F32, 0.5, 0.0);
                }
                "qwen3" => {
                    add(
                        p("attn_q_norm.weight"),
                        &[head_dim],
                        GgmlDType::F32,
                        0.2,
                        1.0,
                    );
                    add(
                        p("attn_k_norm.weight"),
                        &[head_dim],
                        GgmlDType::F32,
                        0.2,
                        1.0,
                    );
                }
                _ => {}
            }
        }
        edit(&mut meta, &mut tensors);
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut out = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    }
}

#[test]
fn tiny_qwen2_qwen3_and_llama3_models_equal_llama_cpp() {
    let dir = std::env::var_os("METAINF_TINY_OUT").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&dir).unwrap();
    for variant in tiny::VARIANTS {
        let path = dir.join(format!("tiny-{variant}.gguf"));
        tiny::write(variant, &common::model_path(), &path);
        if std::env::var_os("METAINF_TINY_OUT").is_some() {
            continue; // writing them for scripts/llama-reference.sh
        }
        check(&format!("tiny-{variant}"), &path);
    }
}

/// A model file is input too: sizes a hostile or broken GGUF declares are refused with an
/// error naming them, never a panic or an allocation the file cannot back.
#[test]
fn hostile_sizes_in_a_gguf_are_refused_with_clear_errors() {
    use candle_core::quantized::gguf_file::Value;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hostile-gguf");
    std::fs::create_dir_all(&dir).unwrap();
    fn set(key: &'static str, value: Value) -> impl FnOnce(&mut tiny::Meta, &mut tiny::Tensors) {
        move |meta, _| {
            meta.retain(|(k, _)| k != key);
            meta.push((key.to_owned(), value));
        }
    }
    let vocab = {
        let mut file = std::fs::File::open(common::model_path()).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        match &content.metadata["tokenizer.ggml.tokens"] {
            Value::Array(a) => a.len(),
            _ => panic!("no vocabulary"),
        }
    };
    type Edit = Box<dyn FnOnce(&mut tiny::Meta, &mut tiny::Tensors)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "heads",
            Box::new(set("llama.attention.head_count", Value::U32(8192))),
            "unsupported sizes: 8192 heads",
        ),
        (
            "kv-heads",
            Box::new(set("llama.attention.head_count_kv", Value::U32(3))),
            "unsupported head layout: 4 heads, 3 kv heads",
        ),
        (
            "key-length",
            Box::new(|m: &mut tiny::Meta, t: &mut tiny::Tensors| {
                for key in ["llama.attention.key_length", "llama.attention.value_length"] {
                    set(key, Value::U32(u32::MAX))(m, t);
                }
            }),
            "unsupported sizes: 4 heads, 2 kv heads of 4294967295",
        ),
        (
            "rope-dims",
            Box::new(set("llama.rope.dimension_count", Value::U32(0))),
            "RoPE over 0",
        ),
        (
            "blocks",
            Box::new(set("llama.block_count", Value::U64(1 << 40))),
            "1099511627776 blocks",
        ),
        (
            "missing-block",
            Box::new(set("llama.block_count", Value::U32(3))),
            "tensor blk.2.attn_q.weight",
        ),
        (
            "hidden",
            Box::new(set("llama.embedding_length", Value::U32(128))),
            "has 64 values, expected 128",
        ),
        (
            "rope-scaling",
            Box::new(set("llama.rope.scaling.type", Value::String("yarn".into()))),
            "RoPE scaling \"yarn\" is not supported",
        ),
        (
            "architecture",
            Box::new(set("general.architecture", Value::String("mamba".into()))),
            "architecture \"mamba\" is not supported",
        ),
        (
            "alignment",
            Box::new(set("general.alignment", Value::U32(0))),
            "malformed header",
        ),
        (
            "ffn-0",
            Box::new(|_: &mut tiny::Meta, t: &mut tiny::Tensors| {
                for (name, q) in t.iter_mut() {
                    if name.ends_with("ffn_down.weight") {
                        *q = tiny::matrix(64, 0);
                    }
                }
            }),
            "does not fit",
        ),
        (
            "output-rows",
            Box::new(move |_: &mut tiny::Meta, t: &mut tiny::Tensors| {
                t.push(("output.weight".into(), tiny::matrix(vocab - 1, 64)));
            }),
            "output head disagrees",
        ),
    ];
    for (name, edit, expected) in cases {
        let path = dir.join(format!("{name}.gguf"));
        tiny::write_edited("llama3", &common::model_path(), &path, edit);
        let err = match Engine::load(&path, EngineOptions { threads: Some(1) }) {
            Ok(_) => panic!("{name}: a hostile file loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(expected), "{name}: {err:?} lacks {expected:?}");
        // The node describes a file before it loads it: that read must refuse or succeed, not
        // panic.
        let _ = metainf_profiler::model::describe(&path);
    }
    // A file cut short: every tensor is checked against the file's length before its bytes
    // are read or allocated.
    let path = dir.join("truncated.gguf");
    tiny::write("llama3", &common::model_path(), &path);
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 1000).unwrap();
    for err in [
        Engine::load(&path, EngineOptions { threads: Some(1) })
            .err()
            .map(|e| e.to_string()),
        metainf_profiler::model::describe(&path)
            .err()
            .map(|e| e.to_string()),
    ] {
        let err = err.expect("a truncated file was accepted");
        assert!(err.contains("does not fit in the file"), "{err}");
    }
}
