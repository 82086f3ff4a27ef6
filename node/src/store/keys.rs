//! Key layouts of the column families. All integers are big-endian so keys sort numerically.

use metainf_protocol::{CellIds, ContentId, PeerId, RecordId};

/// Length of a primary record key: hardware ‖ model ‖ workload ‖ method ‖ record id.
pub(crate) const RECORD_KEY_LEN: usize = 5 * ContentId::LEN;

/// The primary key of a record in `records`.
pub(crate) fn record_key(cell: &CellIds, id: &RecordId) -> [u8; RECORD_KEY_LEN] {
    let mut key = [0u8; RECORD_KEY_LEN];
    for (i, part) in [cell.hardware, cell.model, cell.workload, cell.method, *id]
        .iter()
        .enumerate()
    {
        key[i * 32..(i + 1) * 32].copy_from_slice(part.as_bytes());
    }
    key
}

/// The cell part of a primary key, or `None` if the key has the wrong length.
pub(crate) fn cell_of_key(key: &[u8]) -> Option<CellIds> {
    if key.len() != RECORD_KEY_LEN {
        return None;
    }
    let part = |i: usize| ContentId::from_slice(&key[i * 32..(i + 1) * 32]).ok();
    Some(CellIds {
        hardware: part(0)?,
        model: part(1)?,
        workload: part(2)?,
        method: part(3)?,
    })
}

/// Prefix of `by_origin` keys of one origin: its length, then its bytes.
pub(crate) fn origin_prefix(origin: &PeerId) -> Vec<u8> {
    let bytes = origin.to_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 9);
    // Peer ids are at most 42 bytes (identity multihash of an ed25519 key is 38).
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(&bytes);
    out
}

/// `by_origin` key: origin prefix ‖ seq.
pub(crate) fn origin_seq_key(origin: &PeerId, seq: u64) -> Vec<u8> {
    let mut key = origin_prefix(origin);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Splits a `by_origin` key back into origin and seq.
pub(crate) fn parse_origin_seq_key(key: &[u8]) -> Option<(PeerId, u64)> {
    let (&len, rest) = key.split_first()?;
    let len = usize::from(len);
    if rest.len() != len + 8 {
        return None;
    }
    let origin = PeerId::from_bytes(&rest[..len]).ok()?;
    let seq = u64::from_be_bytes(rest[len..].try_into().ok()?);
    Some((origin, seq))
}

/// Secondary index key: the indexed id ‖ primary key.
pub(crate) fn index_key(id: &ContentId, primary: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(32 + primary.len());
    key.extend_from_slice(id.as_bytes());
    key.extend_from_slice(primary);
    key
}

/// The smallest key greater than every key that starts with `prefix`, or `None` if there is
/// none (the prefix is all 0xff).
pub(crate) fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut bound = prefix.to_vec();
    while let Some(last) = bound.pop() {
        if last < u8::MAX {
            bound.push(last + 1);
            return Some(bound);
        }
    }
    None
}

/// Value of the `origins` column family: highest contiguous seq and highest seq seen.
pub(crate) fn encode_origin_state(contiguous: u64, max: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&contiguous.to_be_bytes());
    v[8..].copy_from_slice(&max.to_be_bytes());
    v
}

pub(crate) fn decode_origin_state(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() != 16 {
        return None;
    }
    let contiguous = u64::from_be_bytes(v[..8].try_into().ok()?);
    let max = u64::from_be_bytes(v[8..].try_into().ok()?);
    Some((contiguous, max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metainf_protocol::Keypair;

    #[test]
    fn origin_keys_round_trip_and_sort_by_seq() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let a = origin_seq_key(&peer, 2);
        let b = origin_seq_key(&peer, 256);
        assert!(a < b);
        assert_eq!(parse_origin_seq_key(&b), Some((peer, 256)));
        assert_eq!(parse_origin_seq_key(&b[1..]), None);
        assert!(b.starts_with(&origin_prefix(&peer)));
    }

    #[test]
    fn upper_bounds() {
        assert_eq!(prefix_upper_bound(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_upper_bound(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_upper_bound(&[255, 255]), None);
        assert_eq!(
            decode_origin_state(&encode_origin_state(3, 9)),
            Some((3, 9))
        );
    }
}
