//! The decoder's memory is bounded by what a payload really holds, not by the
//! lengths it claims.
//!
//! A msgpack array header can claim 2^32-1 elements in five bytes. A decoder
//! that reserves room for the claimed count (even capped by the bytes left)
//! lets a few-MB payload reserve gigabytes and abort the process. This test
//! counts every allocation of the process (one `#[test]`, so nothing else
//! allocates meanwhile) and decodes crafted payloads whose length headers
//! lie at every level the decoder reserves for.

use std::sync::atomic::Ordering;

use counting::PEAK;
#[path = "common/counting.rs"]
mod counting;

use kvsync_core::wire::{decode, Mode};
use kvsync_core::Index;
use rmp::encode as enc;

/// Bytes allocated at the peak of `f`, above what was live before it.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = counting::live();
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed) - base)
}

/// Size of each crafted payload. The filler after the lying header is 0xc1,
/// the one byte msgpack never uses, so decoding stops at the first element
/// and whatever was allocated by then came from trusting the header.
const SIZE: usize = 1 << 20;

fn pad(mut b: Vec<u8>) -> Vec<u8> {
    b.resize(SIZE, 0xc1);
    b
}

fn envelope(b: &mut Vec<u8>, events: u32) {
    enc::write_array_len(b, 3).unwrap();
    enc::write_f64(b, 1.0).unwrap();
    enc::write_array_len(b, events).unwrap();
}

fn huge_array(b: &mut Vec<u8>) {
    enc::write_array_len(b, u32::MAX).unwrap();
}

/// A map-form `BlockStored` whose fields up to (not including) `field` are
/// valid, then `field` as key: the caller writes its lying value.
fn map_store_until(b: &mut Vec<u8>, field: &str) {
    enc::write_map_len(b, 16).unwrap();
    enc::write_str(b, "type").unwrap();
    enc::write_str(b, "BlockStored").unwrap();
    if field != "block_hashes" {
        enc::write_str(b, "block_hashes").unwrap();
        enc::write_array_len(b, 1).unwrap();
        enc::write_uint(b, 7).unwrap();
    }
    enc::write_str(b, field).unwrap();
}

/// An array-form (vLLM 0.23) `BlockStored` up to position `pos` (0 =
/// block_hashes, 2 = token_ids, 7 = extra_keys), valid before it.
fn array_store_until(b: &mut Vec<u8>, pos: usize) {
    enc::write_array_len(b, 12).unwrap();
    enc::write_str(b, "BlockStored").unwrap();
    let before: [fn(&mut Vec<u8>); 7] = [
        |b| {
            enc::write_array_len(b, 1).unwrap();
            enc::write_uint(b, 7).unwrap();
        },
        |b| enc::write_nil(b).unwrap(),
        |b| enc::write_array_len(b, 0).map(|_| ()).unwrap(),
        |b| enc::write_uint(b, 4).map(|_| ()).unwrap(),
        |b| enc::write_nil(b).unwrap(),
        |b| enc::write_str(b, "GPU").unwrap(),
        |b| enc::write_nil(b).unwrap(),
    ];
    for w in &before[..pos] {
        w(b);
    }
}

fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut case = |name: &'static str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = Vec::new();
        f(&mut b);
        out.push((name, pad(b)));
    };
    case("events array", &|b| {
        enc::write_array_len(b, 3).unwrap();
        enc::write_f64(b, 1.0).unwrap();
        huge_array(b);
    });
    case("map event block_hashes", &|b| {
        envelope(b, 1);
        map_store_until(b, "block_hashes");
        huge_array(b);
    });
    case("map event token_ids", &|b| {
        envelope(b, 1);
        map_store_until(b, "token_ids");
        huge_array(b);
    });
    case("array event block_hashes", &|b| {
        envelope(b, 1);
        array_store_until(b, 0);
        huge_array(b);
    });
    case("array event token_ids", &|b| {
        envelope(b, 1);
        array_store_until(b, 2);
        huge_array(b);
    });
    case("huge events array, then huge token_ids", &|b| {
        enc::write_array_len(b, 3).unwrap();
        enc::write_f64(b, 1.0).unwrap();
        huge_array(b);
        map_store_until(b, "token_ids");
        huge_array(b);
    });
    case("map event extra_keys (per block)", &|b| {
        envelope(b, 1);
        map_store_until(b, "extra_keys");
        huge_array(b);
    });
    case("array event extra_keys (per block)", &|b| {
        envelope(b, 1);
        array_store_until(b, 7);
        huge_array(b);
    });
    case("extra_keys of one block", &|b| {
        envelope(b, 1);
        map_store_until(b, "extra_keys");
        enc::write_array_len(b, 1).unwrap();
        huge_array(b);
    });
    case("extra_keys nested 30 deep, each level huge", &|b| {
        envelope(b, 1);
        map_store_until(b, "extra_keys");
        for _ in 0..30 {
            huge_array(b);
        }
    });
    case("extra_keys nested maps, each level huge", &|b| {
        envelope(b, 1);
        map_store_until(b, "extra_keys");
        huge_array(b);
        huge_array(b);
        for _ in 0..20 {
            enc::write_map_len(b, u32::MAX).unwrap();
            enc::write_str(b, "k").unwrap();
        }
    });
    case("every level huge: events, per block, keys, values", &|b| {
        enc::write_array_len(b, 3).unwrap();
        enc::write_f64(b, 1.0).unwrap();
        huge_array(b);
        map_store_until(b, "extra_keys");
        for _ in 0..30 {
            huge_array(b);
        }
    });
    case("generic field lookahead_token_ids", &|b| {
        envelope(b, 1);
        map_store_until(b, "lookahead_token_ids");
        for _ in 0..30 {
            huge_array(b);
        }
    });
    case("sglang metadata map", &|b| {
        envelope(b, 1);
        array_store_until(b, 6);
        for _ in 0..30 {
            enc::write_map_len(b, u32::MAX).unwrap();
            enc::write_str(b, "k").unwrap();
        }
    });
    out
}

#[test]
fn lying_length_headers_allocate_little() {
    // Decoding a payload legitimately needs a few times its size at most;
    // the claims here are worth 2^32 elements each.
    let limit = 3 * SIZE + (64 << 10);
    let mut ix = Index::new(Some(4)).unwrap();
    ix.add_worker("w", "m").unwrap();
    let mut failures = Vec::new();
    for (name, payload) in cases() {
        assert_eq!(payload.len(), SIZE);
        for mode in [Mode::Index, Mode::Full] {
            let (r, peak) = peak_of(|| decode(&payload, mode).map(|b| b.events.len()));
            let err = r.expect_err(name);
            assert!(!err.reason.is_empty(), "{name}: {err}");
            if peak > limit {
                failures.push(format!("{name} ({mode:?}): decode peaked at {peak} bytes for a {SIZE}-byte payload"));
            }
        }
        let (r, peak) = peak_of(|| ix.apply("w", &payload, None).map(|_| ()));
        assert!(r.is_err(), "{name}: the index took a lying payload");
        if peak > limit {
            failures.push(format!("{name}: Index::apply peaked at {peak} bytes for a {SIZE}-byte payload"));
        }
    }
    assert!(failures.is_empty(), "allocations beyond {limit} bytes:\n{}", failures.join("\n"));
    ix.check_invariants().unwrap();
}
