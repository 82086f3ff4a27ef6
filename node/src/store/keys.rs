//! Key layouts of the column families. All integers are big-endian so keys sort numerically.

use metainf_protocol::{CellIds, ContentId, PeerId, RecordId};

/// Bytes of a content id kept in keys: 128 bits. Two descriptors of one cell colliding would
/// need a 2^128 second preimage; full record ids stay in `by_origin` values.
pub(crate) const SHORT: usize = 16;
/// Length of the cell part of a primary key: hardware ‖ model ‖ workload ‖ method.
pub(crate) const CELL_LEN: usize = 4 * SHORT;
/// Length of a primary record key: cell ‖ record id (both truncated).
pub(crate) const RECORD_KEY_LEN: usize = CELL_LEN + SHORT;
/// Length of a `by_origin` value: cell ‖ full record id.
pub(crate) const ORIGIN_VALUE_LEN: usize = CELL_LEN + ContentId::LEN;

/// The truncated form of an id used in keys.
pub(crate) fn short(id: &ContentId) -> &[u8] {
    &id.as_bytes()[..SHORT]
}

/// The cell part of a primary key, as stored (truncated ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct KeyCell(pub(crate) [u8; CELL_LEN]);

impl KeyCell {
    pub(crate) fn of(cell: &CellIds) -> Self {
        let mut out = [0u8; CELL_LEN];
        for (i, part) in [cell.hardware, cell.model, cell.workload, cell.method]
            .iter()
            .enumerate()
        {
            out[i * SHORT..(i + 1) * SHORT].copy_from_slice(short(part));
        }
        KeyCell(out)
    }

    /// Dimension `i` (0 hardware, 1 model, 2 workload, 3 method).
    pub(crate) fn part(&self, i: usize) -> &[u8] {
        &self.0[i * SHORT..(i + 1) * SHORT]
    }
}

/// The primary key of a record in `records`.
pub(crate) fn record_key(cell: &KeyCell, id: &RecordId) -> [u8; RECORD_KEY_LEN] {
    let mut key = [0u8; RECORD_KEY_LEN];
    key[..CELL_LEN].copy_from_slice(&cell.0);
    key[CELL_LEN..].copy_from_slice(short(id));
    key
}

/// The cell part of a primary key, or `None` if the key has the wrong length.
pub(crate) fn cell_of_key(key: &[u8]) -> Option<KeyCell> {
    if key.len() != RECORD_KEY_LEN {
        return None;
    }
    Some(KeyCell(key[..CELL_LEN].try_into().ok()?))
}

/// The `by_origin` value of a record: its cell and full id.
pub(crate) fn origin_value(cell: &KeyCell, id: &RecordId) -> [u8; ORIGIN_VALUE_LEN] {
    let mut v = [0u8; ORIGIN_VALUE_LEN];
    v[..CELL_LEN].copy_from_slice(&cell.0);
    v[CELL_LEN..].copy_from_slice(id.as_bytes());
    v
}

/// Splits a `by_origin` value into the primary key and the full record id.
pub(crate) fn parse_origin_value(v: &[u8]) -> Option<([u8; RECORD_KEY_LEN], RecordId)> {
    if v.len() != ORIGIN_VALUE_LEN {
        return None;
    }
    let id = ContentId::from_slice(&v[CELL_LEN..]).ok()?;
    let cell = KeyCell(v[..CELL_LEN].try_into().ok()?);
    Some((record_key(&cell, &id), id))
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

/// Secondary index key: the indexed (truncated) id ‖ a cell.
pub(crate) fn index_key(id: &[u8], primary: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + primary.len());
    key.extend_from_slice(id);
    key.extend_from_slice(primary);
    key
}

/// The cell of an index key (indexed id ‖ cell).
pub(crate) fn cell_of_index_key(key: &[u8]) -> Option<KeyCell> {
    if key.len() != SHORT + CELL_LEN {
        return None;
    }
    Some(KeyCell(key[SHORT..].try_into().ok()?))
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

/// Value of the `origins` column family: highest contiguous seq, highest seq seen, and the
/// chain hash of the contiguous records' ids.
pub(crate) fn encode_origin_state(contiguous: u64, max: u64, chain: &[u8; 32]) -> [u8; 48] {
    let mut v = [0u8; 48];
    v[..8].copy_from_slice(&contiguous.to_be_bytes());
    v[8..16].copy_from_slice(&max.to_be_bytes());
    v[16..].copy_from_slice(chain);
    v
}

/// (contiguous, max, chain); the chain is `None` in the 16-byte values of stores written before
/// it existed (rebuilt when the store opens).
pub(crate) fn decode_origin_state(v: &[u8]) -> Option<(u64, u64, Option<[u8; 32]>)> {
    if v.len() != 16 && v.len() != 48 {
        return None;
    }
    let contiguous = u64::from_be_bytes(v[..8].try_into().ok()?);
    let max = u64::from_be_bytes(v[8..16].try_into().ok()?);
    let chain = if v.len() == 48 {
        Some(v[16..].try_into().ok()?)
    } else {
        None
    };
    Some((contiguous, max, chain))
}

/// The chain hash after one more record: H(previous ‖ id). Two replicas with the same chain at
/// the same seq hold the same records; any difference below means an equivocation.
pub(crate) fn chain_next(previous: &[u8; 32], id: &RecordId) -> [u8; 32] {
    let mut bytes = [0u8; 64];
    bytes[..32].copy_from_slice(previous);
    bytes[32..].copy_from_slice(id.as_bytes());
    ContentId::of_bytes("metainf origin chain", &bytes).0
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
            decode_origin_state(&encode_origin_state(3, 9, &[5; 32])),
            Some((3, 9, Some([5; 32])))
        );
    }

    #[test]
    fn origin_values_give_back_the_primary_key_and_full_id() {
        let id = |b: u8| ContentId([b; 32]);
        let cell = KeyCell::of(&CellIds {
            hardware: id(1),
            model: id(2),
            workload: id(3),
            method: id(4),
        });
        let record = id(9);
        let (primary, full) = parse_origin_value(&origin_value(&cell, &record)).unwrap();
        assert_eq!(primary, record_key(&cell, &record));
        assert_eq!(full, record);
        assert_eq!(cell_of_key(&primary), Some(cell));
        assert_eq!(cell.part(2), &[3u8; SHORT][..]);
        assert!(parse_origin_value(&[0u8; 10]).is_none());
    }
}
