//! Property test of the stream state machine (SPEC section 3) against a
//! model engine: after any sequence of faults and a quiescent period, the
//! index never claims a block the engine does not hold, and it is exact
//! whenever the stream reports that no history was lost.
//!
//! The model engine publishes batches over one chain of blocks (stores that
//! extend it, removals anywhere, clears), keeps a bounded replay buffer, and
//! restarts (new process: seq 0, empty cache, maybe the same block hashes).
//! The harness plays the transport: live messages are delivered, dropped or
//! delayed; replay requests are answered, cut short or ignored; connection
//! events arrive after the old engine's in-flight messages; time passes.
//!
//! CI runs the default case count; `make fuzz` runs a long version:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release -p kvsync-core --test stream_model
//! ```

use std::collections::VecDeque;

use kvsync_core::{Index, Query, State, StreamConfig};
use proptest::prelude::*;
use rmp::encode as enc;

const MODEL: &str = "m";
const W: &str = "w";
/// Chain positions the engine can hold.
const CHAIN: u64 = 12;

#[derive(Debug, Clone, Copy)]
enum Op {
    /// The engine does something; the live message is lost if `drop`.
    Publish { what: u8, drop: bool },
    /// `n` batches, the last `lost` of them never arrive (a lost tail).
    Burst { n: u8, lost: u8 },
    /// Deliver up to `n` queued live messages / connection events.
    Deliver { n: u8 },
    /// Answer up to `n` replies of the pending replay request; `cut`: the
    /// rest of it (end marker included) is never delivered.
    Answer { n: u8, cut: bool },
    /// The engine restarts (SIGKILL + start); `same_hashes`: its block
    /// hashes are deterministic, equal to the old process's.
    Restart { same_hashes: bool },
    /// The connection drops and comes back (a network blip, SIGSTOP).
    Blip,
    /// Time passes (tenths of a second).
    Tick { tenths: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u8>(), prop::bool::weighted(0.15)).prop_map(|(what, drop)| Op::Publish { what, drop }),
        1 => (1u8..12, 0u8..4).prop_map(|(n, lost)| Op::Burst { n, lost }),
        5 => (1u8..8).prop_map(|n| Op::Deliver { n }),
        4 => (1u8..10, prop::bool::weighted(0.2)).prop_map(|(n, cut)| Op::Answer { n, cut }),
        1 => any::<bool>().prop_map(|same_hashes| Op::Restart { same_hashes }),
        1 => Just(Op::Blip),
        3 => (1u8..40).prop_map(|tenths| Op::Tick { tenths }),
    ]
}

/// What the subscriber's sockets deliver, in order.
#[derive(Debug, Clone)]
enum Net {
    Live(u64, Vec<u8>),
    Disconnected,
    Reconnected,
}

struct Engine {
    epoch: u64,
    hash_salt: u64,
    next: u64,
    held: [bool; CHAIN as usize],
    history: VecDeque<(u64, Vec<u8>)>,
    buffer_steps: usize,
}

impl Engine {
    fn new(epoch: u64, hash_salt: u64, buffer_steps: usize) -> Engine {
        Engine { epoch, hash_salt, next: 0, held: [false; CHAIN as usize], history: VecDeque::new(), buffer_steps }
    }

    fn hash(&self, pos: u64) -> u64 {
        self.hash_salt * 1_000 + pos + 1
    }

    /// Leading chain positions held: the depth a query of the whole chain
    /// must find.
    fn depth(&self) -> u32 {
        self.held.iter().take_while(|h| **h).count() as u32
    }

    fn holdings(&self) -> usize {
        self.held.iter().filter(|h| **h).count()
    }

    /// Do something and publish it as the next batch.
    fn publish(&mut self, what: u8) -> (u64, Vec<u8>) {
        let mut b = Vec::new();
        enc::write_array_len(&mut b, 3).unwrap();
        // The timestamp tells two processes' batches with one seq apart.
        enc::write_f64(&mut b, (self.epoch * 100_000 + self.next) as f64).unwrap();
        enc::write_array_len(&mut b, 1).unwrap();
        let free = (0..CHAIN).find(|&p| !self.held[p as usize]);
        let held: Vec<u64> = (0..CHAIN).filter(|&p| self.held[p as usize]).collect();
        match what % 10 {
            0..=5 if free.is_some() => {
                // Store the first free position (its parent is held).
                let p = free.unwrap();
                enc::write_array_len(&mut b, 5).unwrap();
                enc::write_str(&mut b, "BlockStored").unwrap();
                enc::write_array_len(&mut b, 1).unwrap();
                enc::write_uint(&mut b, self.hash(p)).unwrap();
                if p == 0 {
                    enc::write_nil(&mut b).unwrap();
                } else {
                    enc::write_uint(&mut b, self.hash(p - 1)).unwrap();
                }
                enc::write_array_len(&mut b, 2).unwrap();
                enc::write_uint(&mut b, p + 1).unwrap();
                enc::write_uint(&mut b, p + 1).unwrap();
                enc::write_uint(&mut b, 2).unwrap();
                self.held[p as usize] = true;
            }
            6..=8 if !held.is_empty() => {
                let p = held[usize::from(what) % held.len()];
                enc::write_array_len(&mut b, 2).unwrap();
                enc::write_str(&mut b, "BlockRemoved").unwrap();
                enc::write_array_len(&mut b, 1).unwrap();
                enc::write_uint(&mut b, self.hash(p)).unwrap();
                self.held[p as usize] = false;
            }
            _ => {
                enc::write_array_len(&mut b, 1).unwrap();
                enc::write_str(&mut b, "AllBlocksCleared").unwrap();
                self.held = [false; CHAIN as usize];
            }
        }
        enc::write_nil(&mut b).unwrap();
        let seq = self.next;
        self.next += 1;
        self.history.push_back((seq, b.clone()));
        while self.history.len() > self.buffer_steps {
            self.history.pop_front();
        }
        (seq, b)
    }

    /// The replies to a replay request from `start`, end marker last (None).
    fn replay(&self, start: u64) -> VecDeque<Option<(u64, Vec<u8>)>> {
        let mut out: VecDeque<_> = self.history.iter().filter(|(s, _)| *s >= start).cloned().map(Some).collect();
        out.push_back(None);
        out
    }
}

struct Harness {
    ix: Index,
    engine: Engine,
    epochs: u64,
    net: VecDeque<Net>,
    replies: VecDeque<Option<(u64, Vec<u8>)>>,
    now: f64,
}

impl Harness {
    fn new(buffer_steps: usize) -> Harness {
        let mut ix = Index::default();
        let config = StreamConfig {
            replay: true,
            replay_timeout: 1.0,
            replay_max: 10.0,
            clean_secs: 2.0,
            max_buffered: 16,
            max_buffered_bytes: 1 << 20,
            dead_after: 5.0,
            idle_probe: 3.0,
        };
        ix.follow(W, MODEL, config).unwrap();
        let mut h = Harness {
            ix,
            engine: Engine::new(0, 0, buffer_steps),
            epochs: 0,
            net: VecDeque::new(),
            replies: VecDeque::new(),
            now: 0.0,
        };
        let todo = h.ix.stream_start(W, 0.0).unwrap();
        h.request(todo.replay_from);
        h
    }

    /// A replay request goes out on a fresh socket: earlier replies are gone.
    fn request(&mut self, from: Option<u64>) {
        if let Some(from) = from {
            self.replies = self.engine.replay(from);
        }
    }

    fn deliver(&mut self, n: usize) {
        for _ in 0..n {
            let Some(item) = self.net.pop_front() else { return };
            let todo = match item {
                Net::Live(seq, p) => self.ix.stream_live(W, Some(seq), &p, self.now).unwrap().replay_from,
                Net::Disconnected => {
                    self.ix.stream_disconnected(W, self.now).unwrap();
                    // The replay socket to the old process is gone too.
                    self.replies.clear();
                    None
                }
                Net::Reconnected => self.ix.stream_reconnected(W, self.now).unwrap().replay_from,
            };
            self.request(todo);
        }
    }

    fn answer(&mut self, n: usize, cut: bool) {
        for _ in 0..n {
            let Some(reply) = self.replies.pop_front() else { break };
            let todo = match reply {
                Some((seq, p)) => self.ix.stream_replayed(W, Some(seq), &p, self.now).unwrap(),
                None => self.ix.stream_replay_end(W, self.now).unwrap(),
            };
            self.request(todo.replay_from);
        }
        if cut {
            self.replies.clear();
        }
    }

    fn tick(&mut self, dt: f64) {
        self.now += dt;
        for (w, from) in self.ix.stream_tick(self.now).unwrap() {
            assert_eq!(w, W);
            self.request(Some(from));
        }
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Publish { what, drop } => {
                let (seq, p) = self.engine.publish(what);
                if !drop {
                    self.net.push_back(Net::Live(seq, p));
                }
            }
            Op::Burst { n, lost } => {
                for i in 0..n {
                    let (seq, p) = self.engine.publish(i.wrapping_mul(37));
                    if i + lost < n {
                        self.net.push_back(Net::Live(seq, p));
                    }
                }
            }
            Op::Deliver { n } => self.deliver(usize::from(n)),
            Op::Answer { n, cut } => self.answer(usize::from(n), cut),
            Op::Restart { same_hashes } => {
                // The old process's in-flight messages arrive first, then
                // the disconnect, then the new process.
                self.net.push_back(Net::Disconnected);
                self.epochs += 1;
                let salt = if same_hashes { self.engine.hash_salt } else { self.epochs };
                self.engine = Engine::new(self.epochs, salt, self.engine.buffer_steps);
                self.net.push_back(Net::Reconnected);
            }
            Op::Blip => {
                self.net.push_back(Net::Disconnected);
                self.net.push_back(Net::Reconnected);
            }
            Op::Tick { tenths } => self.tick(f64::from(tenths) / 10.0),
        }
    }

    /// The network heals and the engine goes idle: deliver everything,
    /// answer every request, let the deadlines and the idle probe pass.
    fn quiesce(&mut self) {
        for _ in 0..400 {
            self.deliver(usize::MAX);
            self.answer(usize::MAX, false);
            self.tick(0.25);
        }
        assert!(self.net.is_empty() && self.replies.is_empty(), "not quiescent");
    }

    fn depth(&self) -> u32 {
        let tokens: Vec<u32> = (1..=CHAIN as u32).flat_map(|t| [t, t]).collect();
        self.ix.match_prefix(&Query::new(MODEL, &tokens)).iter().find(|(w, _)| *w == W).map_or(0, |(_, d)| *d)
    }
}

fn check(ops: &[Op], buffer_steps: usize) -> Result<(), TestCaseError> {
    let mut h = Harness::new(buffer_steps);
    for op in ops {
        h.run(*op);
        h.ix.check_invariants().map_err(TestCaseError::fail)?;
    }
    h.quiesce();
    h.ix.check_invariants().map_err(TestCaseError::fail)?;
    let s = h.ix.stream(W).unwrap();
    let c = s.counters();
    let (got, truth) = (h.depth(), h.engine.depth());
    let holdings = h.ix.stats().holdings;
    prop_assert!(matches!(s.state(), State::Live | State::Degraded), "state {:?}", s.state());
    prop_assert!(got <= truth, "false positive: index depth {got}, engine holds {truth}; {c:?}");
    prop_assert!(
        holdings <= h.engine.holdings(),
        "index holds {holdings} blocks, engine {}; {c:?}",
        h.engine.holdings()
    );
    if c.lost == 0 && c.abandoned == 0 {
        prop_assert_eq!(got, truth, "not exact although nothing was lost: {:?}", c);
        prop_assert_eq!(holdings, h.engine.holdings(), "holdings differ although nothing was lost: {:?}", c);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// A replay buffer that covers everything: exact unless the stream
    /// reports a loss (a replay endpoint that did not answer).
    #[test]
    fn streams_converge_without_false_positives(ops in prop::collection::vec(op(), 0..80)) {
        check(&ops, 10_000)?;
    }

    /// A small replay buffer: history is lost, never invented.
    #[test]
    fn streams_with_a_short_replay_buffer_never_claim_a_gone_block(
        ops in prop::collection::vec(op(), 0..80),
        buffer_steps in 1usize..8,
    ) {
        check(&ops, buffer_steps)?;
    }
}
