//! What the commands print: JSON for `--json`, and the small pieces of the tables.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

/// Pretty JSON and a newline on `out`: the `--json` output of the local commands.
pub(crate) fn write_json(out: &mut impl Write, value: &impl Serialize) -> Result<ExitCode> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// [`write_json`] of an answer of a node's API, encoded as the API encodes it
/// ([`crate::api::to_wire`]: keys sorted), so that `--json` prints what the node sent.
pub(crate) fn write_wire_json(out: &mut impl Write, value: &impl Serialize) -> Result<ExitCode> {
    write_json(out, &crate::api::to_wire(value)?)
}

/// `yes` or `no`.
pub(crate) fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// A value, or `-` when there is none.
pub(crate) fn or_dash<T>(value: Option<T>, show: impl FnOnce(T) -> String) -> String {
    value.map_or_else(|| "-".to_owned(), show)
}
