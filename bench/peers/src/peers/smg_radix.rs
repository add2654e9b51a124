//! SMG's `smg-radix-tree` 0.1.0 `RadixTree` (the chain-native core of the
//! shared radix-index service): one generational holder per worker,
//! `store` with (engine hash, content hash) pairs, `remove` by engine hash,
//! `overlap` with a caller-owned scratch. The crate hashes nothing itself
//! ("everything it sees is a hash"): content hashes are SMG's own,
//! `kv_index::compute_content_hash` (XXH3-64, seed 1337, little-endian
//! tokens), as SMG's gateway computes them.

use std::cell::RefCell;

use kv_index::{compute_content_hash, compute_request_content_hashes};
use radix_tree::{Config, HolderId, Overlap, OverlapScratch, RadixTree};

use super::{normalized, Peer};
use crate::workload::{Ev, Payload, BS};

pub struct SmgRadix {
    tree: RadixTree,
    holders: Vec<HolderId>,
    /// Worker index by holder slot.
    by_slot: Vec<u32>,
    scratch: RefCell<OverlapScratch>,
    rejected: u64,
}

impl Peer for SmgRadix {
    const NAME: &'static str = "smg_radix";
    type Answer = Vec<Overlap>;

    fn new(workers: usize) -> Result<Self, String> {
        let mut tree = RadixTree::new(Config::default());
        let holders: Vec<HolderId> = (0..workers).map(|w| tree.create_holder(&format!("w{w}"))).collect();
        let mut by_slot = vec![u32::MAX; workers];
        for (w, h) in holders.iter().enumerate() {
            by_slot[h.parts().0 as usize] = w as u32;
        }
        Ok(SmgRadix { tree, holders, by_slot, scratch: RefCell::default(), rejected: 0 })
    }

    fn ingest(&mut self, p: &Payload) {
        let holder = self.holders[p.worker as usize];
        for e in &p.events {
            match e {
                Ev::Stored { hashes, parent, tokens } => {
                    let blocks: Vec<(u64, u64)> =
                        tokens.chunks_exact(BS).zip(hashes).map(|(t, &h)| (h, compute_content_hash(t).0)).collect();
                    if self.tree.store(holder, *parent, &blocks).is_err() {
                        self.rejected += 1;
                    }
                }
                Ev::Removed { hashes } => {
                    self.tree.remove(holder, hashes);
                }
            }
        }
    }

    fn rejected(&self) -> u64 {
        self.rejected
    }

    fn query(&self, tokens: &[u32]) -> Vec<Overlap> {
        let contents: Vec<u64> = compute_request_content_hashes(tokens, BS).into_iter().map(|c| c.0).collect();
        let mut out = Vec::new();
        self.tree.overlap(&contents, &mut self.scratch.borrow_mut(), &mut out);
        out
    }

    fn depths(&self, answer: Vec<Overlap>) -> Vec<(u32, u32)> {
        normalized(answer.into_iter().map(|o| (self.by_slot[o.holder.parts().0 as usize], o.depth)).collect())
    }
}
