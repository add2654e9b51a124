//! Criterion benchmarks of the pure-Rust core, no Python anywhere:
//!
//! - `ingest/*`: decode (+ apply) of a stream of vLLM 0.33 map-form payloads
//!   from 64 simulated engines in steady state (prefill stores chained from
//!   shared system prompts, one-block decode stores, one-hash evictions),
//!   throughput in block events (hashes of `BlockStored` + `BlockRemoved`).
//! - `match/*`: `Index::match_prefix` of a 512-block (8192-token) prompt
//!   against 256 workers holding ~1.2M blocks, throughput in query blocks.
//!
//! `cargo bench -p kvsync-core --bench index -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvsync_core::{decode, Index, Mode, Query};
use rmp::encode::{write_array_len, write_f64, write_map_len, write_nil, write_str, write_uint};

const BS: usize = 16;
const MODEL: &str = "llama";
const VOCAB: u64 = 128_256;

/// splitmix64: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() % VOCAB) as u32).collect()
    }
}

// ------------------------------------------------------------ msgpack output

fn kv_str(buf: &mut Vec<u8>, key: &str, value: &str) {
    write_str(buf, key).unwrap();
    write_str(buf, value).unwrap();
}

fn write_stored(buf: &mut Vec<u8>, hashes: &[u64], parent: Option<u64>, tokens: &[u32]) {
    write_map_len(buf, 10).unwrap();
    kv_str(buf, "type", "BlockStored");
    write_str(buf, "block_hashes").unwrap();
    write_array_len(buf, hashes.len() as u32).unwrap();
    for &h in hashes {
        write_uint(buf, h).unwrap();
    }
    write_str(buf, "parent_block_hash").unwrap();
    match parent {
        Some(p) => {
            write_uint(buf, p).unwrap();
        }
        None => write_nil(buf).unwrap(),
    }
    write_str(buf, "token_ids").unwrap();
    write_array_len(buf, tokens.len() as u32).unwrap();
    for &t in tokens {
        write_uint(buf, u64::from(t)).unwrap();
    }
    write_str(buf, "block_size").unwrap();
    write_uint(buf, BS as u64).unwrap();
    write_str(buf, "lora_id").unwrap();
    write_nil(buf).unwrap();
    kv_str(buf, "medium", "GPU");
    write_str(buf, "lora_name").unwrap();
    write_nil(buf).unwrap();
    write_str(buf, "group_idx").unwrap();
    write_uint(buf, 0).unwrap();
    kv_str(buf, "kv_cache_spec_kind", "full_attention");
}

fn write_removed(buf: &mut Vec<u8>, hash: u64) {
    write_map_len(buf, 4).unwrap();
    kv_str(buf, "type", "BlockRemoved");
    write_str(buf, "block_hashes").unwrap();
    write_array_len(buf, 1).unwrap();
    write_uint(buf, hash).unwrap();
    kv_str(buf, "medium", "GPU");
    write_str(buf, "group_idx").unwrap();
    write_uint(buf, 0).unwrap();
}

enum Ev {
    Stored(Vec<u64>, Option<u64>, Vec<u32>),
    Removed(u64),
}

fn payload(ts: f64, events: &[Ev]) -> Vec<u8> {
    let mut buf = Vec::new();
    write_array_len(&mut buf, 3).unwrap();
    write_f64(&mut buf, ts).unwrap();
    write_array_len(&mut buf, events.len() as u32).unwrap();
    for e in events {
        match e {
            Ev::Stored(h, p, t) => write_stored(&mut buf, h, *p, t),
            Ev::Removed(h) => write_removed(&mut buf, *h),
        }
    }
    write_uint(&mut buf, 0).unwrap();
    buf
}

// ------------------------------------------------------------------- ingest

struct Stream {
    workers: Vec<String>,
    payloads: Vec<(usize, Vec<u8>)>,
    block_events: u64,
    events: usize,
}

/// One engine: shared system prompts stay cached, request blocks go
/// through a FIFO of `CAPACITY` blocks whose evictions are published one
/// hash per `BlockRemoved` (as vLLM v1 does).
struct Engine {
    rng: Rng,
    next_hash: u64,
    sys_last: Vec<Option<u64>>,
    fifo: std::collections::VecDeque<u64>,
    running: Vec<(u64, usize)>, // (last hash, decode blocks left)
}

const CAPACITY: usize = 2048;

fn stream(workers: usize, steps: usize) -> Stream {
    let mut rng = Rng(7);
    let sys: Vec<Vec<u32>> = [32, 64, 96, 128].iter().map(|&n| rng.tokens(n * BS)).collect();
    let mut engines: Vec<Engine> = (0..workers)
        .map(|w| Engine {
            rng: Rng(w as u64 + 1000),
            next_hash: (w as u64) << 40,
            sys_last: vec![None; sys.len()],
            fifo: std::collections::VecDeque::new(),
            running: Vec::new(),
        })
        .collect();
    let mut out = Stream {
        workers: (0..workers).map(|w| format!("pod-{w:03}")).collect(),
        payloads: Vec::new(),
        block_events: 0,
        events: 0,
    };
    for step in 0..steps {
        for (w, e) in engines.iter_mut().enumerate() {
            let mut evs = Vec::new();
            let mut new_blocks = 0;
            let hash = |e: &mut Engine| {
                e.next_hash += 1;
                e.next_hash.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            };
            if e.running.len() < 8 && e.rng.next() % 4 == 0 {
                let s = e.rng.range(0, sys.len() - 1);
                let user = e.rng.range(4, 64);
                let (parent, mut tokens, n_sys) = match e.sys_last[s] {
                    Some(p) => (Some(p), Vec::new(), 0),
                    None => (None, sys[s].clone(), sys[s].len() / BS),
                };
                tokens.extend(e.rng.tokens(user * BS));
                let hashes: Vec<u64> = (0..n_sys + user).map(|_| hash(e)).collect();
                if n_sys > 0 {
                    e.sys_last[s] = Some(hashes[n_sys - 1]);
                }
                e.fifo.extend(&hashes[n_sys..]);
                let last = *hashes.last().unwrap();
                new_blocks += hashes.len();
                evs.push(Ev::Stored(hashes, parent, tokens));
                e.running.push((last, e.rng.range(4, 24)));
            }
            for _ in 0..2 {
                if e.running.is_empty() {
                    break;
                }
                let i = e.rng.range(0, e.running.len() - 1);
                let h = hash(e);
                let tokens = e.rng.tokens(BS);
                evs.push(Ev::Stored(vec![h], Some(e.running[i].0), tokens));
                e.fifo.push_back(h);
                new_blocks += 1;
                e.running[i].0 = h;
                e.running[i].1 -= 1;
                if e.running[i].1 == 0 {
                    e.running.swap_remove(i);
                }
            }
            while e.fifo.len() > CAPACITY {
                evs.push(Ev::Removed(e.fifo.pop_front().unwrap()));
                new_blocks += 1;
            }
            if !evs.is_empty() {
                out.block_events += new_blocks as u64;
                out.events += evs.len();
                out.payloads.push((w, payload(1.75e9 + step as f64 * 0.025, &evs)));
            }
        }
    }
    out
}

fn fresh(workers: &[String]) -> Index {
    let mut ix = Index::new(None).unwrap();
    for w in workers {
        ix.add_worker(w, MODEL).unwrap();
    }
    ix
}

fn bench_ingest(c: &mut Criterion) {
    let s = stream(64, 600);
    // The stream must be clean: nothing orphaned, nothing unknown.
    let mut ix = fresh(&s.workers);
    for (w, p) in &s.payloads {
        let st = ix.apply(&s.workers[*w], p, None).unwrap();
        assert_eq!(st.skipped, 0, "{st:?}");
    }
    eprintln!(
        "ingest stream: {} payloads, {} events, {} block events ({:.1} per payload), {:.1} MB",
        s.payloads.len(),
        s.events,
        s.block_events,
        s.block_events as f64 / s.payloads.len() as f64,
        s.payloads.iter().map(|(_, p)| p.len()).sum::<usize>() as f64 / 1e6,
    );
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10);
    g.throughput(Throughput::Elements(s.block_events));
    g.bench_function("decode", |b| {
        b.iter(|| {
            for (_, p) in &s.payloads {
                black_box(decode(black_box(p), Mode::Index).unwrap());
            }
        });
    });
    g.bench_function("decode+apply", |b| {
        b.iter_batched(
            || fresh(&s.workers),
            |mut ix| {
                for (w, p) in &s.payloads {
                    ix.apply(&s.workers[*w], p, None).unwrap();
                }
                ix
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

// -------------------------------------------------------------------- match

/// 256 workers. Every prompt is one 64-block system prompt followed by 448
/// blocks of its own, so the index is a tree whose system-prompt tail has
/// ~2,400 children. Each worker stores the system prompt once, then its
/// prompts' own blocks chained from it: 150 workers hold the `hot` prompt in
/// full, 60 hold a prefix of it, and every worker holds 8 private prompts
/// and one prompt shared with a few others (~1.1M holdings).
fn fleet() -> (Index, Vec<u32>) {
    const SYS: usize = 64;
    let mut rng = Rng(42);
    let workers: Vec<String> = (0..256).map(|w| format!("pod-{w:03}")).collect();
    let mut ix = fresh(&workers);
    let sys = rng.tokens(SYS * BS);
    let mut hot = sys.clone();
    hot.extend(rng.tokens((512 - SYS) * BS));
    let shared: Vec<Vec<u32>> = (0..64).map(|_| rng.tokens((512 - SYS) * BS)).collect();
    let mut next = 1u64;
    // Stores `tokens` chained from `parent`; returns the last block's hash.
    let mut store = |ix: &mut Index, w: &str, parent: Option<u64>, tokens: &[u32]| {
        let hashes: Vec<u64> = (0..tokens.len() / BS)
            .map(|_| {
                next += 1;
                next.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            })
            .collect();
        let last = *hashes.last().unwrap();
        let p = payload(0.0, &[Ev::Stored(hashes, parent, tokens.to_vec())]);
        let st = ix.apply(w, &p, None).unwrap();
        assert_eq!(st.skipped, 0);
        last
    };
    for (i, w) in workers.iter().enumerate() {
        let root = Some(store(&mut ix, w, None, &sys));
        if i < 150 {
            store(&mut ix, w, root, &hot[SYS * BS..]);
        } else if i < 210 {
            let n = rng.range(SYS + 1, 511);
            store(&mut ix, w, root, &hot[SYS * BS..n * BS]);
        }
        for _ in 0..8 {
            store(&mut ix, w, root, &rng.tokens((512 - SYS) * BS));
        }
        store(&mut ix, w, root, &shared[i % shared.len()]);
    }
    (ix, hot)
}

fn bench_match(c: &mut Criterion) {
    let (ix, hot) = fleet();
    let st = ix.stats();
    eprintln!("match fleet: {} workers, {} blocks, {} holdings", st.workers, st.blocks, st.holdings);
    let q = Query::new(MODEL, &hot);
    let got = ix.match_prefix(&q);
    assert_eq!(got.iter().filter(|(_, d)| *d == 512).count(), 150);
    let mut miss = hot.clone();
    miss[BS * 256] ^= 1; // diverges at block 256
    let mut g = c.benchmark_group("match");
    g.throughput(Throughput::Elements(512));
    g.bench_function("512 blocks, 150 workers full", |b| {
        b.iter(|| black_box(ix.match_prefix(black_box(&q))));
    });
    let qm = Query::new(MODEL, &miss);
    g.bench_function("512 blocks, diverges at 256", |b| {
        b.iter(|| black_box(ix.match_prefix(black_box(&qm))));
    });
    g.bench_function("prefix keys only (hashing)", |b| {
        b.iter(|| black_box(ix.query_keys(black_box(&q))));
    });
    g.finish();
}

criterion_group!(benches, bench_ingest, bench_match);
criterion_main!(benches);
