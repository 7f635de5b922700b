//! The XDP listener guard, agent side: the policy of a listener as plain data, the map
//! entries it becomes, the maps' handles, and the attach modes. `crate::attach::xdp`
//! keeps `gw_xdp` attached to the interfaces it should guard.
//!
//! The kernel side (`gateway-ebpf/src/xdp.rs`) drops SYNs to a listener port from a
//! denied source, from a source outside a non-empty allow list, or beyond the source
//! prefix's SYN rate; everything else passes. See `docs/xdp.md`.
use std::{collections::BTreeSet, fmt, net::IpAddr, str::FromStr};

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, PerCpuHashMap, lpm_trie::Key},
    programs::{ProgramError, XdpMode},
};
use gateway_common::{
    CIDR_ALLOW, CIDR_DENY, CIDR_KEY_HEAD_BITS, Cidr4, Cidr6, GW_XDP_CIDR4, GW_XDP_CIDR6,
    GW_XDP_POLICY, GW_XDP_STATS, ListenerKey, PROG_XDP, XDP_F_HAS_ALLOW, XdpPolicy, XdpStats,
};

use crate::map_error::MapOpError;

/// A client address range: an address with its host bits cleared and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A CIDR that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid CIDR {input:?}: {reason}")]
pub struct CidrError {
    pub input: String,
    pub reason: &'static str,
}

impl Cidr {
    /// The range of `prefix` bits of `addr` (host bits cleared); `None` when `prefix`
    /// is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
            _ => return None,
        };
        Some(Self { addr, prefix })
    }

    /// The first address of the range.
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub const fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in the range (an IPv4 address is never in an IPv6 range, nor
    /// the reverse).
    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.prefix).is_some_and(|c| c.addr == self.addr)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDR/PREFIX`, or a bare address (a host: /32 or /128).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| CidrError {
            input: s.to_owned(),
            reason,
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| err("bad prefix length"))?,
            None => max,
        };
        Self::new(addr, prefix).ok_or_else(|| err("prefix length longer than the address"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A per-source SYN rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SynRate {
    /// SYNs per second admitted from one source prefix.
    pub per_second: u32,
    /// SYNs admitted at once (the bucket size), at least 1.
    pub burst: u32,
    /// Prefix length IPv4 sources are aggregated on (32: each address).
    pub prefix4: u8,
    /// Prefix length IPv6 sources are aggregated on (128: each address).
    pub prefix6: u8,
}

/// The guard's policy of one listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerGuard {
    /// When not empty, only sources in these ranges may connect.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub allow: BTreeSet<Cidr>,
    /// Sources in these ranges may not connect (wins over `allow`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deny: BTreeSet<Cidr>,
    /// SYN rate limit per source prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_rate: Option<SynRate>,
}

/// A `--xdp-allow`, `--xdp-deny` or `--xdp-syn-rate` flag that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("{flag} {spec:?}: expected PORT=...")]
    NoPort { flag: &'static str, spec: String },
    #[error("{flag} {spec:?}: bad port")]
    Port { flag: &'static str, spec: String },
    #[error("{flag} {spec:?}: {source}")]
    Cidr {
        flag: &'static str,
        spec: String,
        #[source]
        source: CidrError,
    },
    #[error(
        "--xdp-syn-rate {spec:?}: expected PORT=RATE[/BURST[/PREFIX4[/PREFIX6]]] with RATE > 0"
    )]
    Rate { spec: String },
}

fn port_of<'a>(flag: &'static str, spec: &'a str) -> Result<(u16, &'a str), FlagError> {
    let (p, rest) = spec.split_once('=').ok_or_else(|| FlagError::NoPort {
        flag,
        spec: spec.to_owned(),
    })?;
    let port = p.trim().parse::<u16>().map_err(|_| FlagError::Port {
        flag,
        spec: spec.to_owned(),
    })?;
    Ok((port, rest))
}

/// The guards given on the command line (`--xdp-allow`, `--xdp-deny`,
/// `--xdp-syn-rate`), by listener port.
pub fn parse_flags(
    allow: &[String],
    deny: &[String],
    rates: &[String],
) -> Result<std::collections::BTreeMap<u16, ListenerGuard>, FlagError> {
    let mut out = std::collections::BTreeMap::<u16, ListenerGuard>::new();
    for (flag, specs, is_allow) in [("--xdp-allow", allow, true), ("--xdp-deny", deny, false)] {
        for spec in specs {
            let (port, cidrs) = port_of(flag, spec)?;
            let g = out.entry(port).or_default();
            for c in cidrs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let c: Cidr = c.parse().map_err(|source| FlagError::Cidr {
                    flag,
                    spec: spec.clone(),
                    source,
                })?;
                if is_allow {
                    g.allow.insert(c);
                } else {
                    g.deny.insert(c);
                }
            }
        }
    }
    for spec in rates {
        let (port, r) = port_of("--xdp-syn-rate", spec)?;
        let bad = || FlagError::Rate { spec: spec.clone() };
        let nums: Vec<u32> = r
            .split('/')
            .map(|n| n.trim().parse::<u32>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let (Some(&per_second), true) = (nums.first(), nums.len() <= 4) else {
            return Err(bad());
        };
        if per_second == 0 {
            return Err(bad());
        }
        let prefix = |i: usize, max: u8| match nums.get(i) {
            None => Ok(max),
            Some(&p) => u8::try_from(p).ok().filter(|p| *p <= max).ok_or_else(bad),
        };
        out.entry(port).or_default().syn_rate = Some(SynRate {
            per_second,
            burst: nums.get(1).copied().unwrap_or(per_second).max(1),
            prefix4: prefix(2, 32)?,
            prefix6: prefix(3, 128)?,
        });
    }
    Ok(out)
}

/// One entry of a CIDR trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CidrEntry {
    V4 { prefix_len: u32, data: Cidr4 },
    V6 { prefix_len: u32, data: Cidr6 },
}

impl ListenerGuard {
    /// The `GW_XDP_POLICY` value of this guard.
    pub fn policy(&self) -> XdpPolicy {
        let mut p = XdpPolicy::default();
        if !self.allow.is_empty() {
            p.flags |= XDP_F_HAS_ALLOW;
        }
        if let Some(r) = self.syn_rate {
            p.syn_rate = r.per_second;
            p.syn_burst = r.burst.max(1);
            p.rate_prefix4 = r.prefix4.min(32);
            p.rate_prefix6 = r.prefix6.min(128);
        }
        p
    }

    /// The trie entries of this guard for listener `port`.
    pub fn cidr_entries(&self, port: u16) -> BTreeSet<CidrEntry> {
        let port_be = port.to_be_bytes();
        let tagged = self
            .allow
            .iter()
            .map(|c| (CIDR_ALLOW, c))
            .chain(self.deny.iter().map(|c| (CIDR_DENY, c)));
        tagged
            .map(|(kind, c)| {
                let prefix_len = CIDR_KEY_HEAD_BITS + u32::from(c.prefix);
                match c.addr {
                    IpAddr::V4(a) => CidrEntry::V4 {
                        prefix_len,
                        data: Cidr4 {
                            port_be,
                            kind,
                            _pad: 0,
                            addr_be: a.octets(),
                        },
                    },
                    IpAddr::V6(a) => CidrEntry::V6 {
                        prefix_len,
                        data: Cidr6 {
                            port_be,
                            kind,
                            _pad: 0,
                            addr_be: a.octets(),
                        },
                    },
                }
            })
            .collect()
    }
}

/// Errors of the guard's maps and attachments.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {PROG_XDP}: {0}")]
    Program(#[source] ProgramError),
    #[error("attaching {PROG_XDP} to {iface} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: XdpKind,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the driver of {iface} refuses native XDP ({source}): use --xdp-mode generic, or auto to fall back to generic"
    )]
    NativeRefused {
        iface: String,
        #[source]
        source: ProgramError,
    },
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> XdpError {
    move |source| XdpError::Map { name, source }
}

fn op_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> MapOpError {
    move |source| MapOpError { map, source }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, XdpError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(XdpError::Missing(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Handles on the guard's maps.
pub struct GuardMaps {
    policy: HashMap<MapData, ListenerKey, XdpPolicy>,
    cidr4: LpmTrie<MapData, Cidr4, u32>,
    cidr6: LpmTrie<MapData, Cidr6, u32>,
    stats: PerCpuHashMap<MapData, ListenerKey, XdpStats>,
}

impl fmt::Debug for GuardMaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardMaps").finish_non_exhaustive()
    }
}

impl GuardMaps {
    /// Takes the guard's maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, XdpError> {
        Ok(Self {
            policy: take(ebpf, GW_XDP_POLICY)?,
            cidr4: take(ebpf, GW_XDP_CIDR4)?,
            cidr6: take(ebpf, GW_XDP_CIDR6)?,
            stats: take(ebpf, GW_XDP_STATS)?,
        })
    }

    /// The handle of the guard's map `name`, if it holds it.
    pub fn map_data(&self, name: &str) -> Option<&MapData> {
        use aya::maps::IterableMap;
        match name {
            GW_XDP_POLICY => Some(self.policy.map()),
            GW_XDP_CIDR4 => Some(self.cidr4.map()),
            GW_XDP_CIDR6 => Some(self.cidr6.map()),
            GW_XDP_STATS => Some(self.stats.map()),
            _ => None,
        }
    }

    fn insert_entry(&mut self, e: &CidrEntry, id: u32) -> Result<(), MapOpError> {
        match *e {
            CidrEntry::V4 { prefix_len, data } => self
                .cidr4
                .insert(&Key::new(prefix_len, data), id, 0)
                .map_err(op_err(GW_XDP_CIDR4)),
            CidrEntry::V6 { prefix_len, data } => self
                .cidr6
                .insert(&Key::new(prefix_len, data), id, 0)
                .map_err(op_err(GW_XDP_CIDR6)),
        }
    }

    fn remove_entry(&mut self, e: &CidrEntry) -> Result<(), MapOpError> {
        let r = match *e {
            CidrEntry::V4 { prefix_len, data } => self
                .cidr4
                .remove(&Key::new(prefix_len, data))
                .map_err(op_err(GW_XDP_CIDR4)),
            CidrEntry::V6 { prefix_len, data } => self
                .cidr6
                .remove(&Key::new(prefix_len, data))
                .map_err(op_err(GW_XDP_CIDR6)),
        };
        match r {
            Err(MapOpError {
                source: aya::maps::MapError::KeyNotFound,
                ..
            }) => Ok(()),
            r => r,
        }
    }

    /// Removes every policy and range (an earlier run's, in reused pins): the agent
    /// programs the guard from scratch. Returns how many entries were removed.
    pub fn clear(&mut self) -> usize {
        let policies: Vec<ListenerKey> = self.policy.keys().filter_map(Result::ok).collect();
        let v4: Vec<Key<Cidr4>> = self.cidr4.keys().filter_map(Result::ok).collect();
        let v6: Vec<Key<Cidr6>> = self.cidr6.keys().filter_map(Result::ok).collect();
        let n = policies.len() + v4.len() + v6.len();
        for k in &policies {
            let _ = self.policy.remove(k);
        }
        for k in &v4 {
            let _ = self.cidr4.remove(k);
        }
        for k in &v6 {
            let _ = self.cidr6.remove(k);
        }
        n
    }

    /// Programs listener `port` from its previous guard `old` to `new` (`None`: no
    /// policy, the listener is only counted). New ranges are written before the policy
    /// that may depend on them (an allow list), stale ones removed after it.
    pub fn set_guard(
        &mut self,
        port: u16,
        old: Option<&ListenerGuard>,
        new: Option<&ListenerGuard>,
    ) -> Result<(), MapOpError> {
        let old_entries = old.map(|g| g.cidr_entries(port)).unwrap_or_default();
        let new_entries = new.map(|g| g.cidr_entries(port)).unwrap_or_default();
        for (i, e) in new_entries.difference(&old_entries).enumerate() {
            self.insert_entry(e, u32::try_from(i).unwrap_or(u32::MAX).saturating_add(1))?;
        }
        let key = ListenerKey::new(port);
        match new {
            Some(g) => self
                .policy
                .insert(key, g.policy(), 0)
                .map_err(op_err(GW_XDP_POLICY))?,
            None => match self.policy.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(MapOpError {
                        map: GW_XDP_POLICY,
                        source,
                    });
                }
            },
        }
        for e in old_entries.difference(&new_entries) {
            self.remove_entry(e)?;
        }
        Ok(())
    }

    /// The guard's counters of `port`, one value per possible CPU (zeros when the
    /// listener has none yet).
    pub fn stats_per_cpu(&self, port: u16) -> Vec<XdpStats> {
        self.stats
            .get(&ListenerKey::new(port), 0)
            .map(|per_cpu| per_cpu.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The guard's counters of `port`, summed over CPUs.
    pub fn stats(&self, port: u16) -> XdpStats {
        self.stats
            .get(&ListenerKey::new(port), 0)
            .map(|per_cpu| per_cpu.iter().fold(XdpStats::default(), XdpStats::add))
            .unwrap_or_default()
    }
}

/// How `gw_xdp` is attached to an interface (`--xdp-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Generic on veth (where native mode turns TSO off on the peer and costs
    /// throughput); elsewhere native, falling back to generic when the driver
    /// refuses it. The choice and its reason are logged per interface.
    #[default]
    Auto,
    /// Generic XDP (in the stack, after the skb is built): works on every interface
    /// and costs nothing measurable on veth.
    Generic,
    /// Native XDP (in the driver): cheapest on a NIC whose driver supports it; on veth
    /// it turns TSO off on the peer. An interface whose driver refuses it is an error.
    Native,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Generic => "generic",
            Self::Native => "native",
        })
    }
}

/// Where a program is attached on an interface: the kernel's XDP attach modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XdpKind {
    /// `XDP_FLAGS_SKB_MODE`, `xdpgeneric` in `ip link`.
    Generic,
    /// `XDP_FLAGS_DRV_MODE`, `xdpdrv` in `ip link`.
    Native,
    /// `XDP_FLAGS_HW_MODE`, `xdpoffload` (sockgate never asks for it).
    Offload,
}

impl fmt::Display for XdpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Generic => "generic",
            Self::Native => "native",
            Self::Offload => "offload",
        })
    }
}

impl From<XdpKind> for XdpMode {
    fn from(m: XdpKind) -> Self {
        match m {
            XdpKind::Generic => Self::Skb,
            XdpKind::Native => Self::Driver,
            XdpKind::Offload => Self::Hardware,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_clears_host_bits() {
        let c: Cidr = "10.1.2.3/16".parse().expect("cidr");
        assert_eq!(c.to_string(), "10.1.0.0/16");
        let c: Cidr = "2001:db8::1/32".parse().expect("cidr");
        assert_eq!(c.to_string(), "2001:db8::/32");
        assert_eq!("10.0.0.1".parse::<Cidr>().expect("host").prefix(), 32);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().expect("all").prefix(), 0);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn cidr_contains_its_family_only() {
        let c: Cidr = "127.0.0.0/8".parse().expect("cidr");
        assert!(c.contains("127.1.2.3".parse().expect("ip")));
        assert!(!c.contains("128.0.0.1".parse().expect("ip")));
        assert!(!c.contains("::ffff:127.0.0.1".parse().expect("ip")));
        let all: Cidr = "::/0".parse().expect("cidr");
        assert!(all.contains("fe80::1".parse().expect("ip")));
        assert!(!all.contains("10.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn flags_parse() {
        let g = parse_flags(
            &["8080=10.0.0.0/8, 2001:db8::/32".into()],
            &["8080=10.1.0.0/16".into(), "9090=192.0.2.1".into()],
            &["9090=100".into(), "7070=5/10/24/64".into()],
        )
        .expect("parse");
        assert_eq!(g.len(), 3);
        assert_eq!(g[&8080].allow.len(), 2);
        assert_eq!(g[&8080].deny.len(), 1);
        assert_eq!(
            g[&9090].syn_rate,
            Some(SynRate {
                per_second: 100,
                burst: 100,
                prefix4: 32,
                prefix6: 128
            })
        );
        assert_eq!(
            g[&7070].syn_rate.map(|r| (r.burst, r.prefix4, r.prefix6)),
            Some((10, 24, 64))
        );
        for bad in [
            "9090",
            "x=5",
            "9090=0",
            "9090=5/1/33",
            "9090=1/2/3/4/5",
            "9090=a",
        ] {
            assert!(parse_flags(&[], &[], &[bad.into()]).is_err(), "{bad}");
        }
        assert!(parse_flags(&["80=10.0.0.0/40".into()], &[], &[]).is_err());
        assert!(parse_flags(&[], &["80".into()], &[]).is_err());
    }

    #[test]
    fn policy_and_entries() {
        let g = ListenerGuard {
            allow: ["10.0.0.0/8".parse().expect("cidr")].into(),
            deny: [
                "10.1.0.0/16".parse().expect("cidr"),
                "fd00::/8".parse().expect("cidr"),
            ]
            .into(),
            syn_rate: Some(SynRate {
                per_second: 5,
                burst: 0,
                prefix4: 40,
                prefix6: 64,
            }),
        };
        let p = g.policy();
        assert_eq!(p.flags, XDP_F_HAS_ALLOW);
        assert_eq!((p.syn_rate, p.syn_burst), (5, 1), "burst at least 1");
        assert_eq!((p.rate_prefix4, p.rate_prefix6), (32, 64));
        let e = g.cidr_entries(8080);
        assert_eq!(e.len(), 3);
        assert!(e.contains(&CidrEntry::V4 {
            prefix_len: 32 + 16,
            data: Cidr4 {
                port_be: 8080u16.to_be_bytes(),
                kind: CIDR_DENY,
                _pad: 0,
                addr_be: [10, 1, 0, 0],
            }
        }));
        assert_eq!(ListenerGuard::default().policy(), XdpPolicy::default());
    }
}
