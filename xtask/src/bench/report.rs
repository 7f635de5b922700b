//! Writes the bench results: `bench/results.csv` (every sample, then min / median / max
//! per row and metric), `BENCHMARKS.md` (tables, ratios, targets, machine) and the chart
//! (drawn by [`super::chart`]).
use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;

use super::{
    METRICS, RunInfo, Sample,
    stats::{Stats, num, stats},
};

fn unit(metric: &str) -> &'static str {
    METRICS.iter().find(|m| m.0 == metric).map_or("", |m| m.2)
}

fn write_csv(path: &Path, samples: &[Sample], stats: &Stats) -> anyhow::Result<()> {
    let mut csv = String::from("row,metric,unit,sample,value,load1,busy_pct\n");
    for s in samples {
        let _ = writeln!(
            csv,
            "{},{},{},{},{:.6},{:.2},{:.1}",
            s.row,
            s.metric,
            unit(s.metric),
            s.repeat,
            s.value,
            s.load.load1,
            s.load.busy_pct
        );
    }
    for ((row, metric), st) in stats {
        for (name, v) in [("min", st.min), ("median", st.median), ("max", st.max)] {
            let _ = writeln!(csv, "{row},{metric},{},{name},{v:.6},,", unit(metric));
        }
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map_or("unknown", str::trim)
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or_else(String::new, |kib| {
            format!("{:.1} GiB", kib / 1024.0 / 1024.0)
        });
    vec![
        ("CPU".into(), format!("{cores} cores, {model}")),
        ("kernel".into(), kernel),
        ("memory".into(), mem),
    ]
}

/// The peers: rows that are neither the limit nor sockgate.
fn is_peer(row: &str) -> bool {
    !row.starts_with("direct") && !row.starts_with("sockgate")
}

fn cell(stats: &Stats, row: &str, metric: &'static str) -> String {
    stats
        .get(&(row.to_owned(), metric))
        .map_or("–".into(), |s| {
            if s.n > 1 {
                format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
            } else {
                num(s.median)
            }
        })
}

fn median(stats: &Stats, row: &str, metric: &'static str) -> Option<f64> {
    stats.get(&(row.to_owned(), metric)).map(|s| s.median)
}

fn ratio(stats: &Stats, row: &str, base: &str, metric: &'static str) -> String {
    match (median(stats, row, metric), median(stats, base, metric)) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

const HEADLINE: &[&str] = &[
    "tput_1",
    "tput_4",
    "rr_p50",
    "rr_p99",
    "conn_rate",
    "cpu_per_gb",
    "slow_queued",
];

fn title(metric: &str) -> String {
    METRICS
        .iter()
        .find(|m| m.0 == metric)
        .map_or_else(|| metric.to_owned(), |m| format!("{} ({})", m.1, m.2))
}

/// A Markdown table's header: a `row` column, then `columns`.
fn table_header(md: &mut String, columns: impl IntoIterator<Item = String>) {
    md.push_str("| row |");
    let mut n = 0;
    for c in columns {
        let _ = write!(md, " {c} |");
        n += 1;
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(n));
    md.push('\n');
}

fn table(
    md: &mut String,
    info: &RunInfo,
    metrics: &[&'static str],
    f: impl Fn(&str, &'static str) -> String,
) {
    table_header(md, metrics.iter().map(|m| title(m)));
    for row in &info.rows {
        let cells: Vec<String> = metrics.iter().map(|m| f(row, m)).collect();
        // Rows that measure none of these metrics (the SYN flood rows) are left out.
        if cells.iter().all(|c| c == "–") {
            continue;
        }
        let _ = write!(md, "| {row} |");
        for c in cells {
            let _ = write!(md, " {c} |");
        }
        md.push('\n');
    }
}

fn targets(md: &mut String, stats: &Stats) {
    let kernel = "sockgate kernel";
    let direct = "direct";
    let vs_direct = |metric| match (median(stats, kernel, metric), median(stats, direct, metric)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut rows: Vec<(String, String, Option<bool>)> = Vec::new();
    for (metric, what) in [("tput_1", "1 stream"), ("tput_4", "4 streams")] {
        let v = vs_direct(metric);
        rows.push((
            format!("{what} throughput ≥ 0.9x direct"),
            v.map_or("–".into(), |x| format!("{x:.2}x")),
            v.map(|x| x >= 0.9),
        ));
    }
    let v = vs_direct("rr_p50");
    rows.push((
        "RR p50 ≤ 1.2x direct".into(),
        v.map_or("–".into(), |x| format!("{x:.2}x")),
        v.map(|x| x <= 1.2),
    ));
    let v = vs_direct("conn_rate");
    rows.push((
        "new connections/s ≥ 0.8x direct".into(),
        v.map_or("–".into(), |x| format!("{x:.2}x")),
        v.map(|x| x >= 0.8),
    ));
    let best_peer = stats
        .iter()
        .filter(|((row, m), _)| *m == "cpu_per_gb" && is_peer(row))
        .map(|((row, _), s)| (row.clone(), s.median))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let kcpu = median(stats, kernel, "cpu_per_gb");
    rows.push(match (kcpu, &best_peer) {
        (Some(cpu), Some((peer, best))) if *best > 0.0 => (
            format!(
                "CPU per GB ≤ 0.5x the best peer's ({peer}, {} s/GB)",
                num(*best)
            ),
            format!("{} s/GB = {:.2}x", num(cpu), cpu / best),
            Some(cpu / best <= 0.5),
        ),
        _ => ("CPU per GB ≤ 0.5x the best peer's".into(), "–".into(), None),
    });
    let mem = stats.get(&(kernel.to_owned(), "slow_queued"));
    rows.push((
        "kernel memory with a slow receiver bounded".into(),
        mem.map_or("–".into(), |s| {
            format!(
                "peak {} MiB held between writer and reader (max {})",
                num(s.median),
                num(s.max)
            )
        }),
        None,
    ));
    md.push_str("| target (sockgate kernel) | measured (medians) | met |\n|---|---|---|\n");
    for (target, measured, met) in rows {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "see text",
        };
        let _ = writeln!(md, "| {target} | {measured} | {met} |");
    }
}

/// The XDP listener guard's rows: its cost on the data path against the same sockgate
/// without it, and its SYN drop rate.
fn guard(md: &mut String, stats: &Stats, info: &RunInfo) {
    let base = super::GUARD_BASE_ROW;
    let with: Vec<&String> = info
        .rows
        .iter()
        .filter(|r| r.starts_with("sockgate auto + guard"))
        .collect();
    let floods: Vec<&String> = info
        .rows
        .iter()
        .filter(|r| r.starts_with("guard SYN drop"))
        .collect();
    if with.is_empty() && floods.is_empty() {
        return;
    }
    md.push_str("\n## The XDP listener guard\n\n");
    if !with.is_empty() {
        let metrics = ["tput_1", "rr_p50", "rr_p99", "cpu_per_gb"];
        table_header(
            md,
            metrics
                .iter()
                .flat_map(|m| [title(m), format!("vs {base}")]),
        );
        for row in std::iter::once(&base.to_owned()).chain(with.iter().copied()) {
            let _ = write!(md, "| {row} |");
            for m in metrics {
                let _ = write!(
                    md,
                    " {} | {} |",
                    cell(stats, row, m),
                    ratio(stats, row, base, m)
                );
            }
            md.push('\n');
        }
        md.push_str(
            "\n`gw_xdp` attached to the node's interface towards the client (`--xdp-iface \
             c0`) in generic or native mode, every listener with a deny range no client is \
             in (each SYN takes the deny lookup, every packet to a listener is counted). \
             Native XDP on veth turns TSO/GSO off on the peer veth (the client's end), so \
             the client's stack cuts its stream into MTU-sized segments: that, not the \
             program, is what the native row's throughput loses. Generic mode runs after \
             the skb is built and leaves the offloads alone, but the kernel makes every \
             non-linear skb linear, with 256 bytes of headroom, before running the program \
             (`netif_receive_generic_xdp`, net/core/dev.c): a copy, seen as CPU rather \
             than throughput while the proxy is the limit. See `docs/xdp.md`.\n",
        );
    }
    if !floods.is_empty() {
        let metrics = [
            "syn_drop_rate",
            "syn_sent_rate",
            "syn_drop_softirq",
            "syn_drop_per_core",
        ];
        md.push('\n');
        table_header(md, metrics.iter().map(|m| title(m)));
        for row in floods {
            let _ = write!(md, "| {row} |");
            for m in metrics {
                let _ = write!(md, " {} |", cell(stats, row, m));
            }
            md.push('\n');
        }
        let secs = info.timing.map_or(0.0, |t| t.flood_secs);
        let _ = writeln!(
            md,
            "\nOne thread of the client namespace, pinned to CPU 0, sends hand-made SYNs \
             through a raw socket from an address the guard denies (netbed's `syn_flood`, \
             {secs} s, at most {} SYNs); receive packet steering on the node's `c0` sends \
             them to CPU 1 during the flood, so in generic mode the guard drops on the \
             other core (native XDP on veth runs in the veth's NAPI before steering, on \
             the sender's core). *Dropped per second* is the guard's `dropped_denied` \
             counter over the flood's time; *softirq CPU* is the whole machine's softirq \
             time from `/proc/stat` (tick-sampled) over the same time, in cores; *per \
             softirq CPU second* divides the drops by it: what one core busy in softirq \
             drops. The sender (a syscall per SYN) is the limit of the rate, not the guard.",
            super::measure::FLOOD_MAX
        );
    }
}

/// The SYN flood against a forward listener: how far the connection table grew and
/// whether another client was served meanwhile.
fn forward_flood(md: &mut String, stats: &Stats, info: &RunInfo) {
    let rows: Vec<&String> = info
        .rows
        .iter()
        .filter(|r| r.as_str() == "forward SYN flood")
        .collect();
    if rows.is_empty() {
        return;
    }
    md.push_str("\n## The forward path under a SYN flood\n\n");
    let metrics = [
        "syn_sent_rate",
        "fwd_flood_opened",
        "fwd_flood_table_peak",
        "fwd_flood_refused",
        "fwd_flood_served",
        "fwd_flood_tried",
        "syn_drop_softirq",
    ];
    table_header(md, metrics.iter().map(|m| title(m)));
    for row in rows {
        let _ = write!(md, "| {row} |");
        for m in metrics {
            let _ = write!(md, " {} |", cell(stats, row, m));
        }
        md.push('\n');
    }
    let secs = info.timing.map_or(0.0, |t| t.flood_secs);
    let _ = writeln!(
        md,
        "\nsockgate `--datapath forward` (no guard); the same sender as the guard's rows \
         sends hand-made SYNs for {secs} s from {} to the exchange listener, cycling \
         through {} source ports (netbed's `syn_flood`), so the flood is at most that \
         many connections at a time. Each SYN the forward program does not know opens a connection (two \
         table entries, a NAT port); the backend's SYN-ACK goes back to the flooder's \
         address, whose stack answers with a reset. *Table entries, peak* is \
         `forward_table_entries` of `sockgate status`, read every 100 ms; *refused* is \
         the listener's `nat_exhausted` + `table_full` counters over the flood. \
         Meanwhile the bench's client makes one exchange with the same listener every \
         20 ms (1 s allowed each): *answered* is the share that got their answer.",
        super::peers::FLOODER,
        netbed::raw::PORTS,
    );
}

/// The idle-connection and many-connection rows: what an idle connection costs, and
/// request/response at a fixed rate over many connections.
fn many_connections(md: &mut String, stats: &Stats, info: &RunInfo) {
    use super::many;
    let idle = [
        "idle_conns",
        "idle_fds",
        "idle_rss",
        "idle_slab",
        "idle_tcp_mem",
        "idle_node_socks",
        "idle_table",
    ];
    if !info
        .rows
        .iter()
        .any(|r| stats.contains_key(&(r.clone(), "idle_conns")))
    {
        return;
    }
    let held = info.timing.map_or(many::IDLE_CONNS, |t| t.idle_conns);
    let _ = writeln!(md, "\n## Idle connections ({} at once)\n", num(held as f64));
    table(md, info, &idle, |row, m| cell(stats, row, m));
    let _ = writeln!(
        md,
        "\nThe client opens {} connections over three echo listeners ({} at a time), \
         sends one byte on each and reads its echo, then holds them all idle; one second \
         later the bench reads the footprint again and divides the growth by the \
         connections held. *Descriptors* and *RSS* are the proxy's process tree's \
         (`/proc/PID/fd`, `VmRSS`); *slab* is the machine's `SUnreclaim` (`/proc/meminfo`; \
         sockets live there, so it counts the client's and the backend's sockets too, \
         which *direct* shows alone, and anything else the machine allocated meanwhile); \
         *TCP memory* is the `mem` pages of `/proc/net/sockstat` (queued data: idle \
         connections hold none); *sockets in the node namespace* is its sockstat `inuse`; \
         *forward table entries* is `forward_table_entries` of `sockgate status`. The \
         bench raised its descriptor limit to {} (soft = hard), which the proxies \
         inherit{}; HAProxy runs with `maxconn {}` and `maxpipes {}` (a pipe goes back to its \
         pool once empty), nginx with `worker_connections 30000`, Envoy's clusters with \
         circuit breakers at 100,000 connections (1,024 by default). socat is left out: it \
         forks a process per connection, {} processes here.",
        num(held as f64),
        64,
        num(info.nofile as f64),
        if held < many::IDLE_CONNS {
            format!(
                " (raising it to {} was refused: no `CAP_SYS_RESOURCE`); a proxy holds two \
                 descriptors per connection, so the run holds {} connections, not {}",
                num(super::NOFILE as f64),
                num(held as f64),
                num(many::IDLE_CONNS as f64)
            )
        } else {
            String::new()
        },
        super::peers::haproxy_maxconn(info.nofile),
        super::peers::HAPROXY_MAXPIPES,
        num(held as f64),
    );
    for n in many::MANY_COUNTS {
        let keys = super::many_keys(n);
        if !info
            .rows
            .iter()
            .any(|r| stats.contains_key(&(r.clone(), keys[0])))
        {
            continue;
        }
        let _ = writeln!(
            md,
            "\n## {} connections, request/response at {} per second in all\n",
            num(n as f64),
            num(many::MANY_RATE)
        );
        table(md, info, &keys, |row, m| cell(stats, row, m));
        let cpu = keys[0];
        let (kernel, splice) = (
            median(stats, "sockgate kernel", cpu),
            median(stats, "sockgate splice", cpu),
        );
        if let (Some(k), Some(s)) = (kernel, splice)
            && k > 0.0
        {
            let verdict = if s / k >= 1.5 {
                "the kernel path wins (at least 1.5x less CPU per transaction)"
            } else if s > k {
                "the kernel path spends less, but not 1.5x less"
            } else {
                "the kernel path does not win"
            };
            let _ = writeln!(
                md,
                "\nCPU per transaction, sockgate splice / sockgate kernel: {:.2}x: {verdict}.",
                s / k
            );
        }
    }
    if let Some(t) = info.timing {
        many_connections_note(md, t);
    }
}

/// How the fixed-rate request/response runs over many connections are made.
fn many_connections_note(md: &mut String, t: super::Timing) {
    use super::many;
    let _ = writeln!(
        md,
        "\nThe client (one thread, tokio, in the client namespace) keeps N of the idle \
         measurement's connections open (5,000, then 1,000; the others closed {} ms \
         before), then sends a {}-byte request on each in turn \
         so that {} requests per second leave in all (each connection once every \
         N/{} s, staggered evenly), for {} s; each waits for its echo (the backend, one \
         tokio thread, echoes). *Latency* is from the send to the whole echo; a send that \
         would start a whole period late is skipped (the CSV keeps the rate reached). \
         *CPU per transaction* is, as for CPU per GB, the proxy's processes + all \
         `kworker` threads + the machine's softirq time over the run, divided by the \
         transactions answered; the proxy part alone is the next column. *direct* shows \
         what the client's and the backend's own stacks cost.",
        super::CLOSE_SETTLE.as_millis(),
        many::REQUEST_BYTES,
        num(many::MANY_RATE),
        num(many::MANY_RATE),
        t.many_secs
    );
}

/// The report's first paragraph: the command, when, the repeats and the seconds its
/// rows took ([`RunInfo::elapsed_s`]).
fn run_line(info: &RunInfo) -> String {
    format!(
        "Written by `cargo xtask bench{}` on {} ({} repeat(s), interleaved; {:.0} s of \
         measuring in all). Each cell is the median, with min–max over the repeats in \
         brackets. Ratios are of medians. Raw samples and the machine load before each \
         one: [`bench/results.csv`](bench/results.csv).\n\n",
        if info.quick { " --quick" } else { "" },
        info.started,
        info.repeats,
        info.elapsed_s
    )
}

/// Writes the three result files under `out`; with no row of the report selected
/// (only the access log's, say) `bench/results.csv` alone, and `BENCHMARKS.md` and the
/// chart stay as they were.
#[expect(
    clippy::too_many_lines,
    reason = "the report's sections, in reading order"
)]
pub fn write(out: &Path, samples: &[Sample], info: &RunInfo) -> anyhow::Result<()> {
    let dir = out.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stats = stats(samples);
    write_csv(&dir.join("results.csv"), samples, &stats)?;
    if info.rows.is_empty() {
        println!("bench: no row of BENCHMARKS.md selected: it and the chart are left as they were");
        return Ok(());
    }
    // The SYN flood rows have none of the chart's metrics.
    let chart_rows: Vec<String> = info
        .rows
        .iter()
        .filter(|r| stats.contains_key(&((*r).clone(), "tput_1")))
        .cloned()
        .collect();
    let chart_note = match super::chart::draw(&dir.join("benchmarks.png"), &stats, &chart_rows) {
        Ok(()) => None,
        Err(e) => {
            println!("bench: chart not drawn: {e:#}");
            Some(format!("{e:#}"))
        }
    };

    let mut md = String::from("# Benchmarks\n\n");
    md.push_str(&run_line(info));
    md.push_str("| machine | |\n|---|---|\n");
    for (k, v) in machine() {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    for (k, v) in &info.versions {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push('\n');
    if !info.settings.is_empty() {
        let _ = writeln!(
            md,
            "**Experiment settings of this run:** {}.\n",
            info.settings.join("; ")
        );
    }
    match chart_note {
        None => md.push_str(
            "![medians per row: throughput, latency, connections, CPU per GB, memory](bench/benchmarks.png)\n\n",
        ),
        Some(e) => {
            let _ = writeln!(md, "The chart could not be drawn: {e}\n");
        }
    }
    md.push_str("## Results\n\n");
    table(&mut md, info, HEADLINE, |row, m| cell(&stats, row, m));
    md.push_str("\n## Ratios against direct (no proxy: the limit)\n\n");
    table(&mut md, info, HEADLINE, |row, m| {
        let base = if row.ends_with(super::peers::NODE_LOCAL) {
            super::peers::NODE_LOCAL_DIRECT
        } else {
            "direct"
        };
        ratio(&stats, row, base, m)
    });
    if info
        .rows
        .iter()
        .any(|r| r.ends_with(super::peers::NODE_LOCAL))
    {
        let _ = writeln!(
            md,
            "\nRows ending in *{}* run their client in the node namespace (a process of \
             the node, where the proxy runs) instead of the client namespace, and are \
             compared with *{}*, the same client connecting to the backend itself. \
             *sockgate kernel + local shortcut* is `--datapath sockmap --local-shortcut`: \
             the client's sends go through `sk_msg` straight into the backend socket \
             (docs/datapath.md, \"Node-local shortcut\"). These rows take throughput, \
             latency and new connections only.",
            super::peers::NODE_LOCAL,
            super::peers::NODE_LOCAL_DIRECT
        );
    }
    md.push_str("\n## Ratios against HAProxy (`mode tcp`, no splice)\n\n");
    table(&mut md, info, HEADLINE, |row, m| {
        ratio(&stats, row, "HAProxy", m)
    });
    md.push_str("\n## The targets of issue 6\n\n");
    targets(&mut md, &stats);
    md.push_str("\n## CPU per GB, in parts\n\n");
    table(
        &mut md,
        info,
        &[
            "cpu_per_gb",
            "cpu_proxy_per_gb",
            "cpu_kworker_per_gb",
            "cpu_softirq_per_gb",
            "cpu_machine_per_gb",
        ],
        |row, m| cell(&stats, row, m),
    );
    md.push_str(
        "\nMeasured around the 1-stream iperf3 run and divided by the bytes iperf3 received \
         (GB = 10^9 bytes). *CPU per GB* = the proxy's processes (user + system of all \
         threads and descendants, from `/proc/PID/stat`, reaped children included) + all \
         `kworker` threads (the sockmap backlog runs there) + the whole machine's softirq \
         time (from `/proc/stat`), the same sum for every row. The kworker and softirq \
         parts are machine-wide: they include the client's and backend's own network \
         stack work, which the *direct* row shows on its own, and whatever else ran \
         meanwhile. *sockgate forward* has no process work per packet (its agent only \
         sweeps the table): its translation runs in `gw_fwd`, in the node's receive \
         softirq, so its cost is in the softirq part and compares with *direct*'s. \
         *Whole machine* is every CPU's busy time, iperf3 itself included.\n",
    );
    md.push_str("\n## Slow receiver\n\n");
    table(
        &mut md,
        info,
        &[
            "slow_queued",
            "slow_used_mem",
            "slow_tcp_mem",
            "slow_sent",
            "slow_capped",
        ],
        |row, m| cell(&stats, row, m),
    );
    if let Some(t) = info.timing {
        let _ = writeln!(
            md,
            "\nOne client writes 64 KiB chunks as fast as it can for {} s to a backend that \
             reads 16 KiB every 10 ms (about 1.6 MB/s). Every 50 ms the bench samples \
             *bytes held* (written by the client and not yet read by the backend: what sits in \
             socket buffers and proxy queues between them; exact, and the best measure of \
             what the path lets pile up), *memory in use* is `MemTotal - MemAvailable` from `/proc/meminfo` (machine-wide, \
             so other work on the machine adds noise), *TCP memory* is the `mem` pages of \
             `/proc/net/sockstat`. Peak growth over the value before the run. A run is \
             stopped early when either grows past {} MiB (then *stopped at the cap* is 1). \
             *Bytes accepted* is what the client could write: with backpressure it stays \
             near what the receiver read plus the socket buffers.",
            t.slow_secs,
            super::measure::SLOW_CAP / 1024.0 / 1024.0
        );
    }
    guard(&mut md, &stats, info);
    forward_flood(&mut md, &stats, info);
    many_connections(&mut md, &stats, info);
    if !info.paths.is_empty() {
        md.push_str(
            "\n## Data path of sockgate's connections\n\nFrom `sockgate status` after each \
             run: connections carried on each path, all bench services together, and the \
             SYNs the forward program left to the socket paths (no NAT port free towards \
             the backend, table full, no route), which splice then carried.\n\n\
             | row (repeat order) | forward | kernel | splice | left by forward |\n\
             |---|---|---|---|---|\n",
        );
        for (row, p) in &info.paths {
            let _ = writeln!(
                md,
                "| {row} | {} | {} | {} | {} |",
                p.forward, p.kernel, p.userspace, p.forward_left
            );
        }
    }
    md.push_str("\n## How it was measured\n\n");
    if let Some(t) = info.timing {
        let _ = writeln!(
            md,
            "* Bed: client, node and backend network namespaces on veth pairs (MTU 1500, \
             offloads as veth defaults); *direct* routes client -> backend through the node \
             namespace; the proxies run in the node namespace.\n\
             * Throughput: `iperf3 -t {0} -P 1` and `-P 4`, bits received per second.\n\
             * RR latency: `sockperf ping-pong --tcp -m 64 -t {1} --full-rtt` (one persistent \
             connection), p50 and p99 of the full round trip.\n\
             * New connections: 4 client threads for {2} s, each connecting, sending 4 bytes, \
             reading a 4-byte answer to EOF and closing; the backend answers on 8 threads.\n\
             * Peers: one worker each (HAProxy `nbthread 1`, nginx `worker_processes 1`, \
             Envoy `--concurrency 1`, socat forks per connection); HAProxy `option \
             splice-auto`, and forced splice with `option splice-request` + `option \
             splice-response`. sockgate is the release build a user makes (`cargo build \
             --release -p gateway-userspace --bin sockgate`), run as `sockgate run --route \
             PORT=BACKEND:PORT ... --datapath MODE --drain-timeout 1` with its defaults \
             otherwise; *forward* adds `--forward-iface c0 --forward-iface b0` (the node's \
             links to the client and the backend) and keeps its default NAT ports \
             61000-65535, outside the node namespace's ephemeral range (1024-60999).\n\
             * Before each measurement the bench waited up to {3} s for the machine to be \
             under 15% busy over half a second; the load it saw is in the CSV.",
            t.iperf_secs,
            t.rr_secs,
            t.conn_secs,
            t.quiet_max.as_secs()
        );
    }
    md.push_str(
        "\n**Noise.** The machine has few cores shared with other work (builds of other \
         engineers, for one): client, proxy and backend compete for the same CPUs, so every \
         figure is CPU-bound and moves between runs. Compare rows of one run, by ratio, \
         and look at the min–max spread before reading anything into a small difference. \
         What the figures show, what limits the kernel path and what was tried: \
         [`docs/performance.md`](docs/performance.md).\n",
    );
    if !info.unavailable.is_empty() {
        md.push_str("\n## Rows not measured\n\n");
        for (row, why) in &info.unavailable {
            let _ = writeln!(md, "* {row}: {why}");
        }
    }
    if !info.failures.is_empty() {
        md.push_str("\n## Failed measurements\n\n");
        for f in &info.failures {
            let _ = writeln!(md, "* {f}");
        }
    }
    let path = out.join("BENCHMARKS.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_line_gives_the_rows_time() {
        let info = RunInfo {
            rows: vec!["direct".into()],
            repeats: 2,
            started: "2026-12-01 03:00 UTC".into(),
            elapsed_s: 41.6,
            ..RunInfo::default()
        };
        let line = run_line(&info);
        assert!(
            line.starts_with(
                "Written by `cargo xtask bench` on 2026-12-01 03:00 UTC (2 repeat(s), \
                 interleaved; 42 s of measuring in all)."
            ),
            "{line}"
        );
    }

    #[test]
    fn no_row_of_the_report_leaves_it_as_it_was() {
        let out = std::env::temp_dir().join(format!("sg-bench-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).expect("dir");
        std::fs::write(out.join("BENCHMARKS.md"), "the last full run\n").expect("write");
        let info = RunInfo {
            repeats: 1,
            elapsed_s: 0.0,
            ..RunInfo::default()
        };
        write(&out, &[], &info).expect("write");
        assert_eq!(
            std::fs::read_to_string(out.join("BENCHMARKS.md")).expect("read"),
            "the last full run\n"
        );
        assert!(out.join("bench/results.csv").exists());
        assert!(!out.join("bench/benchmarks.png").exists());
        let _ = std::fs::remove_dir_all(&out);
    }
}
