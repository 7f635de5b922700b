//! Which backend addresses the node may be made to reach.
//!
//! The agent runs in the host network: a backend on loopback, link-local (the cloud
//! metadata endpoint `169.254.169.254`), an unspecified or a multicast address would
//! let whoever can write a Service, an `EndpointSlice` and a `TCPRoute` reach the
//! node's own services through the gateway. Those ranges are refused unless
//! `--allow-backend-cidr` allows them; a refused endpoint is never programmed.
//!
//! [`BackendFilter`] is plain data handed to the model through its parameters and to
//! the `--route` table; [`RefusalLog`] tells the agent which refusals are new, so each
//! is logged once. See `docs/gateway-api.md`, "Refused backend addresses".
use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::xdp::Cidr;

/// The flag that allows refused ranges, for messages.
pub const ALLOW_FLAG: &str = "--allow-backend-cidr";

/// Why a backend address is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// `0.0.0.0/8` ("this network"; Linux connects `0.0.0.0` to the node itself) or
    /// `::`.
    Unspecified,
    /// `127.0.0.0/8` or `::1`: the node's own services.
    Loopback,
    /// `169.254.0.0/16` (cloud metadata endpoints) or `fe80::/10`.
    LinkLocal,
    /// `224.0.0.0/4` or `ff00::/8`.
    Multicast,
}

impl RefusalReason {
    /// Every reason, in a fixed order (metric labels are written for each).
    pub const ALL: [Self; 4] = [
        Self::Unspecified,
        Self::Loopback,
        Self::LinkLocal,
        Self::Multicast,
    ];

    /// The reason as a metric label and log field: `loopback`, `link_local`, ...
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::LinkLocal => "link_local",
            Self::Multicast => "multicast",
        }
    }

    /// Why, in words: `loopback address`, ...
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified address",
            Self::Loopback => "loopback address",
            Self::LinkLocal => "link-local address",
            Self::Multicast => "multicast address",
        }
    }

    /// The reason `ip` belongs to a refused range, if it does. An IPv4-mapped IPv6
    /// address (`::ffff:127.0.0.1`) is judged as the IPv4 address it maps.
    pub fn of(ip: IpAddr) -> Option<Self> {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                if a.octets()[0] == 0 {
                    Some(Self::Unspecified)
                } else if a.is_loopback() {
                    Some(Self::Loopback)
                } else if a.is_link_local() {
                    Some(Self::LinkLocal)
                } else if a.is_multicast() {
                    Some(Self::Multicast)
                } else {
                    None
                }
            }
            IpAddr::V6(a) => {
                if a.is_unspecified() {
                    Some(Self::Unspecified)
                } else if a.is_loopback() {
                    Some(Self::Loopback)
                } else if a.segments()[0] & 0xffc0 == 0xfe80 {
                    Some(Self::LinkLocal)
                } else if a.is_multicast() {
                    Some(Self::Multicast)
                } else {
                    None
                }
            }
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The backend addresses the agent programs: everything but the refused ranges, plus
/// the ranges `--allow-backend-cidr` allows. The default refuses every range of
/// [`RefusalReason`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendFilter {
    allowed: BTreeSet<Cidr>,
}

impl BackendFilter {
    /// A filter that also allows `allowed` (the `--allow-backend-cidr` values).
    pub fn allowing(allowed: impl IntoIterator<Item = Cidr>) -> Self {
        Self {
            allowed: allowed.into_iter().collect(),
        }
    }

    /// The ranges allowed on top of the default.
    pub fn allowed(&self) -> impl Iterator<Item = &Cidr> {
        self.allowed.iter()
    }

    /// `Err(reason)` when `ip` is in a refused range that no allowed range covers. An
    /// allowed range covers an IPv4-mapped address when it covers either form.
    pub fn check(&self, ip: IpAddr) -> Result<(), RefusalReason> {
        let Some(reason) = RefusalReason::of(ip) else {
            return Ok(());
        };
        let canonical = ip.to_canonical();
        if self
            .allowed
            .iter()
            .any(|c| c.contains(ip) || c.contains(canonical))
        {
            Ok(())
        } else {
            Err(reason)
        }
    }
}

/// One endpoint left out of the data path, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedBackend {
    /// The backendRef it comes from (`namespace/service:port`).
    pub backend_ref: String,
    /// The endpoint.
    pub address: SocketAddr,
    /// Why it is refused.
    pub reason: RefusalReason,
}

/// The refusals already logged, so that each distinct one is logged when it appears
/// and when it goes, not on every reconcile.
#[derive(Debug, Default)]
pub struct RefusalLog {
    seen: BTreeSet<RefusedBackend>,
}

impl RefusalLog {
    /// Takes the refusals of a new desired state; returns those that are new and those
    /// that are gone since the last call.
    pub fn update(&mut self, now: &[RefusedBackend]) -> (Vec<RefusedBackend>, Vec<RefusedBackend>) {
        let now: BTreeSet<RefusedBackend> = now.iter().cloned().collect();
        let added = now.difference(&self.seen).cloned().collect();
        let gone = self.seen.difference(&now).cloned().collect();
        self.seen = now;
        (added, gone)
    }

    /// [`update`](Self::update), logging each new refusal at warn level and each
    /// refusal gone at info level.
    pub fn log(&mut self, now: &[RefusedBackend]) {
        let (added, gone) = self.update(now);
        for r in added {
            tracing::warn!(
                backend_ref = %r.backend_ref,
                endpoint = %r.address,
                reason = %r.reason,
                "backend endpoint refused: not programmed (allow it with {ALLOW_FLAG})"
            );
        }
        for r in gone {
            tracing::info!(
                backend_ref = %r.backend_ref,
                endpoint = %r.address,
                reason = %r.reason,
                "backend endpoint no longer refused"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn special_ranges_are_refused_by_default() {
        let f = BackendFilter::default();
        for (addr, want) in [
            ("127.0.0.1", RefusalReason::Loopback),
            ("127.255.0.9", RefusalReason::Loopback),
            ("::1", RefusalReason::Loopback),
            ("::ffff:127.0.0.1", RefusalReason::Loopback),
            ("169.254.169.254", RefusalReason::LinkLocal),
            ("::ffff:169.254.169.254", RefusalReason::LinkLocal),
            ("fe80::1", RefusalReason::LinkLocal),
            ("febf::1", RefusalReason::LinkLocal),
            ("0.0.0.0", RefusalReason::Unspecified),
            ("0.1.2.3", RefusalReason::Unspecified),
            ("::", RefusalReason::Unspecified),
            ("::ffff:0.0.0.0", RefusalReason::Unspecified),
            ("224.0.0.1", RefusalReason::Multicast),
            ("239.255.255.250", RefusalReason::Multicast),
            ("ff02::1", RefusalReason::Multicast),
        ] {
            assert_eq!(f.check(ip(addr)), Err(want), "{addr}");
        }
    }

    #[test]
    fn ordinary_addresses_pass() {
        let f = BackendFilter::default();
        for addr in [
            "10.200.1.2",
            "192.0.2.1",
            "1.0.0.1",
            "126.255.255.255",
            "128.0.0.1",
            "169.253.255.255",
            "223.255.255.255",
            "fd00::1",
            "2001:db8::1",
            "fec0::1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(f.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allowed_ranges_pass_in_both_forms() {
        let f = BackendFilter::allowing(["127.0.0.0/8".parse().expect("cidr")]);
        assert_eq!(f.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(f.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(f.check(ip("::1")), Err(RefusalReason::Loopback));
        assert_eq!(
            f.check(ip("169.254.169.254")),
            Err(RefusalReason::LinkLocal)
        );
        let f = BackendFilter::allowing(["169.254.169.254/32".parse().expect("cidr")]);
        assert_eq!(f.check(ip("169.254.169.254")), Ok(()));
        assert_eq!(
            f.check(ip("169.254.169.253")),
            Err(RefusalReason::LinkLocal)
        );
    }

    #[test]
    fn refusal_log_reports_each_refusal_once() {
        let r = |a: &str| RefusedBackend {
            backend_ref: "default/etcd:2379".into(),
            address: a.parse().expect("addr"),
            reason: RefusalReason::Loopback,
        };
        let mut log = RefusalLog::default();
        let (added, gone) = log.update(&[r("127.0.0.1:2379")]);
        assert_eq!((added.len(), gone.len()), (1, 0));
        assert_eq!(log.update(&[r("127.0.0.1:2379")]), (vec![], vec![]));
        let (added, gone) = log.update(&[r("127.0.0.1:2379"), r("127.0.0.2:2379")]);
        assert_eq!(added, [r("127.0.0.2:2379")]);
        assert!(gone.is_empty());
        let (added, gone) = log.update(&[]);
        assert!(added.is_empty());
        assert_eq!(gone.len(), 2);
    }
}
