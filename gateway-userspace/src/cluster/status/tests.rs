//! The status writer against a scripted API server: the exact patches, their field
//! manager, and no write when nothing changed.
use std::pin::pin;

use gateway_api::experimental::{gatewayclasses::GatewayClassStatus, tcproutes::TcpRouteStatus};
use http::{Method, Request, Response, StatusCode};
use kube::{Client, api::GroupVersionKind, client::Body};
use tower_test::mock;

use super::*;

const CONTROLLER: &str = "sockgate.dev/gateway-controller";

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn writer() -> (StatusWriter, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1alpha2", "TCPRoute"),
        "tcproutes",
    );
    (StatusWriter::new(client, CONTROLLER, ar), handle)
}

fn condition(type_: &str, status: &str, reason: &str, time: &str) -> Value {
    json!({
        "type": type_, "status": status, "reason": reason, "message": "",
        "observedGeneration": 1, "lastTransitionTime": time,
    })
}

fn class_status(status: &str, time: &str) -> GatewayClassStatus {
    serde_json::from_value(json!({
        "conditions": [condition("Accepted", status, "Accepted", time)]
    }))
    .expect("status")
}

fn parent(controller: &str, gateway: &str, time: &str) -> Value {
    json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                      "namespace": "default", "name": gateway},
        "controllerName": controller,
        "conditions": [condition("Accepted", "True", "Accepted", time)],
    })
}

/// Answers every request with 200 and the body it got; returns (method, path and
/// query, content type, body) of each, after `n` requests.
async fn record(handle: Handle, n: usize) -> Vec<(Method, String, String, Value)> {
    let mut handle = pin!(handle);
    let mut seen = Vec::new();
    for _ in 0..n {
        let (req, send) = handle.next_request().await.expect("a request");
        let method = req.method().clone();
        let uri = req.uri().to_string();
        let ctype = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        let bytes = req.into_body().collect_bytes().await.expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("json body");
        // The server answers with the whole object: the patch plus a spec.
        let mut object = body.clone();
        object["spec"] = json!({
            "controllerName": CONTROLLER, "gatewayClassName": "sockgate", "listeners": [],
            "targetRefs": [],
        });
        send.send_response(
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(serde_json::to_vec(&object).expect("json")))
                .expect("response"),
        );
        seen.push((method, uri, ctype, body));
    }
    seen
}

/// Runs one write that must send nothing. No request may be sent: the mock would wait
/// forever for an answer, so a request shows as a timeout.
async fn assert_writes_nothing(w: &mut StatusWriter, set: &StatusSet, current: &Current) {
    let n = tokio::time::timeout(Duration::from_secs(5), w.write(set, current))
        .await
        .expect("no request sent")
        .expect("write");
    assert_eq!(n, 0);
}

/// Runs one write that must send exactly one server-side apply; returns its path and
/// query, and its body.
async fn one_apply(
    w: &mut StatusWriter,
    handle: Handle,
    set: &StatusSet,
    current: &Current,
) -> (String, Value) {
    let server = tokio::spawn(record(handle, 1));
    assert_eq!(w.write(set, current).await.expect("write"), 1);
    let (method, uri, ctype, body) = server.await.expect("server").remove(0);
    assert_eq!(method, Method::PATCH);
    assert_eq!(ctype, "application/apply-patch+yaml");
    (uri, body)
}

#[tokio::test]
async fn applies_a_new_status_with_the_field_manager() {
    let (mut w, handle) = writer();
    let mut set = StatusSet::default();
    set.gateway_classes.insert(
        "sockgate".into(),
        class_status("True", "2026-01-01T00:00:00Z"),
    );
    let (uri, body) = one_apply(&mut w, handle, &set, &Current::default()).await;
    assert_eq!(
        uri,
        "/apis/gateway.networking.k8s.io/v1/gatewayclasses/sockgate/status?&force=true&fieldManager=sockgate"
    );
    assert_eq!(body["kind"], "GatewayClass");
    assert_eq!(body["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(body["status"]["conditions"][0]["type"], "Accepted");
}

#[tokio::test]
async fn writes_nothing_when_only_the_round_time_differs() {
    let (mut w, _handle) = writer();
    let mut set = StatusSet::default();
    set.gateway_classes.insert(
        "sockgate".into(),
        class_status("True", "2026-01-01T00:05:00Z"),
    );
    let mut current = Current::default();
    current.gateway_classes.insert(
        "sockgate".into(),
        serde_json::to_value(class_status("True", "2026-01-01T00:00:00Z")).expect("json"),
    );
    assert_writes_nothing(&mut w, &set, &current).await;
    assert_eq!(w.writes, 0);
}

#[tokio::test]
async fn a_changed_condition_is_written_with_a_new_time_and_an_unchanged_one_keeps_its_time() {
    let (mut w, handle) = writer();
    let mut set = StatusSet::default();
    let status: GatewayClassStatus = serde_json::from_value(json!({"conditions": [
        condition("Accepted", "False", "InvalidParameters", "2026-01-01T00:05:00Z"),
        condition("SupportedVersion", "True", "SupportedVersion", "2026-01-01T00:05:00Z"),
    ]}))
    .expect("status");
    set.gateway_classes.insert("sockgate".into(), status);
    let mut current = Current::default();
    current.gateway_classes.insert(
        "sockgate".into(),
        json!({"conditions": [
            condition("Accepted", "True", "Accepted", "2026-01-01T00:00:00Z"),
            condition("SupportedVersion", "True", "SupportedVersion", "2026-01-01T00:00:00Z"),
        ]}),
    );
    let server = tokio::spawn(record(handle, 1));
    assert_eq!(w.write(&set, &current).await.expect("write"), 1);
    let seen = server.await.expect("server");
    let conds = &seen[0].3["status"]["conditions"];
    assert_eq!(conds[0]["lastTransitionTime"], "2026-01-01T00:05:00Z");
    assert_eq!(conds[1]["lastTransitionTime"], "2026-01-01T00:00:00Z");
}

#[tokio::test]
async fn route_parents_of_other_controllers_are_kept() {
    let (mut w, handle) = writer();
    let mut set = StatusSet::default();
    let key = ObjectKey {
        namespace: "default".into(),
        name: "foo".into(),
    };
    let ours: TcpRouteStatus = serde_json::from_value(json!({
        "parents": [parent(CONTROLLER, "tcp-gateway", "2026-01-01T00:05:00Z")]
    }))
    .expect("status");
    set.tcp_routes.insert(key.clone(), ours);
    let mut current = Current::default();
    current.tcp_routes.insert(
        key,
        json!({"parents": [parent("example.net/other", "their-gateway", "2025-12-01T00:00:00Z")]}),
    );
    let server = tokio::spawn(record(handle, 1));
    assert_eq!(w.write(&set, &current).await.expect("write"), 1);
    let seen = server.await.expect("server");
    let (_, uri, _, body) = &seen[0];
    assert_eq!(
        uri,
        "/apis/gateway.networking.k8s.io/v1alpha2/namespaces/default/tcproutes/foo/status?&force=true&fieldManager=sockgate"
    );
    let parents = body["status"]["parents"].as_array().expect("parents");
    assert_eq!(parents.len(), 2, "{body}");
    assert_eq!(parents[0]["controllerName"], "example.net/other");
    assert_eq!(parents[1]["controllerName"], CONTROLLER);

    // The next round, with the cluster now holding both, writes nothing.
    let mut current = Current::default();
    current.tcp_routes.insert(
        seen[0].3["metadata"]["name"]
            .as_str()
            .map(|_| ObjectKey {
                namespace: "default".into(),
                name: "foo".into(),
            })
            .expect("key"),
        body["status"].clone(),
    );
    assert_writes_nothing(&mut w, &set, &current).await;
    assert_eq!(w.writes, 1, "one write in all");
}

/// A policy ancestor entry; `times` are the `lastTransitionTime`s of its `Accepted` and
/// `ResolvedRefs` conditions.
fn ancestor(controller: &str, gateway: &str, accepted: &str, times: [&str; 2]) -> Value {
    json!({
        "ancestorRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                        "namespace": "default", "name": gateway},
        "controllerName": controller,
        "conditions": [
            condition("Accepted", accepted, "Accepted", times[0]),
            condition("ResolvedRefs", "True", "ResolvedRefs", times[1]),
        ],
    })
}

const T0: &str = "2026-01-01T00:00:00Z";
const T1: &str = "2026-01-01T00:05:00Z";

fn policy_key() -> ObjectKey {
    ObjectKey {
        namespace: "default".into(),
        name: "guard".into(),
    }
}

/// What reconcile computes for the policy: accepted on Gateway `gw`, stamped `time`.
fn policy_accepted_at(time: &str) -> StatusSet {
    let mut set = StatusSet::default();
    let ours: crate::policy::ListenerPolicyStatus = serde_json::from_value(
        json!({"ancestors": [ancestor(CONTROLLER, "gw", "True", [time, time])]}),
    )
    .expect("status");
    set.listener_policies.insert(policy_key(), ours);
    set
}

#[tokio::test]
async fn listener_policy_status_is_applied_keeping_other_controllers_ancestors() {
    let (mut w, handle) = writer();
    let set = policy_accepted_at(T1);
    let theirs = ancestor("example.net/other", "their-gw", "False", [T0, T0]);
    let mut current = Current::default();
    current.listener_policies.insert(
        policy_key(),
        // sockgate's old entry (not accepted then) and another controller's.
        json!({"ancestors": [ancestor(CONTROLLER, "gw", "False", [T0, T0]), theirs.clone()]}),
    );
    let (uri, body) = one_apply(&mut w, handle, &set, &current).await;
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
            // Accepted changed: the new time; ResolvedRefs held: the time it had.
            "status": {"ancestors": [theirs, ancestor(CONTROLLER, "gw", "True", [T1, T0])]},
        })
    );

    // The next round, with the cluster holding what was applied, writes nothing.
    let mut current = Current::default();
    current
        .listener_policies
        .insert(policy_key(), body["status"].clone());
    assert_writes_nothing(&mut w, &set, &current).await;
    assert_eq!(w.writes, 1, "one write in all");
}

#[tokio::test]
async fn listener_policy_status_is_not_written_when_only_times_differ() {
    let (mut w, _handle) = writer();
    let set = policy_accepted_at(T1);
    // The cluster holds the same conditions from an earlier round.
    let mut current = Current::default();
    current.listener_policies.insert(
        policy_key(),
        json!({"ancestors": [ancestor(CONTROLLER, "gw", "True", [T0, T0])]}),
    );
    assert_writes_nothing(&mut w, &set, &current).await;
}
