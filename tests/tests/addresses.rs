//! Gateway `spec.addresses` end to end (`sockgate run --source files`): a Gateway is
//! served on those of its addresses the node holds, and on no other address of the
//! node; one whose address is on no interface of the node is not served until the
//! address is added to an interface while the agent runs, and stops being served when
//! it is removed (an address moving between nodes, seen from one node). With the
//! forward path on, such a listener's connections take the socket path (bound to the
//! address), never the forward program. A Gateway that loses its `spec.addresses` is
//! bound again on every address.
mod common;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, connect, exchange, require_root, sockgate_bin};
use netbed::{Bed, servers};

/// An address of the client link's subnet that the node does not hold at first.
const MOVING: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 77);

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Gateway `pinned` on the node's IPv6 address (port 7100), Gateway `moving` on
/// [`MOVING`] (port 7101), Gateway `everywhere` without addresses (port 7102), each
/// with a route to Service echo (backend 0, port 3001).
fn manifests(bed: &Bed, tag: &str) -> Dir {
    let dir = std::env::temp_dir().join(format!("sockgate-addr-e2e-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let gateway = |name: &str, port: u16, addresses: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\nspec:\n  gatewayClassName: sockgate\n{addresses}  listeners:\n  - name: tcp\n    protocol: TCP\n    port: {port}\n---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: to-{name}\nspec:\n  parentRefs:\n  - name: {name}\n  rules:\n  - backendRefs:\n    - name: echo\n      port: 3001\n"
        )
    };
    let text = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: sockgate\nspec:\n  controllerName: sockgate.dev/gateway-controller\n{}{}{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: echo\nspec:\n  ports:\n  - port: 3001\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  labels:\n    kubernetes.io/service-name: echo\naddressType: IPv4\nports:\n- port: 3001\nendpoints:\n- addresses: [\"{}\"]\n",
        gateway(
            "pinned",
            7100,
            &format!(
                "  addresses:\n  - type: IPAddress\n    value: \"{}\"\n",
                bed.node_addr6()
            ),
        ),
        gateway(
            "moving",
            7101,
            &format!("  addresses:\n  - value: \"{MOVING}\"\n"),
        ),
        gateway("everywhere", 7102, ""),
        bed.backend_addr(0),
    );
    std::fs::write(dir.join("gateways.yaml"), text).expect("write");
    Dir(dir)
}

/// One exchange from the client namespace to `addr`: the echo server's name, or the
/// error kind.
fn ask(bed: &Bed, addr: SocketAddr) -> Result<String, io::ErrorKind> {
    bed.client()
        .run(move || {
            let mut s = connect(addr).map_err(|e| e.kind())?;
            let reply = exchange(&mut s, "hello\n");
            reply
                .split_once(':')
                .map(|(name, _)| name.to_owned())
                .ok_or(io::ErrorKind::UnexpectedEof)
        })
        .expect("client namespace")
}

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, agent: &Agent, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} within 15 s:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `sockgate check` of `dir` for a node holding `node`: the Gateway `name`'s status.
fn checked_gateway(dir: &Dir, node: &[IpAddr], name: &str) -> serde_json::Value {
    let mut cmd = Command::new(sockgate_bin());
    cmd.args(["check", "-o", "json", "-f"]).arg(&dir.0);
    for a in node {
        cmd.args(["--node-address", &a.to_string()]);
    }
    let out = cmd.output().expect("sockgate check runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    report["objects"]
        .as_array()
        .and_then(|o| {
            o.iter()
                .find(|o| o["kind"] == "Gateway" && o["metadata"]["name"] == name)
        })
        .map(|o| o["status"].clone())
        .expect("the Gateway in the report")
}

/// The condition `type_` of a Gateway status: (status, reason).
fn condition(status: &serde_json::Value, type_: &str) -> (String, String) {
    let c = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} in {status}"));
    (
        c["status"].as_str().unwrap_or_default().to_owned(),
        c["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Whether the node listens on `port` (any address).
fn listening(bed: &Bed, port: u16) -> bool {
    let out = bed.node().output("ss", &["-Hltn"]).expect("ss runs");
    String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} "))
}

#[test]
fn served_on_the_gateways_address_only_and_follows_the_address_on_the_node() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("echo"),
    )
    .expect("echo");
    let dir = manifests(&bed, "files");
    let agent = Agent::start(
        &bed,
        &["--source", "files", "--dir", dir.0.to_str().expect("utf-8")],
        &[7100, 7102],
    );
    let v4 = IpAddr::from(bed.node_addr());
    let v6 = IpAddr::from(bed.node_addr6());
    let moving = IpAddr::from(MOVING);

    // pinned: on the node's IPv6 address, not on its IPv4 address.
    assert_eq!(ask(&bed, SocketAddr::new(v6, 7100)), Ok("echo".into()));
    assert_eq!(
        ask(&bed, SocketAddr::new(v4, 7100)),
        Err(io::ErrorKind::ConnectionRefused),
        "another address of the node"
    );
    // everywhere: both, as without spec.addresses always.
    assert_eq!(ask(&bed, SocketAddr::new(v4, 7102)), Ok("echo".into()));
    assert_eq!(ask(&bed, SocketAddr::new(v6, 7102)), Ok("echo".into()));
    // moving: its address is on no interface of the node: not served.
    assert!(!listening(&bed, 7101), "moving is not served");
    let st = checked_gateway(&dir, &[v4, v6], "moving");
    assert_eq!(
        condition(&st, "Programmed"),
        ("False".into(), "AddressNotAssigned".into()),
        "{st}"
    );
    assert_eq!(condition(&st, "Accepted").0, "True", "{st}");
    let st = checked_gateway(&dir, &[v4, v6], "pinned");
    assert_eq!(
        condition(&st, "Programmed"),
        ("True".into(), "Programmed".into())
    );
    assert_eq!(st["addresses"][0]["value"], v6.to_string(), "{st}");

    // The address comes to the node (moved from another node): served on it, and on
    // it only.
    bed.node()
        .ip(&["addr", "add", &format!("{MOVING}/24"), "dev", "c0"])
        .expect("add the address");
    eventually("moving served on its address", &agent, || {
        ask(&bed, SocketAddr::new(moving, 7101)) == Ok("echo".into())
    });
    assert_eq!(
        ask(&bed, SocketAddr::new(v4, 7101)),
        Err(io::ErrorKind::ConnectionRefused)
    );
    assert!(
        agent.log_text().contains("node addresses changed"),
        "{}",
        agent.log_text()
    );
    let st = checked_gateway(&dir, &[v4, v6, moving], "moving");
    assert_eq!(
        condition(&st, "Programmed"),
        ("True".into(), "Programmed".into())
    );
    assert_eq!(st["addresses"][0]["value"], MOVING.to_string(), "{st}");

    // The address leaves the node: moving is no longer served; the others are.
    bed.node()
        .ip(&["addr", "del", &format!("{MOVING}/24"), "dev", "c0"])
        .expect("remove the address");
    eventually("moving no longer served", &agent, || !listening(&bed, 7101));
    assert_eq!(ask(&bed, SocketAddr::new(v6, 7100)), Ok("echo".into()));
    assert_eq!(ask(&bed, SocketAddr::new(v4, 7102)), Ok("echo".into()));

    // pinned loses its spec.addresses: its port is bound again, on every address.
    let file = dir.0.join("gateways.yaml");
    let text = std::fs::read_to_string(&file).expect("read");
    let pinned = format!("  addresses:\n  - type: IPAddress\n    value: \"{v6}\"\n");
    assert!(text.contains(&pinned));
    std::fs::write(&file, text.replacen(&pinned, "", 1)).expect("write");
    eventually("pinned served on every address", &agent, || {
        ask(&bed, SocketAddr::new(v4, 7100)) == Ok("echo".into())
    });
    assert_eq!(ask(&bed, SocketAddr::new(v6, 7100)), Ok("echo".into()));
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn forward_path_takes_an_addressed_listener_on_its_addresses_only() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _echo = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("echo"),
    )
    .expect("echo");
    let dir = manifests(&bed, "forward");
    let agent = Agent::start(
        &bed,
        &[
            "--source",
            "files",
            "--dir",
            dir.0.to_str().expect("utf-8"),
            "--datapath",
            "forward",
            "--forward-iface",
            "c0",
            "--forward-iface",
            "b0",
        ],
        &[7100, 7102],
    );
    let v4 = IpAddr::from(bed.node_addr());
    let v6 = IpAddr::from(bed.node_addr6());
    assert_eq!(ask(&bed, SocketAddr::new(v6, 7100)), Ok("echo".into()));
    assert_eq!(
        ask(&bed, SocketAddr::new(v4, 7100)),
        Err(io::ErrorKind::ConnectionRefused)
    );
    assert_eq!(ask(&bed, SocketAddr::new(v4, 7102)), Ok("echo".into()));
    // 7101 is served on MOVING only: once the node holds it, the SYN to it is
    // forwarded, and the one to the node's other IPv4 address goes to the stack, where
    // no socket is bound for it.
    bed.node()
        .ip(&["addr", "add", &format!("{MOVING}/24"), "dev", "c0"])
        .expect("address added");
    let moving = IpAddr::from(MOVING);
    eventually("7101 served on the moving address", &agent, || {
        ask(&bed, SocketAddr::new(moving, 7101)) == Ok("echo".into())
    });
    assert_eq!(
        ask(&bed, SocketAddr::new(v4, 7101)),
        Err(io::ErrorKind::ConnectionRefused)
    );
    let status = agent.status();
    let fwd = |port: u16, what: &str| {
        status["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["port"] == port))
            .map_or_else(
                || panic!("listener {port} in {status}"),
                |l| l["forward"][what].clone(),
            )
    };
    assert_eq!(
        fwd(7101, "connections"),
        1,
        "the addressed listener is forwarded on its address: {status}"
    );
    assert_eq!(
        fwd(7102, "connections"),
        1,
        "the other one is forwarded: {status}"
    );
    // 7100's address is IPv6 and its backend IPv4: the program took the SYN as the
    // listener's (it is on the listener's address) but has no route across families,
    // so the listener socket carried it.
    assert_eq!(
        (fwd(7100, "connections"), fwd(7100, "no_route")),
        (0.into(), 1.into()),
        "{status}"
    );
}
