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
