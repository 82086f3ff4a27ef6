//! Token sampling: greedy, or temperature with nucleus (top-p) from a per-request seed.

use rand::Rng;
use rand::rngs::StdRng;

/// How to pick each next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax, the lowest id on ties).
    pub temperature: f32,
    /// Nucleus mass in (0, 1]: sample among the most likely tokens that together hold it.
    pub top_p: f32,
    /// Seed of this request's sampler: the same seed gives the same tokens in any batch.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// The index of the largest value (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut max = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > max {
            max = v;
            best = i;
        }
    }
    best as u32
}

/// Picks the next token.
pub(crate) fn sample(logits: &[f32], params: &Sampling, rng: &mut StdRng) -> u32 {
    if params.temperature <= 0.0 || !params.temperature.is_finite() {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / params.temperature).exp()))
        .filter(|(_, p)| *p > 0.0)
        .collect();
    let total: f32 = probs.iter().map(|(_, p)| p).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_p = params.top_p.clamp(f32::MIN_POSITIVE, 1.0);
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, p) in &probs {
        kept += 1;
        mass += p / total;
        if mass >= top_p {
            break;
        }
    }
    probs.truncate(kept.max(1));
    let kept_mass: f32 = probs.iter().map(|(_, p)| p).sum();
    let mut r = rng.gen_range(0.0..kept_mass.max(f32::MIN_POSITIVE));
    for (id, p) in &probs {
        if r < *p {
            return *id;
        }
        r -= p;
    }
    probs.last().map_or(0, |(id, _)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_the_first_maximum_and_top_p_limits_the_choice() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let logits = [5.0, 4.0, -10.0, -10.0];
        let mut rng = StdRng::seed_from_u64(1);
        let greedy = Sampling::default();
        assert_eq!(sample(&logits, &greedy, &mut rng), 0);
        // A tiny nucleus keeps only the most likely token.
        let narrow = Sampling {
            temperature: 1.0,
            top_p: 0.01,
            seed: 1,
        };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &narrow, &mut rng), 0);
        }
        // With the whole mass both likely tokens come up, the unlikely ones (p ~ 1e-7) not.
        let wide = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 1,
        };
        let picks: Vec<u32> = (0..400).map(|_| sample(&logits, &wide, &mut rng)).collect();
        assert!(picks.contains(&0) && picks.contains(&1));
        assert!(picks.iter().all(|p| *p < 2));
        // The same seed replays the same choices.
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&logits, &wide, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
    }
}
