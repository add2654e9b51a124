//! Prefix matching: walk a query's block keys through the child hints and
//! the key table, intersecting the still-matching workers with each block's
//! holders.

use super::{Index, Query, NIL};
use crate::prefix::{block_key, namespace};
use crate::wire::Value;

impl Index {
    // ------------------------------------------------------------------ match

    /// For every worker of the query's model, the number of leading full
    /// blocks of the query it holds in one of the query's tiers. An unknown
    /// model gives an empty list.
    pub fn match_prefix(&self, q: &Query<'_, '_>) -> Vec<(&str, u32)> {
        let mut out = Vec::new();
        self.match_slots(q, &mut out);
        out.into_iter().map(|(slot, d)| (self.worker(slot).id.as_str(), d)).collect()
    }

    /// [`Index::match_prefix`] by worker slot (see [`Index::worker_slots`]),
    /// into a reusable buffer; no allocation per worker.
    pub fn match_slots(&self, q: &Query<'_, '_>, out: &mut Vec<(u32, u32)>) {
        out.clear();
        let Some(&m) = self.model_by_name.get(q.model) else { return };
        let model = &self.models[m as usize];
        let words = model.members.len();
        // Small fixed buffers cover 1,024 workers per model without allocating.
        let mut alive_buf = [0u64; 16];
        let mut before_buf = [0u64; 16];
        let mut depth_buf = [0u32; 16 * 64];
        let mut heap: (Vec<u64>, Vec<u64>, Vec<u32>);
        let (alive, before, depth): (&mut [u64], &mut [u64], &mut [u32]) = if words <= alive_buf.len() {
            (&mut alive_buf[..words], &mut before_buf[..words], &mut depth_buf[..words * 64])
        } else {
            heap = (vec![0; words], vec![0; words], vec![0; words * 64]);
            (&mut heap.0[..], &mut heap.1[..], &mut heap.2[..])
        };
        alive.copy_from_slice(&model.members);
        out.reserve(model.workers as usize);
        let mut i = 0u32;
        if let Some(bs) = model.block_size {
            let bs = bs as usize;
            let nblocks = q.tokens.len() / bs;
            let mut prev = namespace(&model.name, q.lora);
            let mut hint = NIL;
            while (i as usize) < nblocks {
                let at = i as usize * bs;
                let toks = &q.tokens[at..at + bs];
                let extras: &[Value<'_>] = match q.extra_keys.and_then(|e| e.get(i as usize)) {
                    Some(Some(v)) => v,
                    _ => &[],
                };
                prev = block_key(prev, toks, extras);
                let slot = match self.blocks.get(hint as usize) {
                    Some(b) if b.key() == prev && b.refs != NIL => hint,
                    _ => match self.find_block(prev) {
                        Some(s) => s,
                        None => break,
                    },
                };
                hint = self.blocks[slot as usize].child;
                before.copy_from_slice(alive);
                self.pool.intersect(self.blocks[slot as usize].holders, q.tiers, alive);
                let mut any = 0;
                for (w, (&b, &a)) in before.iter().zip(alive.iter()).enumerate() {
                    any |= a;
                    let mut gone = b & !a;
                    while gone != 0 {
                        let bit = gone.trailing_zeros();
                        gone &= gone - 1;
                        depth[w * 64 + bit as usize] = i;
                    }
                }
                i += 1;
                if any == 0 {
                    break;
                }
            }
        }
        for (w, &a) in alive.iter().enumerate() {
            let mut rest = a;
            while rest != 0 {
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                depth[w * 64 + bit] = i;
            }
        }
        // Registration-slot order, so answers print in a stable order.
        for (w, &bits) in model.members.iter().enumerate() {
            let mut rest = bits;
            while rest != 0 {
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                out.push(((w * 64 + bit) as u32, depth[w * 64 + bit]));
            }
        }
    }

    /// Prefix keys of a query's full blocks (for tools and tests).
    pub fn query_keys(&self, q: &Query<'_, '_>) -> Vec<u64> {
        let Some(bs) = self.block_size(q.model) else { return Vec::new() };
        let bs = bs as usize;
        let mut prev = namespace(q.model, q.lora);
        let mut out = Vec::new();
        for (i, toks) in q.tokens.chunks_exact(bs).enumerate() {
            let extras: &[Value<'_>] = match q.extra_keys.and_then(|e| e.get(i)) {
                Some(Some(v)) => v,
                _ => &[],
            };
            prev = block_key(prev, toks, extras);
            out.push(prev);
        }
        out
    }
}
