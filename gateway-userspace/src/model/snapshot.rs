//! The input of [`reconcile`](super::reconcile): every object the model reads, as the
//! generated Gateway API and Kubernetes types, plus the parameters that are not objects
//! (controller name, current time, the backend addresses allowed, the data path's
//! capacities, the CRDs' bundle version, the node's addresses).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use gateway_api::experimental::{
    gatewayclasses::GatewayClass, gateways::Gateway, referencegrants::ReferenceGrant,
    tcproutes::TcpRoute,
};
use k8s_openapi::{
    api::{core::v1::Namespace, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::Serialize;

use crate::backend_filter::BackendFilter;

/// The served version a TCPRoute was read in.
///
/// Both have the same schema; `v1` allows exactly one rule. A `v1` route is held in
/// the crate's `v1alpha2` type (the `gateway-api` crate has no `v1` TCPRoute type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TcpRouteVersion {
    /// `gateway.networking.k8s.io/v1alpha2` (experimental channel, up to 16 rules).
    #[default]
    V1alpha2,
    /// `gateway.networking.k8s.io/v1` (Gateway API 1.6 and later, exactly one rule).
    V1,
}

impl TcpRouteVersion {
    /// The `apiVersion` string.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::V1alpha2 => "gateway.networking.k8s.io/v1alpha2",
            Self::V1 => "gateway.networking.k8s.io/v1",
        }
    }
}

/// A TCPRoute and the version it was read in.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpRouteObject {
    /// The served version.
    pub version: TcpRouteVersion,
    /// The route.
    pub route: TcpRoute,
}

/// Every object reconcile reads. Order does not matter: reconcile sorts. Holds at most
/// one object per kind, namespace and name (the API server cannot have two; the file
/// source rejects duplicates).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// GatewayClasses (cluster-scoped).
    pub gateway_classes: Vec<GatewayClass>,
    /// Gateways.
    pub gateways: Vec<Gateway>,
    /// TCPRoutes, `v1alpha2` and `v1`.
    pub tcp_routes: Vec<TcpRouteObject>,
    /// ReferenceGrants.
    pub reference_grants: Vec<ReferenceGrant>,
    /// Namespaces (their labels feed `allowedRoutes.namespaces.selector`).
    pub namespaces: Vec<Namespace>,
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices (tied to Services by the `kubernetes.io/service-name` label).
    pub endpoint_slices: Vec<EndpointSlice>,
    /// `ListenerPolicy` objects (`sockgate.dev`): the XDP guard's policy attachments.
    pub listener_policies: Vec<crate::policy::ListenerPolicy>,
    /// The `apiVersion` each object was given, by kind and key, for the report of
    /// `sockgate check`; reconcile does not read it (the schemas of the served versions
    /// are the same). An object not listed is reported in the version sockgate writes
    /// ([`default_api_version`]); a TCPRoute's own [`TcpRouteObject::version`] wins.
    pub api_versions: BTreeMap<(&'static str, ObjectKey), String>,
}

/// The `apiVersion` an object of `kind` is reported in when its input did not say
/// (the version sockgate writes status in, or watches first).
pub fn default_api_version(kind: &str) -> &'static str {
    match kind {
        "TCPRoute" => TcpRouteVersion::V1alpha2.api_version(),
        "ListenerPolicy" => "sockgate.dev/v1alpha1",
        "Namespace" | "Service" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => "gateway.networking.k8s.io/v1",
    }
}

/// What reconcile needs besides the objects.
#[derive(Clone, Debug)]
pub struct Params {
    /// The `controllerName` of the GatewayClasses sockgate implements.
    pub controller_name: String,
    /// `lastTransitionTime` of the conditions written.
    pub now: Time,
    /// The endpoint addresses that may be programmed (`--allow-backend-cidr`).
    pub backend_filter: BackendFilter,
    /// The data path's capacities (`--max-listeners`, ...): what does not fit is left
    /// out and reported.
    pub limits: super::limits::Limits,
    /// The Gateway API bundle version of the installed CRDs, for the GatewayClass
    /// `SupportedVersion` condition.
    pub crd_bundle: CrdBundle,
    /// This node's addresses (those of its interfaces, loopback excluded): a Gateway
    /// with `spec.addresses` is served on this node when one of them is here, on those
    /// of its addresses only.
    pub node_addresses: BTreeSet<IpAddr>,
    /// The addresses of the other nodes running an agent, as far as this agent knows
    /// them (the kube source: their `Node`'s `InternalIP` / `ExternalIP`): a Gateway
    /// whose addresses are there is served there, so reported `Programmed`, but not
    /// served here.
    pub other_nodes_addresses: BTreeSet<IpAddr>,
}

/// The Gateway API bundle versions of the CRDs, as read from the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CrdBundle {
    /// No CRD was read: the file source and `sockgate check` have none.
    #[default]
    NotRead,
    /// The `gateway.networking.k8s.io/bundle-version` annotation of each CRD read, by
    /// CRD name; `None` when the CRD has no such annotation.
    Read(BTreeMap<String, Option<String>>),
    /// The CRDs could not be read (and never were): why.
    Unreadable(String),
}

/// Namespace and name of an object (`namespace` empty for cluster-scoped objects).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    /// Namespace, `""` for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// The key of an object from its metadata; a missing namespace is `default` for
    /// namespaced objects.
    pub fn of(meta: &ObjectMeta, namespaced: bool) -> Self {
        Self {
            namespace: if namespaced {
                namespace_of(meta).to_owned()
            } else {
                String::new()
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The namespace of a namespaced object, `default` when unset.
pub fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

/// `metadata.generation`, 1 when unset (an object read from a file is at its first
/// generation).
pub fn generation_of(meta: &ObjectMeta) -> i64 {
    meta.generation.unwrap_or(1)
}
