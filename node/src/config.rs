//! Node configuration: a TOML file, overridden by environment variables, overridden by flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{NodeError, Result};
use crate::net::NetworkConfig;

/// How log lines are written (to standard error).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// Default filter (`RUST_LOG` syntax) when `RUST_LOG` is not set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Everything a node is configured with. Every field has a default, so an empty file (or no
/// file) is a valid configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Data directory: identity key and store. Defaults to the user's data directory.
    pub data_dir: Option<PathBuf>,
    /// Logging.
    pub log: LogConfig,
    /// Networking.
    pub network: NetworkConfig,
    /// The inference engine.
    pub engine: EngineConfig,
    /// The HTTP API.
    pub api: crate::api::ApiConfig,
    /// Job routing and execution.
    pub jobs: crate::jobs::JobsConfig,
}

/// The inference engine's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// GGUF models to serve and benchmark; empty = the default model in the cache
    /// (`scripts/fetch-model.sh` puts it there).
    pub models: Vec<PathBuf>,
    /// CPU threads of the engine; unset = every logical CPU. Different thread counts are
    /// different hardware in the tensor.
    pub threads: Option<usize>,
    /// KV cache of each served model's engine, MiB: what its running sequences and its
    /// prefix cache share (unset = 1024).
    pub kv_budget_mib: Option<usize>,
    /// Tokens per KV block (unset = 16).
    pub block_size: Option<usize>,
    /// Most sequences one engine runs at once, over all jobs (unset = 32).
    pub max_running: Option<usize>,
    /// Prompt tokens one step prefills for chunked prompts (unset = 64).
    pub chunk_size: Option<usize>,
}

/// Largest KV budget a configuration may ask for (1 TiB).
const MAX_KV_BUDGET_MIB: usize = 1 << 20;

impl EngineConfig {
    /// The host-wide settings of the serving engines; `max_waiting` sequences may wait.
    pub fn sched(&self, max_waiting: usize) -> Result<metainf_profiler::engine::SchedConfig> {
        let d = metainf_profiler::engine::SchedConfig::default();
        let positive = |name: &str, v: Option<usize>, default: usize, max: usize| match v {
            None => Ok(default),
            Some(v) if (1..=max).contains(&v) => Ok(v),
            Some(v) => Err(NodeError::Engine(format!(
                "configuration engine.{name} = {v}: must be between 1 and {max}"
            ))),
        };
        let kv_mib = positive(
            "kv_budget_mib",
            self.kv_budget_mib,
            d.kv_budget_bytes >> 20,
            MAX_KV_BUDGET_MIB,
        )?;
        Ok(metainf_profiler::engine::SchedConfig {
            block_size: positive("block_size", self.block_size, d.block_size, 1024)?,
            kv_budget_bytes: kv_mib << 20,
            max_running: positive("max_running", self.max_running, d.max_running, 4096)?,
            chunk_size: positive("chunk_size", self.chunk_size, d.chunk_size, 1 << 16)?,
            max_waiting: max_waiting.max(1),
        })
    }

    /// The configured models, or the default model's cached path when none is configured:
    /// `$METAINF_MODEL`, else `$METAINF_CACHE/models/…`, else `~/.cache/metainf/models/…`.
    pub fn model_paths(&self) -> Result<Vec<PathBuf>> {
        let paths = if self.models.is_empty() {
            vec![metainf_profiler::model::default_model_path().ok_or(NodeError::NoDataDir)?]
        } else {
            self.models.clone()
        };
        for p in &paths {
            if !p.is_file() {
                return Err(NodeError::Model(format!(
                    "model file {} not found: pass --model PATH, or run scripts/fetch-model.sh \
                     for the default model",
                    p.display()
                )));
            }
        }
        Ok(paths)
    }
}

/// Values given on the command line or in the environment; `None` leaves the file's value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--data-dir` / `METAINF_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--log-format` / `METAINF_LOG_FORMAT`.
    pub log_format: Option<LogFormat>,
    /// `--listen` (replaces the configured list when given).
    pub listen: Vec<libp2p::Multiaddr>,
    /// `--bootstrap` (added to the configured list).
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// `--no-mdns`.
    pub no_mdns: bool,
    /// `--no-nat`.
    pub no_nat: bool,
    /// `--price-per-hour`.
    pub price_per_hour: Option<f64>,
    /// `--model` (replaces the configured list when given).
    pub models: Vec<PathBuf>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--api-listen`.
    pub api_listen: Option<std::net::SocketAddr>,
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::io("cannot read configuration", path, e))?;
        Self::from_toml(&text).map_err(|reason| NodeError::Config {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses TOML text; unknown keys are errors, so typos do not pass silently.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Loads `file` (if any) and applies `overrides` on top.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self> {
        let mut config = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        if let Some(dir) = overrides.data_dir {
            config.data_dir = Some(dir);
        }
        if let Some(format) = overrides.log_format {
            config.log.format = format;
        }
        if !overrides.listen.is_empty() {
            config.network.listen = overrides.listen;
        }
        config.network.bootstrap.extend(overrides.bootstrap);
        if overrides.no_mdns {
            config.network.mdns = false;
        }
        if overrides.no_nat {
            config.network.nat = false;
        }
        if let Some(price) = overrides.price_per_hour {
            config.network.price_per_hour = price;
        }
        if !overrides.models.is_empty() {
            config.engine.models = overrides.models;
        }
        if let Some(threads) = overrides.threads {
            config.engine.threads = Some(threads);
        }
        if let Some(addr) = overrides.api_listen {
            config.api.listen = addr;
        }
        Ok(config)
    }

    /// The data directory: the configured one, or `metainf` under the user's data directory.
    pub fn data_dir(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.data_dir {
            return Ok(dir.clone());
        }
        directories::ProjectDirs::from("", "", "metainf")
            .map(|d| d.data_dir().to_owned())
            .ok_or(NodeError::NoDataDir)
    }

    /// The configuration as TOML, for `metainf-node config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_overrides() {
        let c = Config::from_toml("data_dir = \"/a\"\n[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(c.data_dir.as_deref(), Some(Path::new("/a")));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.filter, "info");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, c.to_toml()).unwrap();
        let merged = Config::load(
            Some(&file),
            Overrides {
                data_dir: Some("/b".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(merged.data_dir.as_deref(), Some(Path::new("/b")));
        assert_eq!(merged.log.format, LogFormat::Json);
    }

    #[test]
    fn the_documented_example_parses() {
        let c = Config::from_toml(include_str!("../../examples/node.toml")).unwrap();
        assert_eq!(c.data_dir.as_deref(), Some(Path::new("/var/lib/metainf")));
        // The example documents the defaults.
        assert_eq!(c.network, crate::net::NetworkConfig::default());
        assert_eq!(c.engine, EngineConfig::default());
        assert_eq!(c.api, crate::api::ApiConfig::default());
        assert_eq!(c.jobs, crate::jobs::JobsConfig::default());
    }

    #[test]
    fn typos_and_missing_files_are_clear_errors() {
        let err = Config::from_toml("data_dri = \"/a\"").unwrap_err();
        assert!(err.contains("data_dri"), "{err}");
        let err = Config::load(
            Some(Path::new("/nonexistent/node.toml")),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/node.toml"));
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }
}
