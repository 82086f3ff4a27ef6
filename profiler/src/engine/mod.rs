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
pub(crate) mod quant;
pub mod sample;
pub mod sched;
pub mod serve;
pub mod threads;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metainf_protocol::{MethodConfig, ParamValue, method::flags, method::params};

pub use kv::KvStats;
pub use model::{Arch, Model, ModelConfig};
pub use sample::{Sampling, argmax};

pub use sched::{CoLoad, JobPolicy, SchedConfig};

use crate::error::{ProfilerError, Result};
use sched::{Scheduler, SeqEvent};

/// Whether this build's engine runs on a GPU (it has no GPU backend yet: every forward pass
/// runs on the CPU, whatever NVML finds).
pub const RUNS_ON_GPU: bool = false;

/// Engine-wide options.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOptions {
    /// Threads of the engine's pool; `None` = every logical CPU.
    pub threads: Option<usize>,
}

/// A loaded model with its own thread pool.
pub struct Engine {
    model: Arc<Model>,
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
        let model = Arc::new(Model::load(path)?);
        Ok(Self {
            model,
            pool,
            threads,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Threads the engine uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Embeds each text (see [`Model::embed_tokens`]); texts longer than
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

    /// The logits of the token after `tokens` (see [`Model::last_logits`]).
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.pool.install(|| self.model.last_logits(tokens))
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
        const JOB: sched::JobKey = 0;
        let mut scheduler =
            Scheduler::new(&self.model, SchedConfig::for_method(method, usize::MAX))?;
        for r in requests {
            scheduler.check(&self.model, r)?;
        }
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by(|&a, &b| requests[a].arrival_s.total_cmp(&requests[b].arrival_s));
        let mut pending: VecDeque<usize> = order.into();
        let mut completions: Vec<Option<Completion>> = vec![None; requests.len()];
        let mut finished = 0;
        let start = Instant::now();
        scheduler.open(JOB, JobPolicy::of(method), start);
        let mut last_token = 0.0f64;
        while finished < requests.len() {
            let now = start.elapsed().as_secs_f64();
            while let Some(&i) = pending.front() {
                if requests[i].arrival_s > now {
                    break;
                }
                pending.pop_front();
                scheduler.add(JOB, i, requests[i].clone());
            }
            if scheduler.is_idle() {
                if let Some(&i) = pending.front() {
                    let wait = (requests[i].arrival_s - now).max(0.0);
                    std::thread::sleep(Duration::from_secs_f64(wait.min(1.0)));
                }
                continue;
            }
            if observer.cancelled() {
                return Err(ProfilerError::Cancelled);
            }
            let events = self.pool.install(|| scheduler.step(&self.model))?;
            let mut done = Vec::new();
            for event in events {
                match event {
                    SeqEvent::Token { index, token, .. } => {
                        if !observer.on_token(index, token)
                            && let Some(c) = scheduler.stop(JOB, index)
                        {
                            done.push((index, c));
                        }
                    }
                    SeqEvent::Finished {
                        index, completion, ..
                    } => done.push((index, completion)),
                }
            }
            for (i, c) in done {
                if completions[i].is_some() {
                    continue;
                }
                if let Some(t) = c.token_times_s.last() {
                    last_token = last_token.max(*t);
                }
                completions[i] = Some(c);
                finished += 1;
                observer.on_finish(finished);
            }
        }
        let steps = scheduler.steps();
        let block_bytes = scheduler.pool().block_bytes();
        let (_, kv) = scheduler
            .close(JOB)
            .ok_or_else(|| ProfilerError::Measure("the run's job vanished".into()))?;
        let mut kv = KvStats {
            evictions: scheduler.pool().stats().evictions,
            ..kv
        };
        kv.peak_blocks = kv.peak_blocks.max(scheduler.pool().stats().peak_blocks);
        Ok(RunReport {
            completions: completions
                .into_iter()
                .map(|c| c.ok_or_else(|| ProfilerError::Measure("a request did not finish".into())))
                .collect::<Result<_>>()?,
            wall_s: last_token,
            peak_kv_bytes: (kv.peak_blocks * block_bytes) as u64,
            kv,
            steps,
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
