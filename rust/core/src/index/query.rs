//! Prefix matching: walk a query's block keys through the child hints and
//! the key table, intersecting the still-matching workers with each block's
//! holders.

use super::walk::{slots_of, Keys, Survivors, Walk};
use super::{Index, Model, Query, NIL};

/// Every member of `model` with its entry of `depth`, in registration-slot
/// order (so answers print in a stable order).
fn by_member<T: Copy>(model: &Model, depth: &[T], out: &mut Vec<(u32, T)>) {
    for (w, &bits) in model.members.iter().enumerate() {
        out.extend(slots_of(w, bits).map(|s| (s as u32, depth[s])));
    }
}

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

    /// The model of a query and the walk over its blocks (empty until the
    /// model's block size is known).
    fn walk<'a, 'q, 'v>(&'a self, q: &'a Query<'q, 'v>) -> Option<(&'a Model, Walk<'a, 'q, 'v>)> {
        let &m = self.model_by_name.get(q.model)?;
        let model = &self.models[m as usize];
        Some((model, Walk { ix: self, keys: Keys::new(q, model.block_size, self.seed), hint: NIL }))
    }

    /// [`Index::match_prefix`] by worker slot (see [`Index::worker_slots`]),
    /// into a reusable buffer; no allocation per worker.
    pub fn match_slots(&self, q: &Query<'_, '_>, out: &mut Vec<(u32, u32)>) {
        out.clear();
        let Some((model, walk)) = self.walk(q) else { return };
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
        let mut survivors = Survivors::new(&model.members, alive, before);
        out.reserve(model.workers as usize);
        let mut i = 0u32;
        let mut last = None;
        for slot in walk {
            let holders = self.blocks[slot as usize].holders;
            // A block with the same holder set as the one before (a shared
            // set, a stretch of one chain) cannot change the survivors.
            if last != Some(holders) {
                last = Some(holders);
                if !survivors.narrow(&self.pool, holders, q.tiers, |s| depth[s] = i) {
                    break;
                }
            }
            i += 1;
        }
        survivors.each(|s| depth[s] = i);
        by_member(model, depth, out);
    }

    /// For every worker of the query's model, in one walk: the leading
    /// blocks it holds in the GPU, CPU and storage tiers and in any tier
    /// (`[gpu, cpu, storage, any]`; the query's own `tiers` is ignored).
    /// One walk under one borrow, so the four answers are consistent (gpu
    /// never exceeds any). Registration-slot order, like
    /// [`Index::match_slots`].
    pub fn match_tiers(&self, q: &Query<'_, '_>, out: &mut Vec<(u32, [u32; 4])>) {
        const MASKS: [u8; 4] = [1, 2, 4, 7];
        out.clear();
        let Some((model, walk)) = self.walk(q) else { return };
        let words = model.members.len();
        // Not the hot path (a diagnostic answer): plain vectors suffice.
        let mut bufs: [(Vec<u64>, Vec<u64>); 4] = std::array::from_fn(|_| (vec![0; words], vec![0; words]));
        let mut survivors = bufs.each_mut().map(|(alive, before)| Survivors::new(&model.members, alive, before));
        let mut depth = vec![[0u32; 4]; words * 64];
        let mut i = 0u32;
        let mut last = None;
        for slot in walk {
            let holders = self.blocks[slot as usize].holders;
            if last != Some(holders) {
                last = Some(holders);
                for (k, s) in survivors.iter_mut().enumerate() {
                    s.narrow(&self.pool, holders, MASKS[k], |w| depth[w][k] = i);
                }
                // any tier's survivors include every single tier's
                if !survivors[3].any() {
                    break;
                }
            }
            i += 1;
        }
        for (k, s) in survivors.iter().enumerate() {
            s.each(|w| depth[w][k] = i);
        }
        by_member(model, &depth, out);
    }

    /// For every worker of the query's model, in one walk: the leading
    /// blocks it holds in any tier, and their cached value: each of those
    /// blocks counts the weight of the best tier the worker holds it in
    /// (`weights` = `[gpu, cpu, storage]`; SPEC section 7). The query's own
    /// `tiers` is ignored. Registration-slot order.
    pub fn match_scores(&self, q: &Query<'_, '_>, weights: [f64; 3], out: &mut Vec<(u32, u32, f64)>) {
        out.clear();
        let Some((model, walk)) = self.walk(q) else { return };
        let words = model.members.len();
        let (mut alive, mut before) = (vec![0u64; words], vec![0u64; words]);
        let mut survivors = Survivors::new(&model.members, &mut alive, &mut before);
        let (mut tier, mut counted) = (vec![0u64; words], vec![0u64; words]);
        let mut depth = vec![(0u32, 0f64); words * 64];
        // What the last block with a new holder set is worth to each survivor.
        let mut gain = vec![0f64; words * 64];
        let mut i = 0u32;
        let mut last = None;
        for slot in walk {
            let holders = self.blocks[slot as usize].holders;
            if last != Some(holders) {
                last = Some(holders);
                if !survivors.narrow(&self.pool, holders, 7, |s| depth[s].0 = i) {
                    break;
                }
                // Best tier first: a block held in the GPU and on disk counts as GPU.
                let (lo, window) = survivors.window();
                let n = window.len();
                counted[..n].fill(0);
                for (k, &weight) in weights.iter().enumerate() {
                    tier[..n].copy_from_slice(window);
                    self.pool.intersect_words(holders, 1 << k, &mut tier[..n], lo);
                    for (j, (t, c)) in tier[..n].iter().zip(&mut counted[..n]).enumerate() {
                        slots_of(lo + j, t & !*c).for_each(|s| gain[s] = weight);
                        *c |= t;
                    }
                }
            }
            survivors.each(|s| depth[s].1 += gain[s]);
            i += 1;
        }
        survivors.each(|s| depth[s].0 = i);
        for (w, &bits) in model.members.iter().enumerate() {
            out.extend(slots_of(w, bits).map(|s| (s as u32, depth[s].0, depth[s].1)));
        }
    }

    /// Prefix keys of a query's full blocks (for tools and tests): the
    /// standard `seq` hashes XOR the query's namespace constant.
    pub fn query_keys(&self, q: &Query<'_, '_>) -> Vec<u64> {
        let bs = self.block_size(q.model);
        let mut out =
            Vec::with_capacity(q.hashes.map_or_else(|| q.tokens.len() / bs.map_or(1, |b| b as usize), <[u64]>::len));
        out.extend(Keys::new(q, bs, self.seed));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::index::{Index, Query};

    /// What match_detail used to do: one match_slots walk per mask.
    fn per_mask(ix: &Index, tokens: &[u32]) -> Vec<(u32, [u32; 4])> {
        let mut rows: Vec<(u32, [u32; 4])> = Vec::new();
        for (k, mask) in [1u8, 2, 4, 7].into_iter().enumerate() {
            let mut out = Vec::new();
            ix.match_slots(&Query { tiers: mask, ..Query::new("m", tokens) }, &mut out);
            if k == 0 {
                rows = out.iter().map(|&(s, _)| (s, [0; 4])).collect();
            }
            for (row, (s, d)) in rows.iter_mut().zip(out) {
                assert_eq!(row.0, s);
                row.1[k] = d;
            }
        }
        rows
    }

    #[test]
    fn match_tiers_agrees_with_one_match_per_mask() {
        let mut ix = Index::default();
        for w in ["a", "b", "c", "d"] {
            ix.add_worker(w, "m").unwrap();
        }
        let toks: Vec<u32> = (0..12).collect();
        // a: 3 blocks in GPU, then blocks 1-2 also in CPU, block 3 dropped from GPU
        ix.apply("a", &B::default().store(&[1, 2, 3], None, &toks[..6], None).build(), None).unwrap();
        ix.apply("a", &B::default().store(&[1, 2], None, &toks[..4], Some("CPU")).build(), None).unwrap();
        ix.apply("a", &B::default().remove(&[3], None).build(), None).unwrap();
        // b: everything in storage, block 2 also in GPU
        ix.apply("b", &B::default().store(&[1, 2, 3, 4], None, &toks[..8], Some("DISK")).build(), None).unwrap();
        ix.apply("b", &B::default().store(&[2], Some(1), &toks[2..4], None).build(), None).unwrap();
        // c: one GPU block; d: nothing
        ix.apply("c", &B::default().store(&[9], None, &toks[..2], None).build(), None).unwrap();
        for n in [0, 1, 2, 4, 6, 8, 12] {
            let mut got = Vec::new();
            ix.match_tiers(&Query::new("m", &toks[..n]), &mut got);
            assert_eq!(got, per_mask(&ix, &toks[..n]), "{n} tokens");
        }
        let mut got = Vec::new();
        ix.match_tiers(&Query::new("m", &toks), &mut got);
        // slots a=0 b=1 c=2 d=3: [gpu, cpu, storage, any]
        assert_eq!(got, vec![(0, [2, 2, 0, 2]), (1, [0, 0, 4, 4]), (2, [1, 0, 0, 1]), (3, [0, 0, 0, 0])]);
        ix.match_tiers(&Query::new("other", &toks), &mut got);
        assert!(got.is_empty());

        // Cached value: each leading block counts its best tier's weight.
        let mut scores = Vec::new();
        ix.match_scores(&Query::new("m", &toks), [1.0, 0.75, 0.25], &mut scores);
        // a: GPU+CPU, GPU+CPU; b: disk, GPU+disk, disk, disk; c: GPU; d: nothing
        assert_eq!(scores, vec![(0, 2, 2.0), (1, 4, 1.75), (2, 1, 1.0), (3, 0, 0.0)]);
        ix.match_scores(&Query::new("m", &toks), [0.5, 0.25, 0.125], &mut scores);
        assert_eq!(scores, vec![(0, 2, 1.0), (1, 4, 0.875), (2, 1, 0.5), (3, 0, 0.0)]);
        ix.match_scores(&Query::new("m", &toks[..3]), [1.0, 0.75, 0.25], &mut scores);
        assert_eq!(scores, vec![(0, 1, 1.0), (1, 1, 0.25), (2, 1, 1.0), (3, 0, 0.0)]);
        ix.match_scores(&Query::new("other", &toks), [1.0, 0.75, 0.25], &mut scores);
        assert!(scores.is_empty());
    }

    #[test]
    fn a_prompt_given_as_standard_hashes_matches_like_its_tokens() {
        use crate::prefix::{seq_hashes, Lora, DEFAULT_SEED};
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        ix.add_worker("b", "m").unwrap();
        ix.add_worker("c", "other").unwrap();
        let toks: Vec<u32> = (0..8).collect();
        ix.apply("a", &B::default().store(&[1, 2, 3], None, &toks[..6], None).build(), None).unwrap();
        ix.apply("b", &B::default().store(&[1], None, &toks[..2], None).lora("x").build(), None).unwrap();
        ix.apply("c", &B::default().store(&[1, 2], None, &toks[..4], None).build(), None).unwrap();
        let hashes = seq_hashes(&toks, 2, DEFAULT_SEED);
        assert_eq!(hashes.len(), 4);
        let by = |q: &Query<'_, '_>| ix.match_prefix(q).into_iter().map(|(w, d)| (w.to_owned(), d)).collect::<Vec<_>>();
        let m = |v: &[(&str, u32)]| v.iter().map(|&(w, d)| (w.to_owned(), d)).collect::<Vec<_>>();
        assert_eq!(by(&Query::hashes("m", &hashes)), m(&[("a", 3), ("b", 0)]));
        assert_eq!(by(&Query::hashes("m", &hashes)), by(&Query::new("m", &toks)));
        // the adapter's namespace is kept apart, and found by the same hashes
        let x = Query { lora: Lora::Name("x"), ..Query::hashes("m", &hashes) };
        assert_eq!(by(&x), m(&[("a", 0), ("b", 1)]));
        // another model's equal prompt is another namespace
        assert_eq!(by(&Query::hashes("other", &hashes)), m(&[("c", 2)]));
        // the keys the index stores are the standard hashes XOR the namespace
        let ns = crate::prefix::namespace("m", Lora::Base);
        let keys: Vec<u64> = hashes.iter().map(|h| h ^ ns).collect();
        assert_eq!(ix.query_keys(&Query::new("m", &toks)), keys);
        // a wrong hash stops the walk there
        let mut bent = hashes.clone();
        bent[1] ^= 1;
        assert_eq!(by(&Query::hashes("m", &bent)), m(&[("a", 1), ("b", 0)]));
    }

    #[test]
    fn the_survivor_window_agrees_with_the_whole_fleet_walk() {
        // 5,000 workers; holders spread over the slots so the window starts
        // wide, shrinks as prefixes end, and ends on a few high slots.
        let mut ix = Index::default();
        let ids: Vec<String> = (0..5000).map(|w| format!("w{w}")).collect();
        for id in &ids {
            ix.add_worker(id, "m").unwrap();
        }
        let toks: Vec<u32> = (0..16).collect();
        for (w, depth) in [(3, 1), (64, 2), (700, 8), (4000, 8), (4001, 5), (4999, 8), (2500, 3)] {
            let hashes: Vec<u64> = (1..=depth).collect();
            ix.apply(&ids[w], &B::default().store(&hashes, None, &toks[..depth as usize * 2], None).build(), None)
                .unwrap();
        }
        // a sparse set with a CPU-only holder in the middle of the window
        ix.apply(&ids[1234], &B::default().store(&[1, 2], None, &toks[..4], Some("CPU")).build(), None).unwrap();
        for (n, tiers) in [(16, 7u8), (16, 1), (6, 7), (4, 2), (0, 7)] {
            let q = Query { tiers, ..Query::new("m", &toks[..n]) };
            let mut got = Vec::new();
            ix.match_slots(&q, &mut got);
            let mut full = Vec::new();
            ix.match_tiers(&Query::new("m", &toks[..n]), &mut full);
            let k = match tiers {
                1 => 0,
                2 => 1,
                _ => 3,
            };
            let want: Vec<(u32, u32)> = full.iter().map(|&(s, d)| (s, d[k])).collect();
            assert_eq!(got, want, "{n} tokens, tiers {tiers}");
        }
        assert_eq!(depth(&ix, &toks, "w4999"), 8);
        assert_eq!(depth(&ix, &toks, "w4001"), 5);
        assert_eq!(depth(&ix, &toks, "w1234"), 2);
    }

    /// Scores walked block by block from the key table and each block's
    /// holders, without windows, skips or bitsets.
    fn naive_scores(ix: &Index, toks: &[u32], weights: [f64; 3]) -> Vec<(u32, u32, f64)> {
        let keys = ix.query_keys(&Query::new("m", toks));
        let mut slots = Vec::new();
        ix.match_slots(&Query::new("m", toks), &mut slots);
        slots
            .iter()
            .map(|&(w, _)| {
                let (mut n, mut value) = (0, 0.0);
                for &key in &keys {
                    let Some(b) = ix.find_block(key) else { break };
                    let t = ix.pool.get(ix.blocks[b as usize].holders, w);
                    if t == 0 {
                        break;
                    }
                    n += 1;
                    value += weights[t.trailing_zeros() as usize];
                }
                (w, n, value)
            })
            .collect()
    }

    #[test]
    fn scores_over_a_wide_fleet_agree_with_a_block_by_block_walk() {
        // 5,000 workers: long single-holder chains (one holder set for a
        // stretch of blocks: the skip), shared stretches, mixed tiers, and
        // holders spread so the survivor window shrinks.
        let mut ix = Index::default();
        let ids: Vec<String> = (0..5000).map(|w| format!("w{w}")).collect();
        for id in &ids {
            ix.add_worker(id, "m").unwrap();
        }
        let toks: Vec<u32> = (0..40).collect();
        let chain = |n: u64| (1..=n).collect::<Vec<u64>>();
        let stores: [(usize, u64, Option<&str>); 8] = [
            (3, 20, None),
            (64, 6, Some("CPU")),
            (700, 20, Some("DISK")),
            (4000, 12, None),
            (4001, 20, Some("CPU")),
            (4999, 3, None),
            (2500, 20, None),
            (2500, 8, Some("CPU")),
        ];
        for (w, n, medium) in stores {
            let b = B::default().store(&chain(n), None, &toks[..n as usize * 2], medium).build();
            ix.apply(&ids[w], &b, None).unwrap();
        }
        for n in [0, 2, 7, 16, 24, 40] {
            for weights in [[1.0, 0.75, 0.25], [0.5, 2.0, 0.125]] {
                let mut got = Vec::new();
                ix.match_scores(&Query::new("m", &toks[..n]), weights, &mut got);
                assert_eq!(got, naive_scores(&ix, &toks[..n], weights), "{n} tokens, {weights:?}");
            }
        }
        let mut got = Vec::new();
        ix.match_scores(&Query::new("m", &toks), [1.0, 0.75, 0.25], &mut got);
        // 2500: 8 blocks in GPU and CPU (GPU counts), 12 more in the GPU
        assert_eq!(got[2500], (2500, 20, 20.0));
        assert_eq!(got[700], (700, 20, 5.0));
        assert_eq!(got[64], (64, 6, 4.5));
    }

    #[test]
    fn a_model_of_up_to_1024_workers_matches_in_the_fixed_buffers() {
        // 2 to 16 bitset words: the walk's stack buffers, at every size
        for n in [65usize, 200, 1024] {
            let mut ix = Index::default();
            let ids: Vec<String> = (0..n).map(|w| format!("w{w}")).collect();
            for id in &ids {
                ix.add_worker(id, "m").unwrap();
            }
            let toks: Vec<u32> = (0..6).collect();
            let last = n - 1;
            ix.apply(&ids[last], &B::default().store(&[1, 2, 3], None, &toks, None).build(), None).unwrap();
            ix.apply(&ids[1], &B::default().store(&[1], None, &toks[..2], None).build(), None).unwrap();
            let mut got = Vec::new();
            ix.match_slots(&Query::new("m", &toks), &mut got);
            assert_eq!(got.len(), n);
            assert_eq!((got[last], got[1], got[0]), ((last as u32, 3), (1, 1), (0, 0)), "{n} workers");
        }
    }

    #[test]
    fn the_hash_seed_changes_every_key() {
        use crate::prefix::{seq_hashes, DEFAULT_SEED};
        let mut ix = Index::with_seed(None, 42).unwrap();
        ix.add_worker("a", "m").unwrap();
        let toks: Vec<u32> = (0..4).collect();
        ix.apply("a", &B::default().store(&[1, 2], None, &toks, None).build(), None).unwrap();
        let found = |h: &[u64]| ix.match_prefix(&Query::hashes("m", h))[0].1;
        assert_eq!(found(&seq_hashes(&toks, 2, 42)), 2);
        assert_eq!(found(&seq_hashes(&toks, 2, DEFAULT_SEED)), 0);
        assert_eq!(ix.match_prefix(&Query::new("m", &toks))[0].1, 2);
        let mut buf = Vec::new();
        ix.save(&mut buf).unwrap();
        let back = Index::load(&mut &buf[..]).unwrap();
        assert_eq!(back.hash_seed(), 42);
        assert_eq!(back.match_prefix(&Query::new("m", &toks))[0].1, 2);
    }
}
