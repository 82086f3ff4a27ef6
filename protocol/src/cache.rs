//! What a host's prefix cache holds, told to routers in a few kilobytes: a Bloom filter over the
//! chain hashes of its cached KV blocks.
//!
//! A block's chain hash ([`block_hashes`]) covers every token from the start of the sequence to
//! the block's end, so a router that computes the same hashes over a job's prompt finds how
//! many of its leading tokens the host could serve from its cache: the run of the prompt's
//! blocks, from the first, that the filter holds. A false positive (at most a few per cent at
//! the filter's load) extends a run by one block at most: the next block must match too.
//!
//! Bounded ([`MAX_SUMMARY_BYTES`] of filter, [`MAX_SUMMARY_ENTRIES`] blocks), versioned (the
//! hash scheme is named by [`CACHE_SCHEME`]), and checked in O(1) by [`CacheSummary::validate`].
//! Summaries are hints a host gives about itself: a host that claims blocks it lacks only makes
//! its own jobs slower than it promised, which the gateway's reputation sees.

use serde::{Deserialize, Serialize};

use crate::error::{ProtocolError, Result};
use crate::validate;

/// The hash scheme: blake3 chain hashes of little-endian u32 token ids, 16 bytes.
pub const CACHE_SCHEME: u8 = 1;
/// Largest filter, bytes.
pub const MAX_SUMMARY_BYTES: usize = 8 * 1024;
/// Most blocks a summary covers (the most recently used when a cache holds more).
pub const MAX_SUMMARY_ENTRIES: usize = 8 * 1024;
/// Largest block size, tokens.
pub const MAX_BLOCK_SIZE: u32 = 4096;
/// Bits of filter per block covered (with [`HASHES`], ~2.4 % false positives when full).
const BITS_PER_ENTRY: usize = 8;
/// Bit positions set per block.
const HASHES: u8 = 4;

/// A block's chain hash: the hash of every token from the sequence's start to the block's end.
pub type BlockHash = [u8; 16];

/// Chains a block's tokens onto its predecessor's hash (the engine's prefix cache keys its full
/// blocks by this).
pub fn chain_hash(parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
    keyed_hash("metainf kv prefix block v1", parent, tokens)
}

/// A hash of `tokens` after `parent` in another key space than [`chain_hash`]'s, with the same
/// construction (the engine keys partial blocks by it).
pub fn keyed_hash(context: &str, parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    hasher.update(parent.map_or(&[0u8; 16][..], |p| &p[..]));
    for t in tokens {
        hasher.update(&t.to_le_bytes());
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

/// The chain hashes of every full block of `tokens` (`block_size` tokens each), in order.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len() / block_size);
    for block in tokens.chunks_exact(block_size) {
        let h = chain_hash(out.last(), block);
        out.push(h);
    }
    out
}

/// A host's prefix cache, summarised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSummary {
    /// Hash scheme ([`CACHE_SCHEME`]).
    pub scheme: u8,
    /// The model whose KV it holds.
    pub model: String,
    /// Tokens per block.
    pub block_size: u32,
    /// Blocks inserted.
    pub entries: u32,
    /// Bit positions per block.
    pub hashes: u8,
    /// The filter (a power of two of bytes, or empty).
    pub bits: Vec<u8>,
}

/// The filter's length for `entries` blocks: a power of two of bytes, 8 bits a block.
fn filter_bytes(entries: usize) -> usize {
    if entries == 0 {
        0
    } else {
        (entries.min(MAX_SUMMARY_ENTRIES) * BITS_PER_ENTRY)
            .div_ceil(8)
            .next_power_of_two()
            .clamp(8, MAX_SUMMARY_BYTES)
    }
}

fn positions(hash: &BlockHash, hashes: u8, bits: usize) -> impl Iterator<Item = usize> {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&hash[..8]);
    b.copy_from_slice(&hash[8..]);
    let (h1, h2) = (u64::from_le_bytes(a), u64::from_le_bytes(b) | 1);
    let mask = (bits as u64).wrapping_sub(1);
    (0..u64::from(hashes)).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
}

impl CacheSummary {
    /// A summary of `blocks` (most recently used first: only the first
    /// [`MAX_SUMMARY_ENTRIES`] are covered).
    pub fn new(model: &str, block_size: u32, blocks: &[BlockHash]) -> Self {
        let blocks = &blocks[..blocks.len().min(MAX_SUMMARY_ENTRIES)];
        let bytes = filter_bytes(blocks.len());
        let mut bits = vec![0u8; bytes];
        for h in blocks {
            for p in positions(h, HASHES, bytes * 8) {
                bits[p / 8] |= 1 << (p % 8);
            }
        }
        Self {
            scheme: CACHE_SCHEME,
            model: model.to_owned(),
            block_size,
            entries: u32::try_from(blocks.len()).unwrap_or(u32::MAX),
            hashes: HASHES,
            bits,
        }
    }

    /// Whether the filter may hold `hash` (never false for one inserted).
    pub fn contains(&self, hash: &BlockHash) -> bool {
        if self.bits.is_empty() || self.hashes == 0 {
            return false;
        }
        positions(hash, self.hashes, self.bits.len() * 8)
            .all(|p| self.bits[p / 8] & (1 << (p % 8)) != 0)
    }

    /// Leading tokens of a prompt (given by its [`block_hashes`] for this summary's block
    /// size) that the host holds: full blocks from the first up to the first one it lacks.
    pub fn cached_tokens(&self, prompt_blocks: &[BlockHash]) -> u64 {
        let run = prompt_blocks
            .iter()
            .take_while(|h| self.contains(h))
            .count();
        (run as u64).saturating_mul(u64::from(self.block_size))
    }

    /// Checks the scheme, sizes and ranges.
    pub fn validate(&self) -> Result<()> {
        if self.scheme != CACHE_SCHEME {
            return Err(ProtocolError::invalid(
                "cache.scheme",
                format!(
                    "scheme {} is not known (this node knows {CACHE_SCHEME})",
                    self.scheme
                ),
            ));
        }
        validate::nonempty_text("cache.model", &self.model)?;
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return Err(ProtocolError::invalid(
                "cache.block_size",
                format!("{} tokens, not in 1..={MAX_BLOCK_SIZE}", self.block_size),
            ));
        }
        validate::count("cache.bits", self.bits.len(), MAX_SUMMARY_BYTES)?;
        validate::count("cache.entries", self.entries as usize, MAX_SUMMARY_ENTRIES)?;
        if !self.bits.is_empty() && !self.bits.len().is_power_of_two() {
            return Err(ProtocolError::invalid(
                "cache.bits",
                "the filter's length is not a power of two",
            ));
        }
        if self.hashes != HASHES {
            return Err(ProtocolError::invalid(
                "cache.hashes",
                format!(
                    "{} bit positions a block, the scheme sets {HASHES}",
                    self.hashes
                ),
            ));
        }
        // The filter is as long as its entries make it, and no fuller than they can make it: a
        // filter of ones would claim every prompt cached.
        if self.bits.len() != filter_bytes(self.entries as usize) {
            return Err(ProtocolError::invalid(
                "cache.bits",
                "the filter's length does not match its entries",
            ));
        }
        let ones: u64 = self.bits.iter().map(|b| u64::from(b.count_ones())).sum();
        if ones > u64::from(self.entries) * u64::from(HASHES) {
            return Err(ProtocolError::invalid(
                "cache.bits",
                "more bits set than its entries can set",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_summary_finds_the_cached_run_of_a_prompt_and_rarely_more() {
        let conversation: Vec<u32> = (0..640).collect();
        let cached = block_hashes(&conversation, 16);
        assert_eq!(cached.len(), 40);
        let s = CacheSummary::new("m", 16, &cached);
        s.validate().unwrap();
        // The next turn: the whole history (40 blocks) plus new tokens.
        let mut next = conversation.clone();
        next.extend(1000..1100);
        assert_eq!(s.cached_tokens(&block_hashes(&next, 16)), 640);
        // Another conversation shares nothing; one that diverges at token 100 shares 6 blocks.
        let other: Vec<u32> = (5000..5640).collect();
        assert_eq!(s.cached_tokens(&block_hashes(&other, 16)), 0);
        let mut forked = conversation[..100].to_vec();
        forked.extend(7000..7600);
        assert_eq!(s.cached_tokens(&block_hashes(&forked, 16)), 96);
        // A full filter's false-positive rate stays low.
        let full: Vec<BlockHash> = (0..MAX_SUMMARY_ENTRIES as u32)
            .map(|i| chain_hash(None, &[i]))
            .collect();
        let s = CacheSummary::new("m", 16, &full);
        assert!(s.bits.len() <= MAX_SUMMARY_BYTES);
        assert!(full.iter().all(|h| s.contains(h)));
        let false_hits = (0..10_000u32)
            .filter(|i| s.contains(&chain_hash(None, &[1 << 20 | i])))
            .count();
        assert!(false_hits < 500, "{false_hits} false positives in 10,000");
        // More blocks than it covers: the first (most recent) ones are kept.
        let more: Vec<BlockHash> = (0..2 * MAX_SUMMARY_ENTRIES as u32)
            .map(|i| chain_hash(None, &[i]))
            .collect();
        let s = CacheSummary::new("m", 16, &more);
        assert_eq!(s.entries as usize, MAX_SUMMARY_ENTRIES);
        assert!(s.contains(&more[0]));
        // Empty: nothing cached.
        let s = CacheSummary::new("m", 16, &[]);
        s.validate().unwrap();
        assert_eq!(s.cached_tokens(&cached), 0);
    }

    #[test]
    fn malformed_summaries_are_refused() {
        let good = CacheSummary::new("m", 16, &block_hashes(&[1; 64], 16));
        let mut bad = good.clone();
        bad.bits = vec![0; MAX_SUMMARY_BYTES * 2];
        assert!(bad.validate().is_err(), "oversized");
        let mut bad = good.clone();
        bad.bits = vec![0; 24];
        assert!(bad.validate().is_err(), "not a power of two");
        let mut bad = good.clone();
        bad.scheme = 9;
        assert!(bad.validate().unwrap_err().to_string().contains("scheme"));
        let mut bad = good.clone();
        bad.block_size = 0;
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.hashes = 0;
        assert!(bad.validate().is_err());
        // A filter of ones (every prompt "cached") or one longer than its entries need.
        let mut bad = good.clone();
        bad.bits.iter_mut().for_each(|b| *b = 0xff);
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("more bits")
        );
        let mut bad = good.clone();
        bad.entries = 0;
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.bits = vec![0; 1024];
        assert!(bad.validate().is_err());
        let mut bad = good;
        bad.model = String::new();
        assert!(bad.validate().is_err());
    }
}
