//! NVIDIA Dynamo's KV router (`dynamo-kv-router` 1.6.1), two indexes:
//!
//! - `RadixTree`, the single-threaded compressed radix tree, fed
//!   `RouterEvent`s through `apply_event`;
//! - `ThreadPoolIndexer<ConcurrentRadixTreeCompressed>` with one writer
//!   thread (the one-core comparison): events go through `enqueue_event`
//!   and are applied on the pool's thread, whose CPU time the process clock
//!   charges; reads run inline on the caller's thread, as the pool's own
//!   `find_matches_for_request` does (`compute_block_hash_for_seq`, then
//!   the backend's `find_matches`).
//!
//! Block hashes: Dynamo keys its tree by per-block token hashes
//! (`LocalBlockHash`, `compute_block_hash_for_seq`, XXH3 of the block's
//! little-endian tokens with its default salt seed), chained by the tree's
//! structure rather than by a rolling hash. The msgpack path is Dynamo's
//! own: `zmq_wire::decode_event_batch`, a `ZmqEventNormalizer` per worker
//! (which hashes the tokens the same way), `into_router_event`.

use dynamo_kv_router::indexer::SyncIndexer;
use dynamo_kv_router::protocols::{
    compute_block_hash_for_seq, BlockHashOptions, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData,
    KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData, OverlapScores, PlacementEvent, RouterEvent,
    WorkerWithDpRank,
};
use dynamo_kv_router::zmq_wire::{decode_event_batch, ZmqEventNormalizer};
use dynamo_kv_router::{ConcurrentRadixTreeCompressed, RadixTree, ThreadPoolIndexer};

use super::{normalized, Peer};
use crate::workload::{Ev, Payload, BS};

/// Event ids and msgpack normalizers, one per worker.
struct Feed {
    next_id: Vec<u64>,
    normalizers: Vec<ZmqEventNormalizer>,
}

impl Feed {
    fn new(workers: usize) -> Feed {
        Feed { next_id: vec![0; workers], normalizers: Vec::new() }
    }

    fn id(&mut self, w: u32) -> u64 {
        let id = &mut self.next_id[w as usize];
        *id += 1;
        *id
    }

    /// The payload's events as Dynamo's pre-decoded `RouterEvent`s, block
    /// token hashes computed by Dynamo.
    fn events<'a>(&'a mut self, p: &'a Payload) -> impl Iterator<Item = RouterEvent> + 'a {
        p.events.iter().map(move |e| {
            let data = match e {
                Ev::Stored { hashes, parent, tokens } => {
                    let local = compute_block_hash_for_seq(tokens, BS as u32, BlockHashOptions::default());
                    let blocks = hashes
                        .iter()
                        .zip(local)
                        .map(|(&h, tokens_hash)| KvCacheStoredBlockData {
                            block_hash: ExternalSequenceBlockHash(h),
                            tokens_hash,
                            mm_extra_info: None,
                        })
                        .collect();
                    KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: parent.map(ExternalSequenceBlockHash),
                        start_position: None,
                        blocks,
                    })
                }
                Ev::Removed { hashes } => KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: hashes.iter().map(|&h| ExternalSequenceBlockHash(h)).collect(),
                }),
            };
            let event_id = self.id(p.worker);
            RouterEvent::new(u64::from(p.worker), KvCacheEvent { event_id, data, dp_rank: 0 })
        })
    }

    /// Dynamo's own decode of a vLLM payload into `RouterEvent`s; events
    /// its normalizer filters out are counted in `dropped`.
    fn decode(&mut self, worker: u32, payload: &[u8], dropped: &mut u64) -> Vec<RouterEvent> {
        if self.normalizers.is_empty() {
            self.normalizers = (0..self.next_id.len()).map(|_| ZmqEventNormalizer::new(BS as u32)).collect();
        }
        let batch = decode_event_batch(payload).expect("Dynamo decodes the payload");
        let who = WorkerWithDpRank::new(u64::from(worker), 0);
        let mut out = Vec::with_capacity(batch.events.len());
        for raw in batch.events {
            let id = self.id(worker);
            match self.normalizers[worker as usize].normalize(raw, id, who).and_then(PlacementEvent::into_router_event)
            {
                Some(e) => out.push(e),
                None => *dropped += 1,
            }
        }
        out
    }
}

fn local_hashes(tokens: &[u32]) -> Vec<dynamo_kv_router::LocalBlockHash> {
    compute_block_hash_for_seq(tokens, BS as u32, BlockHashOptions::default())
}

fn scores(answer: &OverlapScores) -> Vec<(u32, u32)> {
    normalized(answer.scores.iter().map(|(w, &d)| (w.worker_id as u32, d)).collect())
}

/// `RadixTree`, single-threaded.
pub struct DynamoRadix {
    tree: RadixTree,
    feed: Feed,
    rejected: u64,
}

impl Peer for DynamoRadix {
    const NAME: &'static str = "dynamo_radix";
    const MSGPACK: bool = true;
    type Answer = OverlapScores;

    fn new(workers: usize) -> Result<Self, String> {
        Ok(DynamoRadix { tree: RadixTree::new(), feed: Feed::new(workers), rejected: 0 })
    }

    fn ingest(&mut self, p: &Payload) {
        for e in self.feed.events(p) {
            if self.tree.apply_event(e).is_err() {
                self.rejected += 1;
            }
        }
    }

    fn ingest_msgpack(&mut self, worker: u32, payload: &[u8]) {
        for e in self.feed.decode(worker, payload, &mut self.rejected) {
            if self.tree.apply_event(e).is_err() {
                self.rejected += 1;
            }
        }
    }

    fn rejected(&self) -> u64 {
        self.rejected
    }

    fn query(&self, tokens: &[u32]) -> OverlapScores {
        self.tree.find_matches(local_hashes(tokens), false)
    }

    fn depths(&self, answer: OverlapScores) -> Vec<(u32, u32)> {
        scores(&answer)
    }
}

/// `ThreadPoolIndexer<ConcurrentRadixTreeCompressed>` with one writer thread.
pub struct DynamoPool {
    pool: ThreadPoolIndexer<ConcurrentRadixTreeCompressed>,
    feed: Feed,
    rejected: u64,
}

impl Peer for DynamoPool {
    const NAME: &'static str = "dynamo_pool";
    const MSGPACK: bool = true;
    type Answer = OverlapScores;

    fn new(workers: usize) -> Result<Self, String> {
        let pool = ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), 1, BS as u32);
        Ok(DynamoPool { pool, feed: Feed::new(workers), rejected: 0 })
    }

    fn ingest(&mut self, p: &Payload) {
        for e in self.feed.events(p) {
            self.pool.enqueue_event(e).expect("the pool's thread is alive");
        }
    }

    fn ingest_msgpack(&mut self, worker: u32, payload: &[u8]) {
        for e in self.feed.decode(worker, payload, &mut self.rejected) {
            self.pool.enqueue_event(e).expect("the pool's thread is alive");
        }
    }

    fn settle(&mut self) {
        // Application errors on the pool's thread are only logged by Dynamo;
        // the answer check catches their effect.
        pollster::block_on(self.pool.flush_and_wait()).expect("the pool's thread is alive");
    }

    fn rejected(&self) -> u64 {
        self.rejected
    }

    fn query(&self, tokens: &[u32]) -> OverlapScores {
        self.pool.backend().find_matches(&local_hashes(tokens), false)
    }

    fn depths(&self, answer: OverlapScores) -> Vec<(u32, u32)> {
        scores(&answer)
    }
}
