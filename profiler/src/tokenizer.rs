//! Tokenizers and chat templates built from a GGUF's metadata, as llama.cpp builds them from the
//! same file:
//!
//! - `tokenizer.ggml.model = gpt2`: byte-level BPE through the `tokenizers` crate, with the
//!   pre-tokenizer the file names (`tokenizer.ggml.pre`: `default`/`gpt2`, `smollm`,
//!   `llama-bpe`/`llama3`, `qwen2`); other pre-tokenizers are refused rather than guessed.
//! - `tokenizer.ggml.model = llama`: SentencePiece BPE (Gemma, Llama 2, Mistral, TinyLlama):
//!   the highest-scoring pair of neighbouring pieces is merged first, whitespace is `▁`, text
//!   no piece covers falls back to `<0xXX>` byte tokens ([`Spm`], llama.cpp's algorithm).
//!
//! Special tokens (control, user-defined and unknown types) written in the text are found first,
//! longest first, as llama.cpp's `tokenizer_st_partition` does; BOS is added when the file's
//! `add_bos_token` says so. The chat template is the file's `tokenizer.chat_template`, rendered
//! with minijinja; without one, the architecture's known template; ChatML last.

use std::collections::{BinaryHeap, HashMap};

use aho_corasick::AhoCorasick;
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use metainf_protocol::ChatMessage;
use tokenizers::Tokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ProfilerError, Result};
use crate::gguf::{Meta, as_float, as_uint};

fn model_err(e: impl std::fmt::Display) -> ProfilerError {
    ProfilerError::Model(e.to_string())
}

/// GGUF token types (`tokenizer.ggml.token_type`), as llama.cpp numbers them.
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// Texts llama.cpp treats as end of generation wherever a vocabulary has them.
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
];

enum Vocab {
    Bpe(Box<Tokenizer>),
    Spm(Box<Spm>),
}

/// A model's tokenizer with its special tokens, end-of-turn tokens and chat template.
pub struct ModelTokenizer {
    vocab: Vocab,
    bos: Option<u32>,
    add_bos: bool,
    /// EOS after every encoded text (`add_eos_token`, as llama.cpp adds it).
    eos: Option<u32>,
    stop_ids: Vec<u32>,
    template: ChatTemplate,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab", &self.vocab_size())
            .field(
                "kind",
                &match self.vocab {
                    Vocab::Bpe(_) => "bpe",
                    Vocab::Spm(_) => "spm",
                },
            )
            .field("bos", &self.bos.filter(|_| self.add_bos))
            .field("stop_ids", &self.stop_ids)
            .field("template", &self.template.origin)
            .finish()
    }
}

impl ModelTokenizer {
    /// Builds the tokenizer of a GGUF from its metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let meta = Meta(content);
        let kind = meta.text("tokenizer.ggml.model").unwrap_or("gpt2");
        let tokens: Vec<&str> = meta
            .array("tokenizer.ggml.tokens")
            .ok_or_else(|| model_err("the GGUF has no tokenizer.ggml.tokens"))?
            .iter()
            .map(|v| v.to_string().map(String::as_str).map_err(model_err))
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match meta.array("tokenizer.ggml.token_type") {
            Some(a) => a
                .iter()
                .map(|v| match v {
                    gguf_file::Value::I32(t) => *t,
                    other => as_uint(other).map_or(TYPE_NORMAL, |t| t as i32),
                })
                .collect(),
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(model_err(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let vocab = match kind {
            "gpt2" => Vocab::Bpe(Box::new(bpe(content, &meta)?)),
            "llama" => Vocab::Spm(Box::new(Spm::new(&meta, &tokens, &types)?)),
            other => {
                return Err(model_err(format!(
                    "tokenizer {other:?} is not supported (gpt2 BPE and llama SentencePiece are)"
                )));
            }
        };
        let id = |key: &str| {
            meta.uint(key)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        // llama.cpp's defaults: SentencePiece and Llama 3's BPE add BOS unless told not to.
        let pre = meta.text("tokenizer.ggml.pre").unwrap_or("default");
        let add_bos = meta
            .flag("tokenizer.ggml.add_bos_token")
            .unwrap_or(kind == "llama" || matches!(pre, "llama-bpe" | "llama3"));
        let mut stop_ids = Vec::new();
        let mut stop = |id: u32| {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        };
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(v) = id(key) {
                stop(v);
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            if END_OF_GENERATION.contains(t) {
                stop(i as u32);
            }
        }
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .map(|s| s.to_string())
        };
        let arch = meta.text("general.architecture").unwrap_or_default();
        let template = ChatTemplate::new(
            meta.text("tokenizer.chat_template"),
            arch,
            &tokens,
            text_of(bos).unwrap_or_default(),
            text_of(eos).unwrap_or_default(),
        )?;
        let add_eos = meta.flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
        Ok(Self {
            vocab,
            bos,
            add_bos,
            eos: eos.filter(|_| add_eos),
            stop_ids,
            template,
        })
    }

    /// Token ids of `text` as llama.cpp tokenizes a prompt: special tokens written in the text
    /// (`<|im_start|>`, `<start_of_turn>`) are recognised, BOS comes first when the model
    /// asks for it (a text that writes BOS itself gets two, as in llama.cpp; the chat
    /// template's leading BOS is dropped by [`Self::chat_prompt`]), and EOS last when it asks
    /// for that.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let bos = self.bos.filter(|_| self.add_bos);
        if let Some(b) = bos {
            ids.push(b);
        }
        match &self.vocab {
            Vocab::Bpe(t) => ids.extend(
                t.encode(text, false)
                    .map_err(|e| model_err(format!("cannot tokenize: {e}")))?
                    .get_ids(),
            ),
            Vocab::Spm(s) => s.encode(text, &mut ids),
        }
        ids.extend(self.eos);
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.vocab {
            Vocab::Bpe(t) => t
                .decode(ids, true)
                .map_err(|e| model_err(format!("cannot detokenize: {e}"))),
            Vocab::Spm(s) => Ok(s.decode(ids)),
        }
    }

    /// Tokens that end a turn.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        match &self.vocab {
            Vocab::Bpe(t) => t.get_vocab_size(true),
            Vocab::Spm(s) => s.pieces.len(),
        }
    }

    /// The prompt text of a chat: the model's template over `messages`, opening the
    /// assistant's turn. A leading BOS the template writes is left to [`Self::encode`].
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String> {
        let text = self.template.render(messages)?;
        let bos = &self.template.bos;
        Ok(match text.strip_prefix(bos.as_str()) {
            Some(rest) if self.add_bos && !bos.is_empty() => rest.to_owned(),
            _ => text,
        })
    }

    /// Where the chat template came from: `gguf`, the architecture's (`gemma`, `llama3`, …) or
    /// `chatml`.
    pub fn template_origin(&self) -> &str {
        &self.template.origin
    }
}

/// The byte-level BPE tokenizer of a `gpt2` GGUF, with the file's pre-tokenizer.
fn bpe(content: &gguf_file::Content, meta: &Meta<'_>) -> Result<Tokenizer> {
    // llama.cpp's regex for `llama-bpe` (Llama 3); candle knows it as `llama3` only.
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let pre = meta.text("tokenizer.ggml.pre").unwrap_or("default");
    let mut inner = Tokenizer::from_gguf(content)
        .map_err(|e| model_err(format!("cannot build the tokenizer: {e}")))?;
    match pre {
        "default" | "gpt2" | "qwen2" | "llama3" => {}
        // candle treats `smollm` as GPT-2, which puts a space before every segment; SmolLM2
        // splits digits individually and adds no prefix space.
        "smollm" => {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        "llama-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(model_err)?;
            let seq: Vec<PreTokenizerWrapper> =
                vec![split.into(), ByteLevel::new(false, true, false).into()];
            inner.with_pre_tokenizer(Some(Sequence::new(seq)));
        }
        other => {
            return Err(model_err(format!(
                "BPE pre-tokenizer {other:?} is not supported (default, gpt2, smollm, \
                 llama-bpe, qwen2 are)"
            )));
        }
    }
    Ok(inner)
}

/// A SentencePiece BPE vocabulary: pieces with scores and types, merged as llama.cpp's
/// `llm_tokenizer_spm` merges them.
struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    /// Piece text → id (a text held twice maps to the later id, as in llama.cpp).
    index: HashMap<String, u32>,
    bytes: [Option<u32>; 256],
    /// `<unk>`, for a byte without a byte piece.
    unknown: Option<u32>,
    add_space_prefix: bool,
    specials: Specials,
}

/// A candidate merge of two neighbouring symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Highest score first; among equal scores the leftmost.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A symbol of the text being merged: `start..start + len` bytes, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    fn new(meta: &Meta<'_>, tokens: &[&str], types: &[i32]) -> Result<Self> {
        let scores: Vec<f32> = match meta.array("tokenizer.ggml.scores") {
            Some(a) if a.len() == tokens.len() => {
                a.iter().map(|v| as_float(v).unwrap_or(0.0)).collect()
            }
            Some(a) => {
                return Err(model_err(format!(
                    "{} token scores for {} tokens",
                    a.len(),
                    tokens.len()
                )));
            }
            None => vec![0.0; tokens.len()],
        };
        let mut index = HashMap::with_capacity(tokens.len());
        let mut bytes = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            let id = u32::try_from(i).map_err(model_err)?;
            index.insert((*t).to_owned(), id);
            if types[i] == TYPE_BYTE
                && let Some(hex) = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
                && let Ok(b) = u8::from_str_radix(hex, 16)
            {
                bytes[b as usize] = Some(id);
            }
        }
        let specials = Specials::new(tokens, types)?;
        Ok(Self {
            pieces: tokens.iter().map(|t| (*t).to_owned()).collect(),
            scores,
            types: types.to_vec(),
            index,
            bytes,
            unknown: meta
                .uint("tokenizer.ggml.unknown_token_id")
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len()),
            add_space_prefix: meta.flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
            specials,
        })
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        // The first text fragment of a prompt gets the prefix space, as does text after a
        // special token.
        let mut prev_special = true;
        for frag in self.specials.partition(text) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    self.merge(&s.replace(' ', "\u{2581}"), out);
                    prev_special = false;
                }
            }
        }
    }

    /// Merges the characters of `text` into pieces, highest-scoring pair first.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol {
                start,
                len: c.len_utf8(),
                prev: None,
                next: None,
            })
            .collect();
        let n = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < n).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (l, r) = (left?, right?);
            let (sl, sr) = (symbols[l], symbols[r]);
            let piece = &text[sl.start..sr.start + sr.len];
            let id = *self.index.get(piece)?;
            Some(Bigram {
                score: self.scores[id as usize],
                left: l,
                right: r,
                size: piece.len(),
            })
        };
        for i in 1..n {
            queue.extend(bigram(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(next) = r.next {
                symbols[next].prev = Some(b.left);
            }
            queue.extend(bigram(&symbols, symbols[b.left].prev, Some(b.left)));
            queue.extend(bigram(&symbols, Some(b.left), symbols[b.left].next));
        }
        let mut i = (n > 0).then_some(0);
        while let Some(at) = i {
            let s = symbols[at];
            let piece = &text[s.start..s.start + s.len];
            match self.index.get(piece) {
                Some(id) => out.push(*id),
                // No piece covers it: its bytes (a piece formed by merging always exists), the
                // unknown token for a byte the vocabulary lacks.
                None => out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.bytes[b as usize].or(self.unknown)),
                ),
            }
            i = s.next;
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(piece) = self.pieces.get(id as usize) else {
                continue;
            };
            match self.types[id as usize] {
                TYPE_USER_DEFINED => bytes.extend_from_slice(piece.as_bytes()),
                TYPE_BYTE => {
                    if let Some(b) = piece
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes.push(b);
                    }
                }
                TYPE_NORMAL => bytes.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes()),
                // Control, unknown, unused and types llama.cpp does not know: nothing, as
                // llama.cpp suppresses them.
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The special tokens a text may name: control, user-defined and unknown pieces.
struct Specials {
    /// Finds which of them occur at all (overlapping matches).
    finder: Option<AhoCorasick>,
    /// Pattern index → (token id, text).
    tokens: Vec<(u32, String)>,
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl Specials {
    fn new(tokens: &[&str], types: &[i32]) -> Result<Self> {
        let mut specials: Vec<(u32, String)> = tokens
            .iter()
            .zip(types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                !t.is_empty() && matches!(**ty, TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN)
            })
            .map(|(i, (t, _))| (i as u32, (*t).to_owned()))
            .collect();
        // Longest first (llama.cpp's order), ties by id so the order is fixed.
        specials.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let finder = if specials.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(specials.iter().map(|(_, t)| t)).map_err(model_err)?)
        };
        Ok(Self {
            finder,
            tokens: specials,
        })
    }

    /// Splits `text` at the special tokens it names: each special token, longest first, is
    /// cut out of every text fragment still left, left to right.
    fn partition<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        let Some(finder) = &self.finder else {
            return frags;
        };
        let mut present: Vec<usize> = finder
            .find_overlapping_iter(text)
            .map(|m| m.pattern().as_usize())
            .collect();
        present.sort_unstable();
        present.dedup();
        for p in present {
            let (id, special) = &self.tokens[p];
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = rest.find(special.as_str()) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(*id));
                    rest = &rest[at + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            frags = next;
        }
        frags
    }
}

/// A chat template: the GGUF's own, or the architecture's known one, compiled once.
struct ChatTemplate {
    env: minijinja::Environment<'static>,
    origin: String,
    bos: String,
    eos: String,
}

/// Gemma's turns (`<start_of_turn>user … <end_of_turn>`, the assistant is `model`, a system
/// message opens the first user turn), as in Gemma's own template.
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] | trim ~ '\n\n' %}{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ (first if loop.first else '') ~ (message['content'] | trim) }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// Llama 3's headers.
const LLAMA3_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

/// Llama 2 / Mistral `[INST]` turns (a system message folded into the first instruction).
const INST_TEMPLATE: &str = "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] | trim ~ '\n\n' %}{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ (first if loop.first else '') ~ (message['content'] | trim) }} [/INST]{% else %}{{ message['content'] | trim }}{{ eos_token }}{% endif %}{% endfor %}";

/// ChatML (SmolLM2, Qwen, …).
const CHATML_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

impl ChatTemplate {
    fn new(
        source: Option<&str>,
        arch: &str,
        tokens: &[&str],
        bos: String,
        eos: String,
    ) -> Result<Self> {
        let has = |t: &str| tokens.contains(&t);
        let (origin, source) = match source {
            Some(s) if !s.trim().is_empty() => ("gguf", s.to_owned()),
            _ if arch.starts_with("gemma") || has("<start_of_turn>") => {
                ("gemma", GEMMA_TEMPLATE.into())
            }
            _ if has("<|start_header_id|>") => ("llama3", LLAMA3_TEMPLATE.into()),
            _ if has("<|im_start|>") => ("chatml", CHATML_TEMPLATE.into()),
            _ if matches!(arch, "llama" | "mistral") && has("[INST]") || arch == "mistral" => {
                ("inst", INST_TEMPLATE.into())
            }
            _ => ("chatml", CHATML_TEMPLATE.into()),
        };
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Templates print today's date with it; a fixed date keeps prompts (and their
            // cached prefixes) the same from one day to the next.
            "01 Jan 2026".to_owned()
        });
        env.add_template_owned("chat", source)
            .map_err(|e| model_err(format!("the GGUF's chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            origin: origin.into(),
            bos,
            eos,
        })
    }

    fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.env.get_template("chat").map_err(model_err)?;
        let messages: Vec<HashMap<&str, &str>> = messages
            .iter()
            .map(|m| HashMap::from([("role", m.role.as_str()), ("content", m.content.as_str())]))
            .collect();
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| model_err(format!("cannot apply the chat template: {e}")))
    }
}

/// Detokenises one sequence as its tokens come, decoding only a short window each time (the
/// text since the last two emitted points), so a long output costs O(n), not O(n²). Text that
/// ends inside a UTF-8 character is held back until the character completes.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl TextStream {
    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &ModelTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.ends_with('\u{FFFD}') || now.len() <= before.len() || !now.starts_with(&before) {
            return Ok(None);
        }
        let new = now[before.len()..].to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(new))
    }

    /// The text still held back (an incomplete character at the end), given up at the end.
    pub fn flush(&mut self, tok: &ModelTokenizer) -> Result<String> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_owned())
    }
}

/// ChatML over `messages`: each message as `<|im_start|>role\ncontent<|im_end|>\n`, then the
/// opening of the assistant's turn. For a gateway that estimates the size of a chat for a model
/// it cannot tokenize; a model's own template is [`ModelTokenizer::chat_prompt`].
pub fn chatml(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm(pieces: &[(&str, f32, i32)], add_space_prefix: bool) -> Spm {
        let tokens: Vec<&str> = pieces.iter().map(|p| p.0).collect();
        let types: Vec<i32> = pieces.iter().map(|p| p.2).collect();
        let mut index = HashMap::new();
        let mut bytes = [None; 256];
        for (i, (t, _, ty)) in pieces.iter().enumerate() {
            index.insert((*t).to_owned(), i as u32);
            if *ty == TYPE_BYTE {
                let b = u8::from_str_radix(&t[3..5], 16).unwrap();
                bytes[b as usize] = Some(i as u32);
            }
        }
        Spm {
            pieces: tokens.iter().map(|t| (*t).to_owned()).collect(),
            scores: pieces.iter().map(|p| p.1).collect(),
            types: types.clone(),
            index,
            bytes,
            unknown: Some(0),
            add_space_prefix,
            specials: Specials::new(&tokens, &types).unwrap(),
        }
    }

    #[test]
    fn sentencepiece_merges_the_best_pair_first_and_falls_back_to_bytes() {
        let mut pieces: Vec<(String, f32, i32)> = vec![
            ("<unk>".into(), 0.0, TYPE_UNKNOWN),
            ("<s>".into(), 0.0, TYPE_CONTROL),
            ("<eot>".into(), 0.0, TYPE_CONTROL),
            ("▁".into(), -1.0, TYPE_NORMAL),
            ("a".into(), -2.0, TYPE_NORMAL),
            ("b".into(), -2.0, TYPE_NORMAL),
            ("c".into(), -2.0, TYPE_NORMAL),
            ("ab".into(), -5.0, TYPE_NORMAL),
            ("bc".into(), -3.0, TYPE_NORMAL),
            ("▁a".into(), -4.0, TYPE_NORMAL),
            ("▁b".into(), -9.0, TYPE_NORMAL),
        ];
        for b in 0..=255u8 {
            pieces.push((format!("<0x{b:02X}>"), 0.0, TYPE_BYTE));
        }
        let refs: Vec<(&str, f32, i32)> = pieces
            .iter()
            .map(|(t, s, ty)| (t.as_str(), *s, *ty))
            .collect();
        let v = spm(&refs, false);
        let id = |t: &str| v.index[t];
        let mut out = Vec::new();
        // "bc" scores higher than "ab": a + bc (no piece "abc" to merge them further).
        v.encode("abc", &mut out);
        assert_eq!(out, vec![id("a"), id("bc")]);
        out.clear();
        // A space is ▁, merged with what follows; "é" (two bytes) has no piece: its bytes.
        v.encode(" ab é", &mut out);
        assert_eq!(
            out,
            vec![id("▁a"), id("b"), id("▁"), id("<0xC3>"), id("<0xA9>")]
        );
        assert_eq!(v.decode(&out), " ab é");
        out.clear();
        // A special token in the text is one token; control tokens decode to nothing.
        v.encode("a<eot>b", &mut out);
        assert_eq!(out, vec![id("a"), id("<eot>"), id("b")]);
        assert_eq!(v.decode(&out), "ab");
        // With the prefix space, the first fragment and the one after a special token get it.
        let v = spm(&refs, true);
        out.clear();
        v.encode("a<eot>a", &mut out);
        assert_eq!(out, vec![id("▁a"), id("<eot>"), id("▁a")]);
    }

    #[test]
    fn the_longest_special_token_is_cut_out_first() {
        let tokens = ["x", "<a>", "<a><b>", "<b>"];
        let types = [TYPE_NORMAL, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_CONTROL];
        let s = Specials::new(&tokens, &types).unwrap();
        let ids: Vec<String> = s
            .partition("x<a><b><b>x<a>")
            .iter()
            .map(|f| match f {
                Fragment::Text(t) => (*t).to_owned(),
                Fragment::Token(id) => format!("#{id}"),
            })
            .collect();
        assert_eq!(ids, ["x", "#2", "#3", "x", "#1"]);
    }

    #[test]
    fn known_templates_render_turns() {
        let msgs = chat(&[("system", "Be brief."), ("user", "Hi")]);
        let gemma = ChatTemplate::new(None, "gemma3", &[], "<bos>".into(), "<eos>".into()).unwrap();
        assert_eq!(
            gemma.render(&msgs).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        let chatml = ChatTemplate::new(
            None,
            "qwen2",
            &["<|im_start|>"],
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(chatml.render(&msgs).unwrap(), chatml_of(&msgs));
        // A file's own template wins, Python string methods work, and errors are clear.
        let own = ChatTemplate::new(
            Some("{% for m in messages %}{{ m['content'].upper() }}|{% endfor %}"),
            "llama",
            &[],
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(own.render(&msgs).unwrap(), "BE BRIEF.|HI|");
        let raising = ChatTemplate::new(
            Some("{{ raise_exception('roles must alternate') }}"),
            "llama",
            &[],
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = raising.render(&msgs).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        assert!(
            ChatTemplate::new(
                Some("{% for %}"),
                "llama",
                &[],
                String::new(),
                String::new()
            )
            .is_err()
        );
    }

    #[test]
    fn llama_2_and_mistral_files_without_a_template_get_inst_turns() {
        let msgs = chat(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Bye"),
        ]);
        let inst =
            ChatTemplate::new(None, "llama", &["[INST]"], "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(inst.origin, "inst");
        assert_eq!(
            inst.render(&msgs).unwrap(),
            "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Bye [/INST]"
        );
        let llama3 = ChatTemplate::new(
            None,
            "llama",
            &["<|start_header_id|>"],
            "<|begin_of_text|>".into(),
            String::new(),
        )
        .unwrap();
        assert!(
            llama3
                .render(&msgs[1..2])
                .unwrap()
                .ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n")
        );
    }

    /// Messages from `(role, content)` pairs.
    fn chat(turns: &[(&str, &str)]) -> Vec<ChatMessage> {
        turns
            .iter()
            .map(|(role, content)| ChatMessage {
                role: (*role).into(),
                content: (*content).into(),
            })
            .collect()
    }

    fn chatml_of(msgs: &[ChatMessage]) -> String {
        chatml(msgs)
    }
}
