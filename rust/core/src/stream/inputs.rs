//! What the transport reports: live messages, replay replies and end
//! markers, connection events and the passing of time.

use super::{Pending, Sink, State, Stream, Todo};
use crate::stream::payload_digest;
use crate::IndexError;

impl Stream {
    /// A live message.
    pub fn live(&mut self, sink: &mut impl Sink, seq: u64, payload: &[u8], now: f64) -> Result<Todo, IndexError> {
        if self.state == State::Stopped {
            return Ok(Todo::NONE);
        }
        self.last_heard = Some(now);
        self.idle_probes = 0;
        // One engine never repeats a live seq: at or below one already seen
        // live, or one already applied that is not the live copy of a
        // replayed batch, it is a new engine process.
        let regressed = if self.live_high.is_some_and(|h| seq <= h) {
            true
        } else if self.last.is_some_and(|l| seq <= l) {
            self.replayed.get(&seq) != Some(&payload_digest(payload))
        } else {
            false
        };
        self.live_high = Some(self.live_high.map_or(seq, |h| h.max(seq)));
        // Live copies of replayed batches before this one will not come any more.
        self.replayed = self.replayed.split_off(&seq.saturating_add(1));
        if !regressed && self.last.is_some_and(|l| seq <= l) {
            self.counters.duplicates += 1;
            return Ok(Todo::NONE);
        }
        if regressed {
            let todo = self.restart(sink, now)?;
            self.live_high = Some(seq);
            if self.config.replay {
                self.buffer(seq, payload);
                return Ok(todo);
            }
            self.counters.lost += seq;
            self.apply(sink, seq, payload, now)?;
            return Ok(todo);
        }
        let waiting = match self.state {
            State::Replaying | State::Disconnected => true,
            // Before `start` (history not fetched yet) live messages wait too.
            State::Connecting => self.config.replay,
            _ => false,
        };
        if waiting {
            self.buffer(seq, payload);
            return Ok(Todo::NONE);
        }
        let Some(last) = self.last else {
            if self.config.replay && seq > 0 {
                // Batches before this one were published and never seen
                // (a slow joiner, or after a purge): fetch them.
                self.counters.gaps += 1;
                self.counters.dropped += seq;
                self.buffer(seq, payload);
                return Ok(self.ask(Pending::Fill { from: 0 }, now));
            }
            // First message of a stream without replay: take it as the start.
            if !self.config.replay && seq > 0 {
                // Joined late with no way to fetch what came before.
                self.counters.lost += seq;
                self.incident(now);
            }
            self.apply(sink, seq, payload, now)?;
            self.settle(now);
            return Ok(Todo::NONE);
        };
        let expected = last + 1;
        if seq == expected {
            self.apply(sink, seq, payload, now)?;
            if self.state != State::Live {
                self.settle(now);
            }
            return Ok(Todo::NONE);
        }
        self.counters.gaps += 1;
        self.counters.dropped += seq - expected;
        if self.config.replay {
            self.buffer(seq, payload);
            return Ok(self.ask_from(expected, now));
        }
        self.lose_until(sink, expected, seq, payload, now)?;
        self.state = State::Degraded;
        Ok(Todo::NONE)
    }

    /// A replay reply (not the end marker).
    pub fn replayed(&mut self, sink: &mut impl Sink, seq: u64, payload: &[u8], now: f64) -> Result<Todo, IndexError> {
        let Some(mut r) = self.replay else {
            // A late reply to a replay we gave up on: not ours any more.
            self.counters.duplicates += 1;
            return Ok(Todo::NONE);
        };
        self.last_heard = Some(now);
        let want = r.pending.from();
        if !r.started {
            if seq < want {
                // Below what was asked: stale, and no progress.
                self.counters.duplicates += 1;
                return Ok(Todo::NONE);
            }
            r.started = true;
            r.progressed = true;
            r.deadline = now + self.config.replay_timeout;
            self.replay = Some(r);
            match r.pending {
                Pending::Probe { digest, .. } => {
                    if seq > want {
                        // The engine's buffer no longer holds what we applied
                        // last: we cannot tell what happened in between.
                        self.replay = Some(super::Replay { pending: Pending::Fill { from: seq }, ..r });
                        // (`want` itself counts: it cannot be verified.)
                        self.lose_until(sink, want, seq, payload, now)?;
                        self.remember_replayed(seq);
                        return Ok(Todo::NONE);
                    }
                    if payload_digest(payload) != digest {
                        // Another batch under the seq we applied: the engine
                        // restarted. Start over.
                        return self.restart(sink, now);
                    }
                    self.counters.duplicates += 1;
                    // Continuity confirmed; what follows are new batches.
                    // (Not progress enough to ask again if nothing follows.)
                    self.replay =
                        Some(super::Replay { pending: Pending::Fill { from: want + 1 }, progressed: false, ..r });
                    return Ok(Todo::NONE);
                }
                Pending::Fill { from } => {
                    if seq > from {
                        // The engine's buffer starts later than asked.
                        self.lose_until(sink, from, seq, payload, now)?;
                        self.remember_replayed(seq);
                        return Ok(Todo::NONE);
                    }
                }
            }
        }
        match self.last {
            Some(l) if seq <= l => {
                // Stale or repeated: no progress, the deadline stays.
                self.counters.duplicates += 1;
                return Ok(Todo::NONE);
            }
            Some(l) if seq > l + 1 => {
                // A hole inside the replay. An engine's replay socket drops
                // what passes its high-water mark, so a long replay arrives
                // with holes while the engine still has the batches: ask
                // again from the hole, once (this message comes again).
                if self.reasked != Some(l + 1) {
                    self.counters.gaps += 1;
                    self.reasked = Some(l + 1);
                    return Ok(self.ask_from(l + 1, now));
                }
                // Asked again and the hole is still there: history is lost.
                self.lose_until(sink, l + 1, seq, payload, now)?;
                self.remember_replayed(seq);
            }
            None if seq > want => {
                self.lose_until(sink, want, seq, payload, now)?;
                self.remember_replayed(seq);
            }
            _ => self.apply_replayed(sink, seq, payload, now)?,
        }
        if let Some(r) = self.replay.as_mut() {
            r.progressed = true;
            r.deadline = now + self.config.replay_timeout;
        }
        self.reasked = None;
        Ok(Todo::NONE)
    }

    /// The replay's end marker.
    pub fn replay_end(&mut self, sink: &mut impl Sink, now: f64) -> Result<Todo, IndexError> {
        let Some(r) = self.replay else { return Ok(Todo::NONE) };
        self.last_heard = Some(now);
        if !r.started {
            match r.pending {
                // Nothing at or after the seq we applied last: the engine
                // lost it, so it restarted.
                // (A gap fill after an applied seq is always such a probe,
                // so an empty gap fill is a restart too.)
                Pending::Probe { .. } => return self.restart(sink, now),
                // A fill from 0 (nothing applied yet) that brings nothing:
                // the engine has published nothing yet, or everything it did
                // is buffered; `flush` asks again for any hole before it.
                Pending::Fill { .. } => {}
            }
        }
        self.replay = None;
        self.flush(sink, now)
    }

    /// Apply buffered live messages in order after a replay.
    pub(super) fn flush(&mut self, sink: &mut impl Sink, now: f64) -> Result<Todo, IndexError> {
        while let Some(&seq) = self.buffer.keys().next() {
            let expected = self.last.map_or(0, |l| l + 1);
            let (seq, payload) = if self.last.is_some_and(|l| seq <= l) {
                self.take_first();
                self.counters.duplicates += 1;
                continue;
            } else if seq > expected {
                // Messages went missing between the replay and the buffer.
                if self.reasked != Some(expected) {
                    // Ask once more from where we are.
                    self.counters.gaps += 1;
                    self.reasked = Some(expected);
                    return Ok(self.ask_from(expected, now));
                }
                // Asked again and it did not come: it is lost.
                self.counters.abandoned += 1;
                let (seq, payload) = self.take_first().expect("peeked");
                self.lose_until(sink, expected, seq, &payload, now)?;
                continue;
            } else {
                self.take_first().expect("peeked")
            };
            self.apply(sink, seq, &payload, now)?;
        }
        self.settle(now);
        Ok(Todo::NONE)
    }

    /// Give up on the pending replay: purge, and go on from the live stream
    /// (the oldest buffered message becomes the start).
    fn abandon(&mut self, sink: &mut impl Sink, now: f64) -> Result<Todo, IndexError> {
        self.replay = None;
        self.counters.abandoned += 1;
        if let Some(l) = self.last {
            let first = self.buffer.keys().next().copied();
            self.counters.lost += first.map_or(0, |f| f.saturating_sub(l + 1));
            self.purge(sink)?;
        }
        self.incident(now);
        if let Some((seq, payload)) = self.take_first() {
            self.apply(sink, seq, &payload, now)?;
        }
        let todo = self.flush(sink, now)?;
        if self.state != State::Replaying {
            self.state = State::Degraded;
        }
        Ok(todo)
    }

    /// Time passes: replay deadlines, the dead-after period, idle probes and
    /// the clean period.
    pub fn tick(&mut self, sink: &mut impl Sink, now: f64) -> Result<Todo, IndexError> {
        match self.state {
            State::Stopped => return Ok(Todo::NONE),
            State::Connecting => {
                // A worker resumed from a snapshot whose publisher never
                // answers: what it held cannot be trusted past dead_after.
                let since = *self.waiting_since.get_or_insert(now);
                if self.last.is_some() && now - since >= self.config.dead_after {
                    self.purge(sink)?;
                    self.clear_buffer();
                }
                return Ok(Todo::NONE);
            }
            State::Disconnected => {
                let dead = self.disconnected_at.is_some_and(|t| now - t >= self.config.dead_after);
                if dead && (self.last.is_some() || !self.buffer.is_empty()) {
                    // Gone for good (or for too long to trust): nothing it
                    // held may be claimed any more.
                    if self.last.is_some() {
                        self.purge(sink)?;
                    }
                    self.clear_buffer();
                    self.live_high = None;
                }
                return Ok(Todo::NONE);
            }
            _ => {}
        }
        if let Some(r) = self.replay {
            let over = self.episode.is_some_and(|t| now - t >= self.config.replay_max);
            if over || now >= r.deadline {
                self.counters.timeouts += 1;
                if !over && r.started && r.progressed && matches!(r.pending, Pending::Fill { .. }) {
                    // The replay was arriving, then went silent before its
                    // end marker (the engine's ROUTER dropped the tail at its
                    // high-water mark): ask again from where we are.
                    let from = self.last.map_or(0, |l| l + 1);
                    return Ok(self.ask_from(from, now));
                }
                return self.abandon(sink, now);
            }
            return Ok(Todo::NONE);
        }
        // Probes of a silent worker back off: idle_probe, then twice that,
        // ... up to 32 times it, until something arrives.
        let wait = self.config.idle_probe * f64::from(1u32 << self.idle_probes.min(5));
        let quiet = self.last_heard.is_some_and(|t| now - t >= wait);
        if self.config.replay
            && self.config.idle_probe > 0.0
            && quiet
            && matches!(self.state, State::Live | State::Degraded)
        {
            // Silent for a while: the tail of a burst (or, before anything
            // arrived, its first batches) may have been lost, and no later
            // seq would reveal it.
            self.idle_probes += 1;
            return Ok(self.probe(now));
        }
        if self.state == State::Degraded {
            self.settle(now);
        }
        Ok(Todo::NONE)
    }

    /// The SUB socket (re)connected to the engine's publisher. A reconnect
    /// after a disconnect may be a restarted engine that publishes nothing:
    /// probe it, even if a replay is in progress (that replay may have been
    /// answered by the old engine).
    pub fn reconnected(&mut self, sink: &mut impl Sink, now: f64) -> Result<Todo, IndexError> {
        if self.state == State::Stopped {
            return Ok(Todo::NONE);
        }
        self.disconnected_at = None;
        self.last_heard = Some(now);
        if self.config.replay {
            if self.state == State::Connecting {
                // Not started yet: `start` fetches the history.
                return Ok(Todo::NONE);
            }
            if self.last.is_none() {
                // Nothing applied to check the engine against: what was
                // buffered from the old connection may be another process's;
                // the replay from 0 brings it again if it is this one's.
                self.clear_buffer();
                self.live_high = None;
            }
            return Ok(self.probe(now));
        }
        // No way to check: never risk a false positive.
        if self.last.is_some() {
            self.counters.resets += 1;
            self.purge(sink)?;
        }
        self.clear_buffer();
        self.live_high = None;
        self.incident(now);
        self.state = State::Degraded;
        Ok(Todo::NONE)
    }

    /// The publisher connection dropped (engine killed, host gone, or silent
    /// past the heartbeat timeout).
    pub fn disconnected(&mut self, now: f64) {
        if matches!(self.state, State::Stopped | State::Disconnected) {
            return;
        }
        self.counters.disconnects += 1;
        self.state = State::Disconnected;
        self.disconnected_at = Some(now);
        // A replay to a gone engine will not answer; the reconnect asks anew.
        self.replay = None;
        self.episode = None;
        self.reasked = None;
    }

    /// A message whose frames were not well-formed (e.g. a seq frame that is
    /// not 8 bytes): counted, nothing else.
    pub fn malformed_frame(&mut self) {
        self.counters.malformed += 1;
    }

    pub fn stop(&mut self) {
        self.state = State::Stopped;
        self.replay = None;
        self.episode = None;
        self.clear_buffer();
    }
}
