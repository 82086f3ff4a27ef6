//! Which peers' jobs this host takes, and how many: peers share a bounded part of the engine
//! fairly, and the rest is kept for this node's own API clients.
//!
//! - `accept_jobs_from = "allowlist"` takes jobs only from `peer_allowlist`; `"any"` (the
//!   default) from every connected peer that is not banned.
//! - Peers together hold at most `peer_sequences` sequences (prompts) of this host at once
//!   (default: half the engine's queue), so a flood of peer jobs never fills what local clients
//!   need. A job with more prompts than that runs only on an idle host (no peer job held, the
//!   engine running and holding nothing), else it is told busy.
//! - Among the peers with jobs here, each may add a job while it holds less than an equal share;
//!   a peer with nothing running may always start one job that fits. One free-rider cannot
//!   starve the others: it is answered busy and its gateway tries elsewhere.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// Whose jobs a host takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcceptFrom {
    /// Every peer that is not banned.
    #[default]
    Any,
    /// Only the peers in `peer_allowlist`.
    Allowlist,
}

/// Why a peer's job was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Never here (not on the allowlist, too many prompts): running it elsewhere is the answer.
    Never(String),
    /// Not now: the peers' share is full, or this peer holds its share.
    Busy,
}

#[derive(Debug, Default)]
struct Held {
    total: u32,
    by_peer: HashMap<PeerId, u32>,
}

/// The admission of peers' jobs. Cheap to clone; every clone shares the counts.
#[derive(Clone, Debug)]
pub(crate) struct Admission {
    from: AcceptFrom,
    allowlist: Arc<HashSet<PeerId>>,
    capacity: u32,
    held: Arc<Mutex<Held>>,
}

/// A job admitted: its sequences count against its peer until this is dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    peer: PeerId,
    sequences: u32,
    held: Arc<Mutex<Held>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        held.total = held.total.saturating_sub(self.sequences);
        if let Some(n) = held.by_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(self.sequences);
            if *n == 0 {
                held.by_peer.remove(&self.peer);
            }
        }
    }
}

impl Admission {
    /// `capacity`: most sequences of peers held at once (at least 1).
    pub(crate) fn new(from: AcceptFrom, allowlist: HashSet<PeerId>, capacity: u32) -> Self {
        Self {
            from,
            allowlist: Arc::new(allowlist),
            capacity: capacity.max(1),
            held: Arc::new(Mutex::new(Held::default())),
        }
    }

    /// Admits a job of `sequences` prompts from `peer`, or says why not; `engine_idle`: this
    /// host's engine runs and holds nothing now (a job larger than the peers' share needs it).
    pub(crate) fn admit(
        &self,
        peer: PeerId,
        sequences: usize,
        engine_idle: bool,
    ) -> Result<Ticket, Refusal> {
        if self.from == AcceptFrom::Allowlist && !self.allowlist.contains(&peer) {
            return Err(Refusal::Never(
                "this host takes jobs only from the peers on its allowlist".into(),
            ));
        }
        let n = u32::try_from(sequences).unwrap_or(u32::MAX);
        let mut held = self.held.lock().map_err(|_| Refusal::Busy)?;
        // Larger than the peers' whole share: alone on an idle host, or not now.
        if n > self.capacity {
            if held.total > 0 || !engine_idle {
                return Err(Refusal::Busy);
            }
            held.total = n;
            held.by_peer.insert(peer, n);
            return Ok(Ticket {
                peer,
                sequences: n,
                held: Arc::clone(&self.held),
            });
        }
        let mine = held.by_peer.get(&peer).copied().unwrap_or(0);
        let peers = held.by_peer.len() as u32 + u32::from(mine == 0);
        let share = (self.capacity / peers.max(1)).max(1);
        if held.total.saturating_add(n) > self.capacity
            || (mine > 0 && mine.saturating_add(n) > share)
        {
            return Err(Refusal::Busy);
        }
        held.total += n;
        *held.by_peer.entry(peer).or_default() += n;
        Ok(Ticket {
            peer,
            sequences: n,
            held: Arc::clone(&self.held),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn a_free_rider_gets_its_share_and_no_more() {
        let admission = Admission::new(AcceptFrom::Any, HashSet::new(), 8);
        let (greedy, other) = (peer(), peer());
        // Alone, the greedy peer may fill the peers' part, one job at a time...
        let mut tickets: Vec<Ticket> = (0..4)
            .map(|_| admission.admit(greedy, 2, true).unwrap())
            .collect();
        assert_eq!(admission.admit(greedy, 1, true).unwrap_err(), Refusal::Busy);
        // ...but not beyond it; when it frees room, another peer's first job fits first.
        tickets.truncate(2);
        let first = admission.admit(other, 2, true).unwrap();
        // Now two peers share 8: the greedy one holds 4 (its share) and is refused...
        assert_eq!(admission.admit(greedy, 1, true).unwrap_err(), Refusal::Busy);
        // ...while the other may grow to its share.
        let second = admission.admit(other, 2, true).unwrap();
        assert_eq!(admission.admit(other, 1, true).unwrap_err(), Refusal::Busy);
        drop((first, second, tickets));
        // Everything released: a whole-capacity job fits again; a larger one runs only alone,
        // and holds everything while it runs.
        let all = admission.admit(other, 8, true).unwrap();
        assert_eq!(admission.admit(greedy, 9, true).unwrap_err(), Refusal::Busy);
        drop(all);
        let huge = admission.admit(greedy, usize::MAX, true).unwrap();
        assert_eq!(admission.admit(other, 1, true).unwrap_err(), Refusal::Busy);
        drop(huge);
        // Not while the engine holds anything (the local clients' share).
        assert_eq!(
            admission.admit(greedy, 9, false).unwrap_err(),
            Refusal::Busy
        );
        assert!(admission.admit(other, 1, true).is_ok());
    }

    #[test]
    fn an_allowlist_refuses_everyone_else() {
        let friend = peer();
        let admission = Admission::new(AcceptFrom::Allowlist, [friend].into(), 4);
        assert!(admission.admit(friend, 1, true).is_ok());
        assert!(matches!(
            admission.admit(peer(), 1, true),
            Err(Refusal::Never(_))
        ));
    }
}
