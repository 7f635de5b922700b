//! The node-local shortcut (`--local-shortcut`, off by default): a client socket of the
//! agent's network namespace that connects to a listener port skips the loopback hop
//! for what it sends.
//!
//! * [`gw_local_ops`], a `sock_ops` program on the cgroup v2 root: at
//!   `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB` it puts such a socket (one connected to a
//!   listener port at an address of the node, `GW_LOCAL_ADDRS`) into `GW_LOCAL` (keyed
//!   by its 4-tuple, [`LocalKey`]) with a zeroed `GW_LOCAL_STATE` entry, and removes
//!   the state when the socket closes (`BPF_SOCK_OPS_STATE_CB`).
//! * [`gw_local_msg`], the `sk_msg` program of `GW_LOCAL`: once the agent wrote the
//!   client's pair (`GW_LOCAL_PAIRS`) and saw the backend socket's TCP take every byte
//!   the client sent through its own TCP (`caught_up_to` equals the program's
//!   `tcp_bytes`), it redirects each send to the backend
//!   socket's egress (`bpf_msg_redirect_hash` on `GW_SOCKS`, synchronous: the bytes
//!   are in the backend's write queue when the client's `sendmsg` returns). Until then
//!   it passes, so nothing is reordered; after the switch it never passes again.
//!
//! Replies are not shortcut (they take the plain kernel pair and loopback): see
//! `docs/datapath.md`, "Node-local shortcut". `GW_SOCKS` never gets an `sk_msg`
//! program: remote clients' pairs are untouched.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, sk_action,
    },
    btf_maps::{HashMap, PerCpuArray, SockHash},
    helpers::bpf_get_netns_cookie,
    macros::{btf_map, sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use gateway_common::{
    LOCAL_F_REDIRECTING, ListenerKey, LocalKey, LocalPair, LocalState, LocalStats, MAX_LOCAL_ADDRS,
    MAX_SOCKETS,
};

use crate::{GW_LISTENERS, GW_SOCKS};

/// Client sockets of the agent's namespace connected to a listener port.
#[btf_map]
static GW_LOCAL: SockHash<LocalKey, { MAX_SOCKETS as usize }> = SockHash::new();

/// What [`gw_local_msg`] did with each client's sends (written by the programs only).
#[btf_map]
static GW_LOCAL_STATE: HashMap<LocalKey, LocalState, { MAX_SOCKETS as usize }> = HashMap::new();

/// The kernel-path pair of each node-local client, written by the agent.
#[btf_map]
static GW_LOCAL_PAIRS: HashMap<LocalKey, LocalPair, { MAX_SOCKETS as usize }> = HashMap::new();

/// The node's own IPv4 addresses (network byte order), written by the agent: a
/// connection to a listener port is node-local only when its remote address is one of
/// them (or in 127.0.0.0/8). A socket connecting to a remote host on a port that happens
/// to be a listener port is left alone.
#[btf_map]
static GW_LOCAL_ADDRS: HashMap<u32, u8, { MAX_LOCAL_ADDRS as usize }> = HashMap::new();

/// The shortcut's counters.
#[btf_map]
static GW_LOCAL_STATS: PerCpuArray<LocalStats, 1> = PerCpuArray::new();

/// The agent's network namespace cookie, set by the loader; 0 leaves every socket
/// alone.
#[unsafe(no_mangle)]
static LOCAL_NETNS_COOKIE: u64 = 0;

const AF_INET: u32 = 2;

#[inline(always)]
fn stats() -> Option<&'static mut LocalStats> {
    // SAFETY: per-CPU value of this CPU; programs do not nest on one CPU.
    GW_LOCAL_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// A port as `sock_ops` and `sk_msg` contexts give the remote one: the network-order
/// 16 bits, shifted left by 16 on little-endian kernels. Host byte order.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    let v = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(v as u16)
}

/// Whether `addr_be` (network byte order) is an address of the node: 127.0.0.0/8 or
/// one of `GW_LOCAL_ADDRS`.
#[inline(always)]
fn is_node_addr(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127 || GW_LOCAL_ADDRS.get_ptr(&addr_be).is_some()
}

#[sock_ops]
pub fn gw_local_ops(ctx: SockOpsContext) -> u32 {
    // SAFETY: a read-only global.
    let netns = unsafe { core::ptr::read_volatile(&raw const LOCAL_NETNS_COOKIE) };
    if netns == 0 || ctx.family() != AF_INET {
        return 1;
    }
    let key = LocalKey {
        client_addr_be: ctx.local_ip4(),
        listener_addr_be: ctx.remote_ip4(),
        client_port: ctx.local_port() as u16,
        listener_port: remote_port(ctx.remote_port()),
    };
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: the context is a valid bpf_sock_ops.
            if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != netns {
                return 1;
            }
            let lk = ListenerKey {
                port: key.listener_port,
                _pad: 0,
            };
            if GW_LISTENERS.get_ptr(&lk).is_none() || !is_node_addr(key.listener_addr_be) {
                return 1;
            }
            if GW_LOCAL_STATE
                .insert(&key, &LocalState::default(), u64::from(BPF_ANY))
                .is_err()
            {
                if let Some(s) = stats() {
                    s.insert_failures += 1;
                }
                return 1;
            }
            let mut k = key;
            // SAFETY: the context is a valid bpf_sock_ops.
            let ops = unsafe { &mut *ctx.ops };
            if GW_LOCAL.update(&mut k, ops, u64::from(BPF_ANY)).is_err() {
                let _ = GW_LOCAL_STATE.remove(&key);
                if let Some(s) = stats() {
                    s.insert_failures += 1;
                }
                return 1;
            }
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            if let Some(s) = stats() {
                s.clients += 1;
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args[1] is the new state; the sockhash drops a closed socket by itself.
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let _ = GW_LOCAL_STATE.remove(&key);
            }
        }
        _ => {}
    }
    1
}

#[sk_msg]
pub fn gw_local_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context is a valid sk_msg_md.
    let md = unsafe { &*ctx.msg };
    let key = LocalKey {
        client_addr_be: md.local_ip4,
        listener_addr_be: md.remote_ip4,
        client_port: md.local_port as u16,
        listener_port: remote_port(md.remote_port),
    };
    let size = u64::from(ctx.size());
    let Some(state) = GW_LOCAL_STATE.get_ptr_mut(&key) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: map value pointer; this program runs under the client socket's lock, the
    // only writer of the entry besides its creation and removal by `gw_local_ops`.
    let st: LocalState = unsafe { *state };
    // SAFETY: a copy of the value is taken at once.
    let pair = unsafe { GW_LOCAL_PAIRS.get(&key) }.copied();
    let redirect = match pair {
        Some(ref p) if st.flags & LOCAL_F_REDIRECTING != 0 => Some(p.backend_cookie),
        Some(ref p) if p.caught_up_to == st.tcp_bytes => {
            // SAFETY: as above.
            unsafe { (*state).flags = st.flags | LOCAL_F_REDIRECTING };
            if let Some(s) = stats() {
                s.switches += 1;
            }
            Some(p.backend_cookie)
        }
        _ => None,
    };
    let Some(mut cookie) = redirect else {
        if st.flags & LOCAL_F_REDIRECTING != 0 {
            // Switched, but the pair is gone: passing now could reorder.
            if let Some(s) = stats() {
                s.redirect_failures += 1;
            }
            return sk_action::SK_DROP;
        }
        // SAFETY: as above.
        unsafe { (*state).tcp_bytes = st.tcp_bytes + size };
        if let Some(s) = stats() {
            s.msgs_passed += 1;
            s.bytes_passed += size;
        }
        return sk_action::SK_PASS;
    };
    if GW_SOCKS.redirect_msg(&ctx, &mut cookie, 0) == i64::from(sk_action::SK_PASS) {
        // SAFETY: as above.
        unsafe { (*state).redirected_bytes = st.redirected_bytes + size };
        if let Some(s) = stats() {
            s.msgs_redirected += 1;
            s.bytes_redirected += size;
        }
        sk_action::SK_PASS
    } else {
        if let Some(s) = stats() {
            s.redirect_failures += 1;
        }
        sk_action::SK_DROP
    }
}
