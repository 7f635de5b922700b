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
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/envoy-gateway");
    let dir = std::env::temp_dir().join(format!("sockgate-model-e2e-{}", std::process::id()));
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

#[test]
fn manifests_drive_the_agent_and_bad_input_keeps_the_last_good_state() {
    require_root();
    let bed = Bed::new(2).expect("bed");
    let _foo = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("foo"),
    )
    .expect("foo");
    let _bar = servers::Server::start(
        bed.backend(1),
        SocketAddr::new(bed.backend_addr(1).into(), 3002),
        servers::named_echo("bar"),
    )
    .expect("bar");
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

    // A bad manifest: the error names the file and line; everything keeps serving.
    let bad = dir.0.join("zz-bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    )
    .expect("write");
    eventually("the agent reports zz-bad.yaml:6", &agent, || {
        agent.log_text().contains("zz-bad.yaml:6: unknown kind")
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
