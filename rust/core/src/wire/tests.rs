//! Unit tests of the decoder: layouts, buffer reuse, limits, and the
//! structured location of errors.

use rmp::encode as w;

use super::*;

fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    f(&mut v);
    v
}

#[test]
fn map_form_store_with_tag_last() {
    let p = enc(|w| {
        rmp::encode::write_array_len(w, 3).unwrap();
        rmp::encode::write_f64(w, 1.5).unwrap();
        rmp::encode::write_array_len(w, 1).unwrap();
        rmp::encode::write_map_len(w, 5).unwrap();
        rmp::encode::write_str(w, "block_hashes").unwrap();
        rmp::encode::write_array_len(w, 1).unwrap();
        rmp::encode::write_uint(w, u64::MAX).unwrap();
        rmp::encode::write_str(w, "parent_block_hash").unwrap();
        rmp::encode::write_nil(w).unwrap();
        rmp::encode::write_str(w, "token_ids").unwrap();
        rmp::encode::write_array_len(w, 2).unwrap();
        rmp::encode::write_uint(w, 7).unwrap();
        rmp::encode::write_uint(w, 70000).unwrap();
        rmp::encode::write_str(w, "block_size").unwrap();
        rmp::encode::write_uint(w, 2).unwrap();
        rmp::encode::write_str(w, "type").unwrap();
        rmp::encode::write_str(w, "BlockStored").unwrap();
        rmp::encode::write_nil(w).unwrap();
    });
    let b = decode(&p, Mode::Index).unwrap();
    assert_eq!(b.ts.to_bits(), 1.5f64.to_bits());
    assert_eq!(b.dp_rank, None);
    assert_eq!(b.hashes, vec![EngineHash::Unsigned(u64::MAX)]);
    assert_eq!(b.tokens, vec![7, 70000]);
    let Event::Stored(s) = &b.events[0] else { panic!("not a store") };
    assert_eq!(s.block_size, Some(2));
}

#[test]
fn rejects_with_location() {
    let p = enc(|w| {
        rmp::encode::write_array_len(w, 3).unwrap();
        rmp::encode::write_f64(w, 1.5).unwrap();
        rmp::encode::write_array_len(w, 1).unwrap();
        rmp::encode::write_array_len(w, 4).unwrap();
        rmp::encode::write_str(w, "BlockStored").unwrap();
        rmp::encode::write_array_len(w, 0).unwrap();
        rmp::encode::write_nil(w).unwrap();
        rmp::encode::write_uint(w, 5).unwrap();
        rmp::encode::write_nil(w).unwrap();
    });
    let e = decode(&p, Mode::Index).unwrap_err();
    assert!(e.to_string().contains("event 0 field token_ids: expected array of token ids, got int"), "{e}");
}

#[test]
fn buffers_are_reused_between_decodes() {
    let payload = enc(|b| {
        rmp::encode::write_array_len(b, 3).unwrap();
        rmp::encode::write_f64(b, 1.0).unwrap();
        rmp::encode::write_array_len(b, 1).unwrap();
        rmp::encode::write_array_len(b, 5).unwrap();
        rmp::encode::write_str(b, "BlockStored").unwrap();
        rmp::encode::write_array_len(b, 1).unwrap();
        rmp::encode::write_uint(b, 7).unwrap();
        rmp::encode::write_nil(b).unwrap();
        rmp::encode::write_array_len(b, 2).unwrap();
        rmp::encode::write_uint(b, 1).unwrap();
        rmp::encode::write_uint(b, 2).unwrap();
        rmp::encode::write_uint(b, 2).unwrap();
        rmp::encode::write_nil(b).unwrap();
    });
    let mut bufs = Buffers::default();
    let first = decode_with(&payload, Mode::Index, &mut bufs).unwrap();
    assert_eq!(first, decode(&payload, Mode::Index).unwrap());
    let (events, hashes, tokens) =
        (first.events.as_ptr() as usize, first.hashes.as_ptr() as usize, first.tokens.as_ptr());
    bufs.recycle(first);
    let second = decode_with(&payload, Mode::Index, &mut bufs).unwrap();
    // the same allocations, not new ones
    assert_eq!(second.events.as_ptr() as usize, events);
    assert_eq!(second.hashes.as_ptr() as usize, hashes);
    assert_eq!(second.tokens.as_ptr(), tokens);
    assert_eq!(second.tokens, vec![1, 2]);
}

#[test]
fn huge_length_prefix_does_not_allocate() {
    // array32 claiming 4 billion events, then nothing
    let p = [0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff];
    assert!(decode(&p, Mode::Full).is_err());
}

#[test]
fn deep_nesting_is_rejected_not_overflowing() {
    let mut p = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x91, 0x83];
    // an unknown field nested 100000 deep
    p.extend([0xa4, b't', b'y', b'p', b'e', 0xab]);
    p.extend(b"BlockStored");
    p.extend([0xa1, b'x']);
    p.extend(std::iter::repeat_n(0x91, 100_000));
    p.push(0xc0);
    let e = decode(&p, Mode::Index).unwrap_err();
    assert!(e.to_string().contains("nested deeper"), "{e}");
}

/// `[1.5, [events...], nil]` with the events written by `f`; `f` returns
/// the byte offset it wants checked.
fn batch(n_events: u32, f: impl FnOnce(&mut Vec<u8>) -> usize) -> (Vec<u8>, usize) {
    let mut b = Vec::new();
    w::write_array_len(&mut b, 3).unwrap();
    w::write_f64(&mut b, 1.5).unwrap();
    w::write_array_len(&mut b, n_events).unwrap();
    let at = f(&mut b);
    w::write_nil(&mut b).unwrap();
    (b, at)
}

fn cleared(b: &mut Vec<u8>) {
    w::write_array_len(b, 1).unwrap();
    w::write_str(b, "AllBlocksCleared").unwrap();
}

#[test]
fn error_names_event_field_and_byte() {
    let (p, at) = batch(2, |b| {
        cleared(b);
        w::write_map_len(b, 3).unwrap();
        w::write_str(b, "type").unwrap();
        w::write_str(b, "BlockStored").unwrap();
        w::write_str(b, "block_hashes").unwrap();
        w::write_array_len(b, 0).unwrap();
        w::write_str(b, "token_ids").unwrap();
        let at = b.len();
        w::write_str(b, "oops").unwrap();
        at
    });
    let e = decode(&p, Mode::Index).unwrap_err();
    assert_eq!(e.reason, "expected array of token ids, got str");
    assert_eq!((e.event, e.field.as_deref(), e.offset), (Some(1), Some("token_ids"), Some(at)));
    assert_eq!(e.to_string(), format!("event 1 field token_ids: expected array of token ids, got str (byte {at})"));
}

#[test]
fn truncation_inside_a_field_is_located() {
    let (mut p, _) = batch(1, |b| {
        w::write_array_len(b, 2).unwrap();
        w::write_str(b, "BlockRemoved").unwrap();
        w::write_array_len(b, 2).unwrap();
        w::write_uint(b, u64::MAX).unwrap();
        w::write_uint(b, u64::MAX).unwrap();
        0
    });
    // cut the second hash after its marker and 3 of its 8 bytes
    p.truncate(p.len() - 1 - 5);
    let e = decode(&p, Mode::Full).unwrap_err();
    assert!(e.reason.starts_with("truncated payload"), "{e}");
    assert_eq!((e.event, e.field.as_deref()), (Some(0), Some("block_hashes")));
    // the 8-byte read starts right after the second hash's marker
    assert_eq!(e.offset, Some(p.len() - 3));
}

#[test]
fn envelope_errors_name_the_element() {
    let mut p = Vec::new();
    w::write_array_len(&mut p, 3).unwrap();
    w::write_str(&mut p, "noon").unwrap();
    let e = decode(&p, Mode::Index).unwrap_err();
    assert_eq!((e.event, e.field.as_deref(), e.offset), (None, Some("ts"), Some(1)));
    assert!(e.reason.contains("expected float"), "{e}");

    let (mut p, _) = batch(1, |b| {
        cleared(b);
        0
    });
    let end = p.len();
    p.extend([0xc0, 0xc0]);
    let e = decode(&p, Mode::Index).unwrap_err();
    assert_eq!(e.reason, "2 trailing bytes after the batch");
    assert_eq!((e.event, e.field, e.offset), (None, None, Some(end)));
}

#[test]
fn errors_in_unknown_fields_and_extra_keys_are_located() {
    // an unknown key whose value is not msgpack (0xc1)
    let (p, at) = batch(3, |b| {
        cleared(b);
        cleared(b);
        w::write_map_len(b, 2).unwrap();
        w::write_str(b, "type").unwrap();
        w::write_str(b, "BlockRemoved").unwrap();
        w::write_str(b, "future_field").unwrap();
        w::write_array_len(b, 1).unwrap();
        let at = b.len();
        b.push(0xc1);
        at
    });
    let e = decode(&p, Mode::Full).unwrap_err();
    assert_eq!((e.event, e.field.as_deref(), e.offset), (Some(2), Some("future_field"), Some(at)));
    assert_eq!(e.reason, "expected a msgpack value, got reserved byte 0xc1");

    // extra_keys with 2 entries for 1 block: found at the end of the event,
    // reported at the field
    let (p, at) = batch(1, |b| {
        w::write_map_len(b, 3).unwrap();
        w::write_str(b, "type").unwrap();
        w::write_str(b, "BlockStored").unwrap();
        w::write_str(b, "extra_keys").unwrap();
        let at = b.len();
        w::write_array_len(b, 2).unwrap();
        w::write_nil(b).unwrap();
        w::write_nil(b).unwrap();
        w::write_str(b, "block_hashes").unwrap();
        w::write_array_len(b, 1).unwrap();
        w::write_uint(b, 9).unwrap();
        at
    });
    let e = decode(&p, Mode::Index).unwrap_err();
    assert_eq!((e.event, e.field.as_deref(), e.offset), (Some(0), Some("extra_keys"), Some(at)));
    assert_eq!(e.reason, "2 entries for 1 blocks (need one per block)");
}

#[test]
fn array_positions_follow_the_field_lists() {
    // vLLM 0.33's array layout with a distinct value at every position
    let (p, _) = batch(1, |b| {
        w::write_array_len(b, 1 + BLOCK_STORED_FIELDS.len() as u32).unwrap();
        w::write_str(b, "BlockStored").unwrap();
        w::write_array_len(b, 1).unwrap();
        w::write_uint(b, 11).unwrap();
        w::write_uint(b, 10).unwrap();
        w::write_array_len(b, 2).unwrap();
        w::write_uint(b, 1).unwrap();
        w::write_uint(b, 2).unwrap();
        w::write_uint(b, 2).unwrap();
        w::write_uint(b, 7).unwrap();
        w::write_str(b, "CPU").unwrap();
        w::write_str(b, "adapter").unwrap();
        w::write_array_len(b, 1).unwrap();
        w::write_array_len(b, 1).unwrap();
        w::write_str(b, "mm").unwrap();
        w::write_uint(b, 3).unwrap();
        w::write_str(b, "sliding_window").unwrap();
        w::write_uint(b, 128).unwrap();
        w::write_str(b, "local").unwrap();
        w::write_str(b, "owned").unwrap();
        w::write_str(b, "session").unwrap();
        w::write_array_len(b, 1).unwrap();
        w::write_uint(b, 5).unwrap();
        0
    });
    let b = decode(&p, Mode::Full).unwrap();
    let Event::Stored(s) = &b.events[0] else { panic!("not a store") };
    assert_eq!(
        (b.hashes.as_slice(), s.parent),
        ([EngineHash::Unsigned(11)].as_slice(), Some(EngineHash::Unsigned(10)))
    );
    assert_eq!((b.tokens.as_slice(), s.block_size, s.lora_id), ([1, 2].as_slice(), Some(2), Some(7)));
    assert_eq!((s.medium, s.lora_name, s.group_idx), (Some("CPU"), Some("adapter"), Some(3)));
    assert_eq!(s.extra_keys, Some(vec![Some(vec![Value::Str("mm")])]));
    assert_eq!(s.kv_cache_spec_kind, Some("sliding_window"));
    let other: Vec<&str> = s.other.iter().map(|(n, _)| *n).collect();
    assert_eq!(other, BLOCK_STORED_FIELDS[10..]);
    assert_eq!(s.other[0].1, Value::Int(128));
    assert_eq!(s.other[4].1, Value::Array(vec![Value::Int(5)]));
}

#[test]
fn field_lists_agree() {
    assert_eq!(BLOCK_STORED_FIELDS.len() + SGLANG_STORED_FIELDS.len(), EVENT_FIELDS.len());
    assert_eq!(BLOCK_STORED_FIELDS.last(), Some(&"lookahead_token_ids"));
    assert_eq!(SGLANG_STORED_FIELDS, ["cache_salt", "metadata"]);
    assert!(BLOCK_REMOVED_FIELDS.iter().all(|f| EVENT_FIELDS.contains(f)));
    assert_eq!(EVENT_TYPES.iter().map(|t| t.len()).collect::<Vec<_>>(), [11, 12, 16]);
}
