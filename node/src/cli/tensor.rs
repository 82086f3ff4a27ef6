//! The performance tensor of the data directory: `tensor export`, `import`, `import-csv` and
//! `stats`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use metainf_scheduler::import::ColumnMap;

use super::TensorCommand;
use super::table::write_json;
use crate::config::Config;
use crate::daemon::{Node, STORE_DIR};
use crate::evaluation::import_csv;
use crate::store::Store;
use crate::tensor;

/// `tensor export|import|import-csv|stats`.
pub(crate) fn command(command: TensorCommand, config: &Config) -> Result<ExitCode> {
    let store_dir = config.data_dir()?.join(STORE_DIR);
    match command {
        TensorCommand::Export { file } => {
            let store = Store::open_read_only(&store_dir)?;
            let (written, skipped) = if file.as_os_str() == "-" {
                let stdout = std::io::stdout();
                let mut out = BufWriter::new(stdout.lock());
                tensor::export(&store, &mut out)?
            } else {
                let f = File::create(&file)
                    .with_context(|| format!("cannot create {}", file.display()))?;
                let mut out = BufWriter::new(f);
                let counts = tensor::export(&store, &mut out)?;
                out.into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("cannot write {}", file.display()))?;
                counts
            };
            eprintln!("exported {written} records");
            if skipped > 0 {
                eprintln!("skipped {skipped} stored values that do not decode (see the log)");
            }
            Ok(ExitCode::SUCCESS)
        }
        TensorCommand::Import { file } => {
            let store = Store::open(&store_dir)?;
            let report = if file.as_os_str() == "-" {
                let stdin = std::io::stdin();
                tensor::import(&store, &mut stdin.lock())?
            } else {
                let f =
                    File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
                tensor::import(&store, &mut BufReader::new(f))?
            };
            for (line, reason) in &report.invalid {
                eprintln!("{}:{line}: {reason}", file.display());
            }
            eprintln!(
                "imported {} new records ({} already present, {} conflicting, {} invalid lines of {})",
                report.stored,
                report.duplicates,
                report.conflicts,
                report.invalid.len(),
                report.lines
            );
            Ok(if report.invalid.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        TensorCommand::ImportCsv {
            file,
            map,
            higher_is_better,
            label,
            skip_invalid,
        } => {
            let label = label.unwrap_or_else(|| {
                file.file_stem()
                    .map_or_else(|| "csv".to_owned(), |s| s.to_string_lossy().into_owned())
            });
            let map = ColumnMap::parse(&map, higher_is_better, &label)?;
            let node = Node::open(config)?;
            let f = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
            let report = import_csv(&node.signer()?, BufReader::new(f), &map, skip_invalid)?;
            eprintln!(
                "imported {} new records from {} rows ({} already present, {} conflicting, {} unusable rows left out)",
                report.stored,
                report.lines,
                report.duplicates,
                report.conflicts,
                report.invalid.len()
            );
            Ok(if report.invalid.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        TensorCommand::Stats { json } => {
            let store = Store::open_read_only(&store_dir)?;
            let stats = store.stats()?;
            let mut out = std::io::stdout().lock();
            if json {
                write_json(&mut out, &stats)?;
            } else {
                let rows: [(&str, u64); 12] = [
                    ("records", stats.records),
                    ("origins", stats.origins),
                    ("origins with gaps", stats.origins_with_gaps),
                    ("hardware", stats.hardware),
                    ("models", stats.models),
                    ("workloads", stats.workloads),
                    ("methods", stats.methods),
                    ("cells", stats.cells),
                    ("peers", stats.peers),
                    ("jobs", stats.jobs),
                    ("corrupt values", stats.corrupt),
                    ("disk bytes", stats.disk_bytes),
                ];
                writeln!(
                    out,
                    "store {} (schema {})",
                    store_dir.display(),
                    stats.schema_version
                )?;
                for (name, value) in rows {
                    writeln!(out, "  {name:<18} {value:>12}")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
