//! Routing policies: which host a job goes to. `metainf` (the default) lets the predictor score
//! every (host, method) pair, with each host's cache, load and measured speed; the others are
//! the routers users run elsewhere, kept so that they can be compared on the same traffic by
//! the same code: each only orders the hosts, and the first host in its order that can run the
//! job within the budget gets it, with the method the predictor thinks best there.
//!
//! - `round-robin`: the hosts in turn (by peer id);
//! - `random`: uniformly;
//! - `least-loaded`: fewest sequences running and waiting (with the jobs this node sent since
//!   the host last told);
//! - `prefix-affinity`: SGLang's `cache_aware` policy: the host whose cache holds the longest
//!   prefix of the job (if it covers at least half of its prompts), unless the hosts' loads are
//!   out of balance (the busiest runs more than `8` sequences more than, and 1.5× as many as,
//!   the idlest), where it routes as `least-loaded`.

use std::str::FromStr;

use metainf_scheduler::select::Host;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// How a job's host is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingPolicy {
    /// The predictor's choice of host and method (Algorithm 2 with cache, load and speed).
    #[default]
    Metainf,
    /// Each host in turn.
    RoundRobin,
    /// A host at random.
    Random,
    /// The host with the fewest sequences running and waiting.
    LeastLoaded,
    /// The host holding the longest cached prefix, least-loaded when loads are out of balance.
    PrefixAffinity,
}

impl RoutingPolicy {
    /// Every policy, in the order benchmarks show them.
    pub const ALL: [RoutingPolicy; 5] = [
        RoutingPolicy::Metainf,
        RoutingPolicy::RoundRobin,
        RoutingPolicy::Random,
        RoutingPolicy::LeastLoaded,
        RoutingPolicy::PrefixAffinity,
    ];

    /// Its name in configuration and requests.
    pub fn name(self) -> &'static str {
        match self {
            RoutingPolicy::Metainf => "metainf",
            RoutingPolicy::RoundRobin => "round-robin",
            RoutingPolicy::Random => "random",
            RoutingPolicy::LeastLoaded => "least-loaded",
            RoutingPolicy::PrefixAffinity => "prefix-affinity",
        }
    }
}

impl std::fmt::Display for RoutingPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RoutingPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
                format!("unknown routing policy {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Busiest minus idlest sequences past which `prefix-affinity` balances load instead.
const BALANCE_ABS: u64 = 8;
/// ... and busiest over idlest.
const BALANCE_REL: f64 = 1.5;
/// Least share of a job's prompt tokens a host's cache must hold for `prefix-affinity` to
/// follow it.
const CACHE_THRESHOLD: f64 = 0.5;

/// Sequences a host runs and holds waiting, as the router sees them.
pub(crate) fn load_of(h: &Host) -> u64 {
    match &h.load {
        Some(l) => u64::from(l.running_seqs) + u64::from(l.waiting_seqs),
        None => u64::from(h.queue_depth) + u64::from(h.running_jobs),
    }
}

/// The order in which a baseline `policy` tries `hosts` for a job of `prompt_tokens` (`turn`:
/// the job's number among those round-robin routed, taken once per job). `None` for [`RoutingPolicy::Metainf`], which
/// scores hosts instead of ordering them.
pub(crate) fn order(
    policy: RoutingPolicy,
    hosts: &[Host],
    prompt_tokens: u64,
    turn: u64,
) -> Option<Vec<usize>> {
    let n = hosts.len();
    let mut idx: Vec<usize> = (0..n).collect();
    let least_loaded = |idx: &mut Vec<usize>| {
        // Ties broken at random, so equal hosts share the traffic.
        idx.shuffle(&mut rand::thread_rng());
        idx.sort_by_key(|&i| load_of(&hosts[i]));
    };
    match policy {
        RoutingPolicy::Metainf => return None,
        RoutingPolicy::RoundRobin => {
            idx.sort_by(|&a, &b| hosts[a].name.cmp(&hosts[b].name));
            if n > 0 {
                let start = (turn % n as u64) as usize;
                idx.rotate_left(start);
            }
        }
        RoutingPolicy::Random => idx.shuffle(&mut rand::thread_rng()),
        RoutingPolicy::LeastLoaded => least_loaded(&mut idx),
        RoutingPolicy::PrefixAffinity => {
            least_loaded(&mut idx);
            let loads: Vec<u64> = hosts.iter().map(load_of).collect();
            let (min, max) = (
                loads.iter().copied().min().unwrap_or(0),
                loads.iter().copied().max().unwrap_or(0),
            );
            let imbalanced =
                max.saturating_sub(min) > BALANCE_ABS && max as f64 > BALANCE_REL * min as f64;
            let best =
                (0..n).max_by_key(|&i| (hosts[i].cached_tokens, std::cmp::Reverse(loads[i])));
            if !imbalanced
                && let Some(b) = best
                && prompt_tokens > 0
                && hosts[b].cached_tokens as f64 >= CACHE_THRESHOLD * prompt_tokens as f64
            {
                idx.retain(|&i| i != b);
                idx.insert(0, b);
            }
        }
    }
    Some(idx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metainf_protocol::fixtures;

    fn host(name: &str, seqs: u32, cached: u64) -> Host {
        Host {
            name: name.into(),
            hardware: fixtures::cpu_hardware(1),
            price_per_hour: 0.0,
            queue_depth: 0,
            running_jobs: 0,
            power_w: None,
            load: Some(fixtures::host_load(seqs.min(8), seqs.saturating_sub(8), 8)),
            slowdown: 1.0,
            cached_tokens: cached,
        }
    }

    #[test]
    fn each_baseline_orders_the_hosts_as_its_namesake_does() {
        let turn = std::sync::atomic::AtomicU64::new(0);
        let next = || turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hosts = vec![host("b", 2, 0), host("a", 0, 0), host("c", 5, 700)];
        // Round-robin: a, b, c, a, ...
        let firsts: Vec<String> = (0..4)
            .map(|_| {
                let o = order(RoutingPolicy::RoundRobin, &hosts, 800, next()).unwrap();
                hosts[o[0]].name.clone()
            })
            .collect();
        assert_eq!(firsts, ["a", "b", "c", "a"]);
        // Least-loaded: a (0), b (2), c (5).
        let o = order(RoutingPolicy::LeastLoaded, &hosts, 800, 0).unwrap();
        assert_eq!(o, [1, 0, 2]);
        // Prefix-affinity: c holds 700 of 800 tokens and loads are in balance.
        let o = order(RoutingPolicy::PrefixAffinity, &hosts, 800, 0).unwrap();
        assert_eq!(o[0], 2);
        // ... not when its cache covers under half the prompt.
        let o = order(RoutingPolicy::PrefixAffinity, &hosts, 2000, 0).unwrap();
        assert_eq!(o[0], 1);
        // ... nor when c is far busier than a: least-loaded then.
        let busy = vec![host("b", 2, 0), host("a", 0, 0), host("c", 20, 700)];
        let o = order(RoutingPolicy::PrefixAffinity, &busy, 800, 0).unwrap();
        assert_eq!(o, [1, 0, 2]);
        // Random: every host, once.
        let mut o = order(RoutingPolicy::Random, &hosts, 800, 0).unwrap();
        o.sort_unstable();
        assert_eq!(o, [0, 1, 2]);
        assert!(order(RoutingPolicy::Metainf, &hosts, 800, 0).is_none());
    }

    #[test]
    fn policies_parse_by_name() {
        for p in RoutingPolicy::ALL {
            assert_eq!(p.name().parse::<RoutingPolicy>(), Ok(p));
        }
        assert!(
            "fastest"
                .parse::<RoutingPolicy>()
                .unwrap_err()
                .contains("least-loaded")
        );
    }
}
