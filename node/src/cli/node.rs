//! The node itself: `run`, `id`, `config`, and `peers` from the data directory's store.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use super::table::{or_dash, write_json, yes_no};
use crate::clock;
use crate::config::Config;
use crate::daemon::{IDENTITY_FILE, Node, STORE_DIR, prepare_data_dir};
use crate::identity;
use crate::store::Store;

/// `run`: the node until SIGINT or SIGTERM.
pub(crate) fn run(config: &Config) -> Result<ExitCode> {
    let node = Node::open(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        // Registered before the node starts (and logs that it runs): a signal that arrives
        // at any point after this is a clean shutdown, never the default action.
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            trigger.cancel();
        });
        node.run(shutdown).await.map_err(anyhow::Error::from)
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `id`: the peer id, creating the identity key if there is none.
pub(crate) fn id(config: &Config) -> Result<ExitCode> {
    let dir = config.data_dir()?;
    prepare_data_dir(&dir)?;
    let (key, _) = identity::load_or_create(&dir.join(IDENTITY_FILE))?;
    println!("{}", key.public().to_peer_id());
    Ok(ExitCode::SUCCESS)
}

/// `config`: the effective configuration as TOML.
pub(crate) fn show_config(config: &Config) -> Result<ExitCode> {
    print!("{}", config.to_toml());
    Ok(ExitCode::SUCCESS)
}

/// `peers` without `--node`: the peers in the store, newest heartbeat first, alive by the
/// node's own rule ([`clock::is_alive`]).
pub(crate) fn peers(json: bool, config: &Config) -> Result<ExitCode> {
    let store = Store::open_read_only(config.data_dir()?.join(STORE_DIR))?;
    let timeout = Duration::from_secs(config.network.peer_timeout_s);
    let now = clock::now_ms();
    let mut peers = store.peers()?;
    peers.sort_by_key(|p| std::cmp::Reverse(p.last_seen_ms));
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<serde_json::Value> = peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "peer": p.peer.to_string(),
                    "alive": clock::is_alive(p.last_seen_ms, now, timeout),
                    "last_seen_ms": p.last_seen_ms,
                    "heartbeat": p.heartbeat,
                })
            })
            .collect();
        return write_json(&mut out, &rows);
    }
    writeln!(
        out,
        "{:<54} {:>6} {:>10} {:>8} {:>7} {:>9}",
        "peer", "alive", "last seen", "price/h", "queue", "records"
    )?;
    for p in &peers {
        let age = now.saturating_sub(p.last_seen_ms) / 1000;
        let hb = p.heartbeat.as_ref();
        writeln!(
            out,
            "{:<54} {:>6} {:>9}s {:>8} {:>7} {:>9}",
            p.peer.to_string(),
            yes_no(clock::is_alive(p.last_seen_ms, now, timeout)),
            age,
            or_dash(hb, |h| format!("{:.3}", h.price_per_hour)),
            or_dash(hb, |h| format!("{}/{}", h.queue_depth, h.queue_capacity)),
            or_dash(hb, |h| h.records_seq.to_string()),
        )?;
    }
    if peers.is_empty() {
        writeln!(out, "(no peers heard from yet)")?;
    }
    Ok(ExitCode::SUCCESS)
}
