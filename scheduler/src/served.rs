//! The workload as a host served it: a served job's record carries what it shared the engine
//! with and what it took from the prefix cache, and the tensor files such a record under its
//! workload with those as facts, so that interference and cache hits are not mistaken for the
//! method's effect. A router asks the predictor for a host with the share of the job that host's
//! cache would serve.

use metainf_protocol::WorkloadDescriptor;

/// Workload fact of a served job: the share of its prompt tokens whose KV came from the host's
/// prefix cache (tenths).
pub const CACHED_SHARE: &str = "served.cached_share";
/// Workload fact of a served job: mean sequences of other jobs in the batch while it ran
/// (whole sequences).
pub const FOREIGN_SEQS: &str = "served.foreign_seqs";

/// The workload as served: `w` with what it shared the engine with and took from the cache as
/// facts ([`CACHED_SHARE`], [`FOREIGN_SEQS`]), coarsened so that similar runs share a cell. The
/// tensor keeps interference and cache hits apart from the method's effect this way, and a
/// router asks for a host's prediction with the share that host's cache would serve.
pub fn served_workload(
    w: &WorkloadDescriptor,
    load: &metainf_protocol::ServedLoad,
    prompt_tokens: u64,
) -> WorkloadDescriptor {
    let share = if prompt_tokens > 0 {
        load.cached_prompt_tokens.min(prompt_tokens) as f64 / prompt_tokens as f64
    } else {
        0.0
    };
    with_cache_share(w, share, load.mean_foreign_seqs)
}

/// `w` with the given cache share and foreign sequences as facts (zeros are left out, as the
/// engine's own benchmark workloads have neither).
pub fn with_cache_share(
    w: &WorkloadDescriptor,
    share: f64,
    foreign_seqs: f64,
) -> WorkloadDescriptor {
    let mut w = w.clone();
    let share = (share.clamp(0.0, 1.0) * 10.0).round() / 10.0;
    let foreign = if foreign_seqs.is_finite() {
        foreign_seqs.clamp(0.0, 1e6).round()
    } else {
        0.0
    };
    for (key, value) in [(CACHED_SHARE, share), (FOREIGN_SEQS, foreign)] {
        if value > 0.0 {
            w.extra.insert(key.to_owned(), value);
        } else {
            w.extra.remove(key);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use metainf_protocol::{ServedLoad, fixtures};

    #[test]
    fn a_served_workload_carries_its_cache_share_and_co_load_coarsely() {
        let w = fixtures::workload("chat", 4);
        let load = ServedLoad {
            mean_running_seqs: 6.2,
            mean_foreign_seqs: 2.4,
            cached_prompt_tokens: 730,
        };
        let s = served_workload(&w, &load, 1000);
        assert_eq!(s.extra.get(CACHED_SHARE), Some(&0.7));
        assert_eq!(s.extra.get(FOREIGN_SEQS), Some(&2.0));
        assert_ne!(s.id().unwrap(), w.id().unwrap(), "another cell");
        // Nothing shared and nothing cached: the plain workload, the same cell.
        let alone = ServedLoad {
            mean_running_seqs: 4.0,
            mean_foreign_seqs: 0.2,
            cached_prompt_tokens: 0,
        };
        assert_eq!(
            served_workload(&w, &alone, 1000).id().unwrap(),
            w.id().unwrap()
        );
        // Untrusted numbers stay in range.
        let odd = with_cache_share(&w, f64::NAN, f64::INFINITY);
        assert!(odd.extra.values().all(|v| v.is_finite()));
        assert_eq!(
            with_cache_share(&w, 7.0, 0.0).extra.get(CACHED_SHARE),
            Some(&1.0)
        );
    }
}
