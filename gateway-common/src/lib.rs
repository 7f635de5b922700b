//! Map keys and values shared by the sockgate eBPF programs and the node agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the kernel and the
//! agent agree on the layout byte for byte, and so that `bpftool map dump` shows each
//! field by name (the maps are declared with BTF). Byte order is part of a field's name
//! where it is not host order (`addr_be`). Each type has a size assertion: changing a
//! layout is a deliberate act that also changes the pinned-map compatibility check.
//!
//! # Layout
//!
//! * [`GW_LISTENERS`]: listener port ([`ListenerKey`]) -> [`ListenerInfo`]
//! * [`GW_BACKENDS`]: [`BackendKey`] (listener port + index) -> [`Backend`]
//! * [`GW_SOCKS`]: sockhash, socket cookie (`u64`) -> socket
//! * [`GW_PEERS`]: socket cookie (`u64`) -> [`Peer`]
//! * [`GW_STATS`]: per-CPU, [`StatsKey`] (listener port + owner) -> [`ListenerStats`]
//! * [`GW_XDP_POLICY`]: listener port ([`ListenerKey`]) -> [`XdpPolicy`]
//! * [`GW_XDP_CIDR4`] / [`GW_XDP_CIDR6`]: LPM tries, prefix of [`Cidr4`] / [`Cidr6`]
//!   (listener port, allow or deny, client address) -> rule id (`u32`)
//! * [`GW_XDP_BUCKETS`]: LRU, [`BucketKey`] (listener port + masked source) -> [`Bucket`]
//! * [`GW_XDP_STATS`]: per-CPU, listener port ([`ListenerKey`]) -> [`XdpStats`]
//! * [`GW_FWD_FLOWS`]: the forward path's connection table, [`FlowKey`] (a packet's
//!   tuple as it arrives, either direction) -> [`Flow`] (how to rewrite it, state,
//!   counters)
//! * [`GW_FWD_SLOTS`]: listener port ([`ListenerKey`]) -> [`SlotTable`], the weighted
//!   backend selection table the forward program indexes by a hash of the client
//! * [`GW_FWD_ADDRS`]: [`NodeAddr`] -> `u32`, the node's own addresses (a SYN to one of
//!   them on a listener port is forwarded)
//! * [`GW_FWD_STATS`]: per-CPU, listener port ([`ListenerKey`]) -> [`FwdStats`]
//! * [`GW_FWD_EVENTS`]: ring buffer of [`FwdEvent`], one per forwarded connection the
//!   program sees end (a RST, or the FIN that completes a FIN each way)
//! * [`GW_FWD_IFACES`]: ifindex (`u32`) -> `u32`, the interfaces the forward program is
//!   attached to: a connection is forwarded only when its backend is reached by one
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit, public padding keeps the layouts visible and constructible on both sides"
)]

use core::mem::size_of;

/// Name of the listener map (listener port -> [`ListenerInfo`]).
pub const GW_LISTENERS: &str = "GW_LISTENERS";
/// Name of the backend map ([`BackendKey`] -> [`Backend`]).
pub const GW_BACKENDS: &str = "GW_BACKENDS";
/// Name of the socket hash (socket cookie -> socket).
pub const GW_SOCKS: &str = "GW_SOCKS";
/// Name of the peer map (socket cookie -> [`Peer`]).
pub const GW_PEERS: &str = "GW_PEERS";
/// Name of the per-CPU counter map ([`StatsKey`] -> [`ListenerStats`]).
pub const GW_STATS: &str = "GW_STATS";

/// Name of the XDP guard's per-listener policy map ([`ListenerKey`] -> [`XdpPolicy`]).
pub const GW_XDP_POLICY: &str = "GW_XDP_POLICY";
/// Name of the XDP guard's IPv4 client CIDR trie (prefix of [`Cidr4`] -> rule id).
pub const GW_XDP_CIDR4: &str = "GW_XDP_CIDR4";
/// Name of the XDP guard's IPv6 client CIDR trie (prefix of [`Cidr6`] -> rule id).
pub const GW_XDP_CIDR6: &str = "GW_XDP_CIDR6";
/// Name of the XDP guard's SYN token buckets ([`BucketKey`] -> [`Bucket`], LRU).
pub const GW_XDP_BUCKETS: &str = "GW_XDP_BUCKETS";
/// Name of the XDP guard's per-CPU counters ([`ListenerKey`] -> [`XdpStats`]).
pub const GW_XDP_STATS: &str = "GW_XDP_STATS";

/// Name of the forward path's connection table ([`FlowKey`] -> [`Flow`]).
pub const GW_FWD_FLOWS: &str = "GW_FWD_FLOWS";
/// Name of the forward path's backend selection tables ([`ListenerKey`] -> [`SlotTable`]).
pub const GW_FWD_SLOTS: &str = "GW_FWD_SLOTS";
/// Name of the node address set of the forward path ([`NodeAddr`] -> `u32`).
pub const GW_FWD_ADDRS: &str = "GW_FWD_ADDRS";
/// Name of the forward path's per-CPU counters ([`ListenerKey`] -> [`FwdStats`]).
pub const GW_FWD_STATS: &str = "GW_FWD_STATS";
/// Name of the set of interfaces the forward program is attached to (ifindex `u32` ->
/// `u32`).
pub const GW_FWD_IFACES: &str = "GW_FWD_IFACES";
/// Name of the forward path's ring buffer of connection ends ([`FwdEvent`]).
pub const GW_FWD_EVENTS: &str = "GW_FWD_EVENTS";

/// Every map the programs declare, in the order the loader pins them.
pub const MAP_NAMES: [&str; 16] = [
    GW_LISTENERS,
    GW_BACKENDS,
    GW_SOCKS,
    GW_PEERS,
    GW_STATS,
    GW_XDP_POLICY,
    GW_XDP_CIDR4,
    GW_XDP_CIDR6,
    GW_XDP_BUCKETS,
    GW_XDP_STATS,
    GW_FWD_FLOWS,
    GW_FWD_SLOTS,
    GW_FWD_ADDRS,
    GW_FWD_STATS,
    GW_FWD_IFACES,
    GW_FWD_EVENTS,
];

/// Capacity of [`GW_LISTENERS`].
pub const MAX_LISTENERS: u32 = 1024;
/// Capacity of [`GW_BACKENDS`] (all listeners together).
pub const MAX_BACKENDS: u32 = 16384;
/// Most backends one listener may have (indexes `0..MAX_BACKENDS_PER_LISTENER`).
pub const MAX_BACKENDS_PER_LISTENER: u32 = 256;
/// Capacity of [`GW_SOCKS`] and [`GW_PEERS`]: two entries per proxied connection.
pub const MAX_SOCKETS: u32 = 65536;
/// Capacity of [`GW_STATS`]: one entry per listener and owner.
pub const MAX_STATS: u32 = 2 * MAX_LISTENERS;

/// Name of the `sk_skb` stream verdict program.
pub const PROG_VERDICT: &str = "gw_verdict";
/// Name of the XDP listener guard program.
pub const PROG_XDP: &str = "gw_xdp";
/// Name of the forward path's tc program.
pub const PROG_FWD: &str = "gw_fwd";

/// Capacity of each of [`GW_XDP_CIDR4`] and [`GW_XDP_CIDR6`] (all listeners, allow and
/// deny together).
pub const MAX_XDP_CIDRS: u32 = 16384;
/// Capacity of [`GW_XDP_BUCKETS`]: sources tracked at once; the least recently seen
/// is evicted first.
pub const MAX_XDP_BUCKETS: u32 = 65536;

/// Key of [`GW_LISTENERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ListenerKey {
    /// TCP port of the listener, host byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}
const _: () = assert!(size_of::<ListenerKey>() == 4);

/// Value of [`GW_LISTENERS`]: what the agent programmed for one listener port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ListenerInfo {
    /// Number of entries in [`GW_BACKENDS`] for this port (indexes `0..backend_count`).
    pub backend_count: u32,
    /// Sum of the weights of those entries; 0 means every connection is rejected.
    pub total_weight: u32,
    /// `LISTENER_F_*` bits.
    pub flags: u32,
    /// Generation of the desired state that last wrote this entry.
    pub generation: u32,
    /// With [`LISTENER_F_ADDRESSED`]: how many of `addrs` the listener is served on.
    pub addr_count: u32,
    /// With [`LISTENER_F_ADDRESSED`]: the node addresses (IPv6 or IPv4-mapped, network
    /// order) the forward program takes the listener's connections on; a SYN to another
    /// address is left to the listener sockets, which are bound to the listener's
    /// addresses only. A listener on more than [`MAX_LISTENER_ADDRS`] addresses has
    /// `addr_count` 0: all of its connections take the socket paths.
    pub addrs: [[u8; 16]; MAX_LISTENER_ADDRS],
}
const _: () = assert!(size_of::<ListenerInfo>() == 20 + 16 * MAX_LISTENER_ADDRS);

/// Addresses one listener's entry holds for the forward program ([`ListenerInfo::addrs`]).
pub const MAX_LISTENER_ADDRS: usize = 4;

/// [`ListenerInfo::flags`]: the listener is draining (accepts nothing new).
pub const LISTENER_F_DRAINING: u32 = 1;
/// [`ListenerInfo::flags`]: the listener is served on some of the node's addresses only
/// (its Gateway's `spec.addresses`): the forward program takes the connections to the
/// addresses in [`ListenerInfo::addrs`] and leaves any other to the listener sockets,
/// which are bound to the listener's addresses.
pub const LISTENER_F_ADDRESSED: u32 = 2;

/// Key of [`GW_BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BackendKey {
    /// Listener port, host byte order.
    pub listener_port: u16,
    /// Always zero.
    pub _pad: u16,
    /// Index of the backend within the listener, `0..ListenerInfo::backend_count`.
    pub index: u32,
}
const _: () = assert!(size_of::<BackendKey>() == 8);

/// Value of [`GW_BACKENDS`]: one backend endpoint and its weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    /// IPv6 address, or IPv4-mapped IPv6 (`::ffff:a.b.c.d`), network byte order.
    pub addr_be: [u8; 16],
    /// TCP port, host byte order.
    pub port: u16,
    /// `AF_INET` (2) or `AF_INET6` (10): the family to connect with.
    pub family: u16,
    /// Share of new connections; 0 is never picked.
    pub weight: u32,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// Always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<Backend>() == 32);

/// [`Backend::flags`]: the backendRef is invalid; connections picked for it are rejected.
pub const BACKEND_F_INVALID: u32 = 1;

/// Value of [`GW_PEERS`]: the other socket of a proxied pair, and the state of the
/// bound on what the verdict program may queue towards it.
///
/// The agent writes an entry once, when the pair is made, and deletes it when the pair
/// ends; in between only the verdict program writes it (`bytes_redirected`,
/// `bytes_passed`, `flags`, `peer_write_seq_base`; it runs under the socket's lock),
/// so the two never race on a field.
///
/// The bound: bytes redirected to the peer wait in the peer's psock queue until its
/// TCP takes them, and nothing else limits that queue. The verdict compares what it
/// made the peer owe (`bytes_redirected + bytes_passed`) with what the peer's TCP
/// took (its `write_seq` since the pairing); above `queue_limit` it stops redirecting
/// ([`PEER_F_THROTTLED`]) and passes segments to this socket's own receive queue,
/// where they are charged to its receive buffer, so TCP closes the window towards the
/// sender. The agent forwards those parked bytes once the peer took everything
/// redirected before them; the verdict resumes redirecting only when the peer took
/// every parked byte too, so no segment overtakes another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Peer {
    /// Socket cookie of the peer socket (its key in [`GW_SOCKS`]).
    pub peer_cookie: u64,
    /// Bytes received on this socket and redirected to the peer's egress by the verdict
    /// program. The agent compares it with what the peer's TCP took before it
    /// propagates a FIN or forwards parked bytes.
    pub bytes_redirected: u64,
    /// Bytes received on this socket that the verdict program passed to this socket's
    /// own receive queue (throttled, or the redirect failed): the agent forwards them.
    pub bytes_passed: u64,
    /// Listener port the pair belongs to, host byte order (the [`GW_STATS`] key).
    pub listener_port: u16,
    /// Always zero.
    pub _pad: u16,
    /// [`DIR_CLIENT_TO_BACKEND`] when this socket is the client side, else
    /// [`DIR_BACKEND_TO_CLIENT`]: the direction of the bytes it receives.
    pub direction: u32,
    /// `PEER_F_*` bits, written by the verdict program.
    pub flags: u32,
    /// Most bytes the verdict may have redirected or parked that the peer's TCP has
    /// not taken yet; set by the agent. 0 means [`PEER_QUEUE_LIMIT`].
    pub queue_limit: u32,
    /// The peer's `tcp_sock.write_seq` when the verdict first ran on this socket
    /// (valid with [`PEER_F_BASE_SET`]): the origin of what the peer's TCP took.
    pub peer_write_seq_base: u32,
    /// The sequence number after the last payload byte the verdict program handed on
    /// (redirected, parked or dropped as a duplicate), valid with [`PEER_F_SEQ_SET`]:
    /// a segment starting before it repeats bytes already handed on.
    pub rcv_next: u32,
}
const _: () = assert!(size_of::<Peer>() == 48);

/// [`Peer::flags`]: `peer_write_seq_base` holds the peer's origin.
pub const PEER_F_BASE_SET: u32 = 1;
/// [`Peer::flags`]: the verdict parks segments on this socket instead of redirecting
/// them, until the peer's TCP took every byte redirected or parked.
pub const PEER_F_THROTTLED: u32 = 2;
/// [`Peer::flags`]: `rcv_next` holds the end of what the verdict handed on.
pub const PEER_F_SEQ_SET: u32 = 4;

/// Default [`Peer::queue_limit`]: bytes redirected (or parked) and not yet taken by the
/// peer's TCP above which the verdict program throttles a socket.
pub const PEER_QUEUE_LIMIT: u32 = 4 * 1024 * 1024;

/// Name of the read-only global of the verdict program that holds the offset of
/// `write_seq` in the kernel's `struct tcp_sock`, set by the loader from the running
/// kernel's BTF.
pub const GLOBAL_WRITE_SEQ_OFFSET: &str = "TCP_SOCK_WRITE_SEQ_OFFSET";

/// Name of the read-only global of the verdict program that holds the offset of
/// `copied_seq` in the kernel's `struct tcp_sock` (from the running kernel's BTF).
pub const GLOBAL_COPIED_SEQ_OFFSET: &str = "TCP_SOCK_COPIED_SEQ_OFFSET";

/// Name of the read-only global of the verdict program that holds the offset of `cb`
/// in the kernel's `struct sk_buff` (from the running kernel's BTF); TCP keeps a
/// segment's sequence number at the start of `cb` (`TCP_SKB_CB(skb)->seq`).
pub const GLOBAL_SKB_CB_OFFSET: &str = "SK_BUFF_CB_OFFSET";

/// Bytes received on the client socket, sent to the backend.
pub const DIR_CLIENT_TO_BACKEND: u32 = 0;
/// Bytes received on the backend socket, sent to the client.
pub const DIR_BACKEND_TO_CLIENT: u32 = 1;

/// Key of [`GW_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct StatsKey {
    /// Listener port, host byte order.
    pub listener_port: u16,
    /// Always zero.
    pub _pad: u16,
    /// Who writes this entry: [`OWNER_KERNEL`] (the eBPF programs) or
    /// [`OWNER_AGENT`] (the node agent). Each entry has exactly one writer, so the
    /// agent never overwrites a count the kernel made.
    pub owner: u32,
}
const _: () = assert!(size_of::<StatsKey>() == 8);

/// [`StatsKey::owner`]: counted by the eBPF programs.
pub const OWNER_KERNEL: u32 = 0;
/// [`StatsKey::owner`]: counted by the node agent.
pub const OWNER_AGENT: u32 = 1;

/// Value of [`GW_STATS`], per CPU: counters of one listener. Sum over CPUs and owners
/// to read them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ListenerStats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Client connections connected to a backend.
    pub connected: u64,
    /// Rejected (reset): the listener had no backend with weight > 0.
    pub rejected_no_backend: u64,
    /// Rejected (reset): the backendRef picked is invalid.
    pub rejected_invalid_backend: u64,
    /// Rejected (reset): every connect attempt failed or timed out.
    pub rejected_connect_failed: u64,
    /// Backend connect attempts that failed or timed out (retried or not).
    pub connect_failures: u64,
    /// Connections spliced in the kernel (sockmap), cumulative.
    pub kernel_connections: u64,
    /// Connections spliced in userspace (`splice(2)`), cumulative.
    pub userspace_connections: u64,
    /// Connections open now on the kernel path.
    pub active_kernel: u64,
    /// Connections open now on the userspace path.
    pub active_userspace: u64,
    /// Bytes client -> backend redirected by the kernel path.
    pub bytes_c2b_kernel: u64,
    /// Bytes backend -> client redirected by the kernel path.
    pub bytes_b2c_kernel: u64,
    /// Bytes client -> backend moved by the userspace path (and early data).
    pub bytes_c2b_userspace: u64,
    /// Bytes backend -> client moved by the userspace path (and early data).
    pub bytes_b2c_userspace: u64,
    /// Segments the verdict program redirected.
    pub redirects: u64,
    /// Segments the verdict program passed to the socket (no peer, redirect failed).
    pub passes: u64,
    /// Not collected, always 0: it counted the messages of an `sk_msg` program that is
    /// no longer attached (every send of a paired socket went through
    /// `tcp_bpf_sendmsg` for it). Kept so that pinned `GW_STATS` maps keep their
    /// layout.
    pub msgs: u64,
    /// Times the verdict program throttled a socket of a kernel-path pair (its peer
    /// had [`Peer::queue_limit`] bytes not yet taken), parking segments until the
    /// agent forwarded them.
    pub kernel_throttles: u64,
    /// Bytes at the head of received segments that repeated bytes already handed on
    /// (a retransmitted segment that partly overlaps data received before), cut off
    /// by the verdict program so that each byte reaches the peer once.
    pub duplicate_bytes_dropped: u64,
}
const _: () = assert!(size_of::<ListenerStats>() == 19 * 8);

/// Value of [`GW_XDP_POLICY`]: the XDP guard's policy of one listener. A listener
/// without an entry is only counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct XdpPolicy {
    /// `XDP_F_*` bits.
    pub flags: u32,
    /// SYNs per second admitted from one source prefix; 0 means no rate limit.
    pub syn_rate: u32,
    /// SYNs a source prefix may send at once (the bucket's size); at least 1 when
    /// `syn_rate` is set.
    pub syn_burst: u32,
    /// Prefix length an IPv4 source is aggregated on for the rate limit (0..=32).
    pub rate_prefix4: u8,
    /// Prefix length an IPv6 source is aggregated on for the rate limit (0..=128).
    pub rate_prefix6: u8,
    /// Always zero.
    pub _pad: u16,
}
const _: () = assert!(size_of::<XdpPolicy>() == 16);

/// [`XdpPolicy::flags`]: the listener has an allow list; a source matching none of its
/// entries (of either family) is dropped.
pub const XDP_F_HAS_ALLOW: u32 = 1;

/// [`Cidr4::kind`] and [`Cidr6::kind`]: an allowed client range.
pub const CIDR_ALLOW: u8 = 1;
/// [`Cidr4::kind`] and [`Cidr6::kind`]: a denied client range (wins over allow).
pub const CIDR_DENY: u8 = 2;

/// Bits of a CIDR trie key before the address: port (16), kind (8), padding (8).
/// The trie's prefix length is this plus the CIDR's own prefix length.
pub const CIDR_KEY_HEAD_BITS: u32 = 32;

/// Data of a [`GW_XDP_CIDR4`] key (after the trie's `u32` prefix length): matched bit
/// by bit from the first byte, so the listener and the kind are always matched whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Cidr4 {
    /// Listener port, network byte order (the trie matches bytes in order).
    pub port_be: [u8; 2],
    /// [`CIDR_ALLOW`] or [`CIDR_DENY`].
    pub kind: u8,
    /// Always zero.
    pub _pad: u8,
    /// Client address, network byte order.
    pub addr_be: [u8; 4],
}
const _: () = assert!(size_of::<Cidr4>() == 8);

/// Data of a [`GW_XDP_CIDR6`] key, as [`Cidr4`] for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Cidr6 {
    /// Listener port, network byte order.
    pub port_be: [u8; 2],
    /// [`CIDR_ALLOW`] or [`CIDR_DENY`].
    pub kind: u8,
    /// Always zero.
    pub _pad: u8,
    /// Client address, network byte order.
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<Cidr6>() == 20);

/// Key of [`GW_XDP_BUCKETS`]: one token bucket per listener and source prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BucketKey {
    /// Listener port, host byte order.
    pub port: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    /// Source address masked to the policy's prefix length, network byte order
    /// (IPv4 in the first 4 bytes, the rest zero).
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<BucketKey>() == 20);

/// Value of [`GW_XDP_BUCKETS`]: a SYN token bucket, kept as one word so that CPUs
/// update it with a single compare-and-swap.
///
/// The bucket is a generic cell rate algorithm (GCRA) state: with the emission
/// interval `I = ceil(10^9 / rate)` ns and `burst` tokens, a bucket whose
/// `tat_ns` is `T` holds `(now + burst * I - T) / I` tokens at `now` (at most
/// `burst`). A SYN is admitted when `max(T, now) + I - now <= burst * I`, and then
/// `T` becomes `max(T, now) + I`; a refused SYN leaves it unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Bucket {
    /// Theoretical arrival time: the `bpf_ktime_get_ns()` instant at which the bucket
    /// is full again.
    pub tat_ns: u64,
}
const _: () = assert!(size_of::<Bucket>() == 8);

/// Value of [`GW_XDP_STATS`], per CPU: what the XDP guard did for one listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct XdpStats {
    /// TCP packets to the listener's port seen by the guard.
    pub packets: u64,
    /// SYNs passed to the stack.
    pub syn_admitted: u64,
    /// SYNs dropped: the source is in a deny range.
    pub dropped_denied: u64,
    /// SYNs dropped: the listener has an allow list and the source is in none of it.
    pub dropped_not_allowed: u64,
    /// SYNs dropped: the source prefix's token bucket was empty.
    pub dropped_rate_limited: u64,
    /// Of `dropped_rate_limited`, the SYNs dropped because the bucket kept changing
    /// under this CPU (other CPUs took tokens of the same prefix at the same instant)
    /// until the compare-and-swap retries ran out: the guard fails closed there.
    pub rate_contended: u64,
}
const _: () = assert!(size_of::<XdpStats>() == 6 * 8);

impl XdpStats {
    /// Field-wise sum, for adding up per-CPU values.
    #[must_use]
    pub const fn add(mut self, o: &Self) -> Self {
        self.packets += o.packets;
        self.syn_admitted += o.syn_admitted;
        self.dropped_denied += o.dropped_denied;
        self.dropped_not_allowed += o.dropped_not_allowed;
        self.dropped_rate_limited += o.dropped_rate_limited;
        self.rate_contended += o.rate_contended;
        self
    }
}

/// Default capacity of [`GW_FWD_FLOWS`]: two entries per forwarded connection (one per
/// direction). The agent may size it at load time (`--forward-table-size`).
pub const MAX_FLOWS: u32 = 262_144;
/// Slots of one [`SlotTable`]: a power of two, so a hash picks one with a mask.
pub const FWD_SLOTS: usize = 1024;
/// Capacity of [`GW_FWD_ADDRS`].
pub const MAX_NODE_ADDRS: u32 = 256;
/// Capacity of [`GW_FWD_IFACES`].
pub const MAX_FWD_IFACES: u32 = 4096;
/// Backends the forward program tries for one client connection at most (a refused or
/// silent backend is retried on another at the client's SYN retransmission).
pub const FWD_MAX_ATTEMPTS: u32 = 4;

/// Key of [`GW_FWD_FLOWS`]: the addresses and ports of a TCP segment as it arrives at
/// the node, before translation. A connection has two entries: the client's tuple
/// (client -> node address, listener port) and the backend's (backend -> NAT address,
/// NAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    /// Source address: IPv6, or IPv4-mapped IPv6 (`::ffff:a.b.c.d`), network order.
    pub src_be: [u8; 16],
    /// Destination address, as `src_be`.
    pub dst_be: [u8; 16],
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// Always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Value of [`GW_FWD_FLOWS`]: how to rewrite the segments of one direction of a
/// forwarded connection, and what was seen of it.
///
/// The forward program creates both entries of a connection at the client's SYN and
/// updates `state`, `last_seen_ns` and the counters of the entry of each segment's
/// direction; the agent's sweeper deletes both entries once the connection is over
/// (per-state timeouts), and never an entry still in use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Flow {
    /// Source address written into the segment (the NAT address towards the
    /// backend; the listener's node address towards the client), as [`FlowKey`].
    pub new_src_be: [u8; 16],
    /// Destination address written into the segment (the backend; the client).
    pub new_dst_be: [u8; 16],
    /// Source port written (the NAT port; the listener port), host order.
    pub new_sport: u16,
    /// Destination port written (the backend's port; the client's), host order.
    pub new_dport: u16,
    /// The listener the connection came in on, host order.
    pub listener_port: u16,
    /// [`DIR_CLIENT_TO_BACKEND`] or [`DIR_BACKEND_TO_CLIENT`].
    pub direction: u8,
    /// Index of the backend in [`GW_BACKENDS`] (for the listener).
    pub backend_index: u8,
    /// Interface the translated segments leave by.
    pub out_ifindex: u32,
    /// `FLOW_S_*` bits seen in this direction.
    pub state: u32,
    /// Backends tried for this connection (client direction only): bit `i` for
    /// backend index `i % 32`, and the attempts in [`Flow::attempts`].
    pub tried: u32,
    /// Connect attempts made (client direction only).
    pub attempts: u32,
    /// `bpf_ktime_get_ns()` when the entry was made.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last segment in this direction.
    pub last_seen_ns: u64,
    /// Segments forwarded in this direction (GSO super-packets count once).
    pub packets: u64,
    /// Payload bytes forwarded in this direction (IP length less the IP and TCP
    /// headers).
    pub bytes: u64,
}
const _: () = assert!(size_of::<Flow>() == 88);

/// [`Flow::state`]: a SYN was seen in this direction (the client's SYN, the backend's
/// SYN-ACK).
pub const FLOW_S_SYN: u32 = 1;
/// [`Flow::state`]: a segment with ACK and without SYN was seen in this direction.
pub const FLOW_S_ACK: u32 = 2;
/// [`Flow::state`]: a FIN was seen in this direction.
pub const FLOW_S_FIN: u32 = 4;
/// [`Flow::state`]: a RST was seen in this direction.
pub const FLOW_S_RST: u32 = 8;
/// [`Flow::state`] of the client's entry: the program emitted the connection's
/// [`FwdEvent`] (so it emits no other, and the agent's sweeper does not log it again).
pub const FLOW_S_LOGGED: u32 = 16;

/// Size of [`GW_FWD_EVENTS`] in bytes: a power-of-two multiple of the page size
/// (256 KiB, about 2300 events waiting).
pub const FWD_EVENTS_BYTES: u32 = 256 * 1024;

/// [`FwdEvent::end`]: a FIN each way; the event is emitted at the segment carrying
/// the second of the two FINs.
pub const FWD_END_FIN: u16 = 1;
/// [`FwdEvent::end`]: the client sent a RST.
pub const FWD_END_CLIENT_RESET: u16 = 2;
/// [`FwdEvent::end`]: the backend sent a RST (after it answered the SYN).
pub const FWD_END_BACKEND_RESET: u16 = 3;

/// An event of [`GW_FWD_EVENTS`]: a forwarded connection the program saw end. The
/// counters are those of both entries when the ending segment was forwarded (that
/// segment included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FwdEvent {
    /// The client's address, as [`FlowKey::src_be`].
    pub client_be: [u8; 16],
    /// The backend's address, as [`FlowKey::src_be`].
    pub backend_be: [u8; 16],
    /// The client's port, host order.
    pub client_port: u16,
    /// The backend's port, host order.
    pub backend_port: u16,
    /// The listener the connection came in on, host order.
    pub listener_port: u16,
    /// How it ended: `FWD_END_*`.
    pub end: u16,
    /// `bpf_ktime_get_ns()` when the client's entry was made (its SYN).
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the ending segment.
    pub last_seen_ns: u64,
    /// Payload bytes client -> backend.
    pub bytes_c2b: u64,
    /// Payload bytes backend -> client.
    pub bytes_b2c: u64,
    /// Segments client -> backend (GSO super-packets count once).
    pub packets_c2b: u64,
    /// Segments backend -> client.
    pub packets_b2c: u64,
}
const _: () = assert!(size_of::<FwdEvent>() == 88);

/// Value of [`GW_FWD_SLOTS`]: the backend selection table of one listener. The
/// forward program hashes the client's address and port to a slot; the slot holds the
/// index of a backend in [`GW_BACKENDS`]. The agent fills the slots in proportion to the
/// weights (Maglev's population order, so a change of the backend set moves few
/// slots); a backend of weight 0 holds none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SlotTable {
    /// Number of filled slots: [`FWD_SLOTS`], or 0 when no backend has a weight (every
    /// SYN is then refused).
    pub filled: u32,
    /// Always zero.
    pub _pad: u32,
    /// Backend index per slot.
    pub slots: [u8; FWD_SLOTS],
}
const _: () = assert!(size_of::<SlotTable>() == 8 + FWD_SLOTS);

impl Default for SlotTable {
    fn default() -> Self {
        Self {
            filled: 0,
            _pad: 0,
            slots: [0; FWD_SLOTS],
        }
    }
}

/// Key of [`GW_FWD_ADDRS`]: an address of the node, as [`FlowKey::dst_be`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NodeAddr {
    /// IPv6, or IPv4-mapped IPv6, network order.
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<NodeAddr>() == 16);

impl From<core::net::IpAddr> for NodeAddr {
    /// IPv6 as it is, IPv4 mapped (`::ffff:a.b.c.d`).
    fn from(ip: core::net::IpAddr) -> Self {
        Self {
            addr_be: match ip {
                core::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                core::net::IpAddr::V6(a) => a.octets(),
            },
        }
    }
}

/// Value of [`GW_FWD_STATS`], per CPU: what the forward program did for one listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FwdStats {
    /// Connections the forward program took (both table entries made at a SYN).
    pub connections: u64,
    /// SYNs answered with a RST: the listener has no backend with weight > 0.
    pub rejected_no_backend: u64,
    /// SYNs answered with a RST: the backendRef picked is invalid.
    pub rejected_invalid_backend: u64,
    /// Client SYNs answered with a RST after every attempt failed (refused or silent).
    pub rejected_connect_failed: u64,
    /// Backend attempts that failed: the backend reset the SYN, or the client
    /// retransmitted its SYN before the backend answered.
    pub connect_failures: u64,
    /// SYNs passed to the node's stack (the socket paths) because no NAT port was
    /// free towards the backend.
    pub nat_exhausted: u64,
    /// SYNs passed to the node's stack because the connection table was full.
    pub table_full: u64,
    /// Segments passed to the stack because no route led to the backend or client.
    pub no_route: u64,
    /// SYNs passed to the stack (the socket paths) because the route to the backend
    /// leaves by an interface the forward program is not attached to (its replies
    /// would not be translated back).
    pub not_attached: u64,
    /// ICMP errors about forwarded segments (unreachable, fragmentation needed, packet
    /// too big, time exceeded) translated to the end that sent the segment.
    pub icmp_translated: u64,
    /// Segments client -> backend forwarded.
    pub packets_c2b: u64,
    /// Segments backend -> client forwarded.
    pub packets_b2c: u64,
    /// Payload bytes client -> backend forwarded.
    pub bytes_c2b: u64,
    /// Payload bytes backend -> client forwarded.
    pub bytes_b2c: u64,
    /// Connection ends not emitted to [`GW_FWD_EVENTS`] because it was full: the
    /// agent's sweeper logs those connections when it removes them.
    pub events_lost: u64,
}
const _: () = assert!(size_of::<FwdStats>() == 15 * 8);

impl FwdStats {
    /// Field-wise sum, for adding up per-CPU values.
    #[must_use]
    pub const fn add(mut self, o: &Self) -> Self {
        self.connections += o.connections;
        self.rejected_no_backend += o.rejected_no_backend;
        self.rejected_invalid_backend += o.rejected_invalid_backend;
        self.rejected_connect_failed += o.rejected_connect_failed;
        self.connect_failures += o.connect_failures;
        self.nat_exhausted += o.nat_exhausted;
        self.table_full += o.table_full;
        self.no_route += o.no_route;
        self.not_attached += o.not_attached;
        self.icmp_translated += o.icmp_translated;
        self.packets_c2b += o.packets_c2b;
        self.packets_b2c += o.packets_b2c;
        self.bytes_c2b += o.bytes_c2b;
        self.bytes_b2c += o.bytes_b2c;
        self.events_lost += o.events_lost;
        self
    }
}

/// Name of the read-only global of the forward program: the first NAT port.
pub const GLOBAL_FWD_PORT_MIN: &str = "FWD_PORT_MIN";
/// Name of the read-only global of the forward program: the number of NAT ports.
pub const GLOBAL_FWD_PORT_COUNT: &str = "FWD_PORT_COUNT";
/// Name of the read-only global of the forward program: backends tried per client
/// connection (at most [`FWD_MAX_ATTEMPTS`]).
pub const GLOBAL_FWD_ATTEMPTS: &str = "FWD_ATTEMPTS";
/// Name of the read-only global of the forward program: non-zero keeps the client's
/// address (no SNAT).
pub const GLOBAL_FWD_PRESERVE_CLIENT: &str = "FWD_PRESERVE_CLIENT";

/// Name of the node-local shortcut's sockhash: client sockets of the agent's network
/// namespace connected to a listener port, keyed by [`LocalKey`] (not pinned).
pub const GW_LOCAL: &str = "GW_LOCAL";
/// Name of the shortcut's per-client state, written by the eBPF programs.
pub const GW_LOCAL_STATE: &str = "GW_LOCAL_STATE";
/// Name of the shortcut's pairs, written by the agent once a client's pair is live.
pub const GW_LOCAL_PAIRS: &str = "GW_LOCAL_PAIRS";
/// Name of the shortcut's set of the node's IPv4 addresses (key: the address in
/// network byte order, value: 1), written by the agent.
pub const GW_LOCAL_ADDRS: &str = "GW_LOCAL_ADDRS";
/// Capacity of [`GW_LOCAL_ADDRS`].
pub const MAX_LOCAL_ADDRS: u32 = 1024;
/// Name of the shortcut's per-CPU counters (one [`LocalStats`]); pinned beside the
/// other maps while the shortcut is on.
pub const GW_LOCAL_STATS: &str = "GW_LOCAL_STATS";
/// Name of the shortcut's `sock_ops` program (on the cgroup v2 root).
pub const PROG_LOCAL_OPS: &str = "gw_local_ops";
/// Name of the shortcut's `sk_msg` program (on [`GW_LOCAL`]).
pub const PROG_LOCAL_MSG: &str = "gw_local_msg";
/// Name of the read-only global holding the network namespace cookie of the agent:
/// the `sock_ops` program takes only sockets of that namespace; 0 takes none.
pub const GLOBAL_LOCAL_NETNS_COOKIE: &str = "LOCAL_NETNS_COOKIE";

/// Key of [`GW_LOCAL`], [`GW_LOCAL_STATE`] and [`GW_LOCAL_PAIRS`]: a node-local client
/// socket's IPv4 4-tuple, as the client sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LocalKey {
    /// The client's address, network byte order.
    pub client_addr_be: u32,
    /// The listener's address the client connected to, network byte order.
    pub listener_addr_be: u32,
    /// The client's port, host byte order.
    pub client_port: u16,
    /// The listener port, host byte order.
    pub listener_port: u16,
}
const _: () = assert!(size_of::<LocalKey>() == 12);

/// Value of [`GW_LOCAL_STATE`]: what the `sk_msg` program did with a client's sends.
/// Written only by the eBPF programs (the `sk_msg` program runs under the client
/// socket's lock).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LocalState {
    /// Bytes of the client's sends passed to its own TCP (over loopback to the
    /// accepted socket) before the shortcut took over.
    pub tcp_bytes: u64,
    /// Bytes of the client's sends redirected to the backend socket's egress.
    pub redirected_bytes: u64,
    /// `LOCAL_F_*` bits.
    pub flags: u32,
    /// Always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<LocalState>() == 24);

/// [`LocalState::flags`]: every send of the client is redirected from now on.
pub const LOCAL_F_REDIRECTING: u32 = 1;

/// Value of [`GW_LOCAL_PAIRS`]: the kernel-path pair carrying a node-local client,
/// written by the agent once both sockets are in `GW_SOCKS` and `GW_PEERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LocalPair {
    /// Cookie of the accepted socket (its `GW_PEERS` key).
    pub client_cookie: u64,
    /// Cookie of the backend socket (its `GW_SOCKS` key): where sends are redirected.
    pub backend_cookie: u64,
    /// Bytes the client passed to its own TCP that the agent saw the backend socket's
    /// TCP take (`TCP_INFO` `tcpi_bytes_acked` + `SIOCOUTQ` since the pairing). The
    /// `sk_msg` program switches to redirecting only while its
    /// [`LocalState::tcp_bytes`] equals it: no byte passed to TCP can then be
    /// overtaken. [`u64::MAX`] until the agent checked.
    pub caught_up_to: u64,
}
const _: () = assert!(size_of::<LocalPair>() == 24);

/// Value of [`GW_LOCAL_STATS`] (per CPU, one entry): the shortcut's counters. The
/// message and byte counts are the `sk_msg` program's verdicts: a send that fails after
/// its verdict (`EAGAIN` from a full backend send buffer) and that the client retries
/// is counted again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LocalStats {
    /// Client sockets put into [`GW_LOCAL`] by the `sock_ops` program.
    pub clients: u64,
    /// Client sockets that could not be put into [`GW_LOCAL`] (map full, ...).
    pub insert_failures: u64,
    /// Sends passed to the client's own TCP (no pair yet, or not switched yet).
    pub msgs_passed: u64,
    /// Bytes of those sends.
    pub bytes_passed: u64,
    /// Sends redirected to the backend socket's egress.
    pub msgs_redirected: u64,
    /// Bytes of those sends.
    pub bytes_redirected: u64,
    /// Clients switched from passing to redirecting.
    pub switches: u64,
    /// Sends dropped because the redirect failed after the switch (the pair is ending).
    pub redirect_failures: u64,
}
const _: () = assert!(size_of::<LocalStats>() == 64);

impl LocalStats {
    /// Field-wise sum, for adding up per-CPU values.
    #[must_use]
    pub const fn add(mut self, o: &Self) -> Self {
        self.clients += o.clients;
        self.insert_failures += o.insert_failures;
        self.msgs_passed += o.msgs_passed;
        self.bytes_passed += o.bytes_passed;
        self.msgs_redirected += o.msgs_redirected;
        self.bytes_redirected += o.bytes_redirected;
        self.switches += o.switches;
        self.redirect_failures += o.redirect_failures;
        self
    }
}

#[cfg(feature = "user")]
mod user {
    //! `aya::Pod` for every map type, so the agent can read and write the maps.
    use super::{
        Backend, BackendKey, Bucket, BucketKey, Cidr4, Cidr6, Flow, FlowKey, FwdEvent, FwdStats,
        ListenerInfo, ListenerKey, ListenerStats, LocalKey, LocalPair, LocalState, LocalStats,
        NodeAddr, Peer, SlotTable, StatsKey, XdpPolicy, XdpStats,
    };

    // SAFETY: all of these are #[repr(C)], have no padding bytes left implicit (see the
    // size asserts) and are valid for any bit pattern.
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerInfo {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Peer {}
    unsafe impl aya::Pod for StatsKey {}
    unsafe impl aya::Pod for ListenerStats {}
    unsafe impl aya::Pod for XdpPolicy {}
    unsafe impl aya::Pod for Cidr4 {}
    unsafe impl aya::Pod for Cidr6 {}
    unsafe impl aya::Pod for BucketKey {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for XdpStats {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for SlotTable {}
    unsafe impl aya::Pod for NodeAddr {}
    unsafe impl aya::Pod for FwdStats {}
    unsafe impl aya::Pod for FwdEvent {}
    unsafe impl aya::Pod for LocalKey {}
    unsafe impl aya::Pod for LocalState {}
    unsafe impl aya::Pod for LocalPair {}
    unsafe impl aya::Pod for LocalStats {}
}

impl ListenerKey {
    /// The key of listener `port`.
    pub const fn new(port: u16) -> Self {
        Self { port, _pad: 0 }
    }
}

impl BackendKey {
    /// The key of backend `index` of listener `listener_port`.
    pub const fn new(listener_port: u16, index: u32) -> Self {
        Self {
            listener_port,
            _pad: 0,
            index,
        }
    }
}

impl StatsKey {
    /// The counters of listener `listener_port` written by `owner`.
    pub const fn new(listener_port: u16, owner: u32) -> Self {
        Self {
            listener_port,
            _pad: 0,
            owner,
        }
    }
}

impl ListenerStats {
    /// Field-wise sum, for adding up per-CPU and per-owner values.
    #[must_use]
    pub const fn add(mut self, o: &Self) -> Self {
        self.accepted += o.accepted;
        self.connected += o.connected;
        self.rejected_no_backend += o.rejected_no_backend;
        self.rejected_invalid_backend += o.rejected_invalid_backend;
        self.rejected_connect_failed += o.rejected_connect_failed;
        self.connect_failures += o.connect_failures;
        self.kernel_connections += o.kernel_connections;
        self.userspace_connections += o.userspace_connections;
        self.active_kernel += o.active_kernel;
        self.active_userspace += o.active_userspace;
        self.bytes_c2b_kernel += o.bytes_c2b_kernel;
        self.bytes_b2c_kernel += o.bytes_b2c_kernel;
        self.bytes_c2b_userspace += o.bytes_c2b_userspace;
        self.bytes_b2c_userspace += o.bytes_b2c_userspace;
        self.redirects += o.redirects;
        self.passes += o.passes;
        self.msgs += o.msgs;
        self.kernel_throttles += o.kernel_throttles;
        self.duplicate_bytes_dropped += o.duplicate_bytes_dropped;
        self
    }
}
