//! The wire types of the metainf network and everything needed to trust them: content ids,
//! ed25519 signing and verification with the node's libp2p identity, range validation, and the
//! versioned, size-limited bincode codec.
//!
//! This crate owns no I/O and no runtime: it is shared by the profiler (which makes records),
//! the scheduler (which learns from them) and the node (which stores and moves them).
//!
//! The central type is [`SignedRecord`]: one measurement of a cell of the performance tensor
//! P[workload, method, hardware] (for a model), signed by its origin. [`SignedRecord::verify`]
//! turns it into a [`VerifiedRecord`], the only form the store accepts.

pub mod cache;
pub mod codec;
pub mod error;
pub mod evidence;
pub mod hardware;
pub mod heartbeat;
pub mod id;
pub mod job;
pub mod method;
pub mod model;
pub mod record;
pub mod validate;
pub mod workload;

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;

pub use cache::{BlockHash, CacheSummary, block_hashes};
pub use codec::{MAX_MESSAGE_BYTES, MAX_RECORD_BYTES, WIRE_VERSION, decode, encode};
pub use error::{ProtocolError, Result};
pub use evidence::{Equivocation, MAX_EVIDENCE_BYTES, VerifiedEquivocation};
pub use hardware::{
    CpuSpec, DeviceKind, GpuSpec, HardwareId, HardwareMeasurements, HardwareProfile, HardwareSpec,
};
pub use heartbeat::{Heartbeat, HostLoad};
pub use id::ContentId;
pub use job::{
    ChatMessage, Completion, FinishReason, GenerationParams, JobId, JobRequest, JobResult,
    Objective, Prompt,
};
pub use libp2p_identity::{Keypair, PeerId};
pub use method::{MethodConfig, MethodId, ParamValue};
pub use model::{ModelDescriptor, ModelId};
pub use record::{
    CellIds, Metrics, Percentiles, PerfRecord, RecordId, RecordSource, ServedLoad, SignedRecord,
    VerifiedRecord,
};
pub use workload::{Arrival, LengthStats, WorkloadDescriptor, WorkloadId};
