//! The invariant check (tests and `Index.check()`): recomputes every count
//! and link from scratch and compares.

use super::{Index, NIL};

impl Index {
    /// Check every internal invariant (tests; O(size)).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.len()];
        let mut engine_hashes = 0;
        for (ws, w) in self.workers.iter().enumerate() {
            let Some(w) = w else { continue };
            engine_hashes += w.emap.len();
            for e in &w.emap {
                refs[e[2] as usize] += 1;
            }
            let mut held = 0u64;
            for (slot, b) in self.blocks.iter().enumerate() {
                if self.find_block(b.key()) == Some(slot as u32) && self.pool.get(b.holders, ws as u32) != 0 {
                    held += 1;
                }
            }
            if held != w.held {
                return Err(format!("worker {} holds {held} blocks, counter says {}", w.id, w.held));
            }
        }
        if engine_hashes != self.engine_hashes {
            return Err(format!("engine hash count {} != {engine_hashes}", self.engine_hashes));
        }
        let (mut held_blocks, mut dormant, mut holdings) = (0, 0, 0);
        for slot in &self.by_key {
            let b = &self.blocks[*slot as usize];
            if b.refs != refs[*slot as usize] {
                return Err(format!("block {slot} refs {} != {}", b.refs, refs[*slot as usize]));
            }
            if b.holders == 0 {
                if b.refs == 0 {
                    return Err(format!("block {slot} is neither held nor referenced"));
                }
                dormant += 1;
            } else {
                held_blocks += 1;
                holdings += self.pool.len(b.holders) as usize;
            }
        }
        let mut lru = 0;
        let mut cur = self.lru_head;
        let mut prev = NIL;
        while cur != NIL {
            let [p, n] = self.links[cur as usize];
            if p != prev || self.blocks[cur as usize].holders == 0 {
                return Err(format!("LRU list broken at {cur}"));
            }
            lru += 1;
            prev = cur;
            cur = n;
        }
        let want_lru = if self.capacity.is_some() { held_blocks } else { 0 };
        if prev != self.lru_tail || lru != want_lru {
            return Err(format!("LRU has {lru} blocks, {held_blocks} held"));
        }
        if (held_blocks, dormant, holdings) != (self.held_blocks, self.dormant, self.holdings) {
            return Err(format!(
                "counts (held {}, dormant {}, holdings {}) != actual ({held_blocks}, {dormant}, {holdings})",
                self.held_blocks, self.dormant, self.holdings
            ));
        }
        if let Some(cap) = self.capacity {
            if held_blocks > cap {
                return Err(format!("{held_blocks} blocks held over capacity {cap}"));
            }
        }
        Ok(())
    }
}
