//! Workload generators: named presets of realistic shape, seeded and reproducible.
//!
//! | preset | shape | where a method should win |
//! |---|---|---|
//! | `chat` | a shared system prompt, varied questions, varied answer lengths | prefix caching, continuous batching |
//! | `multi-turn` | conversations whose every turn repeats the turns before it | prefix caching |
//! | `few-shot` | a long block of shared examples, a short query | prefix caching |
//! | `summarise` | long documents, short summaries | chunked prefill |
//! | `reasoning` | short problems, long answers | continuous batching |

use std::fmt;
use std::str::FromStr;

use metainf_protocol::{Arrival, ChatMessage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::ProfilerError;

/// The presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// Shared system prompt, varied questions and answer lengths.
    Chat,
    /// Conversations: each turn's prompt holds the conversation so far.
    MultiTurn,
    /// A long shared block of examples, then a short query.
    FewShot,
    /// Long documents, short outputs.
    Summarise,
    /// Short prompts, long outputs.
    Reasoning,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 5] = [
        Preset::Chat,
        Preset::MultiTurn,
        Preset::FewShot,
        Preset::Summarise,
        Preset::Reasoning,
    ];

    /// The preset's name, as in `WorkloadDescriptor::preset`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Chat => "chat",
            Preset::MultiTurn => "multi-turn",
            Preset::FewShot => "few-shot",
            Preset::Summarise => "summarise",
            Preset::Reasoning => "reasoning",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = ProfilerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                ProfilerError::Measure(format!(
                    "unknown workload {s:?}; one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// One generated request.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedRequest {
    /// The chat to send (the model's template is applied by the engine).
    pub messages: Vec<ChatMessage>,
    /// Most tokens to generate.
    pub max_new_tokens: u32,
    /// Arrival time after the start of the run, seconds.
    pub arrival_s: f64,
}

/// A generated workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Which preset made it.
    pub preset: Preset,
    /// How requests arrive.
    pub arrival: Arrival,
    /// The requests, in arrival order.
    pub requests: Vec<GeneratedRequest>,
}

const WORDS: &[&str] = &[
    "the",
    "network",
    "model",
    "latency",
    "memory",
    "request",
    "batch",
    "cache",
    "token",
    "prefix",
    "engine",
    "node",
    "cost",
    "budget",
    "throughput",
    "runtime",
    "kernel",
    "layer",
    "attention",
    "matrix",
    "vector",
    "signal",
    "record",
    "peer",
    "market",
    "river",
    "city",
    "history",
    "energy",
    "garden",
    "window",
    "science",
    "music",
    "language",
    "system",
    "quickly",
    "carefully",
    "because",
    "although",
    "measure",
    "describe",
    "compare",
    "explain",
    "small",
    "large",
    "recent",
    "ancient",
    "simple",
    "complex",
    "useful",
    "and",
    "of",
    "to",
    "in",
];

fn sentence(rng: &mut StdRng, words: std::ops::Range<usize>) -> String {
    let words = rng.gen_range(words);
    let mut out = String::new();
    for i in 0..words.max(1) {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    out.push('.');
    out
}

fn paragraph(rng: &mut StdRng, approx_words: std::ops::Range<usize>) -> String {
    let approx_words = rng.gen_range(approx_words);
    let mut out = String::new();
    let mut n = 0;
    while n < approx_words {
        let len = rng.gen_range(6..18);
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&sentence(rng, len..len + 1));
        n += len;
    }
    out
}

fn msg(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content,
    }
}

/// Generates `n` requests of `preset`, arriving as `arrival` says, reproducibly from `seed`.
pub fn generate(preset: Preset, n: usize, arrival: Arrival, seed: u64) -> Workload {
    let mut rng = StdRng::seed_from_u64(seed ^ (preset as u64).wrapping_mul(0x9e37_79b9));
    let system = msg(
        "system",
        format!(
            "You are a helpful assistant of the metainf network. {}",
            paragraph(&mut rng, 60..61)
        ),
    );
    let shots: String = (0..12)
        .map(|i| {
            format!(
                "Example {i}: {} Answer: {}\n",
                sentence(&mut rng, 12..13),
                sentence(&mut rng, 6..7)
            )
        })
        .collect();
    let mut conversation: Vec<ChatMessage> = vec![system.clone()];
    let mut requests = Vec::with_capacity(n);
    let mut t = 0.0;
    for i in 0..n {
        let (messages, max_new_tokens) = match preset {
            Preset::Chat => (
                vec![system.clone(), msg("user", sentence(&mut rng, 5..40))],
                rng.gen_range(16..160),
            ),
            Preset::MultiTurn => {
                // Conversations of 4 turns; each request carries the whole conversation so far.
                if i % 4 == 0 {
                    conversation = vec![system.clone()];
                }
                conversation.push(msg("user", sentence(&mut rng, 6..30)));
                let request = conversation.clone();
                conversation.push(msg("assistant", paragraph(&mut rng, 20..60)));
                (request, rng.gen_range(32..128))
            }
            Preset::FewShot => (
                vec![msg(
                    "user",
                    format!("{shots}Query: {}", sentence(&mut rng, 10..11)),
                )],
                rng.gen_range(8..24),
            ),
            Preset::Summarise => (
                vec![msg(
                    "user",
                    format!(
                        "Summarise this document.\n{}",
                        paragraph(&mut rng, 400..900)
                    ),
                )],
                rng.gen_range(24..64),
            ),
            Preset::Reasoning => (
                vec![msg(
                    "user",
                    format!("Think step by step. {}", sentence(&mut rng, 8..24)),
                )],
                rng.gen_range(192..384),
            ),
        };
        if let Arrival::Poisson { rate_per_s } = arrival {
            // Exponential gaps: -ln(U) / rate, U in (0, 1].
            let u: f64 = 1.0 - rng.gen_range(0.0..1.0);
            t += -u.ln() / rate_per_s;
        }
        requests.push(GeneratedRequest {
            messages,
            max_new_tokens,
            arrival_s: t,
        });
    }
    Workload {
        preset,
        arrival,
        requests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_reproducible_and_names_round_trip() {
        for p in Preset::ALL {
            let a = generate(p, 20, Arrival::AllAtOnce, 7);
            assert_eq!(a, generate(p, 20, Arrival::AllAtOnce, 7));
            assert_ne!(a, generate(p, 20, Arrival::AllAtOnce, 8));
            assert_eq!(a.requests.len(), 20);
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        assert!("nope".parse::<Preset>().is_err());
    }

    #[test]
    fn poisson_arrivals_have_the_requested_rate() {
        let w = generate(Preset::Chat, 4000, Arrival::Poisson { rate_per_s: 8.0 }, 1);
        let last = w.requests.last().unwrap().arrival_s;
        let rate = 4000.0 / last;
        assert!((rate - 8.0).abs() < 0.5, "rate {rate}");
        assert!(
            w.requests
                .windows(2)
                .all(|p| p[0].arrival_s <= p[1].arrival_s)
        );
        let at_once = generate(Preset::Chat, 10, Arrival::AllAtOnce, 1);
        assert!(at_once.requests.iter().all(|r| r.arrival_s == 0.0));
    }
}
