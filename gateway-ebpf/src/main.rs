//! sockgate eBPF programs.
//!
//! * [`gw_verdict`], an `sk_skb` stream verdict program attached to `GW_SOCKS`: every
//!   segment received on a socket of a proxied pair is redirected to the egress of its
//!   peer (looked up in `GW_PEERS` by socket cookie), so no payload byte crosses into
//!   userspace. Segments of sockets without a peer, and segments whose redirect fails,
//!   are passed to the socket's own receive queue, where the agent reads them: the
//!   userspace fallback loses nothing.
//! * [`gw_msg`], an `sk_msg` program on `GW_SOCKS`: counts messages written by local
//!   senders on proxied sockets and lets them through.
//!
//! Zero-length segments (a FIN is seen that way) are dropped: the agent propagates the
//! FIN itself, only once every byte before it was handed to TCP. Counters go to the
//! per-CPU `GW_STATS`. aya-log records only rare events: a full `GW_STATS` (error), and
//! at debug level a redirect that failed although the socket has a peer (the peer is
//! closing); the agent sets the kernel-side level at load time, so debug records cost
//! nothing unless asked for.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, sk_action},
    btf_maps::{HashMap, PerCpuHashMap, SockHash},
    helpers::bpf_get_socket_cookie,
    macros::{btf_map, sk_msg, stream_verdict},
    programs::{SkBuffContext, SkMsgContext},
};
use aya_log_ebpf::{debug, error};
use gateway_common::{
    Backend, BackendKey, DIR_CLIENT_TO_BACKEND, ListenerInfo, ListenerKey, ListenerStats,
    MAX_BACKENDS, MAX_LISTENERS, MAX_SOCKETS, MAX_STATS, OWNER_KERNEL, Peer, StatsKey,
};

/// Listener port -> what is programmed for it.
#[btf_map]
static GW_LISTENERS: HashMap<ListenerKey, ListenerInfo, { MAX_LISTENERS as usize }> =
    HashMap::new();

/// Listener port + index -> backend.
#[btf_map]
static GW_BACKENDS: HashMap<BackendKey, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

/// Socket cookie -> socket, for both sockets of every kernel-path pair.
#[btf_map]
static GW_SOCKS: SockHash<u64, { MAX_SOCKETS as usize }> = SockHash::new();

/// Socket cookie -> the other socket of its pair.
#[btf_map]
static GW_PEERS: HashMap<u64, Peer, { MAX_SOCKETS as usize }> = HashMap::new();

/// Per-CPU counters per listener and owner.
#[btf_map]
static GW_STATS: PerCpuHashMap<StatsKey, ListenerStats, { MAX_STATS as usize }> =
    PerCpuHashMap::new();

/// The kernel-owned counters of `port` on this CPU, created on first use.
#[inline(always)]
fn stats(port: u16) -> Option<&'static mut ListenerStats> {
    let key = StatsKey::new(port, OWNER_KERNEL);
    if let Some(p) = GW_STATS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU; programs do not nest on one CPU.
        return Some(unsafe { &mut *p });
    }
    let zero = ListenerStats::default();
    let _ = GW_STATS.insert(&key, &zero, u64::from(BPF_NOEXIST));
    // SAFETY: as above.
    GW_STATS.get_ptr_mut(&key).map(|p| unsafe { &mut *p })
}

#[stream_verdict]
pub fn gw_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context is a valid __sk_buff for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = GW_PEERS.get_ptr_mut(&cookie) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: pointer returned by the map lookup; the verdict runs under this socket's
    // lock, so it is the only writer of this entry's counter.
    let peer: Peer = unsafe { *entry };
    let len = ctx.len();
    if len == 0 {
        // A FIN: userspace propagates it once the peer has sent everything.
        return sk_action::SK_DROP;
    }
    let mut key = peer.peer_cookie;
    let ret = GW_SOCKS.redirect_skb(&ctx, &mut key, 0);
    let redirected = ret == i64::from(sk_action::SK_PASS);
    if redirected {
        // SAFETY: as above.
        unsafe { (*entry).bytes_redirected += u64::from(len) };
    }
    if let Some(s) = stats(peer.listener_port) {
        if redirected {
            s.redirects += 1;
            if peer.direction == DIR_CLIENT_TO_BACKEND {
                s.bytes_c2b_kernel += u64::from(len);
            } else {
                s.bytes_b2c_kernel += u64::from(len);
            }
        } else {
            s.passes += 1;
        }
    } else {
        error!(
            &ctx,
            "GW_STATS is full: counters of listener {} are not kept", peer.listener_port
        );
    }
    if !redirected {
        debug!(
            &ctx,
            "redirect to socket {} failed: {} bytes kept on socket {}",
            peer.peer_cookie,
            len,
            cookie
        );
    }
    // A failed redirect (peer gone from the map) keeps the data on this socket, where
    // the agent reads it: never drop payload.
    sk_action::SK_PASS
}

#[sk_msg]
pub fn gw_msg(ctx: SkMsgContext) -> u32 {
    // sk_msg programs cannot read the socket cookie: count under port 0.
    if let Some(s) = stats(0) {
        s.msgs += 1;
    } else {
        error!(&ctx, "GW_STATS is full: sk_msg counters are not kept");
    }
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
