//! Proof of equivocation: two different records an origin signed under one sequence number.
//!
//! An origin's records are identified by (origin, seq); an honest node never signs two records
//! with one seq, so two valid signatures over different records with the same (origin, seq) prove
//! that the origin lies to some peers. Anyone can check the proof without trusting whoever
//! relayed it, so it travels like a record (gossip and anti-entropy), and every node that holds
//! it stops accepting the origin. The two records are kept in a canonical order (by record id),
//! so every node stores the same bytes for the same proof.

use serde::{Deserialize, Serialize};

use crate::codec::{self, MAX_RECORD_BYTES};
use crate::error::{ProtocolError, Result};
use crate::record::{SignedRecord, VerifiedRecord};
use crate::{PeerId, RecordId};

/// Largest encoded proof: two records at their limit, and a little framing.
pub const MAX_EVIDENCE_BYTES: usize = 2 * MAX_RECORD_BYTES + 64;

/// Two records signed by one origin under one seq, unchecked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Equivocation {
    /// The record with the smaller id.
    pub first: SignedRecord,
    /// The record with the larger id.
    pub second: SignedRecord,
}

impl Equivocation {
    /// Verifies both records and that they convict their origin: same origin, same seq,
    /// different content, in canonical order.
    pub fn verify(self) -> Result<VerifiedEquivocation> {
        let first = self.first.verify()?;
        let second = self.second.verify()?;
        VerifiedEquivocation::new(first, second)
    }

    /// Encodes for the wire, refusing proofs over [`MAX_EVIDENCE_BYTES`].
    pub fn to_wire(&self) -> Result<Vec<u8>> {
        codec::encode_with_limit(self, MAX_EVIDENCE_BYTES)
    }

    /// Decodes from the wire (size-checked first). The result is not yet verified.
    pub fn from_wire(bytes: &[u8]) -> Result<Self> {
        codec::decode_with_limit(bytes, MAX_EVIDENCE_BYTES)
    }
}

/// A checked proof that `origin` signed two different records under `seq`.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedEquivocation {
    first: VerifiedRecord,
    second: VerifiedRecord,
}

impl VerifiedEquivocation {
    /// Builds the proof from two verified records, in either order. Fails unless they share
    /// origin and seq and differ in content.
    pub fn new(a: VerifiedRecord, b: VerifiedRecord) -> Result<Self> {
        if a.origin() != b.origin() {
            return Err(ProtocolError::invalid(
                "evidence",
                "the records have different origins",
            ));
        }
        if a.seq() != b.seq() {
            return Err(ProtocolError::invalid(
                "evidence",
                format!(
                    "the records have different seqs ({} and {})",
                    a.seq(),
                    b.seq()
                ),
            ));
        }
        let (first, second) = match a.id().cmp(&b.id()) {
            std::cmp::Ordering::Less => (a, b),
            std::cmp::Ordering::Greater => (b, a),
            std::cmp::Ordering::Equal => {
                return Err(ProtocolError::invalid(
                    "evidence",
                    "the two records are the same record",
                ));
            }
        };
        Ok(Self { first, second })
    }

    /// The convicted origin.
    pub fn origin(&self) -> PeerId {
        self.first.origin()
    }

    /// The seq it signed twice.
    pub fn seq(&self) -> u64 {
        self.first.seq()
    }

    /// The ids of the two records, smaller first.
    pub fn ids(&self) -> [RecordId; 2] {
        [self.first.id(), self.second.id()]
    }

    /// The unchecked form, for the wire.
    pub fn to_unverified(&self) -> Equivocation {
        Equivocation {
            first: self.first.signed().clone(),
            second: self.second.signed().clone(),
        }
    }

    /// Encodes for the wire and the store (the same bytes on every node).
    pub fn to_wire(&self) -> Result<Vec<u8>> {
        self.to_unverified().to_wire()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use crate::fixtures;

    fn signed(key: &Keypair, seq: u64, variant: u64) -> SignedRecord {
        fixtures::signed(key, seq, variant)
    }

    #[test]
    fn two_records_under_one_seq_convict_their_origin_in_either_order() {
        let key = Keypair::generate_ed25519();
        let (a, b) = (signed(&key, 3, 1), signed(&key, 3, 2));
        let e1 =
            VerifiedEquivocation::new(a.clone().verify().unwrap(), b.clone().verify().unwrap())
                .unwrap();
        let e2 = VerifiedEquivocation::new(b.verify().unwrap(), a.verify().unwrap()).unwrap();
        assert_eq!(e1.to_wire().unwrap(), e2.to_wire().unwrap());
        assert_eq!(e1.origin(), key.public().to_peer_id());
        assert_eq!(e1.seq(), 3);
        let back = Equivocation::from_wire(&e1.to_wire().unwrap()).unwrap();
        assert_eq!(back.verify().unwrap(), e1);
    }

    #[test]
    fn what_is_no_proof_is_refused() {
        let key = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let a = signed(&key, 3, 1);
        // The same record twice, two seqs, two origins.
        for (x, y) in [
            (a.clone(), a.clone()),
            (a.clone(), signed(&key, 4, 2)),
            (a.clone(), signed(&other, 3, 2)),
        ] {
            let proof = Equivocation {
                first: x,
                second: y,
            };
            assert!(proof.verify().is_err());
        }
        // A forged second record: the signature does not cover the changed value.
        let mut forged = a.clone();
        forged.record.measured_at_ms += 1;
        assert!(
            Equivocation {
                first: a.clone(),
                second: forged
            }
            .verify()
            .is_err()
        );
        // Out of canonical order on the wire is refused by `verify` only if it does not
        // convict: order does not matter to the check, the stored form is canonical.
        let b = signed(&key, 3, 2);
        let proof = Equivocation {
            first: b,
            second: a,
        };
        assert!(proof.verify().is_ok());
        assert!(Equivocation::from_wire(&[1; 10]).is_err());
        let huge = vec![1u8; MAX_EVIDENCE_BYTES + 1];
        assert!(matches!(
            Equivocation::from_wire(&huge),
            Err(ProtocolError::TooLarge { .. })
        ));
    }
}
