//! The forward data path across the agent's life: the programs and the connection
//! table are pinned, so forwarded connections survive the agent being killed
//! (SIGKILL) and a new agent takes the pinned links over; and switching the forward
//! path on leaves the connections the socket paths already carry alone.
mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use common::{Agent, Stream, connect, exchange, pin_dir, require_root};
use netbed::{Bed, servers};

const MIB: u64 = 1024 * 1024;

fn forward_args(route: &str) -> Vec<String> {
    [
        "--route",
        route,
        "--datapath",
        "forward",
        "--forward-iface",
        "c0",
        "--forward-iface",
        "b0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Sends `total` bytes of the stream of `seed` in 256 KiB writes, pausing `pause`
/// after each, then shuts its write side.
fn paced_send(mut s: TcpStream, seed: u64, total: u64, pause: Duration) -> std::io::Result<()> {
    let mut stream = Stream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        stream.fill(&mut buf[..n]);
        s.write_all(&buf[..n])?;
        left -= n as u64;
        std::thread::sleep(pause);
    }
    s.shutdown(Shutdown::Write)
}

/// A transfer in progress when the agent is killed (SIGKILL: nothing of its own
/// cleanup runs) goes on while no agent runs, and to its end once a new agent has
/// taken the pinned links and maps over: no byte lost or repeated either way.
#[test]
fn forward_connections_survive_agent_sigkill_and_restart() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let total = 64 * MIB;
    let pause = Duration::from_millis(15);
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |s: TcpStream| {
        let out = s.try_clone().expect("clone");
        let sender = std::thread::spawn(move || paced_send(out, 2, total, pause));
        let got = common::recv_stream(s, 1);
        let sent = sender.join().expect("sender");
        let _ = tx.lock().expect("lock").send((got.ok(), sent.is_ok()));
    });
    let addr = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _server = servers::Server::start(bed.backend(0), addr, handler).expect("server");
    let route = format!("8088={addr}");
    let pins = pin_dir();
    let args = forward_args(&route);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = Agent::start_with_pin_dir(&bed, pins.clone(), &args, &[8088]);
    let listener = SocketAddr::new(bed.node_addr().into(), 8088);
    let client = bed
        .client()
        .spawn(move || {
            let s = connect(listener).expect("connect");
            s.set_read_timeout(Some(Duration::from_mins(2)))
                .expect("timeout");
            let out = s.try_clone().expect("clone");
            let sender = std::thread::spawn(move || paced_send(out, 1, total, pause));
            let got = common::recv_stream(s, 2).expect("receive");
            sender.join().expect("sender").expect("send");
            got
        })
        .expect("client");
    // Mid-transfer (the paced transfer takes about 4 s): kill the agent.
    std::thread::sleep(Duration::from_millis(800));
    let before = first.status();
    first.kill_keeping_pins();
    // No agent for a while: the pinned program keeps forwarding.
    std::thread::sleep(Duration::from_millis(700));
    let second = Agent::start_with_pin_dir(&bed, pins, &args, &[8088]);
    let got = client.join().expect("client");
    assert_eq!(
        got,
        (total, None),
        "backend -> client (bytes, first bad offset)"
    );
    let (server_got, sent) = rx
        .recv_timeout(Duration::from_mins(2))
        .expect("server result");
    assert!(sent, "the backend's send failed");
    assert_eq!(server_got, Some((total, None)), "client -> backend");
    let log = second.log_text();
    assert!(
        log.contains("forward program replaced on the link an earlier agent pinned"),
        "the new agent takes the pinned links over:\n{log}"
    );
    assert!(
        log.contains("reusing pinned map") && log.contains("GW_FWD_FLOWS"),
        "{log}"
    );
    // The connection was counted once, by the first agent's program, and the table
    // the second agent reads is the same one.
    let l = |s: &serde_json::Value| {
        s["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["port"] == 8088))
            .map(|l| l["forward"].clone())
            .expect("listener")
    };
    assert_eq!(l(&before)["connections"], 1, "{before}");
    let after = second.status();
    assert_eq!(l(&after)["connections"], 1, "{after}");
    assert!(
        l(&after)["bytes_client_to_backend"].as_u64()
            > l(&before)["bytes_client_to_backend"].as_u64(),
        "{before}\n{after}"
    );
    let metrics = common::metrics(&bed);
    let line = "sockgate_forward_connections_total{listener=\"8088\"} 1";
    assert!(metrics.contains(line), "{line} in:\n{metrics}");
    // And the new agent's program forwards new connections.
    bed.client()
        .run(move || drop(connect(listener).expect("connect after the restart")))
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(10);
    while l(&second.status())["connections"] != 2 {
        assert!(Instant::now() < deadline, "{}", second.status());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Switching the forward path on (here: a second agent attaches it, with its own
/// table) leaves a connection the splice path carries alone: its segments are unknown
/// to the forward table and reach the listener socket as before, while a new
/// connection is forwarded.
#[test]
fn forward_switched_on_leaves_spliced_connections_alone() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let addr = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _server =
        servers::Server::start(bed.backend(0), addr, servers::named_echo("b0")).expect("server");
    let route = format!("8088={addr}");
    let splice = Agent::start(&bed, &["--route", &route, "--datapath", "splice"], &[8088]);
    let listener = SocketAddr::new(bed.node_addr().into(), 8088);
    let (to_client, from_test) = mpsc::channel::<&'static str>();
    let (to_test, replies) = mpsc::channel::<String>();
    let old = bed
        .client()
        .spawn(move || {
            let mut s = connect(listener).expect("connect");
            for line in from_test {
                let _ = to_test.send(exchange(&mut s, line));
            }
        })
        .expect("client");
    to_client.send("before\n").expect("send");
    assert_eq!(
        replies
            .recv_timeout(Duration::from_secs(10))
            .expect("reply"),
        "b0: before\n"
    );
    // The forward path comes on: the second agent's listener cannot bind the port (the
    // first holds it), which it logs and goes on.
    let mut args = forward_args(&route);
    args.extend(["--metrics-addr".to_owned(), "127.0.0.1:9465".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let forward = Agent::start(&bed, &args, &[8088]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !forward.log_text().contains("forward data path on") {
        assert!(Instant::now() < deadline, "{}", forward.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The spliced connection still works, through the first agent.
    to_client.send("after\n").expect("send");
    assert_eq!(
        replies
            .recv_timeout(Duration::from_secs(10))
            .expect("reply"),
        "b0: after\n"
    );
    // A new connection is forwarded.
    let reply = bed
        .client()
        .run(move || {
            let mut s = connect(listener).expect("connect");
            exchange(&mut s, "new\n")
        })
        .expect("client");
    assert_eq!(reply, "b0: new\n");
    drop(to_client);
    old.join().expect("old client");
    let s = splice.stats(8088);
    assert_eq!(
        s["userspace_connections"], 1,
        "only the old connection was spliced: {s}"
    );
    let f = forward.status();
    let fwd = f["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["port"] == 8088))
        .map(|l| l["forward"].clone())
        .expect("listener");
    assert_eq!(fwd["connections"], 1, "{f}");
}

/// A smaller MTU on the node's backend link (1400, the backend's own link stays at
/// 1500): the program lowers the MSS of the SYN and of the SYN-ACK to what fits both
/// links, so neither end sends segments that the node's link would drop (a redirected
/// segment meets no forwarding-path MTU check and no ICMP error goes back). Both ends
/// must see an MSS that fits 1400 (without the clamp they see 1448); veth passes
/// oversized GSO packets whole, so the transfer itself would get through here either
/// way, where a real NIC would drop the segments.
#[test]
fn forward_clamps_the_mss_to_the_smaller_link() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    bed.node()
        .ip(&["link", "set", "b0", "mtu", "1400"])
        .expect("mtu");
    let total = 32 * MIB;
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |s: TcpStream| {
        let mss =
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::TcpMaxSeg).unwrap_or(0);
        let got = common::duplex(&s, 2, 1, total, common::Writes::Large);
        let _ = tx.lock().expect("lock").send((got, mss));
    });
    let addr = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _server = servers::Server::start(bed.backend(0), addr, handler).expect("server");
    let args = forward_args(&format!("8088={addr}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&bed, &args, &[8088]);
    let listener = SocketAddr::new(bed.node_addr().into(), 8088);
    let (got, client_mss) = bed
        .client()
        .run(move || {
            let s = connect(listener).expect("connect");
            s.set_read_timeout(Some(Duration::from_mins(1)))
                .expect("timeout");
            let mss =
                nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::TcpMaxSeg).unwrap_or(0);
            (common::duplex(&s, 1, 2, total, common::Writes::Large), mss)
        })
        .expect("client");
    assert_eq!(got, (total, None), "backend -> client");
    let (server_got, server_mss) = rx.recv_timeout(Duration::from_mins(1)).expect("server");
    assert_eq!(server_got, (total, None), "client -> backend");
    // 1400 - 40 bytes of IPv4 and TCP headers, less 12 of timestamps on the wire.
    assert!(
        client_mss <= 1360 && client_mss > 1000,
        "client MSS {client_mss}"
    );
    assert!(
        server_mss <= 1360 && server_mss > 1000,
        "backend MSS {server_mss}"
    );
    let s = agent.status();
    assert!(s["forward_table_entries"].as_u64() >= Some(2), "{s}");
}

/// The forward program on the client link only: the backend is reached by a link
/// without it, where its replies would not be translated back, so the SYN is left to
/// the stack and the connection is proxied (counted), never broken.
#[test]
fn forward_leaves_a_backend_behind_an_unattached_link_to_the_proxy() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let addr = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _server =
        servers::Server::start(bed.backend(0), addr, servers::named_echo("b0")).expect("server");
    let route = format!("8088={addr}");
    let agent = Agent::start(
        &bed,
        &[
            "--route",
            &route,
            "--datapath",
            "forward",
            "--forward-iface",
            "c0",
        ],
        &[8088],
    );
    let listener = SocketAddr::new(bed.node_addr().into(), 8088);
    let reply = bed
        .client()
        .run(move || {
            let mut s = connect(listener).expect("connect");
            exchange(&mut s, "hi\n")
        })
        .expect("client");
    assert_eq!(reply, "b0: hi\n");
    let stats = agent.stats(8088);
    assert_eq!(stats["userspace_connections"], 1, "{stats}");
    let s = agent.status();
    let fwd = &s["listeners"][0]["forward"];
    assert_eq!(fwd["connections"], 0, "{s}");
    assert!(fwd["not_attached"].as_u64() >= Some(1), "{s}");
    assert_eq!(s["forward_table_entries"], 0, "{s}");
    let metrics = common::metrics(&bed);
    for line in [
        "sockgate_forward_passed_total{listener=\"8088\",reason=\"not_attached\"} 1",
        "sockgate_forward_connections_total{listener=\"8088\"} 0",
        "sockgate_forward_connections_active{listener=\"8088\"} 0",
        "sockgate_map_entries{map=\"GW_FWD_FLOWS\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}

/// `--preserve-client-ip`: no SNAT, the backend sees the client's own address and port
/// (its route back goes through the node in the bed), and bytes flow both ways intact.
#[test]
fn forward_keeps_the_client_address_when_asked() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let total = 16 * MIB;
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |mut s: TcpStream| {
        let peer = s.peer_addr().expect("peer");
        s.write_all(format!("{peer}\n").as_bytes()).expect("write");
        let got = common::duplex(&s, 2, 1, total, common::Writes::Large);
        let _ = tx.lock().expect("lock").send(got);
    });
    let addr = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _server = servers::Server::start(bed.backend(0), addr, handler).expect("server");
    let mut args = forward_args(&format!("8088={addr}"));
    args.push("--preserve-client-ip".to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&bed, &args, &[8088]);
    let listener = SocketAddr::new(bed.node_addr().into(), 8088);
    let (seen_as, local, got) = bed
        .client()
        .run(move || {
            let mut s = connect(listener).expect("connect");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).expect("read") == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let local = s.local_addr().expect("local");
            let got = common::duplex(&s, 1, 2, total, common::Writes::Large);
            (String::from_utf8_lossy(&line).into_owned(), local, got)
        })
        .expect("client");
    assert_eq!(
        seen_as,
        local.to_string(),
        "the backend sees the client itself"
    );
    assert_eq!(got, (total, None), "backend -> client");
    let server_got = rx.recv_timeout(Duration::from_mins(1)).expect("server");
    assert_eq!(server_got, (total, None), "client -> backend");
    let s = agent.status();
    assert_eq!(s["listeners"][0]["forward"]["connections"], 1, "{s}");
}

/// An ICMP "fragmentation needed" about a forwarded segment, sent to the NAT address by
/// a hop on the backend's side (here: forged from the backend's namespace with the
/// quoted header of a real forwarded segment), reaches the client translated: its
/// stack recognises its own connection and lowers the path MTU towards the listener.
#[test]
fn forward_translates_icmp_fragmentation_needed_to_the_client() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |mut s: TcpStream| {
        let _ = tx.lock().expect("lock").send(s.peer_addr().expect("peer"));
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
    });
    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _server = servers::Server::start(bed.backend(0), backend, handler).expect("server");
    let args = forward_args(&format!("8088={backend}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&bed, &args, &[8088]);
    let listener = SocketAddr::new(bed.node_addr().into(), 8088);
    let (to_client, done) = mpsc::channel::<()>();
    let (seq_tx, seq_rx) = mpsc::channel();
    let client = bed
        .client()
        .spawn(move || {
            let s = connect(listener).expect("connect");
            let (snd_nxt, _) = netbed::raw::tcp_seqs(&s).expect("sequence numbers");
            seq_tx.send(snd_nxt).expect("seq");
            let _ = done.recv_timeout(Duration::from_secs(30));
            drop(s);
        })
        .expect("client");
    let nat = match rx
        .recv_timeout(Duration::from_secs(10))
        .expect("NAT address")
    {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("IPv4 expected, got {a}"),
    };
    let seq = seq_rx.recv_timeout(Duration::from_secs(10)).expect("seq");
    // Before: no PMTU cached towards the listener.
    let route = |bed: &Bed| {
        let out = bed
            .client()
            .output("ip", &["-4", "route", "get", "10.200.0.1"])
            .expect("ip route get");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!route(&bed).contains("mtu 1200"), "{}", route(&bed));
    // The quoted segment: NAT address:port -> backend, the client's sequence number.
    let quoted = netbed::raw::tcp_packet(
        nat,
        std::net::SocketAddrV4::new(bed.backend_addr(0), 3001),
        seq,
        0,
        netbed::raw::ACK,
        &[],
    );
    let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&1200u16.to_be_bytes());
    icmp.extend_from_slice(&quoted[..28]);
    let c = netbed::raw::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let packet = netbed::raw::ip_packet(bed.backend_addr(0), *nat.ip(), 1, &icmp);
    let sent = bed
        .backend(0)
        .run(move || netbed::raw::Sender::new().is_ok_and(|s| s.send(*nat.ip(), &packet)))
        .expect("backend namespace");
    assert!(sent, "the forged ICMP error was not sent");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !route(&bed).contains("mtu 1200") {
        assert!(
            Instant::now() < deadline,
            "the client's PMTU towards the listener did not drop: {}\n{}",
            route(&bed),
            agent.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = agent.status();
    assert_eq!(s["listeners"][0]["forward"]["icmp_translated"], 1, "{s}");
    drop(to_client);
    client.join().expect("client");
}

/// What the forward path cannot take goes to the socket paths and works there:
/// `fill` opens connections (kept open) until the limit under test is reached; each
/// must still be served, the first `forwarded` by the program and the rest spliced.
fn beyond_a_limit(extra: &[&str], connections: usize, forwarded: u64, counter: &str) {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let addr = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _server =
        servers::Server::start(bed.backend(0), addr, servers::named_echo("b0")).expect("server");
    let mut args = forward_args(&format!("8088={addr}"));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&bed, &args, &[8088]);
    let listener = SocketAddr::new(bed.node_addr().into(), 8088);
    let replies = bed
        .client()
        .run(move || {
            let mut open = Vec::new();
            let mut replies = Vec::new();
            for i in 0..connections {
                let mut s = connect(listener).expect("connect");
                replies.push(exchange(&mut s, &format!("{i}\n")));
                open.push(s);
            }
            replies
        })
        .expect("client");
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r, &format!("b0: {i}\n"));
    }
    let s = agent.status();
    let fwd = &s["listeners"][0]["forward"];
    assert_eq!(fwd["connections"], forwarded, "{s}");
    assert!(fwd[counter].as_u64() >= Some(1), "{counter}: {s}");
    let stats = agent.stats(8088);
    assert_eq!(
        stats["userspace_connections"],
        connections as u64 - forwarded,
        "{stats}"
    );
}

/// Two NAT ports for one backend: the third connection finds none free and is spliced.
#[test]
fn forward_nat_port_exhaustion_leaves_new_connections_to_splice() {
    beyond_a_limit(&["--forward-ports", "61000-61001"], 3, 2, "nat_exhausted");
}

/// A table of four entries holds two connections: the third is spliced.
#[test]
fn forward_full_table_leaves_new_connections_to_splice() {
    beyond_a_limit(&["--forward-table-size", "4"], 3, 2, "table_full");
}
