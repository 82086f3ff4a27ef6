//! The operator's endpoints: health, models, peers, decisions, status, Prometheus metrics.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::types::{
    DecisionsResponse, HardwareSummary, HealthResponse, List, ModelHosting, ModelList, ModelView,
    NetworkModel, PeerCounts, PeerView, PeersResponse, PredictorView, QueueView, ReputationView,
    StatusResponse,
};
use super::{ApiError, ApiJson, AppState};
use crate::jobs::JobError;

fn served_models(state: &AppState) -> Vec<String> {
    state.service.served_models()
}

fn predictor(state: &AppState) -> PredictorView {
    let p = state.service.predictor();
    PredictorView {
        generation: p.generation,
        trained_on_records: p.trained_on_records,
    }
}

fn hardware(p: &metainf_protocol::HardwareProfile) -> HardwareSummary {
    HardwareSummary {
        name: p.spec.name.clone(),
        backend: p.spec.backend.clone(),
        compute_units: p.spec.compute_units,
    }
}

pub(super) async fn healthz(State(state): State<AppState>) -> ApiJson<HealthResponse> {
    ApiJson(HealthResponse {
        status: "ok".to_owned(),
        peer_id: state.service.peer_id().to_string(),
        models: served_models(&state),
    })
}

fn model_view(m: &metainf_protocol::ModelDescriptor, hosts: usize) -> ModelView {
    ModelView {
        id: m.name.clone(),
        object: "model".to_owned(),
        created: 0,
        owned_by: "metainf".to_owned(),
        metainf: ModelHosting {
            hosts,
            parameters: m.parameters,
            quantization: m.quantization.clone(),
            context_length: m.context_length,
        },
    }
}

pub(super) async fn models(State(state): State<AppState>) -> ApiJson<ModelList> {
    let data = state
        .service
        .models()
        .await
        .iter()
        .map(|(m, hosts)| model_view(m, *hosts))
        .collect();
    ApiJson(List::of(data))
}

pub(super) async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<ApiJson<ModelView>, ApiError> {
    let models = state.service.models().await;
    match models.iter().find(|(m, _)| m.name == id) {
        Some((m, hosts)) => Ok(ApiJson(model_view(m, *hosts))),
        None => Err(JobError::UnknownModel {
            model: id,
            served: models.into_iter().map(|(m, _)| m.name).collect(),
        }
        .into()),
    }
}

pub(super) async fn peers(
    State(state): State<AppState>,
) -> Result<ApiJson<PeersResponse>, ApiError> {
    let peers = state.service.peers().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "network_down",
            e.to_string(),
        )
    })?;
    let reputations = state.service.reputations();
    let now = crate::clock::now_ms();
    let peers = peers
        .iter()
        .map(|p| {
            let hb = p.heartbeat.as_ref();
            let reputation = reputations.get(&p.peer).map(|(r, factor)| ReputationView {
                score: r.score(),
                slowdown: *factor,
                attempts: r.attempts,
                failed: r.failed,
                excluded_until_ms: r.excluded(now).then_some(r.excluded_until_ms),
            });
            PeerView {
                peer: p.peer.to_string(),
                alive: p.alive,
                connected: p.connected,
                reachable: p.reachable,
                direct: p.direct,
                last_seen_ms: p.last_seen_ms,
                score: p.score,
                distrusted: p.distrusted,
                reputation,
                models: hb.map(|h| h.models.iter().map(|m| m.name.clone()).collect()),
                price_per_hour: hb.map(|h| h.price_per_hour),
                queue_depth: hb.map(|h| h.queue_depth),
                running_jobs: hb.map(|h| h.running_jobs),
                queue_capacity: hb.map(|h| h.queue_capacity),
                hardware: hb.and_then(|h| h.profile.as_ref()).map(hardware),
                records_seq: hb.map(|h| h.records_seq),
            }
        })
        .collect();
    Ok(ApiJson(PeersResponse { peers }))
}

pub(super) async fn decisions(State(state): State<AppState>) -> ApiJson<DecisionsResponse> {
    let s = &state.service;
    ApiJson(DecisionsResponse {
        predictor: predictor(&state),
        by_generation: s.error_by_generation(),
        recent: s.recent_decisions(100),
    })
}

pub(super) async fn status(State(state): State<AppState>) -> ApiJson<StatusResponse> {
    let s = &state.service;
    let load = s.load();
    let peers = s.peers().await.unwrap_or_default();
    let (alive, known) = (peers.iter().filter(|p| p.alive).count(), peers.len());
    ApiJson(StatusResponse {
        peer_id: s.peer_id().to_string(),
        uptime_s: s.uptime_s(),
        hardware: hardware(s.profile()),
        price_per_hour: s.price_per_hour(),
        models: served_models(&state),
        queue: QueueView {
            waiting: load.waiting,
            running: load.running,
            capacity: load.capacity,
        },
        peers: PeerCounts { alive, known },
        network_models: s
            .models()
            .await
            .into_iter()
            .map(|(m, hosts)| NetworkModel { id: m.name, hosts })
            .collect(),
        records: s.records(),
        predictor: predictor(&state),
    })
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.service.metrics_text().await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
