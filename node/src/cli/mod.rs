//! The `metainf-node` command line: the flags and subcommands ([`Cli`]) and what each
//! subcommand does, one module per concern. The binary only parses, loads the configuration,
//! starts logging and calls [`Cli::dispatch`].
//!
//! Exit status: 0 on success, 1 on an error (printed as `error: …`) or when `tensor import`
//! skipped invalid lines, 2 on a bad configuration or bad flags.

mod args;
mod bench;
mod eval;
mod node;
mod remote;
mod table;
mod tensor;

use std::process::ExitCode;

use anyhow::Result;
use metainf_scheduler::import::ColumnMap;
use metainf_scheduler::{Budget, EvalConfig, FeatureConfig, SelectorKind};

pub use args::Cli;
pub(crate) use args::{Command, TensorCommand};

use crate::client::SubmitOptions;
use crate::config::{Config, Overrides};
use crate::daemon::STORE_DIR;
use crate::evaluation::TensorSource;

impl Cli {
    /// The effective configuration: the file (`--config`), then environment variables and
    /// flags over it.
    pub fn load_config(&self) -> crate::Result<Config> {
        Config::load(
            self.config.as_deref(),
            Overrides {
                data_dir: self.data_dir.clone(),
                log_format: self.log_format,
                listen: self.listen.clone(),
                bootstrap: self.bootstrap.clone(),
                no_mdns: self.no_mdns,
                no_nat: self.no_nat,
                price_per_hour: self.price_per_hour,
                models: self.models.clone(),
                threads: self.threads,
                api_listen: self.api_listen,
            },
        )
    }

    /// Runs the subcommand with `config`; the exit status is the command's.
    pub fn dispatch(self, config: &Config) -> Result<ExitCode> {
        dispatch(self.command, config)
    }
}

fn dispatch(command: Command, config: &Config) -> Result<ExitCode> {
    match command {
        Command::Run => node::run(config),
        Command::Id => node::id(config),
        Command::Config => node::show_config(config),
        Command::Tensor { command } => tensor::command(command, config),
        Command::Peers {
            json,
            node: Some(node),
        } => remote::peers(&node, json),
        Command::Peers { json, node: None } => node::peers(json, config),
        Command::Submit {
            node,
            prompt,
            system,
            file,
            model_name,
            max_tokens,
            temperature,
            budget,
            objective,
            method,
            host,
            stream,
            json,
        } => remote::submit(remote::Submit {
            node,
            prompt,
            file,
            options: SubmitOptions {
                model: model_name,
                system,
                max_tokens,
                temperature,
                budget,
                objective,
                method,
                host,
            },
            stream,
            json,
        }),
        Command::Jobs { node, json } => remote::jobs(&node, json),
        Command::Loadgen { mut load, json } => {
            load.progress = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
            remote::loadgen(load, json)
        }
        Command::Status { node } => remote::status(&node),
        Command::Profile { json } => bench::profile(config.engine.threads, json),
        Command::Generate {
            prompt,
            system,
            max_tokens,
            temperature,
            top_p,
            seed,
        } => bench::generate(
            config,
            &prompt,
            system.as_deref(),
            max_tokens,
            temperature,
            top_p,
            seed,
        ),
        Command::Bench {
            quick: _,
            full,
            natural,
            workloads,
            methods,
            json,
        } => {
            use metainf_profiler::bench::Size;
            let size = if full {
                Size::Full
            } else if natural {
                Size::Natural
            } else {
                Size::Quick
            };
            bench::bench(config, size, workloads, methods, json)
        }
        Command::Eval {
            tensor,
            metric,
            split,
            folds,
            seed,
            encoding,
            style,
            svd_k,
            selectors,
            budget,
            price_per_unit_hour,
            map,
            higher_is_better,
            skip_invalid,
            json,
        } => {
            let source = match tensor {
                Some(file) => TensorSource::File(file),
                None => TensorSource::Store(config.data_dir()?.join(STORE_DIR)),
            };
            let map = map
                .map(|m| ColumnMap::parse(&m, higher_is_better, "csv"))
                .transpose()?;
            let eval = EvalConfig {
                split,
                folds,
                seed,
                features: FeatureConfig {
                    encoding,
                    style,
                    svd_k,
                },
                selectors: if selectors.is_empty() {
                    SelectorKind::ALL.to_vec()
                } else {
                    selectors
                },
                budget: budget.map(|limit| Budget {
                    limit,
                    price_per_unit_hour,
                }),
            };
            eval::eval(
                config,
                &source,
                map.as_ref(),
                metric,
                &eval,
                skip_invalid,
                json,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_defaults_to_greedy_on_the_local_node() {
        let cli = Cli::try_parse_from(["metainf-node", "submit", "--prompt", "hi"]).unwrap();
        let Command::Submit {
            node, temperature, ..
        } = cli.command
        else {
            panic!("not submit");
        };
        assert_eq!(node, "http://127.0.0.1:8080");
        assert_eq!(temperature, 0.0);
    }
}
