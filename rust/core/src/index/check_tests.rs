//! `check_invariants` catches each kind of corruption: a healthy index is
//! built through the public API, one internal field is broken, and the
//! check must fail naming what is wrong (a check that passed broken states
//! would hide real bugs in the tests that rely on it).

use super::super::testutil::B;
use super::super::{Index, NIL};

/// Capacity-bounded (so the LRU is checked too); workers `a` (slot 0) and
/// `b` (slot 1) of model `m`. `a` holds blocks 0 and 1 (a chain), `b`
/// holds block 0.
fn healthy() -> Index {
    let mut ix = Index::new(Some(100)).unwrap();
    ix.add_worker("a", "m").unwrap();
    ix.add_worker("b", "m").unwrap();
    ix.apply("a", &B::default().store(&[1, 2], None, &[1, 1, 2, 2], None).build(), None).unwrap();
    ix.apply("b", &B::default().store(&[10], None, &[1, 1], None).build(), None).unwrap();
    ix.check_invariants().unwrap();
    assert_eq!((ix.stats().blocks, ix.stats().holdings), (2, 3));
    ix
}

fn broken(corrupt: impl FnOnce(&mut Index)) -> String {
    let mut ix = healthy();
    corrupt(&mut ix);
    ix.check_invariants().expect_err("the corruption must be caught")
}

fn assert_caught(corrupt: impl FnOnce(&mut Index), want: &str) {
    let msg = broken(corrupt);
    assert!(msg.contains(want), "{msg:?} does not say {want:?}");
}

#[test]
fn registry_corruptions_are_caught() {
    assert_caught(
        |ix| {
            ix.by_id.insert("ghost".into(), 0);
        },
        "2 workers in slots, 3 ids",
    );
    assert_caught(|ix| ix.workers[0].as_mut().unwrap().id = "renamed".into(), "worker renamed in slot 0 is not found");
    assert_caught(|ix| ix.workers[1].as_mut().unwrap().model = 99, "worker b names forgotten model 99");
    assert_caught(|ix| ix.models[0].members[0] &= !1, "worker a is not a member of model \"m\"");
    assert_caught(|ix| ix.free_models.push(0), "1 models, 1 named and 1 free");
    assert_caught(|ix| ix.models[0].workers += 1, "model \"m\": 3 workers counted, 2 members, 2 registered");
    // each of the model's three agreements broken alone
    assert_caught(|ix| ix.models[0].name = "n".into(), "model \"m\": 2 workers counted, 2 members, 2 registered");
    assert_caught(
        |ix| {
            ix.models[0].workers += 1;
            ix.models[0].members[0] |= 1 << 5; // a member without a worker
        },
        "model \"m\": 3 workers counted, 3 members, 2 registered",
    );
    assert_caught(|ix| ix.models[0].workers = 0, "worker a names forgotten model 0");
    assert_caught(
        |ix| {
            ix.model_id("lonely");
        },
        "model \"lonely\" has no workers but is not forgotten",
    );
}

#[test]
fn block_table_corruptions_are_caught() {
    assert_caught(|ix| ix.blocks[1].key = [7, 7], "block 1 (key 0x0000000700000007) is not found by its key");
    assert_caught(
        |ix| {
            let mut h = ix.blocks[0].holders;
            ix.pool.set(&mut h, 7, 1);
            ix.blocks[0].holders = h;
        },
        "block 0 is held by worker slot 7, which is not registered",
    );
    assert_caught(|ix| ix.blocks[0].refs += 1, "block 0 refs 3 != 2");
    assert_caught(
        |ix| {
            ix.intern_block(0x1234);
        },
        "block 2 is neither held nor referenced",
    );
}

#[test]
fn worker_holding_corruptions_are_caught() {
    assert_caught(
        |ix| {
            for e in &mut ix.workers[0].as_mut().unwrap().emap {
                e[2] = 999;
            }
        },
        "worker a: engine hash names free block 999",
    );
    assert_caught(
        |ix| {
            // b now holds block 1 although none of its engine hashes names it
            let mut h = ix.blocks[1].holders;
            ix.pool.set(&mut h, 1, 1);
            ix.blocks[1].holders = h;
        },
        "worker b holds block 1, which none of its engine hashes names",
    );
    assert_caught(|ix| ix.workers[0].as_mut().unwrap().held += 1, "worker a holds 2 blocks, counter says 3");
    assert_caught(|ix| ix.engine_hashes += 1, "engine hash count 4 != 3");
}

#[test]
fn lru_and_count_corruptions_are_caught() {
    assert_caught(
        |ix| {
            let head = ix.lru_head as usize;
            ix.links[head][0] = 5;
        },
        "LRU list broken at",
    );
    assert_caught(|ix| ix.lru_tail = ix.lru_head, "LRU has 2 blocks, 2 held");
    assert_caught(|ix| ix.lru_head = NIL, "LRU has 0 blocks, 2 held");
    assert_caught(|ix| ix.holdings += 1, "counts (held 2, dormant 0, holdings 4) != actual (2, 0, 3)");
    assert_caught(|ix| ix.capacity = Some(1), "2 blocks held over capacity 1");
}
