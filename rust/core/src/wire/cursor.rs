//! Bounds-checked msgpack reading: markers, lengths, integers and raw bytes
//! at a position in the payload, and how much a claimed length may reserve.
//!
//! Every read checks the payload's end; a read that runs past it is a
//! [`DecodeError`] at the byte where the read started. The vectors the
//! decoder fills grow through [`push`] and [`reserve`], so running out of
//! memory is a [`DecodeError`] too, not an abort.

use rmp::Marker;

use crate::error::DecodeError;

/// Generic values in a lying nest would each reserve again, so a generic
/// array or map reserves at most this many elements up front; real ones
/// grow as they are read.
const NESTED_RESERVE: usize = 8;

/// A read position in the payload.
#[derive(Clone, Copy)]
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn eof(&self, what: &str) -> DecodeError {
        DecodeError::new(format!("truncated payload: {what} runs past the end of the {}-byte payload", self.buf.len()))
            .at_offset(self.pos)
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// How many elements of a container that claims `claimed` may be
    /// reserved up front: no more than the rest of the payload can encode
    /// (`min_bytes` each), and no more memory than the rest of the payload
    /// takes. A lying length header then costs at most the payload's size.
    pub(super) fn room<T>(&self, claimed: usize, min_bytes: usize) -> usize {
        let left = self.remaining();
        claimed.min(left / min_bytes).min(left / std::mem::size_of::<T>().max(1))
    }

    /// [`Cursor::room`] for generic values, which nest: see [`NESTED_RESERVE`].
    pub(super) fn nested_room(&self, claimed: usize, min_bytes: usize) -> usize {
        claimed.min(self.remaining() / min_bytes).min(NESTED_RESERVE)
    }

    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| self.eof(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// A big-endian unsigned integer of `n` bytes.
    pub(super) fn be(&mut self, n: usize, what: &str) -> Result<u64, DecodeError> {
        Ok(self.take(n, what)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    pub(super) fn peek_marker(&self) -> Result<Marker, DecodeError> {
        self.buf.get(self.pos).map(|b| Marker::from_u8(*b)).ok_or_else(|| self.eof("a value"))
    }

    pub(super) fn marker(&mut self) -> Result<Marker, DecodeError> {
        let m = self.peek_marker()?;
        self.pos += 1;
        Ok(m)
    }

    /// Length that follows a str/bin/array/map marker, or `None` for other markers.
    pub(super) fn len_of(&mut self, m: Marker) -> Result<Option<usize>, DecodeError> {
        Ok(Some(match m {
            Marker::FixStr(n) | Marker::FixArray(n) | Marker::FixMap(n) => usize::from(n),
            Marker::Str8 | Marker::Bin8 => self.be(1, "length")? as usize,
            Marker::Str16 | Marker::Bin16 | Marker::Array16 | Marker::Map16 => self.be(2, "length")? as usize,
            Marker::Str32 | Marker::Bin32 | Marker::Array32 | Marker::Map32 => self.be(4, "length")? as usize,
            _ => return Ok(None),
        }))
    }

    /// The integer after marker `m`, or `None` when `m` is not an integer marker.
    pub(super) fn int_of(&mut self, m: Marker) -> Result<Option<i128>, DecodeError> {
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

    /// A UTF-8 string of `n` bytes; an error at `start` (the value's marker)
    /// when it is not UTF-8.
    pub(super) fn utf8(&mut self, n: usize, start: usize, what: &str) -> Result<&'a str, DecodeError> {
        let raw = self.take(n, what)?;
        std::str::from_utf8(raw).map_err(|_| DecodeError::new(format!("{what} is not UTF-8")).at_offset(start))
    }
}

/// `v.push(x)`, except that running out of memory is a [`DecodeError`]
/// rather than an abort of the whole process: a payload can legitimately
/// decode to ~25 times its size (a 1-byte hash becomes a 24-byte
/// [`super::EngineHash`]), and one big enough would not fit.
#[inline]
pub(super) fn push<T>(v: &mut Vec<T>, x: T) -> Result<(), DecodeError> {
    if v.len() == v.capacity() {
        grow(v)?;
    }
    v.push(x);
    Ok(())
}

#[cold]
#[inline(never)]
fn grow<T>(v: &mut Vec<T>) -> Result<(), DecodeError> {
    let more = v.len().max(4);
    reserve(v, more)
}

/// `v.reserve(n)`, with running out of memory as a [`DecodeError`].
pub(super) fn reserve<T>(v: &mut Vec<T>, n: usize) -> Result<(), DecodeError> {
    v.try_reserve(n).map_err(|_| {
        DecodeError::new(format!(
            "out of memory: the payload decodes to more than fits ({} more elements of {} bytes after {})",
            n,
            std::mem::size_of::<T>(),
            v.len()
        ))
    })
}

/// `Vec::with_capacity(n)`, with running out of memory as a [`DecodeError`].
pub(super) fn vec_with<T>(n: usize) -> Result<Vec<T>, DecodeError> {
    let mut v = Vec::new();
    reserve(&mut v, n)?;
    Ok(v)
}

/// "expected `want`, got `<type of m>`" at the value that starts at `start`.
pub(super) fn expected(want: &str, got: Marker, start: usize) -> DecodeError {
    DecodeError::new(format!("expected {want}, got {}", marker_name(got))).at_offset(start)
}

pub(super) fn marker_name(m: Marker) -> &'static str {
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

pub(super) fn is_array(m: Marker) -> bool {
    matches!(m, Marker::FixArray(_) | Marker::Array16 | Marker::Array32)
}

pub(super) fn is_map(m: Marker) -> bool {
    matches!(m, Marker::FixMap(_) | Marker::Map16 | Marker::Map32)
}

pub(super) fn is_str(m: Marker) -> bool {
    matches!(m, Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32)
}
