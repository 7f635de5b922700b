//! The agent's side of the node-local shortcut (`--local-shortcut`, off by default): once a
//! kernel-path pair is live, a client that the `sock_ops` program took (a socket of the
//! agent's network namespace) gets its `GW_LOCAL_PAIRS` entry, so the `sk_msg` program
//! can send its bytes straight into the backend socket, once a watch saw the backend
//! take every byte the client sent over loopback before (so none is overtaken). The
//! entry goes when the pair ends. Everything else of the pair (FIN, reset, replies) stays as on the kernel path:
//! see `docs/datapath.md`, "Node-local shortcut".
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use gateway_common::{LOCAL_F_REDIRECTING, LocalKey, LocalPair};
use tokio::net::TcpStream;
use tracing::debug;

use super::sock;
use crate::ebpf::Datapath;

/// The key the `sock_ops` program used for the client of `accepted`: the client's
/// address and port (the accepted socket's peer) and the listener's (its local
/// address). IPv4 only (v4-mapped addresses of a dual-stack listener included).
pub fn key_of(peer: SocketAddr, local: SocketAddr) -> Option<LocalKey> {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    Some(LocalKey {
        client_addr_be: u32::from(v4(peer.ip())?).to_be(),
        listener_addr_be: u32::from(v4(local.ip())?).to_be(),
        client_port: peer.port(),
        listener_port: local.port(),
    })
}

/// A client's `GW_LOCAL_PAIRS` entry; removed (and its watch stopped) when dropped.
pub struct LocalEntry {
    dp: Arc<Datapath>,
    key: LocalKey,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for LocalEntry {
    fn drop(&mut self) {
        self.watch.abort();
        if let Some(local) = &self.dp.local {
            if let Some(st) = local.state(&self.key) {
                debug!(
                    client_port = self.key.client_port,
                    listener = self.key.listener_port,
                    tcp_bytes = st.tcp_bytes,
                    redirected_bytes = st.redirected_bytes,
                    "node-local shortcut: pair ended"
                );
            }
            local.remove_pair(&self.key);
        }
    }
}

/// How often the node's addresses are read again for the `sock_ops` program.
pub const ADDRS_EVERY: Duration = Duration::from_secs(2);

/// Keeps `GW_LOCAL_ADDRS` equal to the addresses of the agent's namespace until
/// `shutdown` (they were first written at load): a client connecting to an address
/// added later is node-local from the next read on.
pub async fn follow_node_addrs(dp: Arc<Datapath>, shutdown: tokio_util::sync::CancellationToken) {
    let Some(local) = dp.local.as_ref() else {
        return;
    };
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(ADDRS_EVERY) => {}
        }
        let written = crate::ebpf::local::node_ipv4_addrs()
            .map_err(|e| e.to_string())
            .and_then(|a| local.set_node_addrs(&a).map_err(|e| e.to_string()));
        match written {
            Ok(changed) => {
                failing = false;
                if changed {
                    tracing::info!(
                        addrs = ?local.node_addrs(),
                        "node-local shortcut: the node's addresses changed"
                    );
                }
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "node-local shortcut: node addresses not updated (retried)");
            }
            Err(_) => {}
        }
    }
}

/// Longest pause between two checks of a client that has not switched yet.
const WATCH_MAX_PAUSE: Duration = Duration::from_millis(20);

/// Until the client switched to the shortcut: whenever the backend socket's TCP took
/// every byte the client passed to its own TCP so far, says so in the pair entry
/// (`caught_up_to`); the `sk_msg` program switches at the client's next send if it
/// passed nothing more meanwhile.
async fn watch(dp: Arc<Datapath>, key: LocalKey, pair: LocalPair, backend: OwnedFd, base: u64) {
    let Some(local) = dp.local.as_ref() else {
        return;
    };
    let mut pair = pair;
    let mut pause = Duration::from_micros(100);
    loop {
        let Some(st) = local.state(&key) else {
            return;
        };
        if st.flags & LOCAL_F_REDIRECTING != 0 {
            return;
        }
        let Ok(handed) = sock::bytes_handed_to_tcp(&backend) else {
            return;
        };
        if handed.saturating_sub(base) >= st.tcp_bytes && pair.caught_up_to != st.tcp_bytes {
            pair.caught_up_to = st.tcp_bytes;
            debug!(
                client_port = key.client_port,
                tcp_bytes = st.tcp_bytes,
                "node-local shortcut: backend took every byte sent over loopback"
            );
            if local.set_pair(key, pair).is_err() {
                return;
            }
            pause = Duration::from_micros(100);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(WATCH_MAX_PAUSE);
    }
}

/// Writes the shortcut entry of a live pair when its client is node-local; `None`
/// when the shortcut is off, the client is not node-local, or the write failed (the
/// pair then carries the client's bytes as any kernel-path pair). `backend_base` is
/// the backend socket's `bytes_handed_to_tcp` at the pairing.
pub fn enable(
    dp: &Arc<Datapath>,
    (client, backend): (&TcpStream, &TcpStream),
    (client_cookie, backend_cookie): (u64, u64),
    backend_base: u64,
) -> Option<LocalEntry> {
    let local = dp.local.as_ref()?;
    let key = key_of(client.peer_addr().ok()?, client.local_addr().ok()?)?;
    // A remote client (its address is none of the node's) costs no map lookup.
    let client_addr = std::net::Ipv4Addr::from(u32::from_be(key.client_addr_be));
    if !local.is_node_addr(client_addr) || local.state(&key).is_none() {
        return None;
    }
    let backend_fd = backend.as_fd().try_clone_to_owned().ok()?;
    let pair = LocalPair {
        client_cookie,
        backend_cookie,
        caught_up_to: u64::MAX,
    };
    if let Err(e) = local.set_pair(key, pair) {
        debug!(error = %e, "node-local shortcut: pair not written");
        return None;
    }
    debug!(
        client_port = key.client_port,
        listener = key.listener_port,
        "node-local shortcut: pair written"
    );
    let watch = tokio::spawn(watch(dp.clone(), key, pair, backend_fd, backend_base));
    Some(LocalEntry {
        dp: dp.clone(),
        key,
        watch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_from_a_dual_stack_listener_is_the_ipv4_tuple() {
        let peer: SocketAddr = "[::ffff:10.200.1.2]:40000".parse().expect("addr");
        let local: SocketAddr = "[::ffff:10.200.1.1]:8088".parse().expect("addr");
        let k = key_of(peer, local).expect("key");
        assert_eq!(k.client_addr_be, u32::from_ne_bytes([10, 200, 1, 2]));
        assert_eq!(k.listener_addr_be, u32::from_ne_bytes([10, 200, 1, 1]));
        assert_eq!((k.client_port, k.listener_port), (40000, 8088));
    }

    #[test]
    fn ipv6_clients_have_no_key() {
        let peer: SocketAddr = "[fd00::2]:40000".parse().expect("addr");
        let local: SocketAddr = "[fd00::1]:8088".parse().expect("addr");
        assert_eq!(key_of(peer, local), None);
    }
}
