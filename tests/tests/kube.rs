//! `sockgate run --source kube` end to end: without a reachable API server (one clear
//! error, retries with backoff, no panic, a clean stop), and against a small fake API
//! server on the node namespace's loopback serving a Gateway, a `TCPRoute`, a backend
//! and a `ListenerPolicy` (the guard programmed and enforced at the NIC, its status
//! applied), or the same without the `ListenerPolicy` CRD; and a Gateway with
//! `spec.addresses` whose address comes to the node and leaves it while the agent runs
//! (served, status written, each time), beside one whose address is another agent
//! node's (reported served, not served here); and with `ReferenceGrant` served only in
//! `v1beta1` (a cross-namespace backendRef permitted through it); and the API server
//! answering 500s, hanging and coming back, or hanging on status writes only (the last
//! state served, the changes made meanwhile applied).
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

/// How the fake API server answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Mode {
    /// As a working API server.
    #[default]
    Up,
    /// Every request answered `500 InternalError`.
    Errors,
    /// Requests read and never answered (connections held open).
    Hang,
    /// Status writes (`PATCH`) read and never answered while this mode lasts; the
    /// rest answered.
    HangWrites,
}

/// What the fake API server holds and saw.
#[derive(Default)]
struct ApiState {
    mode: Mode,
    /// Bumped at every mode change: open watches and hung requests end (their
    /// connections closed), as when an API server restarts.
    epoch: u64,
    /// The collection's `resourceVersion` now: a watch from an older one is answered
    /// `410 Gone` (the client lists again), as from a compacted etcd.
    resource_version: u64,
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

    /// Answers as `mode` from now on; open watches and hung requests are closed.
    fn set_mode(&self, mode: Mode) {
        let mut st = self.state();
        st.mode = mode;
        st.epoch += 1;
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
                       "metadata": {"resourceVersion": state.resource_version.max(1).to_string()},
                       "items": items}),
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
        let epoch = st.epoch;
        let changed =
            || stop.load(Ordering::Relaxed) || state.lock().expect("state").epoch != epoch;
        match st.mode {
            Mode::HangWrites if req.method == "PATCH" => {
                drop(st);
                while !stop.load(Ordering::Relaxed)
                    && state.lock().expect("state").mode == Mode::HangWrites
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            Mode::Up | Mode::HangWrites => {}
            Mode::Errors => {
                drop(st);
                let error = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "message": "etcdserver: request timed out",
                                   "reason": "InternalError", "code": 500});
                if write_json(&mut writer, 500, &error).is_err() {
                    return;
                }
                continue;
            }
            Mode::Hang => {
                drop(st);
                while !changed() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
        }
        if req.target.contains("watch=true") {
            let current = st.resource_version.max(1);
            drop(st);
            serve_watch(&mut reader, &mut writer, &req.target, current, changed);
            return;
        }
        let (code, body) = answer(&mut st, &req);
        drop(st);
        if write_json(&mut writer, code, &body).is_err() {
            return;
        }
    }
}

/// Answers a watch from the `resourceVersion` in `target`: `410 Gone` when it is older
/// than `current`, else headers and no event, the connection held until `changed()`.
fn serve_watch(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    target: &str,
    current: u64,
    changed: impl Fn() -> bool,
) {
    let _ = writer.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let from: u64 = target
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(current);
    if from < current {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("too old resource version: {from} ({current})"),
            "reason": "Expired", "code": 410}})
        .to_string();
        let _ = write!(writer, "{:x}\r\n{gone}\n\r\n0\r\n\r\n", gone.len() + 1);
        let _ = writer.flush();
        return;
    }
    let _ = writer.flush();
    let mut buf = [0u8; 512];
    while !changed() {
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

/// One exchange through the listener from the client: the reply.
fn ask(bed: &Bed) -> String {
    let listener = SocketAddr::new(bed.node_addr().into(), PORT);
    bed.client()
        .run(move || {
            let mut s = common::connect(listener).expect("connect");
            exchange(&mut s, "hi\n")
        })
        .expect("client")
}

/// Points the `EndpointSlice` of Service `foo` at backend `i` (a change made in the
/// cluster: the collection's `resourceVersion` moves on).
fn move_endpoint(bed: &Bed, api: &FakeApi, i: usize) {
    let mut st = api.state();
    st.resource_version = st.resource_version.max(1) + 1;
    let rv = st.resource_version.to_string();
    let slice = st
        .objects
        .iter_mut()
        .find(|(c, _)| c.ends_with("/endpointslices"))
        .map(|(_, o)| o)
        .expect("slice");
    slice["endpoints"][0]["addresses"] = json!([bed.backend_addr(i).to_string()]);
    slice["metadata"]["resourceVersion"] = json!(rv);
}

/// Waits (40 s at most) until new connections reach backend `name`.
fn wait_served_by(bed: &Bed, agent: &Agent, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let reply = ask(bed);
        if reply == format!("{name}: hi\n") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the change made during the outage was not applied (still {reply:?}):\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Backends `b0` and `b1` (named echoes on port 3001 of backends 0 and 1), the fake
/// API server with [`cluster`] (the Service's endpoint on backend 0), and an agent on it
/// with a 3 s Lease (a round every second). Returns the kubeconfig's directory last.
fn two_backends_on_fake_api(
    bed: &Bed,
) -> (Agent, FakeApi, [servers::Server; 2], std::path::PathBuf) {
    let b0 = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("b0"),
    )
    .expect("b0");
    let b1 = servers::Server::start(
        bed.backend(1),
        SocketAddr::new(bed.backend_addr(1).into(), 3001),
        servers::named_echo("b1"),
    )
    .expect("b1");
    let api = FakeApi::start(
        bed,
        ApiState {
            objects: cluster(bed, false),
            ..ApiState::default()
        },
    );
    let (dir, kubeconfig) = kubeconfig("faults", api.port);
    let agent = Agent::start_with_env(
        bed,
        &[
            "--source",
            "kube",
            "--node-name",
            "node-1",
            "--lease-duration",
            "3",
        ],
        &[PORT],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    (agent, api, [b0, b1], dir)
}

/// The API server answers 500s and comes back, then hangs and comes back: the agent
/// keeps serving the last good state meanwhile (a connection opened before goes on
/// flowing, new ones are served), says so in its log (the watches' errors; the hang,
/// through the election round that gets no answer within its interval), and once the
/// server answers again it lists again and applies the change made while it was away.
#[test]
fn api_server_errors_and_hangs_keep_the_last_state_then_resync() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let (mut agent, api, _backends, dir) = two_backends_on_fake_api(&bed);
    let listener = SocketAddr::new(bed.node_addr().into(), PORT);
    assert_eq!(ask(&bed), "b0: hi\n", "{}", agent.log_text());
    // A connection open across both outages.
    let (line_tx, line_rx) = std::sync::mpsc::channel::<&'static str>();
    let (reply_tx, reply_rx) = std::sync::mpsc::channel::<String>();
    let held = bed
        .client()
        .spawn(move || {
            let mut s = common::connect(listener).expect("connect");
            for line in line_rx {
                let _ = reply_tx.send(exchange(&mut s, line));
            }
        })
        .expect("client");
    let held_says = |line: &'static str| {
        line_tx.send(line).expect("send");
        reply_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("reply")
    };
    assert_eq!(held_says("one\n"), "b0: one\n");
    let wait_log = |what: &str, count: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.log_text().matches(what).count() < count {
            assert!(
                Instant::now() < deadline,
                "no {what:?} (x{count}) in the log:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // 500s: said, the last state still served while the Service's endpoint moves to
    // backend 1.
    api.set_mode(Mode::Errors);
    wait_log("Kubernetes API server unreachable", 1);
    wait_log("leader election round failed: not writing status", 1);
    move_endpoint(&bed, &api, 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ask(&bed),
        "b0: hi\n",
        "last good state while the server errs"
    );
    assert_eq!(held_says("two\n"), "b0: two\n");
    // Back: lists again (the watches from the old resourceVersion get 410 Gone) and
    // applies the change.
    api.set_mode(Mode::Up);
    wait_served_by(&bed, &agent, "b1");
    wait_log("watches restored", 1);
    wait_log("leader election rounds succeed again", 1);
    assert_eq!(held_says("three\n"), "b0: three\n", "keeps its backend");

    // A hang: requests read, never answered; said through the election round.
    api.set_mode(Mode::Hang);
    wait_log("leader election round failed: not writing status", 2);
    assert!(
        agent
            .log_text()
            .contains("no answer from the Kubernetes API server within"),
        "{}",
        agent.log_text()
    );
    move_endpoint(&bed, &api, 0);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ask(&bed),
        "b1: hi\n",
        "last good state while the server hangs"
    );
    assert_eq!(held_says("four\n"), "b0: four\n");
    // Back (the hung connections closed, as by a restarted server).
    api.set_mode(Mode::Up);
    wait_served_by(&bed, &agent, "b0");
    wait_log("leader election rounds succeed again", 2);
    assert_eq!(held_says("five\n"), "b0: five\n");
    drop(line_tx);
    held.join().expect("held client");
    let log = agent.log_text();
    assert!(
        log.matches("leader election round failed: not writing status")
            .count()
            == 2,
        "said once per outage:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(agent.child.try_wait().expect("wait").is_none(), "{log}");
    assert!(agent.stop().success(), "{}", agent.log_text());
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A status write the API server never answers (`PATCH` hangs, the rest works) does not
/// hold back the programmed state: the agent gives the write up after its bound, says
/// so, and programs the next change.
#[test]
fn hung_status_write_does_not_hold_back_the_next_state() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let (mut agent, api, _backends, dir) = two_backends_on_fake_api(&bed);
    assert_eq!(ask(&bed), "b0: hi\n", "{}", agent.log_text());
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.state().patches.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no status written:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A change whose status differs (the Gateway's generation moves on): programmed,
    // then its status write hangs.
    move_endpoint(&bed, &api, 1);
    {
        let mut st = api.state();
        let gw = st
            .objects
            .iter_mut()
            .find(|(c, _)| c.ends_with("/gateways"))
            .map(|(_, o)| o)
            .expect("gateway");
        gw["metadata"]["generation"] = json!(2);
    }
    api.set_mode(Mode::HangWrites);
    wait_served_by(&bed, &agent, "b1");
    // The next change, while the write still hangs.
    move_endpoint(&bed, &api, 0);
    api.set_mode(Mode::HangWrites);
    wait_served_by(&bed, &agent, "b0");
    let log = agent.log_text();
    assert!(
        log.contains("status write got no answer from the Kubernetes API server"),
        "{log}"
    );
    api.set_mode(Mode::Up);
    assert!(agent.stop().success(), "{}", agent.log_text());
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
}
