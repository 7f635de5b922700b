//! Policy model fixtures: targetRefs to a Gateway, a listener and a route; unknown
//! targets; invalid specs; conflicts resolved oldest-first.
use super::*;
use serde::Deserialize as _;

use crate::{desired::Listener, policy::*};

fn desired() -> DesiredState {
    let l = |port, origin: &str, route: Option<&str>| {
        (
            port,
            Listener {
                port,
                addresses: Vec::new(),
                origin: origin.to_owned(),
                route: route.map(ToOwned::to_owned),
                backends: Vec::new(),
            },
        )
    };
    DesiredState {
        generation: 1,
        listeners: [
            l(8080, "default/gw/tcp-a", Some("default/r1")),
            l(8081, "default/gw/tcp-b", None),
            l(9000, "other/gw2/x", Some("other/r2")),
        ]
        .into(),
        guards: BTreeMap::new(),
        refused: Vec::new(),
        left_out: Vec::new(),
        unready: Vec::new(),
    }
}

fn policies(yaml: &str) -> Vec<ListenerPolicy> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| ListenerPolicy::deserialize(d).expect("ListenerPolicy"))
        .collect()
}

/// The key of `namespace/name`.
fn key(id: &str) -> ObjectKey {
    let (namespace, name) = id.split_once('/').expect("namespace/name");
    ObjectKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

fn conditions(
    s: &BTreeMap<ObjectKey, ListenerPolicyStatus>,
    id: &str,
) -> Vec<Vec<(String, String)>> {
    s[&key(id)]
        .ancestors
        .iter()
        .map(|a| {
            a.conditions
                .iter()
                .map(|c| (format!("{}={}", c.type_, c.status), c.reason.clone()))
                .collect()
        })
        .collect()
}

fn ok() -> Vec<(String, String)> {
    vec![
        ("Accepted=True".into(), "Accepted".into()),
        ("ResolvedRefs=True".into(), "ResolvedRefs".into()),
    ]
}

/// The time every condition is stamped with.
const NOW: &str = "2026-03-01T00:00:00Z";

fn params(controller_name: &str) -> Params {
    Params {
        controller_name: controller_name.to_owned(),
        now: Time(NOW.parse().expect("time")),
        backend_filter: crate::backend_filter::BackendFilter::default(),
        limits: crate::model::limits::Limits::default(),
        crd_bundle: crate::model::CrdBundle::NotRead,
        node_addresses: std::collections::BTreeSet::new(),
        other_nodes_addresses: std::collections::BTreeSet::new(),
    }
}

const HEAD: &str = "apiVersion: sockgate.dev/v1alpha1\nkind: ListenerPolicy\n";

#[test]
fn gateway_listener_and_route_targets() {
    let yaml = format!(
        "{HEAD}metadata: {{name: whole-gateway, namespace: default, creationTimestamp: '2026-01-01T00:00:00Z'}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw}}]
  deny: [10.66.0.0/16]
---
{HEAD}metadata: {{name: route, namespace: other, creationTimestamp: '2026-01-01T00:00:00Z'}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: TCPRoute, name: r2}}]
  allow: [10.0.0.0/8]
  synRateLimit: {{connectionsPerSecond: 50, ipv4PrefixLength: 24}}
"
    );
    let (guards, status) = resolve(
        &policies(&yaml),
        &desired(),
        &params("sockgate.dev/gateway-controller"),
    );
    assert_eq!(
        guards.keys().copied().collect::<Vec<_>>(),
        [8080, 8081, 9000]
    );
    assert_eq!(guards[&8080].deny.len(), 1);
    assert_eq!(
        guards[&8081], guards[&8080],
        "every listener of the Gateway"
    );
    let r = guards[&9000].syn_rate.expect("rate");
    assert_eq!(
        (r.per_second, r.burst, r.prefix4, r.prefix6),
        (50, 50, 24, 128)
    );
    assert_eq!(conditions(&status, "default/whole-gateway"), [ok()]);
    assert_eq!(conditions(&status, "other/route"), [ok()]);
    let a = &status[&key("other/route")].ancestors[0];
    assert_eq!(
        (
            a.ancestor_ref.kind.as_str(),
            a.ancestor_ref.namespace.as_str()
        ),
        ("TCPRoute", "other")
    );
    assert_eq!(a.controller_name, "sockgate.dev/gateway-controller");
}

#[test]
fn section_name_targets_one_listener() {
    let yaml = format!(
        "{HEAD}metadata: {{name: one, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw, sectionName: tcp-b}}]
  deny: ['2001:db8::/32']
"
    );
    let (guards, status) = resolve(&policies(&yaml), &desired(), &params("c"));
    assert_eq!(guards.keys().copied().collect::<Vec<_>>(), [8081]);
    assert_eq!(
        status[&key("default/one")].ancestors[0]
            .ancestor_ref
            .section_name
            .as_deref(),
        Some("tcp-b")
    );
}

#[test]
fn unknown_targets_and_invalid_specs() {
    let yaml = format!(
        "{HEAD}metadata: {{name: nothing, namespace: default}}
spec:
  targetRefs:
  - {{group: gateway.networking.k8s.io, kind: Gateway, name: missing}}
  - {{group: gateway.networking.k8s.io, kind: Gateway, name: gw, sectionName: nope}}
  - {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r1}}
  - {{group: gateway.networking.k8s.io, kind: Gateway, name: gw2}}
  deny: [10.0.0.0/8]
---
{HEAD}metadata: {{name: bad-cidr, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw}}]
  allow: [10.0.0.0/40]
---
{HEAD}metadata: {{name: zero-rate, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw}}]
  synRateLimit: {{connectionsPerSecond: 0}}
"
    );
    let (guards, status) = resolve(&policies(&yaml), &desired(), &params("c"));
    assert!(guards.is_empty(), "{guards:?}");
    let not_found = vec![
        ("Accepted=False".to_owned(), "TargetNotFound".to_owned()),
        ("ResolvedRefs=False".to_owned(), "TargetNotFound".to_owned()),
    ];
    // gw2 lives in namespace `other`: a policy only targets its own namespace.
    assert_eq!(conditions(&status, "default/nothing"), vec![not_found; 4]);
    let invalid = vec![vec![
        ("Accepted=False".to_owned(), "Invalid".to_owned()),
        ("ResolvedRefs=True".to_owned(), "ResolvedRefs".to_owned()),
    ]];
    assert_eq!(conditions(&status, "default/bad-cidr"), invalid);
    assert_eq!(conditions(&status, "default/zero-rate"), invalid);
}

#[test]
fn conflicts_resolved_oldest_first() {
    // `a-newer` sorts first by name but was created later: `z-older` wins.
    let yaml = format!(
        "{HEAD}metadata: {{name: a-newer, namespace: default, creationTimestamp: '2026-02-01T00:00:00Z'}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw, sectionName: tcp-a}}]
  deny: [192.0.2.0/24]
---
{HEAD}metadata: {{name: z-older, namespace: default, creationTimestamp: '2026-01-01T00:00:00Z'}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: TCPRoute, name: r1}}]
  deny: [198.51.100.0/24]
"
    );
    let (guards, status) = resolve(&policies(&yaml), &desired(), &params("c"));
    assert_eq!(
        guards[&8080]
            .deny
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["198.51.100.0/24"]
    );
    assert_eq!(conditions(&status, "default/z-older"), [ok()]);
    let c = &status[&key("default/a-newer")].ancestors[0].conditions[0];
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", REASON_CONFLICTED)
    );
    assert!(c.message.contains("default/z-older"), "{}", c.message);
    // Same order whatever the input order.
    let mut reversed = policies(&yaml);
    reversed.reverse();
    assert_eq!(resolve(&reversed, &desired(), &params("c")).0, guards);
}

#[test]
fn crd_is_generated() {
    let y = crd_yaml().expect("yaml");
    assert!(y.contains("name: listenerpolicies.sockgate.dev"), "{y}");
    assert!(y.contains("targetRefs"), "{y}");
    assert!(y.contains("synRateLimit"), "{y}");
}

#[test]
fn conditions_carry_the_policy_generation_and_the_round_time() {
    let yaml = format!(
        "{HEAD}metadata: {{name: p, namespace: default, generation: 3}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw, sectionName: tcp-b}}]
"
    );
    let (_, status) = resolve(&policies(&yaml), &desired(), &params("c"));
    let conds = &status[&key("default/p")].ancestors[0].conditions;
    assert_eq!(conds.len(), 2);
    for c in conds {
        assert_eq!(c.observed_generation, Some(3), "{c:?}");
        let time = serde_json::to_value(c).expect("json")["lastTransitionTime"].clone();
        assert_eq!(time, NOW, "{c:?}");
    }
}
