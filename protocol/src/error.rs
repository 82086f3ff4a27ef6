//! The one error type of the protocol crate.

use libp2p_identity::PeerId;

/// Everything that can go wrong while encoding, decoding, signing or validating protocol data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The message is larger than the limit for its kind; it was not decoded.
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the message in bytes.
        size: usize,
        /// The limit that applied.
        max: usize,
    },
    /// The message has no bytes at all.
    #[error("empty message")]
    Empty,
    /// The version byte names a wire format this build does not speak.
    #[error("unsupported wire version {found} (this node speaks version {supported})")]
    UnsupportedVersion {
        /// Version byte found in the message.
        found: u8,
        /// Version this build encodes and decodes.
        supported: u8,
    },
    /// The payload could not be decoded as the expected type.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The payload decoded but bytes were left over.
    #[error("malformed message: {0} trailing bytes after the payload")]
    TrailingBytes(usize),
    /// A value could not be encoded (for example it exceeds the size limit).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The signer's public key could not be decoded.
    #[error("invalid signer key: {0}")]
    InvalidKey(String),
    /// The record is signed by a key that is not the record's origin.
    #[error("record claims origin {origin} but is signed by {signer}")]
    SignerNotOrigin {
        /// Peer id derived from the signing key.
        signer: Box<PeerId>,
        /// Origin the record claims.
        origin: Box<PeerId>,
    },
    /// The signature does not verify against the signer's key.
    #[error("signature does not verify")]
    BadSignature,
    /// Signing failed (the key cannot sign, or does not belong to the record's origin).
    #[error("cannot sign: {0}")]
    Signing(String),
    /// A field holds a value outside its sane range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Dotted path of the offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl ProtocolError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ProtocolError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Result alias of the protocol crate.
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;
