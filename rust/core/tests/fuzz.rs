//! Fuzzing of the decoder and the index with proptest: no input may panic.
//!
//! CI runs the default case counts below (a few seconds). A long run:
//!
//! ```sh
//! PROPTEST_CASES=2000000 cargo test --release -p kvsync-core --test fuzz
//! ```
//!
//! Two sources of input: arbitrary bytes (exercises the first-byte paths and
//! length checks), and valid payloads built from random events then mutated
//! (byte flips, truncation, splices), which reach deep into the decoder.

use kvsync_core::{decode, Index, Mode, Query};
use proptest::prelude::*;
use rmp::encode as enc;

#[derive(Debug, Clone)]
enum Ev {
    Stored { hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: Option<u8>, extra: bool, map: bool },
    Removed { hashes: Vec<u64>, map: bool },
    Cleared,
    Unknown,
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        (
            proptest::collection::vec(0u64..8, 0..4),
            proptest::option::of(0u64..8),
            proptest::collection::vec(0u32..5, 0..12),
            proptest::option::of(0u8..5),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(hashes, parent, tokens, bs, extra, map)| Ev::Stored {
                hashes,
                parent,
                tokens,
                bs,
                extra,
                map
            }),
        (proptest::collection::vec(0u64..8, 0..4), any::<bool>()).prop_map(|(hashes, map)| Ev::Removed { hashes, map }),
        Just(Ev::Cleared),
        Just(Ev::Unknown),
    ]
}

fn write_u64s(b: &mut Vec<u8>, v: &[u64]) {
    enc::write_array_len(b, v.len() as u32).unwrap();
    for h in v {
        enc::write_uint(b, *h).unwrap();
    }
}

fn encode(events: &[Ev], envelope: u32) -> Vec<u8> {
    let mut b = Vec::new();
    enc::write_array_len(&mut b, envelope).unwrap();
    enc::write_f64(&mut b, 1.0).unwrap();
    enc::write_array_len(&mut b, events.len() as u32).unwrap();
    for e in events {
        match e {
            Ev::Stored { hashes, parent, tokens, bs, extra, map } => {
                if *map {
                    enc::write_map_len(&mut b, if *extra { 6 } else { 5 }).unwrap();
                    enc::write_str(&mut b, "type").unwrap();
                    enc::write_str(&mut b, "BlockStored").unwrap();
                    enc::write_str(&mut b, "block_hashes").unwrap();
                } else {
                    enc::write_array_len(&mut b, if *extra { 9 } else { 5 }).unwrap();
                    enc::write_str(&mut b, "BlockStored").unwrap();
                }
                write_u64s(&mut b, hashes);
                if *map {
                    enc::write_str(&mut b, "parent_block_hash").unwrap();
                }
                match parent {
                    Some(p) => enc::write_uint(&mut b, *p).map(|_| ()).unwrap(),
                    None => enc::write_nil(&mut b).unwrap(),
                }
                if *map {
                    enc::write_str(&mut b, "token_ids").unwrap();
                }
                enc::write_array_len(&mut b, tokens.len() as u32).unwrap();
                for t in tokens {
                    enc::write_uint(&mut b, u64::from(*t)).unwrap();
                }
                if *map {
                    enc::write_str(&mut b, "block_size").unwrap();
                }
                match bs {
                    Some(s) => enc::write_uint(&mut b, u64::from(*s)).map(|_| ()).unwrap(),
                    None => enc::write_nil(&mut b).unwrap(),
                }
                if *extra {
                    if *map {
                        enc::write_str(&mut b, "extra_keys").unwrap();
                    } else {
                        // lora_id, medium, lora_name, then extra_keys
                        enc::write_nil(&mut b).unwrap();
                        enc::write_str(&mut b, "CPU").unwrap();
                        enc::write_str(&mut b, "adapter").unwrap();
                    }
                    enc::write_array_len(&mut b, hashes.len() as u32).unwrap();
                    for (i, _) in hashes.iter().enumerate() {
                        if i % 2 == 0 {
                            enc::write_array_len(&mut b, 2).unwrap();
                            enc::write_str(&mut b, "adapter").unwrap();
                            enc::write_sint(&mut b, -(i as i64)).unwrap();
                        } else {
                            enc::write_nil(&mut b).unwrap();
                        }
                    }
                }
            }
            Ev::Removed { hashes, map } => {
                if *map {
                    enc::write_map_len(&mut b, 2).unwrap();
                    enc::write_str(&mut b, "type").unwrap();
                    enc::write_str(&mut b, "BlockRemoved").unwrap();
                    enc::write_str(&mut b, "block_hashes").unwrap();
                } else {
                    enc::write_array_len(&mut b, 2).unwrap();
                    enc::write_str(&mut b, "BlockRemoved").unwrap();
                }
                write_u64s(&mut b, hashes);
            }
            Ev::Cleared => {
                enc::write_array_len(&mut b, 1).unwrap();
                enc::write_str(&mut b, "AllBlocksCleared").unwrap();
            }
            Ev::Unknown => {
                enc::write_map_len(&mut b, 2).unwrap();
                enc::write_str(&mut b, "type").unwrap();
                enc::write_str(&mut b, "BlockMoved").unwrap();
                enc::write_str(&mut b, "to").unwrap();
                enc::write_map_len(&mut b, 1).unwrap();
                enc::write_sint(&mut b, -5).unwrap();
                enc::write_bin(&mut b, &[1, 2, 3]).unwrap();
            }
        }
    }
    for _ in 2..envelope {
        enc::write_nil(&mut b).unwrap();
    }
    b
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
    /// Overwrite the bytes at a position with a container or string header
    /// that claims about 2^32 elements (or bytes): the decoder must not trust it.
    Huge(usize, u8),
}

/// Headers that claim far more than any payload holds: array32, map32,
/// str32, bin32, ext32, array16, map16.
const HUGE_HEADERS: [&[u8]; 7] = [
    &[0xdd, 0xff, 0xff, 0xff, 0xff],
    &[0xdf, 0xff, 0xff, 0xff, 0xfe],
    &[0xdb, 0xff, 0xff, 0xff, 0xff],
    &[0xc6, 0x7f, 0xff, 0xff, 0xff],
    &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
    &[0xdc, 0xff, 0xff],
    &[0xde, 0xff, 0xff],
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Flip(i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Insert(i, v)),
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), any::<u8>()).prop_map(|(i, k)| Mutation::Huge(i, k)),
    ]
}

fn mutate(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if b.is_empty() {
            break;
        }
        let n = b.len();
        match *m {
            Mutation::Flip(i, v) => b[i % n] ^= v | 1,
            Mutation::Truncate(i) => b.truncate(i % n),
            Mutation::Insert(i, v) => b.insert(i % n, v),
            Mutation::Remove(i) => {
                b.remove(i % n);
            }
            Mutation::Huge(i, k) => {
                let h = HUGE_HEADERS[usize::from(k) % HUGE_HEADERS.len()];
                let at = i % n;
                let end = (at + h.len()).min(n);
                b.splice(at..end, h.iter().copied());
            }
        }
    }
    b
}

/// Decode in both modes and apply; everything must return, never panic,
/// and the index must stay internally consistent.
fn exercise(ix: &mut Index, payload: &[u8]) {
    let full = decode(payload, Mode::Full);
    let lean = decode(payload, Mode::Index);
    assert_eq!(full.is_ok(), lean.is_ok(), "modes disagree on validity");
    if let (Ok(f), Ok(l)) = (&full, &lean) {
        assert_eq!(f.events.len(), l.events.len());
        assert_eq!(f.tokens, l.tokens);
    }
    let applied = ix.apply("w", payload, None);
    assert_eq!(applied.is_ok(), lean.is_ok());
    let _ = ix.match_prefix(&Query::new("m", &[0, 1, 2, 3, 4, 0, 1, 2]));
    ix.check_invariants().unwrap();
}

fn fresh() -> Index {
    let mut ix = Index::new(Some(16)).unwrap();
    ix.add_worker("w", "m").unwrap();
    ix
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut ix = fresh();
        exercise(&mut ix, &bytes);
    }

    #[test]
    fn mutated_payloads_never_panic(
        batches in proptest::collection::vec((proptest::collection::vec(ev(), 0..5), 2u32..5), 1..4),
        muts in proptest::collection::vec(mutation(), 0..4),
    ) {
        let mut ix = fresh();
        for (events, envelope) in &batches {
            let valid = encode(events, *envelope);
            prop_assert!(decode(&valid, Mode::Full).is_ok(), "generator produced an invalid payload");
            exercise(&mut ix, &valid);
            exercise(&mut ix, &mutate(valid, &muts));
        }
    }

    /// Valid payloads with lying length headers planted where a header was
    /// (or anywhere): every one must be rejected or decoded, never abort.
    #[test]
    fn planted_huge_lengths_are_rejected(
        events in proptest::collection::vec(ev(), 1..6),
        plants in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        at_headers in any::<bool>(),
    ) {
        let mut ix = fresh();
        let mut b = encode(&events, 3);
        for (i, k) in plants {
            // Aim at existing array/map headers (where the decoder reserves)
            // half of the time, at any byte otherwise.
            let heads: Vec<usize> = b.iter().enumerate()
                .filter(|(_, x)| matches!(**x, 0x90..=0x9f | 0x80..=0x8f | 0xdc..=0xdf))
                .map(|(p, _)| p)
                .collect();
            let pos = if at_headers && !heads.is_empty() { heads[i % heads.len()] } else { i };
            b = mutate(b, &[Mutation::Huge(pos, k)]);
        }
        if at_headers {
            // (A plant at any byte may land inside a string, and stay valid.)
            let lean = decode(&b, Mode::Index);
            prop_assert!(lean.is_err(), "a claim of >= 65535 elements in a {}-byte payload was accepted", b.len());
        }
        exercise(&mut ix, &b);
    }
}
