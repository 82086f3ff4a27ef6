//! The HTTP API of every node (axum): OpenAI-compatible chat and text completions (streamed
//! as server-sent events on request), batch jobs, and the operator's endpoints (models, peers,
//! decisions, status, Prometheus metrics, health).
//!
//! Every error is a JSON object `{"error": {"message", "type", "code"}}` with a fitting status:
//! 400 malformed, 402 over budget (naming the cheapest option), 404 unknown model or job, 413
//! body too large, 422 a job the model cannot run, 429 overloaded (with `Retry-After`), 502 every
//! host failed, 503 no live host, 401 a missing or wrong API key.
//!
//! With `api_key` set (or `METAINF_API_KEY` in the environment), every request but `/healthz`
//! must carry `Authorization: Bearer KEY`, as OpenAI clients send it. A node that listens beyond
//! loopback without one says so at start.

//!
//! The bodies are the typed structs of [`types`], which the command-line client reads back.

mod batch;
mod openai;
mod ops;
mod request;
pub mod types;

use std::net::SocketAddr;

use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::jobs::{JobError, JobService, Outcome, Routed};
pub use request::RouteOptions;
use types::{ChoiceView, ErrorContext, ErrorDetail, ErrorResponse, OutcomeView, RoutingView};

/// HTTP settings (the `[api]` section of the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Whether `run` serves the API.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// The bearer token every request but `/healthz` must carry; unset = none (and
    /// `METAINF_API_KEY` in the environment sets it too).
    pub api_key: Option<String>,
}

impl ApiConfig {
    /// The key requests must carry: the configured one, else `METAINF_API_KEY`, else none.
    pub fn key(&self) -> Option<String> {
        self.api_key
            .clone()
            .or_else(|| std::env::var("METAINF_API_KEY").ok())
            .filter(|k| !k.is_empty())
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 << 20,
            api_key: None,
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after_s: Option<u32>,
    /// Boxed: it is rare, and an `ApiError` travels in every handler's `Result`.
    context: Option<Box<ErrorContext>>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after_s: None,
            context: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                code: self.status.as_u16(),
                metainf: self.context.as_deref().cloned(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Not through `ApiJson`, whose own failure answers with an `ApiError`.
        let body = serde_json::to_value(self.body()).unwrap_or_default();
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let message = e.to_string();
        match e {
            JobError::Invalid(_) => Self::invalid(message),
            JobError::UnknownModel { served, .. } => Self {
                context: Some(Box::new(ErrorContext {
                    served: Some(served),
                    ..ErrorContext::default()
                })),
                ..Self::new(StatusCode::NOT_FOUND, "model_not_found", message)
            },
            JobError::OverBudget { cheapest, .. } => Self {
                context: Some(Box::new(ErrorContext {
                    cheapest: Some(choice_view(&cheapest)),
                    ..ErrorContext::default()
                })),
                ..Self::new(StatusCode::PAYMENT_REQUIRED, "budget_exceeded", message)
            },
            JobError::Overloaded { retry_after_s } => Self {
                retry_after_s: Some(retry_after_s),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
            },
            JobError::NoHost(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "no_host", message),
            JobError::Unpersisted(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                message,
            ),
            JobError::Rejected(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable_job",
                message,
            ),
            JobError::Failed(_) => Self::new(StatusCode::BAD_GATEWAY, "host_failed", message),
            JobError::Cancelled | JobError::Internal(_) => Self::internal(message),
        }
    }
}

/// A JSON body. As a request body, every rejection (syntax, shape, size, content type) is an
/// [`ApiError`]. As a response, the value goes out through [`serde_json::Value`] (see
/// [`to_wire`]).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => {
                let status = rejection.status();
                let message = rejection.body_text();
                Err(match status {
                    StatusCode::PAYLOAD_TOO_LARGE => {
                        ApiError::new(status, "request_too_large", message)
                    }
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                        ApiError::new(status, "invalid_request_error", message)
                    }
                    _ => ApiError::invalid(message),
                })
            }
        }
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        match to_wire(&self.0) {
            Ok(v) => Json(v).into_response(),
            Err(e) => ApiError::internal(format!("cannot encode the answer: {e}")).into_response(),
        }
    }
}

/// A body as the API sends it: through [`serde_json::Value`], whose objects sort their keys
/// (the workspace builds `serde_json` without `preserve_order`) and which widens `f32`s to
/// `f64`. That is how the API's bodies have always been encoded, so every client sees the same
/// bytes whatever order the structs of [`types`] (and the protocol types nested in them)
/// declare their fields in.
pub fn to_wire<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Value> {
    serde_json::to_value(value)
}

/// What the router chose, as the API shows it.
fn choice_view(c: &metainf_scheduler::Choice) -> ChoiceView {
    ChoiceView {
        host: c.host_name.clone(),
        method: c.method.short_name(),
        predicted_runtime_s: c.runtime_s,
        predicted_wait_s: c.wait_s,
        predicted_ttft_s: c.ttft_s,
        predicted_cost: c.cost,
        cached_tokens: c.cached_tokens,
    }
}

/// The `metainf` object of an accepted batch job.
fn routing_view(routed: &Routed) -> RoutingView {
    RoutingView {
        choice: choice_view(&routed.decision.chosen),
        feasible: routed.decision.feasible,
        over_budget: routed.decision.over_budget,
        routing_ms: routed.routing_s * 1000.0,
        predictor_generation: routed.generation,
        policy: routed.policy.to_string(),
    }
}

/// The `metainf` object of a finished job's response.
fn outcome_view(routed_s: f64, generation: u64, outcome: &Outcome) -> OutcomeView {
    let c = &outcome.choice;
    let measured = outcome.result.metrics.wall_time_s;
    let cost = if c.runtime_s > 0.0 {
        c.cost * measured / c.runtime_s
    } else {
        0.0
    };
    OutcomeView {
        job: outcome.result.id.to_string(),
        host: outcome.result.host.to_string(),
        method: outcome.result.method.short_name(),
        predicted_runtime_s: c.runtime_s,
        predicted_wait_s: c.wait_s,
        predicted_ttft_s: c.ttft_s,
        predicted_cost: c.cost,
        measured_runtime_s: measured,
        cost,
        latency_s: outcome.latency_s,
        routing_ms: routed_s * 1000.0,
        retries: outcome.retries,
        predictor_generation: generation,
        record: outcome.result.record.map(|r| r.to_string()),
    }
}

/// Shared by the handlers.
#[derive(Clone)]
struct AppState {
    service: JobService,
    key: Option<std::sync::Arc<str>>,
}

/// The API's routes; with `key`, every request but `/healthz` must carry it as a bearer token.
pub fn router(service: JobService, max_body_bytes: usize, key: Option<String>) -> Router {
    let state = AppState {
        service,
        key: key.map(std::sync::Arc::from),
    };
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(ops::models))
        .route("/v1/models/{id}", get(ops::model))
        .route("/v1/jobs", post(batch::post_job).get(batch::list_jobs))
        .route("/v1/jobs/{id}", get(batch::get_job))
        .route("/v1/peers", get(ops::peers))
        .route("/v1/decisions", get(ops::decisions))
        .route("/v1/status", get(ops::status))
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Whether two byte strings are equal, in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = &state.key else {
        return next.run(request).await;
    };
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(given) if same_secret(given.as_bytes(), key.as_bytes()) => next.run(request).await,
        _ => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this node's API needs a key: send `Authorization: Bearer KEY`",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state.service.count_http(route, response.status().as_u16());
    response
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: JobService,
    config: &ApiConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let key = config.key();
    info!(%addr, key = key.is_some(), "HTTP API listening");
    if key.is_none() && !addr.ip().is_loopback() {
        warn!(%addr, "the HTTP API listens beyond loopback with no key: anyone who reaches it can run jobs here (set api.api_key or METAINF_API_KEY)");
    }
    axum::serve(listener, router(service, config.max_body_bytes, key))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests;
