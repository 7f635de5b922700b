//! The file source, scripted: a directory that changes under it. A bad file is reported
//! with its file and line and the last good desired state keeps serving; fixing it
//! resumes updates.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use sockgate::{
    backend_filter::BackendFilter,
    model::conditions::DEFAULT_CONTROLLER_NAME,
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

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/envoy-gateway")
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
    let mut src = FileSource::open(&dir.0, DEFAULT_CONTROLLER_NAME, BackendFilter::default())
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

    // A file with an unknown kind on line 5 (second document).
    let bad = dir.0.join("zz-bad.yaml");
    fs::write(
        &bad,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\nkind: Deployment\napiVersion: apps/v1\nmetadata: {name: d}\n",
    )
    .expect("write");
    match src.poll() {
        Update::Failed(SourceError::Manifest(e)) => {
            assert_eq!(e.file, bad);
            assert_eq!(e.line, 5, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("zz-bad.yaml:5: unknown kind \"Deployment\""),
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
    let e = FileSource::open(&dir.0, DEFAULT_CONTROLLER_NAME, BackendFilter::default())
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
    let src = FileSource::open(&dir.0, DEFAULT_CONTROLLER_NAME, BackendFilter::default())
        .expect("empty dir");
    assert!(src.current().listeners.is_empty());
}
