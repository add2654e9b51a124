//! Checking the answers against kvsync's and printing the side-by-side
//! table (markdown, as pasted into bench/README.md) and the JSON for the
//! nightly pipeline.

use std::fmt::Write as _;

use crate::run::Outcome;

/// How a peer's answers differ from kvsync's.
#[derive(Default)]
pub struct Agreement {
    pub queries: usize,
    /// Queries whose answer differs.
    pub differing: usize,
    /// (query, worker) pairs the peer scores lower / higher than kvsync.
    pub under: usize,
    pub over: usize,
    pub example: Option<String>,
}

impl Agreement {
    pub fn exact(&self) -> bool {
        self.differing == 0
    }
}

fn compare_set(reference: &[Vec<(u32, u32)>], got: &[Vec<(u32, u32)>], label: &str, a: &mut Agreement) {
    for (i, (r, g)) in reference.iter().zip(got).enumerate() {
        a.queries += 1;
        if r == g {
            continue;
        }
        a.differing += 1;
        let depth = |v: &[(u32, u32)], w: u32| v.iter().find(|e| e.0 == w).map_or(0, |e| e.1);
        let mut workers: Vec<u32> = r.iter().chain(g).map(|e| e.0).collect();
        workers.sort_unstable();
        workers.dedup();
        for w in workers {
            let (dr, dg) = (depth(r, w), depth(g, w));
            if dg < dr {
                a.under += 1;
            } else if dg > dr {
                a.over += 1;
            }
            if dg != dr && a.example.is_none() {
                a.example = Some(format!("{label} query {i}, worker {w}: kvsync {dr}, peer {dg}"));
            }
        }
    }
}

/// The peer's answers against kvsync's, over both fleets.
pub fn agreement(kvsync: &Outcome, peer: &Outcome) -> Agreement {
    let mut a = Agreement::default();
    compare_set(&kvsync.answers_shared, &peer.answers_shared, "shared", &mut a);
    compare_set(&kvsync.answers_unshared, &peer.answers_unshared, "unshared", &mut a);
    a
}

/// A metric row: its JSON key, its label, whether higher is better, and
/// how to read it from an outcome (`holdings` from kvsync's count).
struct Metric {
    key: &'static str,
    label: &'static str,
    higher_better: bool,
    get: fn(&Outcome, &Outcome) -> Option<f64>,
}

fn per_holding(bytes: Option<usize>, holdings: Option<usize>) -> Option<f64> {
    Some(bytes? as f64 / holdings? as f64)
}

const METRICS: &[Metric] = &[
    Metric {
        key: "ingest_decoded_mevents_s",
        label: "ingest, pre-decoded events incl. token hashing (M block events/s)",
        higher_better: true,
        get: |o, _| o.ingest_decoded,
    },
    Metric {
        key: "ingest_msgpack_mevents_s",
        label: "ingest, vLLM msgpack payloads incl. decode (M block events/s)",
        higher_better: true,
        get: |o, _| o.ingest_msgpack,
    },
    Metric {
        key: "match_hot_p50_us",
        label: "match 512-block prompt, p50 (us)",
        higher_better: false,
        get: |o, _| o.hot_p50,
    },
    Metric {
        key: "match_hot_p99_us",
        label: "match 512-block prompt, p99 (us)",
        higher_better: false,
        get: |o, _| o.hot_p99,
    },
    Metric {
        key: "match_diverging_p50_us",
        label: "match diverging prompt, p50 (us)",
        higher_better: false,
        get: |o, _| o.div_p50,
    },
    Metric {
        key: "bytes_per_holding_shared",
        label: "heap bytes / holding, shared prefixes",
        higher_better: false,
        get: |o, k| per_holding(o.bytes_shared, k.holdings_shared),
    },
    Metric {
        key: "bytes_per_holding_unshared",
        label: "heap bytes / holding, nothing shared",
        higher_better: false,
        get: |o, k| per_holding(o.bytes_unshared, k.holdings_unshared),
    },
];

/// kvsync's advantage: > 1 when kvsync is better (faster, smaller).
fn ratio(m: &Metric, kvsync: f64, peer: f64) -> f64 {
    if m.higher_better {
        kvsync / peer
    } else {
        peer / kvsync
    }
}

fn cell(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The markdown tables: values, then kvsync's advantage over each peer.
pub fn table(all: &[Outcome], agree: &[Agreement]) -> String {
    let k = &all[0];
    let mut s = String::new();
    let names: Vec<&str> = all.iter().map(|o| o.name).collect();
    let _ = writeln!(s, "| metric | {} |", names.join(" | "));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(all.len()));
    for m in METRICS {
        let row: Vec<String> = all.iter().map(|o| cell((m.get)(o, k))).collect();
        let _ = writeln!(s, "| {} | {} |", m.label, row.join(" | "));
    }
    let row: Vec<String> = all
        .iter()
        .zip(std::iter::once(None).chain(agree.iter().map(Some)))
        .map(|(o, a)| match a {
            _ if o.answers_shared.is_empty() => "n/a".into(),
            None => "reference".into(),
            Some(a) if a.exact() => format!("all {}", a.queries),
            Some(a) => format!("{} of {} differ ({} under, {} over)", a.differing, a.queries, a.under, a.over),
        })
        .collect();
    let _ = writeln!(s, "| same answers as kvsync | {} |", row.join(" | "));
    let _ = writeln!(s);
    let _ = writeln!(s, "kvsync's advantage (x; > 1 means kvsync is faster or smaller):");
    let _ = writeln!(s);
    let _ = writeln!(s, "| metric | {} |", names[1..].join(" | "));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(all.len() - 1));
    for m in METRICS {
        let row: Vec<String> = all[1..]
            .iter()
            .map(|o| match ((m.get)(k, k), (m.get)(o, k)) {
                (Some(kv), Some(p)) => format!("{:.2}", ratio(m, kv, p)),
                _ => "n/a".into(),
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", m.key, row.join(" | "));
    }
    s
}

fn json_num(v: Option<f64>) -> String {
    v.map_or_else(|| "null".into(), |v| format!("{v:.4}"))
}

/// `v` as a JSON string literal.
pub fn json_str(v: &str) -> String {
    let mut s = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// `{"config": ..., "metric": {key: {index: v}}, "ratios": {key: {peer: r}},
/// "agreement": {peer: {...}}, "unsupported": {peer: why}}`.
pub fn json(config: &[(&str, String)], all: &[Outcome], agree: &[Agreement]) -> String {
    let k = &all[0];
    let obj = |pairs: Vec<String>| format!("{{{}}}", pairs.join(", "));
    let cfg = obj(config.iter().map(|(n, v)| format!("{}: {v}", json_str(n))).collect());
    let metric = obj(METRICS
        .iter()
        .map(|m| {
            let row = obj(all.iter().map(|o| format!("{}: {}", json_str(o.name), json_num((m.get)(o, k)))).collect());
            format!("{}: {row}", json_str(m.key))
        })
        .collect());
    let ratios = obj(METRICS
        .iter()
        .map(|m| {
            let row = obj(all[1..]
                .iter()
                .map(|o| {
                    let r = (m.get)(k, k).zip((m.get)(o, k)).map(|(kv, p)| ratio(m, kv, p));
                    format!("{}: {}", json_str(o.name), json_num(r))
                })
                .collect());
            format!("{}: {row}", json_str(m.key))
        })
        .collect());
    let agreement = obj(all[1..]
        .iter()
        .zip(agree)
        .filter(|(o, _)| !o.answers_shared.is_empty())
        .map(|(o, a)| {
            format!(
                "{}: {{\"queries\": {}, \"differing\": {}, \"under\": {}, \"over\": {}, \"rejected_events\": {}}}",
                json_str(o.name),
                a.queries,
                a.differing,
                a.under,
                a.over,
                o.rejected
            )
        })
        .collect());
    let unsupported = obj(all
        .iter()
        .filter_map(|o| o.unsupported.as_ref().map(|why| format!("{}: {}", json_str(o.name), json_str(why))))
        .collect());
    format!(
        "{{\"config\": {cfg}, \"metric\": {metric}, \"ratios\": {ratios}, \"agreement\": {agreement}, \"unsupported\": {unsupported}}}\n"
    )
}
