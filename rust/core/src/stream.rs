//! Per-worker event-stream state machine (SPEC section 3).
//!
//! The transport (Python, pyzmq) owns the sockets and reports what arrived;
//! this module decides what it means and applies payloads to the [`Index`]:
//!
//! - live message `(seq, payload)`: apply when it is the next seq; on a gap
//!   (seq > last + 1) ask for a replay from last + 1 and buffer live
//!   messages meanwhile; on a regression (seq < last + 1) the engine
//!   restarted: purge and replay from 0;
//! - replay replies: check that the replay starts where it was asked to;
//!   if it starts later the engine's buffer no longer covers the gap:
//!   purge, count the lost batches, and go on (state `degraded`);
//! - a replay that does not finish in time, or no replay endpoint: purge,
//!   go on from the live stream, `degraded`;
//! - a reconnect of the SUB socket (the engine may have restarted and be
//!   idle): probe with a replay from the last applied seq and compare the
//!   engine's payload for that seq with a digest of the one applied; a
//!   different payload, or none, means a restart: purge and replay from 0.
//!
//! Every seq is applied at most once. Malformed payloads are counted and
//! skipped without breaking the sequence. `degraded` turns back into `live`
//! after `clean_secs` without incident.

use std::collections::BTreeMap;

use crate::index::{payload_digest, Index};
use crate::IndexError;

/// Connection state of a worker's stream, as reported by `status()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Registered, nothing received yet.
    Connecting,
    /// Waiting for a replay; live messages are buffered.
    Replaying,
    /// Applying live messages in order.
    Live,
    /// Live, but history was lost recently (purged after a gap that could
    /// not be replayed); the index holds only what arrived since.
    Degraded,
    /// Removed or shut down.
    Stopped,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Replaying => "replaying",
            State::Live => "live",
            State::Degraded => "degraded",
            State::Stopped => "stopped",
        }
    }
}

/// Counters per worker stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// Batches applied (live and replayed).
    pub batches: u64,
    /// Block events applied or skipped inside those batches.
    pub events: u64,
    /// Sequence gaps seen on the live stream.
    pub gaps: u64,
    /// Replay requests sent.
    pub replays: u64,
    /// Batches known lost (gap not covered by a replay).
    pub lost: u64,
    /// Engine restarts detected (sequence regressions, failed probes).
    pub resets: u64,
    /// Payloads that did not decode (counted, skipped).
    pub malformed: u64,
    /// Messages dropped as already applied.
    pub duplicates: u64,
    /// Purges of the worker's holdings.
    pub purges: u64,
    /// Replays that did not finish in time.
    pub timeouts: u64,
}

/// Settings of one stream.
#[derive(Clone, Copy, Debug)]
pub struct StreamConfig {
    /// The engine has a replay endpoint.
    pub replay: bool,
    /// Seconds a replay may stay silent (before its first reply, or between
    /// replies) before it is given up.
    pub replay_timeout: f64,
    /// Seconds without incident before `degraded` turns `live`.
    pub clean_secs: f64,
    /// Live messages kept while replaying; past it the oldest are dropped
    /// (and recovered by a further replay).
    pub max_buffered: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig { replay: true, replay_timeout: 2.0, clean_secs: 10.0, max_buffered: 100_000 }
    }
}

/// What the transport must do after an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Todo {
    /// Send a replay request starting at this seq, on a fresh DEALER socket
    /// (closing the old one drops late replies to an earlier request, so
    /// replies always belong to the latest request).
    pub replay_from: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// Replay of missing batches from `from`.
    Fill { from: u64 },
    /// Probe after a reconnect (or a resume): the first reply must be
    /// `seq` with the payload digest we applied for it.
    Probe { seq: u64, digest: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Replay {
    pending: Pending,
    deadline: f64,
    /// A reply (not the end marker) has arrived.
    started: bool,
}

/// One worker's stream.
#[derive(Debug)]
pub struct Stream {
    pub config: StreamConfig,
    state: State,
    last: Option<u64>,
    last_digest: u64,
    replay: Option<Replay>,
    buffer: BTreeMap<u64, Vec<u8>>,
    counters: StreamCounters,
    last_event: Option<f64>,
    incident_at: Option<f64>,
}

impl Stream {
    pub fn new(config: StreamConfig, last: Option<u64>, last_digest: Option<u64>) -> Stream {
        Stream {
            config,
            state: State::Connecting,
            last,
            last_digest: last_digest.unwrap_or(0),
            replay: None,
            buffer: BTreeMap::new(),
            counters: StreamCounters::default(),
            last_event: None,
            incident_at: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn last_seq(&self) -> Option<u64> {
        self.last
    }
    pub fn last_digest(&self) -> u64 {
        self.last_digest
    }
    pub fn counters(&self) -> StreamCounters {
        self.counters
    }
    pub fn last_event(&self) -> Option<f64> {
        self.last_event
    }
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    fn ask(&mut self, pending: Pending, now: f64) -> Todo {
        self.replay = Some(Replay { pending, deadline: now + self.config.replay_timeout, started: false });
        self.state = State::Replaying;
        self.counters.replays += 1;
        let from = match pending {
            Pending::Fill { from } => from,
            Pending::Probe { seq, .. } => seq,
        };
        Todo { replay_from: Some(from) }
    }

    fn purge(&mut self, ix: &mut Index, worker: &str) -> Result<(), IndexError> {
        ix.purge_worker(worker)?;
        self.counters.purges += 1;
        self.last = None;
        self.last_digest = 0;
        Ok(())
    }

    fn incident(&mut self, now: f64) {
        self.incident_at = Some(now);
    }

    fn settle(&mut self, now: f64) {
        self.state = match self.incident_at {
            Some(t) if now - t < self.config.clean_secs => State::Degraded,
            _ => State::Live,
        };
    }

    /// Apply one batch; a malformed payload is counted and skipped (its seq
    /// still counts as applied, so it does not look like a gap).
    fn apply(&mut self, ix: &mut Index, worker: &str, seq: u64, payload: &[u8], now: f64) -> Result<(), IndexError> {
        self.last = Some(seq);
        self.last_digest = payload_digest(payload);
        self.last_event = Some(now);
        match ix.apply(worker, payload, Some(seq)) {
            Ok(st) => {
                self.counters.batches += 1;
                self.counters.events += st.stored + st.removed + st.skipped + st.cleared;
            }
            Err(IndexError::Decode(_)) => self.counters.malformed += 1,
            Err(e) => return Err(e),
        }
        ix.set_position(worker, Some(seq), self.last_digest)
    }

    /// The transport is subscribed and ready: start (replay from the
    /// beginning, or verify a resumed seq).
    pub fn start(&mut self, ix: &mut Index, worker: &str, now: f64) -> Result<Todo, IndexError> {
        if !self.config.replay {
            if self.last.is_some() {
                // Resuming without a way to check what the engine did
                // meanwhile: start over from the live stream.
                self.purge(ix, worker)?;
                self.incident(now);
                self.state = State::Degraded;
            } else {
                self.state = State::Connecting;
            }
            return Ok(Todo::default());
        }
        Ok(match self.last {
            Some(seq) => self.ask(Pending::Probe { seq, digest: self.last_digest }, now),
            None => self.ask(Pending::Fill { from: 0 }, now),
        })
    }

    /// A live message.
    pub fn live(
        &mut self,
        ix: &mut Index,
        worker: &str,
        seq: u64,
        payload: &[u8],
        now: f64,
    ) -> Result<Todo, IndexError> {
        if self.state == State::Stopped {
            return Ok(Todo::default());
        }
        // Before `start` (history not fetched yet) live messages wait too.
        if self.state == State::Replaying || (self.state == State::Connecting && self.config.replay) {
            if self.last.is_some_and(|l| seq <= l) {
                self.counters.duplicates += 1;
            } else {
                self.buffer.insert(seq, payload.to_vec());
                while self.buffer.len() > self.config.max_buffered {
                    self.buffer.pop_first();
                }
            }
            return Ok(Todo::default());
        }
        let Some(last) = self.last else {
            // First message of a stream without replay (or after a purge
            // that went on from the live stream): take it as the start.
            if !self.config.replay && seq > 0 {
                // Joined late with no way to fetch what came before.
                self.counters.lost += seq;
                self.incident(now);
            }
            self.apply(ix, worker, seq, payload, now)?;
            self.settle(now);
            return Ok(Todo::default());
        };
        let expected = last + 1;
        if seq == expected {
            self.apply(ix, worker, seq, payload, now)?;
            if self.state != State::Live {
                self.settle(now);
            }
            return Ok(Todo::default());
        }
        if seq > expected {
            self.counters.gaps += 1;
            if self.config.replay {
                self.buffer.insert(seq, payload.to_vec());
                return Ok(self.ask(Pending::Fill { from: expected }, now));
            }
            self.counters.lost += seq - expected;
            self.purge(ix, worker)?;
            self.incident(now);
            self.apply(ix, worker, seq, payload, now)?;
            self.state = State::Degraded;
            return Ok(Todo::default());
        }
        // seq < expected and not replaying: the engine restarted.
        self.counters.resets += 1;
        self.purge(ix, worker)?;
        if self.config.replay {
            self.buffer.insert(seq, payload.to_vec());
            return Ok(self.ask(Pending::Fill { from: 0 }, now));
        }
        self.incident(now);
        self.counters.lost += seq;
        self.apply(ix, worker, seq, payload, now)?;
        self.state = State::Degraded;
        Ok(Todo::default())
    }

    /// A replay reply (not the end marker).
    pub fn replayed(
        &mut self,
        ix: &mut Index,
        worker: &str,
        seq: u64,
        payload: &[u8],
        now: f64,
    ) -> Result<Todo, IndexError> {
        let Some(mut r) = self.replay else {
            // A late reply to a replay we gave up on: not ours any more.
            self.counters.duplicates += 1;
            return Ok(Todo::default());
        };
        // The timeout is for silence, not for the whole replay: a long
        // replay that keeps arriving is never cut off.
        r.deadline = now + self.config.replay_timeout;
        self.replay = Some(r);
        if !r.started {
            r.started = true;
            self.replay = Some(r);
            match r.pending {
                Pending::Probe { seq: want, digest } => {
                    if seq > want {
                        // The engine's buffer no longer holds what we applied
                        // last: we cannot tell what happened in between.
                        self.counters.lost += seq - want;
                        self.purge(ix, worker)?;
                        self.incident(now);
                        self.replay = Some(Replay { pending: Pending::Fill { from: seq }, ..r });
                        self.apply(ix, worker, seq, payload, now)?;
                        return Ok(Todo::default());
                    }
                    if seq < want || payload_digest(payload) != digest {
                        // Another batch under the seq we applied: the engine
                        // restarted. Start over.
                        self.counters.resets += 1;
                        self.purge(ix, worker)?;
                        return Ok(self.ask(Pending::Fill { from: 0 }, now));
                    }
                    self.counters.duplicates += 1;
                    // Continuity confirmed; what follows are new batches.
                    self.replay = Some(Replay { pending: Pending::Fill { from: want + 1 }, ..r });
                    return Ok(Todo::default());
                }
                Pending::Fill { from } => {
                    if seq > from {
                        // The engine's buffer starts later than asked.
                        self.counters.lost += seq - from;
                        self.purge(ix, worker)?;
                        self.incident(now);
                        self.apply(ix, worker, seq, payload, now)?;
                        return Ok(Todo::default());
                    }
                }
            }
        }
        match self.last {
            Some(l) if seq <= l => self.counters.duplicates += 1,
            Some(l) if seq > l + 1 => {
                // A hole inside the replay: history is lost.
                self.counters.lost += seq - l - 1;
                self.purge(ix, worker)?;
                self.incident(now);
                self.apply(ix, worker, seq, payload, now)?;
            }
            _ => {
                self.apply(ix, worker, seq, payload, now)?;
            }
        }
        Ok(Todo::default())
    }

    /// The replay's end marker.
    pub fn replay_end(&mut self, ix: &mut Index, worker: &str, now: f64) -> Result<Todo, IndexError> {
        let Some(r) = self.replay else { return Ok(Todo::default()) };
        if let (false, Pending::Probe { .. }) = (r.started, r.pending) {
            // Nothing at or after the seq we applied last: the engine lost
            // it, so it restarted.
            self.counters.resets += 1;
            self.purge(ix, worker)?;
            return Ok(self.ask(Pending::Fill { from: 0 }, now));
        }
        self.replay = None;
        self.flush(ix, worker, now)
    }

    /// Apply buffered live messages in order after a replay (or after
    /// giving up on one).
    fn flush(&mut self, ix: &mut Index, worker: &str, now: f64) -> Result<Todo, IndexError> {
        while let Some((&seq, _)) = self.buffer.first_key_value() {
            let payload = self.buffer.pop_first().map(|(_, p)| p).unwrap_or_default();
            match self.last {
                Some(l) if seq <= l => self.counters.duplicates += 1,
                Some(l) if seq > l + 1 => {
                    // Live messages went missing between the replay and the
                    // buffer: ask again from where we are.
                    // (A replay from there either fills the hole or starts
                    // later, which ends in a purge: this always progresses.)
                    self.buffer.insert(seq, payload);
                    self.counters.gaps += 1;
                    return Ok(self.ask(Pending::Fill { from: l + 1 }, now));
                }
                _ => {
                    self.apply(ix, worker, seq, &payload, now)?;
                }
            }
        }
        self.settle(now);
        Ok(Todo::default())
    }

    /// Time passes: replay deadlines and the clean period.
    pub fn tick(&mut self, ix: &mut Index, worker: &str, now: f64) -> Result<Todo, IndexError> {
        if let Some(r) = self.replay {
            if now >= r.deadline {
                self.counters.timeouts += 1;
                if r.started && matches!(r.pending, Pending::Fill { .. }) {
                    // The replay was arriving, then went silent before its
                    // end marker: the engine's ROUTER dropped the tail at its
                    // high-water mark. Ask again from where we are; a replay
                    // that brings nothing at all ends in the purge below.
                    let from = self.last.map_or(0, |l| l + 1);
                    return Ok(self.ask(Pending::Fill { from }, now));
                }
                self.replay = None;
                let first = self.buffer.keys().next().copied();
                if let (Some(l), Some(f)) = (self.last, first) {
                    self.counters.lost += f.saturating_sub(l + 1);
                }
                self.purge(ix, worker)?;
                self.incident(now);
                // Go on from the live stream: the oldest buffered message
                // becomes the start.
                if let Some(f) = first {
                    self.last = f.checked_sub(1);
                }
                let todo = self.flush(ix, worker, now)?;
                if self.state != State::Replaying {
                    self.state = State::Degraded;
                }
                return Ok(todo);
            }
        }
        if self.state == State::Degraded {
            self.settle(now);
        }
        Ok(Todo::default())
    }

    /// The SUB socket (re)connected to the engine's publisher. A reconnect
    /// after a disconnect may be a restarted engine that publishes nothing:
    /// probe it.
    pub fn reconnected(&mut self, ix: &mut Index, worker: &str, now: f64) -> Result<Todo, IndexError> {
        if self.state == State::Replaying || self.state == State::Stopped {
            return Ok(Todo::default());
        }
        let Some(seq) = self.last else { return Ok(Todo::default()) };
        if self.config.replay {
            return Ok(self.ask(Pending::Probe { seq, digest: self.last_digest }, now));
        }
        // No way to check: never risk a false positive.
        self.counters.resets += 1;
        self.purge(ix, worker)?;
        self.incident(now);
        self.state = State::Degraded;
        Ok(Todo::default())
    }

    /// A message whose frames were not well-formed (e.g. a seq frame that is
    /// not 8 bytes): counted, nothing else.
    pub fn malformed_frame(&mut self) {
        self.counters.malformed += 1;
    }

    pub fn stop(&mut self) {
        self.state = State::Stopped;
        self.replay = None;
        self.buffer.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let cfg = StreamConfig { replay, replay_timeout: 1.0, clean_secs: 5.0, max_buffered: 100 };
        (ix, Stream::new(cfg, None, None))
    }

    /// Start the stream and replay the engine's first `n` batches.
    fn started(ix: &mut Index, s: &mut Stream, n: u64) {
        s.start(ix, "w", 0.0).unwrap();
        for seq in 0..n {
            s.replayed(ix, "w", seq, &batch(seq), 0.0).unwrap();
        }
        s.replay_end(ix, "w", 0.0).unwrap();
    }

    /// Leading blocks of the chain 1, 2, 3, ... held by the worker.
    fn depth(ix: &Index) -> u32 {
        let tokens: Vec<u32> = (1..=40).flat_map(|h| [h, h]).collect();
        ix.match_prefix(&Query::new("m", &tokens))[0].1
    }

    #[test]
    fn fresh_start_replays_then_flushes_buffered_live_messages() {
        let (mut ix, mut s) = setup(true);
        assert_eq!(s.start(&mut ix, "w", 0.0).unwrap().replay_from, Some(0));
        assert_eq!(s.state(), State::Replaying);
        // live messages arrive while the replay runs
        for seq in 2..5 {
            s.live(&mut ix, "w", seq, &batch(seq), 0.1).unwrap();
        }
        for seq in 0..3 {
            s.replayed(&mut ix, "w", seq, &batch(seq), 0.2).unwrap();
        }
        assert_eq!(depth(&ix), 3);
        s.replay_end(&mut ix, "w", 0.3).unwrap();
        assert_eq!(s.state(), State::Live);
        assert_eq!(depth(&ix), 5);
        assert_eq!(s.last_seq(), Some(4));
        let c = s.counters();
        assert_eq!((c.batches, c.duplicates, c.purges, c.lost), (5, 1, 0, 0));
        assert_eq!(ix.position("w").unwrap().0, Some(4));
    }

    #[test]
    fn gap_is_filled_by_replay() {
        let (mut ix, mut s) = setup(true);
        s.start(&mut ix, "w", 0.0).unwrap();
        s.replay_end(&mut ix, "w", 0.0).unwrap();
        s.live(&mut ix, "w", 0, &batch(0), 0.1).unwrap();
        s.live(&mut ix, "w", 1, &batch(1), 0.1).unwrap();
        // seq 2 and 3 were dropped
        let todo = s.live(&mut ix, "w", 4, &batch(4), 0.2).unwrap();
        assert_eq!(todo.replay_from, Some(2));
        for seq in 2..5 {
            s.replayed(&mut ix, "w", seq, &batch(seq), 0.3).unwrap();
        }
        s.replay_end(&mut ix, "w", 0.3).unwrap();
        assert_eq!((s.state(), depth(&ix)), (State::Live, 5));
        let c = s.counters();
        assert_eq!((c.gaps, c.replays, c.lost, c.purges), (1, 2, 0, 0));
    }

    #[test]
    fn gap_beyond_the_engine_buffer_purges_and_degrades() {
        let (mut ix, mut s) = setup(true);
        started(&mut ix, &mut s, 3);
        assert_eq!(s.live(&mut ix, "w", 9, &batch(9), 1.0).unwrap().replay_from, Some(3));
        // the engine only has 7.. left
        for seq in 7..10 {
            s.replayed(&mut ix, "w", seq, &batch(seq), 1.1).unwrap();
        }
        s.replay_end(&mut ix, "w", 1.2).unwrap();
        assert_eq!(s.state(), State::Degraded);
        let c = s.counters();
        assert_eq!((c.lost, c.purges), (4, 1));
        // blocks 1..3 were purged; 8.. are orphans of a purged chain
        assert_eq!(depth(&ix), 0);
        assert_eq!(ix.stats().holdings, 0);
        s.tick(&mut ix, "w", 3.0).unwrap();
        assert_eq!(s.state(), State::Degraded);
        s.tick(&mut ix, "w", 6.3).unwrap();
        assert_eq!(s.state(), State::Live);
    }

    #[test]
    fn regression_means_restart_purge_and_replay_from_zero() {
        let (mut ix, mut s) = setup(true);
        started(&mut ix, &mut s, 4);
        assert_eq!(depth(&ix), 4);
        // restarted engine, new history: seq 0 stores block 100
        let fresh = store(50.0, 100, None);
        assert_eq!(s.live(&mut ix, "w", 0, &fresh, 1.0).unwrap().replay_from, Some(0));
        assert_eq!(ix.stats().holdings, 0);
        s.replayed(&mut ix, "w", 0, &fresh, 1.1).unwrap();
        s.replay_end(&mut ix, "w", 1.1).unwrap();
        assert_eq!(s.state(), State::Live);
        assert_eq!(ix.stats().holdings, 1);
        assert_eq!(s.counters().resets, 1);
    }

    #[test]
    fn idle_restart_is_found_by_the_reconnect_probe() {
        let (mut ix, mut s) = setup(true);
        started(&mut ix, &mut s, 3);
        // reconnect; the restarted engine has nothing buffered
        assert_eq!(s.reconnected(&mut ix, "w", 1.0).unwrap().replay_from, Some(2));
        assert_eq!(s.replay_end(&mut ix, "w", 1.1).unwrap().replay_from, Some(0));
        assert_eq!((ix.stats().holdings, s.counters().resets), (0, 1));
        s.replay_end(&mut ix, "w", 1.2).unwrap();
        assert_eq!(s.state(), State::Live);
    }

    #[test]
    fn reconnect_probe_of_the_same_engine_keeps_everything() {
        let (mut ix, mut s) = setup(true);
        started(&mut ix, &mut s, 3);
        assert_eq!(s.reconnected(&mut ix, "w", 1.0).unwrap().replay_from, Some(2));
        for seq in 2..5 {
            s.replayed(&mut ix, "w", seq, &batch(seq), 1.1).unwrap();
        }
        s.replay_end(&mut ix, "w", 1.1).unwrap();
        assert_eq!((s.state(), depth(&ix), s.counters().purges), (State::Live, 5, 0));
    }

    #[test]
    fn reconnect_probe_with_another_batch_under_the_seq_is_a_restart() {
        let (mut ix, mut s) = setup(true);
        started(&mut ix, &mut s, 3);
        s.reconnected(&mut ix, "w", 1.0).unwrap();
        let todo = s.replayed(&mut ix, "w", 2, &store(99.0, 7, None), 1.1).unwrap();
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
        let (last, digest) = ix.position("w").unwrap();
        assert_eq!(last, Some(2));
        let mut s = Stream::new(s.config, last, Some(digest));
        assert_eq!(s.start(&mut ix, "w", 5.0).unwrap().replay_from, Some(2));
        for seq in 2..6 {
            s.replayed(&mut ix, "w", seq, &batch(seq), 5.1).unwrap();
        }
        s.replay_end(&mut ix, "w", 5.1).unwrap();
        assert_eq!((s.state(), depth(&ix), s.counters().purges), (State::Live, 6, 0));
    }

    #[test]
    fn without_replay_endpoint_a_gap_purges() {
        let (mut ix, mut s) = setup(false);
        assert_eq!(s.start(&mut ix, "w", 0.0).unwrap().replay_from, None);
        // late join: the first message is taken as the start, the earlier
        // batches are reported lost
        s.live(&mut ix, "w", 5, &store(5.0, 1, None), 0.0).unwrap();
        s.live(&mut ix, "w", 6, &store(6.0, 2, Some(1)), 0.0).unwrap();
        assert_eq!((s.state(), depth(&ix), s.counters().lost), (State::Degraded, 2, 5));
        s.tick(&mut ix, "w", 5.0).unwrap();
        assert_eq!(s.state(), State::Live);
        s.live(&mut ix, "w", 9, &store(9.0, 3, Some(2)), 6.0).unwrap();
        assert_eq!(s.state(), State::Degraded);
        let c = s.counters();
        assert_eq!((c.gaps, c.lost, c.purges), (1, 7, 1));
        assert_eq!(depth(&ix), 0);
        // and a reconnect cannot be checked: purge
        s.reconnected(&mut ix, "w", 2.0).unwrap();
        assert_eq!(s.counters().purges, 2);
    }

    #[test]
    fn replay_timeout_purges_and_goes_on_from_live() {
        let (mut ix, mut s) = setup(true);
        s.start(&mut ix, "w", 0.0).unwrap();
        s.live(&mut ix, "w", 7, &store(7.0, 1, None), 0.5).unwrap();
        s.live(&mut ix, "w", 8, &store(8.0, 2, Some(1)), 0.6).unwrap();
        s.tick(&mut ix, "w", 0.9).unwrap();
        assert_eq!(s.state(), State::Replaying);
        s.tick(&mut ix, "w", 1.0).unwrap();
        assert_eq!(s.state(), State::Degraded);
        assert_eq!((depth(&ix), s.last_seq(), s.counters().timeouts), (2, Some(8), 1));
        // a late reply to the abandoned replay is ignored
        s.replayed(&mut ix, "w", 0, &batch(0), 1.1).unwrap();
        assert_eq!(s.last_seq(), Some(8));
    }

    #[test]
    fn a_long_replay_that_keeps_arriving_is_not_cut_off() {
        let (mut ix, mut s) = setup(true);
        s.start(&mut ix, "w", 0.0).unwrap();
        for seq in 0..30 {
            let now = f64::from(seq as u32) * 0.5; // 15 s in all, 1 s timeout
            s.replayed(&mut ix, "w", seq, &batch(seq), now).unwrap();
            s.tick(&mut ix, "w", now + 0.4).unwrap();
            assert_eq!(s.state(), State::Replaying);
        }
        s.replay_end(&mut ix, "w", 15.0).unwrap();
        assert_eq!((s.state(), s.counters().timeouts, depth(&ix)), (State::Live, 0, 30));
        // silence does time out
        s.reconnected(&mut ix, "w", 20.0).unwrap();
        s.tick(&mut ix, "w", 21.0).unwrap();
        assert_eq!(s.counters().timeouts, 1);
    }

    #[test]
    fn a_replay_whose_tail_was_dropped_is_asked_again_not_purged() {
        let (mut ix, mut s) = setup(true);
        s.start(&mut ix, "w", 0.0).unwrap();
        for seq in 0..5 {
            s.replayed(&mut ix, "w", seq, &batch(seq), 0.1).unwrap();
        }
        // seq 5..8 and the end marker never come
        assert_eq!(s.tick(&mut ix, "w", 1.2).unwrap().replay_from, Some(5));
        assert_eq!((s.state(), s.counters().purges, depth(&ix)), (State::Replaying, 0, 5));
        for seq in 5..8 {
            s.replayed(&mut ix, "w", seq, &batch(seq), 1.3).unwrap();
        }
        s.replay_end(&mut ix, "w", 1.3).unwrap();
        let c = s.counters();
        assert_eq!((s.state(), c.purges, c.lost, c.timeouts, depth(&ix)), (State::Live, 0, 0, 1, 8));
        // a re-asked replay that brings nothing does end in a purge
        assert_eq!(s.live(&mut ix, "w", 10, &batch(10), 2.0).unwrap().replay_from, Some(8));
        s.tick(&mut ix, "w", 3.1).unwrap();
        assert_eq!(s.counters().purges, 1);
    }

    #[test]
    fn malformed_payloads_are_counted_and_keep_the_sequence() {
        let (mut ix, mut s) = setup(true);
        s.start(&mut ix, "w", 0.0).unwrap();
        s.replay_end(&mut ix, "w", 0.0).unwrap();
        s.live(&mut ix, "w", 0, &batch(0), 0.1).unwrap();
        s.live(&mut ix, "w", 1, b"\x93\xc1", 0.1).unwrap();
        s.live(&mut ix, "w", 2, &store(2.0, 9, None), 0.1).unwrap();
        let c = s.counters();
        assert_eq!((c.malformed, c.gaps, c.batches, s.state()), (1, 0, 2, State::Live));
        assert_eq!(ix.position("w").unwrap().0, Some(2));
    }
}
