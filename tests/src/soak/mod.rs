//! The soak: every data path of sockgate at once, under mixed load and configuration
//! churn, for a bounded time; then checks that nothing was lost and nothing grew.
//! `cargo xtask soak --minutes N` runs it, and so does the one-minute end-to-end test
//! `tests/tests/soak.rs` (the same code).
//!
//! One bed per data path (`auto`, `splice`, `sockmap`, `forward`), each with three
//! backend processes ([`backend`]) and one agent (`sockgate run --datapath PATH
//! --source files`). [`load`] drives every bed from its client namespace; every
//! [`Options::change_every`] the main thread takes the next step of
//! [`config::SCRIPT`] on every bed (weights, a route added and removed, a backend not
//! ready and back, a backend process killed and started again); every
//! [`Options::sample_every`] it samples each agent ([`sample`]) and prints a line per
//! data path. At the end the configuration is the one it started with, the load
//! stops, and the soak waits (bounded) for the resources to return to their starting
//! level, then checks them against [`Tolerances`] and writes the CSV and the plot
//! ([`report`]).
#![expect(
    clippy::cast_precision_loss,
    reason = "byte counts, seconds and sizes become f64 figures; 52 bits of mantissa are plenty"
)]
pub mod backend;
pub mod config;
pub mod load;
pub mod report;
pub mod sample;
pub mod stream;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use self::{
    config::{BACKEND_PORT, BACKENDS, CHURN_PORT, MAIN_PORT, SCRIPT, State, Step},
    load::{Disturbance, KindTally, Load, Rates, Tally},
    report::Row,
    sample::Sample,
};
use crate::{Bed, BedError};

const MIB: f64 = 1_048_576.0;

/// The data paths, one agent each.
pub const PATHS: [&str; 4] = ["auto", "splice", "sockmap", "forward"];

/// Errors that stop the soak before it can check anything.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error(transparent)]
    Bed(#[from] BedError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {path} agent did not start: {why}\n{log}")]
    Agent {
        path: String,
        why: String,
        log: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SoakError {
    let what = what.into();
    move |source| SoakError::Io { what, source }
}

/// What a soak run does.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `sockgate` binary.
    pub sockgate: PathBuf,
    /// How long the load runs.
    pub duration: Duration,
    /// Time between two configuration changes.
    pub change_every: Duration,
    /// Time between two samples (and printed lines).
    pub sample_every: Duration,
    /// Where `soak.csv`, `soak.svg` and `summary.md` go.
    pub out: PathBuf,
    /// How heavy the load is.
    pub rates: Rates,
    pub tolerances: Tolerances,
}

impl Options {
    /// A run of `duration` with the default rates, a change every 5 s and a sample
    /// every minute.
    pub fn new(sockgate: PathBuf, duration: Duration, out: PathBuf) -> Self {
        Self {
            sockgate,
            duration,
            change_every: Duration::from_secs(5),
            sample_every: Duration::from_mins(1),
            out,
            rates: Rates::default(),
            tolerances: Tolerances::default(),
        }
    }
}

/// How far the end may be from the start (after the load stopped and the soak waited
/// for the connections to close).
#[derive(Clone, Debug)]
pub struct Tolerances {
    /// Agent resident memory above its start, KiB: the allocator keeps some of what the
    /// busiest moment took.
    pub rss_kib: u64,
    /// Agent resident memory growth from the first sample under load to the last one,
    /// KiB (checked when there are at least three samples under load).
    pub rss_growth_kib: u64,
    /// Agent descriptors above the start: two, plus the pipes the splice path keeps
    /// for reuse once the load is gone (a bounded pool of 64 pipes, two descriptors
    /// each; `gateway-userspace/src/proxy/pool.rs`).
    pub fds: u64,
    /// TCP sockets in use in a node namespace above the start.
    pub tcp_inuse: u64,
    /// Machine-wide TCP memory above the start, pages (other work on the machine
    /// counts too).
    pub tcp_mem_pages: u64,
    /// Machine-wide slab above the start, KiB (other work on the machine counts too).
    pub slab_kib: u64,
    /// Entries of each pinned hash map above the start: none.
    pub map_entries: u64,
    /// Unexpected failed connections (overlapping no disturbance made on purpose) per
    /// ten thousand connections on the main listener.
    pub unexpected_per_10k: u64,
    /// How long to wait after the load for the figures to come back.
    pub settle: Duration,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self {
            rss_kib: 32 * 1024,
            rss_growth_kib: 8 * 1024,
            fds: 2 + 2 * 64,
            tcp_inuse: 2,
            tcp_mem_pages: 4096,
            slab_kib: 64 * 1024,
            map_entries: 0,
            unexpected_per_10k: 100,
            settle: Duration::from_secs(90),
        }
    }
}

/// What a finished soak found.
#[derive(Debug)]
pub struct Outcome {
    /// Every check that failed, said in a sentence.
    pub failures: Vec<String>,
    /// The summary printed at the end (Markdown), also written to `summary.md`.
    pub summary: String,
    /// The files written.
    pub files: Vec<PathBuf>,
}

/// One agent on its bed.
struct Agent {
    path: &'static str,
    child: Child,
    pin_dir: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(bed: &Bed, path: &'static str, opts: &Options, dir: &Path) -> Result<Self, SoakError> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sg-soak-{}-{path}", std::process::id()));
        let log =
            std::env::temp_dir().join(format!("sockgate-soak-{}-{path}.log", std::process::id()));
        let logf =
            std::fs::File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        let mut cmd = bed.node().command(&opts.sockgate);
        cmd.arg("run")
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--dir")
            .arg(dir)
            .args(["--datapath", path, "--drain-timeout", "3"]);
        if path == "forward" {
            cmd.args(["--forward-iface", "c0"]);
            for i in 0..BACKENDS {
                cmd.args(["--forward-iface", &format!("b{i}")]);
            }
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(io_err(format!("starting {}", opts.sockgate.display())))?;
        let mut agent = Self {
            path,
            child,
            pin_dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(agent.error(&format!("exited ({status})")));
            }
            let out = bed.node().output("ss", &["-Hltn"])?;
            let text = String::from_utf8_lossy(&out.stdout);
            if [MAIN_PORT, CHURN_PORT]
                .iter()
                .all(|p| text.contains(&format!(":{p} ")))
            {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                return Err(agent.error("not listening after 30 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn error(&self, why: &str) -> SoakError {
        SoakError::Agent {
            path: self.path.into(),
            why: why.into(),
            log: self.log_text(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sample(&self) -> Sample {
        sample::take(self.child.id(), &self.pin_dir)
    }

    /// SIGTERM, then waits (bounded); SIGKILL after 40 s. Whether it exited cleanly.
    fn stop(&mut self) -> Result<(), String> {
        let pid = nix::unistd::Pid::from_raw(self.child.id().cast_signed());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => return Err(format!("exited with {s} after SIGTERM")),
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("did not exit within 40 s of SIGTERM".into());
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// One data path's bed, its backends, manifests, agent and tallies.
struct Lane {
    path: &'static str,
    // Field order is drop order: the load and the agent before the backends and the bed.
    load: Option<Load>,
    agent: Agent,
    backends: Vec<backend::Process>,
    dir: PathBuf,
    tally: Arc<Tally>,
    bed: Bed,
}

impl Lane {
    fn new(path: &'static str, opts: &Options, state: &State) -> Result<Self, SoakError> {
        let bed = Bed::new(BACKENDS)?;
        for ns in [bed.client(), bed.node()] {
            ns.output("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        }
        // The node's ephemeral ports stop below the forward path's NAT ports.
        bed.node().output(
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=1024 60999"],
        )?;
        let mut backends = Vec::new();
        for i in 0..BACKENDS {
            let addr = SocketAddr::new(bed.backend_addr(i).into(), BACKEND_PORT);
            backends.push(backend::Process::start(
                bed.backend(i),
                &format!("b{i}"),
                addr,
            )?);
        }
        let dir = std::env::temp_dir().join(format!("sockgate-soak-{}-{path}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        state
            .write(&dir, |i| bed.backend_addr(i))
            .map_err(io_err("writing the manifests"))?;
        let agent = Agent::start(&bed, path, opts, &dir)?;
        Ok(Self {
            path,
            load: None,
            agent,
            backends,
            dir,
            tally: Arc::new(Tally::default()),
            bed,
        })
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.bed.node_addr().into(), port)
    }

    /// Waits (bounded) until a short connection through the main listener works.
    fn wait_serving(&self) -> Result<(), SoakError> {
        let addr = self.addr(MAIN_PORT);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.bed.client().run(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .and_then(|mut s| {
                        use std::io::{Read, Write};
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(&[backend::SHORT])?;
                        let mut v = Vec::new();
                        s.read_to_end(&mut v)?;
                        Ok(v.starts_with(b"b"))
                    })
                    .unwrap_or(false)
            })?;
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self
                    .agent
                    .error("no connection through the main listener within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn apply(&mut self, step: Step, state: &State) -> Result<(), SoakError> {
        match step {
            Step::Kill(i) => self.backends[i].kill(),
            Step::Restart(i) => self.backends[i].restart(self.bed.backend(i))?,
            _ => {}
        }
        state
            .write(&self.dir, |i| self.bed.backend_addr(i))
            .map_err(io_err("writing the manifests"))
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(l) = self.load.take() {
            l.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The rows of one sample of every lane.
fn rows_of(secs: i64, lanes: &[Lane], samples: &[Sample]) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |path: &str, metric: &str, value: f64| {
        rows.push(Row {
            secs,
            path: path.to_owned(),
            metric: metric.to_owned(),
            value,
        });
    };
    for (lane, s) in lanes.iter().zip(samples) {
        let p = lane.path;
        push(p, "rss_mib", s.rss_kib as f64 / 1024.0);
        push(p, "fds", s.fds as f64);
        push(p, "tcp_inuse", s.tcp_inuse as f64);
        push(p, "tcp_tw", s.tcp_tw as f64);
        push(p, "map_hash_entries", s.hash_entries() as f64);
        for (m, n) in &s.maps {
            push(p, &format!("map:{m}"), *n as f64);
        }
        let t = lane.tally.snapshot();
        let sum = |f: fn(&KindTally) -> u64| t.values().map(f).sum::<u64>();
        push(p, "connections", sum(|k| k.attempts) as f64);
        push(p, "sent_mib", sum(|k| k.bytes_sent) as f64 / MIB);
        push(p, "intact_mib", sum(|k| k.bytes_intact) as f64 / MIB);
        push(p, "corrupted", sum(|k| k.corrupted) as f64);
        push(p, "unexpected_failures", sum(KindTally::unexpected) as f64);
    }
    if let Some(s) = samples.first() {
        push(
            "machine",
            "tcp_mem_mib",
            s.tcp_mem_pages as f64 * 4.0 / 1024.0,
        );
        push("machine", "tcp_orphan", s.tcp_orphan as f64);
        push("machine", "slab_mib", s.slab_kib as f64 / 1024.0);
    }
    rows
}

fn print_sample(secs: i64, lanes: &[Lane], samples: &[Sample]) {
    for (lane, s) in lanes.iter().zip(samples) {
        let t = lane.tally.snapshot();
        let sum = |f: fn(&KindTally) -> u64| t.values().map(f).sum::<u64>();
        let maps: Vec<String> = s
            .state_maps()
            .filter_map(|m| {
                s.maps
                    .get(m)
                    .filter(|n| **n > 0)
                    .map(|n| format!("{m}={n}"))
            })
            .collect();
        println!(
            "soak: {:>5.1} min {:<8} conns {} sent {:.1} MiB intact {:.1} MiB corrupted {} unexpected failures {} | rss {:.1} MiB fds {} tcp inuse {} tw {} | {}",
            secs as f64 / 60.0,
            lane.path,
            sum(|k| k.attempts),
            sum(|k| k.bytes_sent) as f64 / MIB,
            sum(|k| k.bytes_intact) as f64 / MIB,
            sum(|k| k.corrupted),
            sum(KindTally::unexpected),
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.tcp_inuse,
            s.tcp_tw,
            maps.join(" ")
        );
    }
    if let Some(s) = samples.first() {
        println!(
            "soak: {:>5.1} min machine  tcp mem {:.1} MiB orphans {} slab {:.1} MiB",
            secs as f64 / 60.0,
            s.tcp_mem_pages as f64 * 4.0 / 1024.0,
            s.tcp_orphan,
            s.slab_kib as f64 / 1024.0
        );
    }
}

fn secs_since(t0: Instant) -> i64 {
    i64::try_from(t0.elapsed().as_secs()).unwrap_or(i64::MAX)
}

/// Runs the soak and checks it. `Err` when it could not run; `Ok` with the failed
/// checks (empty when everything held) when it ran.
#[expect(clippy::too_many_lines, reason = "the run's steps, in order")]
pub fn run(opts: &Options) -> Result<Outcome, SoakError> {
    crate::check_privileges()?;
    let removed = crate::sweep_stale();
    if !removed.is_empty() {
        println!(
            "soak: removed namespaces of earlier runs: {}",
            removed.join(" ")
        );
    }
    std::fs::create_dir_all(&opts.out)
        .map_err(io_err(format!("creating {}", opts.out.display())))?;
    let mut state = State::default();
    let mut lanes = Vec::new();
    for path in PATHS {
        println!("soak: starting the {path} bed and agent");
        lanes.push(Lane::new(path, opts, &state)?);
    }
    for lane in &lanes {
        lane.wait_serving()?;
    }
    let t0 = Instant::now();
    let start: Vec<Sample> = lanes.iter().map(|l| l.agent.sample()).collect();
    let mut rows = rows_of(0, &lanes, &start);
    print_sample(0, &lanes, &start);
    let dist = Arc::new(Disturbance::default());
    for lane in &mut lanes {
        let (main, churn) = (lane.addr(MAIN_PORT), lane.addr(CHURN_PORT));
        lane.load = Some(Load::start(
            lane.bed.client(),
            main,
            churn,
            opts.rates,
            &lane.tally,
            &dist,
        )?);
    }
    println!(
        "soak: load on every path for {:.1} min, a change every {:?}",
        opts.duration.as_secs_f64() / 60.0,
        opts.change_every
    );
    let mut under_load: Vec<Vec<Sample>> = Vec::new();
    let (mut next_change, mut next_sample, mut step) =
        (t0 + opts.change_every, t0 + opts.sample_every, 0usize);
    let end = t0 + opts.duration;
    // Whole script cycles only, so the configuration ends where it started.
    while Instant::now() < end || step % SCRIPT.len() != 0 {
        let now = Instant::now();
        if now >= next_change {
            let s = SCRIPT[step % SCRIPT.len()];
            state.apply(s);
            if matches!(s, Step::Kill(_)) {
                dist.step();
            }
            for lane in &mut lanes {
                lane.apply(s, &state)?;
            }
            if matches!(s, Step::Restart(_)) {
                // Counted as disturbed until the process listens again.
                std::thread::sleep(Duration::from_millis(300));
                dist.step();
            }
            step += 1;
            next_change += opts.change_every;
        }
        if now >= next_sample && now < end {
            let s: Vec<Sample> = lanes.iter().map(|l| l.agent.sample()).collect();
            let secs = secs_since(t0);
            rows.extend(rows_of(secs, &lanes, &s));
            print_sample(secs, &lanes, &s);
            under_load.push(s);
            next_sample += opts.sample_every;
        }
        let wake = next_change.min(next_sample);
        std::thread::sleep(
            wake.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200)),
        );
    }
    println!("soak: stopping the load ({step} configuration changes)");
    for lane in &lanes {
        if let Some(l) = &lane.load {
            l.stop();
        }
    }
    for lane in &mut lanes {
        if let Some(l) = lane.load.take() {
            l.join();
        }
    }
    let load_secs = secs_since(t0);
    let s: Vec<Sample> = lanes.iter().map(|l| l.agent.sample()).collect();
    rows.extend(rows_of(load_secs, &lanes, &s));
    print_sample(load_secs, &lanes, &s);
    under_load.push(s);

    // Wait (bounded) for the figures to come back.
    let settle_until = Instant::now() + opts.tolerances.settle;
    let mut end_samples;
    loop {
        std::thread::sleep(Duration::from_secs(2));
        end_samples = lanes.iter().map(|l| l.agent.sample()).collect::<Vec<_>>();
        let back = start
            .iter()
            .zip(&end_samples)
            .all(|(a, b)| resource_failures(a, b, &opts.tolerances, "").is_empty());
        if back || Instant::now() > settle_until {
            break;
        }
    }
    let end_secs = secs_since(t0);
    rows.extend(rows_of(end_secs, &lanes, &end_samples));
    print_sample(end_secs, &lanes, &end_samples);

    let mut failures = Vec::new();
    for (i, lane) in lanes.iter_mut().enumerate() {
        let p = lane.path;
        failures.extend(resource_failures(
            &start[i],
            &end_samples[i],
            &opts.tolerances,
            p,
        ));
        let first = under_load.first().map(|v| &v[i]);
        let last = under_load.last().map(|v| &v[i]);
        if let (true, Some(a), Some(b)) = (under_load.len() >= 3, first, last)
            && b.rss_kib > a.rss_kib + opts.tolerances.rss_growth_kib
        {
            failures.push(format!(
                "{p}: agent memory grew under load from {} KiB (first sample) to {} KiB (last), more than {} KiB",
                a.rss_kib, b.rss_kib, opts.tolerances.rss_growth_kib
            ));
        }
        failures.extend(traffic_failures(
            p,
            &lane.tally.snapshot(),
            &opts.tolerances,
        ));
        let log = lane.agent.log_text();
        if log.contains("panicked") {
            failures.push(format!(
                "{p}: the agent panicked (log {})",
                lane.agent.log.display()
            ));
        }
        if let Err(why) = lane.agent.stop() {
            failures.push(format!("{p}: the agent {why}"));
        }
    }
    let machine_failures = machine_failures(&start[0], &end_samples[0], &opts.tolerances);
    failures.extend(machine_failures);

    let summary = summary(
        opts,
        &lanes,
        &start,
        &end_samples,
        load_secs,
        step,
        &failures,
    );
    let mut files = Vec::new();
    for (name, text) in [
        ("soak.csv", report::csv(&rows)),
        (
            "soak.svg",
            report::svg(
                &rows,
                &format!(
                    "sockgate soak: {:.1} min of load, every data path (sample every {} s)",
                    load_secs as f64 / 60.0,
                    opts.sample_every.as_secs()
                ),
            ),
        ),
        ("summary.md", summary.clone()),
    ] {
        let f = opts.out.join(name);
        std::fs::write(&f, text).map_err(io_err(format!("writing {}", f.display())))?;
        files.push(f);
    }
    Ok(Outcome {
        failures,
        summary,
        files,
    })
}

/// The per-agent resources that did not come back to the start.
#[expect(
    clippy::many_single_char_names,
    reason = "start, end, tolerances, failures"
)]
fn resource_failures(a: &Sample, b: &Sample, t: &Tolerances, path: &str) -> Vec<String> {
    let mut f = Vec::new();
    let mut over = |what: &str, start: u64, end: u64, tol: u64| {
        if end > start + tol {
            f.push(format!(
                "{path}: {what} {start} at the start, {end} at the end (tolerance +{tol})"
            ));
        }
    };
    over(
        "agent resident memory (KiB)",
        a.rss_kib,
        b.rss_kib,
        t.rss_kib,
    );
    over("agent descriptors", a.fds, b.fds, t.fds);
    over(
        "TCP sockets in use in the node namespace",
        a.tcp_inuse,
        b.tcp_inuse,
        t.tcp_inuse,
    );
    for m in b.state_maps() {
        let (s, e) = (
            a.maps.get(m).copied().unwrap_or(0),
            b.maps.get(m).copied().unwrap_or(0),
        );
        over(&format!("pinned map {m} entries"), s, e, t.map_entries);
    }
    for (m, n) in &a.maps {
        if !b.maps.contains_key(m) {
            f.push(format!(
                "{path}: pinned map {m} ({n} entries at the start) is gone at the end"
            ));
        }
    }
    f
}

fn machine_failures(a: &Sample, b: &Sample, t: &Tolerances) -> Vec<String> {
    let mut f = Vec::new();
    if b.tcp_mem_pages > a.tcp_mem_pages + t.tcp_mem_pages {
        f.push(format!(
            "machine: TCP memory {} pages at the start, {} at the end (tolerance +{})",
            a.tcp_mem_pages, b.tcp_mem_pages, t.tcp_mem_pages
        ));
    }
    if b.slab_kib > a.slab_kib + t.slab_kib {
        f.push(format!(
            "machine: slab {} KiB at the start, {} KiB at the end (tolerance +{} KiB)",
            a.slab_kib, b.slab_kib, t.slab_kib
        ));
    }
    f
}

/// Traffic checks of one path: nothing corrupted, every kind of connection carried,
/// few unexpected failures on the main listener.
fn traffic_failures(
    path: &str,
    t: &BTreeMap<&'static str, KindTally>,
    tol: &Tolerances,
) -> Vec<String> {
    let mut f = Vec::new();
    for kind in load::KINDS {
        let k = t.get(kind).cloned().unwrap_or_default();
        if k.corrupted > 0 {
            f.push(format!(
                "{path}: {} {kind} connection(s) lost or changed data without an error",
                k.corrupted
            ));
        }
        if k.ok == 0 {
            f.push(format!(
                "{path}: no {kind} connection succeeded ({} tried)",
                k.attempts
            ));
        }
    }
    let main: Vec<&KindTally> = t
        .iter()
        .filter(|(k, _)| **k != "churned-route")
        .map(|(_, v)| v)
        .collect();
    let attempts: u64 = main.iter().map(|k| k.attempts).sum();
    let unexpected: u64 = main.iter().map(|k| k.unexpected()).sum();
    if unexpected * 10_000 > attempts * tol.unexpected_per_10k {
        f.push(format!(
            "{path}: {unexpected} of {attempts} connections on the main listener failed outside any disturbance (tolerance {} per 10,000)",
            tol.unexpected_per_10k
        ));
    }
    f
}

fn summary(
    opts: &Options,
    lanes: &[Lane],
    start: &[Sample],
    end: &[Sample],
    load_secs: i64,
    changes: usize,
    failures: &[String],
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Load {:.1} min on {} data paths, {changes} configuration changes (one every {} s), settle until the figures came back (at most {} s).\n",
        load_secs as f64 / 60.0,
        lanes.len(),
        opts.change_every.as_secs(),
        opts.tolerances.settle.as_secs()
    );
    let _ = writeln!(
        s,
        "| path | kind | connections | ok | sent MiB | received intact MiB | corrupted | failed (during a disturbance / outside) |\n|---|---|---|---|---|---|---|---|"
    );
    for lane in lanes {
        for (kind, k) in lane.tally.snapshot() {
            let why: Vec<String> = k
                .failures
                .iter()
                .map(|(r, (d, u))| format!("{r}: {d} / {u}"))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {kind} | {} | {} | {:.1} | {:.1} | {} | {} |",
                lane.path,
                k.attempts,
                k.ok,
                k.bytes_sent as f64 / MIB,
                k.bytes_intact as f64 / MIB,
                k.corrupted,
                if why.is_empty() {
                    "none".into()
                } else {
                    why.join("; ")
                }
            );
        }
    }
    let _ = writeln!(
        s,
        "\n| path | RSS KiB start → end | fds | TCP in use | pinned hash map entries (not counters; zero ones left out) start → end |\n|---|---|---|---|---|"
    );
    for ((lane, a), b) in lanes.iter().zip(start).zip(end) {
        let maps: Vec<String> = b
            .state_maps()
            .map(|m| {
                (
                    m,
                    a.maps.get(m).copied().unwrap_or(0),
                    b.maps.get(m).copied().unwrap_or(0),
                )
            })
            .filter(|(_, x, y)| x + y > 0)
            .map(|(m, x, y)| format!("{m} {x} → {y}"))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} → {} | {} → {} | {} → {} | {} |",
            lane.path,
            a.rss_kib,
            b.rss_kib,
            a.fds,
            b.fds,
            a.tcp_inuse,
            b.tcp_inuse,
            maps.join(", ")
        );
    }
    if let (Some(a), Some(b)) = (start.first(), end.first()) {
        let _ = writeln!(
            s,
            "\nMachine: TCP memory {} → {} pages, slab {} → {} KiB.\n",
            a.tcp_mem_pages, b.tcp_mem_pages, a.slab_kib, b.slab_kib
        );
    }
    if failures.is_empty() {
        let _ = writeln!(s, "Every check held.");
    } else {
        let _ = writeln!(s, "Failed checks:\n");
        for f in failures {
            let _ = writeln!(s, "* {f}");
        }
    }
    s
}
