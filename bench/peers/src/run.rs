//! Driving one index through the whole workload: ingest (pre-decoded and,
//! where it has one, from msgpack), memory, query latencies, and its
//! answers to the check queries.

use std::hint::black_box;

use crate::measure::{live_bytes, process_cpu_ns, quantile, thread_cpu_ns, Stopwatch};
use crate::peers::Peer;
use crate::workload::{Fleet, Payload};

/// Workers whose payloads are generated together and interleaved round
/// robin (an index sees several engines' streams at once, yet memory stays
/// bounded at 10M holdings).
const GROUP: usize = 16;

pub struct Settings {
    pub hot_reps: usize,
    pub div_reps: usize,
    /// CPU seconds one ingest may take before the index is given up on
    /// (an index whose ingest scales badly must not stall the whole run).
    pub budget_s: f64,
}

/// The workload both shapes and their queries.
pub struct Work {
    pub shared: Fleet,
    pub unshared: Fleet,
    pub hot: Vec<u32>,
    /// Prompts diverging after a cached prefix (shared fleet).
    pub diverging: Vec<Vec<u32>>,
    /// Check queries of the unshared fleet.
    pub unshared_queries: Vec<Vec<u32>>,
}

impl Work {
    /// The shared fleet's check queries: the hot prompt, then the
    /// diverging ones.
    pub fn shared_queries(&self) -> impl Iterator<Item = &[u32]> {
        std::iter::once(self.hot.as_slice()).chain(self.diverging.iter().map(Vec::as_slice))
    }
}

/// One index's results; `None` where it has no such path.
#[derive(Default)]
pub struct Outcome {
    pub name: &'static str,
    /// Why the index could not run at this scale.
    pub unsupported: Option<String>,
    /// M block events/s of CPU time.
    pub ingest_decoded: Option<f64>,
    pub ingest_msgpack: Option<f64>,
    pub block_events: u64,
    pub bytes_shared: Option<usize>,
    pub bytes_unshared: Option<usize>,
    pub reported_shared: Option<usize>,
    pub reported_unshared: Option<usize>,
    pub holdings_shared: Option<usize>,
    pub holdings_unshared: Option<usize>,
    pub blocks_shared: Option<usize>,
    /// Microseconds of thread CPU time.
    pub hot_p50: Option<f64>,
    pub hot_p99: Option<f64>,
    pub div_p50: Option<f64>,
    pub div_p99: Option<f64>,
    pub rejected: u64,
    /// The index built from msgpack payloads answers differently from the
    /// one built from the same events pre-decoded.
    pub msgpack_differs: bool,
    /// Per check query: (worker, depth) for depths > 0.
    pub answers_shared: Vec<Vec<(u32, u32)>>,
    pub answers_unshared: Vec<Vec<(u32, u32)>>,
}

/// Feed every worker's payloads to `peer`, a group of workers at a time,
/// charging only `apply` (and `settle`) to the clock: (block events, ns),
/// or why it stopped early (past `budget_s` CPU seconds, checked every 16
/// payloads).
fn build<P: Peer>(fleet: &Fleet, peer: &mut P, msgpack: bool, budget_s: f64) -> Result<(u64, u64), String> {
    let budget = (budget_s * 1e9) as u64;
    let mut sw = Stopwatch::default();
    let mut events = 0;
    for first in (0..fleet.workers).step_by(GROUP) {
        let group: Vec<Vec<Payload>> =
            (first..(first + GROUP).min(fleet.workers)).map(|w| fleet.worker_payloads(w)).collect();
        let mut order: Vec<&Payload> = Vec::new();
        let longest = group.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..longest {
            order.extend(group.iter().filter_map(|ps| ps.get(i)));
        }
        let bufs: Vec<Vec<u8>> = if msgpack {
            order.iter().enumerate().map(|(i, p)| p.msgpack(1.75e9 + i as f64 * 1e-3)).collect()
        } else {
            Vec::new()
        };
        let spent = sw.ns;
        let mut stopped = false;
        sw.time(|| {
            let t0 = process_cpu_ns();
            for (i, p) in order.iter().enumerate() {
                if i % 16 == 0 && spent + (process_cpu_ns() - t0) > budget {
                    stopped = true;
                    break;
                }
                if msgpack {
                    peer.ingest_msgpack(p.worker, &bufs[i]);
                } else {
                    peer.ingest(p);
                }
                events += p.block_events();
            }
            peer.settle();
        });
        if stopped {
            return Err(format!(
                "ingest stopped after {budget_s} CPU seconds: {events} block events of the first {} workers' \
                 ({:.3} M/s so far)",
                (first + GROUP).min(fleet.workers),
                rate(events, sw.ns)
            ));
        }
    }
    Ok((events, sw.ns))
}

fn rate(events: u64, ns: u64) -> f64 {
    events as f64 * 1e3 / ns.max(1) as f64
}

/// What reading the thread CPU clock twice costs (a system call: the vDSO
/// does not serve CPU-time clocks), in ns; subtracted from every sample.
pub fn clock_overhead() -> u64 {
    let mut samples: Vec<u64> = (0..10_000)
        .map(|_| {
            let t0 = thread_cpu_ns();
            thread_cpu_ns() - t0
        })
        .collect();
    quantile(&mut samples, 0.5)
}

/// Thread CPU time of `reps` rounds of every query, p50 and p99 in µs.
fn latency<P: Peer>(peer: &P, queries: &[&[u32]], reps: usize) -> (f64, f64) {
    for q in queries.iter().take(50) {
        black_box(peer.query(q));
    }
    let overhead = clock_overhead();
    let mut samples = Vec::with_capacity(queries.len() * reps);
    for _ in 0..reps {
        for q in queries {
            let t0 = thread_cpu_ns();
            let a = black_box(peer.query(black_box(q)));
            samples.push((thread_cpu_ns() - t0).saturating_sub(overhead));
            drop(a);
        }
    }
    (quantile(&mut samples, 0.5) as f64 / 1e3, quantile(&mut samples, 0.99) as f64 / 1e3)
}

/// Build `P` over `fleet` and weigh it: (peer, heap bytes it keeps, events, ns).
fn weighed<P: Peer>(fleet: &Fleet, msgpack: bool, budget_s: f64) -> Result<(P, usize, u64, u64), String> {
    let before = live_bytes();
    let mut peer = P::new(fleet.workers)?;
    let (events, ns) = build(fleet, &mut peer, msgpack, budget_s)?;
    Ok((peer, live_bytes().saturating_sub(before), events, ns))
}

pub fn run<P: Peer>(work: &Work, s: &Settings) -> Outcome {
    let mut o = Outcome { name: P::NAME, ..Outcome::default() };
    eprintln!("[{}] shared fleet, pre-decoded events", P::NAME);
    let (peer, bytes, events, ns) = match weighed::<P>(&work.shared, false, s.budget_s) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("[{}] skipped: {e}", P::NAME);
            o.unsupported = Some(e);
            return o;
        }
    };
    o.ingest_decoded = Some(rate(events, ns));
    o.block_events = events;
    o.bytes_shared = Some(bytes);
    o.reported_shared = peer.reported_bytes();
    o.holdings_shared = peer.holdings();
    o.blocks_shared = peer.blocks();
    o.rejected += peer.rejected();
    eprintln!("[{}] queries", P::NAME);
    let (p50, p99) = latency(&peer, &[work.hot.as_slice()], s.hot_reps);
    (o.hot_p50, o.hot_p99) = (Some(p50), Some(p99));
    let div: Vec<&[u32]> = work.diverging.iter().map(Vec::as_slice).collect();
    let (p50, p99) = latency(&peer, &div, s.div_reps);
    (o.div_p50, o.div_p99) = (Some(p50), Some(p99));
    o.answers_shared = work.shared_queries().map(|q| peer.depths(peer.query(q))).collect();
    drop(peer);

    if P::MSGPACK {
        eprintln!("[{}] shared fleet, msgpack payloads", P::NAME);
        match weighed::<P>(&work.shared, true, s.budget_s) {
            Ok((peer, _, events, ns)) => {
                o.ingest_msgpack = Some(rate(events, ns));
                o.rejected += peer.rejected();
                // The msgpack path must reach the same state as the decoded one.
                let again: Vec<_> = work.shared_queries().map(|q| peer.depths(peer.query(q))).collect();
                o.msgpack_differs = again != o.answers_shared;
            }
            Err(e) => eprintln!("[{}] msgpack: {e}", P::NAME),
        }
    }

    eprintln!("[{}] unshared fleet", P::NAME);
    let (peer, bytes, _, _) = match weighed::<P>(&work.unshared, false, s.budget_s) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("[{}] unshared fleet: {e}", P::NAME);
            o.unsupported = Some(format!("unshared fleet: {e}"));
            return o;
        }
    };
    o.bytes_unshared = Some(bytes);
    o.reported_unshared = peer.reported_bytes();
    o.holdings_unshared = peer.holdings();
    o.rejected += peer.rejected();
    o.answers_unshared = work.unshared_queries.iter().map(|q| peer.depths(peer.query(q))).collect();
    o
}
