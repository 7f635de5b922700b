//! What `sockgate check` prints: for every GatewayClass, Gateway, TCPRoute,
//! ReferenceGrant and ListenerPolicy of the input, its identity (with the `apiVersion`
//! it was given) and the status sockgate would write, then
//! the programmed listener/backend table (with each listener's XDP guard), then the
//! endpoints refused because of their address, then the backendRefs without ready
//! endpoint, then what the data path's capacities left out.
use serde::Serialize;

use super::{
    limits::LeftOut,
    reconcile::StatusSet,
    snapshot::{ObjectKey, Snapshot, default_api_version},
};
use crate::{
    backend_filter::RefusedBackend,
    desired::{DesiredState, UnreadyBackendRef},
};

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// GatewayClasses, then Gateways, TCPRoutes, ReferenceGrants and ListenerPolicies,
    /// each by namespace/name.
    pub objects: Vec<ObjectReport>,
    /// The listeners sockgate would serve, by port.
    pub programmed: Vec<ProgrammedListener>,
    /// Endpoints not programmed because their address is refused (loopback,
    /// link-local, ...; `--allow-backend-cidr`), by backendRef and address.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedBackend>,
    /// backendRefs that resolve but have no ready endpoint, by route and backendRef, and
    /// whether their share went to the others (`moved`) or is refused (`refused`).
    #[serde(
        rename = "withoutReadyEndpoints",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub without_ready_endpoints: Vec<UnreadyBackendRef>,
    /// What a capacity of the data path left out: listeners not programmed, endpoints
    /// beyond a listener's limit (`--max-listeners`, ...).
    #[serde(rename = "notProgrammed", skip_serializing_if = "Vec::is_empty")]
    pub not_programmed: Vec<LeftOut>,
}

/// One object and its computed status.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReport {
    /// `apiVersion` as read.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.name` and `metadata.namespace`.
    pub metadata: ReportMeta,
    /// The status sockgate writes; absent when the object is not sockgate's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// Name and namespace.
#[derive(Clone, Debug, Serialize)]
pub struct ReportMeta {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (defaulted), absent for cluster-scoped objects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One programmed listener.
#[derive(Clone, Debug, Serialize)]
pub struct ProgrammedListener {
    /// TCP port.
    pub port: u16,
    /// The node's addresses it is served on (its Gateway's `spec.addresses` that are
    /// the node's); absent: every address of the node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// `namespace/gateway/listener`.
    pub listener: String,
    /// The route carrying traffic (`namespace/name`); absent: connections are rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Data path entries, in `GW_BACKENDS` index order.
    pub backends: Vec<ProgrammedBackend>,
    /// The XDP guard's policy of this listener, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<crate::xdp::ListenerGuard>,
}

/// One `GW_BACKENDS` entry.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgrammedBackend {
    /// The backendRef it comes from (`namespace/service:port`).
    pub backend_ref: String,
    /// Endpoint `address:port`; absent for an invalid backendRef.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `true` when connections picked for this entry are rejected.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reject: bool,
    /// Integer weight in the data path.
    pub weight: u32,
}

fn meta(key: ObjectKey) -> ReportMeta {
    ReportMeta {
        name: key.name,
        namespace: (!key.namespace.is_empty()).then_some(key.namespace),
    }
}

fn to_value<T: Serialize>(v: &T) -> Option<serde_json::Value> {
    serde_json::to_value(v).ok()
}

/// The `apiVersion` an object was given (the version sockgate writes when unknown).
fn api_version(snap: &Snapshot, kind: &'static str, key: &ObjectKey) -> String {
    snap.api_versions
        .get(&(kind, key.clone()))
        .map_or_else(|| default_api_version(kind).to_owned(), Clone::clone)
}

/// Builds the report of a reconciled snapshot.
pub fn build(snap: &Snapshot, desired: &DesiredState, status: &StatusSet) -> Report {
    let mut classes: Vec<_> = snap
        .gateway_classes
        .iter()
        .map(|c| ObjectKey::of(&c.metadata, false))
        .collect();
    classes.sort();
    let mut gateways: Vec<_> = snap
        .gateways
        .iter()
        .map(|g| ObjectKey::of(&g.metadata, true))
        .collect();
    gateways.sort();
    let mut routes: Vec<_> = snap
        .tcp_routes
        .iter()
        .map(|r| (ObjectKey::of(&r.route.metadata, true), r.version))
        .collect();
    routes.sort();
    let mut objects = Vec::new();
    for k in classes {
        objects.push(ObjectReport {
            api_version: api_version(snap, "GatewayClass", &k),
            kind: "GatewayClass".into(),
            status: status.gateway_classes.get(&k.name).and_then(to_value),
            metadata: meta(k),
        });
    }
    for k in gateways {
        objects.push(ObjectReport {
            api_version: api_version(snap, "Gateway", &k),
            kind: "Gateway".into(),
            status: status.gateways.get(&k).and_then(to_value),
            metadata: meta(k),
        });
    }
    for (k, version) in routes {
        objects.push(ObjectReport {
            api_version: version.api_version().into(),
            kind: "TCPRoute".into(),
            status: status.tcp_routes.get(&k).and_then(to_value),
            metadata: meta(k),
        });
    }
    let mut grants: Vec<_> = snap
        .reference_grants
        .iter()
        .map(|g| ObjectKey::of(&g.metadata, true))
        .collect();
    grants.sort();
    for k in grants {
        objects.push(ObjectReport {
            api_version: api_version(snap, "ReferenceGrant", &k),
            kind: "ReferenceGrant".into(),
            status: None,
            metadata: meta(k),
        });
    }
    let mut policies: Vec<_> = snap
        .listener_policies
        .iter()
        .map(|p| ObjectKey::of(&p.metadata, true))
        .collect();
    policies.sort();
    for k in policies {
        objects.push(ObjectReport {
            api_version: api_version(snap, "ListenerPolicy", &k),
            kind: "ListenerPolicy".into(),
            status: status.listener_policies.get(&k).and_then(to_value),
            metadata: meta(k),
        });
    }
    let programmed = desired
        .listeners
        .values()
        .map(|l| ProgrammedListener {
            port: l.port,
            addresses: l.addresses.iter().map(ToString::to_string).collect(),
            listener: l.origin.clone(),
            route: l.route.clone(),
            backends: l
                .backends
                .iter()
                .map(|b| ProgrammedBackend {
                    backend_ref: b.backend_ref.clone(),
                    address: b.addr.map(|a| a.to_string()),
                    reject: b.addr.is_none(),
                    weight: b.weight,
                })
                .collect(),
            guard: desired.guards.get(&l.port).cloned(),
        })
        .collect();
    Report {
        objects,
        programmed,
        refused: desired.refused.clone(),
        without_ready_endpoints: desired.unready.clone(),
        not_programmed: desired.left_out.clone(),
    }
}
