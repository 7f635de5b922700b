//! The forward data path end to end: `gw_fwd` on the node's client and backend links
//! translates and redirects every segment, the node's TCP stack never terminates the
//! connection. The path taken is asserted from the counters (the forward program's,
//! and the socket paths' staying at zero).
mod common;

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use common::{
    Agent, Writes, backend_addr as backend, connect, duplex, exchange, listener_addr, require_root,
};
use netbed::{
    Bed,
    records::{all_by_client_port, records},
    servers,
};

const MIB: u64 = 1024 * 1024;

/// `--datapath forward` with the client link and every backend link attached.
fn forward_flags(bed: &Bed) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--datapath".into(),
        "forward".into(),
        "--forward-iface".into(),
        "c0".into(),
    ];
    for i in 0..bed.backend_count() {
        args.extend(["--forward-iface".into(), format!("b{i}")]);
    }
    args
}

/// The forward path on the client link and every backend link, plus `extra` flags.
fn forward_agent(bed: &Bed, routes: &[String], extra: &[&str]) -> Agent {
    let mut args = forward_flags(bed);
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

/// `streams` connections at once, `total` bytes each way on each, hashed; with
/// `loss_per_mille` of the packets dropped on the client's and the backend's links.
fn integrity(streams: usize, total: u64, writes: Writes, loss_per_mille: u32) {
    require_root();
    let bed = Bed::new(1).expect("bed");
    if loss_per_mille > 0 {
        bed.client()
            .drop_at_random(loss_per_mille)
            .expect("loss on the client link");
        bed.backend(0)
            .drop_at_random(loss_per_mille)
            .expect("loss on the backend link");
    }
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |s: TcpStream| {
        let got = duplex(&s, 2, 1, total, writes);
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
                    duplex(&s, 1, 2, total, writes)
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
    integrity(1, 256 * MIB, Writes::Large, 0);
}

#[test]
fn forward_integrity_16_streams() {
    integrity(16, 16 * MIB, Writes::Large, 0);
}

/// Lossy links (2 % of the packets dropped each way on the client's and the backend's
/// links): both ends retransmit through the translation, segments and
/// acknowledgements alike; every byte still arrives once, in order.
#[test]
fn forward_integrity_lossy_links() {
    integrity(1, 8 * MIB, Writes::Small, 20);
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
            exchange(&mut s, "hi\n")
        })
        .expect("node-local client");
    assert_eq!(reply, "b0: hi\n");
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], 0, "{fwd}");
    assert_eq!(stats["userspace_connections"], 1, "{stats}");
}

/// The entries of the connection table (two per connection), as status reads them.
fn table_entries(agent: &Agent) -> u64 {
    agent.status()["forward_table_entries"]
        .as_u64()
        .expect("forward_table_entries")
}

/// Waits until the connection table is empty; fails after `within`.
fn wait_table_empty(agent: &Agent, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let s = agent.status();
        if s["forward_table_entries"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: table entries not removed within {within:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The closing timeout (10 s after the last segment of a connection that saw a RST or
/// a FIN each way), plus a sweep period and the time to read the status.
const CLOSING_SWEPT: Duration = Duration::from_secs(13);

// ---- selection and refusals ----------------------------------------------------------

/// Weights 70 / 30 / 0 over 500 connections: each share within 5 points of its weight,
/// the weight-0 backend never picked, every connection taken by the program.
///
/// The client binds its ports (20000 + i), so the hashes and the picks are the same on
/// every run.
#[test]
fn forward_weights_over_500_connections() {
    const N: u16 = 500;
    require_root();
    let bed = Bed::new(3).expect("bed");
    let names = ["seventy", "thirty", "zero"];
    let _servers: Vec<_> = (0..3)
        .map(|i| {
            servers::Server::start(
                bed.backend(i),
                backend(&bed, i, 3001),
                servers::name_and_close(names[i]),
            )
            .expect("server")
        })
        .collect();
    let route = format!(
        "8088={}*70,{}*30,{}*0",
        backend(&bed, 0, 3001),
        backend(&bed, 1, 3001),
        backend(&bed, 2, 3001)
    );
    let agent = forward_agent(&bed, &[route], &[]);
    let addr = listener_addr(&bed, 8088);
    let client = SocketAddr::new(bed.client_addr().into(), 0);
    let counts = bed
        .client()
        .run(move || {
            let mut counts = std::collections::BTreeMap::<String, u32>::new();
            for i in 0..N {
                let sock = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .expect("socket");
                let mut from = client;
                from.set_port(20000 + i);
                sock.bind(&from.into()).expect("bind");
                sock.connect_timeout(&addr.into(), Duration::from_secs(10))
                    .expect("connect");
                let mut s: TcpStream = sock.into();
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                s.write_all(b"?").expect("request");
                let mut name = String::new();
                s.read_to_string(&mut name).expect("read");
                *counts.entry(name).or_default() += 1;
            }
            counts
        })
        .expect("client");
    let get = |n: &str| counts.get(n).copied().unwrap_or(0);
    assert_eq!(get("zero"), 0, "weight 0 never picked: {counts:?}");
    assert_eq!(get("seventy") + get("thirty"), u32::from(N), "{counts:?}");
    let share = f64::from(get("seventy")) / f64::from(N);
    assert!(
        (share - 0.7).abs() <= 0.05,
        "weight 70 of 100 got {share}: {counts:?}"
    );
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], u64::from(N), "{fwd}");
    assert_eq!(
        stats["accepted"], 0,
        "the listener socket took none: {stats}"
    );
}

/// A listener whose only backendRef is invalid, and one whose backends all have
/// weight 0: the program answers the SYN with a RST (connect fails with
/// ECONNREFUSED), counts it, and the listener socket never sees the connection.
#[test]
fn forward_refusals_are_answered_in_the_kernel() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let r1 = "8089=invalid".to_owned();
    let r2 = format!(
        "8090={}*0,{}*0",
        backend(&bed, 0, 3001),
        backend(&bed, 1, 3001)
    );
    let agent = forward_agent(&bed, &[r1, r2], &[]);
    let addrs = [listener_addr(&bed, 8089), listener_addr(&bed, 8090)];
    let kinds = bed
        .client()
        .run(move || {
            addrs
                .iter()
                .map(|&a| connect(a).map(|_| ()).map_err(|e| e.kind()))
                .collect::<Vec<_>>()
        })
        .expect("client");
    assert_eq!(
        kinds,
        vec![Err(io::ErrorKind::ConnectionRefused); 2],
        "a RST answers the SYN"
    );
    let (f1, s1) = forward_stats(&agent, 8089);
    assert_eq!(f1["rejected_invalid_backend"], 1, "{f1}");
    assert_eq!(f1["connections"], 0, "{f1}");
    assert_eq!(s1["accepted"], 0, "{s1}");
    let (f2, s2) = forward_stats(&agent, 8090);
    assert_eq!(f2["rejected_no_backend"], 1, "{f2}");
    assert_eq!(f2["connections"], 0, "{f2}");
    assert_eq!(s2["accepted"], 0, "{s2}");
    assert_eq!(table_entries(&agent), 0, "a refusal leaves no entry");
}

/// One backend with nothing listening (its kernel answers the SYN with a RST): the
/// program drops that RST and sends the client's retransmitted SYN (about 1 s later)
/// to the live backend. Every connection succeeds.
#[test]
fn forward_refused_backend_is_retried_at_the_syn_retransmission() {
    const N: usize = 20;
    require_root();
    let bed = Bed::new(2).expect("bed");
    let _live = servers::Server::start(
        bed.backend(0),
        backend(&bed, 0, 3001),
        servers::name_and_close("live"),
    )
    .expect("server");
    let route = format!("8088={},{}", backend(&bed, 0, 3001), backend(&bed, 1, 3999));
    let agent = forward_agent(&bed, &[route], &[]);
    let addr = listener_addr(&bed, 8088);
    // At once, so the wall time is one or two SYN retransmissions, not twenty.
    let clients: Vec<_> = (0..N)
        .map(|_| {
            bed.client()
                .spawn(move || {
                    let mut s = connect(addr).map_err(|e| e.kind())?;
                    s.write_all(b"?").map_err(|e| e.kind())?;
                    let mut name = String::new();
                    s.read_to_string(&mut name).map_err(|e| e.kind())?;
                    Ok::<_, io::ErrorKind>(name)
                })
                .expect("client")
        })
        .collect();
    let results: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    assert_eq!(results, vec![Ok("live".to_owned()); N]);
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], N as u64, "{fwd}");
    assert!(
        fwd["connect_failures"].as_u64() > Some(0),
        "some picked the dead backend first: {fwd}"
    );
    assert_eq!(fwd["rejected_connect_failed"], 0, "{fwd}");
    assert_eq!(stats["accepted"], 0, "{stats}");
}

/// Both backends refuse and `--connect-attempts 2`: the first SYN goes to one, the
/// first retransmission to the other, the second retransmission is answered with a
/// RST from the program: connect fails with ECONNREFUSED after about 2 s (the client
/// retransmits its SYN at 1 s intervals first, `net.ipv4.tcp_syn_linear_timeouts`).
#[test]
fn forward_every_backend_refusing_resets_the_client() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let route = format!("8088={},{}", backend(&bed, 0, 3999), backend(&bed, 1, 3999));
    let agent = forward_agent(&bed, &[route], &["--connect-attempts", "2"]);
    let addr = listener_addr(&bed, 8088);
    let (kind, waited) = bed
        .client()
        .run(move || {
            let t = Instant::now();
            (connect(addr).map(|_| ()).map_err(|e| e.kind()), t.elapsed())
        })
        .expect("client");
    assert_eq!(
        kind,
        Err(io::ErrorKind::ConnectionRefused),
        "a RST after the attempts (waited {waited:?})"
    );
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], 1, "{fwd}");
    assert_eq!(fwd["connect_failures"], 2, "{fwd}");
    assert_eq!(fwd["rejected_connect_failed"], 1, "{fwd}");
    assert_eq!(stats["accepted"], 0, "{stats}");
}

// ---- closing -------------------------------------------------------------------------

/// Client FIN first: the backend still answers after it. Backend FIN first: the client
/// still sends after it, and the backend receives it all. Then both connections'
/// entries leave the table within the closing timeout.
#[test]
fn forward_half_close_both_ways() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let agent = common::half_close_both_ways(&bed, |r1, r2| {
        forward_agent(&bed, &[r1.to_owned(), r2.to_owned()], &[])
    });
    for port in [8088, 8089] {
        let (fwd, stats) = forward_stats(&agent, port);
        assert_eq!(fwd["connections"], 1, "{port}: {fwd}");
        assert_eq!(stats["accepted"], 0, "{port}: {stats}");
    }
    wait_table_empty(&agent, CLOSING_SWEPT, "after a FIN each way");
}

/// The client's RST (`SO_LINGER` 0, then close) reaches the backend as a reset; the
/// backend's RST reaches the client as a reset. Then both connections' entries leave
/// the table within the closing timeout.
#[test]
fn forward_resets_both_ways() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let agent = common::resets_both_ways(&bed, |r1, r2| {
        forward_agent(&bed, &[r1.to_owned(), r2.to_owned()], &[])
    });
    for port in [8088, 8089] {
        let (fwd, stats) = forward_stats(&agent, port);
        assert_eq!(fwd["connections"], 1, "{port}: {fwd}");
        assert_eq!(stats["accepted"], 0, "{port}: {stats}");
    }
    wait_table_empty(&agent, CLOSING_SWEPT, "after a RST");
}

/// `--idle-timeout 2`: an established connection that stays silent loses its entries
/// to the sweeper after about 2 s. Its next segment is then not forwarded: it reaches
/// the node's own stack, where the agent's listener socket on that port answers the
/// unknown ACK with a RST, so the client's read after its next write fails with
/// ECONNRESET. The backend hears nothing of it.
#[test]
fn forward_idle_connection_is_swept_and_then_reset_by_the_node() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    let recorder: servers::Handler = Arc::new(move |mut s: TcpStream| {
        let mut line = [0u8; 6];
        let _ = s.read_exact(&mut line);
        let _ = s.write_all(&line);
        // Whatever arrives after the sweep (nothing, or an error).
        let _ = s.set_read_timeout(Some(Duration::from_secs(8)));
        let mut more = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            more.extend_from_slice(&buf[..n]);
        }
        let _ = tx.lock().expect("lock").send(more);
    });
    let _server =
        servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), recorder).expect("server");
    let agent = forward_agent(
        &bed,
        &[format!("8088={}", backend(&bed, 0, 3001))],
        &["--idle-timeout", "2"],
    );
    let addr = listener_addr(&bed, 8088);
    let s = bed
        .client()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            assert_eq!(exchange(&mut s, "hello\n"), "hello\n");
            s
        })
        .expect("client");
    let quiet_since = Instant::now();
    assert_eq!(table_entries(&agent), 2, "the connection is in the table");
    wait_table_empty(&agent, Duration::from_secs(6), "idle connection");
    assert!(
        quiet_since.elapsed() >= Duration::from_secs(2),
        "swept before the idle timeout ({:?})",
        quiet_since.elapsed()
    );
    let kind = bed
        .client()
        .run(move || {
            let mut s = s;
            s.write_all(b"late\n").expect("write (queued)");
            let mut buf = [0u8; 16];
            match s.read(&mut buf) {
                Ok(n) => Ok(n),
                Err(e) => Err(e.kind()),
            }
        })
        .expect("client");
    assert_eq!(
        kind,
        Err(io::ErrorKind::ConnectionReset),
        "the node's stack resets a segment of a swept connection"
    );
    let more = rx.recv_timeout(Duration::from_secs(10)).expect("backend");
    assert!(more.is_empty(), "nothing reaches the backend: {more:?}");
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], 1, "{fwd}");
    assert_eq!(stats["accepted"], 0, "{stats}");
}

// ---- configuration changes -----------------------------------------------------------

/// A temporary directory of manifests, removed on drop.
struct Manifests(std::path::PathBuf);

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Manifests {
    fn new() -> Self {
        // One per test: the tests of this file run in parallel in one process.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sockgate-fwd-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        Self(dir)
    }

    /// Gateway `gw` with listener `a` (8088, its route to Service `a_to`) and, when
    /// `with_b`, listener `b` (8089, its route to Service foo). Service foo is backend
    /// 0's port 3001, bar backend 1's port 3002.
    fn write(&self, a_to: &str, with_b: bool) {
        use std::fmt::Write as _;
        let port = |svc: &str| if svc == "foo" { 3001 } else { 3002 };
        let mut y = String::from(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: sockgate\n\
             spec:\n  controllerName: sockgate.dev/gateway-controller\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: gw\n\
             spec:\n  gatewayClassName: sockgate\n  listeners:\n\
             \x20 - name: a\n    protocol: TCP\n    port: 8088\n",
        );
        if with_b {
            y += "  - name: b\n    protocol: TCP\n    port: 8089\n";
        }
        let route = |name: &str, section: &str, svc: &str| {
            format!(
                "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: {name}\n\
                 spec:\n  parentRefs:\n  - name: gw\n    sectionName: {section}\n  rules:\n  - backendRefs:\n\
                 \x20   - name: {svc}\n      port: {}\n",
                port(svc)
            )
        };
        y += &route("route-a", "a", a_to);
        if with_b {
            y += &route("route-b", "b", "foo");
        }
        for (svc, addr) in [("foo", "10.200.1.2"), ("bar", "10.200.2.2")] {
            let p = port(svc);
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {svc}\nspec:\n  ports:\n\
                 \x20 - protocol: TCP\n    port: {p}\n    targetPort: {p}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n\
                 \x20 labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n\
                 - port: {p}\n  protocol: TCP\nendpoints:\n- addresses: [\"{addr}\"]\n  conditions:\n    ready: true\n"
            );
        }
        // Written whole, then renamed: the agent never reads half a file.
        let tmp = self.0.join(".gateway.yaml.tmp");
        std::fs::write(&tmp, y).expect("write");
        std::fs::rename(&tmp, self.0.join("gateway.yaml")).expect("rename");
    }
}

/// A new connection to listener `port` from the client: the name its backend answers
/// with (`named_echo`), or the error.
fn ask(bed: &Bed, port: u16) -> Result<String, io::ErrorKind> {
    let addr = listener_addr(bed, port);
    bed.client()
        .run(move || {
            let mut s = connect(addr).map_err(|e| e.kind())?;
            let reply = exchange(&mut s, "who\n");
            Ok(reply.split(':').next().unwrap_or_default().to_owned())
        })
        .expect("client")
}

/// One exchange on an established connection, from the client namespace (the socket
/// belongs to it already).
fn ask_on(s: &TcpStream) -> Result<String, io::ErrorKind> {
    let mut s = s.try_clone().map_err(|e| e.kind())?;
    s.write_all(b"again\n").map_err(|e| e.kind())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        match s.read(&mut b) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof),
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(e.kind()),
        }
    }
    let line = String::from_utf8_lossy(&line);
    Ok(line.split(':').next().unwrap_or_default().to_owned())
}

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, agent: &Agent, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Servers foo (backend 0, port 3001) and bar (backend 1, port 3002), the manifests
/// (route a to foo, listener b present) and the agent reading them, with the forward
/// path on and a 3 s drain timeout.
fn foo_bar_from_files(bed: &Bed) -> ([servers::Server; 2], Manifests, Agent) {
    let foo_server = servers::Server::start(
        bed.backend(0),
        backend(bed, 0, 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let bar = servers::Server::start(
        bed.backend(1),
        backend(bed, 1, 3002),
        servers::named_echo("bar"),
    )
    .expect("bar");
    let dir = Manifests::new();
    dir.write("foo", true);
    let mut args = forward_flags(bed);
    args.extend(
        [
            "--dir",
            dir.0.to_str().expect("utf-8"),
            "--drain-timeout",
            "3",
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(bed, &args, &[8088, 8089]);
    ([foo_server, bar], dir, agent)
}

/// With the manifests as the source: a route moved to another Service leaves an
/// established connection on its backend while new connections go to the new one;
/// a removed listener's established connection keeps flowing for `--drain-timeout`,
/// then its entries are removed, and a new connection to that port is refused.
#[test]
fn forward_config_change_keeps_established_and_drains_removed_listener() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let (_servers, dir, agent) = foo_bar_from_files(&bed);
    let (a1, a2) = (listener_addr(&bed, 8088), listener_addr(&bed, 8089));
    // One established connection per listener, both to foo.
    let (c1, c2) = bed
        .client()
        .run(move || {
            let c1 = connect(a1).expect("connect 8088");
            let c2 = connect(a2).expect("connect 8089");
            (c1, c2)
        })
        .expect("client");
    assert_eq!(ask_on(&c1), Ok("foo".into()));
    assert_eq!(ask_on(&c2), Ok("foo".into()));

    // Route a moves to bar: new connections go there, the established one stays.
    dir.write("bar", true);
    eventually(
        "new connections to 8088 reach bar",
        &agent,
        Duration::from_secs(15),
        || ask(&bed, 8088) == Ok("bar".into()),
    );
    assert_eq!(
        ask_on(&c1),
        Ok("foo".into()),
        "established keeps its backend"
    );

    // Listener b goes: its connection drains, then is removed.
    dir.write("bar", false);
    eventually(
        "listener 8089 removed from the maps",
        &agent,
        Duration::from_secs(15),
        || {
            let s = agent.status();
            s["listeners"]
                .as_array()
                .is_some_and(|ls| ls.iter().all(|l| l["port"] != 8089))
        },
    );
    let removed_at = Instant::now();
    assert_eq!(
        ask_on(&c2),
        Ok("foo".into()),
        "the removed listener's connection flows while it drains"
    );
    assert!(
        removed_at.elapsed() < Duration::from_secs(2),
        "the exchange was inside the drain timeout"
    );
    // Entries of 8089: all but those of 8088's live connections.
    let entries_8089 = || {
        let s = agent.status();
        let total = s["forward_table_entries"].as_u64().unwrap_or(0);
        let active_8088 = s["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["port"] == 8088))
            .and_then(|l| l["forward"]["active"].as_u64())
            .unwrap_or(0);
        total - 2 * active_8088
    };
    assert_eq!(entries_8089(), 2, "c2 is in the table while it drains");
    eventually(
        "the drained connection's entries removed",
        &agent,
        Duration::from_secs(8),
        || entries_8089() == 0,
    );
    assert!(
        removed_at.elapsed() >= Duration::from_secs(2),
        "removed before the drain timeout ({:?})",
        removed_at.elapsed()
    );
    // Its segments now reach the node's stack, where nothing listens on 8089.
    assert_eq!(
        ask_on(&c2),
        Err(io::ErrorKind::ConnectionReset),
        "the drained connection is over"
    );
    assert_eq!(
        ask(&bed, 8089),
        Err(io::ErrorKind::ConnectionRefused),
        "a new connection to the removed port"
    );
    assert_eq!(
        ask_on(&c1),
        Ok("foo".into()),
        "8088's connection unaffected"
    );
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert!(fwd["connections"].as_u64() >= Some(2), "{fwd}");
    assert_eq!(stats["accepted"], 0, "{stats}");
}

// ---- IPv6 ----------------------------------------------------------------------------

/// An IPv6 client to the node's IPv6 address, an IPv6 backend: translated (SNAT to the
/// node's IPv6 address on the backend link) and 8 MiB each way hashed.
#[test]
fn forward_ipv6_carries_a_hashed_transfer() {
    const TOTAL: u64 = 8 * MIB;
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let handler: servers::Handler = Arc::new(move |mut s: TcpStream| {
        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let _ = s.write_all(format!("{peer}\n").as_bytes());
        let got = duplex(&s, 2, 1, TOTAL, Writes::Large);
        let _ = tx.lock().expect("lock").send(got);
    });
    let server_addr = SocketAddr::new(bed.backend_addr6(0).into(), 3001);
    let _server = servers::Server::start(bed.backend(0), server_addr, handler).expect("server");
    let agent = forward_agent(&bed, &[format!("8088={server_addr}")], &[]);
    let addr = SocketAddr::new(bed.node_addr6().into(), 8088);
    let (seen_as, got) = bed
        .client()
        .run(move || {
            let mut s = connect(addr).expect("connect");
            let seen_as = read_line(&mut s);
            (seen_as, duplex(&s, 1, 2, TOTAL, Writes::Large))
        })
        .expect("client");
    assert_eq!(got, (TOTAL, None), "backend -> client");
    let server_got = rx
        .recv_timeout(Duration::from_mins(1))
        .expect("server result");
    assert_eq!(server_got, (TOTAL, None), "client -> backend");
    let (ip, port) = seen_as.rsplit_once(':').expect("addr:port");
    assert_eq!(ip, "[fd00:200:1::1]", "the backend sees the NAT address");
    let port: u16 = port.parse().expect("port");
    assert!((61000..=65535).contains(&port), "NAT port {port}");
    let (fwd, stats) = forward_stats(&agent, 8088);
    assert_eq!(fwd["connections"], 1, "{fwd}");
    assert!(
        fwd["bytes_client_to_backend"].as_u64() >= Some(TOTAL),
        "{fwd}"
    );
    assert_eq!(
        stats["accepted"], 0,
        "the listener socket never saw it: {stats}"
    );
}

// ---- access log records from the kernel ------------------------------------------------

/// A forwarded connection closed with a FIN each way and one the client resets each
/// get exactly one record, from the program's ring buffer (the sweeper, which removes
/// their entries within 2 s, adds none): the listener, route and backendRef named from
/// the manifests, payload bytes equal to the bytes sent each way, and how it ended.
#[test]
fn forward_records_come_from_the_kernel_once_and_named() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let _foo = servers::Server::start(
        bed.backend(0),
        backend(&bed, 0, 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let dir = Manifests::new();
    dir.write("foo", false);
    let log = dir.0.join("access.log");
    let mut args = forward_flags(&bed);
    args.extend(
        [
            "--dir",
            dir.0.to_str().expect("utf-8"),
            "--access-log",
            log.to_str().expect("utf-8"),
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&bed, &args, &[8088]);
    let l88 = listener_addr(&bed, 8088);
    let (fin, client_rst) = bed
        .client()
        .run(move || {
            // FIN each way: 4 bytes out, 9 back ("foo: who\n"), then EOF both ways.
            let mut s = connect(l88).expect("connect");
            let fin = s.local_addr().expect("addr").port();
            assert_eq!(exchange(&mut s, "who\n"), "foo: who\n");
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).expect("EOF from the backend");
            assert!(rest.is_empty(), "{rest:?}");
            drop(s);
            // The client resets after 6 bytes out, 11 back.
            let mut s = connect(l88).expect("connect");
            let client_rst = s.local_addr().expect("addr").port();
            assert_eq!(exchange(&mut s, "hello\n"), "foo: hello\n");
            common::reset_with_linger(&s);
            drop(s);
            (fin, client_rst)
        })
        .expect("client");
    let recs = all_by_client_port(&records(&log, 2));
    assert!(
        table_entries(&agent) > 0,
        "the records came before the sweeper removed the entries (the program's events)"
    );
    // Past the reset and closing timeouts (1 s, 2 s) and a sweep: the sweeper removed
    // both connections' entries and must have logged nothing more.
    let deadline = Instant::now() + Duration::from_secs(10);
    while table_entries(&agent) > 0 {
        assert!(
            Instant::now() < deadline,
            "entries not swept:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let after = all_by_client_port(&records(&log, 2));
    println!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(after, recs, "no second record after the sweep");
    let client_ip = bed.client_addr();
    for (port, end, c2b, b2c, segments_min) in [
        (fin, "fin", 4, 9, 3),
        (client_rst, "client_reset", 6, 11, 3),
    ] {
        let list = recs
            .get(&port)
            .unwrap_or_else(|| panic!("no record of {port}: {recs:?}"));
        assert_eq!(list.len(), 1, "exactly one record of {port}: {list:?}");
        let r = &list[0];
        assert_eq!(r["client"], format!("{client_ip}:{port}"), "{r}");
        assert_eq!(r["port"], 8088, "{r}");
        assert_eq!(r["gateway"], "default/gw", "{r}");
        assert_eq!(r["listener"], "a", "{r}");
        assert_eq!(r["route"], "default/route-a", "{r}");
        assert_eq!(r["backend"], backend(&bed, 0, 3001).to_string(), "{r}");
        assert_eq!(r["backend_ref"], "default/foo:3001", "{r}");
        assert_eq!(r["datapath"], "forward", "{r}");
        assert_eq!(r["end"], end, "{r}");
        assert_eq!(r["bytes_client_to_backend"], c2b, "payload bytes: {r}");
        assert_eq!(r["bytes_backend_to_client"], b2c, "payload bytes: {r}");
        assert!(
            r["segments_client_to_backend"].as_u64() >= Some(segments_min),
            "{r}"
        );
        assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    }
}

/// An end the agent decides is logged by the sweeper, once, named like the program's:
/// an established forwarded connection left idle past `--idle-timeout` gets one
/// `idle_timeout` record with its payload bytes when its entries are removed.
#[test]
fn forward_idle_connection_is_logged_by_the_sweeper() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(
        bed.backend(0),
        backend(&bed, 0, 3001),
        servers::named_echo("foo"),
    )
    .expect("echo");
    let dir = Manifests::new();
    let log = dir.0.join("access.log");
    let route = format!("8088={}", backend(&bed, 0, 3001));
    let agent = forward_agent(
        &bed,
        &[route],
        &[
            "--idle-timeout",
            "1",
            "--access-log",
            log.to_str().expect("utf-8"),
        ],
    );
    let l88 = listener_addr(&bed, 8088);
    let (port, held) = bed
        .client()
        .run(move || {
            let mut s = connect(l88).expect("connect");
            assert_eq!(exchange(&mut s, "who\n"), "foo: who\n");
            (s.local_addr().expect("addr").port(), s)
        })
        .expect("client");
    let recs = all_by_client_port(&records(&log, 1));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        all_by_client_port(&records(&log, 1)),
        recs,
        "one record only"
    );
    let r = recs
        .get(&port)
        .and_then(|l| (l.len() == 1).then(|| l[0].clone()))
        .unwrap_or_else(|| panic!("one record of {port}: {recs:?}"));
    assert_eq!(r["end"], "idle_timeout", "{r}");
    assert_eq!(r["listener"], "--route 8088", "{r}");
    assert_eq!(r["backend_ref"], backend(&bed, 0, 3001).to_string(), "{r}");
    assert_eq!(r["datapath"], "forward", "{r}");
    assert_eq!(r["bytes_client_to_backend"], 4, "{r}");
    assert_eq!(r["bytes_backend_to_client"], 9, "{r}");
    assert_eq!(table_entries(&agent), 0, "swept");
    drop(held);
}
