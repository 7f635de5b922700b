//! Writes the desired state to `GW_LISTENERS` and `GW_BACKENDS`: backends first, then
//! listeners; stale listeners deleted before stale backends.
use std::net::{IpAddr, SocketAddr};

use gateway_common::{BACKEND_F_INVALID, BackendKey, ListenerInfo, ListenerKey};
use tracing::{debug, instrument};

use crate::{
    desired::{Backend, DesiredState},
    ebpf::{Datapath, MapOpError},
};

/// The `GW_BACKENDS` value of a desired backend.
pub fn backend_value(b: &Backend) -> gateway_common::Backend {
    let mut v = gateway_common::Backend {
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
pub fn backend_addr(v: &gateway_common::Backend) -> Option<SocketAddr> {
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

/// Programs `desired` into the maps and removes entries it no longer has.
#[instrument(skip_all, fields(generation = desired.generation))]
pub fn apply(dp: &Datapath, desired: &DesiredState) -> Result<(), MapOpError> {
    for (&port, l) in &desired.listeners {
        for (i, b) in l.backends.iter().enumerate() {
            dp.set_backend(BackendKey::new(port, i as u32), backend_value(b))?;
        }
    }
    for (&port, l) in &desired.listeners {
        let info = ListenerInfo {
            backend_count: l.backends.len() as u32,
            total_weight: u32::try_from(desired.total_weight(port)).unwrap_or(u32::MAX),
            flags: 0,
            generation: desired.generation,
        };
        dp.set_listener(ListenerKey::new(port), info)?;
    }
    for key in dp.listener_keys() {
        if !desired.listeners.contains_key(&key.port) {
            debug!(listener = key.port, "removing listener entry");
            dp.remove_listener(key)?;
        }
    }
    for key in dp.backend_keys() {
        let keep = desired
            .listeners
            .get(&key.listener_port)
            .is_some_and(|l| (key.index as usize) < l.backends.len());
        if !keep {
            dp.remove_backend(key)?;
        }
    }
    Ok(())
}
