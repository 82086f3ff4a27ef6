//! Typed reads of GGUF metadata: integers of any width, floats of either width, strings,
//! booleans and arrays, each `None` when the key is missing or holds another kind of value.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{ProfilerError, Result};

/// Opens and reads the GGUF at `path`. A file that is not one, whose header makes the reader
/// panic (candle rounds the data offset up to `general.alignment`, which a hostile file sets
/// to 0), or whose tensors are empty, overflow or reach past the end of the file is refused with
/// an error naming what is wrong, before anything is allocated for the tensors.
pub(crate) fn open(path: &Path) -> Result<(File, Content)> {
    let err = |m: String| ProfilerError::Model(format!("{}: {m}", path.display()));
    let not_gguf =
        |m: String| ProfilerError::Model(format!("{} is not a GGUF model: {m}", path.display()));
    let mut file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| err(format!("cannot read: {e}")))?
        .len();
    let content =
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut file))) {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => return Err(not_gguf(e.to_string())),
            Err(_) => return Err(not_gguf("malformed header".into())),
        };
    for (name, info) in &content.tensor_infos {
        let dtype = info.ggml_dtype;
        let bytes = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(u64::try_from(*d).ok()?))
            // Empty tensors are refused too: candle views their (dangling) bytes as values.
            .filter(|elems| *elems > 0 && elems.is_multiple_of(dtype.block_size() as u64))
            .and_then(|elems| {
                (elems / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64)
            });
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(b)
        });
        if end.is_none_or(|end| end > len) {
            return Err(err(format!(
                "tensor {name} of shape {:?} ({dtype:?}) is empty or does not fit in the file's {len} bytes",
                info.shape.dims()
            )));
        }
    }
    Ok((file, content))
}

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
