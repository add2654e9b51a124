//! Decoding of the `KVEventBatch` msgpack payloads that vLLM (0.9 → 0.33) and
//! SGLang (0.5.x) publish on their KV-event PUB sockets.
//!
//! The decoder is zero-copy: strings, `bin` hashes and generic values borrow
//! from the payload, token ids are copied once into one flat `Vec<u32>` per
//! batch. It accepts every layout the engines have used (array-form and
//! map-form events, 2-, 3- and longer envelopes, any integer width, `bin`
//! hashes), skips unknown event types and unknown fields, and rejects
//! structurally wrong input with a [`DecodeError`] that says what was wrong
//! and where. It never panics and never trusts a length prefix for an
//! allocation.
//!
//! Two modes: [`Mode::Index`] keeps only what the index needs;
//! [`Mode::Full`] also keeps every other known field as a generic [`Value`]
//! (for `kvsync.decode` and the conformance tests).

use std::ops::Range;

use rmp::Marker;

use crate::error::DecodeError;

/// Generic values nest at most this deep; deeper input is rejected rather
/// than risking the stack.
const MAX_DEPTH: usize = 32;

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
    /// Total block hashes over all events (a size hint for the index).
    pub block_events: usize,
}

/// Payload bytes that follow a token id's marker byte: 0 for a positive
/// fixint, 1/2/4 for uint8/16/32, 0xff for anything else (general path).
const TOKEN_WIDTH: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 0x80 {
        t[i] = 0;
        i += 1;
    }
    t[0xcc] = 1;
    t[0xcd] = 2;
    t[0xce] = 4;
    t
};

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

/// The field names of the known layouts as `'static` strs, matched on raw
/// bytes (saves the UTF-8 check on the hot path).
fn known_key(raw: &[u8]) -> Option<&'static str> {
    if raw == TYPE_KEY.as_bytes() {
        return Some(TYPE_KEY);
    }
    EVENT_FIELDS.iter().copied().find(|f| f.as_bytes() == raw)
}

fn static_name(name: &str) -> Option<&'static str> {
    GENERIC_FIELDS.iter().copied().find(|n| *n == name)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stored,
    Removed,
    Cleared,
}

const KINDS: [Kind; 3] = [Kind::Stored, Kind::Removed, Kind::Cleared];

fn kind_of(tag: &str) -> Option<Kind> {
    EVENT_TYPES.iter().position(|t| *t == tag).map(|i| KINDS[i])
}

impl Kind {
    /// Field names in array (positional) order.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Stored => BLOCK_STORED_FIELDS,
            Kind::Removed => BLOCK_REMOVED_FIELDS,
            Kind::Cleared => ALL_BLOCKS_CLEARED_FIELDS,
        }
    }
}

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
    let mut d = Decoder { cur: Cursor { buf: payload, pos: 0 }, mode, batch };
    d.batch_envelope()?;
    if d.cur.pos != payload.len() {
        return Err(DecodeError::new(format!(
            "{} trailing bytes after the batch at byte {}",
            payload.len() - d.cur.pos,
            d.cur.pos
        )));
    }
    Ok(d.batch)
}

/// A read position in the payload. Every read is bounds-checked.
#[derive(Clone, Copy)]
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn eof(&self, what: &str) -> DecodeError {
        DecodeError::new(format!(
            "truncated payload: {what} at byte {} runs past the end ({} bytes)",
            self.pos,
            self.buf.len()
        ))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// How many elements of a container that claims `claimed` may be
    /// reserved up front: no more than the rest of the payload can encode
    /// (`min_bytes` each), and no more memory than the rest of the payload
    /// takes. A lying length header then costs at most the payload's size.
    fn room<T>(&self, claimed: usize, min_bytes: usize) -> usize {
        let left = self.remaining();
        claimed.min(left / min_bytes).min(left / std::mem::size_of::<T>().max(1))
    }

    /// [`Cursor::room`] for generic values, which nest: every level of a
    /// lying nest would reserve again, so each level reserves at most a few
    /// elements and longer (real) arrays grow as they are read.
    fn nested_room(&self, claimed: usize, min_bytes: usize) -> usize {
        const NESTED_RESERVE: usize = 8;
        claimed.min(self.remaining() / min_bytes).min(NESTED_RESERVE)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| self.eof(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn be(&mut self, n: usize, what: &str) -> Result<u64, DecodeError> {
        Ok(self.take(n, what)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn peek_marker(&self) -> Result<Marker, DecodeError> {
        self.buf.get(self.pos).map(|b| Marker::from_u8(*b)).ok_or_else(|| self.eof("value"))
    }

    fn marker(&mut self) -> Result<Marker, DecodeError> {
        let m = self.peek_marker()?;
        self.pos += 1;
        Ok(m)
    }

    /// Length that follows a str/bin/array/map marker, or `None` for other markers.
    fn len_of(&mut self, m: Marker) -> Result<Option<usize>, DecodeError> {
        Ok(Some(match m {
            Marker::FixStr(n) | Marker::FixArray(n) | Marker::FixMap(n) => usize::from(n),
            Marker::Str8 | Marker::Bin8 => self.be(1, "length")? as usize,
            Marker::Str16 | Marker::Bin16 | Marker::Array16 | Marker::Map16 => self.be(2, "length")? as usize,
            Marker::Str32 | Marker::Bin32 | Marker::Array32 | Marker::Map32 => self.be(4, "length")? as usize,
            _ => return Ok(None),
        }))
    }

    /// The integer after marker `m`, or `None` when `m` is not an integer marker.
    fn int_of(&mut self, m: Marker) -> Result<Option<i128>, DecodeError> {
        Ok(Some(match m {
            Marker::FixPos(v) => i128::from(v),
            Marker::FixNeg(v) => i128::from(v),
            Marker::U8 => i128::from(self.be(1, "int")?),
            Marker::U16 => i128::from(self.be(2, "int")?),
            Marker::U32 => i128::from(self.be(4, "int")?),
            Marker::U64 => i128::from(self.be(8, "int")?),
            Marker::I8 => i128::from(self.be(1, "int")? as u8 as i8),
            Marker::I16 => i128::from(self.be(2, "int")? as u16 as i16),
            Marker::I32 => i128::from(self.be(4, "int")? as u32 as i32),
            Marker::I64 => i128::from(self.be(8, "int")? as i64),
            _ => return Ok(None),
        }))
    }
}

fn marker_name(m: Marker) -> &'static str {
    match m {
        Marker::FixPos(_) | Marker::FixNeg(_) | Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => "int",
        Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => "int",
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => "map",
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => "array",
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => "str",
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => "bin",
        Marker::Null => "nil",
        Marker::True | Marker::False => "bool",
        Marker::F32 | Marker::F64 => "float",
        Marker::Reserved => "reserved byte 0xc1",
        _ => "ext",
    }
}

fn is_array(m: Marker) -> bool {
    matches!(m, Marker::FixArray(_) | Marker::Array16 | Marker::Array32)
}
fn is_map(m: Marker) -> bool {
    matches!(m, Marker::FixMap(_) | Marker::Map16 | Marker::Map32)
}
fn is_str(m: Marker) -> bool {
    matches!(m, Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32)
}

struct Decoder<'a> {
    cur: Cursor<'a>,
    mode: Mode,
    batch: Batch<'a>,
}

/// Where the decoder is, for error messages.
#[derive(Clone, Copy)]
struct At<'s> {
    event: usize,
    field: &'s str,
}

impl<'a> Decoder<'a> {
    fn err(&self, at: At<'_>, what: &str) -> DecodeError {
        if at.field.is_empty() {
            DecodeError::new(format!("event {}: {what} (byte {})", at.event, self.cur.pos))
        } else {
            DecodeError::new(format!("event {} field {}: {what} (byte {})", at.event, at.field, self.cur.pos))
        }
    }

    fn expected(&self, at: At<'_>, want: &str, got: Marker) -> DecodeError {
        self.err(at, &format!("expected {want}, got {}", marker_name(got)))
    }

    fn batch_envelope(&mut self) -> Result<(), DecodeError> {
        if self.cur.buf.is_empty() {
            return Err(DecodeError::new("empty payload: expected a msgpack array [ts, events, dp_rank]"));
        }
        let m = self.cur.marker()?;
        let n = match self.cur.len_of(m)? {
            Some(n) if is_array(m) => n,
            _ => {
                return Err(DecodeError::new(format!(
                    "batch must be a msgpack array [ts, events, dp_rank], got {}",
                    marker_name(m)
                )))
            }
        };
        if n < 2 {
            return Err(DecodeError::new(format!("batch array has {n} elements, need at least [ts, events]")));
        }
        let m = self.cur.marker()?;
        self.batch.ts = match m {
            Marker::F64 => f64::from_bits(self.cur.be(8, "ts")?),
            Marker::F32 => f64::from(f32::from_bits(self.cur.be(4, "ts")? as u32)),
            _ => match self.cur.int_of(m)? {
                Some(v) => v as f64,
                None => return Err(DecodeError::new(format!("batch ts: expected float, got {}", marker_name(m)))),
            },
        };
        let m = self.cur.marker()?;
        let n_events = match self.cur.len_of(m)? {
            Some(k) if is_array(m) => k,
            _ => return Err(DecodeError::new(format!("batch events: expected array, got {}", marker_name(m)))),
        };
        // A kept event takes at least 13 bytes on the wire (`["BlockStored"]`).
        self.batch.events.reserve(self.cur.room::<Event<'_>>(n_events, 13));
        for i in 0..n_events {
            self.event(i)?;
        }
        if n >= 3 {
            let m = self.cur.marker()?;
            self.batch.dp_rank = match m {
                Marker::Null => None,
                _ => match self.cur.int_of(m)? {
                    Some(v) => Some(
                        i64::try_from(v).map_err(|_| DecodeError::new(format!("batch dp_rank {v} out of range")))?,
                    ),
                    None => {
                        return Err(DecodeError::new(format!(
                            "batch dp_rank: expected int or nil, got {}",
                            marker_name(m)
                        )))
                    }
                },
            };
        }
        for _ in 3..n {
            self.skip(0, At { event: n_events, field: "envelope extra element" })?;
        }
        Ok(())
    }

    fn event(&mut self, i: usize) -> Result<(), DecodeError> {
        let at = At { event: i, field: "" };
        let m = self.cur.marker()?;
        let Some(n) = self.cur.len_of(m)? else {
            return Err(self.expected(at, "an event (array or map)", m));
        };
        if is_array(m) {
            self.array_event(i, n)
        } else if is_map(m) {
            self.map_event(i, n)
        } else {
            Err(self.expected(at, "an event (array or map)", m))
        }
    }

    fn tag(&mut self, at: At<'_>) -> Result<&'a str, DecodeError> {
        let m = self.cur.marker()?;
        if !is_str(m) {
            return Err(self.expected(at, "a str type tag", m));
        }
        let n = self.cur.len_of(m)?.unwrap_or(0);
        let raw = self.cur.take(n, "type tag")?;
        std::str::from_utf8(raw).map_err(|_| self.err(at, "type tag is not UTF-8"))
    }

    fn array_event(&mut self, i: usize, n: usize) -> Result<(), DecodeError> {
        let at = At { event: i, field: TYPE_KEY };
        if n == 0 {
            return Err(self.err(at, "empty event array (no type tag)"));
        }
        let tag = self.tag(at)?;
        let Some(kind) = kind_of(tag) else {
            for _ in 1..n {
                self.skip(0, At { event: i, field: tag })?;
            }
            self.batch.unknown_events += 1;
            return Ok(());
        };
        let mut ev = EventBuilder::new(kind);
        let names = kind.fields();
        for pos in 0..n - 1 {
            match names.get(pos) {
                Some(&name) => {
                    // SGLang 0.5.18 puts a `metadata` map where vLLM has lora_name.
                    let name = if name == "lora_name" && is_map(self.cur.peek_marker()?) { "metadata" } else { name };
                    self.field(&mut ev, i, name)?;
                }
                None => self.skip(0, At { event: i, field: "extra element" })?,
            }
        }
        self.finish(ev, i)
    }

    fn map_event(&mut self, i: usize, n: usize) -> Result<(), DecodeError> {
        let start = self.cur;
        // Find the tag first: msgspec writes it first (then one pass is
        // enough), but key order is not promised.
        let mut tag = None;
        let mut first_was_tag = false;
        for k in 0..n {
            let key = self.key(i)?;
            if key == TYPE_KEY {
                tag = Some(self.tag(At { event: i, field: TYPE_KEY })?);
                first_was_tag = k == 0;
                break;
            }
            self.skip(0, At { event: i, field: key })?;
        }
        let Some(tag) = tag else {
            return Err(self.err(At { event: i, field: "" }, "event map has no \"type\" key"));
        };
        let rest = if first_was_tag {
            n - 1
        } else {
            self.cur = start;
            n
        };
        let kind = kind_of(tag);
        let mut ev = kind.map(EventBuilder::new);
        for _ in 0..rest {
            let key = self.key(i)?;
            match (&mut ev, key) {
                (_, TYPE_KEY) | (None, _) => self.skip(0, At { event: i, field: key })?,
                (Some(ev), _) => self.field(ev, i, key)?,
            }
        }
        match ev {
            Some(ev) => self.finish(ev, i),
            None => {
                self.batch.unknown_events += 1;
                Ok(())
            }
        }
    }

    fn key(&mut self, i: usize) -> Result<&'a str, DecodeError> {
        let at = At { event: i, field: "" };
        let m = self.cur.marker()?;
        if !is_str(m) {
            return Err(self.expected(at, "a str key in the event map", m));
        }
        let n = self.cur.len_of(m)?.unwrap_or(0);
        let raw = self.cur.take(n, "map key")?;
        if let Some(known) = known_key(raw) {
            return Ok(known);
        }
        std::str::from_utf8(raw).map_err(|_| self.err(at, "map key is not UTF-8"))
    }

    /// Decode the value of field `name` into the event being built.
    fn field(&mut self, ev: &mut EventBuilder<'a>, i: usize, name: &str) -> Result<(), DecodeError> {
        let at = At { event: i, field: name };
        match (ev.kind, name) {
            (Kind::Stored | Kind::Removed, "block_hashes") => {
                let m = self.cur.marker()?;
                let n = match self.cur.len_of(m)? {
                    Some(n) if is_array(m) => n,
                    _ if m == Marker::Null => 0,
                    _ => return Err(self.expected(at, "array of hashes", m)),
                };
                let start = self.batch.hashes.len();
                for _ in 0..n {
                    let h = self.hash(at)?.ok_or_else(|| self.err(at, "nil in block_hashes"))?;
                    self.batch.hashes.push(h);
                }
                ev.hashes = Some(start..self.batch.hashes.len());
            }
            (Kind::Stored, "parent_block_hash") => ev.parent = self.hash(at)?,
            (Kind::Stored, "token_ids") => {
                let m = self.cur.marker()?;
                let n = match self.cur.len_of(m)? {
                    Some(n) if is_array(m) => n,
                    _ if m == Marker::Null => 0,
                    _ => return Err(self.expected(at, "array of token ids", m)),
                };
                let start = self.batch.tokens.len();
                self.batch.tokens.reserve(self.cur.room::<u32>(n, 1));
                for _ in 0..n {
                    // Fast path for the encodings token ids actually use
                    // (fixint, uint8/16/32), without a branch on the width:
                    // read the 4 bytes after the marker and shift.
                    let buf = self.cur.buf;
                    let p = self.cur.pos;
                    let t = match buf.get(p..p + 5) {
                        Some(w) if TOKEN_WIDTH[usize::from(w[0])] != 0xff => {
                            let width = u32::from(TOKEN_WIDTH[usize::from(w[0])]);
                            let wide = u64::from(u32::from_be_bytes([w[1], w[2], w[3], w[4]]));
                            let v = (wide >> (32 - 8 * width)) as u32;
                            self.cur.pos = p + 1 + width as usize;
                            if width == 0 {
                                u32::from(w[0])
                            } else {
                                v
                            }
                        }
                        _ => {
                            let m = self.cur.marker()?;
                            let v = self.cur.int_of(m)?.ok_or_else(|| self.expected(at, "int token id", m))?;
                            u32::try_from(v).map_err(|_| self.err(at, &format!("token id {v} is not in 0..2^32")))?
                        }
                    };
                    self.batch.tokens.push(t);
                }
                ev.tokens = Some(start..self.batch.tokens.len());
            }
            (Kind::Stored, "block_size") => {
                ev.block_size = match self.opt_int(at)? {
                    None => None,
                    Some(v) => Some(u64::try_from(v).map_err(|_| self.err(at, &format!("negative block_size {v}")))?),
                }
            }
            (Kind::Stored, "lora_id") => {
                ev.lora_id = match self.opt_int(at)? {
                    None => None,
                    Some(v) => Some(i64::try_from(v).map_err(|_| self.err(at, &format!("lora_id {v} out of range")))?),
                }
            }
            (Kind::Stored | Kind::Removed, "medium") => ev.medium = self.opt_str(at)?,
            (Kind::Stored, "lora_name") => ev.lora_name = self.opt_str(at)?,
            (Kind::Stored, "kv_cache_spec_kind") => ev.spec_kind = self.opt_str(at)?,
            (Kind::Stored, "cache_salt") => {
                ev.cache_salt = self.opt_str(at)?;
                if self.mode == Mode::Full {
                    ev.other.push(("cache_salt", ev.cache_salt.map_or(Value::Nil, Value::Str)));
                }
            }
            (Kind::Stored | Kind::Removed, "group_idx") => {
                ev.group_idx = match self.opt_int(at)? {
                    None => None,
                    Some(v) => {
                        Some(u32::try_from(v).map_err(|_| self.err(at, &format!("group_idx {v} out of range")))?)
                    }
                }
            }
            (Kind::Stored, "extra_keys") => {
                let m = self.cur.marker()?;
                if m == Marker::Null {
                    ev.extra_keys = None;
                    return Ok(());
                }
                let n = match self.cur.len_of(m)? {
                    Some(n) if is_array(m) => n,
                    _ => return Err(self.expected(at, "array (one entry per block) or nil", m)),
                };
                let mut per_block = Vec::with_capacity(self.cur.room::<Option<Vec<Value<'_>>>>(n, 1));
                for _ in 0..n {
                    let m = self.cur.marker()?;
                    if m == Marker::Null {
                        per_block.push(None);
                        continue;
                    }
                    let k = match self.cur.len_of(m)? {
                        Some(k) if is_array(m) => k,
                        _ => return Err(self.expected(at, "array of extra keys or nil per block", m)),
                    };
                    let mut keys = Vec::with_capacity(self.cur.nested_room(k, 1));
                    for _ in 0..k {
                        keys.push(self.value(1, at)?);
                    }
                    per_block.push(Some(keys));
                }
                ev.extra_keys = Some(per_block);
            }
            (Kind::Stored, "metadata") => {
                // SGLang 0.5.18: {"cache_salt": str} for salted requests.
                let v = self.value(0, at)?;
                if let Value::Map(pairs) = &v {
                    for (k, val) in pairs {
                        if let (Value::Str("cache_salt"), Value::Str(s)) = (k, val) {
                            ev.cache_salt = Some(s);
                        }
                    }
                }
                if self.mode == Mode::Full {
                    ev.other.push(("metadata", v));
                }
            }
            _ => match (self.mode, static_name(name)) {
                (Mode::Full, Some(stat)) => {
                    let v = self.value(0, at)?;
                    ev.other.push((stat, v));
                }
                _ => self.skip(0, at)?,
            },
        }
        Ok(())
    }

    fn finish(&mut self, ev: EventBuilder<'a>, i: usize) -> Result<(), DecodeError> {
        let at = At { event: i, field: "" };
        let hashes = ev.hashes.unwrap_or(0..0);
        self.batch.block_events += hashes.len();
        let event = match ev.kind {
            Kind::Cleared => Event::Cleared,
            Kind::Removed => {
                Event::Removed(Removed { hashes, medium: ev.medium, group_idx: ev.group_idx, other: ev.other })
            }
            Kind::Stored => {
                let tokens = ev.tokens.unwrap_or(0..0);
                if let Some(keys) = &ev.extra_keys {
                    if keys.len() != hashes.len() && !keys.is_empty() {
                        return Err(
                            self.err(at, &format!("extra_keys has {} entries for {} blocks", keys.len(), hashes.len()))
                        );
                    }
                }
                Event::Stored(Stored {
                    hashes,
                    parent: ev.parent,
                    tokens,
                    block_size: ev.block_size,
                    lora_id: ev.lora_id,
                    lora_name: ev.lora_name,
                    medium: ev.medium,
                    extra_keys: ev.extra_keys,
                    group_idx: ev.group_idx,
                    kv_cache_spec_kind: ev.spec_kind,
                    cache_salt: ev.cache_salt,
                    other: ev.other,
                })
            }
        };
        self.batch.events.push(event);
        Ok(())
    }

    fn hash(&mut self, at: At<'_>) -> Result<Option<EngineHash<'a>>, DecodeError> {
        // Fast path: vLLM's default hashes are uint64.
        let (buf, p) = (self.cur.buf, self.cur.pos);
        if buf.get(p) == Some(&0xcf) && p + 9 <= buf.len() {
            let mut be = [0u8; 8];
            be.copy_from_slice(&buf[p + 1..p + 9]);
            self.cur.pos = p + 9;
            return Ok(Some(EngineHash::Unsigned(u64::from_be_bytes(be))));
        }
        let m = self.cur.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        if let Some(v) = self.cur.int_of(m)? {
            return Ok(Some(if v < 0 { EngineHash::Negative(v as i64) } else { EngineHash::Unsigned(v as u64) }));
        }
        match m {
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = self.cur.len_of(m)?.unwrap_or(0);
                Ok(Some(EngineHash::Bytes(self.cur.take(n, "bin hash")?)))
            }
            _ => Err(self.expected(at, "int or bin block hash", m)),
        }
    }

    fn opt_int(&mut self, at: At<'_>) -> Result<Option<i128>, DecodeError> {
        let m = self.cur.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        match self.cur.int_of(m)? {
            Some(v) => Ok(Some(v)),
            None => Err(self.expected(at, "int or nil", m)),
        }
    }

    fn opt_str(&mut self, at: At<'_>) -> Result<Option<&'a str>, DecodeError> {
        let m = self.cur.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        if !is_str(m) {
            return Err(self.expected(at, "str or nil", m));
        }
        let n = self.cur.len_of(m)?.unwrap_or(0);
        let raw = self.cur.take(n, "str")?;
        std::str::from_utf8(raw).map(Some).map_err(|_| self.err(at, "string is not UTF-8"))
    }

    /// Read any value as a [`Value`].
    fn value(&mut self, depth: usize, at: At<'_>) -> Result<Value<'a>, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(self.err(at, &format!("values nested deeper than {MAX_DEPTH}")));
        }
        let m = self.cur.marker()?;
        if let Some(v) = self.cur.int_of(m)? {
            return Ok(Value::Int(v));
        }
        Ok(match m {
            Marker::Null => Value::Nil,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::F32 => Value::Float(f64::from(f32::from_bits(self.cur.be(4, "float")? as u32))),
            Marker::F64 => Value::Float(f64::from_bits(self.cur.be(8, "float")?)),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = self.cur.len_of(m)?.unwrap_or(0);
                let raw = self.cur.take(n, "str")?;
                Value::Str(std::str::from_utf8(raw).map_err(|_| self.err(at, "string is not UTF-8"))?)
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = self.cur.len_of(m)?.unwrap_or(0);
                Value::Bin(self.cur.take(n, "bin")?)
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.cur.len_of(m)?.unwrap_or(0);
                let mut items = Vec::with_capacity(self.cur.nested_room(n, 1));
                for _ in 0..n {
                    items.push(self.value(depth + 1, at)?);
                }
                Value::Array(items)
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.cur.len_of(m)?.unwrap_or(0);
                let mut items = Vec::with_capacity(self.cur.nested_room(n, 2));
                for _ in 0..n {
                    let k = self.value(depth + 1, at)?;
                    let v = self.value(depth + 1, at)?;
                    items.push((k, v));
                }
                Value::Map(items)
            }
            Marker::FixExt1 | Marker::FixExt2 | Marker::FixExt4 | Marker::FixExt8 | Marker::FixExt16 => {
                let n = match m {
                    Marker::FixExt1 => 1,
                    Marker::FixExt2 => 2,
                    Marker::FixExt4 => 4,
                    Marker::FixExt8 => 8,
                    _ => 16,
                };
                let ty = self.cur.be(1, "ext type")? as u8 as i8;
                Value::Ext(ty, self.cur.take(n, "ext")?)
            }
            Marker::Ext8 | Marker::Ext16 | Marker::Ext32 => {
                let w = match m {
                    Marker::Ext8 => 1,
                    Marker::Ext16 => 2,
                    _ => 4,
                };
                let n = self.cur.be(w, "ext length")? as usize;
                let ty = self.cur.be(1, "ext type")? as u8 as i8;
                Value::Ext(ty, self.cur.take(n, "ext")?)
            }
            _ => return Err(self.expected(at, "a msgpack value", m)),
        })
    }

    /// Skip one value, checking that it is well-formed.
    fn skip(&mut self, depth: usize, at: At<'_>) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(self.err(at, &format!("values nested deeper than {MAX_DEPTH}")));
        }
        let m = self.cur.marker()?;
        if self.cur.int_of(m)?.is_some() {
            return Ok(());
        }
        match m {
            Marker::Null | Marker::True | Marker::False => {}
            Marker::F32 => {
                self.cur.take(4, "float")?;
            }
            Marker::F64 => {
                self.cur.take(8, "float")?;
            }
            Marker::FixStr(_)
            | Marker::Str8
            | Marker::Str16
            | Marker::Str32
            | Marker::Bin8
            | Marker::Bin16
            | Marker::Bin32 => {
                let n = self.cur.len_of(m)?.unwrap_or(0);
                self.cur.take(n, "str/bin")?;
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.cur.len_of(m)?.unwrap_or(0);
                for _ in 0..n {
                    self.skip(depth + 1, at)?;
                }
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.cur.len_of(m)?.unwrap_or(0);
                for _ in 0..n {
                    self.skip(depth + 1, at)?;
                    self.skip(depth + 1, at)?;
                }
            }
            _ => {
                // ext and reserved: reuse value() which knows their layout
                self.cur.pos -= 1;
                self.value(depth, at)?;
            }
        }
        Ok(())
    }
}

struct EventBuilder<'a> {
    kind: Kind,
    hashes: Option<Range<usize>>,
    parent: Option<EngineHash<'a>>,
    tokens: Option<Range<usize>>,
    block_size: Option<u64>,
    lora_id: Option<i64>,
    lora_name: Option<&'a str>,
    medium: Option<&'a str>,
    extra_keys: Option<Vec<Option<Vec<Value<'a>>>>>,
    group_idx: Option<u32>,
    spec_kind: Option<&'a str>,
    cache_salt: Option<&'a str>,
    other: Vec<(&'static str, Value<'a>)>,
}

impl EventBuilder<'_> {
    fn new(kind: Kind) -> Self {
        EventBuilder {
            kind,
            hashes: None,
            parent: None,
            tokens: None,
            block_size: None,
            lora_id: None,
            lora_name: None,
            medium: None,
            extra_keys: None,
            group_idx: None,
            spec_kind: None,
            cache_salt: None,
            other: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v);
        v
    }

    #[test]
    fn map_form_store_with_tag_last() {
        let p = enc(|w| {
            rmp::encode::write_array_len(w, 3).unwrap();
            rmp::encode::write_f64(w, 1.5).unwrap();
            rmp::encode::write_array_len(w, 1).unwrap();
            rmp::encode::write_map_len(w, 5).unwrap();
            rmp::encode::write_str(w, "block_hashes").unwrap();
            rmp::encode::write_array_len(w, 1).unwrap();
            rmp::encode::write_uint(w, u64::MAX).unwrap();
            rmp::encode::write_str(w, "parent_block_hash").unwrap();
            rmp::encode::write_nil(w).unwrap();
            rmp::encode::write_str(w, "token_ids").unwrap();
            rmp::encode::write_array_len(w, 2).unwrap();
            rmp::encode::write_uint(w, 7).unwrap();
            rmp::encode::write_uint(w, 70000).unwrap();
            rmp::encode::write_str(w, "block_size").unwrap();
            rmp::encode::write_uint(w, 2).unwrap();
            rmp::encode::write_str(w, "type").unwrap();
            rmp::encode::write_str(w, "BlockStored").unwrap();
            rmp::encode::write_nil(w).unwrap();
        });
        let b = decode(&p, Mode::Index).unwrap();
        assert_eq!(b.ts.to_bits(), 1.5f64.to_bits());
        assert_eq!(b.dp_rank, None);
        assert_eq!(b.hashes, vec![EngineHash::Unsigned(u64::MAX)]);
        assert_eq!(b.tokens, vec![7, 70000]);
        let Event::Stored(s) = &b.events[0] else { panic!("not a store") };
        assert_eq!(s.block_size, Some(2));
    }

    #[test]
    fn rejects_with_location() {
        let p = enc(|w| {
            rmp::encode::write_array_len(w, 3).unwrap();
            rmp::encode::write_f64(w, 1.5).unwrap();
            rmp::encode::write_array_len(w, 1).unwrap();
            rmp::encode::write_array_len(w, 4).unwrap();
            rmp::encode::write_str(w, "BlockStored").unwrap();
            rmp::encode::write_array_len(w, 0).unwrap();
            rmp::encode::write_nil(w).unwrap();
            rmp::encode::write_uint(w, 5).unwrap();
            rmp::encode::write_nil(w).unwrap();
        });
        let e = decode(&p, Mode::Index).unwrap_err();
        assert!(e.to_string().contains("event 0 field token_ids: expected array of token ids, got int"), "{e}");
    }

    #[test]
    fn buffers_are_reused_between_decodes() {
        let payload = enc(|b| {
            rmp::encode::write_array_len(b, 3).unwrap();
            rmp::encode::write_f64(b, 1.0).unwrap();
            rmp::encode::write_array_len(b, 1).unwrap();
            rmp::encode::write_array_len(b, 5).unwrap();
            rmp::encode::write_str(b, "BlockStored").unwrap();
            rmp::encode::write_array_len(b, 1).unwrap();
            rmp::encode::write_uint(b, 7).unwrap();
            rmp::encode::write_nil(b).unwrap();
            rmp::encode::write_array_len(b, 2).unwrap();
            rmp::encode::write_uint(b, 1).unwrap();
            rmp::encode::write_uint(b, 2).unwrap();
            rmp::encode::write_uint(b, 2).unwrap();
            rmp::encode::write_nil(b).unwrap();
        });
        let mut bufs = Buffers::default();
        let first = decode_with(&payload, Mode::Index, &mut bufs).unwrap();
        assert_eq!(first, decode(&payload, Mode::Index).unwrap());
        let (events, hashes, tokens) =
            (first.events.as_ptr() as usize, first.hashes.as_ptr() as usize, first.tokens.as_ptr());
        bufs.recycle(first);
        let second = decode_with(&payload, Mode::Index, &mut bufs).unwrap();
        // the same allocations, not new ones
        assert_eq!(second.events.as_ptr() as usize, events);
        assert_eq!(second.hashes.as_ptr() as usize, hashes);
        assert_eq!(second.tokens.as_ptr(), tokens);
        assert_eq!(second.tokens, vec![1, 2]);
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // array32 claiming 4 billion events, then nothing
        let p = [0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(decode(&p, Mode::Full).is_err());
    }

    #[test]
    fn deep_nesting_is_rejected_not_overflowing() {
        let mut p = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x91, 0x83];
        // an unknown field nested 100000 deep
        p.extend([0xa4, b't', b'y', b'p', b'e', 0xab]);
        p.extend(b"BlockStored");
        p.extend([0xa1, b'x']);
        p.extend(std::iter::repeat_n(0x91, 100_000));
        p.push(0xc0);
        let e = decode(&p, Mode::Index).unwrap_err();
        assert!(e.to_string().contains("nested deeper"), "{e}");
    }
}
