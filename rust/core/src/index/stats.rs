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
