//! The forward data path's agent side: the program `gw_fwd` attached to the tc ingress
//! of the chosen interfaces, the node addresses it answers on, the NAT port range, the
//! selection tables ([`slots`]) and the sweeper of the connection table.
//!
//! The program does the per-packet work (see `gateway-ebpf/src/forward.rs`); the agent:
//!
//! * **attaches** `gw_fwd` (through the attachment manager, `crate::attach::forward`)
//!   to the interfaces named with `--forward-iface`, or in the cluster to those holding
//!   the `Node`'s addresses and those towards the backends, as tcx links pinned under
//!   `PIN_DIR/links/` ([`link_pin`]), so that the program, its maps and the connections
//!   it carries outlive the agent (a restart, SIGKILL included, takes the pinned links
//!   over and replaces their program atomically); the same manager publishes the
//!   node's addresses in `GW_FWD_ADDRS` (a SYN to one of them on a listener port is
//!   forwarded) and the attached interfaces in `GW_FWD_IFACES`;
//! * **reserves the NAT ports** in `net.ipv4.ip_local_reserved_ports`, so no local
//!   socket takes one, and refuses a range that overlaps the ephemeral range;
//! * **sweeps** the connection table every [`SWEEP_EVERY`]: a connection is removed
//!   (both of its entries) when it has been quiet for its state's timeout ([`Timeouts`]),
//!   and the connections of a removed listener once the drain timeout has passed. An
//!   entry that still sees segments is never removed. The sweeper logs the connections
//!   it removes that the program did not report (`FLOW_S_LOGGED` clear: timeouts,
//!   drains, ends whose event did not fit the ring buffer);
//! * **logs** the connection ends the program reports in `GW_FWD_EVENTS` ([`events`]).
//!
//! Both name their records (listener, route, backendRef) from the desired state.
pub mod events;
pub mod slots;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use gateway_common::{
    DIR_CLIENT_TO_BACKEND, FLOW_S_ACK, FLOW_S_FIN, FLOW_S_LOGGED, FLOW_S_RST, FLOW_S_SYN, Flow,
    FlowKey, NodeAddr,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{
    access_log::{EndReason, ListenerRef, PathName, Record, Sink, rfc3339},
    desired::DesiredState,
    ebpf::{Datapath, MapOpError},
};

/// How often the sweeper runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The subdirectory of the pin directory where the links are pinned.
pub const LINKS_DIR: &str = "links";

/// Errors of the forward path's set-up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "--forward-ports {min}-{max} overlaps the node's ephemeral port range {eph_min}-{eph_max} (net.ipv4.ip_local_port_range): choose NAT ports outside it"
    )]
    PortsOverlap {
        min: u16,
        max: u16,
        eph_min: u16,
        eph_max: u16,
    },
    #[error("--forward-ports {0:?}: expected MIN-MAX with 1024 <= MIN <= MAX <= 65535")]
    BadPorts(String),
    #[error("{path}: {source}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching gw_fwd to {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program gw_fwd: {0}")]
    Program(#[source] aya::programs::ProgramError),
    #[error(transparent)]
    Map(#[from] MapOpError),
}

/// Timeouts of the connection table, by state. A closed connection's entries are kept
/// briefly so that its last segments (the final ACK, a retransmitted FIN) are still
/// translated; its NAT port is free again after that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A connection whose handshake is not complete: the backend has not answered the
    /// SYN, or the client has not acknowledged the answer.
    pub syn: Duration,
    /// An established connection (also half-closed) without any segment.
    pub idle: Duration,
    /// A connection after a FIN each way.
    pub closing: Duration,
    /// A connection after a RST.
    pub reset: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            syn: Duration::from_mins(1),
            idle: Duration::from_hours(1),
            closing: Duration::from_secs(2),
            reset: Duration::from_secs(1),
        }
    }
}

/// The forward path's run-time settings.
#[derive(Clone, Debug)]
pub struct ForwardOptions {
    /// Connection table timeouts.
    pub timeouts: Timeouts,
    /// How long the connections of a removed listener may run.
    pub drain: Duration,
    /// Leave the links pinned when the agent stops (connections keep flowing).
    pub keep_pins: bool,
    /// Where the records of the connections the sweeper removes go.
    pub access: Arc<Sink>,
    /// The desired state the records are named from (listener, route, backendRef).
    pub names: Option<watch::Receiver<Arc<DesiredState>>>,
}

/// Parses `MIN-MAX`.
pub fn parse_ports(s: &str) -> Result<(u16, u16), ForwardError> {
    let bad = || ForwardError::BadPorts(s.to_owned());
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (min, max): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if min < 1024 || min > max {
        return Err(bad());
    }
    Ok((min, max))
}

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The ranges of a `ip_local_reserved_ports` value (`a,b-c,...`).
fn reserved_ranges(v: &str) -> Vec<(u16, u16)> {
    v.trim()
        .split(',')
        .filter_map(|r| {
            let r = r.trim();
            match r.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => r.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

/// Checks that `min..=max` is outside the ephemeral range and reserves it (in this
/// network namespace) so no local socket binds a NAT port. Returns whether it added
/// the reservation.
pub fn reserve_ports(min: u16, max: u16) -> Result<bool, ForwardError> {
    let range = fs::read_to_string(PORT_RANGE).map_err(|source| ForwardError::Sysctl {
        path: PORT_RANGE,
        source,
    })?;
    let mut it = range
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    if let (Some(eph_min), Some(eph_max)) = (it.next(), it.next())
        && min <= eph_max
        && eph_min <= max
    {
        return Err(ForwardError::PortsOverlap {
            min,
            max,
            eph_min,
            eph_max,
        });
    }
    let current = fs::read_to_string(RESERVED).map_err(|source| ForwardError::Sysctl {
        path: RESERVED,
        source,
    })?;
    let ranges = reserved_ranges(&current);
    if ranges.iter().any(|&(a, b)| a <= min && max <= b) {
        return Ok(false);
    }
    let value = if current.trim().is_empty() {
        format!("{min}-{max}")
    } else {
        format!("{},{min}-{max}", current.trim())
    };
    fs::write(RESERVED, value).map_err(|source| ForwardError::Sysctl {
        path: RESERVED,
        source,
    })?;
    info!(ports = %format!("{min}-{max}"), "NAT ports reserved (net.ipv4.ip_local_reserved_ports)");
    Ok(true)
}

/// The `GW_FWD_ADDRS` key of an address.
pub fn node_addr(ip: IpAddr) -> NodeAddr {
    NodeAddr::from(ip)
}

/// What a sweep found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Connections in the table after the sweep.
    pub live: usize,
    /// Connections removed.
    pub removed: usize,
}

/// The key of the other direction's entry of `f` (as the program computes it).
pub fn reverse_key(f: &Flow) -> FlowKey {
    FlowKey {
        src_be: f.new_dst_be,
        dst_be: f.new_src_be,
        sport: f.new_dport,
        dport: f.new_sport,
        _pad: 0,
    }
}

/// The timeout that applies to a connection whose client entry is `c` and backend
/// entry is `b`.
pub fn timeout_of(c: &Flow, b: Option<&Flow>, t: &Timeouts) -> Duration {
    let bs = b.map_or(0, |b| b.state);
    let both = c.state | bs;
    if both & FLOW_S_RST != 0 {
        t.reset
    } else if c.state & FLOW_S_FIN != 0 && bs & FLOW_S_FIN != 0 {
        t.closing
    } else if bs & FLOW_S_SYN == 0 || c.state & FLOW_S_ACK == 0 {
        // The handshake is not complete: the backend has not answered, or the client
        // never acknowledged the answer (a spoofed SYN, a client gone).
        t.syn
    } else {
        t.idle
    }
}

/// The entries to remove from `flows` at monotonic time `now_ns`: connections past
/// their timeout, connections of the listeners in `expired` (drained), and backend
/// entries that no client entry points to (left by a retried connect) once they are
/// `closing` old.
pub fn expired(
    flows: &[(FlowKey, Flow)],
    now_ns: u64,
    t: &Timeouts,
    drained: &BTreeSet<u16>,
) -> (Vec<FlowKey>, usize, usize) {
    let by_key: BTreeMap<FlowKey, &Flow> = flows.iter().map(|(k, f)| (*k, f)).collect();
    let mut remove = Vec::new();
    let mut owned = BTreeSet::new();
    let (mut live, mut removed) = (0, 0);
    for (k, c) in flows {
        if u32::from(c.direction) != DIR_CLIENT_TO_BACKEND {
            continue;
        }
        let rk = reverse_key(c);
        let b = by_key.get(&rk).copied();
        owned.insert(rk);
        let last = b.map_or(c.last_seen_ns, |b| b.last_seen_ns.max(c.last_seen_ns));
        let quiet = Duration::from_nanos(now_ns.saturating_sub(last));
        if quiet > timeout_of(c, b, t) || drained.contains(&c.listener_port) {
            remove.push(*k);
            if b.is_some() {
                remove.push(rk);
            }
            removed += 1;
        } else {
            live += 1;
        }
    }
    for (k, b) in flows {
        if u32::from(b.direction) == DIR_CLIENT_TO_BACKEND || owned.contains(k) {
            continue;
        }
        if Duration::from_nanos(now_ns.saturating_sub(b.last_seen_ns)) > t.closing {
            remove.push(*k);
        }
    }
    (remove, live, removed)
}

/// How a connection the sweeper removes ended: client entry `c`, backend entry `b`;
/// `drained` when its listener's drain timeout ran out.
///
/// A RST on a connection whose backend never answered the SYN is a failed connect:
/// the program sets `FLOW_S_RST` on the client's entry when it resets the client after
/// the last attempt (the backend's entry is gone by then), and a backend's RST to the
/// SYN leaves its entry with `FLOW_S_RST` and no `FLOW_S_SYN`.
pub fn end_reason(c: &Flow, b: Option<&Flow>, drained: bool) -> EndReason {
    let bs = b.map_or(0, |b| b.state);
    if bs & FLOW_S_SYN == 0 && (c.state | bs) & FLOW_S_RST != 0 {
        EndReason::ConnectFailed
    } else if c.state & FLOW_S_RST != 0 {
        EndReason::ClientReset
    } else if bs & FLOW_S_RST != 0 {
        EndReason::BackendReset
    } else if c.state & FLOW_S_FIN != 0 && bs & FLOW_S_FIN != 0 {
        EndReason::Fin
    } else if drained {
        EndReason::Drained
    } else if bs & FLOW_S_SYN == 0 || c.state & FLOW_S_ACK == 0 {
        EndReason::HandshakeTimeout
    } else {
        EndReason::IdleTimeout
    }
}

fn addr_of(be: [u8; 16], port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(std::net::Ipv6Addr::from(be).to_canonical(), port)
}

/// The access log record of a connection removed from the table (client key `k`,
/// entries `c` and `b`) at monotonic time `now_ns`. Its bytes are payload bytes, as
/// the program counts them; the segments are counted each way.
pub fn record_of(k: &FlowKey, c: &Flow, b: Option<&Flow>, end: EndReason, now_ns: u64) -> Record {
    let last = b.map_or(c.last_seen_ns, |b| b.last_seen_ns.max(c.last_seen_ns));
    let wall = std::time::SystemTime::now();
    let ago = |ns: u64| wall - Duration::from_nanos(now_ns.saturating_sub(ns));
    Record {
        time: rfc3339(ago(last)),
        start_time: rfc3339(ago(c.created_ns)),
        duration_seconds: Duration::from_nanos(last.saturating_sub(c.created_ns)).as_secs_f64(),
        listener: ListenerRef {
            gateway: None,
            listener: String::new(),
            port: c.listener_port,
            route: None,
        },
        client: addr_of(k.src_be, k.sport),
        backend: Some(addr_of(c.new_dst_be, c.new_dport)),
        backend_ref: None,
        endpoint_slice: None,
        datapath: PathName::Forward,
        bytes_client_to_backend: c.bytes,
        bytes_backend_to_client: b.map_or(0, |b| b.bytes),
        segments_client_to_backend: Some(c.packets),
        segments_backend_to_client: Some(b.map_or(0, |b| b.packets)),
        end,
        detail: (end == EndReason::ConnectFailed)
            .then(|| format!("no connect succeeded ({} attempts)", c.attempts)),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t) } != 0 {
        return 0;
    }
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// The connection table sweeper's memory: since when each removed listener drains.
#[derive(Debug, Default)]
pub struct Sweeper {
    gone_since: BTreeMap<u16, Instant>,
    /// The desired state its records are named from.
    pub names: Option<watch::Receiver<Arc<DesiredState>>>,
}

impl Sweeper {
    /// One sweep of `dp`'s table; each connection removed that the program did not
    /// report (see [`events`]) gets its record in `access`.
    pub fn sweep(&mut self, dp: &Datapath, t: &Timeouts, drain: Duration, access: &Sink) -> Sweep {
        let flows = dp.flows();
        let listeners: BTreeSet<u16> = dp.listener_keys().iter().map(|k| k.port).collect();
        let ports: BTreeSet<u16> = flows.iter().map(|(_, f)| f.listener_port).collect();
        let now = Instant::now();
        self.gone_since
            .retain(|p, _| !listeners.contains(p) && ports.contains(p));
        for p in ports.difference(&listeners) {
            self.gone_since.entry(*p).or_insert_with(|| {
                info!(
                    listener = p,
                    drain_secs = drain.as_secs_f64(),
                    "forwarded connections of a removed listener drain"
                );
                now
            });
        }
        let drained: BTreeSet<u16> = self
            .gone_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= drain)
            .map(|(p, _)| *p)
            .collect();
        let now_ns = monotonic_ns();
        let (remove, live, removed) = expired(&flows, now_ns, t, &drained);
        if removed > 0 {
            let gone: BTreeSet<&FlowKey> = remove.iter().collect();
            let by_key: BTreeMap<&FlowKey, &Flow> = flows.iter().map(|(k, f)| (k, f)).collect();
            let desired = self.names.as_ref().map(|n| n.borrow().clone());
            for (k, c) in &flows {
                if u32::from(c.direction) != DIR_CLIENT_TO_BACKEND
                    || !gone.contains(k)
                    || c.state & FLOW_S_LOGGED != 0
                {
                    continue;
                }
                let b = by_key.get(&reverse_key(c)).copied();
                let end = end_reason(c, b, drained.contains(&c.listener_port));
                let mut r = record_of(k, c, b, end, now_ns);
                if let Some(d) = &desired {
                    r.name_from(d);
                }
                access.end(r);
            }
        }
        if !remove.is_empty() {
            debug!(
                entries = remove.len(),
                connections = removed,
                "connection table sweep"
            );
            dp.remove_flows(&remove);
        }
        Sweep { live, removed }
    }
}

/// The pin of `iface`'s link.
pub fn link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(LINKS_DIR).join(format!("fwd-{iface}"))
}

/// Sweeps `dp`'s connection table every [`SWEEP_EVERY`] until `shutdown`.
pub async fn sweep_until(
    dp: Arc<Datapath>,
    timeouts: Timeouts,
    drain: Duration,
    access: Arc<Sink>,
    names: Option<watch::Receiver<Arc<DesiredState>>>,
    shutdown: CancellationToken,
) {
    let mut sweeper = Sweeper {
        names,
        ..Sweeper::default()
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        sweeper.sweep(&dp, &timeouts, drain, &access);
    }
}

#[cfg(test)]
mod tests;
