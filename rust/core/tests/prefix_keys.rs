//! Extra keys of every value kind give distinct, stable block keys (the
//! canonical serialization never lets two different values collide by
//! encoding), and tier names round-trip through `Tier::of_medium`.

use kvsync_core::prefix::{local_hash, DEFAULT_SEED};
use kvsync_core::{Tier, Value};

fn key(extras: &[Value<'_>]) -> u64 {
    local_hash(&[1, 2, 3, 4], extras, DEFAULT_SEED)
}

#[test]
fn every_kind_of_extra_key_gives_its_own_block_key() {
    // "Empty" or zero of every kind: only the kind tells them apart.
    let kinds = [
        Value::Nil,
        Value::Bool(false),
        Value::Int(0),
        Value::Float(0.0),
        Value::Str(""),
        Value::Bin(b""),
        Value::Array(vec![]),
        Value::Map(vec![]),
        Value::Ext(0, b""),
    ];
    let mut keys: Vec<u64> = kinds.iter().map(|v| key(std::slice::from_ref(v))).collect();
    keys.push(key(&[]));
    let mut distinct = keys.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), keys.len(), "{keys:x?}");
}

#[test]
fn extra_keys_hash_by_value_and_structure() {
    // The same value gives the same key (queries must find stored blocks).
    assert_eq!(key(&[Value::Float(1.5)]), key(&[Value::Float(1.5)]));
    let map = Value::Map(vec![(Value::Str("img"), Value::Int(7))]);
    assert_eq!(key(std::slice::from_ref(&map)), key(&[Value::Map(vec![(Value::Str("img"), Value::Int(7))])]));
    let ext = Value::Ext(3, b"ab");
    assert_eq!(key(std::slice::from_ref(&ext)), key(&[Value::Ext(3, b"ab")]));

    let pairs = [
        // float bits, not numeric equality
        (Value::Float(0.0), Value::Float(-0.0)),
        (Value::Float(1.5), Value::Float(2.5)),
        // a map is not the array of its keys and values
        (map.clone(), Value::Array(vec![Value::Str("img"), Value::Int(7)])),
        (map, Value::Map(vec![(Value::Str("img"), Value::Int(8))])),
        // ext type and data both count
        (ext.clone(), Value::Ext(4, b"ab")),
        (ext, Value::Ext(3, b"abc")),
        (Value::Nil, Value::Bool(true)),
    ];
    for (a, b) in pairs {
        assert_ne!(key(std::slice::from_ref(&a)), key(std::slice::from_ref(&b)), "{a:?} vs {b:?}");
    }
    // Grouping is unambiguous: [[nil], nil] is not [[nil, nil]].
    assert_ne!(key(&[Value::Array(vec![Value::Nil]), Value::Nil]), key(&[Value::Array(vec![Value::Nil, Value::Nil])]));
}

#[test]
fn tier_names_round_trip_through_media() {
    let tiers = [Tier::Gpu, Tier::Cpu, Tier::Storage];
    let names: Vec<&str> = tiers.iter().map(|t| t.name()).collect();
    assert_eq!(names, ["gpu", "cpu", "storage"]);
    for t in tiers {
        assert_eq!(Tier::of_medium(Some(t.name())), t);
        assert_eq!(Tier::of_medium(Some(&t.name().to_uppercase())), t);
    }
    assert_eq!(tiers.map(Tier::bit), [1, 2, 4]);
}
