//! `tai`: the TAI node binary (SPEC §10). `tai serve` runs a node; the other
//! commands are clients of a running node's APIs, configured by the same file.

mod bench;
mod board;
mod client;
mod node;
mod operator;
mod store_check;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tai_core::config::{self, Config};

/// mimalloc returns freed memory to the system far more readily than glibc's
/// malloc (parsing a config of 100k tenants otherwise leaves ~200 MB resident)
/// and is faster on the many small allocations of the signal path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration error (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "tai",
    version,
    about = "TAI node: signals in, decisions and receipts out"
)]
struct Cli {
    /// Log format on stderr (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// The node's config: its addresses, admin token, tenant secrets and
    /// receipt keys (every command reads it; `serve` runs by it).
    #[arg(long, default_value = "config/dev.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node.
    Serve,
    /// Print the live supervision tree of a running node.
    Tree {
        /// Print the JSON of GET /admin/tree instead.
        #[arg(long)]
        json: bool,
    },
    /// Send one signal, signed with the tenant's first secret from the config.
    Send {
        /// Tenant id (default: the config's first tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// SKU id (a `[skus.NAME]` of the config).
        #[arg(long)]
        sku: String,
        /// Signal kind, e.g. `payment`, or `entitlement` with `--payload {"active": true}` (or false) (1-64 characters).
        #[arg(long)]
        kind: String,
        /// The payload, a JSON object.
        #[arg(long)]
        payload: Option<String>,
        /// Idempotency key (default: the node assigns a ULID).
        #[arg(long)]
        id: Option<String>,
        /// Mark the signal critical (a degraded engine still decides it).
        #[arg(long)]
        critical: bool,
    },
    /// Show a signal's status and receipts.
    Status {
        /// The signal id (`X-Signal-Id` of its 202).
        id: String,
        /// The tenant that sent it (default: the config's first tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List every policy engine (tenant × SKU).
    Tenants {
        /// Print the JSON of GET /admin/tenants instead.
        #[arg(long)]
        json: bool,
        /// Only the engines in this state (boot, stable, action_pending,
        /// degraded, halted, quota_exhausted).
        #[arg(long)]
        state: Option<String>,
    },
    /// Halt a tenant's SKU engine (jidoka, manual).
    Halt {
        tenant: String,
        sku: String,
        /// Why (kept in the `jidoka_halt` receipt).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a halted or quota-exhausted engine.
    Resume { tenant: String, sku: String },
    /// Load generator: starts its own node unless --target (see BENCHMARKS.md).
    Bench {
        #[command(flatten)]
        args: bench::BenchArgs,
    },
    /// Move what an amqp work queue holds into this stopped node's data
    /// dir, for a switch to the embedded backend (its queue does not read
    /// the broker's). Refused while any consumer reads the queue.
    DrainAmqp {
        /// The queue (default: the one the data dir last ran on, else
        /// `kanban.amqp_queue`).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Read a stopped node's store record by record, or set a damaged
    /// record aside so that the node starts again.
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// List, export or verify receipts (online, or offline with --data-dir / --file).
    Receipts {
        /// Only this tenant's receipts (an export of one tenant does not
        /// verify on its own: the chain runs through every tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Verify the chain and the signed head (exit 1 naming the first bad seq).
        #[arg(long)]
        verify: bool,
        /// Write JSON lines (receipts, then the signed head) to FILE.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// Read a stopped node's data directory instead of asking the node.
        #[arg(long, value_name = "DIR", conflicts_with = "file")]
        data_dir: Option<PathBuf>,
        /// Verify an exported JSON-lines file.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum StoreAction {
    /// Read every record by its kind; exit 1 naming each that does not
    /// read, with what setting it aside costs.
    Check {
        /// The node's data dir (default: the config's `node.data_dir`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print one JSON object instead.
        #[arg(long)]
        json: bool,
    },
    /// Move damaged records (by their keys as `check` prints them) out of
    /// the node's way; their bytes are kept under `x/`. A record that
    /// reads, and the ledger's signed head, are refused.
    SetAside {
        /// Keys as `check` prints them (`q/1024`, `s/acme\x00pay-1`),
        /// quoted for the shell.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
        /// The node's data dir (default: the config's `node.data_dir`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Write a new signed head (`m/head`) over a ledger whose head does
    /// not read, once every receipt verifies; signed with
    /// `andon.signing_key_id`. The damaged head is kept under `x/m/head`.
    RebuildHead {
        /// The node's data dir (default: the config's `node.data_dir`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print one JSON object instead.
        #[arg(long)]
        json: bool,
    },
}

/// Logs to stderr and, with `otlp` (a collector's base URL, `tai serve`
/// only), spans to OpenTelemetry: OTLP over HTTP (JSON) to `{otlp}/v1/traces`,
/// batched on the SDK's own thread so exporting never blocks the signal
/// path (a full batch queue drops spans, never waits). The provider is
/// returned to be shut down (flushed) at exit.
fn init_logging(
    format: LogFormat,
    otlp: Option<&str>,
    default_filter: &str,
) -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // RUST_LOG filters the log lines only: spans for traces have their own
    // filter, so a quiet log level does not turn tracing off.
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let provider = match otlp {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .with_timeout(std::time::Duration::from_secs(5))
                .build()
                .map_err(|e| format!("kaizen.otlp_endpoint: {e}"))?;
            let batch = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
                .with_batch_config(
                    opentelemetry_sdk::trace::BatchConfigBuilder::default()
                        .with_scheduled_delay(std::time::Duration::from_millis(500))
                        .with_max_queue_size(65_536)
                        .build(),
                )
                .build();
            use opentelemetry_sdk::trace::Sampler;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_span_processor(batch)
                // Ingress samples (at `ratio`) before it makes a span: every
                // span that exists is wanted.
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("tai-node")
                        .build(),
                )
                .build();
            Some(provider)
        }
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        // The signal path's spans (ingress, enqueue, dequeue, policy, action, receipt).
        let spans = tracing_subscriber::filter::Targets::new()
            .with_target("tai_ingress", tracing::Level::INFO)
            .with_target("tai_jidoka", tracing::Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("tai-node"))
            .with_filter(spans)
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    Ok(provider)
}

/// Reads and checks the config file with the process environment applied;
/// on failure prints every problem and returns the exit status.
fn load_config(path: &PathBuf) -> Result<Config, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("config error: cannot read {}: {e}", path.display());
            return Err(ExitCode::from(EX_CONFIG));
        }
    };
    config::load(&text, std::env::vars()).map_err(|errors| {
        eprintln!(
            "config error: {} problem(s) in {}",
            errors.len(),
            path.display()
        );
        for e in &errors {
            eprintln!("  {e}");
        }
        ExitCode::from(EX_CONFIG)
    })
}

/// Gives this thread's freed memory back to the system. Parsing a large
/// config (100k tenants) leaves ~175 MB freed but resident in the main
/// thread's heap: mimalloc purges a heap when its thread allocates again,
/// and this thread is about to block for the life of the node.
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: `mi_collect` has no preconditions: it only releases memory
    // that is already free, and any thread may call it at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(&cli.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    release_free_memory();
    let otlp = match &cli.command {
        Command::Serve => config.kaizen.otlp_endpoint.as_deref(),
        _ => None,
    };
    // lapin logs a channel the broker closed as an error; `drain-amqp`
    // says itself what went wrong (a missing queue closes the channel).
    let default_filter = match &cli.command {
        Command::DrainAmqp { .. } => "info,lapin=off",
        _ => "info",
    };
    let tracer = match init_logging(cli.log_format, otlp, default_filter) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => node::serve(config).await,
            Command::Tree { json } => client::tree(&config, json).await,
            Command::Send {
                tenant,
                sku,
                kind,
                payload,
                id,
                critical,
            } => {
                client::send(
                    &config,
                    client::SendArgs {
                        tenant,
                        sku,
                        kind,
                        payload,
                        id,
                        critical,
                    },
                )
                .await
            }
            Command::Status { id, tenant } => client::status(&config, tenant, &id).await,
            Command::Tenants { json, state } => {
                client::tenants(&config, json, state.as_deref()).await
            }
            Command::Halt {
                tenant,
                sku,
                reason,
            } => client::halt_resume(&config, true, &tenant, &sku, reason).await,
            Command::Resume { tenant, sku } => {
                client::halt_resume(&config, false, &tenant, &sku, None).await
            }
            Command::Bench { args } => bench::run(&config, args).await,
            Command::DrainAmqp { queue } => node::drain_amqp(&config, queue).await,
            Command::Store {
                action: StoreAction::Check { data_dir, json },
            } => store_check::run_check(&config, data_dir, json),
            Command::Store {
                action: StoreAction::SetAside { keys, data_dir },
            } => store_check::run_set_aside(&config, data_dir, &keys),
            Command::Store {
                action: StoreAction::RebuildHead { data_dir, json },
            } => store_check::run_rebuild_head(&config, data_dir, json),
            Command::Receipts {
                tenant,
                verify,
                export,
                data_dir,
                file,
            } => {
                client::receipts(
                    &config,
                    client::ReceiptsArgs {
                        tenant,
                        verify,
                        export,
                        data_dir,
                        file,
                    },
                )
                .await
            }
        }
    });
    drop(runtime);
    if let Some(provider) = tracer {
        // Sends what the batch still holds.
        if let Err(e) = provider.shutdown() {
            eprintln!("tracing: could not flush the last spans: {e}");
        }
    }
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // What reads our output stopped reading (`tai receipts | head`): as
        // for any Unix filter, not a failure worth a message.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "tai failed");
            ExitCode::FAILURE
        }
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
