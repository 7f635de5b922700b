//! Fault end-to-end tests of the socket paths: the agent at its open-file limit (the
//! accept loop backs off instead of spinning, established connections keep flowing,
//! accepting resumes when descriptors are free again), a full socket map (the
//! connections that find `GW_SOCKS`/`GW_PEERS` full take splice), and the pin directory
//! removed by hand while the agent runs (the maps are pinned again).
mod common;

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, connect, exchange, metrics, require_root};
use netbed::{Bed, servers};

const PORT: u16 = 8090;
const WARNING: &str = "descriptor limit reached";

fn listener_addr(bed: &Bed) -> SocketAddr {
    SocketAddr::new(bed.node_addr().into(), PORT)
}

fn backend(bed: &Bed) -> SocketAddr {
    SocketAddr::new(bed.backend_addr(0).into(), 3001)
}

/// The value of the sample `name{labels}` in a text exposition, if present.
fn sample(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Connects and exchanges one line, with short timeouts: the reply, or why none came.
fn try_exchange(addr: SocketAddr, line: &str) -> io::Result<(TcpStream, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s.try_clone()?).read_line(&mut reply)?;
    Ok((s, reply))
}

/// Sets the open-file limit (soft and hard) of process `pid`.
fn set_nofile(pid: u32, limit: u64) {
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("prlimit runs (util-linux)");
    assert!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The descriptor numbers open in process `pid`.
fn open_fds(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The lowest descriptor number not open in process `pid`.
fn lowest_free_fd(pid: u32) -> u64 {
    let fds = open_fds(pid);
    // Among len + 1 numbers one at least is free.
    (0..=fds.len() as u64)
        .find(|n| !fds.contains(n))
        .expect("a free number")
}

/// CPU time of process `pid` (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at field 3 (state):
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The share of `wall` time process `pid` spent on a CPU since `ticks_before`.
#[expect(clippy::cast_precision_loss, reason = "ticks of a few seconds")]
fn busy_since(pid: u32, ticks_before: u64, wall: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).expect("_SC_CLK_TCK");
    (cpu_ticks(pid) - ticks_before) as f64 / (wall.as_secs_f64() * per_second as f64)
}

/// Connections from the client namespace, each exchanging a line, until one is not
/// served (or 40 are): the ones served, still open.
fn connect_until_refused(bed: &Bed, addr: SocketAddr) -> Vec<TcpStream> {
    let (held, refused) = bed
        .client()
        .run(move || {
            let mut held = Vec::new();
            for i in 0..40 {
                match try_exchange(addr, &format!("hi {i}\n")) {
                    Ok((s, reply)) if reply == format!("foo: hi {i}\n") => held.push(s),
                    _ => return (held, true),
                }
            }
            (held, false)
        })
        .expect("client");
    assert!(refused, "40 connections served under a limit of about 6");
    assert!(!held.is_empty(), "no connection served before the limit");
    held
}

#[test]
fn descriptor_limit_backs_off_and_recovers() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed), servers::named_echo("foo"))
        .expect("backend");
    let route = format!("{PORT}={}", backend(&bed));
    let mut agent = Agent::start(&bed, &["--route", &route, "--datapath", "sockmap"], &[PORT]);
    let pid = agent.child.id();

    // A small hard limit: room for about six connections above what the agent holds
    // now (two descriptors each on the kernel path; descriptors are numbered from the
    // lowest free one, and inherited ones may sit far above).
    set_nofile(pid, lowest_free_fd(pid) + 2 * 6);
    let addr = listener_addr(&bed);
    let held = connect_until_refused(&bed, addr);

    // No descriptor number left at all (whatever the parity of what remained), then
    // connections that wait in the listen queue: every accept fails with EMFILE.
    set_nofile(pid, lowest_free_fd(pid));
    let waiting = bed
        .client()
        .run(move || {
            (0..3)
                .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("queued"))
                .collect::<Vec<_>>()
        })
        .expect("client");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        agent.log_text().contains(WARNING),
        "no descriptor warning:\n{}",
        agent.log_text()
    );

    let warnings = || agent.log_text().matches(WARNING).count();
    let (before, ticks_before, started) = (warnings(), cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (after, busy) = (warnings(), busy_since(pid, ticks_before, started.elapsed()));
    eprintln!(
        "at the limit: {after} warning line(s), agent busy {:.1}% of 3 s",
        busy * 100.0
    );
    assert!(
        agent.child.try_wait().expect("try_wait").is_none(),
        "the agent exited at the descriptor limit:\n{}",
        agent.log_text()
    );
    assert!(
        after <= 3,
        "{after} descriptor warnings (at most 3 expected)"
    );
    assert_eq!(
        after, before,
        "the warning repeated while the limit persisted"
    );
    // A spin check, not a performance assertion: a loop retrying accept without pause
    // keeps a core busy; backing off leaves the agent almost idle.
    assert!(
        busy < 0.1,
        "agent busy {:.0}% of the time at the limit",
        busy * 100.0
    );

    // Established connections keep flowing at the limit.
    let (held, reply) = bed
        .client()
        .run(move || {
            let mut held = held;
            let r = exchange(&mut held[0], "still\n");
            (held, r)
        })
        .expect("client");
    assert_eq!(reply, "foo: still\n");

    // Descriptors free again below the same limit (the connections closed): the
    // waiting connections are accepted and new ones served.
    drop(held);
    drop(waiting);
    let served = bed
        .client()
        .run(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match try_exchange(addr, "again\n") {
                    Ok((_, reply)) if reply == "foo: again\n" => return true,
                    _ if Instant::now() > deadline => return false,
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
        .expect("client");
    assert!(
        served,
        "no connection served after the limit:\n{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(log.contains("accepting again"), "{log}");
    assert_eq!(log.matches(WARNING).count(), after);
    let text = metrics(&bed);
    let errors = sample(
        &text,
        "sockgate_accept_errors_total{reason=\"descriptors\"}",
    )
    .expect("accept error metric");
    assert!(errors >= 1, "{text}");
    assert!(agent.stop().success());
}

#[test]
fn full_socket_map_falls_back_to_splice() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed), servers::named_echo("foo"))
        .expect("backend");
    let route = format!("{PORT}={}", backend(&bed));
    // Room for four pairs.
    let mut agent = Agent::start(
        &bed,
        &[
            "--route",
            &route,
            "--datapath",
            "sockmap",
            "--max-sockets",
            "8",
        ],
        &[PORT],
    );
    let addr = listener_addr(&bed);
    let held = bed
        .client()
        .run(move || {
            (0..10)
                .map(|i| {
                    let mut s = connect(addr).expect("connect");
                    assert_eq!(
                        exchange(&mut s, &format!("hi {i}\n")),
                        format!("foo: hi {i}\n")
                    );
                    s
                })
                .collect::<Vec<_>>()
        })
        .expect("client");
    // Every connection still carries data, whichever path it took.
    let held = bed
        .client()
        .run(move || {
            let mut held = held;
            for (i, s) in held.iter_mut().enumerate() {
                assert_eq!(
                    exchange(s, &format!("more {i}\n")),
                    format!("foo: more {i}\n")
                );
            }
            held
        })
        .expect("client");
    let stats = agent.stats(PORT);
    assert_eq!(stats["kernel_connections"], 4, "{stats}");
    assert_eq!(stats["userspace_connections"], 6, "{stats}");
    let log = agent.log_text();
    let warned = log
        .lines()
        .filter(|l| l.contains("sockmap pairing failed") && l.contains("WARN"))
        .count();
    assert_eq!(warned, 1, "{log}");
    let text = metrics(&bed);
    assert_eq!(
        sample(
            &text,
            "sockgate_sockmap_pair_failures_total{reason=\"map_full\"}"
        ),
        Some(6),
        "{text}"
    );

    // Closed pairs leave the maps: the next connection takes the kernel path again.
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    bed.client()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            assert_eq!(exchange(&mut s, "after\n"), "foo: after\n");
        })
        .expect("client");
    let stats = agent.stats(PORT);
    assert_eq!(stats["kernel_connections"], 5, "{stats}");
    assert_eq!(stats["userspace_connections"], 6, "{stats}");
    assert!(agent.stop().success());
}

#[test]
fn removed_pin_directory_is_pinned_again() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed), servers::named_echo("foo"))
        .expect("backend");
    let route = format!("{PORT}={}", backend(&bed));
    let mut agent = Agent::start(&bed, &["--route", &route, "--datapath", "sockmap"], &[PORT]);
    let addr = listener_addr(&bed);
    let first = bed
        .client()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            assert_eq!(exchange(&mut s, "one\n"), "foo: one\n");
            s
        })
        .expect("client");
    let before = agent.stats(PORT);
    assert_eq!(before["kernel_connections"], 1, "{before}");

    std::fs::remove_dir_all(&agent.pin_dir).expect("rm -r the pin directory");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.pin_dir.join(gateway_common::GW_LISTENERS).exists() {
        assert!(
            Instant::now() < deadline,
            "pins not restored:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for name in gateway_common::MAP_NAMES {
        assert!(agent.pin_dir.join(name).exists(), "{name} not pinned again");
    }
    // The same maps, with their entries: the listener and its counters are still there,
    // and traffic (old and new connections) still flows.
    let (first, second) = bed
        .client()
        .run(move || {
            let mut first = first;
            assert_eq!(exchange(&mut first, "two\n"), "foo: two\n");
            let mut s = connect(addr).expect("connect");
            assert_eq!(exchange(&mut s, "three\n"), "foo: three\n");
            (first, s)
        })
        .expect("client");
    let after = agent.stats(PORT);
    assert_eq!(after["kernel_connections"], 2, "{after}");
    let log = agent.log_text();
    assert_eq!(
        log.matches("pinned maps were removed from outside the agent")
            .count(),
        1,
        "{log}"
    );
    drop((first, second));
    assert!(agent.stop().success());
    assert!(!agent.pin_dir.exists(), "pins left after a clean stop");
}
