//! The kube source (`sockgate run --source kube`): reflectors on every kind the model
//! reads, a debounced reconcile of their stores, and, on the elected agent, the status
//! writes.
//!
//! * Every watch event marks the state dirty; once the stores have had their first list
//!   and no event came for the debounce interval, the stores are snapshotted and fed to
//!   the same pure [`reconcile`] as the file source.
//! * `TCPRoute` is watched in `v1` where the cluster serves it, else in `v1alpha2`. A
//!   CRD serving both versions holds one set of objects: watching both would count
//!   every route twice, so the newest served version is watched, and routes keep the
//!   version they were read in ([`TcpRouteVersion`]) for the status writes.
//! * `ReferenceGrant` is watched in `v1` where the cluster serves it, else in `v1beta1`
//!   (Gateway API bundles before 1.5 serve only `v1beta1`); the schema is the same. A
//!   cluster serving neither permits no cross-namespace backendRef, said once at start.
//! * `ListenerPolicy` (`sockgate.dev/v1alpha1`, the XDP guard's policy attachment) is
//!   watched when discovery at start finds its CRD; without it the agent says so once
//!   and runs with no policies from the cluster.
//! * Watches restart with backoff when the API server goes away; the data path keeps
//!   serving the last good state meanwhile, said once in the log, and again when the
//!   watches are back.
//! * Gateways with `spec.addresses`: every agent serves those of their addresses its
//!   own interfaces hold ([`KubeOptions::local_addresses`], a change reconciles again);
//!   the status writer reports an address assigned when its own interfaces hold it or
//!   it is an `InternalIP` / `ExternalIP` of another agent node's `Node`
//!   ([`other_agent_nodes_addresses`]).
//! * Every agent programs its own node; only the agent holding the Lease writes status.
//!   It reads the Gateway API bundle version of the CRDs ([`read_crd_bundle`]) when it
//!   starts leading and then at most every [`CRD_REREAD`], for the `GatewayClass`
//!   `SupportedVersion` condition.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use gateway_api::experimental::{
    gatewayclasses::GatewayClass,
    gateways::{Gateway, GatewayStatusAddresses},
    referencegrants::ReferenceGrant,
    tcproutes::TcpRoute,
};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Service},
        discovery::v1::EndpointSlice,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    discovery::{ApiGroup, Discovery},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Lookup, Store, store::Writer},
        watcher,
    },
};
use prometheus_client::metrics::counter::Counter;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    lease::{Elector, LeaseConfig},
    status::{Current, StatusWriter},
};
use crate::{
    desired::DesiredState,
    metrics::Metrics,
    model::{
        CrdBundle, Snapshot, StatusSet, TcpRouteObject, TcpRouteVersion,
        conditions::{ADDRESS_TYPE_IP, BUNDLE_CRDS, BUNDLE_VERSION_ANNOTATION},
        reconcile,
        snapshot::ObjectKey,
    },
    policy::ListenerPolicy,
};

/// The API group of the Gateway API.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Errors of the kube source that stop it.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("no Kubernetes client configuration (in-cluster service account or KUBECONFIG): {0}")]
    Config(#[source] kube::Error),
}

/// How the kube source runs.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// The `controllerName` of sockgate's `GatewayClass` objects.
    pub controller_name: String,
    /// This agent's identity in the election: its node name.
    pub identity: String,
    /// The agent's namespace, where the Lease lives.
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// How long a leader keeps the Lease without renewing it.
    pub lease_duration: Duration,
    /// Labels of the nodes that run an agent (the `DaemonSet`'s node selector); a Gateway
    /// without `spec.addresses` is reachable on their `InternalIP`s.
    pub node_selector: BTreeMap<String, String>,
    /// Quiet time after the last event before a reconcile.
    pub debounce: Duration,
    /// Where this node's addresses are published ([`node_addresses`] of the `Node`
    /// named `identity`), e.g. for the XDP guard's default interfaces.
    pub node_addresses: Option<watch::Sender<BTreeSet<IpAddr>>>,
    /// This node's own addresses (its interfaces, followed), for Gateways with
    /// `spec.addresses`: a change reconciles again. `None`: none (tests).
    pub local_addresses: Option<watch::Receiver<BTreeSet<IpAddr>>>,
    /// While `ListenerPolicy` is not served, how often discovery looks for it again, so
    /// that a CRD installed after the agents started is watched without a restart.
    pub policy_rediscovery: Duration,
    /// The data path's capacities (`--max-listeners`, ...).
    pub limits: crate::model::limits::Limits,
    /// The endpoint addresses that may be programmed (`--allow-backend-cidr`).
    pub backend_filter: crate::backend_filter::BackendFilter,
}

/// The `ApiResource` of `TCPRoute` in `version`.
pub fn route_resource(version: TcpRouteVersion) -> ApiResource {
    let v = match version {
        TcpRouteVersion::V1 => "v1",
        TcpRouteVersion::V1alpha2 => "v1alpha2",
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GATEWAY_GROUP, v, "TCPRoute"),
        "tcproutes",
    )
}

/// Whether the cluster serves `ListenerPolicy` in the version the agent reads
/// (`sockgate.dev/v1alpha1`), from the discovery of the `sockgate.dev` group (`None`:
/// the group is not served at all).
pub fn serves_listener_policies(group: Option<&ApiGroup>) -> bool {
    let version = <ListenerPolicy as Resource>::version(&());
    let kind = <ListenerPolicy as Resource>::kind(&());
    let plural = <ListenerPolicy as Resource>::plural(&());
    group.is_some_and(|g| {
        g.versioned_resources(&version)
            .iter()
            .any(|(r, _)| r.kind == kind && r.plural == plural)
    })
}

/// The `TCPRoute` version to watch among the versions the cluster serves.
pub fn choose_route_version(served: &[String]) -> Option<TcpRouteVersion> {
    if served.iter().any(|v| v == "v1") {
        Some(TcpRouteVersion::V1)
    } else if served.iter().any(|v| v == "v1alpha2") {
        Some(TcpRouteVersion::V1alpha2)
    } else {
        None
    }
}

/// The `ReferenceGrant` version to watch among the versions the cluster serves: `v1`
/// where served, else `v1beta1`, else none.
pub fn choose_grant_version(served: &[String]) -> Option<&'static str> {
    ["v1", "v1beta1"]
        .into_iter()
        .find(|v| served.iter().any(|s| s == v))
}

/// The `ApiResource` of `ReferenceGrant` in `version` (`v1` or `v1beta1`).
pub fn grant_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GATEWAY_GROUP, version, "ReferenceGrant"),
        "referencegrants",
    )
}

/// The versions of the Gateway API group in which the cluster serves `kind`.
fn served_versions(group: Option<&ApiGroup>, kind: &str) -> Vec<String> {
    group
        .map(|group| {
            group
                .versions()
                .filter(|v| {
                    group
                        .versioned_resources(v)
                        .iter()
                        .any(|(ar, _)| ar.kind == kind)
                })
                .map(ToOwned::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The HTTP status of a watch failure the API server answered.
fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// Logs the state of the watches once per change: the first failure, and the recovery.
/// A kind the API server refuses (403: the RBAC does not grant it; 404: no longer
/// served, its CRD removed) is said once for that kind, with its cause, not as an
/// unreachable server.
#[derive(Default)]
struct Health {
    failing: Mutex<BTreeSet<&'static str>>,
    refused: Mutex<BTreeSet<&'static str>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Health {
    fn ok(&self, kind: &'static str) {
        if locked(&self.refused).remove(kind) {
            info!(kind, "watch restored");
        }
        let mut f = locked(&self.failing);
        if f.remove(kind) && f.is_empty() {
            info!("watches restored: the Kubernetes API server answers again");
        }
    }

    fn failed(&self, kind: &'static str, e: &watcher::Error) {
        match status_code(e) {
            Some(403) => {
                if locked(&self.refused).insert(kind) {
                    error!(
                        kind,
                        error = %e,
                        "watch forbidden: the agent's RBAC does not grant this kind (apply deploy/rbac.yaml); retrying with backoff (the first state waits for every kind's list)"
                    );
                }
                return;
            }
            Some(404) => {
                if locked(&self.refused).insert(kind) {
                    warn!(
                        kind,
                        error = %e,
                        "kind no longer served (its CRD removed?); the watch retries with backoff"
                    );
                }
                return;
            }
            _ => {}
        }
        let mut f = locked(&self.failing);
        if f.is_empty() {
            error!(
                kind,
                error = %e,
                "Kubernetes API server unreachable: watches retry with backoff; the data path keeps serving the last good state"
            );
        }
        f.insert(kind);
    }
}

/// Runs one reflector until `shutdown`: its events fill `writer`'s store and mark the
/// state dirty.
fn reflect<K>(
    api: Api<K>,
    writer: Writer<K>,
    kind: &'static str,
    dirty: Arc<Notify>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                n = stream.next() => n,
            };
            match next {
                // `Init` says a (re)list starts, not that the API server answered.
                Some(Ok(watcher::Event::Init)) => {}
                Some(Ok(_)) => {
                    health.ok(kind);
                    dirty.notify_one();
                }
                Some(Err(e)) => health.failed(kind, &e),
                None => return,
            }
        }
    });
}

/// The reflector stores of every watched kind.
#[derive(Clone)]
pub struct Stores {
    classes: Store<GatewayClass>,
    gateways: Store<Gateway>,
    routes: Store<DynamicObject>,
    route_version: TcpRouteVersion,
    /// `None` when the cluster serves no `ReferenceGrant`.
    grants: Option<Store<DynamicObject>>,
    /// The `ReferenceGrant` version watched.
    grant_version: Option<&'static str>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Unset while the cluster does not serve `ListenerPolicy`.
    policies: std::sync::OnceLock<Store<ListenerPolicy>>,
}

fn owned<K>(store: &Store<K>) -> Vec<K>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

impl Stores {
    /// Starts a reflector per kind.
    fn start(
        client: &Client,
        found: Discovered,
        dirty: &Arc<Notify>,
        health: &Arc<Health>,
        shutdown: &CancellationToken,
    ) -> Self {
        macro_rules! watched {
            ($ty:ty, $kind:literal) => {{
                let (store, writer) = reflector::store::<$ty>();
                reflect(
                    Api::<$ty>::all(client.clone()),
                    writer,
                    $kind,
                    dirty.clone(),
                    health.clone(),
                    shutdown.clone(),
                );
                store
            }};
        }
        let route_version = found.route_version;
        let ar = route_resource(route_version);
        let writer = Writer::<DynamicObject>::new(ar.clone());
        let routes = writer.as_reader();
        reflect(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            writer,
            "TCPRoute",
            dirty.clone(),
            health.clone(),
            shutdown.clone(),
        );
        let grant_version = found.grant_version;
        let grants = grant_version.map(|v| {
            let ar = grant_resource(v);
            let writer = Writer::<DynamicObject>::new(ar.clone());
            let store = writer.as_reader();
            reflect(
                Api::<DynamicObject>::all_with(client.clone(), &ar),
                writer,
                "ReferenceGrant",
                dirty.clone(),
                health.clone(),
                shutdown.clone(),
            );
            store
        });
        let stores = Self {
            classes: watched!(GatewayClass, "GatewayClass"),
            gateways: watched!(Gateway, "Gateway"),
            routes,
            route_version,
            grants,
            grant_version,
            namespaces: watched!(Namespace, "Namespace"),
            services: watched!(Service, "Service"),
            slices: watched!(EndpointSlice, "EndpointSlice"),
            nodes: watched!(Node, "Node"),
            policies: std::sync::OnceLock::new(),
        };
        if found.listener_policies {
            stores.watch_policies(client, dirty, health, shutdown);
        }
        stores
    }

    /// Starts the `ListenerPolicy` reflector (once).
    fn watch_policies(
        &self,
        client: &Client,
        dirty: &Arc<Notify>,
        health: &Arc<Health>,
        shutdown: &CancellationToken,
    ) {
        self.policies.get_or_init(|| {
            let (store, writer) = reflector::store::<ListenerPolicy>();
            reflect(
                Api::<ListenerPolicy>::all(client.clone()),
                writer,
                "ListenerPolicy",
                dirty.clone(),
                health.clone(),
                shutdown.clone(),
            );
            store
        });
    }

    /// Whether every store has had its first full list.
    async fn ready(&self) -> bool {
        self.classes.wait_until_ready().await.is_ok()
            && self.gateways.wait_until_ready().await.is_ok()
            && self.routes.wait_until_ready().await.is_ok()
            && match &self.grants {
                Some(g) => g.wait_until_ready().await.is_ok(),
                None => true,
            }
            && self.namespaces.wait_until_ready().await.is_ok()
            && self.services.wait_until_ready().await.is_ok()
            && self.slices.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && match self.policies.get() {
                Some(p) => p.wait_until_ready().await.is_ok(),
                None => true,
            }
    }

    /// The objects now in the stores, as the model reads them.
    pub fn snapshot(&self) -> Snapshot {
        let tcp_routes = self
            .routes
            .state()
            .iter()
            .filter_map(|o| {
                let v = serde_json::to_value(&**o).ok()?;
                match serde_json::from_value::<TcpRoute>(v) {
                    Ok(route) => Some(TcpRouteObject {
                        version: self.route_version,
                        route,
                    }),
                    Err(e) => {
                        warn!(route = %o.name_any(), error = %e, "TCPRoute does not parse; ignored");
                        None
                    }
                }
            })
            .collect();
        let mut api_versions = BTreeMap::new();
        let reference_grants = self
            .grants
            .iter()
            .flat_map(Store::state)
            .filter_map(|o| {
                let v = serde_json::to_value(&*o).ok()?;
                match serde_json::from_value::<ReferenceGrant>(v) {
                    Ok(grant) => Some(grant),
                    Err(e) => {
                        warn!(grant = %o.name_any(), error = %e, "ReferenceGrant does not parse; ignored");
                        None
                    }
                }
            })
            .inspect(|g| {
                if let Some(v) = self.grant_version {
                    api_versions.insert(
                        ("ReferenceGrant", ObjectKey::of(&g.metadata, true)),
                        format!("{GATEWAY_GROUP}/{v}"),
                    );
                }
            })
            .collect();
        Snapshot {
            gateway_classes: owned(&self.classes),
            gateways: owned(&self.gateways),
            tcp_routes,
            reference_grants,
            api_versions,
            namespaces: owned(&self.namespaces),
            services: owned(&self.services),
            endpoint_slices: owned(&self.slices),
            listener_policies: self.policies.get().map(owned).unwrap_or_default(),
        }
    }

    /// The status each object has in the cluster now.
    pub fn current(&self) -> Current {
        let key = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            ObjectKey::of(meta, true)
        };
        let json = |v: Option<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
        Current {
            gateway_classes: self
                .classes
                .state()
                .iter()
                .map(|c| {
                    (
                        c.name_any(),
                        json(c.status.as_ref().and_then(|s| serde_json::to_value(s).ok())),
                    )
                })
                .collect(),
            gateways: self
                .gateways
                .state()
                .iter()
                .map(|g| {
                    (
                        key(&g.metadata),
                        json(g.status.as_ref().and_then(|s| serde_json::to_value(s).ok())),
                    )
                })
                .collect(),
            tcp_routes: self
                .routes
                .state()
                .iter()
                .map(|r| (key(&r.metadata), json(r.data.get("status").cloned())))
                .collect(),
            listener_policies: self
                .policies
                .get()
                .into_iter()
                .flat_map(Store::state)
                .map(|p| {
                    (
                        key(&p.metadata),
                        json(p.status.as_ref().and_then(|s| serde_json::to_value(s).ok())),
                    )
                })
                .collect(),
        }
    }

    /// The nodes in the store.
    pub fn nodes(&self) -> Vec<Node> {
        owned(&self.nodes)
    }
}

/// Fills `status.addresses` of every Gateway without `spec.addresses` (the model
/// filled in those with: the addresses served) with the `InternalIP` of every node
/// matching `node_selector` (the nodes that run an agent, where every listener is
/// served), sorted.
pub fn fill_addresses(
    set: &mut StatusSet,
    nodes: &[Node],
    node_selector: &BTreeMap<String, String>,
) {
    let mut node_ips: Vec<String> = nodes
        .iter()
        .filter(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            node_selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .flat_map(|n| {
            n.status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter(|a| a.type_ == "InternalIP")
                .map(|a| a.address.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    node_ips.sort();
    node_ips.dedup();
    for status in set.gateways.values_mut() {
        if status.addresses.is_none() {
            status.addresses = Some(
                node_ips
                    .iter()
                    .map(|ip| GatewayStatusAddresses {
                        r#type: Some(ADDRESS_TYPE_IP.to_owned()),
                        value: ip.clone(),
                    })
                    .collect(),
            );
        }
    }
}

/// The `InternalIP` and `ExternalIP` addresses of the `Node` named `name` (hostnames
/// and unparsable values skipped).
pub fn node_addresses(nodes: &[Node], name: &str) -> BTreeSet<IpAddr> {
    nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(name))
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// What discovery found at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// The `TCPRoute` version watched.
    pub route_version: TcpRouteVersion,
    /// The `ReferenceGrant` version watched (`v1` or `v1beta1`), `None` when the
    /// cluster serves neither.
    pub grant_version: Option<&'static str>,
    /// Whether `ListenerPolicy` is served (its CRD is installed), so watched.
    pub listener_policies: bool,
}

/// Finds the `TCPRoute` version to watch and whether `ListenerPolicy` is served, in one
/// discovery of the two groups, retrying with backoff (logged once) while the API
/// server does not answer or serves no `TCPRoute`.
async fn discover(client: &Client, shutdown: &CancellationToken) -> Option<Discovered> {
    let mut delay = Duration::from_millis(500);
    let mut said = false;
    let policy_group = <ListenerPolicy as Resource>::group(&()).into_owned();
    loop {
        match Discovery::new(client.clone())
            .filter(&[GATEWAY_GROUP, &policy_group])
            .run()
            .await
        {
            Ok(found) => {
                let served = served_versions(found.get(GATEWAY_GROUP), "TCPRoute");
                if let Some(v) = choose_route_version(&served) {
                    info!(version = v.api_version(), served = ?served, "watching TCPRoute");
                    let grants = served_versions(found.get(GATEWAY_GROUP), "ReferenceGrant");
                    let grant_version = choose_grant_version(&grants);
                    if let Some(g) = grant_version {
                        info!(version = %format!("{GATEWAY_GROUP}/{g}"), served = ?grants, "watching ReferenceGrant");
                    } else {
                        warn!(
                            "the cluster serves no ReferenceGrant: cross-namespace backendRefs are not permitted"
                        );
                    }
                    let listener_policies = serves_listener_policies(found.get(&policy_group));
                    if listener_policies {
                        info!("watching ListenerPolicy: XDP policies from the cluster");
                    } else {
                        info!(
                            "ListenerPolicy CRD not installed; XDP policies from the cluster are off"
                        );
                    }
                    return Some(Discovered {
                        route_version: v,
                        grant_version,
                        listener_policies,
                    });
                }
                if !said {
                    error!(
                        "the cluster serves no TCPRoute: install the Gateway API experimental CRDs; retrying"
                    );
                    said = true;
                }
            }
            Err(e) => {
                if !said {
                    error!(
                        error = %e,
                        "Kubernetes API server unreachable: retrying with backoff; the data path keeps serving the last good state"
                    );
                    said = true;
                }
            }
        }
        debug!(
            retry_in_ms = delay.as_millis(),
            "API discovery failed; retrying"
        );
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Longest the reconcile loop waits for one of its own API calls (a status write, the
/// CRDs' reading). The API client has no read timeout (kube-client's default: only
/// watches have an idle timeout), so without this bound a hung API server would hold
/// the loop, and with it every later change of the programmed state, for as long as
/// the hang lasts.
pub const API_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a reading of the CRDs' bundle version is used before it is read again (at
/// the next status write after that).
pub const CRD_REREAD: Duration = Duration::from_mins(10);

/// The `gateway.networking.k8s.io/bundle-version` annotation of each CRD of
/// [`BUNDLE_CRDS`] that exists, by name (`None`: no annotation). Reads metadata only,
/// one `get` per CRD.
pub async fn read_crd_bundle(
    client: &Client,
) -> Result<BTreeMap<String, Option<String>>, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut out = BTreeMap::new();
    for name in BUNDLE_CRDS {
        if let Some(crd) = api.get_metadata_opt(name).await? {
            let version = crd
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(BUNDLE_VERSION_ANNOTATION))
                .cloned();
            out.insert(name.to_owned(), version);
        }
    }
    Ok(out)
}

/// The elected agent's reading of the CRDs' bundle version.
struct CrdBundleReader {
    client: Client,
    bundle: CrdBundle,
    read_at: Option<tokio::time::Instant>,
    /// A failure was said (said again only after a success).
    said: bool,
}

impl CrdBundleReader {
    fn new(client: Client) -> Self {
        Self {
            client,
            bundle: CrdBundle::NotRead,
            read_at: None,
            said: false,
        }
    }

    /// The parameters of a reconcile round; the elected agent's (`leading`) carry the
    /// CRDs' bundle version, the only status input that is not an object.
    async fn params(
        &mut self,
        opts: &KubeOptions,
        leading: &watch::Receiver<bool>,
        nodes: &[Node],
    ) -> crate::model::Params {
        let mut params =
            crate::source::params_now(&opts.controller_name, &opts.backend_filter, opts.limits);
        if let Some(local) = &opts.local_addresses {
            params.node_addresses.clone_from(&local.borrow());
        }
        params.other_nodes_addresses =
            other_agent_nodes_addresses(nodes, &opts.identity, &opts.node_selector);
        let leading = *leading.borrow();
        if leading {
            params.crd_bundle = self.get().await;
        }
        params
    }

    /// The reading, read again first when it is older than [`CRD_REREAD`] (or none).
    async fn get(&mut self) -> CrdBundle {
        let now = tokio::time::Instant::now();
        if self
            .read_at
            .is_some_and(|t| now.duration_since(t) < CRD_REREAD)
        {
            return self.bundle.clone();
        }
        self.read_at = Some(now);
        let read = match tokio::time::timeout(API_CALL_TIMEOUT, read_crd_bundle(&self.client)).await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no answer from the Kubernetes API server within {} ms",
                API_CALL_TIMEOUT.as_millis()
            )),
        };
        match read {
            Ok(crds) => {
                if self.said {
                    info!("Gateway API CRDs read again");
                }
                self.said = false;
                debug!(crds = ?crds, "Gateway API CRD bundle versions");
                self.bundle = CrdBundle::Read(crds);
            }
            Err(e) => {
                if !self.said {
                    warn!(
                        error = %e,
                        "reading the Gateway API CRDs' bundle version failed (the agent's RBAC needs get on their customresourcedefinitions: apply deploy/rbac.yaml); keeping the last reading"
                    );
                    self.said = true;
                }
                if !matches!(self.bundle, CrdBundle::Read(_)) {
                    self.bundle = CrdBundle::Unreadable(e);
                }
            }
        }
        self.bundle.clone()
    }
}

/// Keeps the election going until `shutdown`, then releases the lease.
///
/// A round may take at most `every` (the renew interval): one that the API server does
/// not answer by then (a hung server holds requests open for minutes) counts as failed,
/// so the agent stops believing it leads and says so. The first failure is a warning,
/// the rounds that keep failing are debug lines, and the first success after them says
/// the API server answers again.
async fn elect(
    mut elector: Elector,
    every: Duration,
    leading: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    loop {
        let round = tokio::select! {
            () = shutdown.cancelled() => break,
            r = tokio::time::timeout(every, elector.round(k8s_openapi::jiff::Timestamp::now())) => r,
        };
        let failure = match round {
            Ok(Ok(l)) => {
                if std::mem::take(&mut failing) {
                    info!(leading = l, "leader election rounds succeed again");
                }
                leading.send_if_modified(|was| std::mem::replace(was, l) != l);
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "no answer from the Kubernetes API server within {} ms",
                every.as_millis()
            )),
        };
        if let Some(error) = failure {
            if std::mem::replace(&mut failing, true) {
                debug!(error, "leader election round failed");
            } else {
                warn!(
                    error,
                    retry_every_ms = every.as_millis(),
                    "leader election round failed: not writing status until a round succeeds (said once until then)"
                );
            }
            leading.send_if_modified(|was| std::mem::replace(was, false));
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    match tokio::time::timeout(every, elector.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "releasing the lease"),
        Err(_) => warn!("releasing the lease: no answer from the Kubernetes API server"),
    }
}

/// The counters the kube source adds to.
#[derive(Clone, Debug, Default)]
pub struct SourceCounters {
    /// Status writes sent.
    pub status_writes: Counter,
    /// Status writes that failed.
    pub errors: Counter,
    /// Set once the initial lists are done and their state is programmed.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

impl SourceCounters {
    /// The agent's own counters.
    pub fn of(metrics: &Metrics) -> Self {
        Self {
            status_writes: metrics.status_writes.clone(),
            errors: metrics.reconcile_errors.clone(),
            ready: metrics.source_ready.clone(),
        }
    }
}

/// Writes `status` (bounded by [`API_CALL_TIMEOUT`]), counting and saying a failure;
/// the next change retries.
async fn write_status(
    writer: &mut StatusWriter,
    status: &StatusSet,
    current: &Current,
    counters: &SourceCounters,
) {
    match tokio::time::timeout(API_CALL_TIMEOUT, writer.write(status, current)).await {
        Ok(Ok(n)) => {
            counters.status_writes.inc_by(n);
        }
        Ok(Err(e)) => {
            counters.errors.inc();
            warn!(error = %e, "status write failed; retried on the next change");
        }
        Err(_) => {
            counters.errors.inc();
            warn!(
                timeout_ms = API_CALL_TIMEOUT.as_millis(),
                "status write got no answer from the Kubernetes API server; retried on the next change"
            );
        }
    }
}

/// Runs the kube source until `shutdown`: each new desired state is programmed with
/// `program` and sent on `tx`; the elected agent writes status.
pub async fn run(
    client: Client,
    opts: KubeOptions,
    tx: watch::Sender<Arc<DesiredState>>,
    mut program: impl FnMut(&DesiredState) + Send,
    counters: SourceCounters,
    shutdown: CancellationToken,
) {
    counters
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let Some(found) = discover(&client, &shutdown).await else {
        return;
    };
    let version = found.route_version;
    let dirty = Arc::new(Notify::new());
    let health = Arc::new(Health::default());
    let stores = Stores::start(&client, found, &dirty, &health, &shutdown);
    let (leading_tx, mut leading) = watch::channel(false);
    let elector = Elector::new(
        client.clone(),
        LeaseConfig {
            name: opts.lease_name.clone(),
            namespace: opts.namespace.clone(),
            identity: opts.identity.clone(),
            duration: opts.lease_duration,
        },
    );
    tokio::spawn(elect(
        elector,
        opts.lease_duration / 3,
        leading_tx,
        shutdown.clone(),
    ));
    let mut rediscover = PolicyRediscovery::new(
        client.clone(),
        found.listener_policies,
        opts.policy_rediscovery,
    );
    let mut crds = CrdBundleReader::new(client.clone());
    let mut writer = StatusWriter::new(client, &opts.controller_name, route_resource(version));
    let mut local = opts.local_addresses.clone();
    tokio::select! {
        () = shutdown.cancelled() => return,
        ready = stores.ready() => if !ready { return },
    }
    info!("initial lists done: programming from the cluster's objects");
    loop {
        let snap = stores.snapshot();
        let params = crds.params(&opts, &leading, &stores.nodes()).await;
        let (mut desired, mut status) = reconcile(&snap, &params);
        {
            let current = tx.borrow();
            desired.generation = if desired.listeners == current.listeners {
                current.generation
            } else {
                current.generation.wrapping_add(1)
            };
        }
        if **tx.borrow() != desired {
            info!(
                generation = desired.generation,
                listeners = desired.listeners.len(),
                "cluster objects changed: new desired state"
            );
            program(&desired);
            let _ = tx.send(Arc::new(desired));
        }
        publish_node_addresses(&opts, &stores);
        counters
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if *leading.borrow_and_update() {
            fill_addresses(&mut status, &stores.nodes(), &opts.node_selector);
            write_status(&mut writer, &status, &stores.current(), &counters).await;
        }
        // Wait for a change (or a new leadership, or new node addresses), then for
        // quiet.
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = dirty.notified() => break,
                _ = leading.changed() => break,
                () = local_changed(local.as_mut()) => break,
                found = rediscover.found() => if found {
                    stores.watch_policies(&rediscover.client, &dirty, &health, &shutdown);
                },
            }
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = dirty.notified() => {}
                () = tokio::time::sleep(opts.debounce) => break,
            }
        }
    }
}

/// Waits for this node's addresses to change (forever without them, or once their
/// sender is gone).
async fn local_changed(local: Option<&mut watch::Receiver<BTreeSet<IpAddr>>>) {
    if let Some(rx) = local
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await;
}

/// The `InternalIP` and `ExternalIP` addresses of the nodes running an agent (those
/// matching `node_selector`) but this one (`identity`): a Gateway whose
/// `spec.addresses` are there is served there.
pub fn other_agent_nodes_addresses(
    nodes: &[Node],
    identity: &str,
    node_selector: &BTreeMap<String, String>,
) -> BTreeSet<IpAddr> {
    nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(identity))
        .filter(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            node_selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect()
}

/// Publishes this node's addresses ([`KubeOptions::node_addresses`]) when they changed.
fn publish_node_addresses(opts: &KubeOptions, stores: &Stores) {
    if let Some(tx) = &opts.node_addresses {
        let addrs = node_addresses(&stores.nodes(), &opts.identity);
        tx.send_if_modified(|old| std::mem::replace(old, addrs.clone()) != addrs);
    }
}

/// While the cluster does not serve `ListenerPolicy`: its discovery, now and then.
struct PolicyRediscovery {
    client: Client,
    /// `None` once served (or served from the start).
    interval: Option<tokio::time::Interval>,
}

impl PolicyRediscovery {
    fn new(client: Client, served: bool, every: Duration) -> Self {
        let interval =
            (!served).then(|| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
        Self { client, interval }
    }

    /// Waits for the next discovery (forever once served); true when it found the CRD.
    async fn found(&mut self) -> bool {
        let Some(interval) = self.interval.as_mut() else {
            return std::future::pending().await;
        };
        interval.tick().await;
        if !policies_served(&self.client).await {
            return false;
        }
        info!(
            "ListenerPolicy CRD installed: watching ListenerPolicy, XDP policies from the cluster"
        );
        self.interval = None;
        true
    }
}

/// Whether the cluster serves `ListenerPolicy` now (one discovery of its group; a
/// failure counts as not served, and is tried again at the next tick).
async fn policies_served(client: &Client) -> bool {
    let group = <ListenerPolicy as Resource>::group(&()).into_owned();
    match Discovery::new(client.clone()).filter(&[&group]).run().await {
        Ok(found) => serves_listener_policies(found.get(&group)),
        Err(e) => {
            debug!(error = %e, "ListenerPolicy discovery failed; tried again later");
            false
        }
    }
}

/// A client from the in-cluster service account or `KUBECONFIG`.
pub async fn client() -> Result<Client, KubeSourceError> {
    Client::try_default().await.map_err(KubeSourceError::Config)
}

#[cfg(test)]
mod tests;
