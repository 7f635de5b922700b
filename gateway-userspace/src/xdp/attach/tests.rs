use super::*;

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

fn held(list: &[(&str, u32)]) -> BTreeMap<String, Held> {
    list.iter()
        .map(|(n, index)| {
            (
                (*n).to_owned(),
                Held {
                    index: *index,
                    mode: XdpKind::Generic,
                },
            )
        })
        .collect()
}

#[test]
fn plan_attaches_desired_present_interfaces_once() {
    let ifaces = by_name(vec![iface("eth0", 2, &[]), iface("eth1", 3, &[])]);
    let steps = plan(&names(&["eth0", "eth9"]), &ifaces, &BTreeMap::new(), PROG);
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
    assert!(plan(&names(&["eth0"]), &ifaces, &held(&[("eth0", 2)]), PROG).is_empty());
}

#[test]
fn plan_forgets_a_vanished_interface_and_reattaches_its_successor() {
    let none = BTreeMap::new();
    assert_eq!(
        plan(&names(&["c0"]), &none, &held(&[("c0", 7)]), PROG),
        vec![Step::Forget {
            name: "c0".into(),
            why: "the interface is gone"
        }]
    );
    // Recreated under the same name with a new index: forget, then attach once.
    let ifaces = by_name(vec![iface("c0", 9, &[])]);
    assert_eq!(
        plan(&names(&["c0"]), &ifaces, &held(&[("c0", 7)]), PROG),
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
        plan(&names(&["c0"]), &ifaces, &held(&[("c0", 7)]), PROG),
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
        plan(&BTreeSet::new(), &none, &held(&[("c0", 7)]), PROG).len(),
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
        plan(&names(&["eth1"]), &ifaces, &held(&[("eth0", 2)]), PROG),
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
        plan(&BTreeSet::new(), &ifaces, &held(&[("eth0", 2)]), PROG),
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
