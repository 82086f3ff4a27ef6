//! Shared by the tests that run the `metainf-node` binary.

use std::process::{Command, Output};

/// The binary, with none of the environment variables that would override the test's flags.
pub(crate) fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metainf-node"));
    cmd.env_remove("METAINF_DATA_DIR")
        .env_remove("METAINF_CONFIG")
        .env_remove("METAINF_LOG_FORMAT")
        .env_remove("METAINF_MODELS")
        .env_remove("METAINF_THREADS")
        .env("RUST_LOG", "info");
    cmd
}

/// Runs `cmd` and fails the test, with its standard error, unless it succeeds.
pub(crate) fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
