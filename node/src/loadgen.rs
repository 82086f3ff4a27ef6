//! `metainf-node loadgen`: a load generator for any OpenAI-compatible endpoint (a metainf
//! node, `llama-server`, vLLM, ...), so that engines are compared by the same client.
//!
//! Every request is a streamed `POST /v1/chat/completions`; the client times the first
//! content chunk (TTFT), the gaps between later chunks (ITL) and the whole response. Scenarios:
//! `concurrent` (single-turn chats), `sequential` (the same, one client), `multi-turn`
//! (conversations whose history, answers included, is resent every turn), `shared-prefix`
//! (many users behind one long system prompt) and `multi-tenant` (T tenants, each with its own
//! long system prompt, whose multi-turn conversations resend their history). Load is
//! closed-loop (N clients, each sending its next request when the last one is done) or
//! open-loop (Poisson arrivals at a rate). Several gateways may share the load (`--url A,B`):
//! conversation `c` goes to gateway `c mod n`, every turn of it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// What the load looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Single-turn chats with a short system prompt, from every client at once.
    Concurrent,
    /// The same chats from one client, one after another.
    Sequential,
    /// Conversations of several turns, the whole history resent each turn.
    MultiTurn,
    /// Many users behind one long shared system prompt.
    SharedPrefix,
    /// Tenants, each with its own long system prompt, whose users hold multi-turn
    /// conversations (history resent each turn).
    MultiTenant,
}

/// A load test (also the flags of `metainf-node loadgen`).
#[derive(Clone, Debug, clap::Args)]
pub struct LoadConfig {
    /// The endpoint's base URL (`/v1/chat/completions` is appended); several, comma-separated,
    /// share the conversations between them (each conversation stays on one).
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080",
        value_name = "URL[,URL...]"
    )]
    pub url: String,
    /// Model name to ask for [default: the first `GET /v1/models` lists].
    #[arg(long = "model-name", value_name = "NAME")]
    pub model: Option<String>,
    /// The load: concurrent chats, sequential chats, multi-turn conversations with their
    /// history resent, or many users behind one shared system prompt.
    #[arg(long, value_enum, default_value = "concurrent")]
    pub scenario: Scenario,
    /// Closed-loop clients, each sending its next request when its last one is done
    /// (`sequential`: one).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Open-loop Poisson arrivals per second instead of closed-loop clients.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Conversations (single-turn scenarios: requests).
    #[arg(long, default_value_t = 8)]
    pub conversations: usize,
    /// Turns per conversation (multi-turn, multi-tenant).
    #[arg(long, default_value_t = 3)]
    pub turns: usize,
    /// Tenants, each with its own system prompt (multi-tenant).
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// Routing policy asked of a metainf gateway in every request (`metainf`, `round-robin`,
    /// `random`, `least-loaded`, `prefix-affinity`) [default: the gateway's own].
    #[arg(long)]
    pub policy: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Approximate tokens of the long system prompt (multi-turn, shared-prefix, multi-tenant).
    #[arg(long, default_value_t = 800)]
    pub system_tokens: usize,
    /// Seed of the prompts and the arrivals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Most seconds one request may take.
    #[arg(long = "timeout-s", default_value_t = 600)]
    pub timeout_s: u64,
    /// Show a progress bar.
    #[arg(skip)]
    pub progress: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            model: None,
            scenario: Scenario::Concurrent,
            clients: 8,
            rate: None,
            conversations: 8,
            turns: 3,
            tenants: 4,
            policy: None,
            max_tokens: 64,
            temperature: 0.0,
            system_tokens: 800,
            seed: 1,
            timeout_s: 600,
            progress: false,
        }
    }
}

/// Latency percentiles, seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
}

impl Quantiles {
    /// Nearest-rank percentiles of `values`.
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Self {
            n: v.len(),
            p50: q(0.50),
            p90: q(0.90),
            p95: q(0.95),
            p99: q(0.99),
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

/// One request as the client saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    /// Its conversation.
    pub conversation: usize,
    /// Its turn in the conversation, from 0.
    pub turn: usize,
    /// Seconds from sending to the first content, when there was any.
    pub ttft_s: Option<f64>,
    /// Gaps between content chunks after the first, seconds.
    pub itl_s: Vec<f64>,
    /// Seconds from sending to the end of the response.
    pub e2e_s: f64,
    /// Tokens generated (the response's usage, else its content chunks).
    pub output_tokens: u64,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// The HTTP status when the server refused it.
    pub status: Option<u16>,
}

/// What a load test measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadReport {
    /// The endpoint.
    pub url: String,
    /// The model asked for.
    pub model: String,
    /// The scenario.
    pub scenario: Scenario,
    /// Clients (closed loop) or `None` under open-loop arrivals.
    pub clients: Option<usize>,
    /// Arrivals per second (open loop).
    pub rate: Option<f64>,
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (any reason).
    pub failed: usize,
    /// Requests refused with 429.
    pub refused: usize,
    /// Seconds from the first request to the last response.
    pub wall_s: f64,
    /// Tokens generated over all requests.
    pub output_tokens: u64,
    /// Generated tokens per second of wall time.
    pub output_tok_s: f64,
    /// Time to first token.
    pub ttft_s: Quantiles,
    /// Inter-token latency (gaps between content chunks).
    pub itl_s: Quantiles,
    /// Whole-request latency.
    pub e2e_s: Quantiles,
    /// TTFT of each turn (multi-turn: turn 1, 2, ...).
    pub ttft_by_turn_s: Vec<Quantiles>,
    /// Every request.
    pub samples: Vec<Sample>,
}

impl LoadReport {
    fn build(config: &LoadConfig, model: String, wall_s: f64, mut samples: Vec<Sample>) -> Self {
        samples.sort_by_key(|s| (s.conversation, s.turn));
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
        let output_tokens: u64 = ok.iter().map(|s| s.output_tokens).sum();
        let ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft_s).collect();
        let itl: Vec<f64> = ok.iter().flat_map(|s| s.itl_s.iter().copied()).collect();
        let e2e: Vec<f64> = ok.iter().map(|s| s.e2e_s).collect();
        let turns = samples.iter().map(|s| s.turn + 1).max().unwrap_or(0);
        let ttft_by_turn_s = (0..turns)
            .map(|t| {
                let v: Vec<f64> = ok
                    .iter()
                    .filter(|s| s.turn == t)
                    .filter_map(|s| s.ttft_s)
                    .collect();
                Quantiles::of(&v)
            })
            .collect();
        Self {
            url: config.url.clone(),
            model,
            scenario: config.scenario,
            clients: config.rate.is_none().then_some(effective_clients(config)),
            rate: config.rate,
            requests: samples.len(),
            failed: samples.len() - ok.len(),
            refused: samples.iter().filter(|s| s.status == Some(429)).count(),
            wall_s,
            output_tokens,
            output_tok_s: if wall_s > 0.0 {
                output_tokens as f64 / wall_s
            } else {
                0.0
            },
            ttft_s: Quantiles::of(&ttft),
            itl_s: Quantiles::of(&itl),
            e2e_s: Quantiles::of(&e2e),
            ttft_by_turn_s,
            samples,
        }
    }

    /// A human summary.
    pub fn summary(&self) -> String {
        let ms = |q: &Quantiles| {
            format!(
                "p50 {:.0} ms  p90 {:.0} ms  p95 {:.0} ms  p99 {:.0} ms",
                q.p50 * 1e3,
                q.p90 * 1e3,
                q.p95 * 1e3,
                q.p99 * 1e3
            )
        };
        let mut out = format!(
            "{} {:?} ({}), model {}\n\
             requests {} ({} failed, {} refused with 429), wall {:.2} s\n\
             output {} tokens, {:.1} tok/s\n\
             TTFT  {}\nITL   {}\nE2E   {}\n",
            self.url,
            self.scenario,
            match (self.clients, self.rate) {
                (_, Some(r)) => format!("Poisson arrivals at {r}/s"),
                (Some(c), None) => format!("{c} clients"),
                (None, None) => "closed loop".into(),
            },
            self.model,
            self.requests,
            self.failed,
            self.refused,
            self.wall_s,
            self.output_tokens,
            self.output_tok_s,
            ms(&self.ttft_s),
            ms(&self.itl_s),
            ms(&self.e2e_s),
        );
        if self.ttft_by_turn_s.len() > 1 {
            for (t, q) in self.ttft_by_turn_s.iter().enumerate() {
                out.push_str(&format!("TTFT turn {}: {}\n", t + 1, ms(q)));
            }
        }
        if let Some(e) = self.samples.iter().find_map(|s| s.error.as_ref()) {
            out.push_str(&format!("first error: {e}\n"));
        }
        out
    }
}

fn effective_clients(config: &LoadConfig) -> usize {
    match config.scenario {
        Scenario::Sequential => 1,
        _ => config.clients.max(1),
    }
}

const TOPICS: &[&str] = &[
    "the history of the printing press",
    "how bees find their way home",
    "why the sky is blue",
    "the rules of chess",
    "how a refrigerator works",
    "the life cycle of a star",
    "what makes bread rise",
    "how tides are caused",
    "the causes of the seasons",
    "how vaccines train the immune system",
    "why cats purr",
    "how airplanes stay in the air",
    "the water cycle",
    "how a compiler turns code into programs",
    "what a black hole is",
    "how glass is made",
];

const FOLLOW_UPS: &[&str] = &[
    "Can you give a concrete example?",
    "Explain that more simply.",
    "What is a common misconception about it?",
    "Summarise that in one sentence.",
];

const TENANTS: &[&str] = &[
    "Northwind Traders",
    "Blue Harbor Bank",
    "Maple Street Clinic",
    "Orbit Games",
    "Greenfield School",
    "Atlas Logistics",
    "Copper Kettle Cafe",
    "Summit Outdoor Gear",
];

/// The system prompt of tenant `t` under `seed`: its own opening and its own order of rules,
/// so that two tenants' prompts (and one tenant's under two seeds) differ from the start.
fn tenant_prompt(t: usize, tokens: usize, seed: u64) -> String {
    let name = TENANTS[t % TENANTS.len()];
    let round = t / TENANTS.len();
    let opening = format!("{name} (desk {seed}.{round}): you are this company's assistant. ");
    let rest = system_prompt_from(tokens.saturating_sub(12), t);
    opening + &rest
}

/// A system prompt of about `tokens` tokens (about 1.3 tokens per word of this text).
fn system_prompt(tokens: usize) -> String {
    system_prompt_from(tokens, 0)
}

/// The same, its rules starting from rule `first` of the list.
fn system_prompt_from(tokens: usize, first: usize) -> String {
    let sentences = [
        "You are a careful assistant who answers questions about science, history and everyday technology.",
        "Keep answers short and concrete, and prefer plain words to jargon.",
        "When you are unsure, say so instead of guessing, and never invent sources or numbers.",
        "Use examples from daily life where they help, and explain one idea at a time.",
        "If a question is ambiguous, answer the most likely reading and mention the other briefly.",
        "Write in complete sentences without lists unless the user asks for a list.",
    ];
    let mut out = String::new();
    let mut words = 0usize;
    let mut i = 0;
    while words * 13 / 10 < tokens {
        let s = sentences[(first + i) % sentences.len()];
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("Rule {}: {s}", i + 1));
        words += s.split_whitespace().count() + 2;
        i += 1;
    }
    out
}

/// One conversation: its system prompt and its user turns.
#[derive(Clone, Debug, PartialEq)]
struct Conversation {
    system: Option<String>,
    turns: Vec<String>,
}

/// Every conversation of the load.
fn conversations(config: &LoadConfig) -> Vec<Conversation> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let shared = match config.scenario {
        Scenario::MultiTurn | Scenario::SharedPrefix => Some(system_prompt(config.system_tokens)),
        Scenario::Concurrent | Scenario::Sequential => {
            Some("You are a helpful assistant. Answer briefly.".to_owned())
        }
        Scenario::MultiTenant => None,
    };
    let tenants: Vec<String> = match config.scenario {
        Scenario::MultiTenant => (0..config.tenants.max(1))
            .map(|t| tenant_prompt(t, config.system_tokens, config.seed))
            .collect(),
        _ => Vec::new(),
    };
    let turns = match config.scenario {
        Scenario::MultiTurn | Scenario::MultiTenant => config.turns.max(1),
        _ => 1,
    };
    (0..config.conversations.max(1))
        .map(|c| {
            let topic = TOPICS[(c + rng.gen_range(0..TOPICS.len())) % TOPICS.len()];
            let system = if tenants.is_empty() {
                shared.clone()
            } else {
                Some(tenants[c % tenants.len()].clone())
            };
            let turns = (0..turns)
                .map(|t| {
                    if t == 0 {
                        format!("Tell me about {topic}.")
                    } else {
                        FOLLOW_UPS[(c + t) % FOLLOW_UPS.len()].to_owned()
                    }
                })
                .collect();
            Conversation { system, turns }
        })
        .collect()
}

struct Shared {
    client: reqwest::Client,
    /// The gateways (conversation `c` goes to `urls[c % len]`).
    urls: Vec<String>,
    model: String,
    config: LoadConfig,
    bar: Option<indicatif::ProgressBar>,
    samples: Mutex<Vec<Sample>>,
}

/// Runs the load test.
pub async fn run(config: LoadConfig) -> Result<LoadReport> {
    if config.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of arrivals per second");
    }
    // A fresh connection per request: a server may close an idle kept-alive connection just
    // as the client reuses it (llama-server does), which would fail a request it never saw.
    // A key for endpoints that want one, as OpenAI clients take it.
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = ["METAINF_API_KEY", "OPENAI_API_KEY"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|k| !k.is_empty()))
    {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key holds characters a header cannot")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(config.timeout_s.max(1)))
        .pool_max_idle_per_host(0)
        .default_headers(headers)
        .build()
        .context("cannot build the HTTP client")?;
    let urls: Vec<String> = config
        .url
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    let Some(first) = urls.first() else {
        bail!("--url names no endpoint");
    };
    let model = match &config.model {
        Some(m) => m.clone(),
        None => first_model(&client, first).await?,
    };
    let convs = conversations(&config);
    let total: usize = convs.iter().map(|c| c.turns.len()).sum();
    let bar = config.progress.then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} requests [{elapsed_precise}] {bar:30} {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let shared = Arc::new(Shared {
        client,
        urls,
        model: model.clone(),
        config: config.clone(),
        bar,
        samples: Mutex::new(Vec::with_capacity(total)),
    });
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match config.rate {
        Some(rate) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed ^ 0x5eed);
            let mut next = Instant::now();
            for (c, conv) in convs.into_iter().enumerate() {
                tokio::time::sleep_until(next.into()).await;
                tasks.spawn(conversation(shared.clone(), c, conv));
                let u: f64 = rng.gen_range(f64::EPSILON..1.0);
                next += Duration::from_secs_f64(-u.ln() / rate);
            }
        }
        None => {
            let queue = Arc::new(Mutex::new(
                convs.into_iter().enumerate().collect::<VecDeque<_>>(),
            ));
            for _ in 0..effective_clients(&config) {
                let (shared, queue) = (shared.clone(), queue.clone());
                tasks.spawn(async move {
                    loop {
                        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                        let Some((c, conv)) = next else { break };
                        conversation(shared.clone(), c, conv).await;
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(bar) = &shared.bar {
        bar.finish_and_clear();
    }
    let samples = shared
        .samples
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default();
    Ok(LoadReport::build(&config, model, wall_s, samples))
}

async fn first_model(client: &reqwest::Client, url: &str) -> Result<String> {
    #[derive(Deserialize)]
    struct Models {
        data: Vec<Model>,
    }
    #[derive(Deserialize)]
    struct Model {
        id: String,
    }
    let models: Models = client
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?
        .error_for_status()?
        .json()
        .await
        .context("GET /v1/models did not answer with a model list")?;
    models
        .data
        .into_iter()
        .next()
        .map(|m| m.id)
        .context("the endpoint lists no model; pass --model")
}

/// One conversation's turns, one after another, each resending the history.
async fn conversation(shared: Arc<Shared>, c: usize, conv: Conversation) {
    let mut messages = Vec::new();
    if let Some(system) = &conv.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    for (t, user) in conv.turns.into_iter().enumerate() {
        messages.push(json!({"role": "user", "content": user}));
        let (sample, answer) = request(&shared, c, t, &messages).await;
        let failed = sample.error.is_some();
        if let Some(bar) = &shared.bar {
            bar.inc(1);
            if failed {
                bar.set_message("errors");
            }
        }
        if let Ok(mut s) = shared.samples.lock() {
            s.push(sample);
        }
        if failed {
            break;
        }
        messages.push(json!({"role": "assistant", "content": answer}));
    }
}

/// One streamed chat completion: its timings and its text.
async fn request(
    shared: &Shared,
    conversation: usize,
    turn: usize,
    messages: &[serde_json::Value],
) -> (Sample, String) {
    let mut body = json!({
        "model": shared.model,
        "messages": messages,
        "max_tokens": shared.config.max_tokens,
        "temperature": shared.config.temperature,
        "seed": shared.config.seed,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let (Some(policy), Some(o)) = (&shared.config.policy, body.as_object_mut()) {
        o.insert("metainf".into(), json!({"policy": policy}));
    }
    let sent = Instant::now();
    let mut sample = Sample {
        conversation,
        turn,
        ttft_s: None,
        itl_s: Vec::new(),
        e2e_s: 0.0,
        output_tokens: 0,
        error: None,
        status: None,
    };
    let mut text = String::new();
    let url = &shared.urls[conversation % shared.urls.len().max(1)];
    let result = stream(shared, url, &body, sent, &mut sample, &mut text).await;
    sample.e2e_s = sent.elapsed().as_secs_f64();
    if let Err(e) = result {
        sample.error = Some(format!("{e:#}"));
    }
    (sample, text)
}

async fn stream(
    shared: &Shared,
    url: &str,
    body: &serde_json::Value,
    sent: Instant,
    sample: &mut Sample,
    text: &mut String,
) -> Result<()> {
    let mut response = shared
        .client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .context("cannot send the request")?;
    let status = response.status();
    if !status.is_success() {
        sample.status = Some(status.as_u16());
        let detail = response.text().await.unwrap_or_default();
        bail!(
            "HTTP {status}: {}",
            detail.chars().take(200).collect::<String>()
        );
    }
    let mut buffer: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut chunks = 0u64;
    let mut usage = None;
    let mut done = false;
    while !done {
        let Some(bytes) = response.chunk().await.context("the stream broke")? else {
            break;
        };
        buffer.extend_from_slice(&bytes);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                break;
            }
            let event: serde_json::Value =
                serde_json::from_str(data).context("a stream event is not JSON")?;
            if let Some(err) = event.get("error") {
                bail!("the server reported an error: {err}");
            }
            if let Some(n) = event
                .get("usage")
                .and_then(|u| u.get("completion_tokens"))
                .and_then(serde_json::Value::as_u64)
            {
                usage = Some(n);
            }
            let content = event
                .get("choices")
                .and_then(|c| c.get(0))
                .and_then(|c| c.get("delta"))
                .and_then(|d| d.get("content"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            if content.is_empty() {
                continue;
            }
            let now = Instant::now();
            match last {
                None => sample.ttft_s = Some(now.duration_since(sent).as_secs_f64()),
                Some(prev) => sample.itl_s.push(now.duration_since(prev).as_secs_f64()),
            }
            last = Some(now);
            chunks += 1;
            text.push_str(content);
        }
    }
    sample.output_tokens = usage.unwrap_or(chunks);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let q = Quantiles::of(&v);
        assert_eq!((q.n, q.p50, q.p90, q.p99), (100, 50.0, 90.0, 99.0));
        assert_eq!(Quantiles::of(&[]), Quantiles::default());
        assert_eq!(Quantiles::of(&[3.0]).p99, 3.0);
    }

    #[test]
    fn scenarios_shape_their_conversations() {
        let multi = LoadConfig {
            scenario: Scenario::MultiTurn,
            conversations: 4,
            turns: 3,
            system_tokens: 800,
            ..LoadConfig::default()
        };
        let convs = conversations(&multi);
        assert_eq!(convs.len(), 4);
        assert!(convs.iter().all(|c| c.turns.len() == 3));
        assert!(convs.iter().all(|c| c.system == convs[0].system));
        let words = convs[0].system.as_ref().unwrap().split_whitespace().count();
        assert!((550..750).contains(&words), "{words} words for ~800 tokens");
        let single = LoadConfig {
            scenario: Scenario::Concurrent,
            ..multi.clone()
        };
        assert!(conversations(&single).iter().all(|c| c.turns.len() == 1));
        // The same seed, the same prompts.
        assert_eq!(conversations(&multi), convs);
        // Tenants: each its own long system prompt, conversations spread over them.
        let tenants = LoadConfig {
            scenario: Scenario::MultiTenant,
            conversations: 8,
            tenants: 3,
            system_tokens: 600,
            ..multi.clone()
        };
        let convs = conversations(&tenants);
        assert!(convs.iter().all(|c| c.turns.len() == 3));
        let systems: std::collections::BTreeSet<&str> =
            convs.iter().filter_map(|c| c.system.as_deref()).collect();
        assert_eq!(systems.len(), 3);
        assert_eq!(convs[0].system, convs[3].system);
        let first_words: std::collections::BTreeSet<String> = systems
            .iter()
            .map(|s| s.split_whitespace().next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            first_words.len(),
            3,
            "tenants' prompts differ from the start"
        );
        for s in systems {
            let words = s.split_whitespace().count();
            assert!((400..560).contains(&words), "{words} words for ~600 tokens");
        }
    }
}
