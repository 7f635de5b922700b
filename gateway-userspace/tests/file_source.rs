//! The file source, scripted: a directory that changes under it. A bad file is reported
//! with its file and line and the last good desired state keeps serving; fixing it
//! resumes updates. Kinds sockgate does not read are skipped, never an error.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use sockgate::{
    backend_filter::BackendFilter,
    model::{conditions::DEFAULT_CONTROLLER_NAME, limits::Limits},
    source::files::{FileSource, SourceError, Update},
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sockgate-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn example() -> PathBuf {
    examples().join("envoy-gateway")
}

fn copy_example(to: &Path) {
    for f in ["gatewayclass.yaml", "tcp-routing.yaml", "backends.yaml"] {
        fs::copy(example().join(f), to.join(f)).expect("copy example");
    }
}

fn backend(src: &FileSource, port: u16) -> Option<SocketAddr> {
    src.current().listeners.get(&port)?.backends.first()?.addr
}

#[test]
fn last_good_configuration_keeps_serving() {
    let dir = TempDir::new("files");
    copy_example(&dir.0);
    let mut src = FileSource::open(
        &dir.0,
        DEFAULT_CONTROLLER_NAME,
        BackendFilter::default(),
        Limits::default(),
    )
    .expect("example parses");
    let first = src.current().clone();
    assert_eq!(
        backend(&src, 8088),
        Some("10.200.1.2:3001".parse().expect("addr"))
    );
    assert_eq!(
        backend(&src, 8089),
        Some("10.200.2.2:3002".parse().expect("addr"))
    );
    assert!(matches!(src.poll(), Update::Unchanged));

    // A file whose second document (line 5) is not a Kubernetes object: no apiVersion.
    let bad = dir.0.join("zz-bad.yaml");
    fs::write(
        &bad,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\nkind: Deployment\nmetadata: {name: d}\n",
    )
    .expect("write");
    match src.poll() {
        Update::Failed(SourceError::Manifest(e)) => {
            assert_eq!(e.file, bad);
            assert_eq!(e.line, 5, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("zz-bad.yaml:5: missing field `apiVersion`"),
                "{msg}"
            );
        }
        other => panic!("expected a manifest error, got {other:?}"),
    }
    assert_eq!(src.current(), &first, "the last good state is kept");
    assert!(
        matches!(src.poll(), Update::Unchanged),
        "one report per change"
    );

    // Broken YAML in the same file: still an error with the line, still the same state.
    fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n",
    )
    .expect("write");
    match src.poll() {
        Update::Failed(SourceError::Manifest(e)) => {
            assert_eq!(e.file, bad);
            assert!(e.line >= 4, "{e}");
        }
        other => panic!("expected a manifest error, got {other:?}"),
    }
    assert_eq!(src.current(), &first);

    // A missing required field (listener port) in a Gateway.
    fs::write(
        &bad,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g2}\nspec:\n  gatewayClassName: sockgate\n  listeners:\n  - name: x\n    protocol: TCP\n",
    )
    .expect("write");
    match src.poll() {
        Update::Failed(SourceError::Manifest(e)) => {
            assert_eq!(e.line, 7, "{e}");
            assert!(e.message.contains("missing field `port`"), "{e}");
        }
        other => panic!("expected a manifest error, got {other:?}"),
    }
    assert_eq!(src.current(), &first);

    // Fixed: the bad file goes, and tcp-app-1 now points at bar. A new state, with a
    // new generation.
    fs::remove_file(&bad).expect("rm");
    let routes = dir.0.join("tcp-routing.yaml");
    let text = fs::read_to_string(&routes).expect("read");
    fs::write(
        &routes,
        text.replacen(
            "    - name: foo\n      port: 3001",
            "    - name: bar\n      port: 3002",
            1,
        ),
    )
    .expect("write");
    match src.poll() {
        Update::Changed(d, _) => assert_eq!(d.generation, first.generation + 1),
        other => panic!("expected a change, got {other:?}"),
    }
    assert_eq!(
        backend(&src, 8088),
        Some("10.200.2.2:3002".parse().expect("addr"))
    );

    // A directory that disappears is an error too; the state stays.
    let kept = src.current().clone();
    fs::remove_dir_all(&dir.0).expect("rm dir");
    assert!(matches!(src.poll(), Update::Failed(SourceError::Io { .. })));
    assert_eq!(src.current(), &kept);
}

#[test]
fn a_directory_that_does_not_parse_cannot_be_opened() {
    let dir = TempDir::new("files-bad");
    fs::write(dir.0.join("a.yml"), "apiVersion: v1\nkind: Service\n").expect("write");
    let e = FileSource::open(
        &dir.0,
        DEFAULT_CONTROLLER_NAME,
        BackendFilter::default(),
        Limits::default(),
    )
    .err()
    .expect("no metadata");
    assert!(
        e.to_string()
            .contains("a.yml:1: Service has no metadata.name"),
        "{e}"
    );
    // Files other than *.yaml / *.yml are not read.
    fs::remove_file(dir.0.join("a.yml")).expect("rm");
    fs::write(dir.0.join("notes.txt"), "not yaml: [").expect("write");
    let src = FileSource::open(
        &dir.0,
        DEFAULT_CONTROLLER_NAME,
        BackendFilter::default(),
        Limits::default(),
    )
    .expect("empty dir");
    assert!(src.current().listeners.is_empty());
}

/// What `skipped()` says, one line per file, with the file's name only.
fn skipped(src: &FileSource) -> Vec<String> {
    src.skipped()
        .by_file()
        .map(|(file, counts)| {
            let name = file.file_name().expect("file name").to_string_lossy();
            format!("{name}: {counts}")
        })
        .collect()
}

#[test]
fn an_application_bundle_is_served_and_a_bad_edit_keeps_it() {
    let dir = TempDir::new("files-bundle");
    for f in ["gatewayclass.yaml", "app.yaml", "endpoints.yaml"] {
        fs::copy(examples().join("bundle").join(f), dir.0.join(f)).expect("copy bundle");
    }
    let mut src = FileSource::open(
        &dir.0,
        DEFAULT_CONTROLLER_NAME,
        BackendFilter::default(),
        Limits::default(),
    )
    .expect("bundle parses");
    let first = src.current().clone();
    let addrs: Vec<Option<SocketAddr>> = first.listeners[&7000]
        .backends
        .iter()
        .map(|b| b.addr)
        .collect();
    assert_eq!(
        addrs,
        [
            Some("10.244.1.12:7000".parse().expect("addr")),
            Some("10.244.2.17:7000".parse().expect("addr"))
        ]
    );
    assert_eq!(
        first.listeners.len(),
        1,
        "the HTTP Gateway is not sockgate's"
    );
    assert_eq!(
        skipped(&src),
        [
            "app.yaml: 1 ConfigMap, 1 Secret, 2 Deployment, 1 HTTPRoute",
            "endpoints.yaml: 1 Pod"
        ]
    );

    // A later bad edit: a document that is not a Kubernetes object, at line 3.
    let app = dir.0.join("app.yaml");
    let text = fs::read_to_string(&app).expect("read");
    fs::write(
        &app,
        format!("---\n---\n- a list, not an object\n---\n{text}"),
    )
    .expect("write");
    match src.poll() {
        Update::Failed(SourceError::Manifest(e)) => {
            assert_eq!((e.file.as_path(), e.line), (app.as_path(), 3), "{e}");
            assert!(e.message.contains("must be a mapping"), "{e}");
        }
        other => panic!("expected a manifest error, got {other:?}"),
    }
    assert_eq!(src.current(), &first, "the last good state is kept");

    // A kind sockgate reads that does not parse, inside the List: the EndpointSlice's
    // port is not a number (line 19 of endpoints.yaml).
    fs::write(&app, &text).expect("write");
    let endpoints = dir.0.join("endpoints.yaml");
    let list = fs::read_to_string(&endpoints).expect("read");
    let broken = list.replacen("    port: 7000\n", "    port: seven-thousand\n", 1);
    assert_ne!(broken, list);
    fs::write(&endpoints, &broken).expect("write");
    match src.poll() {
        Update::Failed(SourceError::Manifest(e)) => {
            assert_eq!(e.file, endpoints, "{e}");
            assert_eq!(e.line, 19, "{e}");
            assert!(e.message.contains("invalid type"), "{e}");
        }
        other => panic!("expected a manifest error, got {other:?}"),
    }
    assert_eq!(src.current(), &first, "the last good state is kept");

    // Fixed, without the Pod: the same desired state, and the skipped set follows.
    let without_pod = &list[..list.find("- apiVersion: v1\n  kind: Pod").expect("pod")];
    fs::write(&endpoints, format!("{without_pod}kind: List\n")).expect("write");
    match src.poll() {
        Update::Changed(d, _) => assert_eq!(*d, *first),
        other => panic!("expected a change, got {other:?}"),
    }
    assert_eq!(
        skipped(&src),
        ["app.yaml: 1 ConfigMap, 1 Secret, 2 Deployment, 1 HTTPRoute"]
    );
}
