//! The HTTP API of every node (axum): OpenAI-compatible chat and text completions (streamed
//! as server-sent events on request), batch jobs, and the operator's endpoints (models, peers,
//! decisions, status, Prometheus metrics, health).
//!
//! Every error is a JSON object `{"error": {"message", "type", "code"}}` with a fitting status:
//! 400 malformed, 402 over budget (naming the cheapest option), 404 unknown model or job, 413
//! body too large, 422 a job the model cannot run, 429 overloaded (with `Retry-After`), 502 every
//! host failed, 503 no live host.

mod openai;

use std::net::SocketAddr;
use std::str::FromStr;

use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metainf_protocol::{
    GenerationParams, JobId, JobRequest, MethodConfig, Objective, PeerId, Prompt,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::jobs::{JobError, JobService, Outcome, Routed};
use crate::store::{JobEntry, JobState};

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
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 << 20,
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
    extra: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after_s: None,
            extra: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn body(&self) -> Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "code": self.status.as_u16(),
        });
        if let (Some(extra), Some(obj)) = (&self.extra, error.as_object_mut()) {
            obj.insert("metainf".into(), extra.clone());
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
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
                extra: Some(json!({ "served": served })),
                ..Self::new(StatusCode::NOT_FOUND, "model_not_found", message)
            },
            JobError::OverBudget { cheapest, .. } => Self {
                extra: Some(json!({ "cheapest": choice_json(&cheapest) })),
                ..Self::new(StatusCode::PAYMENT_REQUIRED, "budget_exceeded", message)
            },
            JobError::Overloaded { retry_after_s } => Self {
                retry_after_s: Some(retry_after_s),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
            },
            JobError::NoHost(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "no_host", message),
            JobError::Rejected(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable_job",
                message,
            ),
            JobError::Failed(_) => Self::new(StatusCode::BAD_GATEWAY, "host_failed", message),
            JobError::Cancelled | JobError::Internal(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
            }
        }
    }
}

/// A JSON body whose every rejection (syntax, shape, size, content type) is an [`ApiError`].
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

/// What the router chose, as the API shows it.
fn choice_json(c: &metainf_scheduler::Choice) -> Value {
    json!({
        "host": c.host_name,
        "method": c.method.short_name(),
        "predicted_runtime_s": c.runtime_s,
        "predicted_wait_s": c.wait_s,
        "predicted_cost": c.cost,
    })
}

/// The `metainf` object of a finished job's response.
fn outcome_json(routed_s: f64, generation: u64, outcome: &Outcome) -> Value {
    let c = &outcome.choice;
    let measured = outcome.result.metrics.wall_time_s;
    let cost = if c.runtime_s > 0.0 {
        c.cost * measured / c.runtime_s
    } else {
        0.0
    };
    json!({
        "job": outcome.result.id.to_string(),
        "host": outcome.result.host.to_string(),
        "method": outcome.result.method.short_name(),
        "predicted_runtime_s": c.runtime_s,
        "predicted_wait_s": c.wait_s,
        "predicted_cost": c.cost,
        "measured_runtime_s": measured,
        "cost": cost,
        "latency_s": outcome.latency_s,
        "routing_ms": routed_s * 1000.0,
        "retries": outcome.retries,
        "predictor_generation": generation,
        "record": outcome.result.record.map(|r| r.to_string()),
    })
}

/// Routing options a request may carry (`metainf` in OpenAI requests, top level in batch
/// jobs).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteOptions {
    /// Most the client will pay.
    #[serde(default)]
    pub budget: Option<f64>,
    /// What to minimise: runtime, cost or energy.
    #[serde(default)]
    pub objective: Option<Objective>,
    /// Run with exactly this method (`none`, `cb`, `cb+pc`, ...).
    #[serde(default)]
    pub method: Option<String>,
    /// Run on exactly this host (a peer id).
    #[serde(default)]
    pub host: Option<String>,
}

/// Builds and validates a job request.
fn job_request(
    model: String,
    prompts: Vec<Prompt>,
    params: GenerationParams,
    route: RouteOptions,
    stream: bool,
) -> Result<JobRequest, ApiError> {
    let pin_method = route
        .method
        .as_deref()
        .map(MethodConfig::from_str)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("metainf.method: {e}")))?;
    let pin_host = route
        .host
        .as_deref()
        .map(PeerId::from_str)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("metainf.host is not a peer id: {e}")))?;
    let request = JobService::new_request(JobRequest {
        id: JobId([0; 16]),
        model,
        prompts,
        params,
        budget: route.budget,
        objective: route.objective.unwrap_or_default(),
        pin_method,
        pin_host,
        stream,
        submitted_at_ms: 0,
    });
    request
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(request)
}

/// Shared by the handlers.
#[derive(Clone)]
struct AppState {
    service: JobService,
}

/// The API's routes.
pub fn router(service: JobService, max_body_bytes: usize) -> Router {
    let state = AppState { service };
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/jobs", post(post_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/peers", get(peers))
        .route("/v1/decisions", get(decisions))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state
        .service
        .metrics()
        .http_requests
        .get_or_create(&crate::jobs::metrics::HttpLabel {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: JobService,
    max_body_bytes: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "HTTP API listening");
    axum::serve(listener, router(service, max_body_bytes))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn healthz(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "peer_id": state.service.peer_id().to_string(),
        "models": state.service.executor().models().iter().map(|m| m.descriptor.name.clone()).collect::<Vec<_>>(),
    }))
}

fn model_json(m: &metainf_protocol::ModelDescriptor, hosts: usize) -> Value {
    json!({
        "id": m.name,
        "object": "model",
        "created": 0,
        "owned_by": "metainf",
        "metainf": {
            "hosts": hosts,
            "parameters": m.parameters,
            "quantization": m.quantization,
            "context_length": m.context_length,
        },
    })
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .service
        .models()
        .await
        .iter()
        .map(|(m, hosts)| model_json(m, *hosts))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let models = state.service.models().await;
    match models.iter().find(|(m, _)| m.name == id) {
        Some((m, hosts)) => Ok(Json(model_json(m, *hosts))),
        None => Err(JobError::UnknownModel {
            model: id,
            served: models.into_iter().map(|(m, _)| m.name).collect(),
        }
        .into()),
    }
}

async fn peers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let Some(net) = state.service.net() else {
        return Ok(Json(json!({ "peers": [] })));
    };
    let peers = net.peers().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "network_down",
            e.to_string(),
        )
    })?;
    let rows: Vec<Value> = peers
        .iter()
        .map(|p| {
            let hb = p.heartbeat.as_ref();
            json!({
                "peer": p.peer.to_string(),
                "alive": p.alive,
                "connected": p.connected,
                "direct": p.direct,
                "last_seen_ms": p.last_seen_ms,
                "score": p.score,
                "models": hb.map(|h| h.models.iter().map(|m| m.name.clone()).collect::<Vec<_>>()),
                "price_per_hour": hb.map(|h| h.price_per_hour),
                "queue_depth": hb.map(|h| h.queue_depth),
                "running_jobs": hb.map(|h| h.running_jobs),
                "queue_capacity": hb.map(|h| h.queue_capacity),
                "hardware": hb.and_then(|h| h.profile.as_ref()).map(|p| json!({
                    "name": p.spec.name,
                    "backend": p.spec.backend,
                    "compute_units": p.spec.compute_units,
                })),
                "records_seq": hb.map(|h| h.records_seq),
            })
        })
        .collect();
    Ok(Json(json!({ "peers": rows })))
}

async fn decisions(State(state): State<AppState>) -> Json<Value> {
    let s = &state.service;
    let current = s.learner().current();
    Json(json!({
        "predictor": {
            "generation": current.as_ref().map_or(0, |t| t.generation),
            "trained_on_records": current.as_ref().map_or(0, |t| t.records),
        },
        "by_generation": s.decisions().by_generation(),
        "recent": s.decisions().recent(100),
    }))
}

async fn status(State(state): State<AppState>) -> Json<Value> {
    let s = &state.service;
    let (queued, running) = s.executor().load();
    let (alive, known) = match s.net() {
        Some(net) => {
            let peers = net.peers().await.unwrap_or_default();
            (peers.iter().filter(|p| p.alive).count(), peers.len())
        }
        None => (0, 0),
    };
    let current = s.learner().current();
    Json(json!({
        "peer_id": s.peer_id().to_string(),
        "uptime_s": s.uptime_s(),
        "hardware": {
            "name": s.profile().spec.name,
            "backend": s.profile().spec.backend,
            "compute_units": s.profile().spec.compute_units,
        },
        "price_per_hour": s.price_per_hour(),
        "models": s.executor().models().iter().map(|m| m.descriptor.name.clone()).collect::<Vec<_>>(),
        "queue": { "waiting": queued, "running": running, "capacity": s.executor().capacity() },
        "peers": { "alive": alive, "known": known },
        "network_models": s.models().await.into_iter().map(|(m, hosts)| json!({
            "id": m.name,
            "hosts": hosts,
        })).collect::<Vec<_>>(),
        "records": s.records(),
        "predictor": {
            "generation": current.as_ref().map_or(0, |t| t.generation),
            "trained_on_records": current.as_ref().map_or(0, |t| t.records),
        },
    }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let s = &state.service;
    let (queued, running) = s.executor().load();
    let m = s.metrics();
    m.queue_depth.set(i64::from(queued));
    m.running_jobs.set(i64::from(running));
    if let Some(net) = s.net() {
        let alive = net
            .peers()
            .await
            .map(|p| p.iter().filter(|p| p.alive).count())
            .unwrap_or(0);
        m.peers_alive.set(i64::try_from(alive).unwrap_or(i64::MAX));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

/// One prompt of a batch job: raw text, a chat, or `{"prompt": text}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BatchPrompt {
    Text(String),
    Chat { messages: Vec<openai::InMessage> },
    Prompt { prompt: String },
}

/// `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchJob {
    model: String,
    prompts: Vec<BatchPrompt>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<openai::Stop>,
    #[serde(default)]
    budget: Option<f64>,
    #[serde(default)]
    objective: Option<Objective>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    host: Option<String>,
}

async fn post_job(
    State(state): State<AppState>,
    ApiJson(job): ApiJson<BatchJob>,
) -> Result<Response, ApiError> {
    let prompts = job
        .prompts
        .into_iter()
        .map(|p| match p {
            BatchPrompt::Text(t) | BatchPrompt::Prompt { prompt: t } => Ok(Prompt::Text(t)),
            BatchPrompt::Chat { messages } => openai::chat_messages(messages).map(Prompt::Chat),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let defaults = GenerationParams::default();
    let params = GenerationParams {
        max_tokens: job.max_tokens.unwrap_or(defaults.max_tokens),
        temperature: job.temperature.unwrap_or(0.0),
        top_p: job.top_p.unwrap_or(1.0),
        seed: job.seed,
        stop: job.stop.map(openai::Stop::into_vec).unwrap_or_default(),
    };
    let route = RouteOptions {
        budget: job.budget,
        objective: job.objective,
        method: job.method,
        host: job.host,
    };
    let request = job_request(job.model, prompts, params, route, false)?;
    let routed = state.service.route(request).await?;
    state.service.accept(&routed).await;
    let body = json!({
        "id": routed.request.id.to_string(),
        "status": "queued",
        "metainf": routed_json(&routed),
    });
    let service = state.service.clone();
    tokio::spawn(async move {
        let _ = service.execute(routed, None).await;
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn routed_json(routed: &Routed) -> Value {
    let mut v = choice_json(&routed.decision.chosen);
    if let Some(o) = v.as_object_mut() {
        o.insert("feasible".into(), json!(routed.decision.feasible));
        o.insert("over_budget".into(), json!(routed.decision.over_budget));
        o.insert("routing_ms".into(), json!(routed.routing_s * 1000.0));
        o.insert("predictor_generation".into(), json!(routed.generation));
    }
    v
}

fn job_json(entry: &JobEntry) -> Value {
    let (status, host, error) = match &entry.state {
        JobState::Queued => ("queued", None, None),
        JobState::Running { host } => ("running", Some(host.to_string()), None),
        JobState::Done(r) => ("done", Some(r.host.to_string()), None),
        JobState::Failed { reason } => ("failed", None, Some(reason.clone())),
    };
    let mut v = json!({
        "id": entry.request.id.to_string(),
        "object": "job",
        "status": status,
        "model": entry.request.model,
        "prompts": entry.request.prompts.len(),
        "submitted_at_ms": entry.request.submitted_at_ms,
        "updated_at_ms": entry.updated_at_ms,
        "attempts": entry.attempts,
        "host": host,
        "error": error,
        "metainf": entry.route.as_ref().map(choice_json),
    });
    if let (JobState::Done(r), Some(o)) = (&entry.state, v.as_object_mut()) {
        o.insert("method".into(), json!(r.method.short_name()));
        o.insert(
            "results".into(),
            json!(
                r.completions
                    .iter()
                    .map(|c| json!({
                        "text": c.text,
                        "prompt_tokens": c.prompt_tokens,
                        "output_tokens": c.output_tokens,
                        "finish_reason": c.finish_reason,
                    }))
                    .collect::<Vec<_>>()
            ),
        );
        o.insert("metrics".into(), json!(r.metrics));
        o.insert("record".into(), json!(r.record.map(|id| id.to_string())));
    }
    v
}

async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job_id = JobId::from_str(
        id.trim_start_matches("chatcmpl-")
            .trim_start_matches("cmpl-"),
    )
    .map_err(|e| ApiError::invalid(format!("job id: {e}")))?;
    let entry = state
        .service
        .store()
        .job(&job_id)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            )
        })?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "job_not_found",
                format!("no job {id}"),
            )
        })?;
    Ok(Json(job_json(&entry)))
}

async fn list_jobs(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut jobs = state.service.store().jobs().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        )
    })?;
    jobs.sort_by_key(|j| std::cmp::Reverse(j.request.submitted_at_ms));
    jobs.truncate(100);
    Ok(Json(json!({
        "object": "list",
        "data": jobs.iter().map(job_json).collect::<Vec<_>>(),
    })))
}
