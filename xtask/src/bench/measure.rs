//! The measurements: iperf3 throughput, sockperf round trips, new connections per
//! second, CPU accounting from /proc, kernel memory with a slow receiver, and the wait
//! for a quiet machine. Every loop here is bounded in time and count.
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netbed::Netns;

use super::procfs::{descendants, stat_fields};

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn field(f: &[String], i: usize) -> u64 {
    f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Clock ticks per second of the /proc counters.
pub fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// The aggregate `cpu` line of /proc/stat: (busy, idle, softirq) ticks, all CPUs.
fn proc_stat() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let idle = get(3) + get(4);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, idle, get(6))
}

/// CPU time counters at one instant, in ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSnap {
    /// User + system of the proxy's processes and all their threads and descendants
    /// (reaped children included through cutime/cstime).
    pub proxy: u64,
    /// System time of kernel workers (`kworker/*`): the sockmap backlog runs there.
    pub kworker: u64,
    /// Softirq time of the whole machine.
    pub softirq: u64,
    /// Busy time of the whole machine.
    pub machine: u64,
}

/// Takes a CPU snapshot for the proxy processes `pids` (empty for no proxy).
pub fn cpu_snapshot(pids: &[u32]) -> CpuSnap {
    let mut snap = CpuSnap::default();
    let tree: Vec<u32> = pids.iter().copied().chain(descendants(pids)).collect();
    for pid in tree {
        if let Some(f) = stat_fields(pid) {
            snap.proxy += field(&f, 11) + field(&f, 12) + field(&f, 13) + field(&f, 14);
        }
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if comm(pid).is_some_and(|c| c.starts_with("kworker"))
            && let Some(f) = stat_fields(pid)
        {
            snap.kworker += field(&f, 11) + field(&f, 12);
        }
    }
    let (busy, _, softirq) = proc_stat();
    snap.softirq = softirq;
    snap.machine = busy;
    snap
}

/// The machine's load when a sample starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    /// 1-minute load average.
    pub load1: f64,
    /// Busy share of all CPUs over the last short window, percent.
    pub busy_pct: f64,
}

fn busy_over(window: Duration) -> f64 {
    let (b0, i0, _) = proc_stat();
    std::thread::sleep(window);
    let (b1, i1, _) = proc_stat();
    let (db, di) = (b1.saturating_sub(b0), i1.saturating_sub(i0));
    if db + di == 0 {
        0.0
    } else {
        100.0 * db as f64 / (db + di) as f64
    }
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Waits (at most `max`) until the machine is quiet: under 15% busy over half a second.
pub fn wait_quiet(max: Duration) -> Load {
    let deadline = Instant::now() + max;
    loop {
        let busy = busy_over(Duration::from_millis(500));
        if busy < 15.0 || Instant::now() >= deadline {
            return Load {
                load1: load1(),
                busy_pct: busy,
            };
        }
    }
}

/// Waits for `child` at most `limit`; kills it (it is ours) when it overruns.
fn wait_output(mut child: Child, limit: Duration) -> anyhow::Result<(String, String)> {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A long-running tool (a server) in a namespace; killed by PID on drop.
pub struct Daemon(Child);

impl Daemon {
    pub fn start(ns: &Netns, program: &str, args: &[&str]) -> anyhow::Result<Self> {
        let child = ns
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok(Self(child))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run: bits per second received and bytes received.
pub fn iperf(
    client: &Netns,
    addr: SocketAddr,
    streams: u32,
    secs: u32,
) -> anyhow::Result<(f64, f64)> {
    let child = client
        .command("iperf3")
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", &secs.to_string(), "-P", &streams.to_string()])
        .args(["-J", "--connect-timeout", "3000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iperf3")?;
    let (out, err) = wait_output(child, Duration::from_secs(u64::from(secs) + 20))?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("iperf3 output is not JSON: {out}{err}"))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) => Ok((bps, bytes)),
        _ => bail!("iperf3 JSON without end.sum_received"),
    }
}

/// One sockperf ping-pong run with 64-byte messages: (p50, p99) full round trip in µs.
pub fn sockperf(client: &Netns, addr: SocketAddr, secs: u32) -> anyhow::Result<(f64, f64)> {
    let child = client
        .command("sockperf")
        .args(["ping-pong", "--tcp", "-i", &addr.ip().to_string()])
        .args(["-p", &addr.port().to_string(), "-m", "64"])
        .args(["-t", &secs.to_string(), "--full-rtt"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting sockperf")?;
    let (out, err) = wait_output(child, Duration::from_secs(u64::from(secs) + 20))?;
    let text = format!("{out}\n{err}");
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.split(&format!("percentile {p} =")).nth(1))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (pct("50.000"), pct("99.000")) {
        (Some(p50), Some(p99)) => Ok((p50, p99)),
        _ => bail!("sockperf printed no percentiles: {text}"),
    }
}

/// Threads of the small-exchange backend and client.
const CONN_THREADS: usize = 4;
const CONN_WORKERS: usize = 8;
/// Upper bound on the connections one client thread makes in one run.
const CONN_MAX_PER_THREAD: u64 = 2_000_000;

/// Bytes the slow receiver has read, all connections together.
pub static SLOW_READ: AtomicU64 = AtomicU64::new(0);

/// A TCP server on worker threads inside a namespace; stopped on drop.
pub struct Backend {
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Listens on `addr` in `ns` with `workers` threads each running `serve` on the
    /// connections it accepts.
    fn start(
        ns: &Netns,
        addr: SocketAddr,
        workers: usize,
        serve: fn(TcpStream, &AtomicBool),
    ) -> anyhow::Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..workers {
            let l = listener.try_clone()?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => serve(s, &stop),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            listener,
            threads,
        })
    }

    /// The small-exchange server: reads the request, answers `pong`, closes.
    pub fn exchange(ns: &Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start(ns, addr, CONN_WORKERS, |mut s, _| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 64];
            if s.read(&mut buf).unwrap_or(0) == 0 {
                return;
            }
            let _ = s.write_all(b"pong");
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = s.read(&mut buf);
        })
    }

    /// The slow receiver: reads 16 KiB every 10 ms (about 1.6 MB/s) until EOF or stop,
    /// counting what it read in [`SLOW_READ`].
    pub fn slow(ns: &Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start(ns, addr, 2, |mut s, stop| {
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = vec![0u8; 16 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        SLOW_READ.fetch_add(n as u64, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A listening socket shut down wakes every accept() blocked on it.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// New connections per second: `CONN_THREADS` clients in `client` each connect, send a
/// request, read the answer to EOF and close, for `secs`. Returns (rate, failures).
pub fn conn_rate(client: &Netns, addr: SocketAddr, secs: f64) -> anyhow::Result<(f64, u64)> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut threads = Vec::new();
    for _ in 0..CONN_THREADS {
        let (ok, failed) = (ok.clone(), failed.clone());
        threads.push(client.spawn(move || {
            let mut reply = Vec::with_capacity(16);
            for _ in 0..CONN_MAX_PER_THREAD {
                if Instant::now() >= deadline {
                    break;
                }
                reply.clear();
                let done = (|| -> io::Result<bool> {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"ping")?;
                    s.read_to_end(&mut reply)?;
                    Ok(reply == b"pong")
                })();
                if matches!(done, Ok(true)) {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?);
    }
    for t in threads {
        let _ = t.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((
        ok.load(Ordering::Relaxed) as f64 / elapsed,
        failed.load(Ordering::Relaxed),
    ))
}

/// One exchange (as in [`conn_rate`]) with `addr` from `client` every `every` until
/// `stop` is set (at most 100,000), each given a second; the thread returns (answered,
/// failed).
pub fn exchanges_until(
    client: &Netns,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    every: Duration,
) -> anyhow::Result<JoinHandle<(u64, u64)>> {
    Ok(client.spawn(move || {
        let (mut ok, mut failed) = (0, 0);
        let mut reply = Vec::with_capacity(16);
        for _ in 0..100_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let started = Instant::now();
            reply.clear();
            let done = (|| -> io::Result<bool> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.write_all(b"ping")?;
                s.read_to_end(&mut reply)?;
                Ok(reply == b"pong")
            })();
            if matches!(done, Ok(true)) {
                ok += 1;
            } else {
                failed += 1;
            }
            std::thread::sleep(every.saturating_sub(started.elapsed()));
        }
        (ok, failed)
    })?)
}

/// Kernel memory in use now, in bytes: (TCP memory from /proc/net/sockstat, memory in
/// use from /proc/meminfo as `MemTotal - MemAvailable`).
fn memory() -> (f64, f64) {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096.0, |p| p as f64);
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tcp_pages = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|x| *x == "mem")
                .and_then(|i| w.get(i + 1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        tcp_pages * page,
        (kib("MemTotal:") - kib("MemAvailable:")) * 1024.0,
    )
}

/// What the slow-receiver run saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct SlowResult {
    /// Peak growth of TCP memory (sockstat), bytes.
    pub tcp_growth: f64,
    /// Peak growth of memory in use (meminfo), bytes.
    pub used_growth: f64,
    /// Bytes the client wrote.
    pub sent: f64,
    /// Peak of bytes written by the client and not yet read by the receiver: what the
    /// path holds in kernel buffers and queues between them.
    pub queued: f64,
    /// Whether the run was stopped early at the memory cap.
    pub capped: bool,
}

/// Memory growth past which the slow-receiver run is stopped early.
pub const SLOW_CAP: f64 = 2.0 * 1024.0 * 1024.0 * 1024.0;

/// A fast writer in `client` sends to `addr` for `secs`, whose receiver reads about
/// 1.6 MB/s; samples kernel memory every 50 ms and reports the peak growth. Stops early
/// when memory grew by [`SLOW_CAP`].
pub fn slow_receiver(client: &Netns, addr: SocketAddr, secs: f64) -> anyhow::Result<SlowResult> {
    let (tcp0, used0) = memory();
    let read0 = SLOW_READ.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop2, sent2) = (stop.clone(), sent.clone());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let writer = client.spawn(move || -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_write_timeout(Some(Duration::from_millis(100)))?;
        let buf = vec![0x5au8; 64 * 1024];
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            match s.write(&buf) {
                Ok(n) => {
                    sent2.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        // Reset rather than wait for the slow reader to drain what is queued.
        let _ = nix::sys::socket::setsockopt(
            &s,
            nix::sys::socket::sockopt::Linger,
            &libc_linger_zero(),
        );
        Ok(())
    })?;
    let mut result = SlowResult::default();
    let hard_stop = deadline + Duration::from_secs(5);
    while !writer.is_finished() && Instant::now() < hard_stop {
        let (tcp, used) = memory();
        result.tcp_growth = result.tcp_growth.max(tcp - tcp0);
        result.used_growth = result.used_growth.max(used - used0);
        let read = SLOW_READ.load(Ordering::Relaxed).saturating_sub(read0);
        let queued = sent.load(Ordering::Relaxed).saturating_sub(read);
        result.queued = result.queued.max(queued as f64);
        if result.tcp_growth.max(result.used_growth).max(result.queued) > SLOW_CAP {
            result.capped = true;
            stop.store(true, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let outcome = writer
        .join()
        .map_err(|_| anyhow::anyhow!("slow-receiver writer panicked"))?;
    outcome.context("slow-receiver writer")?;
    result.sent = sent.load(Ordering::Relaxed) as f64;
    Ok(result)
}

fn libc_linger_zero() -> nix::libc::linger {
    nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    }
}

/// What one SYN flood measured.
#[derive(Clone, Copy, Debug)]
pub struct FloodResult {
    /// SYNs the raw socket sent.
    pub sent: u64,
    /// How far the counter given to [`syn_flood`] moved meanwhile: SYNs the guard
    /// dropped, or connections the forward path opened.
    pub counted: u64,
    /// Seconds the flood took.
    pub secs: f64,
    /// Softirq CPU time of the whole machine meanwhile, in seconds.
    pub softirq_s: f64,
}

/// Most SYNs one flood sends, whatever its duration.
pub const FLOOD_MAX: u64 = 50_000_000;

/// Sends SYNs from `src` to `dst` for `secs` (at most [`FLOOD_MAX`]) from one thread of
/// the client namespace pinned to `cpu`, and measures how far the counter `count` reads
/// moved (the guard's drops, the forward path's connections) and the machine's softirq
/// time meanwhile.
pub fn syn_flood(
    client: &Netns,
    src: std::net::Ipv4Addr,
    dst: std::net::SocketAddrV4,
    cpu: usize,
    secs: f64,
    count: impl Fn() -> anyhow::Result<u64>,
) -> anyhow::Result<FloodResult> {
    let d0 = count()?;
    let (_, _, s0) = proc_stat();
    let flood = client
        .run(move || -> io::Result<netbed::raw::Flood> {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).map_err(io::Error::from)?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .map_err(io::Error::from)?;
            netbed::raw::syn_flood(
                src,
                *dst.ip(),
                dst.port(),
                FLOOD_MAX,
                Duration::from_secs_f64(secs),
            )
        })?
        .context("raw-socket SYN flood")?;
    let (_, _, s1) = proc_stat();
    // Let the last packets queued for another CPU be processed before counting.
    std::thread::sleep(Duration::from_millis(100));
    let d1 = count()?;
    if flood.sent == 0 {
        bail!("the flood sent nothing ({} sends failed)", flood.failed);
    }
    Ok(FloodResult {
        sent: flood.sent,
        counted: d1.saturating_sub(d0),
        secs: flood.elapsed.as_secs_f64(),
        softirq_s: s1.saturating_sub(s0) as f64 / ticks_per_sec(),
    })
}
