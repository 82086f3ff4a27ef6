//! The host side of a job: one long-lived serving engine per served model
//! ([`metainf_profiler::engine::serve`]), shared by every job. A job's sequences join the
//! running batch with the per-job half of the method the router chose; their tokens come back
//! here, are detokenised incrementally (off the engine thread), streamed, and checked for stop
//! strings; the measured run, with the co-load it met, comes back for the performance record.

use std::path::Path;
use std::sync::Arc;

use metainf_profiler::engine::serve::{JobOutcome, JobSink, ServeThread, Server, SubmitError};
use metainf_profiler::engine::{
    CoLoad, Engine, EngineOptions, FinishReason as EngineFinish, JobPolicy, MethodSettings,
    Request, RunReport, Sampling, SchedConfig,
};
use metainf_profiler::tokenizer::TextStream;
use metainf_protocol::{
    Arrival, CacheSummary, Completion, FinishReason, HostLoad, JobRequest, MethodConfig,
    ModelDescriptor, Prompt, WorkloadDescriptor,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::net::Offer;

/// Text generated for one prompt since the last delta: (prompt index, text).
pub type Delta = (u32, String);

/// Why a job did not run to the end on this host.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    /// The job can never run here (unknown model, longer than the context, ...).
    #[error("{0}")]
    Rejected(String),
    /// The engine's queue is full.
    #[error("the host's queue is full; retry in {retry_after_s} s")]
    Busy {
        /// Estimated seconds until there is room.
        retry_after_s: u32,
    },
    /// The engine failed, or the host is shutting down.
    #[error("{0}")]
    Failed(String),
    /// The client went away.
    #[error("cancelled")]
    Cancelled,
}

/// A served model.
pub struct ServedModel {
    /// What the engine loaded.
    pub descriptor: ModelDescriptor,
    /// The engine (its tokenizer is also used by the router).
    pub engine: Arc<Engine>,
}

impl ServedModel {
    /// Loads the GGUF at `path` with `threads` engine threads.
    pub fn load(path: &Path, threads: Option<usize>) -> Result<Self, String> {
        let descriptor = metainf_profiler::model::describe(path).map_err(|e| e.to_string())?;
        let engine = Engine::load(path, EngineOptions { threads }).map_err(|e| e.to_string())?;
        Ok(Self {
            descriptor,
            engine: Arc::new(engine),
        })
    }

    /// Token ids of each prompt: raw text as is, chats through the model's template.
    pub fn tokenize(&self, prompts: &[Prompt]) -> Result<Vec<Vec<u32>>, ExecError> {
        let tok = self.engine.model().tokenizer();
        prompts
            .iter()
            .map(|p| {
                let text = match p {
                    Prompt::Text(t) => t.clone(),
                    Prompt::Chat(messages) => tok.chat_prompt(messages).map_err(|e| {
                        ExecError::Rejected(format!("cannot apply the chat template: {e}"))
                    })?,
                };
                tok.encode(&text)
                    .map_err(|e| ExecError::Rejected(format!("cannot tokenize a prompt: {e}")))
            })
            .collect()
    }

    /// The workload descriptor of a job on this model.
    pub fn describe(&self, request: &JobRequest) -> Result<WorkloadDescriptor, ExecError> {
        Ok(Self::describe_tokens(
            &self.tokenize(&request.prompts)?,
            request,
        ))
    }

    /// The workload descriptor of a job whose prompts tokenize to `prompts`.
    pub fn describe_tokens(prompts: &[Vec<u32>], request: &JobRequest) -> WorkloadDescriptor {
        let max_new = vec![request.params.max_tokens; prompts.len()];
        WorkloadDescriptor::from_prompts(
            None,
            prompts,
            &max_new,
            Arrival::AllAtOnce,
            request.params.temperature,
        )
    }
}

/// What a finished job measured.
#[derive(Debug)]
pub struct Execution {
    /// The model it ran.
    pub model: ModelDescriptor,
    /// One completion per prompt.
    pub completions: Vec<Completion>,
    /// The engine's report.
    pub report: RunReport,
    /// The workload as run.
    pub workload: WorkloadDescriptor,
    /// The load it shared in the engine and the cache it used.
    pub co_load: CoLoad,
    /// The method as the host ran it: the job's flags with the engine's own parameters.
    pub method: MethodConfig,
}

/// The serving engines. Cheap to clone.
#[derive(Clone)]
pub struct Executor(Arc<Inner>);

struct Inner {
    models: Vec<Arc<ServedModel>>,
    servers: Vec<Server>,
    config: SchedConfig,
    offer: watch::Sender<Offer>,
    /// Per engine: the block list its last summary was built from, and the summary.
    summaries: std::sync::Mutex<Vec<Option<SummaryMemo>>>,
}

type SummaryMemo = (Arc<Vec<metainf_protocol::BlockHash>>, Arc<CacheSummary>);

impl Executor {
    /// Starts one serving engine per model with the host-wide `config`. The engines end when
    /// every clone of the executor is dropped and their last jobs are done;
    /// [`EngineThread::join`] waits for them.
    pub fn start(
        models: Vec<ServedModel>,
        config: SchedConfig,
    ) -> Result<(Self, EngineThread), String> {
        let models: Vec<Arc<ServedModel>> = models.into_iter().map(Arc::new).collect();
        let mut servers = Vec::with_capacity(models.len());
        let mut threads = Vec::with_capacity(models.len());
        for m in &models {
            let (server, thread) = Server::start(m.engine.clone(), config)
                .map_err(|e| format!("cannot start the engine of {}: {e}", m.descriptor.name))?;
            servers.push(server);
            threads.push(thread);
        }
        let offer = watch::Sender::new(Offer {
            models: models.iter().map(|m| m.descriptor.clone()).collect(),
            queue_depth: 0,
            running_jobs: 0,
            queue_capacity: u32::try_from(config.max_waiting).unwrap_or(u32::MAX),
            load: None,
            cache: None,
        });
        let summaries = std::sync::Mutex::new(vec![None; models.len()]);
        let executor = Self(Arc::new(Inner {
            models,
            servers,
            config,
            offer,
            summaries,
        }));
        executor.publish_load();
        Ok((executor, EngineThread(threads)))
    }

    /// The served models.
    pub fn models(&self) -> &[Arc<ServedModel>] {
        &self.0.models
    }

    /// The served model called `name`.
    pub fn model(&self, name: &str) -> Option<&Arc<ServedModel>> {
        self.0.models.iter().find(|m| m.descriptor.name == name)
    }

    fn server(&self, name: &str) -> Option<(&Arc<ServedModel>, &Server)> {
        let i = self
            .0
            .models
            .iter()
            .position(|m| m.descriptor.name == name)?;
        Some((self.0.models.get(i)?, self.0.servers.get(i)?))
    }

    /// Sequences waiting and running, over every engine.
    pub fn load(&self) -> (u32, u32) {
        self.0.servers.iter().fold((0u32, 0u32), |(w, r), s| {
            let l = s.load();
            (w.saturating_add(l.waiting), r.saturating_add(l.running))
        })
    }

    /// The live load of the first engine, as heartbeats carry it.
    pub fn host_load(&self) -> Option<HostLoad> {
        self.0.servers.first().map(|s| {
            let l = s.load();
            HostLoad {
                running_seqs: l.running.min(l.max_running),
                waiting_seqs: l.waiting,
                max_running: l.max_running,
                kv_blocks_total: l.kv_blocks_total,
                kv_blocks_used: l.kv_blocks_used.min(l.kv_blocks_total),
                kv_blocks_cached: l
                    .kv_blocks_cached
                    .min(l.kv_blocks_total.saturating_sub(l.kv_blocks_used)),
                decode_tok_s: if l.decode_tok_s.is_finite() {
                    l.decode_tok_s.clamp(0.0, 1e9)
                } else {
                    0.0
                },
                seq_s: if l.seq_s.is_finite() {
                    l.seq_s.clamp(0.0, 1e7)
                } else {
                    0.0
                },
                remaining_tokens: l.remaining_tokens,
            }
        })
    }

    /// What the prefix cache of the engine serving `name` holds now (rebuilt only when the
    /// engine's block list changed).
    pub fn cache_summary(&self, name: &str) -> Option<Arc<CacheSummary>> {
        let i = self
            .0
            .models
            .iter()
            .position(|m| m.descriptor.name == name)?;
        let server = self.0.servers.get(i)?;
        let blocks = server.cached_blocks();
        let mut memo = self.0.summaries.lock().ok()?;
        let slot = memo.get_mut(i)?;
        if let Some((seen, summary)) = slot.as_ref()
            && Arc::ptr_eq(seen, &blocks)
        {
            return Some(summary.clone());
        }
        let block_size = u32::try_from(self.0.config.block_size).unwrap_or(u32::MAX);
        let summary = Arc::new(CacheSummary::new(name, block_size, &blocks));
        *slot = Some((blocks, summary.clone()));
        Some(summary)
    }

    /// Sequences that may wait in an engine.
    pub fn capacity(&self) -> u32 {
        u32::try_from(self.0.config.max_waiting).unwrap_or(u32::MAX)
    }

    /// The host-wide engine settings.
    pub fn config(&self) -> &SchedConfig {
        &self.0.config
    }

    /// What the heartbeats announce, kept current.
    pub fn offer(&self) -> watch::Receiver<Offer> {
        self.0.offer.subscribe()
    }

    /// Every load change goes out in the heartbeats' offer.
    fn publish_load(&self) {
        let (waiting, running) = self.load();
        let load = self.host_load();
        let cache = self
            .0
            .models
            .first()
            .and_then(|m| self.cache_summary(&m.descriptor.name));
        self.0.offer.send_modify(|o| {
            o.queue_depth = waiting.min(o.queue_capacity);
            o.running_jobs = running;
            o.load = load;
            o.cache = cache;
        });
    }

    /// Runs a job here with `method`; text goes to `deltas` as it is generated. Refused at once
    /// when the engine's queue is full. Cancelling `cancel` (or dropping the future) takes the
    /// job's sequences out of the batch.
    pub async fn run(
        &self,
        request: JobRequest,
        method: MethodConfig,
        deltas: Option<mpsc::Sender<Delta>>,
        cancel: CancellationToken,
    ) -> Result<Execution, ExecError> {
        let Some((model, server)) = self.server(&request.model) else {
            return Err(ExecError::Rejected(format!(
                "model {:?} is not served by this host",
                request.model
            )));
        };
        let settings = MethodSettings::from_method(&method)
            .map_err(|e| ExecError::Rejected(format!("method {method}: {e}")))?;
        let prompts = model.tokenize(&request.prompts)?;
        let tok = model.engine.model().tokenizer();
        let seed = request.params.seed.unwrap_or_else(rand::random);
        let requests: Vec<Request> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Request {
                prompt: p.clone(),
                max_tokens: request.params.max_tokens,
                stop: tok.stop_ids().to_vec(),
                sampling: Sampling {
                    temperature: request.params.temperature as f32,
                    top_p: request.params.top_p as f32,
                    seed: seed.wrapping_add(i as u64),
                },
                arrival_s: 0.0,
            })
            .collect();
        let workload = metainf_profiler::bench::describe(None, &requests, Arrival::AllAtOnce);
        let context = model.engine.model().config.context_length;
        // Room for every event the job can produce (each sequence's tokens and the end), so the
        // engine thread never waits on this job and never drops one of its events.
        let events = requests
            .iter()
            .map(|r| (r.max_tokens as usize).min(context) + 1)
            .sum::<usize>()
            .saturating_add(1);
        let (tx, mut rx) = mpsc::channel(events);
        let handle = server
            .submit(
                requests,
                JobPolicy::of(&settings),
                Box::new(ChannelSink(tx)),
            )
            .map_err(|e| match e {
                SubmitError::Rejected(r) => ExecError::Rejected(r),
                SubmitError::Busy { retry_after_s } => ExecError::Busy { retry_after_s },
                SubmitError::Stopped => ExecError::Failed("the engine has stopped".into()),
            })?;
        self.publish_load();
        let mut texts = TextTracker::new(model, &request, deltas);
        let outcome = loop {
            let event = tokio::select! {
                () = cancel.cancelled() => {
                    handle.cancel();
                    break Err(ExecError::Cancelled);
                }
                event = rx.recv() => event,
            };
            match event {
                Some(EngineEvent::Token(i, token)) => {
                    if texts.push(i, token).await {
                        handle.stop(i);
                    }
                    if texts.listener_gone() {
                        handle.cancel();
                        break Err(ExecError::Cancelled);
                    }
                }
                Some(EngineEvent::Done(result)) => {
                    break result.map_err(|e| match e {
                        metainf_profiler::ProfilerError::Cancelled => ExecError::Cancelled,
                        other => ExecError::Failed(other.to_string()),
                    });
                }
                None => break Err(ExecError::Failed("the engine stopped".into())),
            }
        };
        drop(handle);
        self.publish_load();
        let JobOutcome { report, co_load } = outcome?;
        let mut completions = Vec::with_capacity(report.completions.len());
        for (i, c) in report.completions.iter().enumerate() {
            let (text, output_tokens, stopped_by_string) = texts.finish(i, &c.tokens).await;
            completions.push(Completion {
                text,
                prompt_tokens: u32::try_from(prompts.get(i).map_or(0, Vec::len))
                    .unwrap_or(u32::MAX),
                output_tokens,
                finish_reason: if stopped_by_string || c.finish == EngineFinish::Stop {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                },
            });
        }
        let config = self.0.config;
        let ran = MethodSettings {
            block_size: config.block_size,
            kv_budget_bytes: config.kv_budget_bytes,
            chunk_size: config.chunk_size,
            ..settings
        };
        Ok(Execution {
            model: model.descriptor.clone(),
            completions,
            report,
            workload,
            co_load,
            method: ran.to_method(),
        })
    }
}

enum EngineEvent {
    Token(usize, u32),
    Done(metainf_profiler::Result<JobOutcome>),
}

/// The engine thread's side of a job: every event goes into a channel with room for all the
/// job's events, so the batch never waits on a slow client.
struct ChannelSink(mpsc::Sender<EngineEvent>);

impl JobSink for ChannelSink {
    fn token(&mut self, index: usize, token: u32) {
        let _ = self.0.try_send(EngineEvent::Token(index, token));
    }

    fn done(self: Box<Self>, outcome: metainf_profiler::Result<JobOutcome>) {
        let _ = self.0.try_send(EngineEvent::Done(outcome));
    }
}

/// The engine threads, to be joined at shutdown.
#[derive(Debug)]
pub struct EngineThread(Vec<ServeThread>);

impl EngineThread {
    /// Waits up to `timeout` for the threads to end (they end once every [`Executor`] clone
    /// is gone and their jobs are done); says so when they do not.
    pub async fn join(self, timeout: std::time::Duration) {
        let joined = tokio::task::spawn_blocking(move || {
            self.0
                .into_iter()
                .map(std::thread::JoinHandle::join)
                .all(|r| r.is_ok())
        });
        match tokio::time::timeout(timeout, joined).await {
            Ok(Ok(true)) => {}
            Ok(_) => warn!("an engine thread panicked"),
            Err(_) => warn!("an engine thread is still running a job; not waiting for it"),
        }
    }
}

/// One sequence's text as it is generated.
#[derive(Default)]
struct SeqText {
    stream: TextStream,
    /// Visible text so far, cut at a stop string.
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    /// Tokens that count as output (up to the one that completed a stop string).
    tokens: u32,
    /// A stop string ended it.
    stopped: bool,
}

/// Detokenises each prompt's tokens as they come, streams the new text and finds stop
/// strings, looking only at the text's new end.
struct TextTracker<'a> {
    model: &'a ServedModel,
    stop: &'a [String],
    longest_stop: usize,
    deltas: Option<mpsc::Sender<Delta>>,
    gone: bool,
    seqs: Vec<SeqText>,
}

impl<'a> TextTracker<'a> {
    fn new(
        model: &'a ServedModel,
        request: &'a JobRequest,
        deltas: Option<mpsc::Sender<Delta>>,
    ) -> Self {
        let stop = &request.params.stop;
        Self {
            model,
            stop,
            longest_stop: stop.iter().map(String::len).max().unwrap_or(0),
            deltas,
            gone: false,
            seqs: (0..request.prompts.len())
                .map(|_| SeqText::default())
                .collect(),
        }
    }

    /// Whether the client that listened for deltas has gone.
    fn listener_gone(&self) -> bool {
        self.gone
    }

    /// Adds a token of sequence `i`; returns true when a stop string has just ended it.
    async fn push(&mut self, i: usize, token: u32) -> bool {
        let model = self.model;
        let tok = model.engine.model().tokenizer();
        let Some(seq) = self.seqs.get_mut(i) else {
            return false;
        };
        if seq.stopped {
            return false;
        }
        seq.tokens = seq.tokens.saturating_add(1);
        if tok.stop_ids().contains(&token) {
            return false;
        }
        let piece = match seq.stream.push(tok, token) {
            Ok(Some(p)) => p,
            Ok(None) => return false,
            Err(e) => {
                warn!(error = %e, "cannot detokenise a token");
                return false;
            }
        };
        let cut = self.append(i, &piece);
        self.send_safe(i, cut).await;
        cut
    }

    /// Appends text to sequence `i`, cutting it at a stop string that the new end completes.
    fn append(&mut self, i: usize, piece: &str) -> bool {
        let Some(seq) = self.seqs.get_mut(i) else {
            return false;
        };
        let from = seq.text.len().saturating_sub(self.longest_stop);
        seq.text.push_str(piece);
        let mut from = from;
        while !seq.text.is_char_boundary(from) {
            from -= 1;
        }
        let cut = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| seq.text[from..].find(s.as_str()).map(|at| from + at))
            .min();
        if let Some(at) = cut {
            seq.text.truncate(at);
            seq.stopped = true;
        }
        cut.is_some()
    }

    /// Streams what of sequence `i`'s text can no longer change: all of it once cut, else up
    /// to a possible start of a stop string at the end.
    async fn send_safe(&mut self, i: usize, cut: bool) {
        let Some(seq) = self.seqs.get(i) else { return };
        let text = &seq.text;
        let mut safe = text.len();
        if !cut {
            for s in self.stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                        safe = safe.min(text.len() - k);
                        break;
                    }
                }
            }
        }
        self.send(i, safe).await;
    }

    async fn send(&mut self, i: usize, to: usize) {
        let Some(seq) = self.seqs.get_mut(i) else {
            return;
        };
        let from = seq.sent;
        if to <= from || !seq.text.is_char_boundary(from) || !seq.text.is_char_boundary(to) {
            return;
        }
        seq.sent = to;
        let piece = seq.text[from..to].to_owned();
        if let Some(tx) = &self.deltas
            && tx.send((i as u32, piece)).await.is_err()
        {
            self.deltas = None;
            self.gone = true;
        }
    }

    /// The final text of sequence `i`, its output tokens and whether a stop string ended it;
    /// streams whatever was held back.
    async fn finish(&mut self, i: usize, tokens: &[u32]) -> (String, u32, bool) {
        if i >= self.seqs.len() {
            return (String::new(), 0, false);
        }
        let model = self.model;
        let tok = model.engine.model().tokenizer();
        let seq = &mut self.seqs[i];
        if !seq.stopped {
            // Tokens the tracker did not see (none, normally) and the held-back end.
            let seen = seq.tokens as usize;
            for &t in tokens.iter().skip(seen) {
                seq.tokens = seq.tokens.saturating_add(1);
                if !tok.stop_ids().contains(&t)
                    && let Ok(Some(p)) = seq.stream.push(tok, t)
                {
                    seq.text.push_str(&p);
                }
            }
            if let Ok(rest) = seq.stream.flush(tok) {
                let rest = rest.trim_end_matches('\u{FFFD}').to_owned();
                self.append(i, &rest);
            }
        }
        let len = self.seqs[i].text.len();
        self.send(i, len).await;
        let seq = &self.seqs[i];
        let output = if seq.stopped {
            seq.tokens
        } else {
            u32::try_from(tokens.len()).unwrap_or(u32::MAX)
        };
        (seq.text.clone(), output, seq.stopped)
    }
}
