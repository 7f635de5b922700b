//! The upstream Gateway API conformance cases that concern `TCPRoute` (and the `Gateway` and
//! `GatewayClass` cases that apply without HTTP support), rebuilt for sockgate: the same
//! objects (`{GATEWAY_CLASS_NAME}` is `sockgate`; each Deployment is an echo server on a
//! backend of the bed, found through the `EndpointSlice` its Service would have), the same
//! expected conditions (read from `sockgate check -o json` of the same manifests, the
//! status the agent writes), and the traffic expectations through the bed (an agent on
//! the file source, clients in the client namespace).
//!
//! Each test is named after the upstream `ShortName`; `cargo xtask conformance` runs
//! this file and writes the `ConformanceReport` from the results (the cases and their
//! features are listed in `xtask/src/conformance.rs`).
#![expect(
    non_snake_case,
    reason = "each test is named after the upstream conformance test's ShortName"
)]
mod common;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, connect, require_root, sockgate_bin};
use netbed::{Bed, servers};
use serde_json::Value;

/// The namespace of the upstream suite's Gateways and routes.
const INFRA: &str = "gateway-conformance-infra";
/// The namespace of the upstream suite's cross-namespace backends.
const WEB: &str = "gateway-conformance-web-backend";
const GROUP: &str = "gateway.networking.k8s.io";
const CONTROLLER: &str = "sockgate.dev/gateway-controller";
/// The port of every upstream TCP backend Service and its pods.
const BACKEND_PORT: u16 = 3000;
/// Connections of one weighted-distribution sample, as upstream.
const WEIGHT_SAMPLES: u32 = 500;

/// One case's manifest directory, removed on drop.
struct Case {
    dir: PathBuf,
}

impl Case {
    /// A new directory holding the class `sockgate` and the suite's namespaces.
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sockgate-conformance-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("case dir");
        let case = Self { dir };
        case.write(
            "00-class.yaml",
            &format!(
                "apiVersion: {GROUP}/v1\nkind: GatewayClass\nmetadata: {{name: sockgate}}\n\
                 spec: {{controllerName: {CONTROLLER}}}\n---\n\
                 apiVersion: v1\nkind: Namespace\nmetadata: {{name: {INFRA}}}\n---\n\
                 apiVersion: v1\nkind: Namespace\nmetadata: {{name: {WEB}}}\n"
            ),
        );
        case
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).expect("write manifest");
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.join(file)).expect("remove manifest");
    }

    /// `sockgate check -o json -f DIR`: the status sockgate computes for the objects.
    fn check(&self) -> Value {
        let out = Command::new(sockgate_bin())
            .args(["check", "-o", "json", "-f"])
            .arg(&self.dir)
            .output()
            .expect("check runs");
        assert!(
            out.status.success(),
            "check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("check JSON")
    }

    /// An agent on these manifests, once it listens on `ports`.
    fn agent(&self, bed: &Bed, ports: &[u16]) -> Agent {
        Agent::start(
            bed,
            &[
                "--source",
                "files",
                "--dir",
                self.dir.to_str().expect("utf-8 path"),
            ],
            ports,
        )
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP backend of the upstream manifests: its Service (port 3000), the `EndpointSlice`
/// its Deployment's pod gives it (backend `i` of the bed), and the pod itself, an echo
/// server answering with the Service's name.
fn backend(bed: &Bed, i: usize, service: &str, namespace: &str) -> (servers::Server, String) {
    let addr = bed.backend_addr(i);
    let server = servers::Server::start(
        bed.backend(i),
        SocketAddr::new(addr.into(), BACKEND_PORT),
        servers::named_echo(service),
    )
    .expect("backend server");
    let yaml = format!(
        "apiVersion: v1\nkind: Service\n\
         metadata: {{name: {service}, namespace: {namespace}, labels: {{app: {service}}}}}\n\
         spec:\n  selector: {{app: {service}}}\n  ports:\n  \
         - {{name: tcp, protocol: TCP, port: {BACKEND_PORT}, targetPort: {BACKEND_PORT}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {service}-pods\n  namespace: {namespace}\n  \
         labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nports: [{{name: tcp, protocol: TCP, port: {BACKEND_PORT}}}]\n\
         endpoints: [{{addresses: [\"{addr}\"], conditions: {{ready: true}}}}]\n---\n"
    );
    (server, yaml)
}

/// A Gateway of class `sockgate` in [`INFRA`] with `listeners` (name, protocol, port),
/// each allowing the route kind (`allowed_kind`) as upstream's manifests do.
fn gateway(name: &str, listeners: &[(&str, &str, u16)], allowed_kind: &str) -> String {
    let mut text = format!(
        "apiVersion: {GROUP}/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {INFRA}}}\n\
         spec:\n  gatewayClassName: sockgate\n  listeners:\n"
    );
    for (listener, protocol, port) in listeners {
        let _ = write!(
            text,
            "  - name: {listener}\n    protocol: {protocol}\n    port: {port}\n    \
             allowedRoutes:\n      kinds: [{{kind: {allowed_kind}}}]\n"
        );
    }
    text + "---\n"
}

/// A `v1alpha2` `TCPRoute` in [`INFRA`] with one parentRef (`parent` is the YAML mapping's
/// inside) and one rule of `backends` (name, namespace or `None`, weight or `None`).
fn tcp_route(name: &str, parent: &str, backends: &[(&str, Option<&str>, Option<u32>)]) -> String {
    let mut text = format!(
        "apiVersion: {GROUP}/v1alpha2\nkind: TCPRoute\nmetadata: {{name: {name}, namespace: {INFRA}}}\n\
         spec:\n  parentRefs: [{{{parent}}}]\n  rules:\n  - backendRefs:\n"
    );
    for (service, namespace, weight) in backends {
        let _ = write!(text, "    - name: {service}\n      port: {BACKEND_PORT}\n");
        if let Some(ns) = namespace {
            let _ = writeln!(text, "      namespace: {ns}");
        }
        if let Some(w) = weight {
            let _ = writeln!(text, "      weight: {w}");
        }
    }
    text + "---\n"
}

/// A `v1alpha2` `TCPRoute` in [`INFRA`] with one parentRef and one backendRef to
/// `service:port` (upstream's cases of a backend that does not exist use port 8080).
fn tcp_route_to_port(name: &str, parent: &str, service: &str, port: u16) -> String {
    tcp_route(name, parent, &[(service, None, None)]).replacen(
        &format!("port: {BACKEND_PORT}\n"),
        &format!("port: {port}\n"),
        1,
    )
}

/// The object `kind` `namespace/name` of a check report.
fn object<'a>(report: &'a Value, kind: &str, namespace: Option<&str>, name: &str) -> &'a Value {
    report["objects"]
        .as_array()
        .and_then(|objects| {
            objects.iter().find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == name
                    && o["metadata"]["namespace"].as_str() == namespace
            })
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace:?}/{name} in the report: {report:#}"))
}

/// Whether `conditions` hold one of `type_` with `status` (and `reason`, unless `None`).
fn has_condition(conditions: &Value, type_: &str, status: &str, reason: Option<&str>) -> bool {
    conditions.as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["type"] == type_ && c["status"] == status && reason.is_none_or(|r| c["reason"] == r)
        })
    })
}

/// The status entry of `TCPRoute` `route` (in [`INFRA`]) for parent Gateway `gateway`:
/// written by sockgate's controller, its parentRef naming the Gateway (group, kind and
/// namespace, when set, those of a Gateway in [`INFRA`]).
fn route_parent<'a>(report: &'a Value, route: &str, gateway: &str) -> &'a Value {
    let status = &object(report, "TCPRoute", Some(INFRA), route)["status"];
    status["parents"]
        .as_array()
        .and_then(|ps| {
            ps.iter().find(|p| {
                let r = &p["parentRef"];
                p["controllerName"] == CONTROLLER
                    && r["name"] == gateway
                    && (r["group"].is_null() || r["group"] == GROUP)
                    && (r["kind"].is_null() || r["kind"] == "Gateway")
                    && (r["namespace"].is_null() || r["namespace"] == INFRA)
            })
        })
        .unwrap_or_else(|| panic!("route {route} has no parent {gateway}: {status:#}"))
}

/// Asserts the condition on the route's parent entry for `gateway`.
fn assert_route_condition(
    report: &Value,
    route: &str,
    gateway: &str,
    (type_, status, reason): (&str, &str, &str),
) {
    let parent = route_parent(report, route, gateway);
    assert!(
        has_condition(&parent["conditions"], type_, status, Some(reason)),
        "route {route} on {gateway}: want {type_}={status}/{reason}: {parent:#}"
    );
}

/// The status of listener `listener` of Gateway `gateway` (in [`INFRA`]).
fn listener<'a>(report: &'a Value, gateway: &str, listener: &str) -> &'a Value {
    let status = &object(report, "Gateway", Some(INFRA), gateway)["status"];
    status["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == listener))
        .unwrap_or_else(|| panic!("Gateway {gateway} has no listener {listener}: {status:#}"))
}

/// Upstream's "Gateway and routes must be accepted": each route `Accepted=True` on
/// the Gateway, and `listener` `Accepted`, `ResolvedRefs` and `Programmed` all `True`.
fn assert_gateway_and_routes_accepted(report: &Value, gateway: &str, name: &str, routes: &[&str]) {
    for route in routes {
        assert_route_condition(report, route, gateway, ("Accepted", "True", "Accepted"));
    }
    let l = listener(report, gateway, name);
    for type_ in ["Accepted", "ResolvedRefs", "Programmed"] {
        assert!(
            has_condition(&l["conditions"], type_, "True", None),
            "listener {gateway}/{name}: want {type_}=True: {l:#}"
        );
    }
}

/// Upstream's "conditions have the latest observedGeneration": there is at least one,
/// and each one's `observedGeneration` is `generation`.
fn assert_latest_conditions(what: &str, status: &Value, generation: u64) {
    let conditions = status["conditions"].as_array().expect("conditions");
    assert!(!conditions.is_empty(), "{what}: no conditions");
    for c in conditions {
        assert_eq!(
            c["observedGeneration"], generation,
            "{what}: condition not at generation {generation}: {status:#}"
        );
    }
}

/// One exchange through listener `port` from the client namespace: the name of the
/// backend that answered, or the error.
fn ask(bed: &Bed, port: u16) -> Result<String, String> {
    let addr = SocketAddr::new(bed.node_addr().into(), port);
    bed.client()
        .run(move || {
            let s = connect(addr).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            (&s).write_all(b"conformance\n")
                .map_err(|e| e.to_string())?;
            let mut reply = String::new();
            BufReader::new(&s)
                .read_line(&mut reply)
                .map_err(|e| e.to_string())?;
            reply
                .split_once(':')
                .map(|(name, _)| name.to_owned())
                .ok_or_else(|| format!("no reply ({reply:?})"))
        })
        .expect("client namespace")
}

/// Upstream's "eventually a valid response": waits (bounded) until `port` answers from
/// `want`.
fn expect_backend(bed: &Bed, agent: &Agent, port: u16, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = ask(bed, port);
        if got.as_deref() == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "listener {port}: want {want}, got {got:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn TCPRouteInvalidBackendRefNonexistent() {
    let case = Case::new("invalid-backend");
    case.write(
        "manifest.yaml",
        &(gateway(
            "tcp-gateway-invalid-backend",
            &[("tcp", "TCP", 9300)],
            "TCPRoute",
        ) + &tcp_route_to_port(
            "tcp-route-invalid-backend-ref-nonexistent",
            "name: tcp-gateway-invalid-backend, sectionName: tcp",
            "nonexistent-service",
            8080,
        )),
    );
    let report = case.check();
    assert_route_condition(
        &report,
        "tcp-route-invalid-backend-ref-nonexistent",
        "tcp-gateway-invalid-backend",
        ("ResolvedRefs", "False", "BackendNotFound"),
    );
}

#[test]
fn TCPRouteInvalidCrossNamespaceBackendRef() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (_server, service) = backend(&bed, 0, "tcp-invalid-xns-backend", WEB);
    let case = Case::new("invalid-xns");
    let gw = "tcp-invalid-cross-namespace-backend-ref-gateway";
    let route = "tcp-invalid-cross-namespace-backend-ref";
    case.write(
        "manifest.yaml",
        &(service
            + &gateway(gw, &[("tcp", "TCP", 9321)], "TCPRoute")
            + &tcp_route(
                route,
                &format!("name: {gw}, sectionName: tcp"),
                &[("tcp-invalid-xns-backend", Some(WEB), None)],
            )),
    );
    let report = case.check();
    // Accepted on its parent: only the backend's resolution is refused.
    assert_gateway_and_routes_accepted(&report, gw, "tcp", &[route]);
    assert_route_condition(
        &report,
        route,
        gw,
        ("ResolvedRefs", "False", "RefNotPermitted"),
    );
    // And no connection reaches the backend the reference was refused.
    let agent = case.agent(&bed, &[9321]);
    let got = ask(&bed, 9321);
    assert!(
        got.is_err(),
        "a refused reference carries no traffic: {got:?}\n{}",
        agent.log_text()
    );
}

#[test]
fn TCPRouteInvalidNonTCPListener() {
    let case = Case::new("non-tcp-listener");
    let gw = "tcp-mixed-protocol-gateway";
    case.write(
        "manifest.yaml",
        &(gateway(gw, &[("only-allow-http-routes", "HTTP", 5300)], "HTTPRoute")
            + &tcp_route_to_port(
                "tcp-route",
                &format!("name: {gw}, sectionName: only-allow-http-routes"),
                "tcp-echo-backend",
                8080,
            )),
    );
    let report = case.check();
    assert_route_condition(
        &report,
        "tcp-route",
        gw,
        ("Accepted", "False", "NotAllowedByListeners"),
    );
    // Upstream's "zero routes": no listener in status, or one with no route attached.
    let status = &object(&report, "Gateway", Some(INFRA), gw)["status"];
    let listeners = status["listeners"].as_array().cloned().unwrap_or_default();
    assert!(
        listeners.is_empty() || (listeners.len() == 1 && listeners[0]["attachedRoutes"] == 0),
        "{status:#}"
    );
    assert_latest_conditions(gw, status, 1);
}

#[test]
fn TCPRouteMultipleRoutesAttachment() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let (_one, svc_one) = backend(&bed, 0, "tcp-attach-backend-1", INFRA);
    let (_two, svc_two) = backend(&bed, 1, "tcp-attach-backend-2", INFRA);
    let case = Case::new("multiple-routes");
    let gw = "tcp-multi-route-attach-gateway";
    let listener_yaml = format!(
        "apiVersion: {GROUP}/v1\nkind: Gateway\nmetadata: {{name: {gw}, namespace: {INFRA}}}\n\
         spec:\n  gatewayClassName: sockgate\n  listeners:\n  - name: tcp\n    protocol: TCP\n    \
         port: 9310\n    allowedRoutes:\n      kinds: [{{kind: TCPRoute, group: {GROUP}}}]\n      \
         namespaces: {{from: Same}}\n---\n"
    );
    // The API server stamps each object's creation; the newer route comes a second
    // after the older one is served, as upstream applies it.
    let stamped = |route: String, at: &str| {
        route.replacen(
            &format!("namespace: {INFRA}}}"),
            &format!("namespace: {INFRA}, creationTimestamp: \"{at}\"}}"),
            1,
        )
    };
    let older = stamped(
        tcp_route(
            "tcproute-attach-older",
            &format!("name: {gw}, sectionName: tcp"),
            &[("tcp-attach-backend-1", None, None)],
        ),
        "2026-01-01T00:00:00Z",
    );
    case.write(
        "manifest.yaml",
        &(svc_one + &svc_two + &listener_yaml + &older),
    );
    let report = case.check();
    assert_gateway_and_routes_accepted(&report, gw, "tcp", &["tcproute-attach-older"]);
    let agent = case.agent(&bed, &[9310]);
    expect_backend(&bed, &agent, 9310, "tcp-attach-backend-1");

    let newer = stamped(
        tcp_route(
            "tcproute-attach-newer",
            &format!("name: {gw}, sectionName: tcp"),
            &[("tcp-attach-backend-2", None, None)],
        ),
        "2026-01-01T00:00:01Z",
    );
    case.write("newer.yaml", &newer);
    let report = case.check();
    for route in ["tcproute-attach-older", "tcproute-attach-newer"] {
        assert_route_condition(&report, route, gw, ("Accepted", "True", "Accepted"));
    }
    let l = listener(&report, gw, "tcp");
    assert_eq!(l["attachedRoutes"], 2, "{l:#}");
    assert_eq!(
        l["supportedKinds"],
        serde_json::json!([{"group": GROUP, "kind": "TCPRoute"}]),
        "{l:#}"
    );
    assert!(
        has_condition(&l["conditions"], "Accepted", "True", Some("Accepted")),
        "{l:#}"
    );
    // Give the agent the time to read the new file, then sample: only the oldest route
    // is bound to the listener.
    std::thread::sleep(Duration::from_secs(2));
    expect_backend(&bed, &agent, 9310, "tcp-attach-backend-1");
    for i in 0..100 {
        assert_eq!(
            ask(&bed, 9310).as_deref(),
            Ok("tcp-attach-backend-1"),
            "connection {i}\n{}",
            agent.log_text()
        );
    }
}

#[test]
fn TCPRouteParentRefAttachAll() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (_server, service) = backend(&bed, 0, "tcp-echo-attach-all", INFRA);
    let case = Case::new("attach-all");
    let gw = "tcp-attach-all-gateway";
    let listeners = [
        ("one", "TCP", 9310),
        ("two", "TCP", 9311),
        ("three", "TCP", 9312),
        ("four", "TCP", 9313),
    ];
    case.write(
        "manifest.yaml",
        &(service
            + &gateway(gw, &listeners, "TCPRoute")
            + &tcp_route(
                "tcp-route-attach-all",
                &format!("name: {gw}"),
                &[("tcp-echo-attach-all", None, None)],
            )),
    );
    let report = case.check();
    assert_route_condition(
        &report,
        "tcp-route-attach-all",
        gw,
        ("Accepted", "True", "Accepted"),
    );
    let agent = case.agent(&bed, &[9310, 9311, 9312, 9313]);
    for (_, _, port) in listeners {
        expect_backend(&bed, &agent, port, "tcp-echo-attach-all");
    }
}

#[test]
fn TCPRouteParentRefPortAndSectionName() {
    require_root();
    let bed = Bed::new(3).expect("bed");
    let (s1, y1) = backend(&bed, 0, "tcp-echo-one", INFRA);
    let (s2, y2) = backend(&bed, 1, "tcp-echo-two", INFRA);
    let (s3, y3) = backend(&bed, 2, "tcp-echo-three", INFRA);
    let _servers = [s1, s2, s3];
    let case = Case::new("port-and-section");
    let gw = "tcp-multi-listener-gateway";
    case.write(
        "manifest.yaml",
        &(y1 + &y2
            + &y3
            + &gateway(
                gw,
                &[
                    ("one", "TCP", 9300),
                    ("two", "TCP", 9301),
                    ("three", "TCP", 9302),
                ],
                "TCPRoute",
            )
            + &tcp_route(
                "tcp-route-by-port",
                &format!("name: {gw}, port: 9300"),
                &[("tcp-echo-one", None, None)],
            )
            + &tcp_route(
                "tcp-route-by-section",
                &format!("name: {gw}, sectionName: two"),
                &[("tcp-echo-two", None, None)],
            )
            + &tcp_route(
                "tcp-route-by-section-and-port",
                &format!("name: {gw}, sectionName: three, port: 9302"),
                &[("tcp-echo-three", None, None)],
            )),
    );
    let report = case.check();
    let agent = case.agent(&bed, &[9300, 9301, 9302]);
    for (route, port, backend) in [
        ("tcp-route-by-port", 9300, "tcp-echo-one"),
        ("tcp-route-by-section", 9301, "tcp-echo-two"),
        ("tcp-route-by-section-and-port", 9302, "tcp-echo-three"),
    ] {
        assert_route_condition(&report, route, gw, ("Accepted", "True", "Accepted"));
        expect_backend(&bed, &agent, port, backend);
    }
}

#[test]
fn TCPRouteReferenceGrant() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (_server, service) = backend(&bed, 0, "tcp-reference-grant-backend", WEB);
    let case = Case::new("reference-grant");
    let gw = "tcp-reference-grant-gateway";
    let route = "tcp-reference-grant";
    case.write(
        "manifest.yaml",
        &(service
            + &gateway(gw, &[("tcp", "TCP", 9320)], "TCPRoute")
            + &tcp_route(
                route,
                &format!("name: {gw}, sectionName: tcp"),
                &[("tcp-reference-grant-backend", Some(WEB), None)],
            )),
    );
    case.write(
        "grant.yaml",
        &format!(
            "apiVersion: {GROUP}/v1\nkind: ReferenceGrant\n\
             metadata: {{name: tcp-reference-grant, namespace: {WEB}}}\n\
             spec:\n  from: [{{group: {GROUP}, kind: TCPRoute, namespace: {INFRA}}}]\n  \
             to: [{{group: \"\", kind: Service, name: tcp-reference-grant-backend}}]\n"
        ),
    );
    let report = case.check();
    assert_gateway_and_routes_accepted(&report, gw, "tcp", &[route]);
    let agent = case.agent(&bed, &[9320]);
    expect_backend(&bed, &agent, 9320, "tcp-reference-grant-backend");

    // Deleting the grant revokes the reference.
    case.remove("grant.yaml");
    let report = case.check();
    assert_route_condition(
        &report,
        route,
        gw,
        ("ResolvedRefs", "False", "RefNotPermitted"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while ask(&bed, 9320).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the backend is still reached after the grant's deletion\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn TCPRouteWeightedRouting() {
    require_root();
    let bed = Bed::new(3).expect("bed");
    let (s1, y1) = backend(&bed, 0, "tcp-backend-v1", INFRA);
    let (s2, y2) = backend(&bed, 1, "tcp-backend-v2", INFRA);
    let (s3, y3) = backend(&bed, 2, "tcp-backend-v3", INFRA);
    let _servers = [s1, s2, s3];
    let case = Case::new("weighted");
    let gw = "tcp-weighted-gateway";
    let route = "tcp-weighted-route";
    case.write(
        "manifest.yaml",
        &(y1 + &y2
            + &y3
            + &gateway(gw, &[("tcp", "TCP", 9300)], "TCPRoute")
            + &tcp_route(
                route,
                &format!("name: {gw}, sectionName: tcp"),
                &[
                    ("tcp-backend-v1", None, Some(70)),
                    ("tcp-backend-v2", None, Some(30)),
                    ("tcp-backend-v3", None, Some(0)),
                ],
            )),
    );
    let report = case.check();
    assert_gateway_and_routes_accepted(&report, gw, "tcp", &[route]);
    let agent = case.agent(&bed, &[9300]);
    expect_backend(&bed, &agent, 9300, "tcp-backend-v1");
    // Upstream's bound: 500 connections, each share within 5 points of its weight,
    // a weight of 0 never picked; a few attempts, since the picks are hashed.
    let want = [
        ("tcp-backend-v1", 0.7),
        ("tcp-backend-v2", 0.3),
        ("tcp-backend-v3", 0.0),
    ];
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..WEIGHT_SAMPLES {
            let name = ask(&bed, 9300).unwrap_or_else(|e| format!("error: {e}"));
            *counts.entry(name).or_default() += 1;
        }
        let within = counts.keys().all(|k| want.iter().any(|(n, _)| n == k))
            && want.iter().all(|(name, share)| {
                let n = counts.get(*name).copied().unwrap_or(0);
                let got = f64::from(n) / f64::from(WEIGHT_SAMPLES);
                (got - share).abs() <= 0.05 && (*share > 0.0 || n == 0)
            });
        if within {
            return;
        }
        attempts.push(counts);
    }
    panic!("weights not met within 5 points in 3 attempts: {attempts:?}");
}

#[test]
fn GatewayClassObservedGenerationBump() {
    let case = Case::new("class-generation");
    let class = |description: &str, generation: u32| {
        format!(
            "apiVersion: {GROUP}/v1\nkind: GatewayClass\n\
             metadata: {{name: gatewayclass-observed-generation-bump, generation: {generation}}}\n\
             spec: {{controllerName: {CONTROLLER}, description: {description}}}\n"
        )
    };
    case.write("class.yaml", &class("old", 1));
    let report = case.check();
    let status = &object(
        &report,
        "GatewayClass",
        None,
        "gatewayclass-observed-generation-bump",
    )["status"];
    assert!(
        status["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Accepted")),
        "{status:#}"
    );
    assert_latest_conditions("GatewayClass", status, 1);
    // The update of the spec: the API server bumps the generation.
    case.write("class.yaml", &class("new", 2));
    let report = case.check();
    let status = &object(
        &report,
        "GatewayClass",
        None,
        "gatewayclass-observed-generation-bump",
    )["status"];
    assert!(
        status["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Accepted")),
        "{status:#}"
    );
    assert_latest_conditions("GatewayClass", status, 2);
}

#[test]
fn GatewayNameMaximumLength() {
    let case = Case::new("name-maximum-length");
    let prefix = "gateway-name-maximum-length-";
    let name = format!("{prefix}{}", "a".repeat(253 - prefix.len()));
    assert_eq!(name.len(), 253);
    case.write(
        "gateway.yaml",
        &format!(
            "apiVersion: {GROUP}/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {INFRA}}}\n\
             spec:\n  gatewayClassName: sockgate\n  listeners:\n  \
             - {{name: http, port: 80, protocol: HTTP}}\n"
        ),
    );
    let report = case.check();
    let status = &object(&report, "Gateway", Some(INFRA), &name)["status"];
    assert_latest_conditions("Gateway", status, 1);
}

#[test]
fn GatewayObservedGenerationBump() {
    let case = Case::new("gateway-generation");
    let gw = "gateway-observed-generation-bump";
    let gateway = |generation: u32, extra: &str| {
        format!(
            "apiVersion: {GROUP}/v1\nkind: Gateway\n\
             metadata: {{name: {gw}, namespace: {INFRA}, generation: {generation}}}\n\
             spec:\n  gatewayClassName: sockgate\n  listeners:\n  \
             - {{name: http, hostname: bar.com, port: 80, protocol: HTTP, \
             allowedRoutes: {{namespaces: {{from: All}}}}}}\n{extra}"
        )
    };
    case.write("gateway.yaml", &gateway(1, ""));
    let report = case.check();
    assert_latest_conditions(
        gw,
        &object(&report, "Gateway", Some(INFRA), gw)["status"],
        1,
    );
    // The update of the spec (a listener added): the API server bumps the generation.
    case.write(
        "gateway.yaml",
        &gateway(
            2,
            "  - {name: alternate, hostname: foo.com, port: 80, protocol: HTTP, \
             allowedRoutes: {namespaces: {from: All}}}\n",
        ),
    );
    let report = case.check();
    assert_latest_conditions(
        gw,
        &object(&report, "Gateway", Some(INFRA), gw)["status"],
        2,
    );
}
