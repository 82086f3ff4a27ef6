//! `POST /v1/chat/completions` and `POST /v1/completions`, as OpenAI's clients expect them.
//! Fields this engine has no use for (`logprobs`, `presence_penalty`, `user`, ...) are accepted
//! and ignored, as clients send them by default; `n` above 1 is refused.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use metainf_protocol::{ChatMessage, GenerationParams, JobRequest, Prompt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{ApiError, ApiJson, AppState, RouteOptions, job_request, outcome_json};
use crate::jobs::{JobError, Outcome};

/// A message's content: a string, or parts of which the text ones are joined.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// One message of a request.
#[derive(Debug, Deserialize)]
pub(crate) struct InMessage {
    role: String,
    content: Content,
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Converts request messages, refusing non-text parts.
pub(crate) fn chat_messages(messages: Vec<InMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::invalid(format!(
                                    "content parts of type {kind:?} are not supported; the \
                                     models are text-only"
                                )));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect()
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
pub(crate) struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    metainf: Option<RouteOptions>,
}

/// Most tokens generated when a request does not say.
const DEFAULT_MAX_TOKENS: u32 = 256;

impl Common {
    fn request(self, prompts: Vec<Prompt>) -> Result<(JobRequest, bool), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n must be 1"));
        }
        let params = GenerationParams {
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(DEFAULT_MAX_TOKENS),
            // OpenAI's defaults.
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            seed: self.seed,
            stop: self.stop.map(Stop::into_vec).unwrap_or_default(),
        };
        let usage = self.stream_options.is_some_and(|o| o.include_usage);
        let request = job_request(
            self.model,
            prompts,
            params,
            self.metainf.unwrap_or_default(),
            self.stream,
        )?;
        Ok((request, usage))
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(flatten)]
    common: Common,
}

/// `prompt`: one string or several (each a request of one job).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    prompt: PromptSpec,
    #[serde(flatten)]
    common: Common,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn id(self, job: &str) -> String {
        match self {
            Self::Chat => format!("chatcmpl-{job}"),
            Self::Text => format!("cmpl-{job}"),
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Self::Chat, false) => "chat.completion",
            (Self::Chat, true) => "chat.completion.chunk",
            (Self::Text, _) => "text_completion",
        }
    }
}

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let messages = chat_messages(body.messages)?;
    let (request, usage) = body.common.request(vec![Prompt::Chat(messages)])?;
    respond(state, request, usage, Kind::Chat).await
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let prompts = match body.prompt {
        PromptSpec::One(p) => vec![Prompt::Text(p)],
        PromptSpec::Many(ps) => ps.into_iter().map(Prompt::Text).collect(),
    };
    let (request, usage) = body.common.request(prompts)?;
    respond(state, request, usage, Kind::Text).await
}

fn usage_json(outcome: &Outcome) -> Value {
    let prompt: u64 = outcome
        .result
        .completions
        .iter()
        .map(|c| u64::from(c.prompt_tokens))
        .sum();
    let completion: u64 = outcome
        .result
        .completions
        .iter()
        .map(|c| u64::from(c.output_tokens))
        .sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn created() -> u64 {
    crate::bench::now_ms() / 1000
}

/// Routes (errors become HTTP statuses before anything is streamed), then runs the job and
/// answers in one piece or as server-sent events.
async fn respond(
    state: AppState,
    request: JobRequest,
    include_usage: bool,
    kind: Kind,
) -> Result<Response, ApiError> {
    let service = state.service.clone();
    let routed = service.route(request).await?;
    service.accept(&routed).await;
    let model = routed.request.model.clone();
    let job = routed.request.id.to_string();
    let routing_s = routed.routing_s;
    let generation = routed.generation;
    if !routed.request.stream {
        // Run in its own task: a client that hangs up does not abandon a job half-way.
        let run = tokio::spawn(async move { service.execute(routed, None).await });
        let outcome = run
            .await
            .map_err(|e| ApiError::from(JobError::Internal(e.to_string())))??;
        let choices: Vec<Value> = outcome
            .result
            .completions
            .iter()
            .enumerate()
            .map(|(i, c)| match kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": { "role": "assistant", "content": c.text },
                    "finish_reason": c.finish_reason,
                }),
                Kind::Text => json!({
                    "index": i,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                }),
            })
            .collect();
        return Ok(Json(json!({
            "id": kind.id(&job),
            "object": kind.object(false),
            "created": created(),
            "model": model,
            "choices": choices,
            "usage": usage_json(&outcome),
            "metainf": outcome_json(routing_s, generation, &outcome),
        }))
        .into_response());
    }
    let prompts = routed.request.prompts.len();
    let (delta_tx, mut delta_rx) = mpsc::channel(64);
    let run = tokio::spawn(async move { service.execute(routed, Some(delta_tx)).await });
    let (events, mut events_rx) = mpsc::channel::<Event>(64);
    let id = kind.id(&job);
    let envelope = move |choices: Value| -> Value {
        json!({
            "id": id,
            "object": kind.object(true),
            "created": created(),
            "model": model,
            "choices": choices,
        })
    };
    tokio::spawn(async move {
        let chunk = |choices: Value| Event::default().data(envelope(choices).to_string());
        if kind == Kind::Chat {
            let first: Vec<Value> = (0..prompts)
                .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}))
                .collect();
            if events.send(chunk(json!(first))).await.is_err() {
                return;
            }
        }
        while let Some((i, text)) = delta_rx.recv().await {
            let choice = match kind {
                Kind::Chat => {
                    json!({"index": i, "delta": {"content": text}, "finish_reason": null})
                }
                Kind::Text => json!({"index": i, "text": text, "finish_reason": null}),
            };
            if events.send(chunk(json!([choice]))).await.is_err() {
                // The client left: dropping the deltas cancels the job.
                return;
            }
        }
        let end = match run.await {
            Ok(Ok(outcome)) => {
                let choices: Vec<Value> = outcome
                    .result
                    .completions
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match kind {
                        Kind::Chat => {
                            json!({"index": i, "delta": {}, "finish_reason": c.finish_reason})
                        }
                        Kind::Text => {
                            json!({"index": i, "text": "", "finish_reason": c.finish_reason})
                        }
                    })
                    .collect();
                // The decision rides on the last chunk, usage too when asked for.
                let mut body = envelope(json!(choices));
                if let Some(o) = body.as_object_mut() {
                    o.insert(
                        "metainf".into(),
                        outcome_json(routing_s, generation, &outcome),
                    );
                    if include_usage {
                        o.insert("usage".into(), usage_json(&outcome));
                    }
                }
                Event::default().data(body.to_string())
            }
            Ok(Err(e)) => Event::default().data(ApiError::from(e).body().to_string()),
            Err(e) => Event::default().data(
                ApiError::from(JobError::Internal(e.to_string()))
                    .body()
                    .to_string(),
            ),
        };
        let _ = events.send(end).await;
        let _ = events.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures::stream::poll_fn(move |cx| {
        events_rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
