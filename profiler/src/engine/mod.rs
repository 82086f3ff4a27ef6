//! The inference engine: a Llama forward pass over candle's quantized kernels, batching many
//! sequences with their own paged KV caches, and the three acceleration methods as flags.
//!
//! | flag | off (baseline) | on |
//! |---|---|---|
//! | continuous batching | static batches: a batch is admitted when the previous one has fully finished | iteration-level scheduling: a finished sequence's slot is refilled at the next step |
//! | prefix caching | every prompt is computed from scratch, blocks freed at the end | full KV blocks are published under a hash of their whole prefix, reused by later prompts, evicted LRU under the KV budget |
//! | chunked prefill | a prompt is prefilled whole in one step | at most `chunk_size` prompt tokens per step, interleaved with the decode tokens of running sequences |
//!
//! With greedy decoding every method gives exactly the tokens of the baseline (see
//! [`model`]'s note on row independence); the tests check it on the real model.

pub(crate) mod kernels;
pub mod kv;
pub mod model;
pub mod sample;
pub mod threads;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metainf_protocol::{MethodConfig, ParamValue, method::flags, method::params};
use rand::SeedableRng;
use rand::rngs::StdRng;

pub use kv::KvStats;
pub use model::{LlamaConfig, LlamaModel};
pub use sample::{Sampling, argmax};

use crate::error::{ProfilerError, Result};
use kv::{BlockHash, KvPool, chain_hash};
use model::StepToken;

/// Engine-wide options.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOptions {
    /// Threads of the engine's pool; `None` = every logical CPU.
    pub threads: Option<usize>,
}

/// A loaded model with its own thread pool.
pub struct Engine {
    model: Arc<LlamaModel>,
    pool: rayon::ThreadPool,
    threads: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .field("threads", &self.threads)
            .finish()
    }
}

/// The settings of one acceleration method: its three flags and their parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodSettings {
    /// Iteration-level scheduling.
    pub continuous_batching: bool,
    /// Reuse of KV blocks across requests.
    pub prefix_caching: bool,
    /// Prefill in chunks of `chunk_size` tokens.
    pub chunked_prefill: bool,
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// Prompt tokens per step under chunked prefill.
    pub chunk_size: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Memory for the KV cache.
    pub kv_budget_bytes: usize,
}

impl Default for MethodSettings {
    fn default() -> Self {
        Self {
            continuous_batching: false,
            prefix_caching: false,
            chunked_prefill: false,
            max_batch: 16,
            chunk_size: 64,
            block_size: 16,
            kv_budget_bytes: 1 << 30,
        }
    }
}

impl MethodSettings {
    /// Settings of a protocol method; missing parameters take the defaults above.
    pub fn from_method(method: &MethodConfig) -> Result<Self> {
        let d = Self::default();
        if let Some(unknown) = method
            .flags
            .iter()
            .find(|f| !flags::STANDARD.iter().any(|(name, _)| name == f))
        {
            return Err(ProfilerError::Measure(format!(
                "this engine does not implement the method flag {unknown:?}"
            )));
        }
        let param = |name: &str, default: usize| -> Result<usize> {
            match method.int_param(name) {
                None => Ok(default),
                Some(v) if v > 0 => Ok(v as usize),
                Some(v) => Err(ProfilerError::Measure(format!(
                    "method parameter {name} must be positive, got {v}"
                ))),
            }
        };
        Ok(Self {
            continuous_batching: method.has(flags::CONTINUOUS_BATCHING),
            prefix_caching: method.has(flags::PREFIX_CACHING),
            chunked_prefill: method.has(flags::CHUNKED_PREFILL),
            max_batch: param(params::MAX_BATCH, d.max_batch)?,
            chunk_size: param(params::CHUNK_SIZE, d.chunk_size)?,
            block_size: param(params::BLOCK_SIZE, d.block_size)?,
            kv_budget_bytes: param(params::KV_BUDGET_BYTES, d.kv_budget_bytes)?,
        })
    }

    /// The protocol method these settings run, parameters included (they change the cell).
    pub fn to_method(&self) -> MethodConfig {
        let mut m = MethodConfig::baseline();
        if self.continuous_batching {
            m = m.with_flag(flags::CONTINUOUS_BATCHING);
        }
        if self.prefix_caching {
            m = m.with_flag(flags::PREFIX_CACHING);
        }
        if self.chunked_prefill {
            m = m.with_flag(flags::CHUNKED_PREFILL);
        }
        let int = |v: usize| ParamValue::Int(v as i64);
        m = m.with_param(params::MAX_BATCH, int(self.max_batch));
        m = m.with_param(params::BLOCK_SIZE, int(self.block_size));
        m = m.with_param(params::KV_BUDGET_BYTES, int(self.kv_budget_bytes));
        if self.chunked_prefill {
            m = m.with_param(params::CHUNK_SIZE, int(self.chunk_size));
        }
        m
    }
}

/// One generation request, already tokenized.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Prompt token ids (the chat template applied).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Tokens that end the generation (the model's end-of-turn tokens, typically).
    pub stop: Vec<u32>,
    /// How to pick tokens.
    pub sampling: Sampling,
    /// When the request arrives, seconds after the start of the run.
    pub arrival_s: f64,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated (it is the last token).
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// A finished request.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// Generated tokens, a final stop token included.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Arrival, seconds after the start.
    pub arrival_s: f64,
    /// When each token was sampled, seconds after the start.
    pub token_times_s: Vec<f64>,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
}

impl Completion {
    /// Time to first token, seconds.
    pub fn ttft_s(&self) -> Option<f64> {
        self.token_times_s.first().map(|t| t - self.arrival_s)
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// One completion per request, in request order.
    pub completions: Vec<Completion>,
    /// From the start to the last token.
    pub wall_s: f64,
    /// Most KV memory held at once (in use or cached).
    pub peak_kv_bytes: u64,
    /// Prefix-cache counters.
    pub kv: KvStats,
    /// Forward steps taken.
    pub steps: u64,
    /// Prompt tokens over all requests.
    pub prompt_tokens: u64,
}

impl RunReport {
    /// Generated tokens over all requests.
    pub fn output_tokens(&self) -> u64 {
        self.completions.iter().map(|c| c.tokens.len() as u64).sum()
    }
}

impl Engine {
    /// Loads the GGUF at `path`.
    pub fn load(path: &Path, options: EngineOptions) -> Result<Self> {
        let threads = threads::engine_threads(options.threads);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("metainf-engine-{i}"))
            .build()
            .map_err(|e| {
                ProfilerError::Measure(format!("cannot start the engine's threads: {e}"))
            })?;
        let model = Arc::new(LlamaModel::load(path)?);
        Ok(Self {
            model,
            pool,
            threads,
        })
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Threads the engine uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Embeds each text (see [`LlamaModel::embed_tokens`]); texts longer than
    /// `max_tokens` tokens are cut there.
    pub fn embed(&self, texts: &[String], max_tokens: usize) -> Result<Vec<Vec<f32>>> {
        let tok = self.model.tokenizer();
        let limit = max_tokens.clamp(1, self.model.config.context_length);
        self.pool.install(|| {
            texts
                .iter()
                .map(|t| {
                    let mut ids = tok.encode(t)?;
                    ids.truncate(limit);
                    self.model.embed_tokens(&ids)
                })
                .collect()
        })
    }

    /// Runs `requests` to completion under `method`, honouring their arrival times.
    pub fn run(&self, requests: &[Request], method: &MethodSettings) -> Result<RunReport> {
        self.run_with_progress(requests, method, &mut |_| {})
    }

    /// As [`Engine::run`], calling `on_finish(finished_so_far)` as requests complete.
    pub fn run_with_progress(
        &self,
        requests: &[Request],
        method: &MethodSettings,
        on_finish: &mut dyn FnMut(usize),
    ) -> Result<RunReport> {
        struct Progress<'a>(&'a mut dyn FnMut(usize));
        impl RunObserver for Progress<'_> {
            fn on_finish(&mut self, finished: usize) {
                (self.0)(finished);
            }
        }
        self.run_observed(requests, method, &mut Progress(on_finish))
    }

    /// As [`Engine::run`], telling `observer` of every token as it is sampled (for streaming
    /// and stop strings) and abandoning the run when it is cancelled.
    pub fn run_observed(
        &self,
        requests: &[Request],
        method: &MethodSettings,
        observer: &mut dyn RunObserver,
    ) -> Result<RunReport> {
        let mut batcher = Batcher::new(&self.model, method.clone())?;
        for r in requests {
            batcher.check(r)?;
        }
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by(|&a, &b| requests[a].arrival_s.total_cmp(&requests[b].arrival_s));
        let mut pending: VecDeque<usize> = order.into();
        let mut completions: Vec<Option<Completion>> = vec![None; requests.len()];
        let mut finished = 0;
        let start = Instant::now();
        let mut last_token = 0.0f64;
        while finished < requests.len() {
            let now = start.elapsed().as_secs_f64();
            while let Some(&i) = pending.front() {
                if requests[i].arrival_s > now {
                    break;
                }
                pending.pop_front();
                batcher.submit(i, requests[i].clone());
            }
            if batcher.is_idle() {
                if let Some(&i) = pending.front() {
                    let wait = (requests[i].arrival_s - now).max(0.0);
                    std::thread::sleep(Duration::from_secs_f64(wait.min(1.0)));
                }
                continue;
            }
            if observer.cancelled() {
                return Err(ProfilerError::Cancelled);
            }
            let mut done = self.pool.install(|| batcher.step(&start))?;
            for (key, token) in std::mem::take(&mut batcher.sampled) {
                if !observer.on_token(key, token)
                    && !done.iter().any(|(k, _)| *k == key)
                    && let Some(stopped) = batcher.stop(key)
                {
                    done.push(stopped);
                }
            }
            for (i, c) in done {
                if let Some(t) = c.token_times_s.last() {
                    last_token = last_token.max(*t);
                }
                completions[i] = Some(c);
                finished += 1;
                observer.on_finish(finished);
            }
        }
        let kv = batcher.pool.stats();
        Ok(RunReport {
            completions: completions
                .into_iter()
                .map(|c| c.ok_or_else(|| ProfilerError::Measure("a request did not finish".into())))
                .collect::<Result<_>>()?,
            wall_s: last_token,
            peak_kv_bytes: (kv.peak_blocks * batcher.pool.block_bytes()) as u64,
            kv,
            steps: batcher.steps,
            prompt_tokens: requests.iter().map(|r| r.prompt.len() as u64).sum(),
        })
    }
}

/// Watches a run as it goes. Every method has a default that does nothing.
pub trait RunObserver {
    /// Request `request` (its index in the run) sampled `token`. Returning `false` ends that
    /// request now, as finished by a stop (a stop string matched, say).
    fn on_token(&mut self, request: usize, token: u32) -> bool {
        let _ = (request, token);
        true
    }
    /// `finished` requests have completed so far.
    fn on_finish(&mut self, finished: usize) {
        let _ = finished;
    }
    /// Checked before every step: `true` abandons the run with [`ProfilerError::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

struct Seq {
    key: usize,
    req: Request,
    tokens: Vec<u32>,
    computed: usize,
    table: Vec<u32>,
    hashes: Vec<BlockHash>,
    /// Hashes of the prompt's cacheable full blocks (prefix caching only).
    prompt_hashes: Vec<BlockHash>,
    /// Blocks this sequence may still allocate (its worst case, reserved at admission).
    reserved: usize,
    rng: StdRng,
    token_times: Vec<f64>,
    cached_prompt_tokens: usize,
}

impl Seq {
    fn prompt_len(&self) -> usize {
        self.req.prompt.len()
    }
}

/// The iteration-level scheduler over one KV pool: requests are submitted, and each
/// [`Batcher::step`] runs one forward pass over the tokens the method schedules.
struct Batcher<'m> {
    model: &'m LlamaModel,
    method: MethodSettings,
    pool: KvPool,
    waiting: VecDeque<(usize, Request)>,
    running: Vec<Seq>,
    reserved: usize,
    steps: u64,
    /// Tokens sampled in the last step, as (request key, token).
    sampled: Vec<(usize, u32)>,
}

impl<'m> Batcher<'m> {
    fn new(model: &'m LlamaModel, method: MethodSettings) -> Result<Self> {
        if method.block_size == 0 || method.max_batch == 0 || method.chunk_size == 0 {
            return Err(ProfilerError::Measure(
                "block size, batch and chunk size must be positive".into(),
            ));
        }
        let c = &model.config;
        let pool = KvPool::new(
            method.block_size,
            method.kv_budget_bytes,
            c.layers,
            c.kv_heads,
            c.head_dim,
        );
        Ok(Self {
            model,
            method,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            steps: 0,
            sampled: Vec::new(),
        })
    }

    fn blocks_for(&self, r: &Request) -> usize {
        (r.prompt.len() + r.max_tokens as usize).div_ceil(self.method.block_size)
    }

    /// Refuses what can never run: an empty prompt, more tokens than the context, or more KV
    /// than the whole budget.
    fn check(&self, r: &Request) -> Result<()> {
        let c = &self.model.config;
        if r.prompt.is_empty() {
            return Err(ProfilerError::Measure("empty prompt".into()));
        }
        if r.max_tokens == 0 {
            return Err(ProfilerError::Measure(
                "max_tokens must be at least 1".into(),
            ));
        }
        if let Some(t) = r.prompt.iter().find(|t| **t as usize >= c.vocab) {
            return Err(ProfilerError::Measure(format!(
                "token id {t} is outside the vocabulary of {}",
                c.vocab
            )));
        }
        let total = r.prompt.len() + r.max_tokens as usize;
        if total > c.context_length {
            return Err(ProfilerError::Measure(format!(
                "{} prompt tokens + {} to generate exceed the model's context of {} tokens",
                r.prompt.len(),
                r.max_tokens,
                c.context_length
            )));
        }
        if self.blocks_for(r) > self.pool.total_blocks() {
            return Err(ProfilerError::Measure(format!(
                "a request of {total} tokens needs {} MiB of KV cache; the budget is {} MiB",
                (self.blocks_for(r) * self.pool.block_bytes()) >> 20,
                self.method.kv_budget_bytes >> 20
            )));
        }
        Ok(())
    }

    fn submit(&mut self, key: usize, r: Request) {
        self.waiting.push_back((key, r));
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Admits waiting requests, first come first served, while the method and KV allow.
    fn admit(&mut self) {
        if !self.method.continuous_batching && !self.running.is_empty() {
            return;
        }
        let bs = self.method.block_size;
        while self.running.len() < self.method.max_batch {
            let Some((key, req)) = self.waiting.pop_front() else {
                break;
            };
            let mut prompt_hashes = Vec::new();
            let mut table = Vec::new();
            if self.method.prefix_caching {
                // At least the last prompt token is computed, to give the first logits.
                let cacheable = (req.prompt.len() - 1) / bs;
                for block in req.prompt.chunks_exact(bs).take(cacheable) {
                    let h = chain_hash(prompt_hashes.last(), block);
                    prompt_hashes.push(h);
                }
                for h in &prompt_hashes {
                    match self.pool.lookup(h) {
                        Some(b) => table.push(b),
                        None => break,
                    }
                }
            }
            let need = self.blocks_for(&req) - table.len();
            if self.pool.available() < self.reserved + need {
                for b in table {
                    self.pool.release(b);
                }
                self.waiting.push_front((key, req));
                break;
            }
            self.reserved += need;
            let computed = table.len() * bs;
            let seed = req.sampling.seed;
            self.running.push(Seq {
                key,
                tokens: req.prompt.clone(),
                computed,
                hashes: prompt_hashes[..table.len()].to_vec(),
                table,
                prompt_hashes,
                reserved: need,
                rng: StdRng::seed_from_u64(seed),
                token_times: Vec::new(),
                cached_prompt_tokens: computed,
                req,
            });
        }
    }

    /// Prefix caching at prefill time: takes blocks that became cached since admission, and
    /// says whether the sequence should wait a step because an earlier sequence is computing
    /// its next block right now (so the prefix is computed once, not side by side).
    fn late_lookup(&mut self, i: usize) -> bool {
        let bs = self.method.block_size;
        loop {
            let s = &self.running[i];
            let next = s.computed / bs;
            if !s.computed.is_multiple_of(bs)
                || s.table.len() != next
                || next >= s.prompt_hashes.len()
            {
                return false;
            }
            let h = s.prompt_hashes[next];
            if let Some(b) = self.pool.lookup(&h) {
                let s = &mut self.running[i];
                s.table.push(b);
                s.hashes.push(h);
                s.computed += bs;
                s.cached_prompt_tokens += bs;
                if s.reserved > 0 {
                    s.reserved -= 1;
                    self.reserved = self.reserved.saturating_sub(1);
                }
                continue;
            }
            return self.running[..i]
                .iter()
                .any(|e| e.prompt_hashes.get(next) == Some(&h) && e.computed < (next + 1) * bs);
        }
    }

    /// One forward step. Returns the requests that finished in it.
    fn step(&mut self, start: &Instant) -> Result<Vec<(usize, Completion)>> {
        self.admit();
        let bs = self.method.block_size;
        // (sequence, first position, count): decodes first, then prefill under the budget.
        let mut items: Vec<(usize, usize, usize)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.computed >= s.prompt_len() {
                items.push((i, s.computed, 1));
            }
        }
        let mut budget = if self.method.chunked_prefill {
            self.method.chunk_size
        } else {
            usize::MAX
        };
        let mut waits = vec![false; self.running.len()];
        if self.method.prefix_caching {
            for (i, wait) in waits.iter_mut().enumerate() {
                if self.running[i].computed < self.running[i].prompt_len() {
                    *wait = self.late_lookup(i);
                }
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            if s.computed < s.prompt_len() && budget > 0 && !waits[i] {
                let n = (s.prompt_len() - s.computed).min(budget);
                items.push((i, s.computed, n));
                budget -= n;
            }
        }
        if items.is_empty() {
            return Err(ProfilerError::Measure(
                "the scheduler found nothing to run (a bug: the earliest sequence never waits)"
                    .into(),
            ));
        }
        let mut tokens = Vec::new();
        for &(i, first, n) in &items {
            let s = &mut self.running[i];
            while s.table.len() * bs < first + n {
                let block = self.pool.allocate().ok_or_else(|| {
                    ProfilerError::Measure("KV cache exhausted despite the reservation".into())
                })?;
                s.reserved = s.reserved.saturating_sub(1);
                self.reserved = self.reserved.saturating_sub(1);
                s.table.push(block);
            }
            for pos in first..first + n {
                tokens.push(StepToken {
                    token: s.tokens[pos],
                    pos,
                    seq: i,
                    logits: pos + 1 == s.tokens.len(),
                });
            }
        }
        let tables: Vec<&[u32]> = self.running.iter().map(|s| s.table.as_slice()).collect();
        let logits = self.model.forward(&tokens, &tables, &mut self.pool)?;
        self.steps += 1;
        let now = start.elapsed().as_secs_f64();
        let mut logits = logits.into_iter();
        let mut finished = Vec::new();
        for &(i, first, n) in &items {
            let s = &mut self.running[i];
            s.computed = first + n;
            if self.method.prefix_caching {
                while s.hashes.len() < s.computed / bs {
                    let b = s.hashes.len();
                    let h = chain_hash(s.hashes.last(), &s.tokens[b * bs..(b + 1) * bs]);
                    self.pool.register(s.table[b], h);
                    s.hashes.push(h);
                }
            }
            if s.computed == s.tokens.len() {
                let l = logits
                    .next()
                    .ok_or_else(|| ProfilerError::Measure("missing logits".into()))?;
                let token = sample::sample(&l, &s.req.sampling, &mut s.rng);
                s.tokens.push(token);
                s.token_times.push(now);
                let generated = s.tokens.len() - s.prompt_len();
                self.sampled.push((s.key, token));
                if s.req.stop.contains(&token) {
                    finished.push((i, FinishReason::Stop));
                } else if generated >= s.req.max_tokens as usize {
                    finished.push((i, FinishReason::Length));
                }
            }
        }
        finished.sort_by_key(|(i, _)| *i);
        let mut done = Vec::new();
        for (i, finish) in finished.into_iter().rev() {
            done.push(self.retire(i, finish));
        }
        Ok(done)
    }

    /// Removes running sequence `i`, releasing its blocks.
    fn retire(&mut self, i: usize, finish: FinishReason) -> (usize, Completion) {
        let s = self.running.remove(i);
        for &b in &s.table {
            self.pool.release(b);
        }
        self.reserved = self.reserved.saturating_sub(s.reserved);
        (
            s.key,
            Completion {
                tokens: s.tokens[s.req.prompt.len()..].to_vec(),
                finish,
                arrival_s: s.req.arrival_s,
                token_times_s: s.token_times,
                cached_prompt_tokens: s.cached_prompt_tokens,
            },
        )
    }

    /// Ends the running request `key` now, as stopped (a stop string matched).
    fn stop(&mut self, key: usize) -> Option<(usize, Completion)> {
        let i = self.running.iter().position(|s| s.key == key)?;
        Some(self.retire(i, FinishReason::Stop))
    }
}
