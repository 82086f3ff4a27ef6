//! Text descriptions of workloads, methods, hardware and models (the paper's "basic", "rich"
//! and chain-of-thought prompt styles, §4.6), the [`Embedder`] that turns them into vectors,
//! a cache by content id, and the truncated SVD that reduces them.
//!
//! The embedder is a trait so that this crate does not depend on the engine: the node plugs in
//! the default GGUF model's pooled hidden states (`metainf_profiler`), tests may plug in
//! anything deterministic.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use metainf_protocol::{
    Arrival, ContentId, DeviceKind, HardwareProfile, MethodConfig, ModelDescriptor,
    WorkloadDescriptor, method::flags,
};
use serde::{Deserialize, Serialize};
use smartcore::linalg::basic::arrays::Array;
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linalg::traits::svd::SVDDecomposable;

use crate::error::{Result, SchedulerError};

/// Turns texts into vectors of a fixed dimension.
pub trait Embedder: Send + Sync {
    /// Names the embedder and its model, so cached vectors of different embedders never mix.
    fn id(&self) -> String;
    /// One vector per text, all of the same length.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
}

/// How much a description says (§4.6 of the paper).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptStyle {
    /// Minimal keywords: "Model: SmolLM2-135M".
    Basic,
    /// Structured context: sizes, memory, compute, what the method does.
    #[default]
    Rich,
    /// Rich, plus reasoning about what the facts imply for performance.
    Cot,
}

impl FromStr for PromptStyle {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "basic" => Ok(Self::Basic),
            "rich" => Ok(Self::Rich),
            "cot" | "chain-of-thought" => Ok(Self::Cot),
            other => Err(SchedulerError::invalid(
                "prompt style",
                format!("`{other}` (expected basic, rich or cot)"),
            )),
        }
    }
}

/// The entity kinds that get descriptions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A workload.
    Workload,
    /// An acceleration method.
    Method,
    /// A hardware profile.
    Hardware,
    /// A model.
    Model,
}

impl Kind {
    /// All kinds, in feature order.
    pub const ALL: [Kind; 4] = [Kind::Workload, Kind::Hardware, Kind::Model, Kind::Method];
}

/// Describes a workload in words.
pub fn describe_workload(w: &WorkloadDescriptor, style: PromptStyle) -> String {
    let preset = w.preset.as_deref().unwrap_or("custom");
    let mut s = format!(
        "Workload: {preset}, {} requests, prompts of about {:.0} tokens, outputs up to {:.0} tokens.",
        w.requests, w.prompt_tokens.mean, w.max_new_tokens.mean
    );
    if style == PromptStyle::Basic {
        return s;
    }
    let arrival = match w.arrival {
        Arrival::AllAtOnce => "all requests arrive at once".to_owned(),
        Arrival::Poisson { rate_per_s } => {
            format!("requests arrive at random, {rate_per_s:.2} per second")
        }
    };
    let _ = write!(
        s,
        " Prompt lengths range from {} to {} tokens (95th percentile {}); output caps from {} to {}. \
         {:.0}% of prompt tokens are a prefix shared with another request; {arrival}; sampling \
         temperature {:.1}.",
        w.prompt_tokens.min,
        w.prompt_tokens.max,
        w.prompt_tokens.p95,
        w.max_new_tokens.min,
        w.max_new_tokens.max,
        100.0 * w.prefix_sharing,
        w.temperature
    );
    for (k, v) in &w.extra {
        let _ = write!(s, " {k}: {v}.");
    }
    if style == PromptStyle::Cot {
        let prefill = w.prompt_tokens.mean * f64::from(w.requests);
        let decode = w.max_new_tokens.mean * f64::from(w.requests);
        let _ = write!(
            s,
            " Reasoning: the job prefills about {prefill:.0} tokens and decodes about {decode:.0}. \
             {} {} {}",
            if prefill > 4.0 * decode {
                "Prefill dominates, so compute throughput and chunked prefill matter."
            } else {
                "Decoding dominates, so memory bandwidth and batching matter."
            },
            if w.prefix_sharing > 0.3 {
                "Much of the prompt is shared, so caching prefixes avoids recomputation."
            } else {
                "Little of the prompt is shared, so prefix caching can only add overhead."
            },
            if w.max_new_tokens.max > 2 * w.max_new_tokens.min.max(1) {
                "Output lengths differ, so static batches leave slots idle."
            } else {
                "Output lengths are similar, so static batches stay full."
            }
        );
    }
    s
}

/// Describes a method in words.
pub fn describe_method(m: &MethodConfig, style: PromptStyle) -> String {
    let mut s = format!("Method: {}.", m.short_name());
    if style == PromptStyle::Basic {
        return s;
    }
    let explain = [
        (
            flags::CONTINUOUS_BATCHING,
            "continuous batching admits new requests at every decoding step",
            "static batching waits for the whole batch to finish",
        ),
        (
            flags::PREFIX_CACHING,
            "prefix caching reuses the key-value blocks of shared prompt prefixes",
            "no key-value cache is reused across requests",
        ),
        (
            flags::CHUNKED_PREFILL,
            "chunked prefill splits long prompts into chunks interleaved with decoding",
            "each prompt is prefilled whole",
        ),
    ];
    for (flag, on, off) in explain {
        let _ = write!(s, " {};", if m.has(flag) { on } else { off });
    }
    for (k, v) in &m.params {
        let _ = write!(s, " {k} = {v};");
    }
    if style == PromptStyle::Cot {
        s.push_str(
            " Reasoning: batching raises throughput when steps cost little more with more rows; \
             caching pays off with shared prefixes; chunking lowers latency spikes when long \
             prompts arrive among decoding requests.",
        );
    }
    s
}

/// Describes a hardware profile in words.
pub fn describe_hardware(h: &HardwareProfile, style: PromptStyle) -> String {
    let spec = &h.spec;
    let kind = match spec.device {
        DeviceKind::Cpu => "CPU",
        DeviceKind::Gpu => "GPU",
    };
    let mut s = format!(
        "Hardware: {kind} {}, {} compute units.",
        spec.name, spec.compute_units
    );
    if style == PromptStyle::Basic {
        return s;
    }
    let _ = write!(
        s,
        " Memory {:.1} GiB, backend {}.",
        spec.memory_bytes as f64 / f64::from(1u32 << 30),
        spec.backend
    );
    if let Some(m) = &h.measured {
        let _ = write!(
            s,
            " Measured quantized matmul {:.1} GFLOP/s and memory bandwidth {:.1} GB/s.",
            m.matmul_gflops, m.mem_bandwidth_gbs
        );
    }
    if let Some(g) = &spec.gpu {
        let _ = write!(
            s,
            " {} SMs, compute capability {}.{}, SM clock {} MHz, power limit {:.0} W, PCIe gen {} x{}.",
            g.sm_count,
            g.compute_major,
            g.compute_minor,
            g.max_sm_clock_mhz,
            g.power_limit_w,
            g.pcie_gen,
            g.pcie_width
        );
    }
    if let Some(c) = &spec.cpu {
        let _ = write!(
            s,
            " {} physical cores, {} logical CPUs, SIMD {}.",
            c.physical_cores,
            c.logical_cpus,
            c.simd.join(" ")
        );
    }
    if style == PromptStyle::Cot {
        s.push_str(match spec.device {
            DeviceKind::Cpu => {
                " Reasoning: on a CPU each decoding step's cost grows with the batch, so batching \
                 gains less than on a GPU, and few threads make long prompts expensive."
            }
            DeviceKind::Gpu => {
                " Reasoning: on a GPU a decoding step costs nearly the same for many rows, so \
                 batching gains much, and memory limits how many sequences fit."
            }
        });
    }
    s
}

/// Describes a model in words.
pub fn describe_model(m: &ModelDescriptor, style: PromptStyle) -> String {
    let mut s = format!("Model: {}.", m.name);
    if style == PromptStyle::Basic {
        return s;
    }
    let _ = write!(
        s,
        " Architecture {}, {:.0} million parameters, {} quantization at {:.1} bits per weight, \
         context {} tokens.",
        m.architecture,
        m.parameters as f64 / 1e6,
        m.quantization,
        m.bits_per_weight,
        m.context_length
    );
    if style == PromptStyle::Cot {
        let _ = write!(
            s,
            " Reasoning: its weights take about {:.0} MB, read once per decoding step.",
            m.parameters as f64 * m.bits_per_weight / 8e6
        );
    }
    s
}

/// Embeddings by content id of (embedder, text), kept in memory and optionally in a JSON file
/// so that descriptions are embedded once per machine.
pub struct EmbeddingCache {
    embedder: Box<dyn Embedder>,
    vectors: Mutex<HashMap<ContentId, Vec<f32>>>,
    file: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    entries: Vec<(ContentId, Vec<f32>)>,
}

impl EmbeddingCache {
    /// A cache in memory only.
    pub fn new(embedder: Box<dyn Embedder>) -> Self {
        Self {
            embedder,
            vectors: Mutex::new(HashMap::new()),
            file: None,
        }
    }

    /// A cache backed by `file` (read now if it exists; written by [`EmbeddingCache::save`]).
    /// An unreadable file is ignored with a warning: the cache only saves time.
    pub fn with_file(embedder: Box<dyn Embedder>, file: &Path) -> Self {
        let mut vectors = HashMap::new();
        if let Ok(bytes) = std::fs::read(file) {
            match serde_json::from_slice::<CacheFile>(&bytes) {
                Ok(c) => vectors.extend(c.entries),
                Err(e) => tracing::warn!(file = %file.display(), "ignoring embedding cache: {e}"),
            }
        }
        Self {
            embedder,
            vectors: Mutex::new(vectors),
            file: Some(file.to_owned()),
        }
    }

    /// Writes the cache file, if there is one (atomically: temp file, then rename).
    pub fn save(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let entries: Vec<(ContentId, Vec<f32>)> =
            self.lock().iter().map(|(k, v)| (*k, v.clone())).collect();
        let json = serde_json::to_vec(&CacheFile { entries })
            .map_err(|e| SchedulerError::Embed(e.to_string()))?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SchedulerError::Embed(e.to_string()))?;
        }
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, file))
            .map_err(|e| SchedulerError::Embed(format!("{}: {e}", file.display())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ContentId, Vec<f32>>> {
        // A panic while holding the lock leaves a usable map: entries are inserted whole.
        self.vectors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, text: &str) -> ContentId {
        ContentId::of_bytes(&self.embedder.id(), text.as_bytes())
    }

    /// Vectors for `texts`, embedding only those not cached yet.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let keys: Vec<ContentId> = texts.iter().map(|t| self.key(t)).collect();
        let (missing_keys, missing): (Vec<ContentId>, Vec<String>) = {
            let cache = self.lock();
            let mut seen = std::collections::HashSet::new();
            texts
                .iter()
                .zip(&keys)
                .filter(|(_, k)| !cache.contains_key(k) && seen.insert(**k))
                .map(|(t, k)| (*k, t.clone()))
                .unzip()
        };
        if !missing.is_empty() {
            let vectors = self.embedder.embed(&missing)?;
            if vectors.len() != missing.len() {
                return Err(SchedulerError::Embed(format!(
                    "{} vectors for {} texts",
                    vectors.len(),
                    missing.len()
                )));
            }
            self.lock().extend(missing_keys.into_iter().zip(vectors));
        }
        let cache = self.lock();
        keys.iter()
            .map(|k| {
                cache
                    .get(k)
                    .cloned()
                    .ok_or_else(|| SchedulerError::Embed("vector missing after embedding".into()))
            })
            .collect()
    }

    /// Number of cached vectors.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A truncated SVD projection `x ↦ x · V_k` (no centring, as scikit-learn's TruncatedSVD).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    /// `dim × k`, row-major.
    components: Vec<f64>,
    dim: usize,
    k: usize,
}

impl Projection {
    /// Fits the top `k` right singular vectors of `rows` (at most `min(rows, dim)` are kept).
    pub fn fit(rows: &[Vec<f32>], k: usize) -> Result<Self> {
        let dim = rows.first().map_or(0, Vec::len);
        if rows.is_empty() || dim == 0 || rows.iter().any(|r| r.len() != dim) {
            return Err(SchedulerError::Data(
                "SVD needs rows of one non-zero length".into(),
            ));
        }
        let k = k.clamp(1, rows.len().min(dim));
        // The SVD of Xᵀ (dim × n, tall): its left singular vectors are X's right ones.
        let xt: Vec<Vec<f64>> = (0..dim)
            .map(|j| rows.iter().map(|r| f64::from(r[j])).collect())
            .collect();
        let m = DenseMatrix::from_2d_vec(&xt).map_err(|e| SchedulerError::model("svd", e))?;
        let svd = m.svd().map_err(|e| SchedulerError::model("svd", e))?;
        let mut order: Vec<usize> = (0..svd.s.len()).collect();
        order.sort_by(|&a, &b| svd.s[b].total_cmp(&svd.s[a]));
        let mut components = vec![0.0; dim * k];
        for (c, &col) in order.iter().take(k).enumerate() {
            for j in 0..dim {
                components[j * k + c] = *svd.U.get((j, col));
            }
        }
        Ok(Self { components, dim, k })
    }

    /// Output dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Projects one vector.
    pub fn apply(&self, x: &[f32]) -> Vec<f64> {
        let mut out = vec![0.0; self.k];
        for (j, &v) in x.iter().take(self.dim).enumerate() {
            let row = &self.components[j * self.k..(j + 1) * self.k];
            for (o, c) in out.iter_mut().zip(row) {
                *o += f64::from(v) * c;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use metainf_protocol::fixtures;

    /// A deterministic stand-in (unit test only): letter counts.
    struct Letters;
    impl Embedder for Letters {
        fn id(&self) -> String {
            "letters".into()
        }
        fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
            Ok(texts
                .iter()
                .map(|t| {
                    let mut v = vec![0f32; 26];
                    for b in t.bytes().filter(u8::is_ascii_lowercase) {
                        v[usize::from(b - b'a')] += 1.0;
                    }
                    v
                })
                .collect())
        }
    }

    #[test]
    fn styles_say_more_in_order() {
        let w = fixtures::workload("chat", 16);
        let lens: Vec<usize> = [PromptStyle::Basic, PromptStyle::Rich, PromptStyle::Cot]
            .iter()
            .map(|&s| describe_workload(&w, s).len())
            .collect();
        assert!(lens[0] < lens[1] && lens[1] < lens[2], "{lens:?}");
        let h = fixtures::cpu_hardware(2);
        assert!(describe_hardware(&h, PromptStyle::Rich).contains("2 compute units"));
        let m: MethodConfig = "cb+pc".parse().unwrap();
        let text = describe_method(&m, PromptStyle::Rich);
        assert!(text.contains("continuous batching admits") && text.contains("prefilled whole"));
        assert!(describe_model(&fixtures::smollm2(), PromptStyle::Basic).starts_with("Model: "));
        assert!("nope".parse::<PromptStyle>().is_err());
    }

    #[test]
    fn cache_embeds_each_text_once_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("emb.json");
        let cache = EmbeddingCache::with_file(Box::new(Letters), &file);
        let texts = vec!["abc".to_owned(), "abc".to_owned(), "zz".to_owned()];
        let v = cache.embed(&texts).unwrap();
        assert_eq!(v[0], v[1]);
        assert_eq!(v[2][25], 2.0);
        assert_eq!(cache.len(), 2);
        cache.save().unwrap();
        let again = EmbeddingCache::with_file(Box::new(Letters), &file);
        assert_eq!(again.len(), 2);
        std::fs::write(&file, b"not json").unwrap();
        assert!(EmbeddingCache::with_file(Box::new(Letters), &file).is_empty());
    }

    #[test]
    fn svd_keeps_the_dominant_direction() {
        // Points along (1, 1, 0) with a little noise on the third axis.
        let rows: Vec<Vec<f32>> = (1..=6)
            .map(|i| {
                let t = i as f32;
                vec![t, t, 0.01 * (-1f32).powi(i)]
            })
            .collect();
        let p = Projection::fit(&rows, 5).unwrap();
        assert_eq!(p.k(), 3);
        let one = Projection::fit(&rows, 1).unwrap();
        let a = one.apply(&[1.0, 1.0, 0.0])[0].abs();
        let b = one.apply(&[1.0, -1.0, 0.0])[0].abs();
        assert!(a > 1.4 && b < 1e-3, "{a} {b}");
        assert!(Projection::fit(&[], 2).is_err());
    }
}
