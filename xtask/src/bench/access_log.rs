//! The access log's cost: many short connections (the exchange of the new-connections
//! measurement) through sockgate `--datapath splice` with `--access-log FILE` and
//! without it, one after the other in each repeat (which goes first alternates), so
//! that drifts of a shared machine touch both alike.
//!
//! Reported per repeat, for both rows: connections per second and the agent's CPU per
//! connection (user + system of the agent's threads); for the row with the log also
//! records written per second (lines in the file over the measurement's time), records
//! dropped (`sockgate_access_log_dropped_total`), the CPU of the log's writer thread
//! per record, and the agent's CPU per record beyond the row without the log.
//! Results go to the run's `results.csv` and to `bench/access-log.md`.
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netbed::Bed;

use super::{
    EXCHANGE, Sample, Timing, measure,
    procfs::{descendants, stat_fields},
    stats,
};

/// The row with the log on; selecting it (`--only "access log"`) runs both.
pub const ROW_ON: &str = "sockgate splice + access log";
/// The same agent without the log, measured right before it.
pub const ROW_OFF: &str = "sockgate splice without access log";

/// The metrics of these rows: (key, title, unit).
const METRICS: &[(&str, &str, &str)] = &[
    ("conn_rate", "new connections", "conn/s"),
    ("log_agent_cpu_per_conn", "agent CPU per connection", "µs"),
    (
        "log_records_rate",
        "records written per second",
        "records/s",
    ),
    ("log_dropped", "records dropped", "count"),
    (
        "log_writer_cpu_per_record",
        "log writer thread CPU per record",
        "µs",
    ),
    (
        "log_cpu_per_record",
        "agent CPU per record beyond the row without the log",
        "µs",
    ),
    ("conn_failures", "failed connections", "count"),
];

/// The agent's metrics endpoint (its default `--metrics-addr`, in the node namespace).
const METRICS_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 9464);

/// A sockgate agent of this measurement; stopped by PID and its files removed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
    pins: PathBuf,
}

impl Agent {
    fn start(bed: &Bed, sockgate: &Path, log: Option<&Path>) -> anyhow::Result<Self> {
        let tag = if log.is_some() { "on" } else { "off" };
        let dir = std::env::temp_dir().join(format!(
            "sockgate-bench-{}-access-log-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/sockgate-bench-{}-access-log",
            std::process::id()
        ));
        let out = std::fs::File::create(dir.join("agent.log"))?;
        let mut cmd = bed.node().command(sockgate);
        cmd.arg("run").arg("--pin-dir").arg(&pins).args([
            "--datapath",
            "splice",
            "--drain-timeout",
            "1",
            "--route",
            &format!(
                "{}={}:{}",
                EXCHANGE.listen_port,
                bed.backend_addr(0),
                EXCHANGE.backend_port
            ),
        ]);
        if let Some(log) = log {
            cmd.arg("--access-log").arg(log);
        }
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().context("starting sockgate")?;
        let mut agent = Self { child, dir, pins };
        agent.wait_listening(bed)?;
        Ok(agent)
    }

    fn wait_listening(&mut self, bed: &Bed) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = format!(":{} ", EXCHANGE.listen_port);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("sockgate exited: {status}; {}", self.log_tail());
            }
            let out = bed.node().output("ss", &["-Hltn"])?;
            if String::from_utf8_lossy(&out.stdout).contains(&port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sockgate did not listen within 30 s; {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// User + system ticks of the agent (all threads), and of its `access-log` thread.
    fn cpu(&self) -> (u64, u64) {
        let ticks = |f: &[String]| -> u64 {
            [11, 12]
                .iter()
                .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
                .sum()
        };
        let pid = self.child.id();
        let all = stat_fields(pid).map_or(0, |f| ticks(&f))
            + descendants(&[pid])
                .into_iter()
                .filter_map(stat_fields)
                .map(|f| ticks(&f))
                .sum::<u64>();
        let mut writer = 0;
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == "access-log"
                && let Ok(text) = std::fs::read_to_string(t.path().join("stat"))
                && let Some(close) = text.rfind(')')
            {
                let f: Vec<String> = text[close + 1..]
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                writer += ticks(&f);
            }
        }
        (all, writer)
    }

    /// A counter of the agent's `/metrics`, summed over its label sets.
    fn counter(bed: &Bed, name: &'static str) -> anyhow::Result<u64> {
        let text = bed
            .node()
            .run(|| -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::from(METRICS_ADDR),
                    Duration::from_secs(2),
                )?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(
                    b"GET /metrics HTTP/1.1\r\nHost: sockgate\r\nConnection: close\r\n\r\n",
                )?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            })?
            .context("reading /metrics")?;
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Lines in `path` once their count stopped growing (at most 5 s).
fn settled_lines(path: &Path) -> u64 {
    let count = || std::fs::read_to_string(path).map_or(0, |t| t.lines().count() as u64);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = count();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = count();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// What one agent did during the connections.
struct Measured {
    rate: f64,
    failed: u64,
    secs: f64,
    connections: u64,
    /// `sockgate_access_log_dropped_total` at the end.
    dropped: u64,
    agent_ticks: u64,
    writer_ticks: u64,
}

fn measure_once(
    bed: &Bed,
    sockgate: &Path,
    log: Option<&Path>,
    t: Timing,
) -> anyhow::Result<Measured> {
    let agent = Agent::start(bed, sockgate, log)?;
    let addr = SocketAddr::new(bed.node_addr().into(), EXCHANGE.listen_port);
    let _ = measure::wait_quiet(t.quiet_max);
    let (a0, w0) = agent.cpu();
    let started = Instant::now();
    let (rate, failed) = measure::conn_rate(bed.client(), addr, t.conn_secs)?;
    let secs = started.elapsed().as_secs_f64();
    // The last connections' tasks end just after their clients saw EOF.
    std::thread::sleep(Duration::from_millis(200));
    let (a1, w1) = agent.cpu();
    let connections = Agent::counter(bed, "sockgate_connections_ended_total")?;
    let dropped = Agent::counter(bed, "sockgate_access_log_dropped_total")?;
    Ok(Measured {
        rate,
        failed,
        secs,
        connections,
        dropped,
        agent_ticks: a1.saturating_sub(a0),
        writer_ticks: w1.saturating_sub(w0),
    })
}

/// One repeat: the agent without the log, then with it; the samples go to `samples`.
pub fn run_repeat(
    bed: &Bed,
    sockgate: &Path,
    repeat: u32,
    t: Timing,
    samples: &mut Vec<Sample>,
) -> anyhow::Result<()> {
    let hz = measure::ticks_per_sec();
    let us_per = |ticks: u64, n: u64| {
        if n == 0 {
            0.0
        } else {
            ticks as f64 / hz * 1e6 / n as f64
        }
    };
    let load = measure::wait_quiet(t.quiet_max);
    let mut push = |row: &str, metric: &'static str, value: f64| {
        samples.push(Sample {
            row: row.to_owned(),
            metric,
            repeat,
            value,
            load,
        });
    };

    let dir = std::env::temp_dir().join(format!(
        "sockgate-bench-{}-access-log-file",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("access.log");
    let with_log = || {
        let on = measure_once(bed, sockgate, Some(&file), t);
        let records = settled_lines(&file);
        on.map(|on| (on, records))
    };
    // Odd repeats measure the agent without the log first, even ones with it first.
    let (off, on) = if repeat % 2 == 1 {
        let off = measure_once(bed, sockgate, None, t)?;
        (off, with_log())
    } else {
        let on = with_log();
        (measure_once(bed, sockgate, None, t)?, on)
    };
    let _ = std::fs::remove_dir_all(&dir);
    let (on, records) = on?;
    let off_cpu = us_per(off.agent_ticks, off.connections);
    push(ROW_OFF, "conn_rate", off.rate);
    push(ROW_OFF, "conn_failures", off.failed as f64);
    push(ROW_OFF, "log_agent_cpu_per_conn", off_cpu);

    let on_cpu = us_per(on.agent_ticks, on.connections);
    push(ROW_ON, "conn_rate", on.rate);
    push(ROW_ON, "conn_failures", on.failed as f64);
    push(ROW_ON, "log_agent_cpu_per_conn", on_cpu);
    push(ROW_ON, "log_records_rate", records as f64 / on.secs);
    let dropped = on.dropped;
    push(ROW_ON, "log_dropped", dropped as f64);
    push(
        ROW_ON,
        "log_writer_cpu_per_record",
        us_per(on.writer_ticks, records),
    );
    push(ROW_ON, "log_cpu_per_record", on_cpu - off_cpu);
    println!(
        "bench: access log: off {:.0} conn/s ({} connections, {off_cpu:.1} µs agent CPU each); \
         on {:.0} conn/s ({} connections, {records} records, {dropped} dropped, \
         {on_cpu:.1} µs agent CPU each, writer thread {:.2} µs per record)",
        off.rate,
        off.connections,
        on.rate,
        on.connections,
        us_per(on.writer_ticks, records)
    );
    Ok(())
}

/// Writes `bench/access-log.md` under `out`: min / median / max of each metric of both
/// rows. Nothing when the rows did not run.
pub fn write_summary(out: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let st = stats::stats(samples);
    if !st.keys().any(|(row, _)| row == ROW_ON) {
        return Ok(());
    }
    let mut md = String::from(
        "# The access log's cost\n\n\
         Short connections (connect, 4-byte exchange, close) from 4 client threads through \
         sockgate `--datapath splice`, without and with `--access-log FILE`, one after the \
         other in each repeat (alternating which goes first). Min / median / max over the \
         repeats.\n\n\
         | metric | unit | access log off | access log on |\n|---|---|---|---|\n",
    );
    let cell = |row: &str, m: &'static str| {
        st.get(&(row.to_owned(), m)).map_or_else(
            || "-".to_owned(),
            |s| {
                format!(
                    "{} / **{}** / {}",
                    stats::num(s.min),
                    stats::num(s.median),
                    stats::num(s.max)
                )
            },
        )
    };
    for (key, title, unit) in METRICS {
        let _ = writeln!(
            md,
            "| {title} | {unit} | {} | {} |",
            cell(ROW_OFF, key),
            cell(ROW_ON, key)
        );
    }
    let path = out.join("bench/access-log.md");
    std::fs::create_dir_all(out.join("bench"))?;
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    println!("bench: wrote {}", path.display());
    Ok(())
}
