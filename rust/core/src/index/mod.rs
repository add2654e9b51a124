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
//!   64-bit prefix key (`prefix`: the standard Mooncake `seq` hash XOR a
//!   namespace constant), a count of the engine hashes that refer to it, a
//!   4-byte handle to its holder set, and a *child hint*, the block most
//!   recently stored under it. LRU links (8 bytes per block) exist only when
//!   a capacity is set.
//! - **Holder sets** ([`crate::holders`]): one holder inline in the handle,
//!   a sorted vector for a few, three bitmaps over worker slots for many;
//!   *shared* between blocks with the same holders (hash-consed by a content
//!   hash kept up to date in O(1), reference-counted). The blocks of a prefix
//!   cached by the same workers point at one set, so a block held by 256
//!   workers costs its 20 bytes plus a share of one 96-byte bitmap.
//! - **Key table** (`HashTable<u32>` of slab slots, hashed by the key itself,
//!   which is already an xxh3 output): 4 bytes per block plus control bytes.
//! - **Per-worker engine-hash map** (`HashTable<[u32; 3]>`: 64-bit engine
//!   hash + block slot, 12 bytes). Engine hashes are private to each engine
//!   (seeds and algorithms differ), so this map is the one per-holding cost
//!   that cannot be shared; it is what parent resolution and removals need.
//!   It is the bulk of the memory: about 13 bytes / load factor per holding
//!   (hashbrown's power-of-two tables: 21.8 bytes at 39,063 entries).
//!
//! Queries never touch the per-worker maps: a query hashes its tokens into
//! prefix keys (the independent local hashes 16 blocks ahead of the serial
//! 16-byte chain step), follows the previous block's child hint (checked by
//! key; the key table only when the hint misses), and intersects a bitset of
//! still-matching workers with the block's holder set, skipping blocks
//! whose holder set is the one just intersected, working only on the window
//! of bitset words that still has survivors, and stopping as soon as nobody
//! is left. Ingest follows the parent's child hint too before probing the
//! key table (other workers usually stored the prefix first).
//!
//! Measured effect of each idea (criterion `match` bench, 512-block prompt,
//! 256 workers, minimum of 100 samples on the loaded 2-core machine, before
//! -> after in one sitting; `bench/README.md` has the side-by-side table):
//! shared holder sets + skipping a repeated set: full match 14.67 -> 8.97
//! us, prompt diverging at block 256 7.62 -> 4.82 us, memory at 10M shared
//! holdings 22.79 -> 22.16 bytes per holding (the unshared case, one holder
//! per block, is unchanged at 50.27); local hashes ahead of the chain and
//! the plain local hash inlined: hashing 512 blocks 6.85 -> 6.09 us (the
//! floor measured alone: 2.19 us of local hashes + 3.25 us of the serial
//! chain, 13 cycles per step at 2.1 GHz); the child hint at ingest: 103.9M
//! fewer instructions in `intern_block` for 1.28M shared holdings, 56M
//! (1.4%) fewer for the whole run through Python (callgrind); the memo of
//! the last holder-set move (`holders`): `set_tiers` 277.6M -> 143.8M and
//! the content table's comparisons gone, the whole run -16%; with the
//! tighter token-id loop of the decoder, 3,877.6M -> 3,032.4M in all. The standard
//! keys cost two hashes per block where kvsync's earlier chained key took
//! one (hashing 512 blocks: 4.73 us before), the price of keys that
//! gateways compute themselves.

//! Engine hashes that still refer to a block whose holdings were evicted for
//! capacity keep the block *dormant* (in the slab, not in the LRU, not
//! counted in `blocks`): the mapping engine hash → prefix is still true, and
//! the engine's own `BlockRemoved` later releases it.
//!
//! # Semantics (SPEC section 2, with the choices where SPEC is silent in
//! docs/choices.md; tests/model.py models them independently)
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
//!
//! # Modules
//!
//! - `slab`: the block slab and the key table (interning, freeing blocks);
//! - `holdings`: worker tiers on blocks and the per-worker engine-hash maps;
//! - `lru`: the LRU list and eviction under a capacity bound;
//! - `workers`: the worker and model registry;
//! - `streams`: workers followed by an event stream (each worker owns its
//!   [`crate::stream::Stream`]: state, position, replay, buffer; one lock
//!   guards both the stream decisions and the holdings they change);
//! - `apply`: applying decoded event batches;
//! - `walk`: how a query steps through the index (its prefix keys, the
//!   blocks they name, the workers still matching and their window);
//! - `query`: the answers built on it (depths, per-tier depths, scores);
//! - `stats`, `check`: sizes and invariant checks;
//! - `snapshot`: the binary snapshot format; `files`: atomic snapshot files.

mod apply;
mod check;
mod files;
mod holdings;
mod lru;
mod query;
mod slab;
mod snapshot;
mod stats;
mod streams;
#[cfg(test)]
mod testutil;
mod walk;
mod workers;

use std::collections::HashMap;

use hashbrown::HashTable;

use crate::error::IndexError;
use crate::holders::Pool;
use crate::prefix::{Lora, DEFAULT_SEED};
use crate::wire::{self, Value};

use self::slab::Slab;
use self::workers::{Model, Worker};

const NIL: u32 = u32::MAX;

pub use crate::stream::payload_digest;

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
    /// Stored blocks ignored because the event's block size was 0 or
    /// disagreed with the model's while the model had blocks indexed (also
    /// counted in `skipped`).
    pub block_size_mismatch: u64,
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
    /// Stored blocks (part of `ignored`) whose event gave block size 0 or
    /// one that disagrees with the model's while the model's workers hold
    /// or name blocks (a model with nothing indexed learns the new size).
    pub block_size_mismatch: u64,
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
        self.block_size_mismatch += o.block_size_mismatch;
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
    /// Tiers that count ([`crate::prefix::Tier::bit`] mask; 7 = any).
    pub tiers: u8,
    /// The prompt as standard `seq` hashes instead of tokens (then `tokens`
    /// and `extra_keys` are not used, nor is the model's block size).
    pub hashes: Option<&'q [u64]>,
}

impl<'q> Query<'q, 'static> {
    pub fn new(model: &'q str, tokens: &'q [u32]) -> Self {
        Query { model, tokens, lora: Lora::Base, extra_keys: None, tiers: 7, hashes: None }
    }

    /// A query for a prompt given as standard `seq` hashes.
    pub fn hashes(model: &'q str, hashes: &'q [u64]) -> Self {
        Query { hashes: Some(hashes), ..Query::new(model, &[]) }
    }
}

pub struct Index {
    capacity: Option<usize>,
    /// Seed of the standard rolling hash (`prefix`).
    seed: u64,
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
    /// Ids of forgotten models, reused before `models` grows.
    free_models: Vec<u32>,
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
        Index::with_seed(capacity_blocks, DEFAULT_SEED)
    }

    /// An empty index whose prefix keys use `hash_seed` (see `prefix`).
    pub fn with_seed(capacity_blocks: Option<usize>, hash_seed: u64) -> Result<Self, IndexError> {
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
            seed: hash_seed,
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
            free_models: Vec::new(),
            model_by_name: HashMap::new(),
        })
    }

    pub fn capacity_blocks(&self) -> Option<usize> {
        self.capacity
    }

    /// The seed of this index's prefix keys.
    pub fn hash_seed(&self) -> u64 {
        self.seed
    }
}
