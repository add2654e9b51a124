//! Test helpers shared by the index's test modules: a tiny KVEventBatch
//! payload builder and match shorthands.

use rmp::encode as enc;

use super::{Index, Query};

/// A tiny map-form payload builder (vLLM >= 0.24 layout).
#[derive(Default)]
pub(crate) struct B {
    events: Vec<Vec<u8>>,
}

/// An engine block hash as it can appear on the wire.
#[derive(Clone, Debug)]
pub(crate) enum H {
    U(u64),
    N(i64),
    Bin(Vec<u8>),
}

fn any_hash(b: &mut Vec<u8>, h: &H) {
    match h {
        H::U(v) => enc::write_uint(b, *v).map(|_| ()).unwrap(),
        H::N(v) => enc::write_sint(b, *v).map(|_| ()).unwrap(),
        H::Bin(v) => enc::write_bin(b, v).unwrap(),
    }
}

impl B {
    pub(crate) fn store(self, hashes: &[u64], parent: Option<u64>, tokens: &[u32], medium: Option<&str>) -> Self {
        let hs: Vec<H> = hashes.iter().map(|&h| H::U(h)).collect();
        self.store_h(&hs, parent.map(H::U).as_ref(), tokens, medium)
    }
    pub(crate) fn store_h(mut self, hashes: &[H], parent: Option<&H>, tokens: &[u32], medium: Option<&str>) -> Self {
        let mut e = Vec::new();
        enc::write_map_len(&mut e, 5).unwrap();
        enc::write_str(&mut e, "type").unwrap();
        enc::write_str(&mut e, "BlockStored").unwrap();
        enc::write_str(&mut e, "block_hashes").unwrap();
        enc::write_array_len(&mut e, hashes.len() as u32).unwrap();
        for h in hashes {
            any_hash(&mut e, h);
        }
        enc::write_str(&mut e, "parent_block_hash").unwrap();
        match parent {
            Some(p) => any_hash(&mut e, p),
            None => enc::write_nil(&mut e).unwrap(),
        }
        enc::write_str(&mut e, "token_ids").unwrap();
        enc::write_array_len(&mut e, tokens.len() as u32).unwrap();
        for t in tokens {
            enc::write_uint(&mut e, u64::from(*t)).unwrap();
        }
        enc::write_str(&mut e, "medium").unwrap();
        match medium {
            Some(m) => enc::write_str(&mut e, m).unwrap(),
            None => enc::write_nil(&mut e).unwrap(),
        }
        self.events.push(e);
        self
    }
    /// The last event (a fixmap) with one more field.
    fn field(&mut self, name: &str) -> &mut Vec<u8> {
        let e = self.events.last_mut().unwrap();
        assert!(e[0] & 0xf0 == 0x80 && e[0] < 0x8f, "last event is a fixmap");
        e[0] += 1;
        enc::write_str(e, name).unwrap();
        e
    }
    /// Add a `block_size` field to the last event.
    pub(crate) fn block_size(mut self, bs: u64) -> Self {
        enc::write_uint(self.field("block_size"), bs).unwrap();
        self
    }
    /// Add a `lora_name` field to the last event.
    pub(crate) fn lora(mut self, name: &str) -> Self {
        enc::write_str(self.field("lora_name"), name).unwrap();
        self
    }
    /// Add a string field (`kv_cache_spec_kind`, `cache_salt`, ...) to the last event.
    pub(crate) fn str_field(mut self, name: &str, value: &str) -> Self {
        enc::write_str(self.field(name), value).unwrap();
        self
    }
    /// An event of a type no engine version sends.
    pub(crate) fn unknown(mut self) -> Self {
        let mut e = Vec::new();
        enc::write_map_len(&mut e, 1).unwrap();
        enc::write_str(&mut e, "type").unwrap();
        enc::write_str(&mut e, "BlockTeleported").unwrap();
        self.events.push(e);
        self
    }
    pub(crate) fn remove(self, hashes: &[u64], medium: Option<&str>) -> Self {
        let hs: Vec<H> = hashes.iter().map(|&h| H::U(h)).collect();
        self.remove_h(&hs, medium)
    }
    pub(crate) fn remove_h(mut self, hashes: &[H], medium: Option<&str>) -> Self {
        let mut e = Vec::new();
        enc::write_map_len(&mut e, 3).unwrap();
        enc::write_str(&mut e, "type").unwrap();
        enc::write_str(&mut e, "BlockRemoved").unwrap();
        enc::write_str(&mut e, "block_hashes").unwrap();
        enc::write_array_len(&mut e, hashes.len() as u32).unwrap();
        for h in hashes {
            any_hash(&mut e, h);
        }
        enc::write_str(&mut e, "medium").unwrap();
        match medium {
            Some(m) => enc::write_str(&mut e, m).unwrap(),
            None => enc::write_nil(&mut e).unwrap(),
        }
        self.events.push(e);
        self
    }
    pub(crate) fn clear(mut self) -> Self {
        let mut e = Vec::new();
        enc::write_map_len(&mut e, 1).unwrap();
        enc::write_str(&mut e, "type").unwrap();
        enc::write_str(&mut e, "AllBlocksCleared").unwrap();
        self.events.push(e);
        self
    }
    pub(crate) fn build(self) -> Vec<u8> {
        let mut b = Vec::new();
        enc::write_array_len(&mut b, 3).unwrap();
        enc::write_f64(&mut b, 1.0).unwrap();
        enc::write_array_len(&mut b, self.events.len() as u32).unwrap();
        for e in self.events {
            b.extend_from_slice(&e);
        }
        enc::write_nil(&mut b).unwrap();
        b
    }
}

pub(crate) fn depth(ix: &Index, tokens: &[u32], worker: &str) -> u32 {
    ix.match_prefix(&Query::new("m", tokens)).into_iter().find(|(w, _)| *w == worker).unwrap().1
}

pub(crate) fn two_workers() -> Index {
    let mut ix = Index::default();
    ix.add_worker("a", "m").unwrap();
    ix.add_worker("b", "m").unwrap();
    ix
}
