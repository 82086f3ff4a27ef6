//! Routing: the workload a job describes, the hosts that serve its model (this node and live
//! peers, from their heartbeats, with the jobs this node already sent them), and the
//! scheduler's choice of host and method within the budget.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use metainf_protocol::{
    Arrival, BlockHash, CacheSummary, Heartbeat, HostLoad, JobId, JobRequest, ModelDescriptor,
    WorkloadDescriptor, block_hashes,
};
use metainf_scheduler::SchedulerError;
use metainf_scheduler::select::{Decision, Host, Query, RuntimeModel, SelectError};

use super::policy::RoutingPolicy;
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
    /// The policy that chose the host (a retry routes by it too).
    pub policy: RoutingPolicy,
}

/// A candidate host with the peer that runs it.
pub(super) struct Candidate {
    peer: PeerId,
    host: Host,
    /// When the state it is judged by was sent (its heartbeat or state answer); `None` for
    /// this node, whose state is always current.
    state_at_ms: Option<u64>,
}

impl JobService {
    pub(super) async fn live_peers(&self) -> Vec<crate::net::PeerStatus> {
        match &self.0.net {
            Some(net) => net
                .peers()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.alive && p.reachable && p.peer != self.0.peer_id)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Hosts that serve `model`, and its descriptor; with the job's `prompts` (tokenized,
    /// where this node can), the tokens each host's prefix cache would serve of them.
    pub(super) async fn candidates(
        &self,
        model: &str,
        prefix: &mut PrefixHashes<'_>,
    ) -> (Option<ModelDescriptor>, Vec<Candidate>) {
        let mut descriptor = None;
        let mut out = Vec::new();
        if let Some(m) = self.0.executor.model(model) {
            let cached_tokens = self
                .0
                .executor
                .cache_summary(model)
                .map_or(0, |s| prefix.cached_tokens(&s));
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
                    // Its own jobs are measured as every host's are.
                    slowdown: self.0.reputation.routing_factor(&self.0.peer_id),
                    cached_tokens,
                },
                state_at_ms: None,
            });
        }
        let now = now_ms();
        for p in self.live_peers().await {
            // Excluded for failing (or for a failed check): not a candidate until it ends.
            if self
                .0
                .reputation
                .get(&p.peer)
                .is_some_and(|r| r.excluded(now))
            {
                continue;
            }
            let Some(h) = p.heartbeat else { continue };
            if let Some((m, candidate)) = self.peer_candidate(&h, model, prefix) {
                descriptor.get_or_insert(m);
                out.push(candidate);
            }
        }
        (descriptor, out)
    }

    /// A peer as a candidate for a job on `model`, judged by its heartbeat `h`.
    fn peer_candidate(
        &self,
        h: &Heartbeat,
        model: &str,
        prefix: &mut PrefixHashes<'_>,
    ) -> Option<(ModelDescriptor, Candidate)> {
        let m = h.models.iter().find(|m| m.name == model)?;
        let profile = h.profile.clone()?;
        let peer = h.peer;
        let host = Host {
            name: peer.to_string(),
            hardware: profile,
            price_per_hour: h.price_per_hour,
            queue_depth: h
                .queue_depth
                .max(self.pending_on(&peer).saturating_sub(h.running_jobs)),
            running_jobs: h.running_jobs,
            power_w: None,
            load: h.load.map(|l| self.with_pending(l, &peer)),
            // What it claims, corrected by what this node saw it deliver.
            slowdown: self.0.reputation.routing_factor(&peer),
            cached_tokens: h
                .cache
                .as_ref()
                .filter(|c| c.model == model)
                .map_or(0, |c| prefix.cached_tokens(c)),
        };
        Some((
            m.clone(),
            Candidate {
                peer,
                host,
                state_at_ms: Some(h.sent_at_ms),
            },
        ))
    }

    /// Asks the few best candidates of `decision` whose state is stale (older than the
    /// configured staleness, or older than this node's last job start or end there) for their
    /// state now (in parallel, each within [`STATE_QUERY_TIMEOUT`]), and updates them: a
    /// newer answer replaces what was held, one that no longer offers the model removes the
    /// candidate. Whether anything changed.
    async fn refresh_stale(
        &self,
        decision: &Decision,
        candidates: &mut Vec<Candidate>,
        model: &str,
        prefix: &mut PrefixHashes<'_>,
    ) -> bool {
        let Some(net) = &self.0.net else {
            return false;
        };
        let stale_before = now_ms().saturating_sub(self.0.config.state_stale_ms);
        let mut asked: Vec<usize> = Vec::new();
        for c in std::iter::once(&decision.chosen).chain(&decision.ranked) {
            if asked.len() >= STATE_QUERIES || asked.contains(&c.host) {
                continue;
            }
            let Some(candidate) = candidates.get(c.host) else {
                continue;
            };
            let changed_since = self.last_dispatch(&candidate.peer);
            if candidate
                .state_at_ms
                .is_some_and(|at| at < stale_before || at < changed_since)
            {
                asked.push(c.host);
            }
        }
        if asked.is_empty() {
            return false;
        }
        let answers = futures::future::join_all(asked.iter().map(|&i| {
            let peer = candidates[i].peer;
            async move {
                tokio::time::timeout(STATE_QUERY_TIMEOUT, net.query_state(peer))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        }))
        .await;
        self.0.metrics.state_queries.inc_by(asked.len() as u64);
        let mut changed = false;
        let mut gone = Vec::new();
        for (i, answer) in asked.into_iter().zip(answers) {
            let Some(h) = answer else { continue };
            if h.peer != candidates[i].peer
                || candidates[i]
                    .state_at_ms
                    .is_some_and(|at| h.sent_at_ms <= at)
            {
                continue;
            }
            match self.peer_candidate(&h, model, prefix) {
                Some((_, fresh)) => {
                    changed |= fresh.host != candidates[i].host;
                    candidates[i] = fresh;
                }
                None => gone.push(i),
            }
        }
        if !gone.is_empty() {
            gone.sort_unstable();
            for i in gone.into_iter().rev() {
                candidates.remove(i);
            }
            changed = true;
        }
        changed
    }

    /// When this node last started or ended a job on `peer` (Unix ms; 0 = never).
    fn last_dispatch(&self, peer: &PeerId) -> u64 {
        self.0
            .dispatched
            .lock()
            .ok()
            .and_then(|d| d.get(peer).copied())
            .unwrap_or(0)
    }

    /// Gives a new job its id and acceptance time.
    pub fn new_request(mut request: JobRequest) -> JobRequest {
        request.id = JobId(rand::random());
        request.submitted_at_ms = now_ms();
        request
    }

    /// Routes a job: validates it, describes its workload, and asks the scheduler, by
    /// `policy` (the node's default where `None`).
    pub async fn route(
        &self,
        request: JobRequest,
        policy: Option<RoutingPolicy>,
    ) -> Result<Routed, JobError> {
        let policy = policy.unwrap_or(self.0.config.routing);
        self.route_excluding(request, policy, &HashSet::new()).await
    }

    pub(super) async fn route_excluding(
        &self,
        request: JobRequest,
        policy: RoutingPolicy,
        exclude: &HashSet<PeerId>,
    ) -> Result<Routed, JobError> {
        let started = Instant::now();
        request
            .validate()
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        // Tokenized once, where this node serves the model: the workload and every host's
        // cached prefix come from the same tokens.
        let tokens = match self.0.executor.model(&request.model) {
            Some(m) => Some(
                m.tokenize(&request.prompts)
                    .map_err(|e| JobError::Invalid(e.to_string()))?,
            ),
            None => None,
        };
        let mut prefix = PrefixHashes::new(tokens.as_deref());
        let (descriptor, mut candidates) = self.candidates(&request.model, &mut prefix).await;
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
        let workload = match &tokens {
            Some(t) => super::executor::ServedModel::describe_tokens(t, &request),
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
        let trained = self.0.learner.current();
        let generation = trained.as_ref().map_or(0, |t| t.generation);
        let job = Job {
            workload: &workload,
            model: &model,
            methods: &methods,
            request: &request,
            policy,
            turn: match policy {
                RoutingPolicy::RoundRobin => self
                    .0
                    .round_robin
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                _ => 0,
            },
        };
        let mut decision = self.decide_on(&candidates, &job, trained.clone())?;
        // The best candidates' state is refreshed where stale, and the job decided again.
        if self
            .refresh_stale(&decision, &mut candidates, &request.model, &mut prefix)
            .await
        {
            if candidates.is_empty() {
                return Err(JobError::NoHost(format!(
                    "no live host serves {:?} now",
                    request.model
                )));
            }
            decision = self.decide_on(&candidates, &job, trained)?;
        }
        let routing_s = started.elapsed().as_secs_f64();
        self.0.metrics.routing_seconds.observe(routing_s);
        Ok(Routed {
            request,
            hosts: candidates.iter().map(|c| c.peer).collect(),
            decision,
            generation,
            routing_s,
            policy,
        })
    }

    /// A host's announced load with the sequences this node sent it since: jobs accepted
    /// count at once, before the engine (or a heartbeat) shows them.
    fn with_pending(&self, mut load: HostLoad, peer: &PeerId) -> HostLoad {
        let (_, pending, tokens) = self.pending_counts(peer);
        load.waiting_seqs = load
            .waiting_seqs
            .max(pending.saturating_sub(load.running_seqs));
        // What those jobs may generate, where the host does not count them yet.
        load.remaining_tokens = load.remaining_tokens.max(tokens);
        load
    }

    /// Jobs this node sent to `peer` that have not ended.
    pub(super) fn pending_on(&self, peer: &PeerId) -> u32 {
        self.pending_counts(peer).0
    }

    /// Jobs, sequences and tokens they may generate, that this node sent to `peer` and that
    /// have not ended.
    fn pending_counts(&self, peer: &PeerId) -> (u32, u32, u64) {
        self.0
            .pending
            .lock()
            .map(|p| p.get(peer).copied().unwrap_or((0, 0, 0)))
            .unwrap_or((0, 0, 0))
    }

    /// Counts `request` for (`up`) or against `peer`.
    pub(super) fn count_pending(&self, peer: PeerId, up: bool, request: &JobRequest) {
        let seqs = u32::try_from(request.prompts.len()).unwrap_or(u32::MAX);
        let tokens = u64::from(seqs).saturating_mul(u64::from(request.params.max_tokens));
        // A job's start and end change the host's load and cache: state sent before is stale.
        if let Ok(mut d) = self.0.dispatched.lock() {
            d.insert(peer, now_ms());
            if d.len() > MAX_DISPATCHED
                && let Some(oldest) = d.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p)
            {
                d.remove(&oldest);
            }
        }
        if let Ok(mut p) = self.0.pending.lock() {
            let (jobs, s, t) = p.entry(peer).or_insert((0, 0, 0));
            if up {
                *jobs = jobs.saturating_add(1);
                *s = s.saturating_add(seqs);
                *t = t.saturating_add(tokens);
            } else {
                *jobs = jobs.saturating_sub(1);
                *s = s.saturating_sub(seqs);
                *t = t.saturating_sub(tokens);
            }
            if *jobs == 0 {
                p.remove(&peer);
            }
        }
    }
}

/// Block sizes a job's prompts are hashed for.
const MAX_BLOCK_SIZES: usize = 2;
/// Hosts whose last job start or end this node remembers.
const MAX_DISPATCHED: usize = 4096;
/// Most candidates one decision asks for their state.
const STATE_QUERIES: usize = 3;
/// How long a decision waits for a state answer.
const STATE_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// A job's prompts as chain hashes of their blocks, per block size (computed once for each
/// block size the hosts use).
pub(super) struct PrefixHashes<'a> {
    prompts: Option<&'a [Vec<u32>]>,
    by_block_size: Vec<(u32, Vec<Vec<BlockHash>>)>,
}

impl<'a> PrefixHashes<'a> {
    fn new(prompts: Option<&'a [Vec<u32>]>) -> Self {
        Self {
            prompts,
            by_block_size: Vec::new(),
        }
    }

    /// Distinct prompt tokens `summary`'s host holds in its cache, over every prompt (a block
    /// several prompts share counts once). Hashed for at most [`MAX_BLOCK_SIZES`] block sizes:
    /// a host announcing yet another one is counted as holding nothing (each size costs a hash
    /// of every prompt token, and block sizes are the hosts' to claim).
    fn cached_tokens(&mut self, summary: &CacheSummary) -> u64 {
        let Some(prompts) = self.prompts else {
            return 0;
        };
        let bs = summary.block_size;
        let i = match self.by_block_size.iter().position(|(b, _)| *b == bs) {
            Some(i) => i,
            None if self.by_block_size.len() >= MAX_BLOCK_SIZES => return 0,
            None => {
                let hashes = prompts
                    .iter()
                    .map(|p| block_hashes(p, bs as usize))
                    .collect();
                self.by_block_size.push((bs, hashes));
                self.by_block_size.len() - 1
            }
        };
        let mut held: HashSet<&BlockHash> = HashSet::new();
        for prompt in &self.by_block_size[i].1 {
            held.extend(prompt.iter().take_while(|h| summary.contains(h)));
        }
        (held.len() as u64).saturating_mul(u64::from(bs))
    }
}

/// What a decision is about.
struct Job<'a> {
    workload: &'a WorkloadDescriptor,
    model: &'a ModelDescriptor,
    methods: &'a [metainf_protocol::MethodConfig],
    request: &'a JobRequest,
    policy: RoutingPolicy,
    /// Its number among the jobs round-robin routed (taken once, however often it is decided).
    turn: u64,
}

impl JobService {
    /// Decides `job` among `candidates` as they stand, with the trained predictor (or the
    /// prior, where it cannot score the job).
    fn decide_on(
        &self,
        candidates: &[Candidate],
        job: &Job<'_>,
        trained: Option<Arc<super::learn::Trained>>,
    ) -> Result<Decision, JobError> {
        let hosts: Vec<Host> = candidates.iter().map(|c| c.host.clone()).collect();
        let query = Query {
            workload: job.workload,
            model: job.model,
            hosts: &hosts,
            methods: job.methods,
            budget: job.request.budget,
            objective: job.request.objective,
            explore: self.0.config.explore,
        };
        let prompt_tokens =
            (job.workload.prompt_tokens.mean.max(0.0) * f64::from(job.workload.requests)) as u64;
        let turn = job.turn;
        let decide =
            |model: &dyn RuntimeModel| decide(model, &query, job.policy, prompt_tokens, turn);
        match decide(&Current(trained)) {
            Ok(d) => Ok(d),
            // A predictor that cannot score this job (say, a model it never saw) falls back
            // to the prior rather than refusing the job.
            Err(SchedulerError::Select(e @ SelectError::OverBudget { .. })) => Err(over_budget(e)),
            Err(e) => {
                warn!(error = %e, "the predictor failed; routing with the prior");
                decide(&Current(None)).map_err(|e| match e {
                    SchedulerError::Select(e @ SelectError::OverBudget { .. }) => over_budget(e),
                    other => JobError::Internal(other.to_string()),
                })
            }
        }
    }
}

/// The decision of `policy`: the scheduler's over every pair for `metainf`; for a baseline,
/// the first host in its order that can run the job within the budget, with the method the
/// predictor scores best there (so that only the choice of host differs between policies).
fn decide(
    model: &dyn RuntimeModel,
    query: &Query<'_>,
    policy: RoutingPolicy,
    prompt_tokens: u64,
    turn: u64,
) -> metainf_scheduler::Result<Decision> {
    let Some(order) = super::policy::order(policy, query.hosts, prompt_tokens, turn) else {
        return metainf_scheduler::select(model, query);
    };
    for i in order {
        let one = Query {
            hosts: &query.hosts[i..=i],
            ..query.clone()
        };
        if let Ok(mut d) = metainf_scheduler::select(model, &one) {
            d.chosen.host = i;
            for c in &mut d.ranked {
                c.host = i;
            }
            return Ok(d);
        }
    }
    // No host can: the scheduler's own answer over them all says why (say, the cheapest).
    metainf_scheduler::select(model, query)
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
                metainf_protocol::Prompt::Chat(m) => metainf_profiler::tokenizer::chatml(m),
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
