//! The node-local shortcut (`--local-shortcut`, off by default): a client in the node's own
//! namespace (where the agent runs) sends straight into the backend socket. Integrity,
//! half-close and resets, the shortcut really taken (its counters), and nothing left
//! on the cgroup root once the agent stopped.
mod common;

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use common::{
    Agent, Stream, Writes, backend_addr as backend, connect, duplex, listener_addr, require_root,
};
use netbed::{Bed, servers};

const MIB: u64 = 1024 * 1024;

/// A counter of the shortcut, as `sockgate status --json` shows it (`local_shortcut`,
/// read from the pinned `GW_LOCAL_STATS`, summed over the CPUs).
fn local_stat(agent: &Agent, field: &str) -> u64 {
    let status = agent.status();
    status["local_shortcut"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("local_shortcut.{field} in the status: {status}"))
}

/// The cgroup v2 root (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
fn cgroup2_root() -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let dirs: Vec<String> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
        })
        .collect();
    if dirs.iter().any(|d| d == "/sys/fs/cgroup") {
        return "/sys/fs/cgroup".into();
    }
    dirs.first().cloned().expect("a cgroup2 mount")
}

/// Ids of the programs attached to the cgroup v2 root.
fn cgroup_program_ids() -> Vec<u64> {
    // bpftool prints an empty line, not `[]`, for a cgroup without programs.
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show", &cgroup2_root()])
        .output()
        .expect("bpftool runs");
    assert!(out.status.success(), "bpftool cgroup show: {out:?}");
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    let out: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    out.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// Ids of the programs of the cgroup bpf links the process `pid` holds (from the
/// `fdinfo` of its descriptors: `link_type` and `prog_id`).
fn sock_ops_links_of(pid: u32) -> Vec<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for e in std::fs::read_dir(&dir).expect("fdinfo").flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if field("link_type:").as_deref() == Some("cgroup")
            && let Some(id) = field("prog_id:").and_then(|v| v.parse().ok())
        {
            ids.push(id);
        }
    }
    ids
}

/// A blocking `read` on a node-local client socket in the shortcut's sockhash: the
/// socket's `recvmsg` is then `tcp_bpf_recvmsg()`, which returns `EAGAIN` to a
/// blocking reader when it is woken without data (a send's write-space wakeup, a
/// reset's error report: `tcp_msg_wait_data()` waits once). Such an early `EAGAIN` is
/// retried and counted in `spurious`; one after the socket's whole read timeout is an
/// error.
fn read_retrying(s: &mut TcpStream, buf: &mut [u8], spurious: &mut u64) -> io::Result<usize> {
    let timeout = s.read_timeout()?.unwrap_or(Duration::from_secs(30));
    loop {
        let start = Instant::now();
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < timeout => {
                *spurious += 1;
                assert!(*spurious < 10_000_000, "endless EAGAIN");
            }
            r => return r,
        }
    }
}

/// As `common::recv_stream`, reading with [`read_retrying`]: (bytes, first bad
/// offset, early `EAGAIN`s).
fn recv_stream_retrying(mut s: TcpStream, seed: u64) -> (u64, Option<u64>, u64) {
    let mut stream = Stream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let (mut total, mut bad, mut spurious) = (0u64, None, 0u64);
    loop {
        let n = read_retrying(&mut s, &mut buf, &mut spurious).expect("receive");
        if n == 0 {
            return (total, bad, spurious);
        }
        stream.fill(&mut want[..n]);
        if bad.is_none()
            && let Some(i) = (0..n).find(|&i| buf[i] != want[i])
        {
            bad = Some(total + i as u64);
        }
        total += n as u64;
    }
}

fn start(bed: &Bed, routes: &[&str], ports: &[u16]) -> Agent {
    let mut args = vec!["--datapath", "sockmap", "--local-shortcut"];
    for r in routes {
        args.extend(["--route", r]);
    }
    Agent::start(bed, &args, ports)
}

/// Stops the agent and checks it left no program on the cgroup root.
fn stop_clean(mut agent: Agent) {
    let ids = sock_ops_links_of(agent.child.id());
    assert_eq!(ids.len(), 1, "one sock_ops link held by the agent");
    assert!(
        cgroup_program_ids().contains(&ids[0]),
        "its program is on the cgroup root"
    );
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status}");
    assert!(
        !cgroup_program_ids().contains(&ids[0]),
        "program {} left on the cgroup root",
        ids[0]
    );
}

/// As `common::send_stream`, pausing `pause` after the first KiB when `pause` is set
/// (a client that waits, as most do after a request, gives the agent the moment it
/// needs to switch it: everything it sent over loopback taken by the backend socket).
fn send_stream_pausing(
    mut s: TcpStream,
    seed: u64,
    total: u64,
    pause: Option<Duration>,
) -> io::Result<()> {
    let mut stream = Stream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    if let Some(pause) = pause {
        stream.fill(&mut buf[..1024]);
        s.write_all(&buf[..1024])?;
        left -= 1024;
        std::thread::sleep(pause);
    }
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        stream.fill(&mut buf[..n]);
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
}

/// 64 MiB each way between a client in the node namespace and the backend, both
/// directions at once, each byte checked, twice: a client that pauses after its first
/// KiB (it is switched: the rest of its bytes go through the shortcut, `sk_msg`
/// redirect, not over loopback), then one that sends without a pause (it may never
/// be switched; its bytes arrive whole and in order either way).
#[test]
fn local_shortcut_integrity_64mib_each_way() {
    require_root();
    let total = 64 * MIB;
    let bed = Bed::new(1).expect("bed");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |s: TcpStream| {
        let got = duplex(&s, 2, 1, total, Writes::Large);
        let _ = tx.lock().expect("lock").send(got);
    });
    let _server =
        servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), handler).expect("server");
    let route = format!("8088={}", backend(&bed, 0, 3001));
    let agent = start(&bed, &[&route], &[8088]);
    let addr = listener_addr(&bed, 8088);
    for (name, pause) in [
        ("pausing client", Some(Duration::from_millis(300))),
        ("client without a pause", None),
    ] {
        let client_got = bed
            .node()
            .run(move || {
                let s = connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_mins(2)))
                    .expect("timeout");
                let tx = s.try_clone().expect("clone");
                let sender = std::thread::spawn(move || send_stream_pausing(tx, 1, total, pause));
                let got = recv_stream_retrying(s, 2);
                sender.join().expect("sender").expect("send");
                got
            })
            .expect("client");
        let (client_bytes, client_bad, spurious) = client_got;
        eprintln!("{name}: {spurious} early EAGAIN from a blocking read");
        let server_got = rx
            .recv_timeout(Duration::from_mins(2))
            .expect("server result");
        assert_eq!(server_got, (total, None), "{name}: client -> backend");
        assert_eq!(
            (client_bytes, client_bad),
            (total, None),
            "{name}: backend -> client"
        );
        let switches = local_stat(&agent, "switches");
        eprintln!(
            "after the {name}: clients {}, bytes redirected {}, passed {}, switches {switches}",
            local_stat(&agent, "clients"),
            local_stat(&agent, "bytes_redirected"),
            local_stat(&agent, "bytes_passed"),
        );
        if pause.is_some() {
            assert_eq!(switches, 1, "the pausing client switched");
            assert!(
                local_stat(&agent, "bytes_redirected") >= total - 1024,
                "every byte after the pause took the shortcut"
            );
        }
    }
    let redirected = local_stat(&agent, "bytes_redirected");
    let passed = local_stat(&agent, "bytes_passed");
    assert_eq!(
        local_stat(&agent, "clients"),
        2,
        "the sock_ops program took both clients"
    );
    assert_eq!(redirected + passed, 2 * total, "every send seen once");
    assert_eq!(local_stat(&agent, "redirect_failures"), 0);
    let stats = agent.stats(8088);
    assert_eq!(stats["kernel_connections"], 2, "{stats}");
    // Only what the clients passed to their TCP crossed the accepted sockets.
    let n = |k: &str| stats[k].as_u64().unwrap_or(0);
    assert_eq!(
        n("bytes_client_to_backend_kernel") + n("bytes_client_to_backend_userspace"),
        passed,
        "{stats}"
    );
    stop_clean(agent);
}

/// A host socket connecting to a listener port at an address that is not the node's
/// (here the backend's own port 8088, the same number as the listener) is not taken:
/// only connections to the node's addresses (`GW_LOCAL_ADDRS`, 127.0.0.0/8) are; nor
/// is a client of another network namespace, which the cgroup program also sees.
#[test]
fn local_shortcut_leaves_remote_connections_alone() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), servers::echo())
        .expect("echo");
    let _same_port =
        servers::Server::start(bed.backend(0), backend(&bed, 0, 8088), servers::echo())
            .expect("echo on 8088");
    let route = format!("8088={}", backend(&bed, 0, 3001));
    let agent = start(&bed, &[&route], &[8088]);
    let (remote, listener) = (backend(&bed, 0, 8088), listener_addr(&bed, 8088));
    let echoed = bed
        .node()
        .run(move || {
            let mut s = connect(remote).expect("connect");
            common::exchange(&mut s, "remote\n")
        })
        .expect("client");
    assert_eq!(echoed, "remote\n");
    assert_eq!(
        local_stat(&agent, "clients"),
        0,
        "a remote host's 8088 is not a listener"
    );
    let echoed = bed
        .node()
        .run(move || {
            let mut s = connect(listener).expect("connect");
            s.write_all(b"local\n").expect("write");
            let (mut buf, mut spurious) = ([0u8; 6], 0);
            let mut got = 0;
            while got < buf.len() {
                match read_retrying(&mut s, &mut buf[got..], &mut spurious).expect("read") {
                    0 => break,
                    n => got += n,
                }
            }
            String::from_utf8_lossy(&buf[..got]).into_owned()
        })
        .expect("client");
    assert_eq!(echoed, "local\n");
    assert_eq!(
        local_stat(&agent, "clients"),
        1,
        "the listener's client is taken"
    );
    // A client of another namespace (a remote client, as the agent sees it) is an
    // ordinary kernel-path pair: not taken, its bytes carried.
    let echoed = bed
        .client()
        .run(move || {
            let mut s = connect(listener).expect("connect");
            common::exchange(&mut s, "remote client\n")
        })
        .expect("client");
    assert_eq!(echoed, "remote client\n");
    assert_eq!(
        local_stat(&agent, "clients"),
        1,
        "a remote client is not taken"
    );
    assert_eq!(agent.stats(8088)["kernel_connections"], 2);
    stop_clean(agent);
}

/// Client FIN first and backend FIN first, from a node-local client.
#[test]
fn local_shortcut_half_close() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let agent = common::half_close_both_ways_from(&bed, bed.node(), |r1, r2| {
        start(&bed, &[r1, r2], &[8088, 8089])
    });
    assert_eq!(local_stat(&agent, "clients"), 2);
    assert!(
        local_stat(&agent, "bytes_redirected") > 0,
        "some sends took the shortcut: switches {}, passed {} bytes in {} sends",
        local_stat(&agent, "switches"),
        local_stat(&agent, "bytes_passed"),
        local_stat(&agent, "msgs_passed"),
    );
    assert_eq!(local_stat(&agent, "redirect_failures"), 0);
    stop_clean(agent);
}

/// A reset from either side reaches the other, from a node-local client: the
/// client's RST (`SO_LINGER` 0) reaches backend 0:3001 as a reset; backend 0:3002's
/// RST reaches the client as `ECONNRESET` (after early `EAGAIN`s, see
/// [`read_retrying`]).
#[test]
fn local_shortcut_resets() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (_w, _r, rx) = common::reset_backends(&bed);
    let r1 = format!("8088={}", backend(&bed, 0, 3001));
    let r2 = format!("8089={}", backend(&bed, 0, 3002));
    let agent = start(&bed, &[&r1, &r2], &[8088, 8089]);
    let (a1, a2) = (listener_addr(&bed, 8088), listener_addr(&bed, 8089));
    let (client_saw, spurious) = bed
        .node()
        .run(move || {
            let mut s = connect(a1).expect("connect");
            s.write_all(b"hello").expect("write");
            std::thread::sleep(Duration::from_millis(200));
            s.write_all(b"again").expect("write through the shortcut");
            std::thread::sleep(Duration::from_millis(200));
            common::reset_with_linger(&s);
            drop(s);
            let mut s = connect(a2).expect("connect");
            s.write_all(b"hello").expect("write");
            let mut buf = [0u8; 16];
            let mut spurious = 0;
            match read_retrying(&mut s, &mut buf, &mut spurious) {
                Ok(n) => panic!("expected a reset, read {n} bytes"),
                Err(e) => (e.kind(), spurious),
            }
        })
        .expect("client");
    eprintln!("client: {spurious} early EAGAIN before the reset");
    assert_eq!(
        client_saw,
        io::ErrorKind::ConnectionReset,
        "backend reset reaches the client"
    );
    let backend_saw = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("watcher result");
    assert_eq!(
        backend_saw,
        io::ErrorKind::ConnectionReset,
        "client reset reaches the backend"
    );
    assert_eq!(local_stat(&agent, "clients"), 2);
    assert!(
        local_stat(&agent, "bytes_redirected") >= 5,
        "\"again\" took the shortcut"
    );
    stop_clean(agent);
}

/// Without the flag nothing goes on the cgroup root and a node-local client is an
/// ordinary kernel-path pair.
#[test]
fn local_shortcut_off_by_default() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), servers::echo())
        .expect("echo");
    let route = format!("8088={}", backend(&bed, 0, 3001));
    let agent = Agent::start(&bed, &["--datapath", "sockmap", "--route", &route], &[8088]);
    assert!(sock_ops_links_of(agent.child.id()).is_empty());
    assert!(!agent.pin_dir.join("GW_LOCAL_STATS").exists());
    assert!(
        agent.status().get("local_shortcut").is_none(),
        "no shortcut counters in the status without the flag"
    );
    let addr = listener_addr(&bed, 8088);
    let echoed = bed
        .node()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            common::exchange(&mut s, "ping\n")
        })
        .expect("client");
    assert_eq!(echoed, "ping\n");
}
