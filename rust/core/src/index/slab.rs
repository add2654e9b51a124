//! The block slab and the key table: one 20-byte [`Block`] per distinct
//! prefix block, in fixed chunks, and the hash table from prefix key to slab
//! slot. Interning a key and freeing an unused block live here.

use super::{Index, NIL};

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(super) struct Block {
    /// The prefix key as two halves: keeps the block at 4-byte alignment
    /// (20 bytes, not 24).
    pub(super) key: [u32; 2],
    /// The block most recently stored as this block's child: queries try it
    /// before the key table (checked by key, so a stale hint is harmless).
    pub(super) child: u32,
    /// Engine-hash entries (over all workers) that point here; `NIL` marks
    /// a free slot.
    pub(super) refs: u32,
    /// Holder-set handle; the free-list link in free slots.
    pub(super) holders: u32,
}

const _: () = assert!(std::mem::size_of::<Block>() == 20);

/// Blocks in fixed-size chunks: growth never copies more than one chunk
/// (no long pause under the write lock), and at most one chunk is slack, so
/// the reported memory stays within 1.3 MB of what is resident. The first
/// chunk grows like a `Vec`, so small indexes stay small.
#[derive(Default)]
pub(super) struct Slab {
    chunks: Vec<Vec<Block>>,
    len: usize,
}

const CHUNK_BITS: u32 = 16;
const CHUNK: usize = 1 << CHUNK_BITS;

impl Slab {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn push(&mut self, b: Block) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(b),
            _ => {
                let mut c = Vec::with_capacity(if self.chunks.is_empty() { 64 } else { CHUNK });
                c.push(b);
                self.chunks.push(c);
            }
        }
        self.len += 1;
    }

    pub(super) fn get(&self, i: usize) -> Option<&Block> {
        self.chunks.get(i >> CHUNK_BITS).and_then(|c| c.get(i & (CHUNK - 1)))
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Block> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity() * std::mem::size_of::<Block>()).sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<Block>>()
    }
}

impl std::ops::Index<usize> for Slab {
    type Output = Block;
    #[inline]
    fn index(&self, i: usize) -> &Block {
        &self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

impl std::ops::IndexMut<usize> for Slab {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut Block {
        &mut self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

pub(super) fn split(key: u64) -> [u32; 2] {
    [key as u32, (key >> 32) as u32]
}

impl Block {
    #[inline]
    pub(super) fn key(&self) -> u64 {
        u64::from(self.key[0]) | (u64::from(self.key[1]) << 32)
    }
}

impl Index {
    pub(super) fn find_block(&self, key: u64) -> Option<u32> {
        let blocks = &self.blocks;
        self.by_key.find(key, |&s| blocks[s as usize].key() == key).copied()
    }

    /// The slot of `key`'s block, creating it (unheld, unreferenced) if new.
    pub(super) fn intern_block(&mut self, key: u64) -> u32 {
        let blocks = &self.blocks;
        let free = self.free_block;
        let next_slot = if free == NIL { blocks.len() as u32 } else { free };
        // One probe: find the key, or claim its bucket for the next slot.
        match self.by_key.entry(key, |&s| blocks[s as usize].key() == key, |&s| blocks[s as usize].key()) {
            hashbrown::hash_table::Entry::Occupied(o) => return *o.get(),
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(next_slot);
            }
        }
        let b = Block { key: split(key), child: NIL, refs: 0, holders: 0 };
        let slot = if self.free_block == NIL {
            self.blocks.push(b);
            if self.capacity.is_some() {
                self.links.push([NIL, NIL]);
            }
            (self.blocks.len() - 1) as u32
        } else {
            let s = self.free_block;
            self.free_block = self.blocks[s as usize].holders;
            self.blocks[s as usize] = b;
            s
        };
        debug_assert_eq!(slot, next_slot);
        // A fresh block counts as dormant until someone holds it.
        self.dormant += 1;
        slot
    }

    pub(super) fn maybe_free_block(&mut self, slot: u32) {
        let b = self.blocks[slot as usize];
        if b.refs != 0 || b.holders != 0 {
            // in use (a free slot has refs == NIL)
            return;
        }
        let blocks = &self.blocks;
        if let Ok(e) = self.by_key.find_entry(b.key(), |&s| blocks[s as usize].key() == b.key()) {
            e.remove();
        }
        self.dormant -= 1;
        let blk = &mut self.blocks[slot as usize];
        blk.holders = self.free_block;
        blk.key = [0, 0];
        blk.child = NIL;
        blk.refs = NIL;
        self.free_block = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::CHUNK;
    use crate::index::{Index, Query};

    /// Blocks on both sides of the first 65,536-block chunk boundary are
    /// stored, found, freed and reused correctly.
    #[test]
    fn blocks_across_the_chunk_boundary() {
        let n = CHUNK + 40;
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        let tokens: Vec<u32> = (0..n as u32).collect();
        let hashes: Vec<u64> = (1..=n as u64).collect();
        let st = ix.apply("a", &B::default().store(&hashes, None, &tokens, None).build(), None).unwrap();
        assert_eq!(st.stored, n as u64);
        assert_eq!(ix.blocks.len(), n);
        assert_eq!(ix.blocks.chunks.len(), 2);
        // Every block's key is where the key table says it is.
        let keys = ix.query_keys(&Query::new("m", &tokens));
        for i in [0, CHUNK - 2, CHUNK - 1, CHUNK, CHUNK + 1, n - 1] {
            let slot = ix.find_block(keys[i]).unwrap();
            assert_eq!(slot as usize, i);
            assert_eq!(ix.blocks[slot as usize].key(), keys[i]);
            assert_eq!(ix.blocks.get(slot as usize).map(super::Block::key), Some(keys[i]));
        }
        assert!(ix.blocks.get(n).is_none());
        // the slab's account: at least the blocks' own bytes, at most the
        // chunks' doubling growth and the chunk list
        let (bytes, block) = (ix.blocks.memory_bytes(), std::mem::size_of::<super::Block>());
        assert!(bytes >= n * block && bytes <= 2 * n * block + 1024, "{bytes} bytes for {n} blocks of {block}");
        assert_eq!(depth(&ix, &tokens, "a"), n as u32);
        // Drop the block at the boundary: the match stops there.
        ix.apply("a", &B::default().remove(&[CHUNK as u64 + 1], None).build(), None).unwrap();
        assert_eq!(depth(&ix, &tokens, "a"), CHUNK as u32);
        // Its slot is reused for the next new block.
        ix.apply("a", &B::default().store(&[999_999], None, &[7; 1], None).build(), None).unwrap();
        assert_eq!(ix.find_block(ix.query_keys(&Query::new("m", &[7]))[0]), Some(CHUNK as u32));
        assert_eq!(ix.blocks.len(), n);
        ix.check_invariants().unwrap();
        // The whole thing survives a snapshot.
        let mut buf = Vec::new();
        ix.save(&mut buf).unwrap();
        let back = Index::load(&mut buf.as_slice()).unwrap();
        assert_eq!(depth(&back, &tokens, "a"), CHUNK as u32);
        assert_eq!(depth(&back, &[7], "a"), 1);
    }
}
