//! The versioned wire codec: one version byte, then the bincode 2 encoding of the value.
//!
//! Every decode checks the size against a limit *before* looking at the payload, checks the
//! version byte, decodes with bincode's allocation limit, and refuses trailing bytes. Decoding
//! arbitrary bytes returns an error and never panics (see the property tests and the fuzz target).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ProtocolError, Result};

/// The wire format version this build writes and reads.
pub const WIRE_VERSION: u8 = 1;

/// Largest message of any kind (a page of records during anti-entropy, a batch job).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Largest single signed performance record.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_MESSAGE_BYTES>,
>;

const fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// The canonical encoding of a value (no version byte): the bytes that content ids and
/// signatures are computed over. Maps in protocol types are `BTreeMap`s, so it is deterministic.
pub fn canonical_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| ProtocolError::Encode(e.to_string()))
}

/// Encodes a value for the wire: the version byte followed by its canonical encoding.
///
/// Fails if the result would exceed [`MAX_MESSAGE_BYTES`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    encode_with_limit(value, MAX_MESSAGE_BYTES)
}

/// Like [`encode`], with a tighter limit (for example [`MAX_RECORD_BYTES`]).
pub fn encode_with_limit<T: Serialize + ?Sized>(value: &T, max: usize) -> Result<Vec<u8>> {
    let body = canonical_bytes(value)?;
    let size = body.len() + 1;
    if size > max {
        return Err(ProtocolError::TooLarge { size, max });
    }
    let mut out = Vec::with_capacity(size);
    out.push(WIRE_VERSION);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a wire message of at most [`MAX_MESSAGE_BYTES`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    decode_with_limit(bytes, MAX_MESSAGE_BYTES)
}

/// Decodes a wire message, refusing it unread if it is larger than `max` bytes.
pub fn decode_with_limit<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T> {
    let max = max.min(MAX_MESSAGE_BYTES);
    if bytes.len() > max {
        return Err(ProtocolError::TooLarge {
            size: bytes.len(),
            max,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(ProtocolError::Empty)?;
    if version != WIRE_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            found: version,
            supported: WIRE_VERSION,
        });
    }
    let (value, read) = bincode::serde::decode_from_slice::<T, _>(body, config())
        .map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if read != body.len() {
        return Err(ProtocolError::TrailingBytes(body.len() - read));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_byte() {
        let value = (7u64, String::from("hello"), vec![1.5f64, 2.5]);
        let bytes = encode(&value).unwrap();
        assert_eq!(bytes[0], WIRE_VERSION);
        let back: (u64, String, Vec<f64>) = decode(&bytes).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn refuses_other_versions_trailing_bytes_and_oversize() {
        let mut bytes = encode(&42u32).unwrap();
        bytes[0] = WIRE_VERSION + 1;
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(ProtocolError::UnsupportedVersion { .. })
        ));
        let mut bytes = encode(&42u32).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(ProtocolError::TrailingBytes(1))
        ));
        let big = vec![0u8; 1000];
        let bytes = encode(&big).unwrap();
        assert!(matches!(
            decode_with_limit::<Vec<u8>>(&bytes, 100),
            Err(ProtocolError::TooLarge { max: 100, .. })
        ));
        assert!(matches!(decode::<u32>(&[]), Err(ProtocolError::Empty)));
        assert!(matches!(
            encode_with_limit(&big, 10),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn huge_length_prefix_is_an_error_not_an_allocation() {
        // version, then a varint length claiming u64::MAX elements.
        let bytes = [WIRE_VERSION, 253, 255, 255, 255, 255, 255, 255, 255, 255];
        assert!(decode::<Vec<u64>>(&bytes).is_err());
        assert!(decode::<String>(&bytes).is_err());
    }
}
