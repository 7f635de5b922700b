//! The desired state: what the data path serves, computed by the model from the
//! Gateway API objects (or, before the model, from a fixed table).
//!
//! It is plain data: listeners by port, each with its backends and weights. The map
//! writer turns it into `GW_LISTENERS` / `GW_BACKENDS` entries, and the proxy reads it
//! through a `tokio::sync::watch` channel, so established connections keep their
//! backend while new connections see the new state.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

/// Everything the node serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DesiredState {
    /// Bumped by the producer on every change; written to `ListenerInfo::generation`.
    pub generation: u32,
    /// TCP listeners by port.
    pub listeners: BTreeMap<u16, Listener>,
    /// The XDP listener guard's policy by listener port (from `ListenerPolicy`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub guards: BTreeMap<u16, crate::xdp::ListenerGuard>,
    /// Endpoints left out because their address is refused (loopback, link-local, ...;
    /// see [`crate::backend_filter`]), sorted, each once. Not programmed: for logs,
    /// metrics and `sockgate check`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<crate::backend_filter::RefusedBackend>,
    /// What a capacity of the data path left out (listeners not programmed, endpoints
    /// beyond a listener's limit; see [`crate::model::limits`]), sorted. For logs,
    /// metrics and `sockgate check`; status says it too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<crate::model::limits::LeftOut>,
    /// backendRefs (weight > 0) that resolve but have no ready endpoint, by route and
    /// backendRef, each once. Not programmed: for metrics and `sockgate check`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unready: Vec<UnreadyBackendRef>,
}

/// A backendRef that resolves but has no ready endpoint.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct UnreadyBackendRef {
    /// The route (`namespace/name`).
    pub route: String,
    /// The backendRef (`namespace/service:port`).
    pub backend_ref: String,
    /// What became of its share.
    pub share: UnreadyShare,
}

/// What becomes of the share of a backendRef without ready endpoint.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum UnreadyShare {
    /// It went to the backendRefs of the rule that have ready endpoints.
    Moved,
    /// No backendRef of the rule has a ready endpoint: its connections are refused.
    Refused,
}

impl UnreadyShare {
    /// Both, in the order the metric lists them.
    pub const ALL: [Self; 2] = [Self::Moved, Self::Refused];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Moved => "moved",
            Self::Refused => "refused",
        }
    }
}

/// One TCP listener port and where its connections go.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listener {
    /// The TCP port.
    pub port: u16,
    /// The node's addresses it is served on (its Gateway's `spec.addresses` that are
    /// this node's), sorted; empty: every address of the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// Where this listener comes from, for logs and status: `namespace/gateway/listener`.
    pub origin: String,
    /// The route carrying traffic (`namespace/name`), if any.
    pub route: Option<String>,
    /// Weighted backends, in a stable order (their index in `GW_BACKENDS`).
    pub backends: Vec<Backend>,
}

/// One endpoint of a backendRef, or a placeholder for an invalid backendRef.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Backend {
    /// Endpoint address and port; `None` for an invalid backendRef (or one without
    /// ready endpoint when no backendRef of its rule has one), whose weight share is
    /// kept so that its connections are rejected.
    pub addr: Option<SocketAddr>,
    /// Share of new connections; 0 is never picked.
    pub weight: u32,
    /// The backendRef this endpoint comes from (`namespace/service:port`), for logs.
    pub backend_ref: String,
    /// The `EndpointSlice` the endpoint was read from (`namespace/name`), for the access
    /// log; `None` for the `--route` table and invalid backendRefs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_slice: Option<String>,
}

impl DesiredState {
    /// Sum of the weights of `port`'s backends, 0 when the listener is unknown.
    pub fn total_weight(&self, port: u16) -> u64 {
        self.listeners
            .get(&port)
            .map_or(0, |l| l.backends.iter().map(|b| u64::from(b.weight)).sum())
    }

    /// The backendRef (`namespace/service:port`) of listener `port`'s backend endpoint
    /// `addr`, when the listener has it.
    pub fn backend_ref(&self, port: u16, addr: SocketAddr) -> Option<&str> {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let addr = canonical(addr);
        self.listeners
            .get(&port)?
            .backends
            .iter()
            .find(|b| b.addr.map(canonical) == Some(addr))
            .map(|b| b.backend_ref.as_str())
            .filter(|r| !r.is_empty())
    }
}
