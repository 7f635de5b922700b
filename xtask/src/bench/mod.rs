//! `cargo xtask bench`: sockgate's data paths side by side with no proxy and with the
//! userspace proxies people deploy, in one run, on the network-namespace bed.
//!
//! ```text
//!  client ns ──veth── node ns (the proxy under test) ──veth── backend ns
//!  iperf3 -c         haproxy / nginx / socat / envoy /      iperf3 -s, sockperf server,
//!  sockperf, conn    sockgate (forward, kernel, splice,     exchange and slow servers
//!                    auto)
//! ```
//!
//! Every row runs the same work: iperf3 with 1 and 4 streams, sockperf ping-pong (64
//! bytes, full round trip), new connections per second with a small exchange, CPU per
//! GB moved (measured around the 1-stream run: the proxy's processes, kernel workers
//! and the whole machine's softirq time, so that work done in the kernel on the
//! proxy's behalf counts for every row alike), and kernel memory growth with a slow
//! receiver. Repeats are interleaved (repeat 1 of every row, then repeat 2, ...) so
//! slow drifts of a shared machine spread over all rows; before each row the bench
//! waits (bounded) for a quiet machine and records the load it saw.
//!
//! Nothing here passes or fails on a number: the results go to `bench/results.csv`,
//! `BENCHMARKS.md` and `bench/benchmarks.png`.
#![expect(
    clippy::cast_precision_loss,
    reason = "counters and byte counts become f64 statistics; 52 bits of mantissa are plenty"
)]

mod access_log;
mod chart;
pub mod many;
pub mod measure;
pub mod peers;
mod procfs;
mod report;
mod stats;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use netbed::Bed;

use self::{
    measure::{Backend, Daemon, Load},
    peers::{HaSplice, NodeLocal, Proxy, Service},
};
use crate::root;

/// What `cargo xtask bench` was asked to do.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// A short run for checks: direct, sockgate kernel and splice, `HAProxy`; 1 s per
    /// measurement, one repeat, no waiting for a quiet machine.
    #[arg(long)]
    pub quick: bool,
    /// Repeats of every measurement (default 3; 1 with --quick).
    #[arg(long)]
    pub repeats: Option<u32>,
    /// Directory for BENCHMARKS.md and bench/ (default: the workspace root).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only the rows whose name contains one of these (comma-separated, case-insensitive).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Seconds of each iperf3 run (default 3; 1 with --quick).
    #[arg(long)]
    pub iperf_secs: Option<u32>,
    /// Experiments: a sysctl set in the node namespace before the rows run
    /// (`KEY=VALUE`, repeatable), e.g. `net.ipv4.tcp_wmem=4096 16384 16777216`.
    #[arg(long, value_name = "KEY=VALUE")]
    pub node_sysctl: Vec<String>,
    /// Experiments: how sockgate's verdict program is attached to `GW_SOCKS`. `skb`
    /// re-attaches it (with bpftool) as `BPF_SK_SKB_VERDICT` instead of the stream
    /// verdict sockgate attaches.
    #[arg(long, value_enum, default_value_t = peers::VerdictAttach::Stream)]
    pub verdict_attach: peers::VerdictAttach,
    /// Experiments: an extra sockgate row with extra flags, `DATAPATH/LABEL=FLAGS`
    /// (repeatable), e.g. `sockmap/buf-1m=--socket-buffer 1M`; the row is named after
    /// the data path's row and the label, and runs whatever `--only` says.
    #[arg(long = "variant", value_name = "DATAPATH/LABEL=FLAGS")]
    pub variants: Vec<String>,
}

/// The rows of `--quick`.
const QUICK_ROWS: &[&str] = &[
    "direct",
    "sockgate kernel",
    "sockgate splice",
    "sockgate forward",
    "sockgate auto",
    "sockgate auto + guard generic",
    "sockgate auto + guard native",
    "guard SYN drop generic",
    "guard SYN drop native",
    "forward SYN flood",
    "HAProxy",
    peers::NODE_LOCAL_DIRECT,
    "sockgate kernel + local shortcut (node-local client)",
];
/// The row the guard rows are compared with: the same sockgate without the guard.
const GUARD_BASE_ROW: &str = "sockgate auto";
const ENVOY_ROW: &str = "Envoy tcp_proxy";

/// The bench services on the backend, and the listener port every proxy gives each.
const IPERF: Service = Service {
    backend_port: 5201,
    listen_port: 15201,
};
const SOCKPERF: Service = Service {
    backend_port: 11111,
    listen_port: 21111,
};
const EXCHANGE: Service = Service {
    backend_port: 7000,
    listen_port: 17000,
};
const SLOW: Service = Service {
    backend_port: 7001,
    listen_port: 17001,
};
/// The echo services of the many-connection measurements: three, so that the forward
/// path's NAT ports (4,536 by default, per backend address and port) cover 10,000
/// connections at once.
const ECHO: [Service; 3] = [
    Service {
        backend_port: 7010,
        listen_port: 17010,
    },
    Service {
        backend_port: 7011,
        listen_port: 17011,
    },
    Service {
        backend_port: 7012,
        listen_port: 17012,
    },
];
const SERVICES: [Service; 7] = [IPERF, SOCKPERF, EXCHANGE, SLOW, ECHO[0], ECHO[1], ECHO[2]];
/// The descriptor limit the bench gives itself, and so the proxies it starts (they
/// inherit it): client and backend of 10,000 connections live in the bench's process.
const NOFILE: u64 = 262_144;

/// Durations of one run.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub iperf_secs: u32,
    pub rr_secs: u32,
    pub conn_secs: f64,
    pub slow_secs: f64,
    /// Seconds of each SYN flood of the guard's drop-rate rows.
    pub flood_secs: f64,
    /// Seconds of each fixed-rate request/response run over many connections.
    pub many_secs: f64,
    /// Connections of the idle measurement (fewer than [`many::IDLE_CONNS`] where the
    /// descriptor limit does not allow them).
    pub idle_conns: usize,
    pub quiet_max: Duration,
}

/// The metrics, in table order: (key, title, unit, higher is better).
pub const METRICS: &[(&str, &str, &str, bool)] = &[
    ("tput_1", "throughput, 1 stream", "Gbit/s", true),
    ("tput_4", "throughput, 4 streams", "Gbit/s", true),
    ("rr_p50", "RR latency p50", "µs", false),
    ("rr_p99", "RR latency p99", "µs", false),
    ("conn_rate", "new connections", "conn/s", true),
    ("cpu_per_gb", "CPU per GB", "s/GB", false),
    (
        "cpu_proxy_per_gb",
        "proxy processes CPU per GB",
        "s/GB",
        false,
    ),
    ("cpu_kworker_per_gb", "kworker CPU per GB", "s/GB", false),
    ("cpu_softirq_per_gb", "softirq CPU per GB", "s/GB", false),
    (
        "cpu_machine_per_gb",
        "whole machine CPU per GB",
        "s/GB",
        false,
    ),
    (
        "slow_queued",
        "slow receiver: bytes held between writer and reader",
        "MiB",
        false,
    ),
    (
        "slow_tcp_mem",
        "slow receiver: TCP memory growth",
        "MiB",
        false,
    ),
    (
        "slow_used_mem",
        "slow receiver: memory in use growth",
        "MiB",
        false,
    ),
    (
        "slow_sent",
        "slow receiver: bytes accepted from the writer",
        "MiB",
        false,
    ),
    (
        "slow_capped",
        "slow receiver: stopped at the memory cap (1 = yes)",
        "flag",
        false,
    ),
    ("conn_failures", "failed connections", "count", false),
    (
        "syn_drop_rate",
        "SYNs the guard dropped per second",
        "SYN/s",
        true,
    ),
    (
        "syn_sent_rate",
        "SYNs sent per second (one sender core)",
        "SYN/s",
        true,
    ),
    (
        "syn_drop_softirq",
        "softirq CPU during the flood",
        "cores",
        false,
    ),
    (
        "syn_drop_per_core",
        "SYNs dropped per softirq CPU second",
        "SYN/s",
        true,
    ),
    (
        "fwd_flood_opened",
        "forward connections the flood opened",
        "count",
        false,
    ),
    (
        "fwd_flood_table_peak",
        "forward table entries, peak during the flood",
        "entries",
        false,
    ),
    (
        "fwd_flood_refused",
        "SYNs refused for want of a NAT port or table room",
        "count",
        false,
    ),
    (
        "fwd_flood_served",
        "another client's exchanges answered during the flood",
        "%",
        true,
    ),
    (
        "fwd_flood_tried",
        "another client's exchanges tried during the flood",
        "count",
        true,
    ),
    (
        "local_switches",
        "node-local shortcut: clients switched to it",
        "count",
        true,
    ),
    ("idle_conns", "idle: connections held", "count", true),
    (
        "idle_fds",
        "idle: proxy descriptors per connection",
        "fd",
        false,
    ),
    ("idle_rss", "idle: proxy RSS per connection", "KiB", false),
    (
        "idle_slab",
        "idle: kernel slab (SUnreclaim) per connection",
        "KiB",
        false,
    ),
    (
        "idle_tcp_mem",
        "idle: TCP memory per connection",
        "KiB",
        false,
    ),
    (
        "idle_node_socks",
        "idle: TCP sockets in the node namespace per connection",
        "sockets",
        false,
    ),
    (
        "idle_table",
        "idle: forward table entries per connection",
        "entries",
        false,
    ),
    (
        "many1k_cpu",
        "1,000 conns: CPU per transaction",
        "µs/txn",
        false,
    ),
    (
        "many1k_cpu_proxy",
        "1,000 conns: proxy processes CPU per transaction",
        "µs/txn",
        false,
    ),
    ("many1k_p50", "1,000 conns: latency p50", "µs", false),
    ("many1k_p99", "1,000 conns: latency p99", "µs", false),
    (
        "many1k_rate",
        "1,000 conns: transactions per second",
        "txn/s",
        true,
    ),
    (
        "many5k_cpu",
        "5,000 conns: CPU per transaction",
        "µs/txn",
        false,
    ),
    (
        "many5k_cpu_proxy",
        "5,000 conns: proxy processes CPU per transaction",
        "µs/txn",
        false,
    ),
    ("many5k_p50", "5,000 conns: latency p50", "µs", false),
    ("many5k_p99", "5,000 conns: latency p99", "µs", false),
    (
        "many5k_rate",
        "5,000 conns: transactions per second",
        "txn/s",
        true,
    ),
];

/// The metric keys of one connection count of the fixed-rate run: CPU per
/// transaction (all), of the proxy's processes, p50, p99, transactions per second.
pub fn many_keys(conns: usize) -> [&'static str; 5] {
    if conns <= 1_000 {
        [
            "many1k_cpu",
            "many1k_cpu_proxy",
            "many1k_p50",
            "many1k_p99",
            "many1k_rate",
        ]
    } else {
        [
            "many5k_cpu",
            "many5k_cpu_proxy",
            "many5k_p50",
            "many5k_p99",
            "many5k_rate",
        ]
    }
}

/// One measured value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub row: String,
    pub metric: &'static str,
    pub repeat: u32,
    pub value: f64,
    pub load: Load,
}

/// Everything the report needs besides the samples.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    pub rows: Vec<String>,
    pub unavailable: Vec<(String, String)>,
    pub failures: Vec<String>,
    pub versions: Vec<(String, String)>,
    /// sockgate's connections by data path after each run of a sockgate row.
    pub paths: Vec<(String, peers::Paths)>,
    /// Non-default settings of this run (experiments).
    pub settings: Vec<String>,
    pub quick: bool,
    pub repeats: u32,
    pub timing: Option<Timing>,
    /// The descriptor limit the bench and its proxies ran with.
    pub nofile: u64,
    pub started: String,
    /// Seconds the rows of `BENCHMARKS.md` took, every repeat (not the install, the
    /// build, nor the access log's rows, which have their own file).
    pub elapsed_s: f64,
}

/// Builds sockgate as a user does (`cargo build --release -p gateway-userspace --bin
/// sockgate`, deploy/Dockerfile) and returns the binary cargo reports, wherever the
/// target directory is (`CARGO_TARGET_DIR`, cargo config).
fn build_release() -> anyhow::Result<PathBuf> {
    println!("bench: building the release sockgate");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--quiet",
            "--message-format=json-render-diagnostics",
            "-p",
            "gateway-userspace",
            "--bin",
            "sockgate",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    anyhow::ensure!(out.status.success(), "cargo build --release failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "sockgate")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo reported no sockgate executable")
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Runs the bench and writes its files.
#[expect(clippy::too_many_lines, reason = "the run's steps, in order")]
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let nofile = raise_nofile()?;
    peers::install_debian()?;
    let sockgate = build_release()?;
    let repeats = opts
        .repeats
        .unwrap_or(if opts.quick { 1 } else { 3 })
        .max(1);
    let timing = if opts.quick {
        Timing {
            iperf_secs: 1,
            rr_secs: 1,
            conn_secs: 1.0,
            slow_secs: 1.0,
            flood_secs: 1.0,
            many_secs: 1.0,
            idle_conns: many::idle_conns(nofile),
            quiet_max: Duration::ZERO,
        }
    } else {
        // Three repeats of every row in about 15 minutes: one repeat took 380 s on a
        // busy machine with quiet waits of up to 2 s (docs/performance.md, "Idle and
        // many connections"); waits of up to 1 s take about 80 s less.
        Timing {
            iperf_secs: 3,
            rr_secs: 2,
            conn_secs: 2.0,
            slow_secs: 2.0,
            flood_secs: 2.0,
            many_secs: 2.0,
            idle_conns: many::idle_conns(nofile),
            quiet_max: Duration::from_secs(1),
        }
    };
    let timing = Timing {
        iperf_secs: opts.iperf_secs.unwrap_or(timing.iperf_secs).max(1),
        ..timing
    };
    let mut info = RunInfo {
        quick: opts.quick,
        repeats,
        timing: Some(timing),
        nofile,
        started: utc_now(),
        ..RunInfo::default()
    };

    let selected = |name: &str| {
        if opts.only.is_empty() {
            !opts.quick || QUICK_ROWS.contains(&name)
        } else {
            let name = name.to_lowercase();
            opts.only.iter().any(|o| name.contains(&o.to_lowercase()))
        }
    };
    // The guard rows are read against the same sockgate without the guard, in the
    // same run: selecting one selects that row too.
    let guard_rows = [
        Proxy::SockgateGuard("generic"),
        Proxy::SockgateGuard("native"),
    ];
    let any_guard = guard_rows.iter().any(|p| selected(p.name()));
    let wanted = |name: &str| selected(name) || (any_guard && name == GUARD_BASE_ROW);
    let mut proxies: Vec<Proxy> = [
        Proxy::Direct,
        Proxy::Sockgate("sockmap"),
        Proxy::Sockgate("splice"),
        Proxy::Sockgate("forward"),
        Proxy::Sockgate("auto"),
        Proxy::SockgateGuard("generic"),
        Proxy::SockgateGuard("native"),
        Proxy::SynFlood("generic"),
        Proxy::SynFlood("native"),
        Proxy::ForwardFlood,
        Proxy::Haproxy(HaSplice::Off),
        Proxy::Haproxy(HaSplice::Auto),
        Proxy::Haproxy(HaSplice::Forced),
        Proxy::Nginx,
        Proxy::Socat,
        Proxy::NodeLocal(NodeLocal::Direct),
        Proxy::NodeLocal(NodeLocal::Kernel),
        Proxy::NodeLocal(NodeLocal::Shortcut),
        Proxy::NodeLocal(NodeLocal::Splice),
    ]
    .into_iter()
    .filter(|p| wanted(p.name()))
    .collect();
    for v in &opts.variants {
        let v = peers::Variant::parse(v)?;
        info.settings.push(format!(
            "row *{}*: `--datapath {}` with `{}`",
            v.name,
            v.datapath,
            v.args.join(" "),
        ));
        proxies.push(Proxy::SockgateVariant(v));
    }
    if wanted(ENVOY_ROW) {
        match peers::envoy() {
            Ok(bin) => proxies.push(Proxy::Envoy(bin)),
            Err(why) => {
                println!("bench: Envoy cannot be installed: {why}");
                info.unavailable.push((ENVOY_ROW.into(), why));
            }
        }
    }
    info.rows = proxies.iter().map(|p| p.name().to_owned()).collect();
    info.versions = versions(&proxies, &sockgate);

    let removed = netbed::sweep_stale();
    if !removed.is_empty() {
        println!(
            "bench: removed namespaces of earlier runs: {}",
            removed.join(" ")
        );
    }
    let bed = Bed::new(1).context("making the network-namespace bed")?;
    println!("bench: bed namespaces: {}", bed.names().join(" "));
    for kv in &opts.node_sysctl {
        println!("bench: node namespace sysctl {kv}");
        bed.node().output("sysctl", &["-qw", kv])?;
        info.settings.push(format!("node namespace sysctl `{kv}`"));
    }
    if opts.verdict_attach == peers::VerdictAttach::Skb {
        info.settings
            .push("sockgate's verdict re-attached as `BPF_SK_SKB_VERDICT` (bpftool)".into());
    }
    for ns in [bed.client(), bed.node(), bed.backend(0)] {
        // Thousands of short connections per second: reuse TIME_WAIT ports.
        ns.output("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        // The node's range stops below the forward path's NAT ports (its default
        // --forward-ports 61000-65535, which the agent refuses to share).
        let range = if ns.name() == bed.node().name() {
            "1024 60999"
        } else {
            "1024 65000"
        };
        ns.output(
            "sysctl",
            &["-qw", &format!("net.ipv4.ip_local_port_range={range}")],
        )?;
    }
    if proxies
        .iter()
        .any(|p| matches!(p, Proxy::SynFlood(_) | Proxy::ForwardFlood))
    {
        bed.client().ip(&[
            "addr",
            "add",
            &format!("{}/24", peers::FLOODER),
            "dev",
            "eth0",
        ])?;
    }
    let backend = bed.backend_addr(0);
    let _iperf = Daemon::start(
        bed.backend(0),
        "iperf3",
        &["-s", "-p", &IPERF.backend_port.to_string()],
    )?;
    let _sockperf = Daemon::start(
        bed.backend(0),
        "sockperf",
        &[
            "server",
            "--tcp",
            "-i",
            &backend.to_string(),
            "-p",
            &SOCKPERF.backend_port.to_string(),
        ],
    )?;
    let _exchange = Backend::exchange(
        bed.backend(0),
        SocketAddr::new(backend.into(), EXCHANGE.backend_port),
    )?;
    let _slow = Backend::slow(
        bed.backend(0),
        SocketAddr::new(backend.into(), SLOW.backend_port),
    )?;
    let _echo = many::EchoBackend::start(
        bed.backend(0),
        ECHO.iter()
            .map(|s| SocketAddr::new(backend.into(), s.backend_port))
            .collect(),
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let mut samples = Vec::new();
    let mut rows_s = 0.0;
    for repeat in 1..=repeats {
        for proxy in &proxies {
            println!("bench: repeat {repeat}/{repeats}: {}", proxy.name());
            let row_started = Instant::now();
            let result = run_row(&bed, proxy, &sockgate, opts, repeat, timing, &mut samples);
            let took = row_started.elapsed().as_secs_f64();
            rows_s += took;
            println!("bench: {} took {took:.1} s", proxy.name());
            match result {
                Ok(paths) => {
                    if let Some(p) = paths {
                        info.paths.push((proxy.name().to_owned(), p));
                    }
                }
                Err(e) => {
                    let msg = format!("{} (repeat {repeat}): {e:#}", proxy.name());
                    println!("bench: FAILED {msg}");
                    info.failures.push(msg);
                }
            }
        }
        if selected(access_log::ROW_ON) {
            println!("bench: repeat {repeat}/{repeats}: {}", access_log::ROW_ON);
            if let Err(e) = access_log::run_repeat(&bed, &sockgate, repeat, timing, &mut samples) {
                let msg = format!("{} (repeat {repeat}): {e:#}", access_log::ROW_ON);
                println!("bench: FAILED {msg}");
                info.failures.push(msg);
            }
        }
    }
    drop(bed);
    info.elapsed_s = rows_s;
    let out = opts.out.clone().unwrap_or_else(root);
    report::write(&out, &samples, &info)?;
    access_log::write_summary(&out, &samples)?;
    // `report::write` says so when it left BENCHMARKS.md and the chart as they were.
    let written = if info.rows.is_empty() {
        out.join("bench/results.csv").display().to_string()
    } else {
        format!(
            "{}, {} and {}",
            out.join("bench/results.csv").display(),
            out.join("BENCHMARKS.md").display(),
            out.join("bench/benchmarks.png").display()
        )
    };
    println!(
        "bench: wrote {written} ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Raises the bench's own descriptor limit (soft and hard) to [`NOFILE`] before any
/// proxy is started, so that every proxy inherits it; where raising the hard limit is
/// not permitted (no `CAP_SYS_RESOURCE`, as in some containers), the soft limit is
/// raised to the hard one. Returns the limit now in force.
fn raise_nofile() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= NOFILE && hard >= NOFILE {
        return Ok(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, NOFILE, NOFILE) {
        Ok(()) => {
            println!("bench: open-file limit {soft}/{hard} raised to {NOFILE}");
            Ok(NOFILE)
        }
        Err(e) => {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
                .context("raising the open-file soft limit to the hard limit")?;
            println!(
                "bench: open-file limit {soft}/{hard}: raising it to {NOFILE} was refused \
                 ({e}); soft limit raised to {hard}, the idle measurement holds {} \
                 connections",
                many::idle_conns(hard)
            );
            Ok(hard)
        }
    }
}

/// Whether a row takes the idle-connection and many-connection measurements: no proxy,
/// sockgate's three paths and the peers that hold thousands of connections in one
/// process, `HAProxy` by its forced splice row (the splice(2) reference). socat forks a
/// process per connection; `HAProxy` without splice or with splice-auto and sockgate
/// auto would measure like `HAProxy` forced splice and sockgate splice, for time a full
/// run does not have.
fn many_row(proxy: &Proxy) -> bool {
    matches!(
        proxy,
        Proxy::Direct
            | Proxy::Sockgate("sockmap" | "splice" | "forward")
            | Proxy::Haproxy(HaSplice::Forced)
            | Proxy::Nginx
            | Proxy::Envoy(_)
    )
}

/// The idle-connection figures of one row: `t.idle_conns` connections over the
/// echo services, each echoed one byte, held idle; the footprint before and after.
/// Returns the connections, still open, for [`many_connections`].
fn idle_connections(
    bed: &Bed,
    proxy: &Proxy,
    running: Option<&peers::Running>,
    t: Timing,
    push: &mut impl FnMut(&'static str, f64, Load),
) -> anyhow::Result<many::Conns> {
    let pids = running.map(peers::Running::pids).unwrap_or_default();
    let status = match proxy {
        Proxy::Sockgate(_) => running.map(peers::Running::status_reader).transpose()?,
        _ => None,
    };
    let table = || {
        status
            .as_ref()
            .map_or(Ok(0), peers::StatusReader::forward_table_entries)
    };
    let load = measure::wait_quiet(t.quiet_max);
    let before = many::footprint(&pids, bed.node(), table)?;
    let targets = echo_targets(bed, proxy);
    let conns = many::Conns::open(bed.client(), targets, t.idle_conns, Duration::from_mins(1))?;
    // Let the proxies finish what a connection's start leaves (pool returns, timers).
    std::thread::sleep(Duration::from_secs(1));
    let after = many::footprint(&pids, bed.node(), table)?;
    let (opened, failed) = (conns.opened, conns.failed);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096);
    let p = after
        .per_connection(&before, opened, page)
        .context("no idle connection opened")?;
    println!(
        "bench: {}: {opened} idle connections ({failed} failed): per connection {:.2} fd, \
         {:.2} KiB proxy RSS, {:.2} KiB slab, {:.2} KiB TCP memory, {:.2} node sockets, \
         {:.2} forward table entries",
        proxy.name(),
        p.fds,
        p.rss_kib,
        p.slab_kib,
        p.tcp_kib,
        p.node_sockets,
        p.table_entries
    );
    push("idle_conns", opened as f64, load);
    push("idle_fds", p.fds, load);
    push("idle_rss", p.rss_kib, load);
    push("idle_slab", p.slab_kib, load);
    push("idle_tcp_mem", p.tcp_kib, load);
    push("idle_node_socks", p.node_sockets, load);
    if status.is_some() {
        push("idle_table", p.table_entries, load);
    }
    many::check_opened(proxy.name(), opened, failed, t.idle_conns)?;
    Ok(conns)
}

/// The echo services' addresses as the client reaches them through `proxy`.
fn echo_targets(bed: &Bed, proxy: &Proxy) -> Vec<SocketAddr> {
    ECHO.iter()
        .map(|s| match proxy {
            Proxy::Direct => SocketAddr::new(bed.backend_addr(0).into(), s.backend_port),
            _ => SocketAddr::new(bed.node_addr().into(), s.listen_port),
        })
        .collect()
}

/// Time for the proxy and the kernel to finish closing the connections the last
/// [`many::Conns::keep`] closed, before the next measurement.
pub const CLOSE_SETTLE: Duration = Duration::from_millis(700);

/// The fixed-rate request/response runs of one row, one per [`many::MANY_COUNTS`],
/// largest first, over the idle measurement's `conns` (the others closed first):
/// latency percentiles and CPU per transaction (the proxy's processes, kernel workers
/// and the machine's softirq time, as for CPU per GB).
fn many_connections(
    conns: &many::Conns,
    proxy: &Proxy,
    pids: &[u32],
    t: Timing,
    push: &mut impl FnMut(&'static str, f64, Load),
) -> anyhow::Result<()> {
    for n in many::MANY_COUNTS.into_iter().rev() {
        let open = conns.keep(n)?;
        anyhow::ensure!(
            open >= n,
            "{}: only {open} of {n} connections left open",
            proxy.name()
        );
        std::thread::sleep(CLOSE_SETTLE);
        let load = measure::wait_quiet(t.quiet_max);
        let before = measure::cpu_snapshot(pids);
        let r = conns.load(many::MANY_RATE, t.many_secs)?;
        let after = measure::cpu_snapshot(pids);
        anyhow::ensure!(r.txns > 0, "{n} connections: no transaction answered");
        let hz = measure::ticks_per_sec();
        let us_per_txn = |a: u64, b: u64| a.saturating_sub(b) as f64 / hz * 1e6 / r.txns as f64;
        let proxy_us = us_per_txn(after.proxy, before.proxy);
        let all = proxy_us
            + us_per_txn(after.kworker, before.kworker)
            + us_per_txn(after.softirq, before.softirq);
        let p50 = many::percentile(&r.latencies_us, 50.0).unwrap_or(0);
        let p99 = many::percentile(&r.latencies_us, 99.0).unwrap_or(0);
        let rate = r.txns as f64 / r.secs;
        println!(
            "bench: {}: {n} connections at {} req/s: {} answered ({rate:.0}/s), {} late, \
             {} failed; p50 {p50} µs, p99 {p99} µs; CPU {all:.1} µs/txn ({proxy_us:.1} in \
             the proxy's processes)",
            proxy.name(),
            many::MANY_RATE,
            r.txns,
            r.late,
            r.failed
        );
        let [cpu, cpu_proxy, k50, k99, krate] = many_keys(n);
        push(cpu, all, load);
        push(cpu_proxy, proxy_us, load);
        push(k50, f64::from(p50), load);
        push(k99, f64::from(p99), load);
        push(krate, rate, load);
    }
    Ok(())
}

/// One SYN flood from [`peers::FLOODER`] to the exchange listener, which the running
/// sockgate's guard denies; the drops are read from its counters.
fn flood(
    bed: &Bed,
    r: &mut peers::Running,
    t: Timing,
) -> anyhow::Result<(measure::FloodResult, Load)> {
    let load = measure::wait_quiet(t.quiet_max);
    let dst = std::net::SocketAddrV4::new(bed.node_addr(), EXCHANGE.listen_port);
    let f = with_rps(bed, || {
        measure::syn_flood(bed.client(), peers::FLOODER, dst, 0, t.flood_secs, || {
            r.xdp_denied().map(|(_, d)| d)
        })
    })?;
    r.check_alive()?;
    match r.xdp_denied_by_cpu() {
        Ok(by_cpu) => {
            println!("bench: SYNs the guard dropped by CPU (the sender ran on CPU 0): {by_cpu:?}");
        }
        Err(e) => println!("bench: per-CPU guard counters not read: {e:#}"),
    }
    Ok((f, load))
}

/// The metrics of one flood (printed too).
fn flood_metrics(row: &str, f: &measure::FloodResult) -> Vec<(&'static str, f64)> {
    println!(
        "bench: {row}: {} SYNs sent, {} dropped by the guard in {:.2} s, softirq {:.2} CPU s",
        f.sent, f.counted, f.secs, f.softirq_s
    );
    let mut m = vec![
        ("syn_drop_rate", f.counted as f64 / f.secs),
        ("syn_sent_rate", f.sent as f64 / f.secs),
        ("syn_drop_softirq", f.softirq_s / f.secs),
    ];
    if f.softirq_s > 0.0 {
        m.push(("syn_drop_per_core", f.counted as f64 / f.softirq_s));
    }
    m
}

/// Exchanges of the other client: one every 20 ms, each given a second.
const FLOOD_CLIENT_EVERY: Duration = Duration::from_millis(20);

/// One SYN flood from [`peers::FLOODER`] to the exchange listener of sockgate
/// `--datapath forward` (no guard), while the bench's client makes one exchange with
/// the same listener every [`FLOOD_CLIENT_EVERY`] and the connection table's size is
/// read every 100 ms from `sockgate status`.
fn forward_flood(
    bed: &Bed,
    r: &mut peers::Running,
    t: Timing,
) -> anyhow::Result<(Vec<(&'static str, f64)>, Load)> {
    let load = measure::wait_quiet(t.quiet_max);
    let status = r.status_reader()?;
    let (_, nat0, full0) = status.forward_refusals()?;
    let dst = std::net::SocketAddrV4::new(bed.node_addr(), EXCHANGE.listen_port);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other =
        measure::exchanges_until(bed.client(), dst.into(), stop.clone(), FLOOD_CLIENT_EVERY)?;
    let sampler = {
        let (status, stop) = (status.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            // Bounded: at most one read per 100 ms for the flood's time and a margin.
            for _ in 0..6000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                peak = peak.max(status.forward_table_entries().unwrap_or(0));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let flood = measure::syn_flood(bed.client(), peers::FLOODER, dst, 0, t.flood_secs, || {
        status.forward_refusals().map(|(opened, _, _)| opened)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("table sampler panicked"))?;
    let (ok, failed) = other
        .join()
        .map_err(|_| anyhow::anyhow!("the other client panicked"))?;
    let f = flood?;
    r.check_alive()?;
    let (_, nat1, full1) = status.forward_refusals()?;
    let refused = nat1.saturating_sub(nat0) + full1.saturating_sub(full0);
    let tried = ok + failed;
    println!(
        "bench: forward SYN flood: {} SYNs sent in {:.2} s, {} connections opened, table \
         peak {peak} entries, {refused} SYNs refused (NAT ports or table), the other \
         client served {ok} of {tried}",
        f.sent, f.secs, f.counted
    );
    let mut m = vec![
        ("syn_sent_rate", f.sent as f64 / f.secs),
        ("syn_drop_softirq", f.softirq_s / f.secs),
        ("fwd_flood_opened", f.counted as f64),
        ("fwd_flood_table_peak", peak as f64),
        ("fwd_flood_refused", refused as f64),
        ("fwd_flood_tried", tried as f64),
    ];
    if tried > 0 {
        m.push(("fwd_flood_served", 100.0 * ok as f64 / tried as f64));
    }
    Ok((m, load))
}

/// Runs `f` with receive packet steering on the node's client-side interface sending
/// every packet to CPU 1 (the flooder runs on CPU 0), so that the guard's work in
/// generic mode lands on the other core; steering is off again afterwards. On a
/// machine with one CPU, `f` runs without it.
fn with_rps<R>(bed: &Bed, f: impl FnOnce() -> anyhow::Result<R>) -> anyhow::Result<R> {
    let steer = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) >= 2;
    let set = |mask: &str| {
        netbed::ip(&[
            "netns",
            "exec",
            bed.node().name(),
            "sh",
            "-c",
            &format!("echo {mask} > /sys/class/net/c0/queues/rx-0/rps_cpus"),
        ])
    };
    if steer {
        set("2")?;
    }
    let r = f();
    if steer {
        set("0")?;
    }
    r
}

/// The version of sockgate (with the commit it was built from) and of every tool, by
/// its version number only.
fn versions(proxies: &[Proxy], sockgate: &std::path::Path) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if let Some(version) = peers::version(Command::new(sockgate).arg("--version")) {
        let commit = Command::new("git")
            .current_dir(root())
            .args(["describe", "--always", "--dirty"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        v.push((
            "sockgate".to_owned(),
            match commit {
                Some(c) => format!("{version} (commit {c}, release build)"),
                None => format!("{version} (release build)"),
            },
        ));
    }
    let mut add = |name: &str, cmd: &mut Command| {
        if let Some(version) = peers::version(cmd) {
            v.push((name.to_owned(), version));
        }
    };
    add("iperf3", Command::new("iperf3").arg("--version"));
    add("sockperf", Command::new("sockperf").arg("--version"));
    add("HAProxy", Command::new("haproxy").arg("-v"));
    add("nginx", Command::new("nginx").arg("-v"));
    add("socat", Command::new("socat").arg("-V"));
    for p in proxies {
        if let Proxy::Envoy(bin) = p {
            add("Envoy", Command::new(bin).arg("--version"));
        }
    }
    v
}

/// Runs one repeat of one row; returns sockgate's connection counts by data path.
#[expect(
    clippy::too_many_lines,
    reason = "one row's measurements, in order, with the guard rows' subsets"
)]
fn run_row(
    bed: &Bed,
    proxy: &Proxy,
    sockgate: &std::path::Path,
    opts: &Options,
    repeat: u32,
    t: Timing,
    samples: &mut Vec<Sample>,
) -> anyhow::Result<Option<peers::Paths>> {
    let mut running = peers::start(proxy, bed, &SERVICES, sockgate)?;
    if let Some(r) = running.as_ref()
        && matches!(proxy, Proxy::Sockgate(_) | Proxy::SockgateVariant(_))
        && opts.verdict_attach == peers::VerdictAttach::Skb
    {
        r.reattach_verdict_as_skb()?;
    }
    let addr = |s: Service| {
        if proxy.direct() {
            SocketAddr::new(bed.backend_addr(0).into(), s.backend_port)
        } else {
            SocketAddr::new(bed.node_addr().into(), s.listen_port)
        }
    };
    let pids = running
        .as_ref()
        .map(peers::Running::pids)
        .unwrap_or_default();
    let row = proxy.name();
    let mut push = |metric: &'static str, value: f64, load: Load| {
        samples.push(Sample {
            row: row.to_owned(),
            metric,
            repeat,
            value,
            load,
        });
    };
    // A node-local row's client is a process of the node namespace, where the proxy
    // runs; every other row's client is in the client namespace.
    let client = if proxy.node_local() {
        bed.node()
    } else {
        bed.client()
    };

    if let Proxy::SynFlood(_) = proxy {
        let r = running.as_mut().context("sockgate runs")?;
        let (f, load) = flood(bed, r, t)?;
        for (metric, value) in flood_metrics(row, &f) {
            push(metric, value, load);
        }
        drop(running);
        std::thread::sleep(Duration::from_millis(500));
        return Ok(None);
    }
    if let Proxy::ForwardFlood = proxy {
        let r = running.as_mut().context("sockgate runs")?;
        let (metrics, load) = forward_flood(bed, r, t)?;
        for (metric, value) in metrics {
            push(metric, value, load);
        }
        drop(running);
        std::thread::sleep(Duration::from_millis(500));
        return Ok(None);
    }

    let load = measure::wait_quiet(t.quiet_max);
    let before = measure::cpu_snapshot(&pids);
    let (bps, bytes) =
        measure::iperf(client, addr(IPERF), 1, t.iperf_secs).context("iperf3 -P 1")?;
    let after = measure::cpu_snapshot(&pids);
    push("tput_1", bps / 1e9, load);
    let gb = bytes / 1e9;
    if gb > 0.0 {
        let hz = measure::ticks_per_sec();
        let per_gb = |a: u64, b: u64| a.saturating_sub(b) as f64 / hz / gb;
        let proxy_s = per_gb(after.proxy, before.proxy);
        let kworker = per_gb(after.kworker, before.kworker);
        let softirq = per_gb(after.softirq, before.softirq);
        push("cpu_per_gb", proxy_s + kworker + softirq, load);
        push("cpu_proxy_per_gb", proxy_s, load);
        push("cpu_kworker_per_gb", kworker, load);
        push("cpu_softirq_per_gb", softirq, load);
        push(
            "cpu_machine_per_gb",
            per_gb(after.machine, before.machine),
            load,
        );
    }

    // The guard rows measure what the guard changes: 1-stream throughput (and its
    // CPU) and RR latency.
    let guard_row = matches!(proxy, Proxy::SockgateGuard(_));
    if !guard_row {
        let load = measure::wait_quiet(t.quiet_max);
        let (bps, _) =
            measure::iperf(client, addr(IPERF), 4, t.iperf_secs).context("iperf3 -P 4")?;
        push("tput_4", bps / 1e9, load);
    }

    let load = measure::wait_quiet(t.quiet_max);
    let (p50, p99) = measure::sockperf(client, addr(SOCKPERF), t.rr_secs).context("sockperf")?;
    push("rr_p50", p50, load);
    push("rr_p99", p99, load);
    if guard_row {
        let paths = running.as_mut().and_then(|r| {
            r.check_alive().ok()?;
            r.sockgate_paths()
        });
        drop(running);
        std::thread::sleep(Duration::from_millis(500));
        return Ok(paths);
    }

    let load = measure::wait_quiet(t.quiet_max);
    let (rate, failed) = measure::conn_rate(client, addr(EXCHANGE), t.conn_secs)?;
    push("conn_rate", rate, load);
    push("conn_failures", failed as f64, load);

    // The node-local rows measure what the shortcut is for: throughput, latency and
    // new connections of a client on the node (the slow receiver and the idle and
    // many-connection runs are the remote client's).
    if proxy.node_local() {
        if let Some(r) = running.as_ref()
            && let Some(l) = r.local_shortcut()?
        {
            println!(
                "bench: {row}: node-local shortcut: {} clients, {} switched, {} sends \
                 redirected, {} sends passed over loopback, {} redirect failures",
                l["clients"],
                l["switches"],
                l["msgs_redirected"],
                l["msgs_passed"],
                l["redirect_failures"]
            );
            push(
                "local_switches",
                l["switches"].as_f64().unwrap_or(0.0),
                load,
            );
        }
        return end_row(running);
    }

    let load = measure::wait_quiet(t.quiet_max);
    let slow = measure::slow_receiver(client, addr(SLOW), t.slow_secs).context("slow receiver")?;
    let mib = 1024.0 * 1024.0;
    push("slow_tcp_mem", slow.tcp_growth / mib, load);
    push("slow_used_mem", slow.used_growth / mib, load);
    push("slow_sent", slow.sent / mib, load);
    push("slow_queued", slow.queued / mib, load);
    push("slow_capped", f64::from(u8::from(slow.capped)), load);
    if slow.capped {
        println!(
            "bench: {row}: slow receiver stopped early: memory grew past {} MiB",
            measure::SLOW_CAP / mib
        );
    }

    if many_row(proxy) {
        let idle_started = Instant::now();
        let conns = idle_connections(bed, proxy, running.as_ref(), t, &mut push)?;
        let many_started = Instant::now();
        many_connections(&conns, proxy, &pids, t, &mut push)?;
        drop(conns);
        // The forward path keeps a closed connection's entries and NAT port for 2 s.
        std::thread::sleep(Duration::from_millis(
            if matches!(proxy, Proxy::Sockgate("forward")) {
                2_500
            } else {
                500
            },
        ));
        println!(
            "bench: {row}: idle connections took {:.1} s, many connections {:.1} s",
            (many_started - idle_started).as_secs_f64(),
            many_started.elapsed().as_secs_f64()
        );
    }

    end_row(running)
}

/// The end of a row: checks the proxy is still alive, reads sockgate's connections by
/// data path, stops the proxy and lets the kernel free what the row's connections held
/// before the next row.
fn end_row(mut running: Option<peers::Running>) -> anyhow::Result<Option<peers::Paths>> {
    let paths = match running.as_mut() {
        Some(r) => {
            r.check_alive()?;
            r.sockgate_paths()
        }
        None => None,
    };
    drop(running);
    std::thread::sleep(Duration::from_millis(500));
    Ok(paths)
}
