//! Limits are never silent and never fatal: the agent runs with small maps
//! (`--max-listeners`, `--max-backends-per-listener`) and a configuration that does
//! not fit them. What fits is programmed and served, the rest is left out and said
//! (logs, `sockgate check`'s status), and the agent keeps serving, at start and when a
//! change crosses a limit at run time. A listener on a port outside `--listener-ports`
//! is not accepted, said and counted, and never served.
mod common;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, connect, exchange, metrics, require_root, sockgate_bin};
use netbed::{Bed, servers};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("sockgate-limits-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    Dir(d)
}

const CLASS: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: sockgate\nspec:\n  controllerName: sockgate.dev/gateway-controller\n";

/// A Gateway created at `created` with one TCP listener per port, each with a route to
/// Service `echo:80`.
fn gateway(name: &str, created: &str, ports: &[u16]) -> String {
    let mut s = format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  creationTimestamp: \"{created}\"\nspec:\n  gatewayClassName: sockgate\n  listeners:\n"
    );
    for p in ports {
        let _ = writeln!(s, "  - {{name: l{p}, protocol: TCP, port: {p}}}");
    }
    for p in ports {
        let _ = write!(
            s,
            "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: r{p}\nspec:\n  parentRefs:\n  - {{name: {name}, sectionName: l{p}}}\n  rules:\n  - backendRefs:\n    - {{name: echo, port: 80}}\n"
        );
    }
    s
}

/// Service `echo:80` with the given endpoints, port 3001.
fn service(addrs: &[String]) -> String {
    let mut s = "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: echo\nspec:\n  ports:\n  - port: 80\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  labels:\n    kubernetes.io/service-name: echo\naddressType: IPv4\nports:\n- port: 3001\nendpoints:\n".to_owned();
    for a in addrs {
        let _ = writeln!(s, "- addresses: [\"{a}\"]");
    }
    s
}

/// Writes `text` to `dir/name` through a rename, so the agent never reads half a file.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// One exchange through listener `port` from the client namespace: the echo server's
/// name, or the error.
fn ask(bed: &Bed, port: u16) -> Result<String, String> {
    let addr = SocketAddr::new(bed.node_addr().into(), port);
    bed.client()
        .run(move || {
            let mut s = connect(addr).map_err(|e| e.to_string())?;
            let reply = exchange(&mut s, "hello\n");
            reply
                .split_once(':')
                .map(|(name, _)| name.to_owned())
                .ok_or_else(|| format!("no reply ({reply:?})"))
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

/// Listener ports in the agent's maps (`sockgate status`).
fn programmed(agent: &Agent) -> Vec<u64> {
    let mut ports: Vec<u64> = agent.status()["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["port"].as_u64())
        .collect();
    ports.sort_unstable();
    ports
}

/// Backend entries of listener `port` in the agent's maps.
fn backend_count(agent: &Agent, port: u16) -> usize {
    agent.status()["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["port"] == port))
        .and_then(|l| l["backends"].as_array())
        .map_or(0, Vec::len)
}

/// `sockgate check -o json` of `dir` with extra flags.
fn check(dir: &Path, flags: &[&str]) -> serde_json::Value {
    let out = Command::new(sockgate_bin())
        .args(["check", "-o", "json", "-f"])
        .arg(dir)
        .args(flags)
        .output()
        .expect("check runs");
    assert!(
        out.status.success(),
        "check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("check JSON")
}

/// The condition `type_` of listener `listener` of Gateway `gateway` in a check report.
fn listener_condition(
    report: &serde_json::Value,
    gateway: &str,
    listener: &str,
    type_: &str,
) -> serde_json::Value {
    let gw = report["objects"]
        .as_array()
        .and_then(|os| {
            os.iter()
                .find(|o| o["kind"] == "Gateway" && o["metadata"]["name"] == gateway)
        })
        .unwrap_or_else(|| panic!("Gateway {gateway} in {report}"));
    gw["status"]["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == listener))
        .and_then(|l| l["conditions"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or_else(|| panic!("{gateway}/{listener} {type_} in {gw}"))
}

/// The condition `type_` of route `route` (its first parent) in a check report.
fn route_condition(report: &serde_json::Value, route: &str, type_: &str) -> serde_json::Value {
    report["objects"]
        .as_array()
        .and_then(|os| {
            os.iter()
                .find(|o| o["kind"] == "TCPRoute" && o["metadata"]["name"] == route)
        })
        .and_then(|r| r["status"]["parents"][0]["conditions"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or_else(|| panic!("{route} {type_} in {report}"))
}

#[test]
fn listeners_beyond_the_map_are_left_out_said_and_the_rest_served() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _echo =
        servers::Server::start(bed.backend(0), backend, servers::named_echo("echo")).expect("echo");
    let d = dir("listeners");
    let eps = [bed.backend_addr(0).to_string()];
    write(&d.0, "a.yaml", &(CLASS.to_owned() + &service(&eps)));
    // The older Gateway's two listeners come first, then the newer one's in order.
    write(
        &d.0,
        "gw-old.yaml",
        &gateway("old", "2025-01-01T00:00:00Z", &[9002, 9001]),
    );
    write(
        &d.0,
        "gw-new.yaml",
        &gateway("new", "2025-02-01T00:00:00Z", &[9000, 9003]),
    );
    let dir_arg = d.0.to_str().expect("utf-8");
    let flags = ["--max-listeners", "3"];
    let agent = Agent::start(
        &bed,
        &["--source", "files", "--dir", dir_arg, flags[0], flags[1]],
        &[9001, 9002, 9000],
    );
    for port in [9000, 9001, 9002] {
        assert_eq!(ask(&bed, port), Ok("echo".into()), "listener {port}");
    }
    assert!(ask(&bed, 9003).is_err(), "9003 is left out, never served");
    assert_eq!(programmed(&agent), [9000, 9001, 9002]);
    let log = agent.log_text();
    assert!(
        log.contains("capacity reached") && log.contains("port=9003"),
        "the left-out listener is logged:\n{log}"
    );
    assert_eq!(
        log.matches("capacity reached").count(),
        1,
        "said once:\n{log}"
    );
    // `sockgate check` with the same flag shows the same decision in status.
    let report = check(&d.0, &flags);
    let c = listener_condition(&report, "new", "l9003", "Programmed");
    assert_eq!(c["status"], "False", "{c}");
    assert_eq!(c["reason"], "Invalid", "{c}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-listeners")),
        "{c}"
    );
    let c = listener_condition(&report, "new", "l9000", "Programmed");
    assert_eq!(c["status"], "True", "{c}");

    // At run time: the old Gateway drops a listener, so 9003 fits and is served.
    write(
        &d.0,
        "gw-old.yaml",
        &gateway("old", "2025-01-01T00:00:00Z", &[9001]),
    );
    eventually("9003 served once there is room", &agent, || {
        ask(&bed, 9003) == Ok("echo".into())
    });
    assert!(agent.log_text().contains("no longer left out"));
    // A newer Gateway crosses the limit again: it is left out, the others keep serving.
    write(
        &d.0,
        "gw-newest.yaml",
        &gateway("newest", "2025-03-01T00:00:00Z", &[9004]),
    );
    eventually("9004 reported", &agent, || {
        agent.log_text().contains("port=9004")
    });
    for port in [9000, 9001, 9003] {
        assert_eq!(ask(&bed, port), Ok("echo".into()), "listener {port}");
    }
    assert!(ask(&bed, 9004).is_err(), "9004 is left out");
    assert_eq!(programmed(&agent), [9000, 9001, 9003]);
    assert!(
        agent.child.id() > 0 && !agent.log_text().contains("map write failed"),
        "no map write failed:\n{}",
        agent.log_text()
    );
}

#[test]
fn endpoints_beyond_the_per_listener_limit_are_left_out_and_said() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    // 20 endpoint addresses on the backend's link, one echo server on all of them.
    let eps: Vec<String> = (10..30).map(|i| format!("10.200.1.{i}")).collect();
    for a in &eps {
        bed.backend(0)
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .expect("address");
    }
    let _echo = servers::Server::start(
        bed.backend(0),
        "0.0.0.0:3001".parse().expect("addr"),
        servers::named_echo("echo"),
    )
    .expect("echo");
    let d = dir("endpoints");
    write(&d.0, "a.yaml", &(CLASS.to_owned() + &service(&eps)));
    write(
        &d.0,
        "gw.yaml",
        &gateway("gw", "2025-01-01T00:00:00Z", &[9101]),
    );
    let dir_arg = d.0.to_str().expect("utf-8");
    let flags = ["--max-backends-per-listener", "16"];
    let agent = Agent::start(
        &bed,
        &["--source", "files", "--dir", dir_arg, flags[0], flags[1]],
        &[9101],
    );
    assert_eq!(ask(&bed, 9101), Ok("echo".into()));
    assert_eq!(backend_count(&agent, 9101), 16, "{}", agent.status());
    let log = agent.log_text();
    assert!(
        log.contains("capacity reached") && log.contains("limit=backends_per_listener"),
        "{log}"
    );
    let report = check(&d.0, &flags);
    let c = route_condition(&report, "r9101", "ResolvedRefs");
    assert_eq!(c["status"], "False", "{c}");
    assert_eq!(c["reason"], "TooManyEndpoints", "{c}");
    let msg = c["message"].as_str().expect("message");
    assert!(
        msg.contains("20 ready endpoints, 16 programmed; 4 left out")
            && msg.contains("10.200.1.29:3001"),
        "{msg}"
    );
    assert_eq!(
        report["notProgrammed"][0]["count"], 4,
        "{}",
        report["notProgrammed"]
    );

    // At run time: the Service shrinks below the limit, then grows past it again.
    write(&d.0, "a.yaml", &(CLASS.to_owned() + &service(&eps[..10])));
    eventually("10 endpoints programmed", &agent, || {
        backend_count(&agent, 9101) == 10
    });
    assert!(agent.log_text().contains("no longer left out"));
    assert!(route_condition(&check(&d.0, &flags), "r9101", "ResolvedRefs")["status"] == "True");
    write(&d.0, "a.yaml", &(CLASS.to_owned() + &service(&eps)));
    eventually("back to 16 endpoints", &agent, || {
        backend_count(&agent, 9101) == 16
    });
    assert_eq!(agent.log_text().matches("capacity reached").count(), 2);
    for _ in 0..5 {
        assert_eq!(ask(&bed, 9101), Ok("echo".into()));
    }
}

#[test]
fn listeners_outside_the_allowed_ports_are_not_accepted_said_and_not_served() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let backend = SocketAddr::new(bed.backend_addr(0).into(), 3001);
    let _echo =
        servers::Server::start(bed.backend(0), backend, servers::named_echo("echo")).expect("echo");
    let d = dir("ports");
    let eps = [bed.backend_addr(0).to_string()];
    write(&d.0, "a.yaml", &(CLASS.to_owned() + &service(&eps)));
    write(
        &d.0,
        "gw.yaml",
        &gateway("gw", "2025-01-01T00:00:00Z", &[9201, 9301]),
    );
    let dir_arg = d.0.to_str().expect("utf-8");
    let flags = ["--listener-ports", "9200-9299"];
    let agent = Agent::start(
        &bed,
        &["--source", "files", "--dir", dir_arg, flags[0], flags[1]],
        &[9201],
    );
    assert_eq!(ask(&bed, 9201), Ok("echo".into()));
    assert!(
        ask(&bed, 9301).is_err(),
        "9301 is outside the range, never served"
    );
    assert_eq!(programmed(&agent), [9201]);
    let log = agent.log_text();
    assert!(
        log.contains("listener not accepted: port 9301 is outside the listener ports this node allows (9200-9299; --listener-ports)")
            && log.contains("listener=default/gw/l9301")
            && log.contains("limit=listener_ports"),
        "the refused listener is logged:\n{log}"
    );
    assert!(
        log.contains("listeners allowed on these ports only (--listener-ports) ports=9200-9299"),
        "{log}"
    );
    let text = metrics(&bed);
    assert!(
        text.contains("sockgate_listeners_not_programmed{limit=\"listener_ports\"} 1\n"),
        "{text}"
    );
    // `sockgate check` with the same flag: the listener is not accepted, and why.
    let report = check(&d.0, &flags);
    let c = listener_condition(&report, "gw", "l9301", "Accepted");
    assert_eq!(c["status"], "False", "{c}");
    assert_eq!(c["reason"], "PortUnavailable", "{c}");
    let c = route_condition(&report, "r9301", "Accepted");
    assert_eq!(c["reason"], "NotAllowedByListeners", "{c}");

    // At run time the listener moves into the range: served, and said.
    write(
        &d.0,
        "gw.yaml",
        &gateway("gw", "2025-01-01T00:00:00Z", &[9201, 9202]),
    );
    eventually("9202 served", &agent, || {
        ask(&bed, 9202) == Ok("echo".into())
    });
    assert!(agent.log_text().contains("no longer left out"));
    assert_eq!(programmed(&agent), [9201, 9202]);
    let text = metrics(&bed);
    assert!(
        text.contains("sockgate_listeners_not_programmed{limit=\"listener_ports\"} 0\n"),
        "{text}"
    );
}
