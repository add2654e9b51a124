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

impl Model {
    /// A freed model slot (its id waits in `Index::free_models`).
    pub(super) fn vacant() -> Model {
        Model { name: String::new(), block_size: None, members: Vec::new(), workers: 0 }
    }

    /// Whether none of the model's workers holds a block or names one by
    /// an engine hash: then the block size may be learned anew (nothing
    /// indexed depends on it). Engine hashes count too, so blocks evicted
    /// for capacity (still named, so still in the engine's cache) keep
    /// one stray event from changing the block size.
    pub(super) fn indexes_nothing(&self, workers: &[Option<Worker>]) -> bool {
        let mut slots = self
            .members
            .iter()
            .enumerate()
            .flat_map(|(w, &bits)| (0..64).filter(move |b| bits >> b & 1 == 1).map(move |b| w * 64 + b));
        slots.all(|s| workers[s].as_ref().is_none_or(|w| w.held == 0 && w.emap.is_empty()))
    }
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
        if model.workers == 0 {
            // Forget the model with its last worker: a redeploy may use
            // another block size, and models must not pile up forever.
            self.model_by_name.remove(&model.name);
            *model = Model::vacant();
            self.free_models.push(w.model);
        }
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
        let model = Model { name: name.to_owned(), block_size: None, members: Vec::new(), workers: 0 };
        let m = if let Some(m) = self.free_models.pop() {
            self.models[m as usize] = model;
            m
        } else {
            self.models.push(model);
            (self.models.len() - 1) as u32
        };
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

#[cfg(test)]
mod block_size_tests {
    use super::super::testutil::*;
    use crate::index::{Index, Query};

    fn store(ix: &mut Index, w: &str, hash: u64, tokens: &[u32], bs: Option<u64>) -> crate::index::ApplyStats {
        let mut b = B::default().store(&[hash], None, tokens, None);
        if let Some(bs) = bs {
            b = b.block_size(bs);
        }
        ix.apply(w, &b.build(), None).unwrap()
    }

    #[test]
    fn a_redeploy_with_another_block_size_is_indexed() {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        store(&mut ix, "a", 1, &[1, 2], None);
        assert_eq!(ix.block_size("m"), Some(2));
        assert!(ix.remove_worker("a").unwrap());
        assert_eq!((ix.block_size("m"), ix.stats().models), (None, 0));
        ix.add_worker("b", "m").unwrap();
        let st = store(&mut ix, "b", 1, &[1, 2, 3, 4], Some(4));
        assert_eq!((st.stored, st.ignored), (1, 0));
        assert_eq!(ix.block_size("m"), Some(4));
        assert_eq!(depth(&ix, &[1, 2, 3, 4], "b"), 1);
        ix.check_invariants().unwrap();
    }

    #[test]
    fn removed_models_are_freed_and_their_ids_reused() {
        let mut ix = Index::default();
        ix.add_worker("w", "keep").unwrap();
        for i in 0..1000 {
            let model = format!("model-{i}");
            ix.add_worker("x", &model).unwrap();
            assert!(ix.remove_worker("x").unwrap());
        }
        assert_eq!(ix.stats().models, 1);
        // one model slot for "keep", one reused by all the others
        assert_eq!(ix.models.len(), 2);
        assert_eq!(ix.workers(), vec![("w", "keep")]);
        ix.check_invariants().unwrap();
        // a snapshot of it loads with the same models
        let mut buf = Vec::new();
        ix.save(&mut buf).unwrap();
        let back = Index::load(&mut buf.as_slice()).unwrap();
        back.check_invariants().unwrap();
        assert_eq!(back.workers(), vec![("w", "keep")]);
    }

    #[test]
    fn block_size_zero_is_refused_and_never_learned() {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        let st = store(&mut ix, "a", 1, &[1, 2], Some(0));
        assert_eq!((st.stored, st.ignored, st.block_size_mismatch, st.skipped), (0, 1, 1, 1));
        assert_eq!(ix.block_size("m"), None);
        let st = store(&mut ix, "a", 1, &[1, 2], Some(2));
        assert_eq!((st.stored, st.ignored), (1, 0));
        assert_eq!(ix.worker_stats("a").unwrap().counters.block_size_mismatch, 1);
        assert_eq!(depth(&ix, &[1, 2], "a"), 1);
    }

    #[test]
    fn blocks_evicted_for_capacity_still_pin_the_block_size() {
        let mut ix = Index::new(Some(1)).unwrap();
        ix.add_worker("a", "m").unwrap();
        ix.add_worker("x", "other").unwrap();
        store(&mut ix, "a", 1, &[1, 2], None);
        store(&mut ix, "x", 1, &[5, 5], None);
        // a's block was evicted, but its engine hash still names it
        assert_eq!((ix.stats().evictions, ix.worker_stats("a").unwrap().blocks), (1, 0));
        let st = store(&mut ix, "a", 2, &[1, 2, 3, 4], Some(4));
        assert_eq!((st.stored, st.block_size_mismatch), (0, 1));
        assert_eq!(ix.block_size("m"), Some(2));
        ix.check_invariants().unwrap();
    }

    #[test]
    fn a_mismatch_is_counted_while_blocks_are_held_and_relearned_after() {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        ix.add_worker("b", "m").unwrap();
        store(&mut ix, "a", 1, &[1, 2], None);
        let st = store(&mut ix, "b", 7, &[1, 2, 3, 4], Some(4));
        assert_eq!((st.stored, st.ignored, st.block_size_mismatch), (0, 1, 1));
        let c = ix.worker_stats("b").unwrap().counters;
        assert_eq!((c.block_size_mismatch, c.skipped), (1, 1));
        assert_eq!(ix.block_size("m"), Some(2));
        // Once nothing is held, the model may learn another block size.
        ix.apply("a", &B::default().clear().build(), None).unwrap();
        let st = store(&mut ix, "b", 7, &[1, 2, 3, 4], Some(4));
        assert_eq!((st.stored, st.block_size_mismatch), (1, 0));
        assert_eq!(ix.block_size("m"), Some(4));
        let q = Query::new("m", &[1, 2, 3, 4]);
        assert_eq!(ix.match_prefix(&q), vec![("a", 0), ("b", 1)]);
        ix.check_invariants().unwrap();
    }
}

#[cfg(test)]
mod slot_tests {
    use super::super::testutil::*;
    use crate::index::{Index, Query};
    use crate::prefix::Tier;

    #[test]
    fn removing_a_worker_in_a_later_slot_then_matching() {
        let mut ix = Index::default();
        for w in ["a", "b", "c"] {
            ix.add_worker(w, "m").unwrap();
            ix.apply(w, &B::default().store(&[1, 2], None, &[1, 1, 2, 2], None).build(), None).unwrap();
        }
        ix.apply("c", &B::default().store(&[3], Some(2), &[3, 3], Some("CPU")).build(), None).unwrap();
        let toks = [1, 1, 2, 2, 3, 3];
        assert!(ix.remove_worker("c").unwrap());
        assert_eq!(ix.match_prefix(&Query::new("m", &toks)), vec![("a", 2), ("b", 2)]);
        assert!(ix.remove_worker("b").unwrap());
        assert_eq!(ix.match_prefix(&Query::new("m", &toks)), vec![("a", 2)]);
        let cpu = Query { tiers: Tier::Cpu.bit(), ..Query::new("m", &toks) };
        assert_eq!(ix.match_prefix(&cpu), vec![("a", 0)]);
        // New workers reuse slots 1 and 2 (last freed first) and inherit
        // nothing.
        ix.add_worker("d", "m").unwrap();
        ix.add_worker("e", "m").unwrap();
        assert_eq!(ix.match_prefix(&Query::new("m", &toks)), vec![("a", 2), ("d", 0), ("e", 0)]);
        assert!(ix.remove_worker("a").unwrap());
        assert_eq!(ix.match_prefix(&Query::new("m", &toks)), vec![("d", 0), ("e", 0)]);
        let mut tiers = Vec::new();
        ix.match_tiers(&Query::new("m", &toks), &mut tiers);
        assert_eq!(tiers, vec![(1, [0; 4]), (2, [0; 4])]);
        assert_eq!(ix.stats().holdings, 0);
        ix.check_invariants().unwrap();
    }

    #[test]
    fn matching_with_more_than_4096_workers() {
        let n = 4200u32;
        let mut ix = Index::default();
        for i in 0..n {
            ix.add_worker(&format!("w{i}"), "m").unwrap();
        }
        // One block held by a few workers (a sorted vector, slots on both
        // sides of 4096), one by every other worker (bitmaps) and one by a
        // single worker past 4096 (inline).
        let few = [3u32, 4095, 4096, 4150, 4199];
        for &i in &few {
            ix.apply(&format!("w{i}"), &B::default().store(&[1], None, &[7, 7], None).build(), None).unwrap();
        }
        for i in (0..n).step_by(2) {
            let w = format!("w{i}");
            ix.apply(&w, &B::default().store(&[10, 11], None, &[9, 9, 8, 8], None).build(), None).unwrap();
        }
        ix.apply("w4101", &B::default().store(&[5], None, &[6, 6], None).build(), None).unwrap();
        let mut out = Vec::new();
        let depths = |ix: &Index, toks: &[u32], out: &mut Vec<(u32, u32)>| {
            ix.match_slots(&Query::new("m", toks), out);
            assert_eq!(out.len(), n as usize);
            assert!(out.iter().enumerate().all(|(i, (s, _))| *s == i as u32));
            out.iter().map(|(_, d)| *d).collect::<Vec<u32>>()
        };
        let d = depths(&ix, &[9, 9, 8, 8], &mut out);
        assert!(d.iter().enumerate().all(|(s, &d)| d == if s % 2 == 0 { 2 } else { 0 }));
        let d = depths(&ix, &[7, 7], &mut out);
        let held: Vec<u32> = (0..n).filter(|&s| d[s as usize] == 1).collect();
        assert_eq!(held, few);
        let d = depths(&ix, &[6, 6, 1, 1], &mut out);
        let held: Vec<u32> = (0..n).filter(|&s| d[s as usize] != 0).collect();
        assert_eq!(held, vec![4101]);
        ix.check_invariants().unwrap();
    }

    #[test]
    fn every_change_of_the_workers_gives_a_new_epoch() {
        let mut ix = Index::default();
        let mut seen = vec![ix.worker_epoch()];
        ix.add_worker("a", "m").unwrap();
        seen.push(ix.worker_epoch());
        ix.remove_worker("a").unwrap();
        seen.push(ix.worker_epoch());
        ix.add_worker("b", "m").unwrap();
        seen.push(ix.worker_epoch());
        let mut unique = seen.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "epochs {seen:?}");
    }

    #[test]
    fn a_model_relearns_its_block_size_only_when_no_worker_holds_anything() {
        // w0 (slot 0) holds nothing; w1 or w65 (slot 65, second word) holds a block
        let fleet = || {
            let mut ix = Index::default();
            for w in 0..66 {
                ix.add_worker(&format!("w{w}"), "m").unwrap();
            }
            ix
        };
        for holder in ["w1", "w65"] {
            let mut ix = fleet();
            ix.apply(holder, &B::default().store(&[1], None, &[1, 2], None).build(), None).unwrap();
            let st =
                ix.apply("w0", &B::default().store(&[7], None, &[1, 2, 3], None).block_size(3).build(), None).unwrap();
            assert_eq!((st.stored, st.block_size_mismatch), (0, 1), "{holder} holds a block");
            assert_eq!(ix.block_size("m"), Some(2));
        }
        // nobody holds anything: the next store may set another size
        let mut ix = fleet();
        ix.apply("w65", &B::default().store(&[1], None, &[1, 2], None).build(), None).unwrap();
        ix.apply("w65", &B::default().clear().build(), None).unwrap();
        let st = ix.apply("w0", &B::default().store(&[7], None, &[1, 2, 3], None).block_size(3).build(), None).unwrap();
        assert_eq!(st.stored, 1);
        assert_eq!(ix.block_size("m"), Some(3));
    }
}
