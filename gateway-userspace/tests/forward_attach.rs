//! The forward program's attachment manager with the real `gw_fwd`, in a network
//! namespace of the test's own (the test thread unshares one, and it vanishes with the
//! thread): the cluster default is the interfaces holding the Node's addresses plus
//! those the routes towards the backends leave by; it follows a backend whose route
//! moves to another interface, a pod-network interface that appears later, and one
//! that is deleted and made again. `GW_FWD_IFACES` holds the attached interfaces.
//!
//! Privileged: loads the programs (root, or `CAP_BPF` + `CAP_NET_ADMIN` +
//! `CAP_SYS_ADMIN` for the namespace).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, tc::TcAttachType};
use sockgate::{
    attach::{self, Netlink, Selection, list_ifaces},
    desired::{Backend, DesiredState, Listener},
    ebpf::{Datapath, LoadOptions},
    forward::{ForwardOptions, Timeouts},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Runs `ip ARGS` in the calling thread's network namespace.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth pair `name`/`peer`, both up, `addr` on `name`.
fn veth(name: &str, peer: &str, addr: &str) {
    ip(&["link", "add", name, "type", "veth", "peer", "name", peer]);
    ip(&["link", "set", name, "up"]);
    ip(&["link", "set", peer, "up"]);
    ip(&["addr", "add", addr, "dev", name]);
}

/// A desired state whose listener 8088 goes to `backends` (port 3001).
fn state(backends: &[&str]) -> Arc<DesiredState> {
    let mut d = DesiredState::default();
    d.listeners.insert(
        8088,
        Listener {
            port: 8088,
            backends: backends
                .iter()
                .map(|a| Backend {
                    addr: Some(SocketAddr::new(a.parse().expect("address"), 3001)),
                    weight: 1,
                    backend_ref: "default/foo:3001".to_owned(),
                    endpoint_slice: None,
                })
                .collect(),
            ..Listener::default()
        },
    );
    Arc::new(d)
}

/// The interfaces (loopback left out) carrying `prog` on their tc ingress, and the
/// names of the interfaces `GW_FWD_IFACES` holds.
async fn carrying(nl: &Netlink, dp: &Datapath, prog: u32) -> (BTreeSet<String>, BTreeSet<String>) {
    let ifaces = list_ifaces(nl.handle()).await.expect("list");
    let on = ifaces
        .values()
        .filter(|i| !i.loopback)
        .filter(|i| {
            SchedClassifier::query_tcx(&i.name, TcAttachType::Ingress)
                .is_ok_and(|(_, progs)| progs.iter().any(|p| p.id() == prog))
        })
        .map(|i| i.name.clone())
        .collect();
    let by_index: BTreeMap<u32, String> =
        ifaces.values().map(|i| (i.index, i.name.clone())).collect();
    let published = dp
        .maps
        .fwd_ifaces
        .lock()
        .expect("lock")
        .keys()
        .filter_map(Result::ok)
        .map(|i| by_index.get(&i).cloned().unwrap_or_else(|| format!("#{i}")))
        .collect();
    (on, published)
}

/// Waits (at most 10 s) until `gw_fwd` is on exactly `want` and `GW_FWD_IFACES` says so.
async fn wait_for(nl: &Netlink, dp: &Datapath, prog: u32, want: &[&str], what: &str) {
    let want: BTreeSet<String> = want.iter().map(|n| (*n).to_owned()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (on, published) = carrying(nl, dp, prog).await;
        if on == want && published == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: attached to {on:?}, GW_FWD_IFACES {published:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The namespace's links (`n0`: the Node's address; `a0` and `b0`: two ways towards
/// the backends' network `10.66.0.0/24`, by `a0` first) and the loaded programs.
fn bed(pin_dir: &std::path::Path) -> Arc<Datapath> {
    ip(&["link", "set", "lo", "up"]);
    veth("n0", "n1", "10.9.0.1/24");
    veth("a0", "a1", "10.7.0.1/24");
    veth("b0", "b1", "10.8.0.1/24");
    ip(&[
        "route",
        "add",
        "10.66.0.0/24",
        "via",
        "10.7.0.2",
        "dev",
        "a0",
    ]);
    Arc::new(
        Datapath::load(&LoadOptions {
            pin_dir: pin_dir.to_owned(),
            ..LoadOptions::default()
        })
        .expect("load"),
    )
}

#[test]
fn the_cluster_default_follows_the_node_addresses_and_the_routes_towards_the_backends() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads eBPF programs and makes a network namespace: run it as root"
    );
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sg-fwd-attach-{}", std::process::id()));
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        let dp = bed(&pin_dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (node_tx, node) = watch::channel(BTreeSet::<IpAddr>::new());
            let (desired_tx, desired) = watch::channel(state(&[]));
            let sel = Selection::NodeAndBackends { node, desired };
            let probe = Netlink::open().expect("netlink");
            let prog = dp.fwd_program_id().expect("program id");
            let shutdown = CancellationToken::new();
            let task = attach::forward::start(
                &dp,
                sel,
                ForwardOptions {
                    timeouts: Timeouts::default(),
                    drain: Duration::from_secs(1),
                    keep_pins: false,
                    access: Arc::default(),
                    names: None,
                },
                &shutdown,
            )
            .await
            .expect("start");
            // Neither the Node's addresses nor backends known: nothing attached.
            wait_for(&probe, &dp, prog, &[], "nothing known").await;
            node_tx.send_replace(["10.9.0.1".parse().expect("address")].into());
            wait_for(&probe, &dp, prog, &["n0"], "the Node's interface").await;
            desired_tx.send_replace(state(&["10.66.0.5"]));
            wait_for(&probe, &dp, prog, &["n0", "a0"], "the backend's route").await;
            assert!(pin_dir.join("links/fwd-a0").exists(), "the link is pinned");
            // The backend's route moves to b0 (a route event, no desired change).
            ip(&[
                "route",
                "replace",
                "10.66.0.0/24",
                "via",
                "10.8.0.2",
                "dev",
                "b0",
            ]);
            wait_for(&probe, &dp, prog, &["n0", "b0"], "the route moved to b0").await;
            assert!(!pin_dir.join("links/fwd-a0").exists(), "a0's link unpinned");
            // A backend in a pod network that does not exist yet: no route; then the
            // pod network's interface appears.
            desired_tx.send_replace(state(&["10.66.0.5", "10.55.0.9"]));
            tokio::time::sleep(Duration::from_millis(300)).await;
            wait_for(&probe, &dp, prog, &["n0", "b0"], "no route yet").await;
            veth("c0", "c1", "10.55.0.1/24");
            wait_for(
                &probe,
                &dp,
                prog,
                &["n0", "b0", "c0"],
                "the pod network appears",
            )
            .await;
            // Deleted and made again: attached again (GW_FWD_IFACES with the new index).
            ip(&["link", "del", "c0"]);
            wait_for(&probe, &dp, prog, &["n0", "b0"], "the pod network gone").await;
            veth("c0", "c1", "10.55.0.1/24");
            wait_for(
                &probe,
                &dp,
                prog,
                &["n0", "b0", "c0"],
                "the pod network again",
            )
            .await;
            // The backends leave: only the Node's interface stays.
            desired_tx.send_replace(state(&[]));
            wait_for(&probe, &dp, prog, &["n0"], "no backends").await;
            shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the manager stops")
                .expect("no panic");
            wait_for(&probe, &dp, prog, &[], "detached on shutdown").await;
            assert!(!pin_dir.join("links").exists(), "links unpinned");
        });
    })
    .join()
    .expect("the test thread");
}
