//! The one workload every index is fed: a fleet of engines publishing
//! vLLM-style KV events (deterministic from a seed), and the queries asked
//! afterwards.
//!
//! Each worker's events are generated on demand (`Fleet::worker_payloads`),
//! so a 10M-holding run never keeps every token in memory at once, and the
//! generation is never inside a timed region.
//!
//! Shapes:
//! - `Shared`: every worker stores one 64-block system prompt; ~150/256 of
//!   the workers hold a 512-block "hot" prompt (system prompt + 448 blocks)
//!   in full and ~60/256 a prefix of it; then every worker fills its share
//!   of the holdings with prompts chained from the system prompt: one in
//!   four a prefix of one of 64 shared documents, the rest private, each
//!   followed by up to 3 single-block decode stores; every fourth prompt
//!   evicts the tail (1-64 blocks, tail first, as vLLM's block pool frees
//!   them) of an earlier private prompt, every eighth one a single
//!   interior block of one (a hole: the worker's prefix ends there), and
//!   every eighth a hole of the oldest holed chain is refilled (the engine
//!   recomputes from the missing block on and stores all of it again, as
//!   vLLM does); the
//!   system prompt is re-sent at the end (stores are idempotent).
//! - `Unshared`: the same without the system prompt, the hot prompt or the
//!   documents: every block is held by one worker only.
//!
//! Engine block hashes are chained over the parent's hash and the block's
//! tokens with their own seed, as vLLM's sha256 chain is: identical
//! prefixes carry identical engine hashes on every worker (the peers that
//! use engine hashes as a placement shortcut get their best case).

use rmp::encode::{write_array_len, write_f64, write_map_len, write_nil, write_str, write_uint};
use xxhash_rust::xxh3::Xxh3;

/// Tokens per block.
pub const BS: usize = 16;
const SYS_BLOCKS: usize = 64;
/// Blocks of the hot prompt, system prompt included (also the length of a
/// query).
pub const QUERY_BLOCKS: usize = 512;
const TAIL_BLOCKS: usize = QUERY_BLOCKS - SYS_BLOCKS;
const DOCS: usize = 64;
const VOCAB: u64 = 128_256;
const ENGINE_SEED: u64 = 0x5eed_0fe9_91e5;

/// splitmix64: deterministic, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    pub fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() % VOCAB) as u32).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Shared,
    Unshared,
}

/// One engine event, before any index sees it.
pub enum Ev {
    /// Engine hashes (one per block), the parent's engine hash, the tokens
    /// of every block.
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        tokens: Vec<u32>,
    },
    Removed {
        hashes: Vec<u64>,
    },
}

/// One `KVEventBatch` of one worker.
pub struct Payload {
    pub worker: u32,
    pub events: Vec<Ev>,
}

impl Payload {
    /// Block events: stored blocks plus removed hashes.
    pub fn block_events(&self) -> u64 {
        self.events
            .iter()
            .map(|e| match e {
                Ev::Stored { hashes, .. } | Ev::Removed { hashes } => hashes.len() as u64,
            })
            .sum()
    }

    /// The payload as vLLM 0.33 map-form msgpack, built the way kvsync-core's
    /// criterion benches build theirs.
    pub fn msgpack(&self, ts: f64) -> Vec<u8> {
        let mut buf = Vec::new();
        write_array_len(&mut buf, 3).unwrap();
        write_f64(&mut buf, ts).unwrap();
        write_array_len(&mut buf, self.events.len() as u32).unwrap();
        for e in &self.events {
            match e {
                Ev::Stored { hashes, parent, tokens } => write_stored(&mut buf, hashes, *parent, tokens),
                Ev::Removed { hashes } => write_removed(&mut buf, hashes),
            }
        }
        write_uint(&mut buf, 0).unwrap();
        buf
    }
}

fn kv_str(buf: &mut Vec<u8>, key: &str, value: &str) {
    write_str(buf, key).unwrap();
    write_str(buf, value).unwrap();
}

fn write_hashes(buf: &mut Vec<u8>, hashes: &[u64]) {
    write_str(buf, "block_hashes").unwrap();
    write_array_len(buf, hashes.len() as u32).unwrap();
    for &h in hashes {
        write_uint(buf, h).unwrap();
    }
}

fn write_stored(buf: &mut Vec<u8>, hashes: &[u64], parent: Option<u64>, tokens: &[u32]) {
    write_map_len(buf, 10).unwrap();
    kv_str(buf, "type", "BlockStored");
    write_hashes(buf, hashes);
    write_str(buf, "parent_block_hash").unwrap();
    match parent {
        Some(p) => {
            write_uint(buf, p).unwrap();
        }
        None => write_nil(buf).unwrap(),
    }
    write_str(buf, "token_ids").unwrap();
    write_array_len(buf, tokens.len() as u32).unwrap();
    for &t in tokens {
        write_uint(buf, u64::from(t)).unwrap();
    }
    write_str(buf, "block_size").unwrap();
    write_uint(buf, BS as u64).unwrap();
    write_str(buf, "lora_id").unwrap();
    write_nil(buf).unwrap();
    kv_str(buf, "medium", "GPU");
    write_str(buf, "lora_name").unwrap();
    write_nil(buf).unwrap();
    write_str(buf, "group_idx").unwrap();
    write_uint(buf, 0).unwrap();
    kv_str(buf, "kv_cache_spec_kind", "full_attention");
}

fn write_removed(buf: &mut Vec<u8>, hashes: &[u64]) {
    write_map_len(buf, 4).unwrap();
    kv_str(buf, "type", "BlockRemoved");
    write_hashes(buf, hashes);
    kv_str(buf, "medium", "GPU");
    write_str(buf, "group_idx").unwrap();
    write_uint(buf, 0).unwrap();
}

/// The engine hashes of `tokens`' blocks, chained from `parent`.
fn chain(parent: Option<u64>, tokens: &[u32]) -> Vec<u64> {
    let mut prev = parent.unwrap_or(0);
    tokens
        .chunks_exact(BS)
        .map(|block| {
            let mut h = Xxh3::with_seed(ENGINE_SEED);
            h.update(&prev.to_le_bytes());
            for t in block {
                h.update(&t.to_le_bytes());
            }
            prev = h.digest();
            prev
        })
        .collect()
}

/// A worker's private chain: its blocks' engine hashes and tokens, and
/// which blocks it still holds.
struct Chain {
    root: Option<u64>,
    hashes: Vec<u64>,
    tokens: Vec<u32>,
    held: Vec<bool>,
}

/// The fleet's fixed parts and its generator.
pub struct Fleet {
    pub workers: usize,
    pub holdings: usize,
    pub shape: Shape,
    seed: u64,
    sys: Vec<u32>,
    sys_hashes: Vec<u64>,
    /// The hot prompt's blocks after the system prompt, and their hashes.
    hot_tail: Vec<u32>,
    hot_hashes: Vec<u64>,
    docs: Vec<(Vec<u32>, Vec<u64>)>,
    /// Workers `0..hot_full` hold the hot prompt, the next `hot_part` a
    /// prefix of it.
    pub hot_full: usize,
    hot_part: usize,
}

impl Fleet {
    pub fn new(workers: usize, holdings: usize, shape: Shape, seed: u64) -> Fleet {
        let mut rng = Rng(seed);
        let sys = rng.tokens(SYS_BLOCKS * BS);
        let sys_hashes = chain(None, &sys);
        let sys_last = sys_hashes.last().copied();
        let hot_tail = rng.tokens(TAIL_BLOCKS * BS);
        let hot_hashes = chain(sys_last, &hot_tail);
        let docs = (0..DOCS)
            .map(|_| {
                let t = rng.tokens(TAIL_BLOCKS * BS);
                let h = chain(sys_last, &t);
                (t, h)
            })
            .collect();
        Fleet {
            workers,
            holdings,
            shape,
            seed,
            sys,
            sys_hashes,
            hot_tail,
            hot_hashes,
            docs,
            hot_full: (workers * 150).div_ceil(256),
            hot_part: (workers * 60).div_ceil(256),
        }
    }

    /// Every payload worker `w` publishes, in order.
    pub fn worker_payloads(&self, w: usize) -> Vec<Payload> {
        let mut rng = Rng(self.seed ^ (w as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03));
        let worker = w as u32;
        let mut out = Vec::new();
        let budget = self.holdings / self.workers;
        let shared = self.shape == Shape::Shared;
        let mut held = 0;
        let mut root = None;
        let stored = |hashes: &[u64], parent: Option<u64>, tokens: &[u32]| Ev::Stored {
            hashes: hashes.to_vec(),
            parent,
            tokens: tokens.to_vec(),
        };
        if shared {
            out.push(Payload { worker, events: vec![stored(&self.sys_hashes, None, &self.sys)] });
            root = self.sys_hashes.last().copied();
            held += SYS_BLOCKS;
            let hot = if w < self.hot_full {
                TAIL_BLOCKS
            } else if w < self.hot_full + self.hot_part {
                rng.range(1, TAIL_BLOCKS - 1)
            } else {
                0
            };
            if hot > 0 {
                let ev = stored(&self.hot_hashes[..hot], root, &self.hot_tail[..hot * BS]);
                out.push(Payload { worker, events: vec![ev] });
                held += hot;
            }
        }
        let mut private: Vec<Chain> = Vec::new();
        // Blocks of each document this worker holds (a prefix).
        let mut docs_held = [0usize; DOCS];
        let mut n = 0u64;
        while held < budget {
            let left = budget - held;
            let mut events = Vec::new();
            if shared && rng.next().is_multiple_of(4) {
                // A document already held is sent again (a cache hit that
                // the engine re-announces) and adds no holding.
                let d = rng.range(0, DOCS - 1);
                let (tokens, hashes) = &self.docs[d];
                let len = TAIL_BLOCKS.min(left).max(docs_held[d]);
                events.push(stored(&hashes[..len], root, &tokens[..len * BS]));
                held += len - docs_held[d];
                docs_held[d] = len;
            } else {
                let len = rng.range(32, TAIL_BLOCKS).min(left);
                let tokens = Rng(rng.next()).tokens(len * BS);
                let hashes = chain(root, &tokens);
                events.push(stored(&hashes, root, &tokens));
                let mut c = Chain { root, held: vec![true; len], hashes, tokens };
                for _ in 0..rng.range(0, 3) {
                    let tokens = rng.tokens(BS);
                    let parent = c.hashes.last().copied();
                    let h = chain(parent, &tokens);
                    events.push(stored(&h, parent, &tokens));
                    c.hashes.push(h[0]);
                    c.tokens.extend_from_slice(&tokens);
                    c.held.push(true);
                    held += 1;
                }
                held += len;
                private.push(c);
            }
            if n % 4 == 3 && !private.is_empty() {
                // Tail eviction, last block first.
                let i = rng.range(0, private.len() - 1);
                let r = rng.range(1, private[i].hashes.len().min(64));
                let c = &mut private[i];
                let keep = c.hashes.len() - r;
                let gone: Vec<u64> = (keep..c.hashes.len()).rev().filter(|&j| c.held[j]).map(|j| c.hashes[j]).collect();
                held -= gone.len();
                events.push(Ev::Removed { hashes: gone });
                c.hashes.truncate(keep);
                c.tokens.truncate(keep * BS);
                c.held.truncate(keep);
                if keep == 0 {
                    private.swap_remove(i);
                }
            }
            if n % 8 == 5 && !private.is_empty() {
                // A hole: one interior block evicted, its chain kept.
                let i = rng.range(0, private.len() - 1);
                let j = rng.range(0, private[i].hashes.len() - 1);
                let c = &mut private[i];
                if c.held[j] {
                    events.push(Ev::Removed { hashes: vec![c.hashes[j]] });
                    c.held[j] = false;
                    held -= 1;
                }
            }
            if n % 8 == 1 {
                // A hole refilled: the engine recomputes from the first
                // missing block to the end and stores it all again.
                if let Some(c) = private.iter_mut().find(|c| c.held.contains(&false)) {
                    let j = c.held.iter().position(|&h| !h).unwrap_or(0);
                    let parent = if j == 0 { c.root } else { Some(c.hashes[j - 1]) };
                    events.push(stored(&c.hashes[j..], parent, &c.tokens[j * BS..]));
                    held += c.held[j..].iter().filter(|&&h| !h).count();
                    c.held[j..].fill(true);
                }
            }
            out.push(Payload { worker, events });
            n += 1;
        }
        if shared {
            out.push(Payload { worker, events: vec![stored(&self.sys_hashes, None, &self.sys)] });
        }
        out
    }

    /// The hot prompt: 512 blocks, held in full by `hot_full` workers.
    pub fn hot_query(&self) -> Vec<u32> {
        let mut q = self.sys.clone();
        q.extend_from_slice(&self.hot_tail);
        q
    }

    /// `n` prompts that follow a random worker's random cached prompt for a
    /// random number of blocks, then diverge (512 blocks in all).
    pub fn diverging_queries(&self, n: usize) -> Vec<Vec<u32>> {
        let mut rng = Rng(self.seed ^ 0x0dd_ba11);
        let root = match self.shape {
            Shape::Shared => self.sys_hashes.last().copied(),
            Shape::Unshared => None,
        };
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let w = rng.range(0, self.workers - 1);
            let payloads = self.worker_payloads(w);
            let prompts: Vec<&[u32]> = payloads
                .iter()
                .flat_map(|p| &p.events)
                .filter_map(|e| match e {
                    Ev::Stored { parent, tokens, .. } if *parent == root && tokens.len() >= 2 * BS => {
                        Some(tokens.as_slice())
                    }
                    _ => None,
                })
                .collect();
            if prompts.is_empty() {
                continue;
            }
            let tokens = prompts[rng.range(0, prompts.len() - 1)];
            let mut q = if root.is_some() { self.sys.clone() } else { Vec::new() };
            let k = rng.range(1, tokens.len() / BS - 1);
            q.extend_from_slice(&tokens[..k * BS]);
            let rest = (QUERY_BLOCKS * BS).saturating_sub(q.len()).max(BS);
            q.extend(rng.tokens(rest));
            out.push(q);
        }
        out
    }
}
