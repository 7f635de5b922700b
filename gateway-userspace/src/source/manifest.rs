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
    api::{
        core::v1::{Namespace, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, de::DeserializeOwned};

use crate::model::{
    Snapshot, TcpRouteObject, TcpRouteVersion,
    snapshot::{ObjectKey, namespace_of},
};

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
    /// The `apiVersion` the document gave.
    pub api_version: String,
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

const GW: &str = "gateway.networking.k8s.io";

/// The kinds sockgate reads, by (API group, kind), with the versions it reads them in
/// (for the error when the version is another). Every other (group, kind) is skipped:
/// a `Service` of `serving.knative.dev` is not a core Service.
const READ: [(&str, &str, &str); 8] = [
    (GW, "GatewayClass", "gateway.networking.k8s.io/v1"),
    (GW, "Gateway", "gateway.networking.k8s.io/v1"),
    (GW, "TCPRoute", "gateway.networking.k8s.io/v1alpha2 or v1"),
    (
        GW,
        "ReferenceGrant",
        "gateway.networking.k8s.io/v1, v1beta1 or v1alpha2",
    ),
    ("", "Namespace", "v1"),
    ("", "Service", "v1"),
    ("discovery.k8s.io", "EndpointSlice", "discovery.k8s.io/v1"),
    ("sockgate.dev", "ListenerPolicy", "sockgate.dev/v1alpha1"),
];

/// Splits an `apiVersion` into group (`""` for the core group) and version.
fn group_version(api_version: &str) -> (&str, &str) {
    api_version.rsplit_once('/').unwrap_or(("", api_version))
}

/// Documents of kinds sockgate does not read, counted per file and kind, in the order
/// they were met. Skipping them is what every controller does with a manifest that
/// holds a whole application: each watches the kinds it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    files: Vec<(PathBuf, Vec<(String, usize)>)>,
}

impl Skipped {
    /// Counts `n` documents of `kind` (the label [`Skipped::label`] gives) in `file`.
    fn add(&mut self, file: &Path, kind: String, n: usize) {
        let i = self
            .files
            .iter()
            .position(|(f, _)| f == file)
            .unwrap_or_else(|| {
                self.files.push((file.to_owned(), Vec::new()));
                self.files.len() - 1
            });
        let kinds = &mut self.files[i].1;
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += n,
            None => kinds.push((kind, n)),
        }
    }

    /// What a skipped document is called: its kind, and its group too when the kind's
    /// name is also one sockgate reads (`Service.serving.knative.dev`).
    fn label(group: &str, kind: &str) -> String {
        if READ.iter().any(|(_, k, _)| *k == kind) {
            let group = if group.is_empty() { "core" } else { group };
            format!("{kind}.{group}")
        } else {
            kind.to_owned()
        }
    }

    /// Adds what `other` skipped.
    pub fn extend(&mut self, other: Self) {
        for (file, kinds) in other.files {
            for (kind, n) in kinds {
                self.add(&file, kind, n);
            }
        }
    }

    /// Nothing was skipped.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Each file with what was skipped in it: `2 Deployment, 1 ConfigMap`.
    pub fn by_file(&self) -> impl Iterator<Item = (&Path, String)> {
        self.files.iter().map(|(file, kinds)| {
            let counts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            (file.as_path(), counts.join(", "))
        })
    }
}

/// One line per file: `deploy/app.yaml: skipped 2 Deployment, 1 ConfigMap (kinds
/// sockgate does not read)`.
impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (file, counts) in self.by_file() {
            writeln!(
                f,
                "{}: skipped {counts} (kinds sockgate does not read)",
                file.display()
            )?;
        }
        Ok(())
    }
}

/// What one file holds.
#[derive(Debug, Default)]
pub struct Parsed {
    /// The objects of kinds sockgate reads, in file order (the items of a `List` in
    /// place of the list).
    pub objects: Vec<(Origin, Object)>,
    /// The documents of other kinds.
    pub skipped: Skipped,
}

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
    docs.retain(|(_, d)| d.lines().any(is_content));
    docs
}

/// A line that is neither blank, a comment nor a document end.
fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#') && t != "..."
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The items of a `List` document, each as a text that keeps the document's line
/// numbers: the lines before the item are left empty and the item's `- ` is blanked,
/// so an error inside an item names its line in the file. `None` when the items are
/// not a plain block sequence under a top-level `items:` (flow style, say).
fn list_items(doc: &str) -> Option<Vec<String>> {
    let lines: Vec<&str> = doc.lines().collect();
    let key = lines.iter().position(|l| {
        l.strip_prefix("items:")
            .is_some_and(|rest| rest.trim().is_empty() || rest.trim_start().starts_with('#'))
    })?;
    let first = (key + 1..lines.len()).find(|&i| is_content(lines[i]))?;
    let dash = indent_of(lines[first]);
    let is_item =
        |l: &str| indent_of(l) == dash && (l[dash..] == *"-" || l[dash..].starts_with("- "));
    if !is_item(lines[first]) {
        return None;
    }
    // The sequence ends at the first line less indented than its dashes, or as indented
    // and not an item (the next top-level key when the dashes are at column 0).
    let end = (first + 1..lines.len())
        .find(|&i| {
            let l = lines[i];
            is_content(l) && (indent_of(l) < dash || (indent_of(l) == dash && !is_item(l)))
        })
        .unwrap_or(lines.len());
    let starts: Vec<usize> = (first..end).filter(|&i| is_item(lines[i])).collect();
    let mut items = Vec::new();
    for (n, &s) in starts.iter().enumerate() {
        let stop = starts.get(n + 1).copied().unwrap_or(end);
        let mut text = "\n".repeat(s);
        text.push_str(&" ".repeat(dash + 1));
        text.push_str(&lines[s][dash + 1..]);
        text.push('\n');
        for l in &lines[s + 1..stop] {
            text.push_str(l);
            text.push('\n');
        }
        items.push(text);
    }
    Some(items)
}

/// `text` with each lone carriage return and each next-line character (U+0085) made a
/// line feed: YAML 1.1 takes both for line breaks (and reads them as line feeds in
/// scalars), [`str::lines`] does not, so documents are split and lines counted as the
/// YAML parser counts them. (The line and paragraph separators, which YAML also breaks
/// lines at, stay: they keep their own meaning inside scalars.)
fn yaml_line_breaks(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(['\r', '\u{85}']) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if (c == '\r' && chars.peek() != Some(&'\n')) || c == '\u{85}' {
            out.push('\n');
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// Parses one file's text.
pub fn parse(file: &Path, text: &str) -> Result<Parsed, ManifestError> {
    let text = yaml_line_breaks(text);
    let mut out = Parsed::default();
    for (start, doc) in documents(&text) {
        document(file, start, &doc, &mut out)?;
    }
    Ok(out)
}

/// Reads one document (or one item of a `List`; its text keeps the lines before it
/// empty, so `start` is the document's first line either way) into `out`.
fn document(file: &Path, start: usize, doc: &str, out: &mut Parsed) -> Result<(), ManifestError> {
    let err = |line: usize, message: String| ManifestError {
        file: file.to_owned(),
        line,
        message,
    };
    let located = |e: &serde_yaml::Error| {
        let line = e.location().map_or(0, |l| l.line().saturating_sub(1));
        err(start + line, e.to_string())
    };
    // The object's top-level keys are at the indentation of its first line.
    let first = doc.lines().position(is_content).unwrap_or(0);
    let indent = doc.lines().nth(first).map_or(0, indent_of);
    let line_of = |key: &str| {
        doc.lines()
            .enumerate()
            .skip(first)
            .position(|(_, l)| {
                indent_of(l) == indent && l[indent..].starts_with(&format!("{key}:"))
            })
            .map_or(start + first, |i| start + first + i)
    };
    let value: serde_yaml::Value = serde_yaml::from_str(doc).map_err(|e| located(&e))?;
    if !value.is_mapping() {
        return Err(err(
            start + first,
            "a document must be a mapping (a Kubernetes object)".into(),
        ));
    }
    let field = |k: &str| -> Result<String, ManifestError> {
        match value.get(k) {
            Some(serde_yaml::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(err(line_of(k), format!("`{k}` must be a string"))),
            None => Err(err(
                start + first,
                format!("missing field `{k}`: not a Kubernetes object"),
            )),
        }
    };
    let api_version = field("apiVersion")?;
    let kind = field("kind")?;
    let (group, _) = group_version(&api_version);
    if (group, kind.as_str()) == ("", "List") {
        return list(file, start, doc, &value, &api_version, out).map_err(|e| match e {
            Decode::Yaml(e) => located(&e),
            Decode::Unsupported(message) => err(line_of("items"), message),
            Decode::Item(e) => *e,
        });
    }
    if !READ
        .iter()
        .any(|&(g, k, _)| (g, k) == (group, kind.as_str()))
    {
        out.skipped.add(file, Skipped::label(group, &kind), 1);
        return Ok(());
    }
    let object = decode(doc, &api_version, &kind).map_err(|e| match e {
        Decode::Yaml(e) => located(&e),
        Decode::Unsupported(message) => err(line_of("kind"), message),
        Decode::Item(e) => *e,
    })?;
    let (_, _, name) = object.identity();
    if name.is_empty() {
        return Err(err(
            line_of("metadata"),
            format!("{kind} has no metadata.name"),
        ));
    }
    out.objects.push((
        Origin {
            file: file.to_owned(),
            line: start + first,
            api_version,
        },
        object,
    ));
    Ok(())
}

/// Reads the items of a `v1` `List` (what `kubectl get -o yaml` writes) as documents.
fn list(
    file: &Path,
    start: usize,
    doc: &str,
    value: &serde_yaml::Value,
    api_version: &str,
    out: &mut Parsed,
) -> Result<(), Decode> {
    if api_version != "v1" {
        return Err(Decode::Unsupported(format!(
            "unsupported apiVersion {api_version:?} for kind List (expected v1)"
        )));
    }
    let items = match value.get("items") {
        None | Some(serde_yaml::Value::Null) => return Ok(()),
        Some(serde_yaml::Value::Sequence(items)) => items,
        Some(_) => {
            return Err(Decode::Unsupported(
                "`items` of a List must be a sequence".into(),
            ));
        }
    };
    // Item texts with their own lines when the layout allows, else each item written
    // out again (an error in it then names the line of `items:`).
    let texts = list_items(doc).filter(|texts| {
        texts.len() == items.len()
            && texts
                .iter()
                .zip(items)
                .all(|(t, v)| serde_yaml::from_str::<serde_yaml::Value>(t).is_ok_and(|p| p == *v))
    });
    let texts = if let Some(texts) = texts {
        texts
    } else {
        let at = doc
            .lines()
            .position(|l| l.starts_with("items:"))
            .unwrap_or(0);
        let mut texts = Vec::new();
        for item in items {
            let mut text = "\n".repeat(at);
            text.push_str(&serde_yaml::to_string(item)?);
            texts.push(text);
        }
        texts
    };
    for text in texts {
        document(file, start, &text, out).map_err(|e| Decode::Item(Box::new(e)))?;
    }
    Ok(())
}

enum Decode {
    Yaml(serde_yaml::Error),
    Unsupported(String),
    /// An item of a `List`, located already.
    Item(Box<ManifestError>),
}

impl From<serde_yaml::Error> for Decode {
    fn from(e: serde_yaml::Error) -> Self {
        Self::Yaml(e)
    }
}

/// Reads one document as the type its `apiVersion` and `kind` name; `kind` is one of
/// [`READ`] in the group of `api_version`.
fn decode(doc: &str, api_version: &str, kind: &str) -> Result<Object, Decode> {
    let (group, version) = group_version(api_version);
    Ok(match (group, version, kind) {
        (GW, "v1" | "v1beta1", "GatewayClass") => {
            let e: Envelope<GatewayClassSpec> = serde_yaml::from_str(doc)?;
            Object::GatewayClass(GatewayClass {
                metadata: e.metadata,
                spec: e.spec,
                status: None,
            })
        }
        (GW, "v1" | "v1beta1", "Gateway") => {
            let e: Envelope<GatewaySpec> = serde_yaml::from_str(doc)?;
            Object::Gateway(Gateway {
                metadata: e.metadata,
                spec: e.spec,
                status: None,
            })
        }
        (GW, v @ ("v1alpha2" | "v1"), "TCPRoute") => {
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
        (GW, "v1" | "v1beta1" | "v1alpha2", "ReferenceGrant") => {
            let e: Envelope<ReferenceGrantSpec> = serde_yaml::from_str(doc)?;
            Object::ReferenceGrant(ReferenceGrant {
                metadata: e.metadata,
                spec: e.spec,
            })
        }
        ("", "v1", "Namespace") => Object::Namespace(core(doc)?),
        ("", "v1", "Service") => Object::Service(core(doc)?),
        ("discovery.k8s.io", "v1", "EndpointSlice") => Object::EndpointSlice(core(doc)?),
        ("sockgate.dev", "v1alpha1", "ListenerPolicy") => Object::ListenerPolicy(core(doc)?),
        _ => {
            let expected = READ
                .iter()
                .find(|&&(g, k, _)| (g, k) == (group, kind))
                .map_or("", |&(_, _, e)| e);
            return Err(Decode::Unsupported(format!(
                "unsupported apiVersion {api_version:?} for kind {kind} (expected {expected})"
            )));
        }
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
        let (kind, namespace, name) = id.clone();
        snap.api_versions.insert(
            (kind, ObjectKey { namespace, name }),
            origin.api_version.clone(),
        );
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
        parse(Path::new("x.yaml"), text).map(|parsed| parsed.objects)
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
    fn other_kinds_are_skipped_and_counted() {
        let parsed = parse(
            Path::new("app.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec: {replicas: [not, checked]}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: h}\nspec: {}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: t}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: UDPRoute\nmetadata: {name: u}\n---\n\
             apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: k}\nspec: {template: {}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
        )
        .expect("parses");
        assert_eq!(parsed.objects.len(), 1, "{:?}", parsed.objects);
        assert!(
            matches!(&parsed.objects[0].1, Object::Service(s) if s.metadata.name.as_deref() == Some("s"))
        );
        assert_eq!(
            parsed.skipped.to_string(),
            "app.yaml: skipped 2 Deployment, 1 ConfigMap, 1 HTTPRoute, 1 TLSRoute, 1 GRPCRoute, 1 UDPRoute, 1 Service.serving.knative.dev (kinds sockgate does not read)\n"
        );
        let mut all = parsed.skipped.clone();
        all.extend(
            parse(
                Path::new("b.yaml"),
                "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n",
            )
            .expect("ok")
            .skipped,
        );
        all.extend(parsed.skipped);
        let lines: Vec<(&Path, String)> = all.by_file().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].1.starts_with("4 Deployment, 2 ConfigMap"),
            "{lines:?}"
        );
        assert_eq!(lines[1], (Path::new("b.yaml"), "1 Secret".to_owned()));
        assert!(
            parse(
                Path::new("x.yaml"),
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n"
            )
            .expect("ok")
            .skipped
            .is_empty()
        );
    }

    #[test]
    fn list_items_are_read_with_their_lines() {
        // As `kubectl get -o yaml` writes a list: items at column 0, kind after items.
        let text = "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: a\n  spec:\n    ports: [{port: 80}]\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: b\nkind: List\nmetadata:\n  resourceVersion: \"\"\n";
        let parsed = parse(Path::new("l.yaml"), text).expect("parses");
        let lines: Vec<usize> = parsed.objects.iter().map(|(o, _)| o.line).collect();
        assert_eq!(lines, [3, 12]);
        assert_eq!(
            parsed.skipped.to_string(),
            "l.yaml: skipped 1 Deployment (kinds sockgate does not read)\n"
        );

        // Indented items; an error inside the second item names its line in the file.
        let e = parse(Path::new("l.yaml"), "# a list\napiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Service\n    metadata: {name: a}\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: Gateway\n    metadata: {name: g}\n    spec:\n      gatewayClassName: c\n      listeners:\n      - name: x\n        protocol: TCP\n")
            .expect_err("missing port");
        assert_eq!(e.line, 14, "{e}");
        assert!(e.message.contains("missing field `port`"), "{e}");

        // An item that is not an object.
        let e = parse(Path::new("l.yaml"), "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: n}\n- just a string\n")
            .expect_err("not an object");
        assert_eq!(e.line, 7, "{e}");

        // Flow style: read all the same (errors then name the `items:` line).
        let parsed = parse(Path::new("l.yaml"), "apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: Namespace, metadata: {name: n}}]\n").expect("flow");
        assert_eq!(parsed.objects.len(), 1);
        let e = parse(
            Path::new("l.yaml"),
            "apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: Namespace}]\n",
        )
        .expect_err("no name");
        assert_eq!(e.line, 3, "{e}");

        // An empty list, and a list whose items are not a sequence.
        assert!(
            p("apiVersion: v1\nkind: List\nitems: []\n")
                .expect("empty")
                .is_empty()
        );
        let e = p("apiVersion: v1\nkind: List\nitems: {a: b}\n").expect_err("not a sequence");
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn errors_name_the_line() {
        let e = p("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n- a\n- list\n")
            .expect_err("not an object");
        assert_eq!(e.line, 5, "{e}");
        assert!(
            e.to_string()
                .starts_with("x.yaml:5: a document must be a mapping"),
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

        let e = p("apiVersion: apps/v1\nmetadata: {name: a}\n").expect_err("no kind");
        assert!(e.message.contains("missing field `kind`"), "{e}");

        let e = p("apiVersion: v1\nkind: [Service]\nmetadata: {name: a}\n")
            .expect_err("kind not a string");
        assert_eq!(e.line, 2, "{e}");

        let e = p("apiVersion: gateway.networking.k8s.io/v1alpha9\nkind: TCPRoute\nmetadata: {name: a}\nspec: {rules: []}\n")
            .expect_err("bad version");
        assert!(e.message.contains("unsupported apiVersion"), "{e}");
        assert!(
            e.message
                .contains("expected gateway.networking.k8s.io/v1alpha2 or v1"),
            "{e}"
        );

        let e = p("apiVersion: v2\nkind: Service\nmetadata: {name: a}\n").expect_err("core v2");
        assert!(
            e.message
                .contains("unsupported apiVersion \"v2\" for kind Service"),
            "{e}"
        );
    }

    #[test]
    fn duplicates_are_errors() {
        let mut objs = p("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n").expect("ok");
        objs.extend(
            parse(
                Path::new("y.yaml"),
                "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\n",
            )
            .expect("ok")
            .objects,
        );
        let e = snapshot(objs).expect_err("duplicate");
        assert!(
            e.to_string()
                .contains("y.yaml:1: duplicate Service default/a (first defined at x.yaml:1)"),
            "{e}"
        );
    }
}
