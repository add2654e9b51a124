//! Sizes of the index: counts and memory accounting from capacities.

use super::{
    workers::{Model, Worker},
    Index, Stats,
};

impl Index {
    // ------------------------------------------------------------------ stats

    pub fn stats(&self) -> Stats {
        Stats {
            workers: self.by_id.len(),
            models: self.model_by_name.len(),
            blocks: self.held_blocks,
            holdings: self.holdings,
            dormant: self.dormant,
            engine_hashes: self.engine_hashes,
            evictions: self.evictions,
            capacity_blocks: self.capacity,
            memory_bytes: self.memory_bytes(),
        }
    }

    pub(super) fn memory_bytes(&self) -> usize {
        let mut n = std::mem::size_of::<Self>();
        n += self.blocks.memory_bytes();
        n += self.links.capacity() * std::mem::size_of::<[u32; 2]>();
        n += self.by_key.allocation_size();
        n += self.pool.memory_bytes();
        n += self.workers.capacity() * std::mem::size_of::<Option<Worker>>();
        n += self.free_workers.capacity() * 4;
        n += self.free_models.capacity() * 4;
        for w in self.workers.iter().flatten() {
            n += w.emap.allocation_size() + w.id.capacity();
        }
        // std HashMap: (key, value) slots plus one control byte each.
        n += self.by_id.capacity() * (std::mem::size_of::<(String, u32)>() + 1);
        n += self.by_id.keys().map(String::capacity).sum::<usize>();
        n += self.model_by_name.capacity() * (std::mem::size_of::<(String, u32)>() + 1);
        n += self.models.capacity() * std::mem::size_of::<Model>();
        for m in &self.models {
            n += 2 * m.name.capacity() + m.members.capacity() * 8;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::index::Index;

    /// Adding workers, filling them with shared and private blocks and
    /// removing them again must not leave memory behind: after the first
    /// cycle (which sizes the tables), each cycle ends where it began.
    #[test]
    fn memory_returns_to_baseline_after_workers_are_removed() {
        let mut ix = Index::default();
        let cycle = |ix: &mut Index| {
            for w in 0..40u32 {
                let id = format!("w{w}");
                ix.add_worker(&id, "m").unwrap();
                // blocks 0..20 are shared by everyone (pool sets), one is private
                let toks: Vec<u32> = (0..40).collect();
                let hashes: Vec<u64> = (1..=20).collect();
                ix.apply(&id, &B::default().store(&hashes, None, &toks, None).build(), None).unwrap();
                ix.apply(&id, &B::default().store(&[99], None, &[1000 + w, 0], None).build(), None).unwrap();
            }
            assert_eq!(ix.stats().holdings, 40 * 21);
            for w in 0..40 {
                assert!(ix.remove_worker(&format!("w{w}")).unwrap());
            }
            let s = ix.stats();
            assert_eq!((s.workers, s.models, s.blocks, s.holdings, s.engine_hashes), (0, 0, 0, 0, 0));
            ix.check_invariants().unwrap();
            s.memory_bytes
        };
        let baseline = cycle(&mut ix);
        for _ in 0..4 {
            assert_eq!(cycle(&mut ix), baseline);
        }
    }
}
