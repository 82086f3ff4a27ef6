//! Batch jobs: `POST /v1/jobs` accepts a job of several prompts and answers at once; `GET
//! /v1/jobs/{id}` and `GET /v1/jobs` show where jobs stand.

use std::str::FromStr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metainf_protocol::{JobId, Objective, Prompt};
use serde::Deserialize;

use super::openai::{InMessage, chat_messages};
use super::request::{GenerationDefaults, GenerationFields, RouteOptions, Stop, job_request};
use super::types::{JobAccepted, JobList, JobResultView, JobStatus, JobView, List};
use super::{ApiError, ApiJson, AppState, choice_view, routing_view};
use crate::jobs::{JobEntry, JobState};

/// One prompt of a batch job: raw text, a chat, or `{"prompt": text}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BatchPrompt {
    Text(String),
    Chat { messages: Vec<InMessage> },
    Prompt { prompt: String },
}

/// `POST /v1/jobs`. Unknown fields are refused, so the generation fields cannot be a flattened
/// [`GenerationFields`]; [`BatchJob::split`] hands them over instead.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchJob {
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
    stop: Option<Stop>,
    #[serde(default)]
    budget: Option<f64>,
    #[serde(default)]
    objective: Option<Objective>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    policy: Option<String>,
}

impl BatchJob {
    /// The model, prompts, generation fields and routing options.
    fn split(self) -> (String, Vec<BatchPrompt>, GenerationFields, RouteOptions) {
        let generation = GenerationFields {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop,
        };
        let route = RouteOptions {
            budget: self.budget,
            objective: self.objective,
            method: self.method,
            host: self.host,
            policy: self.policy,
        };
        (self.model, self.prompts, generation, route)
    }
}

pub(super) async fn post_job(
    State(state): State<AppState>,
    ApiJson(job): ApiJson<BatchJob>,
) -> Result<Response, ApiError> {
    let (model, prompts, generation, route) = job.split();
    let prompts = prompts
        .into_iter()
        .map(|p| match p {
            BatchPrompt::Text(t) | BatchPrompt::Prompt { prompt: t } => Ok(Prompt::Text(t)),
            BatchPrompt::Chat { messages } => chat_messages(messages).map(Prompt::Chat),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let params = generation.into_params(GenerationDefaults::batch());
    let policy = route.policy()?;
    let request = job_request(model, prompts, params, route, false)?;
    let routed = state.service.route(request, policy).await?;
    state.service.accept(&routed).await?;
    let body = JobAccepted {
        id: routed.request.id.to_string(),
        status: JobStatus::Queued,
        metainf: routing_view(&routed),
    };
    let service = state.service.clone();
    state.service.spawn(async move {
        let _ = service.execute(routed, None).await;
    });
    Ok((StatusCode::ACCEPTED, ApiJson(body)).into_response())
}

/// A stored job as the API shows it.
pub(super) fn job_view(entry: &JobEntry) -> JobView {
    let (status, host, error) = match &entry.state {
        JobState::Queued => (JobStatus::Queued, None, None),
        JobState::Running { host } => (JobStatus::Running, Some(host.to_string()), None),
        JobState::Done(r) => (JobStatus::Done, Some(r.host.to_string()), None),
        JobState::Failed { reason } => (JobStatus::Failed, None, Some(reason.clone())),
    };
    let result = match &entry.state {
        JobState::Done(r) => Some(JobResultView {
            method: r.method.short_name(),
            results: r.completions.clone(),
            metrics: r.metrics.clone(),
            record: r.record.map(|id| id.to_string()),
        }),
        _ => None,
    };
    JobView {
        id: entry.request.id.to_string(),
        object: "job".to_owned(),
        status,
        model: entry.request.model.clone(),
        prompts: entry.request.prompts.len(),
        submitted_at_ms: entry.request.submitted_at_ms,
        updated_at_ms: entry.updated_at_ms,
        attempts: entry.attempts,
        host,
        error,
        metainf: entry.route.as_ref().map(choice_view),
        policy: entry.policy.map(|p| p.to_string()),
        result,
    }
}

pub(super) async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<ApiJson<JobView>, ApiError> {
    let job_id = JobId::from_str(
        id.trim_start_matches("chatcmpl-")
            .trim_start_matches("cmpl-"),
    )
    .map_err(|e| ApiError::invalid(format!("job id: {e}")))?;
    let entry = state.service.job(job_id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "job_not_found",
            format!("no job {id}"),
        )
    })?;
    Ok(ApiJson(job_view(&entry)))
}

pub(super) async fn list_jobs(State(state): State<AppState>) -> Result<ApiJson<JobList>, ApiError> {
    let jobs = state.service.recent_jobs(100).await?;
    Ok(ApiJson(List::of(jobs.iter().map(job_view).collect())))
}
