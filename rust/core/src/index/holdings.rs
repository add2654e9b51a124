//! Holdings and engine hashes: setting a worker's tiers on a block (keeping
//! the held/dormant counts and the LRU right), and the per-worker map from
//! engine hash to block slot that parent resolution and removals use.

use hashbrown::HashTable;

use super::{ekey, mix, Index};

pub(super) type EMap = HashTable<[u32; 3]>;

impl Index {
    /// Set worker `wslot`'s tiers on block `slot`, keeping LRU, counts and
    /// the dormant/held state right. `touch` moves the block to the front.
    pub(super) fn set_tiers(&mut self, slot: u32, wslot: u32, tiers: u8, touch: bool) -> u8 {
        let was_held = self.blocks[slot as usize].holders != 0;
        let mut h = self.blocks[slot as usize].holders;
        let old = self.pool.set(&mut h, wslot, tiers);
        self.blocks[slot as usize].holders = h;
        let now_held = h != 0;
        match (old != 0, tiers != 0) {
            (false, true) => {
                self.holdings += 1;
                self.worker_mut(wslot).held += 1;
            }
            (true, false) => {
                self.holdings -= 1;
                self.worker_mut(wslot).held -= 1;
            }
            _ => {}
        }
        // The LRU list exists only under a capacity bound: without one,
        // nothing is ever evicted and touching neighbours is wasted work.
        let lru = self.capacity.is_some();
        match (was_held, now_held) {
            (false, true) => {
                self.dormant -= 1;
                self.held_blocks += 1;
                if lru {
                    self.lru_push_front(slot);
                }
            }
            (true, false) => {
                if lru {
                    self.lru_unlink(slot);
                }
                self.held_blocks -= 1;
                self.dormant += 1;
            }
            (true, true) if lru && touch && self.lru_head != slot => {
                self.lru_unlink(slot);
                self.lru_push_front(slot);
            }
            _ => {}
        }
        old
    }

    // ---------------------------------------------------------- engine hashes

    // The engine-hash map functions take the worker's map as an argument:
    // `apply_batch` moves it out of the worker for the batch, so one probe
    // can be used across calls that also touch the rest of the index.

    pub(super) fn emap_get(emap: &EMap, ek: u64) -> Option<u32> {
        emap.find(mix(ek), |e| ekey(e) == ek).map(|e| e[2])
    }

    /// Point `ek` at block `slot`; returns the block it pointed at before.
    pub(super) fn emap_set(&mut self, emap: &mut EMap, ek: u64, slot: u32) -> Option<u32> {
        let old = match emap.entry(mix(ek), |e| ekey(e) == ek, |e| mix(ekey(e))) {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                let old = o.get()[2];
                if old == slot {
                    return Some(old);
                }
                o.get_mut()[2] = slot;
                Some(old)
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert([ek as u32, (ek >> 32) as u32, slot]);
                self.engine_hashes += 1;
                None
            }
        };
        self.blocks[slot as usize].refs += 1;
        if let Some(o) = old {
            self.blocks[o as usize].refs -= 1;
        }
        old
    }

    pub(super) fn purge_slot(&mut self, wslot: u32) {
        let w = self.worker_mut(wslot);
        let emap = std::mem::take(&mut w.emap);
        self.engine_hashes -= emap.len();
        for e in &emap {
            let slot = e[2];
            if self.pool.get(self.blocks[slot as usize].holders, wslot) != 0 {
                self.set_tiers(slot, wslot, 0, false);
            }
        }
        for e in &emap {
            self.blocks[e[2] as usize].refs -= 1;
        }
        for e in &emap {
            self.maybe_free_block(e[2]);
        }
        debug_assert_eq!(self.worker(wslot).held, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::index::{Index, Query};

    /// Engine hashes are 64-bit (and may be negative ints or bytes): two
    /// hashes equal in their low 32 bits must never alias.
    #[test]
    fn wide_negative_and_bytes_hashes_stay_distinct() {
        let cases: [(H, H); 3] = [
            (H::U((1 << 32) + 5), H::U(5)),
            (H::N(-5), H::U(u64::from(u32::MAX - 4))), // -5 is 0xffff_ffff_ffff_fffb
            (H::Bin(vec![1; 32]), H::Bin(vec![2; 32])),
        ];
        for (wide, narrow) in cases {
            let mut ix = Index::default();
            ix.add_worker("a", "m").unwrap();
            let b = B::default()
                .store_h(std::slice::from_ref(&wide), None, &[1, 1], None)
                .store_h(std::slice::from_ref(&narrow), None, &[2, 2], None)
                // children chained from each parent by hash
                .store_h(&[H::U(100)], Some(&wide), &[3, 3], None)
                .store_h(&[H::U(200)], Some(&narrow), &[4, 4], None);
            let st = ix.apply("a", &b.build(), None).unwrap();
            assert_eq!((st.stored, st.orphaned), (4, 0), "{wide:?}");
            assert_eq!(depth(&ix, &[1, 1, 3, 3], "a"), 2, "{wide:?}");
            assert_eq!(depth(&ix, &[2, 2, 4, 4], "a"), 2, "{wide:?}");
            // A snapshot keeps all 64 bits of every engine hash.
            let mut buf = Vec::new();
            ix.save(&mut buf).unwrap();
            let mut ix = Index::load(&mut buf.as_slice()).unwrap();
            // Removing the narrow hash removes only its own block.
            let st = ix.apply("a", &B::default().remove_h(std::slice::from_ref(&narrow), None).build(), None).unwrap();
            assert_eq!((st.removed, st.unknown_removals), (1, 0), "{wide:?}");
            assert_eq!(depth(&ix, &[1, 1, 3, 3], "a"), 2, "{wide:?}");
            assert_eq!(depth(&ix, &[2, 2, 4, 4], "a"), 0, "{wide:?}");
            let st = ix.apply("a", &B::default().remove_h(std::slice::from_ref(&wide), None).build(), None).unwrap();
            assert_eq!(st.removed, 1, "{wide:?}");
            assert_eq!(ix.match_prefix(&Query::new("m", &[1, 1]))[0].1, 0);
            ix.check_invariants().unwrap();
        }
    }
}
