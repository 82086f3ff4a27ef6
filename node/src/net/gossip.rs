//! Gossip on `metainf/records/1` and `metainf/heartbeats/2`.
//!
//! Messages are validated before they are forwarded (gossipsub's manual validation). A
//! heartbeat is small and checked here (size, decoding, ranges, sender = the peer it names).
//! A record needs a signature check and a look at the store, so it goes out as a
//! [`NetEvent::Record`] and waits in gossipsub's cache until the replica reports its verdict;
//! the loop itself never waits for a disk.

use std::time::Duration;

use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance};
use metainf_protocol::{Heartbeat, codec};
use tracing::{debug, warn};

use super::MAX_HEARTBEAT_BYTES;
use super::config::NetError;
use super::event::{GossipRecord, GossipTicket, GossipVerdict, NetEvent, Topic};
use super::event_loop::EventLoop;
use crate::clock::now_ms;

/// How far ahead of this node's clock a heartbeat's `sent_at_ms` may be.
const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// Whether `heartbeat` is newer state of its peer: sent after the one this node holds (if
/// any), within the peer timeout of now, and not from further ahead than the clock skew allowed.
fn fresh(
    previous: Option<&Heartbeat>,
    heartbeat: &Heartbeat,
    now_ms: u64,
    max_age_ms: u64,
) -> bool {
    let sent = heartbeat.sent_at_ms;
    previous.is_none_or(|p| sent > p.sent_at_ms)
        && sent <= now_ms.saturating_add(MAX_CLOCK_SKEW_MS)
        && sent >= now_ms.saturating_sub(max_age_ms)
}

impl EventLoop {
    pub(super) fn on_gossip_event(&mut self, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        let ticket = GossipTicket {
            message_id,
            source: propagation_source,
        };
        if message.topic == self.records.hash() {
            let record = GossipRecord {
                data: message.data,
                ticket,
            };
            if let Err(NetEvent::Record(record)) = self.emit(NetEvent::Record(record)) {
                // Not checked, so neither forwarded nor held against the sender.
                self.report_record(record.ticket, GossipVerdict::Ignore);
            }
        } else if message.topic == self.evidence.hash() {
            let proof = GossipRecord {
                data: message.data,
                ticket,
            };
            if let Err(NetEvent::Evidence(proof)) = self.emit(NetEvent::Evidence(proof)) {
                self.report_record(proof.ticket, GossipVerdict::Ignore);
            }
        } else if message.topic == self.heartbeats.hash() {
            let verdict = self.on_heartbeat_message(message.source, &message.data);
            self.report_record(ticket, verdict);
        } else {
            self.report_record(ticket, GossipVerdict::Ignore);
        }
    }

    /// Tells gossipsub what a message deserves.
    pub(super) fn report_record(&mut self, ticket: GossipTicket, verdict: GossipVerdict) {
        let acceptance = match verdict {
            GossipVerdict::Accept => MessageAcceptance::Accept,
            GossipVerdict::Ignore => MessageAcceptance::Ignore,
            GossipVerdict::Reject => {
                warn!(peer = %ticket.source, "rejected an invalid gossip message");
                MessageAcceptance::Reject
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&ticket.message_id, &ticket.source, acceptance);
    }

    fn on_heartbeat_message(&mut self, source: Option<PeerId>, data: &[u8]) -> GossipVerdict {
        let heartbeat = match codec::decode_with_limit::<Heartbeat>(data, MAX_HEARTBEAT_BYTES) {
            Ok(h) if h.validate().is_ok() && Some(h.peer) == source => h,
            _ => return GossipVerdict::Reject,
        };
        if self.banned.contains(&heartbeat.peer) {
            // Valid, and relays may not know yet: ignored, not held against them.
            return GossipVerdict::Ignore;
        }
        if self.take_heartbeat(heartbeat) {
            GossipVerdict::Accept
        } else {
            // A replay (gossipsub forgets a message id after its duplicate window), an old
            // copy or a clock far ahead: neither newer state nor a sign of life. Ignored, not
            // rejected: the relay that forwarded it may be honest.
            GossipVerdict::Ignore
        }
    }

    /// Keeps a valid heartbeat (from gossip or a state query) as its peer's state if it is
    /// newer than the one held; whether it was.
    pub(super) fn take_heartbeat(&mut self, heartbeat: Heartbeat) -> bool {
        let peer = heartbeat.peer;
        let previous = self.peers.get(&peer).and_then(|s| s.heartbeat.as_ref());
        let max_age_ms = self.config.peer_timeout_s.saturating_mul(1000);
        if !fresh(previous, &heartbeat, now_ms(), max_age_ms) {
            debug!(%peer, sent_at_ms = heartbeat.sent_at_ms, "ignored a stale heartbeat");
            return false;
        }
        self.seen(peer);
        self.counters.heartbeats_received = self.counters.heartbeats_received.saturating_add(1);
        if let Some(status) = self.peers.get_mut(&peer) {
            status.heartbeat = Some(heartbeat.clone());
        }
        // The replica remembers it on disk; a full channel loses only this copy.
        let _ = self.emit(NetEvent::Heartbeat(Box::new(heartbeat)));
        true
    }

    /// Gossips a record's or proof's wire bytes (already stored by whoever sends it).
    pub(super) fn gossip(&mut self, topic: Topic, bytes: Vec<u8>) -> Result<(), NetError> {
        let topic = self.topic(topic);
        match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
            Ok(_) => Ok(()),
            // Alone on the network, or sent before: anti-entropy spreads it.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
            | Err(gossipsub::PublishError::Duplicate) => Ok(()),
            Err(e) => Err(NetError::Publish(e.to_string())),
        }
    }

    /// This node's state as its heartbeats (and its answers to state queries) carry it.
    pub(super) fn own_heartbeat(&self) -> Heartbeat {
        let local = *self.swarm.local_peer_id();
        let records_seq = self.records_seq.as_ref().map_or(0, |s| *s.borrow());
        let offer = self
            .offer
            .as_ref()
            .map(|o| o.borrow().clone())
            .unwrap_or_default();
        let mut models = offer.models;
        models.truncate(metainf_protocol::heartbeat::MAX_HEARTBEAT_MODELS);
        Heartbeat {
            peer: local,
            sent_at_ms: now_ms(),
            queue_depth: offer.queue_depth.min(offer.queue_capacity),
            running_jobs: offer.running_jobs,
            queue_capacity: offer.queue_capacity,
            models,
            price_per_hour: self.config.price_per_hour,
            free_memory_bytes: metainf_profiler::hardware::available_memory_bytes(),
            hardware: self.hardware,
            profile: Some(self.profile.clone()),
            records_seq,
            load: offer.load,
            cache: offer.cache.as_deref().cloned(),
            // Within the bound by construction (`heartbeat_interval` caps it).
            interval_s: self.heartbeat_interval().as_secs_f64().ceil() as u32,
        }
    }

    /// Time until this node's next heartbeat: the configured interval, or longer in a large
    /// network, so that the heartbeats of all `N` nodes reach each node at most
    /// `heartbeat_budget_per_s` times a second (an interval of `N / budget` seconds). A node
    /// with nothing to offer (no model, or a full queue) announces four times as rarely.
    pub(super) fn heartbeat_interval(&self) -> Duration {
        let base = self.config.heartbeat_interval_s.max(1) as f64;
        let nodes = self.peers.len().saturating_add(1) as f64;
        let budget = self.config.heartbeat_budget_per_s;
        let scaled = if budget.is_finite() && budget > 0.0 {
            base.max(nodes / budget)
        } else {
            base
        };
        let offers = self.offer.as_ref().is_some_and(|o| {
            let o = o.borrow();
            !o.models.is_empty() && o.queue_depth < o.queue_capacity
        });
        let s = if offers { scaled } else { 4.0 * scaled };
        Duration::from_secs_f64(s.min(f64::from(
            metainf_protocol::heartbeat::MAX_HEARTBEAT_INTERVAL_S,
        )))
    }

    pub(super) fn send_heartbeat(&mut self) {
        let heartbeat = self.own_heartbeat();
        match codec::encode(&heartbeat) {
            Ok(bytes) => {
                // No peers yet is not an error.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.heartbeats.clone(), bytes);
            }
            Err(e) => debug!(error = %e, "cannot encode a heartbeat"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metainf_protocol::ContentId;

    #[test]
    fn only_newer_recent_heartbeats_count() {
        let peer = metainf_protocol::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let beat = |sent_at_ms| Heartbeat {
            peer,
            sent_at_ms,
            queue_depth: 0,
            running_jobs: 0,
            queue_capacity: 16,
            models: Vec::new(),
            price_per_hour: 0.0,
            free_memory_bytes: 0,
            hardware: ContentId([0; 32]),
            profile: None,
            records_seq: 0,
            load: None,
            cache: None,
            interval_s: 5,
        };
        let now = 10_000_000;
        let held = beat(now - 5_000);
        // The first one heard, and a newer one.
        assert!(fresh(None, &beat(now), now, 30_000));
        assert!(fresh(Some(&held), &beat(now - 1_000), now, 30_000));
        // A replay of the held one, or an older one, after gossipsub's duplicate window.
        assert!(!fresh(Some(&held), &held, now, 30_000));
        assert!(!fresh(Some(&held), &beat(now - 6_000), now, 30_000));
        // Older than the peer timeout (a replay after a restart), or far ahead of this clock
        // (which would shut the peer's real heartbeats out until then).
        assert!(!fresh(None, &beat(now - 31_000), now, 30_000));
        assert!(!fresh(
            None,
            &beat(now + MAX_CLOCK_SKEW_MS + 1),
            now,
            30_000
        ));
        assert!(fresh(None, &beat(now + 1_000), now, 30_000));
        // Untrusted numbers do not overflow.
        assert!(!fresh(None, &beat(u64::MAX), 5, u64::MAX));
        assert!(fresh(None, &beat(0), 5, u64::MAX));
    }
}
