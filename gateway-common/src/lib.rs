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

/// Every map the programs declare, in the order the loader pins them.
pub const MAP_NAMES: [&str; 10] = [
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
/// Name of the `sk_msg` program.
pub const PROG_MSG: &str = "gw_msg";
/// Name of the XDP listener guard program.
pub const PROG_XDP: &str = "gw_xdp";

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
}
const _: () = assert!(size_of::<ListenerInfo>() == 16);

/// [`ListenerInfo::flags`]: the listener is draining (accepts nothing new).
pub const LISTENER_F_DRAINING: u32 = 1;

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
    /// Messages seen by the `sk_msg` program.
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

#[cfg(feature = "user")]
mod user {
    //! `aya::Pod` for every map type, so the agent can read and write the maps.
    use super::{
        Backend, BackendKey, Bucket, BucketKey, Cidr4, Cidr6, ListenerInfo, ListenerKey,
        ListenerStats, Peer, StatsKey, XdpPolicy, XdpStats,
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
