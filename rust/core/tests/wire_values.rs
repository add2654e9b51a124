//! Generic msgpack values inside events: fields the decoder keeps as
//! [`Value`]s (`metadata` in full mode) come back exactly, fields it does
//! not know are skipped whatever their type, and nesting is bounded.

use kvsync_core::wire::{decode, EngineHash, Event, Mode, Value};
use rmp::encode as enc;

/// A map-form `BlockStored` of one block (hash 7, tokens [1, 1]) with the
/// raw msgpack `value` under `key`.
fn stored_with(key: &str, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    enc::write_array_len(&mut b, 3).unwrap();
    enc::write_f64(&mut b, 1.0).unwrap();
    enc::write_array_len(&mut b, 1).unwrap();
    enc::write_map_len(&mut b, 5).unwrap();
    enc::write_str(&mut b, "type").unwrap();
    enc::write_str(&mut b, "BlockStored").unwrap();
    enc::write_str(&mut b, key).unwrap();
    b.extend_from_slice(value);
    enc::write_str(&mut b, "block_hashes").unwrap();
    enc::write_array_len(&mut b, 1).unwrap();
    enc::write_uint(&mut b, 7).unwrap();
    enc::write_str(&mut b, "parent_block_hash").unwrap();
    enc::write_nil(&mut b).unwrap();
    enc::write_str(&mut b, "token_ids").unwrap();
    enc::write_array_len(&mut b, 2).unwrap();
    enc::write_uint(&mut b, 1).unwrap();
    enc::write_uint(&mut b, 1).unwrap();
    enc::write_nil(&mut b).unwrap();
    b
}

fn raw(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    f(&mut v);
    v
}

fn ext(len: u32, ty: i8, fill: u8) -> Vec<u8> {
    raw(|w| {
        enc::write_ext_meta(w, len, ty).unwrap();
        w.extend(std::iter::repeat_n(fill, len as usize));
    })
}

/// Every kind of msgpack value with what full mode must give back.
fn samples() -> Vec<(Vec<u8>, Value<'static>)> {
    static BIG: [u8; 70_000] = [4; 70_000];
    vec![
        (raw(|w| enc::write_nil(w).unwrap()), Value::Nil),
        (raw(|w| enc::write_bool(w, true).unwrap()), Value::Bool(true)),
        (raw(|w| enc::write_bool(w, false).unwrap()), Value::Bool(false)),
        (raw(|w| enc::write_f32(w, 1.5).unwrap()), Value::Float(1.5)),
        (raw(|w| enc::write_f64(w, -2.25).unwrap()), Value::Float(-2.25)),
        (
            raw(|w| {
                enc::write_uint(w, u64::MAX).unwrap();
            }),
            Value::Int(i128::from(u64::MAX)),
        ),
        (
            raw(|w| {
                enc::write_sint(w, -5).unwrap();
            }),
            Value::Int(-5),
        ),
        (raw(|w| enc::write_str(w, "hi").unwrap()), Value::Str("hi")),
        (raw(|w| enc::write_bin(w, &[1, 2, 3]).unwrap()), Value::Bin(&[1, 2, 3])),
        (
            raw(|w| {
                enc::write_array_len(w, 2).unwrap();
                enc::write_uint(w, 1).unwrap();
                enc::write_str(w, "x").unwrap();
            }),
            Value::Array(vec![Value::Int(1), Value::Str("x")]),
        ),
        (
            raw(|w| {
                enc::write_map_len(w, 1).unwrap();
                enc::write_str(w, "k").unwrap();
                enc::write_uint(w, 2).unwrap();
            }),
            Value::Map(vec![(Value::Str("k"), Value::Int(2))]),
        ),
        (ext(1, 5, 9), Value::Ext(5, &[9])),
        (ext(2, -1, 1), Value::Ext(-1, &[1, 1])),
        (ext(4, 2, 2), Value::Ext(2, &[2; 4])),
        (ext(8, 3, 3), Value::Ext(3, &[3; 8])),
        (ext(16, 4, 4), Value::Ext(4, &[4; 16])),
        (ext(3, 6, 6), Value::Ext(6, &[6; 3])),
        (ext(300, 7, 7), Value::Ext(7, &[7; 300])),
        (ext(70_000, 8, 4), Value::Ext(8, &BIG)),
    ]
}

fn check_block(ev: &Event<'_>, hashes: &[EngineHash<'_>], tokens: &[u32]) {
    let Event::Stored(st) = ev else { panic!("not a store: {ev:?}") };
    assert_eq!(&hashes[st.hashes.clone()], &[EngineHash::Unsigned(7)]);
    assert_eq!(&tokens[st.tokens.clone()], &[1, 1]);
}

#[test]
fn full_mode_keeps_every_kind_of_value_exactly() {
    for (bytes, want) in samples() {
        let p = stored_with("metadata", &bytes);
        let b = decode(&p, Mode::Full).unwrap_or_else(|e| panic!("{want:?}: {e}"));
        check_block(&b.events[0], &b.hashes, &b.tokens);
        let Event::Stored(st) = &b.events[0] else { unreachable!() };
        let got: Vec<&Value<'_>> = st.other.iter().filter(|(k, _)| *k == "metadata").map(|(_, v)| v).collect();
        assert_eq!(got, vec![&want]);
    }
}

#[test]
fn unknown_fields_of_every_kind_are_skipped_in_both_modes() {
    for (bytes, what) in samples() {
        let p = stored_with("from_a_newer_release", &bytes);
        for mode in [Mode::Index, Mode::Full] {
            let b = decode(&p, mode).unwrap_or_else(|e| panic!("{what:?} in {mode:?}: {e}"));
            assert_eq!(b.events.len(), 1);
            check_block(&b.events[0], &b.hashes, &b.tokens);
        }
    }
}

fn nested(depth: usize) -> Vec<u8> {
    raw(|w| {
        for _ in 0..depth {
            enc::write_array_len(w, 1).unwrap();
        }
        enc::write_nil(w).unwrap();
    })
}

#[test]
fn values_nested_too_deep_are_rejected_where_they_are() {
    for key in ["metadata", "from_a_newer_release"] {
        for mode in [Mode::Index, Mode::Full] {
            assert!(decode(&stored_with(key, &nested(20)), mode).is_ok(), "{key} {mode:?}");
            let e = decode(&stored_with(key, &nested(40)), mode).unwrap_err();
            assert_eq!(e.reason, "values nested deeper than 32", "{key} {mode:?}");
            assert_eq!((e.event, e.field.as_deref()), (Some(0), Some(key)));
            assert!(e.offset.is_some());
        }
    }
}

#[test]
fn malformed_generic_values_are_errors_naming_the_field() {
    let reserved = [0xc1u8];
    for key in ["metadata", "from_a_newer_release"] {
        for mode in [Mode::Index, Mode::Full] {
            let e = decode(&stored_with(key, &reserved), mode).unwrap_err();
            assert!(e.reason.starts_with("expected a msgpack value"), "{mode:?}: {e}");
            assert_eq!((e.event, e.field.as_deref()), (Some(0), Some(key)), "{mode:?}: {e}");
        }
    }
}

#[test]
fn payloads_cut_inside_a_generic_value_are_errors_naming_the_field() {
    let f32v = raw(|w| enc::write_f32(w, 1.5).unwrap());
    let f64v = raw(|w| enc::write_f64(w, 1.5).unwrap());
    for key in ["metadata", "from_a_newer_release"] {
        for value in [&f32v, &f64v, &ext(4, 1, 1), &ext(300, 1, 1)] {
            let p = stored_with(key, value);
            let at = p.windows(key.len()).position(|w| w == key.as_bytes()).unwrap() + key.len();
            let cut = &p[..at + 2];
            for mode in [Mode::Index, Mode::Full] {
                let e = decode(cut, mode).unwrap_err();
                assert_eq!((e.event, e.field.as_deref()), (Some(0), Some(key)), "{value:?} {mode:?}: {e}");
            }
        }
    }
}
