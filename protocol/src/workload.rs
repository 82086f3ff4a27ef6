//! The shape of a batch of requests: what the meta-predictor conditions on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ProtocolError, Result};
use crate::id::ContentId;
use crate::validate;

/// Content id of a [`WorkloadDescriptor`].
pub type WorkloadId = ContentId;

/// Most requests one workload may describe.
pub const MAX_REQUESTS: u32 = 1_000_000;

/// Summary statistics of a list of lengths (in tokens).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    /// Smallest value.
    pub min: u32,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median (nearest rank).
    pub p50: u32,
    /// 95th percentile (nearest rank).
    pub p95: u32,
    /// Largest value.
    pub max: u32,
}

impl LengthStats {
    /// Computes the statistics of `values`; all zero when empty.
    pub fn of(values: &[u32]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        let sum: u64 = sorted.iter().map(|&v| u64::from(v)).sum();
        Self {
            min: sorted[0],
            mean: sum as f64 / sorted.len() as f64,
            p50: nearest_rank(&sorted, 0.50),
            p95: nearest_rank(&sorted, 0.95),
            max: sorted[sorted.len() - 1],
        }
    }

    fn validate(&self, field: &'static str) -> Result<()> {
        validate::finite_nonneg(field, self.mean)?;
        let ordered = self.min <= self.p50 && self.p50 <= self.p95 && self.p95 <= self.max;
        let mean_inside =
            self.mean >= f64::from(self.min) - 1e-9 && self.mean <= f64::from(self.max) + 1e-9;
        if !ordered || !mean_inside {
            return Err(ProtocolError::invalid(
                field,
                "statistics are not ordered (min <= p50 <= p95 <= max, min <= mean <= max)",
            ));
        }
        Ok(())
    }
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1).
pub fn nearest_rank(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// How requests arrive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Every request is there at time zero (a batch job).
    AllAtOnce,
    /// Requests arrive as a Poisson process.
    Poisson {
        /// Mean arrivals per second.
        rate_per_s: f64,
    },
}

/// The workload of a job or benchmark run, described by numbers that can be computed from any
/// job's prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadDescriptor {
    /// Name of the generator preset (`chat`, `multi-turn`, ...), or `None` for user jobs.
    pub preset: Option<String>,
    /// Number of requests.
    pub requests: u32,
    /// Prompt lengths in tokens.
    pub prompt_tokens: LengthStats,
    /// Requested output lengths (max new tokens) per request.
    pub max_new_tokens: LengthStats,
    /// Share of all prompt tokens that repeat a prefix of another prompt of the job, in 0..=1:
    /// what a perfect prefix cache would not recompute.
    pub prefix_sharing: f64,
    /// How requests arrive.
    pub arrival: Arrival,
    /// Sampling temperature (0 = greedy).
    pub temperature: f64,
    /// Further numeric facts about the workload, by name (for example the columns of an
    /// imported benchmark table). Empty for the engine's own workloads.
    pub extra: BTreeMap<String, f64>,
}

impl WorkloadDescriptor {
    /// Describes a job from its tokenized prompts and the output budget of each request.
    pub fn from_prompts(
        preset: Option<String>,
        prompts: &[Vec<u32>],
        max_new_tokens: &[u32],
        arrival: Arrival,
        temperature: f64,
    ) -> Self {
        let lens: Vec<u32> = prompts
            .iter()
            .map(|p| u32::try_from(p.len()).unwrap_or(u32::MAX))
            .collect();
        Self {
            preset,
            requests: u32::try_from(prompts.len()).unwrap_or(u32::MAX),
            prompt_tokens: LengthStats::of(&lens),
            max_new_tokens: LengthStats::of(max_new_tokens),
            prefix_sharing: prefix_sharing(prompts),
            arrival,
            temperature,
            extra: BTreeMap::new(),
        }
    }

    /// The workload's content id.
    pub fn id(&self) -> Result<WorkloadId> {
        ContentId::of("metainf workload v1", self)
    }

    /// Checks ranges and sizes.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = &self.preset {
            validate::key("workload.preset", p)?;
        }
        if self.requests == 0 || self.requests > MAX_REQUESTS {
            return Err(ProtocolError::invalid(
                "workload.requests",
                format!("{} is outside 1..={MAX_REQUESTS}", self.requests),
            ));
        }
        self.prompt_tokens.validate("workload.prompt_tokens")?;
        self.max_new_tokens.validate("workload.max_new_tokens")?;
        validate::in_range("workload.prefix_sharing", self.prefix_sharing, 0.0, 1.0)?;
        validate::in_range("workload.temperature", self.temperature, 0.0, 10.0)?;
        validate::count("workload.extra", self.extra.len(), validate::MAX_ENTRIES)?;
        for (k, v) in &self.extra {
            validate::key("workload.extra", k)?;
            if !v.is_finite() {
                return Err(ProtocolError::invalid("workload.extra", "non-finite value"));
            }
        }
        if let Arrival::Poisson { rate_per_s } = self.arrival {
            validate::in_range("workload.arrival.rate_per_s", rate_per_s, 1e-6, 1e6)?;
        }
        Ok(())
    }
}

/// Share of prompt tokens that a perfect prefix cache would reuse: one minus the size of the
/// prefix trie of all prompts over their total length.
pub fn prefix_sharing(prompts: &[Vec<u32>]) -> f64 {
    let total: usize = prompts.iter().map(Vec::len).sum();
    if total == 0 {
        return 0.0;
    }
    let mut sorted: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    sorted.sort_unstable();
    let shared: usize = sorted
        .windows(2)
        .map(|w| w[0].iter().zip(w[1]).take_while(|(a, b)| a == b).count())
        .sum();
    shared as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_percentiles() {
        let s = LengthStats::of(&[10, 1, 5, 7, 3]);
        assert_eq!((s.min, s.p50, s.max), (1, 5, 10));
        assert_eq!(s.p95, 10);
        assert!((s.mean - 5.2).abs() < 1e-12);
        assert_eq!(LengthStats::of(&[]), LengthStats::default());
        let hundred: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&hundred, 0.95), 95);
        assert_eq!(nearest_rank(&hundred, 0.5), 50);
    }

    #[test]
    fn prefix_sharing_counts_reusable_tokens() {
        // Three prompts sharing a 4-token system prompt: 8 of 18 tokens are reusable.
        let system = [1u32, 2, 3, 4];
        let p = |tail: &[u32]| [&system[..], tail].concat();
        let prompts = vec![p(&[9, 9]), p(&[8, 8, 8]), p(&[7, 7, 7, 7])];
        let total = 6 + 7 + 8;
        assert!((prefix_sharing(&prompts) - 8.0 / total as f64).abs() < 1e-12);
        assert_eq!(prefix_sharing(&[vec![1, 2], vec![3, 4]]), 0.0);
        assert_eq!(prefix_sharing(&[]), 0.0);
        // Identical prompts: all but the first copy are reusable.
        assert!((prefix_sharing(&[vec![5; 10], vec![5; 10]]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn descriptor_from_prompts_validates() {
        let w = WorkloadDescriptor::from_prompts(
            Some("chat".into()),
            &[vec![1, 2, 3], vec![1, 2, 4, 5]],
            &[16, 32],
            Arrival::AllAtOnce,
            0.0,
        );
        assert_eq!(w.requests, 2);
        assert_eq!(w.prompt_tokens.max, 4);
        w.validate().unwrap();
        let mut bad = w.clone();
        bad.prefix_sharing = f64::NAN;
        assert!(bad.validate().is_err());
        let mut bad = w;
        bad.prompt_tokens.min = 100;
        assert!(bad.validate().is_err());
    }
}
