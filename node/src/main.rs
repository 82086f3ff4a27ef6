//! `metainf-node`: parse flags, load configuration, start logging, call the library.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use metainf_node::client::{ApiClient, SubmitOptions};
use metainf_node::config::{Config, LogFormat, Overrides};
use metainf_node::daemon::{IDENTITY_FILE, Node, STORE_DIR, prepare_data_dir};
use metainf_node::evaluation::{ModelEmbedder, TensorSource, import_csv, load_records};
use metainf_node::store::Store;
use metainf_node::{identity, logging, tensor};
use metainf_scheduler::import::ColumnMap;
use metainf_scheduler::{
    Budget, EmbeddingCache, EvalConfig, FeatureConfig, SelectorKind, evaluate,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A node of the metainf network: profiles its hardware, shares signed performance records
/// with its peers, and routes inference jobs to the fastest host within a budget.
#[derive(Parser, Debug)]
#[command(name = "metainf-node", version, about, long_about = None)]
struct Cli {
    /// TOML configuration file; flags and environment variables override its values.
    #[arg(long, global = true, env = "METAINF_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Data directory holding the identity key and the store
    /// [default: the user's data directory, e.g. ~/.local/share/metainf].
    #[arg(long, global = true, env = "METAINF_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Log line format (logs go to standard error; filter with RUST_LOG) [default: text].
    #[arg(long, global = true, env = "METAINF_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,

    /// Listen address (repeatable; replaces the configured ones), e.g. /ip4/0.0.0.0/tcp/4001.
    #[arg(
        long,
        global = true,
        value_name = "MULTIADDR",
        env = "METAINF_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<libp2p::Multiaddr>,

    /// Peer to dial at start, with its /p2p/<peer id> (repeatable; added to the configured ones).
    #[arg(
        long,
        global = true,
        value_name = "MULTIADDR",
        env = "METAINF_BOOTSTRAP",
        value_delimiter = ','
    )]
    bootstrap: Vec<libp2p::Multiaddr>,

    /// Turn off mDNS discovery on the local network.
    #[arg(long, global = true)]
    no_mdns: bool,

    /// Turn off AutoNAT, relay client and hole punching.
    #[arg(long, global = true)]
    no_nat: bool,

    /// Price per hour of this node's compute, announced to peers.
    #[arg(
        long,
        global = true,
        env = "METAINF_PRICE_PER_HOUR",
        value_name = "PRICE"
    )]
    price_per_hour: Option<f64>,

    /// GGUF model to serve and benchmark (repeatable; replaces the configured list)
    /// [default: the default model in ~/.cache/metainf/models].
    #[arg(
        long = "model",
        global = true,
        env = "METAINF_MODELS",
        value_name = "PATH",
        value_delimiter = ','
    )]
    models: Vec<PathBuf>,

    /// CPU threads of the engine and of the hardware measurements [default: every logical CPU].
    #[arg(long, global = true, env = "METAINF_THREADS", value_name = "N")]
    threads: Option<usize>,

    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long, global = true, env = "METAINF_API_LISTEN", value_name = "ADDR")]
    api_listen: Option<std::net::SocketAddr>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node until Ctrl-C or SIGTERM.
    Run,
    /// Print the node's peer id (creating the identity key if there is none).
    Id,
    /// Print the effective configuration as TOML.
    Config,
    /// Probe this machine's hardware (the GPU through NVML, else the CPU) and measure it.
    Profile {
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Generate a reply to one prompt on this machine with the first configured model (greedy
    /// unless --temperature is given) and print it with its timings.
    Generate {
        /// The user message (the model's chat template is applied).
        prompt: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus mass for sampling.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Benchmark the engine's acceleration methods on workload presets; every run becomes a
    /// signed performance record in the store (stop the node first: the store is its).
    Bench {
        /// Small workloads, every method and preset in under two minutes (the default).
        #[arg(long, conflicts_with_all = ["full", "natural"])]
        quick: bool,
        /// The sweep that fills the performance tensor: every preset in three variants (quick
        /// shape, twice the requests, the other arrival pattern); ~8 minutes on two cores.
        #[arg(long, conflicts_with = "natural")]
        full: bool,
        /// The presets at their natural sizes (much longer on a CPU).
        #[arg(long)]
        natural: bool,
        /// Workload presets [default: all]: chat, multi-turn, few-shot, summarise, reasoning.
        #[arg(long, value_delimiter = ',', value_name = "PRESET")]
        workloads: Vec<metainf_profiler::workload::Preset>,
        /// Methods [default: the eight]: none, cb, pc, cp or flags joined by '+', e.g. cb+pc.
        #[arg(long, value_delimiter = ',', value_name = "METHOD")]
        methods: Vec<metainf_protocol::MethodConfig>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the peers this node has heard from, with their last heartbeat: from the running
    /// node's API with --node, else from the data directory's store.
    Peers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Ask the node at this URL (e.g. http://127.0.0.1:8080).
        #[arg(long, value_name = "URL")]
        node: Option<String>,
    },
    /// Send a job to a node: one chat prompt (--prompt), or a batch job of the prompts in a
    /// JSONL file (--file: a JSON string, {"prompt": …} or {"messages": […]} per line). The
    /// network routes it to the host and method predicted fastest within the budget.
    Submit {
        /// The node's HTTP API.
        #[arg(
            long,
            env = "METAINF_NODE",
            default_value = "http://127.0.0.1:8080",
            value_name = "URL"
        )]
        node: String,
        /// A user message.
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        prompt: Option<String>,
        /// A JSONL file of prompts, run as one batch job.
        #[arg(long, value_name = "JOBS.jsonl")]
        file: Option<PathBuf>,
        /// Model name [default: the first the node lists].
        #[arg(long = "model-name", value_name = "NAME")]
        model_name: Option<String>,
        /// Most tokens generated per prompt.
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Most the job may cost, in the network's price unit.
        #[arg(long)]
        budget: Option<f64>,
        /// What to minimise within the budget: runtime, cost or energy.
        #[arg(long)]
        objective: Option<String>,
        /// Run with exactly this method (none, cb, pc, cp, cb+pc, ...).
        #[arg(long)]
        method: Option<String>,
        /// Run on exactly this host (peer id).
        #[arg(long)]
        host: Option<String>,
        /// Print tokens as they are generated (--prompt only).
        #[arg(long, conflicts_with = "file")]
        stream: bool,
        /// Print the whole response as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the jobs a node accepted, newest first.
    Jobs {
        /// The node's HTTP API.
        #[arg(
            long,
            env = "METAINF_NODE",
            default_value = "http://127.0.0.1:8080",
            value_name = "URL"
        )]
        node: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A node's state: hardware, models, queue, peers, records, predictor.
    Status {
        /// The node's HTTP API.
        #[arg(
            long,
            env = "METAINF_NODE",
            default_value = "http://127.0.0.1:8080",
            value_name = "URL"
        )]
        node: String,
    },
    /// Evaluate MetaInf's predictor and the paper's baselines on a performance tensor: selection
    /// accuracy, macro F1, acceleration ratio (Table 4), mean rank of the true best (Fig. 3)
    /// and regret, per selector. Reads the data directory's store unless --tensor is given.
    Eval {
        /// A tensor file instead of the store: JSON lines of signed records (`tensor export`),
        /// or a CSV table read through --map.
        #[arg(long, value_name = "FILE")]
        tensor: Option<PathBuf>,
        /// What the tensor holds, lower is better: wall (job wall time, the paper's inference
        /// time), ttft-p50 or itl-p95.
        #[arg(long, default_value = "wall")]
        metric: metainf_scheduler::Metric,
        /// How test cells are held out: random, or whole hardware profiles, models or
        /// workloads (zero-shot).
        #[arg(long, default_value = "random")]
        split: metainf_scheduler::Split,
        /// Number of folds (a grouped split has at most one per group).
        #[arg(long, default_value_t = 5)]
        folds: usize,
        /// Seed of the random split.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Features: numeric, onehot, text (the paper's LLM embeddings) or numeric+text.
        #[arg(long, default_value = "numeric")]
        encoding: metainf_scheduler::Encoding,
        /// Description style for text embeddings: basic, rich or cot.
        #[arg(long, default_value = "rich")]
        style: metainf_scheduler::PromptStyle,
        /// SVD dimensions kept per entity kind for text embeddings.
        #[arg(long, default_value_t = 64)]
        svd_k: usize,
        /// Selectors to compare [default: all], e.g. metainf,global-best,isac.
        #[arg(long, value_delimiter = ',', value_name = "SELECTOR")]
        selectors: Vec<metainf_scheduler::SelectorKind>,
        /// Most a cell's job may cost; adds the share of cells with a feasible choice.
        #[arg(long)]
        budget: Option<f64>,
        /// Price of one compute unit (thread or SM) per hour, for --budget.
        #[arg(long, default_value_t = 1.0)]
        price_per_unit_hour: f64,
        /// Column map of a CSV tensor: hardware=COL,model=COL,method=COL,metric=COL
        /// [,workload=COL;COL].
        #[arg(long, value_name = "SPEC")]
        map: Option<String>,
        /// The CSV metric is higher-is-better (throughput) rather than lower (latency).
        #[arg(long)]
        higher_is_better: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, export and import the performance tensor of the data directory.
    Tensor {
        #[command(subcommand)]
        command: TensorCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TensorCommand {
    /// Write every record as one JSON line (`-` for standard output). Works while the node runs.
    Export {
        /// Output file.
        file: PathBuf,
    },
    /// Verify and store the records of a JSONL file (`-` for standard input). Invalid lines are
    /// reported and skipped; the exit status is 1 if there were any.
    Import {
        /// Input file.
        file: PathBuf,
    },
    /// Sign and store the rows of an external benchmark table (CSV) as records of this node,
    /// through a column mapping. All rows or none: a bad row stops the import.
    ImportCsv {
        /// Input CSV file with a header row.
        file: PathBuf,
        /// hardware=COL,model=COL,method=COL,metric=COL[,workload=COL;COL]; without workload,
        /// every other all-numeric column describes the workload.
        #[arg(long, value_name = "SPEC")]
        map: String,
        /// The metric is higher-is-better (throughput) rather than lower (latency).
        #[arg(long)]
        higher_is_better: bool,
        /// Source label kept in the records [default: the file name].
        #[arg(long)]
        label: Option<String>,
    },
    /// Count records, origins, hardware, models, workloads, methods and cells.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(
        cli.config.as_deref(),
        Overrides {
            data_dir: cli.data_dir.clone(),
            log_format: cli.log_format,
            listen: cli.listen.clone(),
            bootstrap: cli.bootstrap.clone(),
            no_mdns: cli.no_mdns,
            no_nat: cli.no_nat,
            price_per_hour: cli.price_per_hour,
            models: cli.models.clone(),
            threads: cli.threads,
            api_listen: cli.api_listen,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(&config.log);
    match dispatch(cli.command, &config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command, config: &Config) -> Result<ExitCode> {
    match command {
        Command::Run => run(config),
        Command::Id => {
            let dir = config.data_dir()?;
            prepare_data_dir(&dir)?;
            let (key, _) = identity::load_or_create(&dir.join(IDENTITY_FILE))?;
            println!("{}", key.public().to_peer_id());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config => {
            print!("{}", config.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Tensor { command } => tensor_command(command, config),
        Command::Peers {
            json,
            node: Some(node),
        } => client_command(ClientCommand::Peers { node, json }),
        Command::Peers { json, node: None } => peers_command(json, config),
        Command::Submit {
            node,
            prompt,
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
        } => client_command(ClientCommand::Submit {
            node,
            prompt,
            file,
            options: SubmitOptions {
                model: model_name,
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
        Command::Jobs { node, json } => client_command(ClientCommand::Jobs { node, json }),
        Command::Status { node } => client_command(ClientCommand::Status { node }),
        Command::Profile { json } => profile_command(config.engine.threads, json),
        Command::Generate {
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
        } => generate_command(config, &prompt, max_tokens, temperature, top_p, seed),
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
            bench_command(config, size, workloads, methods, json)
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
            eval_command(config, &source, map.as_ref(), metric, &eval, json)
        }
    }
}

fn eval_command(
    config: &Config,
    source: &TensorSource,
    map: Option<&ColumnMap>,
    metric: metainf_scheduler::Metric,
    eval: &EvalConfig,
    json: bool,
) -> Result<ExitCode> {
    let records = load_records(source, map)?;
    let tensor = metainf_scheduler::Tensor::from_records_with(&records, metric)?;
    eprintln!(
        "tensor of {metric:?}: {} records, {} cells ({} hardware, {} models, {} workloads, {} methods)",
        records.len(),
        tensor.cells.len(),
        tensor.hardware.len(),
        tensor.models.len(),
        tensor.workloads.len(),
        tensor.methods.len()
    );
    let cache = if eval.features.encoding.needs_text() {
        let path = config
            .engine
            .model_paths()?
            .into_iter()
            .next()
            .context("text features need a model (--model)")?;
        let embedder = ModelEmbedder::load(&path, config.engine.threads)?;
        Some(EmbeddingCache::with_file(
            Box::new(embedder),
            &config.data_dir()?.join("embeddings.json"),
        ))
    } else {
        None
    };
    let report = evaluate(&tensor, eval, cache.as_ref())?;
    if let Some(c) = &cache {
        c.save()?;
    }
    let mut out = std::io::stdout().lock();
    if json {
        return write_json(&mut out, &report);
    }
    writeln!(
        out,
        "split {:?}, {} folds, {} test cells, {} methods ({} distinct best), features {:?}/{:?}/k={}",
        report.split,
        report.folds,
        report.cells,
        report.methods,
        report.distinct_best,
        report.features.encoding,
        report.features.style,
        report.features.svd_k
    )?;
    let budget = eval.budget.is_some();
    write!(
        out,
        "{:<14} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "selector", "accuracy", "macro-F1", "accel", "mean rank", "regret", "≤5% off"
    )?;
    if budget {
        write!(out, " {:>9}", "feasible")?;
    }
    writeln!(out, " {:>8}", "fit s")?;
    for r in &report.rows {
        write!(
            out,
            "{:<14} {:>8.3} {:>8.3} {:>8.3} {:>9.2} {:>8.3} {:>8.3}",
            r.selector, r.accuracy, r.macro_f1, r.acceleration, r.mean_rank, r.regret, r.near_best
        )?;
        if let Some(f) = r.feasible {
            write!(out, " {f:>9.3}")?;
        }
        write!(out, " {:>8.2}", r.seconds)?;
        match &r.error {
            Some(e) => writeln!(out, "  (failed in some folds: {e})")?,
            None => writeln!(out)?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(config: &Config) -> Result<ExitCode> {
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

fn tensor_command(command: TensorCommand, config: &Config) -> Result<ExitCode> {
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
        } => {
            let label = label.unwrap_or_else(|| {
                file.file_stem()
                    .map_or_else(|| "csv".to_owned(), |s| s.to_string_lossy().into_owned())
            });
            let map = ColumnMap::parse(&map, higher_is_better, &label)?;
            let node = Node::open(config)?;
            let f = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
            let report = import_csv(&node, BufReader::new(f), &map)?;
            eprintln!(
                "imported {} new records from {} rows ({} already present, {} conflicting)",
                report.stored, report.lines, report.duplicates, report.conflicts
            );
            Ok(ExitCode::SUCCESS)
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

fn peers_command(json: bool, config: &Config) -> Result<ExitCode> {
    let store = Store::open_read_only(config.data_dir()?.join(STORE_DIR))?;
    let timeout_ms = config.network.peer_timeout_s.saturating_mul(1000);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut peers = store.peers()?;
    peers.sort_by_key(|p| std::cmp::Reverse(p.last_seen_ms));
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<serde_json::Value> = peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "peer": p.peer.to_string(),
                    "alive": now.saturating_sub(p.last_seen_ms) <= timeout_ms,
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
        let alive = if now.saturating_sub(p.last_seen_ms) <= timeout_ms {
            "yes"
        } else {
            "no"
        };
        let (price, queue, seq) =
            p.heartbeat
                .as_ref()
                .map_or(("-".to_owned(), "-".to_owned(), "-".to_owned()), |h| {
                    (
                        format!("{:.3}", h.price_per_hour),
                        format!("{}/{}", h.queue_depth, h.queue_capacity),
                        h.records_seq.to_string(),
                    )
                });
        writeln!(
            out,
            "{:<54} {:>6} {:>9}s {:>8} {:>7} {:>9}",
            p.peer.to_string(),
            alive,
            age,
            price,
            queue,
            seq
        )?;
    }
    if peers.is_empty() {
        writeln!(out, "(no peers heard from yet)")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn profile_command(threads: Option<usize>, json: bool) -> Result<ExitCode> {
    let profile = metainf_profiler::probe(&metainf_profiler::ProbeOptions {
        threads,
        ..Default::default()
    })?;
    let id = profile.id()?;
    let mut out = std::io::stdout().lock();
    if json {
        let value = serde_json::json!({ "hardware_id": id.to_string(), "profile": profile });
        return write_json(&mut out, &value);
    }
    let spec = &profile.spec;
    writeln!(out, "hardware {} ({})", id.short(), spec.backend)?;
    writeln!(out, "  device          {}", spec.name)?;
    writeln!(
        out,
        "  memory          {:.1} GiB",
        spec.memory_bytes as f64 / f64::from(1u32 << 30)
    )?;
    writeln!(out, "  compute units   {}", spec.compute_units)?;
    if let Some(cpu) = &spec.cpu {
        writeln!(
            out,
            "  cores           {} physical, {} logical",
            cpu.physical_cores, cpu.logical_cpus
        )?;
        writeln!(out, "  simd            {}", cpu.simd.join(" "))?;
    }
    if let Some(gpu) = &spec.gpu {
        writeln!(
            out,
            "  compute cap.    {}.{}",
            gpu.compute_major, gpu.compute_minor
        )?;
        writeln!(
            out,
            "  clocks          {} MHz SM, {} MHz memory",
            gpu.max_sm_clock_mhz, gpu.max_mem_clock_mhz
        )?;
        writeln!(out, "  power limit     {:.0} W", gpu.power_limit_w)?;
        writeln!(
            out,
            "  PCIe            gen {} x{}",
            gpu.pcie_gen, gpu.pcie_width
        )?;
    }
    if let Some(m) = &profile.measured {
        writeln!(out, "  Q8_0 matmul     {:.1} GFLOP/s", m.matmul_gflops)?;
        writeln!(out, "  memory b/w      {:.1} GB/s", m.mem_bandwidth_gbs)?;
    }
    if let Some(d) = &profile.driver {
        writeln!(out, "  driver/kernel   {d}")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_command(
    config: &Config,
    size: metainf_profiler::bench::Size,
    workloads: Vec<metainf_profiler::workload::Preset>,
    methods: Vec<metainf_protocol::MethodConfig>,
    json: bool,
) -> Result<ExitCode> {
    use metainf_node::bench::{BenchEvent, bench};
    use metainf_profiler::bench::Plan;
    use metainf_profiler::engine::MethodSettings;

    let mut plan = Plan::standard(size);
    if !workloads.is_empty() {
        plan.workloads = workloads;
    }
    if !methods.is_empty() {
        plan.methods = methods
            .iter()
            .map(MethodSettings::from_method)
            .collect::<Result<_, _>>()?;
    }
    let node = Node::open(config)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} requests, {elapsed}",
        )
        .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?
        .progress_chars("=> "),
    );
    let runs = plan.runs();
    let mut finished_runs = 0;
    let stored = bench(&node, &config.engine, &plan, &mut |event| match event {
        BenchEvent::Hardware(h) => {
            bar.println(format!(
                "hardware: {} ({} compute units)",
                h.spec.name, h.spec.compute_units
            ));
        }
        BenchEvent::Model { model, requests } => {
            bar.println(format!(
                "model: {} ({}, {:.0}M parameters)",
                model.name,
                model.quantization,
                model.parameters as f64 / 1e6
            ));
            bar.set_length(requests as u64);
            bar.set_position(0);
        }
        BenchEvent::Progress(n) => bar.set_position(n as u64),
        BenchEvent::Run(run, _) => {
            finished_runs += 1;
            bar.set_message(format!(
                "run {finished_runs}/{runs}: {} {}",
                run.preset,
                run.method.short_name()
            ));
        }
    })?;
    bar.finish_and_clear();
    node.store().flush()?;
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<_> = stored
            .iter()
            .map(|s| {
                serde_json::json!({
                    "model": s.model.name,
                    "workload": s.run.preset.name(),
                    "method": s.run.method.short_name(),
                    "record_id": s.record.to_string(),
                    "prefix_cache_hits": s.run.prefix_hits,
                    "metrics": s.run.metrics,
                })
            })
            .collect();
        return write_json(&mut out, &rows);
    }
    writeln!(
        out,
        "{:<11} {:<9} {:>8} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8}",
        "workload",
        "method",
        "tok/s",
        "TTFT p50",
        "TTFT p95",
        "ITL p50",
        "ITL p95",
        "wall s",
        "KV MiB"
    )?;
    for s in &stored {
        let m = &s.run.metrics;
        writeln!(
            out,
            "{:<11} {:<9} {:>8.1} {:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>7.2} {:>8.1}",
            s.run.preset.name(),
            s.run.method.short_name(),
            m.throughput_tok_s,
            m.ttft_ms.p50,
            m.ttft_ms.p95,
            m.itl_ms.p50,
            m.itl_ms.p95,
            m.wall_time_s,
            m.peak_kv_bytes as f64 / f64::from(1u32 << 20)
        )?;
    }
    writeln!(
        out,
        "{} signed records stored in {}",
        stored.len(),
        node.store().path().display()
    )?;
    Ok(ExitCode::SUCCESS)
}

fn generate_command(
    config: &Config,
    prompt: &str,
    max_tokens: u32,
    temperature: f32,
    top_p: f32,
    seed: u64,
) -> Result<ExitCode> {
    use metainf_profiler::engine::{Engine, EngineOptions, MethodSettings, Request, Sampling};
    let paths = config.engine.model_paths()?;
    let path = paths.first().context("no model configured")?;
    let started = std::time::Instant::now();
    let engine = Engine::load(
        path,
        EngineOptions {
            threads: config.engine.threads,
        },
    )?;
    let load_s = started.elapsed().as_secs_f64();
    let tok = engine.model().tokenizer();
    let text = metainf_profiler::tokenizer::chat_template(&[metainf_protocol::ChatMessage {
        role: "user".into(),
        content: prompt.into(),
    }]);
    let request = Request {
        prompt: tok.encode(&text)?,
        max_tokens,
        stop: tok.stop_ids().to_vec(),
        sampling: Sampling {
            temperature,
            top_p,
            seed,
        },
        arrival_s: 0.0,
    };
    let report = engine.run(std::slice::from_ref(&request), &MethodSettings::default())?;
    let c = report.completions.first().context("no completion")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", tok.decode(&c.tokens)?)?;
    let decode_s = c
        .token_times_s
        .last()
        .zip(c.token_times_s.first())
        .map_or(0.0, |(l, f)| l - f);
    eprintln!(
        "{} prompt + {} generated tokens; load {:.2} s, first token {:.0} ms, decode {:.1} tokens/s on {} threads",
        request.prompt.len(),
        c.tokens.len(),
        load_s,
        c.ttft_s().unwrap_or(0.0) * 1000.0,
        if decode_s > 0.0 {
            (c.tokens.len() - 1) as f64 / decode_s
        } else {
            0.0
        },
        engine.threads()
    );
    Ok(ExitCode::SUCCESS)
}

/// Pretty JSON and a newline on `out`: the `--json` output of every command.
enum ClientCommand {
    Peers {
        node: String,
        json: bool,
    },
    Submit {
        node: String,
        prompt: Option<String>,
        file: Option<PathBuf>,
        options: SubmitOptions,
        stream: bool,
        json: bool,
    },
    Jobs {
        node: String,
        json: bool,
    },
    Status {
        node: String,
    },
}

fn client_command(command: ClientCommand) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut out = std::io::stdout().lock();
        match command {
            ClientCommand::Peers { node, json } => {
                let v = ApiClient::new(&node)?.get("/v1/peers").await?;
                if json {
                    return write_json(&mut out, &v["peers"]);
                }
                writeln!(
                    out,
                    "{:<54} {:>6} {:>8} {:>7} {:>8}  models",
                    "peer", "alive", "price/h", "queue", "threads"
                )?;
                for p in v["peers"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "{:<54} {:>6} {:>8} {:>7} {:>8}  {}",
                        p["peer"].as_str().unwrap_or("?"),
                        if p["alive"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        },
                        p["price_per_hour"]
                            .as_f64()
                            .map_or("-".into(), |x| format!("{x:.3}")),
                        match (p["queue_depth"].as_u64(), p["queue_capacity"].as_u64()) {
                            (Some(d), Some(c)) => format!("{d}/{c}"),
                            _ => "-".into(),
                        },
                        p["hardware"]["compute_units"]
                            .as_u64()
                            .map_or("-".into(), |n| n.to_string()),
                        p["models"].as_array().map_or(String::new(), |m| m
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")),
                    )?;
                }
                Ok(ExitCode::SUCCESS)
            }
            ClientCommand::Submit {
                node,
                prompt,
                file,
                options,
                stream,
                json,
            } => {
                let client = ApiClient::new(&node)?;
                if let Some(file) = file {
                    let job = client.batch(&file, &options).await?;
                    if json {
                        return write_json(&mut out, &job);
                    }
                    for (i, r) in job["results"].as_array().into_iter().flatten().enumerate() {
                        writeln!(out, "[{i}] {}", r["text"].as_str().unwrap_or(""))?;
                    }
                    eprintln!(
                        "ran on {} with {} in {:.2} s",
                        job["host"].as_str().unwrap_or("?"),
                        job["method"].as_str().unwrap_or("?"),
                        job["metrics"]["wall_time_s"].as_f64().unwrap_or(f64::NAN)
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                let prompt = prompt.unwrap_or_default();
                let metainf = client.chat(&prompt, &options, stream, &mut out).await?;
                if json {
                    return write_json(&mut out, &metainf);
                }
                eprintln!(
                    "ran on {} with {}: predicted {:.2} s, measured {:.2} s, cost {:.6}",
                    metainf["host"].as_str().unwrap_or("?"),
                    metainf["method"].as_str().unwrap_or("?"),
                    metainf["predicted_runtime_s"].as_f64().unwrap_or(f64::NAN),
                    metainf["measured_runtime_s"].as_f64().unwrap_or(f64::NAN),
                    metainf["cost"].as_f64().unwrap_or(f64::NAN),
                );
                Ok(ExitCode::SUCCESS)
            }
            ClientCommand::Jobs { node, json } => {
                let v = ApiClient::new(&node)?.get("/v1/jobs").await?;
                if json {
                    return write_json(&mut out, &v["data"]);
                }
                writeln!(
                    out,
                    "{:<32} {:>8} {:>7} {:<10} {:>9}  host",
                    "job", "status", "prompts", "method", "runtime"
                )?;
                for j in v["data"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "{:<32} {:>8} {:>7} {:<10} {:>9}  {}",
                        j["id"].as_str().unwrap_or("?"),
                        j["status"].as_str().unwrap_or("?"),
                        j["prompts"],
                        j["method"].as_str().unwrap_or("-"),
                        j["metrics"]["wall_time_s"]
                            .as_f64()
                            .map_or("-".into(), |t| format!("{t:.2}s")),
                        j["host"].as_str().unwrap_or("-"),
                    )?;
                }
                Ok(ExitCode::SUCCESS)
            }
            ClientCommand::Status { node } => {
                let v = ApiClient::new(&node)?.get("/v1/status").await?;
                write_json(&mut out, &v)
            }
        }
    })
}

fn write_json(out: &mut impl Write, value: &impl serde::Serialize) -> Result<ExitCode> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}
