//! Decoding of the `KVEventBatch` msgpack payloads that vLLM (0.9 → 0.33) and
//! SGLang (0.5.x) publish on their KV-event PUB sockets.
//!
//! The decoder is zero-copy: strings, `bin` hashes and generic values borrow
//! from the payload, token ids are copied once into one flat `Vec<u32>` per
//! batch. It accepts every layout the engines have used (array-form and
//! map-form events, 2-, 3- and longer envelopes, any integer width, `bin`
//! hashes), skips unknown event types and unknown fields, and rejects
//! structurally wrong input with a [`DecodeError`] that says what was wrong
//! (`reason`) and where: the event's index in the batch, the field, and the
//! byte offset of the offending value (or of the read that ran past the end).
//! It never panics, and a length prefix never reserves more memory than the
//! rest of the payload could fill.
//!
//! Two modes: [`Mode::Index`] keeps only what the index needs;
//! [`Mode::Full`] also keeps every other known field as a generic [`Value`]
//! (for `kvsync.decode` and the conformance tests).
//!
//! This module holds the decoded types, the protocol's field names and the
//! entry points; `cursor` reads msgpack with bounds checks, `event` decodes
//! the envelope and the events, `value` reads and skips generic values.

mod cursor;
mod event;
mod value;

#[cfg(test)]
mod tests;

use std::ops::Range;

use crate::error::DecodeError;

/// An engine's private block identifier, as it was on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineHash<'a> {
    /// A msgpack integer in `0..=u64::MAX`.
    Unsigned(u64),
    /// A negative msgpack integer (`i64::MIN..0`).
    Negative(i64),
    /// A msgpack `bin` value (vLLM's 32-byte digests).
    Bytes(&'a [u8]),
}

/// A generic msgpack value borrowed from the payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    Ext(i8, &'a [u8]),
}

/// What the decoder keeps of fields the index does not use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only the fields the index needs; others are skipped (but still checked
    /// to be well-formed msgpack).
    Index,
    /// Every known field, the others as generic values in `other`.
    Full,
}

/// A `BlockStored` event. Ranges index into [`Batch::hashes`] and
/// [`Batch::tokens`].
#[derive(Clone, Debug, PartialEq)]
pub struct Stored<'a> {
    pub hashes: Range<usize>,
    pub parent: Option<EngineHash<'a>>,
    pub tokens: Range<usize>,
    /// `None` when the field was absent or nil.
    pub block_size: Option<u64>,
    pub lora_id: Option<i64>,
    pub lora_name: Option<&'a str>,
    pub medium: Option<&'a str>,
    /// One entry per block (nil → `None`), or `None` for the whole field.
    pub extra_keys: Option<Vec<Option<Vec<Value<'a>>>>>,
    /// `None` when absent or nil (group 0).
    pub group_idx: Option<u32>,
    pub kv_cache_spec_kind: Option<&'a str>,
    /// SGLang's cache salt: a field from 0.5.20, inside the trailing
    /// `metadata` map in 0.5.18's array form.
    pub cache_salt: Option<&'a str>,
    /// [`Mode::Full`] only: the remaining known fields, by name.
    pub other: Vec<(&'static str, Value<'a>)>,
}

/// A `BlockRemoved` event.
#[derive(Clone, Debug, PartialEq)]
pub struct Removed<'a> {
    pub hashes: Range<usize>,
    pub medium: Option<&'a str>,
    /// `None` when absent or nil (group 0).
    pub group_idx: Option<u32>,
    pub other: Vec<(&'static str, Value<'a>)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event<'a> {
    Stored(Stored<'a>),
    Removed(Removed<'a>),
    Cleared,
}

impl Event<'_> {
    /// The event's type tag on the wire (one of [`EVENT_TYPES`]).
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Stored(_) => EVENT_TYPES[0],
            Event::Removed(_) => EVENT_TYPES[1],
            Event::Cleared => EVENT_TYPES[2],
        }
    }
}

/// One decoded `KVEventBatch`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch<'a> {
    pub ts: f64,
    pub dp_rank: Option<i64>,
    pub events: Vec<Event<'a>>,
    pub hashes: Vec<EngineHash<'a>>,
    pub tokens: Vec<u32>,
    /// Events whose type tag this decoder does not know (skipped).
    pub unknown_events: u32,
}

/// The map key that holds an event's type tag (map-form events).
pub const TYPE_KEY: &str = "type";

/// The type tags of the events this decoder knows, as [`Event::type_name`]
/// gives them.
pub const EVENT_TYPES: &[&str] = &["BlockStored", "BlockRemoved", "AllBlocksCleared"];

/// Every field name an [`Event`] can expose, for all event types: the
/// `BlockStored` fields in vLLM 0.33's declaration order
/// ([`BLOCK_STORED_FIELDS`]), then SGLang's additions ([`SGLANG_STORED_FIELDS`]).
/// `kvsync.decode`'s events have one attribute per name (None when absent).
pub const EVENT_FIELDS: &[&str] = &[
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
    "cache_salt",
    "metadata",
];

/// `BlockStored` fields in array (positional) order, vLLM 0.33; older
/// releases send a prefix of it. Position 6 is `lora_name` in vLLM and the
/// `metadata` map in SGLang 0.5.18 (the value's type tells them apart).
pub const BLOCK_STORED_FIELDS: &[&str] = EVENT_FIELDS.split_at(15).0;

/// `BlockStored` fields only SGLang sends: `cache_salt` (a field from
/// 0.5.20) and `metadata` (0.5.18's trailing `{"cache_salt": str}` map in
/// array form). SGLang's `session_id` and `lora_name` share vLLM's names.
pub const SGLANG_STORED_FIELDS: &[&str] = EVENT_FIELDS.split_at(15).1;

/// `BlockRemoved` fields in array (positional) order, vLLM 0.33.
pub const BLOCK_REMOVED_FIELDS: &[&str] = &["block_hashes", "medium", "group_idx", "locality", "ownership"];

/// `AllBlocksCleared` has no fields.
pub const ALL_BLOCKS_CLEARED_FIELDS: &[&str] = &[];

/// The fields without a typed slot in [`Stored`]/[`Removed`]: kept as
/// generic values in `other` in [`Mode::Full`], skipped in [`Mode::Index`]
/// (except `cache_salt`, typed too, and `metadata`, read for its salt).
const GENERIC_FIELDS: &[&str] = EVENT_FIELDS.split_at(10).1;

/// Decode one payload (the third frame of a live message).
pub fn decode(payload: &[u8], mode: Mode) -> Result<Batch<'_>, DecodeError> {
    decode_into(payload, mode, Batch::default())
}

/// Vectors kept between decodes, so a stream of payloads decodes without
/// allocating (see [`decode_with`] and [`Buffers::recycle`]).
#[derive(Debug, Default)]
pub struct Buffers {
    events: Vec<Event<'static>>,
    hashes: Vec<EngineHash<'static>>,
    tokens: Vec<u32>,
}

/// An empty vector of borrowed values turned into one of another lifetime,
/// keeping its allocation: there is nothing in it to borrow. The in-place
/// `collect` reuses the buffer (same element layout) and `map` never runs.
fn relifetime<A, B>(mut v: Vec<A>) -> Vec<B> {
    v.clear();
    v.into_iter().map(|_| unreachable!("the vector is empty")).collect()
}

impl Buffers {
    /// Take back the vectors of a batch that is no longer needed.
    pub fn recycle(&mut self, batch: Batch<'_>) {
        self.events = relifetime(batch.events);
        self.hashes = relifetime(batch.hashes);
        let mut tokens = batch.tokens;
        tokens.clear();
        self.tokens = tokens;
    }
}

/// [`decode`] into the vectors of `bufs` (give them back with
/// [`Buffers::recycle`] once the batch has been used).
pub fn decode_with<'a>(payload: &'a [u8], mode: Mode, bufs: &mut Buffers) -> Result<Batch<'a>, DecodeError> {
    let batch = Batch {
        events: relifetime(std::mem::take(&mut bufs.events)),
        hashes: relifetime(std::mem::take(&mut bufs.hashes)),
        tokens: std::mem::take(&mut bufs.tokens),
        ..Batch::default()
    };
    decode_into(payload, mode, batch)
}

fn decode_into<'a>(payload: &'a [u8], mode: Mode, batch: Batch<'a>) -> Result<Batch<'a>, DecodeError> {
    event::Decoder::new(payload, mode, batch).run()
}
