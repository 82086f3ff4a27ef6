//! The anti-entropy protocol `/metainf/sync/1` over request-response: peers exchange version
//! vectors, then pull the records they lack in bounded pages.
//!
//! Frames are a 4-byte big-endian length followed by a `metainf_protocol::codec` message; the
//! length is checked against the limit before anything is read.

use std::collections::BTreeMap;
use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use metainf_protocol::{MAX_MESSAGE_BYTES, PeerId, SignedRecord, codec};
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
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SyncCodec;

async fn read_frame<T, M>(io: &mut T) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: serde::de::DeserializeOwned,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sync frame of {len} bytes exceeds {MAX_MESSAGE_BYTES}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    codec::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<T, M>(io: &mut T, message: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: Serialize,
{
    let bytes =
        codec::encode(message).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl libp2p::request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: SyncRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: SyncResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

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
            SyncCodec
                .write_request(&PROTOCOL, &mut buf, req.clone())
                .await
                .unwrap();
            let mut rd = Cursor::new(buf.into_inner());
            assert_eq!(
                SyncCodec.read_request(&PROTOCOL, &mut rd).await.unwrap(),
                req
            );

            let mut huge = (u32::MAX).to_be_bytes().to_vec();
            huge.extend_from_slice(&[0; 16]);
            let err = SyncCodec
                .read_request(&PROTOCOL, &mut Cursor::new(huge))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("exceeds"));
            let mut garbage = 5u32.to_be_bytes().to_vec();
            garbage.extend_from_slice(&[1, 9, 9, 9, 9]);
            assert!(
                SyncCodec
                    .read_request(&PROTOCOL, &mut Cursor::new(garbage))
                    .await
                    .is_err()
            );
        });
    }
}
