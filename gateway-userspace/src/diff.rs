//! The map delta: what `GW_LISTENERS` and `GW_BACKENDS` should hold for a desired state
//! ([`Programmed::of`]), and the operations that take the maps from what they hold to
//! that ([`diff`]). Pure: no aya; [`mapsync`](crate::mapsync) executes the operations.
//!
//! Order (katran): backend writes first, then listener writes, so a listener never
//! counts an index that is not written yet; then deletes in reverse: listeners, then
//! backends.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use gateway_common::{
    BACKEND_F_INVALID, Backend, BackendKey, LISTENER_F_ADDRESSED, ListenerInfo, ListenerKey,
    MAX_LISTENER_ADDRS, NodeAddr,
};

use crate::desired::{self, DesiredState};

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or replace a `GW_BACKENDS` entry.
    SetBackend(BackendKey, Backend),
    /// Insert or replace a `GW_LISTENERS` entry.
    SetListener(ListenerKey, ListenerInfo),
    /// Delete a `GW_LISTENERS` entry.
    RemoveListener(ListenerKey),
    /// Delete a `GW_BACKENDS` entry.
    RemoveBackend(BackendKey),
}

/// The content of `GW_LISTENERS` and `GW_BACKENDS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    /// `GW_LISTENERS`.
    pub listeners: BTreeMap<ListenerKey, ListenerInfo>,
    /// `GW_BACKENDS`.
    pub backends: BTreeMap<BackendKey, Backend>,
}

/// The `GW_BACKENDS` value of a desired backend.
pub fn backend_value(b: &desired::Backend) -> Backend {
    let mut v = Backend {
        weight: b.weight,
        ..Default::default()
    };
    match b.addr {
        None => v.flags = BACKEND_F_INVALID,
        Some(SocketAddr::V4(a)) => {
            v.addr_be = a.ip().to_ipv6_mapped().octets();
            v.port = a.port();
            v.family = libc::AF_INET as u16;
        }
        Some(SocketAddr::V6(a)) => {
            v.addr_be = a.ip().octets();
            v.port = a.port();
            v.family = libc::AF_INET6 as u16;
        }
    }
    v
}

/// The socket address of a `GW_BACKENDS` value, `None` for an invalid backend.
pub fn backend_addr(v: &Backend) -> Option<SocketAddr> {
    if v.flags & BACKEND_F_INVALID != 0 {
        return None;
    }
    let ip6 = std::net::Ipv6Addr::from(v.addr_be);
    let ip: IpAddr = match ip6.to_ipv4_mapped() {
        Some(v4) if v.family == libc::AF_INET as u16 => v4.into(),
        _ => ip6.into(),
    };
    Some(SocketAddr::new(ip, v.port))
}

/// The address fields of a listener's entry: its addresses when they fit, else none
/// (the forward program then leaves all its connections to the sockets).
fn listener_addrs(addresses: &[IpAddr]) -> ListenerInfo {
    let mut info = ListenerInfo::default();
    if addresses.len() <= MAX_LISTENER_ADDRS {
        for (slot, a) in info.addrs.iter_mut().zip(addresses) {
            *slot = NodeAddr::from(*a).addr_be;
        }
        info.addr_count = addresses.len() as u32;
    }
    info
}

impl Programmed {
    /// What the maps hold once `desired` is programmed.
    pub fn of(desired: &DesiredState) -> Self {
        let mut p = Self::default();
        for (&port, l) in &desired.listeners {
            for (i, b) in l.backends.iter().enumerate() {
                p.backends
                    .insert(BackendKey::new(port, i as u32), backend_value(b));
            }
            p.listeners.insert(
                ListenerKey::new(port),
                ListenerInfo {
                    backend_count: l.backends.len() as u32,
                    total_weight: u32::try_from(desired.total_weight(port)).unwrap_or(u32::MAX),
                    flags: if l.addresses.is_empty() {
                        0
                    } else {
                        LISTENER_F_ADDRESSED
                    },
                    generation: desired.generation,
                    ..listener_addrs(&l.addresses)
                },
            );
        }
        p
    }

    /// Applies one operation, as the map writer does.
    pub fn apply(&mut self, op: &MapOp) {
        match *op {
            MapOp::SetBackend(k, v) => {
                self.backends.insert(k, v);
            }
            MapOp::SetListener(k, v) => {
                self.listeners.insert(k, v);
            }
            MapOp::RemoveListener(k) => {
                self.listeners.remove(&k);
            }
            MapOp::RemoveBackend(k) => {
                self.backends.remove(&k);
            }
        }
    }
}

/// The operations that turn `current` into [`Programmed::of`]`(desired)`: only entries
/// that differ are written.
pub fn diff(current: &Programmed, desired: &DesiredState) -> Vec<MapOp> {
    let target = Programmed::of(desired);
    let mut ops = Vec::new();
    for (k, v) in &target.backends {
        if current.backends.get(k) != Some(v) {
            ops.push(MapOp::SetBackend(*k, *v));
        }
    }
    for (k, v) in &target.listeners {
        if current.listeners.get(k) != Some(v) {
            ops.push(MapOp::SetListener(*k, *v));
        }
    }
    for k in current.listeners.keys().rev() {
        if !target.listeners.contains_key(k) {
            ops.push(MapOp::RemoveListener(*k));
        }
    }
    for k in current.backends.keys().rev() {
        if !target.backends.contains_key(k) {
            ops.push(MapOp::RemoveBackend(*k));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::desired::Listener;

    fn arb_backend() -> impl Strategy<Value = desired::Backend> {
        (any::<Option<(u8, u16)>>(), 0u32..1000).prop_map(|(addr, weight)| desired::Backend {
            addr: addr.map(|(h, p)| SocketAddr::from(([10, 0, 0, h], p))),
            weight,
            backend_ref: String::new(),
            endpoint_slice: None,
        })
    }

    fn arb_desired() -> impl Strategy<Value = DesiredState> {
        (
            0u32..4,
            prop::collection::btree_map(
                8000u16..8006,
                prop::collection::vec(arb_backend(), 0..6),
                0..5,
            ),
        )
            .prop_map(|(generation, ls)| DesiredState {
                generation,
                guards: BTreeMap::new(),
                refused: Vec::new(),
                left_out: Vec::new(),
                unready: Vec::new(),
                listeners: ls
                    .into_iter()
                    .map(|(port, backends)| {
                        (
                            port,
                            Listener {
                                port,
                                backends,
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
            })
    }

    fn rank(op: &MapOp) -> u8 {
        match op {
            MapOp::SetBackend(..) => 0,
            MapOp::SetListener(..) => 1,
            MapOp::RemoveListener(..) => 2,
            MapOp::RemoveBackend(..) => 3,
        }
    }

    proptest! {
        #[test]
        fn applying_the_diff_gives_the_target(a in arb_desired(), b in arb_desired()) {
            let mut maps = Programmed::of(&a);
            let ops = diff(&maps, &b);
            for op in &ops {
                maps.apply(op);
            }
            prop_assert_eq!(&maps, &Programmed::of(&b));
            prop_assert!(diff(&maps, &b).is_empty());
            prop_assert!(ops.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])), "{:?}", ops);
        }

        #[test]
        fn listeners_never_count_unwritten_backends(a in arb_desired(), b in arb_desired()) {
            // After every single operation, each listener's backends are all present.
            let mut maps = Programmed::of(&a);
            for op in diff(&maps, &b) {
                maps.apply(&op);
                for (k, info) in &maps.listeners {
                    for i in 0..info.backend_count {
                        prop_assert!(maps.backends.contains_key(&BackendKey::new(k.port, i)));
                    }
                }
            }
        }
    }

    #[test]
    fn invalid_backend_round_trips() {
        let v = backend_value(&desired::Backend {
            addr: None,
            weight: 3,
            backend_ref: String::new(),
            endpoint_slice: None,
        });
        assert_eq!(backend_addr(&v), None);
        let a: SocketAddr = "[2001:db8::1]:80".parse().expect("addr");
        let v = backend_value(&desired::Backend {
            addr: Some(a),
            weight: 1,
            backend_ref: String::new(),
            endpoint_slice: None,
        });
        assert_eq!(backend_addr(&v), Some(a));
    }

    #[test]
    fn a_listener_on_some_addresses_is_flagged_for_the_forward_program() {
        let mut d = DesiredState::default();
        for (port, addresses) in [
            (8000, vec![]),
            (8001, vec!["192.0.2.10".parse().expect("ip")]),
        ] {
            d.listeners.insert(
                port,
                Listener {
                    port,
                    addresses,
                    ..Default::default()
                },
            );
        }
        let p = Programmed::of(&d);
        assert_eq!(p.listeners[&ListenerKey::new(8000)].flags, 0);
        let addressed = p.listeners[&ListenerKey::new(8001)];
        assert_eq!(addressed.flags, LISTENER_F_ADDRESSED);
        assert_eq!(addressed.addr_count, 1);
        assert_eq!(
            addressed.addrs[0],
            "192.0.2.10"
                .parse::<std::net::Ipv4Addr>()
                .expect("ip")
                .to_ipv6_mapped()
                .octets()
        );
        // More addresses than an entry holds: none, all connections to the sockets.
        let many: Vec<IpAddr> = (1..=5u8).map(|i| IpAddr::from([192, 0, 2, i])).collect();
        let info = listener_addrs(&many);
        assert_eq!((info.addr_count, info.addrs), (0, Default::default()));
        // Moving to other addresses or to every address rewrites the entry.
        let mut every = d.clone();
        every
            .listeners
            .get_mut(&8001)
            .expect("8001")
            .addresses
            .clear();
        assert_eq!(
            diff(&p, &every),
            vec![MapOp::SetListener(
                ListenerKey::new(8001),
                ListenerInfo {
                    flags: 0,
                    addr_count: 0,
                    addrs: Default::default(),
                    ..p.listeners[&ListenerKey::new(8001)]
                }
            )]
        );
    }
}
