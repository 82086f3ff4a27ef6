//! Paged KV cache: a pool of fixed-size blocks under a memory budget, with an optional prefix
//! cache of full blocks keyed by a hash of every token up to the block's end.
//!
//! A block is free, in use by one or more sequences (reference counted), or cached: its
//! sequences are gone but its contents are still valid for the prefix it was computed from.
//! Cached blocks are evicted least-recently-used first, only when no free block is left.

use std::collections::{BTreeMap, HashMap};

use crate::error::{ProfilerError, Result};

/// Hash of the tokens `0..(i+1)·block_size` of a sequence: the previous block's hash chained
/// with this block's tokens.
pub(crate) type BlockHash = [u8; 16];

/// Chains a block's tokens onto its predecessor's hash.
pub(crate) fn chain_hash(parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = blake3::Hasher::new_derive_key("metainf kv prefix block v1");
    hasher.update(parent.map_or(&[0u8; 16][..], |p| &p[..]));
    for t in tokens {
        hasher.update(&t.to_le_bytes());
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

/// Counters of the prefix cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Blocks found in the prefix cache.
    pub hits: u64,
    /// Blocks looked up and not found.
    pub misses: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
    /// Most blocks in use (or cached) at once.
    pub peak_blocks: usize,
}

/// The block pool.
pub(crate) struct KvPool {
    block_size: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    blocks: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
    refs: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
    /// Evictable blocks (cached, no reference) by last use.
    lru: BTreeMap<u64, u32>,
    last_use: Vec<u64>,
    free: Vec<u32>,
    tick: u64,
    stats: KvStats,
}

impl KvPool {
    /// A pool of as many blocks of `block_size` tokens as fit `budget_bytes`. Refuses shapes
    /// whose sizes overflow.
    pub(crate) fn new(
        block_size: usize,
        budget_bytes: usize,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let overflow = || ProfilerError::Measure("the KV cache's size overflows".into());
        let block_floats = layers
            .checked_mul(kv_heads)
            .and_then(|v| v.checked_mul(block_size))
            .and_then(|v| v.checked_mul(head_dim))
            .ok_or_else(overflow)?;
        let block_bytes = block_floats
            .checked_mul(2 * std::mem::size_of::<f32>())
            .ok_or_else(overflow)?;
        let blocks = (budget_bytes / block_bytes.max(1)).min(u32::MAX as usize);
        let floats = blocks.checked_mul(block_floats).ok_or_else(overflow)?;
        Ok(Self {
            block_size,
            layers,
            kv_heads,
            head_dim,
            blocks,
            // Zeroed allocations are mapped lazily: untouched blocks cost no memory.
            keys: vec![0.0; floats],
            values: vec![0.0; floats],
            refs: vec![0; blocks],
            hash_of: vec![None; blocks],
            cached: HashMap::new(),
            lru: BTreeMap::new(),
            last_use: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
            tick: 0,
            stats: KvStats::default(),
        })
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn total_blocks(&self) -> usize {
        self.blocks
    }

    /// Bytes of one block (keys and values).
    pub(crate) fn block_bytes(&self) -> usize {
        2 * self.layers
            * self.kv_heads
            * self.block_size
            * self.head_dim
            * std::mem::size_of::<f32>()
    }

    /// Blocks that can be handed out now: free ones and evictable cached ones.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    pub(crate) fn stats(&self) -> KvStats {
        self.stats
    }

    /// Blocks holding data now (in use or cached).
    pub(crate) fn used_blocks(&self) -> usize {
        self.blocks - self.free.len()
    }

    /// Cached blocks that no sequence uses.
    pub(crate) fn evictable_blocks(&self) -> usize {
        self.lru.len()
    }

    fn offset(&self, layer: usize, block: u32, head: usize, slot: usize) -> usize {
        (((block as usize * self.layers + layer) * self.kv_heads + head) * self.block_size + slot)
            * self.head_dim
    }

    /// Writes one token's keys and values (all KV heads) into `slot` of `block`.
    pub(crate) fn write(&mut self, layer: usize, block: u32, slot: usize, k: &[f32], v: &[f32]) {
        let d = self.head_dim;
        for head in 0..self.kv_heads {
            let o = self.offset(layer, block, head, slot);
            self.keys[o..o + d].copy_from_slice(&k[head * d..(head + 1) * d]);
            self.values[o..o + d].copy_from_slice(&v[head * d..(head + 1) * d]);
        }
    }

    /// The keys of every slot of `block` for one KV head, `block_size × head_dim`.
    pub(crate) fn block_keys(&self, layer: usize, block: u32, head: usize) -> &[f32] {
        let o = self.offset(layer, block, head, 0);
        &self.keys[o..o + self.block_size * self.head_dim]
    }

    /// The values of every slot of `block` for one KV head, `block_size × head_dim`.
    pub(crate) fn block_values(&self, layer: usize, block: u32, head: usize) -> &[f32] {
        let o = self.offset(layer, block, head, 0);
        &self.values[o..o + self.block_size * self.head_dim]
    }

    #[cfg(test)]
    pub(crate) fn key(&self, layer: usize, block: u32, head: usize, slot: usize) -> &[f32] {
        let o = self.offset(layer, block, head, slot);
        &self.keys[o..o + self.head_dim]
    }

    /// A block for a sequence: a free one, else the least recently used cached one.
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.cached.remove(&h);
                }
                self.stats.evictions += 1;
                b
            }
        };
        self.refs[block as usize] = 1;
        self.stats.peak_blocks = self.stats.peak_blocks.max(self.used_blocks());
        Some(block)
    }

    /// Drops a sequence's reference; a cached block stays for reuse, others become free.
    pub(crate) fn release(&mut self, block: u32) {
        let b = block as usize;
        self.refs[b] = self.refs[b].saturating_sub(1);
        if self.refs[b] == 0 {
            if self.hash_of[b].is_some() {
                self.tick += 1;
                self.last_use[b] = self.tick;
                self.lru.insert(self.tick, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Looks up a full block by its prefix hash and takes a reference to it.
    pub(crate) fn lookup(&mut self, hash: &BlockHash) -> Option<u32> {
        let Some(&block) = self.cached.get(hash) else {
            self.stats.misses += 1;
            return None;
        };
        let b = block as usize;
        if self.refs[b] == 0 {
            self.lru.remove(&self.last_use[b]);
        }
        self.refs[b] += 1;
        self.stats.hits += 1;
        Some(block)
    }

    /// Publishes a full block under its prefix hash (first writer wins).
    pub(crate) fn register(&mut self, block: u32, hash: BlockHash) {
        if self.hash_of[block as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.cached.insert(hash, block);
        self.hash_of[block as usize] = Some(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> KvPool {
        let p = KvPool::new(4, 0, 1, 1, 2).unwrap();
        let bytes = p.block_bytes() * blocks;
        KvPool::new(4, bytes, 1, 1, 2).unwrap()
    }

    #[test]
    fn blocks_are_reused_by_hash_and_evicted_least_recently_used() {
        let mut p = pool(3);
        assert_eq!(p.total_blocks(), 3);
        let h1 = chain_hash(None, &[1, 2, 3, 4]);
        let h2 = chain_hash(Some(&h1), &[5, 6, 7, 8]);
        assert_ne!(
            h2,
            chain_hash(None, &[5, 6, 7, 8]),
            "the hash covers the whole prefix"
        );
        let a = p.allocate().unwrap();
        p.write(0, a, 0, &[1.0, 2.0], &[3.0, 4.0]);
        p.register(a, h1);
        let b = p.allocate().unwrap();
        p.register(b, h2);
        p.release(a);
        p.release(b);
        assert_eq!(p.available(), 3);
        assert_eq!(p.evictable_blocks(), 2);
        // A later sequence with the same prefix finds the block and its contents.
        assert_eq!(p.lookup(&h1), Some(a));
        assert_eq!(p.key(0, a, 0, 0), &[1.0, 2.0]);
        assert_eq!(p.stats().hits, 1);
        // Under pressure the least recently used cached block (b) goes first, a is in use.
        let c = p.allocate().unwrap();
        let d = p.allocate().unwrap();
        assert_ne!(c, a);
        assert_eq!(d, b);
        assert_eq!(p.stats().evictions, 1);
        assert_eq!(p.lookup(&h2), None);
        assert_eq!(p.allocate(), None, "the pool is exhausted");
        p.release(a);
        assert_eq!(
            p.allocate(),
            Some(a),
            "a cached block is evicted when nothing is free"
        );
        assert_eq!(p.lookup(&h1), None);
    }

    #[test]
    fn shapes_that_overflow_are_refused() {
        assert!(KvPool::new(usize::MAX, 1 << 20, 30, 3, 64).is_err());
        assert!(KvPool::new(1 << 40, usize::MAX, 1 << 20, 1 << 20, 64).is_err());
    }
}
