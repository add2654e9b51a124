//! kvsync's prefix keys: the standard rolling hash, kept apart by namespace.
//!
//! Engines' block hashes are private (algorithm and seed differ by engine,
//! version and configuration), so kvsync hashes the token ids it sees with
//! the rolling hash of the Mooncake KV Indexer API (RFC
//! kvcache-ai/Mooncake#1403), the one Dynamo's and SMG's indexers use, so
//! that a gateway can compute a prompt's keys itself:
//!
//! ```text
//! local(i) = xxh3_64(tokens of block i as u32 LE [, 0xFE, n as u64 LE, canonical extra keys], seed)
//! seq(0)   = local(0)
//! seq(i)   = xxh3_64(seq(i-1) as u64 LE || local(i) as u64 LE, seed)
//! key(i)   = seq(i) ^ namespace(model, lora)
//! ```
//!
//! `seed` is 1337 unless configured. Extra keys have no standard; the
//! bracketed part is kvsync's own encoding and absent for a block without
//! them, so plain prompts give exactly the standard `seq` hashes. The index
//! stores `key(i)`: XOR with a per-namespace constant is a bijection, so a
//! caller's standard `seq` hashes map to the right namespace, while equal
//! prompts of different models or adapters get different keys. Local hashes
//! do not depend on each other (only the cheap 16-byte chain step does), so
//! the processor overlaps the hashing of consecutive blocks.

use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

use crate::wire::{EngineHash, Value};

const NAMESPACE_SEED: u64 = 0x6b76_7379_6e63_0001; // "kvsync" + version of the key scheme
const BYTES_HASH_SEED: u64 = 0x6b76_7379_6e63_00b1;
const GROUP_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// The LoRA part of a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lora<'a> {
    Base,
    Name(&'a str),
    Id(i64),
}

impl<'a> Lora<'a> {
    /// What an event's fields say: the adapter name wins over the id.
    pub fn of_event(lora_name: Option<&'a str>, lora_id: Option<i64>) -> Self {
        match (lora_name, lora_id) {
            (Some(n), _) => Lora::Name(n),
            (None, Some(id)) => Lora::Id(id),
            (None, None) => Lora::Base,
        }
    }
}

/// The constant a (model, LoRA) namespace's keys are XORed with.
pub fn namespace(model: &str, lora: Lora<'_>) -> u64 {
    let mut h = Xxh3::with_seed(NAMESPACE_SEED);
    h.update(&(model.len() as u64).to_le_bytes());
    h.update(model.as_bytes());
    match lora {
        Lora::Base => h.update(&[0]),
        Lora::Name(n) => {
            h.update(&[1]);
            h.update(n.as_bytes());
        }
        Lora::Id(id) => {
            h.update(&[2]);
            h.update(&id.to_le_bytes());
        }
    }
    h.digest()
}

#[inline]
fn token_bytes(tokens: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(tokens))
    } else {
        std::borrow::Cow::Owned(tokens.iter().flat_map(|t| t.to_le_bytes()).collect())
    }
}

/// The default seed of the standard rolling hash.
pub const DEFAULT_SEED: u64 = 1337;

/// `local(i)` of one block: its tokens and its extra keys (already
/// filtered; empty means none, which gives the standard local hash).
#[inline]
pub fn local_hash(tokens: &[u32], extras: &[Value<'_>], seed: u64) -> u64 {
    if extras.is_empty() {
        return xxh3_64_with_seed(&token_bytes(tokens), seed);
    }
    local_hash_with_extras(tokens, extras, seed)
}

/// kvsync's encoding of a block with extra keys (rare: kept out of line so
/// the plain path inlines into the hashing loops).
#[inline(never)]
fn local_hash_with_extras(tokens: &[u32], extras: &[Value<'_>], seed: u64) -> u64 {
    let mut h = Xxh3::with_seed(seed);
    h.update(&token_bytes(tokens));
    h.update(&[0xfe]);
    h.update(&(extras.len() as u64).to_le_bytes());
    for v in extras {
        feed(&mut h, v);
    }
    h.digest()
}

/// `seq(i)` from `seq(i-1)` (None for the first block) and `local(i)`.
#[inline]
pub fn chain(prev: Option<u64>, local: u64, seed: u64) -> u64 {
    match prev {
        None => local,
        Some(p) => {
            let mut buf = [0u8; 16];
            buf[..8].copy_from_slice(&p.to_le_bytes());
            buf[8..].copy_from_slice(&local.to_le_bytes());
            xxh3_64_with_seed(&buf, seed)
        }
    }
}

/// The standard `seq` hashes of a prompt's full blocks (no extra keys).
pub fn seq_hashes(tokens: &[u32], block_size: usize, seed: u64) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut prev = None;
    tokens
        .chunks_exact(block_size)
        .map(|b| {
            let s = chain(prev, local_hash(b, &[], seed), seed);
            prev = Some(s);
            s
        })
        .collect()
}

/// Canonical, unambiguous serialization of a value into the hasher: the same
/// logical value gives the same bytes whatever msgpack encoding carried it
/// (fixint vs int64, map16 vs fixmap), and Python's str/int/bytes/tuple/list
/// map onto the same forms.
pub fn feed(h: &mut Xxh3, v: &Value<'_>) {
    match v {
        Value::Nil => h.update(&[0]),
        Value::Bool(b) => h.update(&[1, u8::from(*b)]),
        Value::Int(i) => {
            h.update(&[2]);
            h.update(&i.to_le_bytes());
        }
        Value::Float(f) => {
            h.update(&[3]);
            h.update(&f.to_bits().to_le_bytes());
        }
        Value::Str(s) => {
            h.update(&[4]);
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Value::Bin(b) => {
            h.update(&[5]);
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
        Value::Array(items) => {
            h.update(&[6]);
            h.update(&(items.len() as u64).to_le_bytes());
            for it in items {
                feed(h, it);
            }
        }
        Value::Map(pairs) => {
            h.update(&[7]);
            h.update(&(pairs.len() as u64).to_le_bytes());
            for (k, it) in pairs {
                feed(h, k);
                feed(h, it);
            }
        }
        Value::Ext(t, b) => {
            h.update(&[8, *t as u8]);
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
    }
}

/// The per-worker lookup key of an engine hash in KV-cache group `group`.
///
/// Integers keep their 64-bit pattern (an engine's hashes are either all
/// signed or all unsigned, so -1 and 2^64-1 never both occur in one stream);
/// `bin` digests are reduced with xxh3. Group `g` is mixed in with an odd
/// multiplier, a bijection per group, so groups 0 and g never share a key
/// except by a 2^-64 accident.
pub fn engine_key(h: EngineHash<'_>, group: u32) -> u64 {
    let base = match h {
        EngineHash::Unsigned(v) => v,
        EngineHash::Negative(v) => v as u64,
        EngineHash::Bytes(b) => xxh3_64_with_seed(b, BYTES_HASH_SEED),
    };
    if group == 0 {
        base
    } else {
        base ^ u64::from(group).wrapping_mul(GROUP_MIX).rotate_left(17) ^ GROUP_MIX
    }
}

/// Storage tiers of a holding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Gpu = 0,
    Cpu = 1,
    Storage = 2,
}

impl Tier {
    /// SPEC: GPU (also nil), CPU (CPU, `CPU_PINNED`), STORAGE (everything else).
    pub fn of_medium(medium: Option<&str>) -> Tier {
        match medium {
            None => Tier::Gpu,
            Some(m) if m.eq_ignore_ascii_case("gpu") => Tier::Gpu,
            Some(m) if m.eq_ignore_ascii_case("cpu") || m.eq_ignore_ascii_case("cpu_pinned") => Tier::Cpu,
            Some(_) => Tier::Storage,
        }
    }

    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Storage => "storage",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Pinned values: changing the key scheme invalidates every snapshot and
    // breaks gateways that compute the standard hashes themselves. They
    // were computed outside this crate, in Python with the `xxhash` package
    // (xxhash.xxh3_64(data, seed=...).intdigest()) from the formulas in
    // this module's doc: local = xxh3_64(struct.pack('<%dI', *tokens),
    // seed=1337); seq(i) = xxh3_64(struct.pack('<QQ', seq(i-1), local(i)),
    // seed=1337); with extra keys, local hashes tokens || 0xfe || count as
    // u64 LE || canonical extras, a str extra being 4 || len as u64 LE ||
    // bytes and an int 2 || i128 LE (16 bytes). The namespace constant is
    // xxh3_64(len(model) as u64 LE || model || 0 (base) / 1 || name /
    // 2 || id as i64 LE, seed 0x6b7673796e630001).

    #[test]
    fn namespaces_are_pinned() {
        assert_eq!(namespace("llama", Lora::Base), 0x9823_8f1c_4001_47d3);
        assert_eq!(namespace("llama", Lora::Name("a")), 0x5090_245e_457c_cc1d);
        assert_eq!(namespace("llama", Lora::Id(7)), 0xaaf1_ca72_231a_dbb2);
    }

    #[test]
    fn standard_hashes_are_pinned() {
        let l0 = local_hash(&[1, 2, 3, 4], &[], DEFAULT_SEED);
        assert_eq!(l0, 0xcb38_e4d7_fb2d_ca5c);
        assert_eq!(chain(None, l0, DEFAULT_SEED), l0);
        let l1 = local_hash(&[5, 6, 7, 8], &[], DEFAULT_SEED);
        assert_eq!(chain(Some(l0), l1, DEFAULT_SEED), 0x44a2_b237_9d6d_3c3d);
        assert_eq!(seq_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, DEFAULT_SEED), vec![l0, 0x44a2_b237_9d6d_3c3d]);
        let toks: Vec<u32> = (0..32).collect();
        assert_eq!(seq_hashes(&toks, 16, DEFAULT_SEED), vec![0xd47a_8f41_c833_328a, 0xbf15_dffb_1644_7f38]);
        assert_eq!(local_hash(&[1, 2, 3, 4], &[], 7), 0x0686_5270_6834_89fc);
        assert_eq!(local_hash(&[1, 2], &[Value::Str("salt"), Value::Int(5)], DEFAULT_SEED), 0x7037_4987_e420_bb7d);
        assert!(seq_hashes(&toks, 0, DEFAULT_SEED).is_empty());
        assert!(seq_hashes(&toks[..15], 16, DEFAULT_SEED).is_empty());
    }

    #[test]
    fn extra_keys_change_the_key() {
        let plain = local_hash(&[1, 2], &[], DEFAULT_SEED);
        let salted = local_hash(&[1, 2], &[Value::Str("salt")], DEFAULT_SEED);
        assert_ne!(plain, salted);
        // a str and an int that print alike are different extra keys
        let s = local_hash(&[1], &[Value::Str("5")], DEFAULT_SEED);
        assert_ne!(s, local_hash(&[1], &[Value::Int(5)], DEFAULT_SEED));
        assert_ne!(namespace("llama", Lora::Id(1)), namespace("llama", Lora::Name("1")));
    }

    #[test]
    fn engine_keys_are_pinned_and_separate_groups() {
        // Integers keep their 64-bit pattern, above 2^32 too.
        assert_eq!(engine_key(EngineHash::Unsigned(42), 0), 42);
        assert_eq!(engine_key(EngineHash::Unsigned(1 << 40), 0), 1 << 40);
        assert_eq!(engine_key(EngineHash::Negative(-1), 0), u64::MAX);
        assert_eq!(engine_key(EngineHash::Negative(-2), 0), u64::MAX - 1);
        // group g: base ^ rotl(g * 0x9e3779b97f4a7c15, 17) ^ 0x9e3779b97f4a7c15
        assert_eq!(engine_key(EngineHash::Unsigned(42), 1), 0x6d45_872d_8761_4051);
        assert_eq!(engine_key(EngineHash::Unsigned((1 << 40) + 3), 3), 0x446f_8307_9735_c95a);
        // bytes: xxh3_64(bytes, seed 0x6b7673796e6300b1)
        assert_eq!(engine_key(EngineHash::Bytes(&[1, 2, 3]), 0), 0x55af_40de_d971_b958);
        let h = EngineHash::Unsigned(42);
        assert_ne!(engine_key(h, 1), engine_key(h, 2));
    }

    #[test]
    fn media_map_to_tiers() {
        assert_eq!(Tier::of_medium(None), Tier::Gpu);
        assert_eq!(Tier::of_medium(Some("CPU_PINNED")), Tier::Cpu);
        assert_eq!(Tier::of_medium(Some("DISK")), Tier::Storage);
        assert_eq!(Tier::of_medium(Some("OBJ")), Tier::Storage);
        assert_eq!(Tier::of_medium(Some("something-new")), Tier::Storage);
    }
}
