//! The public `Stream` state machine against a recording sink: settings
//! validation, state names, the no-replay restart rule, stopped streams,
//! and how sink failures travel.

use kvsync_core::{ApplyStats, DecodeError, IndexError, Sink, State, Stream, StreamConfig, Todo};

/// Records what the stream applied and purged; fails every apply with
/// `fail` when set.
#[derive(Default)]
struct Rec {
    applied: Vec<Vec<u8>>,
    purges: u32,
    fail: Option<IndexError>,
}

impl Sink for Rec {
    fn apply(&mut self, payload: &[u8]) -> Result<ApplyStats, IndexError> {
        if let Some(e) = &self.fail {
            return Err(e.clone());
        }
        self.applied.push(payload.to_vec());
        Ok(ApplyStats { stored: 1, ..ApplyStats::default() })
    }
    fn purge(&mut self) -> Result<(), IndexError> {
        self.purges += 1;
        Ok(())
    }
}

/// A distinct stand-in payload per (engine, seq); the sink does not decode.
fn msg(engine: u8, seq: u64) -> Vec<u8> {
    format!("engine {engine} seq {seq}").into_bytes()
}

fn cfg(replay: bool) -> StreamConfig {
    StreamConfig {
        replay,
        replay_timeout: 1.0,
        clean_secs: 5.0,
        max_buffered: 100,
        idle_probe: 0.0,
        ..StreamConfig::default()
    }
}

#[test]
fn state_names_are_what_status_reports() {
    let names: Vec<&str> =
        [State::Connecting, State::Replaying, State::Live, State::Degraded, State::Disconnected, State::Stopped]
            .into_iter()
            .map(State::name)
            .collect();
    assert_eq!(names, ["connecting", "replaying", "live", "degraded", "disconnected", "stopped"]);
}

#[test]
fn invalid_settings_name_the_setting_and_the_value() {
    assert_eq!(StreamConfig::default().validate(), Ok(()));
    let cases: [(StreamConfig, &str); 6] = [
        (
            StreamConfig { replay_timeout: -1.0, ..StreamConfig::default() },
            "replay_timeout must be a finite number >= 0, got -1",
        ),
        (
            StreamConfig { replay_max: f64::NAN, ..StreamConfig::default() },
            "replay_max must be a finite number >= 0, got NaN",
        ),
        (
            StreamConfig { clean_secs: -0.5, ..StreamConfig::default() },
            "clean_secs must be a finite number >= 0, got -0.5",
        ),
        (
            StreamConfig { dead_after: f64::INFINITY, ..StreamConfig::default() },
            "dead_after must be a finite number >= 0, got inf",
        ),
        (
            StreamConfig { idle_probe: -3.0, ..StreamConfig::default() },
            "idle_probe must be a finite number >= 0, got -3",
        ),
        (StreamConfig { replay_timeout: 0.0, ..StreamConfig::default() }, "replay_timeout must be > 0"),
    ];
    for (c, want) in cases {
        assert_eq!(c.validate(), Err(IndexError::Invalid(want.into())), "{c:?}");
    }
    let buffers = IndexError::Invalid("max_buffered and max_buffered_bytes must be > 0".into());
    assert_eq!(StreamConfig { max_buffered: 0, ..StreamConfig::default() }.validate(), Err(buffers.clone()));
    assert_eq!(StreamConfig { max_buffered_bytes: 0, ..StreamConfig::default() }.validate(), Err(buffers.clone()));

    // A stream whose settings were broken after construction refuses to start.
    let mut s = Stream::new(cfg(true), None, 0);
    s.config.max_buffered = 0;
    let mut sink = Rec::default();
    assert_eq!(s.start(&mut sink, 0.0), Err(buffers));
    assert_eq!(s.state(), State::Connecting);
    assert!(sink.applied.is_empty());
}

#[test]
fn without_replay_a_resumed_position_is_dropped_at_start() {
    let mut s = Stream::new(cfg(false), Some(4), 77);
    assert_eq!(s.position(), (Some(4), 77));
    let mut sink = Rec::default();
    assert_eq!(s.start(&mut sink, 0.0), Ok(Todo::default()));
    // Nothing can verify what the engine did meanwhile: start over.
    assert_eq!(sink.purges, 1);
    assert_eq!(s.position(), (None, 0));
    assert_eq!(s.state(), State::Degraded);
    assert_eq!(s.counters().purges, 1);
}

#[test]
fn without_replay_a_sequence_regression_restarts_from_the_live_stream() {
    let mut s = Stream::new(cfg(false), None, 0);
    let mut sink = Rec::default();
    s.start(&mut sink, 0.0).unwrap();
    for seq in 0..3 {
        s.live(&mut sink, seq, &msg(1, seq), 1.0).unwrap();
    }
    assert_eq!(s.state(), State::Live);
    assert_eq!(s.last_event(), Some(1.0));

    // A new engine process: its seq 1 arrives; its seq 0 was never seen.
    assert_eq!(s.live(&mut sink, 1, &msg(2, 1), 2.0), Ok(Todo::default()));
    let c = s.counters();
    assert_eq!((c.resets, c.purges, c.lost, c.replays), (1, 1, 1, 0));
    assert_eq!(sink.purges, 1);
    assert_eq!(sink.applied.last(), Some(&msg(2, 1)));
    assert_eq!(s.last_seq(), Some(1));
    assert_eq!(s.state(), State::Degraded);
    assert_eq!(s.last_event(), Some(2.0));
}

#[test]
fn a_disconnect_is_timestamped_and_a_reconnect_without_replay_starts_over() {
    let mut s = Stream::new(cfg(false), None, 0);
    let mut sink = Rec::default();
    s.start(&mut sink, 0.0).unwrap();
    s.live(&mut sink, 0, &msg(1, 0), 0.0).unwrap();
    assert_eq!(s.disconnected_at(), None);
    s.disconnected(7.0);
    assert_eq!((s.state(), s.disconnected_at()), (State::Disconnected, Some(7.0)));
    assert_eq!(s.counters().disconnects, 1);
    assert_eq!(s.reconnected(&mut sink, 8.0), Ok(Todo::default()));
    assert_eq!(s.disconnected_at(), None);
    assert_eq!((s.state(), s.counters().resets, sink.purges), (State::Degraded, 1, 1));
}

#[test]
fn a_reconnect_before_start_waits_for_start() {
    let mut s = Stream::new(cfg(true), None, 0);
    let mut sink = Rec::default();
    assert_eq!(s.reconnected(&mut sink, 0.0), Ok(Todo::default()));
    assert_eq!(s.state(), State::Connecting);
    assert_eq!(s.counters().replays, 0);
    assert_eq!(s.start(&mut sink, 0.0), Ok(Todo { replay_from: Some(0) }));
}

#[test]
fn a_stopped_stream_ignores_every_input() {
    let mut s = Stream::new(StreamConfig { idle_probe: 1.0, ..cfg(true) }, None, 0);
    let mut sink = Rec::default();
    s.start(&mut sink, 0.0).unwrap();
    s.live(&mut sink, 3, &msg(1, 3), 0.0).unwrap();
    assert_eq!(s.buffered().0, 1);
    s.stop();
    assert_eq!((s.state(), s.buffered()), (State::Stopped, (0, 0)));
    assert_eq!(s.live(&mut sink, 0, &msg(1, 0), 1.0), Ok(Todo::default()));
    assert_eq!(s.tick(&mut sink, 100.0), Ok(Todo::default()));
    assert_eq!(s.reconnected(&mut sink, 101.0), Ok(Todo::default()));
    s.disconnected(102.0);
    assert_eq!(s.state(), State::Stopped);
    assert_eq!(s.disconnected_at(), None);
    assert!(sink.applied.is_empty());
    assert_eq!(sink.purges, 0);
    assert_eq!(s.counters().replays, 1, "only the start asked for a replay");
}

#[test]
fn sink_failures_other_than_decoding_reach_the_caller() {
    let mut s = Stream::new(cfg(false), None, 0);
    let disk = IndexError::Io { path: "/x".into(), message: "disk full".into(), errno: Some(28) };
    let mut sink = Rec { fail: Some(disk.clone()), ..Rec::default() };
    s.start(&mut sink, 0.0).unwrap();
    assert_eq!(s.live(&mut sink, 0, &msg(1, 0), 0.0), Err(disk));
    assert_eq!(s.counters().malformed, 0);
    // nothing was applied: the position did not move
    assert_eq!(s.position(), (None, 0));

    // A decode failure is the payload's fault: counted, skipped, and the
    // seq still counts as applied so the next one is not a gap.
    let mut s = Stream::new(cfg(false), None, 0);
    let mut sink = Rec { fail: Some(DecodeError::new("bad").into()), ..Rec::default() };
    s.start(&mut sink, 0.0).unwrap();
    assert_eq!(s.live(&mut sink, 0, &msg(1, 0), 0.0), Ok(Todo::default()));
    assert_eq!(s.live(&mut sink, 1, &msg(1, 1), 0.0), Ok(Todo::default()));
    let c = s.counters();
    assert_eq!((c.malformed, c.batches, c.gaps), (2, 0, 0));
    assert_eq!(s.last_seq(), Some(1));
}

#[test]
fn replay_replies_below_progress_are_duplicates_and_a_hole_twice_loses_history() {
    let mut s = Stream::new(cfg(true), None, 0);
    let mut sink = Rec::default();
    assert_eq!(s.start(&mut sink, 0.0), Ok(Todo { replay_from: Some(0) }));
    s.replayed(&mut sink, 0, &msg(1, 0), 0.0).unwrap();
    s.replayed(&mut sink, 1, &msg(1, 1), 0.0).unwrap();
    // The same reply again is applied once.
    s.replayed(&mut sink, 1, &msg(1, 1), 0.0).unwrap();
    assert_eq!(s.counters().duplicates, 1);
    assert_eq!(sink.applied, vec![msg(1, 0), msg(1, 1)]);
    // Seqs 2 and 3 are missing from the replay (the engine's replay socket
    // dropped them past its high-water mark): asked again from 2, nothing lost.
    assert_eq!(s.replayed(&mut sink, 4, &msg(1, 4), 0.0), Ok(Todo { replay_from: Some(1) }));
    assert_eq!((s.counters().lost, sink.purges, s.last_seq()), (0, 0, Some(1)));
    // The new replay (a probe of 1, then on) has the same hole: now it is lost.
    s.replayed(&mut sink, 1, &msg(1, 1), 0.1).unwrap();
    s.replayed(&mut sink, 4, &msg(1, 4), 0.1).unwrap();
    assert_eq!((s.counters().lost, sink.purges, s.last_seq()), (2, 1, Some(4)));
    assert_eq!(s.replay_end(&mut sink, 0.5), Ok(Todo::default()));
    assert_eq!(s.state(), State::Degraded);
    assert_eq!(sink.applied.last(), Some(&msg(1, 4)));
}

#[test]
fn a_hole_in_a_long_replay_is_asked_again_and_filled() {
    let mut s = Stream::new(cfg(true), None, 0);
    let mut sink = Rec::default();
    s.start(&mut sink, 0.0).unwrap();
    for seq in 0..3 {
        s.replayed(&mut sink, seq, &msg(1, seq), 0.0).unwrap();
    }
    // 3..5 dropped by the engine's replay socket; 6 arrives.
    assert_eq!(s.replayed(&mut sink, 6, &msg(1, 6), 0.0), Ok(Todo { replay_from: Some(2) }));
    // The re-asked replay starts with a probe of 2, then brings everything.
    for seq in 2..8 {
        s.replayed(&mut sink, seq, &msg(1, seq), 0.1).unwrap();
    }
    assert_eq!(s.replay_end(&mut sink, 0.2), Ok(Todo::default()));
    let c = s.counters();
    assert_eq!((c.lost, c.purges, c.gaps), (0, 0, 1));
    assert_eq!(sink.applied, (0..8).map(|q| msg(1, q)).collect::<Vec<_>>());
    assert_eq!(s.state(), State::Live);
}

#[test]
fn the_newest_replayed_batch_is_remembered_even_with_a_tiny_bound() {
    let mut s = Stream::new(StreamConfig { max_buffered: 1, ..cfg(true) }, None, 0);
    let mut sink = Rec::default();
    s.start(&mut sink, 0.0).unwrap();
    for seq in 0..3 {
        s.replayed(&mut sink, seq, &msg(1, seq), 0.0).unwrap();
    }
    s.replay_end(&mut sink, 0.0).unwrap();
    // The live copy of replayed seq 2 arrives late: a duplicate, not a restart.
    assert_eq!(s.live(&mut sink, 2, &msg(1, 2), 1.0), Ok(Todo::default()));
    let c = s.counters();
    assert_eq!((c.duplicates, c.resets, c.purges), (1, 0, 0));
    assert_eq!(sink.applied.len(), 3);
    assert_eq!(s.state(), State::Live);
}
