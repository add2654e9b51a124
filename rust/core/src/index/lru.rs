//! The LRU list over held blocks (kept only under a capacity bound) and
//! eviction of the least recently used blocks when the bound is exceeded.

use super::{Index, NIL};

impl Index {
    pub(super) fn lru_unlink(&mut self, slot: u32) {
        let [prev, next] = self.links[slot as usize];
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.links[prev as usize][1] = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.links[next as usize][0] = prev;
        }
        self.links[slot as usize] = [NIL, NIL];
    }

    pub(super) fn lru_push_front(&mut self, slot: u32) {
        let head = self.lru_head;
        self.links[slot as usize] = [NIL, head];
        if head == NIL {
            self.lru_tail = slot;
        } else {
            self.links[head as usize][0] = slot;
        }
        self.lru_head = slot;
    }

    pub(super) fn evict_to_capacity(&mut self) {
        let Some(cap) = self.capacity else { return };
        while self.held_blocks > cap {
            let victim = self.lru_tail;
            debug_assert_ne!(victim, NIL);
            let mut slots = Vec::new();
            self.pool.for_each(self.blocks[victim as usize].holders, |s, _| slots.push(s));
            for s in slots {
                self.set_tiers(victim, s, 0, false);
            }
            self.evictions += 1;
            // Engine hashes still name it, so it stays dormant (refs > 0).
            self.maybe_free_block(victim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::index::Index;

    #[test]
    fn capacity_evicts_least_recently_used_and_never_lies() {
        let mut ix = Index::new(Some(2)).unwrap();
        ix.add_worker("a", "m").unwrap();
        ix.apply("a", &B::default().store(&[1], None, &[1, 1], None).build(), None).unwrap();
        ix.apply("a", &B::default().store(&[2], None, &[2, 2], None).build(), None).unwrap();
        // touch block 1, so block 2 is the least recent
        ix.apply("a", &B::default().store(&[1], None, &[1, 1], None).build(), None).unwrap();
        ix.apply("a", &B::default().store(&[3], None, &[3, 3], None).build(), None).unwrap();
        assert_eq!(depth(&ix, &[1, 1], "a"), 1);
        assert_eq!(depth(&ix, &[2, 2], "a"), 0);
        assert_eq!(depth(&ix, &[3, 3], "a"), 1);
        let s = ix.stats();
        assert_eq!((s.blocks, s.evictions, s.dormant), (2, 1, 1));
        ix.check_invariants().unwrap();
        // The engine's own removal releases the dormant block.
        ix.apply("a", &B::default().remove(&[2], None).build(), None).unwrap();
        assert_eq!(ix.stats().dormant, 0);
        ix.check_invariants().unwrap();
    }
}
