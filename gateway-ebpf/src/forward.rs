//! `gw_fwd`, the forward data path: a tc ingress program that carries TCPRoute
//! connections through the node as translated packets, without terminating them.
//!
//! On every interface it is attached to, for each TCP segment:
//!
//! 1. The segment's tuple is looked up in the connection table `GW_FWD_FLOWS`. A hit
//!    is a segment of a forwarded connection, in either direction: its addresses and
//!    ports are rewritten as the entry says (client -> node:listener becomes NAT
//!    address:port -> backend; backend -> NAT address:port becomes node:listener ->
//!    client), the IPv4 header and TCP checksums are updated incrementally (the kernel's
//!    `inet_proto_csum_replace*` keeps `CHECKSUM_PARTIAL` super-packets right), and the
//!    segment is redirected with `bpf_redirect_neigh` to the entry's interface. The
//!    node's TCP stack never sees it.
//! 2. A miss that is a SYN (SYN set, ACK clear) to one of the node's addresses
//!    (`GW_FWD_ADDRS`) on a listener port (`GW_LISTENERS`) opens a connection: the
//!    backend is the slot of the listener's selection table (`GW_FWD_SLOTS`) that a
//!    hash of the client's address and port picks, the NAT address is the source the
//!    FIB picks towards the backend, and the NAT port is one of the reserved range that
//!    no other connection to that backend holds (both entries are inserted with
//!    `BPF_NOEXIST`, so two connections never share a tuple). No backend with a weight,
//!    or an invalid backendRef picked: the SYN is answered with a RST from here.
//!    A listener served on some of the node's addresses only (`LISTENER_F_ADDRESSED`:
//!    its Gateway has `spec.addresses`) opens connections to the addresses its entry
//!    lists and leaves any other SYN to the stack, where its sockets are bound to those
//!    addresses only.
//!    A backend reached by an interface the program is not attached to
//!    (`GW_FWD_IFACES`) is not forwarded either: its replies would not be translated.
//!    Nor is a backend of the other address family than the client's (counted as
//!    `no_route`): the socket paths connect to it.
//! 3. Anything else is not ours and goes on untouched (`TCX_NEXT`): segments of
//!    connections the socket paths carry, other ports and protocols, and every packet
//!    the parser does not follow (VLAN tags, IPv4 options, fragments, IPv6 extension
//!    headers, truncated headers). So is a SYN the table has no room or no NAT port for:
//!    the node's stack, and so the socket paths, take it (counted).
//!
//! A backend that resets the SYN, or does not answer before the client retransmits
//! it, is replaced at the client's retransmission by another backend of the table,
//! up to `FWD_ATTEMPTS` backends; then the client gets a RST. The backend's RST to the
//! SYN is not passed on.
//!
//! The program records the TCP flags seen in each direction, the time of the last
//! segment and the payload bytes (IP length less the IP and TCP headers) and segments
//! of each direction; the agent's sweeper removes entries by state-specific timeouts.
//!
//! The end of a connection is reported to the agent's access log through the ring
//! buffer `GW_FWD_EVENTS`, once per connection ([`ended`]): at a RST in either
//! direction (the backend's RST to a SYN excepted: that connect is retried), or at the
//! segment carrying the second FIN of the two directions (the final ACK after it is
//! not counted in the event). The client's entry is then marked `FLOW_S_LOGGED`, so a
//! retransmitted FIN or RST emits nothing more and the sweeper does not log it again.
//! Only segments with FIN or RST look at the other entry; a full ring buffer is counted
//! (`events_lost`) and the sweeper logs that connection when it removes it. Ends the
//! agent decides (idle, handshake and drain timeouts) are logged by the sweeper.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, bpf_fib_lookup},
    btf_maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    helpers::{
        bpf_check_mtu, bpf_csum_diff, bpf_csum_level, bpf_fib_lookup as fib_lookup,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_skb_change_tail,
    },
    macros::{btf_map, classifier},
    programs::TcContext,
};
use gateway_common::{
    BACKEND_F_INVALID, Backend, BackendKey, DIR_BACKEND_TO_CLIENT, DIR_CLIENT_TO_BACKEND,
    FLOW_S_ACK, FLOW_S_FIN, FLOW_S_LOGGED, FLOW_S_RST, FLOW_S_SYN, FWD_END_BACKEND_RESET,
    FWD_END_CLIENT_RESET, FWD_END_FIN, FWD_EVENTS_BYTES, FWD_MAX_ATTEMPTS, FWD_SLOTS, Flow,
    FlowKey, FwdEvent, FwdStats, LISTENER_F_ADDRESSED, LISTENER_F_DRAINING, ListenerInfo,
    ListenerKey, MAX_FLOWS, MAX_FWD_IFACES, MAX_LISTENER_ADDRS, MAX_LISTENERS, MAX_NODE_ADDRS,
    NodeAddr, SlotTable,
};

use crate::{GW_BACKENDS, GW_LISTENERS};

/// A segment's tuple as it arrives -> how to rewrite it (both directions of every
/// forwarded connection). Sized by the agent at load time.
#[btf_map]
static GW_FWD_FLOWS: HashMap<FlowKey, Flow, { MAX_FLOWS as usize }> = HashMap::new();

/// Listener port -> weighted backend selection table.
#[btf_map]
static GW_FWD_SLOTS: HashMap<ListenerKey, SlotTable, { MAX_LISTENERS as usize }> = HashMap::new();

/// The node's own addresses: a SYN to one of them on a listener port is forwarded.
#[btf_map]
static GW_FWD_ADDRS: HashMap<NodeAddr, u32, { MAX_NODE_ADDRS as usize }> = HashMap::new();

/// The interfaces this program is attached to (by ifindex), kept by the agent: a
/// connection whose backend is reached by another interface is left to the stack,
/// since the backend's replies would arrive where nothing translates them back.
#[btf_map]
static GW_FWD_IFACES: HashMap<u32, u32, { MAX_FWD_IFACES as usize }> = HashMap::new();

/// Per-CPU counters per listener.
#[btf_map]
static GW_FWD_STATS: PerCpuHashMap<ListenerKey, FwdStats, { MAX_LISTENERS as usize }> =
    PerCpuHashMap::new();

/// Connection ends for the agent's access log (see [`ended`]).
#[btf_map]
static GW_FWD_EVENTS: RingBuf<FwdEvent, { FWD_EVENTS_BYTES as usize }> = RingBuf::new();

/// First NAT port (set by the loader).
#[unsafe(no_mangle)]
static FWD_PORT_MIN: u32 = 61000;
/// Number of NAT ports (set by the loader); at least 1.
#[unsafe(no_mangle)]
static FWD_PORT_COUNT: u32 = 4536;
/// Backends tried per client connection (set by the loader), 1..=`FWD_MAX_ATTEMPTS`.
#[unsafe(no_mangle)]
static FWD_ATTEMPTS: u32 = 3;
/// Non-zero: the client's address and port are kept (no SNAT); the backend's replies
/// must come back through the node (set by the loader).
#[unsafe(no_mangle)]
static FWD_PRESERVE_CLIENT: u32 = 0;

/// Whether the client's address is kept.
#[inline(always)]
fn preserve_client() -> bool {
    // SAFETY: a read-only global set by the loader.
    unsafe { core::ptr::read_volatile(&FWD_PRESERVE_CLIENT) != 0 }
}

/// tcx: not ours, the next program (or the stack) decides.
const TCX_NEXT: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_FIB_LOOKUP_SKIP_NEIGH: u32 = 4;
const BPF_FIB_LOOKUP_SRC: u32 = 16;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_CSUM_LEVEL_RESET: u64 = 3;
const EEXIST: i32 = 17;
/// NAT ports tried per new connection before the SYN goes to the stack.
const NAT_TRIES: u32 = 16;
/// Slots walked to find a backend not tried yet.
const RETRY_WALK: u32 = 32;

/// Where the IP and TCP headers are, and what the program needs of them.
struct Segment {
    ipv6: bool,
    /// Offset of the TCP header.
    l4: usize,
    /// Offset of the TCP checksum.
    csum: usize,
    key: FlowKey,
    flags: u8,
    /// IPv4 total length or IPv6 payload length plus its header.
    ip_len: u64,
    /// TCP payload bytes: `ip_len` less the IP and TCP headers.
    payload: u64,
}

/// IPv4-mapped IPv6 form of an IPv4 address.
#[inline(always)]
fn mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[inline(always)]
fn v4_of(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// Parses Ethernet, then IPv4 without options and not fragmented or IPv6 with TCP
/// as the next header, then a whole TCP header, into `out`. `false` when the packet is
/// not one of those.
#[inline(never)]
fn parse(ctx: &TcContext, out: &mut Segment) -> bool {
    parse_into(ctx, out).is_some()
}

#[inline(always)]
fn parse_into(ctx: &TcContext, out: &mut Segment) -> Option<()> {
    let proto: [u8; 2] = ctx.load(12).ok()?;
    match u16::from_be_bytes(proto) {
        ETH_P_IP => {
            let ip: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
            // No options (ihl 5), not a fragment (MF clear, offset 0), TCP.
            if ip[0] != 0x45 || ip[6] & 0x3f != 0 || ip[7] != 0 || ip[9] != IPPROTO_TCP {
                return None;
            }
            out.ipv6 = false;
            out.l4 = ETH_HLEN + 20;
            out.key.src_be = mapped([ip[12], ip[13], ip[14], ip[15]]);
            out.key.dst_be = mapped([ip[16], ip[17], ip[18], ip[19]]);
            out.ip_len = u64::from(u16::from_be_bytes([ip[2], ip[3]]));
        }
        ETH_P_IPV6 => {
            let head: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
            if head[6] != IPPROTO_TCP {
                return None;
            }
            out.ipv6 = true;
            out.l4 = ETH_HLEN + 40;
            out.key.src_be = ctx.load(ETH_HLEN + 8).ok()?;
            out.key.dst_be = ctx.load(ETH_HLEN + 24).ok()?;
            out.ip_len = u64::from(u16::from_be_bytes([head[4], head[5]])) + 40;
        }
        _ => return None,
    }
    let tcp: [u8; 20] = ctx.load(out.l4).ok()?;
    // A whole TCP header whose data offset is at least 5 words and ends inside the
    // packet: a shorter one is malformed (the stack drops it), and rewriting it would
    // store past its end after the connection's entries were made.
    let doff = usize::from(tcp[12] >> 4) * 4;
    if doff < 20 || out.l4 + doff > ctx.len() as usize {
        return None;
    }
    out.payload = out.ip_len.saturating_sub((out.l4 - ETH_HLEN + doff) as u64);
    out.csum = out.l4 + 16;
    out.key.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    out.key.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    out.key._pad = 0;
    out.flags = tcp[13];
    Some(())
}

#[classifier]
pub fn gw_fwd(ctx: TcContext) -> i32 {
    let mut seg = Segment {
        ipv6: false,
        l4: 0,
        csum: 0,
        key: FlowKey::default(),
        flags: 0,
        ip_len: 0,
        payload: 0,
    };
    if !parse(&ctx, &mut seg) {
        return icmp_error(&ctx).unwrap_or(TCX_NEXT);
    }
    if let Some(flow) = GW_FWD_FLOWS.get_ptr_mut(&seg.key) {
        return existing(&ctx, &seg, flow);
    }
    if seg.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN {
        return open(&ctx, &seg);
    }
    TCX_NEXT
}

/// An ICMP error about a segment of a forwarded connection (destination unreachable,
/// "fragmentation needed" and "packet too big" among them, time exceeded) goes to the
/// end that sent the segment, translated like the segments themselves: the outer
/// destination and the quoted header's addresses and ports become what that end sent
/// and expects, so its stack (PMTU discovery, errors on the socket) recognises its own
/// connection. The checksums are updated incrementally: the outer IPv4 header, the
/// quoted IPv4 header, and the ICMP checksum over the quoted bytes (with ICMPv6's
/// pseudo-header). `None`: not such an error, or not of a forwarded connection.
#[inline(never)]
fn icmp_error(ctx: &TcContext) -> Option<i32> {
    let proto: [u8; 2] = ctx.load(12).ok()?;
    match u16::from_be_bytes(proto) {
        ETH_P_IP => icmp4(ctx),
        ETH_P_IPV6 => icmp6(ctx),
        _ => None,
    }
}

/// Offsets of an ICMPv4 error about a TCP segment: the ICMP header, the quoted IPv4
/// header, the quoted ports.
const ICMP4: usize = ETH_HLEN + 20;
const ICMP4_INNER: usize = ICMP4 + 8;
const ICMP4_INNER_L4: usize = ICMP4_INNER + 20;

/// [`icmp_error`] for IPv4.
#[inline(never)]
fn icmp4(ctx: &TcContext) -> Option<i32> {
    let ip: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
    if ip[0] != 0x45 || ip[6] & 0x3f != 0 || ip[7] != 0 || ip[9] != IPPROTO_ICMP {
        return None;
    }
    let t: [u8; 1] = ctx.load(ICMP4).ok()?;
    // Destination unreachable, time exceeded.
    if t[0] != 3 && t[0] != 11 {
        return None;
    }
    let inner: [u8; 20] = ctx.load(ICMP4_INNER).ok()?;
    if inner[0] != 0x45 || inner[9] != IPPROTO_TCP {
        return None;
    }
    let ports: [u8; 4] = ctx.load(ICMP4_INNER_L4).ok()?;
    let sc = scratch()?;
    // The quoted segment went out from src to dst; the segments coming the other way
    // arrive as (dst -> src), the key of the entry that translates them: its new
    // destination is the end that sent the original segment.
    sc.key.src_be = mapped([inner[16], inner[17], inner[18], inner[19]]);
    sc.key.dst_be = mapped([inner[12], inner[13], inner[14], inner[15]]);
    sc.key.sport = u16::from_be_bytes([ports[2], ports[3]]);
    sc.key.dport = u16::from_be_bytes([ports[0], ports[1]]);
    sc.key._pad = 0;
    let f = GW_FWD_FLOWS.get_ptr(&sc.key)?;
    // SAFETY: a value from the lookup, copied.
    sc.reply = unsafe { *f };
    let f = &sc.reply;
    let csum = ICMP4 + 2;
    let inner_csum = ICMP4_INNER + 10;
    let old_dst = u64::from(u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]));
    let end = u64::from(u32::from_ne_bytes(v4_of(&f.new_dst_be)));
    let sent_to = u64::from(u32::from_ne_bytes(v4_of(&f.new_src_be)));
    let quoted_src = u64::from(u32::from_ne_bytes([
        inner[12], inner[13], inner[14], inner[15],
    ]));
    let quoted_dst = u64::from(u32::from_ne_bytes([
        inner[16], inner[17], inner[18], inner[19],
    ]));
    ctx.l3_csum_replace(ETH_HLEN + 10, old_dst, end, 4).ok()?;
    ctx.store(ETH_HLEN + 16, &v4_of(&f.new_dst_be), 0).ok()?;
    ctx.l3_csum_replace(inner_csum, quoted_src, end, 4).ok()?;
    ctx.l3_csum_replace(inner_csum, quoted_dst, sent_to, 4)
        .ok()?;
    ctx.l4_csum_replace(csum, quoted_src, end, 4).ok()?;
    ctx.l4_csum_replace(csum, quoted_dst, sent_to, 4).ok()?;
    ctx.store(ICMP4_INNER + 12, &v4_of(&f.new_dst_be), 0).ok()?;
    ctx.store(ICMP4_INNER + 16, &v4_of(&f.new_src_be), 0).ok()?;
    let after: [u8; 2] = ctx.load(inner_csum).ok()?;
    ctx.l4_csum_replace(
        csum,
        u64::from(u16::from_ne_bytes([inner[10], inner[11]])),
        u64::from(u16::from_ne_bytes(after)),
        2,
    )
    .ok()?;
    icmp_ports(ctx, csum, ICMP4_INNER_L4, &ports, f)?;
    icmp_done(f)
}

/// Offsets of an ICMPv6 error about a TCP segment.
const ICMP6: usize = ETH_HLEN + 40;
const ICMP6_INNER: usize = ICMP6 + 8;
const ICMP6_INNER_L4: usize = ICMP6_INNER + 40;

/// [`icmp_error`] for IPv6.
#[inline(never)]
fn icmp6(ctx: &TcContext) -> Option<i32> {
    let head: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
    if head[6] != IPPROTO_ICMPV6 {
        return None;
    }
    let t: [u8; 1] = ctx.load(ICMP6).ok()?;
    // Destination unreachable, packet too big, time exceeded.
    if t[0] < 1 || t[0] > 3 {
        return None;
    }
    let inner: [u8; 8] = ctx.load(ICMP6_INNER).ok()?;
    if inner[0] >> 4 != 6 || inner[6] != IPPROTO_TCP {
        return None;
    }
    let ports: [u8; 4] = ctx.load(ICMP6_INNER_L4).ok()?;
    let sc = scratch()?;
    sc.key.src_be = ctx.load(ICMP6_INNER + 24).ok()?;
    sc.key.dst_be = ctx.load(ICMP6_INNER + 8).ok()?;
    sc.key.sport = u16::from_be_bytes([ports[2], ports[3]]);
    sc.key.dport = u16::from_be_bytes([ports[0], ports[1]]);
    sc.key._pad = 0;
    let f = GW_FWD_FLOWS.get_ptr(&sc.key)?;
    // SAFETY: a value from the lookup, copied.
    sc.reply = unsafe { *f };
    let f = &sc.reply;
    let csum = ICMP6 + 2;
    let old: [u8; 16] = ctx.load(ETH_HLEN + 24).ok()?;
    csum_words6(ctx, csum, &old, &f.new_dst_be, BPF_F_PSEUDO_HDR)?;
    ctx.store(ETH_HLEN + 24, &f.new_dst_be, 0).ok()?;
    // The quoted source (sc.key.dst_be) becomes the end's own address, the quoted
    // destination (sc.key.src_be) the address it sent to.
    csum_words6(ctx, csum, &sc.key.dst_be, &f.new_dst_be, 0)?;
    ctx.store(ICMP6_INNER + 8, &f.new_dst_be, 0).ok()?;
    csum_words6(ctx, csum, &sc.key.src_be, &f.new_src_be, 0)?;
    ctx.store(ICMP6_INNER + 24, &f.new_src_be, 0).ok()?;
    icmp_ports(ctx, csum, ICMP6_INNER_L4, &ports, f)?;
    icmp_done(f)
}

/// The quoted ports of an ICMP error: source = the end's own port, destination = the
/// port it sent to; the ICMP checksum at `csum` follows.
#[inline(always)]
fn icmp_ports(ctx: &TcContext, csum: usize, at: usize, ports: &[u8; 4], f: &Flow) -> Option<()> {
    let sport = f.new_dport.to_be_bytes();
    let dport = f.new_sport.to_be_bytes();
    ctx.l4_csum_replace(
        csum,
        u64::from(u16::from_ne_bytes([ports[0], ports[1]])),
        u64::from(u16::from_ne_bytes(sport)),
        2,
    )
    .ok()?;
    ctx.l4_csum_replace(
        csum,
        u64::from(u16::from_ne_bytes([ports[2], ports[3]])),
        u64::from(u16::from_ne_bytes(dport)),
        2,
    )
    .ok()?;
    ctx.store(at, &sport, 0).ok()?;
    ctx.store(at + 2, &dport, 0).ok()
}

/// Counts a translated ICMP error and sends it towards the end of `f`.
#[inline(always)]
fn icmp_done(f: &Flow) -> Option<i32> {
    if let Some(s) = stats(f.listener_port) {
        s.icmp_translated += 1;
    }
    // SAFETY: no parameters: the kernel looks the neighbour of the new destination up.
    Some(unsafe { bpf_redirect_neigh(f.out_ifindex, core::ptr::null_mut(), 0, 0) as i32 })
}

/// Folds the change of a 16-byte field from `old` to `new` into the checksum at
/// `csum` (`flags`: `BPF_F_PSEUDO_HDR` when the field is in the pseudo-header).
#[inline(always)]
fn csum_words6(
    ctx: &TcContext,
    csum: usize,
    old: &[u8; 16],
    new: &[u8; 16],
    flags: u64,
) -> Option<()> {
    if old == new {
        return Some(());
    }
    let mut from = *old;
    let mut to = *new;
    // SAFETY: two 16-byte buffers on the stack, their sizes passed.
    let diff =
        unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 {
        return None;
    }
    ctx.l4_csum_replace(csum, 0, diff as u64, flags).ok()
}

/// All-zero counters, the first value of a listener's entry (a static, so no function
/// that counts keeps a copy on its stack).
static ZERO_STATS: FwdStats = FwdStats {
    connections: 0,
    rejected_no_backend: 0,
    rejected_invalid_backend: 0,
    rejected_connect_failed: 0,
    connect_failures: 0,
    nat_exhausted: 0,
    table_full: 0,
    no_route: 0,
    not_attached: 0,
    icmp_translated: 0,
    packets_c2b: 0,
    packets_b2c: 0,
    bytes_c2b: 0,
    bytes_b2c: 0,
    events_lost: 0,
};

/// The forward program's counters of `port` on this CPU, created on first use.
#[inline(always)]
fn stats(port: u16) -> Option<&'static mut FwdStats> {
    let key = ListenerKey::new(port);
    if let Some(p) = GW_FWD_STATS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU; programs do not nest on one CPU.
        return Some(unsafe { &mut *p });
    }
    let _ = GW_FWD_STATS.insert(&key, &ZERO_STATS, u64::from(BPF_NOEXIST));
    // SAFETY: as above.
    GW_FWD_STATS.get_ptr_mut(&key).map(|p| unsafe { &mut *p })
}

/// The murmur3 finalizer: spreads every input bit over the result.
#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The hash a backend is picked by: the client's address and port, the same on every
/// node (no per-boot seed), so every node picks the same backend for a client.
#[inline(always)]
fn client_hash(key: &FlowKey) -> u32 {
    let a = &key.src_be;
    let mut h = 0x9e37_79b9_u32;
    let mut i = 0;
    while i < 16 {
        let w = u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        h = mix(h ^ w);
        i += 4;
    }
    mix(h ^ u32::from(key.sport))
}

/// The key of the other direction's entry of a connection whose entry is `f`: the
/// reply to a rewritten segment comes from its new destination to its new source.
#[inline(always)]
fn reverse_key(f: &Flow) -> FlowKey {
    FlowKey {
        src_be: f.new_dst_be,
        dst_be: f.new_src_be,
        sport: f.new_dport,
        dport: f.new_sport,
        _pad: 0,
    }
}

/// Why a SYN is answered with a RST.
#[derive(Clone, Copy)]
enum Refusal {
    NoBackend,
    InvalidBackend,
    ConnectFailed,
}

/// A segment of a connection in the table.
#[inline(never)]
fn existing(ctx: &TcContext, seg: &Segment, flow: *mut Flow) -> i32 {
    // SAFETY: a value of GW_FWD_FLOWS from the lookup; entries are only deleted by the
    // agent once the connection is over, and a racing delete leaves the memory valid
    // until this program returns (RCU).
    let f = unsafe { &mut *flow };
    let syn_only = seg.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
    if u32::from(f.direction) == DIR_CLIENT_TO_BACKEND && syn_only {
        // The client retransmitted its SYN: did the backend answer?
        let Some(sc) = scratch() else {
            return TCX_NEXT;
        };
        sc.key = reverse_key(f);
        let answered = match GW_FWD_FLOWS.get_ptr(&sc.key) {
            // SAFETY: as above, read only.
            Some(r) => (unsafe { (*r).state } & (FLOW_S_SYN | FLOW_S_RST)) == FLOW_S_SYN,
            None => false,
        };
        if !answered && !retry(ctx, seg, f) {
            // Every attempt failed: the client is answered with a RST (its record
            // ends now).
            return reject(ctx, seg, f.listener_port, Refusal::ConnectFailed);
        }
    }
    if u32::from(f.direction) == DIR_BACKEND_TO_CLIENT
        && seg.flags & TCP_RST != 0
        && f.state & FLOW_S_SYN == 0
    {
        // The backend refused the SYN: the client's retransmission tries another one.
        f.state |= FLOW_S_RST;
        return TC_ACT_SHOT;
    }
    let mut bits = 0;
    if seg.flags & TCP_SYN != 0 {
        bits |= FLOW_S_SYN;
    } else if seg.flags & TCP_ACK != 0 {
        bits |= FLOW_S_ACK;
    }
    if seg.flags & TCP_FIN != 0 {
        bits |= FLOW_S_FIN;
    }
    if seg.flags & TCP_RST != 0 {
        bits |= FLOW_S_RST;
    }
    if f.state | bits != f.state {
        f.state |= bits;
    }
    // SAFETY: helper without arguments.
    f.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    f.packets += 1;
    f.bytes += seg.payload;
    if let Some(s) = stats(f.listener_port) {
        if u32::from(f.direction) == DIR_CLIENT_TO_BACKEND {
            s.packets_c2b += 1;
            s.bytes_c2b += seg.payload;
        } else {
            s.packets_b2c += 1;
            s.bytes_b2c += seg.payload;
        }
    }
    if seg.flags & (TCP_FIN | TCP_RST) != 0 {
        ended(seg, f);
    }
    let out = f.out_ifindex;
    if rewrite(ctx, seg, f).is_none() {
        return TC_ACT_SHOT;
    }
    if seg.flags & TCP_SYN != 0 {
        clamp_mss(ctx, seg, out);
    }
    // SAFETY: no parameters: the kernel looks the neighbour of the new destination up.
    unsafe { bpf_redirect_neigh(out, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Emits the connection's [`FwdEvent`] when `seg` (a FIN or RST, already counted in
/// `f`, its direction's entry) ends it: a RST, or the second FIN of the two directions.
/// Once per connection: the client's entry is marked [`FLOW_S_LOGGED`] when the event
/// is submitted. A full ring buffer is counted (`events_lost`) and leaves the mark off,
/// so the agent's sweeper logs the connection instead. Forwarding is not affected.
#[inline(never)]
fn ended(seg: &Segment, f: &mut Flow) {
    let Some(sc) = scratch() else {
        return;
    };
    sc.key = reverse_key(f);
    let Some(other) = GW_FWD_FLOWS.get_ptr_mut(&sc.key) else {
        return;
    };
    // SAFETY: a value of GW_FWD_FLOWS from the lookup (the other entry than `f`), valid
    // while the program runs (RCU).
    let other = unsafe { &mut *other };
    let from_client = u32::from(f.direction) == DIR_CLIENT_TO_BACKEND;
    let (client, backend) = if from_client {
        (f, &*other)
    } else {
        (other, &*f)
    };
    if client.state & FLOW_S_LOGGED != 0 {
        return;
    }
    let end = if seg.flags & TCP_RST != 0 {
        if from_client {
            FWD_END_CLIENT_RESET
        } else {
            FWD_END_BACKEND_RESET
        }
    } else if client.state & backend.state & FLOW_S_FIN != 0 {
        FWD_END_FIN
    } else {
        return;
    };
    let Some(mut entry) = GW_FWD_EVENTS.reserve(0) else {
        if let Some(s) = stats(client.listener_port) {
            s.events_lost += 1;
        }
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved, exclusively owned FwdEvent of the ring
    // buffer; every field is written before it is submitted.
    unsafe {
        (*e).client_be = backend.new_dst_be;
        (*e).backend_be = client.new_dst_be;
        (*e).client_port = backend.new_dport;
        (*e).backend_port = client.new_dport;
        (*e).listener_port = client.listener_port;
        (*e).end = end;
        (*e).created_ns = client.created_ns;
        (*e).last_seen_ns = if from_client {
            client.last_seen_ns
        } else {
            backend.last_seen_ns
        };
        (*e).bytes_c2b = client.bytes;
        (*e).bytes_b2c = backend.bytes;
        (*e).packets_c2b = client.packets;
        (*e).packets_b2c = backend.packets;
    }
    entry.submit(0);
    client.state |= FLOW_S_LOGGED;
}

/// Replaces the backend of a connection whose SYN went unanswered or was refused:
/// another backend of the table, a new NAT port. `false` when no attempt is left (or no
/// other backend is): the caller answers the client with a RST.
#[inline(always)]
fn retry(ctx: &TcContext, seg: &Segment, f: &mut Flow) -> bool {
    if let Some(s) = stats(f.listener_port) {
        s.connect_failures += 1;
    }
    if let Some(sc) = scratch() {
        sc.key = reverse_key(f);
        let _ = GW_FWD_FLOWS.remove(&sc.key);
    }
    if replace_backend(ctx, seg, f).is_some() {
        return true;
    }
    f.state |= FLOW_S_RST;
    false
}

/// Per-CPU room for what does not fit the 512-byte BPF stack of a call chain.
#[repr(C)]
pub struct Scratch {
    /// The backend's entry of a connection being made.
    reply: Flow,
    /// The key of that entry.
    key: FlowKey,
    /// A RST being built.
    packet: [u8; REFUSE_MAX],
    /// The TCP options of a SYN whose MSS is being clamped.
    options: [u8; MAX_TCP_OPTIONS],
    /// This CPU's position in the NAT port range: ports are handed out in turn, so a
    /// port comes back as late as possible after its last connection.
    cursor: u32,
}

/// Bytes of TCP options at most (data offset 15 words, less the 20-byte header).
const MAX_TCP_OPTIONS: usize = 40;

/// Bytes of the longest RST the program builds: Ethernet, IPv6, TCP.
const REFUSE_MAX: usize = ETH_HLEN + 40 + 20;

/// One [`Scratch`] per CPU (programs do not nest on one CPU).
#[btf_map]
static GW_FWD_SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's value; programs do not nest on one CPU.
    GW_FWD_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Picks a backend of the table not tried yet for the connection of `f`, with a new
/// NAT port, and points `f` at it. `None` when attempts are used up or nothing fits.
#[inline(never)]
fn replace_backend(ctx: &TcContext, seg: &Segment, f: &mut Flow) -> Option<()> {
    let port = f.listener_port;
    // SAFETY: a read-only global set by the loader.
    let attempts = unsafe { core::ptr::read_volatile(&FWD_ATTEMPTS) }.min(FWD_MAX_ATTEMPTS);
    if f.attempts >= attempts {
        return None;
    }
    let table = GW_FWD_SLOTS.get_ptr(&ListenerKey::new(port))?;
    let h = client_hash(&seg.key);
    let mut pick = None;
    let mut k = 0;
    while k < RETRY_WALK {
        let slot = (h.wrapping_add(k.wrapping_mul(97))) as usize & (FWD_SLOTS - 1);
        // SAFETY: value from the lookup; slot is masked to the table.
        let idx = unsafe { (*table).slots[slot] };
        if f.tried & (1 << (u32::from(idx) % 32)) == 0 {
            pick = Some(idx);
            break;
        }
        k += 1;
    }
    let idx = pick?;
    let backend = GW_BACKENDS.get_ptr(&BackendKey::new(port, u32::from(idx)))?;
    // SAFETY: value from the lookup (kept alive by RCU while the program runs).
    let backend = unsafe { &*backend };
    if backend.flags & BACKEND_F_INVALID != 0 || !same_family(seg, backend) {
        return None;
    }
    let sc = scratch()?;
    let out = route(ctx, seg.ipv6, &backend.addr_be, &mut sc.reply.new_src_be)?;
    GW_FWD_IFACES.get_ptr(&out)?;
    f.new_src_be = if preserve_client() {
        seg.key.src_be
    } else {
        sc.reply.new_src_be
    };
    fill_reply(ctx, seg, &mut sc.reply, idx);
    let nat_port = insert_reply(backend, &f.new_src_be, sc)?;
    f.new_dst_be = backend.addr_be;
    f.new_sport = nat_port;
    f.new_dport = backend.port;
    f.backend_index = idx;
    f.out_ifindex = out;
    f.tried |= 1 << (u32::from(idx) % 32);
    f.attempts += 1;
    Some(())
}

/// Whether `backend` is of the segment's address family (only those can be reached
/// by rewriting the segment's addresses).
#[inline(always)]
fn same_family(seg: &Segment, backend: &Backend) -> bool {
    let family = if seg.ipv6 { AF_INET6 } else { AF_INET };
    backend.family == u16::from(family)
}

/// Fills `r` as the backend's entry of the connection whose client SYN is `seg`.
#[inline(always)]
fn fill_reply(ctx: &TcContext, seg: &Segment, r: &mut Flow, idx: u8) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    r.new_src_be = seg.key.dst_be;
    r.new_dst_be = seg.key.src_be;
    r.new_sport = seg.key.dport;
    r.new_dport = seg.key.sport;
    r.listener_port = seg.key.dport;
    r.direction = DIR_BACKEND_TO_CLIENT as u8;
    r.backend_index = idx;
    // SAFETY: the context's __sk_buff.
    r.out_ifindex = unsafe { (*ctx.skb.skb).ifindex };
    r.state = 0;
    r.tried = 0;
    r.attempts = 0;
    r.created_ns = now;
    r.last_seen_ns = now;
    r.packets = 0;
    r.bytes = 0;
}

/// Writes the NAT address (the FIB's source towards `dst`) into `src` and returns the
/// interface to `dst`.
#[inline(never)]
fn route(ctx: &TcContext, ipv6: bool, dst: &[u8; 16], src: &mut [u8; 16]) -> Option<u32> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.l4_protocol = IPPROTO_TCP;
    // SAFETY: the context's __sk_buff.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ipv6 {
        p.family = AF_INET6;
        let mut d = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            d[i] = u32::from_ne_bytes([dst[4 * i], dst[4 * i + 1], dst[4 * i + 2], dst[4 * i + 3]]);
            i += 1;
        }
        p.__bindgen_anon_4.ipv6_dst = d;
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(v4_of(dst));
    }
    // SAFETY: p is a bpf_fib_lookup on the stack, its size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &raw mut p,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    if ipv6 {
        // SAFETY: the kernel filled ipv6_src for an AF_INET6 lookup.
        let s = unsafe { p.__bindgen_anon_3.ipv6_src };
        let mut i = 0;
        while i < 4 {
            let b = s[i].to_ne_bytes();
            src[4 * i] = b[0];
            src[4 * i + 1] = b[1];
            src[4 * i + 2] = b[2];
            src[4 * i + 3] = b[3];
            i += 1;
        }
    } else {
        // SAFETY: the kernel filled ipv4_src for an AF_INET lookup.
        *src = mapped(unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes());
    }
    Some(p.ifindex)
}

/// Inserts `sc.reply`, the backend's entry of a connection, under a free NAT port
/// towards `backend` from `nat`, and returns that port. Ports are handed out in turn
/// from a per-CPU cursor (not at random), so a port is reused as late as possible and
/// rarely meets the entry of a connection still closing. `None` when no port is free
/// after [`NAT_TRIES`] tries (`nat_exhausted`) or the table is full (`table_full`).
/// With the client's address kept, `nat` is the client's address and the port is the
/// client's (the only try: another connection already holding that tuple towards the
/// backend counts as `nat_exhausted`).
#[inline(never)]
fn insert_reply(backend: &Backend, nat: &[u8; 16], sc: &mut Scratch) -> Option<u16> {
    // SAFETY: read-only globals set by the loader.
    let (min, count) = unsafe {
        (
            core::ptr::read_volatile(&FWD_PORT_MIN),
            core::ptr::read_volatile(&FWD_PORT_COUNT).max(1),
        )
    };
    // Each CPU walks the range from its own origin.
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let start = sc.cursor.wrapping_add(cpu.wrapping_mul(count / 8 + 1));
    sc.key.src_be = backend.addr_be;
    sc.key.dst_be = *nat;
    sc.key.sport = backend.port;
    sc.key._pad = 0;
    let listener = sc.reply.listener_port;
    let (tries, fixed) = if preserve_client() {
        (1, Some(sc.reply.new_dport))
    } else {
        (NAT_TRIES, None)
    };
    let mut i = 0;
    while i < tries {
        let port = match fixed {
            Some(p) => p,
            None => (min + (start.wrapping_add(i) % count)) as u16,
        };
        sc.key.dport = port;
        match GW_FWD_FLOWS.insert(&sc.key, &sc.reply, u64::from(BPF_NOEXIST)) {
            Ok(()) => {
                sc.cursor = sc.cursor.wrapping_add(i + 1);
                return Some(port);
            }
            Err(e) if e == -EEXIST => {}
            Err(_) => {
                if let Some(s) = stats(listener) {
                    s.table_full += 1;
                }
                return None;
            }
        }
        i += 1;
    }
    if let Some(s) = stats(listener) {
        s.nat_exhausted += 1;
    }
    None
}

/// Whether `dst_be` is one of the addresses an addressed listener is forwarded on.
#[inline(always)]
fn served_on(listener: &ListenerInfo, dst_be: &[u8; 16]) -> bool {
    let d = u128::from_ne_bytes(*dst_be);
    let n = listener.addr_count as usize;
    let mut i = 0;
    while i < MAX_LISTENER_ADDRS {
        if i < n && u128::from_ne_bytes(listener.addrs[i]) == d {
            return true;
        }
        i += 1;
    }
    false
}

/// A SYN that no entry knows, to a listener: opens a connection, refuses it, or
/// leaves it to the stack.
#[inline(never)]
fn open(ctx: &TcContext, seg: &Segment) -> i32 {
    let port = seg.key.dport;
    let Some(listener) = GW_LISTENERS.get_ptr(&ListenerKey::new(port)) else {
        return TCX_NEXT;
    };
    // A draining listener accepts nothing new.
    // SAFETY: value from the lookup.
    let flags = unsafe { (*listener).flags };
    if flags & LISTENER_F_DRAINING != 0 {
        return TCX_NEXT;
    }
    // One served on some addresses only is forwarded on those; a SYN to another
    // address is the stack's (no socket is bound there: it answers with a RST).
    // SAFETY: value from the lookup.
    if flags & LISTENER_F_ADDRESSED != 0 && !served_on(unsafe { &*listener }, &seg.key.dst_be) {
        return TCX_NEXT;
    }
    if GW_FWD_ADDRS
        .get_ptr(&NodeAddr {
            addr_be: seg.key.dst_be,
        })
        .is_none()
    {
        return TCX_NEXT;
    }
    let Some(table) = GW_FWD_SLOTS.get_ptr(&ListenerKey::new(port)) else {
        return reject(ctx, seg, port, Refusal::NoBackend);
    };
    // SAFETY: value from the lookup.
    if unsafe { (*table).filled } == 0 {
        return reject(ctx, seg, port, Refusal::NoBackend);
    }
    let h = client_hash(&seg.key);
    // SAFETY: as above; the slot is masked to the table.
    let idx = unsafe { (*table).slots[h as usize & (FWD_SLOTS - 1)] };
    let Some(backend) = GW_BACKENDS.get_ptr(&BackendKey::new(port, u32::from(idx))) else {
        return reject(ctx, seg, port, Refusal::NoBackend);
    };
    // SAFETY: value from the lookup (kept alive by RCU while the program runs).
    let backend = unsafe { &*backend };
    if backend.flags & BACKEND_F_INVALID != 0 {
        return reject(ctx, seg, port, Refusal::InvalidBackend);
    }
    if !same_family(seg, backend) {
        // An IPv4 client picked an IPv6 backend or the reverse: no translation carries
        // the segment there (the FIB would route the other family's form of the
        // address). The socket paths, which connect in the backend's family, take it.
        if let Some(s) = stats(port) {
            s.no_route += 1;
        }
        return TCX_NEXT;
    }
    let Some(sc) = scratch() else {
        return TCX_NEXT;
    };
    let mut nat = [0u8; 16];
    let Some(out) = route(ctx, seg.ipv6, &backend.addr_be, &mut nat) else {
        if let Some(s) = stats(port) {
            s.no_route += 1;
        }
        return TCX_NEXT;
    };
    if GW_FWD_IFACES.get_ptr(&out).is_none() {
        if let Some(s) = stats(port) {
            s.not_attached += 1;
        }
        return TCX_NEXT;
    }
    if preserve_client() {
        nat = seg.key.src_be;
    }
    fill_reply(ctx, seg, &mut sc.reply, idx);
    let Some(nat_port) = insert_reply(backend, &nat, sc) else {
        return TCX_NEXT;
    };
    // The client's entry: reuse the scratch entry, turned around.
    let f = &mut sc.reply;
    f.new_src_be = nat;
    f.new_dst_be = backend.addr_be;
    f.new_sport = nat_port;
    f.new_dport = backend.port;
    f.direction = DIR_CLIENT_TO_BACKEND as u8;
    // SAFETY: helper without arguments.
    f.out_ifindex = out;
    f.state = FLOW_S_SYN;
    f.tried = 1 << (u32::from(idx) % 32);
    f.attempts = 1;
    f.packets = 1;
    f.bytes = seg.payload;
    if GW_FWD_FLOWS
        .insert(&seg.key, f, u64::from(BPF_NOEXIST))
        .is_err()
    {
        let _ = GW_FWD_FLOWS.remove(&sc.key);
        if let Some(s) = stats(port) {
            s.table_full += 1;
        }
        return TCX_NEXT;
    }
    if let Some(s) = stats(port) {
        s.connections += 1;
        s.packets_c2b += 1;
        s.bytes_c2b += seg.payload;
    }
    if rewrite(ctx, seg, &sc.reply).is_none() {
        return TC_ACT_SHOT;
    }
    clamp_mss(ctx, seg, out);
    // SAFETY: no parameters: the kernel looks the neighbour of the new destination up.
    unsafe { bpf_redirect_neigh(out, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Counts a refusal and answers the SYN with a RST.
#[inline(always)]
fn reject(ctx: &TcContext, seg: &Segment, port: u16, why: Refusal) -> i32 {
    if let Some(s) = stats(port) {
        match why {
            Refusal::NoBackend => s.rejected_no_backend += 1,
            Refusal::InvalidBackend => s.rejected_invalid_backend += 1,
            Refusal::ConnectFailed => s.rejected_connect_failed += 1,
        }
    }
    match refuse(ctx, seg) {
        Some(action) => action,
        None => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns the SYN in `ctx` into a RST|ACK to its sender and sends it back out of the
/// interface it came in on. `None` when the packet cannot be rewritten.
#[inline(never)]
fn refuse(ctx: &TcContext, seg: &Segment) -> Option<i32> {
    let sc = scratch()?;
    let tcp: [u8; 14] = ctx.load(seg.l4).ok()?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let doff = usize::from(tcp[12] >> 4) * 4;
    let ip_hlen = seg.l4 - ETH_HLEN;
    let payload = (seg.ip_len as usize).saturating_sub(ip_hlen + doff) as u32;
    let ack = seq
        .wrapping_add(payload)
        .wrapping_add(u32::from(seg.flags & TCP_SYN != 0))
        .wrapping_add(u32::from(seg.flags & TCP_FIN != 0));
    let eth: [u8; 12] = ctx.load(0).ok()?;
    // The reply, built in the scratch area: Ethernet (addresses swapped), IP, TCP.
    let p = &mut sc.packet;
    *p = [0; REFUSE_MAX];
    p[0..6].copy_from_slice(&eth[6..12]);
    p[6..12].copy_from_slice(&eth[0..6]);
    let (src, dst) = (&seg.key.dst_be, &seg.key.src_be);
    let l4 = if seg.ipv6 {
        ETH_HLEN + 40
    } else {
        ETH_HLEN + 20
    };
    if seg.ipv6 {
        p[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        p[14] = 0x60;
        p[19] = 20;
        p[20] = IPPROTO_TCP;
        p[21] = 64;
        p[22..38].copy_from_slice(src);
        p[38..54].copy_from_slice(dst);
    } else {
        p[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        p[14] = 0x45;
        p[17] = 40;
        p[20] = 0x40;
        p[22] = 64;
        p[23] = IPPROTO_TCP;
        p[26..30].copy_from_slice(&v4_of(src));
        p[30..34].copy_from_slice(&v4_of(dst));
        let mut sum = 0u32;
        let mut i = 14;
        while i < 34 {
            sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
            i += 2;
        }
        let c = fold(sum).to_be_bytes();
        p[24] = c[0];
        p[25] = c[1];
    }
    if seg.ipv6 {
        rst_tcp::<{ ETH_HLEN + 40 }, 22, 54>(p, &tcp, ack);
    } else {
        rst_tcp::<{ ETH_HLEN + 20 }, 26, 34>(p, &tcp, ack);
    }
    let new_len = (l4 + 20) as u32;
    // SAFETY: the context's skb; shrinking drops options and payload.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len, 0) } != 0 {
        return None;
    }
    // The checksums are complete: the skb must not be finished as a partial one.
    // SAFETY: the context's skb.
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_RESET) };
    let len = if seg.ipv6 {
        ETH_HLEN + 60
    } else {
        ETH_HLEN + 40
    };
    // SAFETY: `len` bytes of the scratch area (at most REFUSE_MAX) into the packet,
    // which is exactly that long now.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_store_bytes(
            ctx.skb.skb.cast(),
            0,
            p.as_ptr().cast(),
            len as u32,
            0,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the context's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// The TCP header of a RST at `L4` in `p` (ports of `tcp` swapped, seq 0, `ack`,
/// data offset 5, RST|ACK, window 0) and its checksum over the pseudo-header, whose
/// addresses are at `p[A..B]`.
#[inline(always)]
fn rst_tcp<const L4: usize, const A: usize, const B: usize>(
    p: &mut [u8; REFUSE_MAX],
    tcp: &[u8; 14],
    ack: u32,
) {
    p[L4] = tcp[2];
    p[L4 + 1] = tcp[3];
    p[L4 + 2] = tcp[0];
    p[L4 + 3] = tcp[1];
    let a = ack.to_be_bytes();
    p[L4 + 8] = a[0];
    p[L4 + 9] = a[1];
    p[L4 + 10] = a[2];
    p[L4 + 11] = a[3];
    p[L4 + 12] = 5 << 4;
    p[L4 + 13] = TCP_RST | TCP_ACK;
    let mut sum = 20 + u32::from(IPPROTO_TCP);
    let mut i = A;
    while i < B {
        sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
        i += 2;
    }
    let mut i = L4;
    while i < L4 + 20 {
        sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
        i += 2;
    }
    let c = fold(sum).to_be_bytes();
    p[L4 + 16] = c[0];
    p[L4 + 17] = c[1];
}

/// Lowers the MSS option of a SYN (or SYN-ACK) to what fits the smaller MTU of the
/// two links a connection crosses on the node (the one the segment came in on and
/// `ifindex`, the one it leaves by): the ends only know their own links' MTUs, and a
/// redirected segment larger than a link's MTU would be dropped there without an ICMP
/// error (the forwarding path that sends one is skipped). Options other than MSS,
/// and an MSS already small enough, are left as they are.
#[inline(never)]
fn clamp_mss(ctx: &TcContext, seg: &Segment, ifindex: u32) {
    let (mut out_mtu, mut in_mtu) = (0u32, 0u32);
    // SAFETY: the context's skb and a u32 on the stack for each result; ifindex 0 is
    // the skb's own device.
    let (a, b) = unsafe {
        (
            bpf_check_mtu(ctx.as_ptr(), ifindex, &raw mut out_mtu, 0, 0),
            bpf_check_mtu(ctx.as_ptr(), 0, &raw mut in_mtu, 0, 0),
        )
    };
    let mtu = out_mtu.min(in_mtu);
    if a < 0 || b < 0 || mtu == 0 {
        return;
    }
    let overhead = if seg.ipv6 { 60 } else { 40 };
    let Ok(limit) = u16::try_from(mtu.saturating_sub(overhead)) else {
        return;
    };
    let Ok(head) = ctx.load::<[u8; 14]>(seg.l4) else {
        return;
    };
    let doff = usize::from(head[12] >> 4) * 4;
    if doff <= 20 {
        return;
    }
    let n = (doff - 20).min(MAX_TCP_OPTIONS);
    let Some(sc) = scratch() else {
        return;
    };
    let opts = &mut sc.options;
    let len = n as u32;
    if len == 0 || len > MAX_TCP_OPTIONS as u32 {
        return;
    }
    // SAFETY: `len` (1..=40) bytes into the 40-byte scratch buffer.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            (seg.l4 + 20) as u32,
            opts.as_mut_ptr().cast(),
            len,
        )
    };
    if rc != 0 {
        return;
    }
    let mut i = 0;
    let mut steps = 0;
    while i + 1 < n && steps < MAX_TCP_OPTIONS {
        steps += 1;
        let Some(&kind) = opts.get(i) else {
            return;
        };
        if kind == 0 {
            return;
        }
        if kind == 1 {
            i += 1;
            continue;
        }
        let Some(&len) = opts.get(i + 1) else {
            return;
        };
        let len = usize::from(len);
        if kind == 2 && len == 4 && i + 3 < n {
            let (Some(&hi), Some(&lo)) = (opts.get(i + 2), opts.get(i + 3)) else {
                return;
            };
            let mss = u16::from_be_bytes([hi, lo]);
            if mss > limit {
                let at = seg.l4 + 20 + i + 2;
                // The checksum sums 16-bit words from the start of the TCP header: a
                // value at an odd offset (options before it of odd length) straddles
                // two words, so its bytes count swapped.
                let (old, new) = if i % 2 == 1 {
                    (mss.swap_bytes(), limit.swap_bytes())
                } else {
                    (mss, limit)
                };
                let from = u64::from(u16::from_ne_bytes(old.to_be_bytes()));
                let to = u64::from(u16::from_ne_bytes(new.to_be_bytes()));
                if ctx.l4_csum_replace(seg.csum, from, to, 2).is_ok() {
                    let _ = ctx.store(at, &limit.to_be_bytes(), 0);
                }
            }
            return;
        }
        if len < 2 {
            return;
        }
        i += len;
    }
}

/// Writes the addresses and ports of `f` into the segment, updating the checksums.
#[inline(never)]
fn rewrite(ctx: &TcContext, seg: &Segment, f: &Flow) -> Option<()> {
    if seg.ipv6 {
        addr6(ctx, seg, ETH_HLEN + 8, &seg.key.src_be, &f.new_src_be)?;
        addr6(ctx, seg, ETH_HLEN + 24, &seg.key.dst_be, &f.new_dst_be)?;
    } else {
        addr4(ctx, seg, ETH_HLEN + 12, &seg.key.src_be, &f.new_src_be)?;
        addr4(ctx, seg, ETH_HLEN + 16, &seg.key.dst_be, &f.new_dst_be)?;
    }
    port(ctx, seg, seg.l4, seg.key.sport, f.new_sport)?;
    port(ctx, seg, seg.l4 + 2, seg.key.dport, f.new_dport)
}

#[inline(always)]
fn addr4(ctx: &TcContext, seg: &Segment, off: usize, old: &[u8; 16], new: &[u8; 16]) -> Option<()> {
    if old == new {
        return Some(());
    }
    let from = u64::from(u32::from_ne_bytes(v4_of(old)));
    let to = u64::from(u32::from_ne_bytes(v4_of(new)));
    ctx.l3_csum_replace(ETH_HLEN + 10, from, to, 4).ok()?;
    ctx.l4_csum_replace(seg.csum, from, to, BPF_F_PSEUDO_HDR | 4)
        .ok()?;
    ctx.store(off, &v4_of(new), 0).ok()
}

#[inline(always)]
fn addr6(ctx: &TcContext, seg: &Segment, off: usize, old: &[u8; 16], new: &[u8; 16]) -> Option<()> {
    if old == new {
        return Some(());
    }
    csum_words6(ctx, seg.csum, old, new, BPF_F_PSEUDO_HDR)?;
    ctx.store(off, new, 0).ok()
}

#[inline(always)]
fn port(ctx: &TcContext, seg: &Segment, off: usize, old: u16, new: u16) -> Option<()> {
    if old == new {
        return Some(());
    }
    let from = u64::from(u16::from_ne_bytes(old.to_be_bytes()));
    let to = u64::from(u16::from_ne_bytes(new.to_be_bytes()));
    ctx.l4_csum_replace(seg.csum, from, to, 2).ok()?;
    ctx.store(off, &new.to_be_bytes(), 0).ok()
}
