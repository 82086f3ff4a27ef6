//! Acceleration methods: a set of engine flags plus their parameters.
//!
//! A method is open-ended: a flag is a name and a parameter a named value, so engines can add
//! flags (speculative decoding, KV dtype, ...) without breaking old records or old nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ProtocolError, Result};
use crate::id::ContentId;
use crate::validate;

/// Content id of a [`MethodConfig`].
pub type MethodId = ContentId;

/// The flags of the engine this workspace ships.
pub mod flags {
    /// Iteration-level scheduling: a sequence joins the running batch as soon as a slot frees.
    pub const CONTINUOUS_BATCHING: &str = "continuous_batching";
    /// Block-aligned KV-cache blocks keyed by a hash of the token prefix, reused across requests.
    pub const PREFIX_CACHING: &str = "prefix_caching";
    /// Prompts prefilled in chunks interleaved with decode steps.
    pub const CHUNKED_PREFILL: &str = "chunked_prefill";

    /// The standard flags, in display order, with their short names.
    pub const STANDARD: [(&str, &str); 3] = [
        (CONTINUOUS_BATCHING, "cb"),
        (PREFIX_CACHING, "pc"),
        (CHUNKED_PREFILL, "cp"),
    ];
}

/// Well-known parameter names.
pub mod params {
    /// Most sequences in one batch.
    pub const MAX_BATCH: &str = "max_batch";
    /// Tokens per prefill chunk (chunked prefill).
    pub const CHUNK_SIZE: &str = "chunk_size";
    /// Tokens per KV block (prefix caching).
    pub const BLOCK_SIZE: &str = "block_size";
    /// KV-cache memory budget in bytes.
    pub const KV_BUDGET_BYTES: &str = "kv_budget_bytes";
}

/// The value of a method parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamValue {
    /// An integer.
    Int(i64),
    /// A real number.
    Float(f64),
    /// A string.
    Text(String),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Int(v) => write!(f, "{v}"),
            ParamValue::Float(v) => write!(f, "{v}"),
            ParamValue::Text(v) => f.write_str(v),
        }
    }
}

/// An acceleration method: the set of enabled flags and the parameters they run with.
/// The empty set is the baseline (static batching, no KV reuse, whole-prompt prefill).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodConfig {
    /// Enabled flags.
    pub flags: BTreeSet<String>,
    /// Parameters by name.
    pub params: BTreeMap<String, ParamValue>,
}

impl MethodConfig {
    /// The baseline: no flags.
    pub fn baseline() -> Self {
        Self::default()
    }

    /// Adds a flag.
    pub fn with_flag(mut self, flag: &str) -> Self {
        self.flags.insert(flag.to_owned());
        self
    }

    /// Sets a parameter.
    pub fn with_param(mut self, name: &str, value: ParamValue) -> Self {
        self.params.insert(name.to_owned(), value);
        self
    }

    /// Whether `flag` is enabled.
    pub fn has(&self, flag: &str) -> bool {
        self.flags.contains(flag)
    }

    /// An integer parameter, if set.
    pub fn int_param(&self, name: &str) -> Option<i64> {
        match self.params.get(name) {
            Some(ParamValue::Int(v)) => Some(*v),
            _ => None,
        }
    }

    /// The 2^3 combinations of the standard flags, baseline first, without parameters.
    pub fn standard_methods() -> Vec<MethodConfig> {
        (0..8u8)
            .map(|mask| {
                let mut m = MethodConfig::baseline();
                for (i, (flag, _)) in flags::STANDARD.iter().enumerate() {
                    if mask & (1 << i) != 0 {
                        m.flags.insert((*flag).to_owned());
                    }
                }
                m
            })
            .collect()
    }

    /// A short name: `none`, `cb`, `cb+pc+cp`; unknown flags appear under their full name.
    pub fn short_name(&self) -> String {
        if self.flags.is_empty() {
            return "none".to_owned();
        }
        let mut parts: Vec<&str> = flags::STANDARD
            .iter()
            .filter(|(flag, _)| self.flags.contains(*flag))
            .map(|(_, short)| *short)
            .collect();
        for flag in &self.flags {
            if !flags::STANDARD.iter().any(|(f, _)| f == flag) {
                parts.push(flag);
            }
        }
        parts.join("+")
    }

    /// The method's content id (flags and parameters).
    pub fn id(&self) -> Result<MethodId> {
        ContentId::of("metainf method v1", self)
    }

    /// Checks names and sizes.
    pub fn validate(&self) -> Result<()> {
        validate::count("method.flags", self.flags.len(), validate::MAX_ENTRIES)?;
        validate::count("method.params", self.params.len(), validate::MAX_ENTRIES)?;
        for flag in &self.flags {
            validate::key("method.flags", flag)?;
        }
        for (name, value) in &self.params {
            validate::key("method.params", name)?;
            match value {
                ParamValue::Float(v) if !v.is_finite() => {
                    return Err(ProtocolError::invalid("method.params", "non-finite value"));
                }
                ParamValue::Text(t) => validate::text("method.params", t)?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl fmt::Display for MethodConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short_name())
    }
}

impl FromStr for MethodConfig {
    type Err = ProtocolError;

    /// Parses `none`, or flags joined by `+`, each a short name (`cb`, `pc`, `cp`) or a full
    /// flag name (`continuous_batching`, or a flag this build does not know).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ProtocolError::invalid("method", "empty method name"));
        }
        let mut method = MethodConfig::baseline();
        if s == "none" || s == "baseline" {
            return Ok(method);
        }
        for part in s.split('+') {
            let part = part.trim();
            let flag = flags::STANDARD
                .iter()
                .find(|(full, short)| *short == part || *full == part)
                .map_or(part, |(full, _)| *full);
            validate::key("method", flag)?;
            method.flags.insert(flag.to_owned());
        }
        Ok(method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_standard_methods_with_distinct_names_and_ids() {
        let methods = MethodConfig::standard_methods();
        assert_eq!(methods.len(), 8);
        assert_eq!(methods[0].short_name(), "none");
        let names: BTreeSet<String> = methods.iter().map(MethodConfig::short_name).collect();
        assert_eq!(names.len(), 8);
        assert!(names.contains("cb+pc+cp"));
        let ids: BTreeSet<MethodId> = methods.iter().map(|m| m.id().unwrap()).collect();
        assert_eq!(ids.len(), 8);
        for m in &methods {
            assert_eq!(&m.short_name().parse::<MethodConfig>().unwrap(), m);
        }
    }

    #[test]
    fn unknown_flags_survive_and_params_change_the_id() {
        let m: MethodConfig = "cb+speculative_decoding".parse().unwrap();
        assert!(m.has(flags::CONTINUOUS_BATCHING));
        assert!(m.has("speculative_decoding"));
        assert_eq!(m.short_name(), "cb+speculative_decoding");
        let a = m.clone().with_param(params::MAX_BATCH, ParamValue::Int(8));
        let b = m.with_param(params::MAX_BATCH, ParamValue::Int(16));
        assert_ne!(a.id().unwrap(), b.id().unwrap());
        assert_eq!(a.int_param(params::MAX_BATCH), Some(8));
        assert!("Bad Flag".parse::<MethodConfig>().is_err());
        assert!("".parse::<MethodConfig>().is_err());
    }
}
