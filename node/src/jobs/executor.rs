//! The host side of a job: one engine per served model on its own thread, fed by a bounded
//! queue. A job runs with the method the router chose, its text streamed as it is generated,
//! stop strings honoured; the measured run comes back for the performance record.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use metainf_profiler::engine::{
    Engine, EngineOptions, FinishReason as EngineFinish, MethodSettings, Request, RunObserver,
    RunReport, Sampling,
};
use metainf_profiler::tokenizer::chat_template;
use metainf_protocol::{
    Arrival, Completion, FinishReason, JobRequest, MethodConfig, ModelDescriptor, Prompt,
    WorkloadDescriptor,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::net::Offer;

/// Text generated for one prompt since the last delta: (prompt index, text).
pub type Delta = (u32, String);

/// Why a job did not run to the end on this host.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    /// The job can never run here (unknown model, longer than the context, ...).
    #[error("{0}")]
    Rejected(String),
    /// The queue is full.
    #[error("the host's queue is full")]
    Busy,
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
    pub engine: Engine,
}

impl ServedModel {
    /// Loads the GGUF at `path` with `threads` engine threads.
    pub fn load(path: &Path, threads: Option<usize>) -> Result<Self, String> {
        let descriptor = metainf_profiler::model::describe(path).map_err(|e| e.to_string())?;
        let engine = Engine::load(path, EngineOptions { threads }).map_err(|e| e.to_string())?;
        Ok(Self { descriptor, engine })
    }

    /// Token ids of each prompt: raw text as is, chats through the model's template.
    pub fn tokenize(&self, prompts: &[Prompt]) -> Result<Vec<Vec<u32>>, ExecError> {
        let tok = self.engine.model().tokenizer();
        prompts
            .iter()
            .map(|p| {
                let text = match p {
                    Prompt::Text(t) => t.clone(),
                    Prompt::Chat(messages) => chat_template(messages),
                };
                tok.encode(&text)
                    .map_err(|e| ExecError::Rejected(format!("cannot tokenize a prompt: {e}")))
            })
            .collect()
    }

    /// The workload descriptor of a job on this model.
    pub fn describe(&self, request: &JobRequest) -> Result<WorkloadDescriptor, ExecError> {
        let prompts = self.tokenize(&request.prompts)?;
        let max_new = vec![request.params.max_tokens; prompts.len()];
        Ok(WorkloadDescriptor::from_prompts(
            None,
            &prompts,
            &max_new,
            Arrival::AllAtOnce,
            request.params.temperature,
        ))
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
}

struct Task {
    request: JobRequest,
    method: MethodConfig,
    deltas: Option<mpsc::Sender<Delta>>,
    cancel: CancellationToken,
    reply: oneshot::Sender<Result<Execution, ExecError>>,
}

#[derive(Default)]
struct Load {
    queued: AtomicU32,
    running: AtomicU32,
}

/// The bounded queue in front of the engines. Cheap to clone.
#[derive(Clone)]
pub struct Executor {
    tx: mpsc::Sender<Task>,
    load: Arc<Load>,
    capacity: u32,
    models: Arc<Vec<Arc<ServedModel>>>,
    offer: Arc<watch::Sender<Offer>>,
}

impl Executor {
    /// Starts the engine thread. Jobs beyond `capacity` waiting are refused as busy. The thread
    /// ends when every clone of the executor is dropped; [`EngineThread::join`] waits for it.
    pub fn start(models: Vec<ServedModel>, capacity: u32) -> (Self, EngineThread) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity as usize);
        let models: Arc<Vec<Arc<ServedModel>>> =
            Arc::new(models.into_iter().map(Arc::new).collect());
        let load = Arc::new(Load::default());
        let offer = Arc::new(watch::Sender::new(Offer {
            models: models.iter().map(|m| m.descriptor.clone()).collect(),
            queue_depth: 0,
            running_jobs: 0,
            queue_capacity: capacity,
        }));
        let worker = Worker {
            load: load.clone(),
            models: models.clone(),
            offer: offer.clone(),
        };
        let executor = Self {
            tx,
            load,
            capacity,
            models,
            offer,
        };
        let spawned = std::thread::Builder::new()
            .name("metainf-executor".into())
            .spawn(move || worker.work(rx));
        let handle = match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(error = %e, "cannot start the executor thread; jobs will fail");
                None
            }
        };
        (executor, EngineThread(handle))
    }

    /// The served models.
    pub fn models(&self) -> &[Arc<ServedModel>] {
        &self.models
    }

    /// The served model called `name`.
    pub fn model(&self, name: &str) -> Option<&Arc<ServedModel>> {
        self.models.iter().find(|m| m.descriptor.name == name)
    }

    /// Jobs waiting and running.
    pub fn load(&self) -> (u32, u32) {
        (
            self.load.queued.load(Ordering::Relaxed),
            self.load.running.load(Ordering::Relaxed),
        )
    }

    /// Queue capacity.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// What the heartbeats announce, kept current.
    pub fn offer(&self) -> watch::Receiver<Offer> {
        self.offer.subscribe()
    }

    fn publish_load(&self) {
        publish_load(&self.load, &self.offer);
    }

    /// Runs a job here with `method`; text goes to `deltas` as it is generated. Refused at once
    /// when the queue is full.
    pub async fn run(
        &self,
        request: JobRequest,
        method: MethodConfig,
        deltas: Option<mpsc::Sender<Delta>>,
        cancel: CancellationToken,
    ) -> Result<Execution, ExecError> {
        if self.model(&request.model).is_none() {
            return Err(ExecError::Rejected(format!(
                "model {:?} is not served by this host",
                request.model
            )));
        }
        let (reply, rx) = oneshot::channel();
        let task = Task {
            request,
            method,
            deltas,
            cancel,
            reply,
        };
        self.load.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(task).is_err() {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ExecError::Busy);
        }
        self.publish_load();
        rx.await
            .map_err(|_| ExecError::Failed("the executor stopped".into()))?
    }
}

/// Every load change goes out in the heartbeats' offer.
fn publish_load(load: &Load, offer: &watch::Sender<Offer>) {
    let (queued, running) = (
        load.queued.load(Ordering::Relaxed),
        load.running.load(Ordering::Relaxed),
    );
    offer.send_modify(|o| {
        o.queue_depth = queued.min(o.queue_capacity);
        o.running_jobs = running;
    });
}

/// The engine thread's side: what it needs, without the queue's sender (so that dropping every
/// [`Executor`] ends it).
struct Worker {
    load: Arc<Load>,
    models: Arc<Vec<Arc<ServedModel>>>,
    offer: Arc<watch::Sender<Offer>>,
}

/// The engine thread, to be joined at shutdown.
#[derive(Debug)]
pub struct EngineThread(Option<std::thread::JoinHandle<()>>);

impl EngineThread {
    /// Waits up to `timeout` for the thread to end (it ends once every [`Executor`] clone is
    /// gone and the running job finished); says so when it does not.
    pub async fn join(self, timeout: std::time::Duration) {
        let Some(handle) = self.0 else { return };
        let joined = tokio::task::spawn_blocking(move || handle.join());
        match tokio::time::timeout(timeout, joined).await {
            Ok(Ok(Ok(()))) => {}
            Ok(_) => warn!("the executor thread panicked"),
            Err(_) => warn!("the executor thread is still running a job; not waiting for it"),
        }
    }
}

impl Worker {
    fn model(&self, name: &str) -> Option<&Arc<ServedModel>> {
        self.models.iter().find(|m| m.descriptor.name == name)
    }

    fn publish_load(&self) {
        publish_load(&self.load, &self.offer);
    }

    fn work(self, mut rx: mpsc::Receiver<Task>) {
        while let Some(task) = rx.blocking_recv() {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            if task.cancel.is_cancelled() || task.reply.is_closed() {
                let _ = task.reply.send(Err(ExecError::Cancelled));
                self.publish_load();
                continue;
            }
            self.load.running.fetch_add(1, Ordering::Relaxed);
            self.publish_load();
            let result = self.execute(&task);
            self.load.running.fetch_sub(1, Ordering::Relaxed);
            self.publish_load();
            let _ = task.reply.send(result);
        }
        debug!("executor stopped");
    }

    fn execute(&self, task: &Task) -> Result<Execution, ExecError> {
        let request = &task.request;
        let model = self.model(&request.model).ok_or_else(|| {
            ExecError::Rejected(format!("model {:?} is not served", request.model))
        })?;
        let settings = MethodSettings::from_method(&task.method)
            .map_err(|e| ExecError::Rejected(format!("method {}: {e}", task.method)))?;
        let prompts = model.tokenize(&request.prompts)?;
        let context = model.engine.model().config.context_length;
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(ExecError::Rejected(format!("prompt {i} is empty")));
            }
            let total = p.len() + request.params.max_tokens as usize;
            if total > context {
                return Err(ExecError::Rejected(format!(
                    "prompt {i} has {} tokens; with max_tokens {} that exceeds the model's \
                     context of {context} tokens",
                    p.len(),
                    request.params.max_tokens
                )));
            }
        }
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
        let mut texts = TextTracker::new(model, request, task.deltas.clone(), &task.cancel);
        let report = model
            .engine
            .run_observed(&requests, &settings, &mut texts)
            .map_err(|e| match e {
                metainf_profiler::ProfilerError::Cancelled => ExecError::Cancelled,
                other => ExecError::Failed(format!("the engine failed: {other}")),
            })?;
        let completions = report
            .completions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (text, stopped_by_string) = texts.finish(i, &c.tokens);
                Completion {
                    text,
                    prompt_tokens: u32::try_from(prompts[i].len()).unwrap_or(u32::MAX),
                    output_tokens: u32::try_from(c.tokens.len()).unwrap_or(u32::MAX),
                    finish_reason: if stopped_by_string || c.finish == EngineFinish::Stop {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    },
                }
            })
            .collect();
        let workload = metainf_profiler::bench::describe(None, &requests, Arrival::AllAtOnce);
        Ok(Execution {
            model: model.descriptor.clone(),
            completions,
            report,
            workload,
        })
    }
}

/// Decodes each prompt's tokens as they come: streams the new text and ends a request when a
/// stop string appears.
struct TextTracker<'a> {
    model: &'a ServedModel,
    stop: &'a [String],
    deltas: Option<mpsc::Sender<Delta>>,
    cancel: &'a CancellationToken,
    tokens: Vec<Vec<u32>>,
    /// Bytes of each prompt's text already sent.
    sent: Vec<usize>,
    /// Whether a stop string ended the request.
    stopped: Vec<bool>,
}

impl<'a> TextTracker<'a> {
    fn new(
        model: &'a ServedModel,
        request: &'a JobRequest,
        deltas: Option<mpsc::Sender<Delta>>,
        cancel: &'a CancellationToken,
    ) -> Self {
        let n = request.prompts.len();
        Self {
            model,
            stop: &request.params.stop,
            deltas,
            cancel,
            tokens: vec![Vec::new(); n],
            sent: vec![0; n],
            stopped: vec![false; n],
        }
    }

    fn watching(&self) -> bool {
        self.deltas.is_some() || !self.stop.is_empty()
    }

    /// The visible text of `tokens` (stop tokens dropped), cut at the first stop string.
    fn visible(&self, tokens: &[u32]) -> (String, bool) {
        let tok = self.model.engine.model().tokenizer();
        let ids: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|t| !tok.stop_ids().contains(t))
            .collect();
        let mut text = tok.decode(&ids).unwrap_or_default();
        let cut = self.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        if let Some(at) = cut {
            text.truncate(at);
        }
        (text, cut.is_some())
    }

    /// Sends `text[from..to]` of prompt `i` as a delta and records it as sent; a listener
    /// that has gone cancels the run.
    fn send(&mut self, i: usize, text: &str, to: usize) {
        let from = self.sent[i];
        if to <= from || !text.is_char_boundary(from) || !text.is_char_boundary(to) {
            return;
        }
        self.sent[i] = to;
        if let Some(tx) = &self.deltas
            && tx
                .blocking_send((i as u32, text[from..to].to_owned()))
                .is_err()
        {
            self.deltas = None;
            self.cancel.cancel();
        }
    }

    /// The final text of request `i` and whether a stop string ended it; streams whatever
    /// was held back (a possible start of a stop string that never completed).
    fn finish(&mut self, i: usize, tokens: &[u32]) -> (String, bool) {
        let (text, cut) = self.visible(tokens);
        self.send(i, &text, text.len());
        (text, cut || self.stopped.get(i).copied().unwrap_or(false))
    }
}

impl RunObserver for TextTracker<'_> {
    fn on_token(&mut self, request: usize, token: u32) -> bool {
        if !self.watching() || request >= self.tokens.len() {
            return true;
        }
        self.tokens[request].push(token);
        let (text, cut) = self.visible(&self.tokens[request]);
        // Hold back text that ends inside a UTF-8 sequence or could be the start of a stop
        // string, so that nothing sent is ever taken back.
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
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
        self.send(request, &text, safe);
        if cut {
            self.stopped[request] = true;
        }
        !cut
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}
