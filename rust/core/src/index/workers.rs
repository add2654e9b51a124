//! The worker and model registry: worker slots (reused after removal),
//! per-worker stream position and counters, and models with their learned
//! block size and member bitsets.

use hashbrown::HashTable;

use super::{bit_set, check_model, holdings::EMap, Index, WorkerCounters, WorkerStats};
use crate::error::IndexError;
use crate::holders;
use crate::stream::Stream;

pub(super) struct Worker {
    pub(super) id: String,
    pub(super) model: u32,
    /// engine key (two u32 halves) → block slot
    pub(super) emap: EMap,
    pub(super) held: u64,
    /// The worker's event stream: its position (last applied seq and the
    /// digest of that payload) always, its state machine when followed.
    pub(super) stream: Stream,
    /// An event stream follows this worker ([`Index::follow`]).
    pub(super) followed: bool,
    pub(super) counters: WorkerCounters,
}

pub(super) struct Model {
    pub(super) name: String,
    pub(super) block_size: Option<u32>,
    /// Bitset over worker slots of this model's workers.
    pub(super) members: Vec<u64>,
    pub(super) workers: u32,
}

impl Index {
    // ---------------------------------------------------------------- workers

    /// Register a worker of `model`. Adding an existing worker with the same
    /// model is a no-op; with another model it is an error (remove it first).
    pub fn add_worker(&mut self, id: &str, model: &str) -> Result<(), IndexError> {
        check_model(model)?;
        if id.is_empty() {
            return Err(IndexError::Invalid("worker id must not be empty".into()));
        }
        if let Some(&slot) = self.by_id.get(id) {
            let w = self.worker(slot);
            let existing = &self.models[w.model as usize].name;
            if existing == model {
                return Ok(());
            }
            return Err(IndexError::ModelMismatch {
                worker: id.to_owned(),
                existing: existing.clone(),
                requested: model.to_owned(),
            });
        }
        let m = self.model_id(model);
        let slot = if let Some(s) = self.free_workers.pop() {
            s
        } else {
            let s = self.workers.len() as u32;
            if s > holders::MAX_SLOT {
                return Err(IndexError::Invalid(format!("too many workers (max {})", holders::MAX_SLOT)));
            }
            self.workers.push(None);
            s
        };
        self.workers[slot as usize] = Some(Worker {
            id: id.to_owned(),
            model: m,
            emap: HashTable::new(),
            held: 0,
            stream: Stream::default(),
            followed: false,
            counters: WorkerCounters::default(),
        });
        let model = &mut self.models[m as usize];
        bit_set(&mut model.members, slot, true);
        model.workers += 1;
        self.by_id.insert(id.to_owned(), slot);
        self.epoch += 1;
        Ok(())
    }

    /// Remove a worker and everything it holds. Returns false if unknown.
    /// A worker followed by a stream is removed through [`Index::unfollow`].
    pub fn remove_worker(&mut self, id: &str) -> Result<bool, IndexError> {
        let Some(&slot) = self.by_id.get(id) else { return Ok(false) };
        if self.worker(slot).followed {
            return Err(IndexError::Followed(id.to_owned()));
        }
        self.remove_slot(slot);
        Ok(true)
    }

    pub(super) fn remove_slot(&mut self, slot: u32) {
        let id = self.worker(slot).id.clone();
        self.by_id.remove(&id);
        self.purge_slot(slot);
        let w = self.workers[slot as usize].take().expect("registered worker");
        let model = &mut self.models[w.model as usize];
        bit_set(&mut model.members, slot, false);
        model.workers -= 1;
        self.free_workers.push(slot);
        self.epoch += 1;
    }

    /// Drop everything a worker holds (it restarted, or its stream has an
    /// unrecoverable gap); it stays registered. Its last seq is forgotten.
    pub fn purge_worker(&mut self, id: &str) -> Result<(), IndexError> {
        let slot = self.slot_of(id)?;
        if self.worker(slot).followed {
            return Err(IndexError::Followed(id.to_owned()));
        }
        self.purge_slot(slot);
        let w = self.worker_mut(slot);
        w.stream.set_position(None, 0);
        w.counters.purges += 1;
        Ok(())
    }

    pub fn has_worker(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// Registered worker ids with their models, in registration-slot order.
    pub fn workers(&self) -> Vec<(&str, &str)> {
        self.workers.iter().flatten().map(|w| (w.id.as_str(), self.models[w.model as usize].name.as_str())).collect()
    }

    /// The block size learned for `model` from its events.
    pub fn block_size(&self, model: &str) -> Option<u32> {
        self.model_by_name.get(model).and_then(|&m| self.models[m as usize].block_size)
    }

    pub fn last_seq(&self, id: &str) -> Result<Option<u64>, IndexError> {
        Ok(self.worker(self.slot_of(id)?).stream.last_seq())
    }

    /// The last applied seq and the digest of its payload (what a resumed
    /// stream checks against the engine's replay).
    pub fn position(&self, id: &str) -> Result<(Option<u64>, u64), IndexError> {
        Ok(self.worker(self.slot_of(id)?).stream.position())
    }

    /// Record the position of a worker applied to directly (not followed).
    pub fn set_position(&mut self, id: &str, seq: Option<u64>, digest: u64) -> Result<(), IndexError> {
        let slot = self.slot_of(id)?;
        let w = self.worker_mut(slot);
        if w.followed {
            return Err(IndexError::Followed(id.to_owned()));
        }
        w.stream.set_position(seq, digest);
        Ok(())
    }

    pub fn worker_stats(&self, id: &str) -> Result<WorkerStats, IndexError> {
        let w = self.worker(self.slot_of(id)?);
        Ok(WorkerStats {
            id: w.id.clone(),
            model: self.models[w.model as usize].name.clone(),
            blocks: w.held,
            engine_hashes: w.emap.len(),
            last_seq: w.stream.last_seq(),
            counters: w.counters,
        })
    }

    pub(super) fn slot_of(&self, id: &str) -> Result<u32, IndexError> {
        self.by_id.get(id).copied().ok_or_else(|| IndexError::UnknownWorker(id.to_owned()))
    }

    pub(super) fn worker(&self, slot: u32) -> &Worker {
        self.workers[slot as usize].as_ref().expect("live worker slot")
    }

    pub(super) fn worker_mut(&mut self, slot: u32) -> &mut Worker {
        self.workers[slot as usize].as_mut().expect("live worker slot")
    }

    pub(super) fn model_id(&mut self, name: &str) -> u32 {
        if let Some(&m) = self.model_by_name.get(name) {
            return m;
        }
        let m = self.models.len() as u32;
        self.models.push(Model { name: name.to_owned(), block_size: None, members: Vec::new(), workers: 0 });
        self.model_by_name.insert(name.to_owned(), m);
        m
    }

    /// Changes whenever a worker is added or removed (slots are reused).
    pub fn worker_epoch(&self) -> u64 {
        self.epoch
    }

    /// Every registered worker with its slot and model, in slot order.
    pub fn worker_slots(&self) -> impl Iterator<Item = (u32, &str, &str)> {
        self.workers.iter().enumerate().filter_map(|(s, w)| {
            w.as_ref().map(|w| (s as u32, w.id.as_str(), self.models[w.model as usize].name.as_str()))
        })
    }

    /// One past the largest worker slot.
    pub fn slot_count(&self) -> usize {
        self.workers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::error::IndexError;

    #[test]
    fn worker_removal_purges_and_slot_reuse_is_clean() {
        let mut ix = two_workers();
        ix.apply("a", &B::default().store(&[1], None, &[1, 1], None).build(), None).unwrap();
        ix.apply("b", &B::default().store(&[5], None, &[1, 1], None).build(), None).unwrap();
        assert!(ix.remove_worker("a").unwrap());
        assert!(!ix.remove_worker("a").unwrap());
        ix.add_worker("c", "m").unwrap();
        assert_eq!(depth(&ix, &[1, 1], "c"), 0);
        assert_eq!(depth(&ix, &[1, 1], "b"), 1);
        assert_eq!(ix.stats().holdings, 1);
        assert!(matches!(ix.add_worker("c", "other"), Err(IndexError::ModelMismatch { .. })));
        assert!(matches!(ix.apply("zz", &[0x90], None), Err(IndexError::UnknownWorker(_))));
        ix.check_invariants().unwrap();
    }
}
