//! `ListenerPolicy` (group `sockgate.dev`): the XDP listener guard's policy as a
//! Gateway API policy attachment (GEP-713), and its pure resolution against the
//! desired state into one [`ListenerGuard`] per listener port.
//!
//! A policy targets, in its own namespace, a `Gateway` (every listener, or one by
//! `sectionName`) or a `TCPRoute` (the listeners it is attached to). When two policies
//! target the same listener, the older one (creation time, then namespace and name)
//! wins and the other is reported `Conflicted` for that ancestor. A target is taken
//! whole or not at all: a Gateway target one of whose listeners is held by an older
//! policy is `Conflicted` for every listener, so that a policy never applies to part
//! of what it names.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    desired::DesiredState,
    model::snapshot::{ObjectKey, Params, generation_of},
    xdp::{Cidr, ListenerGuard, SynRate},
};

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

/// Makes the conditions of one policy: its generation, stamped with the round's time.
struct Conditions<'a> {
    now: &'a Time,
    generation: i64,
}

impl Conditions<'_> {
    fn make(
        &self,
        type_: &str,
        ok: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> PolicyCondition {
        PolicyCondition {
            type_: type_.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message: message.into(),
            observed_generation: Some(self.generation),
            last_transition_time: Some(self.now.clone()),
        }
    }
}

/// The listener ports a target resolves to in `desired`.
fn target_ports(desired: &DesiredState, ns: &str, t: &PolicyTargetRef) -> Vec<u16> {
    let listeners = desired.listeners.values();
    match (t.group.as_str(), t.kind.as_str()) {
        (GATEWAY_GROUP, "Gateway") => {
            let prefix = format!("{ns}/{}/", t.name);
            listeners
                .filter(|l| match &t.section_name {
                    Some(s) => l.origin == format!("{prefix}{s}"),
                    None => l.origin.starts_with(&prefix),
                })
                .map(|l| l.port)
                .collect()
        }
        (GATEWAY_GROUP, "TCPRoute") => {
            let key = format!("{ns}/{}", t.name);
            listeners
                .filter(|l| l.route.as_deref() == Some(key.as_str()))
                .map(|l| l.port)
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Resolves `policies` against the listeners of `desired`: the guard of each listener
/// port, and each policy's status (conditions stamped with `params.now`, ancestors
/// under `params.controller_name`).
pub fn resolve(
    policies: &[ListenerPolicy],
    desired: &DesiredState,
    params: &Params,
) -> (
    BTreeMap<u16, ListenerGuard>,
    BTreeMap<ObjectKey, ListenerPolicyStatus>,
) {
    let mut ordered: Vec<&ListenerPolicy> = policies.iter().collect();
    ordered.sort_by(|a, b| {
        let key = |p: &ListenerPolicy| {
            (
                p.metadata.creation_timestamp.clone().map(|t| t.0),
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        };
        key(a).cmp(&key(b))
    });
    let mut guards = BTreeMap::new();
    let mut owner: BTreeMap<u16, String> = BTreeMap::new();
    let mut statuses = BTreeMap::new();
    for p in ordered {
        let key = ObjectKey::of(&p.metadata, true);
        let ns = key.namespace.clone();
        let id = key.to_string();
        let guard = guard_of(&p.spec);
        let cond = Conditions {
            now: &params.now,
            generation: generation_of(&p.metadata),
        };
        let mut status = ListenerPolicyStatus::default();
        for t in &p.spec.target_refs {
            let ports = target_ports(desired, &ns, t);
            let resolved = if ports.is_empty() {
                cond.make(
                    RESOLVED_REFS,
                    false,
                    REASON_TARGET_NOT_FOUND,
                    match &t.section_name {
                        Some(s) => format!("{} {ns}/{} has no served listener {s}", t.kind, t.name),
                        None => format!("no listener of {} {ns}/{} is served", t.kind, t.name),
                    },
                )
            } else {
                cond.make(RESOLVED_REFS, true, REASON_RESOLVED, "target resolved")
            };
            let accepted = match (&guard, ports.is_empty()) {
                (Err(e), _) => cond.make(ACCEPTED, false, REASON_INVALID, e.clone()),
                (Ok(_), true) => cond.make(
                    ACCEPTED,
                    false,
                    REASON_TARGET_NOT_FOUND,
                    "the target serves no listener",
                ),
                (Ok(g), false) => {
                    let taken: Vec<String> = ports
                        .iter()
                        .filter_map(|port| owner.get(port).filter(|o| **o != id))
                        .cloned()
                        .collect();
                    if taken.is_empty() {
                        for port in &ports {
                            owner.insert(*port, id.clone());
                            guards.insert(*port, g.clone());
                        }
                        cond.make(ACCEPTED, true, REASON_ACCEPTED, "applied at the NIC")
                    } else {
                        cond.make(
                            ACCEPTED,
                            false,
                            REASON_CONFLICTED,
                            format!(
                                "an older policy applies to this target: {}",
                                taken.join(", ")
                            ),
                        )
                    }
                }
            };
            status.ancestors.push(PolicyAncestorStatus {
                ancestor_ref: AncestorRef {
                    group: t.group.clone(),
                    kind: t.kind.clone(),
                    namespace: ns.clone(),
                    name: t.name.clone(),
                    section_name: t.section_name.clone(),
                },
                controller_name: params.controller_name.clone(),
                conditions: vec![accepted, resolved],
            });
        }
        statuses.insert(key, status);
    }
    (guards, statuses)
}

#[cfg(test)]
mod tests;
