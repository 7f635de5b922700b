//! The data path's capacities ([`Limits`]) and the decision of what fits them.
//!
//! The maps are sized at load time (`--max-listeners`, `--max-backends`; see
//! [`crate::ebpf::LoadOptions`]), and the model is told the same sizes, so it decides
//! here, before any map write, what is programmed and what is left out:
//!
//! * listeners are taken in a fixed order (Gateways oldest first, then each Gateway's
//!   listeners in `spec.listeners` order; the `--route` table by port): a listener is
//!   programmed while `GW_LISTENERS` has room and its entries fit in what is left of
//!   `GW_BACKENDS`; the others are left out ([`LeftOut`]), whole: never served, and
//!   their status says so (`Programmed=False`). A later listener with fewer entries
//!   may still fit where an earlier one did not.
//! * a listener holds at most `backends_per_listener` entries: each backendRef with a
//!   weight keeps the first `backends_per_listener / backendRefs` of its endpoints
//!   (in address order), the rest are left out and the route's `ResolvedRefs` says so.
//!
//! * a listener whose port is outside the node's allowed listener ports
//!   ([`ListenerPorts`], `--listener-ports`) is not accepted (`PortUnavailable`) and
//!   left out ([`Limit::ListenerPorts`]): a tenant's Gateway cannot take the node's
//!   SSH, kubelet or metrics port.
//!
//! Pure: `sockgate check` shows the same decision as the agent. See
//! `docs/operations.md`, "Limits".
use std::{fmt, net::SocketAddr, str::FromStr};

use gateway_common::{MAX_BACKENDS, MAX_BACKENDS_PER_LISTENER, MAX_LISTENERS};
use serde::{Deserialize, Serialize};

use super::backends::{ResolvedRef, per_ref};
use crate::desired::DesiredState;

/// The flag that sizes `GW_LISTENERS` (and the other per-listener maps).
pub const LISTENERS_FLAG: &str = "--max-listeners";
/// The flag that sizes `GW_BACKENDS`.
pub const BACKENDS_FLAG: &str = "--max-backends";
/// The flag that bounds the entries of one listener.
pub const PER_LISTENER_FLAG: &str = "--max-backends-per-listener";
/// The flag that sets the listener ports this node allows.
pub const LISTENER_PORTS_FLAG: &str = "--listener-ports";

/// Fewest entries a listener may be limited to: the most backendRefs a TCPRoute rule
/// may have (Gateway API `maxItems`), so every backendRef keeps one entry.
pub const MIN_PER_LISTENER: u32 = 16;

/// Endpoints named in a `ResolvedRefs` message about endpoints left out; the others
/// are counted.
pub const LEFT_OUT_LISTED: usize = 4;

/// Capacities of the data path's maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Listeners programmed at most (`GW_LISTENERS`; `--max-listeners`).
    pub listeners: u32,
    /// Backend entries of all listeners together at most (`GW_BACKENDS`;
    /// `--max-backends`).
    pub backends: u32,
    /// Backend entries of one listener at most, `MIN_PER_LISTENER..=256` (the forward
    /// program's selection table stores an index as a `u8`;
    /// `--max-backends-per-listener`).
    pub backends_per_listener: u32,
    /// The listener ports this node allows (`--listener-ports`, default all); a
    /// listener on another port is not accepted.
    #[serde(default)]
    pub listener_ports: ListenerPorts,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            listeners: MAX_LISTENERS,
            backends: MAX_BACKENDS,
            backends_per_listener: MAX_BACKENDS_PER_LISTENER,
            listener_ports: ListenerPorts::default(),
        }
    }
}

/// The listener ports a node allows, `MIN-MAX` inclusive (`--listener-ports`); by
/// default every port, 1-65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerPorts {
    /// Lowest allowed port, at least 1.
    pub min: u16,
    /// Highest allowed port, at least `min`.
    pub max: u16,
}

impl Default for ListenerPorts {
    fn default() -> Self {
        Self {
            min: 1,
            max: u16::MAX,
        }
    }
}

impl ListenerPorts {
    /// Whether `port` is allowed.
    pub fn contains(self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }

    /// Whether every port is allowed (the default).
    pub fn is_all(self) -> bool {
        self == Self::default()
    }
}

impl fmt::Display for ListenerPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// A `--listener-ports` value that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {LISTENER_PORTS_FLAG} {value:?}: expected MIN-MAX with 1 <= MIN <= MAX <= 65535, e.g. 1024-32767"
)]
pub struct ListenerPortsError {
    /// The value given.
    pub value: String,
}

impl FromStr for ListenerPorts {
    type Err = ListenerPortsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ListenerPortsError {
            value: s.to_owned(),
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let min: u16 = a.trim().parse().map_err(|_| bad())?;
        let max: u16 = b.trim().parse().map_err(|_| bad())?;
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(Self { min, max })
    }
}

impl Limits {
    /// The limits with `backends_per_listener` in `MIN_PER_LISTENER..=256` and the
    /// others at least 1 (a map cannot have 0 entries).
    #[must_use]
    pub fn clamped(self) -> Self {
        Self {
            listeners: self.listeners.max(1),
            backends: self.backends.max(1),
            backends_per_listener: self
                .backends_per_listener
                .clamp(MIN_PER_LISTENER, MAX_BACKENDS_PER_LISTENER),
            listener_ports: self.listener_ports,
        }
    }
}

/// Which limit left something out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// `GW_LISTENERS` is full: the listener is not programmed.
    Listeners,
    /// `GW_BACKENDS` has no room for the listener's entries: the listener is not
    /// programmed.
    Backends,
    /// The listener holds `backends_per_listener` entries: endpoints of a backendRef
    /// are left out (the listener is programmed with the others).
    BackendsPerListener,
    /// The listener's port is outside `--listener-ports`: the listener is not accepted.
    ListenerPorts,
}

impl Limit {
    /// Every limit, in a fixed order (metric labels are written for each).
    pub const ALL: [Self; 4] = [
        Self::Listeners,
        Self::Backends,
        Self::BackendsPerListener,
        Self::ListenerPorts,
    ];

    /// The limit as a metric label and log field.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Listeners => "listeners",
            Self::Backends => "backends",
            Self::BackendsPerListener => "backends_per_listener",
            Self::ListenerPorts => "listener_ports",
        }
    }

    /// What is reached, in words.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Listeners => "listener table full",
            Self::Backends => "backend table full",
            Self::BackendsPerListener => "too many backend entries for one listener",
            Self::ListenerPorts => "listener port not allowed",
        }
    }

    /// The flag that raises it.
    pub const fn flag(self) -> &'static str {
        match self {
            Self::Listeners => LISTENERS_FLAG,
            Self::Backends => BACKENDS_FLAG,
            Self::BackendsPerListener => PER_LISTENER_FLAG,
            Self::ListenerPorts => LISTENER_PORTS_FLAG,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something of the desired state left out because a limit is reached.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeftOut {
    /// The limit reached.
    pub limit: Limit,
    /// The listener's port.
    pub port: u16,
    /// The listener (`namespace/gateway/listener`, or `--route PORT`).
    pub listener: String,
    /// The backendRef whose endpoints are left out ([`Limit::BackendsPerListener`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ref: Option<String>,
    /// Endpoints left out ([`Limit::BackendsPerListener`]), or the backend entries
    /// the listener needed (the listener table limits); 0 for
    /// [`Limit::ListenerPorts`].
    pub count: u32,
    /// What happened, for logs and status.
    pub message: String,
}

/// What is left of the maps while listeners are taken in order.
#[derive(Clone, Debug)]
pub struct Budget {
    limits: Limits,
    listeners: u32,
    backends: u32,
}

impl Budget {
    /// The whole capacity of `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: limits.clamped(),
            listeners: 0,
            backends: 0,
        }
    }

    /// The limits this budget spends.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes room for listener `port` (`origin`) with `entries` backend entries, or
    /// says why it does not fit (and takes nothing).
    pub fn take(&mut self, port: u16, origin: &str, entries: usize) -> Result<(), LeftOut> {
        let entries = u32::try_from(entries).unwrap_or(u32::MAX);
        let left = |limit: Limit, message: String| LeftOut {
            limit,
            port,
            listener: origin.to_owned(),
            backend_ref: None,
            count: entries,
            message,
        };
        if self.listeners >= self.limits.listeners {
            return Err(left(
                Limit::Listeners,
                format!(
                    "not programmed: the node's listener table is full ({} listeners; raise {LISTENERS_FLAG})",
                    self.limits.listeners
                ),
            ));
        }
        if entries > self.limits.backends_per_listener {
            return Err(left(
                Limit::BackendsPerListener,
                format!(
                    "not programmed: {entries} backend entries, a listener holds at most {} ({PER_LISTENER_FLAG})",
                    self.limits.backends_per_listener
                ),
            ));
        }
        let free = self.limits.backends - self.backends.min(self.limits.backends);
        if entries > free {
            return Err(left(
                Limit::Backends,
                format!(
                    "not programmed: the node's backend table is full ({entries} entries needed, {free} of {} free; raise {BACKENDS_FLAG})",
                    self.limits.backends
                ),
            ));
        }
        self.listeners += 1;
        self.backends += entries;
        Ok(())
    }
}

/// Listener `port` (`origin`) left out because `ports` does not allow it; `None`
/// when it is allowed.
pub fn port_not_allowed(port: u16, origin: &str, ports: ListenerPorts) -> Option<LeftOut> {
    (!ports.contains(port)).then(|| LeftOut {
        limit: Limit::ListenerPorts,
        port,
        listener: origin.to_owned(),
        backend_ref: None,
        count: 0,
        message: port_message(port, ports),
    })
}

/// Why listener port `port` is not accepted under `ports`.
pub fn port_message(port: u16, ports: ListenerPorts) -> String {
    format!(
        "port {port} is outside the listener ports this node allows ({ports}; {LISTENER_PORTS_FLAG})"
    )
}

/// Endpoints of one backendRef left out of a listener of at most `per_listener`
/// entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncated {
    /// The backendRef (`namespace/name:port`).
    pub backend_ref: String,
    /// Its ready, allowed endpoints.
    pub endpoints: usize,
    /// Those programmed (the first, in address order).
    pub kept: usize,
    /// Those left out.
    pub left_out: Vec<SocketAddr>,
}

impl Truncated {
    /// One sentence for a `ResolvedRefs` message or a log line.
    pub fn describe(&self, per_listener: u32) -> String {
        let mut named: Vec<String> = self
            .left_out
            .iter()
            .take(LEFT_OUT_LISTED)
            .map(ToString::to_string)
            .collect();
        if self.left_out.len() > LEFT_OUT_LISTED {
            named.push(format!("{} more", self.left_out.len() - LEFT_OUT_LISTED));
        }
        format!(
            "backendRef {} has {} ready endpoints, {} programmed; {} left out ({}): a listener holds at most {per_listener} endpoints ({PER_LISTENER_FLAG}), shared by its backendRefs",
            self.backend_ref,
            self.endpoints,
            self.kept,
            self.left_out.len(),
            named.join(", "),
        )
    }
}

/// The backendRefs of `refs` whose endpoints do not all fit a listener of at most
/// `per_listener` entries, as [`super::backends::spread_within`] leaves them out.
pub fn truncated(refs: &[ResolvedRef], per_listener: u32) -> Vec<Truncated> {
    let keep = per_ref(refs, per_listener);
    refs.iter()
        .filter(|r| r.weight > 0)
        .filter_map(|r| {
            let eps = r.target.as_ref().ok()?;
            (eps.len() > keep).then(|| Truncated {
                backend_ref: r.label.clone(),
                endpoints: eps.len(),
                kept: keep,
                left_out: eps[keep..].to_vec(),
            })
        })
        .collect()
}

/// Fits a desired state that did not come from the model (the `--route` table):
/// listeners on allowed ports by port while they fit, the others left out (recorded in
/// `desired.left_out`).
pub fn fit(desired: &mut DesiredState, limits: Limits) {
    let mut budget = Budget::new(limits);
    let mut left = Vec::new();
    desired.listeners.retain(|&port, l| {
        let taken = match port_not_allowed(port, &l.origin, limits.listener_ports) {
            Some(out) => Err(out),
            None => budget.take(port, &l.origin, l.backends.len()),
        };
        match taken {
            Ok(()) => true,
            Err(out) => {
                left.push(out);
                false
            }
        }
    });
    desired.left_out.extend(left);
    desired.left_out.sort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Backend, Listener};

    fn limits(listeners: u32, backends: u32) -> Limits {
        Limits {
            listeners,
            backends,
            backends_per_listener: MIN_PER_LISTENER,
            listener_ports: ListenerPorts::default(),
        }
    }

    #[test]
    fn listener_ports_parse_and_contain() {
        let p: ListenerPorts = "1024-32767".parse().expect("parses");
        assert_eq!((p.min, p.max), (1024, 32767));
        assert!(p.contains(1024) && p.contains(32767) && p.contains(8080));
        assert!(!p.contains(1023) && !p.contains(32768) && !p.contains(22));
        assert_eq!(p.to_string(), "1024-32767");
        assert!(!p.is_all());
        assert!(ListenerPorts::default().is_all());
        assert!(ListenerPorts::default().contains(1) && ListenerPorts::default().contains(65535));
        let one: ListenerPorts = " 9000 - 9000 ".parse().expect("one port");
        assert!(one.contains(9000) && !one.contains(9001));
        for bad in ["", "80", "0-80", "90-80", "1-65536", "a-b", "1024-"] {
            let e = bad.parse::<ListenerPorts>().expect_err(bad);
            assert!(e.to_string().contains(LISTENER_PORTS_FLAG), "{e}");
        }
    }

    #[test]
    fn fit_leaves_out_route_listeners_outside_the_allowed_ports() {
        let mut d = DesiredState::default();
        for port in [22, 8080, 9000] {
            d.listeners.insert(
                port,
                Listener {
                    port,
                    origin: format!("--route {port}"),
                    ..Listener::default()
                },
            );
        }
        let allowed = Limits {
            listener_ports: "8000-8999".parse().expect("range"),
            ..Limits::default()
        };
        fit(&mut d, allowed);
        assert_eq!(d.listeners.keys().copied().collect::<Vec<_>>(), [8080]);
        let out: Vec<(u16, Limit)> = d.left_out.iter().map(|l| (l.port, l.limit)).collect();
        assert_eq!(
            out,
            [(22, Limit::ListenerPorts), (9000, Limit::ListenerPorts)]
        );
        assert_eq!(
            d.left_out[0].message,
            "port 22 is outside the listener ports this node allows (8000-8999; --listener-ports)"
        );
        assert_eq!(d.left_out[0].count, 0);
    }

    #[test]
    fn budget_takes_listeners_in_order_until_a_map_is_full() {
        let mut b = Budget::new(limits(2, 10));
        assert_eq!(b.take(1, "a", 4), Ok(()));
        let e = b.take(2, "b", 7).expect_err("7 > 6 free");
        assert_eq!(e.limit, Limit::Backends);
        assert_eq!(e.count, 7);
        assert!(e.message.contains("6 of 10 free"), "{}", e.message);
        assert!(e.message.contains(BACKENDS_FLAG), "{}", e.message);
        // A smaller listener after it still fits.
        assert_eq!(b.take(3, "c", 6), Ok(()));
        let e = b.take(4, "d", 0).expect_err("table full");
        assert_eq!(e.limit, Limit::Listeners);
        assert!(e.message.contains(LISTENERS_FLAG), "{}", e.message);
        let e = Budget::new(limits(5, 100))
            .take(5, "e", 17)
            .expect_err("over the per-listener limit");
        assert_eq!(e.limit, Limit::BackendsPerListener);
    }

    #[test]
    fn limits_are_clamped() {
        let l = Limits {
            listeners: 0,
            backends: 0,
            backends_per_listener: 1000,
            listener_ports: ListenerPorts::default(),
        }
        .clamped();
        assert_eq!((l.listeners, l.backends), (1, 1));
        assert_eq!(l.backends_per_listener, MAX_BACKENDS_PER_LISTENER);
        assert_eq!(
            Limits {
                backends_per_listener: 2,
                ..Limits::default()
            }
            .clamped()
            .backends_per_listener,
            MIN_PER_LISTENER
        );
    }

    fn eps(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 80)))
            .collect()
    }

    fn r(label: &str, weight: u32, n: usize) -> ResolvedRef {
        ResolvedRef {
            label: label.into(),
            weight,
            target: Ok(eps(n)),
            refused: Vec::new(),
            refusal: None,
            slices: std::collections::BTreeMap::new(),
        }
    }

    #[test]
    fn truncation_names_what_spread_leaves_out() {
        let refs = [r("big", 1, 300), r("small", 1, 3), r("zero", 0, 400)];
        let t = truncated(&refs, 256);
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].backend_ref, "big");
        assert_eq!(
            (t[0].endpoints, t[0].kept, t[0].left_out.len()),
            (300, 128, 172)
        );
        assert_eq!(t[0].left_out[0], eps(300)[128]);
        let spread = super::super::backends::spread_within(&refs, 256);
        let kept = spread.iter().filter(|b| b.backend_ref == "big").count();
        assert_eq!(kept, t[0].kept);
        let text = t[0].describe(256);
        assert!(text.contains("172 left out"), "{text}");
        assert!(text.contains("168 more"), "{text}");
        assert!(text.contains(PER_LISTENER_FLAG), "{text}");
        // One backendRef of 300 endpoints: 256 programmed, 44 left out.
        let t = truncated(&[r("one", 1, 300)], 256);
        assert_eq!((t[0].kept, t[0].left_out.len()), (256, 44));
        assert!(truncated(&[r("fits", 1, 256)], 256).is_empty());
    }

    #[test]
    fn a_backend_ref_without_ready_endpoint_takes_no_room_on_the_listener() {
        // "unready" gives its share to "big": one entry-holding backendRef, so "big"
        // keeps the whole listener (16), not half of it.
        let refs = [r("big", 1, 20), r("unready", 1, 0)];
        let t = truncated(&refs, 16);
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!((t[0].kept, t[0].left_out.len()), (16, 4));
        let spread = super::super::backends::spread_within(&refs, 16);
        assert_eq!(spread.len(), 16);
        assert!(spread.iter().all(|b| b.backend_ref == "big"), "{spread:?}");
        // No backendRef with a ready endpoint: each keeps its refusing entry.
        let refs = [r("a", 1, 0), r("b", 1, 0)];
        assert!(truncated(&refs, 16).is_empty());
        let spread = super::super::backends::spread_within(&refs, 16);
        assert_eq!(spread.len(), 2);
        assert!(spread.iter().all(|b| b.addr.is_none()));
    }

    #[test]
    fn fit_keeps_the_route_table_in_port_order() {
        let mut d = DesiredState::default();
        for port in [30, 10, 20] {
            d.listeners.insert(
                port,
                Listener {
                    port,
                    addresses: Vec::new(),
                    origin: format!("--route {port}"),
                    backends: vec![
                        Backend {
                            addr: None,
                            weight: 1,
                            backend_ref: String::new(),
                            endpoint_slice: None,
                        };
                        2
                    ],
                    ..Listener::default()
                },
            );
        }
        fit(&mut d, limits(2, 100));
        assert_eq!(d.listeners.keys().copied().collect::<Vec<_>>(), [10, 20]);
        assert_eq!(d.left_out.len(), 1);
        assert_eq!(
            (d.left_out[0].port, d.left_out[0].limit),
            (30, Limit::Listeners)
        );
    }
}
