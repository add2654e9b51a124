//! Which workers hold a block, and in which tiers.
//!
//! A block stores a 4-byte handle. Most blocks in a fleet are held either by
//! one worker or by many, so the handle is one of:
//!
//! - `0`: nobody;
//! - top bit clear: one holder inline, `worker_slot << 3 | tiers`;
//! - top bit set: an index into a pool of larger sets, each either a sorted
//!   `Vec<u32>` of `slot << 3 | tiers` (few holders) or three bitmaps, one
//!   per tier, over worker slots (many holders; 256 workers cost 96 bytes).
//!
//! The pool switches representation by size, so memory per holding stays
//! near 4 bytes for small sets and near 3 bits for large ones.

const POOL_BIT: u32 = 1 << 31;
const TIER_BITS: u32 = 3;
const TIER_MASK: u32 = 0b111;
/// Largest worker slot the inline form can carry.
pub const MAX_SLOT: u32 = (1 << (31 - TIER_BITS)) - 1;

#[derive(Debug)]
enum Set {
    Sparse(Vec<u32>),
    /// `words` bitmap words per tier, laid out `[gpu | cpu | storage]`.
    Dense {
        words: usize,
        bits: Vec<u64>,
        count: u32,
    },
}

#[derive(Debug, Default)]
pub struct Pool {
    sets: Vec<Set>,
    free: Vec<u32>,
    heap_bytes: usize,
}

fn pack(slot: u32, tiers: u8) -> u32 {
    (slot << TIER_BITS) | u32::from(tiers)
}

fn unpack(e: u32) -> (u32, u8) {
    (e >> TIER_BITS, (e & TIER_MASK) as u8)
}

impl Set {
    fn heap_bytes(&self) -> usize {
        match self {
            Set::Sparse(v) => v.capacity() * 4,
            Set::Dense { bits, .. } => bits.capacity() * 8,
        }
    }

    fn len(&self) -> u32 {
        match self {
            Set::Sparse(v) => v.len() as u32,
            Set::Dense { count, .. } => *count,
        }
    }
}

fn dense_get(words: usize, bits: &[u64], slot: u32) -> u8 {
    let (w, b) = ((slot / 64) as usize, slot % 64);
    if w >= words {
        return 0;
    }
    let mut t = 0;
    for tier in 0..3 {
        if bits[tier * words + w] >> b & 1 == 1 {
            t |= 1 << tier;
        }
    }
    t
}

impl Pool {
    /// Bytes on the heap held by the pool (exact, from capacities).
    pub fn memory_bytes(&self) -> usize {
        self.sets.capacity() * std::mem::size_of::<Set>() + self.free.capacity() * 4 + self.heap_bytes
    }

    /// Tiers in which `slot` holds the block (0 when it does not).
    pub fn get(&self, h: u32, slot: u32) -> u8 {
        if h == 0 {
            0
        } else if h & POOL_BIT == 0 {
            let (s, t) = unpack(h);
            if s == slot {
                t
            } else {
                0
            }
        } else {
            match &self.sets[(h & !POOL_BIT) as usize] {
                Set::Sparse(v) => match v.binary_search_by_key(&slot, |e| e >> TIER_BITS) {
                    Ok(i) => unpack(v[i]).1,
                    Err(_) => 0,
                },
                Set::Dense { words, bits, .. } => dense_get(*words, bits, slot),
            }
        }
    }

    /// Number of holders.
    pub fn len(&self, h: u32) -> u32 {
        if h == 0 {
            0
        } else if h & POOL_BIT == 0 {
            1
        } else {
            self.sets[(h & !POOL_BIT) as usize].len()
        }
    }

    /// Call `f(slot, tiers)` for every holder.
    pub fn for_each(&self, h: u32, mut f: impl FnMut(u32, u8)) {
        if h == 0 {
            return;
        }
        if h & POOL_BIT == 0 {
            let (s, t) = unpack(h);
            f(s, t);
            return;
        }
        match &self.sets[(h & !POOL_BIT) as usize] {
            Set::Sparse(v) => v.iter().for_each(|e| {
                let (s, t) = unpack(*e);
                f(s, t);
            }),
            Set::Dense { words, bits, .. } => {
                for w in 0..*words {
                    let mut any = bits[w] | bits[words + w] | bits[2 * words + w];
                    while any != 0 {
                        let b = any.trailing_zeros();
                        any &= any - 1;
                        let slot = (w as u32) * 64 + b;
                        f(slot, dense_get(*words, bits, slot));
                    }
                }
            }
        }
    }

    /// `alive &= { slots holding the block in a tier of mask }`.
    pub fn intersect(&self, h: u32, mask: u8, alive: &mut [u64]) {
        if h == 0 {
            alive.fill(0);
            return;
        }
        if h & POOL_BIT == 0 {
            let (s, t) = unpack(h);
            let (w, b) = ((s / 64) as usize, s % 64);
            let keep = if t & mask != 0 && w < alive.len() { alive[w] & (1 << b) } else { 0 };
            alive.fill(0);
            if keep != 0 {
                alive[w] = keep;
            }
            return;
        }
        match &self.sets[(h & !POOL_BIT) as usize] {
            Set::Sparse(v) => {
                let mut out = [0u64; 64];
                let n = alive.len();
                if n <= out.len() {
                    for e in v {
                        let (s, t) = unpack(*e);
                        let (w, b) = ((s / 64) as usize, s % 64);
                        if t & mask != 0 && w < n {
                            out[w] |= alive[w] & (1 << b);
                        }
                    }
                    alive.copy_from_slice(&out[..n]);
                } else {
                    let mut out = vec![0u64; n];
                    for e in v {
                        let (s, t) = unpack(*e);
                        let (w, b) = ((s / 64) as usize, s % 64);
                        if t & mask != 0 && w < n {
                            out[w] |= alive[w] & (1 << b);
                        }
                    }
                    alive.copy_from_slice(&out);
                }
            }
            Set::Dense { words, bits, .. } => {
                let words = *words;
                let n = alive.len().min(words);
                let (gpu, rest) = bits.split_at(words);
                let (cpu, storage) = rest.split_at(words);
                // One pass per tier mask, without per-word tier tests.
                let (g, c, st) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
                for w in 0..n {
                    let m =
                        (if g { gpu[w] } else { 0 }) | (if c { cpu[w] } else { 0 }) | (if st { storage[w] } else { 0 });
                    alive[w] &= m;
                }
                alive[n..].fill(0);
            }
        }
    }

    /// Set `slot`'s tiers (0 removes it); returns the previous tiers.
    pub fn set(&mut self, h: &mut u32, slot: u32, tiers: u8) -> u8 {
        debug_assert!(slot <= MAX_SLOT && tiers <= 7);
        if *h == 0 {
            if tiers != 0 {
                *h = pack(slot, tiers);
            }
            return 0;
        }
        if *h & POOL_BIT == 0 {
            let (s, t) = unpack(*h);
            if s == slot {
                *h = if tiers == 0 { 0 } else { pack(slot, tiers) };
                return t;
            }
            if tiers == 0 {
                return 0;
            }
            let mut v = vec![pack(s, t), pack(slot, tiers)];
            v.sort_unstable();
            *h = self.alloc(Set::Sparse(v));
            return 0;
        }
        let idx = (*h & !POOL_BIT) as usize;
        let before = self.sets[idx].heap_bytes();
        let old = match &mut self.sets[idx] {
            Set::Sparse(v) => match v.binary_search_by_key(&slot, |e| e >> TIER_BITS) {
                Ok(i) => {
                    let old = unpack(v[i]).1;
                    if tiers == 0 {
                        v.remove(i);
                    } else {
                        v[i] = pack(slot, tiers);
                    }
                    old
                }
                Err(i) => {
                    if tiers != 0 {
                        v.insert(i, pack(slot, tiers));
                    }
                    0
                }
            },
            Set::Dense { words, bits, count } => {
                let w = (slot / 64) as usize;
                if w >= *words && tiers != 0 {
                    let nw = w + 1;
                    let mut nb = vec![0u64; 3 * nw];
                    for tier in 0..3 {
                        nb[tier * nw..tier * nw + *words].copy_from_slice(&bits[tier * *words..(tier + 1) * *words]);
                    }
                    *bits = nb;
                    *words = nw;
                }
                let old = dense_get(*words, bits, slot);
                if w < *words {
                    for tier in 0..3 {
                        let bit = 1u64 << (slot % 64);
                        if tiers >> tier & 1 == 1 {
                            bits[tier * *words + w] |= bit;
                        } else {
                            bits[tier * *words + w] &= !bit;
                        }
                    }
                }
                match (old != 0, tiers != 0) {
                    (false, true) => *count += 1,
                    (true, false) => *count -= 1,
                    _ => {}
                }
                old
            }
        };
        self.heap_bytes = self.heap_bytes + self.sets[idx].heap_bytes() - before;
        self.reshape(h);
        old
    }

    fn alloc(&mut self, s: Set) -> u32 {
        self.heap_bytes += s.heap_bytes();
        let idx = if let Some(i) = self.free.pop() {
            self.sets[i as usize] = s;
            i
        } else {
            self.sets.push(s);
            (self.sets.len() - 1) as u32
        };
        POOL_BIT | idx
    }

    fn release(&mut self, idx: usize) {
        self.heap_bytes -= self.sets[idx].heap_bytes();
        self.sets[idx] = Set::Sparse(Vec::new());
        self.free.push(idx as u32);
    }

    /// Pick the cheapest representation for the set behind `h`.
    fn reshape(&mut self, h: &mut u32) {
        let idx = (*h & !POOL_BIT) as usize;
        let len = self.sets[idx].len();
        if len <= 1 {
            let mut single = None;
            self.for_each(*h, |s, t| single = Some(pack(s, t)));
            self.release(idx);
            *h = single.unwrap_or(0);
            return;
        }
        let before = self.sets[idx].heap_bytes();
        let set = &mut self.sets[idx];
        match set {
            Set::Sparse(v) => {
                let max_slot = v.last().map_or(0, |e| e >> TIER_BITS);
                let words = (max_slot / 64 + 1) as usize;
                // 4 bytes per sparse entry vs 24 bytes per word of three bitmaps
                if v.len() > 6 * words {
                    let mut bits = vec![0u64; 3 * words];
                    for e in v.iter() {
                        let (s, t) = unpack(*e);
                        for tier in 0..3 {
                            if t >> tier & 1 == 1 {
                                bits[tier * words + (s / 64) as usize] |= 1 << (s % 64);
                            }
                        }
                    }
                    *set = Set::Dense { words, bits, count: len };
                } else if v.capacity() > 2 * v.len() + 4 {
                    v.shrink_to_fit();
                }
            }
            Set::Dense { words, bits, count } => {
                if (*count as usize) < 2 * *words {
                    let mut v = Vec::with_capacity(*count as usize);
                    for w in 0..*words {
                        let mut any = bits[w] | bits[*words + w] | bits[2 * *words + w];
                        while any != 0 {
                            let b = any.trailing_zeros();
                            any &= any - 1;
                            let s = (w as u32) * 64 + b;
                            v.push(pack(s, dense_get(*words, bits, s)));
                        }
                    }
                    *set = Set::Sparse(v);
                }
            }
        }
        self.heap_bytes = self.heap_bytes + self.sets[idx].heap_bytes() - before;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// What the pool's heap really holds, recomputed from scratch.
    fn recomputed_bytes(p: &Pool) -> usize {
        let sets: usize = p
            .sets
            .iter()
            .map(|s| match s {
                Set::Sparse(v) => v.capacity() * 4,
                Set::Dense { bits, .. } => bits.capacity() * 8,
            })
            .sum();
        p.sets.capacity() * std::mem::size_of::<Set>() + p.free.capacity() * 4 + sets
    }

    #[test]
    fn memory_accounting_matches_the_heap_through_every_representation() {
        let mut pool = Pool::default();
        assert_eq!(pool.memory_bytes(), 0);
        let mut handles = [0u32; 3];
        // grow past the sparse form into bitmaps and back, in several sets
        for round in 0..2u32 {
            for slot in 0..600u32 {
                for (i, h) in handles.iter_mut().enumerate() {
                    if slot % (i as u32 + 1) == round % 2 {
                        pool.set(h, slot, 1 + (slot % 7) as u8);
                    }
                    assert_eq!(pool.memory_bytes(), recomputed_bytes(&pool));
                }
            }
            assert!(pool.memory_bytes() >= 600 / 8 * 3, "bitmaps are on the heap");
            for slot in 0..600u32 {
                for h in &mut handles {
                    pool.set(h, slot, 0);
                    assert_eq!(pool.memory_bytes(), recomputed_bytes(&pool));
                }
            }
        }
        assert_eq!(handles, [0; 3]);
    }

    #[test]
    fn intersect_keeps_only_holders_in_the_asked_tiers_beyond_4096_slots() {
        // a few holders (sparse form) among 4,160 slots: the wide path
        let mut pool = Pool::default();
        let mut h = 0u32;
        pool.set(&mut h, 5, 0b001); // gpu
        pool.set(&mut h, 4100, 0b010); // cpu
        pool.set(&mut h, 4101, 0b100); // storage
        let words = 65;
        for (mask, want) in
            [(0b001, vec![5]), (0b010, vec![4100]), (0b110, vec![4100, 4101]), (0b111, vec![5, 4100, 4101])]
        {
            let mut alive = vec![u64::MAX; words];
            pool.intersect(h, mask, &mut alive);
            let got: Vec<u32> =
                (0..words as u32 * 64).filter(|s| alive[(s / 64) as usize] >> (s % 64) & 1 == 1).collect();
            assert_eq!(got, want, "mask {mask:#05b}");
        }
        // and a slot already dead stays dead
        let mut alive = vec![u64::MAX; words];
        alive[4100 / 64] = 0;
        pool.intersect(h, 0b111, &mut alive);
        assert_eq!(alive.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
    }

    #[test]
    fn the_largest_slot_fits_the_inline_form() {
        assert_eq!(MAX_SLOT, (1 << 28) - 1);
        let e = pack(MAX_SLOT, 7);
        assert_eq!(e & POOL_BIT, 0);
        assert_eq!(unpack(e), (MAX_SLOT, 7));
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u32..300, 0u8..8), 0..400)) {
            let mut pool = Pool::default();
            let mut h = 0u32;
            let mut model = BTreeMap::new();
            for (slot, tiers) in ops {
                let old = pool.set(&mut h, slot, tiers);
                prop_assert_eq!(old, model.get(&slot).copied().unwrap_or(0));
                if tiers == 0 { model.remove(&slot); } else { model.insert(slot, tiers); }
                prop_assert_eq!(pool.len(h) as usize, model.len());
                for s in [0u32, 1, 63, 64, 65, 128, 299, slot] {
                    prop_assert_eq!(pool.get(h, s), model.get(&s).copied().unwrap_or(0));
                }
                let mut seen = BTreeMap::new();
                pool.for_each(h, |s, t| { seen.insert(s, t); });
                prop_assert_eq!(&seen, &model);
                for mask in [1u8, 2, 4, 7] {
                    let mut alive = vec![u64::MAX; 5];
                    pool.intersect(h, mask, &mut alive);
                    for s in 0..320u32 {
                        let want = model.get(&s).is_some_and(|t| t & mask != 0);
                        prop_assert_eq!(alive[(s / 64) as usize] >> (s % 64) & 1 == 1, want);
                    }
                }
            }
        }
    }

    /// Which representation a handle uses.
    fn kind(pool: &Pool, h: u32) -> &'static str {
        if h == 0 {
            "empty"
        } else if h & POOL_BIT == 0 {
            "inline"
        } else {
            match pool.sets[(h & !POOL_BIT) as usize] {
                Set::Sparse(_) => "sparse",
                Set::Dense { .. } => "dense",
            }
        }
    }

    fn agrees(pool: &Pool, h: u32, model: &BTreeMap<u32, u8>) {
        assert_eq!(pool.len(h) as usize, model.len());
        let mut seen = BTreeMap::new();
        pool.for_each(h, |s, t| {
            seen.insert(s, t);
        });
        assert_eq!(&seen, model);
        for s in 0..200 {
            assert_eq!(pool.get(h, s), model.get(&s).copied().unwrap_or(0), "slot {s}");
        }
        let mut alive = vec![u64::MAX; 4];
        pool.intersect(h, 2, &mut alive);
        for s in 0..256u32 {
            let want = model.get(&s).is_some_and(|t| t & 2 != 0);
            assert_eq!(alive[(s / 64) as usize] >> (s % 64) & 1 == 1, want, "slot {s}");
        }
    }

    #[test]
    fn representation_switches_both_ways() {
        let mut pool = Pool::default();
        let mut h = 0;
        let mut model = BTreeMap::new();
        let mut kinds = Vec::new();
        // Grow: one holder inline, a few in a sorted vector, many in bitmaps.
        for s in 0..128u32 {
            let t = (s % 7 + 1) as u8;
            pool.set(&mut h, s, t);
            model.insert(s, t);
            agrees(&pool, h, &model);
            if kinds.last() != Some(&kind(&pool, h)) {
                kinds.push(kind(&pool, h));
            }
        }
        assert_eq!(kinds, ["inline", "sparse", "dense"]);
        assert!(pool.heap_bytes > 0);
        // Shrink back: bitmaps, then a vector, then one inline, then nothing.
        for s in 0..128u32 {
            pool.set(&mut h, s, 0);
            model.remove(&s);
            agrees(&pool, h, &model);
            if kinds.last() != Some(&kind(&pool, h)) {
                kinds.push(kind(&pool, h));
            }
        }
        assert_eq!(kinds, ["inline", "sparse", "dense", "sparse", "inline", "empty"]);
        assert_eq!(h, 0);
        // Every heap byte is given back, and the set's slot is reused.
        assert_eq!(pool.heap_bytes, 0);
        assert_eq!(pool.free.len(), pool.sets.len());
    }

    #[test]
    fn memory_returns_to_baseline_after_each_cycle() {
        let mut pool = Pool::default();
        let mut handles = vec![0u32; 50];
        let cycle = |pool: &mut Pool, handles: &mut Vec<u32>| {
            for (i, h) in handles.iter_mut().enumerate() {
                // a mix of sparse and dense sets
                for s in 0..(i as u32 * 3 + 2) {
                    pool.set(h, s, 1);
                }
            }
            assert!(pool.heap_bytes > 0);
            for (i, h) in handles.iter_mut().enumerate() {
                for s in 0..(i as u32 * 3 + 2) {
                    pool.set(h, s, 0);
                }
                assert_eq!(*h, 0);
            }
            assert_eq!(pool.heap_bytes, 0);
            pool.memory_bytes()
        };
        let baseline = cycle(&mut pool, &mut handles);
        for _ in 0..5 {
            assert_eq!(cycle(&mut pool, &mut handles), baseline);
        }
    }
}
