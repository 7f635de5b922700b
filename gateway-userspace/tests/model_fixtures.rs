//! Table-driven model tests: every case under `tests/fixtures/model/<case>/` has an
//! input (`input.yaml`, or `input.dir` naming a directory relative to the repository
//! root) and `expected.yaml`, the report `sockgate check` prints for it (the status of
//! every `GatewayClass`, `Gateway` and `TCPRoute`, then the programmed table), computed
//! at a fixed time. A case may have `params.yaml` with `allowBackendCidrs: [CIDR, ...]`,
//! the `--allow-backend-cidr` values it is computed with, `limits: {listeners: N,
//! backends: N, backendsPerListener: N, listenerPorts: {min: N, max: N}}`, the
//! capacities (`--max-listeners`, ...) and allowed listener ports (`--listener-ports`,
//! optional: all by default), and
//! `crdBundleVersions: {CRD name: version or null}`, the bundle-version annotations of
//! the CRDs as the kube source reads them (without it, no CRD was read, as with files),
//! `nodeAddresses: [IP, ...]`, this node's addresses (`sockgate check --node-address`),
//! and `otherNodesAddresses: [IP, ...]`, those of the other nodes running an agent.
//!
//! `SOCKGATE_BLESS=1 cargo test -p gateway-userspace --test model_fixtures` rewrites the
//! expected files; read every change before committing it.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sockgate::{
    backend_filter::BackendFilter,
    model::{
        CrdBundle, Params, Snapshot, conditions::DEFAULT_CONTROLLER_NAME, limits::Limits,
        reconcile, report,
    },
    source::files,
    xdp::Cidr,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A case's `params.yaml`.
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CaseParams {
    #[serde(default)]
    allow_backend_cidrs: Vec<Cidr>,
    /// The data path's capacities (`--max-listeners`, ...), default the built-in ones.
    #[serde(default)]
    limits: Option<Limits>,
    #[serde(default)]
    crd_bundle_versions: Option<BTreeMap<String, Option<String>>>,
    /// This node's addresses (`sockgate check --node-address`).
    #[serde(default)]
    node_addresses: Vec<std::net::IpAddr>,
    /// The addresses of the other nodes running an agent.
    #[serde(default)]
    other_nodes_addresses: Vec<std::net::IpAddr>,
}

fn params(case: &Path) -> Params {
    let file = case.join("params.yaml");
    let p: CaseParams = if file.exists() {
        let text = std::fs::read_to_string(&file).expect("params.yaml");
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    } else {
        CaseParams::default()
    };
    Params {
        controller_name: DEFAULT_CONTROLLER_NAME.to_owned(),
        now: Time("2025-01-01T00:00:00Z".parse().expect("timestamp")),
        backend_filter: BackendFilter::allowing(p.allow_backend_cidrs),
        limits: p.limits.unwrap_or_default(),
        crd_bundle: p
            .crd_bundle_versions
            .map_or(CrdBundle::NotRead, CrdBundle::Read),
        node_addresses: p.node_addresses.into_iter().collect(),
        other_nodes_addresses: p.other_nodes_addresses.into_iter().collect(),
    }
}

fn cases() -> Vec<PathBuf> {
    let dir = root().join("tests/fixtures/model");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/model")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "fixtures missing: {}", cases.len());
    cases
}

fn input(case: &Path) -> PathBuf {
    let file = case.join("input.yaml");
    if file.exists() {
        return file;
    }
    let rel = std::fs::read_to_string(case.join("input.dir"))
        .unwrap_or_else(|e| panic!("{}: no input.yaml or input.dir: {e}", case.display()));
    root().join(rel.trim())
}

fn load(case: &Path) -> Snapshot {
    files::load(&input(case))
        .unwrap_or_else(|e| panic!("{}: {e}", case.display()))
        .snapshot
}

fn render(case: &Path, snap: &Snapshot) -> String {
    let (desired, status) = reconcile(snap, &params(case));
    serde_yaml::to_string(&report::build(snap, &desired, &status)).expect("yaml")
}

#[test]
fn fixtures_give_the_expected_status() {
    let bless = std::env::var_os("SOCKGATE_BLESS").is_some();
    let mut failures = Vec::new();
    for case in cases() {
        let actual = render(&case, &load(&case));
        let path = case.join("expected.yaml");
        if bless {
            std::fs::write(&path, &actual).expect("write expected.yaml");
            continue;
        }
        let expected =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let want: serde_yaml::Value = serde_yaml::from_str(&expected).expect("expected.yaml");
        let got: serde_yaml::Value = serde_yaml::from_str(&actual).expect("actual yaml");
        if want != got {
            failures.push(format!("--- {}\n{actual}", case.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) differ; actual output:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A small deterministic generator: the test needs many permutations, not randomness.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[test]
fn input_order_changes_nothing() {
    let mut rng = XorShift(0x5eed_cafe_f00d_d00d);
    for case in cases() {
        let snap = load(&case);
        let params = params(&case);
        let want = reconcile(&snap, &params);
        for round in 0..64 {
            let mut s = snap.clone();
            rng.shuffle(&mut s.gateway_classes);
            rng.shuffle(&mut s.gateways);
            rng.shuffle(&mut s.tcp_routes);
            rng.shuffle(&mut s.reference_grants);
            rng.shuffle(&mut s.namespaces);
            rng.shuffle(&mut s.services);
            rng.shuffle(&mut s.endpoint_slices);
            for slice in &mut s.endpoint_slices {
                rng.shuffle(&mut slice.endpoints);
            }
            let got = reconcile(&s, &params);
            assert!(
                got == want,
                "{}: permutation {round} changed the result",
                case.display()
            );
        }
    }
}

/// Each programmed endpoint carries the `EndpointSlice` it was read from (for the
/// access log): IPv4 endpoints from `app-1`, IPv6 ones from `app-2`.
#[test]
fn endpoints_name_their_endpoint_slice() {
    let case = root().join("tests/fixtures/model/target-port-by-name-and-number");
    let (desired, _) = reconcile(&load(&case), &params(&case));
    let mut seen = 0;
    for l in desired.listeners.values() {
        for b in &l.backends {
            let addr = b.addr.expect("resolved endpoint");
            let want = if addr.is_ipv4() {
                "default/app-1"
            } else {
                "default/app-2"
            };
            assert_eq!(b.endpoint_slice.as_deref(), Some(want), "{b:?}");
            seen += 1;
        }
    }
    assert_eq!(seen, 4, "{desired:?}");
}
