//! The election rules against a scripted API server: the exact requests sent.
use std::pin::pin;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tower_test::mock;

use super::*;

const NS: &str = "sockgate-system";
const NAME: &str = "sockgate-status-writer";
const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/sockgate-system/leases";

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn elector(identity: &str) -> (Elector, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let cfg = LeaseConfig {
        name: NAME.to_owned(),
        namespace: NS.to_owned(),
        identity: identity.to_owned(),
        duration: Duration::from_secs(15),
    };
    (Elector::new(client, cfg), handle)
}

fn t(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

fn lease(holder: Option<&str>, renewed: &str, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": NAME, "namespace": NS, "resourceVersion": "41" },
        "spec": {
            "holderIdentity": holder,
            "acquireTime": "2026-01-01T00:00:00.000000Z",
            "renewTime": renewed,
            "leaseDurationSeconds": 15,
            "leaseTransitions": transitions,
        }
    })
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "NotFound", "code": 404, "message": "leases not found"}),
    )
}

fn conflict() -> (StatusCode, Value) {
    (
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
    )
}

/// Serves the scripted exchanges in order: each is the expected method and path
/// (query dropped), and the answer; returns the JSON bodies the client sent.
async fn serve(handle: Handle, script: Vec<(Method, String, (StatusCode, Value))>) -> Vec<Value> {
    let mut handle = pin!(handle);
    let mut bodies = Vec::new();
    for (method, path, (code, answer)) in script {
        let (req, send) = handle.next_request().await.expect("a request");
        assert_eq!(req.method(), method, "{}", req.uri());
        assert_eq!(req.uri().path(), path);
        let bytes = req.into_body().collect_bytes().await.expect("body");
        bodies.push(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                .expect("response"),
        );
    }
    bodies
}

fn ok(v: Value) -> (StatusCode, Value) {
    (StatusCode::OK, v)
}

#[tokio::test]
async fn creates_the_lease_when_there_is_none() {
    let (mut e, handle) = elector("node-a");
    let script = vec![
        (Method::GET, format!("{PATH}/{NAME}"), not_found()),
        (
            Method::POST,
            PATH.to_owned(),
            (
                StatusCode::CREATED,
                lease(Some("node-a"), "2026-01-01T00:00:10.000000Z", 0),
            ),
        ),
    ];
    let server = tokio::spawn(serve(handle, script));
    assert!(e.round(t("2026-01-01T00:00:10Z")).await.expect("round"));
    assert!(e.is_leader());
    let bodies = server.await.expect("server");
    let spec = &bodies[1]["spec"];
    assert_eq!(spec["holderIdentity"], "node-a");
    assert_eq!(spec["leaseDurationSeconds"], 15);
    assert_eq!(spec["leaseTransitions"], 0);
    assert_eq!(spec["renewTime"], "2026-01-01T00:00:10.000000Z");
}

#[tokio::test]
async fn leaves_a_live_lease_of_another_agent_alone() {
    let (mut e, handle) = elector("node-b");
    // Renewed 10 s ago, 15 s duration: still node-a's. Only the GET is sent.
    let script = vec![(
        Method::GET,
        format!("{PATH}/{NAME}"),
        ok(lease(Some("node-a"), "2026-01-01T00:00:00.000000Z", 0)),
    )];
    let server = tokio::spawn(serve(handle, script));
    assert!(!e.round(t("2026-01-01T00:00:10Z")).await.expect("round"));
    server.await.expect("server");
}

#[tokio::test]
async fn takes_over_an_expired_lease_with_its_resource_version() {
    let (mut e, handle) = elector("node-b");
    let script = vec![
        (
            Method::GET,
            format!("{PATH}/{NAME}"),
            ok(lease(Some("node-a"), "2026-01-01T00:00:00.000000Z", 3)),
        ),
        (
            Method::PUT,
            format!("{PATH}/{NAME}"),
            ok(lease(Some("node-b"), "2026-01-01T00:00:16.000000Z", 4)),
        ),
    ];
    let server = tokio::spawn(serve(handle, script));
    assert!(e.round(t("2026-01-01T00:00:16Z")).await.expect("round"));
    let bodies = server.await.expect("server");
    let put = &bodies[1];
    assert_eq!(
        put["metadata"]["resourceVersion"], "41",
        "optimistic concurrency"
    );
    assert_eq!(put["spec"]["holderIdentity"], "node-b");
    assert_eq!(put["spec"]["leaseTransitions"], 4);
    assert_eq!(put["spec"]["acquireTime"], "2026-01-01T00:00:16.000000Z");
}

#[tokio::test]
async fn renews_its_own_lease() {
    let (mut e, handle) = elector("node-a");
    let script = vec![
        (
            Method::GET,
            format!("{PATH}/{NAME}"),
            ok(lease(Some("node-a"), "2026-01-01T00:00:00.000000Z", 0)),
        ),
        (
            Method::PUT,
            format!("{PATH}/{NAME}"),
            ok(lease(Some("node-a"), "2026-01-01T00:00:05.000000Z", 0)),
        ),
    ];
    let server = tokio::spawn(serve(handle, script));
    assert!(e.round(t("2026-01-01T00:00:05Z")).await.expect("round"));
    let bodies = server.await.expect("server");
    assert_eq!(bodies[1]["spec"]["holderIdentity"], "node-a");
    assert_eq!(
        bodies[1]["spec"]["leaseTransitions"], 0,
        "a renewal is no transition"
    );
    assert_eq!(
        bodies[1]["spec"]["acquireTime"],
        "2026-01-01T00:00:00.000000Z"
    );
}

#[tokio::test]
async fn a_lost_race_is_not_leading_and_not_an_error() {
    let (mut e, handle) = elector("node-b");
    let script = vec![
        (
            Method::GET,
            format!("{PATH}/{NAME}"),
            ok(lease(None, "2026-01-01T00:00:00.000000Z", 1)),
        ),
        (Method::PUT, format!("{PATH}/{NAME}"), conflict()),
    ];
    let server = tokio::spawn(serve(handle, script));
    assert!(!e.round(t("2026-01-01T00:00:01Z")).await.expect("no error"));
    assert!(!e.is_leader());
    server.await.expect("server");
}

#[tokio::test]
async fn handover_release_then_the_other_agent_takes_it_at_once() {
    // node-a holds and releases.
    let (mut a, handle) = elector("node-a");
    let script = vec![
        (
            Method::GET,
            format!("{PATH}/{NAME}"),
            ok(lease(Some("node-a"), "2026-01-01T00:00:00.000000Z", 2)),
        ),
        (
            Method::PUT,
            format!("{PATH}/{NAME}"),
            ok(lease(Some("node-a"), "2026-01-01T00:00:01.000000Z", 2)),
        ),
        (
            Method::GET,
            format!("{PATH}/{NAME}"),
            ok(lease(Some("node-a"), "2026-01-01T00:00:01.000000Z", 2)),
        ),
        (
            Method::PUT,
            format!("{PATH}/{NAME}"),
            ok(lease(None, "2026-01-01T00:00:01.000000Z", 2)),
        ),
    ];
    let server = tokio::spawn(serve(handle, script));
    assert!(a.round(t("2026-01-01T00:00:01Z")).await.expect("round"));
    a.release().await.expect("release");
    assert!(!a.is_leader());
    let bodies = server.await.expect("server");
    assert!(
        bodies[3]["spec"]["holderIdentity"].is_null(),
        "{}",
        bodies[3]
    );

    // node-b, two seconds later (long before expiry), takes the released lease.
    let (mut b, handle) = elector("node-b");
    let script = vec![
        (
            Method::GET,
            format!("{PATH}/{NAME}"),
            ok(lease(None, "2026-01-01T00:00:01.000000Z", 2)),
        ),
        (
            Method::PUT,
            format!("{PATH}/{NAME}"),
            ok(lease(Some("node-b"), "2026-01-01T00:00:03.000000Z", 3)),
        ),
    ];
    let server = tokio::spawn(serve(handle, script));
    assert!(b.round(t("2026-01-01T00:00:03Z")).await.expect("round"));
    let bodies = server.await.expect("server");
    assert_eq!(bodies[1]["spec"]["holderIdentity"], "node-b");
    assert_eq!(bodies[1]["spec"]["leaseTransitions"], 3);
}
