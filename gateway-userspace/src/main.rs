//! `sockgate`: the node agent (`run`), the offline checker (`check`) and the state
//! reader (`status`).
use std::{collections::BTreeSet, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sockgate::{
    attach::{self, Manager, Netlink, Selection},
    backend_filter::{BackendFilter, RefusalLog},
    check,
    cluster::{self, source::KubeOptions},
    desired::DesiredState,
    ebpf::{Capacity, Datapath, ForwardLoad, LoadOptions, PinMismatch},
    forward::{self, ForwardOptions, Timeouts},
    mapsync,
    metrics::{self, Metrics},
    model::limits::{self, LeftOut, Limits},
    proxy::{self, DatapathMode, ProxyConfig, stats::Registry},
    routes,
    source::{
        self,
        files::{FileSource, follow},
    },
    status,
    xdp::{AttachMode, Cidr},
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
    /// List the live connections: the socket paths' from the agent, the forward path's
    /// from the pinned connection table (also when the agent is not running).
    Connections(ConnectionsArgs),
    /// Offline: print the status sockgate would write for the manifests in a directory
    /// (or file), then the listener/backend table. No privileges needed.
    Check(CheckArgs),
    /// Print the `CustomResourceDefinition` of `ListenerPolicy` (sockgate.dev), the XDP
    /// listener guard's policy attachment, as YAML.
    Crd,
}

#[derive(clap::Args)]
struct ConnectionsArgs {
    /// The agent's metrics endpoint, which serves `/connections`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    agent: std::net::SocketAddr,
    /// Directory on bpffs where the maps are pinned.
    #[arg(long, default_value = sockgate::ebpf::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// JSON for scripts (an array).
    #[arg(long)]
    json: bool,
    /// Only this listener port.
    #[arg(long)]
    listener: Option<u16>,
    /// Only clients in this range (`ADDR/PREFIX` or an address).
    #[arg(long, value_name = "CIDR")]
    client: Option<Cidr>,
    /// Only this backend: `IP`, `IP:PORT` or a backendRef `namespace/service[:port]`.
    #[arg(long)]
    backend: Option<String>,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Directory of Kubernetes YAML (`*.yaml`, `*.yml`), or one file.
    #[arg(short = 'f', long = "filename", value_name = "DIR")]
    dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = check::Format::Yaml)]
    output: check::Format,
    /// The `controllerName` of the `GatewayClass` objects sockgate implements.
    #[arg(long, default_value = sockgate::model::conditions::DEFAULT_CONTROLLER_NAME)]
    controller_name: String,
    /// Allow backend endpoints in this range although it is refused by default
    /// (loopback, link-local, unspecified, multicast), e.g. 127.0.0.0/8 (repeatable).
    #[arg(long = "allow-backend-cidr", value_name = "CIDR")]
    allow_backend_cidrs: Vec<Cidr>,
    /// An address of the node the check stands for (repeatable): a Gateway with
    /// `spec.addresses` is served where one of them is the node's. Without it, the node
    /// has none, and such Gateways are reported `AddressNotAssigned`.
    #[arg(long = "node-address", value_name = "IP")]
    node_addresses: Vec<std::net::IpAddr>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// The data path's capacities (the maps are sized from them at load time; the model
/// leaves out what does not fit and says so).
#[derive(clap::Args)]
struct LimitArgs {
    /// Listeners programmed at most: entries of `GW_LISTENERS` and the other maps keyed
    /// by listener port (`GW_STATS` has two per listener). Listeners beyond it are not
    /// served and their status says so.
    #[arg(long, default_value_t = gateway_common::MAX_LISTENERS,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    max_listeners: u32,
    /// Backend entries of all listeners together at most (`GW_BACKENDS`). A listener
    /// whose entries do not fit in what is left is not served.
    #[arg(long, default_value_t = gateway_common::MAX_BACKENDS,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_backends: u32,
    /// Backend entries of one listener at most, 16-256; each backendRef keeps its
    /// share of them (the first endpoints in address order) and the route's
    /// `ResolvedRefs` names the endpoints left out.
    #[arg(long, default_value_t = gateway_common::MAX_BACKENDS_PER_LISTENER,
          value_parser = clap::value_parser!(u32).range(16..=256))]
    max_backends_per_listener: u32,
    /// The listener ports this node allows, MIN-MAX (default all): a Gateway listener
    /// on another port is not accepted (`PortUnavailable` in its status), a `--route`
    /// on another port is left out; both are logged and counted.
    #[arg(long, value_name = "MIN-MAX", default_value = "1-65535")]
    listener_ports: limits::ListenerPorts,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            listeners: self.max_listeners,
            backends: self.max_backends,
            backends_per_listener: self.max_backends_per_listener,
            listener_ports: self.listener_ports,
        }
    }
}

/// Where the desired state comes from.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    /// Gateway API manifests in `--dir`, re-read on change.
    Files,
    /// The `--route` table.
    Routes,
    /// The Kubernetes API (in-cluster service account or `KUBECONFIG`): reflectors,
    /// status writes by the elected agent. The default inside a cluster.
    Kube,
}

#[derive(clap::Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each bool is one command-line switch"
)]
struct RunArgs {
    /// A fixed route: PORT=ADDR:PORT[*WEIGHT][,...] (repeatable). `invalid` stands for
    /// an invalid backendRef (its connections are reset).
    #[arg(long = "route", value_name = "SPEC")]
    routes: Vec<String>,
    /// Allow backend endpoints in this range although it is refused by default
    /// (loopback, link-local, unspecified, multicast), e.g. 127.0.0.0/8 (repeatable).
    #[arg(long = "allow-backend-cidr", value_name = "CIDR")]
    allow_backend_cidrs: Vec<Cidr>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Where the desired state comes from; default `files` when `--dir` is given, else
    /// the `--route` table.
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// Directory of Gateway API manifests (`--source files`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The `controllerName` of the `GatewayClass` objects sockgate implements.
    #[arg(long, default_value = sockgate::model::conditions::DEFAULT_CONTROLLER_NAME)]
    controller_name: String,
    /// This node's name (`--source kube`): the agent's identity in the status writer
    /// election.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// The agent's namespace (`--source kube`), where the election Lease lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sockgate-system")]
    namespace: String,
    /// Name of the election Lease (`--source kube`).
    #[arg(long, default_value = "sockgate-status-writer")]
    lease_name: String,
    /// Seconds a status writer keeps the Lease without renewing it (`--source kube`).
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Labels of the nodes that run an agent, `KEY=VALUE[,...]` (`--source kube`): a
    /// Gateway without `spec.addresses` reports their `InternalIP`s; a Gateway whose
    /// `spec.addresses` hold one of their `InternalIP` / `ExternalIP` is reported served.
    #[arg(long, default_value = "")]
    node_selector: String,
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
    /// Socket paths: seconds a backend may acknowledge nothing before its connection is
    /// ended and the client reset (`TCP_USER_TIMEOUT` on the backend socket, with
    /// keepalive probes after as many seconds of silence, so an idle connection to a
    /// backend that vanished ends too). 0 leaves the kernel defaults (about 15 minutes
    /// of retransmissions, no keepalive).
    #[arg(long, default_value_t = 30.0)]
    backend_timeout: f64,
    /// Bytes the kernel path may queue towards a socket that its TCP has not taken yet;
    /// above it the sender is throttled (see docs/datapath.md, "Kernel memory").
    #[arg(long, default_value_t = gateway_common::PEER_QUEUE_LIMIT,
          value_parser = clap::value_parser!(u32).range(65536..))]
    kernel_queue_limit: u32,
    /// `--datapath sockmap` only: node-local clients (sockets of the agent's network
    /// namespace connecting to a listener at an address of the node) send straight
    /// into the backend socket (`sock_ops` on the cgroup v2 root, `sk_msg` on a
    /// sockhash of their own). Off by default: such a client's blocking reads can
    /// return EAGAIN early (docs/datapath.md, "Node-local shortcut").
    #[arg(long)]
    local_shortcut: bool,
    /// Kernel path: when the verdict throttles a sender, also stop it with TCP flow
    /// control (window clamp and receive buffer at their minimum until the queue
    /// drained), so that under a slow receiver a few percent of the bytes cross
    /// userspace instead of most; it holds one fast stream to a sixth of its
    /// throughput here (docs/performance.md, "Memory bound without parking").
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    kernel_brake: bool,
    /// Socket paths: send and receive buffer size of both sockets of a connection, in
    /// bytes (suffix `K` or `M` for KiB or MiB); `kernel` for the kernel's defaults
    /// (`net.ipv4.tcp_wmem`/`tcp_rmem`, autotuned); `auto` for what measured best on
    /// each data path, today the kernel's on both (docs/performance.md, "Socket
    /// buffers").
    #[arg(long, default_value = "auto", value_parser = parse_socket_buffer)]
    socket_buffer: SocketBuffer,
    /// Socket paths, with `--socket-buffer BYTES`: let TCP's autotuning change the
    /// buffers from that size on (true), or keep them at it (false, what `SO_SNDBUF`
    /// and `SO_RCVBUF` do).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    socket_buffer_autotune: bool,
    /// Threads of the agent's async runtime, which carries the socket paths' accept,
    /// connect and splice work; default: one per CPU (or `TOKIO_WORKER_THREADS`).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
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
    /// Attach the XDP listener guard to this interface (repeatable); `none`: no guard.
    /// Default: under `--source kube` the interfaces holding this node's `InternalIP` and
    /// `ExternalIP` addresses, otherwise none. Interfaces that come and go are followed.
    #[arg(long = "xdp-iface", value_name = "IFACE")]
    xdp_ifaces: Vec<String>,
    /// How the XDP guard is attached: auto (generic on veth, else native with a
    /// fallback to generic), generic (every interface), or native (in the driver; an
    /// error where the driver refuses it).
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    xdp_mode: AttachMode,
    /// XDP guard: only these clients may connect to a listener, PORT=CIDR[,CIDR...]
    /// (repeatable).
    #[arg(long = "xdp-allow", value_name = "PORT=CIDRS")]
    xdp_allow: Vec<String>,
    /// XDP guard: these clients may not connect to a listener (wins over allow),
    /// PORT=CIDR[,CIDR...] (repeatable).
    #[arg(long = "xdp-deny", value_name = "PORT=CIDRS")]
    xdp_deny: Vec<String>,
    /// XDP guard: SYNs per second per source prefix,
    /// PORT=RATE[/BURST[/PREFIX4[/PREFIX6]]] (repeatable; defaults: burst = rate,
    /// prefixes 32 and 128).
    #[arg(long = "xdp-syn-rate", value_name = "PORT=RATE/BURST/P4/P6")]
    xdp_syn_rate: Vec<String>,
    /// Forward data path: attach the tc program to this interface (repeatable), where
    /// clients arrive and backends answer; `none`: off. Connections arriving on these
    /// interfaces are forwarded in the kernel under `--datapath auto` or `forward`.
    /// Default: under `--source kube` the interfaces holding this node's addresses and
    /// those the routes towards the current backends leave by, otherwise none (then
    /// `--datapath forward` needs it). Interfaces that come and go are followed.
    #[arg(long = "forward-iface", value_name = "IFACE")]
    forward_ifaces: Vec<String>,
    /// Forward data path: the NAT source ports, MIN-MAX, outside the node's ephemeral
    /// range; reserved in `net.ipv4.ip_local_reserved_ports`.
    #[arg(long, default_value = "61000-65535")]
    forward_ports: String,
    /// Kernel path: entries of `GW_SOCKS` and `GW_PEERS`, two per connection; a
    /// connection that finds them full takes splice (counted in
    /// `sockgate_sockmap_pair_failures_total{reason="map_full"}`). Fixed at load time;
    /// a pin of another size is incompatible (`--on-pin-mismatch`).
    #[arg(long, default_value_t = gateway_common::MAX_SOCKETS,
          value_parser = clap::value_parser!(u32).range(2..))]
    max_sockets: u32,
    /// Forward data path: connection table entries (two per connection).
    #[arg(long, default_value_t = gateway_common::MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(2..))]
    forward_table_size: u32,
    /// Forward data path: seconds an established connection may stay silent before its
    /// table entries are removed.
    #[arg(long, default_value_t = 3600.0)]
    idle_timeout: f64,
    /// Access log: one JSON line per connection when it ends, to `stdout` or appended
    /// to a file (reopened on SIGHUP). Off by default.
    #[arg(long, value_name = "stdout|FILE")]
    access_log: Option<sockgate::access_log::Target>,
    /// Access log: records queued for the writer at most; beyond, records are dropped
    /// and counted (`sockgate_access_log_dropped_total`), never waited for.
    #[arg(long, default_value_t = sockgate::access_log::DEFAULT_BUFFER)]
    access_log_buffer: usize,
    /// Forward data path: keep the client's address and port (no SNAT). Only where the
    /// backends' route back to the clients goes through this node (same node, or the
    /// node is their gateway): otherwise their replies bypass the translation.
    #[arg(long)]
    preserve_client_ip: bool,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // kube-client logs every failed request at error level; the kube source says
        // once that the API server is unreachable, and retries quietly.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
        });
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
        Command::Check(args) => check_manifests(&args),
        Command::Connections(args) => list_connections(&args),
        Command::Crd => sockgate::policy::crd_yaml()
            .map(|y| print!("{y}"))
            .map_err(anyhow::Error::from),
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

fn list_connections(args: &ConnectionsArgs) -> anyhow::Result<()> {
    use sockgate::connections;
    let agent = connections::from_agent(args.agent);
    let forward = connections::from_flows(&args.pin_dir);
    let mut all = Vec::new();
    match (agent, forward) {
        (Err(a), Err(f)) => anyhow::bail!("{a}; {f}"),
        (a, f) => {
            for (what, r) in [("socket paths", a), ("forward path", f)] {
                match r {
                    Ok(c) => all.extend(c),
                    Err(e) => eprintln!("sockgate: {what} not listed: {e}"),
                }
            }
        }
    }
    let filter = connections::Filter {
        listener: args.listener,
        client: args.client,
        backend: args.backend.clone(),
    };
    all.retain(|c| filter.keeps(c));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print!("{}", connections::render(&all));
    }
    Ok(())
}

fn check_manifests(args: &CheckArgs) -> anyhow::Result<()> {
    let filter = BackendFilter::allowing(args.allow_backend_cidrs.iter().copied());
    let mut params = source::params_now(&args.controller_name, &filter, args.limits.limits());
    params.node_addresses = args
        .node_addresses
        .iter()
        .map(std::net::IpAddr::to_canonical)
        .collect();
    let rendered = check::render(&args.dir, &params, args.output)?;
    // The skipped kinds on stderr: stdout stays the report alone, parseable.
    eprint!("{}", rendered.skipped);
    print!("{}", rendered.report);
    Ok(())
}

/// What the agent said so far about a desired state: its refusals and what its
/// limits left out, so each is logged once, when it appears (and when it is gone).
#[derive(Default)]
struct Said {
    refusals: RefusalLog,
    left_out: BTreeSet<LeftOut>,
}

impl Said {
    /// Logs the refused endpoints and left-out entries of `d` that are new (or gone)
    /// and counts them, and counts the backendRefs without ready endpoint.
    fn record(&mut self, metrics: &Metrics, d: &DesiredState) {
        self.refusals.log(&d.refused);
        metrics.backends_refused.set(&d.refused);
        metrics.backend_refs_unready.set(&d.unready);
        let now: BTreeSet<LeftOut> = d.left_out.iter().cloned().collect();
        for l in now.difference(&self.left_out) {
            if l.limit == limits::Limit::ListenerPorts {
                tracing::warn!(
                    listener = %l.listener,
                    port = l.port,
                    limit = %l.limit,
                    flag = l.limit.flag(),
                    "listener not accepted: {}", l.message
                );
                continue;
            }
            tracing::warn!(
                listener = %l.listener,
                port = l.port,
                limit = %l.limit,
                backend_ref = l.backend_ref.as_deref().unwrap_or(""),
                count = l.count,
                flag = l.limit.flag(),
                "capacity reached: {}", l.message
            );
        }
        for l in self.left_out.difference(&now) {
            tracing::info!(
                listener = %l.listener,
                port = l.port,
                limit = %l.limit,
                backend_ref = l.backend_ref.as_deref().unwrap_or(""),
                "no longer left out by a capacity"
            );
        }
        self.left_out = now;
        metrics.not_programmed.set(&d.left_out);
    }
}

/// Programs `d` into the maps: every entry that can be written is; those that cannot
/// are logged and counted, and the agent keeps serving.
fn program(dp: &Datapath, metrics: &Metrics, d: &DesiredState) {
    let started = std::time::Instant::now();
    let applied = mapsync::apply(dp, d);
    for f in &applied.failures {
        tracing::error!(
            listener = f.listener,
            map = f.error.map,
            error = %f.error,
            "map write failed: skipped, the listener keeps its previous entry"
        );
        metrics
            .map_write_failures
            .get_or_create(&vec![("map", f.error.map.to_owned())])
            .inc();
    }
    if !applied.failures.is_empty() {
        metrics.reconcile_errors.inc();
    }
    metrics.reconciles.inc();
    metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
}

/// Programs a new desired state into the maps, counting it in the metrics; `said`
/// holds what was logged already.
fn programmer(
    dp: Arc<Datapath>,
    metrics: Arc<Metrics>,
    mut said: Said,
) -> impl FnMut(&DesiredState) + Send {
    move |d| {
        said.record(&metrics, d);
        program(&dp, &metrics, d);
    }
}

/// Starts following the file source or the cluster, whichever is configured (the
/// `--route` table needs nothing: it never changes).
async fn spawn_source(
    files: Option<FileSource>,
    kube: Option<KubeOptions>,
    dp: &Arc<Datapath>,
    metrics: &Arc<Metrics>,
    said: Said,
    tx: watch::Sender<Arc<DesiredState>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let program = programmer(dp.clone(), metrics.clone(), said);
    if let Some(files) = files {
        let node = attach::addresses::follow(shutdown.clone()).await?;
        tokio::spawn(follow(
            files,
            Duration::from_secs(1),
            Some(node),
            tx,
            program,
            shutdown.clone(),
        ));
    } else if let Some(mut opts) = kube {
        opts.local_addresses = Some(attach::addresses::follow(shutdown.clone()).await?);
        let client = cluster::source::client().await?;
        tokio::spawn(cluster::source::run(
            client,
            opts,
            tx,
            program,
            cluster::source::SourceCounters::of(metrics),
            shutdown.clone(),
        ));
    }
    Ok(())
}

fn kube_options(args: &RunArgs, backend_filter: BackendFilter) -> anyhow::Result<KubeOptions> {
    if args.node_name.is_empty() {
        anyhow::bail!("--source kube needs the node name: --node-name or NODE_NAME");
    }
    let node_selector = args
        .node_selector
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--node-selector {kv:?}: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(KubeOptions {
        controller_name: args.controller_name.clone(),
        identity: args.node_name.clone(),
        namespace: args.namespace.clone(),
        lease_name: args.lease_name.clone(),
        lease_duration: Duration::from_secs(args.lease_duration.max(3)),
        node_selector,
        debounce: Duration::from_millis(200),
        node_addresses: None,
        local_addresses: None,
        // A ListenerPolicy CRD installed after the agents start is watched within a
        // minute.
        policy_rediscovery: Duration::from_mins(1),
        backend_filter,
        limits: args.limits.limits(),
    })
}

/// The `Node`'s addresses under the kube source, which then publishes them (for the
/// default interfaces of the XDP guard and of the forward path); `None` elsewhere.
fn node_addresses(kube: Option<&mut KubeOptions>) -> Option<NodeAddrs> {
    kube.map(|opts| {
        let (tx, rx) = watch::channel(BTreeSet::new());
        opts.node_addresses = Some(tx);
        rx
    })
}

/// The receiving end of the `Node`'s addresses.
type NodeAddrs = watch::Receiver<BTreeSet<std::net::IpAddr>>;

/// `none` alone: `Some(true)`; interface names: `Some(false)`; nothing: `None`.
fn switched_off(ifaces: &[String], flag: &str) -> anyhow::Result<Option<bool>> {
    if ifaces.iter().any(|i| i == "none") {
        anyhow::ensure!(
            ifaces.len() == 1,
            "{flag} none cannot be combined with interface names"
        );
        return Ok(Some(true));
    }
    Ok((!ifaces.is_empty()).then_some(false))
}

/// The interfaces the XDP guard is attached to: `--xdp-iface` (`none`: off); by
/// default the ones holding the node's addresses under the kube source, else none.
/// With the selection, why it is off (when it is).
fn xdp_selection(
    ifaces: &[String],
    node: Option<&NodeAddrs>,
) -> anyhow::Result<(Selection, &'static str)> {
    Ok(match (switched_off(ifaces, "--xdp-iface")?, node) {
        (Some(true), _) => (Selection::Off, "--xdp-iface none"),
        (Some(false), _) => (Selection::Named(ifaces.iter().cloned().collect()), ""),
        (None, Some(rx)) => (Selection::NodeAddresses(rx.clone()), ""),
        (None, None) => (
            Selection::Off,
            "no --xdp-iface: outside a cluster the guard is attached only where asked",
        ),
    })
}

/// Attaches the XDP guard to the selected interfaces and keeps it attached until
/// `shutdown`. Named interfaces that cannot be attached at start are an error; under
/// the cluster default a guard that cannot start is logged and left out.
async fn start_guard(
    dp: &Arc<Datapath>,
    mode: AttachMode,
    (selection, off_why): (Selection, &'static str),
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if matches!(selection, Selection::Off) {
        info!(why = off_why, "XDP listener guard not attached");
        return Ok(None);
    }
    let named = matches!(selection, Selection::Named(_));
    let started = async {
        let nl = Netlink::open()?;
        let mut manager = Manager::new(dp.clone(), mode)?;
        let errors = manager.sync(nl.handle(), &selection).await?;
        Ok::<_, anyhow::Error>((nl, manager, errors))
    };
    let (nl, manager, errors) = match started.await {
        Ok(s) => s,
        // Asked for by name: an error. The cluster default: the data path serves
        // without the guard.
        Err(e) if named => return Err(e),
        Err(e) => {
            tracing::error!(error = %e, "XDP listener guard unavailable: serving without it");
            return Ok(None);
        }
    };
    let failing = !errors.is_empty();
    if named && let Some(e) = errors.into_iter().next() {
        return Err(e.into());
    }
    Ok(Some(tokio::spawn(attach::run(
        manager,
        nl,
        selection,
        failing,
        shutdown.clone(),
    ))))
}

/// How the programs are loaded and their maps pinned.
fn load_options(args: &RunArgs, port_min: u16, port_max: u16) -> LoadOptions {
    LoadOptions {
        pin_dir: args.pin_dir.clone(),
        keep_pins: args.keep_pins,
        on_mismatch: args.on_pin_mismatch,
        kernel_btf: args.kernel_btf.clone(),
        forward: ForwardLoad {
            table_size: args.forward_table_size,
            port_min,
            port_max,
            attempts: u32::try_from(args.connect_attempts).unwrap_or(u32::MAX),
            preserve_client: args.preserve_client_ip,
        },
        capacity: Capacity {
            listeners: args.limits.max_listeners,
            backends: args.limits.max_backends,
            sockets: args.max_sockets,
        },
        local_shortcut: args
            .local_shortcut
            .then(sockgate::ebpf::local::cgroup2_root),
    }
}

/// Starts the forward path when it is on, or says why it is off (after the programs
/// loaded, so a start-up failure stays one line).
async fn start_forward(
    dp: &Arc<Datapath>,
    forward: Result<(Selection, ForwardOptions), &'static str>,
    metrics: &Metrics,
    names: watch::Receiver<Arc<DesiredState>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    Ok(match forward {
        Ok((sel, mut opts)) => {
            opts.access = metrics.access.clone();
            opts.names = Some(names);
            Some(attach::forward::start(dp, sel, opts, shutdown).await?)
        }
        Err(why) => {
            info!(why, "forward data path off");
            None
        }
    })
}

/// The interfaces the forward program is attached to: `--forward-iface` (`none`:
/// off); by default under the kube source the ones holding the node's addresses and
/// those towards the backends of `desired`; else off (an error under `--datapath
/// forward`). Off under `--datapath sockmap` and `splice`. With the selection, why it
/// is off (when it is).
fn forward_selection(
    args: &RunArgs,
    node: Option<&NodeAddrs>,
    desired: &watch::Receiver<Arc<DesiredState>>,
) -> anyhow::Result<(Selection, &'static str)> {
    let ifaces = &args.forward_ifaces;
    let asked = switched_off(ifaces, "--forward-iface")?;
    Ok(match (args.datapath, asked, node) {
        (DatapathMode::Sockmap | DatapathMode::Splice, asked, _) => {
            if asked.is_some() {
                tracing::warn!(
                    "--forward-iface is ignored: --datapath sockmap or splice carries every connection"
                );
            }
            (Selection::Off, "--datapath sockmap or splice")
        }
        (DatapathMode::Forward, Some(true), _) | (DatapathMode::Forward, None, None) => {
            anyhow::bail!(
                "--datapath forward needs --forward-iface IFACE (the interfaces clients arrive on and backends answer on)"
            )
        }
        (DatapathMode::Auto, Some(true), _) => (Selection::Off, "--forward-iface none"),
        (_, Some(false), _) => (Selection::Named(ifaces.iter().cloned().collect()), ""),
        (_, None, Some(node)) => (
            Selection::NodeAndBackends {
                node: node.clone(),
                desired: desired.clone(),
            },
            "",
        ),
        (DatapathMode::Auto, None, None) => (
            Selection::Off,
            "no --forward-iface: outside a cluster the forward path is attached only where asked",
        ),
    })
}

/// The forward path's settings and interfaces, or why it is off.
fn forward_setup(
    args: &RunArgs,
    drain: Duration,
    (selection, off_why): (Selection, &'static str),
) -> anyhow::Result<Result<(Selection, ForwardOptions), &'static str>> {
    if matches!(selection, Selection::Off) {
        return Ok(Err(off_why));
    }
    Ok(Ok((
        selection,
        ForwardOptions {
            timeouts: Timeouts {
                idle: secs(args.idle_timeout, "idle-timeout")?,
                ..Timeouts::default()
            },
            drain,
            keep_pins: args.keep_pins,
            // Set by start_forward, once the metrics exist.
            access: Arc::default(),
            names: None,
        },
    )))
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

/// Where the desired state comes from: `--source`, else files with `--dir`, else the
/// cluster when in one and no `--route` is given, else the `--route` table.
fn source_kind(args: &RunArgs) -> SourceKind {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    match (args.source, &args.dir) {
        (Some(kind), _) => kind,
        (None, Some(_)) => SourceKind::Files,
        (None, None) if args.routes.is_empty() && in_cluster => SourceKind::Kube,
        (None, None) => SourceKind::Routes,
    }
}

/// `--socket-buffer`: a size, the kernel's defaults, or the data path's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SocketBuffer {
    Auto,
    Kernel,
    Bytes(u32),
}

/// The buffers the socket paths set, from `--socket-buffer` and
/// `--socket-buffer-autotune`. `auto` is what measured best on each data path: the
/// kernel's on both today: fixed 4 MiB on the sockmap path measured faster in two
/// runs, then five times slower on one stream in the run of this build
/// (docs/performance.md, "Socket buffers").
fn socket_buffer(flag: SocketBuffer, autotune: bool) -> Option<proxy::sock::BufferSize> {
    match flag {
        SocketBuffer::Kernel | SocketBuffer::Auto => None,
        SocketBuffer::Bytes(bytes) => Some(proxy::sock::BufferSize { bytes, autotune }),
    }
}

/// Smallest and largest `--socket-buffer`.
const SOCKET_BUFFER_RANGE: std::ops::RangeInclusive<u64> = 4096..=(1 << 30);

fn parse_socket_buffer(s: &str) -> Result<SocketBuffer, String> {
    match s {
        "auto" => return Ok(SocketBuffer::Auto),
        "kernel" => return Ok(SocketBuffer::Kernel),
        _ => {}
    }
    let (digits, unit) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1024),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1024 * 1024),
            None => (s, 1),
        },
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|n| SOCKET_BUFFER_RANGE.contains(n))
        .ok_or_else(|| {
            format!(
                "`{s}`: `auto`, `kernel`, or bytes from {} to {} (suffix K or M allowed)",
                SOCKET_BUFFER_RANGE.start(),
                SOCKET_BUFFER_RANGE.end()
            )
        })?;
    u32::try_from(bytes)
        .map(SocketBuffer::Bytes)
        .map_err(|e| e.to_string())
}

/// The socket paths' settings from the flags.
fn proxy_config(args: &RunArgs) -> anyhow::Result<ProxyConfig> {
    if args.local_shortcut && args.datapath != DatapathMode::Sockmap {
        anyhow::bail!(
            "--local-shortcut needs --datapath sockmap (the shortcut sends into the backend socket of a kernel-path pair)"
        );
    }
    Ok(ProxyConfig {
        mode: args.datapath,
        connect_timeout: secs(args.connect_timeout, "connect-timeout")?,
        connect_attempts: args.connect_attempts,
        drain_timeout: secs(args.drain_timeout, "drain-timeout")?,
        backend_timeout: secs(args.backend_timeout, "backend-timeout")?,
        bind: args.bind,
        kernel_queue_limit: args.kernel_queue_limit,
        local_shortcut: args.local_shortcut,
        kernel_brake: args.kernel_brake,
        socket_buffer: socket_buffer(args.socket_buffer, args.socket_buffer_autotune),
    })
}

/// The agent's async runtime: `workers` threads, or tokio's default (one per CPU,
/// or `TOKIO_WORKER_THREADS`).
fn runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = workers {
        rt.worker_threads(usize::from(n));
    }
    rt.build()
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let source = source_kind(args);
    let filter = BackendFilter::allowing(args.allow_backend_cidrs.iter().copied());
    let files = match (source, &args.dir) {
        (SourceKind::Files, Some(dir)) => Some(FileSource::open(
            dir,
            &args.controller_name,
            filter.clone(),
            args.limits.limits(),
        )?),
        (SourceKind::Files, None) => anyhow::bail!("--source files needs --dir DIR"),
        (SourceKind::Routes | SourceKind::Kube, _) => None,
    };
    let mut kube = (source == SourceKind::Kube)
        .then(|| kube_options(args, filter.clone()))
        .transpose()?;
    let node = node_addresses(kube.as_mut());
    let selection = xdp_selection(&args.xdp_ifaces, node.as_ref())?;
    let desired: DesiredState = if let Some(f) = &files {
        (**f.current()).clone()
    } else {
        let mut d = routes::parse(&args.routes, &filter)?;
        limits::fit(&mut d, args.limits.limits());
        d
    };
    let (tx, rx) = watch::channel(Arc::new(desired.clone()));
    let cfg = proxy_config(args)?;
    let forward = forward_setup(
        args,
        cfg.drain_timeout,
        forward_selection(args, node.as_ref(), &rx)?,
    )?;
    let (port_min, port_max) = forward::parse_ports(&args.forward_ports)?;
    let opts = load_options(args, port_min, port_max);
    if forward.is_ok() {
        forward::reserve_ports(port_min, port_max)?;
    }
    let guards = sockgate::xdp::parse_flags(&args.xdp_allow, &args.xdp_deny, &args.xdp_syn_rate)?;
    let dp = Arc::new(Datapath::load(&opts)?);
    for (port, guard) in &guards {
        info!(listener = port, guard = ?guard, "XDP guard policy from the command line");
    }
    dp.set_static_guards(guards);
    raise_fd_limit();
    if desired.listeners.is_empty() && kube.is_none() {
        info!("no listeners configured (give --dir or --route)");
    }
    for c in filter.allowed() {
        info!(cidr = %c, "backend addresses in this range allowed (--allow-backend-cidr)");
    }
    let ports = args.limits.listener_ports;
    if !ports.is_all() {
        info!(%ports, "listeners allowed on these ports only (--listener-ports)");
    }
    let metrics = Arc::new(Metrics::new(dp.clone()));
    let access_writer = open_access_log(args, &metrics)?;
    let mut said = Said::default();
    said.record(&metrics, &desired);
    program(&dp, &metrics, &desired);
    let rt = runtime(args.worker_threads)?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let guard = start_guard(&dp, args.xdp_mode, selection, &shutdown).await?;
        let forwarding = start_forward(&dp, forward, &metrics, rx.clone(), &shutdown).await?;
        spawn_source(files, kube, &dp, &metrics, said, tx, &shutdown).await?;
        let counters = Arc::new(Registry::default());
        let conns = Arc::new(proxy::conn::Table::default());
        let _http = serve_http(args.metrics_addr, &metrics, &dp, &conns, &shutdown).await?;
        let kernel_logs = spawn_datapath_tasks(&dp, &shutdown);
        let serving = tokio::spawn(proxy::serve(
            dp.clone(),
            cfg.clone(),
            rx,
            counters,
            metrics.clone(),
            conns,
            shutdown.clone(),
        ));
        wait_for_signal(access_writer.as_ref()).await?;
        info!(
            drain_secs = cfg.drain_timeout.as_secs_f64(),
            "stopping: no new connections; established ones drain"
        );
        shutdown.cancel();
        let _ = serving.await;
        let _ = kernel_logs.await;
        if let Some(g) = guard {
            let _ = g.await;
        }
        if let Some(f) = forwarding {
            let _ = f.await;
        }
        anyhow::Ok(())
    })?;
    drop(rt);
    finish_access_log(access_writer);
    drop(dp);
    Ok(())
}

/// Serves `/metrics`, the health endpoints and `/connections` (the live connections
/// of `conns`) until `shutdown`.
async fn serve_http(
    addr: std::net::SocketAddr,
    metrics: &Arc<Metrics>,
    dp: &Arc<Datapath>,
    conns: &Arc<proxy::conn::Table>,
    shutdown: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let live = Arc::new(proxy::conn::Live {
        table: conns.clone(),
        dp: dp.clone(),
    });
    Ok(metrics::serve(addr, metrics.clone(), live, shutdown.clone()).await?)
}

/// Lets the access log's writer write what is queued (bounded wait).
fn finish_access_log(writer: Option<sockgate::access_log::Writer>) {
    if let Some(w) = writer {
        w.finish(Duration::from_secs(2));
    }
}

/// Starts the access log's writer when `--access-log` asks for it.
fn open_access_log(
    args: &RunArgs,
    metrics: &Metrics,
) -> anyhow::Result<Option<sockgate::access_log::Writer>> {
    let Some(target) = &args.access_log else {
        return Ok(None);
    };
    let (tx, writer) = sockgate::access_log::open(target.clone(), args.access_log_buffer)?;
    metrics.access.attach(tx);
    info!(target = ?target, buffer = args.access_log_buffer, "access log on");
    Ok(Some(writer))
}

/// Starts the tasks that follow the loaded programs until `shutdown`: their log
/// records (the handle returned, to wait for the last records) and the pin watch.
fn spawn_datapath_tasks(
    dp: &Arc<Datapath>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(sockgate::pin_watch::run(
        dp.clone(),
        sockgate::pin_watch::CHECK_INTERVAL,
        shutdown.clone(),
    ));
    if dp.local.is_some() {
        tokio::spawn(proxy::local::follow_node_addrs(
            dp.clone(),
            shutdown.clone(),
        ));
    }
    let (dp, shutdown) = (dp.clone(), shutdown.clone());
    tokio::spawn(async move { dp.forward_kernel_logs(shutdown).await })
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

/// Waits for SIGTERM or SIGINT; on SIGHUP meanwhile the access log file is reopened.
async fn wait_for_signal(access: Option<&sockgate::access_log::Writer>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break }
            _ = int.recv() => { info!("SIGINT"); break }
            _ = hup.recv() => {
                info!("SIGHUP: the access log file is reopened");
                if let Some(w) = access {
                    w.reopen();
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{SocketBuffer, parse_socket_buffer, socket_buffer};
    use sockgate::proxy::sock::BufferSize;

    #[test]
    fn socket_buffer_sizes() {
        assert_eq!(socket_buffer(SocketBuffer::Auto, false), None);
        assert_eq!(socket_buffer(SocketBuffer::Kernel, true), None);
        assert_eq!(
            socket_buffer(SocketBuffer::Bytes(1 << 20), true),
            Some(BufferSize {
                bytes: 1 << 20,
                autotune: true
            })
        );
    }

    #[test]
    fn socket_buffer_flag() {
        assert_eq!(parse_socket_buffer("auto"), Ok(SocketBuffer::Auto));
        assert_eq!(parse_socket_buffer("kernel"), Ok(SocketBuffer::Kernel));
        assert_eq!(
            parse_socket_buffer("1048576"),
            Ok(SocketBuffer::Bytes(1 << 20))
        );
        assert_eq!(parse_socket_buffer("4M"), Ok(SocketBuffer::Bytes(4 << 20)));
        assert_eq!(
            parse_socket_buffer("256k"),
            Ok(SocketBuffer::Bytes(256 << 10))
        );
        for bad in ["", "1024", "2048M", "x", "-1", "1G"] {
            assert!(parse_socket_buffer(bad).is_err(), "{bad}");
        }
    }
}
