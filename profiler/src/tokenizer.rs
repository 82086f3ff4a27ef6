//! Tokenizers built from GGUF metadata, and the ChatML template of the default model.

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use metainf_protocol::ChatMessage;
use tokenizers::Tokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::error::{ProfilerError, Result};

/// A model's tokenizer with its end-of-turn tokens.
pub struct ModelTokenizer {
    inner: Tokenizer,
    stop_ids: Vec<u32>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

impl ModelTokenizer {
    /// Builds the tokenizer from a GGUF's metadata. candle treats the `smollm` pre-tokenizer as
    /// GPT-2's, which puts a space before every segment; SmolLM2 splits digits individually and
    /// adds no prefix space.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let mut inner = Tokenizer::from_gguf(content)
            .map_err(|e| ProfilerError::Model(format!("cannot build the tokenizer: {e}")))?;
        let pre = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        if pre == "smollm" {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        let mut stop_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = content.metadata.get(key).and_then(|v| v.to_u32().ok())
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        if let Some(id) = inner.token_to_id("<|im_end|>")
            && !stop_ids.contains(&id)
        {
            stop_ids.push(id);
        }
        Ok(Self { inner, stop_ids })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ProfilerError::Model(format!("cannot tokenize: {e}")))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ProfilerError::Model(format!("cannot detokenize: {e}")))
    }

    /// Tokens that end a turn.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
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

/// The ChatML template (SmolLM2, Qwen, ...): each message as
/// `<|im_start|>role\ncontent<|im_end|>\n`, then the opening of the assistant's turn.
pub fn chat_template(messages: &[ChatMessage]) -> String {
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
