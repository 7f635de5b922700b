//! A backend's link taken down mid-transfer (`ip link set eth0 down` in the backend's
//! namespace: its packets stop, nothing tells the node). On the socket paths the
//! backend socket gives up after `--backend-timeout` (`TCP_USER_TIMEOUT` while data is
//! outstanding, keepalive probes while the connection is silent), and the client is
//! reset: a transferring and an idle connection both, with no descriptor or map entry
//! left behind. On the forward path the node holds no socket: the client's own TCP
//! gives up, and the connection's table entries expire after `--idle-timeout`.
mod common;

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    Agent, backend_addr, connect, exchange, listener_addr, map_counts, transfer_until_end,
};
use netbed::{Bed, servers};

const PORT: u16 = 8088;
const BACKEND_PORT: u16 = 3001;

/// A backend that transfers both ways on a connection opened with `T`, and answers
/// lines (`b0: LINE`) on any other.
fn backend_server(bed: &Bed) -> servers::Server {
    let handler: servers::Handler = Arc::new(|s: TcpStream| {
        let mut first = [0u8; 1];
        if (&s).read_exact(&mut first).is_err() {
            return;
        }
        if first[0] == b'T' {
            let _ = transfer_until_end(&s, 2, 1);
        } else {
            servers::named_echo("b0")(s);
        }
    });
    servers::Server::start(bed.backend(0), backend_addr(bed, 0, BACKEND_PORT), handler)
        .expect("server")
}

/// Takes the backend's link down; returns when.
fn link_down(bed: &Bed) -> Instant {
    bed.backend(0)
        .ip(&["link", "set", "eth0", "down"])
        .expect("link down");
    Instant::now()
}

/// Brings the backend's link back (its default route went with the link).
fn link_up(bed: &Bed) {
    let b = bed.backend(0);
    b.ip(&["link", "set", "eth0", "up"]).expect("link up");
    b.ip(&["route", "replace", "default", "via", "10.200.1.1"])
        .expect("route");
}

/// Once the link is back, new connections are served again (within 10 s: the node's
/// neighbour entry for the backend failed while the link was down, and connects get
/// `EHOSTUNREACH` until it is resolved again).
fn served_again(bed: &Bed) {
    let listener = listener_addr(bed, PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = bed
            .client()
            .run(move || {
                let mut s = connect(listener)?;
                s.write_all(b"I")?;
                s.write_all(b"back\n")?;
                let mut line = String::new();
                io::BufRead::read_line(&mut io::BufReader::new(s), &mut line)?;
                io::Result::Ok(line)
            })
            .expect("client");
        match reply {
            Ok(line) if line == "b0: back\n" => return,
            other => assert!(
                Instant::now() < deadline,
                "not served after the link came back: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// Reads an idle connection until it ends: the error kind (`None` for EOF), and when.
fn wait_end(mut s: TcpStream) -> (Option<io::ErrorKind>, Instant) {
    s.set_read_timeout(Some(Duration::from_secs(40)))
        .expect("timeout");
    let mut b = [0u8; 64];
    let kind = loop {
        match s.read(&mut b) {
            Ok(0) => break None,
            Ok(_) => {}
            Err(e) => break Some(e.kind()),
        }
    };
    (kind, Instant::now())
}

/// On `--datapath MODE` with `--backend-timeout 2`: the backend's link goes down while
/// one connection transfers both ways and another is idle. Both clients are reset
/// within 8 s (2 s of unanswered retransmissions or keepalive probes, plus the probes'
/// spacing and the retransmission backoff), and the agent's descriptors, its counters
/// of active connections and the socket maps return to where they were.
fn backend_link_down(mode: &str) {
    common::require_root();
    let bed = Bed::new(1).expect("bed");
    let _server = backend_server(&bed);
    let route = format!("{PORT}={}", backend_addr(&bed, 0, BACKEND_PORT));
    let agent = Agent::start(
        &bed,
        &[
            "--route",
            &route,
            "--datapath",
            mode,
            "--backend-timeout",
            "2",
        ],
        &[PORT],
    );
    let pid = agent.child.id();
    let fds_before = open_fds(pid);
    let listener = listener_addr(&bed, PORT);
    let transfer = bed
        .client()
        .spawn(move || {
            let mut s = connect(listener).expect("connect");
            s.write_all(b"T").expect("hello");
            transfer_until_end(&s, 1, 2)
        })
        .expect("client");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let idle = bed
        .client()
        .spawn(move || {
            let mut s = connect(listener).expect("connect");
            s.write_all(b"I").expect("hello");
            assert_eq!(exchange(&mut s, "hi\n"), "b0: hi\n");
            ready_tx.send(()).expect("ready");
            wait_end(s)
        })
        .expect("client");
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("idle connection up");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = agent.stats(PORT);
        let moved = s["bytes_backend_to_client_kernel"].as_u64().unwrap_or(0)
            + s["bytes_backend_to_client_userspace"].as_u64().unwrap_or(0);
        if moved > 1024 * 1024 {
            break;
        }
        assert!(Instant::now() < deadline, "transfer not under way: {s}");
    }
    let down = link_down(&bed);
    let t = transfer.join().expect("transfer client");
    let (idle_kind, idle_at) = idle.join().expect("idle client");
    let (t_after, idle_after) = (
        t.at.saturating_duration_since(down),
        idle_at.saturating_duration_since(down),
    );
    eprintln!(
        "{mode}: transferring client saw {:?} after {t_after:?} ({} bytes), idle client saw {idle_kind:?} after {idle_after:?}",
        t.error, t.received
    );
    assert_eq!(t.bad, None, "intact up to the end");
    assert!(
        t.ended_with(io::ErrorKind::ConnectionReset),
        "{mode}: read {:?}, write {:?}",
        t.error,
        t.write_error
    );
    assert_eq!(idle_kind, Some(io::ErrorKind::ConnectionReset), "{mode}");
    let limit = Duration::from_secs(8);
    assert!(t_after < limit, "{mode}: transfer reset after {t_after:?}");
    assert!(
        idle_after < limit,
        "{mode}: idle reset after {idle_after:?}"
    );
    // Nothing left: descriptors, active connections, socket map entries.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = agent.stats(PORT);
        let fds = open_fds(pid);
        let maps = map_counts(&agent.pin_dir);
        if fds <= fds_before
            && s["active_kernel"] == 0
            && s["active_userspace"] == 0
            && maps[2..] == [0, 0]
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{mode}: left behind: {fds} descriptors (before: {fds_before}), maps {maps:?}, {s}"
        );
    }
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "{log}");
    // The backend back: served again.
    link_up(&bed);
    served_again(&bed);
}

#[test]
fn backend_link_down_resets_splice_clients() {
    backend_link_down("splice");
}

#[test]
fn backend_link_down_resets_sockmap_clients() {
    backend_link_down("sockmap");
}

/// The forward path with `--idle-timeout 3`: the node terminates nothing, so the
/// client learns of the dead backend from its own TCP (here `TCP_USER_TIMEOUT` of 2 s
/// on the client socket: `ETIMEDOUT`); its retransmissions keep the entries fresh
/// until then, and the table is empty within the idle timeout and a sweep after that.
#[test]
fn backend_link_down_forward_entries_expire() {
    common::require_root();
    let bed = Bed::new(1).expect("bed");
    let _server = backend_server(&bed);
    let route = format!("{PORT}={}", backend_addr(&bed, 0, BACKEND_PORT));
    let agent = Agent::start(
        &bed,
        &[
            "--route",
            &route,
            "--datapath",
            "forward",
            "--forward-iface",
            "c0",
            "--forward-iface",
            "b0",
            "--idle-timeout",
            "3",
        ],
        &[PORT],
    );
    let listener = listener_addr(&bed, PORT);
    let transfer = bed
        .client()
        .spawn(move || {
            let mut s = connect(listener).expect("connect");
            let ms: libc::c_int = 2000;
            // SAFETY: passes one int.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_USER_TIMEOUT,
                    (&raw const ms).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "TCP_USER_TIMEOUT");
            s.write_all(b"T").expect("hello");
            transfer_until_end(&s, 1, 2)
        })
        .expect("client");
    let fwd = |agent: &Agent| {
        let s = agent.status();
        (
            s["listeners"][0]["forward"].clone(),
            s["forward_table_entries"].as_u64().unwrap_or(0),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (f, _) = fwd(&agent);
        if f["bytes_backend_to_client"].as_u64() > Some(1024 * 1024) {
            break;
        }
        assert!(Instant::now() < deadline, "transfer not under way: {f}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fwd(&agent).1, 2, "one connection, two entries");
    let down = link_down(&bed);
    let t = transfer.join().expect("client");
    let t_after = t.at.saturating_duration_since(down);
    eprintln!(
        "forward: client saw {:?} after {t_after:?} ({} bytes)",
        t.error, t.received
    );
    assert_eq!(t.bad, None);
    // The timeout is reported to the reader or to the writer, whichever asked first.
    assert!(
        t.ended_with(io::ErrorKind::TimedOut),
        "the client's own timeout: read {:?}, write {:?}",
        t.error,
        t.write_error
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (f, entries) = fwd(&agent);
        if entries == 0 && f["active"] == 0 {
            eprintln!(
                "forward: table empty {:?} after the link went down",
                down.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries not expired: {entries}, {f}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    link_up(&bed);
    served_again(&bed);
}
