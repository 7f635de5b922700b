//! Access log end-to-end tests: one record per connection when it ends, checked field
//! by field on each data path (bytes against what was sent, the end reason against
//! what happened); the file reopened on SIGHUP; a log whose reader stalls drops and
//! counts records while traffic keeps flowing.
mod common;

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    Agent, Writes, backend_addr, connect, listener_addr, recv_stream, require_root,
    reset_with_linger, send_stream,
};
use netbed::{
    Bed,
    records::{by_client_port, records},
    servers,
};

/// A fresh directory for one test's log files.
fn log_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sg-access-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("log dir");
    d
}

/// Connects from `client` (an address of the calling thread's namespace) to `to`, which
/// resets the connection. The agent may reset it before `connect` returns, so the port
/// is bound first: the record is found by it either way. Returns the client port.
fn connect_to_be_reset(client: IpAddr, to: SocketAddr) -> u16 {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    sock.bind(&SocketAddr::new(client, 0).into()).expect("bind");
    let port = sock
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an inet socket")
        .port();
    match sock.connect_timeout(&to.into(), Duration::from_secs(10)) {
        Ok(()) => {
            let mut s: TcpStream = sock.into();
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            expect_reset(&mut s);
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
            ),
            "connect to {to}: {e}"
        ),
    }
    port
}

/// Reads until the connection is reset; panics on anything else.
fn expect_reset(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => panic!("expected a reset, got EOF"),
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
                return;
            }
        }
    }
}

const ECHOED: u64 = 300_000;

/// Through an agent on `path` with the access log in a file: a connection that ends
/// with FIN both ways (300 kB echoed), one the client resets, one the backend resets,
/// one whose backend refuses the connect, one refused for an invalid backendRef. Each
/// record is checked field by field.
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: five connections, then their records field by field"
)]
fn records_of_each_end(path: &str) {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let dir = log_dir(path);
    let log = dir.join("access.log");
    let _echo =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3001), servers::echo())
            .expect("echo");
    let resetter: servers::Handler = Arc::new(|mut s: TcpStream| {
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf);
        reset_with_linger(&s);
    });
    let _reset =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3002), resetter).expect("rst");
    let routes = [
        format!("8088={}", backend_addr(&bed, 0, 3001)),
        format!("8089={}", backend_addr(&bed, 0, 3002)),
        // Nothing listens there: the backend refuses the connect.
        format!("8090={}", backend_addr(&bed, 0, 3009)),
        "8091=invalid".to_owned(),
    ];
    let log_arg = log.to_str().expect("utf-8 path").to_owned();
    let mut args = vec!["--datapath", path, "--access-log", &log_arg];
    for r in &routes {
        args.extend(["--route", r.as_str()]);
    }
    let agent = Agent::start(&bed, &args, &[8088, 8089, 8090, 8091]);
    let a = |p| listener_addr(&bed, p);
    let (l88, l89, l90, l91) = (a(8088), a(8089), a(8090), a(8091));
    let client_ip = IpAddr::from(bed.client_addr());
    let ports = bed
        .client()
        .run(move || {
            // FIN both ways, 300 kB each way.
            let s = connect(l88).expect("connect");
            let fin = s.local_addr().expect("addr").port();
            let tx = s.try_clone().expect("clone");
            let sender = std::thread::spawn(move || send_stream(tx, 7, ECHOED, Writes::Large));
            let (got, bad) = recv_stream(s, 7).expect("receive");
            sender.join().expect("sender").expect("send");
            assert_eq!((got, bad), (ECHOED, None));
            // The client resets after its 5 bytes came back.
            let mut s = connect(l88).expect("connect");
            let client_rst = s.local_addr().expect("addr").port();
            s.write_all(b"hello").expect("write");
            let mut back = [0u8; 5];
            s.read_exact(&mut back).expect("echo");
            reset_with_linger(&s);
            drop(s);
            // The backend resets after 5 bytes.
            let mut s = connect(l89).expect("connect");
            let backend_rst = s.local_addr().expect("addr").port();
            s.write_all(b"hello").expect("write");
            expect_reset(&mut s);
            // The backend refuses the connect.
            let failed = connect_to_be_reset(client_ip, l90);
            // An invalid backendRef.
            let refused = connect_to_be_reset(client_ip, l91);
            [fin, client_rst, backend_rst, failed, refused]
        })
        .expect("client");
    let recs = by_client_port(&records(&log, 5));
    // Shown with --nocapture (docs/operations.md quotes it).
    println!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    let client_ip = client_ip.to_string();
    let backend_ip = bed.backend_addr(0).to_string();
    let [fin, client_rst, backend_rst, failed, refused] = ports;
    let check = |port: u16, want: &[(&str, serde_json::Value)]| {
        let r = recs
            .get(&port)
            .unwrap_or_else(|| panic!("no record of client port {port}: {recs:?}"));
        assert_eq!(r["client"], format!("{client_ip}:{port}"), "{r}");
        assert_eq!(r["gateway"], serde_json::Value::Null, "{r}");
        assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
        assert!(
            r["start_time"]
                .as_str()
                .is_some_and(|t| t <= r["time"].as_str().unwrap_or("")),
            "{r}"
        );
        assert!(
            r["duration_seconds"]
                .as_f64()
                .is_some_and(|d| (0.0..30.0).contains(&d)),
            "{r}"
        );
        for (k, v) in want {
            assert_eq!(&r[*k], v, "field {k} of {r}");
        }
        r.clone()
    };
    check(
        fin,
        &[
            ("port", serde_json::json!(8088)),
            ("listener", serde_json::json!("--route 8088")),
            ("backend", serde_json::json!(format!("{backend_ip}:3001"))),
            (
                "backend_ref",
                serde_json::json!(format!("{backend_ip}:3001")),
            ),
            ("datapath", serde_json::json!(path)),
            ("bytes_client_to_backend", serde_json::json!(ECHOED)),
            ("bytes_backend_to_client", serde_json::json!(ECHOED)),
            ("end", serde_json::json!("fin")),
            ("detail", serde_json::json!(null)),
            // The --route table has no EndpointSlice.
            ("endpoint_slice", serde_json::json!(null)),
        ],
    );
    check(
        client_rst,
        &[
            ("port", serde_json::json!(8088)),
            ("datapath", serde_json::json!(path)),
            ("bytes_client_to_backend", serde_json::json!(5)),
            ("bytes_backend_to_client", serde_json::json!(5)),
            ("end", serde_json::json!("client_reset")),
        ],
    );
    check(
        backend_rst,
        &[
            ("port", serde_json::json!(8089)),
            ("backend", serde_json::json!(format!("{backend_ip}:3002"))),
            ("datapath", serde_json::json!(path)),
            ("bytes_client_to_backend", serde_json::json!(5)),
            ("bytes_backend_to_client", serde_json::json!(0)),
            ("end", serde_json::json!("backend_reset")),
        ],
    );
    let r = check(
        failed,
        &[
            ("port", serde_json::json!(8090)),
            ("backend", serde_json::json!(format!("{backend_ip}:3009"))),
            ("datapath", serde_json::json!("none")),
            ("bytes_client_to_backend", serde_json::json!(0)),
            ("bytes_backend_to_client", serde_json::json!(0)),
            ("end", serde_json::json!("connect_failed")),
        ],
    );
    assert!(
        r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("refused") && d.contains(":3009")),
        "{r}"
    );
    check(
        refused,
        &[
            ("port", serde_json::json!(8091)),
            ("backend", serde_json::json!(null)),
            ("datapath", serde_json::json!("none")),
            ("end", serde_json::json!("refused")),
            ("detail", serde_json::json!("invalid backendRef invalid")),
        ],
    );
    // Segments each way, from TCP_INFO when the connection ended: a data segment
    // carries at most one MSS (at most 1460 bytes on these 1500-byte links) and at
    // least one byte; no payload, no data segment.
    for (port, c2b, b2c) in [
        (fin, ECHOED, ECHOED),
        (client_rst, 5, 5),
        (backend_rst, 5, 0),
    ] {
        let r = &recs[&port];
        for (dir, bytes) in [("client_to_backend", c2b), ("backend_to_client", b2c)] {
            let segs = r[format!("segments_{dir}")]
                .as_u64()
                .unwrap_or_else(|| panic!("segments_{dir} missing: {r}"));
            if bytes == 0 {
                assert_eq!(segs, 0, "{dir}: {r}");
            } else {
                assert!(
                    segs * 1460 >= bytes && segs <= bytes,
                    "{dir}: {segs} segments for {bytes} bytes: {r}"
                );
            }
        }
    }
    for port in [failed, refused] {
        let r = &recs[&port];
        assert_eq!(
            r["segments_client_to_backend"],
            serde_json::Value::Null,
            "{r}"
        );
        assert_eq!(
            r["segments_backend_to_client"],
            serde_json::Value::Null,
            "{r}"
        );
    }
    // The metrics drawn from the same records.
    let m = common::metrics(&bed);
    for line in [
        r#"sockgate_connections_ended_total{listener="8088",reason="fin"} 1"#,
        r#"sockgate_connections_ended_total{listener="8088",reason="client_reset"} 1"#,
        r#"sockgate_connections_ended_total{listener="8089",reason="backend_reset"} 1"#,
        r#"sockgate_connections_ended_total{listener="8090",reason="connect_failed"} 1"#,
        r#"sockgate_connections_ended_total{listener="8091",reason="refused"} 1"#,
        r#"sockgate_connection_duration_seconds_count{listener="8088"} 2"#,
        r#"sockgate_connection_bytes_sum{listener="8088",direction="client_to_backend"} 300005.0"#,
        "sockgate_access_log_dropped_total 0",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn splice_records_each_end_field_by_field() {
    records_of_each_end("splice");
}

#[test]
fn sockmap_records_each_end_field_by_field() {
    records_of_each_end("sockmap");
}

fn one_exchange(addr: SocketAddr) -> u16 {
    let mut s = connect(addr).expect("connect");
    let port = s.local_addr().expect("addr").port();
    s.write_all(b"x").expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("echo");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("EOF");
    port
}

/// logrotate's `create` mode: the file is renamed, SIGHUP makes the agent open a new
/// one; the record before is in the old file, the one after in the new.
#[test]
fn sighup_reopens_the_log_file() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let dir = log_dir("hup");
    let log = dir.join("access.log");
    let _echo =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3001), servers::echo())
            .expect("echo");
    let route = format!("8088={}", backend_addr(&bed, 0, 3001));
    let log_arg = log.to_str().expect("utf-8").to_owned();
    let agent = Agent::start(
        &bed,
        &[
            "--route",
            &route,
            "--datapath",
            "splice",
            "--access-log",
            &log_arg,
        ],
        &[8088],
    );
    let addr = listener_addr(&bed, 8088);
    let before = bed
        .client()
        .run(move || one_exchange(addr))
        .expect("client");
    assert_eq!(records(&log, 1).len(), 1);
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rename");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log_text().contains("access log reopened") {
        assert!(
            Instant::now() < deadline,
            "never reopened:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = bed
        .client()
        .run(move || one_exchange(addr))
        .expect("client");
    let new = records(&log, 1);
    let old = records(&rotated, 1);
    assert_eq!(old.len(), 1, "{old:?}");
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(by_client_port(&old).contains_key(&before));
    assert!(by_client_port(&new).contains_key(&after));
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The log goes to a FIFO whose reader reads nothing: the writer blocks once the pipe
/// is full, the 16-record buffer fills, and further records are dropped and counted.
/// Every connection still completes; once the reader drains the FIFO, the records
/// read plus the dropped count make every connection.
#[test]
fn a_stalled_log_drops_and_counts_without_slowing_traffic() {
    const CONNECTIONS: usize = 400;
    require_root();
    let bed = Bed::new(1).expect("bed");
    let dir = log_dir("flood");
    let fifo = dir.join("access.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // Read side open first (non-blocking), so the agent's open for writing succeeds.
    let mut reader = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open FIFO");
    let _echo =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3001), servers::echo())
            .expect("echo");
    let route = format!("8088={}", backend_addr(&bed, 0, 3001));
    let fifo_arg = fifo.to_str().expect("utf-8").to_owned();
    let agent = Agent::start(
        &bed,
        &[
            "--route",
            &route,
            "--datapath",
            "splice",
            "--access-log",
            &fifo_arg,
            "--access-log-buffer",
            "16",
        ],
        &[8088],
    );
    let addr = listener_addr(&bed, 8088);
    let done = bed
        .client()
        .run(move || {
            let started = Instant::now();
            let mut n = 0;
            while n < CONNECTIONS && started.elapsed() < Duration::from_mins(1) {
                one_exchange(addr);
                n += 1;
            }
            n
        })
        .expect("client");
    assert_eq!(
        done, CONNECTIONS,
        "every connection completed while the log stalled"
    );
    let counter = |m: &str, name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{m}"))
    };
    // The records of the last connections are counted once their tasks end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (ended, dropped) = loop {
        let m = common::metrics(&bed);
        let ended = counter(
            &m,
            r#"sockgate_connections_ended_total{listener="8088",reason="fin"} "#,
        );
        let dropped = counter(&m, "sockgate_access_log_dropped_total ");
        if ended == CONNECTIONS as u64 || Instant::now() > deadline {
            break (ended, dropped);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ended, CONNECTIONS as u64);
    assert!(dropped > 0, "a stalled log drops records");
    // Drain the FIFO: every record not dropped arrives.
    let want = CONNECTIONS - usize::try_from(dropped).expect("count");
    let mut text = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 64 * 1024];
    let lines_in = |t: &[u8]| t.split(|&b| b == b'\n').count() - 1;
    while lines_in(&text) < want {
        assert!(
            Instant::now() < deadline,
            "read {} of {want} records",
            lines_in(&text)
        );
        match reader.read(&mut buf) {
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("read FIFO: {e}"),
        }
    }
    let lines = String::from_utf8(text).expect("utf-8");
    assert_eq!(
        lines.lines().count(),
        want,
        "records read + dropped = connections"
    );
    for l in lines.lines() {
        let r: serde_json::Value = serde_json::from_str(l).expect("JSON line");
        assert_eq!(r["end"], "fin", "{r}");
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sockgate connections` (run in the node namespace, where the agent's endpoint is)
/// with `ARGS`.
fn connections(bed: &Bed, agent: &Agent, args: &[&str]) -> String {
    let out = bed
        .node()
        .command(common::sockgate_bin())
        .arg("connections")
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .args(args)
        .output()
        .expect("sockgate connections runs");
    assert!(
        out.status.success(),
        "sockgate connections failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A transfer in progress is listed with its client, backend, path and the bytes so
/// far, on both socket paths; the filters keep or drop it; once closed it is gone.
fn live_list_shows_a_transfer(path: &str) {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3001), servers::echo())
            .expect("echo");
    let route = format!("8088={}", backend_addr(&bed, 0, 3001));
    let agent = Agent::start(&bed, &["--route", &route, "--datapath", path], &[8088]);
    let addr = listener_addr(&bed, 8088);
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let client = bed
        .client()
        .spawn(move || {
            let mut s = connect(addr).expect("connect");
            let data = vec![7u8; 100_000];
            s.write_all(&data).expect("write");
            let mut back = vec![0u8; data.len()];
            s.read_exact(&mut back).expect("echo");
            tx.send(s.local_addr().expect("addr").port()).expect("send");
            let _ = done_rx.recv_timeout(Duration::from_secs(30));
        })
        .expect("client");
    let port = rx.recv_timeout(Duration::from_secs(20)).expect("transfer");
    let client_addr = format!("{}:{port}", bed.client_addr());
    // The verdict's byte counts are read from GW_PEERS; give a moment to settle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        let list: serde_json::Value =
            serde_json::from_str(&connections(&bed, &agent, &["--json"])).expect("JSON");
        let found = list
            .as_array()
            .and_then(|l| l.iter().find(|c| c["client"] == client_addr.as_str()))
            .cloned();
        if let Some(c) = found.filter(|c| c["bytes_backend_to_client"] == 100_000) {
            break c;
        }
        assert!(Instant::now() < deadline, "not listed right: {list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(conn["port"], 8088, "{conn}");
    assert_eq!(conn["datapath"], path, "{conn}");
    assert_eq!(
        conn["backend"],
        backend_addr(&bed, 0, 3001).to_string(),
        "{conn}"
    );
    assert_eq!(conn["bytes_client_to_backend"], 100_000, "{conn}");
    assert_eq!(conn["state"], "established", "{conn}");
    let text = connections(&bed, &agent, &[]);
    println!("{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(&client_addr) && l.contains(path)),
        "{text}"
    );
    let client_cidr = format!("{}/32", bed.client_addr());
    let kept = connections(
        &bed,
        &agent,
        &["--listener", "8088", "--client", &client_cidr],
    );
    assert!(kept.contains(&client_addr), "{kept}");
    let dropped = connections(&bed, &agent, &["--listener", "8089"]);
    assert!(!dropped.contains(&client_addr), "{dropped}");
    let dropped = connections(&bed, &agent, &["--backend", "10.9.9.9"]);
    assert!(!dropped.contains(&client_addr), "{dropped}");
    done_tx.send(()).expect("done");
    client.join().expect("client");
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections(&bed, &agent, &[]).contains(&client_addr) {
        assert!(Instant::now() < deadline, "still listed after close");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn live_list_shows_a_splice_transfer() {
    live_list_shows_a_transfer("splice");
}

#[test]
fn live_list_shows_a_sockmap_transfer() {
    live_list_shows_a_transfer("sockmap");
}

/// The forward path: the records (from the program's ring buffer) of a connection
/// closed with FIN both ways (300 kB echoed), one the client resets and one the backend
/// resets, checked field by field (payload bytes, as on the socket paths); and a
/// connection held open is listed from the pinned table.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: four connections, then their records and the list"
)]
fn forward_records_each_end_and_lists_from_the_table() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let dir = log_dir("forward");
    let log = dir.join("access.log");
    let _echo =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3001), servers::echo())
            .expect("echo");
    let resetter: servers::Handler = Arc::new(|mut s: TcpStream| {
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf);
        reset_with_linger(&s);
    });
    let _reset =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3002), resetter).expect("rst");
    let r88 = format!("8088={}", backend_addr(&bed, 0, 3001));
    let r89 = format!("8089={}", backend_addr(&bed, 0, 3002));
    let log_arg = log.to_str().expect("utf-8").to_owned();
    let agent = Agent::start(
        &bed,
        &[
            "--datapath",
            "forward",
            "--forward-iface",
            "c0",
            "--forward-iface",
            "b0",
            "--route",
            &r88,
            "--route",
            &r89,
            "--access-log",
            &log_arg,
        ],
        &[8088, 8089],
    );
    let (l88, l89) = (listener_addr(&bed, 8088), listener_addr(&bed, 8089));
    let (tx, rx) = std::sync::mpsc::channel::<[u16; 4]>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let client = bed
        .client()
        .spawn(move || {
            let s = connect(l88).expect("connect");
            let fin = s.local_addr().expect("addr").port();
            let txs = s.try_clone().expect("clone");
            let sender = std::thread::spawn(move || send_stream(txs, 9, ECHOED, Writes::Large));
            let (got, bad) = recv_stream(s, 9).expect("receive");
            sender.join().expect("sender").expect("send");
            assert_eq!((got, bad), (ECHOED, None));
            let mut s = connect(l88).expect("connect");
            let client_rst = s.local_addr().expect("addr").port();
            s.write_all(b"hello").expect("write");
            let mut back = [0u8; 5];
            s.read_exact(&mut back).expect("echo");
            reset_with_linger(&s);
            drop(s);
            let mut s = connect(l89).expect("connect");
            let backend_rst = s.local_addr().expect("addr").port();
            s.write_all(b"hello").expect("write");
            expect_reset(&mut s);
            // Held open while the test lists it.
            let mut held = connect(l88).expect("connect");
            held.write_all(&[1u8; 1000]).expect("write");
            let mut back = [0u8; 1000];
            held.read_exact(&mut back).expect("echo");
            let open = held.local_addr().expect("addr").port();
            tx.send([fin, client_rst, backend_rst, open]).expect("send");
            let _ = done_rx.recv_timeout(Duration::from_secs(30));
        })
        .expect("client");
    let [fin, client_rst, backend_rst, open] = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("client ran");
    let client_ip = bed.client_addr();
    // The open connection, from the pinned table.
    let list: serde_json::Value = serde_json::from_str(&connections(
        &bed,
        &agent,
        &["--json", "--listener", "8088"],
    ))
    .expect("JSON");
    println!("{}", connections(&bed, &agent, &["--listener", "8088"]));
    let held = list
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|c| c["client"] == format!("{client_ip}:{open}").as_str())
        })
        .cloned()
        .unwrap_or_else(|| panic!("open connection not listed: {list}"));
    assert_eq!(held["datapath"], "forward", "{held}");
    assert_eq!(held["state"], "established", "{held}");
    assert_eq!(
        held["backend"],
        backend_addr(&bed, 0, 3001).to_string(),
        "{held}"
    );
    assert!(
        held["bytes_client_to_backend"].as_u64() >= Some(1000),
        "{held}"
    );
    assert!(
        held["bytes_backend_to_client"].as_u64() >= Some(1000),
        "{held}"
    );
    // The closed ones, recorded by the sweeper within its closing and reset timeouts.
    let recs = by_client_port(&records(&log, 3));
    println!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    let rec = |port: u16| {
        recs.get(&port)
            .unwrap_or_else(|| panic!("no record of {port}: {recs:?}"))
            .clone()
    };
    let payload_bytes = |r: &serde_json::Value, dir: &str, payload: u64| {
        let bytes = r[format!("bytes_{dir}")].as_u64().expect("bytes");
        let segs = r[format!("segments_{dir}")].as_u64().expect("segments");
        assert!(segs > 0, "{r}");
        assert_eq!(
            bytes, payload,
            "{dir}: payload bytes in {segs} segments: {r}"
        );
    };
    for (port, listener, backend_port, end, c2b, b2c) in [
        (fin, 8088, 3001, "fin", ECHOED, ECHOED),
        (client_rst, 8088, 3001, "client_reset", 5, 5),
        (backend_rst, 8089, 3002, "backend_reset", 5, 0),
    ] {
        let r = rec(port);
        assert_eq!(r["client"], format!("{client_ip}:{port}"), "{r}");
        assert_eq!(r["port"], listener, "{r}");
        assert_eq!(
            r["backend"],
            backend_addr(&bed, 0, backend_port).to_string(),
            "{r}"
        );
        assert_eq!(r["datapath"], "forward", "{r}");
        assert_eq!(r["end"], end, "{r}");
        assert_eq!(r["listener"], format!("--route {listener}"), "{r}");
        assert_eq!(
            r["backend_ref"],
            backend_addr(&bed, 0, backend_port).to_string(),
            "{r}"
        );
        payload_bytes(&r, "client_to_backend", c2b);
        payload_bytes(&r, "backend_to_client", b2c);
    }
    done_tx.send(()).expect("done");
    client.join().expect("client");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent on the forward path (client and backend links attached) with `routes` and
/// the access log in `log`.
fn forward_agent_logging(bed: &Bed, routes: &[String], log: &std::path::Path) -> Agent {
    let mut args = vec![
        "--datapath",
        "forward",
        "--forward-iface",
        "c0",
        "--forward-iface",
        "b0",
        "--access-log",
        log.to_str().expect("utf-8"),
    ];
    for r in routes {
        args.extend(["--route", r.as_str()]);
    }
    let ports: Vec<u16> = routes
        .iter()
        .filter_map(|r| r.split_once('=').and_then(|(p, _)| p.parse().ok()))
        .collect();
    Agent::start(bed, &args, &ports)
}

/// Past the forward path's reset and closing timeouts (1 s, 2 s) and a sweep: what the
/// sweeper would log about the connections already ended is in the log by then.
const PAST_THE_SWEEP: Duration = Duration::from_millis(3500);

/// A forwarded connection whose only backend resets the SYN (nothing listens on its
/// port), retried at the client's retransmission until the program resets the client:
/// exactly one record, `connect_failed`, naming the backend tried.
#[test]
fn forward_failed_connect_is_recorded_once_as_connect_failed() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let dir = log_dir("forward-failed");
    let log = dir.join("access.log");
    // Nothing listens on 3009: the backend's stack resets the SYN.
    let closed = backend_addr(&bed, 0, 3009);
    let agent = forward_agent_logging(&bed, &[format!("8090={closed}")], &log);
    let l90 = listener_addr(&bed, 8090);
    let client_ip = IpAddr::from(bed.client_addr());
    let port = bed
        .client()
        .run(move || connect_to_be_reset(client_ip, l90))
        .expect("client");
    records(&log, 1);
    std::thread::sleep(PAST_THE_SWEEP);
    let recs = records(&log, 1);
    println!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(recs.len(), 1, "one record: {recs:?}");
    let r = &recs[0];
    assert_eq!(r["client"], format!("{client_ip}:{port}"), "{r}");
    assert_eq!(r["port"], 8090, "{r}");
    assert_eq!(r["datapath"], "forward", "{r}");
    assert_eq!(r["backend"], closed.to_string(), "{r}");
    assert_eq!(r["end"], "connect_failed", "{r}");
    assert_eq!(r["bytes_client_to_backend"], 0, "{r}");
    assert_eq!(r["bytes_backend_to_client"], 0, "{r}");
    assert!(
        r["detail"].as_str().is_some_and(|d| d.contains("attempts")),
        "{r}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection still open when the agent stops and the drain timeout runs out is
/// recorded as `drained`, with its bytes; the record is written before the agent exits.
#[test]
fn connection_open_at_stop_is_recorded_drained() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let dir = log_dir("drain");
    let log = dir.join("access.log");
    let _echo =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3001), servers::echo())
            .expect("echo");
    let route = format!("8088={}", backend_addr(&bed, 0, 3001));
    let log_arg = log.to_str().expect("utf-8").to_owned();
    let mut agent = Agent::start(
        &bed,
        &[
            "--route",
            &route,
            "--datapath",
            "splice",
            "--drain-timeout",
            "1",
            "--access-log",
            &log_arg,
        ],
        &[8088],
    );
    let addr = listener_addr(&bed, 8088);
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let client = bed
        .client()
        .spawn(move || {
            let mut s = connect(addr).expect("connect");
            s.write_all(b"still here").expect("write");
            let mut back = [0u8; 10];
            s.read_exact(&mut back).expect("echo");
            tx.send(s.local_addr().expect("addr").port()).expect("send");
            // Held until the agent closes it.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        })
        .expect("client");
    let port = rx.recv_timeout(Duration::from_secs(20)).expect("exchange");
    let status = agent.stop();
    assert!(status.success(), "{status}");
    client.join().expect("client");
    let recs = by_client_port(&records(&log, 1));
    let r = recs
        .get(&port)
        .unwrap_or_else(|| panic!("no record of {port}: {recs:?}"));
    assert_eq!(r["end"], "drained", "{r}");
    assert_eq!(r["datapath"], "splice", "{r}");
    assert_eq!(r["bytes_client_to_backend"], 10, "{r}");
    assert_eq!(r["bytes_backend_to_client"], 10, "{r}");
    // Read from the sockets when the drain closed them.
    for dir in ["client_to_backend", "backend_to_client"] {
        let segs = r[format!("segments_{dir}")].as_u64();
        assert!(segs.is_some_and(|n| (1..=10).contains(&n)), "{dir}: {r}");
    }
    assert!(r["duration_seconds"].as_f64() >= Some(1.0), "{r}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Gateway API objects from files: the record of a connection (and its line in
/// `sockgate connections` while open) names the Gateway, listener, route, backendRef
/// and the `EndpointSlice` its backend endpoint was read from.
#[test]
fn records_name_the_endpoint_slice() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let dir = log_dir("slice");
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifest dir");
    std::fs::write(
        manifests.join("objects.yaml"),
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: sockgate\nspec:\n  controllerName: sockgate.dev/gateway-controller\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  gatewayClassName: sockgate\n  listeners:\n  - name: tcp\n    protocol: TCP\n    port: 8088\n---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: to-echo\nspec:\n  parentRefs:\n  - name: gw\n  rules:\n  - backendRefs:\n    - name: echo\n      port: 3001\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: echo\nspec:\n  ports:\n  - port: 3001\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-x7k2p\n  labels:\n    kubernetes.io/service-name: echo\naddressType: IPv4\nports:\n- port: 3001\nendpoints:\n- addresses: [\"{}\"]\n",
            bed.backend_addr(0)
        ),
    )
    .expect("write manifests");
    let log = dir.join("access.log");
    let _echo =
        servers::Server::start(bed.backend(0), backend_addr(&bed, 0, 3001), servers::echo())
            .expect("echo");
    let agent = Agent::start(
        &bed,
        &[
            "--source",
            "files",
            "--dir",
            manifests.to_str().expect("utf-8"),
            "--datapath",
            "splice",
            "--access-log",
            log.to_str().expect("utf-8"),
        ],
        &[8088],
    );
    let addr = listener_addr(&bed, 8088);
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let client = bed
        .client()
        .spawn(move || {
            let mut s = connect(addr).expect("connect");
            s.write_all(b"hello").expect("write");
            let mut back = [0u8; 5];
            s.read_exact(&mut back).expect("echo");
            tx.send(s.local_addr().expect("addr").port()).expect("send");
            let _ = done_rx.recv_timeout(Duration::from_secs(30));
            s.shutdown(Shutdown::Write).expect("shutdown");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).expect("EOF");
        })
        .expect("client");
    let port = rx.recv_timeout(Duration::from_secs(20)).expect("exchange");
    let client_addr = format!("{}:{port}", bed.client_addr());
    let list: serde_json::Value =
        serde_json::from_str(&connections(&bed, &agent, &["--json"])).expect("JSON");
    let live = list
        .as_array()
        .and_then(|l| l.iter().find(|c| c["client"] == client_addr.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("not listed: {list}"));
    assert_eq!(live["endpoint_slice"], "default/echo-x7k2p", "{live}");
    let text = connections(&bed, &agent, &[]);
    assert!(
        text.lines()
            .any(|l| l.contains(&client_addr) && l.ends_with("[default/echo-x7k2p]")),
        "{text}"
    );
    done_tx.send(()).expect("done");
    client.join().expect("client");
    let recs = by_client_port(&records(&log, 1));
    let r = recs
        .get(&port)
        .unwrap_or_else(|| panic!("no record of {port}: {recs:?}"));
    println!("{r}");
    for (k, v) in [
        ("gateway", "default/gw"),
        ("listener", "tcp"),
        ("route", "default/to-echo"),
        ("backend_ref", "default/echo:3001"),
        ("endpoint_slice", "default/echo-x7k2p"),
        ("datapath", "splice"),
        ("end", "fin"),
    ] {
        assert_eq!(r[k], v, "field {k} of {r}");
    }
    assert_eq!(r["backend"], backend_addr(&bed, 0, 3001).to_string(), "{r}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
