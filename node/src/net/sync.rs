//! The anti-entropy protocol `/metainf/sync/1` over request-response: peers exchange version
//! vectors, then pull the records they lack in bounded pages.
//!
//! Frames: see [`super::frame`].

use std::collections::BTreeMap;

use libp2p::StreamProtocol;
use metainf_protocol::{PeerId, SignedRecord};
use serde::{Deserialize, Serialize};

/// Protocol name.
pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new("/metainf/sync/1");

/// Most records in one page.
pub const MAX_PAGE: u32 = 2048;

/// A request of the sync protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// "Here is what I have; what do you have?"
    Summary {
        /// The requester's version vector.
        vector: BTreeMap<PeerId, u64>,
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
}

/// A response of the sync protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SyncResponse {
    /// The responder's version vector.
    Summary {
        /// Origin → highest contiguous seq.
        vector: BTreeMap<PeerId, u64>,
    },
    /// A page of one origin's records, in seq order.
    Page {
        /// The records (verified by the receiver before it stores them).
        records: Vec<SignedRecord>,
        /// Continue after this seq, if there are more.
        next_after: Option<u64>,
    },
    /// The request could not be served.
    Error(String),
}

/// The request-response codec of the sync protocol.
pub(crate) type SyncCodec = super::frame::FrameCodec<SyncRequest, SyncResponse>;

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

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
