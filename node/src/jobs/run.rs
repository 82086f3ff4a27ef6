//! Running a routed job: here on the engine or on the chosen host over `/metainf/job/1`, with
//! retries elsewhere when a host is busy, fails or dies, streamed text deduplicated across
//! retries, and a signed record of every finished job.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use metainf_protocol::{JobRequest, JobResult, MethodConfig, PerfRecord, RecordSource, ServedLoad};
use metainf_scheduler::select::Choice;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::executor::{self, Delta, ExecError};
use super::learn::DecisionLog;
use super::reputation::{Failure, Reputation};
use super::state::{JobEntry, JobState};
use super::{JobError, JobService, Routed};
use crate::clock::now_ms;
use crate::net::{JobCall, JobDelta, JobReply};
use crate::signer::ENGINE_NAME;

/// A finished job.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What the host returned.
    pub result: JobResult,
    /// The choice that ran it.
    pub choice: Choice,
    /// Hosts tried before.
    pub retries: u32,
    /// Seconds from acceptance to the result.
    pub latency_s: f64,
    /// Seconds the successful attempt took on this node's clock, when it ran on a peer.
    pub observed_s: Option<f64>,
}

impl JobService {
    /// Persists an accepted job as queued, and counts it against its host until it ends. A job
    /// that cannot be persisted is refused ([`JobError::Unpersisted`]) rather than run
    /// unrecorded: the client learns at once, and nothing is counted.
    pub async fn accept(&self, routed: &Routed) -> Result<(), JobError> {
        self.try_save(JobEntry {
            request: routed.request.clone(),
            state: JobState::Queued,
            updated_at_ms: now_ms(),
            route: Some(routed.decision.chosen.clone()),
            attempts: 0,
            policy: Some(routed.policy),
        })
        .await
        .map_err(JobError::Unpersisted)?;
        if let Some(&peer) = routed.hosts.get(routed.decision.chosen.host) {
            self.count_pending(peer, true, &routed.request);
        }
        Ok(())
    }

    /// Runs a routed (and accepted) job to its end, retrying on other hosts when one is busy,
    /// fails or dies. Text deltas of every prompt go to `deltas`, each character once.
    pub async fn execute(
        &self,
        routed: Routed,
        deltas: Option<mpsc::Sender<Delta>>,
    ) -> Result<Outcome, JobError> {
        let accepted = Instant::now();
        let request = routed.request.clone();
        let id = request.id;
        let sent = Arc::new(std::sync::Mutex::new(vec![0usize; request.prompts.len()]));
        let mut tried: HashSet<PeerId> = HashSet::new();
        let mut routed = routed;
        let mut attempts = 0u32;
        let mut all_busy = true;
        let mut retry_after = 60u32;
        let mut last_error;
        // The host this job is counted against (`accept` counted the first choice).
        let mut counted = routed.hosts.get(routed.decision.chosen.host).copied();
        let result = loop {
            let choice = routed.decision.chosen.clone();
            let Some(&peer) = routed.hosts.get(choice.host) else {
                break Err(JobError::Internal(
                    "the decision names an unknown host".into(),
                ));
            };
            if counted != Some(peer) {
                if let Some(old) = counted.replace(peer) {
                    self.count_pending(old, false, &request);
                }
                self.count_pending(peer, true, &request);
            }
            attempts += 1;
            tried.insert(peer);
            self.save(JobEntry {
                request: request.clone(),
                state: JobState::Running { host: peer },
                updated_at_ms: now_ms(),
                route: Some(choice.clone()),
                attempts,
                policy: Some(routed.policy),
            })
            .await;
            let attempt_deltas = deltas
                .as_ref()
                .map(|d| dedup_deltas(d.clone(), Arc::clone(&sent)));
            let attempt_started = Instant::now();
            // The prediction routing used was already scaled by the host's factor: judged
            // against the unscaled one, or the correction would chase its own tail.
            let applied = self.0.reputation.routing_factor(&peer);
            let local = peer == self.0.peer_id;
            let outcome = if local {
                self.run_local(request.clone(), choice.method.clone(), attempt_deltas, None)
                    .await
            } else {
                self.run_remote(peer, &request, &choice, attempt_deltas)
                    .await
            };
            // Every host is judged by what this node saw, on its own clock, this node's own
            // engine too (so that routing compares like with like); only peers can fail.
            let observed_s = attempt_started.elapsed().as_secs_f64();
            let saved = match &outcome {
                Ok(_) => Some(self.0.reputation.succeeded(
                    peer,
                    observed_s,
                    (choice.wait_s + choice.runtime_s) / applied,
                )),
                Err(ExecError::Failed(_)) if !local => {
                    Some(self.0.reputation.failed(peer, Failure::Error))
                }
                Err(_) => None,
            };
            if let Some(bytes) = saved {
                let store = self.0.store.clone();
                tokio::spawn(async move { Reputation::save(&store, bytes).await });
            }
            let observed = (!local).then_some(observed_s);
            match outcome {
                Ok(result) => {
                    break Ok(Outcome {
                        result,
                        choice,
                        retries: attempts - 1,
                        latency_s: 0.0,
                        observed_s: observed,
                    });
                }
                Err(ExecError::Rejected(reason)) => break Err(JobError::Rejected(reason)),
                Err(ExecError::Cancelled) => break Err(JobError::Cancelled),
                Err(ExecError::Busy { retry_after_s }) => {
                    retry_after = retry_after.min(retry_after_s.max(1));
                    last_error = format!("host {peer} is busy");
                }
                Err(ExecError::Failed(reason)) => {
                    all_busy = false;
                    warn!(job = %id, host = %peer, %reason, "attempt failed; trying another host");
                    last_error = format!("host {peer}: {reason}");
                }
            }
            self.0.metrics.retries.inc();
            if attempts >= self.0.config.max_attempts.max(1)
                || deltas.as_ref().is_some_and(|d| d.is_closed())
            {
                break Err(exhausted(all_busy, retry_after, attempts, &last_error));
            }
            routed = match self
                .route_excluding(request.clone(), routed.policy, &tried)
                .await
            {
                Ok(r) => r,
                Err(JobError::NoHost(_)) => {
                    break Err(exhausted(all_busy, retry_after, attempts, &last_error));
                }
                Err(e) => break Err(e),
            };
        };
        if let Some(peer) = counted {
            self.count_pending(peer, false, &request);
        }
        let latency_s = accepted.elapsed().as_secs_f64();
        let choice = match &result {
            Ok(o) => o.choice.clone(),
            Err(_) => routed.decision.chosen.clone(),
        };
        let mut log = DecisionLog {
            job: id.to_string(),
            at_ms: request.submitted_at_ms,
            host: choice.host_name.clone(),
            method: choice.method.short_name(),
            predicted_runtime_s: choice.runtime_s,
            predicted_wait_s: choice.wait_s,
            predicted_cost: choice.cost,
            measured_runtime_s: None,
            abs_log_error: None,
            predictor_generation: routed.generation,
            feasible: routed.decision.feasible,
            over_budget: routed.decision.over_budget,
            retries: attempts.saturating_sub(1),
            error: None,
        };
        let state = match &result {
            Ok(o) => {
                // A peer's job is measured by this node too, never by the peer's word alone:
                // the longer of the two.
                let measured = o
                    .result
                    .metrics
                    .wall_time_s
                    .max(o.observed_s.unwrap_or(0.0));
                let err = (measured.max(1e-6) / o.choice.runtime_s.max(1e-6))
                    .ln()
                    .abs();
                self.0.metrics.abs_log_error.observe(err);
                log.measured_runtime_s = Some(measured);
                log.abs_log_error = Some(err);
                JobState::Done(Box::new(o.result.clone()))
            }
            Err(e) => {
                log.error = Some(e.to_string());
                JobState::Failed {
                    reason: e.to_string(),
                }
            }
        };
        self.0.metrics.job_finished(result.is_ok(), latency_s);
        self.0.decisions.push(log);
        self.save(JobEntry {
            request: request.clone(),
            state,
            updated_at_ms: now_ms(),
            route: Some(choice),
            attempts,
            policy: Some(routed.policy),
        })
        .await;
        result.map(|o| Outcome { latency_s, ..o })
    }

    /// Runs a job on this node's engine and makes a signed record of it.
    pub(super) async fn run_local(
        &self,
        request: JobRequest,
        method: MethodConfig,
        deltas: Option<mpsc::Sender<Delta>>,
        cancel: Option<CancellationToken>,
    ) -> Result<JobResult, ExecError> {
        let id = request.id;
        let exec = self
            .0
            .executor
            .run(request, method.clone(), deltas, cancel.unwrap_or_default())
            .await?;
        let metrics = metainf_profiler::bench::metrics(&exec.report)
            .map_err(|e| ExecError::Failed(e.to_string()))?;
        let record = match self.record(&exec, &metrics).await {
            Ok(id) => Some(id),
            Err(e) => {
                // The client still gets its result; the tensor misses one measurement.
                warn!(job = %id, error = %e, "cannot record the job's measurement");
                None
            }
        };
        Ok(JobResult {
            id,
            host: self.0.peer_id,
            method,
            completions: exec.completions,
            metrics,
            record,
        })
    }

    pub(super) async fn record(
        &self,
        exec: &executor::Execution,
        metrics: &metainf_protocol::Metrics,
    ) -> Result<metainf_protocol::RecordId, String> {
        let cached = exec.co_load.cached_prompt_tokens.min(metrics.prompt_tokens);
        self.0.metrics.prompt_tokens.inc_by(metrics.prompt_tokens);
        self.0.metrics.cached_prompt_tokens.inc_by(cached);
        let record = PerfRecord {
            origin: self.0.peer_id,
            seq: 0,
            measured_at_ms: now_ms(),
            hardware: self.0.profile.clone(),
            model: exec.model.clone(),
            workload: exec.workload.clone(),
            method: exec.method.clone(),
            metrics: metrics.clone(),
            source: RecordSource::Served(ServedLoad {
                mean_running_seqs: exec.co_load.mean_running,
                mean_foreign_seqs: exec.co_load.mean_foreign.min(exec.co_load.mean_running),
                cached_prompt_tokens: cached,
            }),
            engine: ENGINE_NAME.to_owned(),
        };
        let id = self
            .0
            .signer
            .publish(record, self.0.net.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        self.0.metrics.records_made.inc();
        Ok(id)
    }

    pub(super) async fn run_remote(
        &self,
        peer: PeerId,
        request: &JobRequest,
        choice: &Choice,
        deltas: Option<mpsc::Sender<Delta>>,
    ) -> Result<JobResult, ExecError> {
        let Some(net) = &self.0.net else {
            return Err(ExecError::Failed("the network is off".into()));
        };
        // Every forwarded job streams, even when its client does not: the deltas are the host's
        // line back to this node, so a job this node gives up on (a timeout, a client gone) is
        // told to stop at its next delta instead of running to its end for nobody.
        let (sink, mut rx) = mpsc::channel::<JobDelta>(16);
        tokio::spawn(async move {
            while let Some(delta) = rx.recv().await {
                if let Some(d) = &deltas
                    && d.send((delta.prompt, delta.text)).await.is_err()
                {
                    break;
                }
            }
        });
        let mut forwarded = request.clone();
        forwarded.stream = true;
        // The host runs the chosen method whatever the objective; a host of an earlier version
        // knows no `interactive`.
        if forwarded.objective == metainf_protocol::Objective::Interactive {
            forwarded.objective = metainf_protocol::Objective::Runtime;
        }
        let call = JobCall {
            request: forwarded,
            method: choice.method.clone(),
        };
        self.0.metrics.forwarded.inc();
        let timeout = Duration::from_secs(self.0.config.job_timeout_s.max(1));
        let reply = match tokio::time::timeout(timeout, net.call_job(peer, call, Some(sink))).await
        {
            Ok(reply) => reply.map_err(|e| ExecError::Failed(e.to_string()))?,
            Err(_) => {
                let _ = net.abandon_job(peer, request.id).await;
                return Err(ExecError::Failed(format!(
                    "no answer within {} s",
                    timeout.as_secs()
                )));
            }
        };
        match reply {
            JobReply::Done(result) => {
                if result.id != request.id
                    || result.host != peer
                    || result.completions.len() != request.prompts.len()
                {
                    return Err(ExecError::Failed(
                        "the host answered with a result that does not match the job".into(),
                    ));
                }
                Ok(*result)
            }
            JobReply::Busy { retry_after_s } => Err(ExecError::Busy {
                retry_after_s: retry_after_s.clamp(1, 60),
            }),
            JobReply::Rejected(reason) => Err(ExecError::Rejected(reason)),
            JobReply::Failed(reason) => Err(ExecError::Failed(reason)),
        }
    }
}

/// Forwards deltas to `out`, dropping the text of each prompt that an earlier attempt of the
/// job already sent (a retry regenerates it from the start).
pub(super) fn dedup_deltas(
    out: mpsc::Sender<Delta>,
    sent: Arc<std::sync::Mutex<Vec<usize>>>,
) -> mpsc::Sender<Delta> {
    let (tx, mut rx) = mpsc::channel::<Delta>(64);
    tokio::spawn(async move {
        // One counter per prompt of the job; a delta for a prompt the job does not have (a
        // hostile or broken host) is dropped, never allocated for.
        let prompts = sent.lock().map(|s| s.len()).unwrap_or(0);
        let mut seen: Vec<usize> = vec![0; prompts];
        while let Some((prompt, text)) = rx.recv().await {
            let i = prompt as usize;
            if i >= seen.len() {
                continue;
            }
            let start = seen[i];
            seen[i] += text.len();
            let already = sent
                .lock()
                .map(|s| s.get(i).copied().unwrap_or(0))
                .unwrap_or(0);
            let skip = already.saturating_sub(start).min(text.len());
            if skip == text.len() || !text.is_char_boundary(skip) {
                continue;
            }
            let fresh = text[skip..].to_owned();
            if let Ok(mut s) = sent.lock()
                && let Some(v) = s.get_mut(i)
            {
                *v = seen[i];
            }
            if out.send((prompt, fresh)).await.is_err() {
                break;
            }
        }
    });
    tx
}

/// The error of a job no host could run: busy everywhere (429) or failing (502).
pub(super) fn exhausted(
    all_busy: bool,
    retry_after_s: u32,
    attempts: u32,
    last_error: &str,
) -> JobError {
    if all_busy {
        JobError::Overloaded {
            retry_after_s: retry_after_s.clamp(1, 60),
        }
    } else {
        JobError::Failed(format!(
            "the job failed on {attempts} host(s); last: {last_error}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(rx: &mut mpsc::Receiver<Delta>) -> Delta {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_retry_streams_only_the_text_the_client_has_not_seen() {
        let (out, mut rx) = mpsc::channel(16);
        let sent = Arc::new(std::sync::Mutex::new(vec![0usize; 2]));
        let first = dedup_deltas(out.clone(), Arc::clone(&sent));
        first.send((0, "Hello".into())).await.unwrap();
        first.send((1, "A".into())).await.unwrap();
        assert_eq!(next(&mut rx).await, (0, "Hello".into()));
        assert_eq!(next(&mut rx).await, (1, "A".into()));
        drop(first);
        // The retry regenerates from the start, in other pieces.
        let second = dedup_deltas(out.clone(), Arc::clone(&sent));
        for d in [(0, "Hel"), (0, "lo wor"), (0, "ld"), (1, "AB")] {
            second.send((d.0, d.1.into())).await.unwrap();
        }
        assert_eq!(next(&mut rx).await, (0, " wor".into()));
        assert_eq!(next(&mut rx).await, (0, "ld".into()));
        assert_eq!(next(&mut rx).await, (1, "B".into()));
        // A host naming a prompt the job does not have is ignored (no 32 GiB counter vector).
        second.send((u32::MAX, "evil".into())).await.unwrap();
        second.send((0, "!".into())).await.unwrap();
        assert_eq!(next(&mut rx).await, (0, "!".into()));
        drop(second);
        drop(out);
        assert!(rx.recv().await.is_none(), "nothing else was sent");
    }
}
