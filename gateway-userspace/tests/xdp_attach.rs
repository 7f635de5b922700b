//! The XDP guard's attachment manager with the real `gw_xdp`, in a network namespace
//! of the test's own (the test thread unshares one, and it vanishes with the thread):
//! the cluster default follows the Node's addresses as they change at run time and as
//! they appear on and leave the local interfaces.
//!
//! Privileged: loads the programs (root, or `CAP_BPF` + `CAP_NET_ADMIN` +
//! `CAP_SYS_ADMIN` for the namespace).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use sockgate::{
    attach::{self, Manager, Netlink, Selection, list_ifaces},
    ebpf::{Datapath, LoadOptions},
    xdp::{AttachMode, XdpKind},
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

fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|a| a.parse().expect("address")).collect()
}

/// The XDP programs on each interface of the namespace, by name (loopback left out).
async fn programs(nl: &Netlink) -> BTreeMap<String, BTreeMap<u32, XdpKind>> {
    list_ifaces(nl.handle())
        .await
        .expect("list")
        .into_iter()
        .filter(|(_, i)| !i.loopback)
        .map(|(n, i)| (n, i.xdp))
        .collect()
}

/// Waits (at most 10 s) until the programs on the interfaces are `want`.
async fn wait_for(nl: &Netlink, want: &BTreeMap<String, BTreeMap<u32, XdpKind>>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = programs(nl).await;
        if &now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: have {now:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_cluster_default_follows_the_node_addresses() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads eBPF programs and makes a network namespace: run it as root"
    );
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sg-xdp-attach-{}", std::process::id()));
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["link", "set", "v0", "up"]);
        ip(&["link", "set", "v1", "up"]);
        ip(&["addr", "add", "10.9.0.1/24", "dev", "v0"]);
        ip(&["addr", "add", "fd00:9::2/64", "dev", "v1", "nodad"]);
        let dp = Arc::new(
            Datapath::load(&LoadOptions {
                pin_dir,
                ..LoadOptions::default()
            })
            .expect("load"),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx, rx) = watch::channel(BTreeSet::new());
            let sel = Selection::NodeAddresses(rx);
            let nl = Netlink::open().expect("netlink");
            let probe = Netlink::open().expect("netlink");
            let mut manager = Manager::new(dp.clone(), AttachMode::Auto).expect("manager");
            let prog = dp.xdp_program_id().expect("program id");
            // Addresses not known yet: nothing attached.
            assert!(
                manager
                    .sync(nl.handle(), &sel)
                    .await
                    .expect("sync")
                    .is_empty()
            );
            assert!(manager.attached().is_empty());
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(attach::run(manager, nl, sel, false, shutdown.clone()));
            let on = |names: &[&str]| -> BTreeMap<String, BTreeMap<u32, XdpKind>> {
                ["v0", "v1"]
                    .iter()
                    .map(|n| {
                        let progs = if names.contains(n) {
                            [(prog, XdpKind::Generic)].into()
                        } else {
                            BTreeMap::new()
                        };
                        ((*n).to_owned(), progs)
                    })
                    .collect()
            };
            tx.send_replace(addrs(&["10.9.0.1", "203.0.113.1"]));
            wait_for(&probe, &on(&["v0"]), "the InternalIP's interface").await;
            tx.send_replace(addrs(&["10.9.0.1", "fd00:9::2"]));
            wait_for(&probe, &on(&["v0", "v1"]), "an IPv6 address added").await;
            tx.send_replace(addrs(&["fd00:9::2"]));
            wait_for(&probe, &on(&["v1"]), "the IPv4 address removed").await;
            // The Node's address comes onto a local interface, then leaves it.
            tx.send_replace(addrs(&["10.9.0.7"]));
            wait_for(&probe, &on(&[]), "an address on no interface").await;
            ip(&["addr", "add", "10.9.0.7/24", "dev", "v1"]);
            wait_for(&probe, &on(&["v1"]), "the address added to v1").await;
            ip(&["addr", "del", "10.9.0.7/24", "dev", "v1"]);
            ip(&["addr", "add", "10.9.0.7/24", "dev", "v0"]);
            wait_for(&probe, &on(&["v0"]), "the address moved to v0").await;
            shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the manager stops")
                .expect("no panic");
            wait_for(&probe, &on(&[]), "detached on shutdown").await;
        });
    })
    .join()
    .expect("the test thread");
}
