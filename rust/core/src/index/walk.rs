//! How a query steps through the index: the prefix keys of its full blocks
//! (hashed lazily, a batch ahead of the chain), the blocks they name
//! (through child hints, else the key table), and the set of workers still
//! matching as the walk goes down.

use super::{Index, Query, NIL};
use crate::holders::Pool;
use crate::prefix::{chain, local_hash, namespace};
use crate::wire::Value;

/// Local hashes computed ahead of the chain, in batches: they do not
/// depend on each other, so a tight loop over a batch overlaps them, while
/// the serial chain step and the walk's loads follow. Small enough that a
/// walk stopping at the first block wastes little.
const AHEAD: usize = 16;

/// The prefix keys of a query's full blocks (`prefix`: the standard `seq`
/// hash XOR the namespace), hashed lazily in batches of [`AHEAD`]: a walk
/// that stops early hashes little further. Without a block size a token
/// query has no keys.
pub(super) struct Keys<'a, 'q, 'v> {
    q: &'a Query<'q, 'v>,
    /// The full blocks' tokens; none when the block size is not known.
    blocks: std::iter::Enumerate<std::slice::ChunksExact<'q, u32>>,
    /// The prompt's standard hashes when it came as hashes.
    hashes: std::slice::Iter<'q, u64>,
    ns: u64,
    seed: u64,
    prev: Option<u64>,
    locals: [u64; AHEAD],
    next: usize,
    filled: usize,
}

impl<'a, 'q, 'v> Keys<'a, 'q, 'v> {
    pub(super) fn new(q: &'a Query<'q, 'v>, block_size: Option<u32>, seed: u64) -> Self {
        let tokens = if block_size.is_some() && q.hashes.is_none() { q.tokens } else { &[] };
        let blocks = tokens.chunks_exact(block_size.map_or(1, |b| b as usize)).enumerate();
        let hashes = q.hashes.unwrap_or_default().iter();
        let ns = namespace(q.model, q.lora);
        Keys { q, blocks, hashes, ns, seed, prev: None, locals: [0; AHEAD], next: 0, filled: 0 }
    }

    /// The next batch of local hashes; false when no block is left.
    #[inline(never)]
    fn refill(&mut self) -> bool {
        let mut n = 0;
        if let Some(extra_keys) = self.q.extra_keys {
            for (i, toks) in self.blocks.by_ref().take(AHEAD) {
                let extras: &[Value<'_>] = match extra_keys.get(i) {
                    Some(Some(v)) => v,
                    _ => &[],
                };
                self.locals[n] = local_hash(toks, extras, self.seed);
                n += 1;
            }
        } else {
            for ((_, toks), local) in self.blocks.by_ref().take(AHEAD).zip(self.locals.iter_mut()) {
                *local = local_hash(toks, &[], self.seed);
                n += 1;
            }
        }
        self.next = 0;
        self.filled = n;
        n > 0
    }
}

impl Iterator for Keys<'_, '_, '_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        if self.q.hashes.is_some() {
            return self.hashes.next().map(|h| h ^ self.ns);
        }
        if self.next == self.filled && !self.refill() {
            return None;
        }
        let seq = chain(self.prev, self.locals[self.next], self.seed);
        self.next += 1;
        self.prev = Some(seq);
        Some(seq ^ self.ns)
    }
}

/// The slots of a query's leading blocks the index knows, in order, until
/// the first it does not: each found through the previous block's child
/// hint (checked by key), else the key table.
pub(super) struct Walk<'a, 'q, 'v> {
    pub(super) ix: &'a Index,
    pub(super) keys: Keys<'a, 'q, 'v>,
    pub(super) hint: u32,
}

impl Iterator for Walk<'_, '_, '_> {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        let key = self.keys.next()?;
        let slot = match self.ix.blocks.get(self.hint as usize) {
            Some(b) if b.key() == key && b.refs != NIL => self.hint,
            _ => self.ix.find_block(key)?,
        };
        self.hint = self.ix.blocks[slot as usize].child;
        Some(slot)
    }
}

/// Worker slots of the set bits of bitset word `w`.
#[inline]
pub(super) fn slots_of(w: usize, mut bits: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if bits == 0 {
            return None;
        }
        let bit = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        Some(w * 64 + bit)
    })
}

/// The workers still matching while a walk goes down a prompt: a bitset
/// over worker slots narrowed by each block's holders, and the window of
/// words that still has any. The window only shrinks, so a walk costs what
/// the prompt's holders span, not the size of the fleet.
pub(super) struct Survivors<'b> {
    alive: &'b mut [u64],
    before: &'b mut [u64],
    lo: usize,
    hi: usize,
}

impl<'b> Survivors<'b> {
    /// Every worker of `members` (a model's), in the caller's two buffers
    /// of the same length.
    pub(super) fn new(members: &[u64], alive: &'b mut [u64], before: &'b mut [u64]) -> Self {
        alive.copy_from_slice(members);
        let hi = members.len();
        Survivors { alive, before, lo: 0, hi }
    }

    /// Keep the workers that hold `holders`' block in a tier of `mask`,
    /// calling `dropped(slot)` for each one that stops matching here;
    /// false once nobody is left.
    #[inline]
    pub(super) fn narrow(&mut self, pool: &Pool, holders: u32, mask: u8, mut dropped: impl FnMut(usize)) -> bool {
        let (lo, hi) = (self.lo, self.hi);
        if lo == hi {
            return false;
        }
        self.before[lo..hi].copy_from_slice(&self.alive[lo..hi]);
        pool.intersect_words(holders, mask, &mut self.alive[lo..hi], lo);
        for w in lo..hi {
            slots_of(w, self.before[w] & !self.alive[w]).for_each(&mut dropped);
        }
        while self.lo < self.hi && self.alive[self.lo] == 0 {
            self.lo += 1;
        }
        while self.hi > self.lo && self.alive[self.hi - 1] == 0 {
            self.hi -= 1;
        }
        self.lo < self.hi
    }

    /// Whether any worker still matches.
    pub(super) fn any(&self) -> bool {
        self.lo < self.hi
    }

    /// `f(slot)` for each worker still matching.
    #[inline]
    pub(super) fn each(&self, mut f: impl FnMut(usize)) {
        for w in self.lo..self.hi {
            slots_of(w, self.alive[w]).for_each(&mut f);
        }
    }

    /// The window: the index of its first word, and its words.
    pub(super) fn window(&self) -> (usize, &[u64]) {
        (self.lo, &self.alive[self.lo..self.hi])
    }
}
