//! `sockgate run --source kube` end to end: without a reachable API server (one clear
//! error, retries with backoff, no panic, a clean stop), and against a small fake API
//! server on the node namespace's loopback serving a Gateway, a `TCPRoute`, a backend
//! and a `ListenerPolicy` (the guard programmed and enforced at the NIC, its status
//! applied), or the same without the `ListenerPolicy` CRD; and a Gateway with
//! `spec.addresses` whose address comes to the node and leaves it while the agent runs
//! (served, status written, each time), beside one whose address is another agent
//! node's (reported served, not served here); and with `ReferenceGrant` served only in
//! `v1beta1` (a cross-namespace backendRef permitted through it).
mod common;

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::{Agent, bpftool_json, exchange, kubeconfig, require_root, unreachable_kubeconfig};
use netbed::{Bed, servers};
use serde_json::{Value, json};

/// An agent on the kube source whose API server does not answer (no listener port
/// waited for); returns the kubeconfig's directory (to remove) and the agent.
fn agent_of_unreachable_api(bed: &Bed, tag: &str) -> (std::path::PathBuf, Agent) {
    let (dir, kubeconfig) = unreachable_kubeconfig(tag);
    let agent = Agent::start_with_env(
        bed,
        &["--source", "kube", "--node-name", "node-1"],
        &[],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    (dir, agent)
}

#[test]
fn unreachable_api_server_one_error_then_backoff_and_clean_stop() {
    require_root();
    let bed = Bed::new(0).expect("bed");
    let (dir, mut agent) = agent_of_unreachable_api(&bed, "retry");
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent
        .log_text()
        .matches("API discovery failed; retrying")
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "no retries:\n{}",
            agent.log_text()
        );
        assert!(
            agent.child.try_wait().expect("wait").is_none(),
            "the agent exited:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log_text();
    assert_eq!(
        log.matches("Kubernetes API server unreachable").count(),
        1,
        "one error line, however many retries:\n{log}"
    );
    // The backoff grows: the retries are not a busy loop.
    let delays: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("API discovery failed; retrying"))
        .filter_map(|l| {
            l.split("retry_in_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(delays.windows(2).all(|w| w[1] > w[0]), "{delays:?}");
    assert!(!log.contains("panicked"), "{log}");
    let status = agent.stop();
    assert!(status.success(), "{status}: {}", agent.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn not_ready_until_the_cluster_state_is_programmed() {
    require_root();
    let bed = Bed::new(0).expect("bed");
    let (dir, mut agent) = agent_of_unreachable_api(&bed, "ready");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent
        .log_text()
        .contains("Kubernetes API server unreachable")
    {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let get = |path: &str| -> String {
        let path = path.to_owned();
        bed.node()
            .run(move || {
                use std::io::{Read, Write};
                let mut s = TcpStream::connect("127.0.0.1:9464")?;
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                io::Result::Ok(out)
            })
            .expect("node namespace")
            .expect("HTTP")
    };
    assert!(
        get("/healthz").starts_with("HTTP/1.1 200"),
        "programs loaded"
    );
    let ready = get("/readyz");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("waiting for the first state"), "{ready}");
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// One HTTP request as the fake API server read it.
struct HttpRequest {
    method: String,
    /// Path and query.
    target: String,
    body: Vec<u8>,
}

/// Reads one request from `r`; `None` at the end of the connection.
fn read_request(r: &mut impl BufRead) -> io::Result<Option<HttpRequest>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let (mut length, mut chunked) = (0usize, false);
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').unwrap_or((h, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "transfer-encoding" => chunked = value.contains("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(length, 0);
        r.read_exact(&mut body)?;
    }
    Ok(Some(HttpRequest {
        method,
        target,
        body,
    }))
}

fn write_json(w: &mut impl Write, code: u16, body: &Value) -> io::Result<()> {
    let text = body.to_string();
    write!(
        w,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    w.flush()
}

/// What the fake API server holds and saw.
#[derive(Default)]
struct ApiState {
    /// Serve `sockgate.dev/v1alpha1` `listenerpolicies` (the CRD is installed).
    policy_crd: bool,
    /// Objects by collection path.
    objects: Vec<(&'static str, Value)>,
    /// `ReferenceGrant` served in `v1beta1` only (a Gateway API bundle before 1.5),
    /// else in `v1`.
    v1beta1_grants: bool,
    /// Every request line: `METHOD path?query`.
    requests: Vec<String>,
    /// Status applies: (path and query, body).
    patches: Vec<(String, Value)>,
}

/// A fake Kubernetes API server over plain HTTP: discovery, lists, watches held open
/// with no events, a Lease that is never found (every agent round creates it), and
/// status applies stored and answered with the object.
struct FakeApi {
    port: u16,
    state: Arc<Mutex<ApiState>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Listens on the loopback of the bed's node namespace.
    fn start(bed: &Bed, state: ApiState) -> Self {
        let listener = bed
            .node()
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .expect("node namespace")
            .expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (state, stop) = (state.clone(), stop.clone());
                            conns.push(std::thread::spawn(move || serve(conn, &state, &stop)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        Self {
            port,
            state,
            stop,
            accept: Some(accept),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().expect("state")
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

fn resource_list(group_version: &str, list: &[(&str, &str)]) -> Value {
    json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
        "resources": list.iter().map(|(name, kind)| json!({
            "name": name, "singularName": "", "namespaced": kind != &"GatewayClass",
            "kind": kind, "verbs": ["get", "list", "watch", "patch"],
        })).collect::<Vec<_>>(),
    })
}

fn api_group(name: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    json!({"name": name, "versions": [gv], "preferredVersion": gv})
}

/// The answer to one non-watch request: (code, body).
fn answer(state: &mut ApiState, req: &HttpRequest) -> (u16, Value) {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404});
    let gw = "gateway.networking.k8s.io";
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    match (req.method.as_str(), path) {
        ("GET", "/apis") => {
            let mut groups = vec![api_group(gw, "v1")];
            // TCPRoute in v1alpha2 only: the version discovery falls back to.
            groups[0]["versions"]
                .as_array_mut()
                .expect("versions")
                .push(json!({"groupVersion": format!("{gw}/v1alpha2"), "version": "v1alpha2"}));
            if state.v1beta1_grants {
                groups[0]["versions"]
                    .as_array_mut()
                    .expect("versions")
                    .push(json!({"groupVersion": format!("{gw}/v1beta1"), "version": "v1beta1"}));
            }
            if state.policy_crd {
                groups.push(api_group("sockgate.dev", "v1alpha1"));
            }
            (
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            )
        }
        ("GET", "/apis/gateway.networking.k8s.io/v1") => {
            let mut kinds = vec![("gatewayclasses", "GatewayClass"), ("gateways", "Gateway")];
            if !state.v1beta1_grants {
                kinds.push(("referencegrants", "ReferenceGrant"));
            }
            (200, resource_list(&format!("{gw}/v1"), &kinds))
        }
        ("GET", "/apis/gateway.networking.k8s.io/v1beta1") if state.v1beta1_grants => (
            200,
            resource_list(
                &format!("{gw}/v1beta1"),
                &[("referencegrants", "ReferenceGrant")],
            ),
        ),
        ("GET", "/apis/gateway.networking.k8s.io/v1alpha2") => (
            200,
            resource_list(&format!("{gw}/v1alpha2"), &[("tcproutes", "TCPRoute")]),
        ),
        ("GET", "/apis/sockgate.dev/v1alpha1") if state.policy_crd => (
            200,
            resource_list(
                "sockgate.dev/v1alpha1",
                &[
                    ("listenerpolicies", "ListenerPolicy"),
                    ("listenerpolicies/status", "ListenerPolicy"),
                ],
            ),
        ),
        ("GET", p) if p.starts_with("/apis/sockgate.dev") && !state.policy_crd => (404, not_found),
        ("GET", p) if p.contains("/leases/") => (404, not_found),
        ("POST", p) if p.ends_with("/leases") => {
            let mut lease = body;
            lease["metadata"]["resourceVersion"] = json!("1");
            (201, lease)
        }
        ("GET", p) => {
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|(c, _)| *c == p)
                .map(|(_, o)| o.clone())
                .collect();
            (
                200,
                json!({"apiVersion": "v1", "kind": "List",
                       "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        ("PATCH", p) if p.ends_with("/status") => {
            state.patches.push((format!("{p}?{query}"), body.clone()));
            let object = state.objects.iter_mut().map(|(_, o)| o).find(|o| {
                o["kind"] == body["kind"] && o["metadata"]["name"] == body["metadata"]["name"]
            });
            match object {
                Some(o) => {
                    o["status"] = body["status"].clone();
                    (200, o.clone())
                }
                None => (404, not_found),
            }
        }
        _ => (405, json!({})),
    }
}

/// Serves one connection until it closes or the server stops. A watch gets its
/// headers and then no event: the connection is held open.
fn serve(conn: TcpStream, state: &Mutex<ApiState>, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    while !stop.load(Ordering::Relaxed) {
        // Wait (checking `stop`) for the next request to begin, then read it whole.
        match reader.fill_buf() {
            Ok([]) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(Some(req)) = read_request(&mut reader) else {
            return;
        };
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let mut st = state.lock().expect("state");
        st.requests.push(format!("{} {}", req.method, req.target));
        if req.target.contains("watch=true") {
            drop(st);
            let _ = writer.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            let _ = writer.flush();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
            return;
        }
        let (code, body) = answer(&mut st, &req);
        drop(st);
        if write_json(&mut writer, code, &body).is_err() {
            return;
        }
    }
}

/// A second client address, denied by the cluster's policy.
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const PORT: u16 = 8088;
const CONTROLLER: &str = "sockgate.dev/gateway-controller";

/// The cluster: class `sockgate`, Gateway `gw` with listener `foo` on [`PORT`], a
/// `TCPRoute` to Service `foo` whose endpoint is the bed's backend 0, and (with
/// `policy`) a `ListenerPolicy` denying [`DENIED`] on listener `foo`.
fn cluster(bed: &Bed, policy: bool) -> Vec<(&'static str, Value)> {
    let gw = "gateway.networking.k8s.io";
    let meta = |name: &str| {
        json!({"name": name, "namespace": "default",
                                   "resourceVersion": "1", "generation": 1,
                                   "creationTimestamp": "2026-01-01T00:00:00Z"})
    };
    let mut objects = vec![
        (
            "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
            json!({"apiVersion": format!("{gw}/v1"), "kind": "GatewayClass",
                   "metadata": {"name": "sockgate", "resourceVersion": "1", "generation": 1},
                   "spec": {"controllerName": CONTROLLER}}),
        ),
        (
            "/apis/gateway.networking.k8s.io/v1/gateways",
            json!({"apiVersion": format!("{gw}/v1"), "kind": "Gateway", "metadata": meta("gw"),
                   "spec": {"gatewayClassName": "sockgate", "listeners": [
                       {"name": "foo", "protocol": "TCP", "port": PORT}]}}),
        ),
        (
            "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes",
            json!({"apiVersion": format!("{gw}/v1alpha2"), "kind": "TCPRoute",
                   "metadata": meta("foo"),
                   "spec": {"parentRefs": [{"name": "gw", "sectionName": "foo"}],
                            "rules": [{"backendRefs": [{"name": "foo", "port": 3001}]}]}}),
        ),
        (
            "/api/v1/services",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("foo"),
                   "spec": {"ports": [{"protocol": "TCP", "port": 3001, "targetPort": 3001}]}}),
        ),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "foo-1", "namespace": "default", "resourceVersion": "1",
                                "labels": {"kubernetes.io/service-name": "foo"}},
                   "addressType": "IPv4", "ports": [{"port": 3001, "protocol": "TCP"}],
                   "endpoints": [{"addresses": [bed.backend_addr(0).to_string()],
                                  "conditions": {"ready": true}}]}),
        ),
    ];
    if policy {
        objects.push((
            "/apis/sockgate.dev/v1alpha1/listenerpolicies",
            json!({"apiVersion": "sockgate.dev/v1alpha1", "kind": "ListenerPolicy",
                   "metadata": meta("deny-one-client"),
                   "spec": {"targetRefs": [{"group": gw, "kind": "Gateway", "name": "gw",
                                            "sectionName": "foo"}],
                            "deny": [format!("{DENIED}/32")]}}),
        ));
    }
    objects
}

/// One exchange from `src` to the listener: the reply, or the error kind.
fn ask_from(bed: &Bed, src: Ipv4Addr) -> Result<String, io::ErrorKind> {
    let dst = SocketAddr::new(bed.node_addr().into(), PORT);
    bed.client()
        .run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(|e| e.kind())?;
            s.bind(&SocketAddr::new(src.into(), 0).into())
                .map_err(|e| e.kind())?;
            s.connect_timeout(&dst.into(), Duration::from_millis(1500))
                .map_err(|e| e.kind())?;
            let mut s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.kind())?;
            Ok(exchange(&mut s, "hi\n"))
        })
        .expect("client ns")
}

/// Starts the backend, the fake API server and an agent on it with the guard attached
/// to the node's interface towards the client.
fn start_on_fake_api(
    bed: &Bed,
    tag: &str,
    policy_crd: bool,
) -> (Agent, FakeApi, servers::Server, std::path::PathBuf) {
    bed.client()
        .ip(&["addr", "add", &format!("{DENIED}/24"), "dev", "eth0"])
        .expect("add address");
    let backend = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let api = FakeApi::start(
        bed,
        ApiState {
            policy_crd,
            objects: cluster(bed, policy_crd),
            ..ApiState::default()
        },
    );
    let (dir, kubeconfig) = kubeconfig(tag, api.port);
    let agent = Agent::start_with_env(
        bed,
        &[
            "--source",
            "kube",
            "--node-name",
            "node-1",
            "--xdp-iface",
            "c0",
        ],
        &[PORT],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    (agent, api, backend, dir)
}

#[test]
fn listener_policy_from_the_cluster_guards_the_listener_and_gets_its_status() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (mut agent, api, _backend, dir) = start_on_fake_api(&bed, "policy", true);
    assert!(
        ask_from(&bed, bed.client_addr()).is_ok_and(|r| r.starts_with("foo")),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        ask_from(&bed, DENIED),
        Err(io::ErrorKind::TimedOut),
        "denied at the NIC by the cluster's policy:\n{}",
        agent.log_text()
    );
    let policies = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        &agent.pin_dir.join("GW_XDP_POLICY").display().to_string(),
    ]);
    let ports: Vec<&Value> = policies
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["formatted"]["key"]["port"])
        .collect();
    assert_eq!(ports, [&json!(PORT)], "{policies}");
    assert!(agent.log_text().contains("watching ListenerPolicy"));

    // The agent holds the Lease (the fake never shows another holder) and applies the
    // policy's status.
    let deadline = Instant::now() + Duration::from_secs(20);
    let patch = loop {
        let found = api
            .state()
            .patches
            .iter()
            .find(|(_, b)| b["kind"] == "ListenerPolicy")
            .cloned();
        if let Some(p) = found {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no ListenerPolicy status: {:?}\n{}",
            api.state().patches,
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (target, body) = patch;
    assert_eq!(
        target,
        "/apis/sockgate.dev/v1alpha1/namespaces/default/listenerpolicies/deny-one-client/status?&force=true&fieldManager=sockgate"
    );
    let ancestors = body["status"]["ancestors"].as_array().expect("ancestors");
    assert_eq!(ancestors.len(), 1, "{body}");
    assert_eq!(ancestors[0]["controllerName"], CONTROLLER);
    assert_eq!(ancestors[0]["ancestorRef"]["sectionName"], "foo");
    assert_eq!(ancestors[0]["conditions"][0]["type"], "Accepted");
    assert_eq!(ancestors[0]["conditions"][0]["status"], "True", "{body}");
    assert!(agent.stop().success(), "{}", agent.log_text());
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_the_listener_policy_crd_the_agent_says_so_once_and_serves() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let (mut agent, api, _backend, dir) = start_on_fake_api(&bed, "nocrd", false);
    assert!(
        ask_from(&bed, bed.client_addr()).is_ok_and(|r| r.starts_with("foo")),
        "{}",
        agent.log_text()
    );
    assert!(
        ask_from(&bed, DENIED).is_ok_and(|r| r.starts_with("foo")),
        "no policy from the cluster: every client connects"
    );
    // A while longer: no retry of the missing kind, no second discovery.
    std::thread::sleep(Duration::from_secs(2));
    let log = agent.log_text();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("ListenerPolicy CRD not installed; XDP policies from the cluster are off")
        })
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("INFO"), "{log}");
    {
        let st = api.state();
        assert!(
            !st.requests.iter().any(|r| r.contains("listenerpolicies")),
            "{:?}",
            st.requests
        );
        assert_eq!(
            st.requests.iter().filter(|r| *r == "GET /apis").count(),
            1,
            "{:?}",
            st.requests
        );
    }
    assert!(agent.child.try_wait().expect("wait").is_none(), "{log}");
    assert!(agent.stop().success(), "{}", agent.log_text());
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An address of the client link's subnet the node does not hold at first.
const MOVING: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 77);
/// The `InternalIP` of the other agent node, `node-2`.
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 88);
const MOVING_PORT: u16 = 8090;
const OTHER_PORT: u16 = 8091;

/// The cluster of [`cluster`] (without policy) plus Gateway `moving` on [`MOVING`]
/// ([`MOVING_PORT`]), Gateway `other` on [`OTHER_NODE`] ([`OTHER_PORT`]), routes from
/// both to Service foo, and the Nodes `node-1` (this one) and `node-2`.
fn cluster_with_addresses(bed: &Bed) -> Vec<(&'static str, Value)> {
    let gw = "gateway.networking.k8s.io";
    let meta = |name: &str| {
        json!({"name": name, "namespace": "default", "resourceVersion": "1", "generation": 1,
               "creationTimestamp": "2026-01-02T00:00:00Z"})
    };
    let mut objects = cluster(bed, false);
    for (name, addr, port) in [
        ("moving", MOVING, MOVING_PORT),
        ("other", OTHER_NODE, OTHER_PORT),
    ] {
        objects.push((
            "/apis/gateway.networking.k8s.io/v1/gateways",
            json!({"apiVersion": format!("{gw}/v1"), "kind": "Gateway", "metadata": meta(name),
                   "spec": {"gatewayClassName": "sockgate",
                            "addresses": [{"type": "IPAddress", "value": addr.to_string()}],
                            "listeners": [{"name": "tcp", "protocol": "TCP", "port": port}]}}),
        ));
        objects.push((
            "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes",
            json!({"apiVersion": format!("{gw}/v1alpha2"), "kind": "TCPRoute",
                   "metadata": meta(&format!("to-{name}")),
                   "spec": {"parentRefs": [{"name": name}],
                            "rules": [{"backendRefs": [{"name": "foo", "port": 3001}]}]}}),
        ));
    }
    for (name, ip) in [("node-1", bed.node_addr()), ("node-2", OTHER_NODE)] {
        objects.push((
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "resourceVersion": "1"},
                   "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}}),
        ));
    }
    objects
}

/// The last status applied to Gateway `name`, once `accept` holds for it (bounded).
fn gateway_status_when(
    api: &FakeApi,
    agent: &Agent,
    name: &str,
    what: &str,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last = api
            .state()
            .patches
            .iter()
            .rev()
            .find(|(_, b)| b["kind"] == "Gateway" && b["metadata"]["name"] == name)
            .map(|(_, b)| b["status"].clone());
        if let Some(st) = last.filter(|st| accept(st)) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "Gateway {name}: {what} within 20 s: {:?}\n{}",
            api.state()
                .patches
                .iter()
                .filter(|(_, b)| b["kind"] == "Gateway")
                .collect::<Vec<_>>(),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Gateway condition `type_`'s (status, reason).
fn gw_condition(status: &Value, type_: &str) -> (String, String) {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .unwrap_or_default()
}

fn exchange_with(bed: &Bed, dst: SocketAddr) -> Result<String, io::ErrorKind> {
    bed.client()
        .run(move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_millis(1500))
                .map_err(|e| e.kind())?;
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.kind())?;
            Ok(exchange(&mut s, "hi\n"))
        })
        .expect("client ns")
}

fn node_listens(bed: &Bed, port: u16) -> bool {
    let out = bed.node().output("ss", &["-Hltn"]).expect("ss runs");
    String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} "))
}

#[test]
fn gateway_address_moving_to_and_from_the_node_is_served_and_reported() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _backend = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let api = FakeApi::start(
        &bed,
        ApiState {
            objects: cluster_with_addresses(&bed),
            ..ApiState::default()
        },
    );
    let (dir, kubeconfig) = kubeconfig("addresses", api.port);
    let mut agent = Agent::start_with_env(
        &bed,
        &["--source", "kube", "--node-name", "node-1"],
        &[PORT],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    // moving: its address is on no node running the agent.
    let st = gateway_status_when(&api, &agent, "moving", "AddressNotAssigned", |st| {
        gw_condition(st, "Programmed").1 == "AddressNotAssigned"
    });
    assert_eq!(gw_condition(&st, "Programmed").0, "False", "{st}");
    assert_eq!(gw_condition(&st, "Accepted").0, "True", "{st}");
    assert_eq!(st["addresses"], json!([]), "{st}");
    assert!(!node_listens(&bed, MOVING_PORT));
    // other: node-2 holds its address: reported served, not served here.
    let st = gateway_status_when(&api, &agent, "other", "Programmed", |st| {
        gw_condition(st, "Programmed").0 == "True"
    });
    assert_eq!(
        st["addresses"],
        json!([{"type": "IPAddress", "value": OTHER_NODE.to_string()}]),
        "{st}"
    );
    assert!(
        !node_listens(&bed, OTHER_PORT),
        "node-2's Gateway is not served here"
    );
    // gw, without spec.addresses: the agent nodes' InternalIPs, as before.
    let st = gateway_status_when(&api, &agent, "gw", "Programmed", |st| {
        gw_condition(st, "Programmed").0 == "True"
    });
    assert_eq!(st["addresses"].as_array().map(Vec::len), Some(2), "{st}");

    // The address comes to this node: served on it (and not on the node's other
    // address), and the status follows.
    bed.node()
        .ip(&["addr", "add", &format!("{MOVING}/24"), "dev", "c0"])
        .expect("add the address");
    let st = gateway_status_when(&api, &agent, "moving", "Programmed", |st| {
        gw_condition(st, "Programmed").0 == "True"
    });
    assert_eq!(
        st["addresses"],
        json!([{"type": "IPAddress", "value": MOVING.to_string()}]),
        "{st}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !node_listens(&bed, MOVING_PORT) {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        exchange_with(&bed, SocketAddr::new(MOVING.into(), MOVING_PORT))
            .is_ok_and(|r| r.starts_with("foo")),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        exchange_with(&bed, SocketAddr::new(bed.node_addr().into(), MOVING_PORT)),
        Err(io::ErrorKind::ConnectionRefused)
    );

    // It leaves: no longer served, AddressNotAssigned again.
    bed.node()
        .ip(&["addr", "del", &format!("{MOVING}/24"), "dev", "c0"])
        .expect("remove the address");
    gateway_status_when(&api, &agent, "moving", "AddressNotAssigned again", |st| {
        gw_condition(st, "Programmed").1 == "AddressNotAssigned"
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while node_listens(&bed, MOVING_PORT) {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        exchange_with(&bed, SocketAddr::new(bed.node_addr().into(), PORT))
            .is_ok_and(|r| r.starts_with("foo")),
        "gw keeps serving"
    );
    assert!(agent.stop().success(), "{}", agent.log_text());
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The status the agent applied to the first object of `kind` (waits, bounded).
fn applied_status(api: &FakeApi, agent: &Agent, kind: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = api
            .state()
            .patches
            .iter()
            .find(|(_, b)| b["kind"] == kind)
            .map(|(_, b)| b["status"].clone());
        if let Some(s) = found {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} status: {:?}\n{}",
            api.state().patches,
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn reference_grant_served_only_in_v1beta1_permits_the_cross_namespace_backend_ref() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let _backend = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    // The Service and its slice in namespace `backends`, the route in `default`.
    let mut objects = cluster(&bed, false);
    for (_, o) in &mut objects {
        match o["kind"].as_str() {
            Some("Service" | "EndpointSlice") => o["metadata"]["namespace"] = json!("backends"),
            Some("TCPRoute") => {
                o["spec"]["rules"][0]["backendRefs"][0]["namespace"] = json!("backends");
            }
            _ => {}
        }
    }
    objects.push((
        "/apis/gateway.networking.k8s.io/v1beta1/referencegrants",
        json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
               "metadata": {"name": "routes-from-default", "namespace": "backends",
                            "resourceVersion": "1", "generation": 1},
               "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "TCPRoute",
                                  "namespace": "default"}],
                        "to": [{"group": "", "kind": "Service"}]}}),
    ));
    let api = FakeApi::start(
        &bed,
        ApiState {
            v1beta1_grants: true,
            objects,
            ..ApiState::default()
        },
    );
    let (dir, kubeconfig) = kubeconfig("grant-v1beta1", api.port);
    let mut agent = Agent::start_with_env(
        &bed,
        &["--source", "kube", "--node-name", "node-1"],
        &[PORT],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    assert!(
        ask_from(&bed, bed.client_addr()).is_ok_and(|r| r.starts_with("foo")),
        "the grant read in v1beta1 permits the backendRef:\n{}",
        agent.log_text()
    );
    // The route's status says its reference resolved.
    let route_status = applied_status(&api, &agent, "TCPRoute");
    let resolved = route_status["parents"][0]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "ResolvedRefs")
        .cloned();
    assert_eq!(
        resolved.as_ref().map(|c| c["status"].clone()),
        Some(json!("True")),
        "{route_status}"
    );
    {
        let st = api.state();
        let grant_lists: Vec<&String> = st
            .requests
            .iter()
            .filter(|r| {
                r.starts_with("GET /apis/gateway.networking.k8s.io/")
                    && r.contains("/referencegrants")
            })
            .collect();
        assert!(
            grant_lists
                .iter()
                .any(|r| r
                    .starts_with("GET /apis/gateway.networking.k8s.io/v1beta1/referencegrants")),
            "{grant_lists:?}"
        );
        assert!(
            grant_lists.iter().all(|r| r.contains("/v1beta1/")),
            "never the unserved v1: {grant_lists:?}"
        );
    }
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("watching ReferenceGrant") && l.contains("v1beta1")),
        "{log}"
    );
    assert!(agent.stop().success(), "{}", agent.log_text());
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
}
