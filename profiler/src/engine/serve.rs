//! The serving engine: one long-lived [`Scheduler`] per model on its own thread, its KV pool
//! and prefix cache kept as long as the node runs. Jobs are submitted from any thread; their
//! sequences join the running batch at the next step, their tokens go to each job's
//! [`JobSink`] as they are sampled, and each job starts, finishes and is cancelled on its own.
//!
//! The thread blocks on its queue while there is nothing to do. A job is refused at once while
//! the waiting queue is full ([`SubmitError::Busy`], with a retry estimate), so nothing queues
//! without bound (at most the limit plus one job); a job that can never fit is refused as
//! [`SubmitError::Rejected`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use tracing::{debug, warn};

use super::sched::{self, CoLoad, JobKey, JobPolicy, SchedConfig, Scheduler, SeqEvent};
use super::{Completion, Engine, FinishReason, KvStats, Request, RunReport};
use crate::engine::kv::BlockHash;
use crate::error::{ProfilerError, Result};

/// Most blocks [`Server::cached_blocks`] lists.
pub use metainf_protocol::cache::MAX_SUMMARY_ENTRIES;
/// Least time between two refreshes of [`Server::cached_blocks`] while the engine steps.
pub const SUMMARY_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// Receives one job's results on the engine thread. Calls must return at once (hand the work
/// to another thread): the whole batch waits on them.
pub trait JobSink: Send {
    /// Sequence `index` sampled `token`.
    fn token(&mut self, index: usize, token: u32);
    /// The job ended: every sequence finished (or was stopped), or it failed or was cancelled.
    /// Called exactly once.
    fn done(self: Box<Self>, outcome: Result<JobOutcome>);
}

/// What a finished job measured.
#[derive(Clone, Debug)]
pub struct JobOutcome {
    /// Its sequences, timed from its submission.
    pub report: RunReport,
    /// The load it shared and the cache it used.
    pub co_load: CoLoad,
}

/// Why a job was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// It can never run on this engine.
    #[error("{0}")]
    Rejected(String),
    /// The waiting queue is full; try again in about this many seconds.
    #[error("the engine's queue is full; retry in {retry_after_s} s")]
    Busy {
        /// Estimated seconds until there is room.
        retry_after_s: u32,
    },
    /// The engine thread is gone.
    #[error("the engine has stopped")]
    Stopped,
}

/// The engine's load, as the node announces it and the router reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineLoad {
    /// Sequences running now.
    pub running: u32,
    /// Sequences waiting for admission.
    pub waiting: u32,
    /// Jobs with sequences in the engine.
    pub jobs: u32,
    /// Most sequences that run at once.
    pub max_running: u32,
    /// Most sequences that may wait.
    pub max_waiting: u32,
    /// KV blocks in all.
    pub kv_blocks_total: u32,
    /// KV blocks in use by running sequences.
    pub kv_blocks_used: u32,
    /// KV blocks holding cached prefixes that no sequence uses (reclaimable).
    pub kv_blocks_cached: u32,
    /// Recent generation rate over all sequences, tokens per second (0 before the first).
    pub decode_tok_s: f64,
    /// Recent mean seconds from a sequence's admission to its end.
    pub seq_s: f64,
    /// Tokens the running and waiting sequences may still generate (an upper bound).
    pub remaining_tokens: u64,
}

#[derive(Default)]
struct Gauges {
    /// Sequences submitted but not yet received by the engine thread.
    inflight: AtomicUsize,
    waiting: AtomicUsize,
    running: AtomicUsize,
    jobs: AtomicUsize,
    used: AtomicUsize,
    cached: AtomicUsize,
    decode_tok_s: AtomicU64,
    seq_s: AtomicU64,
    remaining: AtomicU64,
    /// The full blocks the prefix cache holds (chain hashes, in use and most recent first).
    blocks: std::sync::Mutex<Arc<Vec<BlockHash>>>,
}

/// One job's control block, shared by its [`JobHandle`] and the engine thread.
struct Control {
    cancelled: AtomicBool,
    stop_any: AtomicBool,
    stops: Box<[AtomicBool]>,
}

/// The submitter's side of a job: cancel it, or end one of its sequences. Dropping the handle
/// cancels whatever of the job is still running.
pub struct JobHandle {
    control: Arc<Control>,
    detached: bool,
}

impl JobHandle {
    /// Cancels the job: its sequences leave the batch at the next step.
    pub fn cancel(&self) {
        self.control.cancelled.store(true, Ordering::Release);
    }

    /// Ends sequence `index` at the next step, as stopped (a stop string matched).
    pub fn stop(&self, index: usize) {
        if let Some(s) = self.control.stops.get(index) {
            s.store(true, Ordering::Release);
            self.control.stop_any.store(true, Ordering::Release);
        }
    }

    /// Keeps the job running after the handle is dropped.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        if !self.detached {
            self.cancel();
        }
    }
}

struct Submission {
    requests: Vec<Request>,
    policy: JobPolicy,
    start: Instant,
    sink: Box<dyn JobSink>,
    control: Arc<Control>,
}

/// A handle to a running serving engine. Cheap to clone; the thread ends once every clone is
/// dropped and its last job is done.
#[derive(Clone)]
pub struct Server {
    tx: mpsc::SyncSender<Submission>,
    gauges: Arc<Gauges>,
    engine: Arc<Engine>,
    config: SchedConfig,
    total_blocks: usize,
    block_bytes: usize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("load", &self.load())
            .finish()
    }
}

/// The engine thread, to be joined at shutdown.
pub type ServeThread = std::thread::JoinHandle<()>;

impl Server {
    /// Starts the engine thread for `engine` with the host-wide `config`.
    pub fn start(engine: Arc<Engine>, config: SchedConfig) -> Result<(Self, ServeThread)> {
        let scheduler = Scheduler::new(engine.model(), config)?;
        let total_blocks = scheduler.pool().total_blocks();
        let block_bytes = scheduler.pool().block_bytes();
        // Each submission holds at least one sequence and is taken only while fewer than
        // `max_waiting` are in flight or waiting: the channel never needs more room than that.
        let (tx, rx) = mpsc::sync_channel(config.max_waiting.clamp(1, 1 << 16));
        let gauges = Arc::new(Gauges::default());
        let worker = Worker {
            engine: engine.clone(),
            scheduler,
            gauges: gauges.clone(),
            jobs: HashMap::new(),
            next_key: 0,
            step_tokens: 0,
            blocks_published: None,
        };
        let thread = std::thread::Builder::new()
            .name("metainf-serve".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| ProfilerError::Measure(format!("cannot start the engine thread: {e}")))?;
        Ok((
            Self {
                tx,
                gauges,
                engine,
                config,
                total_blocks,
                block_bytes,
            },
            thread,
        ))
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The host-wide settings.
    pub fn config(&self) -> &SchedConfig {
        &self.config
    }

    /// The load now.
    pub fn load(&self) -> EngineLoad {
        let g = &self.gauges;
        let n = |a: &AtomicUsize| u32::try_from(a.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        EngineLoad {
            running: n(&g.running),
            waiting: n(&g.waiting).saturating_add(n(&g.inflight)),
            jobs: n(&g.jobs),
            max_running: u32::try_from(self.config.max_running).unwrap_or(u32::MAX),
            max_waiting: u32::try_from(self.config.max_waiting).unwrap_or(u32::MAX),
            kv_blocks_total: u32::try_from(self.total_blocks).unwrap_or(u32::MAX),
            kv_blocks_used: n(&g.used),
            kv_blocks_cached: n(&g.cached),
            decode_tok_s: f64::from_bits(g.decode_tok_s.load(Ordering::Relaxed)),
            seq_s: f64::from_bits(g.seq_s.load(Ordering::Relaxed)),
            remaining_tokens: g.remaining.load(Ordering::Relaxed),
        }
    }

    /// The chain hashes of the full KV blocks the engine holds, in use and most recently used
    /// first (at most [`MAX_SUMMARY_ENTRIES`], refreshed at most every
    /// [`SUMMARY_REFRESH`]): what its cache summary covers.
    pub fn cached_blocks(&self) -> Arc<Vec<BlockHash>> {
        self.gauges
            .blocks
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// Submits a job of `requests` (their arrival times are ignored: they arrive now). The
    /// tokens go to `sink`; the handle cancels or stops its sequences.
    pub fn submit(
        &self,
        requests: Vec<Request>,
        policy: JobPolicy,
        sink: Box<dyn JobSink>,
    ) -> std::result::Result<JobHandle, SubmitError> {
        if requests.is_empty() {
            return Err(SubmitError::Rejected(
                "a job needs at least one prompt".into(),
            ));
        }
        for (i, r) in requests.iter().enumerate() {
            sched::check_request(
                self.engine.model(),
                r,
                self.config.block_size,
                self.total_blocks,
                self.block_bytes,
            )
            .map_err(|e| SubmitError::Rejected(format!("prompt {i}: {e}")))?;
        }
        let n = requests.len();
        let g = &self.gauges;
        // A job is taken while the queue has room, whatever its size (a batch job of many
        // prompts is never refused for being large): at most `max_waiting` sequences plus one
        // job's wait.
        let before = g.inflight.fetch_add(n, Ordering::AcqRel);
        if before + g.waiting.load(Ordering::Relaxed) >= self.config.max_waiting {
            g.inflight.fetch_sub(n, Ordering::AcqRel);
            return Err(SubmitError::Busy {
                retry_after_s: self.retry_after_s(),
            });
        }
        let control = Arc::new(Control {
            cancelled: AtomicBool::new(false),
            stop_any: AtomicBool::new(false),
            stops: (0..n).map(|_| AtomicBool::new(false)).collect(),
        });
        let submission = Submission {
            requests,
            policy,
            start: Instant::now(),
            sink,
            control: control.clone(),
        };
        match self.tx.try_send(submission) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                g.inflight.fetch_sub(n, Ordering::AcqRel);
                return Err(SubmitError::Busy {
                    retry_after_s: self.retry_after_s(),
                });
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                g.inflight.fetch_sub(n, Ordering::AcqRel);
                return Err(SubmitError::Stopped);
            }
        }
        Ok(JobHandle {
            control,
            detached: false,
        })
    }

    /// Seconds until a waiting slot is likely free: the queue ahead drains at `max_running`
    /// sequences per mean sequence time.
    fn retry_after_s(&self) -> u32 {
        let load = self.load();
        let per_seq = if load.seq_s > 0.0 { load.seq_s } else { 2.0 };
        let waves = f64::from(load.waiting) / self.config.max_running.max(1) as f64;
        (waves * per_seq).ceil().clamp(1.0, 60.0) as u32
    }
}

struct Active {
    sink: Option<Box<dyn JobSink>>,
    control: Arc<Control>,
    completions: Vec<Option<Completion>>,
    left: usize,
    prompt_tokens: u64,
    admitted_at: Vec<Option<Instant>>,
}

struct Worker {
    engine: Arc<Engine>,
    scheduler: Scheduler,
    gauges: Arc<Gauges>,
    jobs: HashMap<JobKey, Active>,
    next_key: JobKey,
    step_tokens: u64,
    /// When the cached blocks were last published, and the pool's counters then.
    blocks_published: Option<(Instant, (u64, u64, u64, usize))>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Submission>) {
        loop {
            if self.jobs.is_empty() {
                // Idle: what the last jobs left is published, then block until there is work,
                // or every handle is gone.
                self.publish(None);
                match rx.recv() {
                    Ok(s) => self.take(s),
                    Err(_) => break,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.take(s);
            }
            self.controls();
            if self.scheduler.is_idle() {
                self.publish(None);
                continue;
            }
            let started = Instant::now();
            let engine = self.engine.clone();
            let stepped = engine.pool.install(|| self.scheduler.step(engine.model()));
            // The queue as this step left it is visible before any of its tokens are: whoever
            // sees a sequence's token sees it admitted.
            self.gauges
                .waiting
                .store(self.scheduler.waiting(), Ordering::Relaxed);
            self.gauges
                .running
                .store(self.scheduler.running(), Ordering::Relaxed);
            match stepped {
                Ok(events) => self.deliver(events),
                Err(e) => self.fail_all(&e),
            }
            let took = started.elapsed();
            tracing::trace!(
                tokens = self.scheduler.last_step_tokens(),
                running = self.scheduler.running(),
                waiting = self.scheduler.waiting(),
                us = took.as_micros() as u64,
                "step"
            );
            self.publish(Some(took.as_secs_f64()));
        }
        debug!("serving engine stopped");
    }

    fn take(&mut self, s: Submission) {
        let n = s.requests.len();
        // From in flight to waiting in one go, so that a submitter never sees them in neither.
        self.gauges.waiting.fetch_add(n, Ordering::AcqRel);
        self.gauges.inflight.fetch_sub(n, Ordering::AcqRel);
        if s.control.cancelled.load(Ordering::Acquire) {
            s.sink.done(Err(ProfilerError::Cancelled));
            return;
        }
        let key = self.next_key;
        self.next_key = self.next_key.wrapping_add(1);
        self.scheduler.open(key, s.policy, s.start);
        let prompt_tokens = s.requests.iter().map(|r| r.prompt.len() as u64).sum();
        for (i, r) in s.requests.into_iter().enumerate() {
            self.scheduler.add(key, i, r);
        }
        self.jobs.insert(
            key,
            Active {
                sink: Some(s.sink),
                control: s.control,
                completions: vec![None; n],
                left: n,
                prompt_tokens,
                admitted_at: vec![None; n],
            },
        );
    }

    /// Applies cancellations and stops asked for since the last step.
    fn controls(&mut self) {
        let keys: Vec<JobKey> = self.jobs.keys().copied().collect();
        for key in keys {
            let Some(job) = self.jobs.get_mut(&key) else {
                continue;
            };
            if job.control.cancelled.load(Ordering::Acquire) {
                self.scheduler.close(key);
                if let Some(job) = self.jobs.remove(&key)
                    && let Some(sink) = job.sink
                {
                    sink.done(Err(ProfilerError::Cancelled));
                }
                continue;
            }
            if job.control.stop_any.swap(false, Ordering::AcqRel) {
                for i in 0..job.completions.len() {
                    if job.completions[i].is_some() || !job.control.stops[i].load(Ordering::Acquire)
                    {
                        continue;
                    }
                    let c = self.scheduler.stop(key, i).unwrap_or(Completion {
                        tokens: Vec::new(),
                        finish: FinishReason::Stop,
                        arrival_s: 0.0,
                        token_times_s: Vec::new(),
                        cached_prompt_tokens: 0,
                    });
                    job.completions[i] = Some(c);
                    job.left = job.left.saturating_sub(1);
                }
                self.finish_if_done(key);
            }
        }
    }

    fn deliver(&mut self, events: Vec<SeqEvent>) {
        let mut touched = Vec::new();
        for event in events {
            match event {
                SeqEvent::Token { job, index, token } => {
                    self.step_tokens += 1;
                    if let Some(a) = self.jobs.get_mut(&job) {
                        if let Some(t) = a.admitted_at.get_mut(index)
                            && t.is_none()
                        {
                            *t = Some(Instant::now());
                        }
                        if let Some(sink) = a.sink.as_mut() {
                            sink.token(index, token);
                        }
                    }
                }
                SeqEvent::Finished {
                    job,
                    index,
                    completion,
                } => {
                    if let Some(a) = self.jobs.get_mut(&job)
                        && let Some(slot) = a.completions.get_mut(index)
                        && slot.is_none()
                    {
                        if let Some(Some(t)) = a.admitted_at.get(index) {
                            let s = t.elapsed().as_secs_f64();
                            let old = f64::from_bits(self.gauges.seq_s.load(Ordering::Relaxed));
                            let new = if old > 0.0 { 0.8 * old + 0.2 * s } else { s };
                            self.gauges.seq_s.store(new.to_bits(), Ordering::Relaxed);
                        }
                        *slot = Some(completion);
                        a.left = a.left.saturating_sub(1);
                        touched.push(job);
                    }
                }
            }
        }
        for key in touched {
            self.finish_if_done(key);
        }
    }

    fn finish_if_done(&mut self, key: JobKey) {
        let done = self.jobs.get(&key).is_some_and(|a| a.left == 0);
        if !done || self.scheduler.has_work(key) {
            return;
        }
        let block_bytes = self.scheduler.pool().block_bytes() as u64;
        let steps_total = self.scheduler.steps();
        let Some((co_load, kv)) = self.scheduler.close(key) else {
            return;
        };
        let Some(mut job) = self.jobs.remove(&key) else {
            return;
        };
        let completions: Vec<Completion> = job.completions.drain(..).flatten().collect();
        let wall_s = completions
            .iter()
            .filter_map(|c| c.token_times_s.last().copied())
            .fold(0.0f64, f64::max);
        let report = RunReport {
            wall_s,
            peak_kv_bytes: (kv.peak_blocks as u64).saturating_mul(block_bytes),
            kv: KvStats {
                peak_blocks: kv.peak_blocks,
                ..kv
            },
            steps: co_load.steps.min(steps_total),
            prompt_tokens: job.prompt_tokens,
            completions,
        };
        // What the job left in the cache is announced before anyone learns it ended.
        self.publish_blocks();
        if let Some(sink) = job.sink.take() {
            sink.done(Ok(JobOutcome { report, co_load }));
        }
    }

    /// A failed step fails every job in it; the pool starts over, empty (its contents may be
    /// half written).
    fn fail_all(&mut self, e: &ProfilerError) {
        warn!(error = %e, jobs = self.jobs.len(), "an engine step failed; failing its jobs");
        for (key, mut job) in std::mem::take(&mut self.jobs) {
            self.scheduler.close(key);
            if let Some(sink) = job.sink.take() {
                sink.done(Err(ProfilerError::Measure(format!(
                    "the engine failed: {e}"
                ))));
            }
        }
        match Scheduler::new(self.engine.model(), *self.scheduler.config()) {
            Ok(s) => self.scheduler = s,
            Err(e) => warn!(error = %e, "cannot reset the engine's KV pool"),
        }
    }

    fn fingerprint(pool: &super::kv::KvPool) -> (u64, u64, u64, usize) {
        let stats = pool.stats();
        (
            stats.hits,
            stats.misses,
            stats.evictions,
            pool.used_blocks(),
        )
    }

    /// Publishes the blocks the cache holds now.
    fn publish_blocks(&mut self) {
        let pool = self.scheduler.pool();
        let blocks = pool.recent_block_hashes(MAX_SUMMARY_ENTRIES);
        let fingerprint = Self::fingerprint(pool);
        if let Ok(mut b) = self.gauges.blocks.lock() {
            *b = Arc::new(blocks);
        }
        self.blocks_published = Some((Instant::now(), fingerprint));
    }

    fn publish(&mut self, step_s: Option<f64>) {
        let g = Arc::clone(&self.gauges);
        g.waiting.store(self.scheduler.waiting(), Ordering::Relaxed);
        g.running.store(self.scheduler.running(), Ordering::Relaxed);
        g.jobs.store(self.jobs.len(), Ordering::Relaxed);
        g.remaining
            .store(self.scheduler.remaining_tokens(), Ordering::Relaxed);
        let pool = self.scheduler.pool();
        let cached = pool.evictable_blocks();
        g.used
            .store(pool.used_blocks().saturating_sub(cached), Ordering::Relaxed);
        g.cached.store(cached, Ordering::Relaxed);
        // The cache's content changes when blocks are registered, hit or evicted (the counters
        // and the held count tell): republished at most every refresh while steps run, and
        // at once when the engine goes idle (so the last change is never left out).
        let fingerprint = Self::fingerprint(pool);
        let due = match self.blocks_published {
            None => true,
            Some((at, seen)) => {
                seen != fingerprint && (step_s.is_none() || at.elapsed() >= SUMMARY_REFRESH)
            }
        };
        if due {
            self.publish_blocks();
        }
        if let Some(s) = step_s
            && s > 0.0
        {
            let rate = self.step_tokens as f64 / s;
            let old = f64::from_bits(g.decode_tok_s.load(Ordering::Relaxed));
            let new = if old > 0.0 {
                0.9 * old + 0.1 * rate
            } else {
                rate
            };
            g.decode_tok_s.store(new.to_bits(), Ordering::Relaxed);
        }
        self.step_tokens = 0;
    }
}
