//! The exact prefix index: which worker holds which prefix block, in which
//! tier.
//!
//! # Data layout (why it looks like this)
//!
//! A fleet's caches overlap heavily (system prompts, shared documents), so
//! the unit of storage is the *distinct prefix block*, not the holding:
//!
//! - **Block slab** (20 bytes per block, in fixed chunks of 64k blocks so
//!   growth never copies it and at most one chunk is slack): the block's
//!   64-bit prefix key, a count of the engine hashes that refer to it, a
//!   4-byte handle to its holder set ([`crate::holders`]: one holder inline,
//!   a sorted vector for a few, three bitmaps over worker slots for many),
//!   and a *child hint*, the block most recently stored under it. A block
//!   held by 256 workers costs 20 + 96 bytes, under half a byte per holding.
//!   LRU links (8 bytes per block) exist only when a capacity is set.
//! - **Key table** (`HashTable<u32>` of slab slots, hashed by the key itself,
//!   which is already an xxh3 output): 4 bytes per block plus control bytes.
//! - **Per-worker engine-hash map** (`HashTable<[u32; 3]>`: 64-bit engine
//!   hash + block slot, 12 bytes). Engine hashes are private to each engine
//!   (seeds and algorithms differ), so this map is the one per-holding cost
//!   that cannot be shared; it is what parent resolution and removals need.
//!   It is the bulk of the memory: about 13 bytes / load factor per holding.
//!
//! Queries never touch the per-worker maps: a query hashes its tokens into
//! prefix keys lazily, follows the previous block's child hint (checked by
//! key; the key table only when the hint misses), and intersects a bitset of
//! still-matching workers with the block's holder set, stopping as soon as
//! nobody is left.
//!
//! Engine hashes that still refer to a block whose holdings were evicted for
//! capacity keep the block *dormant* (in the slab, not in the LRU, not
//! counted in `blocks`): the mapping engine hash → prefix is still true, and
//! the engine's own `BlockRemoved` later releases it.
//!
//! # Semantics (SPEC section 2; the Python model in tests/ mirrors this)
//!
//! Per worker W: a map `E_W` engine-key → prefix key and holdings
//! `H_W` prefix key → tiers.
//! - `BlockStored`: the first block's parent is `E_W[parent]` (unknown →
//!   every block of the event is dropped and counted as orphaned) or the
//!   namespace root when there is no parent. For each block: compute its key;
//!   if `E_W[h]` pointed elsewhere, W's holding of that block is dropped;
//!   `E_W[h] = key`; `H_W[key] |= tier`. A store without tokens (offload of
//!   blocks already known) only adds the tier to blocks `E_W` knows.
//! - `BlockRemoved`: for each known h, clear the tier; when W holds the block
//!   in no tier any more, forget `E_W[h]`. Unknown hashes are counted.
//! - `AllBlocksCleared` / removal of the worker: `E_W` and `H_W` emptied.
//! - Groups whose `kv_cache_spec_kind` is not full attention are ignored;
//!   engine keys carry the group so other groups never alias.

use std::collections::HashMap;
use std::io::{Read, Write};

use hashbrown::HashTable;

use crate::error::IndexError;
use crate::holders::{self, Pool};
use crate::prefix::{block_key, engine_key, namespace, Lora, Tier};
use crate::wire::{self, Batch, Event, Mode, Stored, Value};

const NIL: u32 = u32::MAX;
const SNAPSHOT_MAGIC: &[u8; 8] = b"KVSYNC\x00\x03";

pub use crate::stream::payload_digest;

#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Block {
    /// The prefix key as two halves: keeps the block at 4-byte alignment
    /// (20 bytes, not 24).
    key: [u32; 2],
    /// The block most recently stored as this block's child: queries try it
    /// before the key table (checked by key, so a stale hint is harmless).
    child: u32,
    /// Engine-hash entries (over all workers) that point here; `NIL` marks
    /// a free slot.
    refs: u32,
    /// Holder-set handle; the free-list link in free slots.
    holders: u32,
}

/// Per-worker counters, reported by [`Index::worker_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    pub batches: u64,
    pub stored: u64,
    pub removed: u64,
    pub cleared: u64,
    pub skipped: u64,
    pub orphaned: u64,
    pub unknown_removals: u64,
    pub unknown_events: u64,
    pub purges: u64,
}

type EMap = HashTable<[u32; 3]>;

const _: () = assert!(std::mem::size_of::<Block>() == 20);

/// Blocks in fixed-size chunks: growth never copies more than one chunk
/// (no long pause under the write lock), and at most one chunk is slack, so
/// the reported memory stays within 1.3 MB of what is resident. The first
/// chunk grows like a `Vec`, so small indexes stay small.
#[derive(Default)]
struct Slab {
    chunks: Vec<Vec<Block>>,
    len: usize,
}

const CHUNK_BITS: u32 = 16;
const CHUNK: usize = 1 << CHUNK_BITS;

impl Slab {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, b: Block) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(b),
            _ => {
                let mut c = Vec::with_capacity(if self.chunks.is_empty() { 64 } else { CHUNK });
                c.push(b);
                self.chunks.push(c);
            }
        }
        self.len += 1;
    }

    fn get(&self, i: usize) -> Option<&Block> {
        self.chunks.get(i >> CHUNK_BITS).and_then(|c| c.get(i & (CHUNK - 1)))
    }

    fn iter(&self) -> impl Iterator<Item = &Block> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    fn memory_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity() * std::mem::size_of::<Block>()).sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<Block>>()
    }
}

impl std::ops::Index<usize> for Slab {
    type Output = Block;
    #[inline]
    fn index(&self, i: usize) -> &Block {
        &self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

impl std::ops::IndexMut<usize> for Slab {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut Block {
        &mut self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

fn split(key: u64) -> [u32; 2] {
    [key as u32, (key >> 32) as u32]
}

impl Block {
    #[inline]
    fn key(&self) -> u64 {
        u64::from(self.key[0]) | (u64::from(self.key[1]) << 32)
    }
}

struct Worker {
    id: String,
    model: u32,
    /// engine key (two u32 halves) → block slot
    emap: EMap,
    held: u64,
    last_seq: Option<u64>,
    /// Digest of the payload applied as `last_seq` (see [`payload_digest`]).
    last_digest: u64,
    counters: WorkerCounters,
}

struct Model {
    name: String,
    block_size: Option<u32>,
    /// Bitset over worker slots of this model's workers.
    members: Vec<u64>,
    workers: u32,
}

/// What one `apply` did, in block events (one per block hash).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Blocks of `BlockStored` events that were applied.
    pub stored: u64,
    /// Block hashes of `BlockRemoved` events that removed a known holding.
    pub removed: u64,
    /// `AllBlocksCleared` events.
    pub cleared: u64,
    /// Block events not applied: `orphaned` + `ignored` + `unknown_removals`.
    pub skipped: u64,
    /// Stored blocks whose parent this worker's stream never placed.
    pub orphaned: u64,
    /// Blocks of non-full-attention groups, or stores that did not fit the
    /// model's block size.
    pub ignored: u64,
    /// Removals of hashes this worker never stored (or already removed).
    pub unknown_removals: u64,
    /// Events of a type this version does not know.
    pub unknown_events: u64,
}

impl ApplyStats {
    /// Accumulate another batch's stats into this one.
    pub fn add(&mut self, o: &ApplyStats) {
        self.stored += o.stored;
        self.removed += o.removed;
        self.cleared += o.cleared;
        self.skipped += o.skipped;
        self.orphaned += o.orphaned;
        self.ignored += o.ignored;
        self.unknown_removals += o.unknown_removals;
        self.unknown_events += o.unknown_events;
    }
}

/// A snapshot of the index's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub workers: usize,
    pub models: usize,
    /// Distinct prefix blocks held by at least one worker.
    pub blocks: usize,
    /// (block, worker) pairs, whatever the tiers.
    pub holdings: usize,
    /// Blocks kept only because engine hashes still name them.
    pub dormant: usize,
    /// Engine-hash entries over all workers.
    pub engine_hashes: usize,
    pub evictions: u64,
    pub capacity_blocks: Option<usize>,
    /// Heap and inline bytes of every structure, from their capacities.
    pub memory_bytes: usize,
}

/// Per-worker summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerStats {
    pub id: String,
    pub model: String,
    pub blocks: u64,
    pub engine_hashes: usize,
    pub last_seq: Option<u64>,
    pub counters: WorkerCounters,
}

/// A prefix query.
#[derive(Clone, Debug)]
pub struct Query<'q, 'v> {
    pub model: &'q str,
    pub tokens: &'q [u32],
    pub lora: Lora<'q>,
    /// Per-block extra keys (multimodal ids, cache salt); block `i` uses
    /// entry `i` when present.
    pub extra_keys: Option<&'q [Option<Vec<Value<'v>>>]>,
    /// Tiers that count ([`Tier::bit`] mask; 7 = any).
    pub tiers: u8,
}

impl<'q> Query<'q, 'static> {
    pub fn new(model: &'q str, tokens: &'q [u32]) -> Self {
        Query { model, tokens, lora: Lora::Base, extra_keys: None, tiers: 7 }
    }
}

pub struct Index {
    capacity: Option<usize>,
    blocks: Slab,
    free_block: u32,
    /// LRU links `[towards more recent, towards less recent]` per slot;
    /// kept only under a capacity bound.
    links: Vec<[u32; 2]>,
    by_key: HashTable<u32>,
    lru_head: u32,
    lru_tail: u32,
    held_blocks: usize,
    dormant: usize,
    holdings: usize,
    engine_hashes: usize,
    evictions: u64,
    epoch: u64,
    /// Reused by [`Index::apply`]'s decoding.
    decode_buffers: wire::Buffers,
    pool: Pool,
    workers: Vec<Option<Worker>>,
    free_workers: Vec<u32>,
    by_id: HashMap<String, u32>,
    models: Vec<Model>,
    model_by_name: HashMap<String, u32>,
}

impl Default for Index {
    fn default() -> Self {
        Index::new(None).expect("no capacity is valid")
    }
}

#[inline]
fn mix(x: u64) -> u64 {
    // Engine hashes may be small or sequential ints (tests, simple engines):
    // spread them so hashbrown's control bytes stay informative.
    (x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 32)
}

#[inline]
fn ekey(e: &[u32; 3]) -> u64 {
    u64::from(e[0]) | (u64::from(e[1]) << 32)
}

fn bit_set(bits: &mut Vec<u64>, slot: u32, on: bool) {
    let w = (slot / 64) as usize;
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    if on {
        bits[w] |= 1 << (slot % 64);
    } else {
        bits[w] &= !(1 << (slot % 64));
    }
}

fn check_model(model: &str) -> Result<(), IndexError> {
    if model.is_empty() {
        return Err(IndexError::Invalid("model name must not be empty".into()));
    }
    Ok(())
}

impl Index {
    /// An empty index; `capacity_blocks` bounds the distinct blocks held.
    pub fn new(capacity_blocks: Option<usize>) -> Result<Self, IndexError> {
        if capacity_blocks == Some(0) {
            return Err(IndexError::Invalid("capacity_blocks must be at least 1".into()));
        }
        if capacity_blocks.is_some_and(|c| c >= NIL as usize) {
            return Err(IndexError::Invalid(format!(
                "capacity_blocks must be below {NIL}, got {}",
                capacity_blocks.unwrap_or_default()
            )));
        }
        Ok(Index {
            capacity: capacity_blocks,
            blocks: Slab::default(),
            free_block: NIL,
            links: Vec::new(),
            by_key: HashTable::new(),
            lru_head: NIL,
            lru_tail: NIL,
            held_blocks: 0,
            dormant: 0,
            holdings: 0,
            engine_hashes: 0,
            evictions: 0,
            epoch: 0,
            decode_buffers: wire::Buffers::default(),
            pool: Pool::default(),
            workers: Vec::new(),
            free_workers: Vec::new(),
            by_id: HashMap::new(),
            models: Vec::new(),
            model_by_name: HashMap::new(),
        })
    }

    pub fn capacity_blocks(&self) -> Option<usize> {
        self.capacity
    }

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
            last_seq: None,
            last_digest: 0,
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
    pub fn remove_worker(&mut self, id: &str) -> bool {
        let Some(slot) = self.by_id.remove(id) else { return false };
        self.purge_slot(slot);
        let w = self.workers[slot as usize].take().expect("registered worker");
        let model = &mut self.models[w.model as usize];
        bit_set(&mut model.members, slot, false);
        model.workers -= 1;
        self.free_workers.push(slot);
        self.epoch += 1;
        true
    }

    /// Drop everything a worker holds (it restarted, or its stream has an
    /// unrecoverable gap); it stays registered. Its last seq is forgotten.
    pub fn purge_worker(&mut self, id: &str) -> Result<(), IndexError> {
        let slot = self.slot_of(id)?;
        self.purge_slot(slot);
        let w = self.worker_mut(slot);
        w.last_seq = None;
        w.last_digest = 0;
        w.counters.purges += 1;
        Ok(())
    }

    pub fn has_worker(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
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
        Ok(self.worker(self.slot_of(id)?).last_seq)
    }

    /// The last applied seq and the digest of its payload (what a resumed
    /// stream checks against the engine's replay).
    pub fn position(&self, id: &str) -> Result<(Option<u64>, u64), IndexError> {
        let w = self.worker(self.slot_of(id)?);
        Ok((w.last_seq, w.last_digest))
    }

    /// Record the stream position (also for payloads that did not decode).
    pub fn set_position(&mut self, id: &str, seq: Option<u64>, digest: u64) -> Result<(), IndexError> {
        let slot = self.slot_of(id)?;
        let w = self.worker_mut(slot);
        w.last_seq = seq;
        w.last_digest = digest;
        Ok(())
    }

    pub fn worker_stats(&self, id: &str) -> Result<WorkerStats, IndexError> {
        let w = self.worker(self.slot_of(id)?);
        Ok(WorkerStats {
            id: w.id.clone(),
            model: self.models[w.model as usize].name.clone(),
            blocks: w.held,
            engine_hashes: w.emap.len(),
            last_seq: w.last_seq,
            counters: w.counters,
        })
    }

    fn slot_of(&self, id: &str) -> Result<u32, IndexError> {
        self.by_id.get(id).copied().ok_or_else(|| IndexError::UnknownWorker(id.to_owned()))
    }

    fn worker(&self, slot: u32) -> &Worker {
        self.workers[slot as usize].as_ref().expect("live worker slot")
    }

    fn worker_mut(&mut self, slot: u32) -> &mut Worker {
        self.workers[slot as usize].as_mut().expect("live worker slot")
    }

    fn model_id(&mut self, name: &str) -> u32 {
        if let Some(&m) = self.model_by_name.get(name) {
            return m;
        }
        let m = self.models.len() as u32;
        self.models.push(Model { name: name.to_owned(), block_size: None, members: Vec::new(), workers: 0 });
        self.model_by_name.insert(name.to_owned(), m);
        m
    }

    // ----------------------------------------------------------------- blocks

    fn find_block(&self, key: u64) -> Option<u32> {
        let blocks = &self.blocks;
        self.by_key.find(key, |&s| blocks[s as usize].key() == key).copied()
    }

    /// The slot of `key`'s block, creating it (unheld, unreferenced) if new.
    fn intern_block(&mut self, key: u64) -> u32 {
        let blocks = &self.blocks;
        let free = self.free_block;
        let next_slot = if free == NIL { blocks.len() as u32 } else { free };
        // One probe: find the key, or claim its bucket for the next slot.
        match self.by_key.entry(key, |&s| blocks[s as usize].key() == key, |&s| blocks[s as usize].key()) {
            hashbrown::hash_table::Entry::Occupied(o) => return *o.get(),
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(next_slot);
            }
        }
        let b = Block { key: split(key), child: NIL, refs: 0, holders: 0 };
        let slot = if self.free_block == NIL {
            self.blocks.push(b);
            if self.capacity.is_some() {
                self.links.push([NIL, NIL]);
            }
            (self.blocks.len() - 1) as u32
        } else {
            let s = self.free_block;
            self.free_block = self.blocks[s as usize].holders;
            self.blocks[s as usize] = b;
            s
        };
        debug_assert_eq!(slot, next_slot);
        // A fresh block counts as dormant until someone holds it.
        self.dormant += 1;
        slot
    }

    fn maybe_free_block(&mut self, slot: u32) {
        let b = self.blocks[slot as usize];
        if b.refs != 0 || b.holders != 0 {
            // in use (a free slot has refs == NIL)
            return;
        }
        let blocks = &self.blocks;
        if let Ok(e) = self.by_key.find_entry(b.key(), |&s| blocks[s as usize].key() == b.key()) {
            e.remove();
        }
        self.dormant -= 1;
        let blk = &mut self.blocks[slot as usize];
        blk.holders = self.free_block;
        blk.key = [0, 0];
        blk.child = NIL;
        blk.refs = NIL;
        self.free_block = slot;
    }

    fn lru_unlink(&mut self, slot: u32) {
        let [prev, next] = self.links[slot as usize];
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.links[prev as usize][1] = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.links[next as usize][0] = prev;
        }
        self.links[slot as usize] = [NIL, NIL];
    }

    fn lru_push_front(&mut self, slot: u32) {
        let head = self.lru_head;
        self.links[slot as usize] = [NIL, head];
        if head == NIL {
            self.lru_tail = slot;
        } else {
            self.links[head as usize][0] = slot;
        }
        self.lru_head = slot;
    }

    /// Set worker `wslot`'s tiers on block `slot`, keeping LRU, counts and
    /// the dormant/held state right. `touch` moves the block to the front.
    fn set_tiers(&mut self, slot: u32, wslot: u32, tiers: u8, touch: bool) -> u8 {
        let was_held = self.blocks[slot as usize].holders != 0;
        let mut h = self.blocks[slot as usize].holders;
        let old = self.pool.set(&mut h, wslot, tiers);
        self.blocks[slot as usize].holders = h;
        let now_held = h != 0;
        match (old != 0, tiers != 0) {
            (false, true) => {
                self.holdings += 1;
                self.worker_mut(wslot).held += 1;
            }
            (true, false) => {
                self.holdings -= 1;
                self.worker_mut(wslot).held -= 1;
            }
            _ => {}
        }
        // The LRU list exists only under a capacity bound: without one,
        // nothing is ever evicted and touching neighbours is wasted work.
        let lru = self.capacity.is_some();
        match (was_held, now_held) {
            (false, true) => {
                self.dormant -= 1;
                self.held_blocks += 1;
                if lru {
                    self.lru_push_front(slot);
                }
            }
            (true, false) => {
                if lru {
                    self.lru_unlink(slot);
                }
                self.held_blocks -= 1;
                self.dormant += 1;
            }
            (true, true) if lru && touch && self.lru_head != slot => {
                self.lru_unlink(slot);
                self.lru_push_front(slot);
            }
            _ => {}
        }
        old
    }

    fn evict_to_capacity(&mut self) {
        let Some(cap) = self.capacity else { return };
        while self.held_blocks > cap {
            let victim = self.lru_tail;
            debug_assert_ne!(victim, NIL);
            let mut slots = Vec::new();
            self.pool.for_each(self.blocks[victim as usize].holders, |s, _| slots.push(s));
            for s in slots {
                self.set_tiers(victim, s, 0, false);
            }
            self.evictions += 1;
            // Engine hashes still name it, so it stays dormant (refs > 0).
            self.maybe_free_block(victim);
        }
    }

    // ---------------------------------------------------------- engine hashes

    // The engine-hash map functions take the worker's map as an argument:
    // `apply_batch` moves it out of the worker for the batch, so one probe
    // can be used across calls that also touch the rest of the index.

    fn emap_get(emap: &EMap, ek: u64) -> Option<u32> {
        emap.find(mix(ek), |e| ekey(e) == ek).map(|e| e[2])
    }

    /// Point `ek` at block `slot`; returns the block it pointed at before.
    fn emap_set(&mut self, emap: &mut EMap, ek: u64, slot: u32) -> Option<u32> {
        let old = match emap.entry(mix(ek), |e| ekey(e) == ek, |e| mix(ekey(e))) {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                let old = o.get()[2];
                if old == slot {
                    return Some(old);
                }
                o.get_mut()[2] = slot;
                Some(old)
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert([ek as u32, (ek >> 32) as u32, slot]);
                self.engine_hashes += 1;
                None
            }
        };
        self.blocks[slot as usize].refs += 1;
        if let Some(o) = old {
            self.blocks[o as usize].refs -= 1;
        }
        old
    }

    fn purge_slot(&mut self, wslot: u32) {
        let w = self.worker_mut(wslot);
        let emap = std::mem::take(&mut w.emap);
        self.engine_hashes -= emap.len();
        for e in &emap {
            let slot = e[2];
            if self.pool.get(self.blocks[slot as usize].holders, wslot) != 0 {
                self.set_tiers(slot, wslot, 0, false);
            }
        }
        for e in &emap {
            self.blocks[e[2] as usize].refs -= 1;
        }
        for e in &emap {
            self.maybe_free_block(e[2]);
        }
        debug_assert_eq!(self.worker(wslot).held, 0);
    }

    // ------------------------------------------------------------------ apply

    /// Decode one payload and apply it to worker `id`. `seq`, when given,
    /// is recorded as the worker's last applied sequence number.
    pub fn apply(&mut self, id: &str, payload: &[u8], seq: Option<u64>) -> Result<ApplyStats, IndexError> {
        let wslot = self.slot_of(id)?;
        let mut bufs = std::mem::take(&mut self.decode_buffers);
        let result = wire::decode_with(payload, Mode::Index, &mut bufs).map(|batch| {
            let st = self.apply_batch(wslot, &batch, seq);
            bufs.recycle(batch);
            st
        });
        self.decode_buffers = bufs;
        Ok(result?)
    }

    /// Apply an already decoded batch (see [`Index::apply`]).
    pub fn apply_decoded(&mut self, id: &str, batch: &Batch<'_>, seq: Option<u64>) -> Result<ApplyStats, IndexError> {
        let wslot = self.slot_of(id)?;
        Ok(self.apply_batch(wslot, batch, seq))
    }

    fn apply_batch(&mut self, wslot: u32, batch: &Batch<'_>, seq: Option<u64>) -> ApplyStats {
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
        if seq.is_some() {
            w.last_seq = seq;
        }
        st
    }

    fn apply_stored(&mut self, wslot: u32, batch: &Batch<'_>, s: &Stored<'_>, st: &mut ApplyStats) {
        let mut emap = std::mem::take(&mut self.worker_mut(wslot).emap);
        self.apply_stored_with(wslot, &mut emap, batch, s, st);
        self.worker_mut(wslot).emap = emap;
    }

    fn apply_stored_with(
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
        // agree with what the model's other events said.
        let bs = match s.block_size {
            Some(b) if b > 0 => b,
            _ => (tokens.len() / n) as u64,
        };
        let model = self.worker(wslot).model as usize;
        if bs == 0 || bs > u64::from(u32::MAX) || bs as usize * n != tokens.len() {
            st.ignored += n as u64;
            return;
        }
        match self.models[model].block_size {
            Some(m) if u64::from(m) != bs => {
                st.ignored += n as u64;
                return;
            }
            Some(_) => {}
            None => self.models[model].block_size = Some(bs as u32),
        }
        let bs = bs as usize;
        let (mut prev, mut prev_slot) = match s.parent {
            Some(p) => match Self::emap_get(emap, engine_key(p, s.group_idx.unwrap_or(0))) {
                Some(slot) => (self.blocks[slot as usize].key(), slot),
                None => {
                    st.orphaned += n as u64;
                    return;
                }
            },
            None => (namespace(&self.models[model].name, Lora::of_event(s.lora_name, s.lora_id)), NIL),
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
            let key = block_key(prev, toks, &extras);
            prev = key;
            let slot = self.intern_block(key);
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

    // ------------------------------------------------------------------ stats

    pub fn stats(&self) -> Stats {
        Stats {
            workers: self.by_id.len(),
            models: self.models.len(),
            blocks: self.held_blocks,
            holdings: self.holdings,
            dormant: self.dormant,
            engine_hashes: self.engine_hashes,
            evictions: self.evictions,
            capacity_blocks: self.capacity,
            memory_bytes: self.memory_bytes(),
        }
    }

    fn memory_bytes(&self) -> usize {
        let mut n = std::mem::size_of::<Self>();
        n += self.blocks.memory_bytes();
        n += self.links.capacity() * std::mem::size_of::<[u32; 2]>();
        n += self.by_key.allocation_size();
        n += self.pool.memory_bytes();
        n += self.workers.capacity() * std::mem::size_of::<Option<Worker>>();
        n += self.free_workers.capacity() * 4;
        for w in self.workers.iter().flatten() {
            n += w.emap.allocation_size() + w.id.capacity();
        }
        // std HashMap: (key, value) slots plus one control byte each.
        n += self.by_id.capacity() * (std::mem::size_of::<(String, u32)>() + 1);
        n += self.by_id.keys().map(String::capacity).sum::<usize>();
        n += self.model_by_name.capacity() * (std::mem::size_of::<(String, u32)>() + 1);
        n += self.models.capacity() * std::mem::size_of::<Model>();
        for m in &self.models {
            n += 2 * m.name.capacity() + m.members.capacity() * 8;
        }
        n
    }

    /// Release spare capacity (after a large purge, or after loading).
    pub fn shrink_to_fit(&mut self) {
        let blocks = &self.blocks;
        self.by_key.shrink_to(0, |&s| blocks[s as usize].key());
        for w in self.workers.iter_mut().flatten() {
            w.emap.shrink_to(0, |e| mix(ekey(e)));
        }
        // The slab keeps its free list; trailing free slots cannot be cut
        // without renumbering, which the free list makes unnecessary.
    }

    /// Check every internal invariant (tests; O(size)).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.len()];
        let mut engine_hashes = 0;
        for (ws, w) in self.workers.iter().enumerate() {
            let Some(w) = w else { continue };
            engine_hashes += w.emap.len();
            for e in &w.emap {
                refs[e[2] as usize] += 1;
            }
            let mut held = 0u64;
            for (slot, b) in self.blocks.iter().enumerate() {
                if self.find_block(b.key()) == Some(slot as u32) && self.pool.get(b.holders, ws as u32) != 0 {
                    held += 1;
                }
            }
            if held != w.held {
                return Err(format!("worker {} holds {held} blocks, counter says {}", w.id, w.held));
            }
        }
        if engine_hashes != self.engine_hashes {
            return Err(format!("engine hash count {} != {engine_hashes}", self.engine_hashes));
        }
        let (mut held_blocks, mut dormant, mut holdings) = (0, 0, 0);
        for slot in &self.by_key {
            let b = &self.blocks[*slot as usize];
            if b.refs != refs[*slot as usize] {
                return Err(format!("block {slot} refs {} != {}", b.refs, refs[*slot as usize]));
            }
            if b.holders == 0 {
                if b.refs == 0 {
                    return Err(format!("block {slot} is neither held nor referenced"));
                }
                dormant += 1;
            } else {
                held_blocks += 1;
                holdings += self.pool.len(b.holders) as usize;
            }
        }
        let mut lru = 0;
        let mut cur = self.lru_head;
        let mut prev = NIL;
        while cur != NIL {
            let [p, n] = self.links[cur as usize];
            if p != prev || self.blocks[cur as usize].holders == 0 {
                return Err(format!("LRU list broken at {cur}"));
            }
            lru += 1;
            prev = cur;
            cur = n;
        }
        let want_lru = if self.capacity.is_some() { held_blocks } else { 0 };
        if prev != self.lru_tail || lru != want_lru {
            return Err(format!("LRU has {lru} blocks, {held_blocks} held"));
        }
        if (held_blocks, dormant, holdings) != (self.held_blocks, self.dormant, self.holdings) {
            return Err(format!(
                "counts (held {}, dormant {}, holdings {}) != actual ({held_blocks}, {dormant}, {holdings})",
                self.held_blocks, self.dormant, self.holdings
            ));
        }
        if let Some(cap) = self.capacity {
            if held_blocks > cap {
                return Err(format!("{held_blocks} blocks held over capacity {cap}"));
            }
        }
        Ok(())
    }

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
            put_u64(&mut body, w.last_seq.map_or(u64::MAX, |s| s));
            body.push(u8::from(w.last_seq.is_some()));
            put_u64(&mut body, w.last_digest);
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
                w.last_seq = has_seq.then_some(seq);
                w.last_digest = digest;
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
    use super::*;
    use rmp::encode as enc;

    /// A tiny map-form payload builder (vLLM >= 0.24 layout).
    #[derive(Default)]
    struct B {
        events: Vec<Vec<u8>>,
    }

    fn int_hash(b: &mut Vec<u8>, h: u64) {
        enc::write_uint(b, h).unwrap();
    }

    impl B {
        fn store(mut self, hashes: &[u64], parent: Option<u64>, tokens: &[u32], medium: Option<&str>) -> Self {
            let mut e = Vec::new();
            enc::write_map_len(&mut e, 5).unwrap();
            enc::write_str(&mut e, "type").unwrap();
            enc::write_str(&mut e, "BlockStored").unwrap();
            enc::write_str(&mut e, "block_hashes").unwrap();
            enc::write_array_len(&mut e, hashes.len() as u32).unwrap();
            for h in hashes {
                int_hash(&mut e, *h);
            }
            enc::write_str(&mut e, "parent_block_hash").unwrap();
            match parent {
                Some(p) => int_hash(&mut e, p),
                None => enc::write_nil(&mut e).unwrap(),
            }
            enc::write_str(&mut e, "token_ids").unwrap();
            enc::write_array_len(&mut e, tokens.len() as u32).unwrap();
            for t in tokens {
                enc::write_uint(&mut e, u64::from(*t)).unwrap();
            }
            enc::write_str(&mut e, "medium").unwrap();
            match medium {
                Some(m) => enc::write_str(&mut e, m).unwrap(),
                None => enc::write_nil(&mut e).unwrap(),
            }
            self.events.push(e);
            self
        }
        fn remove(mut self, hashes: &[u64], medium: Option<&str>) -> Self {
            let mut e = Vec::new();
            enc::write_map_len(&mut e, 3).unwrap();
            enc::write_str(&mut e, "type").unwrap();
            enc::write_str(&mut e, "BlockRemoved").unwrap();
            enc::write_str(&mut e, "block_hashes").unwrap();
            enc::write_array_len(&mut e, hashes.len() as u32).unwrap();
            for h in hashes {
                int_hash(&mut e, *h);
            }
            enc::write_str(&mut e, "medium").unwrap();
            match medium {
                Some(m) => enc::write_str(&mut e, m).unwrap(),
                None => enc::write_nil(&mut e).unwrap(),
            }
            self.events.push(e);
            self
        }
        fn clear(mut self) -> Self {
            let mut e = Vec::new();
            enc::write_map_len(&mut e, 1).unwrap();
            enc::write_str(&mut e, "type").unwrap();
            enc::write_str(&mut e, "AllBlocksCleared").unwrap();
            self.events.push(e);
            self
        }
        fn build(self) -> Vec<u8> {
            let mut b = Vec::new();
            enc::write_array_len(&mut b, 3).unwrap();
            enc::write_f64(&mut b, 1.0).unwrap();
            enc::write_array_len(&mut b, self.events.len() as u32).unwrap();
            for e in self.events {
                b.extend_from_slice(&e);
            }
            enc::write_nil(&mut b).unwrap();
            b
        }
    }

    fn depth(ix: &Index, tokens: &[u32], worker: &str) -> u32 {
        ix.match_prefix(&Query::new("m", tokens)).into_iter().find(|(w, _)| *w == worker).unwrap().1
    }

    fn two_workers() -> Index {
        let mut ix = Index::default();
        ix.add_worker("a", "m").unwrap();
        ix.add_worker("b", "m").unwrap();
        ix
    }

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
    fn capacity_evicts_least_recently_used_and_never_lies() {
        let mut ix = Index::new(Some(2)).unwrap();
        ix.add_worker("a", "m").unwrap();
        ix.apply("a", &B::default().store(&[1], None, &[1, 1], None).build(), None).unwrap();
        ix.apply("a", &B::default().store(&[2], None, &[2, 2], None).build(), None).unwrap();
        // touch block 1, so block 2 is the least recent
        ix.apply("a", &B::default().store(&[1], None, &[1, 1], None).build(), None).unwrap();
        ix.apply("a", &B::default().store(&[3], None, &[3, 3], None).build(), None).unwrap();
        assert_eq!(depth(&ix, &[1, 1], "a"), 1);
        assert_eq!(depth(&ix, &[2, 2], "a"), 0);
        assert_eq!(depth(&ix, &[3, 3], "a"), 1);
        let s = ix.stats();
        assert_eq!((s.blocks, s.evictions, s.dormant), (2, 1, 1));
        ix.check_invariants().unwrap();
        // The engine's own removal releases the dormant block.
        ix.apply("a", &B::default().remove(&[2], None).build(), None).unwrap();
        assert_eq!(ix.stats().dormant, 0);
        ix.check_invariants().unwrap();
    }

    #[test]
    fn worker_removal_purges_and_slot_reuse_is_clean() {
        let mut ix = two_workers();
        ix.apply("a", &B::default().store(&[1], None, &[1, 1], None).build(), None).unwrap();
        ix.apply("b", &B::default().store(&[5], None, &[1, 1], None).build(), None).unwrap();
        assert!(ix.remove_worker("a"));
        assert!(!ix.remove_worker("a"));
        ix.add_worker("c", "m").unwrap();
        assert_eq!(depth(&ix, &[1, 1], "c"), 0);
        assert_eq!(depth(&ix, &[1, 1], "b"), 1);
        assert_eq!(ix.stats().holdings, 1);
        assert!(matches!(ix.add_worker("c", "other"), Err(IndexError::ModelMismatch { .. })));
        assert!(matches!(ix.apply("zz", &[0x90], None), Err(IndexError::UnknownWorker(_))));
        ix.check_invariants().unwrap();
    }

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
