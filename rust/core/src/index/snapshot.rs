//! The snapshot format: a versioned, checksummed binary dump of the whole
//! index (blocks in LRU order with child hints, models, workers with engine
//! hashes, holdings and stream positions).

use std::io::{Read, Write};

use super::{ekey, Index, NIL};
use crate::error::IndexError;

/// Version 4: keys are the standard rolling hash (`prefix`) and the seed is
/// saved. Earlier versions hold keys of another scheme and cannot be read.
const SNAPSHOT_MAGIC: &[u8; 8] = b"KVSYNC\x00\x04";

impl Index {
    // --------------------------------------------------------------- snapshot

    /// Write the whole index (holdings, engine hashes, LRU order, last seq
    /// per worker) in a versioned, checksummed binary format.
    pub fn save(&self, out: &mut impl Write) -> Result<(), IndexError> {
        let mut body = Vec::new();
        // Blocks that are in use, least recent first, then the dormant ones.
        let mut order: Vec<u32> = Vec::with_capacity(self.held_blocks + self.dormant);
        let mut cur = self.lru_tail;
        while cur != NIL {
            order.push(cur);
            cur = self.links[cur as usize][0];
        }
        if self.capacity.is_none() {
            // no LRU list: held blocks in table order
            order.extend(self.by_key.iter().copied().filter(|&s| self.blocks[s as usize].holders != 0));
        }
        for &slot in &self.by_key {
            if self.blocks[slot as usize].holders == 0 {
                order.push(slot);
            }
        }
        let mut ordinal = vec![NIL; self.blocks.len()];
        for (i, &s) in order.iter().enumerate() {
            ordinal[s as usize] = i as u32;
        }
        put_u64(&mut body, self.capacity.map_or(u64::MAX, |c| c as u64));
        put_u64(&mut body, self.seed);
        put_u64(&mut body, self.evictions);
        // Live models only, renumbered densely (freed model ids are holes).
        let mut model_ordinal = vec![NIL; self.models.len()];
        let live_models: Vec<_> = self.models.iter().enumerate().filter(|(_, m)| m.workers > 0).collect();
        put_u32(&mut body, live_models.len() as u32);
        for (o, (m, model)) in live_models.into_iter().enumerate() {
            model_ordinal[m] = o as u32;
            put_str(&mut body, &model.name);
            put_u32(&mut body, model.block_size.unwrap_or(0));
        }
        put_u32(&mut body, order.len() as u32);
        for &s in &order {
            put_u64(&mut body, self.blocks[s as usize].key());
        }
        // Child hints, so queries on a loaded index walk as fast as before.
        for &s in &order {
            let child = self.blocks[s as usize].child;
            let live = self.blocks.get(child as usize).is_some_and(|c| c.refs != NIL);
            put_u32(&mut body, if live { ordinal[child as usize] } else { NIL });
        }
        put_u32(&mut body, self.by_id.len() as u32);
        for (ws, w) in self.workers.iter().enumerate() {
            let Some(w) = w else { continue };
            put_str(&mut body, &w.id);
            put_u32(&mut body, model_ordinal[w.model as usize]);
            let (last, digest) = w.stream.position();
            put_u64(&mut body, last.unwrap_or(u64::MAX));
            body.push(u8::from(last.is_some()));
            put_u64(&mut body, digest);
            put_u64(&mut body, w.counters.purges);
            put_u32(&mut body, w.emap.len() as u32);
            for e in &w.emap {
                put_u64(&mut body, ekey(e));
                put_u32(&mut body, ordinal[e[2] as usize]);
            }
            let mut held = Vec::new();
            for &s in &order {
                let t = self.pool.get(self.blocks[s as usize].holders, ws as u32);
                if t != 0 {
                    held.push((ordinal[s as usize], t));
                }
            }
            put_u32(&mut body, held.len() as u32);
            for (o, t) in held {
                put_u32(&mut body, o);
                body.push(t);
            }
        }
        let io = |e: std::io::Error| IndexError::Snapshot(e.to_string());
        out.write_all(SNAPSHOT_MAGIC).map_err(io)?;
        out.write_all(&(body.len() as u64).to_le_bytes()).map_err(io)?;
        out.write_all(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes()).map_err(io)?;
        out.write_all(&body).map_err(io)?;
        Ok(())
    }

    /// Read an index written by [`Index::save`]. The structure is checked
    /// as well as the checksum: a snapshot that loads is one `save` could
    /// have written (no duplicate models, blocks, workers, engine hashes or
    /// holdings; every holding named by one of its worker's engine hashes;
    /// nothing after the body).
    pub fn load(input: &mut impl Read) -> Result<Index, IndexError> {
        let bad = |what: &str| IndexError::Snapshot(what.to_owned());
        let mut head = [0u8; 24];
        input.read_exact(&mut head).map_err(|e| bad(&format!("cannot read header: {e}")))?;
        if head[..7] == SNAPSHOT_MAGIC[..7] && head[7] != SNAPSHOT_MAGIC[7] {
            return Err(bad(&format!(
                "snapshot format version {} is not supported (this kvsync reads version {}; versions before 4 \
                 use the old prefix keys): rebuild it by following the engines again",
                head[7], SNAPSHOT_MAGIC[7]
            )));
        }
        if &head[..8] != SNAPSHOT_MAGIC {
            return Err(bad("not a kvsync index snapshot (bad magic)"));
        }
        let len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let sum = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
        let mut body = Vec::new();
        input.take(len).read_to_end(&mut body).map_err(|e| bad(&format!("cannot read body: {e}")))?;
        if body.len() as u64 != len {
            return Err(bad(&format!("truncated: {} of {len} body bytes", body.len())));
        }
        let mut extra = [0u8; 1];
        if input.read(&mut extra).map_err(|e| bad(&format!("cannot read past the body: {e}")))? != 0 {
            return Err(bad(&format!("trailing bytes after the {len}-byte body")));
        }
        if xxhash_rust::xxh3::xxh3_64(&body) != sum {
            return Err(bad("checksum mismatch (corrupted file)"));
        }
        let mut r = Reader { buf: &body, pos: 0 };
        let cap = r.u64()?;
        let cap = if cap == u64::MAX { None } else { Some(usize::try_from(cap).unwrap_or(usize::MAX)) };
        let seed = r.u64()?;
        let mut ix = Index::with_seed(cap, seed).map_err(|e| bad(&format!("capacity: {e}")))?;
        ix.evictions = r.u64()?;
        let nmodels = r.u32()?;
        let mut model_names = Vec::new();
        for _ in 0..nmodels {
            let name = r.string()?;
            let bs = r.u32()?;
            if name.is_empty() {
                return Err(bad("model with an empty name"));
            }
            if ix.model_by_name.contains_key(&name) {
                return Err(bad(&format!("model {name:?} appears twice")));
            }
            let m = ix.model_id(&name);
            ix.models[m as usize].block_size = (bs != 0).then_some(bs);
            model_names.push(name);
        }
        let nblocks = r.u32()? as usize;
        let mut slots = Vec::with_capacity(nblocks.min(body.len() / 8));
        for _ in 0..nblocks {
            let key = r.u64()?;
            let fresh = ix.blocks.len() as u32;
            let dormant = ix.dormant;
            let slot = ix.intern_block(key);
            // A new block is counted dormant; an existing key is not.
            if ix.dormant == dormant {
                return Err(bad(&format!("block key {key:#018x} appears twice")));
            }
            debug_assert_eq!(slot, fresh);
            slots.push(slot);
        }
        for &slot in &slots {
            let child = r.u32()?;
            if child == NIL {
                continue;
            }
            let c = *slots.get(child as usize).ok_or_else(|| bad(&format!("child hint {child} names no block")))?;
            ix.blocks[slot as usize].child = c;
        }
        let nworkers = r.u32()?;
        // Holders per block ordinal, re-inserted least recent first below so
        // the LRU order survives.
        let mut by_block: Vec<Vec<(u32, u8)>> = vec![Vec::new(); slots.len()];
        let mut named = vec![false; slots.len()];
        let mut named_list = Vec::new();
        for _ in 0..nworkers {
            let id = r.string()?;
            let m = r.u32()? as usize;
            let model =
                model_names.get(m).ok_or_else(|| bad(&format!("worker {id:?} names unknown model {m}")))?.clone();
            let seq = r.u64()?;
            let has_seq = r.u8()? != 0;
            let digest = r.u64()?;
            let purges = r.u64()?;
            if ix.by_id.contains_key(&id) {
                return Err(bad(&format!("worker {id:?} appears twice")));
            }
            ix.add_worker(&id, &model).map_err(|e| bad(&format!("worker {id:?}: {e}")))?;
            let ws = ix.slot_of(&id)?;
            {
                let w = ix.worker_mut(ws);
                w.stream.set_position(has_seq.then_some(seq), digest);
                w.counters.purges = purges;
            }
            let ne = r.u32()?;
            let mut emap = std::mem::take(&mut ix.worker_mut(ws).emap);
            // Reset only what the previous worker marked: O(size), not
            // O(workers x blocks).
            for o in named_list.drain(..) {
                named[o] = false;
            }
            for _ in 0..ne {
                let ek = r.u64()?;
                let o = r.u32()? as usize;
                let slot = *slots
                    .get(o)
                    .ok_or_else(|| bad(&format!("worker {id:?}: engine hash {ek:#x} names unknown block {o}")))?;
                if Self::emap_get(&emap, ek).is_some() {
                    return Err(bad(&format!("worker {id:?}: engine hash {ek:#x} appears twice")));
                }
                ix.emap_set(&mut emap, ek, slot);
                named[o] = true;
                named_list.push(o);
            }
            ix.worker_mut(ws).emap = emap;
            let nh = r.u32()?;
            for _ in 0..nh {
                let o = r.u32()? as usize;
                let t = r.u8()?;
                let holders = by_block
                    .get_mut(o)
                    .ok_or_else(|| bad(&format!("worker {id:?}: holding names unknown block {o}")))?;
                if t == 0 || t > 7 {
                    return Err(bad(&format!("worker {id:?}: holding of block {o} has invalid tiers {t}")));
                }
                if !named[o] {
                    // purge and removal find holdings through the engine
                    // hashes: one no hash names could never be released.
                    return Err(bad(&format!(
                        "worker {id:?}: holding of block {o} is named by none of its engine hashes"
                    )));
                }
                if holders.last().is_some_and(|&(w, _)| w == ws) {
                    return Err(bad(&format!("worker {id:?}: block {o} held twice")));
                }
                holders.push((ws, t));
            }
        }
        if r.pos != body.len() {
            return Err(bad(&format!("{} unread bytes at the end of the body", body.len() - r.pos)));
        }
        for (o, holders) in by_block.into_iter().enumerate() {
            for (ws, t) in holders {
                ix.set_tiers(slots[o], ws, t, true);
            }
        }
        for &s in &slots {
            ix.maybe_free_block(s);
        }
        // Models no worker uses (older snapshots kept them) are forgotten.
        for name in &model_names {
            let m = ix.model_by_name[name];
            if ix.models[m as usize].workers == 0 {
                ix.model_by_name.remove(name);
                ix.models[m as usize] = super::workers::Model::vacant();
                ix.free_models.push(m);
            }
        }
        ix.evict_to_capacity();
        Ok(ix)
    }
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_str(b: &mut Vec<u8>, s: &str) {
    put_u32(b, s.len() as u32);
    b.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], IndexError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else { return Err(IndexError::Snapshot("truncated body".into())) };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, IndexError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, IndexError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, IndexError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String, IndexError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| IndexError::Snapshot("name is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::error::IndexError;
    use crate::index::{Index, Query, NIL};

    #[test]
    fn snapshot_round_trips() {
        let mut ix = Index::new(Some(100)).unwrap();
        ix.add_worker("a", "m").unwrap();
        ix.add_worker("b", "m").unwrap();
        ix.apply("a", &B::default().store(&[1, 2], None, &[1, 2, 3, 4], Some("CPU")).build(), Some(41)).unwrap();
        ix.apply("b", &B::default().store(&[1], None, &[1, 2], None).build(), None).unwrap();
        let mut buf = Vec::new();
        ix.save(&mut buf).unwrap();
        let back = Index::load(&mut buf.as_slice()).unwrap();
        back.check_invariants().unwrap();
        // child hints survive (queries on a loaded index stay fast)
        let child_key = |ix: &Index, key: u64| {
            let slot = ix.find_block(key).unwrap();
            let c = ix.blocks[slot as usize].child;
            (c != NIL).then(|| ix.blocks[c as usize].key())
        };
        let k0 = ix.query_keys(&Query::new("m", &[1, 2]))[0];
        assert!(child_key(&ix, k0).is_some());
        assert_eq!(child_key(&back, k0), child_key(&ix, k0));
        assert_eq!(back.last_seq("a").unwrap(), Some(41));
        assert_eq!(back.last_seq("b").unwrap(), None);
        let q = Query::new("m", &[1, 2, 3, 4]);
        assert_eq!(back.match_prefix(&q), ix.match_prefix(&q));
        assert_eq!(back.stats().holdings, 3);
        // parents still resolve after loading
        let mut back = back;
        let st = back.apply("a", &B::default().store(&[3], Some(2), &[5, 6], None).build(), None).unwrap();
        assert_eq!(st.stored, 1);
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(Index::load(&mut bad.as_slice()), Err(IndexError::Snapshot(_))));
        assert!(Index::load(&mut &buf[..buf.len() - 3]).is_err());
    }

    #[test]
    fn a_holding_in_all_three_tiers_round_trips() {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        for medium in [None, Some("CPU"), Some("DISK")] {
            ix.apply("a", &B::default().store(&[1], None, &[1, 2], medium).build(), None).unwrap();
        }
        let mut buf = Vec::new();
        ix.save(&mut buf).unwrap();
        let back = Index::load(&mut buf.as_slice()).unwrap();
        let mut tiers = Vec::new();
        back.match_tiers(&Query::new("m", &[1, 2]), &mut tiers);
        assert_eq!(tiers, vec![(0, [1, 1, 1, 1])]);
    }
}

/// Hand-built snapshots: what `load` must refuse, and what
/// `check_invariants` must see when such a state exists in memory.
#[cfg(test)]
mod validation_tests {
    use super::{put_str, put_u32, put_u64, SNAPSHOT_MAGIC};
    use crate::error::IndexError;
    use crate::index::{Index, NIL};

    /// One worker of a hand-built snapshot: engine hashes and holdings by
    /// block ordinal.
    struct W {
        id: &'static str,
        model: u32,
        hashes: Vec<(u64, u32)>,
        held: Vec<(u32, u8)>,
    }

    fn snapshot(models: &[&str], keys: &[u64], workers: &[W]) -> Vec<u8> {
        let mut b = Vec::new();
        put_u64(&mut b, u64::MAX);
        put_u64(&mut b, 1337);
        put_u64(&mut b, 0);
        put_u32(&mut b, models.len() as u32);
        for m in models {
            put_str(&mut b, m);
            put_u32(&mut b, 2);
        }
        put_u32(&mut b, keys.len() as u32);
        for k in keys {
            put_u64(&mut b, *k);
        }
        for _ in keys {
            put_u32(&mut b, NIL);
        }
        put_u32(&mut b, workers.len() as u32);
        for w in workers {
            put_str(&mut b, w.id);
            put_u32(&mut b, w.model);
            put_u64(&mut b, u64::MAX);
            b.push(0);
            put_u64(&mut b, 0);
            put_u64(&mut b, 0);
            put_u32(&mut b, w.hashes.len() as u32);
            for (ek, o) in &w.hashes {
                put_u64(&mut b, *ek);
                put_u32(&mut b, *o);
            }
            put_u32(&mut b, w.held.len() as u32);
            for (o, t) in &w.held {
                put_u32(&mut b, *o);
                b.push(*t);
            }
        }
        let mut out = SNAPSHOT_MAGIC.to_vec();
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&b).to_le_bytes());
        out.extend_from_slice(&b);
        out
    }

    fn w(id: &'static str, hashes: &[(u64, u32)], held: &[(u32, u8)]) -> W {
        W { id, model: 0, hashes: hashes.to_vec(), held: held.to_vec() }
    }

    fn refused(snap: &[u8], what: &str) {
        match Index::load(&mut &snap[..]) {
            Err(IndexError::Snapshot(m)) => assert!(m.contains(what), "{m:?} does not say {what:?}"),
            Err(e) => panic!("wrong error {e:?}"),
            Ok(_) => panic!("snapshot with {what} loaded"),
        }
    }

    #[test]
    fn a_well_formed_hand_built_snapshot_loads() {
        let snap = snapshot(&["m"], &[10, 11], &[w("a", &[(1, 0), (2, 1)], &[(0, 1), (1, 3)])]);
        let ix = Index::load(&mut &snap[..]).unwrap();
        ix.check_invariants().unwrap();
        assert_eq!((ix.stats().holdings, ix.stats().engine_hashes), (2, 2));
        assert_eq!(ix.block_size("m"), Some(2));
        assert_eq!(ix.hash_seed(), 1337);
    }

    #[test]
    fn an_older_format_version_is_refused_by_name() {
        let mut snap = snapshot(&["m"], &[10], &[w("a", &[(1, 0)], &[(0, 1)])]);
        snap[7] = 3;
        refused(&snap, "snapshot format version 3 is not supported (this kvsync reads version 4");
        snap[7] = 9;
        refused(&snap, "version 9");
        snap[0] = b'X';
        refused(&snap, "bad magic");
    }

    #[test]
    fn a_holding_no_engine_hash_names_is_refused() {
        // Block 1 is held by "a" but none of a's hashes names it: removing
        // "a" could never release it and the next worker in the slot
        // would inherit it.
        let snap = snapshot(&["m"], &[10, 11], &[w("a", &[(1, 0)], &[(0, 1), (1, 1)])]);
        refused(&snap, "named by none of its engine hashes");
    }

    #[test]
    fn duplicates_are_refused() {
        refused(&snapshot(&["m"], &[10, 10], &[w("a", &[(1, 0), (2, 1)], &[(0, 1)])]), "appears twice");
        refused(
            &snapshot(&["m"], &[10], &[w("a", &[(1, 0)], &[(0, 1)]), w("a", &[(1, 0)], &[(0, 1)])]),
            "worker \"a\" appears twice",
        );
        refused(&snapshot(&["m", "m"], &[10], &[w("a", &[(1, 0)], &[(0, 1)])]), "model \"m\" appears twice");
        refused(&snapshot(&["m"], &[10, 11], &[w("a", &[(1, 0), (1, 1)], &[(0, 1)])]), "engine hash 0x1 appears twice");
        refused(&snapshot(&["m"], &[10], &[w("a", &[(1, 0)], &[(0, 1), (0, 2)])]), "held twice");
    }

    #[test]
    fn trailing_bytes_after_the_body_are_refused() {
        let mut snap = snapshot(&["m"], &[10], &[w("a", &[(1, 0)], &[(0, 1)])]);
        Index::load(&mut &snap[..]).unwrap();
        snap.push(0);
        refused(&snap, "trailing bytes");
    }

    #[test]
    fn bad_references_are_refused() {
        let mut bad_model = w("a", &[(1, 0)], &[(0, 1)]);
        bad_model.model = 3;
        refused(&snapshot(&["m"], &[10], &[bad_model]), "unknown model 3");
        refused(&snapshot(&["m"], &[10], &[w("a", &[(1, 5)], &[])]), "unknown block 5");
        refused(&snapshot(&["m"], &[10], &[w("a", &[(1, 0)], &[(0, 9)])]), "invalid tiers 9");
    }

    #[test]
    fn check_sees_a_holding_no_engine_hash_names() {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        let slot = ix.intern_block(10);
        ix.set_tiers(slot, 0, 1, true);
        let err = ix.check_invariants().unwrap_err();
        assert!(err.contains("none of its engine hashes"), "{err}");
    }

    #[test]
    fn check_sees_duplicate_keys_and_workers() {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        ix.intern_block(10);
        let mut emap = std::mem::take(&mut ix.worker_mut(0).emap);
        ix.emap_set(&mut emap, 1, 0);
        ix.worker_mut(0).emap = emap;
        ix.check_invariants().unwrap();
        // a second slab block with the same key, bypassing the key table
        let copy = ix.blocks[0];
        ix.blocks.push(copy);
        let err = ix.check_invariants().unwrap_err();
        assert!(err.contains("duplicate keys"), "{err}");
        ix.blocks[1].refs = NIL;

        let mut ix2 = Index::default();
        ix2.add_worker("a", "m").unwrap();
        ix2.add_worker("b", "m").unwrap();
        ix2.workers[1].as_mut().unwrap().id = "a".into();
        let err = ix2.check_invariants().unwrap_err();
        assert!(err.contains("not found by its id"), "{err}");
        ix2.by_id.insert("c".into(), 1);
        let err = ix2.check_invariants().unwrap_err();
        assert!(err.contains("duplicate workers"), "{err}");
    }

    #[test]
    fn check_sees_model_counts_that_disagree() {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        ix.models[0].workers = 2;
        let err = ix.check_invariants().unwrap_err();
        assert!(err.contains("model \"m\""), "{err}");
    }
}
