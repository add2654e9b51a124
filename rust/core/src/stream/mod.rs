//! Per-worker event-stream state machine (SPEC section 3).
//!
//! The transport (Python, pyzmq) owns the sockets and reports what arrived;
//! this module decides what it means and applies payloads through a
//! [`Sink`] (the worker's slice of the index):
//!
//! - live message `(seq, payload)`: apply when it is the next seq; on a gap
//!   (seq > last + 1) ask for a replay from last + 1 and buffer live
//!   messages meanwhile. A live seq at or below one already seen can only
//!   come from a restarted engine (one engine never repeats a live seq):
//!   purge and replay from 0.
//! - replay replies: check that the replay starts where it was asked to; if
//!   it starts later the engine's buffer no longer covers the gap: purge,
//!   count the lost batches, go on (state `degraded`). A replay's silence
//!   deadline is extended only by progress (a reply that is applied or that
//!   confirms a probe), and a replay episode is capped in total time.
//! - a gap-fill replay answered by only the end marker although seqs at or
//!   after its start were seen live: the engine lost what it published, so
//!   it restarted: purge and replay from 0.
//! - a reconnect of the SUB socket (the engine may have restarted and be
//!   idle), even while a replay runs, and a worker silent for `idle_probe`
//!   seconds (the tail of a burst may have been lost): probe with a replay
//!   from the last applied seq and compare the engine's payload for that
//!   seq with a digest of the one applied; a different payload, or none,
//!   means a restart: purge and replay from 0.
//! - a disconnect: state `disconnected` (never routed to); purged after
//!   `dead_after` seconds unless the publisher comes back (then probed).
//!
//! Every seq is applied at most once. Malformed payloads are counted and
//! skipped without breaking the sequence. `degraded` turns back into `live`
//! after `clean_secs` without incident.

use std::collections::BTreeMap;

use crate::index::ApplyStats;
use crate::IndexError;

#[cfg(test)]
mod tests;

/// A cheap digest that tells two batches with the same seq apart: the
/// payload's length and first 64 bytes (the envelope's float timestamp and
/// the start of the first event).
pub fn payload_digest(payload: &[u8]) -> u64 {
    let head = &payload[..payload.len().min(64)];
    xxhash_rust::xxh3::xxh3_64_with_seed(head, payload.len() as u64)
}

/// Where a stream's payloads go: one worker's holdings in the index.
pub trait Sink {
    /// Apply one payload; a decode error is returned as
    /// [`IndexError::Decode`] (the stream counts it and goes on).
    fn apply(&mut self, payload: &[u8]) -> Result<ApplyStats, IndexError>;
    /// Drop everything the worker holds.
    fn purge(&mut self) -> Result<(), IndexError>;
}

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
    /// The publisher connection dropped; never routed to, purged after
    /// `dead_after` unless it comes back.
    Disconnected,
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
            State::Disconnected => "disconnected",
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
    /// Live seqs that never arrived on the live stream (dropped at a
    /// high-water mark or by the network), whether a replay recovered them
    /// or not.
    pub dropped: u64,
    /// Replay requests sent (fills and probes).
    pub replays: u64,
    /// Batches known lost (not covered by a replay).
    pub lost: u64,
    /// Engine restarts detected (sequence regressions, failed probes,
    /// empty gap fills).
    pub resets: u64,
    /// Payloads that did not decode (counted, skipped).
    pub malformed: u64,
    /// Messages dropped as already applied (or stale replay replies).
    pub duplicates: u64,
    /// Purges of the worker's holdings.
    pub purges: u64,
    /// Replay deadlines that passed (silence, or the total cap).
    pub timeouts: u64,
    /// Replays given up on (the worker was purged and went on from live).
    pub abandoned: u64,
    /// Live messages dropped from a full replay buffer (recovered by a
    /// further replay when the engine still has them).
    pub overflows: u64,
    /// Disconnects of the publisher.
    pub disconnects: u64,
}

/// Settings of one stream.
#[derive(Clone, Copy, Debug)]
pub struct StreamConfig {
    /// The engine has a replay endpoint.
    pub replay: bool,
    /// Seconds a replay may go without progress before it is given up (or
    /// asked again from where it got to).
    pub replay_timeout: f64,
    /// Seconds a replay episode (asks and re-asks) may last in all.
    pub replay_max: f64,
    /// Seconds without incident before `degraded` turns `live`.
    pub clean_secs: f64,
    /// Live messages kept while replaying; past it the oldest are dropped
    /// (and recovered by a further replay).
    pub max_buffered: usize,
    /// Payload bytes kept while replaying (same policy).
    pub max_buffered_bytes: usize,
    /// Seconds a disconnected worker keeps its holdings.
    pub dead_after: f64,
    /// Seconds of silence after which a live worker is probed (then at
    /// doubling intervals up to 32 times this while it stays silent; 0: never).
    pub idle_probe: f64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            replay: true,
            replay_timeout: 2.0,
            replay_max: 30.0,
            clean_secs: 10.0,
            max_buffered: 100_000,
            max_buffered_bytes: 256 << 20,
            dead_after: 10.0,
            idle_probe: 3.0,
        }
    }
}

impl StreamConfig {
    /// Reject settings that would make a stream misbehave.
    pub fn validate(&self) -> Result<(), IndexError> {
        let secs = [
            ("replay_timeout", self.replay_timeout),
            ("replay_max", self.replay_max),
            ("clean_secs", self.clean_secs),
            ("dead_after", self.dead_after),
            ("idle_probe", self.idle_probe),
        ];
        for (name, v) in secs {
            if !(v.is_finite() && v >= 0.0) {
                return Err(IndexError::Invalid(format!("{name} must be a finite number >= 0, got {v}")));
            }
        }
        if self.replay_timeout <= 0.0 {
            return Err(IndexError::Invalid("replay_timeout must be > 0".into()));
        }
        if self.max_buffered == 0 || self.max_buffered_bytes == 0 {
            return Err(IndexError::Invalid("max_buffered and max_buffered_bytes must be > 0".into()));
        }
        Ok(())
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

impl Todo {
    const NONE: Todo = Todo { replay_from: None };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// Replay of missing batches from `from`.
    Fill { from: u64 },
    /// Probe (after a reconnect, a resume, or silence): the first reply
    /// must be `seq` with the payload digest we applied for it.
    Probe { seq: u64, digest: u64 },
}

impl Pending {
    fn from(self) -> u64 {
        match self {
            Pending::Fill { from } => from,
            Pending::Probe { seq, .. } => seq,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Replay {
    pending: Pending,
    /// Given up (or re-asked) when no progress is made by then.
    deadline: f64,
    /// A reply at or after the requested seq has arrived.
    started: bool,
    /// Something was applied since the request (a re-ask after silence
    /// is worth it only then).
    progressed: bool,
}

/// One worker's stream: its state, its position (the last applied seq and
/// the digest of that payload: the one place the index keeps it), the
/// pending replay and the live messages buffered meanwhile.
#[derive(Debug, Clone)]
pub struct Stream {
    pub config: StreamConfig,
    state: State,
    last: Option<u64>,
    digest: u64,
    replay: Option<Replay>,
    /// When the current replay episode (asks and re-asks) began.
    episode: Option<f64>,
    /// The last request was a re-ask of this `from` after no progress.
    reasked: Option<u64>,
    buffer: BTreeMap<u64, Vec<u8>>,
    buffered_bytes: usize,
    /// Highest live seq seen since the stream last started over.
    live_high: Option<u64>,
    /// Digests of batches applied from a replay whose live copy may still
    /// be queued on the SUB socket (it travels on another connection):
    /// such a live copy is a duplicate, any other live seq at or below the
    /// last applied one is a restarted engine.
    replayed: BTreeMap<u64, u64>,
    /// Since when a resumed worker has waited for its publisher.
    waiting_since: Option<f64>,
    counters: StreamCounters,
    last_event: Option<f64>,
    /// Last time anything arrived from the engine (live or replay).
    last_heard: Option<f64>,
    /// Idle probes sent since the last live message.
    idle_probes: u32,
    incident_at: Option<f64>,
    disconnected_at: Option<f64>,
}

impl Default for Stream {
    fn default() -> Self {
        Stream::new(StreamConfig::default(), None, 0)
    }
}

impl Stream {
    /// A stream positioned after `last` (whose payload had `digest`), e.g.
    /// restored from a snapshot.
    pub fn new(config: StreamConfig, last: Option<u64>, digest: u64) -> Stream {
        Stream {
            config,
            state: State::Connecting,
            last,
            digest: if last.is_some() { digest } else { 0 },
            replay: None,
            episode: None,
            reasked: None,
            buffer: BTreeMap::new(),
            buffered_bytes: 0,
            live_high: None,
            replayed: BTreeMap::new(),
            waiting_since: None,
            counters: StreamCounters::default(),
            last_event: None,
            last_heard: None,
            idle_probes: 0,
            incident_at: None,
            disconnected_at: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }
    /// The last applied seq and the digest of its payload.
    pub fn position(&self) -> (Option<u64>, u64) {
        (self.last, self.digest)
    }
    pub fn last_seq(&self) -> Option<u64> {
        self.last
    }
    pub fn counters(&self) -> StreamCounters {
        self.counters
    }
    /// When the last batch was applied.
    pub fn last_event(&self) -> Option<f64> {
        self.last_event
    }
    /// When the publisher connection dropped (while `disconnected`).
    pub fn disconnected_at(&self) -> Option<f64> {
        self.disconnected_at
    }
    pub fn buffered(&self) -> (usize, usize) {
        (self.buffer.len(), self.buffered_bytes)
    }

    /// Record a position without a stream decision (plain `Index.apply`
    /// with a seq, or a restored snapshot).
    pub fn set_position(&mut self, last: Option<u64>, digest: u64) {
        self.last = last;
        self.digest = if last.is_some() { digest } else { 0 };
    }

    // ----------------------------------------------------------- helpers

    fn ask(&mut self, pending: Pending, now: f64) -> Todo {
        let from = pending.from();
        self.replay =
            Some(Replay { pending, deadline: now + self.config.replay_timeout, started: false, progressed: false });
        self.episode.get_or_insert(now);
        self.state = State::Replaying;
        self.counters.replays += 1;
        Todo { replay_from: Some(from) }
    }

    /// Ask for the batches from `from` on. When the batch before it is the
    /// last one applied, ask from that one instead, as a probe: a replay
    /// then also proves that the engine answering is the one whose history
    /// we hold (a restarted engine whose first live batches were lost would
    /// otherwise fill the gap with its own, spliced onto the old history).
    fn ask_from(&mut self, from: u64, now: f64) -> Todo {
        match self.last {
            Some(l) => {
                debug_assert_eq!(l + 1, from, "a fill always starts after the last applied seq");
                self.ask(Pending::Probe { seq: l, digest: self.digest }, now)
            }
            None => self.ask(Pending::Fill { from }, now),
        }
    }

    fn probe(&mut self, now: f64) -> Todo {
        match self.last {
            Some(seq) => self.ask(Pending::Probe { seq, digest: self.digest }, now),
            None => self.ask(Pending::Fill { from: 0 }, now),
        }
    }

    fn purge(&mut self, sink: &mut impl Sink) -> Result<(), IndexError> {
        sink.purge()?;
        self.replayed.clear();
        self.counters.purges += 1;
        self.last = None;
        self.digest = 0;
        Ok(())
    }

    /// The engine restarted: purge, forget what was buffered, and start
    /// over from its seq 0.
    fn restart(&mut self, sink: &mut impl Sink, now: f64) -> Result<Todo, IndexError> {
        self.counters.resets += 1;
        self.purge(sink)?;
        self.clear_buffer();
        self.live_high = None;
        self.reasked = None;
        if self.config.replay {
            return Ok(self.ask(Pending::Fill { from: 0 }, now));
        }
        self.replay = None;
        self.incident(now);
        self.state = State::Degraded;
        Ok(Todo::NONE)
    }

    fn incident(&mut self, now: f64) {
        self.incident_at = Some(now);
    }

    fn settle(&mut self, now: f64) {
        self.episode = None;
        self.reasked = None;
        self.state = match self.incident_at {
            Some(t) if now - t < self.config.clean_secs => State::Degraded,
            _ => State::Live,
        };
    }

    fn clear_buffer(&mut self) {
        self.buffer.clear();
        self.buffered_bytes = 0;
    }

    fn buffer(&mut self, seq: u64, payload: &[u8]) {
        // A live seq is never buffered twice: a repeated one is a restart,
        // which empties the buffer first.
        let repeated = self.buffer.insert(seq, payload.to_vec());
        debug_assert!(repeated.is_none(), "seq {seq} buffered twice");
        self.buffered_bytes += payload.len();
        while self.buffer.len() > self.config.max_buffered || self.buffered_bytes > self.config.max_buffered_bytes {
            let Some((_, p)) = self.buffer.pop_first() else { break };
            self.buffered_bytes -= p.len();
            self.counters.overflows += 1;
        }
    }

    fn take_first(&mut self) -> Option<(u64, Vec<u8>)> {
        let (seq, p) = self.buffer.pop_first()?;
        self.buffered_bytes -= p.len();
        Some((seq, p))
    }

    /// Apply a batch that came by replay, remembering its digest until its
    /// live copy (if any) has gone by.
    fn apply_replayed(&mut self, sink: &mut impl Sink, seq: u64, payload: &[u8], now: f64) -> Result<(), IndexError> {
        self.apply(sink, seq, payload, now)?;
        self.remember_replayed(seq);
        Ok(())
    }

    /// `seq` was just applied from a replay.
    fn remember_replayed(&mut self, seq: u64) {
        if self.live_high.is_none_or(|h| seq > h) {
            self.replayed.insert(seq, self.digest);
            while self.replayed.len() > self.config.max_buffered {
                self.replayed.pop_first();
            }
        }
    }

    /// Apply one batch; a malformed payload is counted and skipped (its seq
    /// still counts as applied, so it does not look like a gap).
    fn apply(&mut self, sink: &mut impl Sink, seq: u64, payload: &[u8], now: f64) -> Result<(), IndexError> {
        match sink.apply(payload) {
            Ok(st) => {
                self.counters.batches += 1;
                self.counters.events += st.stored + st.removed + st.skipped + st.cleared;
            }
            Err(IndexError::Decode(_)) => self.counters.malformed += 1,
            // Not applied: the position stays where it was.
            Err(e) => return Err(e),
        }
        self.last = Some(seq);
        self.digest = payload_digest(payload);
        self.last_event = Some(now);
        Ok(())
    }

    /// History between `expected` and the next available `seq` is lost:
    /// purge (a lost batch may have removed anything), count, apply `seq`
    /// as the new start.
    fn lose_until(
        &mut self,
        sink: &mut impl Sink,
        expected: u64,
        seq: u64,
        payload: &[u8],
        now: f64,
    ) -> Result<(), IndexError> {
        self.counters.lost += seq.saturating_sub(expected);
        if self.last.is_some() {
            self.purge(sink)?;
        }
        self.incident(now);
        self.apply(sink, seq, payload, now)
    }

    // ------------------------------------------------------------ inputs

    /// The transport is subscribed and ready: start (replay from the
    /// beginning, or verify a resumed position).
    pub fn start(&mut self, sink: &mut impl Sink, now: f64) -> Result<Todo, IndexError> {
        self.config.validate()?;
        self.last_heard = Some(now);
        if !self.config.replay {
            if self.last.is_some() {
                // Resuming without a way to check what the engine did
                // meanwhile: start over from the live stream.
                self.purge(sink)?;
                self.incident(now);
                self.state = State::Degraded;
            } else {
                self.state = State::Connecting;
            }
            return Ok(Todo::NONE);
        }
        Ok(self.probe(now))
    }
}

mod inputs;
