//! What this node saw of each host it sent jobs to, against what the host claimed: the
//! gateway's own measurement of every attempt (its clock, end to end), whether it ended well,
//! and how much slower it ran than the prediction built from the host's records and heartbeats.
//!
//! - **Correction:** once a host ran three jobs for this node, its predictions are scaled by its
//!   observed slowdown beyond a factor of four (an exponentially weighted mean of
//!   ln(observed / predicted); within 4× is the predictor's own error, which honest hosts show
//!   too while it is young, and the learner corrects from their records): a host that copied the
//!   fastest profile or announces an empty queue it does not have is routed as what it delivers.
//! - **Speed relative to the others:** routing also scales each host's predictions by how its
//!   observed/predicted ratio compares with the typical host's (the median over every host with
//!   three successes, this node's own engine included: its local jobs are measured the same
//!   way), between 4× faster and [`MAX_SLOWDOWN`] slower. A predictor's common error cancels
//!   out, while hosts whose profiles look alike but are not (a CPU quota, a busy neighbour,
//!   thermal limits) are told apart by what they deliver. It is only a ratio of this node's own
//!   measurements, so a host cannot fake it; the typical ratio counts as at most the tolerated
//!   4×, so a liar alone (or among liars) is still corrected as above.
//! - **Exclusion:** three failures in a row (errors, timeouts, results that do not match the
//!   job) exclude a host for a minute, doubling with each further one up to an hour.
//! - Kept in the store (`meta`), so a restart does not forgive; local opinion only: it is not
//!   gossiped, and another node's view of a host never changes this one's.

use std::collections::HashMap;
use std::sync::Mutex;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::clock::now_ms;
use crate::store::Store;

const META: &str = "reputation";
/// Weight of the newest observation in the slowdown mean.
const ALPHA: f64 = 0.3;
/// Slowdown (observed / predicted) an honest host may show: the predictor's own error (ln 4).
const TOLERATED: f64 = 2.0 * std::f64::consts::LN_2;
/// Successes before any correction applies.
const OBSERVATIONS: u64 = 3;
/// Largest correction applied to a host's predictions.
pub(crate) const MAX_SLOWDOWN: f64 = 100.0;
/// Failures in a row that exclude a host.
const FAILURES_TO_EXCLUDE: u32 = 3;
const BASE_EXCLUSION_MS: u64 = 60_000;
const MAX_EXCLUSION_MS: u64 = 3_600_000;
/// Hosts remembered (the least recently used are forgotten beyond this).
const MAX_HOSTS: usize = 4096;
/// Largest speed-up relative to the typical host that routing credits (ln 4).
const MAX_SPEEDUP_LOG: f64 = 2.0 * std::f64::consts::LN_2;

/// How an attempt on a host went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// It failed, timed out, vanished or answered with something that is not the job's result.
    Error,
}

/// One host as this node saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Attempts that ended (well or not).
    pub attempts: u64,
    /// Attempts that gave a result.
    pub succeeded: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Failures since the last success.
    pub failures_in_a_row: u32,
    /// Mean ln(observed / predicted time) of its successes, weighted to the recent ones.
    pub slowdown_log: f64,
    /// Until when it gets no jobs from this node, Unix ms (0 = none).
    pub excluded_until_ms: u64,
    /// Last time an attempt on it ended, Unix ms.
    pub last_ms: u64,
}

impl HostRecord {
    /// The factor its predictions are multiplied by (≥ 1): how much slower than predicted it
    /// ran, beyond the 2× any prediction may be off.
    pub fn slowdown(&self) -> f64 {
        if self.succeeded < OBSERVATIONS {
            return 1.0;
        }
        (self.slowdown_log - TOLERATED)
            .max(0.0)
            .exp()
            .min(MAX_SLOWDOWN)
    }

    /// The factor routing multiplies its predictions by: its ratio of observed to predicted
    /// time against the typical host's (`reference_log`, the median of the ln ratios, taken as
    /// at most the tolerated error so that a host alone, or a network of liars, is still judged
    /// absolutely), between 4× faster and [`MAX_SLOWDOWN`] slower; 1 before three successes.
    pub fn routing_factor(&self, reference_log: Option<f64>) -> f64 {
        if self.succeeded < OBSERVATIONS {
            return 1.0;
        }
        let reference = reference_log.unwrap_or(0.0).min(TOLERATED);
        (self.slowdown_log - reference)
            .clamp(-MAX_SPEEDUP_LOG, MAX_SLOWDOWN.ln())
            .exp()
    }

    /// A score in (0, 1]: the share of attempts that went well (with a prior of one of each),
    /// divided by the slowdown.
    pub fn score(&self) -> f64 {
        let ok = (self.succeeded as f64 + 1.0) / (self.attempts as f64 + 2.0);
        ok / self.slowdown()
    }

    /// Whether it is excluded at `now_ms`.
    pub fn excluded(&self, now_ms: u64) -> bool {
        self.excluded_until_ms > now_ms
    }
}

/// Every host's record, kept in memory and in the store.
pub(crate) struct Reputation {
    hosts: Mutex<Hosts>,
}

#[derive(Default)]
struct Hosts {
    records: HashMap<PeerId, HostRecord>,
    /// The median ln(observed / predicted) over the hosts with enough successes.
    reference_log: Option<f64>,
}

impl Hosts {
    fn new(records: HashMap<PeerId, HostRecord>) -> Self {
        let mut hosts = Self {
            records,
            reference_log: None,
        };
        hosts.reference_log = hosts.median_log();
        hosts
    }

    fn median_log(&self) -> Option<f64> {
        let mut logs: Vec<f64> = self
            .records
            .values()
            .filter(|r| r.succeeded >= OBSERVATIONS && r.slowdown_log.is_finite())
            .map(|r| r.slowdown_log)
            .collect();
        if logs.is_empty() {
            return None;
        }
        let mid = logs.len() / 2;
        let (_, m, _) = logs.select_nth_unstable_by(mid, f64::total_cmp);
        Some(*m)
    }
}

impl Reputation {
    /// Loads what a previous run saw (nothing, if unreadable).
    pub(crate) fn load(store: &Store) -> Self {
        let hosts = match store.meta(META) {
            Ok(Some(bytes)) => match serde_json::from_slice::<Vec<(String, HostRecord)>>(&bytes) {
                Ok(list) => list
                    .into_iter()
                    .filter_map(|(p, r)| Some((p.parse().ok()?, r)))
                    .collect(),
                Err(e) => {
                    warn!(error = %e, "the saved reputations are unreadable; starting afresh");
                    HashMap::new()
                }
            },
            Ok(None) => HashMap::new(),
            Err(e) => {
                warn!(error = %e, "cannot read the saved reputations");
                HashMap::new()
            }
        };
        Self {
            hosts: Mutex::new(Hosts::new(hosts)),
        }
    }

    /// The record of `peer`, if this node sent it anything.
    pub(crate) fn get(&self, peer: &PeerId) -> Option<HostRecord> {
        self.hosts.lock().ok()?.records.get(peer).cloned()
    }

    /// Every host's record, with the factor routing applies to it.
    pub(crate) fn all(&self) -> HashMap<PeerId, (HostRecord, f64)> {
        self.hosts
            .lock()
            .map(|h| {
                h.records
                    .iter()
                    .map(|(p, r)| (*p, (r.clone(), r.routing_factor(h.reference_log))))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The factor routing multiplies `peer`'s predictions by (1 for a host not seen yet).
    pub(crate) fn routing_factor(&self, peer: &PeerId) -> f64 {
        self.hosts.lock().ok().map_or(1.0, |h| {
            h.records
                .get(peer)
                .map_or(1.0, |r| r.routing_factor(h.reference_log))
        })
    }

    /// An attempt on `peer` gave a result after `observed_s` (this node's clock) where
    /// `predicted_s` was expected. Returns the bytes to save.
    pub(crate) fn succeeded(&self, peer: PeerId, observed_s: f64, predicted_s: f64) -> Vec<u8> {
        self.update(peer, |r| {
            r.succeeded += 1;
            r.failures_in_a_row = 0;
            if observed_s.is_finite() && predicted_s.is_finite() && predicted_s > 0.0 {
                let log = (observed_s.max(1e-6) / predicted_s).ln().clamp(-10.0, 10.0);
                r.slowdown_log = if r.succeeded == 1 {
                    log
                } else {
                    (1.0 - ALPHA) * r.slowdown_log + ALPHA * log
                };
            }
        })
    }

    /// An attempt on `peer` failed. Returns the bytes to save.
    pub(crate) fn failed(&self, peer: PeerId, failure: Failure) -> Vec<u8> {
        self.update(peer, |r| {
            r.failed += 1;
            r.failures_in_a_row = r.failures_in_a_row.saturating_add(1);
            let now = now_ms();
            let exclusion = match failure {
                Failure::Error if r.failures_in_a_row >= FAILURES_TO_EXCLUDE => {
                    let doublings = (r.failures_in_a_row - FAILURES_TO_EXCLUDE).min(6);
                    Some((BASE_EXCLUSION_MS << doublings).min(MAX_EXCLUSION_MS))
                }
                Failure::Error => None,
            };
            if let Some(ms) = exclusion {
                r.excluded_until_ms = r.excluded_until_ms.max(now.saturating_add(ms));
                warn!(host = %peer, minutes = ms / 60_000, ?failure, "host excluded from routing");
            }
        })
    }

    fn update(&self, peer: PeerId, change: impl FnOnce(&mut HostRecord)) -> Vec<u8> {
        let Ok(mut hosts) = self.hosts.lock() else {
            return Vec::new();
        };
        let r = hosts.records.entry(peer).or_default();
        r.attempts += 1;
        r.last_ms = now_ms();
        change(r);
        if hosts.records.len() > MAX_HOSTS {
            let oldest = hosts
                .records
                .iter()
                .min_by_key(|(_, r)| r.last_ms)
                .map(|(p, _)| *p);
            if let Some(p) = oldest {
                hosts.records.remove(&p);
            }
        }
        hosts.reference_log = hosts.median_log();
        let list: Vec<(String, &HostRecord)> = hosts
            .records
            .iter()
            .map(|(p, r)| (p.to_string(), r))
            .collect();
        serde_json::to_vec(&list).unwrap_or_default()
    }

    /// Saves what [`Reputation::succeeded`] or [`Reputation::failed`] returned.
    pub(crate) async fn save(store: &Store, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        if let Err(e) = store.put_meta_async(META.to_owned(), bytes).await {
            warn!(error = %e, "cannot save the reputations");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_host_slower_than_it_claims_is_corrected_and_a_failing_one_excluded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let rep = Reputation::load(&store);
        let (liar, flaky, good) = (PeerId::random(), PeerId::random(), PeerId::random());
        // The liar's records promise 1 s; it takes 8.
        for _ in 0..3 {
            rep.succeeded(liar, 8.0, 1.0);
            rep.succeeded(good, 1.1, 1.0);
        }
        let (l, g) = (rep.get(&liar).unwrap(), rep.get(&good).unwrap());
        // 8× slower than promised: routed 2× slower (4× is tolerated as prediction error).
        assert!((l.slowdown() - 2.0).abs() < 1e-9);
        assert_eq!(g.slowdown(), 1.0);
        assert!(l.score() < g.score());
        // Faster than predicted earns nothing (the predictor learns that from records).
        let fast = PeerId::random();
        rep.succeeded(fast, 0.1, 1.0);
        assert_eq!(rep.get(&fast).unwrap().slowdown(), 1.0);
        // Two failures are bad luck; three in a row exclude, a success forgives.
        let now = now_ms();
        rep.failed(flaky, Failure::Error);
        rep.failed(flaky, Failure::Error);
        assert!(!rep.get(&flaky).unwrap().excluded(now));
        rep.failed(flaky, Failure::Error);
        assert!(rep.get(&flaky).unwrap().excluded(now));
        rep.succeeded(flaky, 1.0, 1.0);
        assert_eq!(rep.get(&flaky).unwrap().failures_in_a_row, 0);
        // Each further failure in a row doubles the exclusion, up to an hour.
        let dead = PeerId::random();
        let mut saved = Vec::new();
        for _ in 0..20 {
            saved = rep.failed(dead, Failure::Error);
        }
        let d = rep.get(&dead).unwrap();
        assert!(d.excluded(now + 59 * 60_000) && !d.excluded(now + 61 * 60_000));
        // Kept across a restart.
        store.put_meta(META, &saved).unwrap();
        let again = Reputation::load(&store);
        assert_eq!(again.get(&dead), Some(d));
        assert_eq!(again.get(&liar), Some(l));
        // Relative speed: two hosts with the same predictions, one running twice as long.
        // Neither is beyond the tolerated absolute error, but routing tells them apart; and a
        // predictor that is 2× off for every host changes nothing.
        let fresh = Reputation::load(&Store::open(dir.path().join("other")).unwrap());
        let (quick, slow, mid) = (PeerId::random(), PeerId::random(), PeerId::random());
        for _ in 0..3 {
            fresh.succeeded(quick, 1.5, 1.0);
            fresh.succeeded(mid, 2.0, 1.0);
            fresh.succeeded(slow, 3.0, 1.0);
        }
        let (q, m, s) = (
            fresh.routing_factor(&quick),
            fresh.routing_factor(&mid),
            fresh.routing_factor(&slow),
        );
        assert!(
            (m - 1.0).abs() < 1e-9,
            "the median host is the reference: {m}"
        );
        assert!((q - 0.75).abs() < 1e-9 && (s - 1.5).abs() < 1e-9, "{q} {s}");
        assert_eq!(fresh.get(&slow).unwrap().slowdown(), 1.0);
        assert_eq!(fresh.routing_factor(&PeerId::random()), 1.0);
        // Alone, a host is judged absolutely: the liar above is still corrected.
        let alone = Reputation::load(&Store::open(dir.path().join("alone")).unwrap());
        for _ in 0..3 {
            alone.succeeded(liar, 8.0, 1.0);
        }
        assert!((alone.routing_factor(&liar) - 2.0).abs() < 1e-9);
        // A host far faster than the others is credited at most 4×.
        for _ in 0..3 {
            fresh.succeeded(fast, 0.001, 1.0);
        }
        assert!((fresh.routing_factor(&fast) - 0.25).abs() < 1e-9);
        // Untrusted numbers neither overflow nor poison the mean.
        let odd = PeerId::random();
        rep.succeeded(odd, f64::NAN, 1.0);
        rep.succeeded(odd, 1e300, 1e-300);
        assert!(rep.get(&odd).unwrap().slowdown() <= MAX_SLOWDOWN);
        assert!(rep.routing_factor(&odd) <= MAX_SLOWDOWN);
    }
}
