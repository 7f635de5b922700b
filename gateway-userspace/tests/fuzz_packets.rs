//! Fuzz targets for the packet parsers: the XDP guard `gw_xdp` and the forward program
//! `gw_fwd`, each loaded through the verifier once and then run on generated packets
//! through `BPF_PROG_TEST_RUN`.
//!
//! Three kinds of input per program:
//!
//! * `*_bytes`: random bytes. The verdict is one of the program's (never an error of
//!   the test run), and what a model of the program's documented parser says.
//! * `*_well_formed`: Ethernet (with 0-2 VLAN tags), IPv4 (options, fragment fields) or
//!   IPv6 (extension headers), TCP with random fields, options and payload, built with
//!   right lengths and checksums, between addresses and to ports the programmed policy
//!   or listeners name (and random ones). A model in this file computes the verdict from
//!   the packet's structure: for the guard, allowed or refused per the programmed policy
//!   (`docs/xdp.md`); for `gw_fwd`, translated towards a programmed backend (the frame
//!   then checked against one built from scratch, and the backend's answer translated
//!   back to the client), refused with a RST built from scratch, or passed untouched.
//! * `*_mutated`: a well-formed packet with a few bytes overwritten: the guard's verdict
//!   is the byte-level model's; `gw_fwd` gives an allowed verdict and leaves a packet it
//!   passes untouched.
//!
//! A `cargo test` runs each target for a bounded number of random inputs (bolero's
//! random engine; `BOLERO_RANDOM_ITERATIONS` sets how many); `cargo xtask fuzz --target
//! NAME --seconds N` runs one for a given time (see `docs/reliability.md`). What a run
//! finds is kept as a fixture at the end of this file.
//!
//! Privileged: root (loads eBPF programs; the `gw_fwd` targets make a network namespace
//! with two veth links, as `forward_fixtures.rs` does, since the program asks the FIB).
use std::net::IpAddr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use bolero::{TypeGenerator, check};
use gateway_common::{
    BACKEND_F_INVALID, Backend, BackendKey, FlowKey, GLOBAL_FWD_ATTEMPTS, GLOBAL_FWD_PORT_COUNT,
    GLOBAL_FWD_PORT_MIN, GLOBAL_FWD_PRESERVE_CLIENT, GW_BACKENDS, GW_FWD_ADDRS, GW_FWD_FLOWS,
    GW_FWD_IFACES, GW_FWD_SLOTS, GW_LISTENERS, LISTENER_F_DRAINING, ListenerInfo, ListenerKey,
    NodeAddr, PROG_FWD, PROG_XDP, SlotTable,
};
use netbed::Netns;
use sockgate::{
    desired,
    forward::{node_addr, slots},
    xdp::{Cidr, GuardMaps, ListenerGuard},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// `TC_ACT_REDIRECT`: forwarded, or a RST sent back.
const REDIRECT: u32 = 7;
/// `TCX_NEXT` (-1): not the program's, passed on untouched.
const NEXT: u32 = u32::MAX;
/// `TC_ACT_SHOT`: dropped.
const SHOT: u32 = 2;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// Largest frame handed to a test run.
const MAX_FRAME: usize = 1500;

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the packet fuzz targets load eBPF programs: run them as root"
    );
}

// ---- the generated packet ----

/// An address: mostly (the selector below [`ANY_FROM`]) one the programmed state names
/// (an index into the target's list), else any.
#[derive(Clone, Copy, Debug, TypeGenerator)]
struct Addr(u8, [u8; 16]);

/// A port: mostly one the programmed state names (index into the target's list), else
/// any.
#[derive(Clone, Copy, Debug, TypeGenerator)]
struct Port(u8, u16);

/// Selectors from this one up take a random address or port.
const ANY_FROM: u8 = 224;

/// A TCP option.
#[derive(Clone, Debug, TypeGenerator)]
enum Opt {
    Nop,
    Mss(u16),
    WindowScale(u8),
    SackPermitted,
    Timestamps(u32, u32),
    /// Another kind (2..=254) with up to 8 bytes of data.
    Other(u8, Vec<u8>),
}

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, TypeGenerator)]
enum Ext {
    /// Hop-by-hop options of (len8 % 4 + 1) * 8 bytes.
    HopByHop(u8),
    Routing(u8),
    Destination(u8),
    /// Authentication header of (len % 4 + 3) * 4 bytes (payload length in 4-octet
    /// units minus 2).
    Auth(u8),
    /// Fragment header: offset in 8-octet units, more fragments.
    Fragment(u16, bool),
}

/// TCP flags: a SYN (with other bits but ACK and RST), or any.
#[derive(Clone, Copy, Debug, TypeGenerator)]
enum Flags {
    Syn(u8),
    Any(u8),
}

impl Flags {
    fn bits(self) -> u8 {
        match self {
            Self::Syn(other) => SYN | (other & !(ACK | RST)),
            Self::Any(f) => f,
        }
    }
}

/// The IPv4 fragment field: flags and offset.
#[derive(Clone, Copy, Debug, TypeGenerator)]
enum Frag {
    None,
    DontFragment,
    /// First fragment (more fragments, offset 0).
    First,
    /// A later fragment at this offset (1..=8191) with or without more.
    Later(u16, bool),
}

#[derive(Clone, Debug, TypeGenerator)]
struct Packet {
    v6: bool,
    /// No VLAN tag, IPv4 options, fragment field (but DF) or IPv6 extension header:
    /// what `gw_fwd` takes.
    plain: bool,
    /// VLAN tags (0x8100 or 0x88a8 when the flag is set), at most 2 kept.
    vlans: Option<Vec<(bool, u16)>>,
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: Port,
    seq: u32,
    ack: u32,
    flags: Flags,
    window: u16,
    options: Vec<Opt>,
    payload: Vec<u8>,
    /// IPv4 option words (% 11).
    ip_option_words: Option<u8>,
    frag: Frag,
    ip_id: u16,
    ttl: u8,
    /// IPv6 extension headers, at most 10 kept.
    exts: Option<Vec<Ext>>,
}

/// A well-formed packet with bytes overwritten: (offset % length, value).
#[derive(Clone, Debug, TypeGenerator)]
struct Mutated {
    packet: Packet,
    writes: Vec<(u16, u8)>,
}

/// The addresses a target picks from, per family and end, and the ports.
struct Lists {
    src4: &'static [[u8; 4]],
    src6: &'static [[u8; 16]],
    dst4: &'static [[u8; 4]],
    dst6: &'static [[u8; 16]],
    ports: &'static [u16],
}

impl Addr {
    fn resolve(self, v6: bool, v4s: &[[u8; 4]], v6s: &[[u8; 16]]) -> IpAddr {
        let Self(i, a) = self;
        match (i < ANY_FROM, v6) {
            (true, false) => IpAddr::from(v4s[usize::from(i) % v4s.len()]),
            (true, true) => IpAddr::from(v6s[usize::from(i) % v6s.len()]),
            (false, false) => IpAddr::from([a[0], a[1], a[2], a[3]]),
            (false, true) => IpAddr::from(a),
        }
    }
}

impl Port {
    fn resolve(self, lists: &Lists) -> u16 {
        let Self(i, p) = self;
        if i < ANY_FROM {
            lists.ports[usize::from(i) % lists.ports.len()]
        } else {
            p
        }
    }
}

/// The TCP options as bytes, padded with end-of-list to whole words, at most 40.
fn option_bytes(opts: &[Opt]) -> Vec<u8> {
    let mut out = Vec::new();
    for o in opts {
        let b: Vec<u8> = match o {
            Opt::Nop => vec![1],
            Opt::Mss(v) => {
                let v = v.to_be_bytes();
                vec![2, 4, v[0], v[1]]
            }
            Opt::WindowScale(s) => vec![3, 3, *s],
            Opt::SackPermitted => vec![4, 2],
            Opt::Timestamps(a, b) => {
                let mut t = vec![8, 10];
                t.extend_from_slice(&a.to_be_bytes());
                t.extend_from_slice(&b.to_be_bytes());
                t
            }
            Opt::Other(kind, data) => {
                let kind = kind.clamp(&5, &254);
                let data = &data[..data.len().min(8)];
                let mut t = vec![*kind, (data.len() + 2) as u8];
                t.extend_from_slice(data);
                t
            }
        };
        if out.len() + b.len() > 40 {
            break;
        }
        out.extend_from_slice(&b);
    }
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = data
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo-header of `len` bytes of TCP between `src` and `dst` (RFC 793, RFC 8200).
fn pseudo(src: IpAddr, dst: IpAddr, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, 6]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 6]);
        }
        _ => unreachable!("one family"),
    }
    p
}

/// A TCP segment resolved to addresses and bytes, and its frame.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seg {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: Vec<u8>,
    payload: Vec<u8>,
    /// (tag protocol, id) per VLAN tag.
    vlans: Vec<(u16, u16)>,
    ip_option_words: u8,
    /// IPv4 flags and fragment offset field.
    frag_field: u16,
    ip_id: u16,
    ttl: u8,
    exts: Vec<Ext>,
    macs: ([u8; 6], [u8; 6]),
}

const MACS: ([u8; 6], [u8; 6]) = ([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02]);

impl Packet {
    fn resolve(&self, lists: &Lists) -> Seg {
        let frag_field = match self.frag {
            _ if self.plain => 0x4000,
            Frag::None => 0,
            Frag::DontFragment => 0x4000,
            Frag::First => 0x2000,
            Frag::Later(off, more) => (off % 8191 + 1) | if more { 0x2000 } else { 0 },
        };
        let tagged = !self.plain;
        Seg {
            src: self.src.resolve(self.v6, lists.src4, lists.src6),
            dst: self.dst.resolve(self.v6, lists.dst4, lists.dst6),
            sport: self.sport,
            dport: self.dport.resolve(lists),
            seq: self.seq,
            ack: self.ack,
            flags: self.flags.bits(),
            window: self.window,
            options: option_bytes(&self.options),
            payload: self.payload[..self.payload.len().min(256)].to_vec(),
            vlans: self
                .vlans
                .iter()
                .flatten()
                .filter(|_| tagged)
                .take(2)
                .map(|&(ad, id)| (if ad { 0x88a8 } else { 0x8100 }, id))
                .collect(),
            ip_option_words: if self.v6 || self.plain {
                0
            } else {
                self.ip_option_words.unwrap_or(0) % 11
            },
            frag_field: if self.v6 { 0 } else { frag_field },
            ip_id: if self.v6 { 0 } else { self.ip_id },
            ttl: self.ttl,
            exts: if self.v6 && !self.plain {
                self.exts.iter().flatten().take(10).copied().collect()
            } else {
                Vec::new()
            },
            macs: MACS,
        }
    }
}

/// The bytes of an extension header followed by `next`.
fn ext_bytes(e: Ext, next: u8) -> (u8, Vec<u8>) {
    match e {
        Ext::HopByHop(n) | Ext::Routing(n) | Ext::Destination(n) => {
            let kind = match e {
                Ext::HopByHop(_) => 0,
                Ext::Routing(_) => 43,
                _ => 60,
            };
            let len8 = n % 4;
            let mut h = vec![0u8; (usize::from(len8) + 1) * 8];
            h[0] = next;
            h[1] = len8;
            if kind != 43 {
                // PadN over the rest.
                h[2] = 1;
                h[3] = (usize::from(len8) * 8 + 4) as u8;
            }
            (kind, h)
        }
        Ext::Auth(n) => {
            let words = n % 4 + 3;
            let mut h = vec![0u8; usize::from(words) * 4];
            h[0] = next;
            h[1] = words - 2;
            (51, h)
        }
        Ext::Fragment(off, more) => {
            let mut h = vec![0u8; 8];
            h[0] = next;
            h[2..4].copy_from_slice(&(((off % 8192) << 3) | u16::from(more)).to_be_bytes());
            (44, h)
        }
    }
}

impl Seg {
    fn tcp_bytes(&self) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&self.sport.to_be_bytes());
        t[2..4].copy_from_slice(&self.dport.to_be_bytes());
        t[4..8].copy_from_slice(&self.seq.to_be_bytes());
        t[8..12].copy_from_slice(&self.ack.to_be_bytes());
        t[12] = (((20 + self.options.len()) / 4) as u8) << 4;
        t[13] = self.flags;
        t[14..16].copy_from_slice(&self.window.to_be_bytes());
        t.extend_from_slice(&self.options);
        t.extend_from_slice(&self.payload);
        let mut p = pseudo(self.src, self.dst, t.len());
        p.extend_from_slice(&t);
        let c = checksum(&p);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    }

    fn frame(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.macs.0);
        f.extend_from_slice(&self.macs.1);
        for &(tpid, id) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        let tcp = self.tcp_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 5 + usize::from(self.ip_option_words);
                let mut h = vec![0u8; ihl * 4];
                h[0] = 0x40 | ihl as u8;
                let total = (h.len() + tcp.len()) as u16;
                h[2..4].copy_from_slice(&total.to_be_bytes());
                h[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
                h[6..8].copy_from_slice(&self.frag_field.to_be_bytes());
                h[8] = self.ttl;
                h[9] = 6;
                h[12..16].copy_from_slice(&src.octets());
                h[16..20].copy_from_slice(&dst.octets());
                for b in &mut h[20..] {
                    *b = 1;
                }
                let c = checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                // Extension headers, built from the last (followed by TCP) back.
                let mut chain = Vec::new();
                let mut next = 6u8;
                for &e in self.exts.iter().rev() {
                    let (kind, mut h) = ext_bytes(e, next);
                    h.extend_from_slice(&chain);
                    chain = h;
                    next = kind;
                }
                let mut h = [0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&((chain.len() + tcp.len()) as u16).to_be_bytes());
                h[6] = next;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&src.octets());
                h[24..40].copy_from_slice(&dst.octets());
                f.extend_from_slice(&h);
                f.extend_from_slice(&chain);
            }
            _ => unreachable!("one family"),
        }
        f.extend_from_slice(&tcp);
        f
    }
}

/// Overwrites bytes of `frame` as `writes` say, keeping it at least 14 bytes.
fn mutate(mut frame: Vec<u8>, writes: &[(u16, u8)]) -> Vec<u8> {
    for &(at, v) in writes.iter().take(8) {
        let n = frame.len();
        frame[usize::from(at) % n] = v;
    }
    frame
}

/// Random bytes as a frame: at least an Ethernet header's 14 (the test run refuses
/// less), at most [`MAX_FRAME`].
fn frame_of(bytes: &[u8]) -> Vec<u8> {
    let mut f = bytes[..bytes.len().min(MAX_FRAME)].to_vec();
    f.resize(f.len().max(14), 0);
    f
}

// ---- the XDP guard ----

/// Listener 8080: allow `10.0.0.0/8` and `2001:db8::/32`, deny `10.66.0.0/16`,
/// `10.1.2.3` and `2001:db8:bad::/48`. Listener 5050: allow `10.9.0.0/16`, deny
/// `10.0.0.0/8`. Listener 7070: no policy. 6060: no listener. No SYN rate (its buckets
/// depend on the clock).
struct GuardPolicy {
    listeners: Vec<(u16, Option<ListenerGuard>)>,
}

impl GuardPolicy {
    fn new() -> Self {
        let g = |allow: &[&str], deny: &[&str]| ListenerGuard {
            allow: allow.iter().map(|c| c.parse().expect("cidr")).collect(),
            deny: deny.iter().map(|c| c.parse().expect("cidr")).collect(),
            syn_rate: None,
        };
        Self {
            listeners: vec![
                (
                    8080,
                    Some(g(
                        &["10.0.0.0/8", "2001:db8::/32"],
                        &["10.66.0.0/16", "10.1.2.3", "2001:db8:bad::/48"],
                    )),
                ),
                (5050, Some(g(&["10.9.0.0/16"], &["10.0.0.0/8"]))),
                (7070, None),
            ],
        }
    }

    /// Whether a SYN from `src` to `port` is dropped.
    fn refuses(&self, src: IpAddr, port: u16) -> bool {
        let Some((_, guard)) = self.listeners.iter().find(|(p, _)| *p == port) else {
            return false;
        };
        let Some(g) = guard else {
            return false;
        };
        let within = |set: &std::collections::BTreeSet<Cidr>| set.iter().any(|c| c.contains(src));
        within(&g.deny) || (!g.allow.is_empty() && !within(&g.allow))
    }

    fn is_listener(&self, port: u16) -> bool {
        self.listeners.iter().any(|(p, _)| *p == port)
    }
}

const GUARD_V4: &[[u8; 4]] = &[
    [10, 1, 2, 3],
    [10, 1, 2, 4],
    [10, 66, 0, 9],
    [10, 9, 1, 1],
    [10, 5, 5, 5],
    [192, 0, 2, 1],
    [0, 0, 0, 0],
    [255, 255, 255, 255],
];
const GUARD_V6: &[[u8; 16]] = &[
    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [
        0x20, 0x01, 0x0d, 0xb8, 0x0b, 0xad, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ],
    [
        0x20, 0x01, 0x0d, 0xb8, 0x0b, 0xae, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ],
    [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3],
];

/// The guard looks at sources only: both ends pick from the same lists.
const GUARD_LISTS: Lists = Lists {
    src4: GUARD_V4,
    src6: GUARD_V6,
    dst4: GUARD_V4,
    dst6: GUARD_V6,
    ports: &[8080, 5050, 7070, 6060],
};

struct Guard {
    ebpf: Ebpf,
    policy: GuardPolicy,
    /// Kept: the guard's maps stay programmed while it lives.
    _maps: GuardMaps,
}

impl Guard {
    fn load() -> Self {
        require_root();
        let mut ebpf = EbpfLoader::new()
            .load(sockgate::ebpf::OBJECT)
            .expect("object loads");
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .expect("gw_xdp in the object")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("the verifier accepts gw_xdp");
        let policy = GuardPolicy::new();
        {
            let mut l: HashMap<_, ListenerKey, ListenerInfo> =
                HashMap::try_from(ebpf.map_mut(GW_LISTENERS).expect("GW_LISTENERS"))
                    .expect("hash map");
            for (p, _) in &policy.listeners {
                l.insert(ListenerKey::new(*p), ListenerInfo::default(), 0)
                    .expect("listener");
            }
        }
        let mut maps = GuardMaps::take(&mut ebpf).expect("guard maps");
        for (p, g) in &policy.listeners {
            if let Some(g) = g {
                maps.set_guard(*p, None, Some(g)).expect("guard");
            }
        }
        Self {
            ebpf,
            policy,
            _maps: maps,
        }
    }

    fn run(&self, frame: &[u8]) -> u32 {
        let prog: &Xdp = self
            .ebpf
            .program(PROG_XDP)
            .expect("gw_xdp")
            .try_into()
            .expect("XDP");
        let mut out = vec![0u8; frame.len() + 256];
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e}", frame.len()))
        .return_value
    }

    /// The verdict of the guard's documented parser (`gateway-ebpf/src/xdp.rs`,
    /// `docs/xdp.md`) on any bytes: Ethernet with at most one VLAN tag (802.1Q or
    /// 802.1ad), IPv4 (version 4, header length at least 20, fragment offset 0, TCP;
    /// options skipped) or IPv6 (version 6; hop-by-hop, routing, destination options,
    /// authentication and first-fragment headers followed, at most 8), then a whole
    /// 20-byte TCP header to a listener with SYN set and ACK clear: the policy decides.
    /// Anything else passes.
    fn model(&self, f: &[u8]) -> u32 {
        let verdict = || -> Option<bool> {
            let at = |i: usize| f.get(i).copied();
            let u16_at = |i: usize| Some(u16::from_be_bytes([at(i)?, at(i + 1)?]));
            let mut off = 14;
            let mut proto = u16_at(12)?;
            if proto == 0x8100 || proto == 0x88a8 {
                proto = u16_at(16)?;
                off += 4;
            }
            let (src, l4) = match proto {
                0x0800 => {
                    let ip = f.get(off..off + 20)?;
                    let ihl = usize::from(ip[0] & 0x0f) * 4;
                    if ip[0] >> 4 != 4
                        || ihl < 20
                        || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0
                        || ip[9] != 6
                    {
                        return None;
                    }
                    let s: [u8; 4] = ip[12..16].try_into().ok()?;
                    (IpAddr::from(s), off + ihl)
                }
                0x86dd => {
                    let ip = f.get(off..off + 40)?;
                    if ip[0] >> 4 != 6 {
                        return None;
                    }
                    let s: [u8; 16] = ip[8..24].try_into().ok()?;
                    let mut next = ip[6];
                    let mut l4 = off + 40;
                    let mut seen = 0;
                    while next != 6 {
                        if seen == 8 {
                            return None;
                        }
                        seen += 1;
                        match next {
                            0 | 43 | 60 => {
                                let h = f.get(l4..l4 + 2)?;
                                next = h[0];
                                l4 += (usize::from(h[1]) + 1) * 8;
                            }
                            51 => {
                                let h = f.get(l4..l4 + 2)?;
                                next = h[0];
                                l4 += (usize::from(h[1]) + 2) * 4;
                            }
                            44 => {
                                let h = f.get(l4..l4 + 8)?;
                                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                                    return None;
                                }
                                next = h[0];
                                l4 += 8;
                            }
                            _ => return None,
                        }
                    }
                    (IpAddr::from(s), l4)
                }
                _ => return None,
            };
            let tcp = f.get(l4..l4 + 20)?;
            let port = u16::from_be_bytes([tcp[2], tcp[3]]);
            let syn = tcp[13] & SYN != 0 && tcp[13] & ACK == 0;
            Some(self.policy.is_listener(port) && syn && self.policy.refuses(src, port))
        };
        if verdict() == Some(true) {
            XDP_DROP
        } else {
            XDP_PASS
        }
    }

    /// The verdict from the packet's structure alone (not its bytes).
    fn structural_model(&self, s: &Seg) -> u32 {
        let offset = s.frag_field & 0x1fff;
        let followed = s.vlans.len() <= 1
            && offset == 0
            && s.exts.len() <= 8
            && s.exts
                .iter()
                .all(|e| !matches!(e, Ext::Fragment(off, _) if off % 8192 != 0));
        let syn = s.flags & SYN != 0 && s.flags & ACK == 0;
        if followed && syn && self.policy.refuses(s.src, s.dport) {
            XDP_DROP
        } else {
            XDP_PASS
        }
    }
}

fn check_guard(guard: &Guard, frame: &[u8]) -> u32 {
    let got = guard.run(frame);
    assert!(
        got == XDP_PASS || got == XDP_DROP,
        "gw_xdp returned {got} on {frame:02x?}"
    );
    let want = guard.model(frame);
    assert_eq!(got, want, "gw_xdp verdict on {frame:02x?}");
    got
}

#[test]
fn xdp_bytes() {
    let guard = Guard::load();
    check!().for_each(|bytes| {
        check_guard(&guard, &frame_of(bytes));
    });
}

#[test]
fn xdp_well_formed() {
    let guard = Guard::load();
    // Inputs per verdict: passed, dropped.
    let mut seen = [0u32; 2];
    check!().with_type::<Packet>().for_each(|p| {
        let seg = p.resolve(&GUARD_LISTS);
        let frame = seg.frame();
        let got = check_guard(&guard, &frame);
        assert_eq!(
            got,
            guard.structural_model(&seg),
            "gw_xdp verdict on {seg:?}"
        );
        seen[usize::from(got == XDP_DROP)] += 1;
    });
    println!("gw_xdp: passed {}, dropped {}", seen[0], seen[1]);
    assert!(
        seen.iter().all(|&n| n > 0),
        "both verdicts met at least once: {seen:?}"
    );
}

#[test]
fn xdp_mutated() {
    let guard = Guard::load();
    check!().with_type::<Mutated>().for_each(|m| {
        let frame = mutate(m.packet.resolve(&GUARD_LISTS).frame(), &m.writes);
        check_guard(&guard, &frame);
    });
}

// ---- the forward program ----

const PORT_MIN: u16 = 40000;
const PORTS: u32 = 1000;
const BACKEND_PORT: u16 = 9000;

/// Listener 8080: two IPv4 backends. 8086: two IPv6 backends. 8081: one backend of
/// weight 0 (every SYN refused). 8082: an invalid backendRef (refused). 8083: draining.
/// 8084: a listener with no selection table. 8090: not a listener.
const FWD_PORTS: &[u16] = &[8080, 8086, 8081, 8082, 8083, 8084, 8090];

/// Node (client side), NAT (backend side), clients, a stranger on the client link,
/// backends.
const FWD_V4: &[[u8; 4]] = &[
    [10, 201, 0, 1],
    [10, 201, 1, 1],
    [10, 201, 0, 2],
    [10, 201, 0, 3],
    [10, 201, 0, 77],
    [10, 201, 1, 2],
    [10, 201, 1, 3],
];
const FWD_V6: &[[u8; 16]] = &[
    [0xfd, 0, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0xfd, 0, 0x02, 0x01, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0xfd, 0, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    [0xfd, 0, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
    [0xfd, 0, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x77],
    [0xfd, 0, 0x02, 0x01, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    [0xfd, 0, 0x02, 0x01, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
];

/// Sources: the clients and the others; destinations: mostly the node's addresses,
/// the stranger, a backend. Ports: the listeners with backends twice as often.
const FWD_LISTS: Lists = Lists {
    src4: FWD_V4,
    src6: FWD_V6,
    dst4: &[
        FWD_V4[0], FWD_V4[1], FWD_V4[0], FWD_V4[1], FWD_V4[4], FWD_V4[5],
    ],
    dst6: &[
        FWD_V6[0], FWD_V6[1], FWD_V6[0], FWD_V6[1], FWD_V6[4], FWD_V6[5],
    ],
    ports: &[8080, 8086, 8080, 8086, 8081, 8082, 8083, 8084, 8090],
};

fn node_addrs() -> [IpAddr; 4] {
    [
        IpAddr::from(FWD_V4[0]),
        IpAddr::from(FWD_V4[1]),
        IpAddr::from(FWD_V6[0]),
        IpAddr::from(FWD_V6[1]),
    ]
}

/// The NAT source the FIB picks towards the backends of a family.
fn nat(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::from(FWD_V6[1])
    } else {
        IpAddr::from(FWD_V4[1])
    }
}

/// The backends of the listener `port`, as programmed.
fn fwd_backends(port: u16) -> Vec<desired::Backend> {
    let be = |ip: IpAddr, weight| desired::Backend {
        addr: Some(std::net::SocketAddr::new(ip, BACKEND_PORT)),
        weight,
        backend_ref: format!("default/svc-{ip}:80"),
        endpoint_slice: None,
    };
    match port {
        8080 | 8083 | 8084 => vec![
            be(IpAddr::from(FWD_V4[5]), 1),
            be(IpAddr::from(FWD_V4[6]), 2),
        ],
        8086 => vec![
            be(IpAddr::from(FWD_V6[5]), 1),
            be(IpAddr::from(FWD_V6[6]), 1),
        ],
        8081 => vec![be(IpAddr::from(FWD_V4[5]), 0)],
        8082 => vec![desired::Backend {
            addr: None,
            weight: 1,
            backend_ref: "default/missing:80".into(),
            endpoint_slice: None,
        }],
        _ => Vec::new(),
    }
}

/// Runs `body` on a thread inside a new network namespace with the client link `c0`
/// and the backend link `b0` (veth pairs, peers unaddressed), forwarding on, and a
/// default route each family through the backend link, as a node has.
fn in_bed(body: impl FnOnce() + Send + 'static) {
    require_root();
    let ns = Netns::new("fwdfuzz").expect("a network namespace");
    let steps: [&[&str]; 12] = [
        &["link", "add", "c0", "type", "veth", "peer", "name", "c1"],
        &["link", "add", "b0", "type", "veth", "peer", "name", "b1"],
        &["addr", "add", "10.201.0.1/24", "dev", "c0"],
        &["addr", "add", "10.201.1.1/24", "dev", "b0"],
        &["addr", "add", "fd00:201::1/64", "dev", "c0", "nodad"],
        &["addr", "add", "fd00:201:1::1/64", "dev", "b0", "nodad"],
        &["link", "set", "c0", "up"],
        &["link", "set", "b0", "up"],
        &["link", "set", "c1", "up"],
        &["link", "set", "b1", "up"],
        &[
            "route",
            "add",
            "default",
            "via",
            "10.201.1.254",
            "dev",
            "b0",
        ],
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:201:1::fe",
            "dev",
            "b0",
        ],
    ];
    for args in steps {
        ns.ip(args).expect("set up the links");
    }
    for s in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        let out = ns.output("sysctl", &["-qw", s]).expect("sysctl");
        assert!(out.status.success(), "sysctl {s}: {out:?}");
    }
    ns.run(body).expect("enter the namespace");
}

struct Fwd {
    ebpf: Ebpf,
    client_if: u32,
    backend_if: u32,
}

impl Fwd {
    /// Loads the object, `gw_fwd` through the verifier, and programs the node's
    /// addresses, the attached links and the listeners of [`FWD_PORTS`]. Call inside
    /// the bed.
    fn load() -> Self {
        let port_min = u32::from(PORT_MIN);
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_FWD_PORT_MIN, &port_min, true)
            .override_global(GLOBAL_FWD_PORT_COUNT, &PORTS, true)
            .override_global(GLOBAL_FWD_ATTEMPTS, &3u32, true)
            .override_global(GLOBAL_FWD_PRESERVE_CLIENT, &0u32, true)
            .load(sockgate::ebpf::OBJECT)
            .expect("object loads");
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_FWD)
            .expect("gw_fwd in the object")
            .try_into()
            .expect("a tc program");
        prog.load().expect("the verifier accepts gw_fwd");
        let index = |name: &str| nix::net::if_::if_nametoindex(name).expect("link index");
        let mut fwd = Self {
            ebpf,
            client_if: index("c0"),
            backend_if: index("b0"),
        };
        let mut addrs: HashMap<_, NodeAddr, u32> = fwd.map_mut(GW_FWD_ADDRS);
        for a in node_addrs() {
            addrs.insert(node_addr(a), 1, 0).expect("node address");
        }
        let (c, b) = (fwd.client_if, fwd.backend_if);
        let mut ifaces: HashMap<_, u32, u32> = fwd.map_mut(GW_FWD_IFACES);
        for i in [c, b] {
            ifaces.insert(i, 1, 0).expect("attached interface");
        }
        for &port in FWD_PORTS {
            if port == 8090 {
                continue;
            }
            fwd.listener(port, &fwd_backends(port));
        }
        fwd
    }

    fn map_mut<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).expect("map in the object")).expect("hash map")
    }

    fn listener(&mut self, port: u16, backends: &[desired::Backend]) {
        let mut l: HashMap<_, ListenerKey, ListenerInfo> = self.map_mut(GW_LISTENERS);
        l.insert(
            ListenerKey::new(port),
            ListenerInfo {
                backend_count: backends.len() as u32,
                total_weight: backends.iter().map(|b| b.weight).sum(),
                flags: if port == 8083 { LISTENER_F_DRAINING } else { 0 },
                generation: 1,
                ..ListenerInfo::default()
            },
            0,
        )
        .expect("listener");
        let mut m: HashMap<_, BackendKey, Backend> = self.map_mut(GW_BACKENDS);
        for (i, b) in backends.iter().enumerate() {
            let v = match b.addr {
                Some(a) => Backend {
                    addr_be: node_addr(a.ip()).addr_be,
                    port: a.port(),
                    family: if a.is_ipv4() { 2 } else { 10 },
                    weight: b.weight,
                    flags: 0,
                    _pad: 0,
                },
                None => Backend {
                    weight: b.weight,
                    flags: BACKEND_F_INVALID,
                    ..Backend::default()
                },
            };
            m.insert(BackendKey::new(port, i as u32), v, 0)
                .expect("backend");
        }
        if port != 8084 {
            let mut s: HashMap<_, ListenerKey, SlotTable> = self.map_mut(GW_FWD_SLOTS);
            s.insert(ListenerKey::new(port), slots::table(backends), 0)
                .expect("slot table");
        }
    }

    /// Empties the connection table: every input starts from the same state.
    fn clear_flows(&mut self) {
        let mut m: HashMap<_, FlowKey, gateway_common::Flow> = self.map_mut(GW_FWD_FLOWS);
        let keys: Vec<FlowKey> = m.keys().map(|k| k.expect("flow key")).collect();
        for k in keys {
            m.remove(&k).expect("remove flow");
        }
    }

    /// Runs `frame` through `gw_fwd` as received on `ifindex`.
    fn run(&self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self
            .ebpf
            .program(PROG_FWD)
            .expect("gw_fwd")
            .try_into()
            .expect("tc");
        // A `__sk_buff` with only `ifindex` (offset 40) set.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {frame:02x?}: {e:?}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}

/// What `gw_fwd` must do with a segment when its table is empty.
#[derive(Debug)]
enum Expect {
    /// Passed on untouched.
    Next,
    /// Answered with a RST.
    Refused,
    /// Forwarded to one of these backends.
    Forwarded(Vec<IpAddr>),
}

/// The model of `gw_fwd` for a segment received on the client link with an empty
/// connection table (`gateway-ebpf/src/forward.rs`, `docs/datapath.md`).
fn fwd_model(s: &Seg) -> Expect {
    // Only plain Ethernet, IPv4 without options and not a fragment, IPv6 without
    // extension headers.
    // More fragments, or an offset.
    let fragment = s.frag_field & 0x3fff;
    let followed =
        s.vlans.is_empty() && s.ip_option_words == 0 && fragment == 0 && s.exts.is_empty();
    if !followed || s.flags & (SYN | ACK | RST) != SYN {
        return Expect::Next;
    }
    // Listeners only (8090 is none, 8083 drains), on the node's addresses.
    if !node_addrs().contains(&s.dst)
        || !FWD_PORTS.contains(&s.dport)
        || matches!(s.dport, 8083 | 8090)
    {
        return Expect::Next;
    }
    let backends = fwd_backends(s.dport);
    if s.dport == 8084 || backends.iter().all(|b| b.weight == 0) {
        return Expect::Refused;
    }
    if backends.iter().any(|b| b.addr.is_none()) {
        return Expect::Refused;
    }
    let same_family: Vec<IpAddr> = backends
        .iter()
        .filter(|b| b.weight > 0)
        .filter_map(|b| b.addr.map(|a| a.ip()))
        .filter(|ip| ip.is_ipv6() == s.src.is_ipv6())
        .collect();
    if same_family.is_empty() {
        // A backend of the other family: the program cannot translate the segment
        // into it; the stack (and so the socket paths) take it.
        return Expect::Next;
    }
    Expect::Forwarded(same_family)
}

/// The MSS options of `opts` lowered to `limit`, as the program clamps the first MSS
/// option of a SYN (options walked as TCP does: end of list stops, NOP is one byte,
/// others carry their length).
fn clamp_mss(opts: &[u8], limit: u16) -> Vec<u8> {
    let mut o = opts.to_vec();
    let mut i = 0;
    while i + 1 < o.len() {
        match o[i] {
            0 => break,
            1 => i += 1,
            2 if o[i + 1] == 4 && i + 3 < o.len() => {
                let mss = u16::from_be_bytes([o[i + 2], o[i + 3]]);
                if mss > limit {
                    o[i + 2..i + 4].copy_from_slice(&limit.to_be_bytes());
                }
                break;
            }
            _ if o[i + 1] < 2 => break,
            _ => i += usize::from(o[i + 1]),
        }
    }
    o
}

/// Checks `out`'s checksums on their own (a checksum field holding 0xffff and one
/// holding 0 are the same one's complement value), then returns it with both fields
/// zeroed for a byte comparison. `None` when a checksum is wrong.
fn checked(out: &[u8]) -> Result<Vec<u8>, String> {
    let mut f = out.to_vec();
    if f.len() < 14 {
        return Err(format!("{} bytes", f.len()));
    }
    let (ip_end, tcp_at, src, dst) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 if f.len() >= 34 => {
            let ihl = usize::from(f[14] & 0x0f) * 4;
            if checksum(&f[14..14 + ihl]) != 0 {
                return Err("IPv4 header checksum".into());
            }
            f[24] = 0;
            f[25] = 0;
            let s: [u8; 4] = f[26..30].try_into().expect("4");
            let d: [u8; 4] = f[30..34].try_into().expect("4");
            (14 + ihl, 14 + ihl, IpAddr::from(s), IpAddr::from(d))
        }
        0x86dd if f.len() >= 54 => {
            let s: [u8; 16] = f[22..38].try_into().expect("16");
            let d: [u8; 16] = f[38..54].try_into().expect("16");
            (54, 54, IpAddr::from(s), IpAddr::from(d))
        }
        t => return Err(format!("ethertype {t:#06x}")),
    };
    let _ = ip_end;
    let tcp = &f[tcp_at..];
    let mut p = pseudo(src, dst, tcp.len());
    p.extend_from_slice(tcp);
    if checksum(&p) != 0 {
        return Err("TCP checksum".into());
    }
    f[tcp_at + 16] = 0;
    f[tcp_at + 17] = 0;
    Ok(f)
}

/// Asserts `out` is `want`'s frame: checksums verified, then every other byte.
fn assert_frame(desc: &str, out: &[u8], want: &Seg) {
    let got = checked(out).unwrap_or_else(|e| panic!("{desc}: {e} wrong in {out:02x?}"));
    let want = checked(&want.frame()).expect("a frame built here");
    assert_eq!(got, want, "{desc}: frame");
}

/// The RST|ACK `gw_fwd` answers `syn` with.
fn rst_for(syn: &Seg) -> Seg {
    let len = syn.payload.len() as u32 + 1 + u32::from(syn.flags & FIN != 0);
    Seg {
        src: syn.dst,
        dst: syn.src,
        sport: syn.dport,
        dport: syn.sport,
        seq: 0,
        ack: syn.seq.wrapping_add(len),
        flags: RST | ACK,
        window: 0,
        options: Vec::new(),
        payload: Vec::new(),
        vlans: Vec::new(),
        ip_option_words: 0,
        frag_field: 0x4000,
        ip_id: 0,
        ttl: 64,
        exts: Vec::new(),
        macs: (syn.macs.1, syn.macs.0),
    }
}

/// One well-formed segment from the client side through `gw_fwd` with an empty table,
/// checked against [`fwd_model`]; a forwarded SYN is followed by the backend's SYN-ACK,
/// which must come back to the client translated. Returns what the model expected.
fn check_fwd_segment(fwd: &mut Fwd, s: &Seg) -> Expect {
    fwd.clear_flows();
    let frame = s.frame();
    let (action, out) = fwd.run(fwd.client_if, &frame);
    let expect = fwd_model(s);
    match &expect {
        Expect::Next => {
            assert_eq!(action, NEXT, "action on {s:?}");
            assert_eq!(out, frame, "a passed packet is untouched: {s:?}");
        }
        Expect::Refused => {
            assert_eq!(action, REDIRECT, "a refused SYN is answered: {s:?}");
            assert_frame(&format!("RST for {s:?}"), &out, &rst_for(s));
        }
        Expect::Forwarded(backends) => {
            assert_eq!(action, REDIRECT, "a SYN to a listener is forwarded: {s:?}");
            assert!(out.len() >= 54, "forwarded frame of {} bytes", out.len());
            let (dst, nat_port) = if s.src.is_ipv6() {
                let d: [u8; 16] = out[38..54].try_into().expect("16");
                (IpAddr::from(d), u16::from_be_bytes([out[54], out[55]]))
            } else {
                let d: [u8; 4] = out[30..34].try_into().expect("4");
                (IpAddr::from(d), u16::from_be_bytes([out[34], out[35]]))
            };
            assert!(
                backends.contains(&dst),
                "forwarded to {dst}, not one of {backends:?}: {s:?}"
            );
            assert!(
                (u32::from(PORT_MIN)..u32::from(PORT_MIN) + PORTS).contains(&u32::from(nat_port)),
                "NAT port {nat_port}"
            );
            let limit = if s.src.is_ipv6() { 1440 } else { 1460 };
            let want = Seg {
                src: nat(s.src.is_ipv6()),
                dst,
                sport: nat_port,
                dport: BACKEND_PORT,
                options: clamp_mss(&s.options, limit),
                ..s.clone()
            };
            assert_frame(&format!("forwarded {s:?}"), &out, &want);
            // The backend's answer comes back from the listener's address.
            let answer = Seg {
                src: dst,
                dst: nat(s.src.is_ipv6()),
                sport: BACKEND_PORT,
                dport: nat_port,
                ack: s.seq.wrapping_add(1),
                flags: SYN | ACK,
                options: Vec::new(),
                payload: Vec::new(),
                ..s.clone()
            };
            let (action, out) = fwd.run(fwd.backend_if, &answer.frame());
            assert_eq!(
                action, REDIRECT,
                "the backend's SYN-ACK is forwarded: {s:?}"
            );
            let back = Seg {
                src: s.dst,
                dst: s.src,
                sport: s.dport,
                dport: s.sport,
                ..answer
            };
            assert_frame(&format!("answer to {s:?}"), &out, &back);
        }
    }
    expect
}

/// Whether the kernel refuses `frame` as a test-run input, before the program runs: an
/// IPv4 or IPv6 ethertype without the whole fixed IP header (seen: `EINVAL` for 14
/// bytes of ethertype 0x0800).
fn test_run_refuses(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() < 14 + 20,
        0x86dd => frame.len() < 14 + 40,
        _ => false,
    }
}

/// `gw_fwd` on any bytes from either link, table empty: an allowed verdict, and a
/// packet passed on is untouched. Returns the verdict.
fn check_fwd_bytes(fwd: &mut Fwd, backend_side: bool, frame: &[u8]) -> u32 {
    fwd.clear_flows();
    let ifindex = if backend_side {
        fwd.backend_if
    } else {
        fwd.client_if
    };
    if test_run_refuses(frame) {
        return NEXT;
    }
    let (action, out) = fwd.run(ifindex, frame);
    assert!(
        [NEXT, REDIRECT, SHOT].contains(&action),
        "gw_fwd returned {} on {frame:02x?}",
        action.cast_signed()
    );
    if action == NEXT {
        assert_eq!(out, frame, "a passed packet is untouched");
    }
    action
}

#[test]
fn fwd_bytes() {
    in_bed(|| {
        let mut fwd = Fwd::load();
        check!().for_each(|bytes| {
            let backend_side = bytes.first().is_some_and(|b| b & 1 == 1);
            let frame = frame_of(bytes.get(1..).unwrap_or_default());
            let action = check_fwd_bytes(&mut fwd, backend_side, &frame);
            // Random bytes are no SYN to the node's addresses: nothing is forwarded.
            assert_eq!(action, NEXT, "random bytes passed on: {frame:02x?}");
        });
    });
}

#[test]
fn fwd_well_formed() {
    in_bed(|| {
        let mut fwd = Fwd::load();
        // Inputs per expectation: passed, refused, forwarded.
        let mut seen = [0u32; 3];
        check!().with_type::<Packet>().for_each(|p| {
            let i = match check_fwd_segment(&mut fwd, &p.resolve(&FWD_LISTS)) {
                Expect::Next => 0,
                Expect::Refused => 1,
                Expect::Forwarded(_) => 2,
            };
            seen[i] += 1;
        });
        println!(
            "gw_fwd: passed {}, refused {}, forwarded {}",
            seen[0], seen[1], seen[2]
        );
        assert!(
            seen.iter().all(|&n| n > 0),
            "every expectation met at least once: {seen:?}"
        );
    });
}

#[test]
fn fwd_mutated() {
    in_bed(|| {
        let mut fwd = Fwd::load();
        check!()
            .with_type::<(bool, Mutated)>()
            .for_each(|(side, m)| {
                let frame = mutate(m.packet.resolve(&FWD_LISTS).frame(), &m.writes);
                check_fwd_bytes(&mut fwd, *side, &frame);
            });
    });
}

// ---- what the targets found, kept as fixtures ----

// ---- what the targets found, kept as fixtures ----

/// A well-formed SYN from the client link with defaults for the other fields.
fn syn(src: IpAddr, dst: IpAddr, dport: u16) -> Seg {
    Seg {
        src,
        dst,
        sport: 33000,
        dport,
        seq: 1000,
        ack: 0,
        flags: SYN,
        window: 64240,
        options: vec![2, 4, 0x05, 0xb4],
        payload: Vec::new(),
        vlans: Vec::new(),
        ip_option_words: 0,
        frag_field: 0x4000,
        ip_id: 1,
        ttl: 64,
        exts: Vec::new(),
        macs: MACS,
    }
}

/// `fwd_well_formed` (shrunk to an IPv6 SYN to listener 8080, whose backends are
/// IPv4): the program picked an IPv4 backend for an IPv6 client, and with a default
/// route (as a node has) the FIB routed its IPv4-mapped form, so the SYN was sent to
/// `::ffff:10.201.1.x`, where nothing answers. The reverse sent an IPv4 SYN to the
/// last four bytes of an IPv6 backend's address. Such a SYN now goes to the stack (the
/// socket paths connect across families) and no entry is made.
#[test]
fn found_a_backend_of_the_other_family_is_left_to_the_stack() {
    in_bed(|| {
        let mut fwd = Fwd::load();
        for s in [
            syn(IpAddr::from(FWD_V6[2]), IpAddr::from(FWD_V6[0]), 8080),
            syn(IpAddr::from(FWD_V4[2]), IpAddr::from(FWD_V4[0]), 8086),
        ] {
            assert!(matches!(fwd_model(&s), Expect::Next), "{s:?}");
            check_fwd_segment(&mut fwd, &s);
            let flows: HashMap<_, FlowKey, gateway_common::Flow> = fwd.map_mut(GW_FWD_FLOWS);
            assert_eq!(flows.keys().count(), 0, "no entry for {s:?}");
        }
        // The same clients to the listener of their own family are forwarded.
        for s in [
            syn(IpAddr::from(FWD_V6[2]), IpAddr::from(FWD_V6[0]), 8086),
            syn(IpAddr::from(FWD_V4[2]), IpAddr::from(FWD_V4[0]), 8080),
        ] {
            assert!(matches!(
                check_fwd_segment(&mut fwd, &s),
                Expect::Forwarded(_)
            ));
        }
    });
}

/// `fwd_well_formed` (an IPv6 SYN whose options put the MSS at an odd offset, after a
/// kind-197 option of 10 bytes): the program lowered the MSS to what the links carry
/// but updated the TCP checksum as if the value were word-aligned, so the backend got
/// a SYN with a wrong checksum and dropped it, every retransmission too. Options such
/// as NOP, MSS put it there as well.
#[test]
fn found_mss_clamped_at_an_odd_offset_keeps_the_checksum() {
    in_bed(|| {
        let mut fwd = Fwd::load();
        for (src, dst, port) in [
            (IpAddr::from(FWD_V4[2]), IpAddr::from(FWD_V4[0]), 8080),
            (IpAddr::from(FWD_V6[2]), IpAddr::from(FWD_V6[0]), 8086),
        ] {
            for options in [
                vec![1, 2, 4, 0x23, 0x28, 1, 1, 0],
                vec![1, 1, 1, 2, 4, 0xff, 0xff, 0],
                vec![197, 3, 0, 2, 4, 0x05, 0xdc, 0],
            ] {
                let s = Seg {
                    options,
                    ..syn(src, dst, port)
                };
                assert!(matches!(
                    check_fwd_segment(&mut fwd, &s),
                    Expect::Forwarded(_)
                ));
            }
        }
    });
}
