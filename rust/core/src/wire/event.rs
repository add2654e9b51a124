//! The batch envelope and its events: array-form and map-form events, their
//! known fields (by the names in [`super::BLOCK_STORED_FIELDS`] and
//! [`super::BLOCK_REMOVED_FIELDS`]), and the fast paths for block hashes and
//! token ids.
//!
//! Errors are made where the problem is found, with the byte offset of the
//! offending value; the event index and field name are added on the way out
//! ([`DecodeError::within_event`], [`DecodeError::within_field`]).

use std::ops::Range;

use rmp::Marker;

use super::cursor::{expected, is_array, is_map, is_str, marker_name, push, reserve, vec_with, Cursor};
use super::{
    Batch, EngineHash, Event, Mode, Removed, Stored, Value, ALL_BLOCKS_CLEARED_FIELDS, BLOCK_REMOVED_FIELDS,
    BLOCK_STORED_FIELDS, EVENT_FIELDS, EVENT_TYPES, GENERIC_FIELDS, TYPE_KEY,
};
use crate::error::DecodeError;

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

/// The envelope's elements, by position, as named in errors.
const ENVELOPE: [&str; 3] = ["ts", "events", "dp_rank"];

/// The fewest bytes a kept event takes on the wire: `["BlockStored"]`.
const MIN_EVENT_BYTES: usize = 13;

/// The field names of the known layouts as `'static` strs, matched on raw
/// bytes (saves the UTF-8 check on the hot path).
fn known_key(raw: &[u8]) -> Option<&'static str> {
    if raw == TYPE_KEY.as_bytes() {
        return Some(TYPE_KEY);
    }
    EVENT_FIELDS.iter().copied().find(|f| f.as_bytes() == raw)
}

fn generic_name(name: &str) -> Option<&'static str> {
    GENERIC_FIELDS.iter().copied().find(|n| *n == name)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stored,
    Removed,
    Cleared,
}

/// In the order of [`EVENT_TYPES`].
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

pub(super) struct Decoder<'a> {
    cur: Cursor<'a>,
    mode: Mode,
    batch: Batch<'a>,
}

impl<'a> Decoder<'a> {
    pub(super) fn new(payload: &'a [u8], mode: Mode, batch: Batch<'a>) -> Self {
        Decoder { cur: Cursor::new(payload), mode, batch }
    }

    /// Decode the whole payload: one batch and nothing after it.
    pub(super) fn run(mut self) -> Result<Batch<'a>, DecodeError> {
        self.envelope()?;
        if self.cur.remaining() != 0 {
            return Err(DecodeError::new(format!("{} trailing bytes after the batch", self.cur.remaining()))
                .at_offset(self.cur.pos));
        }
        Ok(self.batch)
    }

    fn envelope(&mut self) -> Result<(), DecodeError> {
        if self.cur.buf.is_empty() {
            return Err(DecodeError::new("empty payload: expected a msgpack array [ts, events, dp_rank]"));
        }
        let m = self.cur.marker()?;
        let n = match self.cur.len_of(m)? {
            Some(n) if is_array(m) => n,
            _ => {
                let got = marker_name(m);
                return Err(DecodeError::new(format!(
                    "batch must be a msgpack array [ts, events, dp_rank], got {got}"
                ))
                .at_offset(0));
            }
        };
        if n < 2 {
            return Err(
                DecodeError::new(format!("batch array has {n} elements, need at least [ts, events]")).at_offset(0)
            );
        }
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        self.batch.ts = match m {
            Marker::F64 => f64::from_bits(self.cur.be(8, "ts")?),
            Marker::F32 => f64::from(f32::from_bits(self.cur.be(4, "ts")? as u32)),
            _ => match self.cur.int_of(m)? {
                Some(v) => v as f64,
                None => return Err(expected("float (the batch's ts)", m, start).at_field(ENVELOPE[0])),
            },
        };
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        let n_events = match self.cur.len_of(m)? {
            Some(k) if is_array(m) => k,
            _ => return Err(expected("array (the batch's events)", m, start).at_field(ENVELOPE[1])),
        };
        reserve(&mut self.batch.events, self.cur.room::<Event<'_>>(n_events, MIN_EVENT_BYTES))?;
        for i in 0..n_events {
            self.event().map_err(|e| e.within_event(i))?;
        }
        if n >= 3 {
            let start = self.cur.pos;
            let m = self.cur.marker().map_err(|e| e.at_field(ENVELOPE[2]))?;
            self.batch.dp_rank = match m {
                Marker::Null => None,
                _ => match self.cur.int_of(m)? {
                    Some(v) => Some(i64::try_from(v).map_err(|_| {
                        DecodeError::new(format!("batch dp_rank {v} out of range"))
                            .at_field(ENVELOPE[2])
                            .at_offset(start)
                    })?),
                    None => return Err(expected("int or nil (the batch's dp_rank)", m, start).at_field(ENVELOPE[2])),
                },
            };
        }
        for _ in 3..n {
            // A future release's extra envelope element.
            self.cur.skip(0)?;
        }
        Ok(())
    }

    fn event(&mut self) -> Result<(), DecodeError> {
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        let n = self.cur.len_of(m)?;
        match n {
            Some(n) if is_array(m) => self.array_event(n, start),
            Some(n) if is_map(m) => self.map_event(n, start),
            _ => Err(expected("an event (array or map)", m, start)),
        }
    }

    fn tag(&mut self) -> Result<&'a str, DecodeError> {
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        if !is_str(m) {
            return Err(expected("a str type tag", m, start));
        }
        let n = self.cur.len_of(m)?.unwrap_or(0);
        self.cur.utf8(n, start, "type tag")
    }

    /// `[tag, field, field, ...]`, fields in declaration order; shorter or
    /// longer arrays than the newest layout are fine.
    fn array_event(&mut self, n: usize, start: usize) -> Result<(), DecodeError> {
        if n == 0 {
            return Err(DecodeError::new("empty event array (no type tag)").at_offset(start));
        }
        let tag = self.tag().map_err(|e| e.within_field(TYPE_KEY))?;
        let Some(kind) = kind_of(tag) else {
            for _ in 1..n {
                self.cur.skip(0)?;
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
                    self.field(&mut ev, name).map_err(|e| e.within_field(name))?;
                }
                // A newer release's field.
                None => self.cur.skip(0)?,
            }
        }
        self.finish(ev)
    }

    /// `{"type": tag, field: value, ...}` in any key order.
    fn map_event(&mut self, n: usize, at: usize) -> Result<(), DecodeError> {
        let start = self.cur;
        // Find the tag first: msgspec writes it first (then one pass is
        // enough), but key order is not promised.
        let mut tag = None;
        let mut first_was_tag = false;
        for k in 0..n {
            let key = self.key()?;
            if key == TYPE_KEY {
                tag = Some(self.tag().map_err(|e| e.within_field(TYPE_KEY))?);
                first_was_tag = k == 0;
                break;
            }
            self.cur.skip(0).map_err(|e| e.within_field(key))?;
        }
        let Some(tag) = tag else {
            return Err(DecodeError::new(format!("event map has no {TYPE_KEY:?} key")).at_offset(at));
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
            let key = self.key()?;
            match (&mut ev, key) {
                (_, TYPE_KEY) | (None, _) => self.cur.skip(0).map_err(|e| e.within_field(key))?,
                (Some(ev), _) => self.field(ev, key).map_err(|e| e.within_field(key))?,
            }
        }
        match ev {
            Some(ev) => self.finish(ev),
            None => {
                self.batch.unknown_events += 1;
                Ok(())
            }
        }
    }

    fn key(&mut self) -> Result<&'a str, DecodeError> {
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        if !is_str(m) {
            return Err(expected("a str key in the event map", m, start));
        }
        let n = self.cur.len_of(m)?.unwrap_or(0);
        let raw = self.cur.take(n, "map key")?;
        if let Some(known) = known_key(raw) {
            return Ok(known);
        }
        std::str::from_utf8(raw).map_err(|_| DecodeError::new("map key is not UTF-8").at_offset(start))
    }

    /// Decode the value of field `name` into the event being built.
    fn field(&mut self, ev: &mut EventBuilder<'a>, name: &str) -> Result<(), DecodeError> {
        let start = self.cur.pos;
        match (ev.kind, name) {
            (Kind::Stored | Kind::Removed, "block_hashes") => ev.hashes = Some(self.block_hashes()?),
            (Kind::Stored, "parent_block_hash") => ev.parent = self.hash()?,
            (Kind::Stored, "token_ids") => ev.tokens = Some(self.token_ids()?),
            (Kind::Stored, "block_size") => {
                ev.block_size = match self.opt_int()? {
                    None => None,
                    Some(v) => Some(u64::try_from(v).map_err(|_| out_of_range(name, v, start))?),
                }
            }
            (Kind::Stored, "lora_id") => {
                ev.lora_id = match self.opt_int()? {
                    None => None,
                    Some(v) => Some(i64::try_from(v).map_err(|_| out_of_range(name, v, start))?),
                }
            }
            (Kind::Stored | Kind::Removed, "medium") => ev.medium = self.opt_str()?,
            (Kind::Stored, "lora_name") => ev.lora_name = self.opt_str()?,
            (Kind::Stored, "kv_cache_spec_kind") => ev.spec_kind = self.opt_str()?,
            (Kind::Stored, "cache_salt") => {
                ev.cache_salt = self.opt_str()?;
                if self.mode == Mode::Full {
                    push(&mut ev.other, ("cache_salt", ev.cache_salt.map_or(Value::Nil, Value::Str)))?;
                }
            }
            (Kind::Stored | Kind::Removed, "group_idx") => {
                ev.group_idx = match self.opt_int()? {
                    None => None,
                    Some(v) => Some(u32::try_from(v).map_err(|_| out_of_range(name, v, start))?),
                }
            }
            (Kind::Stored, "extra_keys") => {
                ev.extra_keys = self.extra_keys()?;
                ev.extra_keys_at = start;
            }
            (Kind::Stored, "metadata") => {
                // SGLang 0.5.18: {"cache_salt": str} for salted requests.
                let v = self.cur.value(0)?;
                if let Value::Map(pairs) = &v {
                    for (k, val) in pairs {
                        if let (Value::Str("cache_salt"), Value::Str(s)) = (k, val) {
                            ev.cache_salt = Some(s);
                        }
                    }
                }
                if self.mode == Mode::Full {
                    push(&mut ev.other, ("metadata", v))?;
                }
            }
            _ => match (self.mode, generic_name(name)) {
                (Mode::Full, Some(stat)) => {
                    let v = self.cur.value(0)?;
                    push(&mut ev.other, (stat, v))?;
                }
                _ => self.cur.skip(0)?,
            },
        }
        Ok(())
    }

    fn finish(&mut self, ev: EventBuilder<'a>) -> Result<(), DecodeError> {
        let hashes = ev.hashes.unwrap_or(0..0);
        let event = match ev.kind {
            Kind::Cleared => Event::Cleared,
            Kind::Removed => {
                Event::Removed(Removed { hashes, medium: ev.medium, group_idx: ev.group_idx, other: ev.other })
            }
            Kind::Stored => {
                if let Some(keys) = &ev.extra_keys {
                    if keys.len() != hashes.len() && !keys.is_empty() {
                        return Err(DecodeError::new(format!(
                            "{} entries for {} blocks (need one per block)",
                            keys.len(),
                            hashes.len()
                        ))
                        .at_field("extra_keys")
                        .at_offset(ev.extra_keys_at));
                    }
                }
                Event::Stored(Stored {
                    hashes,
                    parent: ev.parent,
                    tokens: ev.tokens.unwrap_or(0..0),
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
        push(&mut self.batch.events, event)
    }

    /// An array of hashes (or nil, no blocks) appended to the batch's hashes.
    #[inline]
    fn block_hashes(&mut self) -> Result<Range<usize>, DecodeError> {
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        let n = match self.cur.len_of(m)? {
            Some(n) if is_array(m) => n,
            _ if m == Marker::Null => 0,
            _ => return Err(expected("array of hashes", m, start)),
        };
        let first = self.batch.hashes.len();
        for _ in 0..n {
            let at = self.cur.pos;
            let h = self.hash()?.ok_or_else(|| DecodeError::new("nil in block_hashes").at_offset(at))?;
            push(&mut self.batch.hashes, h)?;
        }
        Ok(first..self.batch.hashes.len())
    }

    #[inline]
    fn hash(&mut self) -> Result<Option<EngineHash<'a>>, DecodeError> {
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
            _ => Err(expected("int or bin block hash", m, p)),
        }
    }

    /// An array of token ids (or nil, none) appended to the batch's tokens.
    #[inline]
    fn token_ids(&mut self) -> Result<Range<usize>, DecodeError> {
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        let n = match self.cur.len_of(m)? {
            Some(n) if is_array(m) => n,
            _ if m == Marker::Null => 0,
            _ => return Err(expected("array of token ids", m, start)),
        };
        let first = self.batch.tokens.len();
        reserve(&mut self.batch.tokens, self.cur.room::<u32>(n, 1))?;
        // Fast path for the encodings token ids actually use (fixint,
        // uint8/16/32), without a branch on the width: read the 4 bytes
        // after the marker and shift. Locals, not `self`, in the loop so the
        // position stays in a register.
        let (buf, tokens) = (self.cur.buf, &mut self.batch.tokens);
        let mut p = self.cur.pos;
        let mut done = 0;
        // (Within the reserved capacity only: growing is the slow path's,
        // where running out of memory is a DecodeError, not an abort.)
        while done < n && tokens.len() < tokens.capacity() {
            let Some(w) = buf.get(p..p + 5) else { break };
            let width = TOKEN_WIDTH[usize::from(w[0])];
            if width == 0xff {
                break;
            }
            let wide = u64::from(u32::from_be_bytes([w[1], w[2], w[3], w[4]]));
            let v = (wide >> (32 - 8 * u32::from(width))) as u32;
            tokens.push(if width == 0 { u32::from(w[0]) } else { v });
            p += 1 + usize::from(width);
            done += 1;
        }
        self.cur.pos = p;
        // The rest (the payload's last bytes, other integer encodings, or
        // an error naming the token), one checked read at a time.
        for _ in done..n {
            let p = self.cur.pos;
            let m = self.cur.marker()?;
            let v = self.cur.int_of(m)?.ok_or_else(|| expected("int token id", m, p))?;
            let t = u32::try_from(v)
                .map_err(|_| DecodeError::new(format!("token id {v} is not in 0..2^32")).at_offset(p))?;
            push(&mut self.batch.tokens, t)?;
        }
        Ok(first..self.batch.tokens.len())
    }

    /// One entry per block: an array of generic values, or nil.
    fn extra_keys(&mut self) -> Result<Option<ExtraKeys<'a>>, DecodeError> {
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        let n = match self.cur.len_of(m)? {
            Some(n) if is_array(m) => n,
            _ => return Err(expected("array (one entry per block) or nil", m, start)),
        };
        let mut per_block = vec_with(self.cur.room::<Option<Vec<Value<'_>>>>(n, 1))?;
        for _ in 0..n {
            let start = self.cur.pos;
            let m = self.cur.marker()?;
            if m == Marker::Null {
                push(&mut per_block, None)?;
                continue;
            }
            let k = match self.cur.len_of(m)? {
                Some(k) if is_array(m) => k,
                _ => return Err(expected("array of extra keys or nil per block", m, start)),
            };
            let mut keys = vec_with(self.cur.nested_room(k, 1))?;
            for _ in 0..k {
                let key = self.cur.value(1)?;
                push(&mut keys, key)?;
            }
            push(&mut per_block, Some(keys))?;
        }
        Ok(Some(per_block))
    }

    fn opt_int(&mut self) -> Result<Option<i128>, DecodeError> {
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        match self.cur.int_of(m)? {
            Some(v) => Ok(Some(v)),
            None => Err(expected("int or nil", m, start)),
        }
    }

    fn opt_str(&mut self) -> Result<Option<&'a str>, DecodeError> {
        let start = self.cur.pos;
        let m = self.cur.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        if !is_str(m) {
            return Err(expected("str or nil", m, start));
        }
        let n = self.cur.len_of(m)?.unwrap_or(0);
        self.cur.utf8(n, start, "string").map(Some)
    }
}

fn out_of_range(name: &str, v: i128, start: usize) -> DecodeError {
    DecodeError::new(format!("{name} {v} out of range")).at_offset(start)
}

type ExtraKeys<'a> = Vec<Option<Vec<Value<'a>>>>;

struct EventBuilder<'a> {
    kind: Kind,
    hashes: Option<Range<usize>>,
    parent: Option<EngineHash<'a>>,
    tokens: Option<Range<usize>>,
    block_size: Option<u64>,
    lora_id: Option<i64>,
    lora_name: Option<&'a str>,
    medium: Option<&'a str>,
    extra_keys: Option<ExtraKeys<'a>>,
    /// Where `extra_keys` started, for the error when it does not match
    /// the blocks (known only once the whole event has been read).
    extra_keys_at: usize,
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
            extra_keys_at: 0,
            group_idx: None,
            spec_kind: None,
            cache_salt: None,
            other: Vec::new(),
        }
    }
}
