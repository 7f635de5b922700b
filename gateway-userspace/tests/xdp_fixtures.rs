//! The XDP listener guard on fixture packets through `BPF_PROG_TEST_RUN` (katran's
//! fixture tables: description, input packet, expected action), then its counters.
//!
//! Privileged: loads the real `gw_xdp` program (root, or `CAP_BPF` + `CAP_NET_ADMIN`). The
//! maps are not pinned: each test has its own.
use aya::{
    Ebpf, EbpfLoader,
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
};
use gateway_common::{GW_LISTENERS, ListenerInfo, ListenerKey, PROG_XDP};
use sockgate::xdp::{GuardMaps, ListenerGuard, SynRate};

const PASS: u32 = 2;
const DROP: u32 = 1;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the XDP fixture tests load eBPF programs: run them as root"
    );
}

fn load() -> Ebpf {
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
    ebpf
}

fn add_listeners(ebpf: &mut Ebpf, ports: &[u16]) {
    let mut l: HashMap<_, ListenerKey, ListenerInfo> =
        HashMap::try_from(ebpf.map_mut(GW_LISTENERS).expect("GW_LISTENERS")).expect("hash map");
    for &p in ports {
        l.insert(ListenerKey::new(p), ListenerInfo::default(), 0)
            .expect("insert listener");
    }
}

fn run(ebpf: &Ebpf, pkt: &[u8]) -> u32 {
    let prog: &Xdp = ebpf
        .program(PROG_XDP)
        .expect("gw_xdp")
        .try_into()
        .expect("XDP");
    let mut out = vec![0u8; pkt.len() + 256];
    prog.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    })
    .expect("BPF_PROG_TEST_RUN")
    .return_value
}

// ---- packet builder ----

fn eth(vlan: Option<u16>, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    if let Some(id) = vlan {
        p.extend_from_slice(&0x8100u16.to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
    }
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// TCP header (20 bytes) to `dport` with `flags`.
fn tcp(dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

/// IPv4 header with `opt_words` 32-bit option words, fragment field `frag`.
fn ipv4(src: [u8; 4], opt_words: u8, frag: u16, proto: u8, payload: &[u8]) -> Vec<u8> {
    let ihl = 5 + opt_words;
    let mut h = vec![0u8; usize::from(ihl) * 4];
    h[0] = 0x40 | ihl;
    let total = (h.len() + payload.len()) as u16;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&[10, 200, 0, 1]);
    // Options: NOPs (1), then end of list.
    for b in &mut h[20..] {
        *b = 1;
    }
    h.extend_from_slice(payload);
    h
}

fn v4(src: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    eth(None, 0x0800, &ipv4(src, 0, 0, 6, &tcp(dport, flags)))
}

fn ipv6(src: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend_from_slice(payload);
    h
}

/// An IPv6 extension header of `len8` extra 8-octet units (hop-by-hop, routing,
/// destination options) followed by `next`.
fn ext(next: u8, len8: u8) -> Vec<u8> {
    let mut e = vec![0u8; (usize::from(len8) + 1) * 8];
    e[0] = next;
    e[1] = len8;
    e
}

fn frag6(next: u8, offset8: u16, more: bool) -> Vec<u8> {
    let mut f = vec![0u8; 8];
    f[0] = next;
    f[2..4].copy_from_slice(&((offset8 << 3) | u16::from(more)).to_be_bytes());
    f
}

fn a6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().expect("v6").octets()
}

fn v6(src: &str, dport: u16, flags: u8) -> Vec<u8> {
    eth(None, 0x86dd, &ipv6(a6(src), 6, &tcp(dport, flags)))
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

struct Fixture {
    desc: &'static str,
    packet: Vec<u8>,
    action: u32,
}

fn check(ebpf: &Ebpf, table: &[Fixture]) {
    let mut failed = Vec::new();
    for f in table {
        let got = run(ebpf, &f.packet);
        if got != f.action {
            failed.push(format!(
                "{}: got {got}, want {} ({} bytes)",
                f.desc,
                f.action,
                f.packet.len()
            ));
        }
    }
    assert!(failed.is_empty(), "fixtures failed:\n{}", failed.join("\n"));
}

fn guard(allow: &[&str], deny: &[&str], syn_rate: Option<SynRate>) -> ListenerGuard {
    ListenerGuard {
        allow: allow.iter().map(|c| c.parse().expect("cidr")).collect(),
        deny: deny.iter().map(|c| c.parse().expect("cidr")).collect(),
        syn_rate,
    }
}

/// Listener 8080: allow `10.0.0.0/8` and `2001:db8::/32`, deny `10.66.0.0/16`, `10.1.2.3`
/// and `2001:db8:bad::/48`. Listener 5050: allow `10.9.0.0/16`, deny `10.0.0.0/8` (deny wins
/// although the allow range is longer). Listener 7070: no policy. 6060: no listener.
fn cidr_setup() -> (Ebpf, GuardMaps) {
    let mut ebpf = load();
    add_listeners(&mut ebpf, &[8080, 5050, 7070]);
    let mut maps = GuardMaps::take(&mut ebpf).expect("guard maps");
    let g8080 = guard(
        &["10.0.0.0/8", "2001:db8::/32"],
        &["10.66.0.0/16", "10.1.2.3", "2001:db8:bad::/48"],
        None,
    );
    maps.set_guard(8080, None, Some(&g8080))
        .expect("program 8080");
    let g5050 = guard(&["10.9.0.0/16"], &["10.0.0.0/8"], None);
    maps.set_guard(5050, None, Some(&g5050))
        .expect("program 5050");
    (ebpf, maps)
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "a fixture table reads best in one piece"
)]
fn parsing_fixtures() {
    let (ebpf, _maps) = cidr_setup();
    let denied = [10, 66, 1, 1];
    let syn_denied = tcp(8080, SYN);
    let table = vec![
        Fixture {
            desc: "IPv4 SYN from an allowed source passes",
            packet: v4([10, 2, 3, 4], 8080, SYN),
            action: PASS,
        },
        Fixture {
            desc: "IPv4 SYN from a denied source is dropped",
            packet: v4(denied, 8080, SYN),
            action: DROP,
        },
        Fixture {
            desc: "IPv4 with options (ihl 15): denied SYN still found and dropped",
            packet: eth(None, 0x0800, &ipv4(denied, 10, 0, 6, &syn_denied)),
            action: DROP,
        },
        Fixture {
            desc: "IPv4 with options, allowed source passes",
            packet: eth(None, 0x0800, &ipv4([10, 2, 3, 4], 3, 0, 6, &syn_denied)),
            action: PASS,
        },
        Fixture {
            desc: "VLAN-tagged IPv4 denied SYN is dropped",
            packet: eth(Some(100), 0x0800, &ipv4(denied, 0, 0, 6, &syn_denied)),
            action: DROP,
        },
        Fixture {
            desc: "VLAN-tagged IPv6 denied SYN is dropped",
            packet: eth(
                Some(7),
                0x86dd,
                &ipv6(a6("2001:db8:bad::1"), 6, &tcp(8080, SYN)),
            ),
            action: DROP,
        },
        Fixture {
            desc: "two VLAN tags (QinQ) are not parsed: pass",
            packet: {
                let inner = eth(Some(7), 0x0800, &ipv4(denied, 0, 0, 6, &syn_denied));
                let mut p = inner[..12].to_vec();
                p.extend_from_slice(&[0x88, 0xa8, 0, 5]);
                p.extend_from_slice(&inner[12..]);
                p
            },
            action: PASS,
        },
        Fixture {
            desc: "IPv4 first fragment (MF, offset 0) with a denied SYN is dropped",
            packet: eth(None, 0x0800, &ipv4(denied, 0, 0x2000, 6, &syn_denied)),
            action: DROP,
        },
        Fixture {
            desc: "IPv4 non-first fragment passes (no TCP header)",
            packet: eth(None, 0x0800, &ipv4(denied, 0, 0x2000 | 3, 6, &syn_denied)),
            action: PASS,
        },
        Fixture {
            desc: "IPv4 with ihl < 5 (malformed) passes",
            packet: {
                let mut p = v4(denied, 8080, SYN);
                p[14] = 0x44;
                p
            },
            action: PASS,
        },
        Fixture {
            desc: "IPv4 header with a wrong version passes",
            packet: {
                let mut p = v4(denied, 8080, SYN);
                p[14] = 0x65;
                p
            },
            action: PASS,
        },
        Fixture {
            desc: "IPv4 options running past the packet end (truncated) pass",
            packet: eth(None, 0x0800, &ipv4(denied, 10, 0, 6, &[]))[..14 + 24].to_vec(),
            action: PASS,
        },
        Fixture {
            desc: "truncated TCP header (12 bytes) passes",
            packet: v4(denied, 8080, SYN)[..14 + 20 + 12].to_vec(),
            action: PASS,
        },
        Fixture {
            desc: "Ethernet header only passes",
            packet: v4(denied, 8080, SYN)[..14].to_vec(),
            action: PASS,
        },
        Fixture {
            desc: "truncated IPv4 header passes",
            packet: v4(denied, 8080, SYN)[..14 + 10].to_vec(),
            action: PASS,
        },
        Fixture {
            desc: "UDP from a denied source passes",
            packet: eth(None, 0x0800, &ipv4(denied, 0, 0, 17, &tcp(8080, SYN))),
            action: PASS,
        },
        Fixture {
            desc: "ARP passes",
            packet: eth(None, 0x0806, &[0u8; 28]),
            action: PASS,
        },
        Fixture {
            desc: "IPv6 SYN from an allowed source passes",
            packet: v6("2001:db8:1::5", 8080, SYN),
            action: PASS,
        },
        Fixture {
            desc: "IPv6 SYN from a denied /48 is dropped",
            packet: v6("2001:db8:bad:1::5", 8080, SYN),
            action: DROP,
        },
        Fixture {
            desc: "IPv6 SYN outside the allow list is dropped",
            packet: v6("2001:db9::5", 8080, SYN),
            action: DROP,
        },
        Fixture {
            desc: "IPv6 hop-by-hop + routing + destination options before a denied SYN: dropped",
            packet: eth(
                None,
                0x86dd,
                &ipv6(
                    a6("2001:db8:bad::1"),
                    0,
                    &cat(&[&ext(43, 0), &ext(60, 2), &ext(6, 1), &tcp(8080, SYN)]),
                ),
            ),
            action: DROP,
        },
        Fixture {
            desc: "IPv6 AH before a denied SYN: dropped",
            packet: eth(
                None,
                0x86dd,
                &ipv6(
                    a6("2001:db8:bad::1"),
                    51,
                    &cat(&[&[6, 4, 0, 0], &[0u8; 20], &tcp(8080, SYN)]),
                ),
            ),
            action: DROP,
        },
        Fixture {
            desc: "IPv6 first fragment with a denied SYN is dropped",
            packet: eth(
                None,
                0x86dd,
                &ipv6(
                    a6("2001:db8:bad::1"),
                    44,
                    &cat(&[&frag6(6, 0, true), &tcp(8080, SYN)]),
                ),
            ),
            action: DROP,
        },
        Fixture {
            desc: "IPv6 non-first fragment passes",
            packet: eth(
                None,
                0x86dd,
                &ipv6(
                    a6("2001:db8:bad::1"),
                    44,
                    &cat(&[&frag6(6, 100, false), &tcp(8080, SYN)]),
                ),
            ),
            action: PASS,
        },
        Fixture {
            desc: "IPv6 ESP is not followed: pass",
            packet: eth(None, 0x86dd, &ipv6(a6("2001:db8:bad::1"), 50, &[0u8; 40])),
            action: PASS,
        },
        Fixture {
            desc: "IPv6 more than 8 extension headers: pass",
            packet: {
                let mut chain = Vec::new();
                for _ in 0..9 {
                    chain.extend_from_slice(&ext(60, 0));
                }
                chain.extend_from_slice(&ext(6, 0));
                chain.extend_from_slice(&tcp(8080, SYN));
                eth(None, 0x86dd, &ipv6(a6("2001:db8:bad::1"), 60, &chain))
            },
            action: PASS,
        },
        Fixture {
            desc: "IPv6 extension header running past the end (truncated): pass",
            packet: eth(
                None,
                0x86dd,
                &ipv6(a6("2001:db8:bad::1"), 0, &ext(6, 30)[..16]),
            ),
            action: PASS,
        },
        Fixture {
            desc: "truncated IPv6 header passes",
            packet: v6("2001:db8:bad::1", 8080, SYN)[..14 + 30].to_vec(),
            action: PASS,
        },
    ];
    check(&ebpf, &table);
}

#[test]
fn policy_fixtures() {
    let (ebpf, maps) = cidr_setup();
    let table = vec![
        Fixture {
            desc: "denied source, port that is not a listener: pass",
            packet: v4([10, 66, 1, 1], 6060, SYN),
            action: PASS,
        },
        Fixture {
            desc: "denied source (of 8080) to listener 7070 without a policy: pass",
            packet: v4([10, 66, 1, 1], 7070, SYN),
            action: PASS,
        },
        Fixture {
            desc: "denied source, ACK of an established connection: pass",
            packet: v4([10, 66, 1, 1], 8080, ACK),
            action: PASS,
        },
        Fixture {
            desc: "denied source, SYN-ACK: pass",
            packet: v4([10, 66, 1, 1], 8080, SYN | ACK),
            action: PASS,
        },
        Fixture {
            desc: "longest prefix: 10.67.0.1 is inside allow /8, outside deny /16: pass",
            packet: v4([10, 67, 0, 1], 8080, SYN),
            action: PASS,
        },
        Fixture {
            desc: "longest prefix: 10.66.255.255 inside deny /16: drop",
            packet: v4([10, 66, 255, 255], 8080, SYN),
            action: DROP,
        },
        Fixture {
            desc: "deny /32 host: 10.1.2.3 dropped",
            packet: v4([10, 1, 2, 3], 8080, SYN),
            action: DROP,
        },
        Fixture {
            desc: "deny /32 host: neighbour 10.1.2.4 passes",
            packet: v4([10, 1, 2, 4], 8080, SYN),
            action: PASS,
        },
        Fixture {
            desc: "outside the allow list: 11.0.0.1 dropped",
            packet: v4([11, 0, 0, 1], 8080, SYN),
            action: DROP,
        },
        Fixture {
            desc: "deny wins over a longer allow: 10.9.1.1 to 5050 dropped",
            packet: v4([10, 9, 1, 1], 5050, SYN),
            action: DROP,
        },
        Fixture {
            desc: "5050 allows only 10.9.0.0/16: 192.168.1.1 dropped",
            packet: v4([192, 168, 1, 1], 5050, SYN),
            action: DROP,
        },
        Fixture {
            desc: "5050 allow list has no IPv6 range: IPv6 source dropped",
            packet: v6("2001:db8:1::5", 5050, SYN),
            action: DROP,
        },
    ];
    check(&ebpf, &table);
    // Counters of 8080, from the table: 7 packets (an ACK, a SYN-ACK, 5 SYNs), 2 SYNs
    // admitted, 2 denied, 1 not allowed.
    let s = maps.stats(8080);
    assert_eq!(s.packets, 7, "{s:?}");
    assert_eq!(s.syn_admitted, 2, "{s:?}");
    assert_eq!(s.dropped_denied, 2, "{s:?}");
    assert_eq!(s.dropped_not_allowed, 1, "{s:?}");
    assert_eq!(s.dropped_rate_limited, 0, "{s:?}");
    let s = maps.stats(5050);
    assert_eq!(
        (s.packets, s.dropped_denied, s.dropped_not_allowed),
        (3, 1, 2),
        "{s:?}"
    );
    let s = maps.stats(7070);
    assert_eq!((s.packets, s.syn_admitted), (1, 1), "{s:?}");
    assert_eq!(maps.stats(6060).packets, 0, "not a listener: not counted");
}

#[test]
fn reprogramming_removes_old_ranges() {
    let (ebpf, mut maps) = cidr_setup();
    let denied = v4([10, 66, 1, 1], 8080, SYN);
    assert_eq!(run(&ebpf, &denied), DROP);
    let old = guard(
        &["10.0.0.0/8", "2001:db8::/32"],
        &["10.66.0.0/16", "10.1.2.3", "2001:db8:bad::/48"],
        None,
    );
    let new = guard(&[], &["10.1.2.3"], None);
    maps.set_guard(8080, Some(&old), Some(&new))
        .expect("reprogram");
    assert_eq!(run(&ebpf, &denied), PASS, "deny range removed");
    assert_eq!(
        run(&ebpf, &v4([11, 0, 0, 1], 8080, SYN)),
        PASS,
        "no allow list any more"
    );
    assert_eq!(run(&ebpf, &v4([10, 1, 2, 3], 8080, SYN)), DROP);
    maps.set_guard(8080, Some(&new), None).expect("remove");
    assert_eq!(run(&ebpf, &v4([10, 1, 2, 3], 8080, SYN)), PASS);
}

#[test]
fn syn_rate_fixtures() {
    let mut ebpf = load();
    add_listeners(&mut ebpf, &[9090]);
    let mut maps = GuardMaps::take(&mut ebpf).expect("guard maps");
    // 1 SYN/s, burst 2, IPv4 sources aggregated on /24, IPv6 on /64. The table runs
    // in far less than the second a new token takes.
    let g = guard(
        &[],
        &[],
        Some(SynRate {
            per_second: 1,
            burst: 2,
            prefix4: 24,
            prefix6: 64,
        }),
    );
    maps.set_guard(9090, None, Some(&g)).expect("program");
    let a = [10, 5, 5, 1];
    let table = vec![
        Fixture {
            desc: "first SYN of a source: bucket full, pass",
            packet: v4(a, 9090, SYN),
            action: PASS,
        },
        Fixture {
            desc: "second SYN (burst 2): pass",
            packet: v4(a, 9090, SYN),
            action: PASS,
        },
        Fixture {
            desc: "third SYN: bucket empty, rate limited",
            packet: v4(a, 9090, SYN),
            action: DROP,
        },
        Fixture {
            desc: "ACK of the same source is never rate limited",
            packet: v4(a, 9090, ACK),
            action: PASS,
        },
        Fixture {
            desc: "another address of the same /24 shares the bucket: drop",
            packet: v4([10, 5, 5, 77], 9090, SYN),
            action: DROP,
        },
        Fixture {
            desc: "a source in another /24 has its own bucket: pass",
            packet: v4([10, 5, 6, 1], 9090, SYN),
            action: PASS,
        },
        Fixture {
            desc: "IPv6 source: pass",
            packet: v6("2001:db8:1:2::1", 9090, SYN),
            action: PASS,
        },
        Fixture {
            desc: "IPv6 same /64: pass (burst 2)",
            packet: v6("2001:db8:1:2::99", 9090, SYN),
            action: PASS,
        },
        Fixture {
            desc: "IPv6 same /64, third: drop",
            packet: v6("2001:db8:1:2:ffff::1", 9090, SYN),
            action: DROP,
        },
        Fixture {
            desc: "IPv6 other /64: pass",
            packet: v6("2001:db8:1:3::1", 9090, SYN),
            action: PASS,
        },
    ];
    check(&ebpf, &table);
    let s = maps.stats(9090);
    assert_eq!(
        (s.packets, s.syn_admitted, s.dropped_rate_limited),
        (10, 6, 3),
        "{s:?}"
    );
    // One token per second: after 1.1 s the first /24 may send one more, not two.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(run(&ebpf, &v4(a, 9090, SYN)), PASS, "refilled one token");
    assert_eq!(run(&ebpf, &v4(a, 9090, SYN)), DROP, "only one");
}

/// Two CPUs take tokens from one bucket at once: `BPF_PROG_TEST_RUN` with `repeat`
/// of the same SYN on two threads pinned to different CPUs. The admitted SYNs must
/// not exceed `burst + rate * elapsed`, where `elapsed` is the span from the first
/// thread's start to the last one's end, measured on `CLOCK_MONOTONIC` (the clock of
/// `bpf_ktime_get_ns`) around the syscalls: every timestamp the program takes lies
/// inside it, so the bound is already generous by the syscall entry and exit times
/// (a few µs, a token or less at this rate); the only other tolerance is one SYN for
/// the rounding of the bound. The threads run `SCHED_FIFO`, so the two CPUs offer
/// SYNs all the time and the admissions come close to the bound: the same program
/// with a plain read-modify-write of the bucket went over it.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "setup, two pinned threads and the checks read best in one piece"
)]
fn syn_rate_holds_across_cpus() {
    use std::{
        sync::Barrier,
        time::{Duration, Instant},
    };

    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;

    const PORT: u16 = 9191;
    const RATE: u32 = 100_000;
    const BURST: u32 = 100;
    const REPEAT: u32 = 1_000_000;

    let allowed = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .take(2)
        .collect();
    assert_eq!(cpus.len(), 2, "this test needs two CPUs to contend");

    let mut ebpf = load();
    add_listeners(&mut ebpf, &[PORT]);
    let mut maps = GuardMaps::take(&mut ebpf).expect("guard maps");
    let g = guard(
        &[],
        &[],
        Some(SynRate {
            per_second: RATE,
            burst: BURST,
            prefix4: 32,
            prefix6: 128,
        }),
    );
    maps.set_guard(PORT, None, Some(&g)).expect("program");
    let prog: &Xdp = ebpf
        .program(PROG_XDP)
        .expect("gw_xdp")
        .try_into()
        .expect("XDP");
    let pkt = v4([10, 7, 7, 7], PORT, SYN);
    let barrier = Barrier::new(2);
    let spans: Vec<(usize, Instant, Instant)> = std::thread::scope(|s| {
        let threads: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let (pkt, barrier) = (&pkt, &barrier);
                s.spawn(move || {
                    let mut set = CpuSet::new();
                    set.set(cpu).expect("cpu in range");
                    sched_setaffinity(Pid::from_raw(0), &set).expect("pin the thread");
                    // Real-time for the run (well under the kernel's 0.95 s per second
                    // real-time budget), so other tasks of the machine do not leave
                    // gaps in which tokens go unused and the bound goes slack.
                    let param = libc::sched_param { sched_priority: 1 };
                    // SAFETY: plain sched_setscheduler(2) on this thread.
                    let rt =
                        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) };
                    assert_eq!(rt, 0, "SCHED_FIFO: {}", std::io::Error::last_os_error());
                    let mut out = vec![0u8; pkt.len() + 256];
                    barrier.wait();
                    let start = Instant::now();
                    prog.test_run(TestRunOptions {
                        data_in: Some(pkt),
                        data_out: Some(&mut out),
                        repeat: REPEAT,
                        ..TestRunOptions::default()
                    })
                    .expect("BPF_PROG_TEST_RUN");
                    (cpu, start, Instant::now())
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    let first = spans.iter().map(|s| s.1).min().expect("two spans");
    let last = spans.iter().map(|s| s.2).max().expect("two spans");
    let elapsed = last - first;
    let overlap = spans
        .iter()
        .map(|s| s.2)
        .min()
        .expect("two")
        .saturating_duration_since(spans.iter().map(|s| s.1).max().expect("two"));

    let per_cpu = maps.stats_per_cpu(PORT);
    let total = per_cpu.iter().fold(
        gateway_common::XdpStats::default(),
        gateway_common::XdpStats::add,
    );
    let bound = f64::from(BURST) + f64::from(RATE) * elapsed.as_secs_f64();
    eprintln!(
        "two CPUs, {REPEAT} SYNs each: admitted {} (per CPU {:?}), rate limited {} (contended {}), \
         elapsed {elapsed:?} (both running {overlap:?}), bound {bound:.0}",
        total.syn_admitted,
        cpus.iter()
            .map(|&c| per_cpu.get(c).map_or(0, |s| s.syn_admitted))
            .collect::<Vec<_>>(),
        total.dropped_rate_limited,
        total.rate_contended,
    );
    assert_eq!(total.packets, 2 * u64::from(REPEAT), "{total:?}");
    assert_eq!(
        total.syn_admitted + total.dropped_rate_limited,
        total.packets,
        "every SYN admitted or rate limited: {total:?}"
    );
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let admitted = total.syn_admitted as f64;
    assert!(
        admitted <= bound + 1.0,
        "admitted {admitted} SYNs in {elapsed:?}: more than burst {BURST} + {RATE}/s x elapsed = {bound:.1}"
    );
    assert!(
        total.syn_admitted >= u64::from(BURST),
        "the burst at least is admitted: {total:?}"
    );
    for &c in &cpus {
        let s = per_cpu.get(c).copied().unwrap_or_default();
        assert!(
            s.syn_admitted > 0 && s.dropped_rate_limited > 0,
            "CPU {c} both took tokens and found the bucket empty: {s:?}"
        );
    }
    assert!(
        overlap > Duration::ZERO,
        "the two CPUs ran at the same time: {spans:?}"
    );
}

/// Runs each kind of packet many times in the kernel (`repeat`), checks the action
/// and prints the kernel's mean time per run: the guard's cost per packet, for
/// docs/xdp.md. Not a timed assertion.
#[test]
fn cost_per_packet() {
    let (ebpf, _maps) = cidr_setup();
    let prog: &Xdp = ebpf
        .program(PROG_XDP)
        .expect("gw_xdp")
        .try_into()
        .expect("XDP");
    let cases = [
        ("ARP (not IP)", eth(None, 0x0806, &[0u8; 28]), PASS),
        (
            "TCP to a port that is not a listener",
            v4([10, 66, 1, 1], 6060, SYN),
            PASS,
        ),
        ("ACK to a listener", v4([10, 2, 3, 4], 8080, ACK), PASS),
        ("IPv4 SYN allowed", v4([10, 2, 3, 4], 8080, SYN), PASS),
        ("IPv4 SYN denied", v4([10, 66, 1, 1], 8080, SYN), DROP),
        ("IPv6 SYN denied", v6("2001:db8:bad::1", 8080, SYN), DROP),
    ];
    for (desc, pkt, want) in cases {
        let mut out = vec![0u8; pkt.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&pkt),
                data_out: Some(&mut out),
                repeat: 100_000,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.return_value, want, "{desc}");
        eprintln!("{desc:<40} {:>6} ns per packet", r.duration.as_nanos());
    }
}
