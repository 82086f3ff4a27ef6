//! The command line: global flags, subcommands and their options (clap). Every flag and
//! environment variable here is part of the interface that scripts and tests use.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::LogFormat;

/// A node of the metainf network: profiles its hardware, shares signed performance records
/// with its peers, and routes inference jobs to the fastest host within a budget.
#[derive(Parser, Debug)]
#[command(name = "metainf-node", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file; flags and environment variables override its values.
    #[arg(long, global = true, env = "METAINF_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Data directory holding the identity key and the store
    /// [default: the user's data directory, e.g. ~/.local/share/metainf].
    #[arg(long, global = true, env = "METAINF_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,

    /// Log line format (logs go to standard error; filter with RUST_LOG) [default: text].
    #[arg(long, global = true, env = "METAINF_LOG_FORMAT", value_enum)]
    pub(crate) log_format: Option<LogFormat>,

    /// Listen address (repeatable; replaces the configured ones), e.g. /ip4/0.0.0.0/tcp/4001.
    #[arg(
        long,
        global = true,
        value_name = "MULTIADDR",
        env = "METAINF_LISTEN",
        value_delimiter = ','
    )]
    pub(crate) listen: Vec<libp2p::Multiaddr>,

    /// Peer to dial at start, with its /p2p/<peer id> (repeatable; added to the configured ones).
    #[arg(
        long,
        global = true,
        value_name = "MULTIADDR",
        env = "METAINF_BOOTSTRAP",
        value_delimiter = ','
    )]
    pub(crate) bootstrap: Vec<libp2p::Multiaddr>,

    /// Turn off mDNS discovery on the local network.
    #[arg(long, global = true)]
    pub(crate) no_mdns: bool,

    /// Turn off AutoNAT, relay client and hole punching.
    #[arg(long, global = true)]
    pub(crate) no_nat: bool,

    /// Price per hour of this node's compute, announced to peers.
    #[arg(
        long,
        global = true,
        env = "METAINF_PRICE_PER_HOUR",
        value_name = "PRICE"
    )]
    pub(crate) price_per_hour: Option<f64>,

    /// GGUF model to serve and benchmark (repeatable; replaces the configured list)
    /// [default: the default model in ~/.cache/metainf/models].
    #[arg(
        long = "model",
        global = true,
        env = "METAINF_MODELS",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub(crate) models: Vec<PathBuf>,

    /// CPU threads of the engine and of the hardware measurements [default: every logical CPU].
    #[arg(long, global = true, env = "METAINF_THREADS", value_name = "N")]
    pub(crate) threads: Option<usize>,

    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long, global = true, env = "METAINF_API_LISTEN", value_name = "ADDR")]
    pub(crate) api_listen: Option<std::net::SocketAddr>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
        /// A system message before it (without one, the template's own default, if any).
        #[arg(long)]
        system: Option<String>,
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
        /// A system message before `--prompt`'s (without one, the model template's default).
        #[arg(long, requires = "prompt")]
        system: Option<String>,
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
        /// What to minimise within the budget: runtime, cost, energy or interactive (first token
        /// plus end; the default with --stream).
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
    /// Load-test any OpenAI-compatible endpoint (a metainf node, llama-server, ...) with
    /// streamed chats: output tok/s, TTFT, ITL and end-to-end percentiles.
    Loadgen {
        /// The load test.
        #[command(flatten)]
        load: crate::loadgen::LoadConfig,
        /// Print the report (every request included) as JSON.
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
        /// Features: auto (per entity kind, its numeric facts where they vary, else MetaInf's
        /// learned per-entity effects alone; the choice is printed), numeric, onehot, text (the
        /// paper's LLM embeddings) or numeric+text.
        #[arg(long, default_value = "auto")]
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
        /// Leave out (and report, with their lines) CSV rows that cannot be used instead of
        /// refusing the whole table.
        #[arg(long)]
        skip_invalid: bool,
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
pub(crate) enum TensorCommand {
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
        /// Leave out (and report, with their lines) rows that cannot be used instead of
        /// refusing the whole table; the exit status is then 1 if there were any.
        #[arg(long)]
        skip_invalid: bool,
    },
    /// Count records, origins, hardware, models, workloads, methods and cells.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}
