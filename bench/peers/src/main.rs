//! `kvsync-peers`: kvsync-core side by side with the prefix indexes of
//! NVIDIA Dynamo (`dynamo-kv-router`) and SMG (`kv-index`'s `ChainIndex`,
//! `smg-radix-tree`), fed one generated workload, checked to give the same
//! answers, and timed on one core (CPU time).
//!
//! ```text
//! cargo run --release --manifest-path bench/peers/Cargo.toml -- \
//!     [--holdings N] [--workers N] [--seed N] [--peers a,b|none] [--json OUT]
//! ```
//!
//! Counts take k/M suffixes (`--holdings 10M`). Exits 1 when an index
//! answers a query differently from kvsync (see bench/README.md).

mod measure;
mod peers;
mod report;
mod run;
mod workload;

#[cfg(test)]
mod tests;

use std::process::ExitCode;

use peers::dynamo::{DynamoPool, DynamoRadix};
use peers::kvsync::Kvsync;
use peers::smg_chain::SmgChain;
use peers::smg_radix::SmgRadix;
use peers::Peer;
use run::{Outcome, Settings, Work};
use workload::{Fleet, Shape};

#[global_allocator]
static ALLOC: measure::Counting = measure::Counting;

const PEERS: &[&str] = &[DynamoRadix::NAME, DynamoPool::NAME, SmgChain::NAME, SmgRadix::NAME];

struct Args {
    holdings: usize,
    workers: usize,
    seed: u64,
    peers: Vec<String>,
    json: Option<String>,
    hot_reps: usize,
    queries: usize,
    budget_s: f64,
}

fn count(flag: &str, v: &str) -> Result<usize, String> {
    let (num, mult) = match v.chars().last() {
        Some('k' | 'K') => (&v[..v.len() - 1], 1_000),
        Some('m' | 'M') => (&v[..v.len() - 1], 1_000_000),
        _ => (v, 1),
    };
    num.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .map(|n| n * mult)
        .ok_or_else(|| format!("{flag} wants a positive count such as 1000, 10k or 10M, got {v:?}"))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        holdings: 1_000_000,
        workers: 256,
        seed: 42,
        peers: PEERS.iter().map(|s| (*s).to_owned()).collect(),
        json: None,
        hot_reps: 2_000,
        queries: 300,
        budget_s: 300.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--holdings" => a.holdings = count(&flag, &v)?,
            "--workers" => a.workers = count(&flag, &v)?,
            "--seed" => a.seed = v.parse().map_err(|_| format!("--seed wants an integer, got {v:?}"))?,
            "--hot-reps" => a.hot_reps = count(&flag, &v)?,
            "--queries" => a.queries = count(&flag, &v)?,
            "--json" => a.json = Some(v),
            "--budget-s" => {
                a.budget_s = v
                    .parse()
                    .ok()
                    .filter(|b: &f64| *b > 0.0)
                    .ok_or_else(|| format!("--budget-s wants a positive number of seconds, got {v:?}"))?;
            }
            "--peers" => {
                a.peers = v.split(',').filter(|p| *p != "none").map(str::to_owned).collect();
                if let Some(bad) = a.peers.iter().find(|p| !PEERS.contains(&p.as_str())) {
                    return Err(format!("--peers: unknown peer {bad:?} (known: {})", PEERS.join(",")));
                }
            }
            _ => return Err(format!("unknown flag {flag:?}")),
        }
    }
    if a.holdings < a.workers * 64 {
        return Err(format!(
            "--holdings {} is too small for {} workers: every worker needs at least 64",
            a.holdings, a.workers
        ));
    }
    Ok(a)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("kvsync-peers: {e}");
            }
            eprintln!(
                "usage: kvsync-peers [--holdings N (1M)] [--workers N (256)] [--seed N (42)] \
                 [--peers {}|none] [--hot-reps N (2000)] [--queries N (300)] [--budget-s S (300)] [--json OUT]",
                PEERS.join(",")
            );
            return ExitCode::from(2);
        }
    };
    let settings = Settings { hot_reps: args.hot_reps, div_reps: 3, budget_s: args.budget_s };
    let shared = Fleet::new(args.workers, args.holdings, Shape::Shared, args.seed);
    let unshared = Fleet::new(args.workers, args.holdings, Shape::Unshared, args.seed);
    let work = Work {
        hot: shared.hot_query(),
        diverging: shared.diverging_queries(args.queries),
        unshared_queries: unshared.diverging_queries(args.queries.min(100)),
        shared,
        unshared,
    };
    let mut all: Vec<Outcome> = vec![run::run::<Kvsync>(&work, &settings)];
    for name in PEERS.iter().filter(|p| args.peers.iter().any(|a| a == *p)) {
        all.push(match *name {
            DynamoRadix::NAME => run::run::<DynamoRadix>(&work, &settings),
            DynamoPool::NAME => run::run::<DynamoPool>(&work, &settings),
            SmgChain::NAME => run::run::<SmgChain>(&work, &settings),
            _ => run::run::<SmgRadix>(&work, &settings),
        });
    }
    let agree: Vec<report::Agreement> = all[1..].iter().map(|o| report::agreement(&all[0], o)).collect();

    let k = &all[0];
    let machine = format!(
        "{}, {} cores visible",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!(
        "kvsync-peers: {} workers, {} holdings shared ({} distinct blocks, {} block events), {} unshared, \
         16-token blocks, seed {}",
        args.workers,
        k.holdings_shared.unwrap_or(0),
        k.blocks_shared.unwrap_or(0),
        k.block_events,
        k.holdings_unshared.unwrap_or(0),
        args.seed
    );
    println!(
        "hot prompt held in full by {} workers; {} diverging queries; thread CPU clock read: {} ns \
         (subtracted from each latency); machine: {machine}",
        work.shared.hot_full,
        args.queries,
        run::clock_overhead()
    );
    if let (Some(rs), Some(ru)) = (k.reported_shared, k.reported_unshared) {
        println!(
            "kvsync's own memory report: {:.2} / {:.2} bytes per holding (shared / unshared)",
            rs as f64 / k.holdings_shared.unwrap_or(1).max(1) as f64,
            ru as f64 / k.holdings_unshared.unwrap_or(1).max(1) as f64
        );
    }
    println!();
    print!("{}", report::table(&all, &agree));
    let mut failed = false;
    if k.rejected > 0 {
        println!("kvsync skipped {} events of a clean stream", k.rejected);
        failed = true;
    }
    if k.msgpack_differs {
        println!("kvsync: the index built from msgpack payloads answers differently from the pre-decoded one");
        failed = true;
    }
    for (o, a) in all[1..].iter().zip(&agree) {
        if let Some(why) = &o.unsupported {
            println!("{}: not (fully) run: {why}", o.name);
            if o.answers_shared.is_empty() {
                continue;
            }
        }
        if o.rejected > 0 {
            println!("{}: {} events refused or dropped", o.name, o.rejected);
        }
        if o.msgpack_differs {
            println!("{}: the index built from msgpack payloads answers differently from the pre-decoded one", o.name);
            failed = true;
        }
        if !a.exact() {
            println!(
                "{}: DISAGREES with kvsync on {} of {} queries ({} worker depths lower, {} higher); e.g. {}",
                o.name,
                a.differing,
                a.queries,
                a.under,
                a.over,
                a.example.as_deref().unwrap_or("")
            );
            failed = true;
        }
    }
    if let Some(path) = &args.json {
        let config = vec![
            ("workers", args.workers.to_string()),
            ("holdings_target", args.holdings.to_string()),
            ("holdings_shared", k.holdings_shared.unwrap_or(0).to_string()),
            ("holdings_unshared", k.holdings_unshared.unwrap_or(0).to_string()),
            ("blocks_shared", k.blocks_shared.unwrap_or(0).to_string()),
            ("block_events", k.block_events.to_string()),
            ("block_size", workload::BS.to_string()),
            ("seed", args.seed.to_string()),
            ("machine", report::json_str(&machine)),
        ];
        if let Err(e) = std::fs::write(path, report::json(&config, &all, &agree)) {
            eprintln!("kvsync-peers: cannot write --json {path}: {e}");
            return ExitCode::from(2);
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
