//! Merkle digests of a volume's content, so two replicas can find where they differ without
//! shipping data.
//!
//! The tree has two levels. A volume of `size_blocks` blocks is cut into chunks of
//! [`CHUNK_BLOCKS`] blocks (the last one may be shorter). Each block hashes to
//! [`block_hash`] of its content (an absent block and an all-zero block both hash to
//! [`zero_block_hash`]); each chunk hashes to [`chunk_hash`] of its block hashes; the root hashes
//! the block size, the volume size and every chunk hash. Comparing two [`MerkleTree`]s gives the
//! differing chunks ([`MerkleTree::differing_chunks`]); comparing those chunks' block hashes
//! (`BlockStore::chunk_block_hashes`) gives the differing blocks.
//!
//! This module owns the hash functions and the tree type only. It reads no storage (the block
//! store computes trees from its keys), does no networking and knows nothing of the catalog.
//! The hash formats are part of the replica protocol: two nodes must compute identical hashes,
//! so changing any of them needs a new domain tag.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// A blake3 digest.
pub type Hash = [u8; 32];

/// Blocks per Merkle leaf chunk.
pub const CHUNK_BLOCKS: u64 = 256;

const CHUNK_TAG: &[u8] = b"haven.merkle.chunk.v1";
const ROOT_TAG: &[u8] = b"haven.merkle.root.v1";

/// The blake3 hash of a block's content.
pub fn block_hash(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// The hash of an all-zero block of `block_size` bytes, which is also the hash of a block that
/// was never written or was written as `Zero`. Computed once per block size and cached.
pub fn zero_block_hash(block_size: u32) -> Hash {
    static CACHE: OnceLock<Mutex<HashMap<u32, Hash>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    // A poisoned lock only means another thread panicked while inserting a value it computed
    // the same way; the map is still usable.
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    *map.entry(block_size).or_insert_with(|| {
        let mut hasher = blake3::Hasher::new();
        let zeros = [0u8; 4096];
        let mut left = block_size as usize;
        while left > 0 {
            let n = left.min(zeros.len());
            hasher.update(&zeros[..n]);
            left -= n;
        }
        *hasher.finalize().as_bytes()
    })
}

/// The hash of one chunk from its blocks' hashes, in block order.
pub fn chunk_hash(block_hashes: &[Hash]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(CHUNK_TAG);
    hasher.update(&(block_hashes.len() as u64).to_le_bytes());
    for h in block_hashes {
        hasher.update(h);
    }
    *hasher.finalize().as_bytes()
}

/// The hash of a chunk of `blocks` blocks that are all zero (or absent). Full chunks are cached
/// per block size; a short last chunk is computed on demand.
pub fn zero_chunk_hash(block_size: u32, blocks: u64) -> Hash {
    static CACHE: OnceLock<Mutex<HashMap<u32, Hash>>> = OnceLock::new();
    let compute = || chunk_hash(&vec![zero_block_hash(block_size); blocks as usize]);
    if blocks != CHUNK_BLOCKS {
        return compute();
    }
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(h) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&block_size) {
        return *h;
    }
    let h = compute();
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(block_size, h);
    h
}

/// Number of chunks covering `size_blocks` blocks.
pub fn chunk_count(size_blocks: u64) -> u64 {
    size_blocks.div_ceil(CHUNK_BLOCKS)
}

/// Number of blocks in chunk `chunk` of a volume of `size_blocks` blocks (0 past the end).
pub fn chunk_len(size_blocks: u64, chunk: u64) -> u64 {
    let start = chunk.saturating_mul(CHUNK_BLOCKS);
    size_blocks.saturating_sub(start).min(CHUNK_BLOCKS)
}

/// A two-level Merkle tree of a volume view: one hash per chunk and a root over them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MerkleTree {
    pub block_size: u32,
    pub size_blocks: u64,
    /// One hash per chunk of [`CHUNK_BLOCKS`] blocks, in order.
    pub chunks: Vec<Hash>,
    pub root: Hash,
}

impl MerkleTree {
    /// Build a tree from its chunk hashes; the root is blake3 over a domain tag, `block_size`,
    /// `size_blocks` and the chunk hashes.
    pub fn from_chunk_hashes(block_size: u32, size_blocks: u64, chunks: Vec<Hash>) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(ROOT_TAG);
        hasher.update(&block_size.to_le_bytes());
        hasher.update(&size_blocks.to_le_bytes());
        hasher.update(&(chunks.len() as u64).to_le_bytes());
        for h in &chunks {
            hasher.update(h);
        }
        let root = *hasher.finalize().as_bytes();
        Self { block_size, size_blocks, chunks, root }
    }

    /// Indexes of the chunks whose hashes differ, ascending. A chunk only one tree has counts as
    /// differing. Trees of different block sizes differ in every chunk.
    pub fn differing_chunks(&self, other: &MerkleTree) -> Vec<u64> {
        let n = self.chunks.len().max(other.chunks.len());
        if self.block_size != other.block_size {
            return (0..n as u64).collect();
        }
        (0..n).filter(|&i| self.chunks.get(i) != other.chunks.get(i)).map(|i| i as u64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_block_hash_matches_hash_of_zeros() {
        for bs in [512u32, 4096, 5000, 65536] {
            assert_eq!(zero_block_hash(bs), block_hash(&vec![0u8; bs as usize]));
        }
        assert_ne!(zero_block_hash(4096), zero_block_hash(512));
    }

    #[test]
    fn zero_chunk_hash_matches_chunk_of_zero_blocks() {
        let z = zero_block_hash(4096);
        assert_eq!(zero_chunk_hash(4096, CHUNK_BLOCKS), chunk_hash(&vec![z; CHUNK_BLOCKS as usize]));
        assert_eq!(zero_chunk_hash(4096, CHUNK_BLOCKS), zero_chunk_hash(4096, CHUNK_BLOCKS));
        assert_eq!(zero_chunk_hash(4096, 3), chunk_hash(&[z, z, z]));
        assert_ne!(zero_chunk_hash(4096, 3), zero_chunk_hash(4096, 4));
    }

    #[test]
    fn chunk_geometry() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(256), 1);
        assert_eq!(chunk_count(257), 2);
        assert_eq!(chunk_len(257, 0), 256);
        assert_eq!(chunk_len(257, 1), 1);
        assert_eq!(chunk_len(257, 2), 0);
        assert_eq!(chunk_len(10, u64::MAX), 0);
    }

    #[test]
    fn differing_chunks_compares_pairwise_and_counts_missing() {
        let a = MerkleTree::from_chunk_hashes(4096, 768, vec![[1; 32], [2; 32], [3; 32]]);
        let b = MerkleTree::from_chunk_hashes(4096, 768, vec![[1; 32], [9; 32], [3; 32]]);
        assert_ne!(a.root, b.root);
        assert_eq!(a.differing_chunks(&b), vec![1]);
        assert_eq!(a.differing_chunks(&a.clone()), Vec::<u64>::new());
        let short = MerkleTree::from_chunk_hashes(4096, 256, vec![[1; 32]]);
        assert_eq!(a.differing_chunks(&short), vec![1, 2]);
        assert_eq!(short.differing_chunks(&a), vec![1, 2]);
        let other_bs = MerkleTree::from_chunk_hashes(512, 768, vec![[1; 32], [2; 32], [3; 32]]);
        assert_eq!(a.differing_chunks(&other_bs), vec![0, 1, 2]);
        assert_ne!(a.root, other_bs.root);
    }
}
