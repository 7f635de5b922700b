//! The forward data path end to end: `gw_fwd` on the node's client and backend links
//! translates and redirects every segment, the node's TCP stack never terminates the
//! connection. The path taken is asserted from the counters (the forward program's,
//! and the socket paths' staying at zero).
mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use common::{Agent, Writes, connect, duplex, require_root};
use netbed::{Bed, servers};

const MIB: u64 = 1024 * 1024;

fn listener_addr(bed: &Bed, port: u16) -> SocketAddr {
    SocketAddr::new(bed.node_addr().into(), port)
}

fn backend(bed: &Bed, i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(bed.backend_addr(i).into(), port)
}

/// The forward path on the client link and every backend link, plus `extra` flags.
fn forward_agent(bed: &Bed, routes: &[String], extra: &[&str]) -> Agent {
    let mut args: Vec<String> = vec![
        "--datapath".into(),
        "forward".into(),
        "--forward-iface".into(),
        "c0".into(),
    ];
    for i in 0..bed.backend_count() {
        args.extend(["--forward-iface".into(), format!("b{i}")]);
    }
    for r in routes {
        args.extend(["--route".into(), r.clone()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ports: Vec<u16> = routes
        .iter()
        .filter_map(|r| r.split_once('=').and_then(|(p, _)| p.parse().ok()))
        .collect();
    Agent::start(bed, &args, &ports)
}

/// Answers every connection with the address it sees the client at, then echoes.
fn peer_then_echo() -> servers::Handler {
    Arc::new(|mut s: TcpStream| {
        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        if s.write_all(format!("{peer}\n").as_bytes()).is_err() {
            return;
        }
        servers::echo()(s);
    })
}

fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The forward counters of listener `port`, once the agent wrote its own.
fn forward_stats(agent: &Agent, port: u16) -> (serde_json::Value, serde_json::Value) {
    let stats = agent.stats(port);
    let s = agent.status();
    let fwd = s["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["port"] == port))
        .map(|l| l["forward"].clone())
        .expect("listener in status");
    (fwd, stats)
}

#[test]
fn forward_carries_a_connection_without_the_node_terminating_it() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _server = servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), peer_then_echo())
        .expect("server");
    let agent = forward_agent(&bed, &[format!("8088={}", backend(&bed, 0, 3001))], &[]);
    let addr = listener_addr(&bed, 8088);
    let (seen_as, echoed, local) = bed
        .client()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            let seen_as = read_line(&mut s);
            s.write_all(b"hello forward\n").expect("write");
            let echoed = read_line(&mut s);
            (seen_as, echoed, s.local_addr().expect("local"))
        })
        .expect("client");
    assert_eq!(echoed, "hello forward");
    // SNAT: the backend sees the node's address on its link and a NAT port.
    let (ip, port) = seen_as.rsplit_once(':').expect("addr:port");
    assert_eq!(ip, "10.200.1.1", "the backend sees the NAT address");
    let port: u16 = port.parse().expect("port");
    assert!((61000..=65535).contains(&port), "NAT port {port}");
    assert_ne!(local.port(), port);
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], 1, "{fwd}");
    assert!(
        fwd["packets_client_to_backend"].as_u64() >= Some(4),
        "{fwd}"
    );
    assert!(
        fwd["packets_backend_to_client"].as_u64() >= Some(3),
        "{fwd}"
    );
    assert_eq!(
        stats["accepted"], 0,
        "the listener socket never saw it: {stats}"
    );
    // The table entries are there while the connection is in closing state; the
    // sweeper removes them within the closing timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = agent.status();
        if s["forward_table_entries"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "table not swept: {s}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn integrity(streams: usize, total: u64) {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |s: TcpStream| {
        let got = duplex(&s, 2, 1, total, Writes::Large);
        let _ = tx.lock().expect("lock").send(got);
    });
    let _server =
        servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), handler).expect("server");
    let agent = forward_agent(&bed, &[format!("8088={}", backend(&bed, 0, 3001))], &[]);
    let addr = listener_addr(&bed, 8088);
    let clients: Vec<_> = (0..streams)
        .map(|_| {
            bed.client()
                .spawn(move || {
                    let s = connect(addr).expect("connect");
                    s.set_read_timeout(Some(Duration::from_mins(3)))
                        .expect("timeout");
                    duplex(&s, 1, 2, total, Writes::Large)
                })
                .expect("client")
        })
        .collect();
    for c in clients {
        assert_eq!(
            c.join().expect("client"),
            (total, None),
            "backend -> client"
        );
    }
    for _ in 0..streams {
        let got = rx
            .recv_timeout(Duration::from_mins(3))
            .expect("server result");
        assert_eq!(got, (total, None), "client -> backend");
    }
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], streams as u64, "{fwd}");
    let ip_bytes = fwd["bytes_client_to_backend"].as_u64().unwrap_or(0);
    assert!(ip_bytes >= total * streams as u64, "{fwd}");
    assert_eq!(stats["accepted"], 0, "{stats}");
}

#[test]
fn forward_integrity_256mib_each_way() {
    integrity(1, 256 * MIB);
}

#[test]
fn forward_integrity_16_streams() {
    integrity(16, 16 * MIB);
}

/// A client on the node itself never crosses an attached interface: the listener
/// socket takes it (splice).
#[test]
fn forward_node_local_client_is_proxied() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _server = servers::Server::start(
        bed.backend(0),
        backend(&bed, 0, 3001),
        servers::named_echo("b0"),
    )
    .expect("server");
    let agent = forward_agent(&bed, &[format!("8088={}", backend(&bed, 0, 3001))], &[]);
    let addr = listener_addr(&bed, 8088);
    let reply = bed
        .node()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            common::exchange(&mut s, "hi\n")
        })
        .expect("node-local client");
    assert_eq!(reply, "b0: hi\n");
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], 0, "{fwd}");
    assert_eq!(stats["userspace_connections"], 1, "{stats}");
}
