//! Many connections at once through a proxy: an echo backend and a client that hold
//! thousands of connections (each a tokio runtime on one thread; the client's thread
//! in the client namespace). Two measurements use them:
//!
//! * **Idle connections**: [`IDLE_CONNS`] connections, each echoed one byte and then
//!   left idle, and what they cost: the proxy's descriptors and resident memory (its
//!   process tree), the kernel's unreclaimable slab and TCP memory (machine-wide),
//!   TCP sockets in the node namespace, and the forward path's table entries.
//! * **Request/response at a fixed rate** over N connections ([`MANY_COUNTS`]):
//!   64-byte requests echoed by the backend, [`MANY_RATE`] requests per second in
//!   all, spread evenly over the connections; per-request latency percentiles and CPU
//!   per transaction. The connections are the idle measurement's, the others closed
//!   first (largest N first), so that a row opens its 10,000 connections once.
//!
//! The pure parts ([`percentile`], [`Footprint::per_connection`]) are unit-tested.
//! Every loop is bounded in count and time; every socket is closed afterwards.
use std::{
    io,
    net::SocketAddr,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netbed::Netns;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::procfs::descendants;

/// Connections held open by the idle-connection measurement, where the descriptor
/// limit allows them (see [`idle_conns`]).
pub const IDLE_CONNS: usize = 10_000;
/// Descriptors a proxy (or the bench, holding client and backend) needs besides two
/// per connection: listeners, logs, epoll, pipes (sockgate's splice pool: up to 128;
/// `HAProxy`'s `maxpipes`: 128), pins.
pub const FD_MARGIN: u64 = 400;

/// Connections the idle measurement holds under the descriptor limit `nofile` (soft =
/// hard, inherited by the proxies): [`IDLE_CONNS`], or fewer where a process holding
/// two descriptors per connection would run out.
pub fn idle_conns(nofile: u64) -> usize {
    let fit = usize::try_from(nofile.saturating_sub(FD_MARGIN) / 2).unwrap_or(usize::MAX);
    IDLE_CONNS.min(fit)
}
/// Connection counts of the fixed-rate request/response measurement.
pub const MANY_COUNTS: [usize; 2] = [1_000, 5_000];
/// Requests per second, all connections together. Client, echo backend and proxy
/// share the machine's two cores: at this rate every proxy measured keeps up.
pub const MANY_RATE: f64 = 10_000.0;
/// Bytes of each request (and of its echo).
pub const REQUEST_BYTES: usize = 64;
/// Connects in flight at once while connections are opened.
const OPEN_IN_FLIGHT: usize = 64;
/// Time one connect plus its one-byte echo may take.
const OPEN_EACH: Duration = Duration::from_secs(3);
/// Time one request's echo may take before the connection counts as failed.
const ECHO_WAIT: Duration = Duration::from_secs(2);

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// An echo server on one thread, listening on `addrs` in a namespace; every connection
/// it holds is closed when it is dropped.
pub struct EchoBackend {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoBackend {
    pub fn start(ns: &Netns, addrs: Vec<SocketAddr>) -> anyhow::Result<Self> {
        let listeners = ns.run(move || -> io::Result<Vec<std::net::TcpListener>> {
            addrs
                .iter()
                .map(|a| {
                    let s = socket2::Socket::new(
                        socket2::Domain::IPV4,
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    )?;
                    s.set_reuse_address(true)?;
                    s.bind(&(*a).into())?;
                    s.listen(4096)?;
                    s.set_nonblocking(true)?;
                    Ok(s.into())
                })
                .collect()
        })??;
        let rt = runtime()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                for l in listeners {
                    let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                        continue;
                    };
                    tokio::spawn(async move {
                        loop {
                            match l.accept().await {
                                Ok((s, _)) => {
                                    tokio::spawn(echo(s));
                                }
                                // Out of descriptors, for one: wait, bounded by the stop.
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                    });
                }
                let _ = rx.await;
            });
            // Dropping the runtime drops every task and closes every socket.
            drop(rt);
        });
        Ok(Self {
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

async fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 512];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one fixed-rate run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Requests answered.
    pub txns: u64,
    /// Connections that failed (an error or no echo within [`ECHO_WAIT`]).
    pub failed: u64,
    /// Sends that started a whole period late and were skipped.
    pub late: u64,
    /// Round trips in µs, sorted.
    pub latencies_us: Vec<u32>,
    /// Seconds from the first request to the last echo.
    pub secs: f64,
}

enum Cmd {
    Load {
        rate: f64,
        secs: f64,
    },
    /// Keep this many connections open, closing the others.
    Keep(usize),
    Close,
}

enum Reply {
    Load(LoadResult),
    Kept(usize),
}

/// Connections held by a client thread in the client namespace; closed on drop.
pub struct Conns {
    cmd: mpsc::Sender<Cmd>,
    reply: mpsc::Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
    /// Connections opened and echoed.
    pub opened: usize,
    /// Connects or first echoes that failed.
    pub failed: usize,
}

impl Conns {
    /// Opens `n` connections from `client` to `targets` in turn, each echoing one byte,
    /// within `limit` in all.
    pub fn open(
        client: &Netns,
        targets: Vec<SocketAddr>,
        n: usize,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!targets.is_empty(), "no target");
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
        let (opened_tx, opened_rx) = mpsc::channel::<io::Result<(usize, usize)>>();
        let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
        let thread = client.spawn(move || {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            let (mut conns, failed) = rt.block_on(open_all(&targets, n, limit));
            let _ = opened_tx.send(Ok((conns.len(), failed)));
            // Bounded: each command is answered, and an idle minute ends the holding.
            loop {
                let reply = match cmd_rx.recv_timeout(Duration::from_mins(1)) {
                    Ok(Cmd::Load { rate, secs }) => {
                        let (kept, result) = rt.block_on(load(conns, rate, secs));
                        conns = kept;
                        Reply::Load(result)
                    }
                    Ok(Cmd::Keep(n)) => {
                        // Closed inside the runtime, which owns the sockets' registrations.
                        let _guard = rt.enter();
                        conns.truncate(n);
                        Reply::Kept(conns.len())
                    }
                    Ok(Cmd::Close) | Err(_) => break,
                };
                if reply_tx.send(reply).is_err() {
                    break;
                }
            }
            let _guard = rt.enter();
            drop(conns);
        })?;
        let (opened, failed) = opened_rx
            .recv_timeout(limit + OPEN_EACH + Duration::from_secs(5))
            .context("the client did not finish opening its connections")?
            .context("client runtime")?;
        Ok(Self {
            cmd: cmd_tx,
            reply: reply_rx,
            thread: Some(thread),
            opened,
            failed,
        })
    }

    /// Requests at `rate` per second in all over the open connections for `secs`.
    pub fn load(&self, rate: f64, secs: f64) -> anyhow::Result<LoadResult> {
        self.cmd
            .send(Cmd::Load { rate, secs })
            .map_err(|_| anyhow::anyhow!("the client thread ended"))?;
        match self
            .reply
            .recv_timeout(Duration::from_secs_f64(secs) + ECHO_WAIT + Duration::from_secs(10))
            .context("no result from the load")?
        {
            Reply::Load(r) => Ok(r),
            Reply::Kept(_) => bail!("the client answered another command"),
        }
    }

    /// Keeps the first `n` connections open and closes the others; returns how many
    /// are open now.
    pub fn keep(&self, n: usize) -> anyhow::Result<usize> {
        self.cmd
            .send(Cmd::Keep(n))
            .map_err(|_| anyhow::anyhow!("the client thread ended"))?;
        match self
            .reply
            .recv_timeout(Duration::from_secs(10))
            .context("the client did not close its connections")?
        {
            Reply::Kept(n) => Ok(n),
            Reply::Load(_) => bail!("the client answered another command"),
        }
    }
}

impl Drop for Conns {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn open_one(addr: SocketAddr) -> io::Result<TcpStream> {
    tokio::time::timeout(OPEN_EACH, async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(b"h").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok(s)
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Opens up to `n` connections, [`OPEN_IN_FLIGHT`] at a time, until `limit` has passed.
async fn open_all(targets: &[SocketAddr], n: usize, limit: Duration) -> (Vec<TcpStream>, usize) {
    let deadline = Instant::now() + limit;
    let mut set = tokio::task::JoinSet::new();
    let (mut conns, mut failed) = (Vec::with_capacity(n), 0);
    let mut take = |r: Option<Result<io::Result<TcpStream>, tokio::task::JoinError>>| match r {
        Some(Ok(Ok(s))) => conns.push(s),
        Some(_) => failed += 1,
        None => {}
    };
    for i in 0..n {
        if Instant::now() >= deadline {
            break;
        }
        if set.len() >= OPEN_IN_FLIGHT {
            take(set.join_next().await);
        }
        set.spawn(open_one(targets[i % targets.len()]));
    }
    while let Some(r) = set.join_next().await {
        take(Some(r));
    }
    (conns, failed)
}

/// Runs one connection's share of the load: a request every `period` from `first`
/// until `end`, each waiting for its echo. Returns the connection (unless it failed),
/// its round trips in µs and its late sends.
async fn one_conn(
    mut s: TcpStream,
    first: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
) -> (Option<TcpStream>, Vec<u32>, u64) {
    let req = [0x42u8; REQUEST_BYTES];
    let mut buf = [0u8; REQUEST_BYTES];
    let mut lat = Vec::new();
    let mut late = 0;
    let mut next = first;
    // Bounded: one request per period until `end`.
    while next < end {
        tokio::time::sleep_until(next).await;
        let sent = tokio::time::Instant::now();
        if sent > next + period {
            late += 1;
            next += period;
            continue;
        }
        let done = tokio::time::timeout(ECHO_WAIT, async {
            s.write_all(&req).await?;
            s.read_exact(&mut buf).await
        })
        .await;
        if !matches!(done, Ok(Ok(_))) {
            return (None, lat, late);
        }
        lat.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
        next += period;
    }
    (Some(s), lat, late)
}

async fn load(conns: Vec<TcpStream>, rate: f64, secs: f64) -> (Vec<TcpStream>, LoadResult) {
    let n = conns.len();
    if n == 0 || rate <= 0.0 {
        return (conns, LoadResult::default());
    }
    // Each connection sends once per period, the connections evenly staggered.
    let period = Duration::from_secs_f64(n as f64 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let end = start + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for (i, s) in conns.into_iter().enumerate() {
        let first = start + period.mul_f64(i as f64 / n as f64);
        set.spawn(one_conn(s, first, period, end));
    }
    let mut kept = Vec::with_capacity(n);
    let mut result = LoadResult::default();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((s, lat, late)) => {
                result.txns += lat.len() as u64;
                result.late += late;
                result.latencies_us.extend(lat);
                match s {
                    Some(s) => kept.push(s),
                    None => result.failed += 1,
                }
            }
            Err(_) => result.failed += 1,
        }
    }
    result.secs = start.elapsed().as_secs_f64();
    result.latencies_us.sort_unstable();
    (kept, result)
}

/// The value at percentile `p` (0-100) of `sorted` (nearest rank), or `None` when empty.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    #[expect(
        clippy::cast_sign_loss,
        reason = "p is clamped to 0-100, so the rank is not negative"
    )]
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// What the proxy and the kernel hold at one moment, for the idle-connection figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Footprint {
    /// Open descriptors of the proxy's process tree (`/proc/PID/fd`).
    pub fds: u64,
    /// Resident memory of the proxy's process tree (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Unreclaimable slab of the whole machine (`SUnreclaim` of `/proc/meminfo`), KiB:
    /// sockets live there.
    pub slab_kib: u64,
    /// TCP memory of the whole machine (`mem` of `/proc/net/sockstat`), pages.
    pub tcp_pages: u64,
    /// TCP sockets in use in the node namespace (`inuse` of its sockstat and sockstat6:
    /// a dual-stack listener's accepted sockets are `TCPv6` sockets).
    pub node_sockets: u64,
    /// Entries of the forward path's connection table.
    pub table_entries: u64,
}

/// Idle-connection figures per connection: the growth from `before` to `after` over
/// the connections held.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerConn {
    pub fds: f64,
    pub rss_kib: f64,
    pub slab_kib: f64,
    pub tcp_kib: f64,
    pub node_sockets: f64,
    pub table_entries: f64,
}

impl Footprint {
    /// Growth from `before` to `self` per connection of `conns` (negative when a
    /// figure fell meanwhile: other work on the machine); `None` without connections.
    pub fn per_connection(&self, before: &Self, conns: usize, page: u64) -> Option<PerConn> {
        if conns == 0 {
            return None;
        }
        let per = |a: u64, b: u64| (a as f64 - b as f64) / conns as f64;
        Some(PerConn {
            fds: per(self.fds, before.fds),
            rss_kib: per(self.rss_kib, before.rss_kib),
            slab_kib: per(self.slab_kib, before.slab_kib),
            tcp_kib: per(self.tcp_pages, before.tcp_pages) * page as f64 / 1024.0,
            node_sockets: per(self.node_sockets, before.node_sockets),
            table_entries: per(self.table_entries, before.table_entries),
        })
    }
}

/// The number after `key` in a whitespace-separated line (`inuse 12`, `VmRSS: 1 kB`).
fn value_after(line: &str, key: &str) -> Option<u64> {
    let mut w = line.split_whitespace();
    w.by_ref().find(|x| *x == key)?;
    w.next()?.parse().ok()
}

/// `field` of the `TCP:` line of a sockstat text.
pub fn sockstat_tcp(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| value_after(l, field))
}

/// `field` of the `TCP6:` line of a sockstat6 text.
pub fn sockstat6_tcp(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("TCP6:"))
        .and_then(|l| value_after(l, field))
}

/// A `/proc/meminfo` (or `/proc/PID/status`) field, in kB.
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| value_after(l, name))
}

/// Reads the footprint now: the process tree of `pids`, the machine, the node
/// namespace `node`, and the forward table's size from `table` (0 without one).
pub fn footprint(
    pids: &[u32],
    node: &Netns,
    table: impl FnOnce() -> anyhow::Result<u64>,
) -> anyhow::Result<Footprint> {
    let mut f = Footprint::default();
    for pid in pids.iter().copied().chain(descendants(pids)) {
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            f.fds += dir.count() as u64;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        f.rss_kib += kib_field(&status, "VmRSS:").unwrap_or(0);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    f.slab_kib = kib_field(&meminfo, "SUnreclaim:").context("meminfo without SUnreclaim")?;
    // sockstat's `mem` is machine-wide, `inuse` is the reading thread's namespace.
    let (node_stat, node_stat6) = node.run(|| {
        Ok::<_, io::Error>((
            std::fs::read_to_string("/proc/thread-self/net/sockstat")?,
            std::fs::read_to_string("/proc/thread-self/net/sockstat6").unwrap_or_default(),
        ))
    })??;
    f.tcp_pages = sockstat_tcp(&node_stat, "mem").context("sockstat without TCP mem")?;
    f.node_sockets = sockstat_tcp(&node_stat, "inuse").context("sockstat without TCP inuse")?
        + sockstat6_tcp(&node_stat6, "inuse").unwrap_or(0);
    f.table_entries = table()?;
    Ok(f)
}

/// Fails unless `got` of `wanted` connections opened.
pub fn check_opened(what: &str, got: usize, failed: usize, wanted: usize) -> anyhow::Result<()> {
    if got < wanted {
        bail!("{what}: only {got} of {wanted} connections opened ({failed} failed)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn idle_connections_fit_the_descriptor_limit() {
        assert_eq!(idle_conns(262_144), IDLE_CONNS);
        assert_eq!(idle_conns(20_400), IDLE_CONNS);
        // A hard limit of 20,000 the bench may not raise: two per connection and a margin.
        assert_eq!(idle_conns(20_000), 9_800);
        assert_eq!(idle_conns(100), 0);
    }

    #[test]
    fn idle_figures_are_growth_per_connection() {
        let before = Footprint {
            fds: 20,
            rss_kib: 10_000,
            slab_kib: 500_000,
            tcp_pages: 3,
            node_sockets: 2,
            table_entries: 0,
        };
        let after = Footprint {
            fds: 20_024,
            rss_kib: 42_000,
            slab_kib: 540_000,
            tcp_pages: 3,
            node_sockets: 20_002,
            table_entries: 0,
        };
        let p = after.per_connection(&before, 10_000, 4096).unwrap();
        assert!((p.fds - 2.0004).abs() < 1e-9, "{p:?}");
        assert!((p.rss_kib - 3.2).abs() < 1e-9);
        assert!((p.slab_kib - 4.0).abs() < 1e-9);
        assert!(p.tcp_kib.abs() < 1e-9);
        assert!((p.node_sockets - 2.0).abs() < 1e-9);
        // The forward path: no socket, two table entries per connection; a figure
        // that fell meanwhile comes out negative, not wrapped.
        let fwd = Footprint {
            slab_kib: 499_000,
            table_entries: 20_000,
            ..before
        };
        let p = fwd.per_connection(&before, 10_000, 4096).unwrap();
        assert!((p.table_entries - 2.0).abs() < 1e-9);
        assert!(p.fds.abs() < 1e-9 && p.node_sockets.abs() < 1e-9);
        assert!((p.slab_kib + 0.1).abs() < 1e-9);
        assert_eq!(after.per_connection(&before, 0, 4096), None);
    }

    #[test]
    fn proc_fields_are_read_by_name() {
        let sockstat = "sockets: used 171\nTCP: inuse 20004 orphan 0 tw 3 alloc 20010 mem 7\n\
                        UDP: inuse 0 mem 0\n";
        assert_eq!(sockstat_tcp(sockstat, "inuse"), Some(20_004));
        assert_eq!(sockstat_tcp(sockstat, "mem"), Some(7));
        assert_eq!(sockstat_tcp("UDP: inuse 1", "inuse"), None);
        let sockstat6 = "TCP6: inuse 9902\nUDP6: inuse 0\n";
        assert_eq!(sockstat6_tcp(sockstat6, "inuse"), Some(9_902));
        assert_eq!(sockstat6_tcp(sockstat, "inuse"), None);
        let meminfo = "MemTotal:       24641420 kB\nSlab:             312000 kB\n\
                       SUnreclaim:       123456 kB\n";
        assert_eq!(kib_field(meminfo, "SUnreclaim:"), Some(123_456));
        assert_eq!(kib_field(meminfo, "Slab:"), Some(312_000));
        assert_eq!(kib_field("VmRSS:\t   4242 kB\n", "VmRSS:"), Some(4242));
        assert_eq!(kib_field(meminfo, "VmRSS:"), None);
    }
}
