//! The iteration-level scheduler: many jobs' sequences over one paged KV pool that outlives
//! them, one forward step at a time.
//!
//! Host-wide (one value per engine): the block size, the KV budget, the most sequences running
//! at once, the prefill tokens a step may take for chunked prompts, and how many sequences may
//! wait. Per job (its [`JobPolicy`], from the method the router chose): whether its prompts
//! look up and publish cached prefixes, whether its sequences are admitted continuously or in
//! static waves, whether its prompts are prefilled in chunks, and the most of its sequences
//! that run at once.
//!
//! Admission is first come, first served under a worst-case KV reservation: a sequence starts
//! only when the blocks it may still need (prompt + `max_tokens`, less what the prefix cache
//! gave it) are free or evictable, so a running sequence never runs out of KV mid-decode — no
//! preemption is needed and nothing can deadlock: every running sequence ends within its
//! `max_tokens`, and the head of the queue starts as soon as its blocks are back.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::kv::{BlockHash, KvPool, KvStats, chain_hash};
use super::model::{Model, StepToken};
use super::sample::{self, SampleScratch};
use super::{Completion, FinishReason, MethodSettings, Request};
use crate::error::{ProfilerError, Result};

/// Host-wide settings of one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Memory for the KV cache (and the prefix cache inside it).
    pub kv_budget_bytes: usize,
    /// Most sequences running at once, over all jobs.
    pub max_running: usize,
    /// Prompt tokens one step prefills for chunked prompts (the step's token budget is this
    /// plus one decode token per running sequence).
    pub chunk_size: usize,
    /// Most sequences waiting for admission; more are refused as busy.
    pub max_waiting: usize,
}

impl Default for SchedConfig {
    fn default() -> Self {
        let m = MethodSettings::default();
        Self {
            block_size: m.block_size,
            kv_budget_bytes: m.kv_budget_bytes,
            max_running: 32,
            chunk_size: m.chunk_size,
            max_waiting: 256,
        }
    }
}

impl SchedConfig {
    /// The engine a method's own settings describe (what `bench` runs each method on).
    pub fn for_method(method: &MethodSettings, max_waiting: usize) -> Self {
        Self {
            block_size: method.block_size,
            kv_budget_bytes: method.kv_budget_bytes,
            max_running: method.max_batch,
            chunk_size: method.chunk_size,
            max_waiting,
        }
    }

    fn check(&self) -> Result<()> {
        if self.block_size == 0 || self.max_running == 0 || self.chunk_size == 0 {
            return Err(ProfilerError::Measure(
                "block size, batch and chunk size must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// How one job's sequences are scheduled: the per-job half of an acceleration method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobPolicy {
    /// Its prompts reuse cached prefix blocks. Every job publishes its full blocks (and the
    /// block it ended inside) to the host's cache whatever its method: writing costs a hash per
    /// block, and the next job with prefix caching finds what any earlier job computed.
    pub prefix_caching: bool,
    /// Its sequences start whenever there is room; off: in static waves of `max_batch`, a
    /// wave starting only when the job's previous one has wholly finished.
    pub continuous_batching: bool,
    /// Its prompts are prefilled at most the engine's chunk size per step, alongside the
    /// decodes; off: a prompt is prefilled whole in one step.
    pub chunked_prefill: bool,
    /// Most of its sequences running at once.
    pub max_batch: usize,
}

impl JobPolicy {
    /// The policy of a method.
    pub fn of(method: &MethodSettings) -> Self {
        Self {
            prefix_caching: method.prefix_caching,
            continuous_batching: method.continuous_batching,
            chunked_prefill: method.chunked_prefill,
            max_batch: method.max_batch.max(1),
        }
    }
}

/// A job's handle inside one scheduler.
pub type JobKey = u64;

/// What a job's sequences met in the engine: the load it shared and the cache it used.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CoLoad {
    /// Steps in which the job had a sequence running.
    pub steps: u64,
    /// Mean sequences running per such step, the job's own included.
    pub mean_running: f64,
    /// Mean sequences of other jobs running per such step.
    pub mean_foreign: f64,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: u64,
}

/// Something that happened to a sequence in a step.
#[derive(Clone, Debug, PartialEq)]
pub enum SeqEvent {
    /// Sequence `index` of `job` sampled `token`.
    Token {
        /// The job.
        job: JobKey,
        /// The sequence's index in the job.
        index: usize,
        /// The token.
        token: u32,
    },
    /// Sequence `index` of `job` finished.
    Finished {
        /// The job.
        job: JobKey,
        /// The sequence's index in the job.
        index: usize,
        /// What it generated.
        completion: Completion,
    },
}

struct JobSlot {
    policy: JobPolicy,
    start: Instant,
    waiting: usize,
    running: usize,
    /// Sequences of the current static wave not yet admitted.
    wave_left: usize,
    steps: u64,
    running_sum: u64,
    own_sum: u64,
    cached_prompt_tokens: u64,
    kv: KvStats,
}

struct Waiting {
    job: JobKey,
    index: usize,
    req: Request,
}

struct Seq {
    job: JobKey,
    index: usize,
    req: Request,
    tokens: Vec<u32>,
    computed: usize,
    table: Vec<u32>,
    hashes: Vec<BlockHash>,
    /// Hashes of the prompt's cacheable full blocks (prefix caching only).
    prompt_hashes: Vec<BlockHash>,
    /// Blocks this sequence may still allocate (its worst case, reserved at admission).
    reserved: usize,
    caching: bool,
    chunked: bool,
    rng: StdRng,
    token_times: Vec<f64>,
    cached_prompt_tokens: usize,
}

impl Seq {
    fn prompt_len(&self) -> usize {
        self.req.prompt.len()
    }
}

/// The scheduler over one KV pool.
pub(crate) struct Scheduler {
    cfg: SchedConfig,
    pool: KvPool,
    jobs: HashMap<JobKey, JobSlot>,
    waiting: VecDeque<Waiting>,
    running: Vec<Seq>,
    reserved: usize,
    steps: u64,
    /// Tokens the last step computed.
    last_step_tokens: usize,
    scratch: SampleScratch,
}

impl Scheduler {
    pub(crate) fn new(model: &Model, cfg: SchedConfig) -> Result<Self> {
        cfg.check()?;
        let c = &model.config;
        let pool = KvPool::new(
            cfg.block_size,
            cfg.kv_budget_bytes,
            c.layers,
            c.kv_heads,
            c.head_dim,
        )?;
        Ok(Self {
            cfg,
            pool,
            jobs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            steps: 0,
            last_step_tokens: 0,
            scratch: SampleScratch::default(),
        })
    }

    pub(crate) fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    pub(crate) fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    /// Tokens the last step computed (decodes and prefill).
    pub(crate) fn last_step_tokens(&self) -> usize {
        self.last_step_tokens
    }

    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Tokens the sequences running and waiting may still generate (their `max_tokens` less
    /// what they generated): an upper bound of the work ahead of a new sequence.
    pub(crate) fn remaining_tokens(&self) -> u64 {
        let running = self.running.iter().map(|s| {
            let generated = s.tokens.len().saturating_sub(s.prompt_len());
            (s.req.max_tokens as u64).saturating_sub(generated as u64)
        });
        let waiting = self.waiting.iter().map(|w| w.req.max_tokens as u64);
        running.chain(waiting).fold(0u64, u64::saturating_add)
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    fn blocks_for(&self, r: &Request) -> usize {
        r.prompt
            .len()
            .saturating_add(r.max_tokens as usize)
            .div_ceil(self.cfg.block_size)
    }

    /// Refuses what can never run here: an empty prompt, a token outside the vocabulary,
    /// more tokens than the context, or more KV than the whole budget.
    pub(crate) fn check(&self, model: &Model, r: &Request) -> Result<()> {
        check_request(
            model,
            r,
            self.cfg.block_size,
            self.pool.total_blocks(),
            self.pool.block_bytes(),
        )
    }

    /// Opens a job; its sequences come with [`Scheduler::add`].
    pub(crate) fn open(&mut self, job: JobKey, policy: JobPolicy, start: Instant) {
        self.jobs.insert(
            job,
            JobSlot {
                policy,
                start,
                waiting: 0,
                running: 0,
                wave_left: 0,
                steps: 0,
                running_sum: 0,
                own_sum: 0,
                cached_prompt_tokens: 0,
                kv: KvStats::default(),
            },
        );
    }

    /// Queues sequence `index` of an open job (checked with [`Scheduler::check`] first).
    pub(crate) fn add(&mut self, job: JobKey, index: usize, req: Request) {
        if let Some(slot) = self.jobs.get_mut(&job) {
            slot.waiting += 1;
            self.waiting.push_back(Waiting { job, index, req });
        }
    }

    /// Whether the job has sequences waiting or running.
    pub(crate) fn has_work(&self, job: JobKey) -> bool {
        self.jobs
            .get(&job)
            .is_some_and(|s| s.waiting + s.running > 0)
    }

    /// Closes a job (its sequences gone: finished, stopped or cancelled) and tells what it met.
    pub(crate) fn close(&mut self, job: JobKey) -> Option<(CoLoad, KvStats)> {
        self.cancel(job);
        let slot = self.jobs.remove(&job)?;
        let steps = slot.steps.max(1) as f64;
        Some((
            CoLoad {
                steps: slot.steps,
                mean_running: slot.running_sum as f64 / steps,
                mean_foreign: slot.running_sum.saturating_sub(slot.own_sum) as f64 / steps,
                cached_prompt_tokens: slot.cached_prompt_tokens,
            },
            slot.kv,
        ))
    }

    /// Drops every waiting and running sequence of `job`, releasing its blocks.
    pub(crate) fn cancel(&mut self, job: JobKey) {
        self.waiting.retain(|w| w.job != job);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job == job {
                let _ = self.retire(i, FinishReason::Stop);
            } else {
                i += 1;
            }
        }
        if let Some(slot) = self.jobs.get_mut(&job) {
            slot.waiting = 0;
            slot.running = 0;
        }
    }

    /// Ends sequence `index` of `job` now, as stopped (a stop string matched); a waiting one
    /// is dropped. Returns its completion when it was running.
    pub(crate) fn stop(&mut self, job: JobKey, index: usize) -> Option<Completion> {
        if let Some(p) = self
            .waiting
            .iter()
            .position(|w| w.job == job && w.index == index)
        {
            self.waiting.remove(p);
            if let Some(slot) = self.jobs.get_mut(&job) {
                slot.waiting = slot.waiting.saturating_sub(1);
            }
            return None;
        }
        let i = self
            .running
            .iter()
            .position(|s| s.job == job && s.index == index)?;
        Some(self.retire(i, FinishReason::Stop))
    }

    /// Admits waiting sequences, first come first served, while room, KV and their jobs'
    /// policies allow. A sequence held back by its job's policy does not block later ones; one
    /// held back by KV does (so a long request is never starved by short ones).
    fn admit(&mut self) {
        let bs = self.cfg.block_size;
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.cfg.max_running {
            let w = &self.waiting[i];
            let Some(slot) = self.jobs.get_mut(&w.job) else {
                self.waiting.remove(i);
                continue;
            };
            let policy = slot.policy;
            if slot.running >= policy.max_batch {
                i += 1;
                continue;
            }
            if !policy.continuous_batching {
                if slot.running == 0 && slot.wave_left == 0 {
                    slot.wave_left = policy.max_batch.min(slot.waiting);
                }
                if slot.wave_left == 0 {
                    i += 1;
                    continue;
                }
            }
            let mut prompt_hashes = Vec::new();
            let mut table = Vec::new();
            if policy.prefix_caching {
                // At least the last prompt token is computed, to give the first logits.
                let cacheable = (w.req.prompt.len() - 1) / bs;
                for block in w.req.prompt.chunks_exact(bs).take(cacheable) {
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
            let mut need = self.blocks_for(&w.req).saturating_sub(table.len());
            if self.pool.available() < self.reserved + need {
                for b in table {
                    self.pool.release(b);
                }
                break;
            }
            // Past the last matching full block, the rows of a cached block that continue the
            // prompt (a prompt seen before is then computed from its last token only). Looked up
            // only once the sequence is admitted: holding the source takes it off the evictable
            // blocks, which must not decide the admission (a request needing the whole pool
            // would otherwise never be admitted).
            let full_blocks = table.len();
            let mut copied = 0;
            if policy.prefix_caching {
                let start = full_blocks * bs;
                // At least the last prompt token is computed; at most a block's rows less one.
                let end = (w.req.prompt.len() - 1).min(start + bs - 1);
                let parent = full_blocks.checked_sub(1).map(|i| &prompt_hashes[i]);
                let partial = if end > start {
                    self.pool.longest_prefix(parent, &w.req.prompt[start..end])
                } else {
                    None
                };
                if let Some((src, rows)) = partial {
                    if let Some(dst) = self.pool.allocate() {
                        self.pool.copy_rows(src, dst, rows);
                        table.push(dst);
                        need = need.saturating_sub(1);
                        copied = rows;
                    }
                    self.pool.release(src);
                }
            }
            let Some(w) = self.waiting.remove(i) else {
                break;
            };
            let Some(slot) = self.jobs.get_mut(&w.job) else {
                continue;
            };
            slot.waiting = slot.waiting.saturating_sub(1);
            slot.running += 1;
            if !policy.continuous_batching {
                slot.wave_left = slot.wave_left.saturating_sub(1);
            }
            let hits = full_blocks as u64;
            slot.kv.hits += hits;
            if policy.prefix_caching && full_blocks < prompt_hashes.len() {
                slot.kv.misses += 1;
            }
            self.reserved += need;
            let computed = full_blocks * bs + copied;
            slot.cached_prompt_tokens += computed as u64;
            let seed = w.req.sampling.seed;
            self.running.push(Seq {
                job: w.job,
                index: w.index,
                tokens: w.req.prompt.clone(),
                computed,
                hashes: prompt_hashes[..full_blocks].to_vec(),
                table,
                prompt_hashes,
                reserved: need,
                caching: policy.prefix_caching,
                chunked: policy.chunked_prefill,
                rng: StdRng::seed_from_u64(seed),
                token_times: Vec::new(),
                cached_prompt_tokens: computed,
                req: w.req,
            });
        }
    }

    /// Prefix caching at prefill time: takes blocks that became cached since admission, and
    /// says whether the sequence should wait a step because an earlier sequence is computing
    /// its next block right now (so a shared prefix is computed once, not side by side).
    fn late_lookup(&mut self, i: usize) -> bool {
        let bs = self.cfg.block_size;
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
                if let Some(slot) = self.jobs.get_mut(&s.job) {
                    slot.kv.hits += 1;
                    slot.cached_prompt_tokens += bs as u64;
                }
                continue;
            }
            return self.running[..i].iter().any(|e| {
                e.caching && e.prompt_hashes.get(next) == Some(&h) && e.computed < (next + 1) * bs
            });
        }
    }

    /// One forward step over what the policies schedule. Returns what happened, in order.
    pub(crate) fn step(&mut self, model: &Model) -> Result<Vec<SeqEvent>> {
        self.admit();
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        let bs = self.cfg.block_size;
        // (sequence, first position, count): decodes first, then prefill under the budget.
        let mut items: Vec<(usize, usize, usize)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.computed >= s.prompt_len() {
                items.push((i, s.computed, 1));
            }
        }
        let mut waits = vec![false; self.running.len()];
        for (i, wait) in waits.iter_mut().enumerate() {
            let s = &self.running[i];
            if s.caching && s.computed < s.prompt_len() {
                *wait = self.late_lookup(i);
            }
        }
        let mut budget = self.cfg.chunk_size;
        for (i, s) in self.running.iter().enumerate() {
            if s.computed >= s.prompt_len() || waits[i] {
                continue;
            }
            let left = s.prompt_len() - s.computed;
            if s.chunked {
                if budget > 0 {
                    let n = left.min(budget);
                    items.push((i, s.computed, n));
                    budget -= n;
                }
            } else {
                items.push((i, s.computed, left));
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
        let used = self.pool.used_blocks();
        let total_running = self.running.len() as u64;
        for slot in self.jobs.values_mut() {
            if slot.running > 0 {
                slot.steps += 1;
                slot.running_sum += total_running;
                slot.own_sum += slot.running as u64;
                slot.kv.peak_blocks = slot.kv.peak_blocks.max(used);
            }
        }
        let tables: Vec<&[u32]> = self.running.iter().map(|s| s.table.as_slice()).collect();
        let logits = model.forward(&tokens, &tables, &mut self.pool)?;
        self.steps += 1;
        self.last_step_tokens = tokens.len();
        let mut logits = logits.into_iter();
        let mut events = Vec::new();
        let mut finished = Vec::new();
        for &(i, first, n) in &items {
            let s = &mut self.running[i];
            s.computed = first + n;
            // Published whatever the method (only reading the cache is the method's choice).
            while s.hashes.len() < s.computed / bs {
                let b = s.hashes.len();
                let block = &s.tokens[b * bs..(b + 1) * bs];
                let h = chain_hash(s.hashes.last(), block);
                self.pool.register(s.table[b], h, s.hashes.last(), block);
                s.hashes.push(h);
            }
            if s.computed == s.tokens.len() {
                let l = logits
                    .next()
                    .ok_or_else(|| ProfilerError::Measure("missing logits".into()))?;
                let token = sample::sample(&l, &s.req.sampling, &mut s.rng, &mut self.scratch);
                s.tokens.push(token);
                let now = self
                    .jobs
                    .get(&s.job)
                    .map_or(0.0, |j| j.start.elapsed().as_secs_f64());
                s.token_times.push(now);
                let generated = s.tokens.len() - s.prompt_len();
                events.push(SeqEvent::Token {
                    job: s.job,
                    index: s.index,
                    token,
                });
                if s.req.stop.contains(&token) {
                    finished.push((i, FinishReason::Stop));
                } else if generated >= s.req.max_tokens as usize {
                    finished.push((i, FinishReason::Length));
                }
            }
        }
        finished.sort_by_key(|(i, _)| *i);
        for (i, finish) in finished.into_iter().rev() {
            let (job, index) = (self.running[i].job, self.running[i].index);
            let completion = self.retire(i, finish);
            events.push(SeqEvent::Finished {
                job,
                index,
                completion,
            });
        }
        Ok(events)
    }

    /// Removes running sequence `i`, releasing its blocks (cached ones stay for reuse).
    fn retire(&mut self, i: usize, finish: FinishReason) -> Completion {
        let s = self.running.remove(i);
        // The block it ended inside stays cached for the prompts that continue its rows.
        let bs = self.cfg.block_size;
        let last = s.computed / bs;
        if !s.computed.is_multiple_of(bs)
            && s.hashes.len() == last
            && let Some(&block) = s.table.get(last)
        {
            self.pool
                .keep_partial(block, s.hashes.last(), &s.tokens[last * bs..s.computed]);
        }
        for &b in &s.table {
            self.pool.release(b);
        }
        self.reserved = self.reserved.saturating_sub(s.reserved);
        if let Some(slot) = self.jobs.get_mut(&s.job) {
            slot.running = slot.running.saturating_sub(1);
        }
        Completion {
            tokens: s.tokens[s.req.prompt.len()..].to_vec(),
            finish,
            arrival_s: s.req.arrival_s,
            token_times_s: s.token_times,
            cached_prompt_tokens: s.cached_prompt_tokens,
        }
    }
}

/// The checks of [`Scheduler::check`], for callers that hold only the engine's shape.
pub(crate) fn check_request(
    model: &Model,
    r: &Request,
    block_size: usize,
    total_blocks: usize,
    block_bytes: usize,
) -> Result<()> {
    let c = &model.config;
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
    let total = r.prompt.len().saturating_add(r.max_tokens as usize);
    if total > c.context_length {
        return Err(ProfilerError::Measure(format!(
            "{} prompt tokens + {} to generate exceed the model's context of {} tokens",
            r.prompt.len(),
            r.max_tokens,
            c.context_length
        )));
    }
    let blocks = total.div_ceil(block_size.max(1));
    if blocks > total_blocks {
        return Err(ProfilerError::Measure(format!(
            "a request of {total} tokens needs {} MiB of KV cache; the engine's budget is {} MiB",
            blocks.saturating_mul(block_bytes) >> 20,
            total_blocks.saturating_mul(block_bytes) >> 20
        )));
    }
    Ok(())
}
