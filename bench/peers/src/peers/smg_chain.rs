//! SMG's `kv-index` 2.0.0 `ChainIndex` (the gateway's event-driven prefix
//! index), driven as its docs describe: one interned worker id and one
//! caller-owned `ChainBlockMap` per worker, `apply_stored` with each
//! block's engine hash and its `compute_content_hash`, queries as
//! `compute_request_content_hashes` then `find_matches`.
//!
//! Limit: at most 1,024 workers per index (`with_max_workers` clamps; the
//! gateway keeps one index per model).

use kv_index::{
    compute_content_hash, compute_request_content_hashes, ChainBlockMap, ChainIndex, OverlapScores, SequenceHash,
    StoredBlock,
};

use super::{normalized, Peer};
use crate::workload::{Ev, Payload, BS};

const MAX_WORKERS: usize = 1024;

pub struct SmgChain {
    ix: ChainIndex,
    ids: Vec<u32>,
    maps: Vec<ChainBlockMap>,
    /// Worker index by interned id.
    by_id: Vec<u32>,
    rejected: u64,
}

impl Peer for SmgChain {
    const NAME: &'static str = "smg_chain";
    type Answer = OverlapScores;

    fn new(workers: usize) -> Result<Self, String> {
        if workers > MAX_WORKERS {
            return Err(format!("ChainIndex holds at most {MAX_WORKERS} workers, not {workers}"));
        }
        let ix = ChainIndex::with_max_workers(workers);
        let mut ids = Vec::with_capacity(workers);
        let mut by_id = vec![u32::MAX; workers];
        for w in 0..workers {
            let id = ix.intern_worker(&format!("w{w}")).map_err(|e| e.to_string())?;
            by_id[id as usize] = w as u32;
            ids.push(id);
        }
        let maps = (0..workers).map(|_| ChainBlockMap::new()).collect();
        Ok(SmgChain { ix, ids, maps, by_id, rejected: 0 })
    }

    fn ingest(&mut self, p: &Payload) {
        let w = p.worker as usize;
        for e in &p.events {
            match e {
                Ev::Stored { hashes, parent, tokens } => {
                    let blocks: Vec<StoredBlock> = tokens
                        .chunks_exact(BS)
                        .zip(hashes)
                        .map(|(t, &h)| StoredBlock { seq_hash: SequenceHash(h), content_hash: compute_content_hash(t) })
                        .collect();
                    if self.ix.apply_stored(self.ids[w], &blocks, parent.map(SequenceHash), &mut self.maps[w]).is_err()
                    {
                        self.rejected += 1;
                    }
                }
                Ev::Removed { hashes } => {
                    let keys: Vec<SequenceHash> = hashes.iter().map(|&h| SequenceHash(h)).collect();
                    self.ix.apply_removed(self.ids[w], &keys, &mut self.maps[w]);
                }
            }
        }
    }

    fn rejected(&self) -> u64 {
        self.rejected
    }

    fn query(&self, tokens: &[u32]) -> OverlapScores {
        self.ix.find_matches(&compute_request_content_hashes(tokens, BS), false)
    }

    fn depths(&self, answer: OverlapScores) -> Vec<(u32, u32)> {
        normalized(answer.scores.into_iter().map(|(id, d)| (self.by_id[id as usize], d)).collect())
    }
}
