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
//!
//! Pool sets are shared: blocks with the same holders (the blocks of a
//! prefix that the same workers cached, a stretch of a chain) point at one
//! set, found by a content hash (XOR of a mix of each entry, updated in
//! O(1) per change) and reference-counted. Changing one block's holders
//! moves its handle to the set with the new content, reusing an equal set
//! when one exists, editing in place when the block is the only user, and
//! copying otherwise. So a prefix held by 150 workers costs one bitmap per
//! stretch instead of one per block, and a match walking such a stretch
//! meets the same handle again and skips the intersection (it cannot
//! change the surviving workers).

use hashbrown::HashTable;

const POOL_BIT: u32 = 1 << 31;
const TIER_BITS: u32 = 3;
const TIER_MASK: u32 = 0b111;
/// Largest worker slot the inline form can carry.
pub const MAX_SLOT: u32 = (1 << (31 - TIER_BITS)) - 1;

#[derive(Clone, Debug)]
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
    /// Handles pointing at each set (0: a free set).
    refs: Vec<u32>,
    /// Content hash of each set: XOR of `entry_hash` over its entries.
    sums: Vec<u64>,
    /// Live sets by content hash.
    by_content: HashTable<u32>,
    free: Vec<u32>,
    heap_bytes: usize,
    /// The last move of a handle to another set: a worker storing a chain
    /// moves every block of a stretch from one set to the same next one,
    /// and this skips the content lookup for all but the first.
    memo: Option<Memo>,
}

/// `from` + (`slot`, `tiers`) = `to`, `slot` having had `old` in `from`.
/// Valid while neither set is edited in place or freed (both clear it).
#[derive(Clone, Copy, Debug)]
struct Memo {
    from: u32,
    slot: u32,
    tiers: u8,
    to: u32,
    old: u8,
}

/// Hash of one entry (`slot << 3 | tiers`) in a set's content hash.
#[inline]
fn entry_hash(e: u32) -> u64 {
    // splitmix64's finaliser: every input bit moves about half the output.
    let mut x = u64::from(e).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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
        self.sets.capacity() * std::mem::size_of::<Set>()
            + self.refs.capacity() * 4
            + self.sums.capacity() * 8
            + self.by_content.allocation_size()
            + self.free.capacity() * 4
            + self.heap_bytes
    }

    /// Sets in use (each shared by `refs` handles).
    pub fn live_sets(&self) -> usize {
        self.by_content.len()
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
        for_each_entry(&self.sets[(h & !POOL_BIT) as usize], |e| {
            let (s, t) = unpack(e);
            f(s, t);
        });
    }

    /// `alive &= { slots holding the block in a tier of mask }`.
    pub fn intersect(&self, h: u32, mask: u8, alive: &mut [u64]) {
        self.intersect_words(h, mask, alive, 0);
    }

    /// [`Pool::intersect`] on a window of the bitset: `alive[i]` is word
    /// `first + i` (the words outside it are the caller's, known empty).
    /// Costs the window's length plus the set's entries in it, whatever the
    /// number of workers.
    pub fn intersect_words(&self, h: u32, mask: u8, alive: &mut [u64], first: usize) {
        let n = alive.len();
        let word = |slot: u32| (slot / 64) as usize;
        if h == 0 {
            alive.fill(0);
            return;
        }
        if h & POOL_BIT == 0 {
            let (s, t) = unpack(h);
            let keep = match word(s).checked_sub(first) {
                Some(i) if i < n && t & mask != 0 => alive[i] & (1 << (s % 64)),
                _ => 0,
            };
            alive.fill(0);
            if keep != 0 {
                alive[word(s) - first] = keep;
            }
            return;
        }
        match &self.sets[(h & !POOL_BIT) as usize] {
            Set::Sparse(v) => {
                // Entries are sorted by slot: one merge pass over the window.
                let start = v.partition_point(|e| word(e >> TIER_BITS) < first);
                let (mut i, mut m) = (0, 0u64);
                for &e in &v[start..] {
                    let (s, t) = unpack(e);
                    let at = word(s) - first;
                    if at >= n {
                        break;
                    }
                    while i < at {
                        alive[i] &= m;
                        m = 0;
                        i += 1;
                    }
                    if t & mask != 0 {
                        m |= 1 << (s % 64);
                    }
                }
                while i < n {
                    alive[i] &= m;
                    m = 0;
                    i += 1;
                }
            }
            Set::Dense { words, bits, .. } => {
                let words = *words;
                let (gpu, rest) = bits.split_at(words);
                let (cpu, storage) = rest.split_at(words);
                // One pass per tier mask, without per-word tier tests.
                let (g, c, st) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
                let inside = words.saturating_sub(first).min(n);
                for (i, a) in alive[..inside].iter_mut().enumerate() {
                    let w = first + i;
                    let m =
                        (if g { gpu[w] } else { 0 }) | (if c { cpu[w] } else { 0 }) | (if st { storage[w] } else { 0 });
                    *a &= m;
                }
                alive[inside..].fill(0);
            }
        }
    }

    /// Set `slot`'s tiers (0 removes it) in the set behind `h`, moving `h`
    /// to the set with the new content; returns the previous tiers.
    pub fn set(&mut self, h: &mut u32, slot: u32, tiers: u8) -> u8 {
        debug_assert!(slot <= MAX_SLOT && tiers <= 7);
        if *h == 0 {
            if tiers != 0 {
                *h = pack(slot, tiers);
            }
            return 0;
        }
        if let Some(m) = self.memo {
            if m.from == *h && m.slot == slot && m.tiers == tiers {
                self.refs[m.to as usize] += 1;
                if *h & POOL_BIT != 0 {
                    self.unref((*h & !POOL_BIT) as usize);
                }
                *h = POOL_BIT | m.to;
                return m.old;
            }
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
            let sum = entry_hash(v[0]) ^ entry_hash(v[1]);
            let to = match self.find_equal(sum, &Set::Sparse(v.clone()), None) {
                Some(j) => {
                    self.refs[j as usize] += 1;
                    j
                }
                None => self.alloc(Set::Sparse(v), sum) & !POOL_BIT,
            };
            self.memo = Some(Memo { from: *h, slot, tiers, to, old: 0 });
            *h = POOL_BIT | to;
            return 0;
        }
        let idx = (*h & !POOL_BIT) as usize;
        let old = self.get(*h, slot);
        if old == tiers {
            return old;
        }
        let new_len = self.sets[idx].len() + u32::from(tiers != 0) - u32::from(old != 0);
        if new_len <= 1 {
            // One holder left (or none): back to the inline form.
            // (Only a removal from a pair gets here.)
            let mut single = 0;
            self.for_each(*h, |s, t| {
                if s != slot {
                    single = pack(s, t);
                }
            });
            self.unref(idx);
            *h = single;
            return old;
        }
        let mut sum = self.sums[idx];
        if old != 0 {
            sum ^= entry_hash(pack(slot, old));
        }
        if tiers != 0 {
            sum ^= entry_hash(pack(slot, tiers));
        }
        if let Some(j) = self.find_equal(sum, &self.sets[idx], Some((slot, tiers))) {
            self.refs[j as usize] += 1;
            self.unref(idx);
            if self.refs[idx] > 0 {
                self.memo = Some(Memo { from: *h, slot, tiers, to: j, old });
            }
            *h = POOL_BIT | j;
            return old;
        }
        let target = if self.refs[idx] == 1 {
            // The only user: edit in place, filed under the new content.
            self.memo = None;
            self.unfile(idx);
            idx
        } else {
            self.refs[idx] -= 1;
            let copy = self.sets[idx].clone();
            (self.alloc_unfiled(copy) & !POOL_BIT) as usize
        };
        let before = self.sets[target].heap_bytes();
        edit(&mut self.sets[target], slot, tiers);
        reshape(&mut self.sets[target]);
        self.heap_bytes = self.heap_bytes + self.sets[target].heap_bytes() - before;
        self.sums[target] = sum;
        self.file(target);
        if target != idx {
            self.memo = Some(Memo { from: *h, slot, tiers, to: target as u32, old });
        }
        *h = POOL_BIT | target as u32;
        old
    }

    /// A live set whose content is `set` with `patch` (slot, tiers) applied.
    fn find_equal(&self, sum: u64, set: &Set, patch: Option<(u32, u8)>) -> Option<u32> {
        self.by_content
            .find(sum, |&j| self.sums[j as usize] == sum && same_content(&self.sets[j as usize], set, patch))
            .copied()
    }

    fn file(&mut self, idx: usize) {
        let sums = &self.sums;
        self.by_content.insert_unique(sums[idx], idx as u32, |&j| sums[j as usize]);
    }

    fn unfile(&mut self, idx: usize) {
        if let Ok(e) = self.by_content.find_entry(self.sums[idx], |&j| j as usize == idx) {
            e.remove();
        }
    }

    /// Drop one handle's reference; the last one frees the set.
    fn unref(&mut self, idx: usize) {
        self.refs[idx] -= 1;
        if self.refs[idx] == 0 {
            self.memo = None;
            self.unfile(idx);
            self.heap_bytes -= self.sets[idx].heap_bytes();
            self.sets[idx] = Set::Sparse(Vec::new());
            self.free.push(idx as u32);
        }
    }

    fn alloc(&mut self, s: Set, sum: u64) -> u32 {
        let h = self.alloc_unfiled(s);
        let idx = (h & !POOL_BIT) as usize;
        self.sums[idx] = sum;
        self.file(idx);
        h
    }

    /// A new set with one reference, not yet in the content table.
    fn alloc_unfiled(&mut self, s: Set) -> u32 {
        self.heap_bytes += s.heap_bytes();
        let idx = if let Some(i) = self.free.pop() {
            self.sets[i as usize] = s;
            self.refs[i as usize] = 1;
            i
        } else {
            self.sets.push(s);
            self.refs.push(1);
            self.sums.push(0);
            (self.sets.len() - 1) as u32
        };
        POOL_BIT | idx
    }

    /// Check the sharing invariants against every handle in use: reference
    /// counts, content hashes, the content table, no set small enough for
    /// the inline form, and no two live sets with equal content.
    pub fn check(&self, handles: impl Iterator<Item = u32>) -> Result<(), String> {
        let mut refs = vec![0u32; self.sets.len()];
        for h in handles {
            if h & POOL_BIT != 0 {
                let idx = (h & !POOL_BIT) as usize;
                if idx >= self.sets.len() || self.refs[idx] == 0 {
                    return Err(format!("handle {h:#x} names a free holder set"));
                }
                refs[idx] += 1;
            }
        }
        let mut live = 0;
        for (idx, set) in self.sets.iter().enumerate() {
            if refs[idx] != self.refs[idx] {
                return Err(format!("holder set {idx}: {} handles, count says {}", refs[idx], self.refs[idx]));
            }
            if self.refs[idx] == 0 {
                continue;
            }
            live += 1;
            let mut sum = 0;
            for_each_entry(set, |e| sum ^= entry_hash(e));
            if sum != self.sums[idx] {
                return Err(format!("holder set {idx}: content hash {:#x} != {sum:#x}", self.sums[idx]));
            }
            if set.len() < 2 {
                return Err(format!("holder set {idx} has {} holders (inline form expected)", set.len()));
            }
            if self.find_equal(sum, set, None) != Some(idx as u32) {
                return Err(format!("holder set {idx} is not filed by its content, or has an equal twin"));
            }
        }
        if live != self.by_content.len() {
            return Err(format!("{live} live holder sets, {} filed", self.by_content.len()));
        }
        Ok(())
    }
}

/// Every entry `slot << 3 | tiers` of a set, in slot order.
fn for_each_entry(set: &Set, mut f: impl FnMut(u32)) {
    match set {
        Set::Sparse(v) => v.iter().copied().for_each(f),
        Set::Dense { words, bits, .. } => {
            for w in 0..*words {
                let mut any = bits[w] | bits[words + w] | bits[2 * words + w];
                while any != 0 {
                    let b = any.trailing_zeros();
                    any &= any - 1;
                    let slot = (w as u32) * 64 + b;
                    f(pack(slot, dense_get(*words, bits, slot)));
                }
            }
        }
    }
}

/// Whether `a` holds exactly the content of `b` with `patch` applied.
fn same_content(a: &Set, b: &Set, patch: Option<(u32, u8)>) -> bool {
    match (a, b, patch) {
        (Set::Sparse(x), Set::Sparse(y), None) => x == y,
        (Set::Dense { words: wa, bits: ba, count: ca }, Set::Dense { words: wb, bits: bb, count: cb }, p) => {
            let (slot, tiers) = p.unwrap_or((u32::MAX, 0));
            let old = if p.is_some() { dense_get(*wb, bb, slot) } else { 0 };
            let count = *cb + u32::from(tiers != 0) - u32::from(old != 0);
            if *ca != count {
                return false;
            }
            let words = (*wa).max(*wb);
            for tier in 0..3 {
                for w in 0..words {
                    let x = if w < *wa { ba[tier * wa + w] } else { 0 };
                    let mut y = if w < *wb { bb[tier * wb + w] } else { 0 };
                    if p.is_some() && w == (slot / 64) as usize {
                        let bit = 1u64 << (slot % 64);
                        y = if tiers >> tier & 1 == 1 { y | bit } else { y & !bit };
                    }
                    if x != y {
                        return false;
                    }
                }
            }
            true
        }
        _ => {
            // Mixed forms, or a patched sparse set: compare entry lists.
            let mut x = Vec::with_capacity(a.len() as usize);
            for_each_entry(a, |e| x.push(e));
            let mut y = Vec::with_capacity(b.len() as usize + 1);
            for_each_entry(b, |e| y.push(e));
            if let Some((slot, tiers)) = patch {
                match y.binary_search_by_key(&slot, |e| e >> TIER_BITS) {
                    Ok(i) if tiers == 0 => {
                        y.remove(i);
                    }
                    Ok(i) => y[i] = pack(slot, tiers),
                    Err(i) if tiers != 0 => y.insert(i, pack(slot, tiers)),
                    Err(_) => {}
                }
            }
            x == y
        }
    }
}

/// Set `slot`'s tiers in `set` (0 removes it).
fn edit(set: &mut Set, slot: u32, tiers: u8) {
    match set {
        Set::Sparse(v) => match v.binary_search_by_key(&slot, |e| e >> TIER_BITS) {
            Ok(i) if tiers == 0 => {
                v.remove(i);
            }
            Ok(i) => v[i] = pack(slot, tiers),
            Err(i) if tiers != 0 => v.insert(i, pack(slot, tiers)),
            Err(_) => {}
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
        }
    }
}

/// Pick the cheapest representation for a set of two or more holders.
fn reshape(set: &mut Set) {
    let len = set.len();
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
        p.sets.capacity() * std::mem::size_of::<Set>()
            + p.refs.capacity() * 4
            + p.sums.capacity() * 8
            + p.by_content.allocation_size()
            + p.free.capacity() * 4
            + sets
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
                // a window of the bitset gives the same words as the whole
                for (first, len) in [(1usize, 2usize), (2, 3), (4, 1), (0, 3)] {
                    let mut whole = vec![u64::MAX; 5];
                    pool.intersect(h, 7, &mut whole);
                    let mut window = vec![u64::MAX; len];
                    pool.intersect_words(h, 7, &mut window, first);
                    prop_assert_eq!(&window[..], &whole[first..first + len]);
                }
            }
        }
    }

    proptest! {
        /// Several handles over shared sets: each behaves like its own map,
        /// whatever the others do, and the sharing invariants hold.
        #[test]
        fn shared_sets_behave_like_separate_maps(
            ops in proptest::collection::vec((0usize..4, 0u32..140, 0u8..8), 0..400),
        ) {
            let mut pool = Pool::default();
            let mut handles = [0u32; 4];
            let mut models: [BTreeMap<u32, u8>; 4] = Default::default();
            for (i, slot, tiers) in ops {
                // mostly the same few slots, so contents often coincide
                let slot = if slot < 120 { slot % 8 } else { slot };
                let old = pool.set(&mut handles[i], slot, tiers);
                prop_assert_eq!(old, models[i].get(&slot).copied().unwrap_or(0));
                if tiers == 0 { models[i].remove(&slot); } else { models[i].insert(slot, tiers); }
                if let Err(e) = pool.check(handles.iter().copied()) {
                    prop_assert!(false, "{}", e);
                }
                for (h, model) in handles.iter().zip(&models) {
                    let mut seen = BTreeMap::new();
                    pool.for_each(*h, |s, t| { seen.insert(s, t); });
                    prop_assert_eq!(&seen, model);
                }
                for a in 0..4 {
                    for b in 0..4 {
                        // equal contents share one handle, different ones never do
                        prop_assert_eq!(handles[a] == handles[b], models[a] == models[b]);
                    }
                }
                prop_assert_eq!(pool.memory_bytes(), recomputed_bytes(&pool));
            }
            for (i, h) in handles.iter_mut().enumerate() {
                for &slot in models[i].keys() {
                    pool.set(h, slot, 0);
                }
            }
            prop_assert_eq!(handles, [0; 4]);
            prop_assert_eq!(pool.live_sets(), 0);
            prop_assert_eq!(pool.heap_bytes, 0);
        }
    }

    #[test]
    fn entry_hashes_are_splitmix64_and_spread() {
        // SplitMix64's published first outputs for seeds 0 and 1234567:
        // equal sets are found by one probe only if different entries get
        // unrelated hashes (a constant hash would still be correct, and slow).
        assert_eq!(entry_hash(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(entry_hash(1_234_567), 6_457_827_717_110_365_317);
        let mut seen: Vec<u64> = (0..1u32 << 16).map(entry_hash).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 1 << 16);
    }

    /// Contents of a handle as (slot, tiers) pairs.
    fn content(pool: &Pool, h: u32) -> Vec<(u32, u8)> {
        let mut v = Vec::new();
        pool.for_each(h, |s, t| v.push((s, t)));
        v
    }

    #[test]
    fn the_move_memo_applies_only_to_the_same_slot_and_tiers() {
        let mut pool = Pool::default();
        let mut blocks = [0u32; 3];
        for h in &mut blocks {
            pool.set(h, 10, 1);
            pool.set(h, 11, 1);
        }
        assert!(blocks.iter().all(|&h| h == blocks[0]));
        pool.set(&mut blocks[0], 12, 1); // remembered: S + (12, gpu)
        pool.set(&mut blocks[1], 12, 2); // same set and slot, other tiers
        pool.set(&mut blocks[2], 13, 2); // same set and tiers, another slot
        assert_eq!(content(&pool, blocks[0]), [(10, 1), (11, 1), (12, 1)]);
        assert_eq!(content(&pool, blocks[1]), [(10, 1), (11, 1), (12, 2)]);
        assert_eq!(content(&pool, blocks[2]), [(10, 1), (11, 1), (13, 2)]);
        pool.check(blocks.iter().copied()).unwrap();
    }

    #[test]
    fn a_freed_set_is_never_remembered_as_a_move_source() {
        let mut pool = Pool::default();
        let (mut x, mut y) = (0u32, 0u32);
        for slot in [1, 2] {
            pool.set(&mut x, slot, 1);
        }
        for slot in [1, 2, 3] {
            pool.set(&mut y, slot, 1);
        }
        // x joins y's set; x's old set is freed
        pool.set(&mut x, 3, 1);
        assert_eq!(x, y);
        // a new set takes the freed place, then makes "the same" move
        let mut z = 0u32;
        for slot in [4, 5] {
            pool.set(&mut z, slot, 1);
        }
        pool.set(&mut z, 3, 1);
        assert_eq!(content(&pool, z), [(3, 1), (4, 1), (5, 1)]);
        pool.check([x, y, z].into_iter()).unwrap();
    }

    #[test]
    fn blocks_with_the_same_holders_share_one_set() {
        let mut pool = Pool::default();
        // a chain of 100 blocks each cached by the same 150 workers
        let mut chain = [0u32; 100];
        for slot in 0..150 {
            for h in &mut chain {
                pool.set(h, slot, 1);
            }
        }
        assert!(chain.iter().all(|&h| h == chain[0]));
        assert_eq!(pool.live_sets(), 1);
        pool.check(chain.iter().copied()).unwrap();
        let one_set = pool.memory_bytes();
        // one block gains a CPU copy: it alone moves to a new set
        assert_eq!(pool.set(&mut chain[7], 3, 0b011), 1);
        assert_eq!(pool.live_sets(), 2);
        assert_eq!(pool.get(chain[7], 3), 0b011);
        assert_eq!(pool.get(chain[8], 3), 1, "the other blocks are untouched");
        // and back: it rejoins the shared set, the copy is freed
        pool.set(&mut chain[7], 3, 1);
        assert_eq!(pool.live_sets(), 1);
        assert!(chain.iter().all(|&h| h == chain[0]));
        assert!(pool.memory_bytes() <= one_set + 64, "the copy's heap is given back");
        pool.check(chain.iter().copied()).unwrap();
        // a count that does not match the handles is reported
        assert!(pool.check(chain[..99].iter().copied()).unwrap_err().contains("100"));
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
