//! The anti-entropy protocol `/metainf/sync/2` over request-response.
//!
//! Version vectors are compared by range digest, so a round costs each pair of peers a few
//! kilobytes however many origins the network has: origins fall into [`SUMMARY_BUCKETS`] buckets
//! by a hash of their id; peers exchange one digest per bucket ([`SyncRequest::Digests`]), page
//! through each other's entries only in the buckets whose digests differ
//! ([`SyncRequest::Summary`], at most [`MAX_SUMMARY`] entries a page), then pull the records
//! they lack in bounded pages ([`SyncRequest::Pull`]). Proofs of equivocation are exchanged in
//! pages when the peers' sets of convicted origins differ ([`SyncRequest::Evidence`]).
//!
//! Everything a peer answers is checked before it costs anything: summary entries must lie in
//! the bucket asked for and after the cursor, pages must advance, and a peer whose summaries
//! promise records its pages then lack is stopped being asked (see `anti_entropy.rs`).

use std::collections::BTreeMap;

use libp2p::StreamProtocol;
use metainf_protocol::{ContentId, Equivocation, PeerId, SignedRecord};
use serde::{Deserialize, Serialize};

/// Protocol name.
pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new("/metainf/sync/2");

/// Most records in one page.
pub const MAX_PAGE: u32 = 2048;
/// Most proofs of equivocation in one page (each at most
/// [`metainf_protocol::MAX_EVIDENCE_BYTES`], so a page stays within the frame limit).
pub const MAX_EVIDENCE_PAGE: usize = 16;
/// Buckets of the version vector's range digests.
pub const SUMMARY_BUCKETS: usize = 256;
/// Most version-vector entries in one summary page.
pub const MAX_SUMMARY: usize = 4096;

/// A request of the sync protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// "What are the digests of your version vector, bucket by bucket?"
    Digests,
    /// "Send me your version-vector entries of `bucket` after `after`."
    Summary {
        /// The bucket ([`bucket_of`]).
        bucket: u8,
        /// Continue after this origin.
        after: Option<PeerId>,
    },
    /// "Send me `origin`'s records after `after`, at most `limit` of them."
    Pull {
        /// Whose records.
        origin: PeerId,
        /// Highest seq the requester already has contiguously.
        after: u64,
        /// Page size (capped at [`MAX_PAGE`]).
        limit: u32,
    },
    /// "Send me your proofs of equivocation of origins after `after`, unless the set of
    /// origins you convicted hashes to `digest`" (checked only on the first page).
    Evidence {
        /// [`convicted_digest`] of the requester's convicted origins.
        digest: ContentId,
        /// Continue after this origin.
        after: Option<PeerId>,
    },
}

/// A response of the sync protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SyncResponse {
    /// One digest per bucket ([`bucket_digests`]): exactly [`SUMMARY_BUCKETS`] of them.
    Digests(Vec<ContentId>),
    /// Version-vector entries of one bucket, in origin order.
    Summary {
        /// Origin → (highest contiguous seq, chain hash of those records); at most
        /// [`MAX_SUMMARY`] entries.
        vector: BTreeMap<PeerId, VersionEntry>,
        /// Continue after this origin, if there are more.
        next_after: Option<PeerId>,
    },
    /// A page of one origin's records, in seq order.
    Page {
        /// The records (verified by the receiver before it stores them).
        records: Vec<SignedRecord>,
        /// Continue after this seq, if there are more.
        next_after: Option<u64>,
    },
    /// Proofs of equivocation in origin order (checked by the receiver).
    Evidence {
        /// At most [`MAX_EVIDENCE_PAGE`] proofs.
        proofs: Vec<Equivocation>,
        /// Continue after this origin, if there are more.
        next_after: Option<PeerId>,
    },
    /// The request could not be served.
    Error(String),
}

/// One origin's entry in a version vector: how many of its records are held without gaps, and
/// the chain hash of their ids (equal entries, equal records).
pub type VersionEntry = (u64, ContentId);

/// The bucket of an origin: the first byte of a hash of its id, so that buckets fill evenly
/// whatever the ids look like.
pub fn bucket_of(origin: &PeerId) -> u8 {
    ContentId::of_bytes("metainf sync bucket", &origin.to_bytes()).0[0]
}

/// The digest of each bucket of a version vector: equal entries, equal digests.
pub fn bucket_digests(vector: &BTreeMap<PeerId, VersionEntry>) -> Vec<ContentId> {
    let mut bytes: Vec<Vec<u8>> = vec![Vec::new(); SUMMARY_BUCKETS];
    for (origin, (seq, chain)) in vector {
        let b = &mut bytes[usize::from(bucket_of(origin))];
        let id = origin.to_bytes();
        b.extend_from_slice(&(id.len() as u64).to_le_bytes());
        b.extend_from_slice(&id);
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(chain.as_bytes());
    }
    bytes
        .iter()
        .map(|b| ContentId::of_bytes("metainf sync digest", b))
        .collect()
}

/// The entries of `bucket` after `after`, one page of them, and where the next page starts.
pub fn summary_page(
    vector: &BTreeMap<PeerId, VersionEntry>,
    bucket: u8,
    after: Option<PeerId>,
) -> (BTreeMap<PeerId, VersionEntry>, Option<PeerId>) {
    summary_page_of(vector, bucket, after, MAX_SUMMARY)
}

fn summary_page_of(
    vector: &BTreeMap<PeerId, VersionEntry>,
    bucket: u8,
    after: Option<PeerId>,
    limit: usize,
) -> (BTreeMap<PeerId, VersionEntry>, Option<PeerId>) {
    let mut rest = vector
        .iter()
        .filter(|(o, _)| after.is_none_or(|a| **o > a) && bucket_of(o) == bucket);
    let page: BTreeMap<PeerId, VersionEntry> =
        rest.by_ref().take(limit).map(|(o, s)| (*o, *s)).collect();
    let next_after = rest.next().and(page.keys().next_back().copied());
    (page, next_after)
}

/// The digest of a set of convicted origins, for [`SyncRequest::Evidence`]: equal sets, equal
/// digests, and nothing else is sent.
pub fn convicted_digest<'a>(origins: impl IntoIterator<Item = &'a PeerId>) -> ContentId {
    let mut sorted: Vec<&PeerId> = origins.into_iter().collect();
    sorted.sort();
    let mut bytes = Vec::with_capacity(sorted.len() * 40);
    for o in sorted {
        let b = o.to_bytes();
        bytes.extend_from_slice(&(b.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&b);
    }
    ContentId::of_bytes("metainf convicted origins v1", &bytes)
}

/// The request-response codec of the sync protocol.
pub(crate) type SyncCodec = super::frame::FrameCodec<SyncRequest, SyncResponse>;

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    #[test]
    fn digests_differ_only_in_the_buckets_that_differ_and_pages_cover_a_bucket() {
        let origins: Vec<PeerId> = (0..6000).map(|_| PeerId::random()).collect();
        let chain = ContentId([7; 32]);
        let ours: BTreeMap<PeerId, VersionEntry> =
            origins.iter().map(|o| (*o, (5, chain))).collect();
        let mut theirs = ours.clone();
        theirs.insert(origins[7], (6, chain));
        // The same seq with another chain is a difference too.
        let mut forked = ours.clone();
        forked.insert(origins[7], (5, ContentId([8; 32])));
        assert_ne!(bucket_digests(&forked), bucket_digests(&ours));
        let (a, b) = (bucket_digests(&ours), bucket_digests(&theirs));
        assert_eq!(a.len(), SUMMARY_BUCKETS);
        let differing: Vec<usize> = (0..SUMMARY_BUCKETS).filter(|&i| a[i] != b[i]).collect();
        assert_eq!(differing, vec![usize::from(bucket_of(&origins[7]))]);
        // Paging through one bucket, 3 entries a page, visits each of its entries once.
        let bucket = bucket_of(&origins[7]);
        let mut seen = BTreeMap::new();
        let (mut after, mut pages) = (None, 0);
        loop {
            let (page, next) = summary_page_of(&theirs, bucket, after, 3);
            assert!(page.len() <= 3 && page.keys().all(|o| bucket_of(o) == bucket));
            seen.extend(page);
            pages += 1;
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let expected: BTreeMap<PeerId, VersionEntry> = theirs
            .iter()
            .filter(|(o, _)| bucket_of(o) == bucket)
            .map(|(o, s)| (*o, *s))
            .collect();
        assert!(
            expected.len() > 3,
            "6000 origins put more than 3 in a bucket"
        );
        assert_eq!(seen, expected);
        assert_eq!(pages, expected.len().div_ceil(3));
    }

    #[test]
    fn frames_round_trip_and_oversized_frames_are_refused_unread() {
        futures::executor::block_on(async {
            let mut buf = Cursor::new(Vec::new());
            let req = SyncRequest::Pull {
                origin: PeerId::random(),
                after: 7,
                limit: 100,
            };
            SyncCodec::default()
                .write_request(&PROTOCOL, &mut buf, req.clone())
                .await
                .unwrap();
            let mut rd = Cursor::new(buf.into_inner());
            assert_eq!(
                SyncCodec::default()
                    .read_request(&PROTOCOL, &mut rd)
                    .await
                    .unwrap(),
                req
            );

            let mut huge = (u32::MAX).to_be_bytes().to_vec();
            huge.extend_from_slice(&[0; 16]);
            let err = SyncCodec::default()
                .read_request(&PROTOCOL, &mut Cursor::new(huge))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("exceeds"));
            let mut garbage = 5u32.to_be_bytes().to_vec();
            garbage.extend_from_slice(&[1, 9, 9, 9, 9]);
            assert!(
                SyncCodec::default()
                    .read_request(&PROTOCOL, &mut Cursor::new(garbage))
                    .await
                    .is_err()
            );
        });
    }
}
