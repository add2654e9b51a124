//! What users read when something fails: `DecodeError` says where (payload,
//! event, field, byte) in a fixed order, and each `IndexError` names its
//! input.

use kvsync_core::{DecodeError, IndexError};

#[test]
fn decode_errors_say_where_in_a_fixed_order() {
    let full =
        DecodeError::new("expected array, got str").at_field("token_ids").at_event(3).at_offset(41).in_payload(2);
    assert_eq!(full.to_string(), "payload 2: event 3 field token_ids: expected array, got str (byte 41)");
    assert_eq!(DecodeError::new("bad").at_event(1).to_string(), "event 1: bad");
    assert_eq!(DecodeError::new("bad").at_field("medium").to_string(), "medium: bad");
    assert_eq!(DecodeError::new("bad").in_payload(0).to_string(), "payload 0: bad");
    assert_eq!(DecodeError::new("bad").at_offset(0).to_string(), "bad (byte 0)");
    assert_eq!(DecodeError::new("bad").to_string(), "bad");
}

#[test]
fn context_added_on_the_way_out_never_overrides_the_inner_location() {
    let inner = DecodeError::new("bad").at_event(2).at_field("block_hashes");
    let outer = inner.within_event(5).within_field("event");
    assert_eq!((outer.event, outer.field.as_deref()), (Some(2), Some("block_hashes")));
    let bare = DecodeError::new("bad").within_event(5).within_field("medium");
    assert_eq!(bare.to_string(), "event 5 field medium: bad");
}

#[test]
fn index_errors_name_their_input() {
    let decode: IndexError = DecodeError::new("truncated").at_offset(9).into();
    assert_eq!(decode.to_string(), "truncated (byte 9)");
    let cases = [
        (IndexError::UnknownWorker("w1".into()), "unknown worker \"w1\""),
        (
            IndexError::ModelMismatch { worker: "w1".into(), existing: "a".into(), requested: "b".into() },
            "worker \"w1\" is registered for model \"a\", not \"b\"",
        ),
        (
            IndexError::Invalid("capacity_blocks must be at least 1".into()),
            "invalid argument: capacity_blocks must be at least 1",
        ),
        (IndexError::Snapshot("bad magic".into()), "snapshot: bad magic"),
        (
            IndexError::Io { path: "/tmp/x.snap".into(), message: "No space left".into(), errno: Some(28) },
            "/tmp/x.snap: No space left",
        ),
        (IndexError::AlreadyFollowed("p/dp0".into()), "worker \"p/dp0\" is already followed"),
    ];
    for (e, want) in cases {
        assert_eq!(e.to_string(), want);
    }
    let followed = IndexError::Followed("w1".into()).to_string();
    assert!(followed.starts_with("worker \"w1\" is followed by an event stream"), "{followed}");
    assert!(followed.contains("EventManager.remove_pod"), "{followed}");
}
