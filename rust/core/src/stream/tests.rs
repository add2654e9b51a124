//! Unit tests of the stream state machine against a real index (no sockets).

use super::*;
use crate::index::{ApplyStats, Index};

/// The stream's sink: worker "w" of the index.
struct Sk<'a>(&'a mut Index);

impl Sink for Sk<'_> {
    fn apply(&mut self, payload: &[u8]) -> Result<ApplyStats, IndexError> {
        self.0.apply("w", payload, None)
    }
    fn purge(&mut self) -> Result<(), IndexError> {
        self.0.purge_worker("w")
    }
}
use crate::Query;
use rmp::encode as enc;

/// A batch storing one block `h` (tokens `[h, h]`, block size 2) chained
/// from `parent`, stamped with `ts` so batches differ.
fn store(ts: f64, h: u64, parent: Option<u64>) -> Vec<u8> {
    let mut b = Vec::new();
    enc::write_array_len(&mut b, 3).unwrap();
    enc::write_f64(&mut b, ts).unwrap();
    enc::write_array_len(&mut b, 1).unwrap();
    enc::write_map_len(&mut b, 5).unwrap();
    enc::write_str(&mut b, "type").unwrap();
    enc::write_str(&mut b, "BlockStored").unwrap();
    enc::write_str(&mut b, "block_hashes").unwrap();
    enc::write_array_len(&mut b, 1).unwrap();
    enc::write_uint(&mut b, h).unwrap();
    enc::write_str(&mut b, "parent_block_hash").unwrap();
    match parent {
        Some(p) => drop(enc::write_uint(&mut b, p).unwrap()),
        None => enc::write_nil(&mut b).unwrap(),
    }
    enc::write_str(&mut b, "token_ids").unwrap();
    enc::write_array_len(&mut b, 2).unwrap();
    enc::write_uint(&mut b, h).unwrap();
    enc::write_uint(&mut b, h).unwrap();
    enc::write_str(&mut b, "block_size").unwrap();
    enc::write_uint(&mut b, 2).unwrap();
    enc::write_nil(&mut b).unwrap();
    b
}

/// Engine-side history: seq i stores block i+1 chained from block i.
fn batch(seq: u64) -> Vec<u8> {
    store(seq as f64, seq + 1, (seq > 0).then_some(seq))
}

fn setup(replay: bool) -> (Index, Stream) {
    let mut ix = Index::default();
    ix.add_worker("w", "m").unwrap();
    let cfg = StreamConfig {
        replay,
        replay_timeout: 1.0,
        clean_secs: 5.0,
        max_buffered: 100,
        idle_probe: 0.0,
        ..StreamConfig::default()
    };
    (ix, Stream::new(cfg, None, 0))
}

/// Start the stream and replay the engine's first `n` batches.
fn started(ix: &mut Index, s: &mut Stream, n: u64) {
    s.start(&mut Sk(ix), 0.0).unwrap();
    for seq in 0..n {
        s.replayed(&mut Sk(ix), seq, &batch(seq), 0.0).unwrap();
    }
    s.replay_end(&mut Sk(ix), 0.0).unwrap();
}

/// Leading blocks of the chain 1, 2, 3, ... held by the worker.
fn depth(ix: &Index) -> u32 {
    let tokens: Vec<u32> = (1..=40).flat_map(|h| [h, h]).collect();
    ix.match_prefix(&Query::new("m", &tokens))[0].1
}

#[test]
fn fresh_start_replays_then_flushes_buffered_live_messages() {
    let (mut ix, mut s) = setup(true);
    assert_eq!(s.start(&mut Sk(&mut ix), 0.0).unwrap().replay_from, Some(0));
    assert_eq!(s.state(), State::Replaying);
    // live messages arrive while the replay runs
    for seq in 2..5 {
        s.live(&mut Sk(&mut ix), seq, &batch(seq), 0.1).unwrap();
    }
    for seq in 0..3 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 0.2).unwrap();
    }
    assert_eq!(depth(&ix), 3);
    s.replay_end(&mut Sk(&mut ix), 0.3).unwrap();
    assert_eq!(s.state(), State::Live);
    assert_eq!(depth(&ix), 5);
    assert_eq!(s.last_seq(), Some(4));
    let c = s.counters();
    assert_eq!((c.batches, c.duplicates, c.purges, c.lost), (5, 1, 0, 0));
    assert_eq!(s.position().0, Some(4));
}

#[test]
fn gap_is_filled_by_replay() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    s.replay_end(&mut Sk(&mut ix), 0.0).unwrap();
    s.live(&mut Sk(&mut ix), 0, &batch(0), 0.1).unwrap();
    s.live(&mut Sk(&mut ix), 1, &batch(1), 0.1).unwrap();
    // seq 2 and 3 were dropped
    let todo = s.live(&mut Sk(&mut ix), 4, &batch(4), 0.2).unwrap();
    // asked from the last applied seq: the reply proves it is the same engine
    assert_eq!(todo.replay_from, Some(1));
    for seq in 1..5 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 0.3).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 0.3).unwrap();
    assert_eq!((s.state(), depth(&ix)), (State::Live, 5));
    let c = s.counters();
    assert_eq!((c.gaps, c.replays, c.lost, c.purges), (1, 2, 0, 0));
}

#[test]
fn gap_beyond_the_engine_buffer_purges_and_degrades() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    assert_eq!(s.live(&mut Sk(&mut ix), 9, &batch(9), 1.0).unwrap().replay_from, Some(2));
    // the engine only has 7.. left
    for seq in 7..10 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 1.1).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 1.2).unwrap();
    assert_eq!(s.state(), State::Degraded);
    let c = s.counters();
    // 3..6 are gone, and 2 (the probe's seq) cannot be verified
    assert_eq!((c.lost, c.purges), (5, 1));
    // blocks 1..3 were purged; 8.. are orphans of a purged chain
    assert_eq!(depth(&ix), 0);
    assert_eq!(ix.stats().holdings, 0);
    s.tick(&mut Sk(&mut ix), 3.0).unwrap();
    assert_eq!(s.state(), State::Degraded);
    s.tick(&mut Sk(&mut ix), 6.3).unwrap();
    assert_eq!(s.state(), State::Live);
}

#[test]
fn regression_means_restart_purge_and_replay_from_zero() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 4);
    assert_eq!(depth(&ix), 4);
    // restarted engine, new history: seq 0 stores block 100
    let fresh = store(50.0, 100, None);
    assert_eq!(s.live(&mut Sk(&mut ix), 0, &fresh, 1.0).unwrap().replay_from, Some(0));
    assert_eq!(ix.stats().holdings, 0);
    s.replayed(&mut Sk(&mut ix), 0, &fresh, 1.1).unwrap();
    s.replay_end(&mut Sk(&mut ix), 1.1).unwrap();
    assert_eq!(s.state(), State::Live);
    assert_eq!(ix.stats().holdings, 1);
    assert_eq!(s.counters().resets, 1);
}

#[test]
fn idle_restart_is_found_by_the_reconnect_probe() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    // reconnect; the restarted engine has nothing buffered
    assert_eq!(s.reconnected(&mut Sk(&mut ix), 1.0).unwrap().replay_from, Some(2));
    assert_eq!(s.replay_end(&mut Sk(&mut ix), 1.1).unwrap().replay_from, Some(0));
    assert_eq!((ix.stats().holdings, s.counters().resets), (0, 1));
    s.replay_end(&mut Sk(&mut ix), 1.2).unwrap();
    assert_eq!(s.state(), State::Live);
}

#[test]
fn reconnect_probe_of_the_same_engine_keeps_everything() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    assert_eq!(s.reconnected(&mut Sk(&mut ix), 1.0).unwrap().replay_from, Some(2));
    for seq in 2..5 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 1.1).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 1.1).unwrap();
    assert_eq!((s.state(), depth(&ix), s.counters().purges), (State::Live, 5, 0));
}

#[test]
fn reconnect_probe_with_another_batch_under_the_seq_is_a_restart() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    s.reconnected(&mut Sk(&mut ix), 1.0).unwrap();
    let todo = s.replayed(&mut Sk(&mut ix), 2, &store(99.0, 7, None), 1.1).unwrap();
    assert_eq!(todo.replay_from, Some(0));
    assert_eq!((ix.stats().holdings, s.counters().resets), (0, 1));
}

#[test]
fn resume_from_snapshot_probes_then_continues() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    let mut snap = Vec::new();
    ix.save(&mut snap).unwrap();
    let mut ix = Index::load(&mut snap.as_slice()).unwrap();
    let (last, digest) = s.position();
    assert_eq!(last, Some(2));
    let mut s = Stream::new(s.config, last, digest);
    assert_eq!(s.start(&mut Sk(&mut ix), 5.0).unwrap().replay_from, Some(2));
    for seq in 2..6 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 5.1).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 5.1).unwrap();
    assert_eq!((s.state(), depth(&ix), s.counters().purges), (State::Live, 6, 0));
}

#[test]
fn without_replay_endpoint_a_gap_purges() {
    let (mut ix, mut s) = setup(false);
    assert_eq!(s.start(&mut Sk(&mut ix), 0.0).unwrap().replay_from, None);
    // late join: the first message is taken as the start, the earlier
    // batches are reported lost
    s.live(&mut Sk(&mut ix), 5, &store(5.0, 1, None), 0.0).unwrap();
    s.live(&mut Sk(&mut ix), 6, &store(6.0, 2, Some(1)), 0.0).unwrap();
    assert_eq!((s.state(), depth(&ix), s.counters().lost), (State::Degraded, 2, 5));
    s.tick(&mut Sk(&mut ix), 5.0).unwrap();
    assert_eq!(s.state(), State::Live);
    s.live(&mut Sk(&mut ix), 9, &store(9.0, 3, Some(2)), 6.0).unwrap();
    assert_eq!(s.state(), State::Degraded);
    let c = s.counters();
    assert_eq!((c.gaps, c.lost, c.purges), (1, 7, 1));
    assert_eq!(depth(&ix), 0);
    // and a reconnect cannot be checked: purge
    s.reconnected(&mut Sk(&mut ix), 2.0).unwrap();
    assert_eq!(s.counters().purges, 2);
}

#[test]
fn replay_timeout_purges_and_goes_on_from_live() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    s.live(&mut Sk(&mut ix), 7, &store(7.0, 1, None), 0.5).unwrap();
    s.live(&mut Sk(&mut ix), 8, &store(8.0, 2, Some(1)), 0.6).unwrap();
    s.tick(&mut Sk(&mut ix), 0.9).unwrap();
    assert_eq!(s.state(), State::Replaying);
    s.tick(&mut Sk(&mut ix), 1.0).unwrap();
    assert_eq!(s.state(), State::Degraded);
    assert_eq!((depth(&ix), s.last_seq(), s.counters().timeouts), (2, Some(8), 1));
    // a late reply to the abandoned replay is ignored
    s.replayed(&mut Sk(&mut ix), 0, &batch(0), 1.1).unwrap();
    assert_eq!(s.last_seq(), Some(8));
}

#[test]
fn a_long_replay_that_keeps_arriving_is_not_cut_off() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    for seq in 0..30 {
        let now = f64::from(seq as u32) * 0.5; // 15 s in all, 1 s timeout
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), now).unwrap();
        s.tick(&mut Sk(&mut ix), now + 0.4).unwrap();
        assert_eq!(s.state(), State::Replaying);
    }
    s.replay_end(&mut Sk(&mut ix), 15.0).unwrap();
    assert_eq!((s.state(), s.counters().timeouts, depth(&ix)), (State::Live, 0, 30));
    // silence does time out
    s.reconnected(&mut Sk(&mut ix), 20.0).unwrap();
    s.tick(&mut Sk(&mut ix), 21.0).unwrap();
    assert_eq!(s.counters().timeouts, 1);
}

#[test]
fn a_replay_whose_tail_was_dropped_is_asked_again_not_purged() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    for seq in 0..5 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 0.1).unwrap();
    }
    // seq 5..8 and the end marker never come
    assert_eq!(s.tick(&mut Sk(&mut ix), 1.2).unwrap().replay_from, Some(4));
    assert_eq!((s.state(), s.counters().purges, depth(&ix)), (State::Replaying, 0, 5));
    for seq in 4..8 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 1.3).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 1.3).unwrap();
    let c = s.counters();
    assert_eq!((s.state(), c.purges, c.lost, c.timeouts, depth(&ix)), (State::Live, 0, 0, 1, 8));
    // a re-asked replay that brings nothing does end in a purge
    assert_eq!(s.live(&mut Sk(&mut ix), 10, &batch(10), 2.0).unwrap().replay_from, Some(7));
    s.tick(&mut Sk(&mut ix), 3.1).unwrap();
    assert_eq!(s.counters().purges, 1);
}

#[test]
fn malformed_payloads_are_counted_and_keep_the_sequence() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    s.replay_end(&mut Sk(&mut ix), 0.0).unwrap();
    s.live(&mut Sk(&mut ix), 0, &batch(0), 0.1).unwrap();
    s.live(&mut Sk(&mut ix), 1, b"\x93\xc1", 0.1).unwrap();
    s.live(&mut Sk(&mut ix), 2, &store(2.0, 9, None), 0.1).unwrap();
    let c = s.counters();
    assert_eq!((c.malformed, c.gaps, c.batches, s.state()), (1, 0, 2, State::Live));
    assert_eq!(s.position().0, Some(2));
}

fn cfg_with(f: impl FnOnce(&mut StreamConfig)) -> (Index, Stream) {
    let (ix, s) = setup(true);
    let mut c = s.config;
    f(&mut c);
    (ix, Stream::new(c, None, 0))
}

#[test]
fn a_disconnected_worker_keeps_its_holdings_until_dead_after_then_is_purged() {
    let (mut ix, mut s) = cfg_with(|c| c.dead_after = 10.0);
    started(&mut ix, &mut s, 3);
    s.disconnected(1.0);
    assert_eq!(s.state(), State::Disconnected);
    s.tick(&mut Sk(&mut ix), 10.9).unwrap();
    assert_eq!((s.state(), depth(&ix)), (State::Disconnected, 3));
    s.tick(&mut Sk(&mut ix), 11.0).unwrap();
    assert_eq!((s.state(), depth(&ix), s.counters().purges), (State::Disconnected, 0, 1));
    // it comes back later: history is fetched from the start
    assert_eq!(s.reconnected(&mut Sk(&mut ix), 12.0).unwrap().replay_from, Some(0));
    for seq in 0..4 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 12.1).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 12.1).unwrap();
    assert_eq!((s.state(), depth(&ix)), (State::Live, 4));
}

#[test]
fn a_worker_back_before_dead_after_is_probed_and_keeps_what_the_engine_confirms() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    s.disconnected(1.0);
    // live messages queued before the disconnect was seen wait
    s.live(&mut Sk(&mut ix), 3, &batch(3), 1.1).unwrap();
    assert_eq!(depth(&ix), 3);
    assert_eq!(s.reconnected(&mut Sk(&mut ix), 2.0).unwrap().replay_from, Some(2));
    s.replayed(&mut Sk(&mut ix), 2, &batch(2), 2.1).unwrap();
    s.replayed(&mut Sk(&mut ix), 3, &batch(3), 2.1).unwrap();
    s.replay_end(&mut Sk(&mut ix), 2.1).unwrap();
    let c = s.counters();
    assert_eq!((s.state(), depth(&ix), c.purges, c.disconnects), (State::Live, 4, 0, 1));
}

#[test]
fn an_engine_restart_during_a_replay_is_probed_not_spliced() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 4);
    // a gap opens a fill from 4
    assert_eq!(s.live(&mut Sk(&mut ix), 6, &batch(6), 1.0).unwrap().replay_from, Some(3));
    // the engine restarts meanwhile: the reconnect must not be dropped
    assert_eq!(s.reconnected(&mut Sk(&mut ix), 1.1).unwrap().replay_from, Some(3));
    // the new engine has nothing: only the end marker
    assert_eq!(s.replay_end(&mut Sk(&mut ix), 1.2).unwrap().replay_from, Some(0));
    assert_eq!((depth(&ix), s.counters().resets), (0, 1));
    s.replay_end(&mut Sk(&mut ix), 1.3).unwrap();
    assert_eq!((s.state(), ix.stats().holdings), (State::Live, 0));
}

#[test]
fn a_restart_while_a_fill_is_pending_is_not_spliced_onto_the_old_history() {
    // engine A applies 0..5; a gap opens a fill; A restarts as B whose live
    // 0..8 arrive (B stores other blocks under the same seqs).
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 6);
    assert_eq!(s.live(&mut Sk(&mut ix), 7, &batch(7), 1.0).unwrap().replay_from, Some(5));
    let b = |seq: u64| store(100.0 + seq as f64, 1000 + seq, (seq > 0).then_some(999 + seq));
    let todo = s.live(&mut Sk(&mut ix), 0, &b(0), 1.1).unwrap();
    assert_eq!(todo.replay_from, Some(0), "a live seq below the last applied is a restart");
    assert_eq!((ix.stats().holdings, s.counters().resets), (0, 1));
    for seq in 1..9 {
        s.live(&mut Sk(&mut ix), seq, &b(seq), 1.2).unwrap();
    }
    for seq in 0..9 {
        s.replayed(&mut Sk(&mut ix), seq, &b(seq), 1.3).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 1.3).unwrap();
    assert_eq!((s.state(), depth(&ix), ix.stats().holdings), (State::Live, 0, 9));
}

#[test]
fn a_gap_fill_answered_by_only_the_end_marker_is_a_restart() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 4);
    assert_eq!(s.live(&mut Sk(&mut ix), 6, &batch(6), 1.0).unwrap().replay_from, Some(3));
    // the engine has nothing at or after 4 although 6 was published
    assert_eq!(s.replay_end(&mut Sk(&mut ix), 1.1).unwrap().replay_from, Some(0));
    assert_eq!((depth(&ix), s.counters().resets, s.buffered().0), (0, 1, 0));
}

#[test]
fn stale_replies_do_not_keep_a_replay_alive() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 5);
    s.live(&mut Sk(&mut ix), 7, &batch(7), 1.0).unwrap();
    // an endpoint that trickles stale replies below the requested seq
    for i in 0..20 {
        let now = 1.0 + f64::from(i) * 0.2;
        s.replayed(&mut Sk(&mut ix), 1, &batch(1), now).unwrap();
        s.tick(&mut Sk(&mut ix), now).unwrap();
    }
    let c = s.counters();
    assert_ne!(s.state(), State::Replaying);
    assert_eq!((c.timeouts, c.abandoned, c.purges), (1, 1, 1));
    // the buffered live message was applied as the new start
    assert_eq!(s.last_seq(), Some(7));
}

#[test]
fn a_replay_that_keeps_progressing_is_capped_in_total_time() {
    let (mut ix, mut s) = cfg_with(|c| c.replay_max = 5.0);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    let mut seq = 0;
    let mut now = 0.0;
    while s.state() == State::Replaying && seq < 1000 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), now).unwrap();
        s.tick(&mut Sk(&mut ix), now).unwrap();
        seq += 1;
        now += 0.5;
    }
    assert!(now <= 5.5, "gave up at {now}");
    let c = s.counters();
    assert_eq!((s.state(), c.abandoned, c.timeouts), (State::Degraded, 1, 1));
}

#[test]
fn a_lost_tail_followed_by_silence_is_found_by_the_idle_probe() {
    let (mut ix, mut s) = cfg_with(|c| c.idle_probe = 3.0);
    started(&mut ix, &mut s, 3);
    s.live(&mut Sk(&mut ix), 3, &batch(3), 1.0).unwrap();
    // seqs 4 and 5 (an AllBlocksCleared among them) never arrive; silence
    assert_eq!(s.tick(&mut Sk(&mut ix), 3.9).unwrap().replay_from, None);
    assert_eq!(s.tick(&mut Sk(&mut ix), 4.0).unwrap().replay_from, Some(3));
    let clear = {
        let mut b = Vec::new();
        enc::write_array_len(&mut b, 3).unwrap();
        enc::write_f64(&mut b, 5.0).unwrap();
        enc::write_array_len(&mut b, 1).unwrap();
        enc::write_array_len(&mut b, 1).unwrap();
        enc::write_str(&mut b, "AllBlocksCleared").unwrap();
        enc::write_nil(&mut b).unwrap();
        b
    };
    s.replayed(&mut Sk(&mut ix), 3, &batch(3), 4.1).unwrap();
    s.replayed(&mut Sk(&mut ix), 4, &batch(4), 4.1).unwrap();
    s.replayed(&mut Sk(&mut ix), 5, &clear, 4.1).unwrap();
    s.replay_end(&mut Sk(&mut ix), 4.1).unwrap();
    assert_eq!((s.state(), ix.stats().holdings, s.last_seq()), (State::Live, 0, Some(5)));
    // probed once per silence
    assert_eq!(s.tick(&mut Sk(&mut ix), 9.0).unwrap().replay_from, None);
}

#[test]
fn the_buffer_is_bounded_in_bytes_and_a_hole_it_leaves_is_asked_for() {
    let one = batch(10).len();
    let (mut ix, mut s) = cfg_with(|c| c.max_buffered_bytes = 3 * one);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    for seq in 0..6 {
        s.live(&mut Sk(&mut ix), seq, &batch(seq), 0.1).unwrap();
    }
    assert_eq!((s.buffered().0, s.counters().overflows), (3, 3));
    assert!(s.buffered().1 <= 3 * one);
    // the replay brings 0..2 only: 3..5 are buffered
    for seq in 0..3 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 0.2).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 0.2).unwrap();
    assert_eq!((s.state(), depth(&ix)), (State::Live, 6));
}

#[test]
fn live_gaps_count_the_dropped_seqs() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 2);
    s.live(&mut Sk(&mut ix), 5, &batch(5), 1.0).unwrap();
    let c = s.counters();
    assert_eq!((c.gaps, c.dropped), (1, 3));
}

#[test]
fn a_restarted_engine_whose_first_live_batches_were_lost_is_not_spliced_by_a_gap_fill() {
    // engine A applied 0..3; it restarts as B, whose seqs 0..4 are lost to
    // the slow joiner; B's seq 5 arrives before the reconnect is seen.
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 4);
    let b = |seq: u64| store(100.0 + seq as f64, 1000 + seq, (seq > 0).then_some(999 + seq));
    assert_eq!(s.live(&mut Sk(&mut ix), 5, &b(5), 1.0).unwrap().replay_from, Some(3));
    // B answers with its own seq 3: not the batch applied under 3
    let todo = s.replayed(&mut Sk(&mut ix), 3, &b(3), 1.1).unwrap();
    assert_eq!(todo.replay_from, Some(0));
    assert_eq!((ix.stats().holdings, s.counters().resets), (0, 1));
    // B's whole history replaces A's
    for seq in 0..6 {
        s.replayed(&mut Sk(&mut ix), seq, &b(seq), 1.2).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 1.2).unwrap();
    assert_eq!((s.state(), ix.stats().holdings, depth(&ix)), (State::Live, 6, 0));
}

#[test]
fn the_delayed_live_copy_of_a_replayed_batch_is_a_duplicate_not_a_restart() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    // the replay brings 0..4 before the live copies of 3 and 4 are read
    for seq in 0..5 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 0.1).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 0.1).unwrap();
    for seq in 3..6 {
        assert_eq!(s.live(&mut Sk(&mut ix), seq, &batch(seq), 0.2).unwrap().replay_from, None);
    }
    let c = s.counters();
    assert_eq!((s.state(), c.resets, c.purges, c.duplicates, depth(&ix)), (State::Live, 0, 0, 2, 6));
    // once seq 5 went by live, a live 4 can only be another process
    assert_eq!(s.live(&mut Sk(&mut ix), 4, &batch(4), 0.3).unwrap().replay_from, Some(0));
    assert_eq!(s.counters().resets, 1);
}

#[test]
fn another_batch_under_a_replayed_seq_is_a_restart() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 5);
    let other = store(77.0, 50, None);
    assert_eq!(s.live(&mut Sk(&mut ix), 3, &other, 0.2).unwrap().replay_from, Some(0));
    assert_eq!((s.counters().resets, ix.stats().holdings), (1, 0));
}

#[test]
fn a_resumed_worker_whose_publisher_never_connects_is_purged_after_dead_after() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    let (last, digest) = s.position();
    let mut s = Stream::new(StreamConfig { dead_after: 4.0, ..s.config }, last, digest);
    s.tick(&mut Sk(&mut ix), 10.0).unwrap();
    s.tick(&mut Sk(&mut ix), 13.9).unwrap();
    assert_eq!((s.state(), depth(&ix)), (State::Connecting, 3));
    s.tick(&mut Sk(&mut ix), 14.0).unwrap();
    assert_eq!((s.state(), depth(&ix), s.last_seq()), (State::Connecting, 0, None));
    // when it does connect, the history is fetched from the start
    assert_eq!(s.start(&mut Sk(&mut ix), 20.0).unwrap().replay_from, Some(0));
}

#[test]
fn the_degraded_period_counts_from_the_incident() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 2);
    // a gap at t=100 the engine can no longer fill
    assert!(s.live(&mut Sk(&mut ix), 9, &batch(9), 100.0).unwrap().replay_from.is_some());
    s.replayed(&mut Sk(&mut ix), 8, &batch(8), 100.1).unwrap();
    s.replay_end(&mut Sk(&mut ix), 100.1).unwrap();
    assert_eq!(s.state(), State::Degraded);
    s.tick(&mut Sk(&mut ix), 105.0).unwrap();
    assert_eq!(s.state(), State::Degraded, "4.9 s after the incident (clean_secs 5)");
    s.tick(&mut Sk(&mut ix), 105.1).unwrap();
    assert_eq!(s.state(), State::Live);
}

#[test]
fn the_buffer_holds_exactly_max_buffered_messages() {
    let (mut ix, mut s) = cfg_with(|c| c.max_buffered = 3);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    for seq in 1..4 {
        s.live(&mut Sk(&mut ix), seq, &batch(seq), 0.1).unwrap();
    }
    let one = batch(1).len();
    assert_eq!((s.buffered(), s.counters().overflows), ((3, 3 * one), 0));
    s.live(&mut Sk(&mut ix), 4, &batch(4), 0.3).unwrap();
    assert_eq!((s.buffered(), s.counters().overflows), ((3, 3 * one), 1));
}

// ---------------------------------------------------------------- counters
// Each of these pins what `status()` reports for one path, exactly.

#[test]
fn live_messages_before_start_wait_for_the_history() {
    let (mut ix, mut s) = setup(true);
    s.live(&mut Sk(&mut ix), 0, &batch(0), 0.0).unwrap();
    assert_eq!((s.state(), s.buffered().0, ix.stats().holdings), (State::Connecting, 1, 0));
    s.start(&mut Sk(&mut ix), 0.1).unwrap();
    s.replay_end(&mut Sk(&mut ix), 0.2).unwrap();
    assert_eq!((s.state(), depth(&ix), s.buffered()), (State::Live, 1, (0, 0)));
}

#[test]
fn a_first_live_seq_after_an_empty_history_fetches_what_came_before() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    s.replay_end(&mut Sk(&mut ix), 0.0).unwrap();
    // the engine's seqs 0..2 were lost to the slow joiner
    assert_eq!(s.live(&mut Sk(&mut ix), 3, &batch(3), 0.1).unwrap().replay_from, Some(0));
    let c = s.counters();
    assert_eq!((c.gaps, c.dropped, c.replays), (1, 3, 2));
    for seq in 0..4 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 0.2).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 0.2).unwrap();
    let c = s.counters();
    // the buffered live 3 was a duplicate of the replayed one
    assert_eq!((s.state(), depth(&ix), c.batches, c.events, c.duplicates), (State::Live, 4, 4, 4, 1));
}

#[test]
fn a_clean_live_message_ends_the_degraded_period_without_a_tick() {
    let (mut ix, mut s) = setup(false);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    s.live(&mut Sk(&mut ix), 4, &batch(4), 1.0).unwrap(); // joined late
    assert_eq!(s.state(), State::Degraded);
    s.live(&mut Sk(&mut ix), 5, &batch(5), 6.0).unwrap();
    assert_eq!(s.state(), State::Live);
}

#[test]
fn stale_and_probe_replies_count_as_duplicates_and_a_probe_reply_keeps_the_deadline_ahead() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 5);
    assert_eq!(s.reconnected(&mut Sk(&mut ix), 10.0).unwrap().replay_from, Some(4));
    s.replayed(&mut Sk(&mut ix), 2, &batch(2), 10.1).unwrap(); // below the probe: stale
    s.replayed(&mut Sk(&mut ix), 4, &batch(4), 10.9).unwrap(); // confirms the probe
    assert_eq!(s.counters().duplicates, 2);
    // the confirmation moved the deadline to 11.9
    s.tick(&mut Sk(&mut ix), 11.5).unwrap();
    assert_eq!((s.state(), s.counters().timeouts), (State::Replaying, 0));
    s.replayed(&mut Sk(&mut ix), 5, &batch(5), 11.6).unwrap();
    s.replay_end(&mut Sk(&mut ix), 11.6).unwrap();
    assert_eq!((s.state(), depth(&ix), s.counters().purges), (State::Live, 6, 0));
}

#[test]
fn a_confirmed_probe_whose_next_batch_never_comes_is_given_up_not_asked_forever() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    s.reconnected(&mut Sk(&mut ix), 5.0).unwrap();
    s.replayed(&mut Sk(&mut ix), 2, &batch(2), 5.1).unwrap();
    // (an oversized batch 3 breaks the connection; nothing else comes)
    assert_eq!(s.tick(&mut Sk(&mut ix), 6.2).unwrap().replay_from, None);
    let c = s.counters();
    assert_eq!((s.state(), c.timeouts, c.abandoned, c.purges), (State::Degraded, 1, 1, 1));
}

#[test]
fn a_probe_that_brought_batches_then_went_silent_is_asked_again() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    s.reconnected(&mut Sk(&mut ix), 5.0).unwrap();
    for seq in 2..5 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 5.1).unwrap();
    }
    assert_eq!(s.tick(&mut Sk(&mut ix), 6.2).unwrap().replay_from, Some(4));
    assert_eq!((s.state(), s.counters().purges, depth(&ix)), (State::Replaying, 0, 5));
}

#[test]
fn a_hole_between_the_replay_and_the_buffer_is_asked_for_once_then_given_up() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    s.live(&mut Sk(&mut ix), 6, &batch(6), 0.0).unwrap();
    for seq in 0..3 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 0.1).unwrap();
    }
    // 3..5 missing: asked once more, from the last applied seq
    assert_eq!(s.replay_end(&mut Sk(&mut ix), 0.1).unwrap().replay_from, Some(2));
    assert_eq!((s.counters().gaps, s.counters().abandoned), (1, 0));
    s.replayed(&mut Sk(&mut ix), 2, &batch(2), 0.2).unwrap();
    s.replay_end(&mut Sk(&mut ix), 0.2).unwrap();
    let c = s.counters();
    // still missing: lost, purged, and the buffered 6 is the new start
    assert_eq!((c.gaps, c.abandoned, c.lost, c.purges), (1, 1, 3, 1));
    assert_eq!((s.state(), s.last_seq(), s.buffered()), (State::Degraded, Some(6), (0, 0)));
}

#[test]
fn a_replay_given_up_with_a_hole_in_the_buffer_asks_for_the_hole() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    s.live(&mut Sk(&mut ix), 5, &batch(5), 1.0).unwrap();
    s.live(&mut Sk(&mut ix), 8, &batch(8), 1.0).unwrap();
    // the gap fill never answers: given up, 3..4 lost, 5 is the new start,
    // and the hole before 8 is asked for
    assert_eq!(s.tick(&mut Sk(&mut ix), 2.1).unwrap().replay_from, Some(5));
    let c = s.counters();
    assert_eq!((s.state(), c.abandoned, c.lost, c.purges), (State::Replaying, 1, 2, 1));
}

#[test]
fn a_replay_cap_counts_from_the_start_of_the_episode() {
    let (mut ix, mut s) = cfg_with(|c| c.replay_max = 5.0);
    started(&mut ix, &mut s, 1);
    s.reconnected(&mut Sk(&mut ix), 100.0).unwrap();
    s.replayed(&mut Sk(&mut ix), 0, &batch(0), 100.5).unwrap();
    for (i, seq) in (1..8).enumerate() {
        let now = 100.5 + 0.5 * i as f64;
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), now).unwrap();
        s.tick(&mut Sk(&mut ix), now).unwrap();
        assert_eq!(s.state(), State::Replaying, "at {now}");
    }
    s.tick(&mut Sk(&mut ix), 105.0).unwrap();
    assert_eq!((s.state(), s.counters().abandoned), (State::Degraded, 1));
}

#[test]
fn a_dead_worker_with_nothing_applied_drops_what_it_buffered() {
    let (mut ix, mut s) = cfg_with(|c| c.dead_after = 2.0);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    s.live(&mut Sk(&mut ix), 4, &batch(4), 0.1).unwrap();
    s.disconnected(1.0);
    assert_eq!(s.buffered().0, 1);
    s.tick(&mut Sk(&mut ix), 3.0).unwrap();
    assert_eq!(s.buffered(), (0, 0));
}

#[test]
fn late_live_copies_of_batches_a_replay_brought_first_are_duplicates() {
    let (mut ix, mut s) = setup(true);
    s.start(&mut Sk(&mut ix), 0.0).unwrap();
    s.live(&mut Sk(&mut ix), 5, &batch(5), 0.0).unwrap();
    for seq in 0..8 {
        s.replayed(&mut Sk(&mut ix), seq, &batch(seq), 0.1).unwrap();
    }
    s.replay_end(&mut Sk(&mut ix), 0.1).unwrap();
    // 6 and 7 went live after 5 and arrive now
    s.live(&mut Sk(&mut ix), 6, &batch(6), 0.2).unwrap();
    s.live(&mut Sk(&mut ix), 7, &batch(7), 0.2).unwrap();
    let c = s.counters();
    assert_eq!((s.state(), c.resets, c.duplicates, depth(&ix)), (State::Live, 0, 3, 8));
}

#[test]
fn events_count_every_block_event_of_applied_batches_and_late_replies_are_duplicates() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 2);
    // a store whose parent is unknown (skipped) and a clear, in one batch
    let mut b = Vec::new();
    enc::write_array_len(&mut b, 3).unwrap();
    enc::write_f64(&mut b, 9.0).unwrap();
    enc::write_array_len(&mut b, 2).unwrap();
    b.extend_from_slice(&store(0.0, 50, Some(49))[11..]); // the event of a store batch
    b.truncate(b.len() - 1); // minus that batch's dp_rank
    enc::write_array_len(&mut b, 1).unwrap();
    enc::write_str(&mut b, "AllBlocksCleared").unwrap();
    enc::write_nil(&mut b).unwrap();
    assert!(crate::wire::decode(&b, crate::wire::Mode::Full).is_ok());
    s.live(&mut Sk(&mut ix), 2, &b, 1.0).unwrap();
    let c = s.counters();
    assert_eq!((c.batches, c.events, ix.stats().holdings), (3, 4, 0));
    // a reply after the replay ended belongs to nothing
    s.replayed(&mut Sk(&mut ix), 1, &batch(1), 1.1).unwrap();
    assert_eq!(s.counters().duplicates, 1);
}

#[test]
fn a_probe_answered_from_later_on_goes_on_as_a_fill_that_is_asked_again_after_silence() {
    let (mut ix, mut s) = setup(true);
    started(&mut ix, &mut s, 3);
    s.reconnected(&mut Sk(&mut ix), 5.0).unwrap(); // probe of seq 2
                                                   // the engine's buffer starts at 6: 2 cannot be verified, 3..5 are lost
    s.replayed(&mut Sk(&mut ix), 6, &batch(6), 5.1).unwrap();
    s.replayed(&mut Sk(&mut ix), 7, &batch(7), 5.1).unwrap();
    assert_eq!((s.counters().lost, s.counters().purges), (4, 1));
    // then silence: the fill that follows is asked again from 7
    assert_eq!(s.tick(&mut Sk(&mut ix), 6.2).unwrap().replay_from, Some(7));
    assert_eq!(s.counters().purges, 1);
}
