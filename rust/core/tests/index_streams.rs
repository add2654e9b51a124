//! The index's followed-stream API (`Index::follow` and the `stream_*`
//! inputs) as the transport drives it: what gets applied, what is refused
//! while a stream owns a worker, and which replay requests come back.

mod common;

use kvsync_core::wire::{self, Mode};
use kvsync_core::{Index, IndexError, Query, State, StreamConfig, Todo};

/// A batch storing block `h` (tokens `[h, h]`) chained from `parent`.
fn store(ts: f64, h: u64, parent: Option<u64>) -> Vec<u8> {
    common::stored(ts, h, parent, h)
}

/// Engine-side history: seq i stores block i+1 chained from block i.
fn batch(seq: u64) -> Vec<u8> {
    store(seq as f64, seq + 1, (seq > 0).then_some(seq))
}

/// Leading blocks of the chain 1, 2, 3, ... that worker `id` holds (0 when
/// it holds none or is unknown).
fn depth(ix: &Index, id: &str) -> u32 {
    let tokens: Vec<u32> = (1..=20).flat_map(|h| [h, h]).collect();
    ix.match_prefix(&Query::new("m", &tokens)).into_iter().find(|(w, _)| *w == id).map_or(0, |(_, d)| d)
}

fn no_replay() -> StreamConfig {
    StreamConfig { replay: false, idle_probe: 0.0, ..StreamConfig::default() }
}

fn with_replay(idle_probe: f64) -> StreamConfig {
    StreamConfig { replay: true, replay_timeout: 1.0, idle_probe, ..StreamConfig::default() }
}

#[test]
fn a_followed_worker_applies_live_messages_and_counts_malformed_frames() {
    let mut ix = Index::default();
    ix.follow("a", "m", no_replay()).unwrap();
    assert!(ix.is_followed("a"));
    assert_eq!(ix.workers(), vec![("a", "m")]);
    assert_eq!(ix.stream("a").unwrap().state(), State::Connecting);

    assert_eq!(ix.stream_start("a", 0.0).unwrap(), Todo::default());
    assert_eq!(ix.stream_live("a", Some(0), &batch(0), 1.0).unwrap(), Todo::default());
    assert_eq!(depth(&ix, "a"), 1);
    assert_eq!(ix.stream("a").unwrap().state(), State::Live);

    // A malformed seq frame is counted and changes nothing else.
    assert_eq!(ix.stream_live("a", None, &batch(1), 2.0).unwrap(), Todo::default());
    let s = ix.stream("a").unwrap();
    assert_eq!(s.counters().malformed, 1);
    assert_eq!(s.last_seq(), Some(0));
    assert_eq!(depth(&ix, "a"), 1);

    // Several messages at once, one of them with a malformed seq.
    let (b1, b2) = (batch(1), batch(2));
    let todo = ix.stream_live_many("a", [(Some(1), &b1[..]), (None, &b"junk"[..]), (Some(2), &b2[..])], 3.0).unwrap();
    assert_eq!(todo, Todo::default());
    assert_eq!(depth(&ix, "a"), 3);
    let s = ix.stream("a").unwrap();
    assert_eq!((s.last_seq(), s.counters().malformed, s.counters().batches), (Some(2), 2, 3));
    assert_eq!(s.last_event(), Some(3.0));
    assert_eq!(ix.last_seq("a").unwrap(), Some(2));

    // A replay reply with malformed frames is counted too.
    assert_eq!(ix.stream_replayed("a", None, b"", 4.0).unwrap(), Todo::default());
    assert_eq!(ix.stream("a").unwrap().counters().malformed, 3);
}

#[test]
fn following_twice_or_with_bad_settings_is_refused() {
    let mut ix = Index::default();
    ix.follow("a", "m", no_replay()).unwrap();
    let err = ix.follow("a", "m", no_replay()).unwrap_err();
    assert_eq!(err, IndexError::AlreadyFollowed("a".into()));
    assert_eq!(err.to_string(), "worker \"a\" is already followed");

    let bad = StreamConfig { replay_timeout: 0.0, ..StreamConfig::default() };
    let err = ix.follow("b", "m", bad).unwrap_err();
    assert_eq!(err, IndexError::Invalid("replay_timeout must be > 0".into()));
    // The settings are checked before the worker is registered.
    assert_eq!(ix.workers(), vec![("a", "m")]);
    assert!(!ix.is_followed("b"));
}

#[test]
fn following_a_registered_worker_resumes_from_its_position() {
    let mut ix = Index::default();
    ix.add_worker("s", "m").unwrap();
    ix.apply("s", &batch(0), Some(0)).unwrap();
    ix.set_position("s", Some(4), 99).unwrap();
    assert!(!ix.is_followed("s"));
    ix.follow("s", "m", with_replay(0.0)).unwrap();
    assert_eq!(ix.stream("s").unwrap().position(), (Some(4), 99));
    assert_eq!(ix.position("s").unwrap(), (Some(4), 99));
    // Starting verifies the resumed position with a probe of seq 4.
    assert_eq!(ix.stream_start("s", 0.0).unwrap(), Todo { replay_from: Some(4) });
    assert_eq!(ix.stream("s").unwrap().state(), State::Replaying);
}

#[test]
fn a_followed_worker_cannot_be_changed_behind_its_stream() {
    let mut ix = Index::default();
    ix.follow("a", "m", no_replay()).unwrap();
    ix.stream_start("a", 0.0).unwrap();
    ix.stream_live("a", Some(0), &batch(0), 0.0).unwrap();

    let followed = IndexError::Followed("a".into());
    assert_eq!(ix.remove_worker("a"), Err(followed.clone()));
    assert_eq!(ix.purge_worker("a"), Err(followed.clone()));
    assert_eq!(ix.set_position("a", Some(9), 1), Err(followed.clone()));
    assert_eq!(ix.apply("a", &batch(1), Some(1)), Err(followed.clone()));
    let b1 = batch(1);
    let decoded = wire::decode(&b1, Mode::Index).unwrap();
    assert_eq!(ix.apply_decoded("a", &decoded, Some(1)), Err(followed.clone()));
    assert!(followed.to_string().contains("followed by an event stream"), "{followed}");

    // Nothing of that reached the index.
    assert_eq!(depth(&ix, "a"), 1);
    assert_eq!(ix.last_seq("a").unwrap(), Some(0));
    assert_eq!(ix.worker_stats("a").unwrap().counters.purges, 0);
}

#[test]
fn stream_inputs_for_workers_without_a_stream_are_unknown_workers() {
    let mut ix = Index::default();
    ix.add_worker("plain", "m").unwrap();
    let plain = IndexError::UnknownWorker("plain".into());
    assert_eq!(ix.stream("plain").unwrap_err(), plain);
    assert_eq!(ix.stream_live("plain", Some(0), &batch(0), 0.0), Err(plain.clone()));
    assert_eq!(ix.stream_stop("plain"), Err(plain.clone()));
    assert_eq!(depth(&ix, "plain"), 0);
    let ghost = IndexError::UnknownWorker("ghost".into());
    assert_eq!(ix.stream("ghost").unwrap_err(), ghost);
    assert_eq!(ix.stream_start("ghost", 0.0), Err(ghost.clone()));
    assert_eq!(ghost.to_string(), "unknown worker \"ghost\"");
    assert!(!ix.is_followed("ghost"));
    assert!(!ix.is_followed("plain"));
    assert_eq!(ix.streams().count(), 0);
}

#[test]
fn a_stopped_stream_keeps_its_holdings_until_unfollowed() {
    let mut ix = Index::default();
    ix.follow("a", "m", no_replay()).unwrap();
    ix.follow("b", "m", no_replay()).unwrap();
    for id in ["a", "b"] {
        ix.stream_start(id, 0.0).unwrap();
        ix.stream_live(id, Some(0), &batch(0), 0.0).unwrap();
    }
    ix.stream_stop("a").unwrap();
    assert_eq!(ix.stream("a").unwrap().state(), State::Stopped);
    // Later messages are ignored, the holdings stay.
    ix.stream_live("a", Some(1), &batch(1), 1.0).unwrap();
    assert_eq!(depth(&ix, "a"), 1);
    assert_eq!(ix.last_seq("a").unwrap(), Some(0));

    let states: Vec<(&str, State)> = ix.streams().map(|(id, s)| (id, s.state())).collect();
    assert_eq!(states, vec![("a", State::Stopped), ("b", State::Live)]);

    assert!(ix.unfollow("a"));
    assert!(!ix.is_followed("a"));
    assert_eq!(depth(&ix, "a"), 0);
    assert_eq!(ix.workers(), vec![("b", "m")]);
    assert_eq!(ix.stream("a").unwrap_err(), IndexError::UnknownWorker("a".into()));
    assert!(!ix.unfollow("a"), "a second unfollow finds nothing");
    assert_eq!(depth(&ix, "b"), 1);
    ix.check_invariants().unwrap();
}

#[test]
fn live_many_returns_the_replay_request_of_a_gap() {
    let mut ix = Index::default();
    ix.follow("r", "m", with_replay(0.0)).unwrap();
    assert_eq!(ix.stream_start("r", 0.0).unwrap(), Todo { replay_from: Some(0) });
    ix.stream_replayed("r", Some(0), &batch(0), 0.0).unwrap();
    ix.stream_replay_end("r", 0.0).unwrap();
    assert_eq!(ix.stream("r").unwrap().state(), State::Live);

    let (b1, b3) = (batch(1), batch(3));
    let todo = ix.stream_live_many("r", [(Some(1), &b1[..]), (Some(3), &b3[..])], 1.0).unwrap();
    // Seq 2 is missing: ask from the last applied one (1), as a probe.
    assert_eq!(todo, Todo { replay_from: Some(1) });
    let s = ix.stream("r").unwrap();
    assert_eq!((s.state(), s.last_seq(), s.buffered().0), (State::Replaying, Some(1), 1));
    assert_eq!(depth(&ix, "r"), 2);
}

#[test]
fn tick_asks_for_probes_of_silent_followed_workers_only() {
    let mut ix = Index::default();
    ix.add_worker("plain", "m").unwrap();
    ix.follow("quiet", "m", no_replay()).unwrap();
    ix.follow("p", "m", with_replay(1.0)).unwrap();
    ix.stream_start("quiet", 0.0).unwrap();
    ix.stream_live("quiet", Some(0), &batch(0), 0.0).unwrap();
    ix.stream_start("p", 0.0).unwrap();
    ix.stream_replayed("p", Some(0), &batch(0), 0.0).unwrap();
    ix.stream_replay_end("p", 0.0).unwrap();

    assert_eq!(ix.stream_tick(0.5).unwrap(), vec![]);
    // Silent for idle_probe seconds: probe the last applied seq.
    assert_eq!(ix.stream_tick(2.0).unwrap(), vec![("p".to_owned(), 0)]);
    assert_eq!(ix.stream("p").unwrap().state(), State::Replaying);
    assert_eq!(ix.stream("quiet").unwrap().state(), State::Live);
}

#[test]
fn a_publisher_gone_past_dead_after_is_purged_and_counted() {
    let mut ix = Index::default();
    let cfg = StreamConfig { dead_after: 10.0, ..no_replay() };
    ix.follow("a", "m", cfg).unwrap();
    ix.stream_start("a", 0.0).unwrap();
    ix.stream_live("a", Some(0), &batch(0), 1.0).unwrap();
    ix.stream_disconnected("a", 2.0).unwrap();
    assert_eq!(ix.stream("a").unwrap().state(), State::Disconnected);
    ix.stream_tick(5.0).unwrap();
    assert_eq!(depth(&ix, "a"), 1, "kept until dead_after");
    ix.stream_tick(12.5).unwrap();
    assert_eq!(depth(&ix, "a"), 0);
    assert_eq!(ix.worker_stats("a").unwrap().counters.purges, 1);
}
