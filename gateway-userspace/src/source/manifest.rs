//! Kubernetes YAML manifests (multi-document, as `kubectl apply -f` takes them) parsed
//! into the generated Gateway API and Kubernetes types, dispatched on `apiVersion` and
//! `kind`. Every error names the file and the line.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use gateway_api::experimental::{
    gatewayclasses::{GatewayClass, GatewayClassSpec},
    gateways::{Gateway, GatewaySpec},
    referencegrants::{ReferenceGrant, ReferenceGrantSpec},
    tcproutes::{TcpRoute, TcpRouteSpec},
};
use k8s_openapi::{
    api::{core::v1::Namespace, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, de::DeserializeOwned};

use crate::model::{Snapshot, TcpRouteObject, TcpRouteVersion, snapshot::namespace_of};

/// A manifest that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct ManifestError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line of the problem.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Where an object was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// 1-based line where the object's document starts.
    pub line: usize,
}

/// One parsed object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// `gateway.networking.k8s.io` GatewayClass.
    GatewayClass(GatewayClass),
    /// `gateway.networking.k8s.io` Gateway.
    Gateway(Gateway),
    /// `gateway.networking.k8s.io` TCPRoute, `v1alpha2` or `v1`.
    TcpRoute(TcpRouteObject),
    /// `gateway.networking.k8s.io` ReferenceGrant.
    ReferenceGrant(ReferenceGrant),
    /// Core Namespace.
    Namespace(Namespace),
    /// Core Service.
    Service(Service),
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// `sockgate.dev` ListenerPolicy (the XDP guard's policy attachment).
    ListenerPolicy(crate::policy::ListenerPolicy),
}

impl Object {
    fn identity(&self) -> (&'static str, String, String) {
        let (kind, meta, namespaced) = match self {
            Self::GatewayClass(o) => ("GatewayClass", &o.metadata, false),
            Self::Gateway(o) => ("Gateway", &o.metadata, true),
            Self::TcpRoute(o) => ("TCPRoute", &o.route.metadata, true),
            Self::ReferenceGrant(o) => ("ReferenceGrant", &o.metadata, true),
            Self::Namespace(o) => ("Namespace", &o.metadata, false),
            Self::Service(o) => ("Service", &o.metadata, true),
            Self::EndpointSlice(o) => ("EndpointSlice", &o.metadata, true),
            Self::ListenerPolicy(o) => ("ListenerPolicy", &o.metadata, true),
        };
        let ns = if namespaced {
            namespace_of(meta).to_owned()
        } else {
            String::new()
        };
        (kind, ns, meta.name.clone().unwrap_or_default())
    }
}

/// The Gateway API kinds: `metadata` and `spec` are read into the generated types.
#[derive(Deserialize)]
struct Envelope<S> {
    metadata: ObjectMeta,
    spec: S,
}

const GW: &str = "gateway.networking.k8s.io/";

/// Splits `text` into YAML documents: `(first line, text)`.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        let is_sep = line == "---"
            || line.starts_with("--- ")
            || line.starts_with("---\t")
            || line.trim_end() == "---";
        if is_sep {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push((start, cur));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.trim() != "...")
    });
    docs
}

/// Parses one file's text.
pub fn parse(file: &Path, text: &str) -> Result<Vec<(Origin, Object)>, ManifestError> {
    let mut out = Vec::new();
    for (start, doc) in documents(text) {
        let err = |line: usize, message: String| ManifestError {
            file: file.to_owned(),
            line,
            message,
        };
        let located = |e: &serde_yaml::Error| {
            let line = e.location().map_or(0, |l| l.line().saturating_sub(1));
            err(start + line, e.to_string())
        };
        let line_of = |key: &str| {
            doc.lines()
                .position(|l| l.starts_with(&format!("{key}:")))
                .map_or(start, |i| start + i)
        };
        let value: serde_yaml::Value = serde_yaml::from_str(&doc).map_err(|e| located(&e))?;
        if !value.is_mapping() {
            return Err(err(
                start,
                "a document must be a mapping (a Kubernetes object)".into(),
            ));
        }
        let field = |k: &str| -> Result<String, ManifestError> {
            match value.get(k) {
                Some(serde_yaml::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(err(line_of(k), format!("`{k}` must be a string"))),
                None => Err(err(start, format!("missing field `{k}`"))),
            }
        };
        let api_version = field("apiVersion")?;
        let kind = field("kind")?;
        let object = decode(&doc, &api_version, &kind).map_err(|e| match e {
            Decode::Yaml(e) => located(&e),
            Decode::Unsupported(message) => err(line_of("kind"), message),
        })?;
        let (_, _, name) = object.identity();
        if name.is_empty() {
            return Err(err(
                line_of("metadata"),
                format!("{kind} has no metadata.name"),
            ));
        }
        out.push((
            Origin {
                file: file.to_owned(),
                line: start,
            },
            object,
        ));
    }
    Ok(out)
}

enum Decode {
    Yaml(serde_yaml::Error),
    Unsupported(String),
}

impl From<serde_yaml::Error> for Decode {
    fn from(e: serde_yaml::Error) -> Self {
        Self::Yaml(e)
    }
}

/// Reads one document as the type its `apiVersion` and `kind` name.
fn decode(doc: &str, api_version: &str, kind: &str) -> Result<Object, Decode> {
    Ok(match (api_version.strip_prefix(GW), kind) {
        (Some("v1" | "v1beta1"), "GatewayClass") => {
            let e: Envelope<GatewayClassSpec> = serde_yaml::from_str(doc)?;
            Object::GatewayClass(GatewayClass {
                metadata: e.metadata,
                spec: e.spec,
                status: None,
            })
        }
        (Some("v1" | "v1beta1"), "Gateway") => {
            let e: Envelope<GatewaySpec> = serde_yaml::from_str(doc)?;
            Object::Gateway(Gateway {
                metadata: e.metadata,
                spec: e.spec,
                status: None,
            })
        }
        (Some(v @ ("v1alpha2" | "v1")), "TCPRoute") => {
            let e: Envelope<TcpRouteSpec> = serde_yaml::from_str(doc)?;
            Object::TcpRoute(TcpRouteObject {
                version: if v == "v1" {
                    TcpRouteVersion::V1
                } else {
                    TcpRouteVersion::V1alpha2
                },
                route: TcpRoute {
                    metadata: e.metadata,
                    spec: e.spec,
                    status: None,
                },
            })
        }
        (Some("v1" | "v1beta1" | "v1alpha2"), "ReferenceGrant") => {
            let e: Envelope<ReferenceGrantSpec> = serde_yaml::from_str(doc)?;
            Object::ReferenceGrant(ReferenceGrant {
                metadata: e.metadata,
                spec: e.spec,
            })
        }
        _ => match (api_version, kind) {
            ("v1", "Namespace") => Object::Namespace(core(doc)?),
            ("v1", "Service") => Object::Service(core(doc)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(core(doc)?),
            ("sockgate.dev/v1alpha1", "ListenerPolicy") => Object::ListenerPolicy(core(doc)?),
            (_, k) => {
                let expected = match k {
                    "GatewayClass" | "Gateway" => Some("gateway.networking.k8s.io/v1"),
                    "TCPRoute" => Some("gateway.networking.k8s.io/v1alpha2 or v1"),
                    "ReferenceGrant" => Some("gateway.networking.k8s.io/v1beta1"),
                    "Namespace" | "Service" => Some("v1"),
                    "EndpointSlice" => Some("discovery.k8s.io/v1"),
                    _ => None,
                };
                return Err(Decode::Unsupported(match expected {
                    Some(e) => format!(
                        "unsupported apiVersion {api_version:?} for kind {k} (expected {e})"
                    ),
                    None => format!(
                        "unknown kind {k:?} (apiVersion {api_version:?}); sockgate reads GatewayClass, Gateway, TCPRoute, ReferenceGrant, Namespace, Service, EndpointSlice and ListenerPolicy"
                    ),
                }));
            }
        },
    })
}

fn core<T: DeserializeOwned>(doc: &str) -> Result<T, serde_yaml::Error> {
    serde_yaml::from_str(doc)
}

/// Gathers parsed objects into a snapshot; the same kind, namespace and name twice is
/// an error naming both places.
pub fn snapshot(objects: Vec<(Origin, Object)>) -> Result<Snapshot, ManifestError> {
    let mut seen: BTreeMap<(&'static str, String, String), Origin> = BTreeMap::new();
    let mut snap = Snapshot::default();
    for (origin, object) in objects {
        let id = object.identity();
        if let Some(first) = seen.get(&id) {
            let (kind, ns, name) = &id;
            let what = if ns.is_empty() {
                name.clone()
            } else {
                format!("{ns}/{name}")
            };
            return Err(ManifestError {
                file: origin.file,
                line: origin.line,
                message: format!(
                    "duplicate {kind} {what} (first defined at {}:{})",
                    first.file.display(),
                    first.line
                ),
            });
        }
        seen.insert(id, origin);
        match object {
            Object::GatewayClass(o) => snap.gateway_classes.push(o),
            Object::Gateway(o) => snap.gateways.push(o),
            Object::TcpRoute(o) => snap.tcp_routes.push(o),
            Object::ReferenceGrant(o) => snap.reference_grants.push(o),
            Object::Namespace(o) => snap.namespaces.push(o),
            Object::Service(o) => snap.services.push(o),
            Object::EndpointSlice(o) => snap.endpoint_slices.push(o),
            Object::ListenerPolicy(o) => snap.listener_policies.push(o),
        }
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Vec<(Origin, Object)>, ManifestError> {
        parse(Path::new("x.yaml"), text)
    }

    #[test]
    fn multi_document_dispatch() {
        let objs = p("# c\n---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {name: r, namespace: n}\nspec:\n  rules: [{backendRefs: [{name: a, port: 80}]}]\n")
            .expect("parses");
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].0.line, 3);
        assert_eq!(objs[1].0.line, 9);
        assert!(matches!(&objs[1].1, Object::TcpRoute(r) if r.version == TcpRouteVersion::V1));
    }

    #[test]
    fn errors_name_the_line() {
        let e = p("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Deployment\nmetadata: {name: b}\n")
            .expect_err("unknown kind");
        assert_eq!(e.line, 6, "{e}");
        assert!(
            e.to_string()
                .starts_with("x.yaml:6: unknown kind \"Deployment\""),
            "{e}"
        );

        let e = p("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: g\nspec:\n  gatewayClassName: c\n  listeners:\n  - name: a\n    protocol: TCP\n")
            .expect_err("missing port");
        assert!(e.message.contains("missing field `port`"), "{e}");
        assert_eq!(e.line, 8, "{e}");

        let e = p("apiVersion: v1\nkind: Service\nmetadata: {name: a\n").expect_err("bad yaml");
        assert!(e.line >= 3, "{e}");

        let e = p("kind: Service\nmetadata: {name: a}\n").expect_err("no apiVersion");
        assert!(e.message.contains("missing field `apiVersion`"), "{e}");

        let e = p("apiVersion: gateway.networking.k8s.io/v1alpha9\nkind: TCPRoute\nmetadata: {name: a}\nspec: {rules: []}\n")
            .expect_err("bad version");
        assert!(e.message.contains("unsupported apiVersion"), "{e}");
    }

    #[test]
    fn duplicates_are_errors() {
        let mut objs = p("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n").expect("ok");
        objs.extend(
            parse(
                Path::new("y.yaml"),
                "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\n",
            )
            .expect("ok"),
        );
        let e = snapshot(objs).expect_err("duplicate");
        assert!(
            e.to_string()
                .contains("y.yaml:1: duplicate Service default/a (first defined at x.yaml:1)"),
            "{e}"
        );
    }
}
