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

fn gateway(name: &str, addresses: &serde_json::Value) -> Gateway {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"gatewayClassName": "sockgate", "listeners": [], "addresses": addresses},
    }))
    .expect("gateway")
}

#[test]
fn addresses_are_spec_addresses_or_the_agent_nodes_internal_ips() {
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
    let gws = vec![
        gateway("plain", &serde_json::json!([])),
        gateway(
            "fixed",
            &serde_json::json!([{"type": "IPAddress", "value": "192.0.2.7"}]),
        ),
    ];
    let mut set = StatusSet::default();
    for g in &gws {
        set.gateways.insert(
            ObjectKey::of(&g.metadata, true),
            gateway_api::experimental::gateways::GatewayStatus::default(),
        );
    }
    let selector: BTreeMap<String, String> = [("sockgate".to_owned(), "yes".to_owned())].into();
    fill_addresses(&mut set, &gws, &nodes, &selector);
    let values = |set: &StatusSet, name: &str| -> Vec<String> {
        set.gateways[&ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }]
            .addresses
            .iter()
            .flatten()
            .map(|a| a.value.clone())
            .collect()
    };
    assert_eq!(
        values(&set, "plain"),
        vec!["10.0.0.1", "10.0.0.2"],
        "selected nodes' InternalIPs"
    );
    assert_eq!(values(&set, "fixed"), vec!["192.0.2.7"]);
    // No selector: every node.
    fill_addresses(&mut set, &gws, &nodes, &BTreeMap::new());
    assert_eq!(
        values(&set, "plain"),
        vec!["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    );
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
    use std::{collections::BTreeSet, pin::pin};

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;

    fn resources(group_version: &str, list: &[(&str, &str, bool)]) -> Value {
        json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": list.iter().map(|(name, kind, namespaced)| json!({
                "name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
                "verbs": ["get", "list", "watch", "patch"],
            })).collect::<Vec<_>>(),
        })
    }

    /// What the scripted server answers to one request.
    fn answer(method: &http::Method, path: &str, query: &str) -> Option<(StatusCode, Value)> {
        let gw = "gateway.networking.k8s.io";
        let lease = "/apis/coordination.k8s.io/v1/namespaces/sockgate-system/leases";
        if query.contains("watch=true") {
            return None; // Held open: nothing changes in this cluster.
        }
        Some(match (method.as_str(), path) {
            ("GET", "/apis") => (
                StatusCode::OK,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                    "name": gw,
                    "versions": [
                        {"groupVersion": format!("{gw}/v1"), "version": "v1"},
                        {"groupVersion": format!("{gw}/v1alpha2"), "version": "v1alpha2"},
                    ],
                    "preferredVersion": {"groupVersion": format!("{gw}/v1"), "version": "v1"},
                }]}),
            ),
            ("GET", "/apis/gateway.networking.k8s.io/v1") => (
                StatusCode::OK,
                resources(
                    &format!("{gw}/v1"),
                    &[
                        ("gatewayclasses", "GatewayClass", false),
                        ("gateways", "Gateway", true),
                        ("tcproutes", "TCPRoute", true),
                    ],
                ),
            ),
            ("GET", "/apis/gateway.networking.k8s.io/v1alpha2") => (
                StatusCode::OK,
                resources(
                    &format!("{gw}/v1alpha2"),
                    &[("tcproutes", "TCPRoute", true)],
                ),
            ),
            ("GET", p) if p == format!("{lease}/sockgate-status-writer") => (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "NotFound", "code": 404}),
            ),
            ("POST", p) if p == lease => (
                StatusCode::CREATED,
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "sockgate-status-writer",
                                    "namespace": "sockgate-system", "resourceVersion": "1"},
                       "spec": {"holderIdentity": "node-1"}}),
            ),
            ("GET", "/api/v1/nodes") => (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "NodeList",
                       "metadata": {"resourceVersion": "1"}, "items": [
                    {"metadata": {"name": "node-1"}, "status": {"addresses": [
                        {"type": "InternalIP", "address": "10.0.0.1"},
                        {"type": "Hostname", "address": "node-1"}]}},
                    {"metadata": {"name": "node-2"}, "status": {"addresses": [
                        {"type": "InternalIP", "address": "10.0.0.2"}]}},
                ]}),
            ),
            ("GET", _) => (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List",
                       "metadata": {"resourceVersion": "1"}, "items": []}),
            ),
            _ => (StatusCode::METHOD_NOT_ALLOWED, json!({})),
        })
    }

    #[tokio::test]
    async fn discovers_tcproute_lists_and_watches_every_kind_and_competes_for_the_lease() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let shutdown = CancellationToken::new();
        let (tx, _rx) = watch::channel(Arc::new(DesiredState::default()));
        let (addrs_tx, addrs) = watch::channel(BTreeSet::new());
        let opts = KubeOptions {
            controller_name: "sockgate.dev/gateway-controller".into(),
            identity: "node-1".into(),
            namespace: "sockgate-system".into(),
            lease_name: "sockgate-status-writer".into(),
            lease_duration: Duration::from_secs(15),
            node_selector: BTreeMap::new(),
            debounce: Duration::from_millis(10),
            node_addresses: Some(addrs_tx),
        };
        let counters = SourceCounters::default();
        counters
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let source = tokio::spawn(run(
            client,
            opts,
            tx,
            |_| {},
            counters.clone(),
            shutdown.clone(),
        ));
        let expected_watches: BTreeSet<&str> = [
            "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
            "/apis/gateway.networking.k8s.io/v1/gateways",
            "/apis/gateway.networking.k8s.io/v1/tcproutes",
            "/apis/gateway.networking.k8s.io/v1/referencegrants",
            "/api/v1/namespaces",
            "/api/v1/services",
            "/api/v1/nodes",
            "/apis/discovery.k8s.io/v1/endpointslices",
        ]
        .into();
        let mut listed = BTreeSet::new();
        let mut watched = BTreeSet::new();
        let mut lease_created = None;
        let mut held = Vec::new();
        let mut handle = pin!(handle);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !(listed.len() == expected_watches.len()
            && watched.len() == expected_watches.len()
            && lease_created.is_some())
        {
            let next = tokio::time::timeout_at(deadline, handle.next_request()).await;
            let Ok(Some((req, send))) = next else {
                panic!("stalled: listed {listed:?}, watched {watched:?}, lease {lease_created:?}");
            };
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let query = req.uri().query().unwrap_or_default().to_owned();
            if query.contains("watch=true") {
                watched.insert(path.clone());
            } else if method == http::Method::GET && expected_watches.contains(path.as_str()) {
                listed.insert(path.clone());
            }
            if method == http::Method::POST && path.ends_with("/leases") {
                let bytes = req.into_body().collect_bytes().await.expect("body");
                lease_created = serde_json::from_slice::<Value>(&bytes).ok();
            }
            match answer(&method, &path, &query) {
                Some((code, body)) => send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&body).expect("json")))
                        .expect("response"),
                ),
                None => held.push(send),
            }
        }
        let listed: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
        assert_eq!(
            listed, expected_watches,
            "one list per kind, TCPRoute in v1"
        );
        let watched: BTreeSet<&str> = watched.iter().map(String::as_str).collect();
        assert_eq!(watched, expected_watches, "then one watch per kind");
        let lease = lease_created.expect("lease");
        // Ready once the initial lists are programmed (the Lease comes after them).
        let ready_by = tokio::time::Instant::now() + Duration::from_secs(5);
        while !counters.ready.load(std::sync::atomic::Ordering::Relaxed) {
            assert!(tokio::time::Instant::now() < ready_by, "source never ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lease["spec"]["holderIdentity"], "node-1");
        assert_eq!(
            *addrs.borrow(),
            BTreeSet::from(["10.0.0.1".parse::<IpAddr>().expect("ip")]),
            "this node's addresses are published"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), source)
            .await
            .expect("the source stops on shutdown")
            .expect("no panic");
    }
}
