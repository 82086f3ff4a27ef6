//! Typed reads of GGUF metadata: integers of any width, floats of either width, strings,
//! booleans and arrays, each `None` when the key is missing or holds another kind of value.

use candle_core::quantized::gguf_file::{Content, Value};

/// A GGUF file's metadata.
#[derive(Clone, Copy)]
pub(crate) struct Meta<'a>(pub(crate) &'a Content);

impl<'a> Meta<'a> {
    pub(crate) fn value(&self, key: &str) -> Option<&'a Value> {
        self.0.metadata.get(key)
    }

    /// A non-negative integer stored in any integer type.
    pub(crate) fn uint(&self, key: &str) -> Option<u64> {
        self.value(key).and_then(as_uint)
    }

    pub(crate) fn float(&self, key: &str) -> Option<f32> {
        match self.value(key)? {
            Value::F32(v) => Some(*v),
            Value::F64(v) => Some(*v as f32),
            _ => None,
        }
    }

    pub(crate) fn text(&self, key: &str) -> Option<&'a str> {
        match self.value(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn flag(&self, key: &str) -> Option<bool> {
        match self.value(key)? {
            Value::Bool(b) => Some(*b),
            v => as_uint(v).map(|n| n != 0),
        }
    }

    pub(crate) fn array(&self, key: &str) -> Option<&'a [Value]> {
        match self.value(key)? {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A non-negative integer of any width (`None` for negatives and non-integers).
pub(crate) fn as_uint(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(n) => u64::from(*n),
        Value::U16(n) => u64::from(*n),
        Value::U32(n) => u64::from(*n),
        Value::U64(n) => *n,
        Value::I8(n) => u64::try_from(*n).ok()?,
        Value::I16(n) => u64::try_from(*n).ok()?,
        Value::I32(n) => u64::try_from(*n).ok()?,
        Value::I64(n) => u64::try_from(*n).ok()?,
        _ => return None,
    })
}

/// A float of either width, or an integer as a float.
pub(crate) fn as_float(v: &Value) -> Option<f32> {
    match v {
        Value::F32(f) => Some(*f),
        Value::F64(f) => Some(*f as f32),
        other => as_uint(other).map(|n| n as f32),
    }
}
