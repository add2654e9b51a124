//! `Index::stats().memory_bytes`, the figure the memory benchmarks report,
//! follows what the index really holds on the heap (counted by a global
//! allocator): through growth over workers, models, shared and private
//! chains, and through removals. One `#[test]`: nothing else allocates.

mod common;
#[path = "common/counting.rs"]
mod counting;

use kvsync_core::wire::{decode, Mode};
use kvsync_core::Index;

/// A chain of `n` blocks for one worker: shared with every other worker for
/// the first `shared` blocks (same tokens), then its own.
fn chain(worker: u64, n: u64, shared: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let token = if i < shared { i } else { 1_000_000 * (worker + 1) + i };
            let h = worker << 32 | i;
            common::stored(1.0, h + 1, (i > 0).then_some(h), token)
        })
        .collect()
}

fn account(ix: &Index) -> usize {
    ix.stats().memory_bytes - std::mem::size_of::<Index>()
}

#[test]
fn the_memory_account_follows_the_heap() {
    let workers: Vec<(String, &str)> =
        (0..48).map(|w| (format!("worker-{w}"), if w % 3 == 0 { "model-a" } else { "model-b" })).collect();
    let payloads: Vec<Vec<Vec<u8>>> = (0..48).map(|w| chain(w, 300, 120)).collect();
    // Decoded before counting starts: the batches are the caller's memory.
    let batches: Vec<Vec<_>> =
        payloads.iter().map(|ps| ps.iter().map(|p| decode(p, Mode::Index).unwrap()).collect()).collect();
    let start = counting::live();
    // capacity-bound (far above what is stored), so the LRU links are in the account too
    let mut ix = Index::new(Some(1_000_000)).unwrap();
    // The account is exact for vectors and hashbrown tables and estimates
    // std's HashMaps (ids, model names): a few hundred bytes short here.
    let check = |ix: &Index, when: &str| {
        let heap = counting::live() - start;
        let acc = account(ix);
        assert!(acc.abs_diff(heap) <= 1024, "{when}: account {acc} B, heap {heap} B");
    };
    for (w, (id, model)) in workers.iter().enumerate() {
        ix.add_worker(id, model).unwrap();
        for b in &batches[w] {
            ix.apply_decoded(id, b, None).unwrap();
        }
        if w == 0 || w == 5 || w == 47 {
            check(&ix, &format!("{} workers", w + 1));
        }
    }
    assert_eq!(ix.stats().workers, 48);
    for (id, _) in workers.iter().step_by(2) {
        ix.remove_worker(id).unwrap();
    }
    check(&ix, "after removing half the workers");
    ix.check_invariants().unwrap();
}
