//! One adapter per index: each drives its index the way that index's docs
//! intend, from the same [`Payload`]s and query tokens, hashing tokens
//! with its own functions.

use crate::workload::Payload;

pub mod dynamo;
pub mod kvsync;
pub mod smg_chain;
pub mod smg_radix;

/// An index under test.
pub trait Peer: Sized {
    /// Column name in the report and key in the JSON.
    const NAME: &'static str;
    /// Whether it has a path from vLLM's msgpack payloads.
    const MSGPACK: bool = false;
    /// The index's own answer to a query.
    type Answer;

    /// An empty index for `workers` workers, or why this peer cannot hold
    /// that many.
    fn new(workers: usize) -> Result<Self, String>;

    /// Apply one payload's events, already decoded, hashing their tokens
    /// with the index's own functions.
    fn ingest(&mut self, p: &Payload);

    /// Decode and apply one msgpack payload of `worker` (only when
    /// [`Peer::MSGPACK`]).
    fn ingest_msgpack(&mut self, _worker: u32, _payload: &[u8]) {
        unreachable!("{} has no msgpack path", Self::NAME);
    }

    /// Wait until every event handed over so far is applied.
    fn settle(&mut self) {}

    /// Events the index refused or could not place (should be 0).
    fn rejected(&self) -> u64;

    /// (block, worker) holdings, for the index that counts them (kvsync).
    fn holdings(&self) -> Option<usize> {
        None
    }

    /// Distinct blocks held, for the index that counts them (kvsync).
    fn blocks(&self) -> Option<usize> {
        None
    }

    /// The index's own memory report, where it has an exact one (kvsync).
    fn reported_bytes(&self) -> Option<usize> {
        None
    }

    /// Hash `tokens` and match them: the timed query.
    fn query(&self, tokens: &[u32]) -> Self::Answer;

    /// The answer as (worker index, depth) for every worker with depth > 0,
    /// sorted by worker.
    fn depths(&self, answer: Self::Answer) -> Vec<(u32, u32)>;
}

/// Sort and drop zero depths.
pub fn normalized(mut v: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    v.retain(|&(_, d)| d > 0);
    v.sort_unstable();
    v
}
