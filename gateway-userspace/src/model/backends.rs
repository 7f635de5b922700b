//! backendRef resolution (Service port -> ready EndpointSlice endpoints) and the
//! spreading of each backendRef's weight over its endpoints.
//!
//! The data path picks among *endpoints* with integer weights. The Gateway API weighs
//! *backendRefs*: a Service with ten endpoints and weight 1 gets the same share as a
//! Service with one endpoint and weight 1. [`spread`] turns backendRef weights into
//! endpoint weights so that every backendRef's total is exactly proportional to its
//! weight (see `docs/gateway-api.md`, "Weights").
//!
//! Endpoints whose address the [`BackendFilter`] refuses (loopback, link-local, ...)
//! are left out here, before any weight is spread: they are never programmed, and the
//! backendRef says so in `ResolvedRefs`.
//!
//! A backendRef that resolves but has no ready endpoint is decided for availability:
//! its share goes to the backendRefs of the rule that have ready endpoints, and only
//! when none has one are its connections refused. An invalid backendRef keeps refusing
//! its share, as the Gateway API requires.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use gateway_api::experimental::{
    referencegrants::ReferenceGrant, tcproutes::TcpRouteRulesBackendRefs,
};
use gateway_common::MAX_BACKENDS_PER_LISTENER;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    conditions::{GATEWAY_GROUP, KIND_SERVICE, KIND_TCP_ROUTE, SERVICE_NAME_LABEL, reasons},
    snapshot::{ObjectKey, namespace_of},
};
use crate::{
    backend_filter::{ALLOW_FLAG, BackendFilter, RefusalReason, RefusedBackend},
    desired::{Backend, UnreadyShare},
};

/// Largest factor endpoint weights are scaled by to keep backendRef shares exact.
pub const SCALE_CAP: u64 = 1024;

/// Refused endpoints named in one backendRef's `ResolvedRefs` message; the others are
/// counted (a condition message is limited to 32768 bytes).
pub const REFUSED_LISTED: usize = 4;

/// Why a backendRef does not resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefProblem {
    /// The `ResolvedRefs=False` reason.
    pub reason: &'static str,
    /// What is wrong, for the condition message.
    pub message: String,
}

/// One backendRef of a route, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRef {
    /// `namespace/name:port`, for logs and the programmed table.
    pub label: String,
    /// The backendRef's weight (default 1).
    pub weight: u32,
    /// Ready endpoints whose address is allowed, or why the backendRef is invalid.
    pub target: Result<Vec<SocketAddr>, RefProblem>,
    /// Ready endpoints left out because their address is refused.
    pub refused: Vec<RefusedBackend>,
    /// The `ResolvedRefs` problem the refused endpoints make (`RefNotPermitted`).
    pub refusal: Option<RefProblem>,
    /// The `EndpointSlice` (`namespace/name`) each endpoint of `target` was read from
    /// (the first, if several list it), for the access log.
    pub slices: BTreeMap<SocketAddr, String>,
}

impl ResolvedRef {
    /// Why the backendRef does not wholly resolve: it is invalid, or some of its
    /// endpoints are refused.
    pub fn problem(&self) -> Option<&RefProblem> {
        self.target.as_ref().err().or(self.refusal.as_ref())
    }

    /// Whether it has at least one ready endpoint whose address is allowed.
    pub fn has_ready_endpoint(&self) -> bool {
        self.target.as_ref().is_ok_and(|eps| !eps.is_empty())
    }

    /// Whether it is valid, takes a share (weight > 0), and has no ready endpoint: its
    /// share goes to the backendRefs with ready endpoints. A backendRef whose only ready
    /// endpoints are refused by address is not one of these: it is `RefNotPermitted`,
    /// and keeps its share as an invalid backendRef does.
    pub fn without_ready_endpoint(&self) -> bool {
        self.weight > 0 && self.refusal.is_none() && self.target.as_ref().is_ok_and(Vec::is_empty)
    }
}

/// The backendRefs of one rule that have no ready endpoint, and what becomes of their
/// share; `None` when every backendRef with a share has a ready endpoint or is invalid.
pub fn unready(refs: &[ResolvedRef]) -> Option<(Vec<&ResolvedRef>, UnreadyShare)> {
    let unready: Vec<&ResolvedRef> = refs.iter().filter(|r| r.without_ready_endpoint()).collect();
    if unready.is_empty() {
        return None;
    }
    let share = if refs.iter().any(|r| r.weight > 0 && r.has_ready_endpoint()) {
        UnreadyShare::Moved
    } else {
        UnreadyShare::Refused
    };
    Some((unready, share))
}

/// A Service's ready endpoints, split by the [`BackendFilter`].
#[derive(Debug, Default)]
struct Endpoints {
    allowed: BTreeSet<SocketAddr>,
    refused: BTreeSet<(SocketAddr, RefusalReason)>,
    /// The slice each allowed endpoint was first read from (`namespace/name`).
    slices: BTreeMap<SocketAddr, String>,
}

/// The `ResolvedRefs=False` problem of `refused` endpoints of Service `key`, if any.
fn refusal(key: &ObjectKey, refused: &BTreeSet<(SocketAddr, RefusalReason)>) -> Option<RefProblem> {
    if refused.is_empty() {
        return None;
    }
    let mut parts: Vec<String> = refused
        .iter()
        .take(REFUSED_LISTED)
        .map(|(addr, why)| {
            format!(
                "endpoint {addr} of Service {key} refused: {}",
                why.describe()
            )
        })
        .collect();
    if refused.len() > REFUSED_LISTED {
        parts.push(format!(
            "{} more endpoint(s) of Service {key} refused",
            refused.len() - REFUSED_LISTED
        ));
    }
    let them = if refused.len() == 1 { "it" } else { "them" };
    Some(RefProblem {
        reason: reasons::REF_NOT_PERMITTED,
        message: format!("{} (allow {them} with {ALLOW_FLAG})", parts.join("; ")),
    })
}

/// The Services, EndpointSlices and ReferenceGrants backendRefs resolve against.
pub struct Backends<'a> {
    services: BTreeMap<ObjectKey, &'a Service>,
    /// EndpointSlices by the Service they belong to.
    slices: BTreeMap<ObjectKey, Vec<&'a EndpointSlice>>,
    grants: &'a [ReferenceGrant],
    filter: &'a BackendFilter,
}

impl<'a> Backends<'a> {
    /// Indexes the objects.
    pub fn new(
        services: &'a [Service],
        slices: &'a [EndpointSlice],
        grants: &'a [ReferenceGrant],
        filter: &'a BackendFilter,
    ) -> Self {
        let services = services
            .iter()
            .map(|s| (ObjectKey::of(&s.metadata, true), s))
            .collect();
        let mut by_service: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
        for s in slices {
            if let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                by_service
                    .entry(ObjectKey {
                        namespace: namespace_of(&s.metadata).to_owned(),
                        name: svc.clone(),
                    })
                    .or_default()
                    .push(s);
            }
        }
        Self {
            services,
            slices: by_service,
            grants,
            filter,
        }
    }

    /// Resolves one backendRef of a route in `route_ns`.
    pub fn resolve(&self, route_ns: &str, r: &TcpRouteRulesBackendRefs) -> ResolvedRef {
        let ns = r.namespace.as_deref().unwrap_or(route_ns);
        let weight = u32::try_from(r.weight.unwrap_or(1).clamp(0, 1_000_000)).unwrap_or(0);
        let mut label = match r.port {
            Some(p) => format!("{ns}/{}:{p}", r.name),
            None => format!("{ns}/{}", r.name),
        };
        let group = r.group.as_deref().unwrap_or("");
        let kind = r.kind.as_deref().unwrap_or(KIND_SERVICE);
        if !group.is_empty() || kind != KIND_SERVICE {
            label = format!("{group}/{kind} {label}");
        }
        let (target, refused, refusal, slices) = match self.endpoints(route_ns, ns, r) {
            Err(problem) => (Err(problem), Vec::new(), None, BTreeMap::new()),
            Ok(eps) => {
                let key = ObjectKey {
                    namespace: ns.to_owned(),
                    name: r.name.clone(),
                };
                let refused = eps
                    .refused
                    .iter()
                    .map(|&(address, reason)| RefusedBackend {
                        backend_ref: label.clone(),
                        address,
                        reason,
                    })
                    .collect();
                let refusal = refusal(&key, &eps.refused);
                (
                    Ok(eps.allowed.into_iter().collect()),
                    refused,
                    refusal,
                    eps.slices,
                )
            }
        };
        ResolvedRef {
            label,
            weight,
            target,
            refused,
            refusal,
            slices,
        }
    }

    fn endpoints(
        &self,
        route_ns: &str,
        ns: &str,
        r: &TcpRouteRulesBackendRefs,
    ) -> Result<Endpoints, RefProblem> {
        let group = r.group.as_deref().unwrap_or("");
        let kind = r.kind.as_deref().unwrap_or(KIND_SERVICE);
        if !group.is_empty() || kind != KIND_SERVICE {
            return Err(RefProblem {
                reason: reasons::INVALID_KIND,
                message: format!(
                    "backendRef {ns}/{} has group {group:?} kind {kind:?}; only core Services are supported",
                    r.name
                ),
            });
        }
        if ns != route_ns && !self.granted(route_ns, ns, &r.name) {
            return Err(RefProblem {
                reason: reasons::REF_NOT_PERMITTED,
                message: format!(
                    "backendRef to Service {ns}/{} is not permitted by any ReferenceGrant in namespace {ns}",
                    r.name
                ),
            });
        }
        let key = ObjectKey {
            namespace: ns.to_owned(),
            name: r.name.clone(),
        };
        let Some(svc) = self.services.get(&key) else {
            return Err(RefProblem {
                reason: reasons::BACKEND_NOT_FOUND,
                message: format!("Service {key} not found"),
            });
        };
        let Some(port) = r.port else {
            return Err(RefProblem {
                reason: reasons::BACKEND_NOT_FOUND,
                message: format!("backendRef to Service {key} has no port (port is required)"),
            });
        };
        let Some(sp) = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|ps| ps.iter().find(|p| p.port == port))
        else {
            return Err(RefProblem {
                reason: reasons::BACKEND_NOT_FOUND,
                message: format!("Service {key} has no port {port}"),
            });
        };
        let sp_name = sp.name.as_deref().unwrap_or("");
        let mut out = Endpoints::default();
        for slice in self.slices.get(&key).into_iter().flatten() {
            let slice_name = ObjectKey::of(&slice.metadata, true);
            let family_ok = |ip: &IpAddr| match slice.address_type.as_str() {
                "IPv4" => ip.is_ipv4(),
                "IPv6" => ip.is_ipv6(),
                _ => false, // FQDN endpoints are not resolved.
            };
            let Some(target) = slice_port(slice, sp_name, sp.target_port.as_ref()) else {
                continue;
            };
            for ep in &slice.endpoints {
                // `ready` unset counts as ready; a terminating endpoint takes no new
                // connections even while `serving` (its established ones keep their
                // backend, which the data path does by itself).
                let conditions = ep.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                if !ready || terminating {
                    continue;
                }
                // Consumers use the first address (EndpointSlice API).
                if let Some(ip) = ep
                    .addresses
                    .first()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .filter(family_ok)
                {
                    let addr = SocketAddr::new(ip, target);
                    match self.filter.check(ip) {
                        Ok(()) => {
                            out.allowed.insert(addr);
                            out.slices
                                .entry(addr)
                                .or_insert_with(|| slice_name.to_string());
                        }
                        Err(why) => {
                            out.refused.insert((addr, why));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn granted(&self, from_ns: &str, to_ns: &str, name: &str) -> bool {
        self.grants
            .iter()
            .filter(|g| namespace_of(&g.metadata) == to_ns)
            .any(|g| {
                g.spec.from.iter().any(|f| {
                    f.group == GATEWAY_GROUP && f.kind == KIND_TCP_ROUTE && f.namespace == from_ns
                }) && g.spec.to.iter().any(|t| {
                    t.group.is_empty()
                        && t.kind == KIND_SERVICE
                        && t.name.as_deref().is_none_or(|n| n.is_empty() || n == name)
                })
            })
    }
}

/// The endpoint port of `slice` for the Service port named `sp_name`: the slice port of
/// the same name (how Kubernetes writes slices, named `targetPort`s included), else the
/// slice port equal to a numeric `targetPort`.
fn slice_port(slice: &EndpointSlice, sp_name: &str, target: Option<&IntOrString>) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let by_name = ports
        .iter()
        .find(|p| p.name.as_deref().unwrap_or("") == sp_name)
        .or_else(|| match target {
            Some(IntOrString::String(n)) => ports.iter().find(|p| p.name.as_deref() == Some(n)),
            Some(IntOrString::Int(n)) => ports.iter().find(|p| p.port == Some(*n)),
            None => None,
        });
    by_name
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The weight each backendRef takes in the data path, before it is spread over its
/// endpoints: backendRefs with weight 0 are left out, and so are those without ready
/// endpoint when another backendRef of the rule has one, their share going to the
/// backendRefs with ready endpoints in proportion of their weights. Invalid backendRefs
/// keep exactly the share their weight gives them.
///
/// With `R` the weights of the backendRefs with ready endpoints, `U` those without and
/// `I` the invalid ones (`W = R + U + I`), a ready backendRef of weight `w` gets
/// `w × (R + U) / (W × R)` of the connections and an invalid one `w / W`: scaled by
/// `W × R`, their integer weights are `w × (R + U)` and `w × R`.
fn effective_weights(refs: &[ResolvedRef]) -> Vec<(&ResolvedRef, u64)> {
    let active = || refs.iter().filter(|r| r.weight > 0);
    let sum = |f: fn(&ResolvedRef) -> bool| -> u64 {
        active().filter(|r| f(r)).map(|r| u64::from(r.weight)).sum()
    };
    let ready = sum(ResolvedRef::has_ready_endpoint);
    if ready == 0 {
        // Nothing to move a share to: every share is refused, as it comes.
        return active().map(|r| (r, u64::from(r.weight))).collect();
    }
    let unready = sum(ResolvedRef::without_ready_endpoint);
    active()
        .filter(|r| !r.without_ready_endpoint())
        .map(|r| {
            let factor = if r.has_ready_endpoint() {
                ready + unready
            } else {
                ready
            };
            (r, u64::from(r.weight) * factor)
        })
        .collect()
}

/// Turns resolved backendRefs into weighted data path entries.
///
/// * weight 0: no entry (never picked);
/// * valid but without ready endpoint: no entry, its share goes to the backendRefs with
///   ready endpoints; when no backendRef of the rule has one, one entry without address
///   carrying its share (its connections are rejected);
/// * invalid: one entry without address carrying the backendRef's whole share (its
///   connections are rejected);
/// * otherwise the backendRef's share `w × S` is split over its endpoints, each getting
///   `⌊w × S / n⌋` or one more. `S` is the least common multiple of the endpoint counts,
///   so every endpoint of a backendRef gets the same weight; when that multiple exceeds
///   [`SCALE_CAP`], `S` is the largest endpoint count and endpoints of one backendRef
///   differ by at most 1 (the backendRef's total stays exact).
///
/// Each backendRef keeps at most `256 / (backendRefs with an entry)` endpoints (the
/// first in address order), so a listener never exceeds the data path's per-listener
/// limit; [`spread_within`] takes another limit.
pub fn spread(refs: &[ResolvedRef]) -> Vec<Backend> {
    spread_within(refs, MAX_BACKENDS_PER_LISTENER)
}

/// Endpoints each backendRef with an entry (see [`spread`]) keeps on a listener of at
/// most `per_listener` entries (at least 1).
pub fn per_ref(refs: &[ResolvedRef], per_listener: u32) -> usize {
    let entries = effective_weights(refs).len().max(1);
    (per_listener as usize / entries).max(1)
}

/// [`spread`] on a listener of at most `per_listener` entries: each backendRef keeps
/// [`per_ref`] endpoints, the first in address order.
pub fn spread_within(refs: &[ResolvedRef], per_listener: u32) -> Vec<Backend> {
    let active = effective_weights(refs);
    if active.is_empty() {
        return Vec::new();
    }
    let per_ref = per_ref(refs, per_listener);
    let count = |r: &ResolvedRef| match &r.target {
        Ok(eps) if !eps.is_empty() => eps.len().min(per_ref) as u64,
        _ => 1,
    };
    let g = active.iter().fold(0, |acc, &(_, w)| gcd(acc, w)).max(1);
    let lcm = active.iter().try_fold(1u64, |acc, (r, _)| {
        let n = count(r);
        let l = acc / gcd(acc, n) * n;
        (l <= SCALE_CAP).then_some(l)
    });
    let scale = lcm.unwrap_or_else(|| active.iter().map(|(r, _)| count(r)).max().unwrap_or(1));
    let mut shares: Vec<u64> = active
        .iter()
        .map(|&(_, w)| (w / g).saturating_mul(scale))
        .collect();
    let total: u128 = shares.iter().map(|&s| u128::from(s)).sum();
    let limit = u64::from(u32::MAX);
    if total > u128::from(limit) {
        for (s, (r, _)) in shares.iter_mut().zip(&active) {
            *s = u64::try_from(u128::from(*s) * u128::from(limit / 2) / total).unwrap_or(limit);
            *s = (*s).max(count(r));
        }
    }
    let mut out = Vec::new();
    for ((r, _), share) in active.iter().zip(shares) {
        match &r.target {
            Ok(eps) if !eps.is_empty() => {
                let n = count(r);
                let (base, rem) = (share / n, share % n);
                for (i, ep) in eps.iter().take(n as usize).enumerate() {
                    let w = base + u64::from((i as u64) < rem);
                    out.push(Backend {
                        addr: Some(*ep),
                        weight: u32::try_from(w).unwrap_or(u32::MAX),
                        backend_ref: r.label.clone(),
                        endpoint_slice: r.slices.get(ep).cloned(),
                    });
                }
            }
            _ => out.push(Backend {
                addr: None,
                weight: u32::try_from(share).unwrap_or(u32::MAX),
                backend_ref: r.label.clone(),
                endpoint_slice: None,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    fn r(label: &str, weight: u32, target: Result<Vec<SocketAddr>, RefProblem>) -> ResolvedRef {
        ResolvedRef {
            label: label.into(),
            weight,
            target,
            refused: Vec::new(),
            refusal: None,
            slices: BTreeMap::new(),
        }
    }

    fn share(b: &[Backend], label: &str) -> u64 {
        b.iter()
            .filter(|x| x.backend_ref == label)
            .map(|x| u64::from(x.weight))
            .sum()
    }

    #[test]
    fn weights_are_per_backend_ref_not_per_endpoint() {
        let b = spread(&[r("a", 1, Ok(eps(10))), r("b", 1, Ok(eps(1)))]);
        assert_eq!(b.len(), 11);
        assert_eq!(share(&b, "a"), share(&b, "b"));
        assert!(
            b.iter()
                .filter(|x| x.backend_ref == "a")
                .all(|x| x.weight == 1)
        );
        assert_eq!(share(&b, "b"), 10);
    }

    #[test]
    fn invalid_ref_keeps_its_share_and_zero_weight_gets_nothing() {
        let bad = Err(RefProblem {
            reason: reasons::BACKEND_NOT_FOUND,
            message: String::new(),
        });
        let b = spread(&[
            r("ok", 20, Ok(eps(3))),
            r("bad", 80, bad),
            r("zero", 0, Ok(eps(2))),
        ]);
        assert_eq!(share(&b, "zero"), 0);
        assert!(b.iter().all(|x| x.backend_ref != "zero"));
        let total: u64 = b.iter().map(|x| u64::from(x.weight)).sum();
        assert_eq!(share(&b, "bad") * 100, total * 80);
        assert_eq!(b.iter().filter(|x| x.addr.is_none()).count(), 1);
    }

    #[test]
    fn no_ready_endpoint_gives_its_share_to_the_ready_ones() {
        let refs = [
            r("empty", 3, Ok(vec![])),
            r("one", 1, Ok(eps(1))),
            r("two", 1, Ok(eps(2))),
        ];
        let b = spread(&refs);
        assert!(b.iter().all(|x| x.addr.is_some()), "{b:?}");
        assert_eq!(share(&b, "empty"), 0);
        assert_eq!(share(&b, "one"), share(&b, "two"));
        let (names, fate) = unready(&refs).expect("one without ready endpoint");
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].label, "empty");
        assert_eq!(fate, UnreadyShare::Moved);
    }

    #[test]
    fn when_no_backend_ref_has_a_ready_endpoint_every_share_is_refused() {
        let refs = [r("a", 1, Ok(vec![])), r("b", 3, Ok(vec![]))];
        let b = spread(&refs);
        assert_eq!(b.len(), 2);
        assert!(b.iter().all(|x| x.addr.is_none()));
        assert_eq!(share(&b, "b"), 3 * share(&b, "a"));
        assert_eq!(unready(&refs).map(|u| u.1), Some(UnreadyShare::Refused));
    }

    #[test]
    fn an_invalid_ref_keeps_its_share_when_an_unready_one_gives_its_share_away() {
        let bad = Err(RefProblem {
            reason: reasons::BACKEND_NOT_FOUND,
            message: String::new(),
        });
        // 1 : 1 : 2 — the invalid ref keeps 1/4, the ready one gets 3/4.
        let b = spread(&[
            r("ready", 1, Ok(eps(1))),
            r("unready", 1, Ok(vec![])),
            r("bad", 2, bad),
        ]);
        let total: u64 = b.iter().map(|x| u64::from(x.weight)).sum();
        assert_eq!(share(&b, "unready"), 0);
        assert_eq!(share(&b, "bad") * 2, total, "{b:?}");
        assert_eq!(share(&b, "ready") * 2, total, "{b:?}");
        // Shares exact for other weights too: ready 3, unready 5, invalid 2 of 10.
        let bad = Err(RefProblem {
            reason: reasons::BACKEND_NOT_FOUND,
            message: String::new(),
        });
        let b = spread(&[
            r("ready", 3, Ok(eps(3))),
            r("unready", 5, Ok(vec![])),
            r("bad", 2, bad),
        ]);
        let total: u64 = b.iter().map(|x| u64::from(x.weight)).sum();
        assert_eq!(share(&b, "bad") * 10, total * 2, "{b:?}");
        assert_eq!(share(&b, "ready") * 10, total * 8, "{b:?}");
    }

    #[test]
    fn a_ref_whose_endpoints_are_all_refused_keeps_its_share() {
        let mut refused = r("refused", 1, Ok(vec![]));
        refused.refusal = Some(RefProblem {
            reason: reasons::REF_NOT_PERMITTED,
            message: String::new(),
        });
        let refs = [refused, r("one", 1, Ok(eps(1)))];
        let b = spread(&refs);
        assert_eq!(share(&b, "refused"), share(&b, "one"));
        assert!(unready(&refs).is_none());
    }

    #[test]
    fn weight_zero_without_endpoints_is_not_counted() {
        let refs = [r("zero", 0, Ok(vec![])), r("one", 1, Ok(eps(1)))];
        assert!(unready(&refs).is_none());
        assert_eq!(spread(&refs).len(), 1);
    }

    #[test]
    fn capped_scale_keeps_backend_ref_totals_exact() {
        // lcm(7, 11, 13, 16) = 16016 > SCALE_CAP: scale falls back to 16.
        let b = spread(&[
            r("a", 1, Ok(eps(7))),
            r("b", 1, Ok(eps(11))),
            r("c", 1, Ok(eps(13))),
            r("d", 1, Ok(eps(16))),
        ]);
        for l in ["a", "b", "c", "d"] {
            assert_eq!(share(&b, l), 16, "{l}");
        }
        assert!(b.iter().all(|x| x.weight >= 1));
    }

    #[test]
    fn huge_weights_fit_u32() {
        let b = spread(&[r("a", 1_000_000, Ok(eps(250))), r("b", 999_999, Ok(eps(3)))]);
        let total: u64 = b.iter().map(|x| u64::from(x.weight)).sum();
        assert!(u32::try_from(total).is_ok());
        assert!(b.iter().all(|x| x.weight >= 1));
        assert!(b.len() <= MAX_BACKENDS_PER_LISTENER as usize);
        // Moved shares multiply weights: still within u32, still one entry per endpoint.
        let bad = Err(RefProblem {
            reason: reasons::BACKEND_NOT_FOUND,
            message: String::new(),
        });
        let mut refs = vec![r("bad", 999_983, bad), r("ready", 1_000_000, Ok(eps(200)))];
        refs.extend((0..14).map(|i| r(&format!("u{i}"), 999_979 - i, Ok(vec![]))));
        let b = spread(&refs);
        let total: u64 = b.iter().map(|x| u64::from(x.weight)).sum();
        assert!(u32::try_from(total).is_ok());
        assert!(b.iter().all(|x| x.weight >= 1));
        assert_eq!(
            b.len(),
            1 + 128,
            "two entries take a share: 128 endpoints each at most"
        );
    }
}
