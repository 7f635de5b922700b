//! The XDP listener guard end to end: `gw_xdp` attached to the node's interface towards
//! the client namespace (generic mode, as `--xdp-mode auto` picks on veth, and native),
//! policy from the `--xdp-*` flags, real IPv4 and IPv6 connections, a bounded
//! raw-socket SYN flood from the test's own namespace, and the attachment following
//! the interface when it is deleted and created again.
mod common;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use common::{Agent, exchange, require_root};
use netbed::{Bed, servers};
use socket2::{Domain, Socket, Type};

const PORT: u16 = 8088;
/// SYNs the flooding source sends.
const FLOOD: u16 = 400;
/// Connections the well-behaved client makes while the flooder's bucket is empty.
const CONNECTS: u64 = 5;
/// A second client address, denied by the policy.
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
/// A third client address, the flooding source.
const FLOODER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 4);

/// Adds the extra client addresses to the client namespace's interface.
fn add_client_addrs(bed: &Bed) {
    for a in [DENIED, FLOODER] {
        bed.client()
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .expect("add address");
    }
}

/// Connects from source address `src` (in the calling thread's namespace).
fn connect_from(
    src: impl Into<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let src = SocketAddr::new(src.into(), 0);
    let s = Socket::new(Domain::for_address(src), Type::STREAM, None)?;
    s.bind(&src.into())?;
    s.connect_timeout(&dst.into(), timeout)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn start(bed: &Bed, extra: &[&str]) -> (Agent, servers::Server) {
    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let server = servers::Server::start(bed.backend(0), backend, servers::echo()).expect("echo");
    let route = format!("{PORT}={backend}");
    let mut args = vec!["--route", route.as_str(), "--xdp-iface", "c0"];
    args.extend_from_slice(extra);
    let agent = Agent::start(bed, &args, &[PORT]);
    (agent, server)
}

/// The guard's counters of the listener, from `sockgate status --json`.
fn xdp_counts(agent: &Agent) -> serde_json::Value {
    std::thread::sleep(Duration::from_millis(250));
    let s = agent.status();
    s["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["port"] == PORT))
        .map_or_else(
            || panic!("listener {PORT} not in status: {s}"),
            |l| l["xdp"].clone(),
        )
}

fn count(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

#[test]
fn denied_client_times_out_allowed_client_connects() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    add_client_addrs(&bed);
    let deny = format!("{PORT}={DENIED}/32");
    let (agent, _server) = start(&bed, &["--xdp-deny", &deny]);
    assert!(
        agent.log_text().contains("XDP listener guard attached"),
        "attach logged: {}",
        agent.log_text()
    );
    let x = assert_guarded_v4(&bed, &agent);
    // The denied connect sends a SYN and (after 1 s) one retransmission.
    let denied_syns = count(&x, "dropped_denied");
    assert!((1..=2).contains(&denied_syns), "{x}");
    assert_eq!(count(&x, "dropped_not_allowed"), 0, "{x}");
    assert_eq!(count(&x, "dropped_rate_limited"), 0, "{x}");
    assert!(count(&x, "packets") >= 1 + denied_syns + 3, "{x}");
    // The same counters on the metrics endpoint (the agent's default address, in the
    // node namespace).
    let metrics = common::metrics(&bed);
    for line in [
        format!(
            "sockgate_xdp_dropped_total{{listener=\"{PORT}\",reason=\"denied\"}} {denied_syns}"
        ),
        format!("sockgate_xdp_syn_admitted_total{{listener=\"{PORT}\"}} 1"),
    ] {
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    let s = agent.stats(PORT);
    assert_eq!(
        s["accepted"], 1,
        "only the allowed client reached the agent: {s}"
    );
}

#[test]
fn syn_flood_held_to_rate_while_others_connect() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    add_client_addrs(&bed);
    // 10 SYN/s with a burst of 10 per source address.
    let rate = format!("{PORT}=10/10/32/128");
    let (agent, _server) = start(&bed, &["--xdp-syn-rate", &rate]);
    let node = bed.node_addr();
    let dst = SocketAddr::new(node.into(), PORT);
    let client = bed.client_addr();
    let (sent, elapsed, replies) = bed
        .client()
        .run(move || {
            let f = netbed::raw::syn_flood(
                FLOODER,
                node,
                PORT,
                u64::from(FLOOD),
                Duration::from_secs(5),
            )
            .expect("raw socket");
            let (sent, elapsed) = (f.sent, f.elapsed);
            // The flooder's bucket is empty; another source still connects.
            let mut replies = Vec::new();
            for i in 0..CONNECTS {
                let mut s = connect_from(client, dst, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect {i} while flooded: {e}"));
                replies.push(exchange(&mut s, "ping\n"));
            }
            (sent, elapsed, replies)
        })
        .expect("client ns");
    assert_eq!(sent, u64::from(FLOOD), "every SYN was sent");
    assert!(replies.iter().all(|r| r == "ping\n"), "{replies:?}");
    let x = xdp_counts(&agent);
    eprintln!("flood: {sent} SYNs in {elapsed:?}; guard counters {x}");
    let admitted = count(&x, "syn_admitted");
    let limited = count(&x, "dropped_rate_limited");
    let flood_admitted = admitted - CONNECTS;
    // Every SYN sent is accounted for: admitted or rate limited, nothing else.
    assert_eq!(flood_admitted + limited, sent, "{x}");
    assert_eq!(
        count(&x, "dropped_denied") + count(&x, "dropped_not_allowed"),
        0
    );
    // Burst 10, then 10/s for the time the flood took (plus one for rounding).
    let bound = 10 + elapsed.as_millis().div_ceil(100) as u64 + 1;
    assert!(
        (10..=bound).contains(&flood_admitted),
        "flood admitted {flood_admitted}, bound {bound} ({elapsed:?}): {x}"
    );
    assert!(count(&x, "packets") >= sent + CONNECTS, "{x}");
}

/// The XDP program ids attached to the node's `c0`, from `ip -j link`.
fn attached(bed: &Bed) -> Vec<u64> {
    let out = bed
        .node()
        .ip(&["-j", "-d", "link", "show", "c0"])
        .expect("ip link");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j JSON");
    let xdp = &v[0]["xdp"];
    let mut ids: Vec<u64> = xdp["attached"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["prog"]["id"].as_u64()).collect())
        .unwrap_or_default();
    if let Some(id) = xdp["prog"]["id"].as_u64() {
        ids.push(id);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[test]
fn detached_on_stop_and_after_a_crash_reattached_once() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    assert!(
        attached(&bed).is_empty(),
        "nothing attached before the agent"
    );
    let pins = common::pin_dir();
    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let route = format!("{PORT}={backend}");
    let args = [
        "--route",
        route.as_str(),
        "--xdp-iface",
        "c0",
        "--keep-pins",
    ];
    let mut agent = Agent::start_with_pin_dir(&bed, pins.clone(), &args, &[PORT]);
    let first = attached(&bed);
    assert_eq!(first.len(), 1, "one program on c0: {first:?}");
    // A crash (SIGKILL): the kernel drops the link with the last descriptor.
    agent.stop_hard();
    assert!(attached(&bed).is_empty(), "no stale program after a crash");
    // A restart reusing the pins attaches exactly one program again.
    let mut agent = Agent::start_with_pin_dir(&bed, pins.clone(), &args, &[PORT]);
    let again = attached(&bed);
    assert_eq!(again.len(), 1, "one program after the restart: {again:?}");
    assert!(agent.stop().success(), "clean stop");
    assert!(attached(&bed).is_empty(), "detached on shutdown");
    let _ = std::fs::remove_dir_all(&pins);
}

/// Removes a directory on drop.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const POLICY: &str = "apiVersion: sockgate.dev/v1alpha1
kind: ListenerPolicy
metadata:
  name: deny-one-client
spec:
  targetRefs:
  - group: gateway.networking.k8s.io
    kind: Gateway
    name: tcp-gateway
    sectionName: foo
  deny:
  - 10.200.0.3/32
";

/// One exchange from `src` to listener `port` of the node: the reply, or the error kind.
fn ask_from(bed: &Bed, src: Ipv4Addr, port: u16) -> Result<String, io::ErrorKind> {
    let dst = SocketAddr::new(bed.node_addr().into(), port);
    bed.client()
        .run(move || {
            let mut s =
                connect_from(src, dst, Duration::from_millis(1500)).map_err(|e| e.kind())?;
            Ok(exchange(&mut s, "hi\n"))
        })
        .expect("client ns")
}

#[test]
fn listener_policy_from_manifests_guards_one_listener() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    add_client_addrs(&bed);
    let _foo = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let _bar = servers::Server::start(
        bed.backend(1),
        SocketAddr::new(bed.backend_addr(1).into(), 3002),
        servers::named_echo("bar"),
    )
    .expect("bar");
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/envoy-gateway");
    let dir = Dir(std::env::temp_dir().join(format!("sockgate-xdp-e2e-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("dir");
    for f in ["gatewayclass.yaml", "tcp-routing.yaml", "backends.yaml"] {
        std::fs::copy(src.join(f), dir.0.join(f)).expect("copy");
    }
    std::fs::write(dir.0.join("policy.yaml"), POLICY).expect("policy");
    let d = dir.0.to_str().expect("utf-8").to_owned();
    let agent = Agent::start(
        &bed,
        &["--source", "files", "--dir", &d, "--xdp-iface", "c0"],
        &[8088, 8089],
    );
    let client = bed.client_addr();
    assert!(ask_from(&bed, client, 8088).is_ok_and(|r| r.starts_with("foo")));
    assert_eq!(
        ask_from(&bed, DENIED, 8088),
        Err(io::ErrorKind::TimedOut),
        "denied on listener foo"
    );
    assert!(
        ask_from(&bed, DENIED, 8089).is_ok_and(|r| r.starts_with("bar")),
        "the policy targets listener foo only"
    );
    let x = xdp_counts(&agent);
    assert!(count(&x, "dropped_denied") >= 1, "{x}");
    // The policy removed: the client connects to foo too.
    std::fs::remove_file(dir.0.join("policy.yaml")).expect("remove");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if ask_from(&bed, DENIED, 8088).is_ok_and(|r| r.starts_with("foo")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy removal applied: {}",
            agent.log_text()
        );
    }
}

/// `ip`'s number for an attachment in the driver (`XDP_ATTACHED_DRV`).
const XDP_DRIVER: u64 = 1;
/// `ip`'s number for a generic attachment (`XDP_ATTACHED_SKB`).
const XDP_GENERIC: u64 = 2;

/// The XDP attachment of the node's `iface`, from `ip -j -d link`: its index, the
/// program ids and the attach mode (0 when none). `None` when the interface does not
/// exist.
fn xdp_of(bed: &Bed, iface: &str) -> Option<(u64, Vec<u64>, u64)> {
    let out = bed
        .node()
        .ip(&["-j", "-d", "link", "show", "dev", iface])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j JSON");
    let link = &v[0];
    let index = link["ifindex"].as_u64().expect("ifindex");
    let xdp = &link["xdp"];
    let mut ids: Vec<u64> = xdp["attached"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["prog"]["id"].as_u64()).collect())
        .unwrap_or_default();
    if let Some(id) = xdp["prog"]["id"].as_u64() {
        ids.push(id);
    }
    ids.sort_unstable();
    ids.dedup();
    Some((index, ids, xdp["mode"].as_u64().unwrap_or(0)))
}

/// Waits (at most `limit`) until `ok` holds.
fn wait_until(limit: Duration, what: &str, agent: &Agent, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} within {limit:?}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines of the agent's log that say `gw_xdp` was attached to `iface`.
fn attach_lines(agent: &Agent, iface: &str) -> Vec<String> {
    agent
        .log_text()
        .lines()
        .filter(|l| {
            l.contains("XDP listener guard attached") && l.contains(&format!("iface={iface}"))
        })
        .map(str::to_owned)
        .collect()
}

/// From the client namespace: one exchange from `client` must be proxied while a
/// connect from `denied` times out (dropped at the NIC: no RST). Checks the guard's
/// counters saw one admitted SYN and at least one denied, and returns them.
fn assert_guarded(
    bed: &Bed,
    agent: &Agent,
    client: IpAddr,
    denied: IpAddr,
    node: IpAddr,
) -> serde_json::Value {
    let dst = SocketAddr::new(node, PORT);
    let (reply, denied) = bed
        .client()
        .run(move || {
            let mut s = connect_from(client, dst, Duration::from_secs(5)).expect("allowed");
            let reply = exchange(&mut s, "hello\n");
            let started = Instant::now();
            let denied = connect_from(denied, dst, Duration::from_millis(1500));
            (
                reply,
                denied
                    .map(|_| ())
                    .map_err(|e| (e.kind(), started.elapsed())),
            )
        })
        .expect("client ns");
    assert_eq!(reply, "hello\n", "the allowed client is proxied");
    let (kind, waited) = denied.expect_err("the denied client must not connect");
    assert_eq!(kind, io::ErrorKind::TimedOut, "dropped at the NIC: no RST");
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    let x = xdp_counts(agent);
    assert_eq!(count(&x, "syn_admitted"), 1, "{x}");
    assert!(count(&x, "dropped_denied") >= 1, "{x}");
    x
}

/// [`assert_guarded`] with the bed's IPv4 client and node and [`DENIED`].
fn assert_guarded_v4(bed: &Bed, agent: &Agent) -> serde_json::Value {
    assert_guarded(
        bed,
        agent,
        bed.client_addr().into(),
        DENIED.into(),
        bed.node_addr().into(),
    )
}

#[test]
fn native_mode_on_veth_attaches_in_the_driver_and_drops_denied_syns() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    add_client_addrs(&bed);
    let deny = format!("{PORT}={DENIED}/32");
    let (agent, _server) = start(&bed, &["--xdp-mode", "native", "--xdp-deny", &deny]);
    let (_, ids, mode) = xdp_of(&bed, "c0").expect("c0");
    assert_eq!(ids.len(), 1, "one program on c0: {ids:?}");
    assert_eq!(mode, XDP_DRIVER, "in the driver");
    // The same seen by bpftool (in the node namespace) and in ip's own words.
    let out = bed
        .node()
        .output("bpftool", &["-j", "net", "show", "dev", "c0"])
        .expect("bpftool");
    let net: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    assert_eq!(net[0]["xdp"][0]["mode"], "driver", "{net}");
    assert_eq!(net[0]["xdp"][0]["id"].as_u64(), Some(ids[0]), "{net}");
    let text = bed.node().ip(&["link", "show", "dev", "c0"]).expect("ip");
    // `ip` writes "xdp" for a driver attachment, "xdpgeneric" for a generic one.
    assert!(text.contains(" xdp "), "{text}");
    assert!(!text.contains("xdpgeneric"), "{text}");
    let lines = attach_lines(&agent, "c0");
    assert!(
        lines.len() == 1 && lines[0].contains("mode=native"),
        "{lines:?}"
    );
    assert_guarded_v4(&bed, &agent);
}

/// Runs `sockgate run ARGS` in the node namespace, expecting it to exit by itself
/// within 20 s; returns whether it succeeded and what it printed on stderr.
fn run_to_exit(bed: &Bed, args: &[&str]) -> (bool, String) {
    let pins = common::pin_dir();
    let mut child = bed
        .node()
        .command(common::sockgate_bin())
        .arg("run")
        .arg("--pin-dir")
        .arg(&pins)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sockgate starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sockgate {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = io::Read::read_to_string(&mut e, &mut err);
    }
    let _ = std::fs::remove_dir_all(&pins);
    (status.success(), err)
}

#[test]
fn native_refused_is_an_error_naming_the_interface_and_auto_falls_back_to_generic() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    // A bridge has no native XDP.
    bed.node()
        .ip(&["link", "add", "br9", "type", "bridge"])
        .expect("bridge");
    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let route = format!("{PORT}={backend}");
    let (ok, err) = run_to_exit(
        &bed,
        &[
            "--route",
            &route,
            "--xdp-iface",
            "br9",
            "--xdp-mode",
            "native",
        ],
    );
    assert!(!ok, "native on a driver without XDP fails: {err}");
    assert!(
        err.contains("br9") && err.contains("refuses native XDP"),
        "the error names the interface: {err}"
    );
    assert_eq!(xdp_of(&bed, "br9").map(|x| x.1), Some(vec![]));
    let agent = Agent::start(&bed, &["--route", &route, "--xdp-iface", "br9"], &[PORT]);
    let (_, ids, mode) = xdp_of(&bed, "br9").expect("br9");
    assert_eq!((ids.len(), mode), (1, XDP_GENERIC), "auto fell back");
    let log = agent.log_text();
    assert!(log.contains("falling back"), "{log}");
    let lines = attach_lines(&agent, "br9");
    assert!(
        lines.len() == 1 && lines[0].contains("mode=generic"),
        "{lines:?}"
    );
}

#[test]
fn auto_is_generic_on_veth_and_follows_the_interface_when_it_is_recreated() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    add_client_addrs(&bed);
    let deny = format!("{PORT}={DENIED}/32");
    let (agent, _server) = start(&bed, &["--xdp-deny", &deny]);
    let (index, ids, mode) = xdp_of(&bed, "c0").expect("c0");
    assert_eq!(ids.len(), 1, "one program on c0: {ids:?}");
    assert_eq!(mode, XDP_GENERIC, "auto takes generic on veth");
    let lines = attach_lines(&agent, "c0");
    assert!(
        lines.len() == 1 && lines[0].contains("mode=generic") && lines[0].contains("veth"),
        "the choice and its reason are logged: {lines:?}"
    );
    // The interface goes away (with its peer and the attachment) while the agent runs.
    bed.node().ip(&["link", "del", "c0"]).expect("del c0");
    wait_until(
        Duration::from_secs(10),
        "attachment forgotten",
        &agent,
        || agent.log_text().contains("XDP guard attachment forgotten"),
    );
    assert!(xdp_of(&bed, "c0").is_none());
    // The same name again, with a new index: attached again, exactly once.
    bed.relink_client().expect("relink");
    add_client_addrs(&bed);
    wait_until(Duration::from_secs(10), "reattached", &agent, || {
        xdp_of(&bed, "c0").is_some_and(|(i, ids, _)| i != index && !ids.is_empty())
    });
    // Give a duplicate attach (a second event, the periodic resync) a chance to show.
    std::thread::sleep(Duration::from_millis(500));
    let (new_index, again, mode) = xdp_of(&bed, "c0").expect("c0");
    assert_ne!(new_index, index, "a new interface");
    assert_eq!(again, ids, "the same program, once");
    assert_eq!(mode, XDP_GENERIC);
    for l in agent.log_text().lines().filter(|l| l.contains("XDP")) {
        eprintln!("agent: {l}");
    }
    assert_eq!(attach_lines(&agent, "c0").len(), 2, "{}", agent.log_text());
    // The guard works on the new interface.
    assert_guarded_v4(&bed, &agent);
}

/// A second client address beside the bed's `fd00:200::2`.
const DENIED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 3);

#[test]
fn ipv6_denied_client_times_out_allowed_client_connects() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    bed.client()
        .ip(&[
            "addr",
            "add",
            &format!("{DENIED6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .expect("client address");
    // Denied by a /128 among allowed /64 neighbours; an IPv4 range beside it.
    let deny = format!("{PORT}={DENIED6}/128,10.66.0.0/16");
    let (agent, _server) = start(&bed, &["--xdp-deny", &deny]);
    let x = assert_guarded(
        &bed,
        &agent,
        bed.client_addr6().into(),
        DENIED6.into(),
        bed.node_addr6().into(),
    );
    assert!((1..=2).contains(&count(&x, "dropped_denied")), "{x}");
    let s = agent.stats(PORT);
    assert_eq!(
        s["accepted"], 1,
        "only the allowed client reached the agent: {s}"
    );
}

#[test]
fn no_guard_without_xdp_iface_outside_a_cluster_or_with_none() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let route = format!("{PORT}={backend}");
    for extra in [&[][..], &["--xdp-iface", "none"][..]] {
        let mut args = vec!["--route", route.as_str()];
        args.extend_from_slice(extra);
        let mut agent = Agent::start(&bed, &args, &[PORT]);
        let log = agent.log_text();
        assert!(log.contains("XDP listener guard not attached"), "{log}");
        assert_eq!(xdp_of(&bed, "c0").map(|x| x.1), Some(vec![]), "{extra:?}");
        assert!(agent.stop().success());
    }
    let (ok, err) = run_to_exit(
        &bed,
        &[
            "--route",
            &route,
            "--xdp-iface",
            "none",
            "--xdp-iface",
            "c0",
        ],
    );
    assert!(!ok && err.contains("--xdp-iface none"), "{err}");
}

#[test]
fn in_a_cluster_the_default_is_the_node_addresses_interfaces() {
    require_root();
    let bed = Bed::new(0).expect("bed");
    let (dir, kubeconfig) = common::unreachable_kubeconfig("xdp");
    let mut agent = Agent::start_with_env(
        &bed,
        &["--source", "kube", "--node-name", "node-1"],
        &[],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    // Without --xdp-iface the guard follows the Node's addresses; with no API server
    // they are unknown, so nothing is attached yet (the selection itself is
    // unit-tested, and the addresses' publication against a scripted API server).
    wait_until(Duration::from_secs(10), "selection logged", &agent, || {
        agent.log_text().contains("XDP guard interfaces")
    });
    let log = agent.log_text();
    assert!(
        log.contains("the Node's addresses are not known yet"),
        "{log}"
    );
    assert!(!log.contains("XDP listener guard attached"), "{log}");
    assert_eq!(xdp_of(&bed, "c0").map(|x| x.1), Some(vec![]));
    // The agent is past start-up (its SIGTERM handler in place) once the kube source
    // retries.
    wait_until(
        Duration::from_secs(20),
        "kube source retrying",
        &agent,
        || {
            agent
                .log_text()
                .matches("API discovery failed; retrying")
                .count()
                >= 2
        },
    );
    assert!(agent.stop().success(), "clean stop");
    let _ = std::fs::remove_dir_all(&dir);
}
