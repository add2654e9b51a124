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

#[derive(Clone, Debug, PartialEq, Eq)]
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
            // (If that freed `idx`, no handle names it until it is reused,
            // and reuse forgets the memo.)
            self.memo = Some(Memo { from: *h, slot, tiers, to: j, old });
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
        // A memo may name a freed set as its source: not once it is reused.
        self.memo = None;
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
                edit_entries(&mut y, slot, tiers);
            }
            x == y
        }
    }
}

/// Set `slot`'s tiers in a slot-sorted entry list (0 removes it).
fn edit_entries(v: &mut Vec<u32>, slot: u32, tiers: u8) {
    match v.binary_search_by_key(&slot, |e| e >> TIER_BITS) {
        Ok(i) if tiers == 0 => {
            v.remove(i);
        }
        Ok(i) => v[i] = pack(slot, tiers),
        Err(i) if tiers != 0 => v.insert(i, pack(slot, tiers)),
        Err(_) => {}
    }
}

/// Set `slot`'s tiers in `set` (0 removes it).
fn edit(set: &mut Set, slot: u32, tiers: u8) {
    match set {
        Set::Sparse(v) => edit_entries(v, slot, tiers),
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
mod tests;
