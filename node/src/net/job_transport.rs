//! The job transport's side of the loop: job calls to and from peers (`/metainf/job/1`) and
//! the text deltas of streaming jobs (`/metainf/job-delta/1`). Wire types: `jobs.rs`.

use libp2p::PeerId;
use libp2p::request_response;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::client::Command;
use super::config::NetError;
use super::event::{InboundJob, NetEvent};
use super::event_loop::EventLoop;
use super::jobs::{DeltaAck, JobCall, JobDelta, JobReply};

impl EventLoop {
    /// Sends a job call to `peer`; its deltas (if streaming) go to `deltas`.
    pub(super) fn call_job(
        &mut self,
        peer: PeerId,
        call: JobCall,
        deltas: Option<mpsc::Sender<JobDelta>>,
        reply: oneshot::Sender<Result<JobReply, NetError>>,
    ) {
        let job = call.request.id;
        if let Some(sink) = deltas {
            self.delta_sinks.insert(job, (peer, sink));
        }
        self.sending(peer);
        let id = self.swarm.behaviour_mut().jobs.send_request(&peer, call);
        self.job_calls.insert(id, (job, peer, reply));
    }

    /// Forgets a job call the caller gave up on (it timed out): its late answer is dropped, and
    /// its host's next delta is answered [`DeltaAck::Stop`], which cancels the job there.
    pub(super) fn abandon_job(&mut self, peer: PeerId, job: metainf_protocol::JobId) {
        self.job_calls
            .retain(|_, (j, host, _)| !(*j == job && *host == peer));
        self.forget_sink(job, peer);
    }

    /// Removes a job's delta sink if it belongs to `peer`'s attempt: a late answer of an
    /// earlier attempt never takes the sink of the retry that replaced it.
    fn forget_sink(&mut self, job: metainf_protocol::JobId, peer: PeerId) {
        if self
            .delta_sinks
            .get(&job)
            .is_some_and(|(host, _)| *host == peer)
        {
            self.delta_sinks.remove(&job);
        }
    }

    pub(super) fn on_job_event(&mut self, event: request_response::Event<JobCall, JobReply>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                self.seen(peer);
                let job = Box::new(InboundJob {
                    peer,
                    call: request,
                    channel,
                    tx: self.self_tx.clone(),
                });
                // No job service, or its queue is full: the gateway tries another host.
                if let Err(NetEvent::Job(job)) = self.emit(NetEvent::Job(job)) {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .jobs
                        .send_response(job.channel, JobReply::Busy { retry_after_s: 1 });
                }
            }
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((job, _, reply)) = self.job_calls.remove(&request_id) {
                    self.forget_sink(job, peer);
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((job, _, reply)) = self.job_calls.remove(&request_id) {
                    self.forget_sink(job, peer);
                    let _ = reply.send(Err(NetError::Peer {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound job call failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn on_delta_event(&mut self, event: request_response::Event<JobDelta, DeltaAck>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                // Only the host the job was forwarded to may stream into it.
                let sink = self
                    .delta_sinks
                    .get(&request.job)
                    .filter(|(host, _)| *host == peer)
                    .map(|(_, sink)| sink.clone());
                let Some(sink) = sink else {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .deltas
                        .send_response(channel, DeltaAck::Stop);
                    return;
                };
                // Waits for room in the sink off the loop: a slow client slows its host's
                // stream, nothing else.
                let tx = self.self_tx.clone();
                self.tasks.spawn(async move {
                    let ack = match sink.send(request).await {
                        Ok(()) => DeltaAck::Ok,
                        Err(_) => DeltaAck::Stop,
                    };
                    let _ = tx.send(Command::RespondDelta { channel, ack }).await;
                });
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.delta_sends.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.delta_sends.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Peer {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            _ => {}
        }
    }
}
