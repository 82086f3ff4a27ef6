//! The forward pass of Llama-style models (Llama, Qwen 2/3, Gemma 3: [`Arch`]) over a packed batch of tokens from many sequences.
//!
//! candle reads the GGUF and dequantizes its tensors; the weights are then held as Q8_0 blocks
//! and multiplied with the engine's own tiled kernels ([`super::kernels`]), spread over the
//! engine's thread pool, and attention reads each sequence's keys and values from its paged KV
//! blocks.
//!
//! Every output element is computed from its own row alone (one activation row quantized on
//! its own, one dot product per weight row, attention over positions in a fixed order), so a
//! token's result does not depend on which other tokens share its batch, how its prompt was
//! chunked, or whether its prefix came from the cache: methods change speed, never results.

use std::path::Path;

use candle_core::Device;
use rayon::prelude::*;

use super::kernels::{self, Isa, Q8Block, QK, Weight, XBlock};
use super::kv::KvPool;
use super::quant::{self, Blocks};
use crate::error::{ProfilerError, Result};
use crate::gguf::Meta;
use crate::tokenizer::ModelTokenizer;

/// The architectures the forward pass knows, each a set of parts on one Llama-style block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3, Mistral, SmolLM, TinyLlama (GGUF `llama`): interleaved RoPE, SwiGLU,
    /// optional Llama 3 frequency factors (`rope_freqs.weight`) and linear RoPE scaling.
    Llama,
    /// Qwen 2 / 2.5: biases on Q, K and V, NeoX RoPE.
    Qwen2,
    /// Qwen 3: RMS norm on each query and key head, NeoX RoPE.
    Qwen3,
    /// Gemma 3: embeddings scaled by √hidden, norms after attention and feed-forward too,
    /// query/key head norms, GeGLU, sliding-window layers (five of every six) with their own
    /// RoPE base.
    Gemma3,
}

impl Arch {
    /// The architecture a GGUF names, or a clear error.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(ProfilerError::Model(format!(
                    "architecture {other:?} is not supported (llama, qwen2, qwen3 and gemma3 \
                     are; Mistral and Llama 3 files are llama)"
                )));
            }
        })
    }

    /// The GGUF name (the prefix of its metadata keys).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Whether RoPE rotates the two halves of a head (NeoX) rather than neighbouring pairs.
    fn neox(self) -> bool {
        !matches!(self, Arch::Llama)
    }
}

/// Shape of a model, read from its GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Hidden size.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Size of one head (`key_length`; hidden / heads where the file does not say).
    pub head_dim: usize,
    /// Feed-forward size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency (of the global layers).
    pub rope_theta: f32,
    /// RoPE base of the sliding-window layers.
    pub rope_theta_local: f32,
    /// Dimensions of a head RoPE rotates.
    pub rope_dims: usize,
    /// RoPE frequency scale (1 / the linear scaling factor).
    pub rope_scale: f32,
    /// RoPE frequency scale of the sliding-window layers (Gemma 3's are unscaled).
    pub rope_scale_local: f32,
    /// Multiplies each query·key product (1/√head size; Gemma 3 27B: 1/√(hidden / heads)).
    pub attn_scale: f32,
    /// Positions a sliding-window layer attends to (itself included).
    pub sliding_window: Option<usize>,
    /// Longest context the model was trained for.
    pub context_length: usize,
}

impl ModelConfig {
    /// Bytes of KV cache one token takes (f16 keys and values, every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * std::mem::size_of::<half::f16>()
    }
}

/// A weight matrix of `rows` output features × `cols` inputs: one or more row ranges, each in
/// the block format its tensor came in ([`super::quant`]).
pub(crate) struct QMatrix {
    rows: usize,
    cols: usize,
    parts: Vec<Part>,
}

struct Part {
    row0: usize,
    rows: usize,
    blocks: Blocks,
}

/// Weight rows per parallel task of a matmul: a tile of rows stays in L1 while every
/// activation row passes over it.
const ROW_TILE: usize = 16;

impl QMatrix {
    /// Stacks `tensors` (each `(name, rows, cols, blocks)`, all with `cols` columns) row-wise;
    /// neighbours of the same format share one part.
    fn stack(tensors: Vec<(String, usize, usize, Blocks)>) -> Result<Self> {
        let mut rows = 0;
        let mut cols = 0;
        let mut parts: Vec<Part> = Vec::new();
        for (name, r, c, blocks) in tensors {
            if cols != 0 && c != cols {
                return Err(ProfilerError::Model(format!(
                    "tensor {name}: {c} columns, expected {cols}"
                )));
            }
            cols = c;
            let unmerged = match parts.last_mut() {
                Some(last) => last.blocks.append(blocks),
                None => Some(blocks),
            };
            match unmerged {
                Some(blocks) => parts.push(Part {
                    row0: rows,
                    rows: r,
                    blocks,
                }),
                None => {
                    if let Some(last) = parts.last_mut() {
                        last.rows += r;
                    }
                }
            }
            rows += r;
        }
        Ok(Self { rows, cols, parts })
    }

    /// A Q8 matrix of `values` (the probe's synthetic weights).
    fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        let mut b = vec![Q8Block::ZERO; rows * cols / QK];
        for (b, v) in b.chunks_mut(cols / QK).zip(values.chunks(cols)) {
            Q8Block::quantize(v, b);
        }
        Self::stack(vec![("test".into(), rows, cols, Blocks::Q8(b))])
    }

    /// Bytes one pass over the weights streams.
    pub(crate) fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.blocks.bytes()).sum()
    }

    /// Dequantizes row `r` into `out` (the embedding lookup).
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        let kb = self.cols / QK;
        if let Some(p) = self
            .parts
            .iter()
            .find(|p| r >= p.row0 && r < p.row0 + p.rows)
        {
            p.blocks.dequantize((r - p.row0) * kb, out);
        }
    }

    /// `out[t × rows] = x[t × cols] · selfᵀ`, in the current rayon pool.
    fn matmul(&self, isa: Isa, x: &[f32], t: usize, out: &mut Vec<f32>) {
        let (n, k, kb) = (self.rows, self.cols, self.cols / QK);
        let mut xq = vec![XBlock::ZERO; t * kb];
        if t == 1 {
            kernels::quantize(x, &mut xq);
        } else {
            xq.par_chunks_mut(kb)
                .zip(x.par_chunks(k))
                .for_each(|(q, row)| kernels::quantize(row, q));
        }
        if t >= ROWS_PATH_MIN {
            // Long prompts: tasks over blocks of activation rows, each writing its own rows of
            // the row-major result (no transpose), weights unpacked once per matmul.
            out.clear();
            out.resize(t * n, 0.0);
            let per_task = t
                .div_ceil(4 * rayon::current_num_threads())
                .clamp(16, 64)
                .next_multiple_of(2);
            for p in &self.parts {
                match &p.blocks {
                    Blocks::Q8(b) => by_rows(isa, b, kb, &xq, n, p.row0, per_task, out),
                    Blocks::Q6(b) => by_rows(isa, b, kb, &xq, n, p.row0, per_task, out),
                    Blocks::Q4(b) => {
                        let mut wide = Vec::new();
                        Weight::widen_all(isa, b, &mut wide);
                        by_rows(isa, &wide, kb, &xq, n, p.row0, per_task, out);
                    }
                }
            }
            return;
        }
        // Column-major result so each task writes one contiguous slice.
        let mut out_t = vec![0f32; n * t];
        for p in &self.parts {
            let slice = &mut out_t[p.row0 * t..(p.row0 + p.rows) * t];
            match &p.blocks {
                Blocks::Q8(b) => tiles(isa, b, kb, &xq, t, slice),
                Blocks::Q6(b) => tiles(isa, b, kb, &xq, t, slice),
                Blocks::Q4(b) => tiles(isa, b, kb, &xq, t, slice),
            }
        }
        out.clear();
        out.resize(t * n, 0.0);
        if t == 1 {
            out.copy_from_slice(&out_t);
        } else {
            // Transposed in blocks of 16 activation rows: each read of `out_t` is one cache
            // line, and a block's output rows stay in L2.
            const ROWS: usize = 16;
            out.par_chunks_mut(ROWS * n)
                .enumerate()
                .for_each(|(block, rows)| {
                    let r0 = block * ROWS;
                    let count = rows.len() / n;
                    for (c, col) in out_t.chunks_exact(t).enumerate() {
                        for (i, v) in col[r0..r0 + count].iter().enumerate() {
                            rows[i * n + c] = *v;
                        }
                    }
                });
        }
    }
}

/// Activation rows from which a tile of weights is unpacked ([`Weight::Wide`]) before the
/// rows pass over it: the unpacking is paid once per tile instead of once per row pair.
const WIDEN_MIN_ROWS: usize = 8;

/// `out_t[row × t + r] = w[row] · x[r]` over weight rows of `kb` blocks each.
fn tiles<W: Weight>(isa: Isa, w: &[W], kb: usize, xq: &[XBlock], t: usize, out_t: &mut [f32]) {
    let widen = W::WIDENS && t >= WIDEN_MIN_ROWS;
    out_t
        .par_chunks_mut(ROW_TILE * t)
        .enumerate()
        .for_each_init(Vec::new, |wide: &mut Vec<W::Wide>, (tile, chunk)| {
            let rows = &w[tile * ROW_TILE * kb..][..chunk.len() / t * kb];
            if widen {
                W::widen_all(isa, rows, wide);
                tile_rows(isa, wide, kb, xq, t, chunk);
            } else {
                tile_rows(isa, rows, kb, xq, t, chunk);
            }
        });
}

/// Activation rows from which a matmul splits its work by activation rows instead of weight
/// rows.
const ROWS_PATH_MIN: usize = 128;

/// `out[r × n + col0 + c] = w[c] · x[r]` for every activation row, in tasks of `per_task` rows;
/// each task passes every weight tile over its rows (a tile's 16 weight rows stay in L1).
#[allow(clippy::too_many_arguments)]
fn by_rows<W: Weight>(
    isa: Isa,
    w: &[W],
    kb: usize,
    xq: &[XBlock],
    n: usize,
    col0: usize,
    per_task: usize,
    out: &mut [f32],
) {
    let cols = w.len() / kb;
    out.par_chunks_mut(per_task * n).enumerate().for_each_init(
        Vec::new,
        |buf: &mut Vec<f32>, (task, rows_out)| {
            let r0 = task * per_task;
            let rows = rows_out.len() / n;
            let xs = &xq[r0 * kb..(r0 + rows) * kb];
            for c0 in (0..cols).step_by(ROW_TILE) {
                let c1 = (c0 + ROW_TILE).min(cols);
                buf.clear();
                buf.resize((c1 - c0) * rows, 0.0);
                tile_rows(isa, &w[c0 * kb..c1 * kb], kb, xs, rows, buf);
                for (j, col) in buf.chunks_exact(rows).enumerate() {
                    for (i, v) in col.iter().enumerate() {
                        rows_out[i * n + col0 + c0 + j] = *v;
                    }
                }
            }
        },
    );
}

/// One task's rows: `chunk[row × t + r] = w[row] · x[r]`.
fn tile_rows<W: Weight>(isa: Isa, w: &[W], kb: usize, xq: &[XBlock], t: usize, chunk: &mut [f32]) {
    let cols = chunk.len() / t;
    let mut acc = [[0f32; 2]; 4];
    for r0 in (0..t).step_by(2) {
        let r1 = (r0 + 2).min(t);
        let mut xs: [&[XBlock]; 2] = [&[]; 2];
        for (slot, r) in xs.iter_mut().zip(r0..r1) {
            *slot = &xq[r * kb..(r + 1) * kb];
        }
        for c in (0..cols).step_by(4) {
            let c1 = (c + 4).min(cols);
            let mut ws: [&[W]; 4] = [&[]; 4];
            for (slot, j) in ws.iter_mut().zip(c..c1) {
                *slot = &w[j * kb..(j + 1) * kb];
            }
            W::dot_tile(isa, &ws[..c1 - c], &xs[..r1 - r0], &mut acc);
            for j in 0..c1 - c {
                for r in 0..r1 - r0 {
                    chunk[(c + j) * t + r0 + r] = acc[j][r];
                }
            }
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked: one matmul instead of three.
    wqkv: QMatrix,
    /// Biases of Q, K and V, stacked (Qwen 2).
    qkv_bias: Option<Vec<f32>>,
    /// RMS norm weights of each query and key head (Qwen 3, Gemma 3).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    wo: QMatrix,
    /// Norm of the attention's output before the residual add (Gemma 3).
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// Gate and up stacked.
    w_gate_up: QMatrix,
    w_down: QMatrix,
    /// Norm of the feed-forward's output before the residual add (Gemma 3).
    post_ffn_norm: Option<Vec<f32>>,
    /// Attends to the last `sliding_window` positions only, with the local RoPE base.
    sliding: bool,
}

/// A loaded model: weights, tokenizer and RoPE parameters.
pub struct Model {
    /// The model's shape.
    pub config: ModelConfig,
    tokenizer: ModelTokenizer,
    embed: QMatrix,
    /// Multiplies every embedding row (√hidden for Gemma, else 1).
    embed_scale: f32,
    /// `None`: the output head is tied to the embedding.
    output: Option<QMatrix>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    /// Llama 3's RoPE frequency divisors, one per rotated pair.
    rope_freqs: Option<Vec<f32>>,
    isa: Isa,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One token of a step: which sequence (index into the step's block tables), its position,
/// and whether its logits are wanted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepToken {
    pub(crate) token: u32,
    pub(crate) pos: usize,
    pub(crate) seq: usize,
    pub(crate) logits: bool,
}

impl Model {
    /// Loads a GGUF of a known architecture ([`Arch`]). Weights keep their 4- and 8-bit blocks
    /// where the kernels read them natively and are requantized to 8 bits otherwise
    /// ([`super::quant`]).
    pub fn load(path: &Path) -> Result<Self> {
        let err = |m: String| ProfilerError::Model(m);
        let (mut file, content) = crate::gguf::open(path)?;
        let md = Meta(&content);
        let arch = Arch::from_name(md.text("general.architecture").unwrap_or_default())?;
        let key = |k: &str| format!("{}.{k}", arch.name());
        let int = |k: &str| -> Result<usize> {
            md.uint(&key(k))
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| err(format!("GGUF metadata lacks {}", key(k))))
        };
        let float = |k: &str, default: f32| md.float(&key(k)).unwrap_or(default);
        let hidden = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || hidden == 0 {
            return Err(err(format!(
                "unsupported head layout: {heads} heads, {kv_heads} kv heads, hidden {hidden}"
            )));
        }
        let head_dim = match int("attention.key_length") {
            Ok(d) => d,
            Err(_) if hidden.is_multiple_of(heads) => hidden / heads,
            Err(_) => {
                return Err(err(format!(
                    "hidden {hidden} is not a multiple of {heads} heads"
                )));
            }
        };
        if int("attention.value_length").is_ok_and(|v| v != head_dim) {
            return Err(err(
                "key and value heads of different sizes are not supported".into(),
            ));
        }
        let rope_dims = int("rope.dimension_count").unwrap_or(head_dim);
        if heads > 4096 || kv_heads > heads || head_dim > 4096 || hidden > 1 << 20 {
            return Err(err(format!(
                "unsupported sizes: {heads} heads, {kv_heads} kv heads of {head_dim}, hidden \
                 {hidden}"
            )));
        }
        if head_dim == 0
            || !head_dim.is_multiple_of(2)
            || rope_dims == 0
            || rope_dims > head_dim
            || !rope_dims.is_multiple_of(2)
        {
            return Err(err(format!(
                "unsupported head size {head_dim} (RoPE over {rope_dims})"
            )));
        }
        // As llama.cpp reads it: linear unless the file says otherwise, the factor under its
        // current or its old key.
        let rope_scale = match md.text(&key("rope.scaling.type")) {
            Some("none") => 1.0,
            None | Some("linear") => {
                let factor = md
                    .float(&key("rope.scaling.factor"))
                    .or_else(|| md.float(&key("rope.scale_linear")))
                    .unwrap_or(0.0);
                if factor > 0.0 && factor.is_finite() {
                    1.0 / factor
                } else {
                    1.0
                }
            }
            Some(other) => {
                return Err(err(format!(
                    "RoPE scaling {other:?} is not supported (linear is)"
                )));
            }
        };
        let layers_n = int("block_count")?;
        if layers_n == 0 || layers_n > 1024 {
            return Err(err(format!("{layers_n} blocks")));
        }
        let sliding_window = match arch {
            Arch::Gemma3 => int("attention.sliding_window").ok().filter(|w| *w > 0),
            _ => None,
        };
        // Gemma 3: five sliding-window layers, then a global one (llama.cpp's pattern of 6).
        let pattern = int("attention.sliding_window_pattern").unwrap_or(6).max(1);
        let sliding = |i: usize| sliding_window.is_some() && i % pattern < pattern - 1;
        let tokenizer = ModelTokenizer::from_gguf(&content)?;
        let has = |name: &str| content.tensor_infos.contains_key(name);
        let mut tensor = |name: &str| {
            content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| err(format!("tensor {name}: {e}")))
        };
        let mut matrix = |names: &[&str]| -> Result<QMatrix> {
            let mut parts = Vec::with_capacity(names.len());
            for name in names {
                let q = tensor(name)?;
                let (r, c) = match q.shape().dims() {
                    [r, c] => (*r, *c),
                    other => {
                        return Err(err(format!(
                            "tensor {name} has shape {other:?}, expected a matrix"
                        )));
                    }
                };
                parts.push((name.to_string(), r, c, quant::blocks(name, &q, r, c)?));
            }
            QMatrix::stack(parts)
        };
        let embed = matrix(&["token_embd.weight"])?;
        let vocab = embed.rows;
        let output = if has("output.weight") {
            Some(matrix(&["output.weight"])?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let wqkv = matrix(&[&p("attn_q"), &p("attn_k"), &p("attn_v")])?;
            let wo = matrix(&[&p("attn_output")])?;
            let w_gate_up = matrix(&[&p("ffn_gate"), &p("ffn_up")])?;
            let w_down = matrix(&[&p("ffn_down")])?;
            layers.push(Layer {
                attn_norm: Vec::new(),
                wqkv,
                qkv_bias: None,
                q_norm: None,
                k_norm: None,
                wo,
                post_attn_norm: None,
                ffn_norm: Vec::new(),
                w_gate_up,
                w_down,
                post_ffn_norm: None,
                sliding: sliding(i),
            });
        }
        let mut vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            let v = content
                .tensor(&mut file, name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| err(format!("tensor {name}: {e}")))?;
            if v.len() != len {
                return Err(err(format!(
                    "tensor {name} has {} values, expected {len}",
                    v.len()
                )));
            }
            Ok(v)
        };
        let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
        for (i, layer) in layers.iter_mut().enumerate() {
            let p = |s: &str| format!("blk.{i}.{s}");
            layer.attn_norm = vector(&p("attn_norm.weight"), hidden)?;
            layer.ffn_norm = vector(&p("ffn_norm.weight"), hidden)?;
            match arch {
                Arch::Llama => {}
                Arch::Qwen2 => {
                    let mut bias = vector(&p("attn_q.bias"), q_dim)?;
                    bias.extend(vector(&p("attn_k.bias"), kv_dim)?);
                    bias.extend(vector(&p("attn_v.bias"), kv_dim)?);
                    layer.qkv_bias = Some(bias);
                }
                Arch::Qwen3 | Arch::Gemma3 => {
                    layer.q_norm = Some(vector(&p("attn_q_norm.weight"), head_dim)?);
                    layer.k_norm = Some(vector(&p("attn_k_norm.weight"), head_dim)?);
                }
            }
            if arch == Arch::Gemma3 {
                layer.post_attn_norm = Some(vector(&p("post_attention_norm.weight"), hidden)?);
                layer.post_ffn_norm = Some(vector(&p("post_ffw_norm.weight"), hidden)?);
            }
        }
        let norm = vector("output_norm.weight", hidden)?;
        let rope_freqs = if has("rope_freqs.weight") {
            Some(vector("rope_freqs.weight", rope_dims / 2)?)
        } else {
            None
        };
        let ffn = layers.first().map_or(0, |l| l.w_down.cols);
        if ffn == 0 || layers.iter().any(|l| l.w_down.cols != ffn) {
            return Err(err(
                "feed-forward sizes differ between layers or are 0".into()
            ));
        }
        let rope_theta = float("rope.freq_base", 10_000.0);
        let config = ModelConfig {
            arch,
            hidden,
            layers: layers_n,
            heads,
            kv_heads,
            head_dim,
            ffn,
            vocab,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta,
            rope_theta_local: match arch {
                Arch::Gemma3 => float("rope.freq_base_swa", 10_000.0),
                _ => rope_theta,
            },
            rope_dims,
            rope_scale,
            // llama.cpp: Gemma 3's sliding-window layers are never scaled.
            rope_scale_local: match arch {
                Arch::Gemma3 => 1.0,
                _ => rope_scale,
            },
            attn_scale: match arch {
                // llama.cpp (after gemma_pytorch): the 27B model (62 blocks) scales by the
                // hidden size per head, the others by the head size.
                Arch::Gemma3 if layers_n == 62 => 1.0 / ((hidden / heads) as f32).sqrt(),
                _ => 1.0 / (head_dim as f32).sqrt(),
            },
            sliding_window,
            context_length: int("context_length").unwrap_or(4096),
        };
        for layer in &layers {
            if layer.wqkv.rows != q_dim + 2 * kv_dim
                || layer.wqkv.cols != hidden
                || layer.wo.rows != hidden
                || layer.wo.cols != q_dim
                || layer.w_gate_up.rows != 2 * ffn
                || layer.w_gate_up.cols != hidden
                || layer.w_down.rows != hidden
            {
                return Err(err("layer shapes disagree with the metadata".into()));
            }
        }
        if embed.cols != hidden
            || output
                .as_ref()
                .is_some_and(|o| o.cols != hidden || o.rows != vocab)
        {
            return Err(err(
                "embedding or output head disagrees with the metadata".into()
            ));
        }
        if tokenizer.vocab_size() > vocab {
            return Err(err(format!(
                "the tokenizer has {} tokens, the embedding {vocab}",
                tokenizer.vocab_size()
            )));
        }
        Ok(Self {
            config,
            tokenizer,
            embed,
            embed_scale: match arch {
                Arch::Gemma3 => (hidden as f32).sqrt(),
                _ => 1.0,
            },
            output,
            norm,
            layers,
            rope_freqs,
            isa: Isa::detect(),
        })
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &ModelTokenizer {
        &self.tokenizer
    }

    /// Bytes of weights one decode step streams (every matrix once, the output head
    /// included; the embedding lookup reads one row).
    pub fn weight_bytes_per_step(&self) -> usize {
        self.matrices().map(QMatrix::bytes).sum()
    }

    /// Multiply-adds per token of the matrices (attention over positions excluded).
    pub fn matmul_params(&self) -> usize {
        self.matrices().map(|m| m.rows * m.cols).sum()
    }

    /// The formats the weights are held in, with the bytes of each (e.g. `q4 66.4 MB`).
    pub fn weight_formats(&self) -> Vec<(&'static str, usize)> {
        let mut out: Vec<(&'static str, usize)> = Vec::new();
        for p in self.matrices().flat_map(|m| m.parts.iter()) {
            let f = p.blocks.format();
            match out.iter_mut().find(|(name, _)| *name == f) {
                Some((_, bytes)) => *bytes += p.blocks.bytes(),
                None => out.push((f, p.blocks.bytes())),
            }
        }
        out
    }

    fn matrices(&self) -> impl Iterator<Item = &QMatrix> {
        self.layers
            .iter()
            .flat_map(|l| [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down])
            .chain(std::iter::once(self.output.as_ref().unwrap_or(&self.embed)))
    }

    /// `(cos, sin)` pairs of the rotation at `pos`, one per rotated pair of a head, computed
    /// as ggml computes them (θ multiplied down pair by pair, Llama 3's divisors, the linear
    /// scale), into `out` (`rope_dims` values).
    fn rope_angles(&self, pos: usize, local: bool, out: &mut [f32]) {
        let c = &self.config;
        let (base, scale) = if local {
            (c.rope_theta_local, c.rope_scale_local)
        } else {
            (c.rope_theta, c.rope_scale)
        };
        let step = base.powf(-2.0 / c.rope_dims as f32);
        let mut theta = pos as f32;
        for (i, cs) in out.chunks_exact_mut(2).enumerate() {
            let ff = self.rope_freqs.as_ref().map_or(1.0, |f| f[i]);
            let angle = scale * (theta / ff);
            cs[0] = angle.cos();
            cs[1] = angle.sin();
            theta *= step;
        }
    }

    /// Rotates every head of `x` by the angles `cs` (from [`Self::rope_angles`]): neighbouring
    /// pairs (GGUF's Llama layout) or the two halves of the rotated part (NeoX).
    fn rope(&self, x: &mut [f32], cs: &[f32]) {
        let half = self.config.rope_dims / 2;
        let neox = self.config.arch.neox();
        for head in x.chunks_mut(self.config.head_dim) {
            for i in 0..half {
                let (ia, ib) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (a, b) = (head[ia], head[ib]);
                let (cos, sin) = (cs[2 * i], cs[2 * i + 1]);
                head[ia] = a * cos - b * sin;
                head[ib] = a * sin + b * cos;
            }
        }
    }

    /// Runs one step over `tokens` (in the current rayon pool). `tables[seq]` holds the KV
    /// blocks of each sequence; the tokens' keys and values are written there, and attention
    /// reads positions `0..=pos`. Returns the logits of the tokens that asked for them, in
    /// order.
    pub(crate) fn forward(
        &self,
        tokens: &[StepToken],
        tables: &[&[u32]],
        kv: &mut KvPool,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let h = c.hidden;
        let x = self.hidden(tokens, tables, kv)?;
        let wanted: Vec<usize> = tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| t.logits)
            .map(|(i, _)| i)
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mut last = Vec::with_capacity(wanted.len() * h);
        for &i in &wanted {
            last.extend_from_slice(&x[i * h..(i + 1) * h]);
        }
        let mut last_normed = vec![0f32; last.len()];
        rms_norm(&last, &self.norm, c.rms_eps, &mut last_normed);
        let mut logits = Vec::new();
        self.output.as_ref().unwrap_or(&self.embed).matmul(
            self.isa,
            &last_normed,
            wanted.len(),
            &mut logits,
        );
        Ok(logits.chunks(c.vocab).map(<[f32]>::to_vec).collect())
    }

    /// Runs `tokens` as one sequence in a KV pool of its own; the last token's logits when
    /// `logits`, else the final residual stream (`tokens.len() × hidden`).
    fn one_sequence(&self, tokens: &[u32], logits: bool) -> Result<Vec<f32>> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(ProfilerError::Model("cannot run an empty text".into()));
        }
        let block_size = 16;
        let blocks = tokens.len().div_ceil(block_size);
        let block_bytes = c.kv_bytes_per_token() * block_size;
        let mut kv = KvPool::new(
            block_size,
            blocks * block_bytes,
            c.layers,
            c.kv_heads,
            c.head_dim,
        )?;
        let table: Vec<u32> = (0..blocks)
            .map(|_| {
                kv.allocate()
                    .ok_or_else(|| ProfilerError::Model("sequence KV pool too small".into()))
            })
            .collect::<Result<_>>()?;
        let last = tokens.len() - 1;
        let step: Vec<StepToken> = tokens
            .iter()
            .enumerate()
            .map(|(pos, &token)| StepToken {
                token,
                pos,
                seq: 0,
                logits: logits && pos == last,
            })
            .collect();
        if logits {
            let mut out = self.forward(&step, &[&table], &mut kv)?;
            return out
                .pop()
                .ok_or_else(|| ProfilerError::Model("no logits".into()));
        }
        self.hidden(&step, &[&table], &mut kv)
    }

    /// The logits after `tokens` (one sequence, at most the context): what the next token
    /// would be scored. Runs in the current rayon pool.
    pub fn last_logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.one_sequence(tokens, true)
    }

    /// A text embedding: the mean over `tokens` (one sequence, at most the context) of the
    /// final RMS-normed hidden states, scaled to unit length. Runs in the current rayon pool.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(ProfilerError::Model("cannot embed an empty text".into()));
        }
        let x = self.one_sequence(tokens, false)?;
        let mut normed = vec![0f32; x.len()];
        rms_norm(&x, &self.norm, c.rms_eps, &mut normed);
        let mut mean = vec![0f32; c.hidden];
        for row in normed.chunks(c.hidden) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        for m in &mut mean {
            *m /= norm;
        }
        Ok(mean)
    }

    /// The residual stream after the last layer, `tokens.len() × hidden`.
    fn hidden(&self, tokens: &[StepToken], tables: &[&[u32]], kv: &mut KvPool) -> Result<Vec<f32>> {
        let c = &self.config;
        let (h, d) = (c.hidden, c.head_dim);
        let t = tokens.len();
        for tok in tokens {
            if tok.token as usize >= c.vocab {
                return Err(ProfilerError::Model(format!(
                    "token id {} is outside the vocabulary",
                    tok.token
                )));
            }
            if tok.pos >= c.context_length {
                return Err(ProfilerError::Model(format!(
                    "position {} is beyond the model's context of {} tokens",
                    tok.pos, c.context_length
                )));
            }
        }
        let mut x = vec![0f32; t * h];
        x.par_chunks_mut(h)
            .zip(tokens.par_iter())
            .for_each(|(row, tok)| {
                self.embed.row_f32(tok.token as usize, row);
                if self.embed_scale != 1.0 {
                    for v in row {
                        *v *= self.embed_scale;
                    }
                }
            });
        // RoPE angles of each token: for the global layers, and for the sliding-window ones
        // where their base differs.
        let rd = c.rope_dims;
        let angles = |local: bool| {
            let mut a = vec![0f32; t * rd];
            a.par_chunks_mut(rd)
                .zip(tokens.par_iter())
                .for_each(|(o, tok)| self.rope_angles(tok.pos, local, o));
            a
        };
        let global = angles(false);
        let local = (self.layers.iter().any(|l| l.sliding)
            && (c.rope_theta_local != c.rope_theta || c.rope_scale_local != c.rope_scale))
            .then(|| angles(true));
        let q_dim = c.heads * d;
        let kv_dim = c.kv_heads * d;
        let qkv_dim = q_dim + 2 * kv_dim;
        let group = c.heads / c.kv_heads;
        let scale = c.attn_scale;
        let eps = c.rms_eps;
        let block_size = kv.block_size();
        let mut normed = vec![0f32; t * h];
        let mut qkv = Vec::new();
        let mut attn = vec![0f32; t * q_dim];
        let mut proj = Vec::new();
        let mut gate_up = Vec::new();
        let mut act = vec![0f32; t * c.ffn];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, eps, &mut normed);
            layer.wqkv.matmul(self.isa, &normed, t, &mut qkv);
            let cs = match (&local, layer.sliding) {
                (Some(local), true) => local,
                _ => &global,
            };
            qkv.par_chunks_mut(qkv_dim)
                .zip(cs.par_chunks(rd))
                .for_each(|(row, cs)| {
                    if let Some(b) = &layer.qkv_bias {
                        add_in_place(row, b);
                    }
                    let (q, rest) = row.split_at_mut(q_dim);
                    let k = &mut rest[..kv_dim];
                    if let Some(w) = &layer.q_norm {
                        head_norm(q, w, eps);
                    }
                    if let Some(w) = &layer.k_norm {
                        head_norm(k, w, eps);
                    }
                    self.rope(q, cs);
                    self.rope(k, cs);
                });
            for (row, tok) in qkv.chunks(qkv_dim).zip(tokens) {
                let block = tables[tok.seq][tok.pos / block_size];
                kv.write(
                    l,
                    block,
                    tok.pos % block_size,
                    &row[q_dim..q_dim + kv_dim],
                    &row[q_dim + kv_dim..],
                );
            }
            let window = c.sliding_window.filter(|_| layer.sliding);
            // One task per (token, KV head) running the heads of its group together, so each
            // key and value row is read once per group; per (token, head) when that leaves
            // too few tasks for the threads (a single sequence's decode). Each head computes
            // the same arithmetic either way.
            let per_group = t * c.kv_heads >= 4 * rayon::current_num_threads();
            let task_heads = if per_group { group } else { 1 };
            let kv_ref = &*kv;
            let isa = self.isa;
            attn.par_chunks_mut(task_heads * d)
                .enumerate()
                .for_each_init(Scratch::default, |scratch, (task, o)| {
                    let tasks_per_token = c.heads / task_heads;
                    let (ti, h0) = (
                        task / tasks_per_token,
                        (task % tasks_per_token) * task_heads,
                    );
                    let tok = &tokens[ti];
                    let q = &qkv[ti * qkv_dim + h0 * d..ti * qkv_dim + (h0 + task_heads) * d];
                    let first = window.map_or(0, |w| (tok.pos + 1).saturating_sub(w));
                    attend(
                        isa,
                        kv_ref,
                        l,
                        tables[tok.seq],
                        h0 / group,
                        first..tok.pos + 1,
                        d,
                        scale,
                        q,
                        o,
                        scratch,
                    );
                });
            layer.wo.matmul(self.isa, &attn, t, &mut proj);
            residual_add(
                &mut x,
                &proj,
                layer.post_attn_norm.as_deref(),
                eps,
                &mut normed,
            );
            rms_norm(&x, &layer.ffn_norm, eps, &mut normed);
            layer.w_gate_up.matmul(self.isa, &normed, t, &mut gate_up);
            let gelu = c.arch == Arch::Gemma3;
            act.par_chunks_mut(c.ffn)
                .zip(gate_up.par_chunks(2 * c.ffn))
                .for_each(|(a, gu)| {
                    let (g, u) = gu.split_at(c.ffn);
                    if gelu {
                        for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                            *a = gelu_f16(*g) * u;
                        }
                    } else {
                        for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                            *a = g / (1.0 + (-g).exp()) * u;
                        }
                    }
                });
            layer.w_down.matmul(self.isa, &act, t, &mut proj);
            residual_add(
                &mut x,
                &proj,
                layer.post_ffn_norm.as_deref(),
                eps,
                &mut normed,
            );
        }
        Ok(x)
    }
}

/// GFLOP/s of [`QMatrix::matmul`] with `m` = 4 rows against a 1024 × 1024 weight, on a pool
/// of `threads` threads, for about `budget`.
pub(crate) fn matmul_gflops(threads: usize, budget: std::time::Duration) -> Result<f64> {
    const K: usize = 1024;
    const N: usize = 1024;
    const M: usize = 4;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| ProfilerError::Measure(format!("cannot start threads: {e}")))?;
    let values: Vec<f32> = (0..N * K)
        .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
        .collect();
    let w = QMatrix::from_f32(N, K, &values)?;
    let x: Vec<f32> = values[..M * K].to_vec();
    let isa = Isa::detect();
    let mut out = Vec::new();
    let (n, elapsed) = pool.install(|| {
        w.matmul(isa, &x, M, &mut out); // warm up
        let start = std::time::Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget {
            w.matmul(isa, &x, M, &mut out);
            n += 1;
        }
        (n, start.elapsed().as_secs_f64())
    });
    Ok(2.0 * (M * N * K) as f64 * n as f64 / elapsed / 1e9)
}

/// `out = x / rms(x) · weight` per row, the sum of squares in f64 as ggml takes it.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len();
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .for_each(|(o, row)| norm_row(row, weight, eps, o));
}

fn norm_row(row: &[f32], weight: &[f32], eps: f32, o: &mut [f32]) {
    let sum: f64 = row.iter().map(|v| f64::from(v * v)).sum();
    let mean = (sum / row.len() as f64) as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
        *o = v * inv * w;
    }
}

/// RMS norm of every head of `x` (heads of `weight.len()` values) in place.
fn head_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let mut tmp = vec![0f32; weight.len()];
    for head in x.chunks_mut(weight.len()) {
        tmp.copy_from_slice(head);
        norm_row(&tmp, weight, eps, head);
    }
}

/// `x += y`, or `x += norm(y)` where the architecture norms a block's output (Gemma 3);
/// `scratch` holds the normed rows.
fn residual_add(x: &mut [f32], y: &[f32], norm: Option<&[f32]>, eps: f32, scratch: &mut [f32]) {
    match norm {
        Some(w) => {
            rms_norm(y, w, eps, scratch);
            add_in_place(x, scratch);
        }
        None => add_in_place(x, y),
    }
}

/// GELU (tanh form) as ggml's CPU backend computes it: looked up by the input rounded to
/// f16, the result an f16 (its table), 0 below −10 and the identity above 10.
fn gelu_f16(x: f32) -> f32 {
    use half::f16;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let v = f16::from_f32(x).to_f32();
    let g = 0.5 * v * (1.0 + (SQRT_2_OVER_PI * v * (1.0 + COEF_A * v * v)).tanh());
    f16::from_f32(g).to_f32()
}

/// Buffers of one attention task: the scores of its heads over the span, and one block's keys
/// or values widened to f32.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    rows: Vec<f32>,
}

/// Attention of one token for the query heads in `q` (`n × d`, all reading KV head `g` of
/// `layer`), over the positions `span` (`0..=pos`, or a sliding window's last positions) in
/// order; writes `o` (`n × d`).
#[allow(clippy::too_many_arguments)]
fn attend(
    isa: Isa,
    kv: &KvPool,
    layer: usize,
    table: &[u32],
    g: usize,
    span: std::ops::Range<usize>,
    d: usize,
    scale: f32,
    q: &[f32],
    o: &mut [f32],
    scratch: &mut Scratch,
) {
    use half::slice::HalfFloatSliceExt;
    let Scratch { scores, rows } = scratch;
    let n = q.len() / d;
    let (first, end) = (span.start, span.end);
    let len = end - first;
    let bs = kv.block_size();
    scores.clear();
    scores.resize(n * len, 0.0);
    // Each block's slots within the span: (block, first slot, slots, offset in the scores).
    let blocks = (first / bs..end.div_ceil(bs)).filter_map(|bi| {
        let block = *table.get(bi)?;
        let lo = (bi * bs).max(first);
        let hi = ((bi + 1) * bs).min(end);
        Some((block, lo - bi * bs, hi - lo, lo - first))
    });
    for (block, s0, slots, at) in blocks.clone() {
        rows.resize(slots * d, 0.0);
        kv.block_keys(layer, block, g)[s0 * d..(s0 + slots) * d].convert_to_f32_slice(rows);
        for h in 0..n {
            kernels::scores(
                isa,
                &q[h * d..(h + 1) * d],
                rows,
                scale,
                &mut scores[h * len + at..h * len + at + slots],
            );
        }
    }
    for h in 0..n {
        let row = &mut scores[h * len..(h + 1) * len];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
        let inv = 1.0 / kernels::exp_sum(isa, row, max);
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
    o.fill(0.0);
    for (block, s0, slots, at) in blocks {
        rows.resize(slots * d, 0.0);
        kv.block_values(layer, block, g)[s0 * d..(s0 + slots) * d].convert_to_f32_slice(rows);
        for h in 0..n {
            kernels::weighted_sum(
                isa,
                &scores[h * len + at..h * len + at + slots],
                rows,
                &mut o[h * d..(h + 1) * d],
            );
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architectures_are_refused_by_name() {
        for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
            assert_eq!(Arch::from_name(arch).unwrap().name(), arch);
        }
        let err = Arch::from_name("phi3").unwrap_err().to_string();
        assert!(err.contains("\"phi3\" is not supported"), "{err}");
    }

    #[test]
    fn gelu_rounds_as_ggml_and_saturates() {
        assert_eq!(gelu_f16(-12.0), 0.0);
        assert_eq!(gelu_f16(11.0), 11.0);
        // 0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²))) at 1.0 is 0.841192; its f16 is 0.8413.
        assert_eq!(gelu_f16(1.0), half::f16::from_f32(0.841_192).to_f32());
        assert_eq!(gelu_f16(0.0), 0.0);
    }
}
