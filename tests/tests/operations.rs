//! Operations end-to-end tests: `sockgate status` (text and JSON), every pinned map
//! through `bpftool` by field name, the metrics and health endpoints after traffic,
//! SIGTERM with connections in flight, and a restart over stale pins.
mod common;

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, bpftool_json, connect, exchange, http_get, require_root};
use netbed::{Bed, servers};

fn listener_addr(bed: &Bed, port: u16) -> SocketAddr {
    SocketAddr::new(bed.node_addr().into(), port)
}

fn backend(bed: &Bed, i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(bed.backend_addr(i).into(), port)
}

/// The value of the sample `name{labels}` in a text exposition, if present.
fn sample(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[test]
fn status_text_and_json_after_traffic() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let _foo = servers::Server::start(
        bed.backend(0),
        backend(&bed, 0, 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let _bar = servers::Server::start(
        bed.backend(1),
        backend(&bed, 1, 3002),
        servers::named_echo("bar"),
    )
    .expect("bar");
    let r1 = format!("8088={}*3", backend(&bed, 0, 3001));
    let r2 = format!("8089={}*1,invalid*1", backend(&bed, 1, 3002));
    let agent = Agent::start(
        &bed,
        &["--route", &r1, "--route", &r2, "--datapath", "sockmap"],
        &[8088, 8089],
    );
    let (a1, a2) = (listener_addr(&bed, 8088), listener_addr(&bed, 8089));
    let replies = bed
        .client()
        .run(move || {
            let mut out = Vec::new();
            for _ in 0..3 {
                let mut s = connect(a1).expect("connect 8088");
                out.push(exchange(&mut s, "hi\n"));
            }
            // Smooth weighted round robin over 1/1: one to bar, one reset (invalid).
            for _ in 0..2 {
                if let Ok(mut s) = connect(a2) {
                    let _ = s.write_all(b"hi\n");
                    let mut line = String::new();
                    let _ = s.read_to_string(&mut line);
                    out.push(line);
                }
            }
            out
        })
        .expect("client");
    assert_eq!(&replies[..3], ["foo: hi\n", "foo: hi\n", "foo: hi\n"]);
    assert!(
        replies[3..].contains(&"bar: hi\n".to_owned()),
        "{replies:?}"
    );

    std::thread::sleep(Duration::from_millis(300));
    let s = agent.status();
    let ls = s["listeners"].as_array().expect("listeners");
    assert_eq!(ls.len(), 2, "{s}");
    assert_eq!(ls[0]["port"], 8088);
    assert_eq!(ls[0]["total_weight"], 3);
    assert_eq!(
        ls[0]["backends"][0]["address"],
        backend(&bed, 0, 3001).to_string()
    );
    assert_eq!(ls[0]["stats"]["accepted"], 3, "{s}");
    assert_eq!(ls[0]["stats"]["connected"], 3, "{s}");
    assert_eq!(ls[0]["stats"]["kernel_connections"], 3, "{s}");
    assert_eq!(ls[1]["backends"][1]["address"], "invalid", "{s}");
    assert_eq!(ls[1]["stats"]["accepted"], 2, "{s}");
    assert_eq!(ls[1]["stats"]["rejected_invalid_backend"], 1, "{s}");

    let out = Command::new(common::sockgate_bin())
        .args(["status", "--pin-dir"])
        .arg(&agent.pin_dir)
        .output()
        .expect("status runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listener :8088"), "{text}");
    assert!(text.contains("listener :8089"), "{text}");
    assert!(
        text.contains(&format!("{:<40} weight 3", backend(&bed, 0, 3001))),
        "{text}"
    );
    assert!(text.contains("invalid"), "{text}");
    assert!(text.contains("accepted 3  connected 3"), "{text}");
    assert!(text.contains("invalid backend 1"), "{text}");

    // Nothing pinned: one clear line, non-zero exit.
    let out = Command::new(common::sockgate_bin())
        .args(["status", "--pin-dir", "/sys/fs/bpf/sockgate-nothing-here"])
        .output()
        .expect("status runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nothing is pinned"), "{err}");
}

#[test]
fn bpftool_shows_every_map_by_field_name_and_the_programs() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), servers::echo())
        .expect("echo");
    let route = format!("8088={}", backend(&bed, 0, 3001));
    let agent = Agent::start(&bed, &["--route", &route, "--datapath", "sockmap"], &[8088]);
    let addr = listener_addr(&bed, 8088);
    // Hold one kernel-path connection open while the maps are dumped.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let client = bed
        .client()
        .spawn(move || {
            let mut s = connect(addr).expect("connect");
            s.write_all(b"ping").expect("write");
            let mut b = [0u8; 4];
            s.read_exact(&mut b).expect("echo");
            ready_tx.send(()).expect("ready");
            let _ = rx.recv_timeout(Duration::from_secs(30));
        })
        .expect("client");
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("connection up");
    std::thread::sleep(Duration::from_millis(300));
    let pin = |m: &str| agent.pin_dir.join(m).display().to_string();

    let peers = bpftool_json(&["map", "dump", "pinned", &pin("GW_PEERS")]);
    let entries = peers.as_array().expect("array");
    assert_eq!(entries.len(), 2, "both sockets of the pair: {peers}");
    let v = &entries[0]["formatted"]["value"];
    for field in [
        "peer_cookie",
        "listener_port",
        "direction",
        "bytes_redirected",
    ] {
        assert!(!v[field].is_null(), "GW_PEERS value has {field}: {peers}");
    }
    assert_eq!(v["listener_port"], 8088, "{peers}");

    let stats = bpftool_json(&["map", "dump", "pinned", &pin("GW_STATS")]);
    let agent_entry = stats
        .as_array()
        .expect("array")
        .iter()
        .map(|e| &e["formatted"])
        .find(|f| f["key"]["listener_port"] == 8088 && f["key"]["owner"] == 1)
        .unwrap_or_else(|| panic!("agent counters of 8088: {stats}"));
    let accepted: u64 = agent_entry["values"]
        .as_array()
        .expect("per-CPU values")
        .iter()
        .map(|c| c["value"]["accepted"].as_u64().expect("accepted by name"))
        .sum();
    assert_eq!(accepted, 1, "{stats}");

    let map_id = |m: &str| {
        let show = bpftool_json(&["map", "show", "pinned", &pin(m)]);
        (show["type"].clone(), show["id"].as_u64().expect("map id"))
    };
    let (socks_type, socks_id) = map_id("GW_SOCKS");
    assert_eq!(socks_type, "sockhash");
    let (_, stats_id) = map_id("GW_STATS");
    let progs = bpftool_json(&["prog", "show"]);
    // The verdict reads GW_PEERS and redirects through GW_SOCKS, and counts in
    // GW_STATS. No sk_msg program is loaded (docs/performance.md).
    let uses = [socks_id, stats_id];
    let found = progs.as_array().expect("array").iter().any(|p| {
        p["name"] == "gw_verdict"
            && p["type"] == "sk_skb"
            && p["map_ids"].as_array().is_some_and(|ids| {
                uses.iter()
                    .all(|u| ids.iter().any(|i| i.as_u64() == Some(*u)))
            })
    });
    assert!(
        found,
        "sk_skb program gw_verdict on this agent's maps: {progs}"
    );
    let msg_progs: Vec<_> = progs
        .as_array()
        .expect("array")
        .iter()
        .filter(|p| {
            p["type"] == "sk_msg"
                && p["map_ids"]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|i| i.as_u64() == Some(stats_id)))
        })
        .collect();
    assert!(
        msg_progs.is_empty(),
        "sk_msg programs on this agent's maps: {msg_progs:?}"
    );
    let _ = tx.send(());
    client.join().expect("client thread");
}

#[test]
fn metrics_and_health_after_traffic() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _foo = servers::Server::start(
        bed.backend(0),
        backend(&bed, 0, 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let r1 = format!("8088={}", backend(&bed, 0, 3001));
    let agent = Agent::start(
        &bed,
        &[
            "--route",
            &r1,
            "--route",
            "8089=invalid",
            "--metrics-addr",
            "127.0.0.1:9500",
            "--datapath",
            "sockmap",
        ],
        &[8088, 8089],
    );
    let (a1, a2) = (listener_addr(&bed, 8088), listener_addr(&bed, 8089));
    bed.client()
        .run(move || {
            for _ in 0..4 {
                let mut s = connect(a1).expect("connect");
                assert_eq!(exchange(&mut s, "x\n"), "foo: x\n");
            }
            if let Ok(mut s) = connect(a2) {
                let mut b = [0u8; 1];
                let _ = s.read(&mut b);
            }
        })
        .expect("client");
    std::thread::sleep(Duration::from_millis(300));
    let m: SocketAddr = "127.0.0.1:9500".parse().expect("addr");
    assert_eq!(http_get(&bed, m, "/healthz").0, 200);
    assert_eq!(http_get(&bed, m, "/readyz").0, 200);
    let (code, text) = http_get(&bed, m, "/metrics");
    assert_eq!(code, 200, "{text}");
    let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no sample {s}:\n{text}"));
    assert_eq!(
        get("sockgate_connections_accepted_total{listener=\"8088\"}"),
        4
    );
    assert_eq!(
        get("sockgate_connections_total{listener=\"8088\",path=\"kernel\"}"),
        4
    );
    assert_eq!(
        get("sockgate_connections_rejected_total{listener=\"8089\",reason=\"invalid_backend\"}"),
        1
    );
    assert_eq!(
        get("sockgate_connections_active{listener=\"8088\",path=\"kernel\"}"),
        0
    );
    assert_eq!(
        get("sockgate_backend_connect_seconds_count{listener=\"8088\"}"),
        4
    );
    assert!(get("sockgate_reconciles_total") >= 1);
    assert_eq!(get("sockgate_map_entries{map=\"GW_LISTENERS\"}"), 2);
    // Echoed lines: 4 x "x\n" each way, counted by the verdict.
    assert_eq!(
        get(
            "sockgate_bytes_total{listener=\"8088\",path=\"kernel\",direction=\"client_to_backend\"}"
        ),
        8
    );
    drop(agent);
}

/// Sends `total` bytes of a pattern through an echo and checks they come back intact.
fn echo_roundtrip(s: TcpStream, total: usize) -> io::Result<usize> {
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> io::Result<()> {
        let chunk: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n])?;
            left -= n;
        }
        w.shutdown(Shutdown::Write)
    });
    let mut r = s;
    let mut buf = vec![0u8; 65_536];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != ((got + i) % 65_536 % 251) as u8 {
                return Err(io::Error::other(format!("corrupt byte at {}", got + i)));
            }
        }
        got += n;
    }
    writer.join().map_err(|_| io::Error::other("writer"))??;
    Ok(got)
}

#[test]
fn sigterm_drains_connections_in_flight() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), servers::echo())
        .expect("echo");
    let r1 = format!("8088={}", backend(&bed, 0, 3001));
    let r2 = format!("8089={}", backend(&bed, 0, 3001));
    let mut agent = Agent::start(
        &bed,
        &[
            "--route",
            &r1,
            "--route",
            &r2,
            "--datapath",
            "auto",
            "--drain-timeout",
            "20",
        ],
        &[8088, 8089],
    );
    let (a1, a2) = (listener_addr(&bed, 8088), listener_addr(&bed, 8089));
    // Two connections open before SIGTERM: the first moves 64 MiB after it, the second
    // stays idle and is closed by the client once the first is done.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = bed
        .client()
        .spawn(move || {
            let busy = connect(a1).expect("connect busy");
            let idle = connect(a2).expect("connect idle");
            opened_tx.send(()).expect("opened");
            go_rx.recv_timeout(Duration::from_secs(20)).expect("go");
            let moved = echo_roundtrip(busy, 64 << 20);
            drop(idle);
            // The listeners are closed now.
            let refused = connect(a1).map(|_| ()).map_err(|e| e.kind());
            (moved.map_err(|e| e.to_string()), refused)
        })
        .expect("client");
    opened_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("connections opened");
    std::thread::sleep(Duration::from_millis(200));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    // Wait until the agent says it stopped accepting, then let the client move its data.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent
        .log_text()
        .contains("draining established connections")
    {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "the agent waits for its connections"
    );
    go_tx.send(()).expect("go");
    let (moved, refused) = client.join().expect("client thread");
    assert_eq!(moved, Ok(64 << 20), "every byte, intact, after SIGTERM");
    assert_eq!(refused, Err(io::ErrorKind::ConnectionRefused));
    let started = Instant::now();
    let status = agent.stop();
    assert!(status.success(), "{status}: {}", agent.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exits once the connections ended, before the drain timeout"
    );
    assert!(!agent.pin_dir.exists(), "pins removed on clean exit");
}

#[test]
fn drain_timeout_closes_what_is_left() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), servers::echo())
        .expect("echo");
    let r1 = format!("8088={}", backend(&bed, 0, 3001));
    let mut agent = Agent::start(&bed, &["--route", &r1, "--drain-timeout", "1"], &[8088]);
    let a1 = listener_addr(&bed, 8088);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let client = bed
        .client()
        .spawn(move || {
            let mut s = connect(a1).expect("connect");
            s.write_all(b"x").expect("write");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("echo");
            opened_tx.send(()).expect("opened");
            // The agent closes it at the drain timeout: EOF or reset, not a hang.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).map(|_| ()).map_err(|e| e.kind())
        })
        .expect("client");
    opened_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("connection up");
    let started = Instant::now();
    let status = agent.stop();
    let took = started.elapsed();
    assert!(status.success(), "{status}: {}", agent.log_text());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "exits at the drain timeout, took {took:?}"
    );
    let ended = client.join().expect("client thread");
    assert!(
        matches!(ended, Ok(()) | Err(io::ErrorKind::ConnectionReset)),
        "{ended:?}"
    );
    assert!(
        agent.log_text().contains("drain timeout"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn restart_over_stale_pins_programs_only_the_new_state() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let _foo = servers::Server::start(
        bed.backend(0),
        backend(&bed, 0, 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let _bar = servers::Server::start(
        bed.backend(1),
        backend(&bed, 1, 3002),
        servers::named_echo("bar"),
    )
    .expect("bar");
    let dir = common::pin_dir();
    let r_old = format!(
        "8088={}*1,{}*1",
        backend(&bed, 0, 3001),
        backend(&bed, 1, 3002)
    );
    let first = Agent::start_with_pin_dir(
        &bed,
        dir.clone(),
        &[
            "--route",
            &r_old,
            "--route",
            "8089=invalid",
            "--keep-pins",
            "--datapath",
            "sockmap",
        ],
        &[8088, 8089],
    );
    let a1 = listener_addr(&bed, 8088);
    // A kernel-path connection is open when the agent dies: its GW_PEERS entries stay.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = bed
        .client()
        .spawn(move || {
            let mut s = connect(a1).expect("connect");
            let _ = exchange(&mut s, "x\n");
            opened_tx.send(()).expect("opened");
            let _ = done_rx.recv_timeout(Duration::from_secs(30));
        })
        .expect("client");
    opened_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("connection up");
    first.kill_keeping_pins();
    let stale = netbed_status(&dir);
    assert_eq!(stale["paired_sockets"], 2, "stale pair left: {stale}");
    assert_eq!(stale["listeners"].as_array().map(Vec::len), Some(2));

    // The new agent serves only 8090 -> bar.
    let r_new = format!("8090={}", backend(&bed, 1, 3002));
    let second = Agent::start_with_pin_dir(&bed, dir.clone(), &["--route", &r_new], &[8090]);
    let s = second.status();
    let ports: Vec<u64> = s["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| l["port"].as_u64().expect("port"))
        .collect();
    assert_eq!(ports, vec![8090], "{s}");
    assert_eq!(
        s["listeners"][0]["backends"].as_array().map(Vec::len),
        Some(1),
        "{s}"
    );
    assert_eq!(
        s["paired_sockets"], 0,
        "stale GW_PEERS entries removed: {s}"
    );
    assert!(
        second.log_text().contains("stale GW_PEERS"),
        "{}",
        second.log_text()
    );
    let (a8088, a8090) = (listener_addr(&bed, 8088), listener_addr(&bed, 8090));
    let (old, new) = bed
        .client()
        .run(move || {
            let old = connect(a8088).map(|_| ()).map_err(|e| e.kind());
            let mut s = connect(a8090).expect("connect 8090");
            (old, exchange(&mut s, "y\n"))
        })
        .expect("client");
    assert_eq!(old, Err(io::ErrorKind::ConnectionRefused));
    assert_eq!(new, "bar: y\n");
    let _ = done_tx.send(());
    holder.join().expect("holder");
}

/// `sockgate status --json` of a pin directory no agent runs on.
fn netbed_status(dir: &std::path::Path) -> serde_json::Value {
    let out = Command::new(common::sockgate_bin())
        .args(["status", "--json", "--pin-dir"])
        .arg(dir)
        .output()
        .expect("status runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn failed_redirect_keeps_data_and_is_logged_from_the_kernel() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(bed.backend(0), backend(&bed, 0, 3001), servers::echo())
        .expect("echo");
    let route = format!("8088={}", backend(&bed, 0, 3001));
    let agent = Agent::start(&bed, &["--route", &route, "--datapath", "sockmap"], &[8088]);
    let addr = listener_addr(&bed, 8088);
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = bed
        .client()
        .spawn(move || {
            let mut s = connect(addr).expect("connect");
            s.write_all(b"one").expect("write");
            let mut b = [0u8; 3];
            s.read_exact(&mut b).expect("echo");
            up_tx.send(()).expect("up");
            go_rx.recv_timeout(Duration::from_secs(20)).expect("go");
            s.write_all(b"two").expect("write");
            s.read_exact(&mut b).map(|()| b)
        })
        .expect("client");
    up_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("connection up");
    // Take the client socket out of GW_SOCKS behind the agent's back: its GW_PEERS
    // entry stays, so the backend socket's verdict finds a peer it cannot redirect to.
    let peers = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        &agent.pin_dir.join("GW_PEERS").display().to_string(),
    ]);
    let client_cookie = peers
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["formatted"]["value"]["direction"] == 0)
        .and_then(|e| e["formatted"]["key"].as_u64())
        .unwrap_or_else(|| panic!("client socket in GW_PEERS: {peers}"));
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "delete", "pinned"])
        .arg(agent.pin_dir.join("GW_SOCKS"))
        .arg("key");
    for byte in client_cookie.to_le_bytes() {
        cmd.arg(byte.to_string());
    }
    let out = cmd.output().expect("bpftool runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    go_tx.send(()).expect("go");
    let echoed = client
        .join()
        .expect("client thread")
        .expect("echo after the delete");
    assert_eq!(
        &echoed, b"two",
        "the bytes the verdict passed were forwarded"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = agent.log_text();
        if log.contains("redirect to socket") && log.contains(&client_cookie.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kernel debug record not in the agent log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
