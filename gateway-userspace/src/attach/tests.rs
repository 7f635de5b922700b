use std::net::SocketAddr;

use super::{xdp::mode_for, *};
use crate::{
    desired::{Backend, Listener},
    xdp::AttachMode,
};

fn iface(name: &str, index: u32, addrs: &[&str]) -> Iface {
    Iface {
        name: name.to_owned(),
        index,
        addrs: addrs.iter().map(|a| a.parse().expect("address")).collect(),
        ..Iface::default()
    }
}

fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|a| a.parse().expect("address")).collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| (*n).to_owned()).collect()
}

fn by_name(list: Vec<Iface>) -> BTreeMap<String, Iface> {
    list.into_iter().map(|i| (i.name.clone(), i)).collect()
}

#[test]
fn interfaces_holding_the_node_addresses() {
    let mut lo = iface("lo", 1, &["127.0.0.1", "::1", "10.0.0.9"]);
    lo.loopback = true;
    let ifaces = [
        lo,
        iface("eth0", 2, &["10.0.0.5", "fe80::1"]),
        iface("eth1", 3, &["192.168.1.7", "2001:db8::7"]),
        iface("cni0", 4, &["10.244.0.1"]),
        iface("down0", 5, &[]),
    ];
    // InternalIP on eth0, an IPv6 address on eth1.
    assert_eq!(
        holding(&addrs(&["10.0.0.5", "2001:db8::7"]), &ifaces),
        names(&["eth0", "eth1"])
    );
    // An ExternalIP that is NATed (not local) selects nothing by itself.
    assert_eq!(
        holding(&addrs(&["10.0.0.5", "203.0.113.9"]), &ifaces),
        names(&["eth0"])
    );
    assert!(holding(&addrs(&["203.0.113.9"]), &ifaces).is_empty());
    // A node address on a loopback device is not guarded there.
    assert!(holding(&addrs(&["10.0.0.9"]), &ifaces).is_empty());
    assert!(holding(&BTreeSet::new(), &ifaces).is_empty());
    // IPv6 is compared as an address, not as text.
    assert_eq!(
        holding(&addrs(&["2001:0db8:0000::0007"]), &ifaces),
        names(&["eth1"])
    );
}

#[test]
fn auto_takes_generic_on_veth_and_native_elsewhere() {
    let mut veth = iface("c0", 2, &[]);
    veth.kind = Some("veth".into());
    let nic = iface("eth0", 3, &[]);
    let mut bridge = iface("br0", 4, &[]);
    bridge.kind = Some("bridge".into());
    assert_eq!(mode_for(AttachMode::Auto, &veth).0, XdpKind::Generic);
    assert_eq!(mode_for(AttachMode::Auto, &veth).1, None);
    assert_eq!(
        mode_for(AttachMode::Auto, &nic).0
            ..=mode_for(AttachMode::Auto, &nic)
                .1
                .unwrap_or(XdpKind::Offload),
        XdpKind::Native..=XdpKind::Generic,
        "native first, generic when refused"
    );
    assert_eq!(
        mode_for(AttachMode::Auto, &bridge).1,
        Some(XdpKind::Generic)
    );
    assert_eq!(
        mode_for(AttachMode::Native, &veth),
        (XdpKind::Native, None, "--xdp-mode native")
    );
    assert_eq!(mode_for(AttachMode::Generic, &nic).0, XdpKind::Generic);
    assert_eq!(mode_for(AttachMode::Generic, &nic).1, None);
}

const PROG: u32 = 42;

fn with_prog(mut i: Iface, id: u32) -> Iface {
    i.xdp.insert(id, XdpKind::Generic);
    i
}

fn held(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
    list.iter()
        .map(|(n, index)| ((*n).to_owned(), *index))
        .collect()
}

/// Whether the XDP program `id` is on an interface (the guard's [`Hook::carries`]).
fn carrying(id: u32) -> impl Fn(&Iface) -> bool {
    move |i| i.xdp.contains_key(&id)
}

/// The guard's desired set under `sel` (no backend routes).
fn desired(sel: &Selection, ifaces: &BTreeMap<String, Iface>) -> (BTreeSet<String>, String) {
    super::desired(sel, ifaces, &BTreeMap::new(), <xdp::Guard as Hook>::WORDS)
}

#[test]
fn plan_attaches_desired_present_interfaces_once() {
    let ifaces = by_name(vec![iface("eth0", 2, &[]), iface("eth1", 3, &[])]);
    let steps = plan(
        &names(&["eth0", "eth9"]),
        &ifaces,
        &BTreeMap::new(),
        carrying(PROG),
    );
    assert_eq!(
        steps,
        vec![Step::Attach {
            name: "eth0".into(),
            index: 2
        }],
        "a missing interface waits"
    );
    // Attached and still carrying our program: nothing to do.
    let ifaces = by_name(vec![with_prog(iface("eth0", 2, &[]), PROG)]);
    assert!(
        plan(
            &names(&["eth0"]),
            &ifaces,
            &held(&[("eth0", 2)]),
            carrying(PROG)
        )
        .is_empty()
    );
}

#[test]
fn plan_forgets_a_vanished_interface_and_reattaches_its_successor() {
    let none = BTreeMap::new();
    assert_eq!(
        plan(&names(&["c0"]), &none, &held(&[("c0", 7)]), carrying(PROG)),
        vec![Step::Forget {
            name: "c0".into(),
            why: "the interface is gone"
        }]
    );
    // Recreated under the same name with a new index: forget, then attach once.
    let ifaces = by_name(vec![iface("c0", 9, &[])]);
    assert_eq!(
        plan(
            &names(&["c0"]),
            &ifaces,
            &held(&[("c0", 7)]),
            carrying(PROG)
        ),
        vec![
            Step::Forget {
                name: "c0".into(),
                why: "the interface was replaced (new ifindex)"
            },
            Step::Attach {
                name: "c0".into(),
                index: 9
            }
        ]
    );
    // Same index, but the kernel no longer shows our program (the link was detached
    // behind our back, or another program replaced it).
    let ifaces = by_name(vec![with_prog(iface("c0", 7, &[]), PROG + 1)]);
    assert_eq!(
        plan(
            &names(&["c0"]),
            &ifaces,
            &held(&[("c0", 7)]),
            carrying(PROG)
        ),
        vec![
            Step::Forget {
                name: "c0".into(),
                why: "the program is no longer attached"
            },
            Step::Attach {
                name: "c0".into(),
                index: 7
            }
        ]
    );
    // Gone and no longer desired: forgotten only.
    assert_eq!(
        plan(&BTreeSet::new(), &none, &held(&[("c0", 7)]), carrying(PROG)).len(),
        1
    );
}

#[test]
fn plan_follows_a_changing_desired_set() {
    let ifaces = by_name(vec![
        with_prog(iface("eth0", 2, &[]), PROG),
        iface("eth1", 3, &[]),
    ]);
    assert_eq!(
        plan(
            &names(&["eth1"]),
            &ifaces,
            &held(&[("eth0", 2)]),
            carrying(PROG)
        ),
        vec![
            Step::Detach {
                name: "eth0".into()
            },
            Step::Attach {
                name: "eth1".into(),
                index: 3
            }
        ]
    );
    assert_eq!(
        plan(
            &BTreeSet::new(),
            &ifaces,
            &held(&[("eth0", 2)]),
            carrying(PROG)
        ),
        vec![Step::Detach {
            name: "eth0".into()
        }]
    );
}

#[test]
fn desired_set_of_each_selection() {
    let ifaces = by_name(vec![
        iface("eth0", 2, &["10.0.0.5"]),
        iface("eth1", 3, &["2001:db8::7"]),
    ]);
    assert!(desired(&Selection::Off, &ifaces).0.is_empty());
    assert_eq!(
        desired(&Selection::Named(names(&["eth9"])), &ifaces).0,
        names(&["eth9"])
    );
    let (tx, rx) = watch::channel(BTreeSet::new());
    let sel = Selection::NodeAddresses(rx);
    let (set, why) = desired(&sel, &ifaces);
    assert!(set.is_empty());
    assert!(why.contains("not known yet"), "{why}");
    tx.send_replace(addrs(&["2001:db8::7"]));
    assert_eq!(desired(&sel, &ifaces).0, names(&["eth1"]));
    tx.send_replace(addrs(&["10.0.0.5", "2001:db8::7"]));
    assert_eq!(desired(&sel, &ifaces).0, names(&["eth0", "eth1"]));
}

/// A desired state whose listener 8088 goes to `backends` (port 3001).
fn state(backends: &[&str]) -> Arc<DesiredState> {
    let backends = backends
        .iter()
        .map(|a| Backend {
            addr: Some(SocketAddr::new(a.parse().expect("address"), 3001)),
            weight: 1,
            backend_ref: "default/foo:3001".to_owned(),
            endpoint_slice: None,
        })
        .collect();
    let mut d = DesiredState::default();
    d.listeners.insert(
        8088,
        Listener {
            port: 8088,
            backends,
            ..Listener::default()
        },
    );
    Arc::new(d)
}

/// The output interface of each backend address.
fn routes(list: &[(&str, u32)]) -> BTreeMap<IpAddr, u32> {
    list.iter()
        .map(|(a, i)| (a.parse().expect("address"), *i))
        .collect()
}

/// The forward program's desired set under `sel` with `routes`.
fn forward_set(
    sel: &Selection,
    ifaces: &BTreeMap<String, Iface>,
    routes: &BTreeMap<IpAddr, u32>,
) -> (BTreeSet<String>, String) {
    super::desired(sel, ifaces, routes, <forward::Program as Hook>::WORDS)
}

#[test]
fn forward_default_is_the_node_addresses_and_the_routes_towards_the_backends() {
    let mut lo = iface("lo", 1, &["127.0.0.1"]);
    lo.loopback = true;
    let ifaces = by_name(vec![
        lo,
        iface("eth0", 2, &["10.0.0.5"]),
        iface("cni0", 3, &["10.244.0.1"]),
        iface("eth1", 4, &["192.168.1.7"]),
    ]);
    let (node_tx, node) = watch::channel(BTreeSet::new());
    let (desired_tx, desired) = watch::channel(state(&[]));
    let sel = Selection::NodeAndBackends { node, desired };
    assert!(sel.follows_routes());
    let (set, why) = forward_set(&sel, &ifaces, &BTreeMap::new());
    assert!(set.is_empty());
    assert!(
        why.contains("not known yet") && why.contains("no backends yet"),
        "{why}"
    );
    // The Node's address on eth0; two backends behind cni0, one behind eth0, one on the
    // node itself (its route leaves by lo: not forwarded), one without a route.
    node_tx.send_replace(addrs(&["10.0.0.5"]));
    desired_tx.send_replace(state(&[
        "10.244.0.7",
        "10.244.0.8",
        "10.0.0.9",
        "127.0.0.2",
        "198.51.100.1",
    ]));
    assert_eq!(
        sel.backends(),
        addrs(&[
            "10.244.0.7",
            "10.244.0.8",
            "10.0.0.9",
            "127.0.0.2",
            "198.51.100.1"
        ])
    );
    let r = routes(&[
        ("10.244.0.7", 3),
        ("10.244.0.8", 3),
        ("10.0.0.9", 2),
        ("127.0.0.2", 1),
    ]);
    let (set, why) = forward_set(&sel, &ifaces, &r);
    assert_eq!(set, names(&["eth0", "cni0"]), "the union, each once");
    assert!(why.contains("they hold the Node's addresses"), "{why}");
    assert!(
        why.contains("cni0 towards 10.244.0.7, 10.244.0.8")
            && why.contains("eth0 towards 10.0.0.9"),
        "{why}"
    );
    // Backends only, the Node's addresses unknown: the backends' interfaces.
    node_tx.send_replace(BTreeSet::new());
    assert_eq!(forward_set(&sel, &ifaces, &r).0, names(&["eth0", "cni0"]));
    let (set, why) = forward_set(&sel, &ifaces, &routes(&[("10.244.0.7", 1)]));
    assert!(set.is_empty());
    assert!(
        why.contains("no route towards the backends leaves by a local interface"),
        "{why}"
    );
}

#[test]
fn forward_default_follows_a_backend_to_another_interface() {
    let ifaces = by_name(vec![
        iface("eth0", 2, &["10.0.0.5"]),
        iface("cni0", 3, &["10.244.0.1"]),
        iface("eth1", 4, &["192.168.1.7"]),
    ]);
    let (_node_tx, node) = watch::channel(addrs(&["10.0.0.5"]));
    let (_desired_tx, desired) = watch::channel(state(&["10.244.1.7"]));
    let sel = Selection::NodeAndBackends { node, desired };
    let before = forward_set(&sel, &ifaces, &routes(&[("10.244.1.7", 3)])).0;
    assert_eq!(before, names(&["eth0", "cni0"]));
    // The route towards the backend now leaves by eth1: cni0 is detached, eth1
    // attached, eth0 (the Node's) kept.
    let after = forward_set(&sel, &ifaces, &routes(&[("10.244.1.7", 4)])).0;
    assert_eq!(after, names(&["eth0", "eth1"]));
    let mut with_prog = ifaces.clone();
    for i in with_prog.values_mut() {
        i.xdp.insert(PROG, XdpKind::Generic);
    }
    assert_eq!(
        plan(
            &after,
            &with_prog,
            &held(&[("eth0", 2), ("cni0", 3)]),
            carrying(PROG)
        ),
        vec![
            Step::Detach {
                name: "cni0".into()
            },
            Step::Attach {
                name: "eth1".into(),
                index: 4
            }
        ]
    );
}

#[test]
fn forward_default_reattaches_a_recreated_pod_network_interface() {
    let (_node_tx, node) = watch::channel(addrs(&["10.0.0.5"]));
    let (_desired_tx, desired) = watch::channel(state(&["10.244.1.7"]));
    let sel = Selection::NodeAndBackends { node, desired };
    // Before the pod network exists, the backend's route leaves by eth0 (the default
    // route).
    let ifaces = by_name(vec![with_prog(iface("eth0", 2, &["10.0.0.5"]), PROG)]);
    let want = forward_set(&sel, &ifaces, &routes(&[("10.244.1.7", 2)])).0;
    assert_eq!(want, names(&["eth0"]));
    assert!(plan(&want, &ifaces, &held(&[("eth0", 2)]), carrying(PROG)).is_empty());
    // cni0 appears with the route towards the pods: attached.
    let mut ifaces = ifaces;
    ifaces.insert("cni0".into(), iface("cni0", 7, &["10.244.0.1"]));
    let want = forward_set(&sel, &ifaces, &routes(&[("10.244.1.7", 7)])).0;
    assert_eq!(want, names(&["eth0", "cni0"]));
    assert_eq!(
        plan(&want, &ifaces, &held(&[("eth0", 2)]), carrying(PROG)),
        vec![Step::Attach {
            name: "cni0".into(),
            index: 7
        }]
    );
    // cni0 deleted and made again (new index, the route with it): forgotten, then
    // attached once to the new one.
    ifaces.insert("cni0".into(), iface("cni0", 9, &["10.244.0.1"]));
    let want = forward_set(&sel, &ifaces, &routes(&[("10.244.1.7", 9)])).0;
    assert_eq!(want, names(&["eth0", "cni0"]));
    assert_eq!(
        plan(
            &want,
            &ifaces,
            &held(&[("eth0", 2), ("cni0", 7)]),
            carrying(PROG)
        ),
        vec![
            Step::Forget {
                name: "cni0".into(),
                why: "the interface was replaced (new ifindex)"
            },
            Step::Attach {
                name: "cni0".into(),
                index: 9
            }
        ]
    );
}

#[test]
fn backend_addresses_of_every_listener_each_once() {
    let mut d = (*state(&["10.1.0.1", "fd00::1"])).clone();
    d.listeners.insert(
        9000,
        Listener {
            port: 9000,
            addresses: Vec::new(),
            backends: vec![
                Backend {
                    addr: Some("10.1.0.1:80".parse().expect("address")),
                    weight: 1,
                    backend_ref: String::new(),
                    endpoint_slice: None,
                },
                Backend {
                    addr: None,
                    weight: 1,
                    backend_ref: "invalid".into(),
                    endpoint_slice: None,
                },
            ],
            ..Listener::default()
        },
    );
    assert_eq!(backend_addrs(&d), addrs(&["10.1.0.1", "fd00::1"]));
}
