//! Every case of the shared wire vectors decodes to exactly the expected
//! events, so `cargo test` alone gates a decoder change (the Python suite
//! checks the same data through the bindings).
//!
//! The vectors live in `shared/testdata/wire` beside the repository
//! (`$KVSYNC_SHARED` overrides); `manifest.json` there describes the
//! normalized form compared against here. Without them the tests print why
//! and pass, as the Python suite skips.

use std::fmt::Write as _;
use std::path::PathBuf;

use kvsync_core::wire::{self, Batch, EngineHash, Event, Mode, Value};
use kvsync_core::Index;
use serde_json::{json, Map, Value as Json};

fn wire_dir() -> Option<PathBuf> {
    let shared = std::env::var_os("KVSYNC_SHARED")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"), PathBuf::from);
    let dir = shared.join("testdata").join("wire");
    if dir.join("manifest.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: wire test vectors not found at {}: clone the shared data beside the repo \
             (../shared) or set KVSYNC_SHARED",
            dir.display()
        );
        None
    }
}

fn manifest(dir: &std::path::Path) -> Json {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json is readable");
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd-length hex {s:?}");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit")).collect()
}

fn norm_hash(h: Option<EngineHash<'_>>) -> Json {
    match h {
        None => Json::Null,
        Some(EngineHash::Unsigned(v)) => json!(format!("i:{v}")),
        Some(EngineHash::Negative(v)) => json!(format!("i:{v}")),
        Some(EngineHash::Bytes(b)) => json!(format!("b:{}", hex(b))),
    }
}

fn norm_value(v: &Value<'_>) -> Json {
    match v {
        Value::Nil => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => {
            if let Ok(v) = i64::try_from(*i) {
                json!(v)
            } else {
                json!(u64::try_from(*i).expect("msgpack ints fit i64 or u64"))
            }
        }
        Value::Float(f) => json!(f),
        Value::Str(s) => json!(s),
        Value::Bin(b) | Value::Ext(_, b) => json!({ "bin": hex(b) }),
        Value::Array(items) => Json::Array(items.iter().map(norm_value).collect()),
        Value::Map(pairs) => Json::Object(
            pairs
                .iter()
                .map(|(k, v)| {
                    let Value::Str(k) = k else { panic!("non-str map key {k:?} in a generic value") };
                    ((*k).to_owned(), norm_value(v))
                })
                .collect(),
        ),
    }
}

fn opt<T: Into<Json>>(v: Option<T>) -> Json {
    v.map_or(Json::Null, Into::into)
}

/// The value of event field `name` in the manifest's normalized form (null
/// when absent, nil, or not a field of this event type).
fn field(batch: &Batch<'_>, ev: &Event<'_>, name: &str) -> Json {
    let hashes =
        |r: &std::ops::Range<usize>| Json::Array(batch.hashes[r.clone()].iter().map(|h| norm_hash(Some(*h))).collect());
    let other =
        |other: &[(&str, Value<'_>)]| other.iter().find(|(n, _)| *n == name).map_or(Json::Null, |(_, v)| norm_value(v));
    match ev {
        Event::Stored(s) => match name {
            "block_hashes" => hashes(&s.hashes),
            "parent_block_hash" => norm_hash(s.parent),
            "token_ids" => json!(batch.tokens[s.tokens.clone()]),
            "block_size" => opt(s.block_size),
            "lora_id" => opt(s.lora_id),
            "medium" => opt(s.medium),
            "lora_name" => opt(s.lora_name),
            "extra_keys" => s.extra_keys.as_ref().map_or(Json::Null, |per_block| {
                Json::Array(
                    per_block
                        .iter()
                        .map(|b| {
                            b.as_ref().map_or(Json::Null, |keys| Json::Array(keys.iter().map(norm_value).collect()))
                        })
                        .collect(),
                )
            }),
            "group_idx" => opt(s.group_idx),
            "kv_cache_spec_kind" => opt(s.kv_cache_spec_kind),
            _ => other(&s.other),
        },
        Event::Removed(r) => match name {
            "block_hashes" => hashes(&r.hashes),
            "medium" => opt(r.medium),
            "group_idx" => opt(r.group_idx),
            _ => other(&r.other),
        },
        Event::Cleared => Json::Null,
    }
}

/// Decode `payload` and compare with the normalized `expect`. `strict`:
/// fields the release does not have must come out null (not for array-form
/// events with extra trailing elements, which look like a newer layout).
fn check_batch(what: &str, payload: &[u8], expect: &Json, strict: bool) {
    let batch = wire::decode(payload, Mode::Full).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(json!(batch.ts), expect["ts"], "{what}: ts");
    assert_eq!(opt(batch.dp_rank), expect["dp_rank"], "{what}: dp_rank");
    let want = expect["events"].as_array().expect("events is a list");
    assert_eq!(batch.events.len(), want.len(), "{what}: number of events");
    for (i, (ev, want)) in batch.events.iter().zip(want).enumerate() {
        let want = want.as_object().expect("an event is an object");
        assert_eq!(json!(ev.type_name()), want["type"], "{what}: event {i} type");
        let mut got = Map::new();
        got.insert("type".into(), json!(ev.type_name()));
        for name in want.keys().filter(|k| *k != "type") {
            got.insert(name.clone(), field(&batch, ev, name));
        }
        assert_eq!(&got, want, "{what}: event {i}");
        if strict {
            for name in wire::EVENT_FIELDS.iter().filter(|n| !want.contains_key(**n)) {
                assert_eq!(field(&batch, ev, name), Json::Null, "{what}: event {i} has {name}, not in its release");
            }
        }
    }
}

fn block_events(expect: &Json) -> u64 {
    expect["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("block_hashes").and_then(Json::as_array))
        .map(|h| h.len() as u64)
        .sum()
}

#[test]
fn every_case_decodes_as_expected() {
    let Some(dir) = wire_dir() else { return };
    let m = manifest(&dir);
    let cases = m["cases"].as_array().expect("cases is a list");
    assert!(cases.len() >= 74, "only {} cases in the manifest", cases.len());
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let payload = std::fs::read(dir.join(case["payload"].as_str().unwrap())).unwrap();
        let expect = &case["expect"];
        let mut ix = Index::new(None).unwrap();
        ix.add_worker("w", "m").unwrap();
        if expect.get("error") == Some(&json!(true)) {
            for mode in [Mode::Full, Mode::Index] {
                let e = wire::decode(&payload, mode).expect_err(id);
                assert!(!e.to_string().is_empty(), "{id}: the error must say what was wrong");
            }
            assert!(ix.apply("w", &payload, None).is_err(), "{id}: the index took it");
            assert_eq!(ix.stats().holdings, 0, "{id}");
            continue;
        }
        check_batch(id, &payload, expect, id != "malformed/unknown_fields_array");
        // The index decodes the same events (Mode::Index keeps fewer fields).
        let full = wire::decode(&payload, Mode::Full).unwrap();
        let lean = wire::decode(&payload, Mode::Index).unwrap();
        assert_eq!(full.events.len(), lean.events.len(), "{id}");
        assert_eq!((&full.hashes, &full.tokens), (&lean.hashes, &lean.tokens), "{id}");
        let stats = ix.apply("w", &payload, None).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(stats.stored + stats.removed + stats.skipped, block_events(expect), "{id}: block events");
        let cleared = expect["events"].as_array().unwrap().iter().filter(|e| e["type"] == "AllBlocksCleared").count();
        assert_eq!(stats.cleared, cleared as u64, "{id}: cleared");
        ix.check_invariants().unwrap();
    }
}

#[test]
fn captured_live_and_replay_payloads_decode() {
    let Some(dir) = wire_dir() else { return };
    let m = manifest(&dir);
    let frames = m["frames"].as_array().expect("frames is a list");
    assert!(!frames.is_empty());
    for path in frames {
        let path = path.as_str().unwrap();
        let cap: Json = serde_json::from_str(&std::fs::read_to_string(dir.join(path)).unwrap()).unwrap();
        let expect_of = |seq: &[u8]| -> &Json {
            let seq = u64::from_be_bytes(seq.try_into().expect("8-byte seq"));
            cap["expect"].as_array().unwrap().iter().find(|e| e["seq"] == json!(seq)).expect("an expectation per seq")
        };
        let topic = cap["topic"].as_str().unwrap().as_bytes();
        let hexes = |msg: &Json| -> Vec<Vec<u8>> {
            msg.as_array().unwrap().iter().map(|f| unhex(f.as_str().unwrap())).collect()
        };
        let mut seen = 0;
        let live = cap["live"].as_array().unwrap();
        for msg in live {
            let f = hexes(msg);
            assert_eq!(f.len(), 3, "{path}: a live message is [topic, seq, payload]");
            assert_eq!(f[0], topic, "{path}");
            check_batch(path, &f[2], expect_of(&f[1]), true);
            seen += 1;
        }
        let replay = cap["replay_response"].as_array().unwrap();
        for msg in replay {
            let f = hexes(msg);
            let (seq, payload) = (&f[f.len() - 2], &f[f.len() - 1]);
            if seq.as_slice() == [0xff; 8] {
                assert!(payload.is_empty(), "{path}: the end marker has an empty payload");
                continue;
            }
            check_batch(path, payload, expect_of(seq), true);
            seen += 1;
        }
        assert_eq!(seen, live.len() + replay.len() - 1, "{path}: every message but the end marker");
    }
}
