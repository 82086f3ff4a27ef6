//! `metainf-node`: parse flags, load configuration, start logging, call the library
//! ([`metainf_node::cli`] holds the subcommands).

use std::process::ExitCode;

use clap::Parser;
use metainf_node::cli::Cli;
use metainf_node::logging;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(&config.log);
    match cli.dispatch(&config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
