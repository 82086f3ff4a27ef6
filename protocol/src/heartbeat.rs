//! Heartbeats: each node's periodic announcement of its load and offer.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::cache::CacheSummary;
use crate::error::{ProtocolError, Result};
use crate::hardware::{HardwareId, HardwareProfile};
use crate::model::ModelDescriptor;
use crate::validate;

/// Most models one heartbeat lists.
pub const MAX_HEARTBEAT_MODELS: usize = 16;

/// A node's current state, gossiped periodically. A peer silent past a timeout counts as gone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender.
    pub peer: PeerId,
    /// When it was sent, Unix milliseconds.
    pub sent_at_ms: u64,
    /// Jobs waiting in the host's queue.
    pub queue_depth: u32,
    /// Jobs running now.
    pub running_jobs: u32,
    /// Capacity of the queue.
    pub queue_capacity: u32,
    /// Models the node serves (at most [`MAX_HEARTBEAT_MODELS`]).
    pub models: Vec<ModelDescriptor>,
    /// Price per hour of compute, in the network's price unit.
    pub price_per_hour: f64,
    /// Free device memory, bytes.
    pub free_memory_bytes: u64,
    /// The node's hardware cell.
    pub hardware: HardwareId,
    /// The node's hardware profile (its spec hashes to `hardware`), so that routers can
    /// predict for hosts that have not published a record yet.
    pub profile: Option<HardwareProfile>,
    /// Highest sequence number of the node's own records.
    pub records_seq: u64,
    /// Live load of its serving engine (of its first model), when it serves one.
    pub load: Option<HostLoad>,
    /// What that engine's prefix cache holds.
    pub cache: Option<CacheSummary>,
    /// Seconds until the sender's next heartbeat at the latest (its interval grows with the
    /// network, so that heartbeats cost each node the same whatever the network's size).
    pub interval_s: u32,
}

/// Longest heartbeat interval a node may announce, seconds.
pub const MAX_HEARTBEAT_INTERVAL_S: u32 = 3600;

/// The live load of a host's serving engine: what routers predict its wait from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    /// Sequences running now.
    pub running_seqs: u32,
    /// Sequences waiting for admission.
    pub waiting_seqs: u32,
    /// Most sequences the engine runs at once.
    pub max_running: u32,
    /// KV blocks in all.
    pub kv_blocks_total: u32,
    /// KV blocks held by running sequences.
    pub kv_blocks_used: u32,
    /// KV blocks holding reclaimable cached prefixes.
    pub kv_blocks_cached: u32,
    /// Recent generation rate over all sequences, tokens per second.
    pub decode_tok_s: f64,
    /// Recent mean seconds a sequence spends in the engine.
    pub seq_s: f64,
    /// Tokens its running and waiting sequences may still generate (their `max_tokens` less
    /// what they generated): with the decode rate, how long the work ahead takes.
    pub remaining_tokens: u64,
}

impl HostLoad {
    /// Checks ranges: finite rates, blocks within the pool.
    pub fn validate(&self) -> Result<()> {
        validate::in_range("heartbeat.load.decode_tok_s", self.decode_tok_s, 0.0, 1e9)?;
        validate::in_range("heartbeat.load.seq_s", self.seq_s, 0.0, 1e7)?;
        let held = u64::from(self.kv_blocks_used) + u64::from(self.kv_blocks_cached);
        if held > u64::from(self.kv_blocks_total) {
            return Err(ProtocolError::invalid(
                "heartbeat.load.kv_blocks_used",
                "more blocks held than the pool has",
            ));
        }
        if self.running_seqs > self.max_running {
            return Err(ProtocolError::invalid(
                "heartbeat.load.running_seqs",
                "more than the engine's maximum",
            ));
        }
        Ok(())
    }
}

impl Heartbeat {
    /// Checks sizes and ranges.
    pub fn validate(&self) -> Result<()> {
        validate::count("heartbeat.models", self.models.len(), MAX_HEARTBEAT_MODELS)?;
        for m in &self.models {
            m.validate()?;
        }
        if let Some(p) = &self.profile {
            p.validate()?;
            if p.id()? != self.hardware {
                return Err(ProtocolError::invalid(
                    "heartbeat.profile",
                    "does not hash to the announced hardware id",
                ));
            }
        }
        validate::finite_nonneg("heartbeat.price_per_hour", self.price_per_hour)?;
        if let Some(load) = &self.load {
            load.validate()?;
        }
        if let Some(cache) = &self.cache {
            cache.validate()?;
        }
        if self.interval_s > MAX_HEARTBEAT_INTERVAL_S {
            return Err(ProtocolError::invalid(
                "heartbeat.interval_s",
                format!("{} s, at most {MAX_HEARTBEAT_INTERVAL_S}", self.interval_s),
            ));
        }
        if self.queue_depth > self.queue_capacity {
            return Err(ProtocolError::invalid(
                "heartbeat.queue_depth",
                "larger than the queue capacity",
            ));
        }
        Ok(())
    }
}
