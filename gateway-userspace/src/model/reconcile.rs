//! The Gateway API rules: which listeners are served, which routes attach where, which
//! backends carry traffic, and the status every object of sockgate's GatewayClasses
//! gets. Pure: no I/O, no clock; the same snapshot in any order gives the same result.
//!
//! A Gateway without `spec.addresses` is served on every address of every node. One
//! with `spec.addresses` (type `IPAddress`) is served on the nodes holding one of them,
//! on those addresses only ([`GatewayAddresses`]); ports are still allocated once for
//! the whole cluster, whatever the addresses (the data path keys listeners by port).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use gateway_api::experimental::{
    gatewayclasses::{GatewayClass, GatewayClassStatus, GatewayClassStatusSupportedFeatures},
    gateways::{
        Gateway, GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom,
        GatewayListenersAllowedRoutesNamespacesSelector, GatewayStatus, GatewayStatusAddresses,
        GatewayStatusListeners, GatewayStatusListenersSupportedKinds,
    },
    tcproutes::{
        TcpRouteParentRefs, TcpRouteStatus, TcpRouteStatusParents, TcpRouteStatusParentsParentRef,
    },
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use tracing::instrument;

use super::{
    backends::{Backends, RefProblem, ResolvedRef, spread_within, unready},
    conditions::{
        ADDRESS_TYPE_IP, BUNDLE_VERSION, BUNDLE_VERSION_ANNOTATION, FALSE, GATEWAY_GROUP,
        KIND_GATEWAY, KIND_TCP_ROUTE, SUPPORTED_FEATURES, TRUE, reasons, types,
    },
    limits::{Budget, LeftOut, Limit, ListenerPorts, port_message, port_not_allowed, truncated},
    snapshot::{
        CrdBundle, ObjectKey, Params, Snapshot, TcpRouteObject, generation_of, namespace_of,
    },
};
use crate::desired::{DesiredState, Listener, UnreadyBackendRef, UnreadyShare};

/// The status sockgate writes, by object. Objects absent here are not written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusSet {
    /// GatewayClasses with sockgate's `controllerName`.
    pub gateway_classes: BTreeMap<String, GatewayClassStatus>,
    /// Gateways of those classes.
    pub gateways: BTreeMap<ObjectKey, GatewayStatus>,
    /// TCPRoutes with a parentRef to such a Gateway: only the `status.parents` entries
    /// of those parentRefs (entries of other controllers are theirs).
    pub tcp_routes: BTreeMap<ObjectKey, TcpRouteStatus>,
    /// `ListenerPolicy` objects (GEP-713 ancestors).
    pub listener_policies: BTreeMap<ObjectKey, crate::policy::ListenerPolicyStatus>,
}

/// Age order: `creationTimestamp` (absent first), then namespace/name.
type AgeKey = (Option<k8s_openapi::jiff::Timestamp>, ObjectKey);

fn age(meta: &ObjectMeta, namespaced: bool) -> AgeKey {
    (
        meta.creation_timestamp.as_ref().map(|t| t.0),
        ObjectKey::of(meta, namespaced),
    )
}

struct Cond<'a> {
    now: &'a Time,
    generation: i64,
}

impl Cond<'_> {
    fn make(&self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
        Condition {
            last_transition_time: self.now.clone(),
            message: message.into(),
            observed_generation: Some(self.generation),
            reason: reason.to_owned(),
            status: if ok { TRUE } else { FALSE }.to_owned(),
            type_: type_.to_owned(),
        }
    }
}

/// Why a listener is not served.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Conflict {
    /// Another listener of the same Gateway has the same port.
    SameGateway,
    /// An older Gateway's listener holds the port; `addressed`: one of the two
    /// Gateways has `spec.addresses` (the port is taken all the same).
    OtherGateway { holder: String, addressed: bool },
}

/// One listener of one of sockgate's Gateways, evaluated.
struct ListenerEval<'a> {
    spec: &'a GatewayListeners,
    gateway: ObjectKey,
    port: Option<u16>,
    tcp: bool,
    /// The port is outside `--listener-ports`: why.
    not_allowed: Option<String>,
    conflict: Option<Conflict>,
    /// `allowedRoutes.kinds` entries sockgate supports (TCPRoute), as written.
    supported_kinds: Vec<GatewayStatusListenersSupportedKinds>,
    /// Kinds named in `allowedRoutes.kinds` that sockgate cannot attach.
    invalid_kinds: Vec<String>,
    /// Routes attached (Accepted) to this listener, in age order.
    attached: BTreeSet<AgeKey>,
}

impl ListenerEval<'_> {
    /// `Accepted=True`: TCP, a valid and allowed port, no conflict.
    fn accepted(&self) -> bool {
        self.tcp && self.port.is_some() && self.not_allowed.is_none() && self.conflict.is_none()
    }

    /// Why the listener is not accepted (the `Accepted=False` reason and message).
    fn rejection(&self) -> Option<(&'static str, String)> {
        let port = self.spec.port;
        if !self.tcp {
            Some((
                reasons::UNSUPPORTED_PROTOCOL,
                format!(
                    "protocol {} is not supported; sockgate serves TCP listeners only",
                    self.spec.protocol
                ),
            ))
        } else if self.port.is_none() {
            Some((
                reasons::PORT_UNAVAILABLE,
                format!("port {port} is out of range 1-65535"),
            ))
        } else if let Some(why) = &self.not_allowed {
            Some((reasons::PORT_UNAVAILABLE, why.clone()))
        } else {
            match &self.conflict {
                Some(Conflict::SameGateway) => Some((
                    reasons::PORT_UNAVAILABLE,
                    format!("port {port} is used by another listener of this Gateway"),
                )),
                Some(Conflict::OtherGateway { holder, addressed }) => Some((
                    reasons::PORT_UNAVAILABLE,
                    if *addressed {
                        format!(
                            "port {port} is already served by listener {holder} of an older Gateway (sockgate keys listeners by port: one Gateway per port, whatever their spec.addresses)"
                        )
                    } else {
                        format!(
                            "port {port} is already served by listener {holder} of an older Gateway on this node"
                        )
                    },
                )),
                None => None,
            }
        }
    }
}

/// What a Gateway's `spec.addresses` come to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum GatewayAddresses {
    /// None given: every address of every node running sockgate.
    AllNodes,
    /// Every entry an `IPAddress` that parses.
    Ip {
        /// Those of this node: the Gateway is served here, on these.
        here: Vec<IpAddr>,
        /// Those of another node running sockgate: served there.
        elsewhere: Vec<IpAddr>,
        /// Usable, but on no node running sockgate (as far as this agent knows).
        not_assigned: Vec<IpAddr>,
        /// Never servable: unspecified, loopback, multicast, broadcast, IPv6 link-local.
        not_usable: Vec<IpAddr>,
    },
    /// An entry of another type than `IPAddress`, or a value that is no IP address:
    /// the Gateway is not accepted; why.
    Unsupported(String),
}

impl GatewayAddresses {
    /// Evaluates `spec.addresses` against the addresses of this node and of the other
    /// nodes running sockgate.
    fn of(gw: &Gateway, params: &Params) -> Self {
        let Some(given) = gw.spec.addresses.as_ref().filter(|a| !a.is_empty()) else {
            return Self::AllNodes;
        };
        let mut ips = BTreeSet::new();
        let mut bad = Vec::new();
        for a in given {
            let type_ = a.r#type.as_deref().unwrap_or(ADDRESS_TYPE_IP);
            let value = a.value.as_deref().unwrap_or_default();
            if type_ != ADDRESS_TYPE_IP {
                bad.push(format!(
                    "address type {type_} ({value}) is not supported: sockgate serves IPAddress addresses only"
                ));
            } else if let Ok(ip) = value.parse::<IpAddr>() {
                ips.insert(ip.to_canonical());
            } else {
                bad.push(format!("IPAddress {value:?} is not an IP address"));
            }
        }
        if !bad.is_empty() {
            return Self::Unsupported(bad.join("; "));
        }
        let (mut here, mut elsewhere, mut not_assigned, mut not_usable) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ip in ips {
            if !usable(ip) {
                not_usable.push(ip);
            } else if params.node_addresses.contains(&ip) {
                here.push(ip);
            } else if params.other_nodes_addresses.contains(&ip) {
                elsewhere.push(ip);
            } else {
                not_assigned.push(ip);
            }
        }
        Self::Ip {
            here,
            elsewhere,
            not_assigned,
            not_usable,
        }
    }

    /// Whether the Gateway is accepted as far as its addresses go.
    fn accepted(&self) -> bool {
        !matches!(self, Self::Unsupported(_))
    }

    /// Whether the Gateway is served on this node.
    fn here(&self) -> bool {
        match self {
            Self::AllNodes => true,
            Self::Ip { here, .. } => !here.is_empty(),
            Self::Unsupported(_) => false,
        }
    }

    /// Whether some node running sockgate serves the Gateway.
    fn assigned(&self) -> bool {
        match self {
            Self::AllNodes => true,
            Self::Ip {
                here, elsewhere, ..
            } => !here.is_empty() || !elsewhere.is_empty(),
            Self::Unsupported(_) => false,
        }
    }

    /// The addresses the listeners bind on this node (empty: every address).
    fn bound_here(&self) -> Vec<IpAddr> {
        match self {
            Self::Ip { here, .. } => here.clone(),
            Self::AllNodes | Self::Unsupported(_) => Vec::new(),
        }
    }
}

/// Whether an address can be served to clients elsewhere.
fn usable(ip: IpAddr) -> bool {
    let link_local_v6 = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || broadcast || link_local_v6)
}

fn join_ips(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

struct GatewayEval<'a> {
    gw: &'a Gateway,
    key: ObjectKey,
    /// What its `spec.addresses` come to.
    addresses: GatewayAddresses,
    listeners: Vec<ListenerEval<'a>>,
    /// Names given to more than one listener (only the first is evaluated).
    duplicate_names: Vec<String>,
}

impl GatewayEval<'_> {
    /// The listener is valid and served by a node running sockgate (maybe another).
    fn serves(&self, l: &ListenerEval<'_>) -> bool {
        self.addresses.assigned() && l.accepted()
    }

    /// The listener is valid and served on this node.
    fn serves_here(&self, l: &ListenerEval<'_>) -> bool {
        self.addresses.here() && l.accepted()
    }
}

/// Computes the desired data path state and the status of every object of sockgate's
/// GatewayClasses.
#[instrument(skip_all, fields(controller = %params.controller_name))]
pub fn reconcile(snap: &Snapshot, params: &Params) -> (DesiredState, StatusSet) {
    let mut status = StatusSet::default();
    let ours = our_classes(&snap.gateway_classes, params, &mut status);

    let mut gateways: Vec<&Gateway> = snap
        .gateways
        .iter()
        .filter(|g| ours.contains(&g.spec.gateway_class_name))
        .collect();
    gateways.sort_by_cached_key(|g| age(&g.metadata, true));
    let ports = params.limits.listener_ports;
    let mut evals: Vec<GatewayEval<'_>> = gateways
        .iter()
        .map(|g| evaluate_gateway(g, params))
        .collect();
    allocate_ports(&mut evals);

    let labels = namespace_labels(snap);
    let backends = Backends::new(
        &snap.services,
        &snap.endpoint_slices,
        &snap.reference_grants,
        &params.backend_filter,
    );
    let mut routes: Vec<&TcpRouteObject> = snap.tcp_routes.iter().collect();
    routes.sort_by_cached_key(|r| age(&r.route.metadata, true));
    let mut resolved: BTreeMap<ObjectKey, Vec<ResolvedRef>> = BTreeMap::new();
    for r in &routes {
        if let Some((key, st, refs)) = attach_route(r, &mut evals, &labels, &backends, params) {
            resolved.insert(key.clone(), refs);
            status.tcp_routes.insert(key, st);
        }
    }

    // Listeners in Gateway age order, then spec order, while the maps have room.
    let mut desired = DesiredState {
        left_out: ports_not_allowed(&evals, ports),
        ..DesiredState::default()
    };
    let mut budget = Budget::new(params.limits);
    let per_listener = budget.limits().backends_per_listener;
    for g in &evals {
        let mut left_out: BTreeMap<&str, LeftOut> = BTreeMap::new();
        for l in &g.listeners {
            let Some(port) = l.port.filter(|_| g.serves_here(l)) else {
                continue;
            };
            let origin = format!("{}/{}", g.key, l.spec.name);
            let winner = l.attached.iter().next().map(|(_, k)| k);
            let refs = winner.and_then(|k| resolved.get(k));
            let backends = refs
                .map(|refs| spread_within(refs, per_listener))
                .unwrap_or_default();
            if let Err(out) = budget.take(port, &origin, backends.len()) {
                desired.left_out.push(out.clone());
                left_out.insert(l.spec.name.as_str(), out);
                continue;
            }
            for t in refs.map(|r| truncated(r, per_listener)).unwrap_or_default() {
                desired.left_out.push(LeftOut {
                    limit: Limit::BackendsPerListener,
                    port,
                    listener: origin.clone(),
                    count: u32::try_from(t.left_out.len()).unwrap_or(u32::MAX),
                    message: t.describe(per_listener),
                    backend_ref: Some(t.backend_ref),
                });
            }
            desired.listeners.insert(
                port,
                Listener {
                    port,
                    addresses: g.addresses.bound_here(),
                    origin,
                    route: winner.map(ToString::to_string),
                    backends,
                },
            );
        }
        status
            .gateways
            .insert(g.key.clone(), gateway_status(g, &left_out, &params.now));
    }
    desired.left_out.sort();
    // Every refusal a route's status reports, each once (routes may share a Service).
    desired.refused = resolved
        .values()
        .flatten()
        .flat_map(|r| r.refused.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    desired.unready = unready_refs(&resolved);
    // The XDP guard's policies attach to the listeners just computed.
    let (guards, policies) = super::guards::resolve(&snap.listener_policies, &desired, params);
    desired.guards = guards;
    status.listener_policies = policies;
    (desired, status)
}

/// Every backendRef without ready endpoint, by route, each once.
fn unready_refs(resolved: &BTreeMap<ObjectKey, Vec<ResolvedRef>>) -> Vec<UnreadyBackendRef> {
    resolved
        .iter()
        .flat_map(|(route, refs)| {
            unready(refs).into_iter().flat_map(move |(names, share)| {
                names.into_iter().map(move |r| UnreadyBackendRef {
                    route: route.to_string(),
                    backend_ref: r.label.clone(),
                    share,
                })
            })
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The TCP listeners whose port `ports` does not allow, for logs, metrics and `check`
/// (their status says it through [`ListenerEval::rejection`]).
fn ports_not_allowed(evals: &[GatewayEval<'_>], ports: ListenerPorts) -> Vec<LeftOut> {
    evals
        .iter()
        .flat_map(|g| g.listeners.iter().map(move |l| (g, l)))
        .filter(|(_, l)| l.tcp)
        .filter_map(|(g, l)| {
            let origin = format!("{}/{}", g.key, l.spec.name);
            port_not_allowed(l.port?, &origin, ports)
        })
        .collect()
}

fn our_classes(
    classes: &[GatewayClass],
    params: &Params,
    status: &mut StatusSet,
) -> BTreeSet<String> {
    let mut ours = BTreeSet::new();
    for c in classes {
        if c.spec.controller_name != params.controller_name {
            continue;
        }
        let name = c.metadata.name.clone().unwrap_or_default();
        let cond = Cond {
            now: &params.now,
            generation: generation_of(&c.metadata),
        };
        let (supported, message) = supported_version(&params.crd_bundle);
        let reason = if supported {
            reasons::SUPPORTED_VERSION
        } else {
            reasons::UNSUPPORTED_VERSION
        };
        status.gateway_classes.insert(
            name.clone(),
            GatewayClassStatus {
                conditions: Some(vec![
                    cond.make(
                        types::ACCEPTED,
                        true,
                        reasons::ACCEPTED,
                        format!("handled by {}", params.controller_name),
                    ),
                    cond.make(types::SUPPORTED_VERSION, supported, reason, message),
                ]),
                supported_features: Some(
                    SUPPORTED_FEATURES
                        .iter()
                        .map(|f| GatewayClassStatusSupportedFeatures {
                            name: (*f).to_owned(),
                        })
                        .collect(),
                ),
            },
        );
        ours.insert(name);
    }
    ours
}

/// `vMAJOR.MINOR` of a bundle version (`v1.5.1`, `v1.6.0-rc.1`).
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.strip_prefix('v')?.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The GatewayClass `SupportedVersion` condition's status and message: the CRDs' bundle
/// versions are supported when they have the major and minor version of
/// [`BUNDLE_VERSION`]. Without CRDs (files), there is nothing to disagree with.
fn supported_version(bundle: &CrdBundle) -> (bool, String) {
    let want = major_minor(BUNDLE_VERSION);
    let built = format!("sockgate is built for Gateway API {BUNDLE_VERSION}");
    match bundle {
        CrdBundle::NotRead => (
            true,
            format!("no Gateway API CRDs read (objects from files); {built}"),
        ),
        CrdBundle::Unreadable(why) => (
            false,
            format!("the Gateway API CRDs' bundle version could not be read ({why}); {built}"),
        ),
        CrdBundle::Read(crds) if crds.is_empty() => {
            (false, format!("no Gateway API CRD found; {built}"))
        }
        CrdBundle::Read(crds) => {
            let wrong: Vec<String> = crds
                .iter()
                .filter_map(|(crd, v)| match v {
                    None => Some(format!(
                        "CRD {crd} has no {BUNDLE_VERSION_ANNOTATION} annotation"
                    )),
                    Some(v) if major_minor(v) != want || want.is_none() => {
                        Some(format!("CRD {crd} is of bundle version {v}"))
                    }
                    Some(_) => None,
                })
                .collect();
            if wrong.is_empty() {
                let versions: BTreeSet<&str> =
                    crds.values().flatten().map(String::as_str).collect();
                let versions = versions.into_iter().collect::<Vec<_>>().join(", ");
                (
                    true,
                    format!("Gateway API CRD bundle version {versions} supported; {built}"),
                )
            } else {
                (
                    false,
                    format!(
                        "{}; {built} and supports v{}.{}.x bundles only: objects are read as best effort",
                        wrong.join("; "),
                        want.map_or(0, |w| w.0),
                        want.map_or(0, |w| w.1),
                    ),
                )
            }
        }
    }
}

fn evaluate_gateway<'a>(gw: &'a Gateway, params: &Params) -> GatewayEval<'a> {
    let ports = params.limits.listener_ports;
    let key = ObjectKey::of(&gw.metadata, true);
    let mut seen = BTreeSet::new();
    let mut duplicate_names = Vec::new();
    let mut listeners = Vec::new();
    for l in &gw.spec.listeners {
        if !seen.insert(l.name.as_str()) {
            duplicate_names.push(l.name.clone());
            continue;
        }
        let tcp = l.protocol == "TCP";
        let (supported_kinds, invalid_kinds) = route_kinds(l, tcp);
        let port = u16::try_from(l.port).ok().filter(|&p| p != 0);
        listeners.push(ListenerEval {
            spec: l,
            gateway: key.clone(),
            port,
            tcp,
            not_allowed: port
                .filter(|&p| !ports.contains(p))
                .map(|p| port_message(p, ports)),
            conflict: None,
            supported_kinds,
            invalid_kinds,
            attached: BTreeSet::new(),
        });
    }
    let mut by_port: BTreeMap<u16, usize> = BTreeMap::new();
    for l in &listeners {
        if let Some(p) = l.port {
            *by_port.entry(p).or_default() += 1;
        }
    }
    for l in &mut listeners {
        if l.port.is_some_and(|p| by_port[&p] > 1) {
            l.conflict = Some(Conflict::SameGateway);
        }
    }
    GatewayEval {
        gw,
        key,
        addresses: GatewayAddresses::of(gw, params),
        listeners,
        duplicate_names,
    }
}

/// `supportedKinds` and the unsupported entries of `allowedRoutes.kinds`.
fn route_kinds(
    l: &GatewayListeners,
    tcp: bool,
) -> (Vec<GatewayStatusListenersSupportedKinds>, Vec<String>) {
    let tcp_route = || GatewayStatusListenersSupportedKinds {
        group: Some(GATEWAY_GROUP.to_owned()),
        kind: KIND_TCP_ROUTE.to_owned(),
    };
    if !tcp {
        return (Vec::new(), Vec::new());
    }
    let kinds = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.kinds.as_ref())
        .filter(|k| !k.is_empty());
    let Some(kinds) = kinds else {
        return (vec![tcp_route()], Vec::new());
    };
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for k in kinds {
        let group = k.group.as_deref().unwrap_or(GATEWAY_GROUP);
        if group == GATEWAY_GROUP && k.kind == KIND_TCP_ROUTE {
            if ok.is_empty() {
                ok.push(tcp_route());
            }
        } else {
            bad.push(format!("{group}/{}", k.kind));
        }
    }
    (ok, bad)
}

/// A port belongs to the oldest Gateway that asks for it; the listeners of younger
/// Gateways on that port lose. This holds across the cluster and whatever the
/// Gateways' `spec.addresses` (the data path keys listeners by port alone), so that
/// every node computes the same allocation. A listener on a port outside
/// `--listener-ports` holds none.
fn allocate_ports(evals: &mut [GatewayEval<'_>]) {
    let mut holders: BTreeMap<u16, (String, bool)> = BTreeMap::new();
    for g in evals.iter_mut() {
        if !g.addresses.accepted() {
            continue;
        }
        let addressed = matches!(g.addresses, GatewayAddresses::Ip { .. });
        for l in &mut g.listeners {
            let Some(port) = l
                .port
                .filter(|_| l.tcp && l.not_allowed.is_none() && l.conflict.is_none())
            else {
                continue;
            };
            match holders.get(&port) {
                Some((holder, holder_addressed)) => {
                    l.conflict = Some(Conflict::OtherGateway {
                        holder: holder.clone(),
                        addressed: addressed || *holder_addressed,
                    });
                }
                None => {
                    holders.insert(port, (format!("{}/{}", l.gateway, l.spec.name), addressed));
                }
            }
        }
    }
}

fn namespace_labels(snap: &Snapshot) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for n in &snap.namespaces {
        let name = n.metadata.name.clone().unwrap_or_default();
        let mut labels = n.metadata.labels.clone().unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), name.clone());
        out.insert(name, labels);
    }
    out
}

fn selector_matches(
    sel: &GatewayListenersAllowedRoutesNamespacesSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_exprs = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    by_labels && by_exprs
}

/// Whether `l` admits routes from `route_ns`, and if not, why.
fn namespace_allowed(
    l: &ListenerEval<'_>,
    route_ns: &str,
    labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<(), String> {
    let ns = l
        .spec
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref());
    let from = ns.and_then(|n| n.from.clone());
    match from.unwrap_or(GatewayListenersAllowedRoutesNamespacesFrom::Same) {
        GatewayListenersAllowedRoutesNamespacesFrom::All => Ok(()),
        GatewayListenersAllowedRoutesNamespacesFrom::Same => {
            if route_ns == l.gateway.namespace {
                Ok(())
            } else {
                Err(format!(
                    "listener {} admits routes from namespace {} only",
                    l.spec.name, l.gateway.namespace
                ))
            }
        }
        GatewayListenersAllowedRoutesNamespacesFrom::Selector => {
            let default = BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                route_ns.to_owned(),
            )]);
            let have = labels.get(route_ns).unwrap_or(&default);
            match ns.and_then(|n| n.selector.as_ref()) {
                Some(sel) if selector_matches(sel, have) => Ok(()),
                _ => Err(format!(
                    "namespace {route_ns} does not match the namespace selector of listener {}",
                    l.spec.name
                )),
            }
        }
    }
}

fn normalized_parent_ref(p: &TcpRouteParentRefs, route_ns: &str) -> TcpRouteStatusParentsParentRef {
    TcpRouteStatusParentsParentRef {
        group: Some(p.group.clone().unwrap_or_else(|| GATEWAY_GROUP.to_owned())),
        kind: Some(p.kind.clone().unwrap_or_else(|| KIND_GATEWAY.to_owned())),
        name: p.name.clone(),
        namespace: Some(p.namespace.clone().unwrap_or_else(|| route_ns.to_owned())),
        port: p.port,
        section_name: p.section_name.clone(),
    }
}

/// The route's backendRefs resolved, its `ResolvedRefs` condition and, when it has
/// several rules, its `PartiallyInvalid` condition.
fn route_backends(
    r: &TcpRouteObject,
    backends: &Backends<'_>,
    per_listener: u32,
    cond: &Cond<'_>,
) -> (Vec<ResolvedRef>, Condition, Option<Condition>) {
    let route_ns = namespace_of(&r.route.metadata);
    let rules = &r.route.spec.rules;
    let refs: Vec<ResolvedRef> = rules
        .first()
        .map(|rule| {
            rule.backend_refs
                .iter()
                .map(|b| backends.resolve(route_ns, b))
                .collect()
        })
        .unwrap_or_default();
    // Endpoints beyond what a listener holds are left out (the first are programmed).
    let too_many: Vec<RefProblem> = truncated(&refs, per_listener)
        .iter()
        .map(|t| RefProblem {
            reason: reasons::TOO_MANY_ENDPOINTS,
            message: t.describe(per_listener),
        })
        .collect();
    let problems: Vec<_> = refs
        .iter()
        .filter_map(ResolvedRef::problem)
        .chain(&too_many)
        .collect();
    // A backendRef without ready endpoint resolves: it is said in the message, not in
    // the condition's status.
    let unready_note = unready(&refs).map(|(names, share)| unready_message(&names, share));
    let resolved_refs = match problems.first() {
        None => cond.make(
            types::RESOLVED_REFS,
            true,
            reasons::RESOLVED_REFS,
            match unready_note {
                None => "all backendRefs resolved".to_owned(),
                Some(note) => format!("all backendRefs resolved; {note}"),
            },
        ),
        Some(first) => cond.make(
            types::RESOLVED_REFS,
            false,
            first.reason,
            problems
                .iter()
                .map(|p| p.message.clone())
                .chain(unready_note)
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let partially_invalid = (rules.len() > 1).then(|| {
        cond.make(
            types::PARTIALLY_INVALID,
            true,
            reasons::UNSUPPORTED_VALUE,
            format!(
                "only the first of {} rules is served, the rest are dropped (TCPRoute rules have no match to choose between them)",
                rules.len()
            ),
        )
    });
    (refs, resolved_refs, partially_invalid)
}

/// What the `ResolvedRefs` message says of the backendRefs without ready endpoint.
fn unready_message(names: &[&ResolvedRef], share: UnreadyShare) -> String {
    let list = names
        .iter()
        .map(|r| r.label.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let (noun, has, their) = if names.len() == 1 {
        ("backendRef", "has", "its")
    } else {
        ("backendRefs", "have", "their")
    };
    match share {
        UnreadyShare::Moved => format!(
            "{noun} {list} {has} no ready endpoint: {their} share went to the backendRefs with ready endpoints"
        ),
        UnreadyShare::Refused => format!(
            "{noun} {list} {has} no ready endpoint, nor has any backendRef of the rule: {their} connections are refused"
        ),
    }
}

/// Attaches the route to the listeners of `g` that parentRef `p` selects and allow it;
/// returns the parentRef's `Accepted` condition.
fn attach_to_parent(
    p: &TcpRouteParentRefs,
    g: &mut GatewayEval<'_>,
    route: (&AgeKey, &str),
    labels: &BTreeMap<String, BTreeMap<String, String>>,
    cond: &Cond<'_>,
) -> Condition {
    let (route_age, route_ns) = route;
    let matched: Vec<usize> = g
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            p.section_name.as_ref().is_none_or(|s| *s == l.spec.name)
                && p.port.is_none_or(|port| port == l.spec.port)
        })
        .map(|(i, _)| i)
        .collect();
    if matched.is_empty() {
        return cond.make(
            types::ACCEPTED,
            false,
            reasons::NO_MATCHING_PARENT,
            format!(
                "Gateway {} has no listener matching{}{}",
                g.key,
                p.section_name
                    .as_ref()
                    .map_or_else(String::new, |s| format!(" sectionName {s}")),
                p.port.map_or_else(String::new, |n| format!(" port {n}")),
            ),
        );
    }
    let mut why = Vec::new();
    let mut allowed = Vec::new();
    for &i in &matched {
        let l = &g.listeners[i];
        if !g.addresses.accepted() {
            why.push(format!("Gateway {} is not accepted", g.key));
        } else if let Some((_, msg)) = l.rejection() {
            why.push(format!("listener {} is not accepted: {msg}", l.spec.name));
        } else if l.supported_kinds.is_empty() {
            why.push(format!(
                "listener {} does not allow kind TCPRoute",
                l.spec.name
            ));
        } else if let Err(e) = namespace_allowed(l, route_ns, labels) {
            why.push(e);
        } else {
            allowed.push(i);
        }
    }
    if allowed.is_empty() {
        return cond.make(
            types::ACCEPTED,
            false,
            reasons::NOT_ALLOWED_BY_LISTENERS,
            why.join("; "),
        );
    }
    let mut names = Vec::new();
    for &i in &allowed {
        g.listeners[i].attached.insert(route_age.clone());
        names.push(g.listeners[i].spec.name.as_str());
    }
    cond.make(
        types::ACCEPTED,
        true,
        reasons::ACCEPTED,
        format!("attached to listener(s) {}", names.join(", ")),
    )
}

/// Attaches one route to the listeners its parentRefs select; returns its status and
/// resolved backendRefs when at least one parentRef is one of sockgate's Gateways.
fn attach_route(
    r: &TcpRouteObject,
    evals: &mut [GatewayEval<'_>],
    labels: &BTreeMap<String, BTreeMap<String, String>>,
    backends: &Backends<'_>,
    params: &Params,
) -> Option<(ObjectKey, TcpRouteStatus, Vec<ResolvedRef>)> {
    let meta = &r.route.metadata;
    let route_age = age(meta, true);
    let route_ns = namespace_of(meta);
    let cond = Cond {
        now: &params.now,
        generation: generation_of(meta),
    };
    let per_listener = params.limits.clamped().backends_per_listener;
    let (refs, resolved_refs, partially_invalid) = route_backends(r, backends, per_listener, &cond);
    let mut parents = Vec::new();
    for p in r.route.spec.parent_refs.iter().flatten() {
        let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
        let kind = p.kind.as_deref().unwrap_or(KIND_GATEWAY);
        if group != GATEWAY_GROUP || kind != KIND_GATEWAY {
            continue;
        }
        let gw_key = ObjectKey {
            namespace: p.namespace.clone().unwrap_or_else(|| route_ns.to_owned()),
            name: p.name.clone(),
        };
        let Some(g) = evals.iter_mut().find(|g| g.key == gw_key) else {
            continue;
        };
        let accepted = attach_to_parent(p, g, (&route_age, route_ns), labels, &cond);
        let mut conditions = vec![accepted, resolved_refs.clone()];
        conditions.extend(partially_invalid.clone());
        conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        parents.push(TcpRouteStatusParents {
            conditions,
            controller_name: params.controller_name.clone(),
            parent_ref: normalized_parent_ref(p, route_ns),
        });
    }
    (!parents.is_empty()).then_some((route_age.1, TcpRouteStatus { parents }, refs))
}

/// The status of listener `l`; `left_out` says why it is not programmed although it is
/// served (a capacity of the node is reached).
fn listener_status(
    g: &GatewayEval<'_>,
    l: &ListenerEval<'_>,
    left_out: Option<&LeftOut>,
    cond: &Cond<'_>,
) -> GatewayStatusListeners {
    let port = l.spec.port;
    let accepted = match l.rejection() {
        Some((reason, msg)) => cond.make(types::ACCEPTED, false, reason, msg),
        None => cond.make(
            types::ACCEPTED,
            true,
            reasons::ACCEPTED,
            "listener accepted",
        ),
    };
    let conflicted = match &l.conflict {
        Some(Conflict::SameGateway) => cond.make(
            types::CONFLICTED,
            true,
            reasons::PROTOCOL_CONFLICT,
            format!("another listener of this Gateway uses port {port}"),
        ),
        Some(Conflict::OtherGateway { holder, .. }) => cond.make(
            types::CONFLICTED,
            true,
            reasons::PORT_UNAVAILABLE,
            format!("port {port} is held by listener {holder}"),
        ),
        None => cond.make(
            types::CONFLICTED,
            false,
            reasons::NO_CONFLICTS,
            "no conflicts",
        ),
    };
    let resolved = if l.invalid_kinds.is_empty() {
        cond.make(
            types::RESOLVED_REFS,
            true,
            reasons::RESOLVED_REFS,
            "all references resolved",
        )
    } else {
        cond.make(
            types::RESOLVED_REFS,
            false,
            reasons::INVALID_ROUTE_KINDS,
            format!("unsupported route kinds: {}", l.invalid_kinds.join(", ")),
        )
    };
    let programmed = if let Some(out) = left_out.filter(|_| g.serves_here(l)) {
        cond.make(types::PROGRAMMED, false, reasons::INVALID, &out.message)
    } else if g.serves(l) {
        let msg = match &g.addresses {
            GatewayAddresses::Ip {
                here, elsewhere, ..
            } if here.is_empty() => format!(
                "serving TCP port {port} on the node(s) holding {}",
                join_ips(elsewhere)
            ),
            GatewayAddresses::Ip { here, .. } => {
                format!("serving TCP port {port} on {}", join_ips(here))
            }
            GatewayAddresses::AllNodes | GatewayAddresses::Unsupported(_) => {
                format!("serving TCP port {port}")
            }
        };
        cond.make(types::PROGRAMMED, true, reasons::PROGRAMMED, msg)
    } else {
        let why = if !g.addresses.accepted() {
            "the Gateway is not accepted"
        } else if l.accepted() {
            "none of the Gateway's addresses is on a node running sockgate"
        } else {
            "the listener is not accepted"
        };
        cond.make(types::PROGRAMMED, false, reasons::INVALID, why)
    };
    GatewayStatusListeners {
        attached_routes: i32::try_from(l.attached.len()).unwrap_or(i32::MAX),
        conditions: vec![accepted, conflicted, programmed, resolved],
        name: l.spec.name.clone(),
        supported_kinds: Some(l.supported_kinds.clone()),
    }
}

/// The status of Gateway `g`; `left_out` holds its listeners that are valid but not
/// programmed for lack of room, by name.
fn gateway_status(
    g: &GatewayEval<'_>,
    left_out: &BTreeMap<&str, LeftOut>,
    now: &Time,
) -> GatewayStatus {
    let cond = Cond {
        now,
        generation: generation_of(&g.gw.metadata),
    };
    let listeners: Vec<GatewayStatusListeners> = g
        .listeners
        .iter()
        .map(|l| listener_status(g, l, left_out.get(l.spec.name.as_str()), &cond))
        .collect();
    let served = g.listeners.iter().filter(|l| g.serves(l)).count();
    let all_valid = g.duplicate_names.is_empty()
        && g.listeners
            .iter()
            .all(|l| l.accepted() && l.invalid_kinds.is_empty());
    let valid = g.listeners.iter().filter(|l| l.accepted()).count();
    let accepted = if let GatewayAddresses::Unsupported(why) = &g.addresses {
        cond.make(
            types::ACCEPTED,
            false,
            reasons::UNSUPPORTED_ADDRESS,
            why.clone(),
        )
    } else if all_valid {
        cond.make(types::ACCEPTED, true, reasons::ACCEPTED, "Gateway accepted")
    } else {
        let mut msg = Vec::new();
        if !g.duplicate_names.is_empty() {
            msg.push(format!(
                "duplicate listener names (only the first is used): {}",
                g.duplicate_names.join(", ")
            ));
        }
        let invalid: Vec<&str> = g
            .listeners
            .iter()
            .filter(|l| !(l.accepted() && l.invalid_kinds.is_empty()))
            .map(|l| l.spec.name.as_str())
            .collect();
        if !invalid.is_empty() {
            msg.push(format!("invalid listeners: {}", invalid.join(", ")));
        }
        cond.make(
            types::ACCEPTED,
            valid > 0,
            reasons::LISTENERS_NOT_VALID,
            msg.join("; "),
        )
    };
    let programmed = gateway_programmed(g, &accepted, left_out, served, &cond);
    GatewayStatus {
        addresses: status_addresses(&g.addresses, served > 0),
        attached_listener_sets: None,
        conditions: Some(vec![accepted, programmed]),
        listeners: Some(listeners),
    }
}

/// The Gateway's `Programmed` condition, given its `Accepted` one; `served`: its
/// listeners served by some node.
fn gateway_programmed(
    g: &GatewayEval<'_>,
    accepted: &Condition,
    left_out: &BTreeMap<&str, LeftOut>,
    served: usize,
    cond: &Cond<'_>,
) -> Condition {
    let ok = accepted.status == TRUE;
    if let GatewayAddresses::Ip {
        not_assigned,
        not_usable,
        ..
    } = &g.addresses
        && ok
        && !g.addresses.assigned()
    {
        address_not_programmed(not_assigned, not_usable, cond)
    } else if ok && !left_out.is_empty() {
        let names: Vec<String> = left_out
            .iter()
            .map(|(name, out)| format!("{name} (port {}: {})", out.port, out.limit.describe()))
            .collect();
        cond.make(
            types::PROGRAMMED,
            false,
            reasons::NO_RESOURCES,
            format!(
                "{} listener(s) programmed; {} not programmed, the node has no room left for them: {} (see each listener's Programmed condition)",
                served - left_out.len(),
                left_out.len(),
                names.join(", ")
            ),
        )
    } else if ok {
        cond.make(
            types::PROGRAMMED,
            true,
            reasons::PROGRAMMED,
            format!(
                "{served} listener(s) programmed{}",
                addresses_note(&g.addresses)
            ),
        )
    } else {
        cond.make(
            types::PROGRAMMED,
            false,
            reasons::INVALID,
            "no listener programmed",
        )
    }
}

/// Gateway `Programmed=False` when none of its addresses is served by any node:
/// `AddressNotUsable` when some can never be, else `AddressNotAssigned`.
fn address_not_programmed(
    not_assigned: &[IpAddr],
    not_usable: &[IpAddr],
    cond: &Cond<'_>,
) -> Condition {
    let mut msg = Vec::new();
    if !not_usable.is_empty() {
        msg.push(format!(
            "{} cannot be served (unspecified, loopback, multicast, broadcast or IPv6 link-local)",
            join_ips(not_usable)
        ));
    }
    if !not_assigned.is_empty() {
        msg.push(format!(
            "{} is on no node running sockgate",
            join_ips(not_assigned)
        ));
    }
    let reason = if not_usable.is_empty() {
        reasons::ADDRESS_NOT_ASSIGNED
    } else {
        reasons::ADDRESS_NOT_USABLE
    };
    cond.make(
        types::PROGRAMMED,
        false,
        reason,
        format!("no listener programmed: {}", msg.join("; ")),
    )
}

/// What the Gateway `Programmed=True` message adds about `spec.addresses`.
fn addresses_note(addresses: &GatewayAddresses) -> String {
    let GatewayAddresses::Ip {
        here,
        elsewhere,
        not_assigned,
        not_usable,
    } = addresses
    else {
        return String::new();
    };
    let mut parts = Vec::new();
    if !here.is_empty() {
        parts.push(format!("on {} (this node)", join_ips(here)));
    }
    if !elsewhere.is_empty() {
        parts.push(format!("on {} (other nodes)", join_ips(elsewhere)));
    }
    if !not_assigned.is_empty() {
        parts.push(format!(
            "not on {} (on no node running sockgate)",
            join_ips(not_assigned)
        ));
    }
    if !not_usable.is_empty() {
        parts.push(format!(
            "not on {} (cannot be served)",
            join_ips(not_usable)
        ));
    }
    format!(" {}", parts.join(", "))
}

/// `status.addresses`: the addresses served, for a Gateway with `spec.addresses`
/// (none when not accepted or when `serving` is false: no listener is served); `None`
/// without `spec.addresses` (the kube source fills in the nodes' addresses).
fn status_addresses(
    addresses: &GatewayAddresses,
    serving: bool,
) -> Option<Vec<GatewayStatusAddresses>> {
    match addresses {
        GatewayAddresses::AllNodes => None,
        GatewayAddresses::Unsupported(_) => Some(Vec::new()),
        GatewayAddresses::Ip { .. } if !serving => Some(Vec::new()),
        GatewayAddresses::Ip {
            here, elsewhere, ..
        } => {
            let served: BTreeSet<&IpAddr> = here.iter().chain(elsewhere).collect();
            Some(
                served
                    .into_iter()
                    .map(|ip| GatewayStatusAddresses {
                        r#type: Some(ADDRESS_TYPE_IP.to_owned()),
                        value: ip.to_string(),
                    })
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(addresses: &serde_json::Value) -> Gateway {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "g", "namespace": "default"},
            "spec": {"gatewayClassName": "sockgate", "listeners": [], "addresses": addresses},
        }))
        .expect("gateway")
    }

    fn params(here: &[&str], elsewhere: &[&str]) -> Params {
        let mut p = crate::source::params_now(
            "c",
            &crate::backend_filter::BackendFilter::default(),
            crate::model::limits::Limits::default(),
        );
        p.node_addresses = here.iter().map(|a| a.parse().expect("ip")).collect();
        p.other_nodes_addresses = elsewhere.iter().map(|a| a.parse().expect("ip")).collect();
        p
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|a| a.parse().expect("ip")).collect()
    }

    #[test]
    fn addresses_sorted_into_here_elsewhere_nowhere_and_never() {
        let g = gateway(&serde_json::json!([
            {"value": "::ffff:192.0.2.10"},
            {"type": "IPAddress", "value": "192.0.2.20"},
            {"type": "IPAddress", "value": "198.51.100.1"},
            {"type": "IPAddress", "value": "0.0.0.0"},
            {"type": "IPAddress", "value": "fe80::1"},
            {"type": "IPAddress", "value": "255.255.255.255"},
        ]));
        let got = GatewayAddresses::of(&g, &params(&["192.0.2.10"], &["192.0.2.20"]));
        assert_eq!(
            got,
            GatewayAddresses::Ip {
                here: ips(&["192.0.2.10"]),
                elsewhere: ips(&["192.0.2.20"]),
                not_assigned: ips(&["198.51.100.1"]),
                not_usable: ips(&["0.0.0.0", "255.255.255.255", "fe80::1"]),
            },
            "an IPv4-mapped address is its IPv4 address"
        );
        assert!(got.accepted() && got.here() && got.assigned());
        assert_eq!(got.bound_here(), ips(&["192.0.2.10"]));
    }

    #[test]
    fn no_addresses_is_every_node_and_a_bad_entry_is_unsupported() {
        let p = params(&[], &[]);
        assert_eq!(
            GatewayAddresses::of(&gateway(&serde_json::json!([])), &p),
            GatewayAddresses::AllNodes
        );
        for bad in [
            serde_json::json!([{"type": "Hostname", "value": "gw.example.com"}]),
            serde_json::json!([{"type": "example.com/vip", "value": "x"}]),
            serde_json::json!([{"type": "IPAddress", "value": "10.0.0.300"}]),
            serde_json::json!([{"value": "10.0.0.1"}, {"type": "IPAddress"}]),
        ] {
            let got = GatewayAddresses::of(&gateway(&bad), &p);
            assert!(
                matches!(got, GatewayAddresses::Unsupported(_)),
                "{bad}: {got:?}"
            );
            assert!(!got.accepted() && !got.here() && !got.assigned());
        }
    }
}
