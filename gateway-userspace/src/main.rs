//! `sockgate`: the node agent (`run`), the offline checker (`check`) and the state
//! reader (`status`).
use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sockgate::{
    desired::DesiredState,
    ebpf::{Datapath, LoadOptions, PinMismatch},
    mapsync,
    metrics::{self, Metrics},
    proxy::{self, DatapathMode, ProxyConfig, stats::Registry},
    routes, status,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "sockgate",
    version,
    about = "Gateway API TCPRoute with an eBPF data path"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Show what is programmed now, from the pinned maps.
    Status {
        /// Directory on bpffs where the maps are pinned.
        #[arg(long, default_value = sockgate::ebpf::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A fixed route: PORT=ADDR:PORT[*WEIGHT][,...] (repeatable). `invalid` stands for
    /// an invalid backendRef (its connections are reset).
    #[arg(long = "route", value_name = "SPEC")]
    routes: Vec<String>,
    /// Which data path carries connections.
    #[arg(long, value_enum, default_value_t = DatapathMode::Auto)]
    datapath: DatapathMode,
    /// Address listeners bind; `::` takes IPv4 and IPv6.
    #[arg(long, default_value = "::")]
    bind: std::net::IpAddr,
    /// Timeout of one backend connect, in seconds.
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
    /// Backends tried per client connection before it is reset.
    #[arg(long, default_value_t = 3)]
    connect_attempts: usize,
    /// Seconds established connections may run after their listener is removed or the
    /// agent is asked to stop.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Bytes the kernel path may queue towards a socket that its TCP has not taken yet;
    /// above it the sender is throttled (see docs/datapath.md, "Kernel memory").
    #[arg(long, default_value_t = gateway_common::PEER_QUEUE_LIMIT,
          value_parser = clap::value_parser!(u32).range(65536..))]
    kernel_queue_limit: u32,
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoint.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: std::net::SocketAddr,
    /// Directory on bpffs where the maps are pinned.
    #[arg(long, default_value = sockgate::ebpf::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Keep the pinned maps when the agent exits.
    #[arg(long)]
    keep_pins: bool,
    /// What to do with a pinned map whose layout differs from this build's.
    #[arg(long, value_enum, default_value_t = PinMismatch::Replace)]
    on_pin_mismatch: PinMismatch,
    /// The kernel BTF the agent requires.
    #[arg(long, default_value = sockgate::ebpf::DEFAULT_KERNEL_BTF, hide = true)]
    kernel_btf: PathBuf,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Status { pin_dir, json } => show_status(&pin_dir, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn show_status(pin_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let s = status::read(pin_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status::render(&s));
    }
    Ok(())
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let desired: DesiredState = routes::parse(&args.routes)?;
    let cfg = ProxyConfig {
        mode: args.datapath,
        connect_timeout: secs(args.connect_timeout, "connect-timeout")?,
        connect_attempts: args.connect_attempts,
        drain_timeout: secs(args.drain_timeout, "drain-timeout")?,
        bind: args.bind,
        kernel_queue_limit: args.kernel_queue_limit,
    };
    let opts = LoadOptions {
        pin_dir: args.pin_dir.clone(),
        keep_pins: args.keep_pins,
        on_mismatch: args.on_pin_mismatch,
        kernel_btf: args.kernel_btf.clone(),
    };
    let dp = Arc::new(Datapath::load(&opts)?);
    raise_fd_limit();
    if desired.listeners.is_empty() {
        info!("no listeners configured (give --route)");
    }
    let metrics = Arc::new(Metrics::new(dp.clone()));
    let started = std::time::Instant::now();
    mapsync::apply(&dp, &desired).context("programming the maps")?;
    metrics.reconciles.inc();
    metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (_tx, rx) = watch::channel(Arc::new(desired));
        let shutdown = CancellationToken::new();
        let counters = Arc::new(Registry::default());
        let _http = metrics::serve(args.metrics_addr, metrics.clone(), shutdown.clone()).await?;
        let serving = tokio::spawn(proxy::serve(
            dp.clone(),
            cfg.clone(),
            rx,
            counters,
            metrics.clone(),
            shutdown.clone(),
        ));
        wait_for_signal().await?;
        info!(
            drain_secs = cfg.drain_timeout.as_secs_f64(),
            "stopping: no new connections; established ones drain"
        );
        shutdown.cancel();
        let _ = serving.await;
        anyhow::Ok(())
    })?;
    drop(rt);
    drop(dp);
    Ok(())
}

/// Two descriptors per proxied connection, plus pipes on the userspace path: raise the
/// soft limit on open files to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}
