//! `POST /v1/chat/completions` and `POST /v1/completions`, as OpenAI's clients expect them.
//! Fields this engine has no use for (`logprobs`, `presence_penalty`, `user`, ...) are accepted
//! and ignored, as clients send them by default; `n` above 1 is refused.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use metainf_protocol::{ChatMessage, JobRequest, Prompt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::request::{GenerationDefaults, GenerationFields, RouteOptions, job_request};
use super::types::{ChatChoice, ChunkChoice, CompletionResponse, Delta, TextChoice, Usage};
use super::{ApiError, ApiJson, AppState, outcome_view, to_wire};
use crate::jobs::policy::RoutingPolicy;
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
    /// OpenAI's newer name of `max_tokens`; wins over it.
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(flatten)]
    generation: GenerationFields,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    metainf: Option<RouteOptions>,
}

impl Common {
    fn request(
        mut self,
        prompts: Vec<Prompt>,
    ) -> Result<(JobRequest, bool, Option<RoutingPolicy>), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n must be 1"));
        }
        self.generation.max_tokens = self.max_completion_tokens.or(self.generation.max_tokens);
        let params = self.generation.into_params(GenerationDefaults::OPENAI);
        let usage = self.stream_options.is_some_and(|o| o.include_usage);
        let route = self.metainf.unwrap_or_default();
        let policy = route.policy()?;
        let request = job_request(self.model, prompts, params, route, self.stream)?;
        Ok((request, usage, policy))
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
    let (request, usage, policy) = body.common.request(vec![Prompt::Chat(messages)])?;
    respond(state, request, usage, policy, Kind::Chat).await
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let prompts = match body.prompt {
        PromptSpec::One(p) => vec![Prompt::Text(p)],
        PromptSpec::Many(ps) => ps.into_iter().map(Prompt::Text).collect(),
    };
    let (request, usage, policy) = body.common.request(prompts)?;
    respond(state, request, usage, policy, Kind::Text).await
}

fn usage(outcome: &Outcome) -> Usage {
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
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
    }
}

fn created() -> u64 {
    crate::clock::now_ms() / 1000
}

/// One server-sent event of `value`, encoded as the API encodes its bodies.
fn event<T: Serialize>(value: &T) -> Event {
    let data = match to_wire(value) {
        Ok(v) => v.to_string(),
        Err(e) => to_wire(&ApiError::internal(format!("cannot encode the event: {e}")).body())
            .map(|v| v.to_string())
            .unwrap_or_default(),
    };
    Event::default().data(data)
}

/// A completion of `kind`'s choices, whole or one chunk.
fn envelope<C>(
    kind: Kind,
    chunk: bool,
    job: &str,
    model: &str,
    choices: Vec<C>,
) -> CompletionResponse<C> {
    CompletionResponse {
        id: kind.id(job),
        object: kind.object(chunk).to_owned(),
        created: created(),
        model: model.to_owned(),
        choices,
        usage: None,
        metainf: None,
    }
}

/// Routes (errors become HTTP statuses before anything is streamed), then runs the job and
/// answers in one piece or as server-sent events.
async fn respond(
    state: AppState,
    request: JobRequest,
    include_usage: bool,
    policy: Option<RoutingPolicy>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let service = state.service.clone();
    let routed = service.route(request, policy).await?;
    service.accept(&routed).await?;
    let model = routed.request.model.clone();
    let job = routed.request.id.to_string();
    let routing_s = routed.routing_s;
    let generation = routed.generation;
    if !routed.request.stream {
        // Run in its own task: a client that hangs up does not abandon a job half-way.
        let run = service
            .clone()
            .spawn(async move { service.execute(routed, None).await });
        let outcome = run
            .await
            .map_err(|e| ApiError::from(JobError::Internal(e.to_string())))??;
        let completions = outcome.result.completions.iter().enumerate();
        let usage = Some(usage(&outcome));
        let metainf = Some(outcome_view(routing_s, generation, &outcome));
        return Ok(match kind {
            Kind::Chat => {
                let choices = completions
                    .map(|(i, c)| ChatChoice {
                        index: i,
                        message: ChatMessage {
                            role: "assistant".to_owned(),
                            content: c.text.clone(),
                        },
                        finish_reason: c.finish_reason,
                    })
                    .collect();
                ApiJson(CompletionResponse {
                    usage,
                    metainf,
                    ..envelope(kind, false, &job, &model, choices)
                })
                .into_response()
            }
            Kind::Text => {
                let choices = completions
                    .map(|(i, c)| TextChoice {
                        index: i,
                        text: c.text.clone(),
                        finish_reason: Some(c.finish_reason),
                    })
                    .collect();
                ApiJson(CompletionResponse {
                    usage,
                    metainf,
                    ..envelope(kind, false, &job, &model, choices)
                })
                .into_response()
            }
        });
    }
    let prompts = routed.request.prompts.len();
    let (delta_tx, mut delta_rx) = mpsc::channel(64);
    let run = service
        .clone()
        .spawn(async move { service.execute(routed, Some(delta_tx)).await });
    let (events, mut events_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        // A chunk of new text of prompt `i`.
        let delta = |i: u32, text: String| -> Event {
            let i = i as usize;
            match kind {
                Kind::Chat => {
                    let choice = ChunkChoice {
                        index: i,
                        delta: Delta {
                            role: None,
                            content: Some(text),
                        },
                        finish_reason: None,
                    };
                    event(&envelope(kind, true, &job, &model, vec![choice]))
                }
                Kind::Text => {
                    let choice = TextChoice {
                        index: i,
                        text,
                        finish_reason: None,
                    };
                    event(&envelope(kind, true, &job, &model, vec![choice]))
                }
            }
        };
        if kind == Kind::Chat {
            let first: Vec<ChunkChoice> = (0..prompts)
                .map(|i| ChunkChoice {
                    index: i,
                    delta: Delta {
                        role: Some("assistant".to_owned()),
                        content: Some(String::new()),
                    },
                    finish_reason: None,
                })
                .collect();
            if events
                .send(event(&envelope(kind, true, &job, &model, first)))
                .await
                .is_err()
            {
                return;
            }
        }
        while let Some((i, text)) = delta_rx.recv().await {
            if events.send(delta(i, text)).await.is_err() {
                // The client left: dropping the deltas cancels the job.
                return;
            }
        }
        let end = match run.await {
            Ok(Ok(outcome)) => {
                // The decision rides on the last chunk, usage too when asked for.
                let usage = include_usage.then(|| usage(&outcome));
                let metainf = Some(outcome_view(routing_s, generation, &outcome));
                let completions = outcome.result.completions.iter().enumerate();
                match kind {
                    Kind::Chat => {
                        let choices = completions
                            .map(|(i, c)| ChunkChoice {
                                index: i,
                                delta: Delta::default(),
                                finish_reason: Some(c.finish_reason),
                            })
                            .collect();
                        event(&CompletionResponse {
                            usage,
                            metainf,
                            ..envelope(kind, true, &job, &model, choices)
                        })
                    }
                    Kind::Text => {
                        let choices = completions
                            .map(|(i, c)| TextChoice {
                                index: i,
                                text: String::new(),
                                finish_reason: Some(c.finish_reason),
                            })
                            .collect();
                        event(&CompletionResponse {
                            usage,
                            metainf,
                            ..envelope(kind, true, &job, &model, choices)
                        })
                    }
                }
            }
            Ok(Err(e)) => event(&ApiError::from(e).body()),
            Err(e) => event(&ApiError::from(JobError::Internal(e.to_string())).body()),
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
