//! Reachability: relayed connections upgraded to direct ones (DCUtR's hole punch, then plain
//! direct dials when it fails), circuit listen addresses opened once their relay is connected,
//! and the address helpers for both.

use std::time::{Duration, Instant};

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};
use tracing::{debug, warn};

use super::event_loop::EventLoop;

impl EventLoop {
    /// One plain dial, from a fresh port, to a peer's own (non-relay) listen addresses. The
    /// peer may be directly reachable after all (a public address, the same network), which
    /// DCUtR's hole punch does not always find (it runs once, racing identify); behind real
    /// NATs the dial fails and the relayed connection stays.
    pub(super) fn dial_direct(&mut self, peer: PeerId) {
        let addrs = self.direct_addrs.get(&peer).cloned().unwrap_or_default();
        if addrs.is_empty() {
            return;
        }
        self.direct_attempts.insert(peer, Instant::now());
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::Always)
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, error = %e, "direct dial not started");
        }
    }

    /// Retries a direct connection to peers reached only through a relay, at most once per
    /// `DIRECT_RETRY`.
    pub(super) fn upgrade_relayed(&mut self) {
        const DIRECT_RETRY: Duration = Duration::from_secs(30);
        let relayed_only: Vec<PeerId> = self
            .connections
            .iter()
            .filter(|(_, c)| !c.is_empty() && c.values().all(|relayed| *relayed))
            .map(|(p, _)| *p)
            .filter(|p| {
                self.direct_attempts
                    .get(p)
                    .is_none_or(|t| t.elapsed() >= DIRECT_RETRY)
            })
            .collect();
        for peer in relayed_only {
            self.dial_direct(peer);
        }
    }

    /// Listens on the circuit addresses that waited for `peer`, their relay, to connect.
    pub(super) fn listen_through(&mut self, peer: PeerId) {
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred_listens)
            .into_iter()
            .partition(|(relay, _)| *relay == peer);
        self.deferred_listens = waiting;
        for (_, addr) in ready {
            if let Err(e) = self.swarm.listen_on(addr.clone()) {
                warn!(%addr, error = %e, "cannot listen through the relay");
            }
        }
    }
}

/// The peer id at the end of an address (`.../p2p/<id>`).
pub(super) fn last_peer_id(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// The relay of a circuit listen address (`<relay addr>/p2p/<relay>/p2p-circuit`).
pub(super) fn circuit_relay(addr: &Multiaddr) -> Option<PeerId> {
    let mut relay = None;
    for p in addr.iter() {
        match p {
            libp2p::multiaddr::Protocol::P2p(peer) => relay = Some(peer),
            libp2p::multiaddr::Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}
