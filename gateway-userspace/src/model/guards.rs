//! `ListenerPolicy` resolution: each policy's targets against the listeners of the
//! desired state, into one [`ListenerGuard`] per listener port and each policy's
//! status.
//!
//! A policy targets, in its own namespace, a `Gateway` (every listener, or one by
//! `sectionName`) or a `TCPRoute` (the listeners it is attached to). When two policies
//! target the same listener, the older one (creation time, then namespace and name)
//! wins and the other is reported `Conflicted` for that ancestor.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::{
    desired::DesiredState,
    model::snapshot::{ObjectKey, Params, generation_of},
    policy::{
        ACCEPTED, AncestorRef, GATEWAY_GROUP, ListenerPolicy, ListenerPolicyStatus,
        PolicyAncestorStatus, PolicyCondition, PolicyTargetRef, REASON_ACCEPTED, REASON_CONFLICTED,
        REASON_INVALID, REASON_RESOLVED, REASON_TARGET_NOT_FOUND, RESOLVED_REFS, guard_of,
    },
    xdp::ListenerGuard,
};

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
