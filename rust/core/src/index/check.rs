//! The invariant check (tests and `Index.check()`): recomputes every count
//! and link from scratch and compares.

use super::{Index, NIL};

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;

impl Index {
    /// Check every internal invariant (tests; O(size)).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_registry()?;
        let live = self.blocks.iter().filter(|b| b.refs != NIL).count();
        if live != self.by_key.len() {
            return Err(format!("{live} blocks in the slab, {} in the key table (duplicate keys?)", self.by_key.len()));
        }
        for (slot, b) in self.blocks.iter().enumerate() {
            if b.refs == NIL {
                // free slot: `holders` is the free-list link
                continue;
            }
            if self.find_block(b.key()) != Some(slot as u32) {
                return Err(format!("block {slot} (key {:#018x}) is not found by its key", b.key()));
            }
            let mut stray = None;
            self.pool.for_each(b.holders, |ws, _| {
                if self.workers.get(ws as usize).is_none_or(Option::is_none) {
                    stray = Some(ws);
                }
            });
            if let Some(ws) = stray {
                return Err(format!("block {slot} is held by worker slot {ws}, which is not registered"));
            }
        }
        self.pool.check(self.blocks.iter().filter(|b| b.refs != NIL).map(|b| b.holders))?;
        let mut refs = vec![0u32; self.blocks.len()];
        let mut engine_hashes = 0;
        let mut named = vec![false; self.blocks.len()];
        for (ws, w) in self.workers.iter().enumerate() {
            let Some(w) = w else { continue };
            engine_hashes += w.emap.len();
            named.fill(false);
            for e in &w.emap {
                let slot = e[2] as usize;
                if self.blocks.get(slot).is_none_or(|b| b.refs == NIL) {
                    return Err(format!("worker {}: engine hash names free block {slot}", w.id));
                }
                refs[slot] += 1;
                named[slot] = true;
            }
            let mut held = 0u64;
            for (slot, b) in self.blocks.iter().enumerate() {
                if b.refs == NIL || self.pool.get(b.holders, ws as u32) == 0 {
                    continue;
                }
                held += 1;
                if !named[slot] {
                    // purge_slot and removals reach holdings through the
                    // engine hashes: this one could never be released.
                    return Err(format!("worker {} holds block {slot}, which none of its engine hashes names", w.id));
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

    /// Workers, ids and models agree with each other.
    fn check_registry(&self) -> Result<(), String> {
        let live = self.workers.iter().flatten().count();
        if live != self.by_id.len() {
            return Err(format!("{live} workers in slots, {} ids (duplicate workers?)", self.by_id.len()));
        }
        let mut per_model = vec![0u32; self.models.len()];
        for (ws, w) in self.workers.iter().enumerate() {
            let Some(w) = w else { continue };
            if self.by_id.get(&w.id) != Some(&(ws as u32)) {
                return Err(format!("worker {} in slot {ws} is not found by its id", w.id));
            }
            let Some(m) = self.models.get(w.model as usize).filter(|m| m.workers > 0) else {
                return Err(format!("worker {} names forgotten model {}", w.id, w.model));
            };
            if m.members.get(ws / 64).is_none_or(|bits| bits >> (ws % 64) & 1 == 0) {
                return Err(format!("worker {} is not a member of model {:?}", w.id, m.name));
            }
            per_model[w.model as usize] += 1;
        }
        if self.model_by_name.len() + self.free_models.len() != self.models.len() {
            return Err(format!(
                "{} models, {} named and {} free (duplicate or lost models?)",
                self.models.len(),
                self.model_by_name.len(),
                self.free_models.len()
            ));
        }
        for (name, &m) in &self.model_by_name {
            let model = &self.models[m as usize];
            let members: u32 = model.members.iter().map(|b| b.count_ones()).sum();
            if model.name != *name || model.workers != per_model[m as usize] || members != model.workers {
                return Err(format!(
                    "model {name:?}: {} workers counted, {members} members, {} registered",
                    model.workers, per_model[m as usize]
                ));
            }
            if model.workers == 0 {
                return Err(format!("model {name:?} has no workers but is not forgotten"));
            }
        }
        Ok(())
    }
}
