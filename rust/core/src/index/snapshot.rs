//! The snapshot format: a versioned, checksummed binary dump of the whole
//! index (blocks in LRU order with child hints, models, workers with engine
//! hashes, holdings and stream positions).

use std::collections::HashMap;
use std::io::{Read, Write};

use super::{ekey, Index, NIL};
use crate::error::IndexError;

const SNAPSHOT_MAGIC: &[u8; 8] = b"KVSYNC\x00\x03";

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
        put_u64(&mut body, self.evictions);
        put_u32(&mut body, self.models.len() as u32);
        for m in &self.models {
            put_str(&mut body, &m.name);
            put_u32(&mut body, m.block_size.unwrap_or(0));
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
            put_u32(&mut body, w.model);
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

    /// Read an index written by [`Index::save`].
    pub fn load(input: &mut impl Read) -> Result<Index, IndexError> {
        let bad = |what: &str| IndexError::Snapshot(what.to_owned());
        let mut head = [0u8; 24];
        input.read_exact(&mut head).map_err(|e| bad(&format!("cannot read header: {e}")))?;
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
        if xxhash_rust::xxh3::xxh3_64(&body) != sum {
            return Err(bad("checksum mismatch (corrupted file)"));
        }
        let mut r = Reader { buf: &body, pos: 0 };
        let cap = r.u64()?;
        let mut ix = Index::new(if cap == u64::MAX { None } else { Some(cap as usize) })?;
        ix.evictions = r.u64()?;
        let nmodels = r.u32()?;
        let mut model_names = Vec::new();
        for _ in 0..nmodels {
            let name = r.string()?;
            let bs = r.u32()?;
            let m = ix.model_id(&name);
            ix.models[m as usize].block_size = (bs != 0).then_some(bs);
            model_names.push(name);
        }
        let nblocks = r.u32()? as usize;
        let mut slots = Vec::with_capacity(nblocks.min(body.len() / 8));
        for _ in 0..nblocks {
            let key = r.u64()?;
            slots.push(ix.intern_block(key));
        }
        for &slot in &slots {
            let child = r.u32()?;
            if let Some(&c) = slots.get(child as usize) {
                ix.blocks[slot as usize].child = c;
            }
        }
        let nworkers = r.u32()?;
        let mut pending: Vec<(u32, Vec<(u32, u8)>)> = Vec::new();
        for _ in 0..nworkers {
            let id = r.string()?;
            let m = r.u32()? as usize;
            let model = model_names.get(m).ok_or_else(|| bad("worker names an unknown model"))?.clone();
            let seq = r.u64()?;
            let has_seq = r.u8()? != 0;
            let digest = r.u64()?;
            let purges = r.u64()?;
            ix.add_worker(&id, &model)?;
            let ws = ix.slot_of(&id)?;
            {
                let w = ix.worker_mut(ws);
                w.stream.set_position(has_seq.then_some(seq), digest);
                w.counters.purges = purges;
            }
            let ne = r.u32()?;
            let mut emap = std::mem::take(&mut ix.worker_mut(ws).emap);
            for _ in 0..ne {
                let ek = r.u64()?;
                let o = r.u32()? as usize;
                let slot = *slots.get(o).ok_or_else(|| bad("engine hash names an unknown block"))?;
                ix.emap_set(&mut emap, ek, slot);
            }
            ix.worker_mut(ws).emap = emap;
            let nh = r.u32()?;
            let mut held = Vec::new();
            for _ in 0..nh {
                let o = r.u32()? as usize;
                let t = r.u8()?;
                let slot = *slots.get(o).ok_or_else(|| bad("holding names an unknown block"))?;
                if t == 0 || t > 7 {
                    return Err(bad("holding with invalid tiers"));
                }
                held.push((slot, t));
            }
            pending.push((ws, held));
        }
        if r.pos != body.len() {
            return Err(bad("trailing bytes"));
        }
        // Re-insert holdings least recent first so the LRU order survives.
        let mut by_block: Vec<Vec<(u32, u8)>> = vec![Vec::new(); slots.len()];
        let mut ord_of = HashMap::new();
        for (o, &s) in slots.iter().enumerate() {
            ord_of.insert(s, o);
        }
        for (ws, held) in pending {
            for (slot, t) in held {
                by_block[ord_of[&slot]].push((ws, t));
            }
        }
        for (o, holders) in by_block.into_iter().enumerate() {
            for (ws, t) in holders {
                ix.set_tiers(slots[o], ws, t, true);
            }
        }
        for &s in &slots {
            ix.maybe_free_block(s);
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
}
