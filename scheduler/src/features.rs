//! Feature vectors for (workload, hardware, model, method): the exact numeric facts, one-hot
//! identities (the paper's ablation), and text embeddings reduced with truncated SVD.
//!
//! A [`FeatureSpace`] is fitted on training data only (entity vocabularies, SVD projections,
//! extra column names), then maps any descriptors, seen or not, to vectors of one fixed
//! length: unseen entities get all-zero one-hot slots and are projected by the training SVD.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use metainf_protocol::{
    Arrival, ContentId, DeviceKind, HardwareProfile, MethodConfig, ModelDescriptor,
    WorkloadDescriptor,
    method::{ParamValue, flags},
};
use serde::{Deserialize, Serialize};

use crate::dataset::Tensor;
use crate::embed::{
    EmbeddingCache, Kind, Projection, PromptStyle, describe_hardware, describe_method,
    describe_model, describe_workload,
};
use crate::error::{Result, SchedulerError};

/// Which features describe an entity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Per entity kind, its numeric facts where they tell the training entities apart, and
    /// nothing otherwise: MetaInf's learned per-entity effects then carry what is known about
    /// each hardware, model and workload (see [`FeatureSpace::choices`]).
    #[default]
    Auto,
    /// Numeric facts only.
    Numeric,
    /// One-hot identities only (the paper's ablation).
    OneHot,
    /// Text embeddings only (the paper's default).
    Text,
    /// Numeric facts and text embeddings.
    NumericText,
}

impl Encoding {
    /// Whether this encoding needs an embedder.
    pub fn needs_text(self) -> bool {
        matches!(self, Encoding::Text | Encoding::NumericText)
    }
}

impl FromStr for Encoding {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "numeric" => Ok(Self::Numeric),
            "onehot" | "one-hot" => Ok(Self::OneHot),
            "text" => Ok(Self::Text),
            "numeric+text" | "numeric-text" => Ok(Self::NumericText),
            other => Err(SchedulerError::invalid(
                "encoding",
                format!("`{other}` (expected auto, numeric, onehot, text or numeric+text)"),
            )),
        }
    }
}

/// How features are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// Which features.
    pub encoding: Encoding,
    /// Description style for text embeddings.
    pub style: PromptStyle,
    /// SVD dimensions kept per entity kind (capped by the number of training entities).
    pub svd_k: usize,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        Self {
            encoding: Encoding::Auto,
            style: PromptStyle::Rich,
            svd_k: 64,
        }
    }
}

/// A (workload, hardware, model) triple: the part of a feature row shared by all methods.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// The workload.
    pub workload: &'a WorkloadDescriptor,
    /// The hardware.
    pub hardware: &'a HardwareProfile,
    /// The model.
    pub model: &'a ModelDescriptor,
}

/// The fitted feature map.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FeatureSpace {
    config: FeatureConfig,
    /// Names of the workloads' extra numeric facts seen in training.
    extra_keys: Vec<String>,
    /// Method flags seen in training beyond the three standard ones.
    other_flags: Vec<String>,
    /// One-hot vocabularies (content id → slot).
    onehot: BTreeMap<String, Vec<ContentId>>,
    /// SVD projection per kind, for text encodings.
    projections: BTreeMap<String, Projection>,
    /// Projected embeddings of the training entities (a query for a known entity needs no
    /// embedder), by kind and content id.
    known: HashMap<ContentId, Vec<f64>>,
    /// With [`Encoding::Auto`]: the kinds whose numeric facts are used.
    #[serde(default)]
    numeric_kinds: BTreeSet<String>,
}

fn kind_key(kind: Kind) -> String {
    format!("{kind:?}").to_lowercase()
}

fn ln1p(v: f64) -> f64 {
    v.max(0.0).ln_1p()
}

/// Numeric facts of a workload (`extra_keys` in order, 0 when absent).
pub fn workload_numeric(w: &WorkloadDescriptor, extra_keys: &[String]) -> Vec<f64> {
    let n = f64::from(w.requests);
    let (poisson, rate) = match w.arrival {
        Arrival::AllAtOnce => (0.0, 0.0),
        Arrival::Poisson { rate_per_s } => (1.0, rate_per_s),
    };
    let mut v = vec![
        ln1p(n),
        ln1p(w.prompt_tokens.mean),
        ln1p(f64::from(w.prompt_tokens.p50)),
        ln1p(f64::from(w.prompt_tokens.p95)),
        ln1p(f64::from(w.prompt_tokens.max)),
        ln1p(w.max_new_tokens.mean),
        ln1p(f64::from(w.max_new_tokens.p95)),
        ln1p(f64::from(w.max_new_tokens.max)),
        // Spread of output caps: what leaves static batches idle.
        f64::from(w.max_new_tokens.max) / w.max_new_tokens.mean.max(1.0),
        w.prefix_sharing,
        poisson,
        ln1p(rate),
        w.temperature,
        ln1p(n * w.prompt_tokens.mean),
        ln1p(n * w.max_new_tokens.mean),
        ln1p(n * w.prompt_tokens.mean * (1.0 - w.prefix_sharing)),
    ];
    v.extend(
        extra_keys
            .iter()
            .map(|k| w.extra.get(k).copied().unwrap_or(0.0)),
    );
    v
}

/// `ln(1 + v)`, or NaN (a missing value, which the trees route on their own) where the fact
/// is unknown (recorded as 0).
fn ln1p_known(v: f64) -> f64 {
    if v > 0.0 { v.ln_1p() } else { f64::NAN }
}

/// Numeric facts of a hardware profile; facts it does not record are NaN (missing).
pub fn hardware_numeric(h: &HardwareProfile) -> Vec<f64> {
    let s = &h.spec;
    let (gflops, bw) = h.measured.as_ref().map_or((f64::NAN, f64::NAN), |m| {
        (m.matmul_gflops, m.mem_bandwidth_gbs)
    });
    let gpu = s.gpu.as_ref();
    vec![
        f64::from(u8::from(s.device == DeviceKind::Gpu)),
        ln1p(f64::from(s.compute_units)),
        ln1p_known(s.memory_bytes as f64 / 1e9),
        ln1p(gflops),
        ln1p(bw),
        ln1p(gpu.map_or(0.0, |g| f64::from(g.sm_count))),
        ln1p(gpu.map_or(0.0, |g| f64::from(g.max_sm_clock_mhz))),
        ln1p(gpu.map_or(0.0, |g| g.power_limit_w)),
        ln1p(s.cpu.as_ref().map_or(0.0, |c| f64::from(c.physical_cores))),
    ]
}

/// Numeric facts of a model; unknown ones (no size in an imported name, no quantization or
/// context length) are NaN (missing), never a made-up value.
pub fn model_numeric(m: &ModelDescriptor) -> Vec<f64> {
    let bits = if m.quantization == "unknown" {
        f64::NAN
    } else {
        m.bits_per_weight
    };
    vec![
        ln1p_known(m.parameters as f64 / 1e6),
        bits,
        ln1p_known(f64::from(m.context_length)),
        ln1p_known(m.parameters as f64 * bits / 8e6),
    ]
}

fn param(m: &MethodConfig, name: &str) -> f64 {
    match m.params.get(name) {
        Some(ParamValue::Int(v)) => ln1p(*v as f64),
        Some(ParamValue::Float(v)) => ln1p(*v),
        _ => 0.0,
    }
}

/// Numeric facts of a method: its flags and (log) parameters.
pub fn method_numeric(m: &MethodConfig, other_flags: &[String]) -> Vec<f64> {
    use metainf_protocol::method::params;
    let mut v: Vec<f64> = flags::STANDARD
        .iter()
        .map(|(f, _)| f64::from(u8::from(m.has(f))))
        .collect();
    v.extend(other_flags.iter().map(|f| f64::from(u8::from(m.has(f)))));
    for p in [
        params::MAX_BATCH,
        params::CHUNK_SIZE,
        params::BLOCK_SIZE,
        params::KV_BUDGET_BYTES,
    ] {
        v.push(param(m, p));
    }
    v
}

impl FeatureSpace {
    /// Fits the feature map on the training part of `tensor`: the cells `train` and every
    /// method. `cache` embeds descriptions for text encodings (required there).
    pub fn fit(
        tensor: &Tensor,
        train: &[usize],
        config: FeatureConfig,
        cache: Option<&EmbeddingCache>,
    ) -> Result<Self> {
        let mut workloads = BTreeSet::new();
        let mut hardware = BTreeSet::new();
        let mut models = BTreeSet::new();
        for &c in train {
            let cell = tensor
                .cells
                .get(c)
                .ok_or_else(|| SchedulerError::invalid("training cell", format!("{c}")))?;
            workloads.insert(cell.workload);
            hardware.insert(cell.hardware);
            models.insert(cell.model);
        }
        let extra_keys: Vec<String> = workloads
            .iter()
            .flat_map(|&w| tensor.workloads[w].extra.keys().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let other_flags: Vec<String> = tensor
            .methods
            .iter()
            .flat_map(|m| m.flags.iter())
            .filter(|f| !flags::STANDARD.iter().any(|(s, _)| s == f))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let ids = |kind: Kind| -> Result<Vec<ContentId>> {
            Ok(match kind {
                Kind::Workload => workloads
                    .iter()
                    .map(|&i| tensor.workloads[i].id())
                    .collect::<std::result::Result<_, _>>()?,
                Kind::Hardware => hardware
                    .iter()
                    .map(|&i| tensor.hardware[i].id())
                    .collect::<std::result::Result<_, _>>()?,
                Kind::Model => models
                    .iter()
                    .map(|&i| tensor.models[i].id())
                    .collect::<std::result::Result<_, _>>()?,
                Kind::Method => tensor
                    .methods
                    .iter()
                    .map(MethodConfig::id)
                    .collect::<std::result::Result<_, _>>()?,
            })
        };
        let mut onehot = BTreeMap::new();
        if config.encoding == Encoding::OneHot {
            for kind in Kind::ALL {
                onehot.insert(kind_key(kind), ids(kind)?);
            }
        }
        let mut space = Self {
            config,
            extra_keys,
            other_flags,
            onehot,
            projections: BTreeMap::new(),
            known: HashMap::new(),
            numeric_kinds: BTreeSet::new(),
        };
        if config.encoding == Encoding::Auto {
            // A kind's facts are used where they tell its training entities apart; methods
            // always keep theirs (flags and parameters).
            let distinct = |rows: Vec<Vec<f64>>| -> bool {
                let key = |r: &Vec<f64>| -> Vec<u64> { r.iter().map(|v| v.to_bits()).collect() };
                rows.iter().map(key).collect::<BTreeSet<_>>().len() > 1
            };
            let extra = &space.extra_keys;
            let facts = [
                (
                    Kind::Workload,
                    workloads
                        .iter()
                        .map(|&i| workload_numeric(&tensor.workloads[i], extra))
                        .collect(),
                ),
                (
                    Kind::Hardware,
                    hardware
                        .iter()
                        .map(|&i| hardware_numeric(&tensor.hardware[i]))
                        .collect(),
                ),
                (
                    Kind::Model,
                    models
                        .iter()
                        .map(|&i| model_numeric(&tensor.models[i]))
                        .collect(),
                ),
            ];
            for (kind, rows) in facts {
                if distinct(rows) {
                    space.numeric_kinds.insert(kind_key(kind));
                }
            }
            space.numeric_kinds.insert(kind_key(Kind::Method));
        }
        if config.encoding.needs_text() {
            let cache = cache.ok_or_else(|| {
                SchedulerError::invalid("encoding", "text embeddings need an embedder")
            })?;
            for kind in Kind::ALL {
                let texts: Vec<String> = match kind {
                    Kind::Workload => workloads
                        .iter()
                        .map(|&i| describe_workload(&tensor.workloads[i], config.style))
                        .collect(),
                    Kind::Hardware => hardware
                        .iter()
                        .map(|&i| describe_hardware(&tensor.hardware[i], config.style))
                        .collect(),
                    Kind::Model => models
                        .iter()
                        .map(|&i| describe_model(&tensor.models[i], config.style))
                        .collect(),
                    Kind::Method => tensor
                        .methods
                        .iter()
                        .map(|m| describe_method(m, config.style))
                        .collect(),
                };
                let vectors = cache.embed(&texts)?;
                let projection = Projection::fit(&vectors, config.svd_k)?;
                for (id, v) in ids(kind)?.into_iter().zip(&vectors) {
                    space.known.insert(id, projection.apply(v));
                }
                space.projections.insert(kind_key(kind), projection);
            }
        }
        Ok(space)
    }

    /// Whether predictions see the workload fact `key` (it was in training, and workloads are
    /// described by their numeric facts).
    pub fn sees_extra(&self, key: &str) -> bool {
        self.extra_keys.iter().any(|k| k == key)
            && match self.config.encoding {
                Encoding::Auto => self.numeric_kinds.contains(&kind_key(Kind::Workload)),
                Encoding::Numeric | Encoding::NumericText => true,
                Encoding::OneHot | Encoding::Text => false,
            }
    }

    /// The configuration.
    pub fn config(&self) -> FeatureConfig {
        self.config
    }

    /// What describes each entity kind (workload, hardware, model, method), in words: the
    /// features chosen, and for [`Encoding::Auto`] why.
    pub fn choices(&self) -> BTreeMap<String, String> {
        Kind::ALL
            .into_iter()
            .map(|kind| {
                let key = kind_key(kind);
                let what = match self.config.encoding {
                    Encoding::Auto if self.numeric_kinds.contains(&key) => {
                        "numeric facts".to_owned()
                    }
                    Encoding::Auto => {
                        "learned effects only (its numeric facts do not tell the training entities apart)"
                            .to_owned()
                    }
                    Encoding::Numeric => "numeric facts".to_owned(),
                    Encoding::OneHot => "one-hot identity".to_owned(),
                    Encoding::Text => "text embedding".to_owned(),
                    Encoding::NumericText => "numeric facts and text embedding".to_owned(),
                };
                (key, what)
            })
            .collect()
    }

    fn onehot_slots(&self, kind: Kind, id: ContentId) -> Vec<f64> {
        let vocab = self
            .onehot
            .get(&kind_key(kind))
            .map_or(&[][..], Vec::as_slice);
        vocab
            .iter()
            .map(|v| f64::from(u8::from(*v == id)))
            .collect()
    }

    fn text(
        &self,
        kind: Kind,
        id: ContentId,
        describe: impl FnOnce() -> String,
        cache: Option<&EmbeddingCache>,
    ) -> Result<Vec<f64>> {
        if let Some(v) = self.known.get(&id) {
            return Ok(v.clone());
        }
        let projection = self
            .projections
            .get(&kind_key(kind))
            .ok_or_else(|| SchedulerError::Data("feature space has no text projection".into()))?;
        let cache = cache.ok_or_else(|| {
            SchedulerError::invalid("encoding", "an unseen entity needs the embedder")
        })?;
        let v = cache.embed(&[describe()])?;
        v.first()
            .map(|v| projection.apply(v))
            .ok_or_else(|| SchedulerError::Embed("no vector".into()))
    }

    /// An entity's features. `id` is computed only where an encoding needs it (hashing a
    /// descriptor costs microseconds, and a routing decision builds hundreds of rows).
    fn entity(
        &self,
        kind: Kind,
        id: impl FnOnce() -> metainf_protocol::Result<ContentId>,
        numeric: impl FnOnce() -> Vec<f64>,
        describe: impl FnOnce() -> String,
        cache: Option<&EmbeddingCache>,
    ) -> Result<Vec<f64>> {
        Ok(match self.config.encoding {
            Encoding::Auto if self.numeric_kinds.contains(&kind_key(kind)) => numeric(),
            Encoding::Auto => Vec::new(),
            Encoding::Numeric => numeric(),
            Encoding::OneHot => self.onehot_slots(kind, id()?),
            Encoding::Text => self.text(kind, id()?, describe, cache)?,
            Encoding::NumericText => {
                let mut v = numeric();
                v.extend(self.text(kind, id()?, describe, cache)?);
                v
            }
        })
    }

    /// Features of a (workload, hardware, model) context.
    pub fn context(&self, ctx: Context<'_>, cache: Option<&EmbeddingCache>) -> Result<Vec<f64>> {
        let style = self.config.style;
        let mut v = self.entity(
            Kind::Workload,
            || ctx.workload.id(),
            || workload_numeric(ctx.workload, &self.extra_keys),
            || describe_workload(ctx.workload, style),
            cache,
        )?;
        v.extend(self.entity(
            Kind::Hardware,
            || ctx.hardware.id(),
            || hardware_numeric(ctx.hardware),
            || describe_hardware(ctx.hardware, style),
            cache,
        )?);
        v.extend(self.entity(
            Kind::Model,
            || ctx.model.id(),
            || model_numeric(ctx.model),
            || describe_model(ctx.model, style),
            cache,
        )?);
        Ok(v)
    }

    /// Features of a method.
    pub fn method(&self, m: &MethodConfig, cache: Option<&EmbeddingCache>) -> Result<Vec<f64>> {
        self.entity(
            Kind::Method,
            || m.id(),
            || method_numeric(m, &self.other_flags),
            || describe_method(m, self.config.style),
            cache,
        )
    }

    /// Features of every cell's context in `tensor` (indexed like `tensor.cells`).
    pub fn tensor_contexts(
        &self,
        tensor: &Tensor,
        cache: Option<&EmbeddingCache>,
    ) -> Result<Vec<Vec<f64>>> {
        tensor
            .cells
            .iter()
            .map(|c| {
                self.context(
                    Context {
                        workload: &tensor.workloads[c.workload],
                        hardware: &tensor.hardware[c.hardware],
                        model: &tensor.models[c.model],
                    },
                    cache,
                )
            })
            .collect()
    }

    /// Features of every method of `tensor` (indexed like `tensor.methods`).
    pub fn tensor_methods(
        &self,
        tensor: &Tensor,
        cache: Option<&EmbeddingCache>,
    ) -> Result<Vec<Vec<f64>>> {
        tensor
            .methods
            .iter()
            .map(|m| self.method(m, cache))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use metainf_protocol::{Keypair, fixtures};

    fn tensor() -> Tensor {
        let key = Keypair::generate_ed25519();
        let records: Vec<_> = (0..80).map(|v| fixtures::record(&key, v + 1, v)).collect();
        Tensor::from_records(&records).unwrap()
    }

    #[test]
    fn numeric_rows_have_one_length_and_see_the_flags() {
        let t = tensor();
        let all: Vec<usize> = (0..t.cells.len()).collect();
        let numeric = FeatureConfig {
            encoding: Encoding::Numeric,
            ..FeatureConfig::default()
        };
        let fs = FeatureSpace::fit(&t, &all, numeric, None).unwrap();
        let ctx = fs.tensor_contexts(&t, None).unwrap();
        assert!(ctx.iter().all(|r| r.len() == ctx[0].len()));
        // Auto keeps only what tells the training entities apart: the fixture's five
        // workloads have the same numbers, its one model too; its two hardware profiles
        // differ.
        let auto = FeatureSpace::fit(&t, &all, FeatureConfig::default(), None).unwrap();
        let choices = auto.choices();
        assert_eq!(choices["hardware"], "numeric facts");
        assert!(choices["workload"].starts_with("learned effects only"));
        assert!(choices["model"].starts_with("learned effects only"));
        assert_eq!(choices["method"], "numeric facts");
        let auto_ctx = auto.tensor_contexts(&t, None).unwrap();
        assert_eq!(auto_ctx[0].len(), 9);
        let m = fs.tensor_methods(&t, None).unwrap();
        let cb = t
            .methods
            .iter()
            .position(|m| m.short_name() == "cb")
            .unwrap();
        let none = t
            .methods
            .iter()
            .position(|m| m.short_name() == "none")
            .unwrap();
        assert_eq!(m[cb][0], 1.0);
        assert_eq!(m[none][..3], [0.0, 0.0, 0.0]);
        // Hardware with 1 and 2 threads differ in their compute-unit feature.
        let h: BTreeSet<u64> = ctx.iter().map(|r| (r[17] * 1e6) as u64).collect();
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn onehot_leaves_unseen_entities_blank() {
        let t = tensor();
        // Train on the 1-thread cells only.
        let train: Vec<usize> = (0..t.cells.len())
            .filter(|&c| t.hardware[t.cells[c].hardware].spec.compute_units == 1)
            .collect();
        let config = FeatureConfig {
            encoding: Encoding::OneHot,
            ..FeatureConfig::default()
        };
        let fs = FeatureSpace::fit(&t, &train, config, None).unwrap();
        let unseen = fixtures::cpu_hardware(7);
        let w = fixtures::workload("chat", 16);
        let m = fixtures::smollm2();
        let row = fs
            .context(
                Context {
                    workload: &w,
                    hardware: &unseen,
                    model: &m,
                },
                None,
            )
            .unwrap();
        // 5 workload slots, 1 hardware slot (blank), 1 model slot.
        assert_eq!(row.len(), 7);
        assert_eq!(row[5], 0.0);
        assert_eq!(row[6], 1.0);
        assert!(
            FeatureSpace::fit(
                &t,
                &train,
                FeatureConfig {
                    encoding: Encoding::Text,
                    ..FeatureConfig::default()
                },
                None
            )
            .is_err()
        );
    }
}
