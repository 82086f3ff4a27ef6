//! Range checks shared by the protocol types. Every value that arrives from the network or a
//! file passes through these before it is stored or forwarded.

use crate::error::{ProtocolError, Result};

/// Longest free-text field (names, labels, attribute values).
pub const MAX_TEXT: usize = 256;
/// Most entries in any map or set of a descriptor.
pub const MAX_ENTRIES: usize = 64;

pub(crate) fn text(field: &'static str, value: &str) -> Result<()> {
    if value.len() > MAX_TEXT {
        return Err(ProtocolError::invalid(
            field,
            format!("{} bytes, at most {MAX_TEXT}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ProtocolError::invalid(field, "contains control characters"));
    }
    Ok(())
}

pub(crate) fn nonempty_text(field: &'static str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(ProtocolError::invalid(field, "empty"));
    }
    text(field, value)
}

pub(crate) fn finite_nonneg(field: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        return Err(ProtocolError::invalid(
            field,
            format!("{value} is not a finite non-negative number"),
        ));
    }
    Ok(())
}

pub(crate) fn in_range(field: &'static str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if !value.is_finite() || value < lo || value > hi {
        return Err(ProtocolError::invalid(
            field,
            format!("{value} is outside [{lo}, {hi}]"),
        ));
    }
    Ok(())
}

pub(crate) fn count(field: &'static str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(ProtocolError::invalid(
            field,
            format!("{len} entries, at most {max}"),
        ));
    }
    Ok(())
}

/// An identifier-like key: lowercase ASCII letters, digits, `_`, `-` and `.`, 1 to 64 bytes.
pub(crate) fn key(field: &'static str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        });
    if !ok {
        return Err(ProtocolError::invalid(
            field,
            format!("{value:?} is not a key of 1-64 characters [a-z0-9_.-]"),
        ));
    }
    Ok(())
}
