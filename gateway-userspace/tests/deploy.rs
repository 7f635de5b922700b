//! The manifests in `deploy/`: every document parses into its typed object with no
//! field the type does not know (a typo would be dropped silently by the API server's
//! older versions, or rejected by newer ones), the kustomization lists every manifest,
//! and the RBAC grants everything the code uses ([`sockgate::cluster::access`]).
use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sockgate::cluster::access::{API_ACCESS, Access, Scope};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of every manifest in `deploy/` (not the examples), by file.
fn documents() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if !v.is_null() {
                out.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    out
}

/// Parses `v` as `T` and checks that nothing was dropped on the way.
fn typed<T: DeserializeOwned + Serialize>(file: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", v["kind"]));
    let back = serde_json::to_value(&t).expect("serialize");
    assert_eq!(
        &back, v,
        "{file}: {} {} has a field its type does not know (compare the two)",
        v["kind"], v["metadata"]["name"]
    );
    t
}

#[test]
fn every_manifest_is_typed_with_no_unknown_field() {
    let docs = documents();
    assert!(docs.len() >= 8, "{docs:?}");
    for (file, v) in &docs {
        match v["kind"].as_str().unwrap_or_default() {
            "Namespace" => drop(typed::<Namespace>(file, v)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, v)),
            "ClusterRole" => drop(typed::<ClusterRole>(file, v)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(file, v)),
            "Role" => drop(typed::<Role>(file, v)),
            "RoleBinding" => drop(typed::<RoleBinding>(file, v)),
            "DaemonSet" => drop(typed::<DaemonSet>(file, v)),
            "CustomResourceDefinition" => drop(typed::<
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
            >(file, v)),
            "GatewayClass" => {
                assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
                assert_eq!(
                    v["spec"]["controllerName"], "sockgate.dev/gateway-controller",
                    "{file}"
                );
            }
            other => panic!("{file}: unexpected kind {other}"),
        }
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).expect("read");
    let k: Value = serde_yaml::from_str(&text).expect("YAML");
    let mut listed: Vec<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("string").to_owned())
        .collect();
    listed.sort();
    let mut files: Vec<String> = documents().into_iter().map(|(f, _)| f).collect();
    files.dedup();
    assert_eq!(listed, files);
}

/// Whether `rules` grant `verb` on `resource` of `group`, on every object named in
/// `names` (on every object when `names` is empty).
fn grants(rules: &[PolicyRule], a: &Access, verb: &str) -> bool {
    rules.iter().any(|r| {
        let has = |list: &Option<Vec<String>>, want: &str| {
            list.as_ref()
                .is_some_and(|l| l.iter().any(|x| x == want || x == "*"))
        };
        let named = match r.resource_names.as_deref() {
            None | Some([]) => true,
            Some(names) => {
                !a.resource_names.is_empty()
                    && a.resource_names
                        .iter()
                        .all(|n| names.iter().any(|x| x == n))
            }
        };
        has(&r.api_groups, a.group)
            && r.resources.iter().flatten().any(|x| x == a.resource)
            && r.verbs.iter().any(|v| v == verb)
            && named
    })
}

#[test]
fn rbac_grants_everything_the_code_uses_and_no_more() {
    let docs = documents();
    let mut cluster_rules = Vec::new();
    let mut ns_rules = Vec::new();
    let mut agent_ns = None;
    for (file, v) in &docs {
        match v["kind"].as_str().unwrap_or_default() {
            "ClusterRole" => {
                cluster_rules.extend(typed::<ClusterRole>(file, v).rules.unwrap_or_default());
            }
            "Role" => {
                let role = typed::<Role>(file, v);
                agent_ns = role.metadata.namespace.clone();
                ns_rules.extend(role.rules.unwrap_or_default());
            }
            _ => {}
        }
    }
    assert_eq!(agent_ns.as_deref(), Some("sockgate-system"));
    for a in API_ACCESS {
        let rules = match a.scope {
            Scope::Cluster => &cluster_rules,
            Scope::OwnNamespace => &ns_rules,
        };
        for verb in a.verbs {
            assert!(
                grants(rules, a, verb),
                "deploy/rbac.yaml does not grant {verb} on {:?}/{} ({})",
                a.group,
                a.resource,
                a.used_by
            );
        }
    }
    // Least privilege: every granted (group, resource, verb) is one the code uses.
    for (rules, scope) in [
        (&cluster_rules, Scope::Cluster),
        (&ns_rules, Scope::OwnNamespace),
    ] {
        for r in rules {
            for g in r.api_groups.iter().flatten() {
                for res in r.resources.iter().flatten() {
                    for verb in &r.verbs {
                        assert!(
                            API_ACCESS.iter().any(|a| a.scope == scope
                                && a.group == g
                                && a.resource == res
                                && a.verbs.contains(&verb.as_str())),
                            "deploy/rbac.yaml grants {verb} on {g:?}/{res}, which no code uses"
                        );
                        // Used on named objects only: granted on those names only.
                        let named = API_ACCESS
                            .iter()
                            .filter(|a| a.scope == scope && a.group == g && a.resource == res)
                            .all(|a| !a.resource_names.is_empty());
                        assert!(
                            !named || r.resource_names.as_ref().is_some_and(|n| !n.is_empty()),
                            "deploy/rbac.yaml grants {verb} on every {g:?}/{res}; the code uses named ones only"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn daemonset_runs_unprivileged_with_named_capabilities() {
    let (file, v) = documents()
        .into_iter()
        .find(|(_, v)| v["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let ds: DaemonSet = typed(&file, &v);
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "sockgate")
        .expect("agent container");
    let sc = agent.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let add: Vec<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    for needed in ["BPF", "NET_ADMIN", "PERFMON"] {
        assert!(add.contains(&needed), "{add:?}");
    }
    assert!(!add.contains(&"SYS_ADMIN"), "{add:?}");
    let env: Vec<&str> = agent
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    assert!(env.contains(&"NODE_NAME"), "{env:?}");
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe(&agent.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe(&agent.readiness_probe).as_deref(), Some("/readyz"));
    let bpffs = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    let limits = agent
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("limits");
    assert!(limits.contains_key("memory"));
}

#[test]
fn listener_policy_crd_is_current() {
    let file = std::fs::read_to_string(deploy_dir().join("crd-listenerpolicy.yaml")).expect("read");
    let generated = sockgate::policy::crd_yaml().expect("CRD");
    assert!(
        file == generated,
        "deploy/crd-listenerpolicy.yaml is stale: regenerate it with `sockgate crd > deploy/crd-listenerpolicy.yaml`"
    );
}
