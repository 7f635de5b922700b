//! `gw_xdp`, the XDP listener guard: admission of new TCP connections at the NIC.
//!
//! For every TCP packet whose destination port is a listener (`GW_LISTENERS`), the
//! guard counts the packet and, when it is a SYN (SYN set, ACK clear), applies the
//! listener's policy (`GW_XDP_POLICY`):
//!
//! 1. a source in a deny range of the listener (`GW_XDP_CIDR4` / `GW_XDP_CIDR6`) is
//!    dropped, whatever the allow list says (deny wins);
//! 2. when the listener has an allow list, a source in none of its ranges is dropped;
//! 3. when the listener has a SYN rate, the source prefix's token bucket
//!    (`GW_XDP_BUCKETS`) must hold a token, else the SYN is dropped.
//!
//! Everything else passes: packets to other ports, non-TCP packets, non-SYN segments
//! (the connections they belong to were admitted, or the stack answers them), and every
//! packet the parser cannot follow (more than one VLAN tag, unknown or too many IPv6
//! extension headers, ESP, truncated headers, non-first fragments). The guard must never
//! break the node: when in doubt, `XDP_PASS`.
//!
//! The token buckets are shared by all CPUs and updated with one compare-and-swap
//! (`BPF_CMPXCHG`) each, so a source flooding over several receive queues gets no
//! more than its rate. When the swap keeps failing (other CPUs admitting SYNs of the
//! same prefix at the same instant, [`MAX_CAS_TRIES`] times in a row) the SYN is
//! dropped as rate limited and counted in `rate_contended`: fail closed, because only
//! a flood gets there and admitting would overrun the quota.
//!
//! Counters per listener go to the per-CPU `GW_XDP_STATS`. Nothing is logged per packet.
use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuHashMap, lpm_trie::Key},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use gateway_common::{
    Bucket, BucketKey, CIDR_ALLOW, CIDR_DENY, CIDR_KEY_HEAD_BITS, Cidr4, Cidr6, ListenerKey,
    MAX_LISTENERS, MAX_XDP_BUCKETS, MAX_XDP_CIDRS, XDP_F_HAS_ALLOW, XdpPolicy, XdpStats,
};

use crate::GW_LISTENERS;

/// Listener port -> the guard's policy for it.
#[btf_map]
static GW_XDP_POLICY: HashMap<ListenerKey, XdpPolicy, { MAX_LISTENERS as usize }> = HashMap::new();

/// (listener port, allow/deny, IPv4 client prefix) -> rule id.
#[btf_map]
static GW_XDP_CIDR4: LpmTrie<Cidr4, u32, { MAX_XDP_CIDRS as usize }> = LpmTrie::new();

/// (listener port, allow/deny, IPv6 client prefix) -> rule id.
#[btf_map]
static GW_XDP_CIDR6: LpmTrie<Cidr6, u32, { MAX_XDP_CIDRS as usize }> = LpmTrie::new();

/// (listener port, masked source) -> SYN token bucket.
#[btf_map]
static GW_XDP_BUCKETS: LruHashMap<BucketKey, Bucket, { MAX_XDP_BUCKETS as usize }> =
    LruHashMap::new();

/// Per-CPU counters per listener.
#[btf_map]
static GW_XDP_STATS: PerCpuHashMap<ListenerKey, XdpStats, { MAX_LISTENERS as usize }> =
    PerCpuHashMap::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers followed before giving up.
const MAX_IPV6_EXT: usize = 8;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const NS_PER_SEC: u64 = 1_000_000_000;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The source of a packet, as far as the policy cares.
enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// Why a SYN was dropped.
enum Drop {
    Denied,
    NotAllowed,
    RateLimited,
    /// Rate limited because the bucket's compare-and-swap retries ran out.
    RateContended,
}

/// `N` bytes of the packet at `off`, or `None` when the packet is shorter.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + N > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
}

#[xdp]
pub fn gw_xdp(ctx: XdpContext) -> u32 {
    match guard(&ctx) {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

/// The verdict on one packet: `Some(reason)` to drop it, `None` to pass it.
#[inline(always)]
fn guard(ctx: &XdpContext) -> Option<Drop> {
    let (src, l4) = parse_ip(ctx)?;
    let tcp = bytes::<20>(ctx, l4)?;
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let key = ListenerKey::new(port);
    // Only listener ports are guarded.
    GW_LISTENERS.get_ptr(&key)?;
    let stats = xdp_stats(&key);
    if let Some(s) = stats {
        // SAFETY: per-CPU value of this CPU; programs do not nest on one CPU.
        unsafe { (*s).packets += 1 };
    }
    let flags = tcp[13];
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return None;
    }
    let verdict = match GW_XDP_POLICY.get_ptr(&key) {
        // SAFETY: pointer from the lookup, read once.
        Some(p) => admit(unsafe { &*p }, port, &src),
        None => None,
    };
    if let Some(s) = stats {
        // SAFETY: as above.
        let s = unsafe { &mut *s };
        match verdict {
            None => s.syn_admitted += 1,
            Some(Drop::Denied) => s.dropped_denied += 1,
            Some(Drop::NotAllowed) => s.dropped_not_allowed += 1,
            Some(Drop::RateLimited) => s.dropped_rate_limited += 1,
            Some(Drop::RateContended) => {
                s.dropped_rate_limited += 1;
                s.rate_contended += 1;
            }
        }
    }
    verdict
}

/// The source and the offset of the TCP header, for TCP over IPv4 or IPv6 (behind at
/// most one VLAN tag); `None` for anything else.
#[inline(always)]
fn parse_ip(ctx: &XdpContext) -> Option<(Source, usize)> {
    let eth = bytes::<ETH_HLEN>(ctx, 0)?;
    let mut proto = u16::from_be_bytes([eth[12], eth[13]]);
    let mut off = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let tag = bytes::<4>(ctx, ETH_HLEN)?;
        proto = u16::from_be_bytes([tag[2], tag[3]]);
        off += 4;
    }
    match proto {
        ETH_P_IP => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => None,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize) -> Option<(Source, usize)> {
    let ip = bytes::<20>(ctx, off)?;
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    // A non-first fragment carries no TCP header; the first one (offset 0) does.
    let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if frag_off != 0 || ip[9] != IPPROTO_TCP {
        return None;
    }
    Some((Source::V4([ip[12], ip[13], ip[14], ip[15]]), off + ihl))
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize) -> Option<(Source, usize)> {
    let ip = bytes::<40>(ctx, off)?;
    if ip[0] >> 4 != 6 {
        return None;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    let mut next = ip[6];
    let mut l4 = off + 40;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            IPPROTO_TCP => return Some((Source::V6(src), l4)),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h = bytes::<2>(ctx, l4)?;
                next = h[0];
                l4 += (usize::from(h[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let h = bytes::<2>(ctx, l4)?;
                next = h[0];
                l4 += (usize::from(h[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let h = bytes::<8>(ctx, l4)?;
                // Offset in 8-octet units, the upper 13 bits.
                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    return None;
                }
                next = h[0];
                l4 += 8;
            }
            _ => return None,
        }
    }
    if next == IPPROTO_TCP {
        Some((Source::V6(src), l4))
    } else {
        None
    }
}

/// Applies a listener's policy to a SYN from `src`: `None` admits it.
#[inline(always)]
fn admit(policy: &XdpPolicy, port: u16, src: &Source) -> Option<Drop> {
    let port_be = port.to_be_bytes();
    let (denied, allowed) = match src {
        Source::V4(a) => {
            let key = |kind| {
                Key::new(
                    CIDR_KEY_HEAD_BITS + 32,
                    Cidr4 {
                        port_be,
                        kind,
                        _pad: 0,
                        addr_be: *a,
                    },
                )
            };
            (
                GW_XDP_CIDR4.get(&key(CIDR_DENY)).is_some(),
                policy.flags & XDP_F_HAS_ALLOW == 0 || GW_XDP_CIDR4.get(&key(CIDR_ALLOW)).is_some(),
            )
        }
        Source::V6(a) => {
            let key = |kind| {
                Key::new(
                    CIDR_KEY_HEAD_BITS + 128,
                    Cidr6 {
                        port_be,
                        kind,
                        _pad: 0,
                        addr_be: *a,
                    },
                )
            };
            (
                GW_XDP_CIDR6.get(&key(CIDR_DENY)).is_some(),
                policy.flags & XDP_F_HAS_ALLOW == 0 || GW_XDP_CIDR6.get(&key(CIDR_ALLOW)).is_some(),
            )
        }
    };
    if denied {
        return Some(Drop::Denied);
    }
    if !allowed {
        return Some(Drop::NotAllowed);
    }
    if policy.syn_rate == 0 {
        return None;
    }
    match take_token(policy, port, src) {
        Take::Admitted => None,
        Take::Empty => Some(Drop::RateLimited),
        Take::Contended => Some(Drop::RateContended),
    }
}

/// What [`take_token`] found.
enum Take {
    /// A token was taken: admit the SYN.
    Admitted,
    /// The bucket is empty: drop.
    Empty,
    /// Other CPUs changed the bucket under every try: drop (fail closed).
    Contended,
}

/// Compare-and-swap tries on a bucket before giving up. A try fails only when
/// another CPU admitted a SYN of the same prefix between this CPU's read and its
/// swap, so running out means a flood from that prefix.
const MAX_CAS_TRIES: usize = 4;

/// One `BPF_CMPXCHG` on the word at `p` (BPF ISA v3 atomics, the LLVM default CPU):
/// `Ok` when it held `old` and now holds `new`, else `Err` with what it holds.
///
/// # Safety
///
/// `p` points to a live, aligned `u64` (a map value).
#[inline(always)]
unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> Result<(), u64> {
    // SAFETY: as the caller promises.
    let (seen, swapped) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
    };
    if swapped { Ok(()) } else { Err(seen) }
}

/// Takes one token from the bucket of `src`'s prefix (a GCRA state in one word, see
/// [`Bucket`]), atomically across CPUs: SYNs admitted from a prefix never exceed
/// `burst + rate * elapsed`, however many CPUs its packets arrive on.
///
/// Fails open in one case only: when no bucket can be kept for the prefix (the
/// insert and the lookup after it both fail), the SYN is admitted.
#[inline(always)]
fn take_token(policy: &XdpPolicy, port: u16, src: &Source) -> Take {
    let mut key = BucketKey {
        port,
        ..BucketKey::default()
    };
    match src {
        Source::V4(a) => {
            key.family = AF_INET;
            let bits = u32::from(policy.rate_prefix4.min(32));
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            let m = (u32::from_be_bytes(*a) & mask).to_be_bytes();
            key.addr_be[..4].copy_from_slice(&m);
        }
        Source::V6(a) => {
            key.family = AF_INET6;
            let bits = u32::from(policy.rate_prefix6.min(128));
            for (i, b) in a.iter().enumerate() {
                let keep = bits.saturating_sub(8 * i as u32).min(8);
                key.addr_be[i] = b & ((0xff00_u16 >> keep) & 0xff) as u8;
            }
        }
    }
    // Rounded up, so that admissions never exceed the rate.
    let interval = NS_PER_SEC.div_ceil(u64::from(policy.syn_rate.max(1)));
    let window = u64::from(policy.syn_burst.max(1)) * interval;
    // SAFETY: reads the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let bucket = match GW_XDP_BUCKETS.get_ptr_mut(&key) {
        Some(b) => b,
        None => {
            // First SYN of the prefix: a full bucket less this SYN's token. A full map
            // evicts its least recently used bucket.
            let b = Bucket {
                tat_ns: now + interval,
            };
            if GW_XDP_BUCKETS
                .insert(&key, &b, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                return Take::Admitted;
            }
            // Another CPU made the bucket first: take from it like any other.
            match GW_XDP_BUCKETS.get_ptr_mut(&key) {
                Some(b) => b,
                None => return Take::Admitted,
            }
        }
    };
    // `Bucket` is `#[repr(C)]` with its one `u64` first.
    let tat = bucket.cast::<u64>();
    // SAFETY: a map value, live for this program run.
    let mut seen = unsafe { core::ptr::read_volatile(tat) };
    for _ in 0..MAX_CAS_TRIES {
        let next = seen.max(now) + interval;
        if next - now > window {
            return Take::Empty;
        }
        // SAFETY: as above; the value is 8-byte aligned in the map.
        match unsafe { cmpxchg(tat, seen, next) } {
            Ok(()) => return Take::Admitted,
            Err(current) => seen = current,
        }
    }
    Take::Contended
}

/// The counters of listener `key` on this CPU, created on first use.
#[inline(always)]
fn xdp_stats(key: &ListenerKey) -> Option<*mut XdpStats> {
    if let Some(p) = GW_XDP_STATS.get_ptr_mut(key) {
        return Some(p);
    }
    let _ = GW_XDP_STATS.insert(key, &XdpStats::default(), u64::from(BPF_NOEXIST));
    GW_XDP_STATS.get_ptr_mut(key)
}
