//! sockgate eBPF programs.
//!
//! * [`gw_verdict`], an `sk_skb` stream verdict program attached to `GW_SOCKS`: every
//!   segment received on a socket of a proxied pair is redirected to the egress of its
//!   peer (looked up in `GW_PEERS` by socket cookie), so no payload byte crosses into
//!   userspace. Segments of sockets without a peer, and segments whose redirect fails,
//!   are passed to the socket's own receive queue, where the agent reads them: the
//!   userspace fallback loses nothing.
//! * No `sk_msg` program on `GW_SOCKS`: one would send every byte of a paired socket
//!   through `tcp_bpf_sendmsg` (an extra copy into an `sk_msg`). The node-local
//!   shortcut ([`local`], `--local-shortcut`) has its own sockhash and `sk_msg` program, for
//!   node-local client sockets only.
//! * [`xdp::gw_xdp`], the XDP listener guard: per-listener client CIDR policy and SYN
//!   rate limit at the NIC (see the module).
//! * [`forward::gw_fwd`], the forward data path: a tc program that translates and
//!   redirects the segments of TCPRoute connections without terminating them (see the
//!   module).
//!
//! Zero-length segments (a FIN is seen that way) are dropped: the agent propagates the
//! FIN itself, only once every byte before it was handed to TCP. Counters go to the
//! per-CPU `GW_STATS`. aya-log records only rare events: a full `GW_STATS` (error), and
//! at debug level a redirect that failed although the socket has a peer (the peer is
//! closing); the agent sets the kernel-side level at load time, so debug records cost
//! nothing unless asked for.
#![no_std]
#![no_main]
// `atomic_cxchg` for the XDP guard's token buckets: core's `AtomicU64` has no
// compare-and-swap on bpfel-unknown-none (its target spec says `atomic-cas: false`),
// although BPF ISA v3 has `BPF_CMPXCHG` and LLVM emits it.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics, for atomic_cxchg (see above)"
)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, sk_action},
    btf_maps::{HashMap, PerCpuHashMap, SockHash},
    helpers::{
        bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_probe_read_kernel, bpf_sk_release,
        bpf_skc_to_tcp_sock,
    },
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, error};
use gateway_common::{
    Backend, BackendKey, DIR_CLIENT_TO_BACKEND, ListenerInfo, ListenerKey, ListenerStats,
    MAX_BACKENDS, MAX_LISTENERS, MAX_SOCKETS, MAX_STATS, OWNER_KERNEL, PEER_F_BASE_SET,
    PEER_F_SEQ_SET, PEER_F_THROTTLED, PEER_QUEUE_LIMIT, Peer, StatsKey,
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

/// Offset of `write_seq` in the kernel's `struct tcp_sock`: set by the loader from the
/// running kernel's BTF (a read-only global, so the verifier sees a constant).
#[unsafe(no_mangle)]
static TCP_SOCK_WRITE_SEQ_OFFSET: u32 = 0;

/// Offset of `copied_seq` in the kernel's `struct tcp_sock`, set like the one above.
#[unsafe(no_mangle)]
static TCP_SOCK_COPIED_SEQ_OFFSET: u32 = 0;

/// Offset of `cb` in the kernel's `struct sk_buff`, set like the ones above; 0 leaves
/// duplicate detection off. TCP keeps a segment's first sequence number at the start
/// of `cb` (`TCP_SKB_CB(skb)->seq`).
#[unsafe(no_mangle)]
static SK_BUFF_CB_OFFSET: u32 = 0;

/// The `u32` at `offset` (a read-only global) in the `tcp_sock` of the socket with
/// `cookie` in the sockhash. `None` when that socket is not in the sockhash.
#[inline(always)]
fn tcp_sock_u32(cookie: u64, offset: &'static u32) -> Option<u32> {
    let mut key = cookie;
    // SAFETY: lookup in the sockhash by a key on the stack; a socket it returns holds
    // a reference that is released below on every path.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::from_ref(&GW_SOCKS).cast_mut().cast(),
            core::ptr::from_mut(&mut key).cast(),
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: sk is a socket from the lookup.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let value = if tp.is_null() {
        None
    } else {
        // SAFETY: a constant offset (read-only global) into a BTF-typed tcp_sock; the
        // verifier checks it names a 4-byte field.
        Some(unsafe {
            let off = core::ptr::read_volatile(offset);
            core::ptr::read_volatile(tp.cast::<u8>().add(off as usize).cast::<u32>())
        })
    };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk) };
    value
}

/// The peer socket's `tcp_sock.write_seq`: the sequence number after the last byte its
/// TCP took from a sender (queued or sent). `None` when the peer is not in the
/// sockhash.
#[inline(always)]
fn peer_write_seq(peer_cookie: u64) -> Option<u32> {
    tcp_sock_u32(peer_cookie, &TCP_SOCK_WRITE_SEQ_OFFSET)
}

/// The sequence number of the segment's first byte (`TCP_SKB_CB(skb)->seq`), read
/// from the kernel's `sk_buff` behind the context. `None` when the loader did not set
/// the offset or the read fails.
#[inline(always)]
fn skb_seq(ctx: &SkBuffContext) -> Option<u32> {
    // SAFETY: a read-only global.
    let off = unsafe { core::ptr::read_volatile(&raw const SK_BUFF_CB_OFFSET) };
    if off == 0 {
        return None;
    }
    // At run time the context of an sk_skb program is the kernel's `struct sk_buff`.
    let src = ctx
        .as_ptr()
        .cast::<u8>()
        .wrapping_add(off as usize)
        .cast::<u32>();
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(src) }.ok()
}

/// Largest cut `bpf_skb_adjust_room()` makes at once on an sk_skb segment.
const TRIM_STEP: u32 = 0xfff;
/// Cuts of [`TRIM_STEP`] tried at most: enough for a 128 KiB overlap (a segment is at
/// most 64 KiB without BIG TCP).
const TRIM_STEPS: u32 = 32;

/// Removes the first `n` bytes of the segment. False when it could not remove them
/// all (some may be gone).
#[inline(always)]
fn trim_head(ctx: &SkBuffContext, n: u32) -> bool {
    let mut left = n;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            return true;
        }
        let step = if left < TRIM_STEP { left } else { TRIM_STEP };
        #[allow(clippy::cast_possible_wrap)]
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return false;
        }
        left -= step;
    }
    left == 0
}

#[stream_verdict]
pub fn gw_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context is a valid __sk_buff for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = GW_PEERS.get_ptr_mut(&cookie) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: pointer returned by the map lookup; the verdict runs under this socket's
    // lock, so it is the only writer of this entry's counters and flags.
    let peer: Peer = unsafe { *entry };
    let mut len = ctx.len();
    if len == 0 {
        // A FIN: userspace propagates it once the peer has sent everything.
        return sk_action::SK_DROP;
    }
    let mut flags = peer.flags;
    // TCP queues a retransmitted segment that starts before `rcv_nxt` as it is when it
    // also carries new bytes (`tcp_data_queue()`); `tcp_recvmsg()` skips the old head
    // by offset, but `tcp_read_skb()` hands the verdict the whole segment. Cut the head
    // that was handed on already, so that each byte reaches the peer once.
    let mut duplicate = 0;
    if let Some(seq) = skb_seq(&ctx) {
        let mut next = peer.rcv_next;
        if flags & PEER_F_SEQ_SET == 0 {
            // The first segment the verdict sees: bytes before the socket's
            // `copied_seq` were read by the agent before the pair was made.
            next = tcp_sock_u32(cookie, &TCP_SOCK_COPIED_SEQ_OFFSET).unwrap_or(seq);
            flags |= PEER_F_SEQ_SET;
            debug!(
                &ctx,
                "socket {}: first segment seq {} len {}, copied_seq {}", cookie, seq, len, next
            );
        }
        let end = seq.wrapping_add(len);
        let overlap = next.wrapping_sub(seq) as i32;
        if overlap > 0 {
            let overlap = overlap as u32;
            if overlap >= len {
                // Every byte was handed on before.
                duplicate = len;
            } else if trim_head(&ctx, overlap) {
                duplicate = overlap;
            } else {
                error!(
                    &ctx,
                    "socket {}: cannot cut {} repeated bytes off a segment of {}",
                    cookie,
                    overlap,
                    len
                );
            }
        }
        // The end of what is handed on, never moving back.
        if (end.wrapping_sub(next) as i32) > 0 {
            next = end;
        }
        // SAFETY: as below.
        unsafe {
            (*entry).rcv_next = next;
            (*entry).flags = flags;
        }
        if duplicate > 0 {
            if let Some(s) = stats(peer.listener_port) {
                s.duplicate_bytes_dropped += u64::from(duplicate);
            }
            if duplicate == len {
                return sk_action::SK_DROP;
            }
            len -= duplicate;
        }
    }
    let mut base = peer.peer_write_seq_base;
    // Bytes the peer's stream owes for this socket, minus what its TCP took: the psock
    // queue towards the peer plus parked bytes the agent has not forwarded yet. Sequence
    // arithmetic (mod 2^32) is exact while that stays below 2 GiB, which the limit
    // keeps it far from.
    let outstanding = match peer_write_seq(peer.peer_cookie) {
        Some(seq) => {
            if flags & PEER_F_BASE_SET == 0 {
                // Nothing of this socket reached the peer before its first segment.
                base = seq;
                flags |= PEER_F_BASE_SET;
            }
            let taken = seq.wrapping_sub(base);
            let owed = (peer.bytes_redirected.wrapping_add(peer.bytes_passed)) as u32;
            Some(owed.wrapping_sub(taken) as i32)
        }
        None => None,
    };
    let limit = if peer.queue_limit == 0 {
        PEER_QUEUE_LIMIT
    } else {
        peer.queue_limit
    };
    let mut throttled_now = false;
    let park = match outstanding {
        // Peer gone from the sockhash: keep the data here for the agent.
        None => true,
        // Throttled: keep parking until the peer took every byte, parked ones too,
        // so that nothing redirected can overtake a parked byte.
        Some(o) if flags & PEER_F_THROTTLED != 0 => o > 0,
        Some(o) => {
            throttled_now = o > 0 && o as u32 > limit;
            throttled_now
        }
    };
    let mut redirected = false;
    if !park {
        let mut key = peer.peer_cookie;
        redirected = GW_SOCKS.redirect_skb(&ctx, &mut key, 0) == i64::from(sk_action::SK_PASS);
    }
    if redirected {
        flags &= !PEER_F_THROTTLED;
    } else {
        // Parked, or the redirect failed: the agent forwards these bytes, and nothing
        // is redirected again before the peer took them.
        flags |= PEER_F_THROTTLED;
    }
    // SAFETY: as above.
    unsafe {
        if redirected {
            (*entry).bytes_redirected += u64::from(len);
        } else {
            (*entry).bytes_passed += u64::from(len);
        }
        (*entry).flags = flags;
        (*entry).peer_write_seq_base = base;
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
        if throttled_now {
            s.kernel_throttles += 1;
        }
    } else {
        error!(
            &ctx,
            "GW_STATS is full: counters of listener {} are not kept", peer.listener_port
        );
    }
    if outstanding.is_none() || (!park && !redirected) {
        // Not a throttle (that is counted, not logged): the peer left the sockhash.
        debug!(
            &ctx,
            "redirect to socket {} failed: {} bytes kept on socket {}",
            peer.peer_cookie,
            len,
            cookie
        );
    }
    // Parked data, and data whose redirect failed, stay on this socket, where the agent
    // reads them: never drop payload.
    sk_action::SK_PASS
}

mod forward;
mod local;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
