//! The pure parts of the kube source: which `TCPRoute` version is watched, and the
//! addresses a Gateway reports.
use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
use kube::api::ObjectMeta;

use super::*;

#[test]
fn watches_v1_when_served_else_v1alpha2() {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        choose_route_version(&s(&["v1", "v1alpha2"])),
        Some(TcpRouteVersion::V1)
    );
    assert_eq!(
        choose_route_version(&s(&["v1alpha2"])),
        Some(TcpRouteVersion::V1alpha2)
    );
    assert_eq!(choose_route_version(&s(&["v1beta1"])), None);
    assert_eq!(
        route_resource(TcpRouteVersion::V1).api_version,
        "gateway.networking.k8s.io/v1"
    );
    assert_eq!(
        route_resource(TcpRouteVersion::V1alpha2).plural,
        "tcproutes"
    );
}

fn node(name: &str, labels: &[(&str, &str)], addrs: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            addresses: Some(
                addrs
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: (*t).to_owned(),
                        address: (*a).to_owned(),
                    })
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

#[test]
fn addresses_are_the_models_or_the_agent_nodes_internal_ips() {
    let nodes = vec![
        node(
            "b",
            &[("sockgate", "yes")],
            &[("InternalIP", "10.0.0.2"), ("Hostname", "b")],
        ),
        node(
            "a",
            &[("sockgate", "yes")],
            &[("InternalIP", "10.0.0.1"), ("ExternalIP", "1.2.3.4")],
        ),
        node("c", &[], &[("InternalIP", "10.0.0.3")]),
    ];
    let key = |name: &str| ObjectKey {
        namespace: "default".into(),
        name: name.into(),
    };
    let fresh = || {
        let mut set = StatusSet::default();
        set.gateways.insert(
            key("plain"),
            gateway_api::experimental::gateways::GatewayStatus::default(),
        );
        // spec.addresses given: the model filled in the addresses served.
        set.gateways.insert(
            key("fixed"),
            gateway_api::experimental::gateways::GatewayStatus {
                addresses: Some(vec![GatewayStatusAddresses {
                    r#type: Some("IPAddress".into()),
                    value: "192.0.2.7".into(),
                }]),
                ..Default::default()
            },
        );
        set
    };
    let values = |set: &StatusSet, name: &str| -> Vec<String> {
        set.gateways[&key(name)]
            .addresses
            .iter()
            .flatten()
            .map(|a| a.value.clone())
            .collect()
    };
    let selector: BTreeMap<String, String> = [("sockgate".to_owned(), "yes".to_owned())].into();
    let mut set = fresh();
    fill_addresses(&mut set, &nodes, &selector);
    assert_eq!(
        values(&set, "plain"),
        vec!["10.0.0.1", "10.0.0.2"],
        "selected nodes' InternalIPs"
    );
    assert_eq!(
        values(&set, "fixed"),
        vec!["192.0.2.7"],
        "left as the model said"
    );
    // No selector: every node.
    let mut set = fresh();
    fill_addresses(&mut set, &nodes, &BTreeMap::new());
    assert_eq!(
        values(&set, "plain"),
        vec!["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    );
}

#[test]
fn other_agent_nodes_addresses_skip_this_node_and_nodes_without_agent() {
    let nodes = vec![
        node("a", &[("sockgate", "yes")], &[("InternalIP", "10.0.0.1")]),
        node(
            "b",
            &[("sockgate", "yes")],
            &[
                ("InternalIP", "10.0.0.2"),
                ("ExternalIP", "1.2.3.4"),
                ("Hostname", "b"),
            ],
        ),
        node("c", &[], &[("InternalIP", "10.0.0.3")]),
    ];
    let selector: BTreeMap<String, String> = [("sockgate".to_owned(), "yes".to_owned())].into();
    let got: Vec<String> = other_agent_nodes_addresses(&nodes, "a", &selector)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(got, vec!["1.2.3.4", "10.0.0.2"]);
}

#[test]
fn node_addresses_of_this_node_only() {
    let nodes = vec![
        node(
            "a",
            &[],
            &[
                ("InternalIP", "10.0.0.1"),
                ("ExternalIP", "203.0.113.1"),
                ("InternalIP", "fd00::1"),
                ("Hostname", "a.example"),
                ("InternalDNS", "a.internal"),
                ("InternalIP", "not-an-address"),
            ],
        ),
        node("b", &[], &[("InternalIP", "10.0.0.2")]),
    ];
    let got: Vec<String> = node_addresses(&nodes, "a")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(got, vec!["10.0.0.1", "203.0.113.1", "fd00::1"]);
    assert!(node_addresses(&nodes, "c").is_empty(), "unknown node");
    assert!(node_addresses(&nodes, "").is_empty());
}

mod against_a_scripted_api_server {
    use std::{collections::BTreeSet, io::Write, sync::atomic::Ordering::Relaxed};

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;

    const CONTROLLER: &str = "sockgate.dev/gateway-controller";
    const GW: &str = "gateway.networking.k8s.io";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/sockgate-system/leases";
    const POLICIES: &str = "/apis/sockgate.dev/v1alpha1/listenerpolicies";
    const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/";

    /// The collection paths the agent lists and watches, without `ListenerPolicy`.
    const KINDS: [&str; 8] = [
        "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
        "/apis/gateway.networking.k8s.io/v1/gateways",
        "/apis/gateway.networking.k8s.io/v1/tcproutes",
        "/apis/gateway.networking.k8s.io/v1/referencegrants",
        "/api/v1/namespaces",
        "/api/v1/services",
        "/api/v1/nodes",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ];

    fn resources(group_version: &str, list: &[(&str, &str, bool)]) -> Value {
        json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": list.iter().map(|(name, kind, namespaced)| json!({
                "name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
                "verbs": ["get", "list", "watch", "patch"],
            })).collect::<Vec<_>>(),
        })
    }

    fn group(name: &str, versions: &[&str]) -> Value {
        json!({
            "name": name,
            "versions": versions.iter().map(|v| json!({
                "groupVersion": format!("{name}/{v}"), "version": v,
            })).collect::<Vec<_>>(),
            "preferredVersion": {"groupVersion": format!("{name}/{}", versions[0]),
                                 "version": versions[0]},
        })
    }

    fn ok(body: &Value) -> Response<Body> {
        respond(StatusCode::OK, body)
    }

    fn respond(code: StatusCode, body: &Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response")
    }

    /// A scripted API server: discovery (with or without the `ListenerPolicy` CRD),
    /// lists of the objects it holds, watches held open until the test sends an event,
    /// the Lease, and server-side apply of status (stored, answered with the object).
    struct Cluster {
        handle: mock::Handle<Request<Body>, Response<Body>>,
        policy_crd: bool,
        /// Answer 403 to every `ListenerPolicy` request (RBAC without the rule).
        forbid_policies: bool,
        /// The CRDs that exist, by name, with their bundle-version annotation (`None`:
        /// without it); the others answer 404.
        crds: BTreeMap<&'static str, Option<&'static str>>,
        /// Objects by collection path.
        objects: BTreeMap<&'static str, Vec<Value>>,
        /// Every request: (method, path, query).
        requests: Vec<(Method, String, String)>,
        /// Status patches: (path and query, body).
        patches: Vec<(String, Value)>,
        lease_created: Option<Value>,
        /// Open watches: (collection path, the answer to send).
        held: Vec<(String, mock::SendResponse<Response<Body>>)>,
    }

    impl Cluster {
        fn new(
            handle: mock::Handle<Request<Body>, Response<Body>>,
            policy_crd: bool,
            objects: BTreeMap<&'static str, Vec<Value>>,
        ) -> Self {
            Self {
                handle,
                policy_crd,
                forbid_policies: false,
                crds: BTreeMap::new(),
                objects,
                requests: Vec::new(),
                patches: Vec::new(),
                lease_created: None,
                held: Vec::new(),
            }
        }

        fn paths(&self, watch: bool) -> BTreeSet<&str> {
            self.requests
                .iter()
                .filter(|(m, _, q)| *m == Method::GET && q.contains("watch=true") == watch)
                .map(|(_, p, _)| p.as_str())
                .filter(|p| KINDS.contains(p) || *p == POLICIES)
                .collect()
        }

        /// Answers requests until `done` holds, for at most 20 s.
        async fn serve_until(&mut self, mut done: impl FnMut(&Self) -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !done(self) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "stalled: {:?}",
                    self.requests
                );
                tokio::select! {
                    next = self.handle.next_request() => {
                        let (req, send) = next.expect("the client is alive");
                        self.answer(req, send).await;
                    }
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }

        async fn answer(&mut self, req: Request<Body>, send: mock::SendResponse<Response<Body>>) {
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or_default().to_owned();
            self.requests
                .push((method.clone(), path.clone(), query.clone()));
            let bytes = req.into_body().collect_bytes().await.expect("body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if query.contains("watch=true") {
                self.held.push((path, send));
                return;
            }
            let missing = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404});
            let forbidden = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "Forbidden", "code": 403});
            let response = match (method.as_str(), path.as_str()) {
                ("GET", POLICIES) if self.forbid_policies => {
                    respond(StatusCode::FORBIDDEN, &forbidden)
                }
                ("GET", "/apis") => {
                    let mut groups = vec![group(GW, &["v1", "v1alpha2"])];
                    if self.policy_crd {
                        groups.push(group("sockgate.dev", &["v1alpha1"]));
                    }
                    ok(&json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
                }
                ("GET", "/apis/gateway.networking.k8s.io/v1") => ok(&resources(
                    &format!("{GW}/v1"),
                    &[
                        ("gatewayclasses", "GatewayClass", false),
                        ("gateways", "Gateway", true),
                        ("tcproutes", "TCPRoute", true),
                        ("referencegrants", "ReferenceGrant", true),
                    ],
                )),
                ("GET", "/apis/gateway.networking.k8s.io/v1alpha2") => ok(&resources(
                    &format!("{GW}/v1alpha2"),
                    &[("tcproutes", "TCPRoute", true)],
                )),
                ("GET", "/apis/sockgate.dev/v1alpha1") if self.policy_crd => ok(&resources(
                    "sockgate.dev/v1alpha1",
                    &[
                        ("listenerpolicies", "ListenerPolicy", true),
                        ("listenerpolicies/status", "ListenerPolicy", true),
                    ],
                )),
                ("GET", p) if p.starts_with("/apis/sockgate.dev") && !self.policy_crd => {
                    respond(StatusCode::NOT_FOUND, &missing)
                }
                ("GET", p) if p.starts_with(CRDS) => match self.crds.get(&p[CRDS.len()..]) {
                    None => respond(StatusCode::NOT_FOUND, &missing),
                    Some(version) => {
                        let mut metadata = json!({"name": &p[CRDS.len()..]});
                        if let Some(v) = version {
                            metadata["annotations"] =
                                json!({"gateway.networking.k8s.io/bundle-version": v});
                        }
                        ok(&json!({"apiVersion": "meta.k8s.io/v1",
                                       "kind": "PartialObjectMetadata", "metadata": metadata}))
                    }
                },
                ("GET", p) if p == format!("{LEASES}/sockgate-status-writer") => {
                    respond(StatusCode::NOT_FOUND, &missing)
                }
                ("POST", LEASES) => {
                    self.lease_created = Some(body.clone());
                    respond(
                        StatusCode::CREATED,
                        &json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                               "metadata": {"name": "sockgate-status-writer",
                                            "namespace": "sockgate-system",
                                            "resourceVersion": "1"},
                               "spec": {"holderIdentity": "node-1"}}),
                    )
                }
                ("GET", p) => ok(&json!({
                    "apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"},
                    "items": self.objects.get(p).cloned().unwrap_or_default(),
                })),
                ("PATCH", p) if p.ends_with("/status") => {
                    self.patches.push((format!("{p}?{query}"), body.clone()));
                    match self.store_status(&body) {
                        Some(object) => ok(&object),
                        None => respond(StatusCode::NOT_FOUND, &missing),
                    }
                }
                _ => respond(StatusCode::METHOD_NOT_ALLOWED, &json!({})),
            };
            send.send_response(response);
        }

        /// Stores the status of an apply on the object of the same kind and name;
        /// returns the object.
        fn store_status(&mut self, patch: &Value) -> Option<Value> {
            let object = self.objects.values_mut().flatten().find(|o| {
                o["kind"] == patch["kind"] && o["metadata"]["name"] == patch["metadata"]["name"]
            })?;
            object["status"] = patch["status"].clone();
            object["metadata"]["resourceVersion"] = json!("2");
            Some(object.clone())
        }

        /// Ends the open watch of `path` with one `MODIFIED` event per object it holds.
        fn send_modified(&mut self, path: &str) {
            let at = self
                .held
                .iter()
                .position(|(p, _)| p == path)
                .unwrap_or_else(|| panic!("no open watch of {path}"));
            let (_, send) = self.held.remove(at);
            let mut events = Vec::new();
            for o in self.objects.get(path).into_iter().flatten() {
                serde_json::to_writer(&mut events, &json!({"type": "MODIFIED", "object": o}))
                    .expect("json");
                events.push(b'\n');
            }
            send.send_response(
                Response::builder()
                    .status(StatusCode::OK)
                    .body(Body::from(events))
                    .expect("response"),
            );
        }
    }

    fn options() -> KubeOptions {
        KubeOptions {
            controller_name: CONTROLLER.into(),
            identity: "node-1".into(),
            namespace: "sockgate-system".into(),
            lease_name: "sockgate-status-writer".into(),
            lease_duration: Duration::from_secs(15),
            node_selector: BTreeMap::new(),
            debounce: Duration::from_millis(10),
            node_addresses: None,
            local_addresses: None,
            policy_rediscovery: Duration::from_mins(1),
            backend_filter: crate::backend_filter::BackendFilter::default(),
            limits: crate::model::limits::Limits::default(),
        }
    }

    /// The log lines written while the returned guard lives (this thread: the tests
    /// run on a current-thread runtime).
    fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        #[derive(Clone)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("log buffer").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let lines = Lines(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || lines.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (buf, tracing::subscriber::set_default(subscriber))
    }

    fn log_text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
        String::from_utf8_lossy(&buf.lock().expect("log buffer")).into_owned()
    }

    struct Running {
        cluster: Cluster,
        /// This node's addresses as the source publishes them.
        addrs: watch::Receiver<BTreeSet<IpAddr>>,
        rx: watch::Receiver<Arc<DesiredState>>,
        counters: SourceCounters,
        shutdown: CancellationToken,
        source: tokio::task::JoinHandle<()>,
    }

    fn start(policy_crd: bool, objects: BTreeMap<&'static str, Vec<Value>>) -> Running {
        start_with(policy_crd, objects, options())
    }

    fn start_with(
        policy_crd: bool,
        objects: BTreeMap<&'static str, Vec<Value>>,
        opts: KubeOptions,
    ) -> Running {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let shutdown = CancellationToken::new();
        let (tx, rx) = watch::channel(Arc::new(DesiredState::default()));
        let counters = SourceCounters::default();
        counters.ready.store(true, Relaxed);
        let (addrs_tx, addrs) = watch::channel(BTreeSet::new());
        let source = tokio::spawn(run(
            client,
            KubeOptions {
                node_addresses: Some(addrs_tx),
                ..opts
            },
            tx,
            |_| {},
            counters.clone(),
            shutdown.clone(),
        ));
        Running {
            cluster: Cluster::new(handle, policy_crd, objects),
            addrs,
            rx,
            counters,
            shutdown,
            source,
        }
    }

    impl Running {
        /// Waits until the source says it is ready (its first state programmed).
        async fn until_ready(&mut self) {
            let counters = self.counters.clone();
            self.cluster
                .serve_until(|_| counters.ready.load(Relaxed))
                .await;
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), self.source)
                .await
                .expect("the source stops on shutdown")
                .expect("no panic");
        }
    }

    #[tokio::test]
    async fn discovers_tcproute_lists_and_watches_every_kind_and_competes_for_the_lease() {
        let nodes = vec![
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "node-1", "resourceVersion": "1"},
                   "status": {"addresses": [
                       {"type": "InternalIP", "address": "10.0.0.1"},
                       {"type": "Hostname", "address": "node-1"}]}}),
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "node-2", "resourceVersion": "1"},
                   "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}),
        ];
        let mut agent = start(true, BTreeMap::from([("/api/v1/nodes", nodes)]));
        let mut expected: BTreeSet<&str> = KINDS.into();
        expected.insert(POLICIES);
        agent
            .cluster
            .serve_until(|c| {
                c.paths(false) == expected && c.paths(true) == expected && c.lease_created.is_some()
            })
            .await;
        assert_eq!(
            agent.cluster.paths(false),
            expected,
            "one list per kind, TCPRoute in v1, ListenerPolicy since its CRD is served"
        );
        let lease = agent.cluster.lease_created.clone().expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], "node-1");
        // Ready once the initial lists are programmed (`run` cleared the flag set
        // before it started).
        agent.until_ready().await;
        assert_eq!(
            *agent.addrs.borrow(),
            BTreeSet::from(["10.0.0.1".parse::<IpAddr>().expect("ip")]),
            "this node's addresses are published"
        );
        agent.stop().await;
    }

    #[tokio::test]
    async fn a_listener_policy_crd_installed_later_is_watched_without_a_restart() {
        let (logs, _guard) = capture_logs();
        let opts = KubeOptions {
            policy_rediscovery: Duration::from_millis(100),
            backend_filter: crate::backend_filter::BackendFilter::default(),
            limits: crate::model::limits::Limits::default(),
            ..options()
        };
        let mut agent = start_with(false, BTreeMap::new(), opts);
        let expected: BTreeSet<&str> = KINDS.into();
        agent
            .cluster
            .serve_until(|c| c.paths(false) == expected && c.paths(true) == expected)
            .await;
        agent.until_ready().await;
        // Rediscovery finds nothing while the CRD is absent.
        let quiet_until = tokio::time::Instant::now() + Duration::from_millis(400);
        agent
            .cluster
            .serve_until(|_| tokio::time::Instant::now() >= quiet_until)
            .await;
        assert_eq!(agent.cluster.paths(false), expected, "no policy list yet");
        agent.cluster.policy_crd = true;
        let mut with_policies = expected.clone();
        with_policies.insert(POLICIES);
        agent
            .cluster
            .serve_until(|c| c.paths(false) == with_policies && c.paths(true) == with_policies)
            .await;
        agent.stop().await;
        let log = log_text(&logs);
        assert_eq!(
            log.matches("ListenerPolicy CRD installed: watching ListenerPolicy")
                .count(),
            1,
            "{log}"
        );
    }

    #[tokio::test]
    async fn without_the_listener_policy_crd_one_info_line_and_the_rest_works() {
        let (logs, _guard) = capture_logs();
        let mut agent = start(false, BTreeMap::new());
        let expected: BTreeSet<&str> = KINDS.into();
        agent
            .cluster
            .serve_until(|c| {
                c.paths(false) == expected && c.paths(true) == expected && c.lease_created.is_some()
            })
            .await;
        agent.until_ready().await;
        // Some more time: nothing retries the missing kind.
        let quiet_until = tokio::time::Instant::now() + Duration::from_millis(500);
        agent
            .cluster
            .serve_until(|_| tokio::time::Instant::now() >= quiet_until)
            .await;
        assert!(
            !agent
                .cluster
                .requests
                .iter()
                .any(|(_, p, _)| p.contains("listenerpolicies")),
            "{:?}",
            agent.cluster.requests
        );
        let discoveries = agent
            .cluster
            .requests
            .iter()
            .filter(|(_, p, _)| p == "/apis")
            .count();
        assert_eq!(discoveries, 1, "discovery once, no retry loop");
        agent.stop().await;
        let log = log_text(&logs);
        let said: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains(
                    "ListenerPolicy CRD not installed; XDP policies from the cluster are off",
                )
            })
            .collect();
        assert_eq!(said.len(), 1, "{log}");
        assert!(said[0].contains("INFO"), "{log}");
        assert!(!log.contains("ERROR") && !log.contains("WARN"), "{log}");
    }

    fn objects_with_a_policy() -> BTreeMap<&'static str, Vec<Value>> {
        [
            (
                "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
                vec![json!({
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                    "metadata": {"name": "sockgate", "resourceVersion": "1", "generation": 1},
                    "spec": {"controllerName": CONTROLLER},
                })],
            ),
            (
                "/apis/gateway.networking.k8s.io/v1/gateways",
                vec![json!({
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "metadata": {"name": "gw", "namespace": "default",
                                 "resourceVersion": "1", "generation": 1},
                    "spec": {"gatewayClassName": "sockgate", "listeners": [
                        {"name": "tcp", "protocol": "TCP", "port": 8080},
                    ]},
                })],
            ),
            (
                POLICIES,
                vec![json!({
                    "apiVersion": "sockgate.dev/v1alpha1", "kind": "ListenerPolicy",
                    "metadata": {"name": "guard", "namespace": "default",
                                 "resourceVersion": "1", "generation": 1,
                                 "creationTimestamp": "2026-01-01T00:00:00Z"},
                    "spec": {
                        "targetRefs": [{"group": GW, "kind": "Gateway", "name": "gw"}],
                        "deny": ["10.66.0.0/16"],
                    },
                })],
            ),
        ]
        .into()
    }

    fn cidrs(list: &[&str]) -> BTreeSet<crate::xdp::Cidr> {
        list.iter().map(|c| c.parse().expect("cidr")).collect()
    }

    #[tokio::test]
    async fn a_cluster_policy_becomes_a_guard_and_its_status_is_applied_once() {
        let mut agent = start(true, objects_with_a_policy());
        let rx = agent.rx.clone();
        agent
            .cluster
            .serve_until(|_| rx.borrow().guards.contains_key(&8080))
            .await;
        let guard = agent.rx.borrow().guards[&8080].clone();
        assert_eq!(guard.deny, cidrs(&["10.66.0.0/16"]));
        assert!(guard.allow.is_empty() && guard.syn_rate.is_none());

        // Leading, the agent applies the status of the class, the Gateway and the policy.
        agent
            .cluster
            .serve_until(|c| c.patches.iter().any(|(_, b)| b["kind"] == "ListenerPolicy"))
            .await;
        let policy_patches: Vec<&(String, Value)> = agent
            .cluster
            .patches
            .iter()
            .filter(|(_, b)| b["kind"] == "ListenerPolicy")
            .collect();
        assert_eq!(policy_patches.len(), 1);
        let (uri, body) = policy_patches[0];
        // The conditions are stamped with the round's time; compared without it.
        let mut body = body.clone();
        for c in body["status"]["ancestors"][0]["conditions"]
            .as_array_mut()
            .expect("conditions")
        {
            let time = c
                .as_object_mut()
                .and_then(|c| c.remove("lastTransitionTime"));
            assert!(time.as_ref().is_some_and(Value::is_string), "{time:?}");
        }
        assert_eq!(
            uri,
            "/apis/sockgate.dev/v1alpha1/namespaces/default/listenerpolicies/guard/status?&force=true&fieldManager=sockgate"
        );
        assert_eq!(
            body,
            json!({
                "apiVersion": "sockgate.dev/v1alpha1",
                "kind": "ListenerPolicy",
                "metadata": {"name": "guard", "namespace": "default"},
                "status": {"ancestors": [{
                    "ancestorRef": {"group": GW, "kind": "Gateway", "namespace": "default",
                                    "name": "gw"},
                    "controllerName": CONTROLLER,
                    "conditions": [
                        {"type": "Accepted", "status": "True", "reason": "Accepted",
                         "message": "applied at the NIC", "observedGeneration": 1},
                        {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs",
                         "message": "target resolved", "observedGeneration": 1},
                    ],
                }]},
            })
        );
        let writes = agent.cluster.patches.len();
        assert_eq!(
            writes, 3,
            "class, Gateway, policy: {:?}",
            agent.cluster.patches
        );

        // The watches now deliver the objects as written, and the policy denies another
        // range: a new guard, and no status write since no status changed (the round's
        // time, a second later at least, is not a change).
        let later = tokio::time::Instant::now() + Duration::from_millis(1100);
        agent
            .cluster
            .serve_until(|_| tokio::time::Instant::now() >= later)
            .await;
        for o in agent
            .cluster
            .objects
            .get_mut(POLICIES)
            .into_iter()
            .flatten()
        {
            o["spec"]["deny"] = json!(["10.77.0.0/16"]);
            o["metadata"]["generation"] = json!(1);
        }
        for path in [KINDS[0], KINDS[1], POLICIES] {
            agent.cluster.send_modified(path);
        }
        let rx = agent.rx.clone();
        agent
            .cluster
            .serve_until(|_| {
                rx.borrow()
                    .guards
                    .get(&8080)
                    .is_some_and(|g| g.deny == cidrs(&["10.77.0.0/16"]))
            })
            .await;
        let quiet_until = tokio::time::Instant::now() + Duration::from_millis(500);
        agent
            .cluster
            .serve_until(|_| tokio::time::Instant::now() >= quiet_until)
            .await;
        assert_eq!(
            agent.cluster.patches.len(),
            writes,
            "no write when the status is unchanged: {:?}",
            &agent.cluster.patches[writes..]
        );
        agent.stop().await;
    }

    #[tokio::test]
    async fn a_forbidden_policy_watch_is_said_once_as_forbidden_and_holds_the_first_state() {
        let (logs, _guard) = capture_logs();
        let mut agent = start(true, BTreeMap::new());
        agent.cluster.forbid_policies = true;
        let expected: BTreeSet<&str> = KINDS.into();
        agent
            .cluster
            .serve_until(|c| c.paths(true) == expected)
            .await;
        // Long enough for the policy list to be retried (watcher backoff).
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        agent
            .cluster
            .serve_until(|_| tokio::time::Instant::now() >= until)
            .await;
        let tries = agent
            .cluster
            .requests
            .iter()
            .filter(|(_, p, _)| p == POLICIES)
            .count();
        assert!(tries >= 2, "retried: {:?}", agent.cluster.requests);
        assert!(
            !agent.counters.ready.load(Relaxed),
            "no state before every kind is listed: a policy must not be missed"
        );
        agent.stop().await;
        let log = log_text(&logs);
        let said: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("watch forbidden"))
            .collect();
        assert_eq!(said.len(), 1, "once, however many retries:\n{log}");
        assert!(
            said[0].contains("ListenerPolicy") && said[0].contains("ERROR"),
            "{log}"
        );
        assert!(!log.contains("unreachable"), "{log}");
    }

    #[tokio::test]
    async fn the_leader_reads_the_crds_bundle_version_into_the_gateway_class_status() {
        let mut agent = start(true, objects_with_a_policy());
        agent.cluster.crds = BTreeMap::from([
            ("gatewayclasses.gateway.networking.k8s.io", Some("v1.5.1")),
            ("gateways.gateway.networking.k8s.io", Some("v1.5.1")),
            ("tcproutes.gateway.networking.k8s.io", Some("v1.6.0")),
        ]);
        agent
            .cluster
            .serve_until(|c| c.patches.iter().any(|(_, b)| b["kind"] == "GatewayClass"))
            .await;
        let crd_gets: Vec<&str> = agent
            .cluster
            .requests
            .iter()
            .filter(|(m, p, _)| *m == Method::GET && p.starts_with(CRDS))
            .map(|(_, p, _)| &p[CRDS.len()..])
            .collect();
        assert_eq!(
            crd_gets,
            [
                "gatewayclasses.gateway.networking.k8s.io",
                "gateways.gateway.networking.k8s.io",
                "referencegrants.gateway.networking.k8s.io",
                "tcproutes.gateway.networking.k8s.io",
            ],
            "one get per CRD, before the first status write"
        );
        let (uri, body) = agent
            .cluster
            .patches
            .iter()
            .find(|(_, b)| b["kind"] == "GatewayClass")
            .expect("class patch");
        assert_eq!(
            uri,
            "/apis/gateway.networking.k8s.io/v1/gatewayclasses/sockgate/status?&force=true&fieldManager=sockgate"
        );
        let status = &body["status"];
        assert_eq!(
            status["supportedFeatures"],
            json!([{"name": "Gateway"}, {"name": "ReferenceGrant"}, {"name": "TCPRoute"}])
        );
        let conditions = status["conditions"].as_array().expect("conditions");
        let version = conditions
            .iter()
            .find(|c| c["type"] == "SupportedVersion")
            .expect("SupportedVersion");
        assert_eq!(version["status"], "False");
        assert_eq!(version["reason"], "UnsupportedVersion");
        let message = version["message"].as_str().expect("message");
        assert!(
            message.starts_with(
                "CRD tcproutes.gateway.networking.k8s.io is of bundle version v1.6.0; sockgate is built for Gateway API v1.5.1"
            ),
            "{message}"
        );
        let accepted = conditions
            .iter()
            .find(|c| c["type"] == "Accepted")
            .expect("Accepted");
        assert_eq!(accepted["status"], "True", "best effort: still accepted");
        // Not read again on every round: a change of the CRDs shows after CRD_REREAD.
        let reads = crd_gets.len();
        agent.cluster.send_modified(KINDS[0]);
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        agent
            .cluster
            .serve_until(|_| tokio::time::Instant::now() >= until)
            .await;
        let again = agent
            .cluster
            .requests
            .iter()
            .filter(|(_, p, _)| p.starts_with(CRDS))
            .count();
        assert_eq!(again, reads);
        agent.stop().await;
    }
}
