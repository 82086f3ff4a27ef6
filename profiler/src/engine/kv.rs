//! Paged KV cache: a pool of fixed-size blocks under a memory budget, with an optional prefix
//! cache of full blocks keyed by a hash of every token up to the block's end.
//!
//! A block is free, in use by one or more sequences (reference counted), or cached: its
//! sequences are gone but its contents are still valid for the prefix it was computed from.
//! Cached blocks are evicted least-recently-used first, only when no free block is left.
//!
//! Below block granularity: every cached block is also findable by each prefix of its tokens
//! (keyed by the hash of the blocks before it and those tokens), and a sequence that ends inside
//! a block leaves that block cached too. A new sequence whose prompt continues past its last
//! matching full block copies the matching rows of such a block into a block of its own, so a
//! prompt seen before is recomputed from its last token only (as llama.cpp's per-slot prompt
//! cache and SGLang's radix cache reuse token-level prefixes), not from its last block boundary.

use std::collections::{BTreeMap, HashMap};

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::error::{ProfilerError, Result};

/// Hash of the tokens `0..(i+1)·block_size` of a sequence: the previous block's hash chained
/// with this block's tokens (the network's definition, so that routers can compute it).
pub(crate) use metainf_protocol::cache::{BlockHash, chain_hash};

/// The key of the first `tokens.len()` rows of a block after `parent` (another key space than
/// [`chain_hash`]'s full blocks).
pub(crate) fn partial_hash(parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
    metainf_protocol::cache::keyed_hash("metainf kv partial block v1", parent, tokens)
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
    /// f16 keys and values as their bits (as llama.cpp's default KV type: half the memory
    /// of f32; a token's row is rounded once when written, so every method reads the same
    /// values). `u16` so that the zeroed allocation is mapped lazily.
    keys: Vec<u16>,
    values: Vec<u16>,
    refs: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    /// Whether `hash_of` is a full block's chain hash (not a partial block's key).
    full: Vec<bool>,
    cached: HashMap<BlockHash, u32>,
    /// Prefix key → (cached block, rows).
    partials: HashMap<BlockHash, (u32, usize)>,
    /// The prefix keys each block holds, to drop them when it is evicted.
    partial_keys: Vec<Vec<BlockHash>>,
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
            .checked_mul(2 * std::mem::size_of::<f16>())
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
            keys: vec![0; floats],
            values: vec![0; floats],
            refs: vec![0; blocks],
            hash_of: vec![None; blocks],
            full: vec![false; blocks],
            cached: HashMap::new(),
            partials: HashMap::new(),
            partial_keys: vec![Vec::new(); blocks],
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
            * std::mem::size_of::<f16>()
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
            self.keys[o..o + d]
                .reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(&k[head * d..(head + 1) * d]);
            self.values[o..o + d]
                .reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(&v[head * d..(head + 1) * d]);
        }
    }

    /// The keys of every slot of `block` for one KV head, `block_size × head_dim`.
    pub(crate) fn block_keys(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        let o = self.offset(layer, block, head, 0);
        self.keys[o..o + self.block_size * self.head_dim].reinterpret_cast()
    }

    /// The values of every slot of `block` for one KV head, `block_size × head_dim`.
    pub(crate) fn block_values(&self, layer: usize, block: u32, head: usize) -> &[f16] {
        let o = self.offset(layer, block, head, 0);
        self.values[o..o + self.block_size * self.head_dim].reinterpret_cast()
    }

    #[cfg(test)]
    pub(crate) fn key(&self, layer: usize, block: u32, head: usize, slot: usize) -> Vec<f32> {
        let o = self.offset(layer, block, head, slot);
        self.keys[o..o + self.head_dim]
            .reinterpret_cast::<f16>()
            .to_f32_vec()
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
                self.full[b as usize] = false;
                for key in std::mem::take(&mut self.partial_keys[b as usize]) {
                    if self.partials.get(&key).is_some_and(|e| e.0 == b) {
                        self.partials.remove(&key);
                    }
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
    /// Caches a full block under `hash`, and makes each of its shorter prefixes findable.
    pub(crate) fn register(
        &mut self,
        block: u32,
        hash: BlockHash,
        parent: Option<&BlockHash>,
        tokens: &[u32],
    ) {
        if self.hash_of[block as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.cached.insert(hash, block);
        self.hash_of[block as usize] = Some(hash);
        self.full[block as usize] = true;
        self.register_prefixes(block, parent, tokens);
    }

    /// The chain hashes of the full blocks the pool holds, those in use first and then the
    /// cached ones from the most recently used, at most `limit`: what the host tells routers.
    pub(crate) fn recent_block_hashes(&self, limit: usize) -> Vec<BlockHash> {
        let mut held: Vec<(u64, BlockHash)> = self
            .hash_of
            .iter()
            .enumerate()
            .filter(|&(b, h)| h.is_some() && self.full[b])
            .filter_map(|(b, h)| {
                let recency = if self.refs[b] > 0 {
                    u64::MAX
                } else {
                    self.last_use[b]
                };
                Some((recency, (*h)?))
            })
            .collect();
        if held.len() > limit && limit > 0 {
            held.select_nth_unstable_by_key(limit - 1, |h| std::cmp::Reverse(h.0));
        }
        held.truncate(limit);
        held.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
        held.into_iter().map(|(_, h)| h).collect()
    }

    /// Keeps a block whose sequence ended inside it (its first `tokens.len()` rows valid) as a
    /// cached block, findable by each prefix of those rows.
    pub(crate) fn keep_partial(&mut self, block: u32, parent: Option<&BlockHash>, tokens: &[u32]) {
        let hash = partial_hash(parent, tokens);
        if tokens.is_empty()
            || tokens.len() >= self.block_size
            || self.hash_of[block as usize].is_some()
            || self.cached.contains_key(&hash)
        {
            return;
        }
        self.cached.insert(hash, block);
        self.hash_of[block as usize] = Some(hash);
        self.register_prefixes(block, parent, tokens);
    }

    fn register_prefixes(&mut self, block: u32, parent: Option<&BlockHash>, tokens: &[u32]) {
        let rows = tokens.len().min(self.block_size.saturating_sub(1));
        for k in 1..=rows {
            let key = partial_hash(parent, &tokens[..k]);
            if let std::collections::hash_map::Entry::Vacant(e) = self.partials.entry(key) {
                e.insert((block, k));
                self.partial_keys[block as usize].push(key);
            }
        }
    }

    /// The cached block holding the longest prefix of `tokens` after `parent`, and how many
    /// rows of it match; the block is held (release it once its rows are copied).
    pub(crate) fn longest_prefix(
        &mut self,
        parent: Option<&BlockHash>,
        tokens: &[u32],
    ) -> Option<(u32, usize)> {
        let rows = tokens.len().min(self.block_size.saturating_sub(1));
        let (block, k) = (1..=rows).rev().find_map(|k| {
            self.partials
                .get(&partial_hash(parent, &tokens[..k]))
                .copied()
        })?;
        let b = block as usize;
        if self.refs[b] == 0 {
            self.lru.remove(&self.last_use[b]);
        }
        self.refs[b] += 1;
        Some((block, k))
    }

    /// Copies the first `rows` rows of every layer and head of `src` into `dst`.
    pub(crate) fn copy_rows(&mut self, src: u32, dst: u32, rows: usize) {
        let n = rows.min(self.block_size) * self.head_dim;
        for layer in 0..self.layers {
            for head in 0..self.kv_heads {
                let (s, d) = (
                    self.offset(layer, src, head, 0),
                    self.offset(layer, dst, head, 0),
                );
                self.keys.copy_within(s..s + n, d);
                self.values.copy_within(s..s + n, d);
            }
        }
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
        p.register(a, h1, None, &[1, 2, 3, 4]);
        let b = p.allocate().unwrap();
        p.register(b, h2, Some(&h1), &[5, 6, 7, 8]);
        p.release(a);
        p.release(b);
        assert_eq!(p.available(), 3);
        assert_eq!(p.evictable_blocks(), 2);
        // A later sequence with the same prefix finds the block and its contents.
        assert_eq!(p.lookup(&h1), Some(a));
        assert_eq!(p.key(0, a, 0, 0), [1.0, 2.0]);
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
    fn prefixes_inside_a_block_are_found_copied_and_forgotten_with_it() {
        let mut p = pool(2);
        let h1 = chain_hash(None, &[1, 2, 3, 4]);
        let a = p.allocate().unwrap();
        for slot in 0..4 {
            let v = slot as f32;
            p.write(0, a, slot, &[v, v], &[-v, -v]);
        }
        p.register(a, h1, None, &[1, 2, 3, 4]);
        p.release(a);
        // Rows 0..3 of `a` continue a prompt [1, 2, 3, 9]: three rows match, none past a
        // difference, and the full block itself is not a "prefix".
        assert_eq!(p.longest_prefix(None, &[1, 2, 3]), Some((a, 3)));
        assert_eq!(p.longest_prefix(None, &[1, 2, 9]), Some((a, 2)));
        assert_eq!(p.longest_prefix(None, &[7]), None);
        assert_eq!(p.longest_prefix(Some(&h1), &[1]), None, "another parent");
        let b = p.allocate().unwrap();
        p.copy_rows(a, b, 3);
        assert_eq!(p.key(0, b, 0, 2), [2.0, 2.0]);
        // The two finds above each held `a`.
        p.release(a);
        p.release(a);
        // A sequence that ended inside `b` (rows [1, 2, 3]) leaves it cached and findable.
        p.keep_partial(b, None, &[1, 2, 3]);
        p.release(b);
        assert_eq!(p.evictable_blocks(), 2);
        // Evicting both forgets every prefix key they held.
        let (x, y) = (p.allocate().unwrap(), p.allocate().unwrap());
        assert!(p.longest_prefix(None, &[1, 2, 3]).is_none());
        assert!(p.partials.is_empty(), "{:?}", p.partials);
        p.release(x);
        p.release(y);
    }

    #[test]
    fn the_pool_lists_its_full_blocks_in_use_first_then_most_recent() {
        let mut p = pool(4);
        let h1 = chain_hash(None, &[1, 2, 3, 4]);
        let h2 = chain_hash(Some(&h1), &[5, 6, 7, 8]);
        let h3 = chain_hash(None, &[9, 9, 9, 9]);
        let (a, b, c) = (
            p.allocate().unwrap(),
            p.allocate().unwrap(),
            p.allocate().unwrap(),
        );
        p.register(a, h1, None, &[1, 2, 3, 4]);
        p.register(b, h2, Some(&h1), &[5, 6, 7, 8]);
        p.register(c, h3, None, &[9, 9, 9, 9]);
        // A partial block is not a full block: not listed.
        let d = p.allocate().unwrap();
        p.keep_partial(d, Some(&h3), &[1, 2]);
        p.release(a);
        p.release(c);
        p.release(d);
        // b in use first, then c (released last), then a.
        assert_eq!(p.recent_block_hashes(10), vec![h2, h3, h1]);
        assert_eq!(p.recent_block_hashes(2), vec![h2, h3]);
        // What the network computes over the same tokens names the same blocks.
        assert_eq!(
            metainf_protocol::block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 0], 4),
            vec![h1, h2]
        );
        // Evicted blocks leave the list.
        p.release(b);
        let _ = (p.allocate(), p.allocate(), p.allocate(), p.allocate());
        assert!(p.recent_block_hashes(10).is_empty());
    }

    #[test]
    fn shapes_that_overflow_are_refused() {
        assert!(KvPool::new(usize::MAX, 1 << 20, 30, 3, 64).is_err());
        assert!(KvPool::new(1 << 40, usize::MAX, 1 << 20, 1 << 20, 64).is_err());
    }
}
