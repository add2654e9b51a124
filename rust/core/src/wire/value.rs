//! Generic msgpack values: read one as a borrowed [`Value`] (fields the
//! decoder keeps but does not interpret, such as `extra_keys`), or skip one
//! while checking it is well-formed (unknown fields and events).

use rmp::Marker;

use super::cursor::{expected, push, vec_with, Cursor};
use super::Value;
use crate::error::DecodeError;

/// Generic values nest at most this deep; deeper input is rejected rather
/// than risking the stack.
const MAX_DEPTH: usize = 32;

fn too_deep(start: usize) -> DecodeError {
    DecodeError::new(format!("values nested deeper than {MAX_DEPTH}")).at_offset(start)
}

impl<'a> Cursor<'a> {
    /// Read any value as a [`Value`]; `depth` is how deep it is nested.
    pub(super) fn value(&mut self, depth: usize) -> Result<Value<'a>, DecodeError> {
        let start = self.pos;
        if depth > MAX_DEPTH {
            return Err(too_deep(start));
        }
        let m = self.marker()?;
        if let Some(v) = self.int_of(m)? {
            return Ok(Value::Int(v));
        }
        Ok(match m {
            Marker::Null => Value::Nil,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::F32 => Value::Float(f64::from(f32::from_bits(self.be(4, "float")? as u32))),
            Marker::F64 => Value::Float(f64::from_bits(self.be(8, "float")?)),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = self.len_of(m)?.unwrap_or(0);
                Value::Str(self.utf8(n, start, "str")?)
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = self.len_of(m)?.unwrap_or(0);
                Value::Bin(self.take(n, "bin")?)
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.len_of(m)?.unwrap_or(0);
                let mut items = vec_with(self.nested_room(n, 1))?;
                for _ in 0..n {
                    let v = self.value(depth + 1)?;
                    push(&mut items, v)?;
                }
                Value::Array(items)
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.len_of(m)?.unwrap_or(0);
                let mut items = vec_with(self.nested_room(n, 2))?;
                for _ in 0..n {
                    let k = self.value(depth + 1)?;
                    let v = self.value(depth + 1)?;
                    push(&mut items, (k, v))?;
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
                let ty = self.be(1, "ext type")? as u8 as i8;
                Value::Ext(ty, self.take(n, "ext")?)
            }
            Marker::Ext8 | Marker::Ext16 | Marker::Ext32 => {
                let w = match m {
                    Marker::Ext8 => 1,
                    Marker::Ext16 => 2,
                    _ => 4,
                };
                let n = self.be(w, "ext length")? as usize;
                let ty = self.be(1, "ext type")? as u8 as i8;
                Value::Ext(ty, self.take(n, "ext")?)
            }
            _ => return Err(expected("a msgpack value", m, start)),
        })
    }

    /// Skip one value, checking that it is well-formed, without allocating.
    pub(super) fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        let start = self.pos;
        if depth > MAX_DEPTH {
            return Err(too_deep(start));
        }
        let m = self.marker()?;
        if self.int_of(m)?.is_some() {
            return Ok(());
        }
        match m {
            Marker::Null | Marker::True | Marker::False => {}
            Marker::F32 => {
                self.take(4, "float")?;
            }
            Marker::F64 => {
                self.take(8, "float")?;
            }
            Marker::FixStr(_)
            | Marker::Str8
            | Marker::Str16
            | Marker::Str32
            | Marker::Bin8
            | Marker::Bin16
            | Marker::Bin32 => {
                let n = self.len_of(m)?.unwrap_or(0);
                self.take(n, "str/bin")?;
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.len_of(m)?.unwrap_or(0);
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.len_of(m)?.unwrap_or(0);
                for _ in 0..n {
                    self.skip(depth + 1)?;
                    self.skip(depth + 1)?;
                }
            }
            _ => {
                // ext and the reserved byte: value() knows their layout
                // (ext values borrow, so this does not allocate either).
                self.pos = start;
                self.value(depth)?;
            }
        }
        Ok(())
    }
}
