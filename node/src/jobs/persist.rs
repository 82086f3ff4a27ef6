//! Job state on disk: saved at acceptance, start and end; pruned to `keep_jobs`; pending jobs
//! of a previous run recovered at start.

use std::time::Duration;

use metainf_protocol::JobId;
use tracing::{info, warn};

use super::JobService;
use super::state::JobStore as _;
use super::state::{JobEntry, JobState};
use crate::clock::now_ms;

impl JobService {
    /// Persists a job's state (a synced write, off the async runtime); a failure is logged.
    pub(super) async fn save(&self, entry: JobEntry) {
        let id = entry.request.id;
        if let Err(e) = self.try_save(entry).await {
            warn!(job = %id, error = %e, "cannot persist the job's state");
        }
    }

    /// Persists a job's state (a synced write, off the async runtime).
    pub(super) async fn try_save(&self, entry: JobEntry) -> Result<(), String> {
        let store = self.0.store.clone();
        match tokio::task::spawn_blocking(move || store.put_job(&entry)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Forgets the oldest finished jobs beyond `keep_jobs`.
    pub(super) fn prune_jobs(&self) {
        let Ok(jobs) = self.0.store.jobs() else {
            return;
        };
        let mut finished: Vec<(u64, JobId)> = jobs
            .iter()
            .filter(|j| matches!(j.state, JobState::Done(_) | JobState::Failed { .. }))
            .map(|j| (j.updated_at_ms, j.request.id))
            .collect();
        if finished.len() <= self.0.config.keep_jobs {
            return;
        }
        finished.sort_unstable();
        let drop: Vec<JobId> = finished[..finished.len() - self.0.config.keep_jobs]
            .iter()
            .map(|(_, id)| *id)
            .collect();
        match self.0.store.delete_jobs(&drop) {
            Ok(()) => info!(forgotten = drop.len(), "forgot the oldest finished jobs"),
            Err(e) => warn!(error = %e, "cannot forget old jobs"),
        }
    }

    /// Jobs a previous run left pending: batch jobs are run again; streaming ones, whose
    /// client has gone with the old process, are failed explicitly.
    pub(super) async fn recover(&self) {
        let jobs = match self.0.store.jobs() {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "cannot read the persisted jobs");
                return;
            }
        };
        for entry in jobs {
            if !matches!(entry.state, JobState::Queued | JobState::Running { .. }) {
                continue;
            }
            let id = entry.request.id;
            if entry.request.stream {
                info!(job = %id, "failing a streaming job left pending by a restart");
                self.save(JobEntry {
                    state: JobState::Failed {
                        reason: "the node restarted while the job ran; its streaming client \
                                 was disconnected"
                            .into(),
                    },
                    updated_at_ms: now_ms(),
                    ..entry
                })
                .await;
                continue;
            }
            info!(job = %id, "running again a job left pending by a restart");
            let service = self.clone();
            self.spawn(async move {
                // Peers announce themselves within a heartbeat or two.
                tokio::time::sleep(Duration::from_secs(2)).await;
                // By the policy it was routed by before (the node's default for entries
                // written before jobs kept theirs).
                match service.route(entry.request.clone(), entry.policy).await {
                    Ok(routed) => match service.accept(&routed).await {
                        Ok(()) => {
                            let _ = service.execute(routed, None).await;
                        }
                        Err(e) => warn!(job = %id, error = %e, "cannot run again a pending job"),
                    },
                    Err(e) => {
                        service
                            .save(JobEntry {
                                state: JobState::Failed {
                                    reason: format!("after a restart: {e}"),
                                },
                                updated_at_ms: now_ms(),
                                ..entry
                            })
                            .await
                    }
                }
            });
        }
    }
}
