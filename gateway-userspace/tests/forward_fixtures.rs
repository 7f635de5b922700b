//! The forward program `gw_fwd` on fixture packets through `BPF_PROG_TEST_RUN` (katran's
//! fixture tables: description, input packet, expected action, expected output packet),
//! then its connection table `GW_FWD_FLOWS`, its counters `GW_FWD_STATS` and the
//! connection ends it emits to `GW_FWD_EVENTS`.
//!
//! Privileged: loads the real object (root). The program asks the FIB for the NAT
//! source address and the interface towards a backend (`bpf_fib_lookup`, an input
//! lookup from the skb's device), and `BPF_PROG_TEST_RUN` runs it in the calling
//! thread's network namespace, on the device whose index the `__sk_buff` context names
//! (else loopback). So each test makes its own namespace with two dummy links and
//! forwarding on, and runs its body on a thread that entered it (the links are veth
//! pairs; their peers stay unaddressed):
//!
//! ```text
//!   c0 (client side)   10.201.0.1/24  fd00:201::1/64     clients  10.201.0.x  fd00:201::x
//!   b0 (backend side)  10.201.1.1/24  fd00:201:1::1/64   backends 10.201.1.x  fd00:201:1::x
//! ```
//!
//! Client segments run with the context's `ifindex` = c0, backend segments with b0.
//!
//! Every output frame is compared byte for byte with a frame built from scratch here,
//! after its own checksums were verified: the IPv4 header checksum and the TCP checksum
//! (pseudo-header, header, options, payload) are computed by this file, never taken from
//! the program. So a pass means right checksums, the right addresses and ports, and TCP
//! options and payload untouched. The fixtures carry complete checksums, and
//! `BPF_PROG_TEST_RUN` hands them to the program as `CHECKSUM_NONE`: this covers the
//! incremental updates outside `CHECKSUM_PARTIAL`. GSO super-packets with partial
//! checksums (what veth hands over) are covered by the end-to-end integrity tests in
//! `tests/tests/forward.rs` (hundreds of MiB hashed each way).
//!
//! Return values: 7 (`TC_ACT_REDIRECT`) for a forwarded segment or a RST sent back, -1
//! (`TCX_NEXT`) for a packet that is not the program's and goes on untouched, 2
//! (`TC_ACT_SHOT`) for a dropped one.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use gateway_common::{
    BACKEND_F_INVALID, Backend, BackendKey, DIR_BACKEND_TO_CLIENT, DIR_CLIENT_TO_BACKEND,
    FLOW_S_ACK, FLOW_S_FIN, FLOW_S_LOGGED, FLOW_S_RST, FLOW_S_SYN, FWD_END_BACKEND_RESET,
    FWD_END_CLIENT_RESET, FWD_END_FIN, Flow, FlowKey, FwdEvent, FwdStats, GLOBAL_FWD_ATTEMPTS,
    GLOBAL_FWD_PORT_COUNT, GLOBAL_FWD_PORT_MIN, GLOBAL_FWD_PRESERVE_CLIENT, GW_BACKENDS,
    GW_FWD_ADDRS, GW_FWD_EVENTS, GW_FWD_FLOWS, GW_FWD_IFACES, GW_FWD_SLOTS, GW_FWD_STATS,
    GW_LISTENERS, LISTENER_F_ADDRESSED, LISTENER_F_DRAINING, ListenerInfo, ListenerKey, NodeAddr,
    PROG_FWD, SlotTable,
};
use netbed::Netns;
use sockgate::{
    desired,
    forward::{node_addr, slots},
};

/// `TC_ACT_REDIRECT`: forwarded, or a RST sent back.
const REDIRECT: u32 = 7;
/// `TCX_NEXT` (-1): not the program's, passed on untouched.
const NEXT: u32 = u32::MAX;
/// `TC_ACT_SHOT`: dropped.
const SHOT: u32 = 2;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

const LISTENER: u16 = 8080;
const PORT_MIN: u16 = 40000;
const PORTS: u32 = 1000;
const BACKEND_PORT: u16 = 9000;

/// Destination and source MAC of every fixture frame.
const MACS: Macs = ([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02]);

// ---- the bed ----

#[derive(Clone, Copy, Debug)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn net(self, side: u8, host: u16) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(10, 201, side, host as u8).into(),
            Self::V6 => Ipv6Addr::new(0xfd00, 0x201, u16::from(side), 0, 0, 0, 0, host).into(),
        }
    }
    /// The node's address on the client side: where clients connect to listeners.
    fn node(self) -> IpAddr {
        self.net(0, 1)
    }
    /// The node's address on the backend side: the NAT source the FIB picks.
    fn nat(self) -> IpAddr {
        self.net(1, 1)
    }
    fn client(self, n: u16) -> IpAddr {
        self.net(0, 2 + n)
    }
    fn backend(self, n: u16) -> IpAddr {
        self.net(1, 2 + n)
    }
    /// An address on the client link that is not the node's.
    fn elsewhere(self) -> IpAddr {
        self.net(0, 77)
    }
}

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the forward fixture tests load eBPF programs and make network namespaces: run them as root"
    );
}

/// Runs `body` on a thread inside a new network namespace holding the client and
/// backend links (see the module docs; veth pairs whose other ends, `c1` and `b1`, stay
/// unaddressed), forwarding on; removes the namespace after.
fn in_bed(body: impl FnOnce() + Send + 'static) {
    require_root();
    let ns = Netns::new("fwdfix").expect("a network namespace");
    let steps: [&[&str]; 10] = [
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

// ---- the program and its maps ----

#[derive(Clone, Copy)]
struct Load {
    port_min: u16,
    ports: u32,
    attempts: u32,
    /// `GW_FWD_FLOWS` capacity; the object's default when `None`.
    flows: Option<u32>,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            port_min: PORT_MIN,
            ports: PORTS,
            attempts: 3,
            flows: None,
        }
    }
}

struct Fwd {
    ebpf: Ebpf,
    client_if: u32,
    backend_if: u32,
}

impl Fwd {
    /// Loads the object with `l`'s globals, `gw_fwd` through the verifier, and
    /// publishes the node's four addresses. Call inside the bed.
    fn load(l: Load) -> Self {
        let port_min = u32::from(l.port_min);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_FWD_PORT_MIN, &port_min, true)
            .override_global(GLOBAL_FWD_PORT_COUNT, &l.ports, true)
            .override_global(GLOBAL_FWD_ATTEMPTS, &l.attempts, true)
            .override_global(GLOBAL_FWD_PRESERVE_CLIENT, &0u32, true);
        if let Some(n) = l.flows {
            loader.map_max_entries(GW_FWD_FLOWS, n);
        }
        let mut ebpf = loader.load(sockgate::ebpf::OBJECT).expect("object loads");
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
        for fam in [Fam::V4, Fam::V6] {
            for a in [fam.node(), fam.nat()] {
                addrs.insert(node_addr(a), 1, 0).expect("node address");
            }
        }
        // The program is "attached" to both links: it forwards only towards those.
        let (c, b) = (fwd.client_if, fwd.backend_if);
        let mut ifaces: HashMap<_, u32, u32> = fwd.map_mut(GW_FWD_IFACES);
        for i in [c, b] {
            ifaces.insert(i, 1, 0).expect("attached interface");
        }
        fwd
    }

    fn map_mut<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).expect("map in the object")).expect("hash map")
    }

    fn map_ref<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> HashMap<&MapData, K, V> {
        HashMap::try_from(self.ebpf.map(name).expect("map in the object")).expect("hash map")
    }

    /// Runs `frame` through `gw_fwd` as received on `ifindex`: the action and the
    /// frame as the program left it.
    fn run(&self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(ifindex, frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"))
    }

    fn try_run(
        &self,
        ifindex: u32,
        frame: &[u8],
    ) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(PROG_FWD)
            .expect("gw_fwd")
            .try_into()
            .expect("tc");
        // A `__sk_buff` with only `ifindex` (offset 40) set: the device the kernel
        // gives the test skb.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn client(&self, seg: &Tcp) -> (u32, Vec<u8>) {
        self.run(self.client_if, &seg.frame())
    }

    fn backend(&self, seg: &Tcp) -> (u32, Vec<u8>) {
        self.run(self.backend_if, &seg.frame())
    }

    /// Programs listener `port` with `backends` (index in the list = index in
    /// `GW_BACKENDS`; `addr: None` is an invalid backendRef), and its slot table as
    /// the agent computes it.
    fn listener(&mut self, port: u16, backends: &[desired::Backend]) {
        let mut l: HashMap<_, ListenerKey, ListenerInfo> = self.map_mut(GW_LISTENERS);
        l.insert(
            ListenerKey::new(port),
            ListenerInfo {
                backend_count: backends.len() as u32,
                total_weight: backends.iter().map(|b| b.weight).sum(),
                flags: 0,
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
        let mut s: HashMap<_, ListenerKey, SlotTable> = self.map_mut(GW_FWD_SLOTS);
        s.insert(ListenerKey::new(port), slots::table(backends), 0)
            .expect("slot table");
    }

    fn drain(&mut self, port: u16) {
        self.flag(port, LISTENER_F_DRAINING);
    }

    /// Sets `flag` in listener `port`'s `flags`, as the agent writes them.
    /// Marks `port` as served on `addrs` only (`LISTENER_F_ADDRESSED`).
    fn addressed(&mut self, port: u16, addrs: &[IpAddr]) {
        let mut l: HashMap<_, ListenerKey, ListenerInfo> = self.map_mut(GW_LISTENERS);
        let mut info = l.get(&ListenerKey::new(port), 0).expect("listener");
        info.flags |= LISTENER_F_ADDRESSED;
        info.addr_count = addrs.len() as u32;
        for (slot, a) in info.addrs.iter_mut().zip(addrs) {
            *slot = node_addr(*a).addr_be;
        }
        l.insert(ListenerKey::new(port), info, 0)
            .expect("addressed");
    }

    fn flag(&mut self, port: u16, flag: u32) {
        let mut l: HashMap<_, ListenerKey, ListenerInfo> = self.map_mut(GW_LISTENERS);
        let mut info = l.get(&ListenerKey::new(port), 0).expect("listener");
        info.flags |= flag;
        l.insert(ListenerKey::new(port), info, 0).expect("flag");
    }

    /// The counters of `port`, summed over CPUs (zero when never written).
    fn stats(&self, port: u16) -> FwdStats {
        let map: PerCpuHashMap<_, ListenerKey, FwdStats> =
            PerCpuHashMap::try_from(self.ebpf.map(GW_FWD_STATS).expect("GW_FWD_STATS"))
                .expect("per-CPU hash map");
        map.get(&ListenerKey::new(port), 0)
            .map(|v| v.iter().fold(FwdStats::default(), FwdStats::add))
            .unwrap_or_default()
    }

    fn flow(&self, key: &FlowKey) -> Option<Flow> {
        let m: HashMap<_, FlowKey, Flow> = self.map_ref(GW_FWD_FLOWS);
        m.get(key, 0).ok()
    }

    /// The connection ends waiting in `GW_FWD_EVENTS`, taken.
    fn events(&mut self) -> Vec<FwdEvent> {
        let mut ring = RingBuf::try_from(self.ebpf.map_mut(GW_FWD_EVENTS).expect("GW_FWD_EVENTS"))
            .expect("ring buffer");
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), size_of::<FwdEvent>(), "one event per record");
            out.push(bytemuck::pod_read_unaligned(&item));
        }
        out
    }

    fn flows(&self) -> Vec<(FlowKey, Flow)> {
        let m: HashMap<_, FlowKey, Flow> = self.map_ref(GW_FWD_FLOWS);
        m.iter().map(|r| r.expect("flow entry")).collect()
    }
}

fn be(addr: SocketAddr, weight: u32) -> desired::Backend {
    desired::Backend {
        addr: Some(addr),
        weight,
        backend_ref: format!("default/svc-{addr}:80"),
        endpoint_slice: None,
    }
}

fn key(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    FlowKey {
        src_be: node_addr(src.ip()).addr_be,
        dst_be: node_addr(dst.ip()).addr_be,
        sport: src.port(),
        dport: dst.port(),
        _pad: 0,
    }
}

// ---- packets, built and checked from scratch ----

/// A TCP segment in an Ethernet frame (IPv4 with DF and TTL 64, or IPv6 with hop
/// limit 64).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tcp {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: Vec<u8>,
    payload: Vec<u8>,
    /// IPv4 identification (0 for IPv6).
    ip_id: u16,
}

impl Tcp {
    fn new(src: SocketAddr, dst: SocketAddr, flags: u8) -> Self {
        assert_eq!(src.is_ipv4(), dst.is_ipv4(), "one family");
        Self {
            src,
            dst,
            seq: 1000,
            ack: 0,
            flags,
            window: 64240,
            options: Vec::new(),
            payload: Vec::new(),
            ip_id: if src.is_ipv4() { 0x1234 } else { 0 },
        }
    }
    fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }
    fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }
    fn options(mut self, o: &[u8]) -> Self {
        assert_eq!(o.len() % 4, 0, "options fill whole words");
        self.options = o.to_vec();
        self
    }
    fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }
    /// The same segment with other addresses and ports (what a translation makes).
    fn moved(&self, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            src,
            dst,
            ..self.clone()
        }
    }

    /// Payload bytes (IP length less the IP and TCP headers), as the program counts.
    fn payload_len(&self) -> u64 {
        self.payload.len() as u64
    }

    fn frame(&self) -> Vec<u8> {
        self.frame_macs(MACS)
    }

    fn frame_macs(&self, (dst_mac, src_mac): Macs) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&src_mac);
        let tcp = self.tcp_bytes();
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                f.extend_from_slice(&ipv4_header(s, d, tcp.len(), self.ip_id, 6));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                f.extend_from_slice(&ipv6_header(s, d, tcp.len(), 6));
            }
            _ => unreachable!("one family"),
        }
        f.extend_from_slice(&tcp);
        f
    }

    /// TCP header, options and payload with the checksum computed from scratch.
    fn tcp_bytes(&self) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&self.src.port().to_be_bytes());
        t[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        t[4..8].copy_from_slice(&self.seq.to_be_bytes());
        t[8..12].copy_from_slice(&self.ack.to_be_bytes());
        t[12] = (((20 + self.options.len()) / 4) as u8) << 4;
        t[13] = self.flags;
        t[14..16].copy_from_slice(&self.window.to_be_bytes());
        t.extend_from_slice(&self.options);
        t.extend_from_slice(&self.payload);
        let c = tcp_checksum(self.src.ip(), self.dst.ip(), &t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    }
}

/// The Internet checksum (RFC 1071) of `data`: one's complement of the one's
/// complement sum of its 16-bit big-endian words, an odd last byte padded with zero.
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

/// The TCP checksum of `segment` (its checksum field zero) between `src` and `dst`:
/// over the pseudo-header (RFC 793 / RFC 8200 section 8.1), header and payload.
fn tcp_checksum(src: IpAddr, dst: IpAddr, segment: &[u8]) -> u16 {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, 6]);
            p.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(segment.len() as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 6]);
        }
        _ => unreachable!("one family"),
    }
    p.extend_from_slice(segment);
    checksum(&p)
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, payload: usize, id: u16, proto: u8) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, payload: usize, next: u8) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

/// Destination and source MAC addresses.
type Macs = ([u8; 6], [u8; 6]);

/// Reads the TCP segment of `frame` back, checking on the way that the lengths agree
/// with the frame and that the IPv4 header checksum and the TCP checksum are the ones
/// computed from scratch. Returns the MAC addresses (destination, source) too.
fn parse(frame: &[u8]) -> Result<(Macs, Tcp), String> {
    if frame.len() < 14 {
        return Err(format!("{} bytes: no Ethernet header", frame.len()));
    }
    let macs = (
        frame[0..6].try_into().expect("6"),
        frame[6..12].try_into().expect("6"),
    );
    let (src, dst, seg, ip_id) = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let ip = &frame[14..];
            if ip.len() < 20 || ip[0] != 0x45 || ip[9] != 6 {
                return Err(format!("not IPv4/TCP without options: {ip:02x?}"));
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if total != ip.len() {
                return Err(format!("IPv4 total length {total}, {} bytes", ip.len()));
            }
            let mut h: [u8; 20] = ip[..20].try_into().expect("20");
            let got = u16::from_be_bytes([h[10], h[11]]);
            h[10] = 0;
            h[11] = 0;
            if got != checksum(&h) {
                return Err(format!(
                    "IPv4 header checksum {got:#06x}, computed {:#06x}",
                    checksum(&h)
                ));
            }
            let s: [u8; 4] = ip[12..16].try_into().expect("4");
            let d: [u8; 4] = ip[16..20].try_into().expect("4");
            (
                IpAddr::from(s),
                IpAddr::from(d),
                &ip[20..],
                u16::from_be_bytes([ip[4], ip[5]]),
            )
        }
        0x86dd => {
            let ip = &frame[14..];
            if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != 6 {
                return Err(format!("not IPv6/TCP: {ip:02x?}"));
            }
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if plen + 40 != ip.len() {
                return Err(format!(
                    "IPv6 payload length {plen}, {} bytes",
                    ip.len() - 40
                ));
            }
            let s: [u8; 16] = ip[8..24].try_into().expect("16");
            let d: [u8; 16] = ip[24..40].try_into().expect("16");
            (IpAddr::from(s), IpAddr::from(d), &ip[40..], 0)
        }
        t => return Err(format!("ethertype {t:#06x}")),
    };
    if seg.len() < 20 {
        return Err(format!("TCP header of {} bytes", seg.len()));
    }
    let doff = usize::from(seg[12] >> 4) * 4;
    if doff < 20 || doff > seg.len() {
        return Err(format!("TCP data offset {doff} in {} bytes", seg.len()));
    }
    let mut zeroed = seg.to_vec();
    zeroed[16] = 0;
    zeroed[17] = 0;
    let got = u16::from_be_bytes([seg[16], seg[17]]);
    let want = tcp_checksum(src, dst, &zeroed);
    if got != want {
        return Err(format!("TCP checksum {got:#06x}, computed {want:#06x}"));
    }
    let u16_at = |i: usize| u16::from_be_bytes([seg[i], seg[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([seg[i], seg[i + 1], seg[i + 2], seg[i + 3]]);
    if u16_at(18) != 0 {
        return Err("urgent pointer set".into());
    }
    Ok((
        macs,
        Tcp {
            src: SocketAddr::new(src, u16_at(0)),
            dst: SocketAddr::new(dst, u16_at(2)),
            seq: u32_at(4),
            ack: u32_at(8),
            flags: seg[13],
            window: u16_at(14),
            options: seg[20..doff].to_vec(),
            payload: seg[doff..].to_vec(),
            ip_id,
        },
    ))
}

/// Asserts that `out` is `want` with `macs`: its checksums verified on their own first
/// (so a failure says what is wrong), then every byte against the frame built from
/// scratch.
fn assert_frame(desc: &str, out: &[u8], want: &Tcp, macs: Macs) {
    let (got_macs, got) = parse(out).unwrap_or_else(|e| panic!("{desc}: {e}"));
    assert_eq!(got, *want, "{desc}: segment");
    assert_eq!(got_macs, macs, "{desc}: MAC addresses");
    assert_eq!(out, want.frame_macs(macs), "{desc}: frame bytes");
}

/// A forwarded segment: action and frame.
fn assert_forwarded(desc: &str, (action, out): (u32, Vec<u8>), want: &Tcp) {
    assert_eq!(action, REDIRECT, "{desc}: action");
    assert_frame(desc, &out, want, MACS);
}

/// The NAT source port the program chose for a forwarded SYN, checked to be in range.
fn nat_port(desc: &str, out: &[u8], load: Load) -> u16 {
    let (_, seg) = parse(out).unwrap_or_else(|e| panic!("{desc}: {e}"));
    let p = seg.src.port();
    assert!(
        (u32::from(load.port_min)..u32::from(load.port_min) + load.ports).contains(&u32::from(p)),
        "{desc}: NAT port {p} outside {}+{}",
        load.port_min,
        load.ports
    );
    p
}

/// The RST|ACK the program answers `syn` with: addresses and ports swapped, MACs
/// swapped, seq 0, ack = the SYN's seq + 1 + its payload, no options, window 0, IPv4
/// identification 0.
fn rst_for(syn: &Tcp) -> Tcp {
    Tcp {
        src: syn.dst,
        dst: syn.src,
        seq: 0,
        ack: syn
            .seq
            .wrapping_add(1)
            .wrapping_add(syn.payload.len() as u32),
        flags: RST | ACK,
        window: 0,
        options: Vec::new(),
        payload: Vec::new(),
        ip_id: 0,
    }
}

fn assert_refused(desc: &str, (action, out): (u32, Vec<u8>), syn: &Tcp) {
    assert_eq!(action, REDIRECT, "{desc}: action (the RST is sent back)");
    assert_frame(desc, &out, &rst_for(syn), (MACS.1, MACS.0));
}

/// The options of a Linux SYN: MSS 1460, SACK permitted, timestamps, NOP, window
/// scale 7.
const SYN_OPTIONS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0x11, 0x22, 0x33, 0x44, 0, 0, 0, 0, 1, 3, 3, 7,
];
/// [`SYN_OPTIONS`] as the program sends them on: the MSS lowered to what a 1500-byte
/// link carries (1460 for IPv4, 1440 for IPv6).
fn syn_options_out(fam: Fam) -> [u8; 20] {
    let mut o = SYN_OPTIONS;
    let limit: u16 = if matches!(fam, Fam::V6) { 1440 } else { 1460 };
    let mss = u16::from_be_bytes([o[2], o[3]]).min(limit);
    o[2..4].copy_from_slice(&mss.to_be_bytes());
    o
}

/// NOP, NOP, timestamps: the options of a data segment.
const TS_OPTIONS: [u8; 12] = [1, 1, 8, 10, 0x11, 0x22, 0x33, 0x55, 0x66, 0x77, 0x88, 0x99];

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---- connections ----

/// One connection through the program, both directions, each output checked from
/// scratch, then its two table entries and the listener's counters.
#[expect(
    clippy::too_many_lines,
    reason = "one connection's script reads best in one piece"
)]
fn connection(fam: Fam) {
    let load = Load::default();
    let mut fwd = Fwd::load(load);
    let backend = SocketAddr::new(fam.backend(0), BACKEND_PORT);
    fwd.listener(LISTENER, &[be(backend, 1)]);
    let client = SocketAddr::new(fam.client(0), 33000);
    let front = SocketAddr::new(fam.node(), LISTENER);
    let (mut c2b, mut b2c) = ((0u64, 0u64), (0u64, 0u64));
    let count = |dir: &mut (u64, u64), s: &Tcp| {
        dir.0 += 1;
        dir.1 += s.payload_len();
    };

    let syn = Tcp::new(client, front, SYN).seq(1000).options(&SYN_OPTIONS);
    let (action, out) = fwd.client(&syn);
    let port = nat_port("SYN", &out, load);
    let nat = SocketAddr::new(fam.nat(), port);
    assert_forwarded(
        "SYN with MSS, SACK-permitted, timestamps and window scale: SNAT to the backend",
        (action, out),
        &syn.moved(nat, backend).options(&syn_options_out(fam)),
    );
    count(&mut c2b, &syn);
    let ck = key(client, front);
    let bk = key(backend, nat);
    let c = fwd.flow(&ck).expect("the client's entry, made at the SYN");
    let b = fwd.flow(&bk).expect("the backend's entry, made at the SYN");
    assert_eq!(
        (c.state, c.packets, c.bytes),
        (FLOW_S_SYN, 1, syn.payload_len()),
        "{c:?}"
    );
    assert_eq!(
        (b.state, b.packets, b.bytes),
        (0, 0, 0),
        "nothing from the backend yet: {b:?}"
    );

    let syn_ack = Tcp::new(backend, nat, SYN | ACK)
        .seq(7000)
        .ack(1001)
        .options(&SYN_OPTIONS);
    assert_forwarded(
        "backend's SYN-ACK: back from the listener to the client",
        fwd.backend(&syn_ack),
        &syn_ack.moved(front, client).options(&syn_options_out(fam)),
    );
    count(&mut b2c, &syn_ack);
    let b = fwd.flow(&bk).expect("the backend's entry");
    assert_eq!((b.state, b.packets), (FLOW_S_SYN, 1), "SYN-ACK seen: {b:?}");

    let c_data = Tcp::new(client, front, ACK | PSH)
        .seq(1001)
        .ack(7001)
        .options(&TS_OPTIONS)
        .payload(&pattern(333, 1));
    assert_forwarded(
        "client data (odd length, timestamps)",
        fwd.client(&c_data),
        &c_data.moved(nat, backend),
    );
    count(&mut c2b, &c_data);
    let b_data = Tcp::new(backend, nat, ACK | PSH)
        .seq(7001)
        .ack(1334)
        .options(&TS_OPTIONS)
        .payload(&pattern(1400, 7));
    assert_forwarded(
        "backend data",
        fwd.backend(&b_data),
        &b_data.moved(front, client),
    );
    count(&mut b2c, &b_data);

    let c = fwd.flow(&ck).expect("the client's entry");
    let b = fwd.flow(&bk).expect("the backend's entry");
    assert_eq!(
        (c.state, b.state),
        (FLOW_S_SYN | FLOW_S_ACK, FLOW_S_SYN | FLOW_S_ACK),
        "established"
    );

    let c_fin = Tcp::new(client, front, FIN | ACK).seq(1334).ack(8401);
    assert_forwarded("client FIN", fwd.client(&c_fin), &c_fin.moved(nat, backend));
    count(&mut c2b, &c_fin);
    let c = fwd.flow(&ck).expect("the client's entry");
    assert_eq!(
        c.state,
        FLOW_S_SYN | FLOW_S_ACK | FLOW_S_FIN,
        "client FIN seen"
    );
    assert_eq!(
        fwd.flow(&bk).expect("backend entry").state,
        FLOW_S_SYN | FLOW_S_ACK,
        "only the client's direction has a FIN"
    );
    let b_rst = Tcp::new(backend, nat, RST | ACK).seq(8401).ack(1335);
    assert_forwarded(
        "backend RST after the handshake goes to the client",
        fwd.backend(&b_rst),
        &b_rst.moved(front, client),
    );
    count(&mut b2c, &b_rst);

    let c = fwd.flow(&ck).expect("the client's entry");
    let b = fwd.flow(&bk).expect("the backend's entry");
    assert_eq!(c.new_src_be, node_addr(fam.nat()).addr_be, "{c:?}");
    assert_eq!(c.new_dst_be, node_addr(backend.ip()).addr_be, "{c:?}");
    assert_eq!((c.new_sport, c.new_dport), (port, BACKEND_PORT), "{c:?}");
    assert_eq!(c.listener_port, LISTENER);
    assert_eq!(u32::from(c.direction), DIR_CLIENT_TO_BACKEND);
    assert_eq!(c.backend_index, 0);
    assert_eq!(c.out_ifindex, fwd.backend_if, "client segments leave by b0");
    assert_eq!((c.attempts, c.tried), (1, 1), "{c:?}");
    assert_eq!(
        c.state,
        FLOW_S_SYN | FLOW_S_ACK | FLOW_S_FIN | FLOW_S_LOGGED,
        "the backend's RST ended it: logged"
    );
    assert_eq!((c.packets, c.bytes), c2b, "client direction counted");
    assert!(c.created_ns > 0 && c.last_seen_ns >= c.created_ns, "{c:?}");
    assert_eq!(b.new_src_be, node_addr(fam.node()).addr_be, "{b:?}");
    assert_eq!(b.new_dst_be, node_addr(client.ip()).addr_be, "{b:?}");
    assert_eq!((b.new_sport, b.new_dport), (LISTENER, 33000), "{b:?}");
    assert_eq!(b.listener_port, LISTENER);
    assert_eq!(u32::from(b.direction), DIR_BACKEND_TO_CLIENT);
    assert_eq!(b.out_ifindex, fwd.client_if, "backend segments leave by c0");
    assert_eq!(b.state, FLOW_S_SYN | FLOW_S_ACK | FLOW_S_RST);
    assert_eq!((b.packets, b.bytes), b2c, "backend direction counted");
    assert_eq!(fwd.flows().len(), 2, "two entries per connection");
    let events = fwd.events();
    assert_eq!(events.len(), 1, "one end, one event: {events:?}");
    let e = events[0];
    assert_eq!(e.end, FWD_END_BACKEND_RESET, "{e:?}");
    assert_eq!(e.client_be, node_addr(client.ip()).addr_be, "{e:?}");
    assert_eq!(e.client_port, client.port(), "{e:?}");
    assert_eq!(e.backend_be, node_addr(backend.ip()).addr_be, "{e:?}");
    assert_eq!(e.backend_port, BACKEND_PORT, "{e:?}");
    assert_eq!(e.listener_port, LISTENER, "{e:?}");
    assert_eq!((e.packets_c2b, e.bytes_c2b), c2b, "{e:?}");
    assert_eq!((e.packets_b2c, e.bytes_b2c), b2c, "{e:?}");
    assert_eq!((c2b.1, b2c.1), (333, 1400), "payload bytes only");
    assert_eq!(
        (e.created_ns, e.last_seen_ns),
        (c.created_ns, b.last_seen_ns),
        "{e:?}"
    );

    // A second client whose SYN carries data (TCP Fast Open): the payload goes on.
    let client2 = SocketAddr::new(fam.client(1), 33001);
    let syn2 = Tcp::new(client2, front, SYN)
        .seq(0xffff_fff0)
        .options(&SYN_OPTIONS)
        .payload(&pattern(101, 3));
    let (action, out) = fwd.client(&syn2);
    let port2 = nat_port("SYN with data", &out, load);
    assert_forwarded(
        "SYN with a payload",
        (action, out),
        &syn2
            .moved(SocketAddr::new(fam.nat(), port2), backend)
            .options(&syn_options_out(fam)),
    );
    count(&mut c2b, &syn2);
    assert_ne!(port2, port, "two connections to one backend, two NAT ports");
    assert_eq!(fwd.flows().len(), 4);

    let s = fwd.stats(LISTENER);
    assert_eq!(s.connections, 2, "{s:?}");
    assert_eq!((s.packets_c2b, s.bytes_c2b), c2b, "{s:?}");
    assert_eq!((s.packets_b2c, s.bytes_b2c), b2c, "{s:?}");
    assert_eq!(
        (
            s.rejected_no_backend,
            s.rejected_invalid_backend,
            s.rejected_connect_failed,
            s.connect_failures,
            s.nat_exhausted,
            s.table_full,
            s.no_route
        ),
        (0, 0, 0, 0, 0, 0, 0),
        "{s:?}"
    );
}

#[test]
fn ipv4_connection() {
    in_bed(|| connection(Fam::V4));
}

#[test]
fn ipv6_connection() {
    in_bed(|| connection(Fam::V6));
}

// ---- what the program leaves alone ----

struct Fixture {
    desc: &'static str,
    /// Received on the client link (else the backend link).
    client_side: bool,
    packet: Vec<u8>,
    action: u32,
}

/// Runs the table; every packet must come out unchanged.
fn check_untouched(fwd: &Fwd, table: &[Fixture]) {
    let mut failed = Vec::new();
    for f in table {
        let ifindex = if f.client_side {
            fwd.client_if
        } else {
            fwd.backend_if
        };
        let (action, out) = match fwd.try_run(ifindex, &f.packet) {
            Ok(r) => r,
            Err(e) => {
                failed.push(format!("{}: BPF_PROG_TEST_RUN: {e:?}", f.desc));
                continue;
            }
        };
        if action != f.action {
            failed.push(format!(
                "{}: action {}, want {}",
                f.desc,
                action.cast_signed(),
                f.action.cast_signed()
            ));
        } else if out != f.packet {
            failed.push(format!("{}: the packet was changed", f.desc));
        }
    }
    assert!(failed.is_empty(), "fixtures failed:\n{}", failed.join("\n"));
}

/// Recomputes the IPv4 header checksum of `frame` (no VLAN tag) after an edit.
fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24] = 0;
    frame[25] = 0;
    let c = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

fn with_fragment_field(frame: &[u8], field: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[20..22].copy_from_slice(&field.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    f
}

/// `frame` (IPv4) with one word of options (NOP, NOP, NOP, end) after its header.
fn with_ipv4_options(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(&[1, 1, 1, 0]);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x46;
    let total = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    f
}

/// `frame` (IPv6) with a hop-by-hop header (one `PadN` option) before its TCP header.
fn with_ipv6_hop_by_hop(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..54].to_vec();
    f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&frame[54..]);
    f[20] = 0;
    let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f
}

fn with_vlan(frame: &[u8], id: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// `frame` (IPv4) with another IP protocol.
fn with_protocol(frame: &[u8], proto: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[23] = proto;
    fix_ipv4_checksum(&mut f);
    f
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "a fixture table reads best in one piece"
)]
fn passed_untouched() {
    in_bed(|| {
        let mut fwd = Fwd::load(Load::default());
        let backend4 = SocketAddr::new(Fam::V4.backend(0), BACKEND_PORT);
        fwd.listener(LISTENER, &[be(backend4, 1)]);
        fwd.listener(LISTENER + 1, &[be(backend4, 1)]);
        fwd.drain(LISTENER + 1);
        // A listener of a Gateway with spec.addresses: its sockets' (bound to those).
        fwd.listener(LISTENER + 2, &[be(backend4, 1)]);
        fwd.flag(LISTENER + 2, LISTENER_F_ADDRESSED);
        let c4 = SocketAddr::new(Fam::V4.client(0), 33000);
        let c6 = SocketAddr::new(Fam::V6.client(0), 33000);
        let l4 = SocketAddr::new(Fam::V4.node(), LISTENER);
        let l6 = SocketAddr::new(Fam::V6.node(), LISTENER);
        let syn4 = Tcp::new(c4, l4, SYN).options(&SYN_OPTIONS).frame();
        let syn6 = Tcp::new(c6, l6, SYN).options(&SYN_OPTIONS).frame();
        let untouched = |desc, packet| Fixture {
            desc,
            client_side: true,
            packet,
            action: NEXT,
        };
        let table = vec![
            untouched(
                "IPv4 SYN to a port that is not a listener",
                Tcp::new(c4, SocketAddr::new(Fam::V4.node(), 8090), SYN).frame(),
            ),
            untouched(
                "IPv6 SYN to a port that is not a listener",
                Tcp::new(c6, SocketAddr::new(Fam::V6.node(), 8090), SYN).frame(),
            ),
            untouched(
                "IPv4 SYN to the listener port of an address that is not the node's",
                Tcp::new(c4, SocketAddr::new(Fam::V4.elsewhere(), LISTENER), SYN).frame(),
            ),
            untouched(
                "IPv6 SYN to the listener port of an address that is not the node's",
                Tcp::new(c6, SocketAddr::new(Fam::V6.elsewhere(), LISTENER), SYN).frame(),
            ),
            untouched(
                "SYN to a draining listener",
                Tcp::new(c4, SocketAddr::new(Fam::V4.node(), LISTENER + 1), SYN).frame(),
            ),
            untouched(
                "IPv4 SYN to a listener served on some addresses only (spec.addresses)",
                Tcp::new(c4, SocketAddr::new(Fam::V4.node(), LISTENER + 2), SYN)
                    .options(&SYN_OPTIONS)
                    .frame(),
            ),
            untouched(
                "IPv6 SYN to a listener served on some addresses only (spec.addresses)",
                Tcp::new(c6, SocketAddr::new(Fam::V6.node(), LISTENER + 2), SYN)
                    .options(&SYN_OPTIONS)
                    .frame(),
            ),
            untouched(
                "ACK of a connection the table does not know",
                Tcp::new(c4, l4, ACK).payload(b"data").frame(),
            ),
            untouched(
                "IPv6 ACK of a connection the table does not know",
                Tcp::new(c6, l6, ACK).frame(),
            ),
            untouched(
                "SYN-ACK the table does not know",
                Tcp::new(c4, l4, SYN | ACK).frame(),
            ),
            untouched("RST the table does not know", Tcp::new(c4, l4, RST).frame()),
            untouched(
                "FIN the table does not know",
                Tcp::new(c4, l4, FIN | ACK).frame(),
            ),
            Fixture {
                desc: "SYN-ACK from a backend no connection uses (backend side)",
                client_side: false,
                packet: Tcp::new(
                    SocketAddr::new(Fam::V4.backend(0), BACKEND_PORT),
                    SocketAddr::new(Fam::V4.nat(), PORT_MIN),
                    SYN | ACK,
                )
                .frame(),
                action: NEXT,
            },
            untouched("IPv4 without a TCP header", syn4[..34].to_vec()),
            untouched(
                "IPv4 with a TCP header but no options of the SYN's 40-byte header",
                syn4[..54].to_vec(),
            ),
            untouched(
                "truncated TCP options (39 of 40 header bytes)",
                syn4[..73].to_vec(),
            ),
            untouched("truncated TCP header (12 bytes)", syn4[..46].to_vec()),
            untouched("truncated TCP header (14 bytes)", syn4[..48].to_vec()),
            untouched("truncated TCP header (19 bytes)", syn4[..53].to_vec()),
            untouched("IPv6 without a TCP header", syn6[..54].to_vec()),
            untouched("truncated IPv6 TCP header (16 bytes)", syn6[..70].to_vec()),
            untouched(
                "truncated IPv6 TCP options (30 of 40 header bytes)",
                syn6[..84].to_vec(),
            ),
            untouched("TCP data offset below 5 (malformed)", {
                let mut f = Tcp::new(c4, l4, SYN).frame();
                f[46] = 4 << 4;
                f
            }),
            untouched("IPv4 with options (ihl 6)", with_ipv4_options(&syn4)),
            untouched(
                "IPv4 first fragment (MF set)",
                with_fragment_field(&syn4, 0x2000),
            ),
            untouched(
                "IPv4 fragment at offset 8 (MF clear)",
                with_fragment_field(&syn4, 0x0001),
            ),
            untouched(
                "IPv4 fragment at offset 8 with DF and MF",
                with_fragment_field(&syn4, 0x6001),
            ),
            untouched(
                "IPv6 hop-by-hop header before TCP",
                with_ipv6_hop_by_hop(&syn6),
            ),
            untouched("UDP to the listener port", with_protocol(&syn4, 17)),
            untouched("ICMP", with_protocol(&syn4, 1)),
            untouched("VLAN-tagged IPv4 SYN", with_vlan(&syn4, 100)),
            untouched("VLAN-tagged IPv6 SYN", with_vlan(&syn6, 7)),
            untouched("Ethernet header only (ARP ethertype)", {
                let mut f = syn4[..12].to_vec();
                f.extend_from_slice(&0x0806u16.to_be_bytes());
                f
            }),
            untouched("ARP", {
                let mut f = syn4[..12].to_vec();
                f.extend_from_slice(&0x0806u16.to_be_bytes());
                f.extend_from_slice(&[0u8; 28]);
                f
            }),
            untouched("IPv4 header with version 6 and IPv4 ethertype", {
                let mut f = syn4.clone();
                f[14] = 0x65;
                f
            }),
        ];
        check_untouched(&fwd, &table);
        assert!(fwd.flows().is_empty(), "nothing entered the table");
        let s = fwd.stats(LISTENER);
        assert_eq!(s, FwdStats::default(), "nothing counted: {s:?}");
        // Frames BPF_PROG_TEST_RUN itself refuses (EINVAL) on this kernel, so the
        // program never sees them here: shorter than an Ethernet header, and an IP
        // ethertype with less than a whole IP header after it. (The program reads every
        // header with bounds-checked loads; should a kernel run these, move them into
        // the table above.)
        let refused = [
            ("13 bytes (truncated Ethernet header)", syn4[..13].to_vec()),
            ("IPv4 ethertype, Ethernet header only", syn4[..14].to_vec()),
            ("truncated IPv4 header (10 bytes)", syn4[..24].to_vec()),
            ("truncated IPv4 header (19 bytes)", syn4[..33].to_vec()),
            ("truncated IPv6 header (30 bytes)", syn6[..44].to_vec()),
        ];
        for (desc, frame) in refused {
            match fwd.try_run(fwd.client_if, &frame) {
                Err(aya::programs::ProgramError::SyscallError(e)) => assert_eq!(
                    e.io_error.raw_os_error(),
                    Some(libc::EINVAL),
                    "{desc}: {e:?}"
                ),
                other => panic!("{desc}: BPF_PROG_TEST_RUN ran it: {other:?}"),
            }
        }
    });
}

// ---- refusals ----

/// A listener of a Gateway with `spec.addresses`: forwarded on the addresses its entry
/// lists, a SYN to another node address left to the stack (whose sockets are bound
/// to the listed ones only).
fn addressed(fam: Fam) {
    let load = Load::default();
    let mut fwd = Fwd::load(load);
    let backend = SocketAddr::new(fam.backend(0), BACKEND_PORT);
    fwd.listener(LISTENER, &[be(backend, 1)]);
    fwd.addressed(LISTENER, &[fam.nat(), fam.node()]);
    fwd.listener(LISTENER + 1, &[be(backend, 1)]);
    fwd.addressed(LISTENER + 1, &[fam.nat()]);
    let client = SocketAddr::new(fam.client(0), 33000);
    let syn = Tcp::new(client, SocketAddr::new(fam.node(), LISTENER), SYN)
        .seq(1000)
        .options(&SYN_OPTIONS);
    let (action, out) = fwd.client(&syn);
    let nat = SocketAddr::new(fam.nat(), nat_port("SYN", &out, load));
    assert_forwarded(
        "SYN to the second address the listener is served on",
        (action, out),
        &syn.moved(nat, backend).options(&syn_options_out(fam)),
    );
    let other = Tcp::new(client, SocketAddr::new(fam.node(), LISTENER + 1), SYN)
        .seq(1000)
        .options(&SYN_OPTIONS);
    let (action, out) = fwd.client(&other);
    assert_eq!(
        (action, out),
        (NEXT, other.frame()),
        "SYN to a node address the listener is not served on: untouched"
    );
    assert_eq!(fwd.stats(LISTENER + 1).connections, 0);
    assert_eq!(fwd.stats(LISTENER).connections, 1);
}

#[test]
fn ipv4_addressed_listener() {
    in_bed(|| addressed(Fam::V4));
}

#[test]
fn ipv6_addressed_listener() {
    in_bed(|| addressed(Fam::V6));
}

fn refusals(fam: Fam) {
    let mut fwd = Fwd::load(Load::default());
    let weightless = LISTENER;
    let invalid = LISTENER + 1;
    fwd.listener(
        weightless,
        &[be(SocketAddr::new(fam.backend(0), BACKEND_PORT), 0)],
    );
    fwd.listener(
        invalid,
        &[desired::Backend {
            addr: None,
            weight: 1,
            backend_ref: "default/missing:80".into(),
            endpoint_slice: None,
        }],
    );
    let client = SocketAddr::new(fam.client(0), 33000);
    for (port, what) in [
        (weightless, "no backend with a weight"),
        (invalid, "invalid backend"),
    ] {
        let front = SocketAddr::new(fam.node(), port);
        let syn = Tcp::new(client, front, SYN)
            .seq(0x1234_5678)
            .options(&SYN_OPTIONS);
        assert_refused(&format!("SYN, {what}"), fwd.client(&syn), &syn);
        let syn = Tcp::new(client, front, SYN)
            .seq(0xffff_ffff)
            .options(&SYN_OPTIONS)
            .payload(&pattern(77, 9));
        assert_refused(
            &format!("SYN with 77 bytes of data and seq wrapping, {what}"),
            fwd.client(&syn),
            &syn,
        );
    }
    let s = fwd.stats(weightless);
    assert_eq!(
        (
            s.rejected_no_backend,
            s.rejected_invalid_backend,
            s.connections
        ),
        (2, 0, 0),
        "{s:?}"
    );
    let s = fwd.stats(invalid);
    assert_eq!(
        (
            s.rejected_no_backend,
            s.rejected_invalid_backend,
            s.connections
        ),
        (0, 2, 0),
        "{s:?}"
    );
    assert!(fwd.flows().is_empty(), "a refused SYN leaves no entry");
}

#[test]
fn ipv4_refusals() {
    in_bed(|| refusals(Fam::V4));
}

#[test]
fn ipv6_refusals() {
    in_bed(|| refusals(Fam::V6));
}

// ---- retry on another backend ----

/// Index (0 or 1) of the backend a forwarded SYN went to.
fn which(backends: &[SocketAddr], out: &[u8]) -> usize {
    let (_, seg) = parse(out).expect("a forwarded segment");
    backends
        .iter()
        .position(|b| *b == seg.dst)
        .unwrap_or_else(|| panic!("sent to {}, not a backend", seg.dst))
}

#[test]
#[expect(clippy::too_many_lines, reason = "three connections' scripts")]
fn retry_on_another_backend() {
    in_bed(|| {
        let load = Load::default();
        let mut fwd = Fwd::load(load);
        let fam = Fam::V4;
        let backends = [
            SocketAddr::new(fam.backend(0), BACKEND_PORT),
            SocketAddr::new(fam.backend(1), BACKEND_PORT),
        ];
        fwd.listener(LISTENER, &[be(backends[0], 1), be(backends[1], 1)]);
        let front = SocketAddr::new(fam.node(), LISTENER);

        // 1. The first backend resets the SYN: dropped; the retransmission goes to
        // the other one, whose SYN-ACK reaches the client.
        let client = SocketAddr::new(fam.client(0), 34000);
        let syn = Tcp::new(client, front, SYN).options(&SYN_OPTIONS);
        let (action, out) = fwd.client(&syn);
        assert_eq!(action, REDIRECT);
        let first = which(&backends, &out);
        let nat = SocketAddr::new(fam.nat(), nat_port("SYN", &out, load));
        let refused = Tcp::new(backends[first], nat, RST | ACK).seq(0).ack(1001);
        let (action, out) = fwd.backend(&refused);
        assert_eq!(
            action, SHOT,
            "the backend's RST to the SYN is not passed on"
        );
        assert_eq!(out, refused.frame(), "dropped as it came");
        let other = 1 - first;
        let (action, out) = fwd.client(&syn);
        let nat2 = SocketAddr::new(fam.nat(), nat_port("retransmitted SYN", &out, load));
        assert_forwarded(
            "retransmitted SYN goes to the other backend",
            (action, out),
            &syn.moved(nat2, backends[other]),
        );
        assert!(
            fwd.flow(&key(backends[first], nat)).is_none(),
            "the refusing backend's entry is gone"
        );
        let c = fwd.flow(&key(client, front)).expect("client entry");
        assert_eq!((c.attempts, c.tried), (2, 0b11), "{c:?}");
        assert_eq!(usize::from(c.backend_index), other);
        assert_eq!(c.new_dst_be, node_addr(backends[other].ip()).addr_be);
        assert_eq!(c.packets, 2, "both SYNs counted");
        let syn_ack = Tcp::new(backends[other], nat2, SYN | ACK)
            .seq(5000)
            .ack(1001)
            .options(&SYN_OPTIONS);
        assert_forwarded(
            "the second backend's SYN-ACK reaches the client",
            fwd.backend(&syn_ack),
            &syn_ack.moved(front, client),
        );
        let ack = Tcp::new(client, front, ACK).seq(1001).ack(5001);
        assert_forwarded(
            "the handshake's ACK goes to the second backend",
            fwd.client(&ack),
            &ack.moved(nat2, backends[other]),
        );
        let s = fwd.stats(LISTENER);
        assert_eq!((s.connections, s.connect_failures), (1, 1), "{s:?}");
        assert_eq!(fwd.flows().len(), 2, "one connection, two entries");

        // 2. Both backends reset the SYN: the client's third SYN gets a RST.
        let client = SocketAddr::new(fam.client(1), 34001);
        let syn = Tcp::new(client, front, SYN).seq(77);
        let (action, out) = fwd.client(&syn);
        assert_eq!(action, REDIRECT);
        let first = which(&backends, &out);
        let nat = SocketAddr::new(fam.nat(), nat_port("SYN", &out, load));
        let (action, _) = fwd.backend(&Tcp::new(backends[first], nat, RST | ACK).ack(78));
        assert_eq!(action, SHOT);
        let (action, out) = fwd.client(&syn);
        assert_eq!(action, REDIRECT);
        assert_eq!(which(&backends, &out), 1 - first, "the other backend");
        let nat = SocketAddr::new(fam.nat(), nat_port("SYN", &out, load));
        let (action, _) = fwd.backend(&Tcp::new(backends[1 - first], nat, RST | ACK).ack(78));
        assert_eq!(action, SHOT);
        assert_refused(
            "third SYN after both backends refused: RST to the client",
            fwd.client(&syn),
            &syn,
        );
        let s = fwd.stats(LISTENER);
        assert_eq!(
            (s.connections, s.connect_failures, s.rejected_connect_failed),
            (2, 3, 1),
            "{s:?}"
        );

        // 3. A silent backend: the client's retransmission alone moves it.
        let client = SocketAddr::new(fam.client(2), 34002);
        let syn = Tcp::new(client, front, SYN).seq(500);
        let (action, out) = fwd.client(&syn);
        assert_eq!(action, REDIRECT);
        let first = which(&backends, &out);
        let (action, out) = fwd.client(&syn);
        assert_eq!(action, REDIRECT);
        assert_eq!(
            which(&backends, &out),
            1 - first,
            "retried on the other backend"
        );
        // 4. An answered SYN retransmitted (the SYN-ACK was lost on the way to the
        // client): same backend, same NAT port.
        let client = SocketAddr::new(fam.client(3), 34003);
        let syn = Tcp::new(client, front, SYN).seq(900);
        let (action, out) = fwd.client(&syn);
        assert_eq!(action, REDIRECT);
        let first = which(&backends, &out);
        let nat = SocketAddr::new(fam.nat(), nat_port("SYN", &out, load));
        let syn_ack = Tcp::new(backends[first], nat, SYN | ACK).ack(901);
        assert_eq!(fwd.backend(&syn_ack).0, REDIRECT);
        assert_forwarded(
            "retransmitted SYN of an answered attempt: same backend and NAT port",
            fwd.client(&syn),
            &syn.moved(nat, backends[first]),
        );
        let s = fwd.stats(LISTENER);
        assert_eq!(
            (s.connections, s.connect_failures, s.rejected_connect_failed),
            (4, 4, 1),
            "{s:?}"
        );
    });
}

#[test]
fn single_attempt_refuses_the_retransmission() {
    in_bed(|| {
        let load = Load {
            attempts: 1,
            ..Load::default()
        };
        let mut fwd = Fwd::load(load);
        let fam = Fam::V6;
        let backends = [
            SocketAddr::new(fam.backend(0), BACKEND_PORT),
            SocketAddr::new(fam.backend(1), BACKEND_PORT),
        ];
        fwd.listener(LISTENER, &[be(backends[0], 1), be(backends[1], 1)]);
        let front = SocketAddr::new(fam.node(), LISTENER);
        let client = SocketAddr::new(fam.client(0), 35000);
        let syn = Tcp::new(client, front, SYN).options(&SYN_OPTIONS);
        let (action, out) = fwd.client(&syn);
        assert_eq!(action, REDIRECT);
        let first = which(&backends, &out);
        let nat = SocketAddr::new(fam.nat(), nat_port("SYN", &out, load));
        let (action, _) = fwd.backend(&Tcp::new(backends[first], nat, RST | ACK).ack(1001));
        assert_eq!(action, SHOT, "the backend's RST is dropped");
        assert_refused(
            "one attempt only: the retransmission is answered with a RST",
            fwd.client(&syn),
            &syn,
        );
        let s = fwd.stats(LISTENER);
        assert_eq!(
            (s.connections, s.connect_failures, s.rejected_connect_failed),
            (1, 1, 1),
            "{s:?}"
        );
        let c = fwd.flow(&key(client, front)).expect("client entry");
        assert_ne!(
            c.state & FLOW_S_RST,
            0,
            "the client entry is marked over: {c:?}"
        );
    });
}

// ---- resources ----

#[test]
fn nat_port_exhaustion() {
    in_bed(|| {
        let load = Load {
            ports: 2,
            ..Load::default()
        };
        let mut fwd = Fwd::load(load);
        let fam = Fam::V4;
        let backend = SocketAddr::new(fam.backend(0), BACKEND_PORT);
        fwd.listener(LISTENER, &[be(backend, 1)]);
        let front = SocketAddr::new(fam.node(), LISTENER);
        let mut ports = Vec::new();
        for i in 0..2 {
            let syn = Tcp::new(SocketAddr::new(fam.client(i), 36000), front, SYN);
            let (action, out) = fwd.client(&syn);
            let p = nat_port("SYN", &out, load);
            assert_forwarded(
                "SYN while NAT ports are free",
                (action, out),
                &syn.moved(SocketAddr::new(fam.nat(), p), backend),
            );
            ports.push(p);
        }
        ports.sort_unstable();
        assert_eq!(
            ports,
            [PORT_MIN, PORT_MIN + 1],
            "both ports of the range used"
        );
        let syn = Tcp::new(SocketAddr::new(fam.client(2), 36000), front, SYN).frame();
        let (action, out) = fwd.run(fwd.client_if, &syn);
        assert_eq!(action, NEXT, "no NAT port left: the stack takes the SYN");
        assert_eq!(out, syn, "untouched");
        let s = fwd.stats(LISTENER);
        assert_eq!((s.connections, s.nat_exhausted), (2, 1), "{s:?}");
        assert_eq!(fwd.flows().len(), 4, "no entry of the third connection");
    });
}

#[test]
fn full_table() {
    for size in [2, 3] {
        in_bed(move || {
            let load = Load {
                flows: Some(size),
                ..Load::default()
            };
            let mut fwd = Fwd::load(load);
            let fam = Fam::V4;
            let backend = SocketAddr::new(fam.backend(0), BACKEND_PORT);
            fwd.listener(LISTENER, &[be(backend, 1)]);
            let front = SocketAddr::new(fam.node(), LISTENER);
            let syn = Tcp::new(SocketAddr::new(fam.client(0), 37000), front, SYN);
            let (action, _) = fwd.client(&syn);
            assert_eq!(
                action, REDIRECT,
                "table of {size}: the first connection fits"
            );
            let syn = Tcp::new(SocketAddr::new(fam.client(1), 37000), front, SYN).frame();
            let (action, out) = fwd.run(fwd.client_if, &syn);
            assert_eq!(
                action, NEXT,
                "table of {size}: the second SYN goes to the stack"
            );
            assert_eq!(out, syn, "untouched");
            let s = fwd.stats(LISTENER);
            assert_eq!(
                (s.connections, s.table_full),
                (1, 1),
                "table of {size}: {s:?}"
            );
            assert_eq!(
                fwd.flows().len(),
                2,
                "table of {size}: no half of the second connection left behind"
            );
        });
    }
}

// ---- weights ----

#[test]
fn weights_at_the_program() {
    in_bed(|| {
        const SYNS: u16 = 1000;
        let load = Load {
            ports: 20_000,
            ..Load::default()
        };
        let mut fwd = Fwd::load(load);
        let fam = Fam::V4;
        let backends = [
            SocketAddr::new(fam.backend(0), BACKEND_PORT),
            SocketAddr::new(fam.backend(1), BACKEND_PORT),
            SocketAddr::new(fam.backend(2), BACKEND_PORT),
        ];
        fwd.listener(
            LISTENER,
            &[be(backends[0], 70), be(backends[1], 30), be(backends[2], 0)],
        );
        let front = SocketAddr::new(fam.node(), LISTENER);
        let mut picked = [0u32; 3];
        for i in 0..SYNS {
            let syn = Tcp::new(SocketAddr::new(fam.client(0), 20000 + i), front, SYN);
            let (action, out) = fwd.client(&syn);
            assert_eq!(action, REDIRECT, "SYN {i}");
            picked[which(&backends, &out)] += 1;
        }
        eprintln!("1000 SYNs, weights 70/30/0: picked {picked:?}");
        assert_eq!(picked[2], 0, "weight 0 is never picked");
        assert!((650..=750).contains(&picked[0]), "70 % ± 5: {picked:?}");
        assert!((250..=350).contains(&picked[1]), "30 % ± 5: {picked:?}");
        assert_eq!(fwd.stats(LISTENER).connections, u64::from(SYNS));
    });
}

/// A connection through to its established state: the client's entry key, the
/// backend's, and the NAT address and port.
fn established(fwd: &mut Fwd, fam: Fam, client_port: u16) -> (SocketAddr, SocketAddr, SocketAddr) {
    let backend = SocketAddr::new(fam.backend(0), BACKEND_PORT);
    let client = SocketAddr::new(fam.client(0), client_port);
    let front = SocketAddr::new(fam.node(), LISTENER);
    let (_, out) = fwd.client(&Tcp::new(client, front, SYN).seq(1000).options(&SYN_OPTIONS));
    let nat = SocketAddr::new(fam.nat(), nat_port("SYN", &out, Load::default()));
    fwd.backend(&Tcp::new(backend, nat, SYN | ACK).seq(7000).ack(1001));
    fwd.client(&Tcp::new(client, front, ACK).seq(1001).ack(7001));
    fwd.client(
        &Tcp::new(client, front, ACK | PSH)
            .seq(1001)
            .ack(7001)
            .payload(&pattern(100, 1)),
    );
    fwd.backend(
        &Tcp::new(backend, nat, ACK | PSH)
            .seq(7001)
            .ack(1101)
            .payload(&pattern(250, 2)),
    );
    (client, backend, nat)
}

/// The program emits one event per connection end: at the client's RST (none for its
/// retransmission, nor for a backend RST after it), and at the FIN that completes a FIN
/// each way (none for the FIN before it, nor for a retransmitted FIN or a RST after it).
fn ends(fam: Fam) {
    let mut fwd = Fwd::load(Load::default());
    let backend = SocketAddr::new(fam.backend(0), BACKEND_PORT);
    fwd.listener(LISTENER, &[be(backend, 1)]);
    let front = SocketAddr::new(fam.node(), LISTENER);

    let (client, backend, nat) = established(&mut fwd, fam, 34000);
    assert!(fwd.events().is_empty(), "no end yet");
    let rst = Tcp::new(client, front, RST | ACK).seq(1101).ack(7251);
    assert_forwarded(
        "client RST goes to the backend",
        fwd.client(&rst),
        &rst.moved(nat, backend),
    );
    let events = fwd.events();
    assert_eq!(events.len(), 1, "one event for the RST: {events:?}");
    let e = events[0];
    assert_eq!(e.end, FWD_END_CLIENT_RESET, "{e:?}");
    assert_eq!(
        (e.client_be, e.client_port),
        (node_addr(client.ip()).addr_be, client.port())
    );
    assert_eq!(
        (e.bytes_c2b, e.bytes_b2c),
        (100, 250),
        "payload bytes: {e:?}"
    );
    assert_eq!(
        (e.packets_c2b, e.packets_b2c),
        (4, 2),
        "SYN, ACK, data, RST; SYN-ACK, data"
    );
    assert_forwarded(
        "the retransmitted RST is forwarded too",
        fwd.client(&rst),
        &rst.moved(nat, backend),
    );
    fwd.backend(&Tcp::new(backend, nat, RST).seq(7251));
    assert!(
        fwd.events().is_empty(),
        "nothing for a retransmitted RST or a RST the other way"
    );
    let c = fwd.flow(&key(client, front)).expect("client entry");
    assert_ne!(c.state & FLOW_S_LOGGED, 0, "{c:?}");

    let (client, backend, nat) = established(&mut fwd, fam, 34001);
    let c_fin = Tcp::new(client, front, FIN | ACK).seq(1101).ack(7251);
    fwd.client(&c_fin);
    assert!(fwd.events().is_empty(), "one FIN does not end it");
    let b_fin = Tcp::new(backend, nat, FIN | ACK).seq(7251).ack(1102);
    assert_forwarded(
        "backend FIN goes to the client",
        fwd.backend(&b_fin),
        &b_fin.moved(front, client),
    );
    let events = fwd.events();
    assert_eq!(events.len(), 1, "one event at the second FIN: {events:?}");
    let e = events[0];
    assert_eq!(e.end, FWD_END_FIN, "{e:?}");
    assert_eq!(
        (e.client_be, e.client_port),
        (node_addr(client.ip()).addr_be, client.port())
    );
    assert_eq!((e.bytes_c2b, e.bytes_b2c), (100, 250), "{e:?}");
    assert_eq!(
        (e.packets_c2b, e.packets_b2c),
        (4, 3),
        "SYN, ACK, data, FIN; SYN-ACK, data, FIN"
    );
    fwd.backend(&b_fin);
    fwd.client(&c_fin);
    fwd.client(&Tcp::new(client, front, ACK).seq(1102).ack(7252));
    fwd.client(&Tcp::new(client, front, RST).seq(1102));
    assert!(
        fwd.events().is_empty(),
        "nothing for retransmitted FINs, the last ACK or a RST after the end"
    );
    assert_eq!(fwd.stats(LISTENER).events_lost, 0);
}

#[test]
fn ipv4_one_event_per_end() {
    in_bed(|| ends(Fam::V4));
}

#[test]
fn ipv6_one_event_per_end() {
    in_bed(|| ends(Fam::V6));
}

/// A full ring buffer does not stop forwarding: the end that finds no room is counted
/// (`events_lost`) and its client entry is left unmarked, so the agent's sweeper logs
/// that connection; once the agent has read the ring, ends are emitted again.
#[test]
fn a_full_ring_buffer_counts_and_leaves_the_end_to_the_sweeper() {
    in_bed(|| {
        let load = Load {
            ports: 8000,
            ..Load::default()
        };
        let mut fwd = Fwd::load(load);
        let backend = SocketAddr::new(Fam::V4.backend(0), BACKEND_PORT);
        fwd.listener(LISTENER, &[be(backend, 1)]);
        let front = SocketAddr::new(Fam::V4.node(), LISTENER);
        // 256 KiB hold 2730 events of 88 bytes and their 8-byte headers.
        let capacity = (gateway_common::FWD_EVENTS_BYTES as usize) / (size_of::<FwdEvent>() + 8);
        let reset = |fwd: &Fwd, i: usize| {
            let client = SocketAddr::new(
                Fam::V4.client(u16::try_from(i / 50_000).expect("few clients")),
                10_000 + u16::try_from(i % 50_000).expect("port"),
            );
            let (action, _) = fwd.client(&Tcp::new(client, front, SYN).seq(1));
            assert_eq!(action, 7, "connection {i} forwarded");
            let (action, _) = fwd.client(&Tcp::new(client, front, RST | ACK).seq(2));
            assert_eq!(action, 7, "the RST of connection {i} forwarded");
            fwd.flow(&key(client, front)).expect("client entry")
        };
        for i in 0..capacity {
            let c = reset(&fwd, i);
            assert_ne!(c.state & FLOW_S_LOGGED, 0, "event {i} fits");
        }
        assert_eq!(fwd.stats(LISTENER).events_lost, 0);
        let c = reset(&fwd, capacity);
        assert_eq!(c.state & FLOW_S_LOGGED, 0, "no room: not marked, {c:?}");
        assert_eq!(fwd.stats(LISTENER).events_lost, 1, "counted");
        let events = fwd.events();
        assert_eq!(events.len(), capacity, "the events that fit, read");
        assert!(events.iter().all(|e| e.end == FWD_END_CLIENT_RESET));
        let c = reset(&fwd, capacity + 1);
        assert_ne!(c.state & FLOW_S_LOGGED, 0, "room again: {c:?}");
        assert_eq!(fwd.events().len(), 1);
    });
}
