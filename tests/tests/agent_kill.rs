//! The agent killed (SIGKILL) during transfers on the socket paths, then started
//! again. The agent terminates both connections of each proxied pair, so they die with
//! it: the kernel closes the agent's sockets when the process exits (a RST where bytes
//! were left unread, else a FIN, and a RST for anything that arrives after), and
//! neither the client nor the backend is left with a half-open connection. The new
//! agent adopts the pinned maps: stale `GW_PEERS` entries removed, `GW_SOCKS` empty,
//! the listener maps holding what it programs, new connections served. (The forward
//! path does not terminate connections: they survive the kill, see
//! `forward_lifecycle.rs`.)
mod common;

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use common::{
    Agent, End, backend_addr, connect, exchange, listener_addr, map_counts, open_connections,
    transfer_until_end,
};
use netbed::{Bed, servers};

const PORT: u16 = 8088;
const BACKEND_PORT: u16 = 3001;
/// Transfers running when the agent is killed.
const CONNECTIONS: usize = 4;
/// Time within which each side must see its connection end after the kill.
const END_WITHIN: Duration = Duration::from_secs(5);

/// Waits until `CONNECTIONS` transfers are under way on the path of `mode`.
fn wait_transfers(agent: &Agent, mode: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = agent.stats(PORT);
        let active =
            s["active_kernel"].as_u64().unwrap_or(0) + s["active_userspace"].as_u64().unwrap_or(0);
        let moved = s["bytes_backend_to_client_kernel"].as_u64().unwrap_or(0)
            + s["bytes_backend_to_client_userspace"].as_u64().unwrap_or(0);
        if active == CONNECTIONS as u64 && moved > 0 {
            let path = if mode == "sockmap" {
                "active_kernel"
            } else {
                "active_userspace"
            };
            assert_eq!(s[path], CONNECTIONS as u64, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "transfers not under way: {s}");
    }
}

/// Each end in `ends` came within [`END_WITHIN`] of `killed`, as EOF or a reset, after
/// intact bytes.
fn check_ends(mode: &str, side: &str, ends: &[End], killed: Instant) {
    for e in ends {
        eprintln!(
            "{mode}: {side} saw {:?} after {} bytes, {:?} after the kill",
            e.error.map_or("EOF".to_owned(), |k| format!("{k:?}")),
            e.received,
            e.at.saturating_duration_since(killed)
        );
        assert!(e.received > 0, "{side}: nothing received before the kill");
        assert_eq!(e.bad, None, "{side}: the bytes before the end are intact");
        assert!(
            matches!(
                e.error,
                None | Some(io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted)
            ),
            "{side}: the end is EOF or a reset, saw {:?}",
            e.error
        );
        assert!(
            e.at.saturating_duration_since(killed) < END_WITHIN,
            "{side}: the end came {:?} after the kill",
            e.at.saturating_duration_since(killed)
        );
    }
}

/// Waits (10 s at most) until no connection of the listener or the backend is open,
/// or half-open, in the client, node and backend namespaces.
fn wait_nothing_open(bed: &Bed) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = [
            (bed.client(), PORT),
            (bed.node(), PORT),
            (bed.node(), BACKEND_PORT),
            (bed.backend(0), BACKEND_PORT),
        ]
        .iter()
        .flat_map(|(ns, port)| open_connections(ns, *port))
        .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections left after the kill:\n{}",
            left.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A connection to the listener from the client: made, or the error's kind.
fn try_connect(bed: &Bed) -> Result<(), io::ErrorKind> {
    let listener = listener_addr(bed, PORT);
    bed.client()
        .run(move || connect(listener).map(drop).map_err(|e| e.kind()))
        .expect("client")
}

/// Waits (10 s at most) until [`map_counts`] of `pins` are `want`.
fn wait_map_counts(pins: &std::path::Path, want: [usize; 4], mode: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while map_counts(pins) != want {
        assert!(
            Instant::now() < deadline,
            "{mode}: entries left after the close: {:?}",
            map_counts(pins)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The backend: a transfer ([`transfer_until_end`]) on a connection opened with `T`,
/// whose end is sent on the returned channel; a named echo (`b0`) on any other.
fn transfer_server(bed: &Bed) -> (servers::Server, mpsc::Receiver<End>) {
    let (tx, rx) = mpsc::channel::<End>();
    let tx = Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |s: TcpStream| {
        let mut first = [0u8; 1];
        // A one-byte hello tells the probe connections (no transfer) from the others.
        if (&s).read_exact(&mut first).is_err() || first[0] != b'T' {
            servers::named_echo("b0")(s);
            return;
        }
        let end = transfer_until_end(&s, 2, 1);
        let _ = tx.lock().expect("lock").send(end);
    });
    let backend = backend_addr(bed, 0, BACKEND_PORT);
    let server = servers::Server::start(bed.backend(0), backend, handler).expect("server");
    (server, rx)
}

/// `CONNECTIONS` transfers through `--datapath MODE`, the agent killed mid-transfer:
/// every client and backend socket sees the end (EOF or reset) within [`END_WITHIN`],
/// intact up to there; no connection is left open in any namespace once the two ends
/// closed their sockets; a new agent on the same pins serves, with the maps holding
/// only what it programs.
fn killed_mid_transfer(mode: &str) {
    common::require_root();
    let bed = Bed::new(1).expect("bed");
    let (_server, rx) = transfer_server(&bed);
    let backend = backend_addr(&bed, 0, BACKEND_PORT);
    let route = format!("{PORT}={backend}");
    let args = ["--route", &route, "--datapath", mode];
    let pins = common::pin_dir();
    let mut first = Agent::start_with_pin_dir(&bed, pins.clone(), &args, &[PORT]);
    let listener = listener_addr(&bed, PORT);
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            bed.client()
                .spawn(move || {
                    let mut s = connect(listener).expect("connect");
                    s.write_all(b"T").expect("hello");
                    // The hello is not part of the backend's stream of seed 1.
                    transfer_until_end(&s, 1, 2)
                })
                .expect("client")
        })
        .collect();
    wait_transfers(&first, mode);
    std::thread::sleep(Duration::from_millis(300));
    let before_kill = map_counts(&pins);
    let killed = Instant::now();
    first.stop_hard();
    let client_ends: Vec<End> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let backend_ends: Vec<End> = (0..CONNECTIONS)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(40))
                .expect("backend end")
        })
        .collect();
    check_ends(mode, "client", &client_ends, killed);
    check_ends(mode, "backend", &backend_ends, killed);
    // Both ends closed their sockets: nothing open or half-open anywhere.
    wait_nothing_open(&bed);

    // What the dead agent left in its pins: its listener and backend, no socket (the
    // kernel took each out of GW_SOCKS as it closed), and on the kernel path the
    // GW_PEERS entries of its pairs.
    let left = map_counts(&pins);
    eprintln!(
        "{mode}: maps [listeners, backends, socks, peers] before the kill {before_kill:?}, after {left:?}"
    );
    let pairs = if mode == "sockmap" {
        2 * CONNECTIONS
    } else {
        0
    };
    assert_eq!(before_kill, [1, 1, pairs, pairs], "{mode}: before the kill");
    assert_eq!(left, [1, 1, 0, pairs], "{mode}: left by the dead agent");

    assert_eq!(
        try_connect(&bed),
        Err(io::ErrorKind::ConnectionRefused),
        "{mode}: no agent"
    );
    let second = Agent::start_with_pin_dir(&bed, pins.clone(), &args, &[PORT]);
    assert_eq!(
        map_counts(&pins),
        [1, 1, 0, 0],
        "{mode}: adopted and cleaned"
    );
    if mode == "sockmap" {
        assert!(
            second.log_text().contains("stale GW_PEERS"),
            "{}",
            second.log_text()
        );
    }
    let (held, reply) = bed
        .client()
        .run(move || {
            let mut s = connect(listener).expect("connect after the restart");
            s.write_all(b"P").expect("write");
            let r = exchange(&mut s, "again\n");
            (s, r)
        })
        .expect("client");
    assert_eq!(reply, "b0: again\n");
    let pairs_now = if mode == "sockmap" { 2 } else { 0 };
    assert_eq!(
        map_counts(&pins),
        [1, 1, pairs_now, pairs_now],
        "{mode}: one pair"
    );
    drop(held);
    wait_map_counts(&pins, [1, 1, 0, 0], mode);
    let s = second.stats(PORT);
    assert_eq!(
        s["kernel_connections"].as_u64().unwrap_or(0)
            + s["userspace_connections"].as_u64().unwrap_or(0),
        1,
        "{s}"
    );
}

#[test]
fn splice_connections_end_with_a_killed_agent_and_restart_serves() {
    killed_mid_transfer("splice");
}

#[test]
fn sockmap_connections_end_with_a_killed_agent_and_restart_serves() {
    killed_mid_transfer("sockmap");
}
