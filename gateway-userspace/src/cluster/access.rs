//! Every (API group, resource, verb) the agent uses, declared once beside the code that
//! uses it. `deploy/rbac.yaml` must grant each of them; a test checks it does, so a new
//! watch or write cannot ship without its RBAC rule.

/// Where a rule must be granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// In the `ClusterRole` bound to the agent's `ServiceAccount`.
    Cluster,
    /// In the Role of the agent's own namespace.
    OwnNamespace,
}

/// One permission the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// API group, `""` for the core group.
    pub group: &'static str,
    /// Resource (plural), with `/status` for the status subresource.
    pub resource: &'static str,
    /// Verbs the code calls.
    pub verbs: &'static [&'static str],
    /// The objects it is used on, by name; empty: every object of the resource.
    pub resource_names: &'static [&'static str],
    /// Where it must be granted.
    pub scope: Scope,
    /// What uses it.
    pub used_by: &'static str,
}

const WATCH: &[&str] = &["get", "list", "watch"];
const GATEWAY: &str = "gateway.networking.k8s.io";
const SOCKGATE: &str = "sockgate.dev";

/// Everything the agent does in the API.
pub const API_ACCESS: &[Access] = &[
    Access {
        group: GATEWAY,
        resource: "gatewayclasses",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector",
    },
    Access {
        group: GATEWAY,
        resource: "gateways",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector",
    },
    Access {
        group: GATEWAY,
        resource: "tcproutes",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector (v1 and v1alpha2)",
    },
    Access {
        group: GATEWAY,
        resource: "referencegrants",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector",
    },
    Access {
        group: "",
        resource: "namespaces",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector (allowedRoutes selectors)",
    },
    Access {
        group: "",
        resource: "services",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector",
    },
    Access {
        group: "",
        resource: "nodes",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector (Gateway addresses)",
    },
    Access {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector",
    },
    Access {
        group: SOCKGATE,
        resource: "listenerpolicies",
        verbs: WATCH,
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "reflector (when the ListenerPolicy CRD is installed)",
    },
    Access {
        group: GATEWAY,
        resource: "gatewayclasses/status",
        verbs: &["patch"],
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "status writer (server-side apply)",
    },
    Access {
        group: GATEWAY,
        resource: "gateways/status",
        verbs: &["patch"],
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "status writer (server-side apply)",
    },
    Access {
        group: GATEWAY,
        resource: "tcproutes/status",
        verbs: &["patch"],
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "status writer (server-side apply)",
    },
    Access {
        group: SOCKGATE,
        resource: "listenerpolicies/status",
        verbs: &["patch"],
        resource_names: &[],
        scope: Scope::Cluster,
        used_by: "status writer (server-side apply)",
    },
    Access {
        group: "apiextensions.k8s.io",
        resource: "customresourcedefinitions",
        verbs: &["get"],
        resource_names: &crate::model::conditions::BUNDLE_CRDS,
        scope: Scope::Cluster,
        used_by: "GatewayClass SupportedVersion (the CRDs' bundle-version annotation)",
    },
    Access {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        resource_names: &[],
        scope: Scope::OwnNamespace,
        used_by: "leader election",
    },
];
