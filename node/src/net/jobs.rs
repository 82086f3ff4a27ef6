//! Running jobs on other nodes: `/metainf/job/1` carries a job to the chosen host and its
//! result back; `/metainf/job-delta/1` carries the text of a streaming job from the host back
//! to the node that forwarded it, one delta at a time (the host sends the next delta, with
//! everything generated meanwhile, only when the previous one is acknowledged: ordered, and
//! paced by the client).
//!
//! A host that dies mid-job closes the connection, which fails the outstanding request at
//! once; the forwarding node then retries elsewhere.

use libp2p::StreamProtocol;
use metainf_protocol::{JobId, JobRequest, JobResult, MethodConfig};
use serde::{Deserialize, Serialize};

/// Protocol of job calls.
pub(crate) const JOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/metainf/job/1");
/// Protocol of streamed text.
pub(crate) const DELTA_PROTOCOL: StreamProtocol = StreamProtocol::new("/metainf/job-delta/1");

/// "Run this job with this method."
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobCall {
    /// The job (validated again by the host).
    pub request: JobRequest,
    /// The method the router chose.
    pub method: MethodConfig,
}

/// The host's answer to a [`JobCall`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobReply {
    /// Finished.
    Done(Box<JobResult>),
    /// The host's queue is full; try another host or later.
    Busy {
        /// Suggested wait, seconds.
        retry_after_s: u32,
    },
    /// The job cannot run there (unknown model, too long for the context, ...): running it
    /// elsewhere would fail the same way.
    Rejected(String),
    /// The host failed while running it; another host may succeed.
    Failed(String),
}

/// Text generated for one prompt of a streaming job since the previous delta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobDelta {
    /// The job.
    pub job: JobId,
    /// Index of the prompt.
    pub prompt: u32,
    /// The new text.
    pub text: String,
}

/// The forwarding node's answer to a [`JobDelta`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaAck {
    /// Taken; send the next.
    Ok,
    /// Nobody listens any more (the client left): stop sending deltas.
    Stop,
}

/// The codec of job calls.
pub(crate) type JobCodec = super::frame::FrameCodec<JobCall, JobReply>;
/// The codec of deltas.
pub(crate) type DeltaCodec = super::frame::FrameCodec<JobDelta, DeltaAck>;
