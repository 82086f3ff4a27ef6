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

/// Reusable buffers of the sampler, so a step allocates nothing per token.
#[derive(Default)]
pub(crate) struct SampleScratch {
    weights: Vec<f32>,
    ranked: Vec<(u32, f32)>,
}

/// Picks the next token.
///
/// With the whole nucleus (`top_p` = 1, the OpenAI default) a token is drawn from the full
/// distribution in two linear passes, nothing sorted. A smaller nucleus ranks only the most
/// likely tokens: a partial selection of the top k (64 first, widened until they hold the
/// mass), and sorts those k, not the vocabulary.
pub(crate) fn sample(
    logits: &[f32],
    params: &Sampling,
    rng: &mut StdRng,
    scratch: &mut SampleScratch,
) -> u32 {
    if params.temperature <= 0.0 || !params.temperature.is_finite() || logits.is_empty() {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / params.temperature;
    let top_p = params.top_p.clamp(f32::MIN_POSITIVE, 1.0);
    if top_p >= 1.0 {
        let w = &mut scratch.weights;
        w.clear();
        w.extend(logits.iter().map(|&l| ((l - max) * inv_t).exp()));
        let total: f32 = w.iter().sum();
        let mut r = rng.gen_range(0.0..total.max(f32::MIN_POSITIVE));
        let mut last = 0;
        for (i, &p) in w.iter().enumerate() {
            if p <= 0.0 {
                continue;
            }
            if r < p {
                return i as u32;
            }
            r -= p;
            last = i;
        }
        return last as u32;
    }
    let ranked = &mut scratch.ranked;
    ranked.clear();
    ranked.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .filter(|(_, p)| *p > 0.0),
    );
    let n = ranked.len();
    if n == 0 {
        return argmax(logits);
    }
    let total: f32 = ranked.iter().map(|(_, p)| p).sum();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut k = n.min(64);
    let kept = loop {
        if k < n {
            ranked.select_nth_unstable_by(k - 1, order);
        }
        ranked[..k].sort_unstable_by(order);
        let mut kept = 0;
        let mut mass = 0.0;
        for (_, p) in &ranked[..k] {
            kept += 1;
            mass += p / total;
            if mass >= top_p {
                break;
            }
        }
        if mass >= top_p || k == n {
            break kept.max(1);
        }
        k = (k * 4).min(n);
    };
    let kept = &ranked[..kept];
    let kept_mass: f32 = kept.iter().map(|(_, p)| p).sum();
    let mut r = rng.gen_range(0.0..kept_mass.max(f32::MIN_POSITIVE));
    for (id, p) in kept {
        if r < *p {
            return *id;
        }
        r -= p;
    }
    kept.last().map_or(0, |(id, _)| *id)
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
        assert_eq!(
            sample(&logits, &greedy, &mut rng, &mut SampleScratch::default()),
            0
        );
        // A tiny nucleus keeps only the most likely token.
        let narrow = Sampling {
            temperature: 1.0,
            top_p: 0.01,
            seed: 1,
        };
        for _ in 0..50 {
            assert_eq!(
                sample(&logits, &narrow, &mut rng, &mut SampleScratch::default()),
                0
            );
        }
        // With the whole mass both likely tokens come up, the unlikely ones (p ~ 1e-7) not.
        let wide = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 1,
        };
        let picks: Vec<u32> = (0..400)
            .map(|_| sample(&logits, &wide, &mut rng, &mut SampleScratch::default()))
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1));
        assert!(picks.iter().all(|p| *p < 2));
        // The same seed replays the same choices.
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&logits, &wide, &mut rng, &mut SampleScratch::default()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
    }

    /// The nucleus by a full sort of the vocabulary: what the partial selection must equal.
    fn reference(logits: &[f32], params: &Sampling, rng: &mut StdRng) -> u32 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * (1.0 / params.temperature)).exp()))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        let total: f32 = probs.iter().map(|(_, p)| p).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for (_, p) in &probs {
            kept += 1;
            mass += p / total;
            if mass >= params.top_p {
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

    #[test]
    fn partial_selection_keeps_the_nucleus_of_a_full_sort() {
        // A vocabulary the size of SmolLM2's, with a flat tail so that the nucleus needs many
        // widenings of the selection at top_p 0.95 and few at 0.5.
        let mut seed_rng = StdRng::seed_from_u64(7);
        let logits: Vec<f32> = (0..49_152)
            .map(|i| {
                if i % 97 == 0 {
                    4.0
                } else {
                    seed_rng.gen_range(-2.0..2.0)
                }
            })
            .collect();
        let mut scratch = SampleScratch::default();
        for top_p in [0.05, 0.5, 0.95] {
            let params = Sampling {
                temperature: 0.8,
                top_p,
                seed: 3,
            };
            let (mut a, mut b) = (StdRng::seed_from_u64(3), StdRng::seed_from_u64(3));
            for _ in 0..50 {
                assert_eq!(
                    sample(&logits, &params, &mut a, &mut scratch),
                    reference(&logits, &params, &mut b),
                    "top_p {top_p}"
                );
            }
        }
        // The whole nucleus draws in proportion: token 0 of [ln 3, 0] about 3 times in 4.
        let two = [3f32.ln(), 0.0];
        let whole = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        };
        let mut rng = StdRng::seed_from_u64(11);
        let zeros = (0..4000)
            .filter(|_| sample(&two, &whole, &mut rng, &mut scratch) == 0)
            .count();
        assert!((2800..3200).contains(&zeros), "{zeros} of 4000");
    }
}
