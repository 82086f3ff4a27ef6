//! Replication state: per origin, how far its records are stored without gaps and the highest
//! seq seen (the version vector of anti-entropy), and the hardware profiles records name.

use std::collections::BTreeMap;

use metainf_protocol::{ContentId, HardwareId, HardwareProfile, PeerId, codec};
use rocksdb::{DB, Direction, IteratorMode, ReadOptions};
use serde::{Deserialize, Serialize};

use super::{CF_BY_ORIGIN, CF_HARDWARE, CF_ORIGINS, Result, Store, cf, corrupt, keys};

/// Per-origin replication state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginState {
    /// Every seq in 1..=contiguous is stored.
    pub contiguous: u64,
    /// Highest seq stored (above `contiguous` when there are gaps).
    pub max: u64,
    /// Chain hash of the ids of records 1..=contiguous ([`keys::chain_next`]; zeros for none).
    pub chain: [u8; 32],
}

/// An origin's replication state recomputed from its `by_origin` entries.
pub(super) fn scan_origin_state(db: &DB, origin: &PeerId) -> Result<OriginState> {
    let prefix = keys::origin_prefix(origin);
    let mut opts = ReadOptions::default();
    if let Some(upper) = keys::prefix_upper_bound(&prefix) {
        opts.set_iterate_upper_bound(upper);
    }
    let mut state = OriginState::default();
    let iter = db.iterator_cf_opt(
        cf(db, CF_BY_ORIGIN),
        opts,
        IteratorMode::From(&prefix, Direction::Forward),
    );
    for item in iter {
        let (key, value) = item?;
        if let Some((_, seq)) = keys::parse_origin_seq_key(&key) {
            if seq == state.contiguous + 1
                && let Some((_, id)) = keys::parse_origin_value(&value)
            {
                state.contiguous = seq;
                state.chain = keys::chain_next(&state.chain, &id);
            }
            state.max = state.max.max(seq);
        }
    }
    Ok(state)
}

/// Gives every origin stored before chains existed its chain (once, when the store opens).
pub(super) fn upgrade_chains(db: &DB) -> Result<usize> {
    let mut old = Vec::new();
    for item in db.iterator_cf(cf(db, CF_ORIGINS), IteratorMode::Start) {
        let (key, value) = item?;
        if value.len() == 16
            && let Ok(origin) = PeerId::from_bytes(&key)
        {
            old.push(origin);
        }
    }
    for origin in &old {
        let s = scan_origin_state(db, origin)?;
        db.put_cf(
            cf(db, CF_ORIGINS),
            origin.to_bytes(),
            keys::encode_origin_state(s.contiguous, s.max, &s.chain),
        )?;
    }
    Ok(old.len())
}

impl Store {
    /// The replication state of every origin.
    pub fn origin_states(&self) -> Result<BTreeMap<PeerId, OriginState>> {
        let mut out = BTreeMap::new();
        for item in self.prefix_iter(CF_ORIGINS, &[]) {
            let (key, value) = item?;
            let parsed = PeerId::from_bytes(&key)
                .ok()
                .zip(keys::decode_origin_state(&value));
            match parsed {
                Some((peer, (contiguous, max, chain))) => {
                    let chain = chain.unwrap_or_default();
                    out.insert(
                        peer,
                        OriginState {
                            contiguous,
                            max,
                            chain,
                        },
                    );
                }
                None => {
                    corrupt(CF_ORIGINS, &key, "undecodable origin state");
                }
            }
        }
        Ok(out)
    }

    /// The replication state of one origin (zero when none of its records is stored).
    pub fn origin_state(&self, origin: &PeerId) -> Result<OriginState> {
        Ok(self
            .db()
            .get_pinned_cf(self.cf(CF_ORIGINS), origin.to_bytes())?
            .and_then(|v| keys::decode_origin_state(&v))
            .map(|(contiguous, max, chain)| OriginState {
                contiguous,
                max,
                chain: chain.unwrap_or_default(),
            })
            .unwrap_or_default())
    }

    /// The version vector {origin → highest seq such that every seq up to it is stored}. A peer
    /// that has more of an origin's records sends what lies above; gaps are repaired too, since
    /// the vector never claims a seq it does not have.
    pub fn version_vector(&self) -> Result<BTreeMap<PeerId, u64>> {
        Ok(self
            .origin_states()?
            .into_iter()
            .map(|(peer, state)| (peer, state.contiguous))
            .collect())
    }

    /// The version vector with each origin's chain hash, for anti-entropy: equal (seq, chain)
    /// means equal records, a different chain at the same seq an equivocation somewhere below.
    pub fn version_chains(&self) -> Result<BTreeMap<PeerId, (u64, ContentId)>> {
        Ok(self
            .origin_states()?
            .into_iter()
            .map(|(peer, state)| (peer, (state.contiguous, ContentId(state.chain))))
            .collect())
    }

    /// The latest profile stored for a hardware id.
    pub fn hardware(&self, id: &HardwareId) -> Result<Option<HardwareProfile>> {
        self.get_decoded(CF_HARDWARE, id.as_bytes())
    }

    /// Every hardware profile known.
    pub fn all_hardware(&self) -> Result<Vec<(HardwareId, HardwareProfile)>> {
        let mut out = Vec::new();
        for item in self.prefix_iter(CF_HARDWARE, &[]) {
            let (key, value) = item?;
            match (ContentId::from_slice(&key), codec::decode(&value)) {
                (Ok(id), Ok(p)) => out.push((id, p)),
                (_, Err(e)) => {
                    corrupt(CF_HARDWARE, &key, e);
                }
                (Err(e), _) => {
                    corrupt(CF_HARDWARE, &key, e);
                }
            }
        }
        Ok(out)
    }
}
