//! Hosting: job calls from peers, run on this node's engine, their text streamed back.

use libp2p::PeerId;
use metainf_protocol::JobId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use super::JobService;
use super::admission::Refusal;
use super::executor::{Delta, ExecError};
use crate::net::{Client, DeltaAck, InboundJob, JobDelta, JobReply};

impl JobService {
    /// Answers job calls from peers.
    pub(super) async fn serve_peers(
        self,
        mut rx: mpsc::Receiver<InboundJob>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        loop {
            let job = tokio::select! {
                () = shutdown.cancelled() => break,
                job = rx.recv() => match job { Some(j) => j, None => break },
            };
            let (queued, running) = self.0.executor.load();
            let ticket = match self.0.admission.admit(
                job.peer,
                job.call.request.prompts.len(),
                queued == 0 && running == 0,
            ) {
                Ok(ticket) => ticket,
                Err(refusal) => {
                    let reply = match refusal {
                        Refusal::Never(reason) => JobReply::Rejected(reason),
                        Refusal::Busy => JobReply::Busy { retry_after_s: 1 },
                    };
                    self.0.metrics.peer_jobs_refused.inc();
                    tasks.spawn(job.respond(reply));
                    continue;
                }
            };
            // A peer's job stops with this node: its gateway retries it elsewhere.
            let service = self.clone();
            let cancel = shutdown.child_token();
            tasks.spawn(async move {
                service.serve_peer(job, cancel).await;
                drop(ticket);
            });
        }
    }

    pub(super) async fn serve_peer(self, job: InboundJob, cancel: CancellationToken) {
        let peer = job.peer;
        let request = job.call.request.clone();
        let method = job.call.method.clone();
        if let Err(e) = request.validate().and_then(|()| method.validate()) {
            job.respond(JobReply::Rejected(e.to_string())).await;
            return;
        }
        let (deltas, streamer) = if request.stream {
            let (tx, rx) = mpsc::channel::<Delta>(64);
            let streamer = tokio::spawn(stream_to_peer(
                self.0.net.clone(),
                peer,
                request.id,
                rx,
                cancel.clone(),
            ));
            (Some(tx), Some(streamer))
        } else {
            (None, None)
        };
        info!(job = %request.id, from = %peer, method = %method.short_name(), "running a job for a peer");
        let result = self.run_local(request, method, deltas, Some(cancel)).await;
        if let Some(s) = streamer {
            // Every delta is delivered before the result.
            let _ = s.await;
        }
        let reply = match result {
            Ok(r) => JobReply::Done(Box::new(r)),
            Err(ExecError::Busy { retry_after_s }) => JobReply::Busy { retry_after_s },
            Err(ExecError::Rejected(r)) => JobReply::Rejected(r),
            Err(ExecError::Failed(r)) => JobReply::Failed(r),
            Err(ExecError::Cancelled) => JobReply::Failed("cancelled".into()),
        };
        job.respond(reply).await;
    }
}

/// Sends a local job's deltas to the peer that forwarded it, one at a time, merging what
/// piles up meanwhile; stops (and cancels the job) when the peer no longer listens.
pub(super) async fn stream_to_peer(
    net: Option<Client>,
    peer: PeerId,
    job: JobId,
    mut rx: mpsc::Receiver<Delta>,
    cancel: CancellationToken,
) {
    let Some(net) = net else { return };
    while let Some((prompt, mut text)) = rx.recv().await {
        let mut next = None;
        while let Ok((p, t)) = rx.try_recv() {
            if p == prompt {
                text.push_str(&t);
            } else {
                next = Some((p, t));
                break;
            }
        }
        for (prompt, text) in std::iter::once((prompt, text)).chain(next) {
            match net.send_delta(peer, JobDelta { job, prompt, text }).await {
                Ok(DeltaAck::Ok) => {}
                Ok(DeltaAck::Stop) | Err(_) => {
                    cancel.cancel();
                    // Drain, so the engine never blocks on a full channel.
                    while rx.recv().await.is_some() {}
                    return;
                }
            }
        }
    }
}
