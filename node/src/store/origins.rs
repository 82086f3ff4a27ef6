//! Replication state: per origin, how far its records are stored without gaps and the highest
//! seq seen (the version vector of anti-entropy), and the hardware profiles records name.

use std::collections::BTreeMap;

use metainf_protocol::{ContentId, HardwareId, HardwareProfile, PeerId, codec};
use serde::{Deserialize, Serialize};

use super::{CF_HARDWARE, CF_ORIGINS, Result, Store, corrupt, keys};

/// Per-origin replication state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginState {
    /// Every seq in 1..=contiguous is stored.
    pub contiguous: u64,
    /// Highest seq stored (above `contiguous` when there are gaps).
    pub max: u64,
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
                Some((peer, (contiguous, max))) => {
                    out.insert(peer, OriginState { contiguous, max });
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
            .map(|(contiguous, max)| OriginState { contiguous, max })
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
