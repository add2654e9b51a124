//! Unit tests of the holder-set pool: sharing, representations, memory, the move memo.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// What the pool's heap really holds, recomputed from scratch.
fn recomputed_bytes(p: &Pool) -> usize {
    let sets: usize = p
        .sets
        .iter()
        .map(|s| match s {
            Set::Sparse(v) => v.capacity() * 4,
            Set::Dense { bits, .. } => bits.capacity() * 8,
        })
        .sum();
    p.sets.capacity() * std::mem::size_of::<Set>()
        + p.refs.capacity() * 4
        + p.sums.capacity() * 8
        + p.by_content.allocation_size()
        + p.free.capacity() * 4
        + sets
}

#[test]
fn memory_accounting_matches_the_heap_through_every_representation() {
    let mut pool = Pool::default();
    assert_eq!(pool.memory_bytes(), 0);
    let mut handles = [0u32; 3];
    // grow past the sparse form into bitmaps and back, in several sets
    for round in 0..2u32 {
        for slot in 0..600u32 {
            for (i, h) in handles.iter_mut().enumerate() {
                if slot % (i as u32 + 1) == round % 2 {
                    pool.set(h, slot, 1 + (slot % 7) as u8);
                }
                assert_eq!(pool.memory_bytes(), recomputed_bytes(&pool));
            }
        }
        assert!(pool.memory_bytes() >= 600 / 8 * 3, "bitmaps are on the heap");
        for slot in 0..600u32 {
            for h in &mut handles {
                pool.set(h, slot, 0);
                assert_eq!(pool.memory_bytes(), recomputed_bytes(&pool));
            }
        }
    }
    assert_eq!(handles, [0; 3]);
}

#[test]
fn intersect_keeps_only_holders_in_the_asked_tiers_beyond_4096_slots() {
    // a few holders (sparse form) among 4,160 slots: the wide path
    let mut pool = Pool::default();
    let mut h = 0u32;
    pool.set(&mut h, 5, 0b001); // gpu
    pool.set(&mut h, 4100, 0b010); // cpu
    pool.set(&mut h, 4101, 0b100); // storage
    let words = 65;
    for (mask, want) in [(0b001, vec![5]), (0b010, vec![4100]), (0b110, vec![4100, 4101]), (0b111, vec![5, 4100, 4101])]
    {
        let mut alive = vec![u64::MAX; words];
        pool.intersect(h, mask, &mut alive);
        let got: Vec<u32> = (0..words as u32 * 64).filter(|s| alive[(s / 64) as usize] >> (s % 64) & 1 == 1).collect();
        assert_eq!(got, want, "mask {mask:#05b}");
    }
    // and a slot already dead stays dead
    let mut alive = vec![u64::MAX; words];
    alive[4100 / 64] = 0;
    pool.intersect(h, 0b111, &mut alive);
    assert_eq!(alive.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
}

#[test]
fn the_largest_slot_fits_the_inline_form() {
    assert_eq!(MAX_SLOT, (1 << 28) - 1);
    let e = pack(MAX_SLOT, 7);
    assert_eq!(e & POOL_BIT, 0);
    assert_eq!(unpack(e), (MAX_SLOT, 7));
}

proptest! {
    #[test]
    fn behaves_like_a_map(ops in proptest::collection::vec((0u32..300, 0u8..8), 0..400)) {
        let mut pool = Pool::default();
        let mut h = 0u32;
        let mut model = BTreeMap::new();
        for (slot, tiers) in ops {
            let old = pool.set(&mut h, slot, tiers);
            prop_assert_eq!(old, model.get(&slot).copied().unwrap_or(0));
            if tiers == 0 { model.remove(&slot); } else { model.insert(slot, tiers); }
            prop_assert_eq!(pool.len(h) as usize, model.len());
            for s in [0u32, 1, 63, 64, 65, 128, 299, slot] {
                prop_assert_eq!(pool.get(h, s), model.get(&s).copied().unwrap_or(0));
            }
            let mut seen = BTreeMap::new();
            pool.for_each(h, |s, t| { seen.insert(s, t); });
            prop_assert_eq!(&seen, &model);
            for mask in [1u8, 2, 4, 7] {
                let mut alive = vec![u64::MAX; 5];
                pool.intersect(h, mask, &mut alive);
                let mut want = vec![0u64; 5];
                for (&s, _) in model.iter().filter(|(_, &t)| t & mask != 0) {
                    want[(s / 64) as usize] |= 1 << (s % 64);
                }
                prop_assert_eq!(alive, want, "mask {}", mask);
            }
            // a window of the bitset gives the same words as the whole
            for (first, len) in [(1usize, 2usize), (2, 3), (4, 1), (0, 3)] {
                let mut whole = vec![u64::MAX; 5];
                pool.intersect(h, 7, &mut whole);
                let mut window = vec![u64::MAX; len];
                pool.intersect_words(h, 7, &mut window, first);
                prop_assert_eq!(&window[..], &whole[first..first + len]);
            }
        }
    }
}

proptest! {
    /// Several handles over shared sets: each behaves like its own map,
    /// whatever the others do, and the sharing invariants hold.
    #[test]
    fn shared_sets_behave_like_separate_maps(
        ops in proptest::collection::vec((0usize..4, 0u32..140, 0u8..8), 0..400),
    ) {
        let mut pool = Pool::default();
        let mut handles = [0u32; 4];
        let mut models: [BTreeMap<u32, u8>; 4] = Default::default();
        for (i, slot, tiers) in ops {
            // mostly the same few slots, so contents often coincide
            let slot = if slot < 120 { slot % 8 } else { slot };
            let old = pool.set(&mut handles[i], slot, tiers);
            prop_assert_eq!(old, models[i].get(&slot).copied().unwrap_or(0));
            if tiers == 0 { models[i].remove(&slot); } else { models[i].insert(slot, tiers); }
            if let Err(e) = pool.check(handles.iter().copied()) {
                prop_assert!(false, "{}", e);
            }
            for (h, model) in handles.iter().zip(&models) {
                let mut seen = BTreeMap::new();
                pool.for_each(*h, |s, t| { seen.insert(s, t); });
                prop_assert_eq!(&seen, model);
            }
            for a in 0..4 {
                for b in 0..4 {
                    // equal contents share one handle, different ones never do
                    prop_assert_eq!(handles[a] == handles[b], models[a] == models[b]);
                }
            }
            prop_assert_eq!(pool.memory_bytes(), recomputed_bytes(&pool));
        }
        for (i, h) in handles.iter_mut().enumerate() {
            for &slot in models[i].keys() {
                pool.set(h, slot, 0);
            }
        }
        prop_assert_eq!(handles, [0; 4]);
        prop_assert_eq!(pool.live_sets(), 0);
        prop_assert_eq!(pool.heap_bytes, 0);
    }
}

#[test]
fn entry_hashes_are_splitmix64_and_spread() {
    // SplitMix64's published first outputs for seeds 0 and 1234567:
    // equal sets are found by one probe only if different entries get
    // unrelated hashes (a constant hash would still be correct, and slow).
    assert_eq!(entry_hash(0), 0xe220_a839_7b1d_cdaf);
    assert_eq!(entry_hash(1_234_567), 6_457_827_717_110_365_317);
    let mut seen: Vec<u64> = (0..1u32 << 16).map(entry_hash).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 1 << 16);
}

/// Contents of a handle as (slot, tiers) pairs.
fn content(pool: &Pool, h: u32) -> Vec<(u32, u8)> {
    let mut v = Vec::new();
    pool.for_each(h, |s, t| v.push((s, t)));
    v
}

#[test]
fn the_move_memo_applies_only_to_the_same_slot_and_tiers() {
    let mut pool = Pool::default();
    let mut blocks = [0u32; 3];
    for h in &mut blocks {
        pool.set(h, 10, 1);
        pool.set(h, 11, 1);
    }
    assert!(blocks.iter().all(|&h| h == blocks[0]));
    pool.set(&mut blocks[0], 12, 1); // remembered: S + (12, gpu)
    pool.set(&mut blocks[1], 12, 2); // same set and slot, other tiers
    pool.set(&mut blocks[2], 13, 2); // same set and tiers, another slot
    assert_eq!(content(&pool, blocks[0]), [(10, 1), (11, 1), (12, 1)]);
    assert_eq!(content(&pool, blocks[1]), [(10, 1), (11, 1), (12, 2)]);
    assert_eq!(content(&pool, blocks[2]), [(10, 1), (11, 1), (13, 2)]);
    pool.check(blocks.iter().copied()).unwrap();
}

#[test]
fn a_reused_set_never_takes_a_remembered_move() {
    let mut pool = Pool::default();
    let (mut x, mut y) = (0u32, 0u32);
    for slot in [1, 2] {
        pool.set(&mut x, slot, 1);
    }
    for slot in [1, 2, 3] {
        pool.set(&mut y, slot, 1);
    }
    // x joins y's set; x's old set is freed
    pool.set(&mut x, 3, 1);
    assert_eq!(x, y);
    // a new set takes the freed place, then makes "the same" move
    let mut z = 0u32;
    for slot in [4, 5] {
        pool.set(&mut z, slot, 1);
    }
    pool.set(&mut z, 3, 1);
    assert_eq!(content(&pool, z), [(3, 1), (4, 1), (5, 1)]);
    pool.check([x, y, z].into_iter()).unwrap();
}

#[test]
fn blocks_with_the_same_holders_share_one_set() {
    let mut pool = Pool::default();
    // a chain of 100 blocks each cached by the same 150 workers
    let mut chain = [0u32; 100];
    for slot in 0..150 {
        for h in &mut chain {
            pool.set(h, slot, 1);
        }
    }
    assert!(chain.iter().all(|&h| h == chain[0]));
    assert_eq!(pool.live_sets(), 1);
    pool.check(chain.iter().copied()).unwrap();
    let one_set = pool.memory_bytes();
    // one block gains a CPU copy: it alone moves to a new set
    assert_eq!(pool.set(&mut chain[7], 3, 0b011), 1);
    assert_eq!(pool.live_sets(), 2);
    assert_eq!(pool.get(chain[7], 3), 0b011);
    assert_eq!(pool.get(chain[8], 3), 1, "the other blocks are untouched");
    // and back: it rejoins the shared set, the copy is freed
    pool.set(&mut chain[7], 3, 1);
    assert_eq!(pool.live_sets(), 1);
    assert!(chain.iter().all(|&h| h == chain[0]));
    assert!(pool.memory_bytes() <= one_set + 64, "the copy's heap is given back");
    pool.check(chain.iter().copied()).unwrap();
    // a count that does not match the handles is reported
    assert!(pool.check(chain[..99].iter().copied()).unwrap_err().contains("100"));
}

/// Which representation a handle uses.
fn kind(pool: &Pool, h: u32) -> &'static str {
    if h == 0 {
        "empty"
    } else if h & POOL_BIT == 0 {
        "inline"
    } else {
        match pool.sets[(h & !POOL_BIT) as usize] {
            Set::Sparse(_) => "sparse",
            Set::Dense { .. } => "dense",
        }
    }
}

fn agrees(pool: &Pool, h: u32, model: &BTreeMap<u32, u8>) {
    assert_eq!(pool.len(h) as usize, model.len());
    let mut seen = BTreeMap::new();
    pool.for_each(h, |s, t| {
        seen.insert(s, t);
    });
    assert_eq!(&seen, model);
    for s in 0..200 {
        assert_eq!(pool.get(h, s), model.get(&s).copied().unwrap_or(0), "slot {s}");
    }
    let mut alive = vec![u64::MAX; 4];
    pool.intersect(h, 2, &mut alive);
    for s in 0..256u32 {
        let want = model.get(&s).is_some_and(|t| t & 2 != 0);
        assert_eq!(alive[(s / 64) as usize] >> (s % 64) & 1 == 1, want, "slot {s}");
    }
}

#[test]
fn representation_switches_both_ways() {
    let mut pool = Pool::default();
    let mut h = 0;
    let mut model = BTreeMap::new();
    let mut kinds = Vec::new();
    // Grow: one holder inline, a few in a sorted vector, many in bitmaps.
    for s in 0..128u32 {
        let t = (s % 7 + 1) as u8;
        pool.set(&mut h, s, t);
        model.insert(s, t);
        agrees(&pool, h, &model);
        if kinds.last() != Some(&kind(&pool, h)) {
            kinds.push(kind(&pool, h));
        }
    }
    assert_eq!(kinds, ["inline", "sparse", "dense"]);
    assert!(pool.heap_bytes > 0);
    // Shrink back: bitmaps, then a vector, then one inline, then nothing.
    for s in 0..128u32 {
        pool.set(&mut h, s, 0);
        model.remove(&s);
        agrees(&pool, h, &model);
        if kinds.last() != Some(&kind(&pool, h)) {
            kinds.push(kind(&pool, h));
        }
    }
    assert_eq!(kinds, ["inline", "sparse", "dense", "sparse", "inline", "empty"]);
    assert_eq!(h, 0);
    // Every heap byte is given back, and the set's slot is reused.
    assert_eq!(pool.heap_bytes, 0);
    assert_eq!(pool.free.len(), pool.sets.len());
}

#[test]
fn memory_returns_to_baseline_after_each_cycle() {
    let mut pool = Pool::default();
    let mut handles = vec![0u32; 50];
    let cycle = |pool: &mut Pool, handles: &mut Vec<u32>| {
        for (i, h) in handles.iter_mut().enumerate() {
            // a mix of sparse and dense sets
            for s in 0..(i as u32 * 3 + 2) {
                pool.set(h, s, 1);
            }
        }
        assert!(pool.heap_bytes > 0);
        for (i, h) in handles.iter_mut().enumerate() {
            for s in 0..(i as u32 * 3 + 2) {
                pool.set(h, s, 0);
            }
            assert_eq!(*h, 0);
        }
        assert_eq!(pool.heap_bytes, 0);
        pool.memory_bytes()
    };
    let baseline = cycle(&mut pool, &mut handles);
    for _ in 0..5 {
        assert_eq!(cycle(&mut pool, &mut handles), baseline);
    }
}

/// A set of `map`'s holders in the sorted-list form.
fn sparse(map: &BTreeMap<u32, u8>) -> Set {
    Set::Sparse(map.iter().map(|(&s, &t)| pack(s, t)).collect())
}

/// A set of `map`'s holders in the bitmap form, `extra` words wider than needed.
fn dense(map: &BTreeMap<u32, u8>, extra: usize) -> Set {
    let words = map.keys().last().map_or(0, |s| (s / 64 + 1) as usize) + extra;
    let mut bits = vec![0u64; 3 * words];
    for (&s, &t) in map {
        for tier in 0..3 {
            if t >> tier & 1 == 1 {
                bits[tier * words + (s / 64) as usize] |= 1 << (s % 64);
            }
        }
    }
    Set::Dense { words, bits, count: map.len() as u32 }
}

fn holders_map() -> impl Strategy<Value = BTreeMap<u32, u8>> {
    proptest::collection::btree_map(0u32..200, 1u8..8, 0..12)
}

proptest! {
    /// `same_content` is what the content table trusts after a hash match:
    /// compared directly, in every pair of forms, with and without a patch,
    /// against a map model (equal contents made likely on purpose).
    #[test]
    fn same_content_agrees_with_a_map_model(
        b in holders_map(),
        patch in proptest::option::of((0u32..200, 0u8..8)),
        make_equal in any::<bool>(),
        other in holders_map(),
        forms in (any::<bool>(), any::<bool>(), 0usize..3, 0usize..3),
    ) {
        let mut want = b.clone();
        if let Some((slot, tiers)) = patch {
            if tiers == 0 { want.remove(&slot); } else { want.insert(slot, tiers); }
        }
        let a_map = if make_equal { want.clone() } else { other };
        let (a_dense, b_dense, a_extra, b_extra) = forms;
        let a = if a_dense { dense(&a_map, a_extra) } else { sparse(&a_map) };
        let bs = if b_dense { dense(&b, b_extra) } else { sparse(&b) };
        prop_assert_eq!(same_content(&a, &bs, patch), a_map == want,
            "a {:?} b {:?} patch {:?}", a_map, b, patch);
    }
}

#[test]
fn same_content_sees_one_tier_bit_of_a_patch_beyond_the_first_word() {
    let b: BTreeMap<u32, u8> = [(3, 1), (70, 1)].into();
    for (slot, tiers) in [(70u32, 2u8), (70, 4), (70, 6), (130, 2), (130, 4)] {
        let mut want = b.clone();
        want.insert(slot, tiers);
        let mut wrong = want.clone();
        wrong.insert(slot, tiers ^ 1);
        for (a_extra, b_extra) in [(0, 0), (0, 2), (2, 0)] {
            let bs = dense(&b, b_extra);
            assert!(same_content(&dense(&want, a_extra), &bs, Some((slot, tiers))), "{slot} {tiers}");
            assert!(!same_content(&dense(&wrong, a_extra), &bs, Some((slot, tiers))), "{slot} {tiers}");
            assert!(same_content(&sparse(&want), &bs, Some((slot, tiers))), "{slot} {tiers}");
        }
    }
}

#[test]
fn editing_out_an_absent_holder_changes_nothing() {
    let map: BTreeMap<u32, u8> = [(1, 1), (2, 3), (65, 4)].into();
    for mut set in [sparse(&map), dense(&map, 0)] {
        let before = set.clone();
        for slot in [0u32, 3, 64, 128, 200, 4000] {
            edit(&mut set, slot, 0);
        }
        assert_eq!(set, before);
    }
}

#[test]
fn check_refuses_a_handle_past_the_pool() {
    let mut pool = Pool::default();
    let mut h = 0u32;
    pool.set(&mut h, 1, 1);
    pool.set(&mut h, 2, 1);
    pool.check([h].into_iter()).unwrap();
    let err = pool.check([h, POOL_BIT | 0x63].into_iter()).unwrap_err();
    assert!(err.contains("free holder set"), "{err}");
}

/// Entries `slot << 3 | tiers` for `slots`, all with `tiers`.
fn entries(slots: impl Iterator<Item = u32>, tiers: u8) -> Vec<u32> {
    slots.map(|s| pack(s, tiers)).collect()
}

#[test]
fn reshape_switches_at_its_thresholds() {
    // 4 bitmap words (slots up to 255): bitmaps (96 B) beat a list of more
    // than 24 entries (4 B each)
    let at = |n: u32| entries((0..n - 1).chain([255]), 1);
    let mut s = Set::Sparse(at(24));
    reshape(&mut s);
    assert!(matches!(s, Set::Sparse(_)), "24 entries stay a list");
    let mut s = Set::Sparse(at(25));
    reshape(&mut s);
    let Set::Dense { words, count, .. } = s else { panic!("25 entries become bitmaps") };
    assert_eq!((words, count), (4, 25));
    // and back when fewer than 2 holders per word are left
    // holders in two tiers each, every pair of bitmaps
    let map = |n: u32| -> BTreeMap<u32, u8> {
        (0..n - 1).chain([255]).map(|s| (s, [0b101, 0b110, 0b011][s as usize % 3])).collect()
    };
    let dense = |n: u32| dense(&map(n), 0);
    let mut s = dense(8);
    reshape(&mut s);
    assert!(matches!(s, Set::Dense { count: 8, .. }), "8 holders in 4 words stay bitmaps");
    let mut s = dense(7);
    reshape(&mut s);
    assert_eq!(s, sparse(&map(7)), "every tier of every holder");
    // a list keeps its spare room up to twice its length plus 4
    let mut v = Vec::with_capacity(10);
    v.extend(entries(0..3, 2));
    let mut s = Set::Sparse(v);
    reshape(&mut s);
    assert!(matches!(&s, Set::Sparse(v) if v.capacity() == 10));
    let mut v = Vec::with_capacity(11);
    v.extend(entries(0..3, 2));
    let mut s = Set::Sparse(v);
    reshape(&mut s);
    assert!(matches!(&s, Set::Sparse(v) if v.capacity() == 3 && *v == entries(0..3, 2)));
}
