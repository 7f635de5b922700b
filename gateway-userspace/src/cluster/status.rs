//! The status writer: server-side apply of the status reconcile computed, under the
//! field manager [`FIELD_MANAGER`], only where it differs from what the cluster holds.
//!
//! * "Differs" ignores `lastTransitionTime`: reconcile stamps every condition with the
//!   time of the round, so comparing it would write every object on every round. When
//!   a condition keeps its status, the time already in the cluster is written back
//!   (the Kubernetes convention: the time changes when the status does).
//! * `TCPRoute` `status.parents` and `ListenerPolicy` `status.ancestors` (GEP-713) are
//!   shared with other controllers: only the entries whose `controllerName` is
//!   sockgate's are compared and replaced; the others are sent back as they are, so an
//!   apply never drops them.
//! * Only objects of sockgate's classes, and sockgate's own `ListenerPolicy` objects,
//!   are in a [`StatusSet`]: nothing else is touched.
use std::collections::BTreeMap;
#[cfg(test)]
use std::time::Duration;

use gateway_api::experimental::{gatewayclasses::GatewayClass, gateways::Gateway};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use tracing::{debug, info};

use crate::{
    model::{StatusSet, snapshot::ObjectKey},
    policy::ListenerPolicy,
};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "sockgate";

/// A status write that failed.
#[derive(Debug, thiserror::Error)]
#[error("writing the status of {kind} {object}: {source}")]
pub struct WriteError {
    pub kind: &'static str,
    pub object: String,
    #[source]
    pub source: kube::Error,
}

/// What the cluster holds now, from the reflector stores: the `status` of each object
/// as JSON (`Value::Null` when it has none).
#[derive(Clone, Debug, Default)]
pub struct Current {
    pub gateway_classes: BTreeMap<String, Value>,
    pub gateways: BTreeMap<ObjectKey, Value>,
    pub tcp_routes: BTreeMap<ObjectKey, Value>,
    pub listener_policies: BTreeMap<ObjectKey, Value>,
}

/// Removes every `lastTransitionTime`, recursively.
fn without_times(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), without_times(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_times).collect()),
        other => other.clone(),
    }
}

/// The identity of an array element for matching old and new: a condition by `type`,
/// a listener by `name`, a route parent by its `parentRef`, a policy ancestor by its
/// `ancestorRef`.
fn element_key(v: &Value) -> Option<Value> {
    ["type", "name", "parentRef", "ancestorRef"]
        .iter()
        .find_map(|k| v.get(*k).cloned())
}

/// Copies `lastTransitionTime` from `old` into `new` for every condition whose status
/// did not change.
fn carry_times(new: &mut Value, old: &Value) {
    match (new, old) {
        (Value::Object(n), Value::Object(o)) => {
            let same_condition = n.contains_key("lastTransitionTime")
                && n.get("type") == o.get("type")
                && n.get("status") == o.get("status");
            if same_condition && let Some(t) = o.get("lastTransitionTime") {
                n.insert("lastTransitionTime".to_owned(), t.clone());
            }
            for (k, nv) in n.iter_mut() {
                if let Some(ov) = o.get(k) {
                    carry_times(nv, ov);
                }
            }
        }
        (Value::Array(n), Value::Array(o)) => {
            for nv in n.iter_mut() {
                let key = element_key(nv);
                if let Some(ov) = o.iter().find(|ov| key.is_some() && element_key(ov) == key) {
                    carry_times(nv, ov);
                }
            }
        }
        _ => {}
    }
}

/// The status list of `TCPRoute` that other controllers write into too.
const ROUTE_PARENTS: &str = "parents";
/// The status list of `ListenerPolicy` that other controllers write into too (GEP-713).
const POLICY_ANCESTORS: &str = "ancestors";

/// Splits the shared list `field` of a current status into sockgate's entries and the
/// others.
fn split_shared(current: &Value, field: &str, controller: &str) -> (Vec<Value>, Vec<Value>) {
    current
        .get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .cloned()
        .partition(|p| p.get("controllerName").and_then(Value::as_str) == Some(controller))
}

/// The status to apply for one object, or `None` when the cluster already has it.
fn plan(desired: &Value, current: &Value) -> Option<Value> {
    let mut desired = desired.clone();
    carry_times(&mut desired, current);
    (without_times(&desired) != without_times(current)).then_some(desired)
}

/// The planned status of an object whose status is one list `field` shared by
/// controllers (`TCPRoute` parents, `ListenerPolicy` ancestors): sockgate's entries
/// compared and replaced, the other controllers' entries kept, first.
fn plan_shared(desired: &Value, current: &Value, field: &str, controller: &str) -> Option<Value> {
    let (ours, others) = split_shared(current, field, controller);
    let planned = plan(desired, &json!({ field: ours }))?;
    let mut entries = others;
    entries.extend(
        planned
            .get(field)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    );
    Some(json!({ field: entries }))
}

/// Writes status; counts what it sends.
pub struct StatusWriter {
    client: Client,
    controller: String,
    /// `TCPRoute` API version being watched (`v1` or `v1alpha2`).
    route_resource: ApiResource,
    /// Status writes sent since start.
    pub writes: u64,
}

impl StatusWriter {
    /// A writer for `controller`'s objects; `TCPRoute`s through `route_resource`.
    pub fn new(client: Client, controller: &str, route_resource: ApiResource) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            route_resource,
            writes: 0,
        }
    }

    fn params() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    /// Server-side applies `status` to one object through `api`.
    async fn apply<K>(
        &mut self,
        api: Api<K>,
        (api_version, kind): (&str, &'static str),
        key: &ObjectKey,
        status: Value,
    ) -> Result<(), WriteError>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut metadata = json!({ "name": key.name });
        if !key.namespace.is_empty() {
            metadata["namespace"] = json!(key.namespace);
        }
        let body = json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": metadata,
            "status": status,
        });
        api.patch_status(&key.name, &Self::params(), &Patch::Apply(body))
            .await
            .map_err(|source| WriteError {
                kind,
                object: key.to_string(),
                source,
            })?;
        self.writes += 1;
        debug!(kind, object = %key, "status written");
        Ok(())
    }

    /// Applies every status in `set` that differs from `current`; returns how many
    /// objects were written.
    pub async fn write(&mut self, set: &StatusSet, current: &Current) -> Result<u64, WriteError> {
        let before = self.writes;
        for (name, status) in &set.gateway_classes {
            let desired = serde_json::to_value(status).unwrap_or_default();
            let cur = current.gateway_classes.get(name).unwrap_or(&Value::Null);
            if let Some(status) = plan(&desired, cur) {
                let key = ObjectKey {
                    namespace: String::new(),
                    name: name.clone(),
                };
                let api: Api<GatewayClass> = Api::all(self.client.clone());
                let version = GatewayClass::api_version(&());
                self.apply(api, (&version, "GatewayClass"), &key, status)
                    .await?;
            }
        }
        for (key, status) in &set.gateways {
            let desired = serde_json::to_value(status).unwrap_or_default();
            let cur = current.gateways.get(key).unwrap_or(&Value::Null);
            if let Some(status) = plan(&desired, cur) {
                let api: Api<Gateway> = Api::namespaced(self.client.clone(), &key.namespace);
                let version = Gateway::api_version(&());
                self.apply(api, (&version, "Gateway"), key, status).await?;
            }
        }
        for (key, status) in &set.tcp_routes {
            let desired = serde_json::to_value(status).unwrap_or_default();
            let cur = current.tcp_routes.get(key).unwrap_or(&Value::Null);
            if let Some(status) = plan_shared(&desired, cur, ROUTE_PARENTS, &self.controller) {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &key.namespace, &self.route_resource);
                let version = self.route_resource.api_version.clone();
                self.apply(api, (&version, "TCPRoute"), key, status).await?;
            }
        }
        for (key, status) in &set.listener_policies {
            let desired = serde_json::to_value(status).unwrap_or_default();
            let cur = current.listener_policies.get(key).unwrap_or(&Value::Null);
            if let Some(status) = plan_shared(&desired, cur, POLICY_ANCESTORS, &self.controller) {
                let api: Api<ListenerPolicy> = Api::namespaced(self.client.clone(), &key.namespace);
                let version = ListenerPolicy::api_version(&());
                self.apply(api, (&version, "ListenerPolicy"), key, status)
                    .await?;
            }
        }
        let written = self.writes - before;
        if written > 0 {
            info!(objects = written, "status written");
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests;
