//! The agent on the Gateway API model (`sockgate run --source files`): the Envoy Gateway
//! example served end to end, a change of the manifests reaching new connections (a
//! route moved, a listener added), and a bad manifest leaving the last good
//! configuration serving.
mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{Agent, connect, exchange, require_root};
use netbed::{Bed, servers};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn example_copy() -> Dir {
    // Unique per call: tests of this file run in parallel in one process.
    static COPIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/envoy-gateway");
    let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sockgate-model-e2e-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    for f in ["gatewayclass.yaml", "tcp-routing.yaml", "backends.yaml"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    Dir(dir)
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

/// The example's backends: Service foo (3001) and bar (3002), answering with their name.
fn foo_and_bar(bed: &Bed) -> [servers::Server; 2] {
    let foo_server = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let bar = servers::Server::start(
        bed.backend(1),
        SocketAddr::new(bed.backend_addr(1).into(), 3002),
        servers::named_echo("bar"),
    )
    .expect("bar");
    [foo_server, bar]
}

#[test]
fn manifests_drive_the_agent_and_bad_input_keeps_the_last_good_state() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let _servers = foo_and_bar(&bed);
    let dir = example_copy();
    let agent = Agent::start(
        &bed,
        &["--source", "files", "--dir", dir.0.to_str().expect("utf-8")],
        &[8088, 8089],
    );
    assert_eq!(ask(&bed, 8088), Ok("foo".into()));
    assert_eq!(ask(&bed, 8089), Ok("bar".into()));

    // Move tcp-app-1 to Service bar and add a listener baz (8090) with a route to foo.
    let routes = dir.0.join("tcp-routing.yaml");
    let text = std::fs::read_to_string(&routes).expect("read");
    let moved = text
        .replacen("    - name: foo\n      port: 3001", "    - name: bar\n      port: 3002", 1)
        .replacen(
            "  - name: bar\n    protocol: TCP\n    port: 8089\n",
            "  - name: baz\n    protocol: TCP\n    port: 8090\n  - name: bar\n    protocol: TCP\n    port: 8089\n",
            1,
        )
        + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata:\n  name: tcp-app-3\nspec:\n  parentRefs:\n  - name: tcp-gateway\n    sectionName: baz\n  rules:\n  - backendRefs:\n    - name: foo\n      port: 3001\n";
    std::fs::write(&routes, moved).expect("write");
    eventually("listener 8088 goes to bar", &agent, || {
        ask(&bed, 8088) == Ok("bar".into())
    });
    eventually("listener 8090 serves foo", &agent, || {
        ask(&bed, 8090) == Ok("foo".into())
    });
    let status = agent.status();
    let l8088 = status["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["port"] == 8088))
        .expect("8088 in the maps");
    assert_eq!(l8088["generation"], 2, "{status}");

    // A bad manifest (a Deployment, skipped, then a document that is not a Kubernetes
    // object): the error names the file and line; everything keeps serving.
    let bad = dir.0.join("zz-bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\nkind: Pod\nmetadata: {name: p}\n",
    )
    .expect("write");
    eventually("the agent reports zz-bad.yaml:9", &agent, || {
        agent
            .log_text()
            .contains("zz-bad.yaml:9: missing field `apiVersion`")
    });
    for (port, name) in [(8088, "bar"), (8089, "bar"), (8090, "foo")] {
        assert_eq!(ask(&bed, port), Ok(name.into()), "listener {port}");
    }
    assert!(
        agent
            .log_text()
            .contains("last good configuration keeps serving"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_change_leaves_established_connections_on_their_backend_and_drains_a_removed_listener() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let _servers = foo_and_bar(&bed);
    let dir = example_copy();
    let agent = Agent::start(
        &bed,
        &[
            "--source",
            "files",
            "--dir",
            dir.0.to_str().expect("utf-8"),
            "--drain-timeout",
            "4",
        ],
        &[8088, 8089],
    );
    let (a8088, a8089) = (
        SocketAddr::new(bed.node_addr().into(), 8088),
        SocketAddr::new(bed.node_addr().into(), 8089),
    );
    // Two connections established before the change, held by a client thread that
    // talks on them when told to.
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<&'static str>();
    let (out_tx, out_rx) = std::sync::mpsc::channel::<(String, String)>();
    let holder = bed
        .client()
        .spawn(move || {
            let mut on_8088 = connect(a8088).expect("connect 8088");
            let mut on_8089 = connect(a8089).expect("connect 8089");
            while let Ok(line) = cmd_rx.recv_timeout(Duration::from_secs(30)) {
                if line == "stop" {
                    break;
                }
                let a = exchange(&mut on_8088, line);
                let b = exchange(&mut on_8089, line);
                out_tx.send((a, b)).expect("send");
            }
        })
        .expect("client");
    cmd_tx.send("before\n").expect("cmd");
    let before = out_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("before");
    assert_eq!(before, ("foo: before\n".into(), "bar: before\n".into()));

    // The change: listener foo's route goes to Service bar; listener bar is removed.
    let routes = dir.0.join("tcp-routing.yaml");
    let text = std::fs::read_to_string(&routes).expect("read");
    let changed = text
        .replacen("    - name: foo\n      port: 3001", "    - name: bar\n      port: 3002", 1)
        .replacen(
            "  - name: bar\n    protocol: TCP\n    port: 8089\n    allowedRoutes:\n      kinds:\n      - kind: TCPRoute\n",
            "",
            1,
        );
    assert_ne!(changed, text, "the example has the expected shape");
    std::fs::write(&routes, changed).expect("write");
    eventually("new connections on 8088 go to bar", &agent, || {
        ask(&bed, 8088) == Ok("bar".into())
    });
    let refused = bed
        .client()
        .run(move || connect(a8089).map(|_| ()).map_err(|e| e.kind()))
        .expect("client");
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionRefused),
        "8089 stopped accepting"
    );
    let changed_at = Instant::now();

    // Established connections keep their backend, and the removed listener's one
    // still runs within the drain timeout.
    cmd_tx.send("after\n").expect("cmd");
    let after = out_rx.recv_timeout(Duration::from_secs(10)).expect("after");
    assert_eq!(after, ("foo: after\n".into(), "bar: after\n".into()));
    assert!(
        changed_at.elapsed() < Duration::from_secs(3),
        "checked inside the drain timeout"
    );

    // Past the drain timeout the removed listener's connection is closed: the next
    // exchange on it gets no reply (EOF or reset), while the other one still works.
    std::thread::sleep(Duration::from_secs(5));
    cmd_tx.send("late\n").expect("cmd");
    let late = out_rx.recv_timeout(Duration::from_secs(10));
    let _ = cmd_tx.send("stop");
    let joined = holder.join();
    match (late, joined) {
        (Ok((a, b)), Ok(())) => {
            assert_eq!(a, "foo: late\n");
            assert_eq!(b, "", "8089's connection closed after the drain timeout");
        }
        // `exchange` panics on a reset read: the holder thread ended there.
        (Err(_), Err(_)) => {}
        (late, joined) => panic!("unexpected: {late:?} {}", joined.is_ok()),
    }
    assert!(
        agent.log_text().contains("listener removed"),
        "{}",
        agent.log_text()
    );
}
