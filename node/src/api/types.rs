//! The JSON bodies of the node's HTTP API: built by the handlers, read back by the command-line
//! client ([`crate::client`]), one definition for both.
//!
//! The API sends every body through [`serde_json::Value`] (see [`super::ApiJson`]), whose
//! objects keep their keys sorted, so the order the fields are declared in here does not show on
//! the wire. `null` fields are sent as `null`; fields that are left out are marked
//! `skip_serializing_if` (or flattened from an `Option`) below.

use metainf_protocol::{ChatMessage, Completion, FinishReason, Metrics};
use serde::{Deserialize, Serialize};

use crate::jobs::learn::{DecisionLog, GenerationError};

/// Every error answer, and the last event of a stream whose job failed:
/// `{"error": {"message", "type", "code"[, "metainf"]}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorDetail,
}

/// The `error` object of an [`ErrorResponse`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong, for people.
    pub message: String,
    /// What went wrong, for programs (`invalid_request_error`, `budget_exceeded`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status.
    pub code: u16,
    /// What the network could do instead; absent when there is nothing to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metainf: Option<ErrorContext>,
}

/// The `metainf` object of an error: the models served (unknown model), or the cheapest option
/// (over budget). Only the field that applies is present.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorContext {
    /// The models the network serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<Vec<String>>,
    /// The cheapest host and method, which is over the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cheapest: Option<ChoiceView>,
}

/// A host and method the router chose, with its predictions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChoiceView {
    /// The host (peer id).
    pub host: String,
    /// The method's short name (`cb+pc`).
    pub method: String,
    /// Predicted runtime, seconds.
    pub predicted_runtime_s: f64,
    /// Predicted queue wait, seconds.
    pub predicted_wait_s: f64,
    /// Predicted time to the first token, seconds.
    #[serde(default)]
    pub predicted_ttft_s: f64,
    /// Predicted cost.
    pub predicted_cost: f64,
    /// Prompt tokens the host's prefix cache was expected to serve.
    #[serde(default)]
    pub cached_tokens: u64,
}

/// The `metainf` object of an accepted batch job: the choice and how it was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutingView {
    /// The choice.
    #[serde(flatten)]
    pub choice: ChoiceView,
    /// (Host, method) pairs within the budget.
    pub feasible: usize,
    /// Pairs over the budget.
    pub over_budget: usize,
    /// Time spent routing, milliseconds.
    pub routing_ms: f64,
    /// Predictor generation that decided (0 = the prior).
    pub predictor_generation: u64,
    /// The routing policy that chose the host.
    #[serde(default)]
    pub policy: String,
}

/// The `metainf` object of a finished chat or text completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutcomeView {
    /// The job id.
    pub job: String,
    /// Host that ran it (after any retries).
    pub host: String,
    /// Method it ran with.
    pub method: String,
    /// Predicted runtime, seconds.
    pub predicted_runtime_s: f64,
    /// Predicted queue wait, seconds.
    pub predicted_wait_s: f64,
    /// Predicted time to the first token, seconds.
    #[serde(default)]
    pub predicted_ttft_s: f64,
    /// Predicted cost.
    pub predicted_cost: f64,
    /// Runtime the host measured, seconds.
    pub measured_runtime_s: f64,
    /// The predicted cost scaled to the measured runtime.
    pub cost: f64,
    /// Seconds from acceptance to the result.
    pub latency_s: f64,
    /// Time spent routing, milliseconds.
    pub routing_ms: f64,
    /// Hosts tried before the one that ran it.
    pub retries: u32,
    /// Predictor generation that decided.
    pub predictor_generation: u64,
    /// The performance record the host made of the run (`null` when none).
    pub record: Option<String>,
}

/// Where a batch job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, not started.
    Queued,
    /// Running on a host.
    Running,
    /// Finished; the results are in.
    Done,
    /// Failed on every host tried.
    Failed,
}

impl JobStatus {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

/// `POST /v1/jobs` (202 Accepted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobAccepted {
    /// The job id.
    pub id: String,
    /// Always [`JobStatus::Queued`].
    pub status: JobStatus,
    /// Where it goes.
    pub metainf: RoutingView,
}

/// `GET /v1/jobs/{id}`, and each job of `GET /v1/jobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// The job id.
    pub id: String,
    /// Always `job`.
    pub object: String,
    /// Where it stands.
    pub status: JobStatus,
    /// Model name.
    pub model: String,
    /// Number of prompts.
    pub prompts: usize,
    /// When it was accepted, Unix milliseconds.
    pub submitted_at_ms: u64,
    /// Last state change, Unix milliseconds.
    pub updated_at_ms: u64,
    /// Hosts tried so far.
    pub attempts: u32,
    /// Host running it or that ran it (`null` while queued or once failed).
    pub host: Option<String>,
    /// Why it failed (`null` unless failed).
    pub error: Option<String>,
    /// The router's choice for the current attempt (`null` before routing).
    pub metainf: Option<ChoiceView>,
    /// The routing policy it is routed by, kept across a restart (`null` for jobs accepted
    /// before jobs kept it).
    pub policy: Option<String>,
    /// The results, present only once done (the fields sit beside the others).
    #[serde(flatten)]
    pub result: Option<JobResultView>,
}

/// The fields a [`JobView`] has once the job is done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResultView {
    /// Method it ran with.
    pub method: String,
    /// One completion per prompt, in order.
    pub results: Vec<Completion>,
    /// What the host measured.
    pub metrics: Metrics,
    /// The performance record the host made of it (`null` when none).
    pub record: Option<String>,
}

/// A list (`GET /v1/jobs`, `GET /v1/models`): `{"object": "list", "data": [...]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct List<T> {
    /// Always `list`.
    pub object: String,
    /// The items.
    pub data: Vec<T>,
}

impl<T> List<T> {
    /// A list of `data`.
    pub fn of(data: Vec<T>) -> Self {
        Self {
            object: "list".to_owned(),
            data,
        }
    }
}

/// `GET /v1/jobs`: the newest 100 jobs, newest first.
pub type JobList = List<JobView>;

/// `GET /v1/models`.
pub type ModelList = List<ModelView>;

/// `GET /v1/models/{id}`, and each model of `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelView {
    /// Model name.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Always 0.
    pub created: u64,
    /// Always `metainf`.
    pub owned_by: String,
    /// Who serves it, and what it is.
    pub metainf: ModelHosting,
}

/// The `metainf` object of a [`ModelView`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelHosting {
    /// Live hosts serving it.
    pub hosts: usize,
    /// Number of parameters.
    pub parameters: u64,
    /// Weight format.
    pub quantization: String,
    /// Context length.
    pub context_length: u32,
}

/// `GET /v1/peers`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeersResponse {
    /// Every peer heard from.
    pub peers: Vec<PeerView>,
}

/// What a node saw of a host's jobs (its local opinion: not gossiped).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReputationView {
    /// Share of attempts that went well (with a prior of one each way), over the slowdown.
    pub score: f64,
    /// The factor routing scales its predictions by: how much slower (> 1) or faster (< 1)
    /// than predicted it ran, against the typical host this node sent jobs to.
    pub slowdown: f64,
    /// Attempts that ended.
    pub attempts: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Excluded from routing until then, Unix ms (absent when not excluded).
    pub excluded_until_ms: Option<u64>,
}

/// One peer of `GET /v1/peers`. The fields from its heartbeat are `null` until one arrived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// Peer id.
    pub peer: String,
    /// Heard from within the timeout.
    pub alive: bool,
    /// A connection is open.
    pub connected: bool,
    /// A job can reach it (connected, or a connection closed to stay within `max_peers`).
    #[serde(default)]
    pub reachable: bool,
    /// The open connection is direct (not relayed).
    pub direct: bool,
    /// Last time it was heard from, Unix milliseconds.
    pub last_seen_ms: u64,
    /// Gossipsub score, when connected.
    pub score: Option<f64>,
    /// Not synced with for a while: its sync summaries promised records it did not send.
    #[serde(default)]
    pub distrusted: bool,
    /// What this node saw of the jobs it sent there, `null` if none.
    #[serde(default)]
    pub reputation: Option<ReputationView>,
    /// Models it serves.
    pub models: Option<Vec<String>>,
    /// Its price per hour.
    pub price_per_hour: Option<f64>,
    /// Jobs waiting in its queue.
    pub queue_depth: Option<u32>,
    /// Jobs it runs now.
    pub running_jobs: Option<u32>,
    /// Capacity of its queue.
    pub queue_capacity: Option<u32>,
    /// Its hardware, when its heartbeat carries a profile.
    pub hardware: Option<HardwareSummary>,
    /// Highest sequence number of its records.
    pub records_seq: Option<u64>,
}

/// A node's hardware in brief.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardwareSummary {
    /// Device name.
    pub name: String,
    /// Engine backend (`cpu`, `cuda`).
    pub backend: String,
    /// Threads or SMs.
    pub compute_units: u32,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// This node.
    pub peer_id: String,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// Its hardware.
    pub hardware: HardwareSummary,
    /// Its price per hour.
    pub price_per_hour: f64,
    /// Models it serves itself.
    pub models: Vec<String>,
    /// Its queue.
    pub queue: QueueView,
    /// Peers heard from.
    pub peers: PeerCounts,
    /// Models the network serves, with their live hosts.
    pub network_models: Vec<NetworkModel>,
    /// Records in its store.
    pub records: u64,
    /// The predictor that routes.
    pub predictor: PredictorView,
}

/// The `queue` object of [`StatusResponse`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    /// Jobs waiting.
    pub waiting: u32,
    /// Jobs running.
    pub running: u32,
    /// Capacity.
    pub capacity: u32,
}

/// The `peers` object of [`StatusResponse`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerCounts {
    /// Alive now.
    pub alive: usize,
    /// Ever heard from.
    pub known: usize,
}

/// One of [`StatusResponse::network_models`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkModel {
    /// Model name.
    pub id: String,
    /// Live hosts serving it.
    pub hosts: usize,
}

/// The `predictor` object of `/v1/status` and `/v1/decisions`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictorView {
    /// Its generation (0 = the prior).
    pub generation: u64,
    /// Records it was trained on.
    pub trained_on_records: u64,
}

/// `GET /v1/decisions`. Serialize-only: [`DecisionLog`] and [`GenerationError`] (in
/// `jobs::learn`) do not implement `Deserialize`.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionsResponse {
    /// The predictor that routes now.
    pub predictor: PredictorView,
    /// Mean error per predictor generation, oldest first.
    pub by_generation: Vec<GenerationError>,
    /// The last 100 decisions, newest first.
    pub recent: Vec<DecisionLog>,
}

/// `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// Always `ok`.
    pub status: String,
    /// This node.
    pub peer_id: String,
    /// Models it serves.
    pub models: Vec<String>,
}

/// A chat or text completion, or one chunk of a streamed one. `C` is the kind of choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse<C> {
    /// `chatcmpl-<job>` or `cmpl-<job>`.
    pub id: String,
    /// `chat.completion`, `chat.completion.chunk` or `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// One per prompt (in a chunk: the prompts it has news of).
    pub choices: Vec<C>,
    /// Token counts: always in a whole response; in a stream only on the last chunk, and only
    /// when `stream_options.include_usage` asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// How the network ran it: always in a whole response; in a stream on the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metainf: Option<OutcomeView>,
}

/// `POST /v1/chat/completions` without `stream`.
pub type ChatCompletion = CompletionResponse<ChatChoice>;
/// One event of `POST /v1/chat/completions` with `stream`.
pub type ChatCompletionChunk = CompletionResponse<ChunkChoice>;
/// `POST /v1/completions`, whole or one chunk of a stream.
pub type TextCompletion = CompletionResponse<TextChoice>;

/// Token counts of a completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, all prompts.
    pub prompt_tokens: u64,
    /// Generated tokens, all prompts.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

/// One choice of a whole chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Index of the prompt.
    pub index: usize,
    /// The reply (role `assistant`).
    pub message: ChatMessage,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// One choice of a streamed chat completion's chunk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Index of the prompt.
    pub index: usize,
    /// What is new.
    pub delta: Delta,
    /// Why generation ended; `null` until the last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// The `delta` of a [`ChunkChoice`]: the role in the first chunk (with empty content), text in
/// the next ones, nothing in the last.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant`, first chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a text completion (whole, or a chunk of a stream).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextChoice {
    /// Index of the prompt.
    pub index: usize,
    /// The text (in a chunk: the new text; empty in the last).
    pub text: String,
    /// Why generation ended; `null` in a stream until the last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// One `data:` event of a streamed chat completion other than `[DONE]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChatStreamEvent {
    /// The job failed; nothing follows but `[DONE]`.
    Error(ErrorResponse),
    /// A chunk.
    Chunk(ChatCompletionChunk),
}
