//! Checks of the harness itself: the workload is what it claims, the
//! msgpack payloads say what the pre-decoded events say, every adapter
//! agrees on a small fleet, and a disagreement is caught and classified.

use kvsync_core::{decode, EngineHash, Event, Mode};

use crate::peers::dynamo::{DynamoPool, DynamoRadix};
use crate::peers::kvsync::Kvsync;
use crate::peers::smg_chain::SmgChain;
use crate::peers::smg_radix::SmgRadix;
use crate::peers::Peer;
use crate::report::agreement;
use crate::run::{run, Outcome, Settings, Work};
use crate::workload::{Ev, Fleet, Shape, BS, QUERY_BLOCKS};

fn work(workers: usize, holdings: usize) -> Work {
    let shared = Fleet::new(workers, holdings, Shape::Shared, 7);
    let unshared = Fleet::new(workers, holdings, Shape::Unshared, 7);
    Work {
        hot: shared.hot_query(),
        diverging: shared.diverging_queries(40),
        unshared_queries: unshared.diverging_queries(20),
        shared,
        unshared,
    }
}

const QUICK: Settings = Settings { hot_reps: 3, div_reps: 1, budget_s: 60.0 };

#[test]
fn msgpack_payloads_carry_the_decoded_events() {
    let fleet = Fleet::new(4, 20_000, Shape::Shared, 3);
    let mut removed = 0;
    for p in fleet.worker_payloads(1) {
        let bytes = p.msgpack(1.0);
        let batch = decode(&bytes, Mode::Index).unwrap();
        assert_eq!(batch.events.len(), p.events.len());
        for (got, want) in batch.events.iter().zip(&p.events) {
            let unsigned = |r: &std::ops::Range<usize>| -> Vec<u64> {
                batch.hashes[r.clone()].iter().map(|h| if let EngineHash::Unsigned(h) = h { *h } else { 0 }).collect()
            };
            match (got, want) {
                (Event::Stored(s), Ev::Stored { hashes, parent, tokens }) => {
                    assert_eq!(&unsigned(&s.hashes), hashes);
                    assert_eq!(s.parent, parent.map(EngineHash::Unsigned));
                    assert_eq!(&batch.tokens[s.tokens.clone()], tokens.as_slice());
                    assert_eq!(s.block_size, Some(BS as u64));
                }
                (Event::Removed(r), Ev::Removed { hashes }) => {
                    assert_eq!(&unsigned(&r.hashes), hashes);
                    removed += hashes.len();
                }
                _ => panic!("event kinds differ"),
            }
        }
    }
    assert!(removed > 0, "the workload evicts");
}

#[test]
fn the_fleet_has_the_holdings_and_hot_prompt_it_promises() {
    let w = work(16, 40_000);
    let mut k = Kvsync::new(16).unwrap();
    for worker in 0..16 {
        for p in w.shared.worker_payloads(worker) {
            k.ingest(&p);
        }
    }
    assert_eq!(k.rejected(), 0, "a clean stream: no orphan, no unknown removal");
    let held = k.holdings().unwrap();
    assert!((38_000..=42_000).contains(&held), "holdings {held} should be within 5% of 40,000");
    let hot = k.depths(k.query(&w.hot));
    assert_eq!(hot.len(), 16, "every worker holds the system prompt");
    let full = hot.iter().filter(|e| e.1 == QUERY_BLOCKS as u32).count();
    assert_eq!(full, w.shared.hot_full);
    // Diverging queries end below 512 blocks for everyone, and reach past
    // the system prompt for someone.
    let deepest: Vec<u32> =
        w.diverging.iter().map(|q| k.depths(k.query(q)).iter().map(|e| e.1).max().unwrap_or(0)).collect();
    assert!(deepest.iter().all(|&d| d < QUERY_BLOCKS as u32));
    assert!(deepest.iter().any(|&d| d > 64));
}

#[test]
fn every_peer_answers_like_kvsync_on_a_small_fleet() {
    let w = work(24, 30_000);
    let k = run::<Kvsync>(&w, &QUICK);
    assert_eq!(k.rejected, 0);
    assert!(!k.msgpack_differs);
    assert!(k.answers_unshared.iter().any(|a| !a.is_empty()));
    let peers = [
        run::<DynamoRadix>(&w, &QUICK),
        run::<DynamoPool>(&w, &QUICK),
        run::<SmgChain>(&w, &QUICK),
        run::<SmgRadix>(&w, &QUICK),
    ];
    for p in &peers {
        let a = agreement(&k, p);
        assert!(a.exact(), "{}: {:?}", p.name, a.example);
        assert_eq!(a.queries, 1 + 40 + 20);
        assert_eq!(p.rejected, 0, "{}", p.name);
        assert!(!p.msgpack_differs, "{}", p.name);
    }
}

#[test]
fn chain_index_refuses_more_than_1024_workers() {
    let w = work(1025, 1025 * 64);
    let o = run::<SmgChain>(&w, &QUICK);
    assert!(o.unsupported.unwrap().contains("1024"));
}

#[test]
fn a_disagreement_is_caught_and_classified() {
    let reference = Outcome { answers_shared: vec![vec![(0, 5), (1, 3)], vec![(2, 7)]], ..Outcome::default() };
    let same = Outcome { answers_shared: reference.answers_shared.clone(), ..Outcome::default() };
    assert!(agreement(&reference, &same).exact());
    let under = Outcome { answers_shared: vec![vec![(0, 5)], vec![(2, 7)]], ..Outcome::default() };
    let a = agreement(&reference, &under);
    assert_eq!((a.differing, a.under, a.over), (1, 1, 0));
    assert_eq!(a.example.as_deref(), Some("shared query 0, worker 1: kvsync 3, peer 0"));
    let over = Outcome { answers_shared: vec![vec![(0, 5), (1, 3)], vec![(2, 8), (3, 1)]], ..Outcome::default() };
    let a = agreement(&reference, &over);
    assert_eq!((a.differing, a.under, a.over), (1, 0, 2));
}

/// One worker, one 6-block chain, a hole at block 2, the removal of
/// block 4, then (with `refill`) block 2 stored again under block 1, as an
/// engine recomputing it does: (events refused, answer to the chain).
fn hole<P: Peer>(refill: bool) -> (u64, Vec<(u32, u32)>) {
    let tokens: Vec<u32> = (0..6 * BS as u32).collect();
    let hashes: Vec<u64> = (1..=6).map(|i| i * 1000).collect();
    let mut p = P::new(1).unwrap();
    let mut send = |events| p.ingest(&crate::workload::Payload { worker: 0, events });
    send(vec![Ev::Stored { hashes: hashes.clone(), parent: None, tokens: tokens.clone() }]);
    send(vec![Ev::Removed { hashes: vec![hashes[2]] }]);
    send(vec![Ev::Removed { hashes: vec![hashes[4]] }]);
    if refill {
        send(vec![Ev::Stored {
            hashes: vec![hashes[2]],
            parent: Some(hashes[1]),
            tokens: tokens[2 * BS..3 * BS].to_vec(),
        }]);
    }
    p.settle();
    (p.rejected(), p.depths(p.query(&tokens)))
}

#[test]
fn a_hole_ends_every_peers_prefix() {
    // kvsync keeps the worker's blocks after the hole at 2 (its prefix
    // still ends at 2): removing block 4 later is a known removal.
    assert_eq!(hole::<Kvsync>(false), (0, vec![(0, 2)]));
    // Dynamo's RadixTree drops them with the hole: the later removal is
    // refused (BlockNotFound). Same answer.
    assert_eq!(hole::<DynamoRadix>(false), (1, vec![(0, 2)]));
    assert_eq!(hole::<SmgChain>(false), (0, vec![(0, 2)]));
    assert_eq!(hole::<SmgRadix>(false), (0, vec![(0, 2)]));
}

#[test]
fn a_refilled_hole_reconnects_the_blocks_after_it() {
    // The worker holds blocks 0-3 and 5 again: the prefix is 4 blocks.
    assert_eq!(hole::<Kvsync>(true), (0, vec![(0, 4)]));
    assert_eq!(hole::<DynamoRadix>(true), (1, vec![(0, 3)]));
    assert_eq!(hole::<DynamoPool>(true), (0, vec![(0, 3)]));
    assert_eq!(hole::<SmgChain>(true), (0, vec![(0, 4)]));
    assert_eq!(hole::<SmgRadix>(true), (0, vec![(0, 4)]));
}

#[test]
fn an_ingest_over_its_budget_is_given_up_and_said_so() {
    let w = work(40, 40 * 200);
    let o = run::<Kvsync>(&w, &Settings { hot_reps: 1, div_reps: 1, budget_s: 1e-9 });
    let why = o.unsupported.expect("over budget");
    assert!(why.starts_with("ingest stopped after 0.000000001 CPU seconds: 0 block events of the first 16"), "{why}");
    assert!(o.answers_shared.is_empty() && o.ingest_decoded.is_none());
}
