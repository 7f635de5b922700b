//! `ListenerPolicy` (group `sockgate.dev`): the XDP listener guard's policy as a
//! Gateway API policy attachment (GEP-713): its types and the guard one spec asks for.
//! Their resolution against the desired state is `crate::model::guards`.
//!
//! A policy targets, in its own namespace, a `Gateway` (every listener, or one by
//! `sectionName`) or a `TCPRoute` (the listeners it is attached to). When two policies
//! target the same listener, the older one (creation time, then namespace and name)
//! wins and the other is reported `Conflicted` for that ancestor. A target is taken
//! whole or not at all: a Gateway target one of whose listeners is held by an older
//! policy is `Conflicted` for every listener, so that a policy never applies to part
//! of what it names.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::xdp::{Cidr, ListenerGuard, SynRate};

/// Spec of a `ListenerPolicy`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sockgate.dev",
    version = "v1alpha1",
    kind = "ListenerPolicy",
    namespaced,
    status = "ListenerPolicyStatus",
    shortname = "lpol",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct ListenerPolicySpec {
    /// What the policy applies to: Gateways (optionally one listener by
    /// `sectionName`) or `TCPRoute` objects, in the policy's namespace.
    pub target_refs: Vec<PolicyTargetRef>,
    /// Client ranges that may connect (IPv4 and IPv6 CIDRs). Empty: every client not
    /// denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Client ranges that may not connect; wins over `allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// SYN rate limit per client source prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_rate_limit: Option<SynRateLimit>,
}

/// A GEP-713 `LocalPolicyTargetReferenceWithSectionName`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    /// `gateway.networking.k8s.io`.
    pub group: String,
    /// `Gateway` or `TCPRoute`.
    pub kind: String,
    /// Name of the target, in the policy's namespace.
    pub name: String,
    /// A listener name of a Gateway target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// A per-source SYN rate limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SynRateLimit {
    /// New connections (SYNs) per second from one source prefix.
    pub connections_per_second: u32,
    /// SYNs admitted at once; default `connectionsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Prefix length IPv4 sources are aggregated on; default 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_prefix_length: Option<u8>,
    /// Prefix length IPv6 sources are aggregated on; default 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix_length: Option<u8>,
}

/// Status of a `ListenerPolicy` (GEP-713 `PolicyStatus`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerPolicyStatus {
    /// One entry per target the policy names.
    #[serde(default)]
    pub ancestors: Vec<PolicyAncestorStatus>,
}

/// A GEP-713 `PolicyAncestorStatus`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAncestorStatus {
    /// The target (`group`, `kind`, `namespace`, `name`, `sectionName`).
    pub ancestor_ref: AncestorRef,
    /// The controller that wrote this entry.
    pub controller_name: String,
    /// `Accepted` and `ResolvedRefs`.
    pub conditions: Vec<PolicyCondition>,
}

/// The target of an ancestor entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AncestorRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// A status condition, as `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    /// The policy's `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub last_transition_time: Option<Time>,
}

/// Condition type: the policy applies to this ancestor.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: the target exists.
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// Reason: applied.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Reason: an older policy targets the same listener.
pub const REASON_CONFLICTED: &str = "Conflicted";
/// Reason: the spec does not parse (a CIDR, a prefix length, a zero rate).
pub const REASON_INVALID: &str = "Invalid";
/// Reason: the target does not exist or serves no listener.
pub const REASON_TARGET_NOT_FOUND: &str = "TargetNotFound";
/// Reason: `ResolvedRefs` holds.
pub const REASON_RESOLVED: &str = "ResolvedRefs";
/// Gateway API group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The CRD manifest, as `sockgate crd` prints it and `deploy/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    serde_yaml::to_string(&ListenerPolicy::crd())
}

/// The guard a spec asks for, or why it is invalid.
pub fn guard_of(spec: &ListenerPolicySpec) -> Result<ListenerGuard, String> {
    let cidrs = |list: &[String]| {
        list.iter()
            .map(|c| c.parse::<Cidr>().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()
    };
    let syn_rate = match spec.syn_rate_limit {
        None => None,
        Some(r) => {
            if r.connections_per_second == 0 {
                return Err("synRateLimit.connectionsPerSecond must be > 0".to_owned());
            }
            let p4 = r.ipv4_prefix_length.unwrap_or(32);
            let p6 = r.ipv6_prefix_length.unwrap_or(128);
            if p4 > 32 || p6 > 128 {
                return Err("synRateLimit prefix length longer than the address".to_owned());
            }
            Some(SynRate {
                per_second: r.connections_per_second,
                burst: r.burst.unwrap_or(r.connections_per_second).max(1),
                prefix4: p4,
                prefix6: p6,
            })
        }
    };
    Ok(ListenerGuard {
        allow: cidrs(&spec.allow)?,
        deny: cidrs(&spec.deny)?,
        syn_rate,
    })
}
