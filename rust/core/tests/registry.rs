//! The worker and model registry as callers see it: argument checks,
//! idempotent registration, slot reuse and the epoch that tells callers to
//! refresh slot maps, positions, capacity settings and stats sums.

mod common;

use kvsync_core::{payload_digest, ApplyStats, Index, IndexError};

/// One block (hash `h`, tokens `[t, t]`, block size 2), no parent.
fn store(h: u64, t: u32) -> Vec<u8> {
    common::stored(1.0, h, None, u64::from(t))
}

#[test]
fn registering_checks_its_arguments_and_is_idempotent() {
    let mut ix = Index::default();
    assert_eq!(ix.add_worker("", "m"), Err(IndexError::Invalid("worker id must not be empty".into())));
    assert_eq!(ix.add_worker("a", ""), Err(IndexError::Invalid("model name must not be empty".into())));
    assert!(ix.workers().is_empty());

    ix.add_worker("a", "m").unwrap();
    let epoch = ix.worker_epoch();
    // Same worker, same model: nothing changes, slot maps stay valid.
    ix.add_worker("a", "m").unwrap();
    assert_eq!(ix.worker_epoch(), epoch);
    assert_eq!(ix.workers(), vec![("a", "m")]);
    assert_eq!(
        ix.add_worker("a", "other"),
        Err(IndexError::ModelMismatch { worker: "a".into(), existing: "m".into(), requested: "other".into() })
    );
    assert_eq!(ix.workers(), vec![("a", "m")]);
    assert_eq!(ix.stats().models, 1);
}

#[test]
fn removed_slots_are_reused_and_the_epoch_tells() {
    let mut ix = Index::default();
    for id in ["a", "b", "c"] {
        ix.add_worker(id, "m").unwrap();
    }
    let e0 = ix.worker_epoch();
    assert_eq!(ix.remove_worker("ghost"), Ok(false));
    assert_eq!(ix.worker_epoch(), e0, "removing nobody changes nothing");
    assert_eq!(ix.remove_worker("b"), Ok(true));
    let e1 = ix.worker_epoch();
    assert_ne!(e1, e0);
    assert_eq!(ix.worker_slots().collect::<Vec<_>>(), vec![(0, "a", "m"), (2, "c", "m")]);
    assert_eq!(ix.slot_count(), 3);

    ix.add_worker("d", "n").unwrap();
    assert_ne!(ix.worker_epoch(), e1);
    assert_eq!(ix.worker_slots().collect::<Vec<_>>(), vec![(0, "a", "m"), (1, "d", "n"), (2, "c", "m")]);
    assert_eq!(ix.slot_count(), 3, "the free slot was reused");
    ix.check_invariants().unwrap();
}

#[test]
fn a_model_is_forgotten_with_its_last_worker() {
    let mut ix = Index::default();
    ix.add_worker("a", "m").unwrap();
    ix.apply("a", &store(1, 5), None).unwrap();
    assert_eq!(ix.block_size("m"), Some(2));
    assert!(ix.remove_worker("a").unwrap());
    assert_eq!(ix.block_size("m"), None);
    assert_eq!(ix.stats().models, 0);
    ix.check_invariants().unwrap();
}

#[test]
fn positions_are_recorded_by_apply_and_set_position() {
    let mut ix = Index::default();
    ix.add_worker("a", "m").unwrap();
    assert_eq!(ix.position("a"), Ok((None, 0)));
    let p = store(1, 5);
    ix.apply("a", &p, Some(3)).unwrap();
    assert_eq!(ix.last_seq("a"), Ok(Some(3)));
    assert_eq!(ix.position("a"), Ok((Some(3), payload_digest(&p))));
    // A payload that does not decode records no position.
    assert!(ix.apply("a", b"\x93junk", Some(4)).is_err());
    assert_eq!(ix.last_seq("a"), Ok(Some(3)));

    ix.set_position("a", Some(9), 1234).unwrap();
    assert_eq!(ix.position("a"), Ok((Some(9), 1234)));
    assert_eq!(ix.worker_stats("a").unwrap().last_seq, Some(9));
    // Without a seq there is no digest to keep.
    ix.set_position("a", None, 1234).unwrap();
    assert_eq!(ix.position("a"), Ok((None, 0)));

    let ghost = IndexError::UnknownWorker("ghost".into());
    assert_eq!(ix.set_position("ghost", Some(1), 1), Err(ghost.clone()));
    assert_eq!(ix.position("ghost"), Err(ghost.clone()));
    assert_eq!(ix.last_seq("ghost"), Err(ghost));
}

#[test]
fn purging_a_worker_drops_its_holdings_and_position_but_keeps_it() {
    let mut ix = Index::default();
    ix.add_worker("a", "m").unwrap();
    ix.apply("a", &store(1, 5), Some(0)).unwrap();
    assert_eq!(ix.stats().blocks, 1);
    ix.purge_worker("a").unwrap();
    assert_eq!(ix.stats().blocks, 0);
    assert_eq!(ix.position("a"), Ok((None, 0)));
    let st = ix.worker_stats("a").unwrap();
    assert_eq!((st.blocks, st.counters.purges), (0, 1));
    assert_eq!(ix.workers(), vec![("a", "m")]);
    assert_eq!(ix.purge_worker("ghost"), Err(IndexError::UnknownWorker("ghost".into())));
}

#[test]
fn capacity_is_checked_and_reported() {
    assert_eq!(Index::new(Some(0)).err(), Some(IndexError::Invalid("capacity_blocks must be at least 1".into())));
    let too_big = u32::MAX as usize;
    assert_eq!(
        Index::new(Some(too_big)).err(),
        Some(IndexError::Invalid(format!("capacity_blocks must be below {too_big}, got {too_big}")))
    );
    assert_eq!(Index::new(Some(too_big - 1)).unwrap().capacity_blocks(), Some(too_big - 1));
    assert_eq!(Index::new(Some(10)).unwrap().capacity_blocks(), Some(10));
    assert_eq!(Index::default().capacity_blocks(), None);
    assert_eq!(Index::new(Some(10)).unwrap().stats().capacity_blocks, Some(10));
}

#[test]
fn apply_stats_add_up_field_by_field() {
    let one = ApplyStats {
        stored: 1,
        removed: 2,
        cleared: 3,
        skipped: 4,
        orphaned: 5,
        ignored: 6,
        unknown_removals: 7,
        unknown_events: 8,
        block_size_mismatch: 9,
    };
    let mut sum = ApplyStats::default();
    sum.add(&one);
    sum.add(&one);
    assert_eq!(
        sum,
        ApplyStats {
            stored: 2,
            removed: 4,
            cleared: 6,
            skipped: 8,
            orphaned: 10,
            ignored: 12,
            unknown_removals: 14,
            unknown_events: 16,
            block_size_mismatch: 18,
        }
    );
}
