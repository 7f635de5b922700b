//! Condition types and reasons, spelled exactly as the Gateway API defines them
//! (`apis/v1/gateway_types.go`, `gatewayclass_types.go`, `shared_types.go`).
//!
//! Every condition sockgate writes uses one of these constants; no string literal for a
//! type or reason appears anywhere else. One reason is sockgate's own, where the Gateway
//! API has none that fits: [`reasons::TOO_MANY_ENDPOINTS`].

/// Condition status `"True"`.
pub const TRUE: &str = "True";
/// Condition status `"False"`.
pub const FALSE: &str = "False";

/// Condition types.
pub mod types {
    /// GatewayClass, Gateway, listener and route: the object is valid and accepted.
    pub const ACCEPTED: &str = "Accepted";
    /// Gateway and listener: the configuration is in the data path.
    pub const PROGRAMMED: &str = "Programmed";
    /// Listener and route: every reference resolved.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// Listener: it conflicts with another listener.
    pub const CONFLICTED: &str = "Conflicted";
    /// Route: some rules are valid, others were dropped.
    pub const PARTIALLY_INVALID: &str = "PartiallyInvalid";
    /// GatewayClass: the Gateway API version of the installed CRDs is supported.
    pub const SUPPORTED_VERSION: &str = "SupportedVersion";
}

/// Condition reasons.
pub mod reasons {
    /// `Accepted=True` (GatewayClass, Gateway, listener, route).
    pub const ACCEPTED: &str = "Accepted";
    /// `Programmed=True` (Gateway, listener).
    pub const PROGRAMMED: &str = "Programmed";
    /// `ResolvedRefs=True` (listener, route).
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// `Conflicted=False` (listener).
    pub const NO_CONFLICTS: &str = "NoConflicts";
    /// `Programmed=False` (Gateway, listener): invalid configuration.
    pub const INVALID: &str = "Invalid";
    /// Gateway `Accepted`: one or more listeners are invalid.
    pub const LISTENERS_NOT_VALID: &str = "ListenersNotValid";
    /// Gateway `Accepted=False`: an entry of `spec.addresses` is of a type sockgate
    /// does not support (only `IPAddress`), or its value is not an IP address.
    pub const UNSUPPORTED_ADDRESS: &str = "UnsupportedAddress";
    /// Gateway `Programmed=False`: none of `spec.addresses` is an address of a node
    /// running sockgate.
    pub const ADDRESS_NOT_ASSIGNED: &str = "AddressNotAssigned";
    /// Gateway `Programmed=False`: none of `spec.addresses` can be served (unspecified,
    /// loopback, multicast, broadcast, IPv6 link-local), none is assigned.
    pub const ADDRESS_NOT_USABLE: &str = "AddressNotUsable";
    /// Listener `Accepted=False`: the protocol is not supported.
    pub const UNSUPPORTED_PROTOCOL: &str = "UnsupportedProtocol";
    /// Listener `Accepted=False` (and `Conflicted=True` between Gateways): the port is
    /// taken or out of range.
    pub const PORT_UNAVAILABLE: &str = "PortUnavailable";
    /// Listener `Conflicted=True`: several listeners of one Gateway share a port.
    pub const PROTOCOL_CONFLICT: &str = "ProtocolConflict";
    /// Listener `ResolvedRefs=False`: `allowedRoutes.kinds` names a kind sockgate cannot
    /// attach.
    pub const INVALID_ROUTE_KINDS: &str = "InvalidRouteKinds";
    /// Route `Accepted=False`: no listener of the parent allows the route.
    pub const NOT_ALLOWED_BY_LISTENERS: &str = "NotAllowedByListeners";
    /// Route `Accepted=False`: no listener matches `sectionName` / `port`.
    pub const NO_MATCHING_PARENT: &str = "NoMatchingParent";
    /// Route `PartiallyInvalid=True`: rules were dropped.
    pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
    /// Route `ResolvedRefs=False`: a backendRef names a missing Service or port.
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    /// Route `ResolvedRefs=False`: a cross-namespace backendRef without a ReferenceGrant,
    /// or a backendRef with endpoints whose address is refused (loopback, link-local,
    /// unspecified, multicast; `--allow-backend-cidr`).
    pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";
    /// Route `ResolvedRefs=False`: a backendRef that is not a core Service.
    pub const INVALID_KIND: &str = "InvalidKind";
    /// Gateway `Programmed=False`: listeners are valid but the node has no room left
    /// for them (`--max-listeners`, `--max-backends`).
    pub const NO_RESOURCES: &str = "NoResources";
    /// Route `ResolvedRefs=False`, implementation-specific: a backendRef has more
    /// ready endpoints than a listener holds (`--max-backends-per-listener`); the
    /// first are programmed, the message names the others.
    pub const TOO_MANY_ENDPOINTS: &str = "TooManyEndpoints";
    /// GatewayClass `SupportedVersion=True`.
    pub const SUPPORTED_VERSION: &str = "SupportedVersion";
    /// GatewayClass `SupportedVersion=False`: the CRDs are of another Gateway API
    /// version than sockgate is built for.
    pub const UNSUPPORTED_VERSION: &str = "UnsupportedVersion";
}

/// The Gateway API release sockgate is built for: that of the `gateway-api` crate's
/// generated types (0.22: v1.5.1, its README). Bundles of the same minor version are
/// supported.
pub const BUNDLE_VERSION: &str = "v1.5.1";
/// The annotation every Gateway API CRD carries with its release.
pub const BUNDLE_VERSION_ANNOTATION: &str = "gateway.networking.k8s.io/bundle-version";
/// The CRDs whose bundle version the kube source reads: those of the kinds it watches.
pub const BUNDLE_CRDS: [&str; 4] = [
    "gatewayclasses.gateway.networking.k8s.io",
    "gateways.gateway.networking.k8s.io",
    "referencegrants.gateway.networking.k8s.io",
    "tcproutes.gateway.networking.k8s.io",
];

/// `status.supportedFeatures` of sockgate's GatewayClasses: the Gateway API feature
/// names (`pkg/features` upstream) whose conformance tests sockgate's support covers,
/// sorted as the Gateway API requires. `GatewayPort8080` is left out although any port
/// is served: its conformance tests use HTTPRoute.
pub const SUPPORTED_FEATURES: [&str; 3] = ["Gateway", "ReferenceGrant", "TCPRoute"];

/// The Gateway API group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// `spec.addresses[].type` `IPAddress` (also what an address without type is).
pub const ADDRESS_TYPE_IP: &str = "IPAddress";
/// Kind `Gateway`.
pub const KIND_GATEWAY: &str = "Gateway";
/// Kind `TCPRoute`.
pub const KIND_TCP_ROUTE: &str = "TCPRoute";
/// Kind `Service` (core group, `""`).
pub const KIND_SERVICE: &str = "Service";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The default `controllerName` of sockgate's GatewayClasses.
pub const DEFAULT_CONTROLLER_NAME: &str = "sockgate.dev/gateway-controller";
