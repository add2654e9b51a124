//! Workers followed by an event stream: the index owns each worker's
//! [`Stream`] (state, pending replay, buffer, counters, position), so one
//! lock guards the stream decisions and the holdings they change. The
//! transport reports what arrived through these methods and sends the
//! replay requests they return.

use super::Index;
use crate::error::IndexError;
use crate::index::ApplyStats;
use crate::stream::{Sink, Stream, StreamConfig, Todo};
use crate::wire::{self, Mode};

/// One worker's slice of the index, as its stream sees it.
struct WorkerSink<'a> {
    ix: &'a mut Index,
    slot: u32,
}

impl Sink for WorkerSink<'_> {
    fn apply(&mut self, payload: &[u8]) -> Result<ApplyStats, IndexError> {
        let mut bufs = std::mem::take(&mut self.ix.decode_buffers);
        let result = wire::decode_with(payload, Mode::Index, &mut bufs).map(|batch| {
            let st = self.ix.apply_batch(self.slot, &batch, None);
            bufs.recycle(batch);
            st
        });
        self.ix.decode_buffers = bufs;
        Ok(result?)
    }

    fn purge(&mut self) -> Result<(), IndexError> {
        self.ix.purge_slot(self.slot);
        self.ix.worker_mut(self.slot).counters.purges += 1;
        Ok(())
    }
}

impl Index {
    /// Follow worker `id` of `model` with an event stream (registering the
    /// worker if needed). A worker already in the index, e.g. from a
    /// snapshot, resumes from its saved position. Call
    /// [`Index::stream_start`] once its publisher is connected.
    pub fn follow(&mut self, id: &str, model: &str, config: StreamConfig) -> Result<(), IndexError> {
        config.validate()?;
        if let Some(&slot) = self.by_id.get(id) {
            if self.worker(slot).followed {
                return Err(IndexError::AlreadyFollowed(id.to_owned()));
            }
        }
        self.add_worker(id, model)?;
        let slot = self.slot_of(id)?;
        let w = self.worker_mut(slot);
        let (last, digest) = w.stream.position();
        w.stream = Stream::new(config, last, digest);
        w.followed = true;
        Ok(())
    }

    /// Stop following worker `id` and remove it with everything it holds.
    /// Returns false if it is not in the index.
    pub fn unfollow(&mut self, id: &str) -> bool {
        let Some(&slot) = self.by_id.get(id) else { return false };
        self.remove_slot(slot);
        true
    }

    /// Whether an event stream follows worker `id`.
    pub fn is_followed(&self, id: &str) -> bool {
        self.by_id.get(id).is_some_and(|&s| self.worker(s).followed)
    }

    /// Run `f` on a followed worker's stream with its sink.
    fn with_stream<T>(
        &mut self,
        id: &str,
        f: impl FnOnce(&mut Stream, &mut WorkerSink<'_>) -> Result<T, IndexError>,
    ) -> Result<T, IndexError> {
        let slot = self.slot_of(id)?;
        if !self.worker(slot).followed {
            return Err(IndexError::UnknownWorker(id.to_owned()));
        }
        let mut stream = std::mem::take(&mut self.worker_mut(slot).stream);
        let result = f(&mut stream, &mut WorkerSink { ix: self, slot });
        self.worker_mut(slot).stream = stream;
        result
    }

    /// The publisher is connected: fetch the history (or verify a resumed
    /// position).
    pub fn stream_start(&mut self, id: &str, now: f64) -> Result<Todo, IndexError> {
        self.with_stream(id, |s, sink| s.start(sink, now))
    }

    /// A live message; `seq` is None when its seq frame was malformed.
    pub fn stream_live(&mut self, id: &str, seq: Option<u64>, payload: &[u8], now: f64) -> Result<Todo, IndexError> {
        self.with_stream(id, |s, sink| match seq {
            Some(seq) => s.live(sink, seq, payload, now),
            None => {
                s.malformed_frame();
                Ok(Todo::default())
            }
        })
    }

    /// Several live messages of one worker in arrival order; the last replay
    /// request any of them asked for.
    pub fn stream_live_many<'p>(
        &mut self,
        id: &str,
        messages: impl IntoIterator<Item = (Option<u64>, &'p [u8])>,
        now: f64,
    ) -> Result<Todo, IndexError> {
        self.with_stream(id, |s, sink| {
            let mut todo = Todo::default();
            for (seq, payload) in messages {
                let t = match seq {
                    Some(seq) => s.live(sink, seq, payload, now)?,
                    None => {
                        s.malformed_frame();
                        Todo::default()
                    }
                };
                if t.replay_from.is_some() {
                    todo = t;
                }
            }
            Ok(todo)
        })
    }

    /// A replay reply; `seq` is None when its frames were malformed.
    pub fn stream_replayed(
        &mut self,
        id: &str,
        seq: Option<u64>,
        payload: &[u8],
        now: f64,
    ) -> Result<Todo, IndexError> {
        self.with_stream(id, |s, sink| match seq {
            Some(seq) => s.replayed(sink, seq, payload, now),
            None => {
                s.malformed_frame();
                Ok(Todo::default())
            }
        })
    }

    /// The replay's end marker.
    pub fn stream_replay_end(&mut self, id: &str, now: f64) -> Result<Todo, IndexError> {
        self.with_stream(id, |s, sink| s.replay_end(sink, now))
    }

    /// The SUB socket reconnected to the publisher.
    pub fn stream_reconnected(&mut self, id: &str, now: f64) -> Result<Todo, IndexError> {
        self.with_stream(id, |s, sink| s.reconnected(sink, now))
    }

    /// The publisher connection dropped.
    pub fn stream_disconnected(&mut self, id: &str, now: f64) -> Result<(), IndexError> {
        self.with_stream(id, |s, _| {
            s.disconnected(now);
            Ok(())
        })
    }

    /// Stop a worker's stream (its holdings stay until it is unfollowed).
    pub fn stream_stop(&mut self, id: &str) -> Result<(), IndexError> {
        self.with_stream(id, |s, _| {
            s.stop();
            Ok(())
        })
    }

    /// Time passes for every followed worker: `(worker, replay_from)` to
    /// request.
    pub fn stream_tick(&mut self, now: f64) -> Result<Vec<(String, u64)>, IndexError> {
        let followed: Vec<u32> = (0..self.workers.len() as u32)
            .filter(|&s| self.workers[s as usize].as_ref().is_some_and(|w| w.followed))
            .collect();
        let mut out = Vec::new();
        for slot in followed {
            let mut stream = std::mem::take(&mut self.worker_mut(slot).stream);
            let result = stream.tick(&mut WorkerSink { ix: self, slot }, now);
            self.worker_mut(slot).stream = stream;
            if let Some(from) = result?.replay_from {
                out.push((self.worker(slot).id.clone(), from));
            }
        }
        Ok(out)
    }

    /// The stream of a followed worker.
    pub fn stream(&self, id: &str) -> Result<&Stream, IndexError> {
        let slot = self.slot_of(id)?;
        let w = self.worker(slot);
        if !w.followed {
            return Err(IndexError::UnknownWorker(id.to_owned()));
        }
        Ok(&w.stream)
    }

    /// Every followed worker with its stream, in slot order.
    pub fn streams(&self) -> impl Iterator<Item = (&str, &Stream)> {
        self.workers.iter().flatten().filter(|w| w.followed).map(|w| (w.id.as_str(), &w.stream))
    }
}
