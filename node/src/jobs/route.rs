//! Routing: the workload a job describes, the hosts that serve its model (this node and live
//! peers, from their heartbeats, with the jobs this node already sent them), and the
//! scheduler's choice of host and method within the budget.

use std::collections::HashSet;
use std::time::Instant;

use libp2p::PeerId;
use metainf_protocol::{Arrival, HostLoad, JobId, JobRequest, ModelDescriptor, WorkloadDescriptor};
use metainf_scheduler::SchedulerError;
use metainf_scheduler::select::{Decision, Host, Query, SelectError};
use tracing::warn;

use super::learn::Current;
use super::{JobError, JobService};
use crate::clock::now_ms;

/// A job routed and ready to run.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The job (id assigned).
    pub request: JobRequest,
    /// The scheduler's decision.
    pub decision: Decision,
    /// Peer of each host index of the decision.
    pub hosts: Vec<PeerId>,
    /// Predictor generation that decided (0 = the prior).
    pub generation: u64,
    /// Seconds spent routing.
    pub routing_s: f64,
}

/// A candidate host with the peer that runs it.
pub(super) struct Candidate {
    peer: PeerId,
    host: Host,
}

impl JobService {
    pub(super) async fn live_peers(&self) -> Vec<crate::net::PeerStatus> {
        match &self.0.net {
            Some(net) => net
                .peers()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.alive && p.connected && p.peer != self.0.peer_id)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Hosts that serve `model`, and its descriptor.
    pub(super) async fn candidates(
        &self,
        model: &str,
    ) -> (Option<ModelDescriptor>, Vec<Candidate>) {
        let mut descriptor = None;
        let mut out = Vec::new();
        if let Some(m) = self.0.executor.model(model) {
            descriptor = Some(m.descriptor.clone());
            let (queued, running) = self.0.executor.load();
            let mine = self.pending_on(&self.0.peer_id);
            out.push(Candidate {
                peer: self.0.peer_id,
                host: Host {
                    name: self.0.peer_id.to_string(),
                    hardware: self.0.profile.clone(),
                    price_per_hour: self.0.price_per_hour,
                    queue_depth: queued.max(mine.saturating_sub(running)),
                    running_jobs: running,
                    power_w: None,
                    load: self
                        .0
                        .executor
                        .host_load()
                        .map(|l| self.with_pending(l, &self.0.peer_id)),
                    slowdown: 1.0,
                },
            });
        }
        let now = now_ms();
        for p in self.live_peers().await {
            let seen = self.0.reputation.get(&p.peer);
            // Excluded for failing (or for a failed check): not a candidate until it ends.
            if seen.as_ref().is_some_and(|r| r.excluded(now)) {
                continue;
            }
            let Some(h) = p.heartbeat else { continue };
            let Some(m) = h.models.iter().find(|m| m.name == model) else {
                continue;
            };
            let Some(profile) = h.profile.clone() else {
                continue;
            };
            descriptor.get_or_insert_with(|| m.clone());
            out.push(Candidate {
                peer: p.peer,
                host: Host {
                    name: p.peer.to_string(),
                    hardware: profile,
                    price_per_hour: h.price_per_hour,
                    queue_depth: h
                        .queue_depth
                        .max(self.pending_on(&p.peer).saturating_sub(h.running_jobs)),
                    running_jobs: h.running_jobs,
                    power_w: None,
                    load: h.load.map(|l| self.with_pending(l, &p.peer)),
                    // What it claims, corrected by what this node saw it deliver.
                    slowdown: seen.map_or(1.0, |r| r.slowdown()),
                },
            });
        }
        (descriptor, out)
    }

    /// Gives a new job its id and acceptance time.
    pub fn new_request(mut request: JobRequest) -> JobRequest {
        request.id = JobId(rand::random());
        request.submitted_at_ms = now_ms();
        request
    }

    /// Routes a job: validates it, describes its workload, and asks the scheduler.
    pub async fn route(&self, request: JobRequest) -> Result<Routed, JobError> {
        self.route_excluding(request, &HashSet::new()).await
    }

    pub(super) async fn route_excluding(
        &self,
        request: JobRequest,
        exclude: &HashSet<PeerId>,
    ) -> Result<Routed, JobError> {
        let started = Instant::now();
        request
            .validate()
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        let (descriptor, mut candidates) = self.candidates(&request.model).await;
        let Some(model) = descriptor else {
            return Err(JobError::UnknownModel {
                model: request.model.clone(),
                served: self
                    .models()
                    .await
                    .into_iter()
                    .map(|(m, _)| m.name)
                    .collect(),
            });
        };
        candidates.retain(|c| !exclude.contains(&c.peer));
        if let Some(pin) = request.pin_host {
            candidates.retain(|c| c.peer == pin);
            if candidates.is_empty() {
                let excluded = self.0.reputation.get(&pin).filter(|r| r.excluded(now_ms()));
                return Err(JobError::NoHost(match excluded {
                    Some(r) => format!(
                        "host {pin} is excluded from routing for another {} s: {} of its attempts failed in a row",
                        r.excluded_until_ms.saturating_sub(now_ms()) / 1000,
                        r.failures_in_a_row
                    ),
                    None => format!(
                        "host {pin} is not alive or does not serve {:?}",
                        request.model
                    ),
                }));
            }
        }
        if candidates.is_empty() {
            return Err(JobError::NoHost(format!(
                "no live host serves {:?} now",
                request.model
            )));
        }
        let workload = match self.0.executor.model(&request.model) {
            Some(m) => m
                .describe(&request)
                .map_err(|e| JobError::Invalid(e.to_string()))?,
            None => approximate_workload(&request),
        };
        let methods = match &request.pin_method {
            // Refused here rather than by a host, with the reason.
            Some(m) => {
                metainf_profiler::engine::MethodSettings::from_method(m)
                    .map_err(|e| JobError::Invalid(format!("method {m}: {e}")))?;
                vec![m.clone()]
            }
            None => self.0.methods.clone(),
        };
        let hosts: Vec<Host> = candidates.iter().map(|c| c.host.clone()).collect();
        let trained = self.0.learner.current();
        let generation = trained.as_ref().map_or(0, |t| t.generation);
        let query = Query {
            workload: &workload,
            model: &model,
            hosts: &hosts,
            methods: &methods,
            budget: request.budget,
            objective: request.objective,
            explore: self.0.config.explore,
        };
        let decision = match metainf_scheduler::select(&Current(trained), &query) {
            Ok(d) => d,
            // A predictor that cannot score this job (say, a model it never saw) falls back
            // to the prior rather than refusing the job.
            Err(SchedulerError::Select(e @ SelectError::OverBudget { .. })) => {
                return Err(over_budget(e));
            }
            Err(e) => {
                warn!(error = %e, "the predictor failed; routing with the prior");
                metainf_scheduler::select(&Current(None), &query).map_err(|e| match e {
                    SchedulerError::Select(e @ SelectError::OverBudget { .. }) => over_budget(e),
                    other => JobError::Internal(other.to_string()),
                })?
            }
        };
        let routing_s = started.elapsed().as_secs_f64();
        self.0.metrics.routing_seconds.observe(routing_s);
        Ok(Routed {
            request,
            hosts: candidates.iter().map(|c| c.peer).collect(),
            decision,
            generation,
            routing_s,
        })
    }

    /// A host's announced load with the sequences this node sent it since: jobs accepted
    /// count at once, before the engine (or a heartbeat) shows them.
    fn with_pending(&self, mut load: HostLoad, peer: &PeerId) -> HostLoad {
        let pending = self.pending_seqs_on(peer);
        load.waiting_seqs = load
            .waiting_seqs
            .max(pending.saturating_sub(load.running_seqs));
        load
    }

    /// Jobs this node sent to `peer` that have not ended.
    pub(super) fn pending_on(&self, peer: &PeerId) -> u32 {
        self.pending_counts(peer).0
    }

    /// Their sequences.
    pub(super) fn pending_seqs_on(&self, peer: &PeerId) -> u32 {
        self.pending_counts(peer).1
    }

    fn pending_counts(&self, peer: &PeerId) -> (u32, u32) {
        self.0
            .pending
            .lock()
            .map(|p| p.get(peer).copied().unwrap_or((0, 0)))
            .unwrap_or((0, 0))
    }

    /// Counts a job of `seqs` sequences for (`up`) or against `peer`.
    pub(super) fn count_pending(&self, peer: PeerId, up: bool, seqs: usize) {
        let seqs = u32::try_from(seqs).unwrap_or(u32::MAX);
        if let Ok(mut p) = self.0.pending.lock() {
            let (jobs, s) = p.entry(peer).or_insert((0, 0));
            if up {
                *jobs = jobs.saturating_add(1);
                *s = s.saturating_add(seqs);
            } else {
                *jobs = jobs.saturating_sub(1);
                *s = s.saturating_sub(seqs);
            }
            if *jobs == 0 {
                p.remove(&peer);
            }
        }
    }
}

pub(super) fn over_budget(e: SelectError) -> JobError {
    let message = e.to_string();
    match e {
        SelectError::OverBudget { cheapest, .. } => JobError::OverBudget { message, cheapest },
        other => JobError::Internal(other.to_string()),
    }
}

/// A workload descriptor for a model this node cannot tokenize: about four bytes per token.
pub(super) fn approximate_workload(request: &JobRequest) -> WorkloadDescriptor {
    let prompts: Vec<Vec<u32>> = request
        .prompts
        .iter()
        .map(|p| {
            let text = match p {
                metainf_protocol::Prompt::Text(t) => t.clone(),
                metainf_protocol::Prompt::Chat(m) => metainf_profiler::tokenizer::chat_template(m),
            };
            text.as_bytes()
                .chunks(4)
                .map(|c| {
                    c.iter()
                        .fold(0u32, |a, b| a.wrapping_mul(257) ^ u32::from(*b))
                })
                .collect()
        })
        .collect();
    let max_new = vec![request.params.max_tokens; prompts.len()];
    WorkloadDescriptor::from_prompts(
        None,
        &prompts,
        &max_new,
        Arrival::AllAtOnce,
        request.params.temperature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_is_approximated_for_a_model_this_node_cannot_tokenize() {
        let request = JobRequest {
            id: JobId([1; 16]),
            model: "elsewhere".into(),
            prompts: vec![
                metainf_protocol::Prompt::Text("x".repeat(400)),
                metainf_protocol::Prompt::Text("x".repeat(400)),
            ],
            params: metainf_protocol::GenerationParams::default(),
            budget: None,
            objective: metainf_protocol::Objective::Runtime,
            pin_method: None,
            pin_host: None,
            stream: false,
            submitted_at_ms: 0,
        };
        let w = approximate_workload(&request);
        assert_eq!(w.requests, 2);
        assert_eq!(w.prompt_tokens.max, 100);
        assert!(
            w.prefix_sharing > 0.4,
            "identical prompts share their prefix"
        );
    }
}
