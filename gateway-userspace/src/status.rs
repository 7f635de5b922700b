//! `sockgate status`: what is programmed now, read from the pinned maps alone.
use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use gateway_common::{
    Backend, BackendKey, DIR_CLIENT_TO_BACKEND, Flow, FlowKey, FwdStats, GW_BACKENDS, GW_FWD_FLOWS,
    GW_FWD_STATS, GW_LISTENERS, GW_LOCAL_STATS, GW_PEERS, GW_STATS, GW_XDP_STATS, ListenerInfo,
    ListenerKey, ListenerStats, LocalStats, Peer, StatsKey, XdpStats,
};
use serde::Serialize;

use crate::mapsync::backend_addr;

/// Errors of reading the pinned maps.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "nothing is pinned at {path}: is the sockgate agent running (or was it run with --keep-pins)?"
    )]
    NotPinned { path: String },
    #[error("reading pinned map {path}: {source}")]
    Map {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// One backend as programmed.
#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub index: u32,
    /// `ADDR:PORT`, or `invalid`.
    pub address: String,
    pub weight: u32,
}

/// One listener as programmed, with its counters.
#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub port: u16,
    pub generation: u32,
    pub total_weight: u32,
    pub backends: Vec<BackendStatus>,
    pub stats: Counts,
    /// What the XDP listener guard did for this listener.
    pub xdp: XdpCounts,
    /// What the forward path did for this listener.
    pub forward: ForwardCounts,
}

/// Counters of the forward path for one listener, summed over CPUs, and its
/// connections in the table now.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct ForwardCounts {
    /// Connections in the connection table now.
    pub active: u64,
    /// Connections taken by the forward program, cumulative.
    pub connections: u64,
    /// SYNs answered with a RST: no backend with weight > 0.
    pub rejected_no_backend: u64,
    /// SYNs answered with a RST: an invalid backendRef was picked.
    pub rejected_invalid_backend: u64,
    /// Client SYNs answered with a RST after every backend tried failed.
    pub rejected_connect_failed: u64,
    /// Backend attempts that failed (reset or unanswered SYN), retried or not.
    pub connect_failures: u64,
    /// SYNs left to the socket paths: no NAT port free towards the backend.
    pub nat_exhausted: u64,
    /// SYNs left to the socket paths: the connection table was full.
    pub table_full: u64,
    /// Segments left to the stack: no route to the backend.
    pub no_route: u64,
    /// SYNs left to the socket paths: the backend is reached by an interface the
    /// forward program is not attached to.
    pub not_attached: u64,
    /// ICMP errors about forwarded segments translated to the end that sent them.
    pub icmp_translated: u64,
    pub packets_client_to_backend: u64,
    pub packets_backend_to_client: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
}

impl ForwardCounts {
    fn of(s: FwdStats, active: u64) -> Self {
        Self {
            active,
            connections: s.connections,
            rejected_no_backend: s.rejected_no_backend,
            rejected_invalid_backend: s.rejected_invalid_backend,
            rejected_connect_failed: s.rejected_connect_failed,
            connect_failures: s.connect_failures,
            nat_exhausted: s.nat_exhausted,
            table_full: s.table_full,
            no_route: s.no_route,
            not_attached: s.not_attached,
            icmp_translated: s.icmp_translated,
            packets_client_to_backend: s.packets_c2b,
            packets_backend_to_client: s.packets_b2c,
            bytes_client_to_backend: s.bytes_c2b,
            bytes_backend_to_client: s.bytes_b2c,
        }
    }
}

/// The forward path's counters and live connections by listener port, and the table's
/// entry count; empty when its maps are not pinned.
fn read_forward(dir: &Path) -> Result<(BTreeMap<u16, ForwardCounts>, usize), StatusError> {
    let mut out: BTreeMap<u16, ForwardCounts> = BTreeMap::new();
    let mut entries = 0;
    if dir.join(GW_FWD_FLOWS).exists() {
        let flows: HashMap<_, FlowKey, Flow> =
            HashMap::try_from(Map::HashMap(open(dir, GW_FWD_FLOWS)?))
                .map_err(map_err(dir, GW_FWD_FLOWS))?;
        for (_, f) in flows.iter().filter_map(Result::ok) {
            entries += 1;
            if u32::from(f.direction) == DIR_CLIENT_TO_BACKEND {
                out.entry(f.listener_port).or_default().active += 1;
            }
        }
    }
    if dir.join(GW_FWD_STATS).exists() {
        let stats: PerCpuHashMap<_, ListenerKey, FwdStats> =
            PerCpuHashMap::try_from(Map::PerCpuHashMap(open(dir, GW_FWD_STATS)?))
                .map_err(map_err(dir, GW_FWD_STATS))?;
        for (k, per_cpu) in stats.iter().filter_map(Result::ok) {
            let sum = per_cpu.iter().fold(FwdStats::default(), FwdStats::add);
            let e = out.entry(k.port).or_default();
            *e = ForwardCounts::of(sum, e.active);
        }
    }
    Ok((out, entries))
}

/// Counters of the XDP listener guard for one listener, summed over CPUs.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct XdpCounts {
    /// TCP packets to the listener port seen by the guard.
    pub packets: u64,
    /// SYNs passed to the stack.
    pub syn_admitted: u64,
    /// SYNs dropped: source in a deny range.
    pub dropped_denied: u64,
    /// SYNs dropped: source outside the allow list.
    pub dropped_not_allowed: u64,
    /// SYNs dropped: source prefix over its SYN rate.
    pub dropped_rate_limited: u64,
    /// Of `dropped_rate_limited`: dropped because other CPUs kept changing the
    /// prefix's token bucket (compare-and-swap retries exhausted).
    pub rate_contended: u64,
}

impl From<XdpStats> for XdpCounts {
    fn from(s: XdpStats) -> Self {
        Self {
            packets: s.packets,
            syn_admitted: s.syn_admitted,
            dropped_denied: s.dropped_denied,
            dropped_not_allowed: s.dropped_not_allowed,
            dropped_rate_limited: s.dropped_rate_limited,
            rate_contended: s.rate_contended,
        }
    }
}

/// The guard's counters by listener port; empty when the map is not pinned (an agent
/// of a build without the guard).
fn read_xdp_counts(dir: &Path) -> Result<BTreeMap<u16, XdpStats>, StatusError> {
    if !dir.join(GW_XDP_STATS).exists() {
        return Ok(BTreeMap::new());
    }
    let stats: PerCpuHashMap<_, ListenerKey, XdpStats> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open(dir, GW_XDP_STATS)?))
            .map_err(map_err(dir, GW_XDP_STATS))?;
    Ok(stats
        .iter()
        .filter_map(Result::ok)
        .map(|(k, per_cpu)| {
            (
                k.port,
                per_cpu.iter().fold(XdpStats::default(), XdpStats::add),
            )
        })
        .collect())
}

/// Counters of a listener, summed over CPUs and owners.
#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub accepted: u64,
    pub connected: u64,
    pub rejected_no_backend: u64,
    pub rejected_invalid_backend: u64,
    pub rejected_connect_failed: u64,
    pub connect_failures: u64,
    pub kernel_connections: u64,
    pub userspace_connections: u64,
    pub active_kernel: u64,
    pub active_userspace: u64,
    pub bytes_client_to_backend_kernel: u64,
    pub bytes_backend_to_client_kernel: u64,
    pub bytes_client_to_backend_userspace: u64,
    pub bytes_backend_to_client_userspace: u64,
    /// Times the verdict throttled a kernel-path socket (its peer's queue was full).
    pub kernel_throttles: u64,
    /// Repeated bytes cut off retransmitted segments by the verdict.
    pub duplicate_bytes_dropped: u64,
}

impl From<ListenerStats> for Counts {
    fn from(s: ListenerStats) -> Self {
        Self {
            accepted: s.accepted,
            connected: s.connected,
            rejected_no_backend: s.rejected_no_backend,
            rejected_invalid_backend: s.rejected_invalid_backend,
            rejected_connect_failed: s.rejected_connect_failed,
            connect_failures: s.connect_failures,
            kernel_connections: s.kernel_connections,
            userspace_connections: s.userspace_connections,
            active_kernel: s.active_kernel,
            active_userspace: s.active_userspace,
            bytes_client_to_backend_kernel: s.bytes_c2b_kernel,
            bytes_backend_to_client_kernel: s.bytes_b2c_kernel,
            bytes_client_to_backend_userspace: s.bytes_c2b_userspace,
            bytes_backend_to_client_userspace: s.bytes_b2c_userspace,
            kernel_throttles: s.kernel_throttles,
            duplicate_bytes_dropped: s.duplicate_bytes_dropped,
        }
    }
}

/// The node-local shortcut's counters (`--local-shortcut`), summed over CPUs. The
/// message and byte counts are the `sk_msg` program's verdicts: a send the client
/// retries (after `EAGAIN` from a full backend send buffer) is counted again.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct LocalCounts {
    /// Client sockets taken by the `sock_ops` program (node-local clients of a listener).
    pub clients: u64,
    /// Client sockets that could not be taken (map full).
    pub insert_failures: u64,
    /// Clients switched from loopback to the shortcut.
    pub switches: u64,
    /// Sends passed to the client's own TCP (over loopback), and their bytes.
    pub msgs_passed: u64,
    pub bytes_passed: u64,
    /// Sends redirected into the backend socket, and their bytes.
    pub msgs_redirected: u64,
    pub bytes_redirected: u64,
    /// Sends dropped because the backend socket had left (the pair was ending).
    pub redirect_failures: u64,
}

/// The shortcut's counters, when its map is pinned (the agent runs with
/// `--local-shortcut`).
fn read_local(dir: &Path) -> Result<Option<LocalCounts>, StatusError> {
    if !dir.join(GW_LOCAL_STATS).exists() {
        return Ok(None);
    }
    let stats: PerCpuArray<_, LocalStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(dir, GW_LOCAL_STATS)?))
            .map_err(map_err(dir, GW_LOCAL_STATS))?;
    let per_cpu = stats.get(&0, 0).map_err(map_err(dir, GW_LOCAL_STATS))?;
    let v = per_cpu.iter().fold(LocalStats::default(), LocalStats::add);
    let c = LocalCounts {
        clients: v.clients,
        insert_failures: v.insert_failures,
        switches: v.switches,
        msgs_passed: v.msgs_passed,
        bytes_passed: v.bytes_passed,
        msgs_redirected: v.msgs_redirected,
        bytes_redirected: v.bytes_redirected,
        redirect_failures: v.redirect_failures,
    };
    Ok(Some(c))
}

/// Everything `sockgate status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub listeners: Vec<ListenerStatus>,
    /// Sockets of kernel-path pairs now in `GW_PEERS`.
    pub paired_sockets: usize,
    /// Entries in the forward path's connection table (two per connection).
    pub forward_table_entries: usize,
    /// The node-local shortcut's counters; absent when it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_shortcut: Option<LocalCounts>,
}

pub(crate) fn open(dir: &Path, name: &str) -> Result<MapData, StatusError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(StatusError::NotPinned {
            path: path.display().to_string(),
        });
    }
    MapData::from_pin(&path).map_err(|source| StatusError::Map {
        path: path.display().to_string(),
        source,
    })
}

pub(crate) fn map_err(dir: &Path, name: &str) -> impl Fn(aya::maps::MapError) -> StatusError {
    let path = dir.join(name).display().to_string();
    move |source| StatusError::Map {
        path: path.clone(),
        source,
    }
}

/// Reads the pinned maps in `dir`.
pub fn read(dir: &Path) -> Result<Status, StatusError> {
    let listeners: HashMap<_, ListenerKey, ListenerInfo> =
        HashMap::try_from(Map::HashMap(open(dir, GW_LISTENERS)?))
            .map_err(map_err(dir, GW_LISTENERS))?;
    let backends: HashMap<_, BackendKey, Backend> =
        HashMap::try_from(Map::HashMap(open(dir, GW_BACKENDS)?))
            .map_err(map_err(dir, GW_BACKENDS))?;
    let peers: HashMap<_, u64, Peer> =
        HashMap::try_from(Map::HashMap(open(dir, GW_PEERS)?)).map_err(map_err(dir, GW_PEERS))?;
    let stats: PerCpuHashMap<_, StatsKey, ListenerStats> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open(dir, GW_STATS)?))
            .map_err(map_err(dir, GW_STATS))?;

    let mut counts: BTreeMap<u16, ListenerStats> = BTreeMap::new();
    for entry in stats.iter().filter_map(Result::ok) {
        let (key, per_cpu) = entry;
        let sum = per_cpu
            .iter()
            .fold(ListenerStats::default(), ListenerStats::add);
        let e = counts.entry(key.listener_port).or_default();
        *e = e.add(&sum);
    }
    let mut xdp = read_xdp_counts(dir)?;
    let (mut fwd, fwd_entries) = read_forward(dir)?;
    let mut by_port: BTreeMap<u16, Vec<BackendStatus>> = BTreeMap::new();
    for (key, b) in backends.iter().filter_map(Result::ok) {
        by_port
            .entry(key.listener_port)
            .or_default()
            .push(BackendStatus {
                index: key.index,
                address: backend_addr(&b).map_or_else(|| "invalid".to_owned(), |a| a.to_string()),
                weight: b.weight,
            });
    }
    let mut out: Vec<ListenerStatus> = listeners
        .iter()
        .filter_map(Result::ok)
        .map(|(key, info)| {
            let mut backends = by_port.remove(&key.port).unwrap_or_default();
            backends.sort_by_key(|b| b.index);
            ListenerStatus {
                port: key.port,
                generation: info.generation,
                total_weight: info.total_weight,
                backends,
                stats: counts
                    .remove(&key.port)
                    .map(Counts::from)
                    .unwrap_or_default(),
                xdp: xdp
                    .remove(&key.port)
                    .map(XdpCounts::from)
                    .unwrap_or_default(),
                forward: fwd.remove(&key.port).unwrap_or_default(),
            }
        })
        .collect();
    out.sort_by_key(|l| l.port);
    Ok(Status {
        pin_dir: dir.display().to_string(),
        listeners: out,
        paired_sockets: peers.keys().filter_map(Result::ok).count(),
        forward_table_entries: fwd_entries,
        local_shortcut: read_local(dir)?,
    })
}

/// The forward path's lines of a listener, when it did anything.
fn render_forward(o: &mut String, f: &ForwardCounts) {
    use std::fmt::Write as _;
    if *f == ForwardCounts::default() {
        return;
    }
    let _ = writeln!(
        o,
        "  forward:     active {}  connections {}  c->b {} B / {} segments  b->c {} B / {} segments  ICMP errors translated {}",
        f.active,
        f.connections,
        f.bytes_client_to_backend,
        f.packets_client_to_backend,
        f.bytes_backend_to_client,
        f.packets_backend_to_client,
        f.icmp_translated
    );
    let _ = writeln!(
        o,
        "  forward rejected: no backend {}  invalid backend {}  connect failed {}  (connect failures {})  to the socket paths: NAT ports exhausted {}  table full {}  no route {}  backend interface not attached {}",
        f.rejected_no_backend,
        f.rejected_invalid_backend,
        f.rejected_connect_failed,
        f.connect_failures,
        f.nat_exhausted,
        f.table_full,
        f.no_route,
        f.not_attached
    );
}

/// The table a person reads.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "pinned maps: {}    paired sockets (sockmap path): {}    forward table entries: {}",
        s.pin_dir, s.paired_sockets, s.forward_table_entries
    );
    if let Some(l) = &s.local_shortcut {
        let _ = writeln!(
            o,
            "node-local shortcut: clients {}  switched {}  sends redirected {} ({} bytes)  \
             passed over loopback {} ({} bytes)  redirect failures {}  not taken (map full) {}",
            l.clients,
            l.switches,
            l.msgs_redirected,
            l.bytes_redirected,
            l.msgs_passed,
            l.bytes_passed,
            l.redirect_failures,
            l.insert_failures
        );
    }
    if s.listeners.is_empty() {
        let _ = writeln!(o, "no listeners programmed");
    }
    for l in &s.listeners {
        let c = &l.stats;
        let _ = writeln!(
            o,
            "\nlistener :{}  (generation {}, total weight {})",
            l.port, l.generation, l.total_weight
        );
        for b in &l.backends {
            let share = if l.total_weight == 0 {
                0.0
            } else {
                f64::from(b.weight) * 100.0 / f64::from(l.total_weight)
            };
            let _ = writeln!(
                o,
                "  backend {:<3} {:<40} weight {:<5} ({share:.0}%)",
                b.index, b.address, b.weight
            );
        }
        let _ = writeln!(
            o,
            "  connections: accepted {}  connected {}  active kernel {}  active userspace {}",
            c.accepted, c.connected, c.active_kernel, c.active_userspace
        );
        let _ = writeln!(
            o,
            "  by path:     kernel {}  userspace {}",
            c.kernel_connections, c.userspace_connections
        );
        let _ = writeln!(
            o,
            "  rejected:    no backend {}  invalid backend {}  connect failed {}  (connect failures {})",
            c.rejected_no_backend,
            c.rejected_invalid_backend,
            c.rejected_connect_failed,
            c.connect_failures
        );
        let _ = writeln!(
            o,
            "  bytes:       kernel c->b {} b->c {}  userspace c->b {} b->c {}",
            c.bytes_client_to_backend_kernel,
            c.bytes_backend_to_client_kernel,
            c.bytes_client_to_backend_userspace,
            c.bytes_backend_to_client_userspace
        );
        let _ = writeln!(
            o,
            "  throttled:   kernel {}  (peer queue full; parked bytes moved by the agent)",
            c.kernel_throttles
        );
        let _ = writeln!(
            o,
            "  repeated:    {} bytes cut off retransmitted segments",
            c.duplicate_bytes_dropped
        );
        render_forward(&mut o, &l.forward);
        let x = &l.xdp;
        if *x != XdpCounts::default() {
            let _ = writeln!(
                o,
                "  xdp guard:   packets {}  SYN admitted {}  dropped: denied {}  not allowed {}  rate limited {} (contended {})",
                x.packets,
                x.syn_admitted,
                x.dropped_denied,
                x.dropped_not_allowed,
                x.dropped_rate_limited,
                x.rate_contended
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(local_shortcut: Option<LocalCounts>) -> Status {
        Status {
            pin_dir: "/sys/fs/bpf/sockgate".into(),
            listeners: Vec::new(),
            paired_sockets: 0,
            forward_table_entries: 0,
            local_shortcut,
        }
    }

    #[test]
    fn the_shortcut_line_shows_its_counters_and_only_when_it_is_on() {
        let per_cpu = [
            LocalStats {
                clients: 2,
                switches: 1,
                bytes_redirected: 1000,
                ..LocalStats::default()
            },
            LocalStats {
                clients: 1,
                bytes_passed: 24,
                redirect_failures: 1,
                ..LocalStats::default()
            },
        ];
        let v = per_cpu.iter().fold(LocalStats::default(), LocalStats::add);
        assert_eq!((v.clients, v.switches, v.bytes_redirected), (3, 1, 1000));
        assert_eq!((v.bytes_passed, v.redirect_failures), (24, 1));
        let on = render(&status(Some(LocalCounts {
            clients: v.clients,
            switches: v.switches,
            bytes_redirected: v.bytes_redirected,
            bytes_passed: v.bytes_passed,
            redirect_failures: v.redirect_failures,
            ..LocalCounts::default()
        })));
        assert!(
            on.contains("node-local shortcut: clients 3  switched 1"),
            "{on}"
        );
        assert!(
            on.contains("(1000 bytes)") && on.contains("redirect failures 1"),
            "{on}"
        );
        let off = render(&status(None));
        assert!(!off.contains("node-local shortcut"), "{off}");
        let json = serde_json::to_value(status(None)).expect("json");
        assert!(json.get("local_shortcut").is_none(), "{json}");
    }
}
