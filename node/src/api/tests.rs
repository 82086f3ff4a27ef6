//! The typed bodies encode exactly as the `json!` literals they replaced (kept here as the
//! reference), and the client reads them back unchanged.

use metainf_protocol::{
    Completion, FinishReason, JobId, JobRequest, JobResult, Keypair, MethodConfig, Prompt, fixtures,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::batch::job_view;
use super::types::*;
use super::*;
use crate::jobs::{JobEntry, JobState};

/// `value` on the wire equals `reference`, byte for byte, and reads back into the same value.
fn same<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    value: &T,
    reference: &Value,
) {
    let wire = to_wire(value).unwrap();
    assert_eq!(&wire, reference);
    assert_eq!(wire.to_string(), reference.to_string());
    let back: T = serde_json::from_value(wire).unwrap();
    assert_eq!(&back, value);
}

fn choice() -> metainf_scheduler::Choice {
    metainf_scheduler::Choice {
        host: 1,
        host_name: "12D3KooWhost".into(),
        method: MethodConfig::baseline(),
        runtime_s: 2.5,
        wait_s: 0.25,
        ttft_s: 0.5,
        cost: 0.125,
        energy_j: None,
        log_std: 0.1,
        cached_tokens: 96,
    }
}

fn old_choice_json(c: &metainf_scheduler::Choice) -> Value {
    json!({
        "host": c.host_name,
        "method": c.method.short_name(),
        "predicted_runtime_s": c.runtime_s,
        "predicted_wait_s": c.wait_s,
        "predicted_ttft_s": c.ttft_s,
        "predicted_cost": c.cost,
        "cached_tokens": c.cached_tokens,
    })
}

fn result(record: bool) -> JobResult {
    let key = Keypair::generate_ed25519();
    let r = fixtures::record(&key, 1, 1);
    JobResult {
        id: JobId([7; 16]),
        host: key.public().to_peer_id(),
        method: MethodConfig::baseline(),
        completions: vec![Completion {
            text: "Paris".into(),
            prompt_tokens: 12,
            output_tokens: 2,
            finish_reason: FinishReason::Stop,
        }],
        metrics: r.metrics.clone(),
        record: record.then(|| r.id().unwrap()),
    }
}

fn entry(state: JobState, route: bool) -> JobEntry {
    JobEntry {
        request: JobRequest {
            id: JobId([3; 16]),
            model: "m".into(),
            prompts: vec![Prompt::Text("a".into()), Prompt::Text("b".into())],
            params: metainf_protocol::GenerationParams::default(),
            budget: None,
            objective: metainf_protocol::Objective::Runtime,
            pin_method: None,
            pin_host: None,
            stream: false,
            submitted_at_ms: 1_000,
        },
        state,
        updated_at_ms: 2_000,
        route: route.then(choice),
        attempts: 1,
        policy: None,
    }
}

/// `job_json` as it was.
fn old_job_json(entry: &JobEntry) -> Value {
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
        "metainf": entry.route.as_ref().map(old_choice_json),
        "policy": entry.policy.map(|p| p.to_string()),
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

#[test]
fn jobs_in_every_state_keep_their_shape() {
    let host = Keypair::generate_ed25519().public().to_peer_id();
    for e in [
        entry(JobState::Queued, false),
        entry(JobState::Running { host }, true),
        entry(JobState::Failed { reason: "x".into() }, true),
        entry(JobState::Done(Box::new(result(true))), true),
        entry(JobState::Done(Box::new(result(false))), true),
    ] {
        same(&job_view(&e), &old_job_json(&e));
    }
    let queued = to_wire(&job_view(&entry(JobState::Queued, false))).unwrap();
    assert!(queued.get("results").is_none() && queued["host"].is_null());
    let done = to_wire(&job_view(&entry(
        JobState::Done(Box::new(result(false))),
        true,
    )))
    .unwrap();
    assert!(done["record"].is_null() && done.get("record").is_some());
}

#[test]
fn choices_and_outcomes_keep_their_shape() {
    let c = choice();
    same(&choice_view(&c), &old_choice_json(&c));
    let outcome = Outcome {
        result: result(true),
        choice: c.clone(),
        retries: 1,
        latency_s: 3.0,
        observed_s: None,
    };
    let measured = outcome.result.metrics.wall_time_s;
    let reference = json!({
        "job": outcome.result.id.to_string(),
        "host": outcome.result.host.to_string(),
        "method": outcome.result.method.short_name(),
        "predicted_runtime_s": c.runtime_s,
        "predicted_wait_s": c.wait_s,
        "predicted_ttft_s": c.ttft_s,
        "predicted_cost": c.cost,
        "measured_runtime_s": measured,
        "cost": c.cost * measured / c.runtime_s,
        "latency_s": 3.0,
        "routing_ms": 1.5,
        "retries": 1,
        "predictor_generation": 4,
        "record": outcome.result.record.map(|r| r.to_string()),
    });
    same(&outcome_view(0.0015, 4, &outcome), &reference);

    let routing = RoutingView {
        choice: choice_view(&c),
        feasible: 6,
        over_budget: 2,
        routing_ms: 0.5,
        predictor_generation: 3,
        policy: "prefix-affinity".into(),
    };
    let mut reference = old_choice_json(&c);
    if let Some(o) = reference.as_object_mut() {
        o.insert("feasible".into(), json!(6));
        o.insert("over_budget".into(), json!(2));
        o.insert("routing_ms".into(), json!(0.5));
        o.insert("predictor_generation".into(), json!(3));
        o.insert("policy".into(), json!("prefix-affinity"));
    }
    same(&routing, &reference);
    let accepted = JobAccepted {
        id: "ab".into(),
        status: JobStatus::Queued,
        metainf: routing,
    };
    same(
        &accepted,
        &json!({"id": "ab", "status": "queued", "metainf": reference}),
    );
}

#[test]
fn errors_keep_their_shape() {
    let plain = ApiError::invalid("bad");
    same(
        &plain.body(),
        &json!({"error": {"message": "bad", "type": "invalid_request_error", "code": 400}}),
    );
    let unknown = ApiError::from(JobError::UnknownModel {
        model: "x".into(),
        served: vec!["m".into()],
    });
    same(
        &unknown.body(),
        &json!({"error": {
            "message": unknown.message,
            "type": "model_not_found",
            "code": 404,
            "metainf": {"served": ["m"]},
        }}),
    );
    let over = ApiError::from(JobError::OverBudget {
        message: "too dear".into(),
        cheapest: Box::new(choice()),
    });
    same(
        &over.body(),
        &json!({"error": {
            "message": "too dear",
            "type": "budget_exceeded",
            "code": 402,
            "metainf": {"cheapest": old_choice_json(&choice())},
        }}),
    );
}

#[test]
fn completions_and_chunks_keep_their_shape() {
    let outcome = Outcome {
        result: result(false),
        choice: choice(),
        retries: 0,
        latency_s: 1.0,
        observed_s: None,
    };
    let metainf = outcome_view(0.001, 0, &outcome);
    let usage = Usage {
        prompt_tokens: 12,
        completion_tokens: 2,
        total_tokens: 14,
    };
    let whole = ChatCompletion {
        id: "chatcmpl-x".into(),
        object: "chat.completion".into(),
        created: 5,
        model: "m".into(),
        choices: vec![ChatChoice {
            index: 0,
            message: metainf_protocol::ChatMessage {
                role: "assistant".into(),
                content: "Paris".into(),
            },
            finish_reason: FinishReason::Stop,
        }],
        usage: Some(usage.clone()),
        metainf: Some(metainf.clone()),
    };
    same(
        &whole,
        &json!({
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 5,
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
            "metainf": to_wire(&metainf).unwrap(),
        }),
    );
    let chunk = |choices: Vec<ChunkChoice>| ChatCompletionChunk {
        id: "chatcmpl-x".into(),
        object: "chat.completion.chunk".into(),
        created: 5,
        model: "m".into(),
        choices,
        usage: None,
        metainf: None,
    };
    let envelope = |choices: Value| json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": choices});
    let first = chunk(vec![ChunkChoice {
        index: 0,
        delta: Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        },
        finish_reason: None,
    }]);
    same(
        &first,
        &envelope(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        ),
    );
    let text = chunk(vec![ChunkChoice {
        index: 0,
        delta: Delta {
            role: None,
            content: Some("Pa".into()),
        },
        finish_reason: None,
    }]);
    same(
        &text,
        &envelope(json!([{"index": 0, "delta": {"content": "Pa"}, "finish_reason": null}])),
    );
    let last = ChatCompletionChunk {
        metainf: Some(metainf.clone()),
        ..chunk(vec![ChunkChoice {
            index: 0,
            delta: Delta::default(),
            finish_reason: Some(FinishReason::Length),
        }])
    };
    let mut reference = envelope(json!([{"index": 0, "delta": {}, "finish_reason": "length"}]));
    if let Some(o) = reference.as_object_mut() {
        o.insert("metainf".into(), to_wire(&metainf).unwrap());
    }
    same(&last, &reference);
    let event: ChatStreamEvent = serde_json::from_value(reference).unwrap();
    assert_eq!(event, ChatStreamEvent::Chunk(last));
    let error: ChatStreamEvent =
        serde_json::from_value(to_wire(&ApiError::invalid("no").body()).unwrap()).unwrap();
    assert!(matches!(error, ChatStreamEvent::Error(e) if e.error.message == "no"));

    let text = TextCompletion {
        id: "cmpl-x".into(),
        object: "text_completion".into(),
        created: 5,
        model: "m".into(),
        choices: vec![TextChoice {
            index: 1,
            text: "a".into(),
            finish_reason: None,
        }],
        usage: None,
        metainf: None,
    };
    same(
        &text,
        &json!({"id": "cmpl-x", "object": "text_completion", "created": 5, "model": "m",
            "choices": [{"index": 1, "text": "a", "finish_reason": null}]}),
    );
}

#[test]
fn operator_bodies_read_back_unchanged() {
    let peers = json!({"peers": [
        {"peer": "p1", "alive": true, "connected": true, "reachable": true, "direct": false, "last_seen_ms": 9,
         "score": null, "distrusted": false, "reputation": null, "models": null,
         "price_per_hour": null, "queue_depth": null,
         "running_jobs": null, "queue_capacity": null, "hardware": null, "records_seq": null},
        {"peer": "p2", "alive": false, "connected": false, "reachable": false, "direct": false, "last_seen_ms": 1,
         "score": 0.5, "distrusted": true,
         "reputation": {"score": 0.25, "slowdown": 2.0, "attempts": 3, "failed": 1,
                        "excluded_until_ms": null},
         "models": ["m"], "price_per_hour": 0.25, "queue_depth": 1,
         "running_jobs": 0, "queue_capacity": 8,
         "hardware": {"name": "cpu", "backend": "cpu", "compute_units": 2}, "records_seq": 40},
    ]});
    let typed: PeersResponse = serde_json::from_value(peers.clone()).unwrap();
    same(&typed, &peers);
    let status = json!({
        "peer_id": "p", "uptime_s": 1.5,
        "hardware": {"name": "cpu", "backend": "cpu", "compute_units": 2},
        "price_per_hour": 0.0, "models": ["m"],
        "queue": {"waiting": 0, "running": 1, "capacity": 8},
        "peers": {"alive": 2, "known": 3},
        "network_models": [{"id": "m", "hosts": 2}],
        "records": 10,
        "predictor": {"generation": 1, "trained_on_records": 10},
    });
    let typed: StatusResponse = serde_json::from_value(status.clone()).unwrap();
    same(&typed, &status);
    let models = json!({"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
        "owned_by": "metainf", "metainf": {"hosts": 1, "parameters": 135, "quantization": "Q8_0",
        "context_length": 2048}}]});
    let typed: ModelList = serde_json::from_value(models.clone()).unwrap();
    same(&typed, &models);
    let health = json!({"status": "ok", "peer_id": "p", "models": []});
    let typed: HealthResponse = serde_json::from_value(health.clone()).unwrap();
    same(&typed, &health);
}
