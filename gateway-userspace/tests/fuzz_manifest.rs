//! Fuzz target: manifest loading, then reconcile, then everything the agent derives
//! from the desired state (map operations, forward selection tables, the report
//! `sockgate check` prints).
//!
//! Properties, for every input:
//!
//! * nothing panics;
//! * a manifest that cannot be used is a typed [`ManifestError`] naming a line of the
//!   text (1 ..= lines + 1);
//! * reconcile is a function: the same snapshot and parameters give the same desired
//!   state and status twice;
//! * the desired state fits the limits it was computed with (listeners, backend
//!   entries in all, backend entries per listener);
//! * the map operations from empty turn nothing into [`Programmed::of`] the desired
//!   state, and from that state into itself are empty;
//! * each listener's forward selection table names only backends of that listener
//!   with a weight, and is empty only when no backend has one.
//!
//! Two targets, run by bolero: `manifest_bytes` takes raw bytes (as UTF-8 when they
//! are), `manifest_edits` takes a seed manifest (the inputs of the model fixtures under
//! `tests/fixtures/model`) and applies a list of line edits with values known to be
//! awkward (zero, negative and oversized numbers, empty and null values, loopback and
//! link-local addresses, duplicate lines, ...), under random capacities. A `cargo
//! test` runs each for a bounded number of random inputs; `cargo xtask fuzz --target
//! manifest_edits --seconds 600` runs one for a given time (`docs/reliability.md`).
//! Inputs found failing are kept as fixtures in `found_cases` below.
use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use bolero::{TypeGenerator, check};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sockgate::{
    backend_filter::BackendFilter,
    diff::{Programmed, diff},
    forward::slots,
    model::{
        CrdBundle, Params, conditions::DEFAULT_CONTROLLER_NAME, limits::Limits, reconcile, report,
    },
    source::manifest::{self, ManifestError},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The seed manifests: every model fixture's input, a directory's files joined as one
/// multi-document text.
fn seeds() -> &'static [String] {
    static SEEDS: OnceLock<Vec<String>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = root().join("tests/fixtures/model");
        let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("tests/fixtures/model")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_dir())
            .collect();
        cases.sort();
        let mut seeds = Vec::new();
        for case in cases {
            let file = case.join("input.yaml");
            let text = if file.exists() {
                std::fs::read_to_string(&file).expect("input.yaml")
            } else {
                let rel = std::fs::read_to_string(case.join("input.dir")).expect("input.dir");
                let files = sockgate::source::files::manifest_files(&root().join(rel.trim()))
                    .expect("input directory");
                files
                    .iter()
                    .map(|f| std::fs::read_to_string(f).expect("manifest"))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            };
            seeds.push(text);
        }
        assert!(seeds.len() >= 20, "seed manifests missing: {}", seeds.len());
        seeds
    })
}

/// Values put in place of a line's value, or as a line of their own.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "1",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "99999999999999999999999",
    "\"\"",
    "null",
    "~",
    "[]",
    "{}",
    "[{}]",
    "true",
    "0.5",
    "1e9",
    "\"80\"",
    "http",
    "TCP",
    "UDP",
    "All",
    "Same",
    "Selector",
    "Service",
    "Gateway",
    "TCPRoute",
    "default",
    "kube-system",
    "127.0.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "::1",
    "fe80::1",
    "ff02::1",
    "10.0.0.1",
    "2001:db8::1",
    "256.1.1.1",
    "x",
    "a/b",
    "- name: x",
    "- port: 0",
    "weight: 0",
    "weight: 1000000",
    "port: 0",
    "sectionName: tcp",
    "namespace: other",
    "ready: false",
    "kind: Gateway",
    "apiVersion: v1",
    "---",
    "...",
    "&a x",
    "*a",
    "!!binary aGk=",
    "'unterminated",
    "\t",
    "very-long-name-very-long-name-very-long-name-very-long-name-very-long-name-xxxx",
];

/// One edit of a seed's lines; line numbers wrap around the seed's length.
#[derive(Clone, Debug, TypeGenerator)]
enum Edit {
    /// Remove a line.
    Delete(u16),
    /// Repeat a line just after itself.
    Duplicate(u16),
    /// Replace the value after a line's first `: ` (or the line) with a token.
    Value(u16, u8),
    /// Insert a token as a line, indented like the line before it.
    Insert(u16, u8),
    /// Swap two lines.
    Swap(u16, u16),
    /// Cut the text at a line.
    Truncate(u16),
}

/// A seed, the edits to apply to it and the capacities to reconcile it with.
#[derive(Clone, Debug, TypeGenerator)]
struct Edited {
    seed: u8,
    edits: Vec<Edit>,
    listeners: u8,
    backends: u8,
    per_listener: u16,
}

fn token(i: u8) -> &'static str {
    TOKENS[usize::from(i) % TOKENS.len()]
}

fn apply(seed: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = seed.lines().map(str::to_owned).collect();
    for e in edits.iter().take(16) {
        if lines.is_empty() {
            break;
        }
        let at = |n: u16| usize::from(n) % lines.len();
        match *e {
            Edit::Delete(n) => {
                lines.remove(at(n));
            }
            Edit::Duplicate(n) => {
                let i = at(n);
                lines.insert(i + 1, lines[i].clone());
            }
            Edit::Value(n, t) => {
                let i = at(n);
                let line = &lines[i];
                lines[i] = if let Some(p) = line.find(": ") {
                    format!("{}: {}", &line[..p], token(t))
                } else {
                    let indent = line.len() - line.trim_start().len();
                    format!("{}{}", &line[..indent], token(t))
                };
            }
            Edit::Insert(n, t) => {
                let i = at(n);
                let line = &lines[i];
                let indent = line.len() - line.trim_start().len();
                let new = format!("{}{}", &line[..indent], token(t));
                lines.insert(i + 1, new);
            }
            Edit::Swap(a, b) => {
                let (a, b) = (at(a), at(b));
                lines.swap(a, b);
            }
            Edit::Truncate(n) => lines.truncate(at(n)),
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

fn params(limits: Limits) -> Params {
    Params {
        controller_name: DEFAULT_CONTROLLER_NAME.to_owned(),
        now: Time("2025-01-01T00:00:00Z".parse().expect("timestamp")),
        backend_filter: BackendFilter::allowing([]),
        limits,
        crd_bundle: CrdBundle::NotRead,
        // As the gateway-addresses fixture: some of its addresses here, one on another node.
        node_addresses: ["192.0.2.10", "2001:db8::10"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect(),
        other_nodes_addresses: ["192.0.2.20"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect(),
    }
}

/// What happened to one input, for the fixtures' assertions.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Rejected with a typed error at this line.
    Rejected(usize),
    /// Reconciled: listeners programmed.
    Programmed(usize),
}

/// Loads `text` as a manifest file and runs everything after it, checking the
/// properties of the module docs.
fn pipeline(text: &str, limits: Limits) -> Outcome {
    let file = Path::new("fuzz.yaml");
    // Lines as YAML counts them: LF, CRLF, a lone CR, NEL (U+0085), and the line and
    // paragraph separators each end one.
    let lines = text
        .replace("\r\n", "\n")
        .replace(['\r', '\u{85}', '\u{2028}', '\u{2029}'], "\n")
        .lines()
        .count();
    let located = |e: ManifestError| {
        assert_eq!(e.file, file, "the error names the file: {e}");
        assert!(
            (1..=lines + 1).contains(&e.line),
            "the error names a line of the text ({lines} lines): {e}; text {text:?}"
        );
        Outcome::Rejected(e.line)
    };
    let parsed = match manifest::parse(file, text) {
        Ok(p) => p,
        Err(e) => return located(e),
    };
    let snap = match manifest::snapshot(parsed.objects) {
        Ok(s) => s,
        Err(e) => return located(e),
    };
    let params = params(limits);
    let (desired, status) = reconcile(&snap, &params);
    let (again, status_again) = reconcile(&snap, &params);
    assert_eq!(
        desired, again,
        "reconcile gives the same desired state twice"
    );
    assert_eq!(
        status, status_again,
        "reconcile gives the same status twice"
    );

    assert!(
        desired.listeners.len() <= limits.listeners as usize,
        "{} listeners over a limit of {}",
        desired.listeners.len(),
        limits.listeners
    );
    let entries: usize = desired.listeners.values().map(|l| l.backends.len()).sum();
    assert!(
        entries <= limits.backends as usize,
        "{entries} backend entries over a limit of {}",
        limits.backends
    );
    for (port, l) in &desired.listeners {
        assert_eq!(*port, l.port, "listener keyed by its port");
        assert!(
            l.backends.len() <= limits.backends_per_listener as usize,
            "listener {port}: {} backends over a limit of {}",
            l.backends.len(),
            limits.backends_per_listener
        );
        let t = slots::table(&l.backends);
        let weighted = l.backends.iter().any(|b| b.weight > 0);
        assert_eq!(
            t.filled != 0,
            weighted,
            "listener {port}: selection table filled {} with weights {:?}",
            t.filled,
            l.backends.iter().map(|b| b.weight).collect::<Vec<_>>()
        );
        if weighted {
            for &s in &t.slots {
                let b = l.backends.get(usize::from(s));
                assert!(
                    b.is_some_and(|b| b.weight > 0),
                    "listener {port}: slot names backend {s} of {}",
                    l.backends.len()
                );
            }
        }
    }

    let target = Programmed::of(&desired);
    let mut programmed = Programmed::default();
    for op in diff(&programmed.clone(), &desired) {
        programmed.apply(&op);
    }
    assert_eq!(
        programmed, target,
        "the operations from empty give the state"
    );
    assert!(
        diff(&target, &desired).is_empty(),
        "no operations once programmed"
    );

    let report = report::build(&snap, &desired, &status);
    serde_yaml::to_string(&report).expect("the report serialises");
    Outcome::Programmed(desired.listeners.len())
}

#[test]
fn manifest_bytes() {
    check!().for_each(|bytes| {
        let text = String::from_utf8_lossy(bytes);
        pipeline(&text, Limits::default());
    });
}

#[test]
fn manifest_edits() {
    let seeds = seeds();
    check!().with_type::<Edited>().for_each(|input| {
        let seed = &seeds[usize::from(input.seed) % seeds.len()];
        let text = apply(seed, &input.edits);
        let limits = Limits {
            listeners: u32::from(input.listeners % 8),
            backends: u32::from(input.backends % 64),
            backends_per_listener: u32::from(input.per_listener),
            ..Limits::default()
        }
        .clamped();
        pipeline(&text, limits);
    });
}

/// The seeds as they are, with the default capacities: each reconciles (the fixtures
/// check what to); so the edits start from manifests that get through.
#[test]
fn seeds_get_through() {
    for (i, seed) in seeds().iter().enumerate() {
        let out = pipeline(seed, Limits::default());
        assert!(matches!(out, Outcome::Programmed(_)), "seed {i}: {out:?}");
    }
}

// ---- what the targets found, kept as fixtures ----

/// `manifest_bytes`: a lone carriage return is a line break to YAML but not to
/// `str::lines`: `"\r\r` (an unterminated quoted scalar) is rejected at line 3 of a text
/// that `str::lines` counts as one line. The documents of a file with such line breaks
/// were not split at `---` (the whole file went to the YAML parser as one document,
/// which it refuses), and lines were counted differently from the parser's; lone
/// carriage returns are now line breaks there too.
#[test]
fn found_lone_carriage_returns_are_line_breaks() {
    assert_eq!(pipeline("\"\r\r", Limits::default()), Outcome::Rejected(3));
    let svc = |name: &str| {
        format!(
            "apiVersion: v1\rkind: Service\rmetadata: {{name: {name}}}\rspec: {{ports: [{{port: 80}}]}}\r"
        )
    };
    let two = format!("{}---\r{}", svc("a"), svc("b"));
    let parsed = manifest::parse(Path::new("cr.yaml"), &two).expect("two documents");
    assert_eq!(parsed.objects.len(), 2);
    assert_eq!(
        parsed.objects[1].0.line, 6,
        "the second document starts at line 6"
    );
    let bad = format!(
        "{}---\r{}",
        svc("a"),
        svc("b").replace("port: 80", "port: x")
    );
    assert_eq!(pipeline(&bad, Limits::default()), Outcome::Rejected(9));
}

/// `manifest_bytes` (`"{\u{fffd}G\u{fffd}\u{fffd}\u{85}\u{fffd}"`): the next-line
/// character U+0085 is a line break to YAML 1.1 as a lone carriage return is, with the
/// same consequences; it is now one when documents are split too.
#[test]
fn found_next_line_characters_are_line_breaks() {
    let svc = |name: &str| {
        format!(
            "apiVersion: v1\u{85}kind: Service\u{85}metadata: {{name: {name}}}\u{85}spec: {{ports: [{{port: 80}}]}}\u{85}"
        )
    };
    let two = format!("{}---\u{85}{}", svc("a"), svc("b"));
    let parsed = manifest::parse(Path::new("nel.yaml"), &two).expect("two documents");
    assert_eq!(parsed.objects.len(), 2);
    assert_eq!(
        parsed.objects[1].0.line, 6,
        "the second document starts at line 6"
    );
    assert_eq!(
        pipeline(
            "{\u{fffd}G\u{fffd}\u{fffd}\u{85}\u{fffd}",
            Limits::default()
        ),
        Outcome::Rejected(3)
    );
}
