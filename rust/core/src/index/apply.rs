//! Applying decoded event batches to one worker (SPEC section 2): stores
//! with parent resolution and block keys, per-tier removals, clears.

use super::{ekey, holdings::EMap, mix, ApplyStats, Index, NIL};
use crate::error::IndexError;
use crate::prefix::{chain, engine_key, local_hash, namespace, Lora, Tier};
use crate::wire::{self, Batch, Event, Mode, Stored, Value};

impl Index {
    // ------------------------------------------------------------------ apply

    /// Decode one payload and apply it to worker `id`. `seq`, when given,
    /// is recorded as the worker's last applied sequence number.
    pub fn apply(&mut self, id: &str, payload: &[u8], seq: Option<u64>) -> Result<ApplyStats, IndexError> {
        let wslot = self.slot_of(id)?;
        if self.worker(wslot).followed {
            return Err(IndexError::Followed(id.to_owned()));
        }
        let mut bufs = std::mem::take(&mut self.decode_buffers);
        let result = wire::decode_with(payload, Mode::Index, &mut bufs).map(|batch| {
            let st = self.apply_batch(wslot, &batch, seq);
            bufs.recycle(batch);
            st
        });
        self.decode_buffers = bufs;
        if let (Ok(_), Some(seq)) = (&result, seq) {
            self.worker_mut(wslot).stream.set_position(Some(seq), crate::stream::payload_digest(payload));
        }
        Ok(result?)
    }

    /// Apply an already decoded batch (see [`Index::apply`]).
    pub fn apply_decoded(&mut self, id: &str, batch: &Batch<'_>, seq: Option<u64>) -> Result<ApplyStats, IndexError> {
        let wslot = self.slot_of(id)?;
        if self.worker(wslot).followed {
            return Err(IndexError::Followed(id.to_owned()));
        }
        Ok(self.apply_batch(wslot, batch, seq))
    }

    pub(super) fn apply_batch(&mut self, wslot: u32, batch: &Batch<'_>, seq: Option<u64>) -> ApplyStats {
        let mut st = ApplyStats { unknown_events: u64::from(batch.unknown_events), ..ApplyStats::default() };
        for ev in &batch.events {
            match ev {
                Event::Stored(s) => self.apply_stored(wslot, batch, s, &mut st),
                Event::Removed(r) => {
                    let tier = Tier::of_medium(r.medium).bit();
                    let mut emap = std::mem::take(&mut self.worker_mut(wslot).emap);
                    for h in &batch.hashes[r.hashes.clone()] {
                        let ek = engine_key(*h, r.group_idx.unwrap_or(0));
                        let Ok(entry) = emap.find_entry(mix(ek), |e| ekey(e) == ek) else {
                            st.unknown_removals += 1;
                            continue;
                        };
                        let slot = entry.get()[2];
                        let cur = self.pool.get(self.blocks[slot as usize].holders, wslot);
                        let left = cur & !tier;
                        if left == 0 {
                            // W no longer holds the block: forget the hash.
                            entry.remove();
                            self.engine_hashes -= 1;
                            self.blocks[slot as usize].refs -= 1;
                        }
                        if cur != left {
                            self.set_tiers(slot, wslot, left, false);
                        }
                        if left == 0 {
                            self.maybe_free_block(slot);
                        }
                        st.removed += 1;
                    }
                    self.worker_mut(wslot).emap = emap;
                }
                Event::Cleared => {
                    self.purge_slot(wslot);
                    st.cleared += 1;
                }
            }
        }
        st.skipped = st.orphaned + st.ignored + st.unknown_removals;
        let w = self.worker_mut(wslot);
        w.counters.batches += 1;
        w.counters.stored += st.stored;
        w.counters.removed += st.removed;
        w.counters.cleared += st.cleared;
        w.counters.skipped += st.skipped;
        w.counters.orphaned += st.orphaned;
        w.counters.unknown_removals += st.unknown_removals;
        w.counters.unknown_events += st.unknown_events;
        w.counters.block_size_mismatch += st.block_size_mismatch;
        if let Some(seq) = seq {
            // The digest is the caller's to record (it has the payload).
            w.stream.set_position(Some(seq), 0);
        }
        st
    }

    pub(super) fn apply_stored(&mut self, wslot: u32, batch: &Batch<'_>, s: &Stored<'_>, st: &mut ApplyStats) {
        let mut emap = std::mem::take(&mut self.worker_mut(wslot).emap);
        self.apply_stored_with(wslot, &mut emap, batch, s, st);
        self.worker_mut(wslot).emap = emap;
    }

    pub(super) fn apply_stored_with(
        &mut self,
        wslot: u32,
        emap: &mut EMap,
        batch: &Batch<'_>,
        s: &Stored<'_>,
        st: &mut ApplyStats,
    ) {
        let hashes = &batch.hashes[s.hashes.clone()];
        let n = hashes.len();
        if n == 0 {
            return;
        }
        if s.kv_cache_spec_kind.is_some_and(|k| k != "full_attention") {
            st.ignored += n as u64;
            return;
        }
        let tier = Tier::of_medium(s.medium).bit();
        let tokens = &batch.tokens[s.tokens.clone()];
        if tokens.is_empty() {
            // Offload-style store: the blocks are named by hash only.
            for h in hashes {
                match Self::emap_get(emap, engine_key(*h, s.group_idx.unwrap_or(0))) {
                    Some(slot) => {
                        let cur = self.pool.get(self.blocks[slot as usize].holders, wslot);
                        self.set_tiers(slot, wslot, cur | tier, true);
                        st.stored += 1;
                    }
                    None => st.orphaned += 1,
                }
            }
            self.evict_to_capacity();
            return;
        }
        // Block size: the event's, else inferred; must tile the tokens and
        // agree with the block size of the blocks the model holds.
        let bs = match s.block_size {
            Some(0) => {
                // Never learn (or infer past) an explicit 0: the engine's
                // configuration is broken, and the Python side logs it.
                st.ignored += n as u64;
                st.block_size_mismatch += n as u64;
                return;
            }
            Some(b) => b,
            None => (tokens.len() / n) as u64,
        };
        let model = self.worker(wslot).model as usize;
        // (A block size of 0, or one too large for a u32, tiles no tokens.)
        if usize::try_from(bs).ok().and_then(|b| b.checked_mul(n)) != Some(tokens.len()) {
            st.ignored += n as u64;
            return;
        }
        match self.models[model].block_size {
            Some(m) if u64::from(m) == bs => {}
            // A model whose workers hold and name nothing (all cleared or
            // just added) may learn another block size: nothing indexed
            // depends on the old one. (This worker's map is out in `emap`.)
            Some(_) if !(emap.is_empty() && self.models[model].indexes_nothing(&self.workers)) => {
                st.ignored += n as u64;
                st.block_size_mismatch += n as u64;
                return;
            }
            _ => self.models[model].block_size = Some(bs as u32),
        }
        let bs = bs as usize;
        let ns = namespace(&self.models[model].name, Lora::of_event(s.lora_name, s.lora_id));
        // The parent's standard seq hash: its key without the namespace.
        let (mut prev, mut prev_slot) = match s.parent {
            Some(p) => match Self::emap_get(emap, engine_key(p, s.group_idx.unwrap_or(0))) {
                Some(slot) => (Some(self.blocks[slot as usize].key() ^ ns), slot),
                None => {
                    st.orphaned += n as u64;
                    return;
                }
            },
            None => (None, NIL),
        };
        // Allocates only for events that carry extra keys.
        let mut extras: Vec<Value<'_>> = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            let toks = &tokens[i * bs..(i + 1) * bs];
            extras.clear();
            if let Some(Some(ek)) = s.extra_keys.as_ref().and_then(|v| v.get(i)) {
                for v in ek {
                    if matches!((v, s.lora_name), (Value::Str(a), Some(b)) if *a == b) {
                        continue;
                    }
                    extras.push(v.clone());
                }
            }
            if i == 0 && s.parent.is_none() {
                if let Some(salt) = s.cache_salt {
                    extras.push(Value::Str(salt));
                }
            }
            let seq = chain(prev, local_hash(toks, &extras, self.seed), self.seed);
            prev = Some(seq);
            let key = seq ^ ns;
            // A prefix other workers stored already: the parent's child hint
            // usually names this block, which saves the key-table probe.
            let hinted = match self.blocks.get(prev_slot as usize) {
                Some(p) => {
                    self.blocks.get(p.child as usize).filter(|c| c.refs != NIL && c.key() == key).map(|_| p.child)
                }
                None => None,
            };
            let slot = match hinted {
                Some(slot) => slot,
                None => self.intern_block(key),
            };
            if prev_slot != NIL {
                self.blocks[prev_slot as usize].child = slot;
            }
            prev_slot = slot;
            let ek = engine_key(*h, s.group_idx.unwrap_or(0));
            if let Some(old) = self.emap_set(emap, ek, slot) {
                if old != slot {
                    // The engine re-used the hash for other content: forget
                    // what it said before.
                    if self.pool.get(self.blocks[old as usize].holders, wslot) != 0 {
                        self.set_tiers(old, wslot, 0, false);
                    }
                    self.maybe_free_block(old);
                }
            }
            let cur = self.pool.get(self.blocks[slot as usize].holders, wslot);
            self.set_tiers(slot, wslot, cur | tier, true);
            st.stored += 1;
        }
        self.evict_to_capacity();
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::index::Query;
    use crate::prefix::Tier;

    #[test]
    fn chained_stores_match_leading_blocks() {
        let mut ix = two_workers();
        let st = ix.apply("a", &B::default().store(&[1, 2], None, &[1, 2, 3, 4], None).build(), Some(0)).unwrap();
        assert_eq!((st.stored, st.skipped), (2, 0));
        ix.apply("a", &B::default().store(&[3], Some(2), &[5, 6], None).build(), Some(1)).unwrap();
        assert_eq!(depth(&ix, &[1, 2, 3, 4, 5, 6, 7], "a"), 3);
        assert_eq!(depth(&ix, &[1, 2, 3, 4, 5, 6, 7], "b"), 0);
        assert_eq!(depth(&ix, &[1, 2, 9, 9, 5, 6], "a"), 1);
        assert_eq!(ix.last_seq("a").unwrap(), Some(1));
        let s = ix.stats();
        assert_eq!((s.blocks, s.holdings, s.workers), (3, 3, 2));
        ix.check_invariants().unwrap();
    }

    #[test]
    fn orphans_are_dropped_not_rooted() {
        let mut ix = two_workers();
        let st = ix.apply("a", &B::default().store(&[7], Some(99), &[1, 2], None).build(), None).unwrap();
        assert_eq!((st.stored, st.orphaned, st.skipped), (0, 1, 1));
        assert_eq!(depth(&ix, &[1, 2], "a"), 0);
        // Parent resolution is per worker: b cannot chain from a's hash.
        ix.apply("a", &B::default().store(&[1], None, &[1, 2], None).build(), None).unwrap();
        let st = ix.apply("b", &B::default().store(&[2], Some(1), &[3, 4], None).build(), None).unwrap();
        assert_eq!(st.orphaned, 1);
        ix.check_invariants().unwrap();
    }

    #[test]
    fn stores_are_idempotent_and_removals_per_tier() {
        let mut ix = two_workers();
        let p = B::default().store(&[1, 2], None, &[1, 2, 3, 4], None).build();
        ix.apply("a", &p, None).unwrap();
        ix.apply("a", &p, None).unwrap();
        ix.apply("a", &B::default().store(&[2], Some(1), &[3, 4], Some("CPU")).build(), None).unwrap();
        assert_eq!(ix.stats().holdings, 2);
        ix.apply("a", &B::default().remove(&[2], None).build(), None).unwrap();
        // still in CPU
        assert_eq!(depth(&ix, &[1, 2, 3, 4], "a"), 2);
        let gpu_only = Query { tiers: Tier::Gpu.bit(), ..Query::new("m", &[1, 2, 3, 4]) };
        assert_eq!(ix.match_prefix(&gpu_only)[0], ("a", 1));
        ix.apply("a", &B::default().remove(&[2], Some("CPU")).build(), None).unwrap();
        assert_eq!(depth(&ix, &[1, 2, 3, 4], "a"), 1);
        let st = ix.apply("a", &B::default().remove(&[2], Some("CPU")).build(), None).unwrap();
        assert_eq!(st.unknown_removals, 1);
        ix.apply("a", &B::default().clear().build(), None).unwrap();
        assert_eq!(depth(&ix, &[1, 2, 3, 4], "a"), 0);
        let s = ix.stats();
        assert_eq!((s.blocks, s.holdings, s.dormant, s.engine_hashes), (0, 0, 0, 0));
        ix.check_invariants().unwrap();
    }

    #[test]
    fn worker_counters_add_up_over_batches() {
        let mut ix = two_workers();
        let batches = [
            B::default().store(&[1, 2], None, &[1, 2, 3, 4], None).unknown().build(),
            B::default().store(&[3], Some(1), &[5, 6], None).store(&[7], Some(99), &[7, 8], None).build(),
            B::default().remove(&[3, 42], None).unknown().build(),
            // a store that does not fit the model's block size (2)
            B::default().store(&[8], None, &[1, 2, 3], None).block_size(3).build(),
            B::default().store(&[9], Some(98), &[9, 9], None).remove(&[43], None).clear().build(),
            B::default().store(&[1], None, &[1, 2], None).clear().build(),
        ];
        for b in &batches {
            ix.apply("a", b, None).unwrap();
        }
        let c = ix.worker_stats("a").unwrap().counters;
        assert_eq!(c.batches, 6);
        assert_eq!((c.stored, c.removed, c.cleared), (4, 1, 2));
        assert_eq!((c.orphaned, c.unknown_removals, c.unknown_events, c.block_size_mismatch), (2, 2, 2, 1));
        assert_eq!(c.skipped, 2 + 2 + 1, "orphaned + unknown removals + ignored");
        let st = ix.apply("b", &B::default().unknown().unknown().build(), None).unwrap();
        assert_eq!((st.unknown_events, st.skipped), (2, 0));
    }

    #[test]
    fn only_full_attention_stores_are_indexed() {
        let mut ix = two_workers();
        let toks = [1, 2, 3, 4];
        let b = B::default().store(&[1, 2], None, &toks, None).str_field("kv_cache_spec_kind", "sliding_window");
        let st = ix.apply("a", &b.build(), None).unwrap();
        assert_eq!((st.stored, st.ignored, st.skipped), (0, 2, 2));
        assert_eq!(depth(&ix, &toks, "a"), 0);
        let b = B::default().store(&[1, 2], None, &toks, None).str_field("kv_cache_spec_kind", "full_attention");
        assert_eq!(ix.apply("a", &b.build(), None).unwrap().stored, 2);
        assert_eq!(depth(&ix, &toks, "a"), 2);
    }

    #[test]
    fn tokenless_stores_add_a_tier_to_blocks_the_worker_named() {
        let mut ix = two_workers();
        let toks = [1, 2, 3, 4];
        ix.apply("a", &B::default().store(&[1, 2], None, &toks, None).build(), None).unwrap();
        // offload: block 2 also in CPU, twice (a tier it has stays), and a hash never named
        for _ in 0..2 {
            let st = ix.apply("a", &B::default().store(&[2, 9], None, &[], Some("CPU")).build(), None).unwrap();
            assert_eq!((st.stored, st.orphaned, st.skipped), (1, 1, 1));
        }
        let mut tiers = Vec::new();
        ix.match_tiers(&Query::new("m", &toks), &mut tiers);
        // a: [gpu, cpu, storage, any]
        assert_eq!(tiers[0].1, [2, 0, 0, 2]);
        let slot = ix.find_block(ix.query_keys(&Query::new("m", &toks))[1]).unwrap();
        assert_eq!(ix.pool.get(ix.blocks[slot as usize].holders, 0), Tier::Gpu.bit() | Tier::Cpu.bit());
        ix.check_invariants().unwrap();
    }

    #[test]
    fn stores_that_do_not_tile_their_tokens_are_ignored() {
        let mut ix = two_workers();
        // 2 hashes, 5 tokens: no block size tiles them (inferred 2, explicit 2)
        for b in [
            B::default().store(&[1, 2], None, &[1, 2, 3, 4, 5], None),
            B::default().store(&[1, 2], None, &[1, 2, 3, 4, 5], None).block_size(2),
        ] {
            let st = ix.apply("a", &b.build(), None).unwrap();
            assert_eq!((st.stored, st.ignored, st.skipped), (0, 2, 2));
        }
        assert_eq!(ix.block_size("m"), None, "nothing learnt from them");
        let st = ix.apply("a", &B::default().store(&[1, 2], None, &[1, 2, 3, 4], None).build(), None).unwrap();
        assert_eq!((st.stored, st.ignored), (2, 0));
        assert_eq!(ix.block_size("m"), Some(2));
    }

    #[test]
    fn the_cache_salt_keys_only_the_first_block_of_a_prompt() {
        use crate::wire::Value;
        let mut ix = two_workers();
        let toks = [1, 2, 3, 4, 5, 6];
        let b = B::default().store(&[1, 2], None, &toks[..4], None).str_field("cache_salt", "s");
        ix.apply("a", &b.build(), None).unwrap();
        // the continuation carries the salt too (vLLM: every block of the request)
        let b = B::default().store(&[3], Some(2), &toks[4..], None).str_field("cache_salt", "s");
        ix.apply("a", &b.build(), None).unwrap();
        let salted: Vec<Option<Vec<Value<'_>>>> = vec![Some(vec![Value::Str("s")]), None, None];
        let q = Query { extra_keys: Some(&salted), ..Query::new("m", &toks) };
        assert_eq!(ix.match_prefix(&q), vec![("a", 3), ("b", 0)]);
        assert_eq!(depth(&ix, &toks, "a"), 0, "an unsalted prompt is another prefix");
    }

    #[test]
    fn a_child_hint_is_followed_only_to_a_live_block_with_the_same_key() {
        let mut ix = two_workers();
        // a: t1 -> t2 (block 1's child hint names t2's block)
        ix.apply("a", &B::default().store(&[1, 2], None, &[1, 1, 2, 2], None).build(), None).unwrap();
        // b: t1 -> t3, another block under the same parent
        ix.apply("b", &B::default().store(&[5, 6], None, &[1, 1, 3, 3], None).build(), None).unwrap();
        assert_eq!(depth(&ix, &[1, 1, 2, 2], "b"), 1);
        assert_eq!(depth(&ix, &[1, 1, 3, 3], "b"), 2);
        assert_eq!(depth(&ix, &[1, 1, 3, 3], "a"), 1);
        // the hinted block is freed, then t1 -> t2 is stored again by b
        ix.apply("a", &B::default().remove(&[2], None).build(), None).unwrap();
        ix.apply("b", &B::default().store(&[7], Some(5), &[2, 2], None).build(), None).unwrap();
        assert_eq!(depth(&ix, &[1, 1, 2, 2], "b"), 2);
        assert_eq!(depth(&ix, &[1, 1, 2, 2], "a"), 1);
        ix.check_invariants().unwrap();
    }

    #[test]
    fn an_engine_hash_used_again_for_other_content_moves_the_holding() {
        let mut ix = two_workers();
        ix.apply("a", &B::default().store(&[1], None, &[1, 1], None).build(), None).unwrap();
        ix.apply("b", &B::default().store(&[1], None, &[1, 1], None).build(), None).unwrap();
        // a's engine names other content with the same hash (a restart that
        // kept the connection): a no longer holds the old block, b still does
        ix.apply("a", &B::default().store(&[1], None, &[2, 2], None).build(), None).unwrap();
        assert_eq!((depth(&ix, &[1, 1], "a"), depth(&ix, &[2, 2], "a")), (0, 1));
        assert_eq!(depth(&ix, &[1, 1], "b"), 1);
        // and removing the hash removes the new holding, not the old one
        ix.apply("a", &B::default().remove(&[1], None).build(), None).unwrap();
        assert_eq!(depth(&ix, &[2, 2], "a"), 0);
        assert_eq!(ix.stats().holdings, 1);
        ix.check_invariants().unwrap();
    }
}
