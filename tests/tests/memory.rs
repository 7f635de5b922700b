//! Kernel memory on the kernel path: a client writing as fast as it can through a
//! sockmap pair to a backend that reads slowly must not grow kernel memory without
//! limit, and every byte must still arrive, in order.
//!
//! The client writes for [`SEND_TIME`] while the backend reads [`SLOW_RATE`]; then the
//! client sends its FIN and the backend reads the rest at full speed and checks every
//! byte. What the connection holds in the kernel is sampled all along: the queue the
//! verdict program built towards the backend socket (bytes redirected or parked, from
//! the pinned `GW_PEERS`, minus what that socket's TCP took, from `ss`), plus the
//! socket buffers of the node's two sockets (`ss` skmem). The queue is the part nothing
//! else bounds: without the throttle it held more than 2 GB after 5 s. Machine-wide
//! `/proc/meminfo` is printed too, for information: other traffic on a shared machine
//! moves it by hundreds of MiB, so it cannot carry an assertion.
mod common;

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use common::{Agent, Stream, connect, require_root};
use netbed::{Bed, servers};

const MIB: u64 = 1024 * 1024;
/// How long the client writes.
const SEND_TIME: Duration = Duration::from_secs(5);
/// How fast the backend reads while the client writes.
const SLOW_RATE: u64 = MIB;
/// `--kernel-queue-limit` of the agent (the default).
const QUEUE_LIMIT: u64 = 4 * MIB;
/// Most of the client's bytes, in percent, that may cross userspace (parked by the
/// verdict and forwarded by the agent) under the slow reader: about one offered
/// window per throttle, against the limit's worth moved in the kernel; measured
/// 1.1-10.9% (docs/datapath.md, "Kernel memory"), 75-84% before the brake.
const MAX_USERSPACE_PERCENT: f64 = 25.0;

/// Kernel memory outside the page LRU lists, in bytes (`/proc/meminfo`). Printed for
/// information only: it is machine-wide, and other traffic on the machine moves it by
/// hundreds of MiB.
fn meminfo_kernel() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024
    };
    field("MemTotal")
        .saturating_sub(field("MemFree"))
        .saturating_sub(field("Active"))
        .saturating_sub(field("Inactive"))
        .saturating_sub(field("Unevictable"))
}

/// One socket of the node namespace, from `ss -tmi`.
#[derive(Debug, Default)]
struct SockMem {
    peer: String,
    /// `Send-Q`: bytes in the send queue (not acknowledged yet).
    send_q: u64,
    /// `bytes_acked`.
    bytes_acked: u64,
    /// `skmem` r (receive queue) + w (send queue) + o + bl: socket buffer memory.
    mem: u64,
}

fn field_after(text: &str, key: &str) -> u64 {
    text.split([',', ' ', '(', ')'])
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Established TCP sockets of the node namespace with their memory.
fn node_sockets(bed: &Bed) -> Vec<SockMem> {
    let out = bed
        .node()
        .output("ss", &["-tmiHn", "state", "established"])
        .expect("ss runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut socks: Vec<SockMem> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(s) = socks.last_mut() {
                s.bytes_acked = s.bytes_acked.max(field_after(line, "bytes_acked:"));
                if let Some(i) = line.find("skmem:(") {
                    let m = &line[i + 6..];
                    s.mem += field_after(m, "r")
                        + field_after(m, "w")
                        + field_after(m, "o")
                        + field_after(m, "bl");
                }
            }
        } else {
            // Recv-Q Send-Q Local Peer (state omitted when filtered)
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 4 {
                socks.push(SockMem {
                    peer: cols[3].to_owned(),
                    send_q: cols[1].parse().unwrap_or(0),
                    ..SockMem::default()
                });
            }
        }
    }
    socks
}

/// (bytes redirected, bytes parked) by the verdict on the client socket of the only
/// pair, from `bpftool map dump` of the agent's pinned `GW_PEERS`.
fn client_side_counts(agent: &Agent) -> Option<(u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(agent.pin_dir.join("GW_PEERS"))
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let entry = v
        .as_array()?
        .iter()
        .find(|e| e["formatted"]["value"]["direction"] == 0 || e["value"]["direction"] == 0)?;
    let value = if entry["formatted"].is_object() {
        &entry["formatted"]["value"]
    } else {
        &entry["value"]
    };
    Some((
        value["bytes_redirected"].as_u64()?,
        value["bytes_passed"].as_u64().unwrap_or(0),
    ))
}

/// What the connection holds in the kernel now, in bytes: the verdict's queue towards
/// the backend socket (bytes redirected or parked minus what the backend socket's TCP
/// took: `bytes_acked` + `Send-Q`), plus the buffers of the node's two sockets.
/// Parked bytes count twice (in the queue and in the client socket's receive buffer):
/// an upper bound.
fn connection_kernel_bytes(bed: &Bed, agent: &Agent, backend: SocketAddr) -> Option<u64> {
    let (redirected, passed) = client_side_counts(agent)?;
    let socks = node_sockets(bed);
    let b = socks.iter().find(|s| s.peer == backend.to_string())?;
    let taken = b.bytes_acked + b.send_q;
    let queue = (redirected + passed).saturating_sub(taken);
    Some(queue + socks.iter().map(|s| s.mem).sum::<u64>())
}

/// Samples until `stop`; returns the largest connection figure and the largest
/// machine-wide `meminfo` growth over `base`.
fn sample(
    bed: &Bed,
    agent: &Agent,
    backend: SocketAddr,
    base: u64,
    stop: &AtomicBool,
) -> (u64, u64, usize) {
    let mut conn = 0;
    let mut machine = 0;
    let mut samples = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Some(b) = connection_kernel_bytes(bed, agent, backend) {
            conn = conn.max(b);
            samples += 1;
        }
        machine = machine.max(meminfo_kernel().saturating_sub(base));
        std::thread::sleep(Duration::from_millis(50));
    }
    (conn, machine, samples)
}

/// The backend: reads at `SLOW_RATE` until `fast` is set, then at full speed until
/// EOF. Returns the byte count and the offset of the first wrong byte.
fn slow_reader(mut s: TcpStream, fast: &AtomicBool) -> io::Result<(u64, Option<u64>)> {
    let mut stream = Stream::new(7);
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut bad = None;
    let started = Instant::now();
    loop {
        let slow = !fast.load(Ordering::Relaxed);
        let chunk = if slow { 64 * 1024 } else { buf.len() };
        let n = s.read(&mut buf[..chunk])?;
        if n == 0 {
            return Ok((total, bad));
        }
        stream.fill(&mut want[..n]);
        if bad.is_none()
            && let Some(i) = (0..n).find(|&i| buf[i] != want[i])
        {
            bad = Some(total + i as u64);
        }
        total += n as u64;
        if slow {
            // Pace to SLOW_RATE since the start.
            let due = Duration::from_micros(total * 1_000_000 / SLOW_RATE);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(100)));
            }
        }
    }
}

/// The client: writes as fast as the connection takes for `SEND_TIME`, then sends
/// its FIN. Returns the bytes written.
fn fast_writer(mut s: TcpStream) -> io::Result<u64> {
    s.set_write_timeout(Some(Duration::from_millis(100)))?;
    let mut stream = Stream::new(7);
    let mut buf = vec![0u8; 256 * 1024];
    let mut pending = 0..0;
    let mut total = 0u64;
    let deadline = Instant::now() + SEND_TIME;
    while Instant::now() < deadline {
        if pending.is_empty() {
            stream.fill(&mut buf);
            pending = 0..buf.len();
        }
        match s.write(&buf[pending.clone()]) {
            Ok(n) => {
                pending.start += n;
                total += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    // Finish the chunk in progress so the stream stays whole, then FIN.
    s.set_write_timeout(Some(Duration::from_mins(1)))?;
    s.write_all(&buf[pending.clone()])?;
    total += pending.len() as u64;
    s.shutdown(Shutdown::Write)?;
    Ok(total)
}

/// `sysctl` value inside `ns` (the largest of a triple such as `tcp_rmem`).
fn sysctl_max(bed: &Bed, name: &str) -> u64 {
    let out = bed
        .node()
        .output("sysctl", &["-n", name])
        .expect("sysctl runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .max()
        .unwrap_or_else(|| panic!("sysctl {name}"))
}

/// Starts `handler` as the server of backend 0 (port 3001) and an agent whose listener
/// 8088 routes to it on the kernel path with the queue limit [`QUEUE_LIMIT`] and the
/// `extra` flags; returns both and the listener's address.
fn kernel_path_agent(
    bed: &Bed,
    handler: servers::Handler,
    extra: &[&str],
) -> (servers::Server, Agent, SocketAddr) {
    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let server = servers::Server::start(bed.backend(0), backend, handler).expect("server");
    let route = format!("8088={backend}");
    let limit = QUEUE_LIMIT.to_string();
    let mut args = vec![
        "--route",
        &route,
        "--datapath",
        "sockmap",
        "--kernel-queue-limit",
        &limit,
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start(bed, &args, &[8088]);
    (server, agent, SocketAddr::new(bed.node_addr().into(), 8088))
}

/// What one slow-receiver run measured.
struct SlowReceiver {
    /// Bytes client->backend the agent forwarded from userspace (parked bytes).
    userspace: u64,
    /// Bytes client->backend the verdict redirected in the kernel.
    kernel: u64,
    /// Throttles the verdict counted.
    throttles: u64,
}

impl SlowReceiver {
    /// Share of the client's bytes that crossed userspace, in percent.
    #[expect(clippy::cast_precision_loss, reason = "a percentage for a report")]
    fn userspace_percent(&self) -> f64 {
        100.0 * self.userspace as f64 / (self.userspace + self.kernel).max(1) as f64
    }
}

/// A client writing as fast as it can for [`SEND_TIME`] through the kernel path to a
/// backend that reads [`SLOW_RATE`], on an agent started with `extra` flags;
/// `socket_buffer` is the `--socket-buffer` among them (0 for the kernel's defaults).
/// Checks that every byte arrived in order, that the client outran the backend, that
/// the connection's kernel memory stayed under its bound, and that the kernel path
/// carried the connection; prints and returns the figures.
fn slow_receiver(extra: &[&str], socket_buffer: u64) -> SlowReceiver {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let fast = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let fast2 = fast.clone();
    let handler: servers::Handler = Arc::new(move |s: TcpStream| {
        let got = slow_reader(s, &fast2);
        let _ = tx.lock().expect("lock").send(got);
    });
    let (_server, agent, addr) = kernel_path_agent(&bed, handler, extra);

    // The bound: the verdict's queue limit, plus what TCP bounds by itself on the two
    // node sockets (parked bytes in the client socket's receive buffer, counted twice by
    // the measure, and the backend socket's send buffer). A buffer set with SO_RCVBUF /
    // SO_SNDBUF is doubled by the kernel.
    let rmem = sysctl_max(&bed, "net.ipv4.tcp_rmem").max(2 * socket_buffer);
    let wmem = sysctl_max(&bed, "net.ipv4.tcp_wmem").max(2 * socket_buffer);
    let bound = QUEUE_LIMIT + 2 * rmem + wmem + MIB;

    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let base = meminfo_kernel();
    let stop = AtomicBool::new(false);
    let ((sent, client), (held_max, machine_growth, samples)) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| sample(&bed, &agent, backend, base, &stop));
        let sent = bed
            .client()
            .run(move || {
                let s = connect(addr).expect("connect");
                let sent = fast_writer(s.try_clone().expect("clone"));
                (sent, s)
            })
            .expect("client");
        stop.store(true, Ordering::Relaxed);
        (sent, sampler.join().expect("sampler"))
    });
    fast.store(true, Ordering::Relaxed);
    let sent = sent.expect("client writes");
    let got = rx
        .recv_timeout(Duration::from_mins(3))
        .expect("backend result")
        .expect("backend reads");
    drop(client);
    let stats = agent.stats(8088);
    let count = |name: &str| stats[name].as_u64().unwrap_or(0);
    let run = SlowReceiver {
        userspace: count("bytes_client_to_backend_userspace"),
        kernel: count("bytes_client_to_backend_kernel"),
        throttles: count("kernel_throttles"),
    };
    eprintln!(
        "flags {extra:?}: sent {sent} bytes in {SEND_TIME:?} to a {SLOW_RATE} B/s reader; \
         userspace share {:.2}% ({} of {} bytes), {} throttles; connection kernel memory \
         max {held_max} bytes over {samples} samples (bound {bound}); machine-wide meminfo \
         growth {} MiB (other traffic included); counters {stats}",
        run.userspace_percent(),
        run.userspace,
        run.userspace + run.kernel,
        run.throttles,
        machine_growth / MIB
    );
    assert_eq!(got, (sent, None), "backend: (bytes, first bad offset)");
    // Flow control holds the client back to the backend's pace once the queue is
    // full (with the brake, exactly to it: 5 MiB in 5 s was seen), but the queue must
    // have reached the limit for the test to mean anything: the verdict throttled.
    assert!(
        sent >= SLOW_RATE * SEND_TIME.as_secs() && run.throttles >= 1,
        "the client must outrun the backend for the test to mean anything: sent {sent}, {} throttles",
        run.throttles
    );
    assert!(samples >= 10, "too few memory samples: {samples}");
    assert!(
        held_max < bound,
        "the connection held {held_max} bytes of kernel memory (bound {bound})"
    );
    // The kernel path carried the connection.
    assert_eq!(stats["kernel_connections"], 1, "{stats}");
    assert_eq!(stats["userspace_connections"], 0, "{stats}");
    assert_eq!(run.userspace + run.kernel, sent, "{stats}");
    // With the brake, flow control, not parking, keeps the queue bounded: few bytes
    // cross userspace.
    if extra.contains(&"--kernel-brake") {
        assert!(
            run.userspace_percent() < MAX_USERSPACE_PERCENT,
            "{:.2}% of the bytes crossed userspace: {stats}",
            run.userspace_percent()
        );
    }
    run
}

/// The default (`--kernel-brake false`): the throttle alone bounds the memory, and
/// parked bytes cross userspace (75-84% of them measured).
#[test]
fn fast_client_slow_backend_kernel_memory_bounded() {
    let run = slow_receiver(&[], 0);
    assert!(run.throttles >= 1, "the queue never reached its limit");
}

/// With the brake: bounded, and few bytes cross userspace.
#[test]
fn fast_client_slow_backend_brake_memory_bounded() {
    let run = slow_receiver(&["--kernel-brake", "true"], 0);
    assert!(run.throttles >= 1, "the queue never reached its limit");
}

/// The same with fixed 4 MiB socket buffers (no autotuning).
#[test]
fn fast_client_slow_backend_brake_fixed_buffers_memory_bounded() {
    slow_receiver(
        &[
            "--kernel-brake",
            "true",
            "--socket-buffer",
            "4M",
            "--socket-buffer-autotune",
            "false",
        ],
        4 * MIB,
    );
}

/// A throttled connection still ends cleanly: the backend never reads, the client
/// writes until the kernel path throttles it, then the backend resets. The client
/// must see the reset, and the pair must leave the maps.
#[test]
fn throttled_connection_reset_by_backend() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let handler: servers::Handler = Arc::new(move |s: TcpStream| {
        // Read nothing; reset when told (or after a bound).
        let _ = rx
            .lock()
            .expect("lock")
            .recv_timeout(Duration::from_secs(30));
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    });
    let (_server, agent, addr) = kernel_path_agent(&bed, handler, &[]);
    let client = bed
        .client()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            // Write until the connection takes nothing more for a while (bounded).
            let buf = vec![0x5au8; 256 * 1024];
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut sent = 0u64;
            let mut idle = 0;
            while Instant::now() < deadline && idle < 5 {
                match s.write(&buf) {
                    Ok(n) => {
                        sent += n as u64;
                        idle = 0;
                    }
                    Err(_) => idle += 1,
                }
            }
            (s, sent)
        })
        .expect("client");
    let (mut client, sent) = client;
    let stats = agent.stats(8088);
    eprintln!("client wrote {sent} bytes into a backend that reads nothing; counters {stats}");
    assert!(stats["kernel_throttles"].as_u64() >= Some(1), "{stats}");
    assert_eq!(stats["active_kernel"], 1, "{stats}");
    // Bounded: the client got no further than the bound of the first test allows.
    assert!(
        sent < 256 * MIB,
        "the client wrote {sent} bytes into a backend that reads nothing"
    );
    tx.send(()).expect("backend told to reset");
    // The reset reaches the client: a read or write fails with a reset (bounded).
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 1];
    let got = client.read(&mut b);
    assert!(
        matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "client read after the backend reset: {got:?}"
    );
    // Both sockets and map entries are gone.
    for _ in 0..100 {
        let s = agent.stats(8088);
        if agent.status()["paired_sockets"] == 0 && s["active_kernel"] == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("pair left after the reset: {}", agent.status());
}
