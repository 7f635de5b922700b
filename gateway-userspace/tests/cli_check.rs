//! `sockgate check` as a user runs it: each guide example prints the expected status
//! (the fixture, up to `lastTransitionTime`), JSON output parses, an application's
//! bundle of other kinds checks with the skipped kinds said on stderr, bad input exits
//! non-zero with the file and line, and refused backend addresses are reported (and
//! allowed with `--allow-backend-cidr`), every object is reported in the apiVersion it
//! was given, and listeners outside `--listener-ports` are not accepted.
use std::{path::Path, process::Command};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn check(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sockgate"))
        .arg("check")
        .args(args)
        .current_dir(root())
        .output()
        .expect("sockgate runs")
}

/// Replaces every `lastTransitionTime` by a fixed value.
fn pin_times(v: &mut serde_yaml::Value) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                if k.as_str() == Some("lastTransitionTime") {
                    *val = "fixed".into();
                } else {
                    pin_times(val);
                }
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter_mut().for_each(pin_times),
        _ => {}
    }
}

#[test]
fn guide_examples_print_the_expected_status() {
    for guide in ["gateway-api-basic", "envoy-gateway", "fsm-gateway", "ngrok"] {
        let out = check(&["-f", &format!("deploy/examples/{guide}")]);
        assert!(
            out.status.success(),
            "{guide}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("yaml");
        let expected = root().join(format!("tests/fixtures/model/guide-{guide}/expected.yaml"));
        let mut want: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(expected).expect("fixture"))
                .expect("fixture yaml");
        pin_times(&mut got);
        pin_times(&mut want);
        assert_eq!(got, want, "{guide}");
    }
}

#[test]
fn json_output_parses_and_agrees() {
    let out = check(&["-f", "deploy/examples/envoy-gateway", "-o", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ports: Vec<u64> = v["programmed"]
        .as_array()
        .expect("programmed")
        .iter()
        .filter_map(|l| l["port"].as_u64())
        .collect();
    assert_eq!(ports, [8088, 8089]);
    assert_eq!(v["objects"][1]["kind"], "Gateway");
    assert_eq!(v["objects"][1]["status"]["conditions"][0]["status"], "True");
}

const BUNDLE_SKIPPED: &str = "\
deploy/examples/bundle/app.yaml: skipped 1 ConfigMap, 1 Secret, 2 Deployment, 1 HTTPRoute (kinds sockgate does not read)
deploy/examples/bundle/endpoints.yaml: skipped 1 Pod (kinds sockgate does not read)
";

#[test]
fn an_application_bundle_checks_and_says_what_it_skipped() {
    let out = check(&["-f", "deploy/examples/bundle"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), BUNDLE_SKIPPED);
    let mut got: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("yaml");
    let mut want: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/model/bundle/expected.yaml"))
            .expect("fixture"),
    )
    .expect("fixture yaml");
    pin_times(&mut got);
    pin_times(&mut want);
    assert_eq!(got, want);
    let programmed = &got["programmed"];
    assert_eq!(programmed[0]["port"].as_u64(), Some(7000));
    assert_eq!(
        programmed[0]["listener"].as_str(),
        Some("default/ledger-tcp/wire")
    );
    assert_eq!(
        programmed[0]["backends"].as_sequence().map(Vec::len),
        Some(2)
    );
    assert!(
        programmed.get(1).is_none(),
        "only the TCP listener is programmed"
    );

    // JSON: stdout is the report alone and parses; the summary is on stderr.
    let out = check(&["-f", "deploy/examples/bundle", "-o", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["programmed"][0]["port"], 7000);
    assert_eq!(String::from_utf8_lossy(&out.stderr), BUNDLE_SKIPPED);

    // One file of it.
    let out = check(&["-f", "deploy/examples/bundle/endpoints.yaml", "-o", "json"]);
    assert!(out.status.success());
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "deploy/examples/bundle/endpoints.yaml: skipped 1 Pod (kinds sockgate does not read)\n"
    );
}

#[test]
fn bad_input_exits_non_zero_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("sockgate-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("bad.yaml");
    std::fs::write(&file, "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - backendRefs:\n    - port: 80\n").expect("write");
    let out = check(&["-f", dir.to_str().expect("utf-8")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:7: "), "{err}");
    assert!(err.contains("missing field `name`"), "{err}");
    assert!(out.stdout.is_empty());

    // A document that is not a Kubernetes object, after kinds that are only skipped.
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("app.yaml");
    std::fs::write(
        &file,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\njust: a mapping\n",
    )
    .expect("write");
    let out = check(&["-f", dir.to_str().expect("utf-8"), "-o", "json"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("app.yaml:5: missing field `apiVersion`"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let out = check(&["-f", "/nonexistent/sockgate"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sockgate"));
}

/// The `ResolvedRefs` condition of the route `name` (its first parent).
fn resolved_refs<'a>(report: &'a serde_yaml::Value, name: &str) -> &'a serde_yaml::Value {
    let route = report["objects"]
        .as_sequence()
        .expect("objects")
        .iter()
        .find(|o| o["kind"] == "TCPRoute" && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("route {name}"));
    route["status"]["parents"][0]["conditions"]
        .as_sequence()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "ResolvedRefs")
        .expect("ResolvedRefs")
}

/// The addresses programmed on listener `port`.
fn programmed(report: &serde_yaml::Value, port: u64) -> Vec<String> {
    report["programmed"]
        .as_sequence()
        .expect("programmed")
        .iter()
        .filter(|l| l["port"].as_u64() == Some(port))
        .flat_map(|l| l["backends"].as_sequence().expect("backends").clone())
        .filter_map(|b| b["address"].as_str().map(ToOwned::to_owned))
        .collect()
}

#[test]
fn refused_backends_are_reported_and_not_programmed() {
    let input = "tests/fixtures/model/backend-refused-loopback-link-local/input.yaml";
    let out = check(&["-f", input]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("yaml");
    let etcd = resolved_refs(&r, "etcd");
    assert_eq!(etcd["status"], "False");
    assert_eq!(etcd["reason"], "RefNotPermitted");
    assert_eq!(
        etcd["message"],
        "endpoint 127.0.0.1:2379 of Service default/etcd refused: loopback address (allow it with --allow-backend-cidr)"
    );
    let api = resolved_refs(&r, "api");
    assert_eq!(api["reason"], "RefNotPermitted");
    assert_eq!(
        api["message"],
        "endpoint 169.254.169.254:8080 of Service default/api refused: link-local address (allow it with --allow-backend-cidr)"
    );
    // Nothing refused is programmed; the allowed endpoints of the same route serve.
    assert!(programmed(&r, 7000).is_empty(), "{r:?}");
    assert_eq!(programmed(&r, 7001), ["10.0.0.5:8080", "10.0.0.6:80"]);
    let refused: Vec<(&str, &str)> = r["refused"]
        .as_sequence()
        .expect("refused")
        .iter()
        .map(|x| {
            (
                x["address"].as_str().expect("address"),
                x["reason"].as_str().expect("reason"),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            ("169.254.169.254:8080", "link_local"),
            ("127.0.0.1:2379", "loopback")
        ]
    );

    // Allowed by the flag: programmed, and the routes resolve.
    let out = check(&[
        "-f",
        input,
        "--allow-backend-cidr",
        "127.0.0.0/8",
        "--allow-backend-cidr",
        "169.254.169.254",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("yaml");
    assert_eq!(resolved_refs(&r, "etcd")["status"], "True");
    assert_eq!(resolved_refs(&r, "api")["status"], "True");
    assert_eq!(programmed(&r, 7000), ["127.0.0.1:2379"]);
    assert_eq!(
        programmed(&r, 7001),
        ["10.0.0.5:8080", "169.254.169.254:8080", "10.0.0.6:80"]
    );
    assert!(r.get("refused").is_none(), "{r:?}");
}

#[test]
fn a_bad_allow_backend_cidr_is_a_one_line_error() {
    for bad in ["127.0.0.0/33", "localhost", "10.0.0.0/x"] {
        let out = check(&[
            "-f",
            "deploy/examples/envoy-gateway",
            "--allow-backend-cidr",
            bad,
        ]);
        assert!(!out.status.success(), "{bad}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert!(first.contains("--allow-backend-cidr"), "{err}");
        assert!(first.contains(&format!("invalid CIDR \"{bad}\"")), "{err}");
    }
}

#[test]
fn each_object_is_reported_in_the_api_version_it_was_given() {
    let out = check(&[
        "-f",
        "tests/fixtures/model/api-versions-as-given/input.yaml",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let versions: Vec<(String, String, String)> = report["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                o["apiVersion"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let gw = |v: &str| format!("gateway.networking.k8s.io/{v}");
    let want = [
        ("GatewayClass", "sockgate", gw("v1beta1")),
        ("Gateway", "new", gw("v1")),
        ("Gateway", "old", gw("v1beta1")),
        ("TCPRoute", "alpha", gw("v1alpha2")),
        ("TCPRoute", "ga", gw("v1")),
        ("ReferenceGrant", "to-one", gw("v1beta1")),
        ("ReferenceGrant", "to-two", gw("v1")),
    ]
    .map(|(k, n, v)| (k.to_owned(), n.to_owned(), v));
    assert_eq!(versions, want);
}

/// The listener `name` of Gateway `gateway`'s status.
fn listener<'a>(report: &'a serde_yaml::Value, gateway: &str, name: &str) -> &'a serde_yaml::Value {
    report["objects"]
        .as_sequence()
        .expect("objects")
        .iter()
        .find(|o| o["kind"] == "Gateway" && o["metadata"]["name"] == gateway)
        .unwrap_or_else(|| panic!("Gateway {gateway}"))["status"]["listeners"]
        .as_sequence()
        .expect("listeners")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("listener {name}"))
}

/// The condition `type_` of a listener status.
fn condition<'a>(listener: &'a serde_yaml::Value, type_: &str) -> &'a serde_yaml::Value {
    listener["conditions"]
        .as_sequence()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("{type_}"))
}

#[test]
fn listeners_outside_the_allowed_ports_are_not_accepted() {
    // The basic example: my-tcp-gateway's listeners foo (8080) and bar (8090).
    let input = "deploy/examples/gateway-api-basic";
    let ports = |r: &serde_yaml::Value| -> Vec<u64> {
        r["programmed"]
            .as_sequence()
            .expect("programmed")
            .iter()
            .filter_map(|l| l["port"].as_u64())
            .collect()
    };
    let out = check(&["-f", input]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("yaml");
    assert_eq!(ports(&r), [8080, 8090]);

    // 8085-8095: foo is not accepted, not programmed, and said in notProgrammed; bar
    // is served.
    let out = check(&["-f", input, "--listener-ports", "8085-8095"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("yaml");
    assert_eq!(ports(&r), [8090]);
    let foo = listener(&r, "my-tcp-gateway", "foo");
    let accepted = condition(foo, "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "PortUnavailable");
    assert_eq!(
        accepted["message"],
        "port 8080 is outside the listener ports this node allows (8085-8095; --listener-ports)"
    );
    assert_eq!(condition(foo, "Programmed")["status"], "False");
    let bar = listener(&r, "my-tcp-gateway", "bar");
    assert_eq!(condition(bar, "Accepted")["status"], "True");
    assert_eq!(condition(bar, "Programmed")["status"], "True");
    let left = r["notProgrammed"].as_sequence().expect("notProgrammed");
    assert_eq!(left.len(), 1, "{r:?}");
    assert_eq!(left[0]["limit"], "listener_ports");
    assert_eq!(left[0]["port"].as_u64(), Some(8080));
    assert_eq!(left[0]["listener"], "default/my-tcp-gateway/foo");

    // A bad value: one line naming the flag.
    for bad in ["80", "0-10", "9000-8000", "1-70000"] {
        let out = check(&["-f", input, "--listener-ports", bad]);
        assert!(!out.status.success(), "{bad}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("invalid --listener-ports \"{bad}\"")),
            "{err}"
        );
    }
}
