//! kvsync-core through its public API: `Index::apply_decoded` with a
//! `Batch` built directly (the closest pre-decoded path it offers),
//! `Index::apply` for msgpack payloads, `Index::match_slots` for queries.

use kvsync_core::wire::{Removed, Stored};
use kvsync_core::{Batch, EngineHash, Event, Index, Query};

use super::{normalized, Peer};
use crate::workload::{Ev, Payload, BS};

const MODEL: &str = "m";

pub struct Kvsync {
    ix: Index,
    ids: Vec<String>,
    /// Worker index by registration slot.
    by_slot: Vec<u32>,
    rejected: u64,
}

impl Peer for Kvsync {
    const NAME: &'static str = "kvsync";
    const MSGPACK: bool = true;
    type Answer = Vec<(u32, u32)>;

    fn new(workers: usize) -> Result<Self, String> {
        let mut ix = Index::new(None).map_err(|e| e.to_string())?;
        let ids: Vec<String> = (0..workers).map(|w| format!("w{w}")).collect();
        for id in &ids {
            ix.add_worker(id, MODEL).map_err(|e| e.to_string())?;
        }
        let mut by_slot = vec![u32::MAX; ix.slot_count()];
        for (slot, id, _) in ix.worker_slots() {
            by_slot[slot as usize] = id[1..].parse().expect("worker ids are w<index>");
        }
        Ok(Kvsync { ix, ids, by_slot, rejected: 0 })
    }

    fn ingest(&mut self, p: &Payload) {
        let mut b = Batch::default();
        for e in &p.events {
            let at = b.hashes.len();
            match e {
                Ev::Stored { hashes, parent, tokens } => {
                    b.hashes.extend(hashes.iter().map(|&h| EngineHash::Unsigned(h)));
                    let t = b.tokens.len();
                    b.tokens.extend_from_slice(tokens);
                    b.events.push(Event::Stored(Stored {
                        hashes: at..b.hashes.len(),
                        parent: parent.map(EngineHash::Unsigned),
                        tokens: t..b.tokens.len(),
                        block_size: Some(BS as u64),
                        lora_id: None,
                        lora_name: None,
                        medium: Some("GPU"),
                        extra_keys: None,
                        group_idx: Some(0),
                        kv_cache_spec_kind: Some("full_attention"),
                        cache_salt: None,
                        other: Vec::new(),
                    }));
                }
                Ev::Removed { hashes } => {
                    b.hashes.extend(hashes.iter().map(|&h| EngineHash::Unsigned(h)));
                    b.events.push(Event::Removed(Removed {
                        hashes: at..b.hashes.len(),
                        medium: Some("GPU"),
                        group_idx: Some(0),
                        other: Vec::new(),
                    }));
                }
            }
        }
        let st = self.ix.apply_decoded(&self.ids[p.worker as usize], &b, None).expect("registered worker");
        self.rejected += st.skipped;
    }

    fn ingest_msgpack(&mut self, worker: u32, payload: &[u8]) {
        let st = self.ix.apply(&self.ids[worker as usize], payload, None).expect("valid payload");
        self.rejected += st.skipped;
    }

    fn rejected(&self) -> u64 {
        self.rejected
    }

    fn holdings(&self) -> Option<usize> {
        Some(self.ix.stats().holdings)
    }

    fn blocks(&self) -> Option<usize> {
        Some(self.ix.stats().blocks)
    }

    fn reported_bytes(&self) -> Option<usize> {
        Some(self.ix.stats().memory_bytes)
    }

    fn query(&self, tokens: &[u32]) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        self.ix.match_slots(&Query::new(MODEL, tokens), &mut out);
        out
    }

    fn depths(&self, answer: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
        normalized(answer.into_iter().map(|(s, d)| (self.by_slot[s as usize], d)).collect())
    }
}
