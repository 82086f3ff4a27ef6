//! The node's one wall clock and its one peer-liveness rule.
//!
//! Every timestamp the node writes (records, heartbeats, job states, API `created` fields) comes
//! from [`now_ms`]; every "is this peer alive" answer (the swarm's peer list, the offline
//! `peers` command) comes from [`is_alive`], so the two can never disagree.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 before 1970, `u64::MAX` past year 584 million).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether a peer last heard from at `last_seen_ms` is alive at `now_ms`: heard from within
/// `timeout`. A timestamp in the future (clock skew) counts as just heard from.
pub fn is_alive(last_seen_ms: u64, now_ms: u64, timeout: Duration) -> bool {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    now_ms.saturating_sub(last_seen_ms) <= timeout_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_is_a_closed_window_and_tolerates_skew() {
        let t = Duration::from_secs(30);
        assert!(is_alive(1_000, 31_000, t));
        assert!(!is_alive(1_000, 31_001, t));
        assert!(is_alive(50_000, 31_000, t), "a future timestamp is alive");
        assert!(is_alive(0, u64::MAX, Duration::MAX));
    }

    #[test]
    fn the_clock_is_past_2020() {
        assert!(now_ms() > 1_577_836_800_000);
    }
}
