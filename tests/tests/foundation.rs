//! Foundation end-to-end tests: programs load for real, maps are pinned with BTF,
//! bpftool shows fields by name, bad input gets one clear line.
mod common;

use std::process::Command;

use common::{Agent, require_root};
use netbed::Bed;

fn bpftool_dump(path: &std::path::Path) -> serde_json::Value {
    common::bpftool_json(&["map", "dump", "pinned", &path.display().to_string()])
}

#[test]
fn pinned_maps_dump_by_field_name() {
    require_root();
    let bed = Bed::new(1).expect("bed");
    let route = format!("8088={}:3001*3", bed.backend_addr(0));
    let agent = Agent::start(&bed, &["--route", &route], &[8088]);
    for name in gateway_common::MAP_NAMES {
        assert!(agent.pin_dir.join(name).exists(), "{name} is pinned");
    }
    let listeners = bpftool_dump(&agent.pin_dir.join("GW_LISTENERS"));
    let entry = &listeners[0]["formatted"];
    assert_eq!(entry["key"]["port"], 8088, "key by field name: {listeners}");
    assert_eq!(entry["value"]["backend_count"], 1, "{listeners}");
    assert_eq!(entry["value"]["total_weight"], 3, "{listeners}");
    let backends = bpftool_dump(&agent.pin_dir.join("GW_BACKENDS"));
    let b = &backends[0]["formatted"];
    assert_eq!(b["key"]["listener_port"], 8088, "{backends}");
    assert_eq!(b["key"]["index"], 0, "{backends}");
    assert_eq!(b["value"]["port"], 3001, "{backends}");
    assert_eq!(b["value"]["weight"], 3, "{backends}");
    assert_eq!(b["value"]["family"], 2, "{backends}");
    // 10.200.1.2 as IPv4-mapped IPv6, network byte order.
    let addr: Vec<u64> = b["value"]["addr_be"]
        .as_array()
        .expect("addr_be is an array")
        .iter()
        .map(|v| v.as_u64().expect("byte"))
        .collect();
    assert_eq!(
        addr,
        vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 10, 200, 1, 2]
    );
}

/// Runs `sockgate ARGS` and returns (success, stderr lines).
fn sockgate_fails(cmd: &mut Command) -> Vec<String> {
    let out = cmd.output().expect("sockgate runs");
    assert!(!out.status.success(), "sockgate should have failed");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn without_privileges_one_clear_line() {
    require_root();
    // `setpriv` (util-linux) drops to nobody with no capabilities.
    let bin = common::sockgate_bin();
    let lines = sockgate_fails(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(&bin)
            .args(["run", "--pin-dir", "/sys/fs/bpf/sg-test-nopriv"]),
    );
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(
        lines[0].contains("missing privileges") && lines[0].contains("CAP_BPF"),
        "{lines:?}"
    );
}

#[test]
fn without_btf_one_clear_line() {
    require_root();
    let lines = sockgate_fails(Command::new(common::sockgate_bin()).args([
        "run",
        "--pin-dir",
        "/sys/fs/bpf/sg-test-nobtf",
        "--kernel-btf",
        "/nonexistent/vmlinux",
    ]));
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(lines[0].contains("kernel has no BTF"), "{lines:?}");
}

/// Pins a hash map with the wrong value size where `GW_LISTENERS` belongs.
fn pin_wrong_map(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("pin dir");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(dir.join("GW_LISTENERS"))
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "GW_LISTENERS",
        ])
        .output()
        .expect("bpftool runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn incompatible_pin_refused_or_replaced() {
    require_root();
    let dir = common::pin_dir();
    pin_wrong_map(&dir);
    let lines = sockgate_fails(
        Command::new(common::sockgate_bin())
            .args(["run", "--on-pin-mismatch", "fail", "--pin-dir"])
            .arg(&dir),
    );
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    let want = size_of::<gateway_common::ListenerInfo>();
    assert!(
        lines[0].contains("incompatible pinned map")
            && lines[0].contains(&format!("value size 8, want {want}")),
        "{lines:?}"
    );
    // Replace (the default): a log line says why, and the new pin has this build's layout.
    let bed = Bed::new(0).expect("bed");
    let route = "9000=10.200.9.9:1";
    let mut agent = Agent::start_with_pin_dir(&bed, dir.clone(), &["--route", route], &[9000]);
    let info = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(dir.join("GW_LISTENERS"))
        .output()
        .expect("bpftool");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(info["bytes_value"], want, "{info}");
    assert!(
        agent
            .log_text()
            .contains("replacing incompatible pinned map"),
        "{}",
        agent.log_text()
    );
    assert!(agent.stop().success());
    assert!(!dir.exists(), "pins removed on clean exit");
}

#[test]
fn keep_pins_then_reuse() {
    require_root();
    let bed = Bed::new(0).expect("bed");
    let dir = common::pin_dir();
    let mut agent = Agent::start_with_pin_dir(
        &bed,
        dir.clone(),
        &["--route", "9001=10.200.9.9:1", "--keep-pins"],
        &[9001],
    );
    assert!(agent.stop().success());
    assert!(
        dir.join("GW_LISTENERS").exists(),
        "--keep-pins keeps the pins"
    );
    let agent = Agent::start_with_pin_dir(
        &bed,
        dir.clone(),
        &["--route", "9002=10.200.9.9:1"],
        &[9002],
    );
    assert!(
        agent.log_text().contains("reusing pinned map"),
        "{}",
        agent.log_text()
    );
    // The stale listener 9001 from the first run is gone from the reused map.
    let s = agent.status();
    let ports: Vec<u64> = s["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| l["port"].as_u64().expect("port"))
        .collect();
    assert_eq!(ports, vec![9002], "{s}");
}

#[test]
fn beds_do_not_collide_and_clean_up() {
    require_root();
    let a = Bed::new(1).expect("bed a");
    let b = Bed::new(1).expect("bed b");
    let names: Vec<String> = a.names().into_iter().chain(b.names()).collect();
    let unique: std::collections::BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    // Both beds use the same addresses, each in its own namespaces; the client reaches
    // its backend directly, routed through the node (the no-proxy baseline).
    for (bed, name) in [(&a, "a"), (&b, "b")] {
        let _server = netbed::servers::Server::start(
            bed.backend(0),
            std::net::SocketAddr::new(bed.backend_addr(0).into(), 7000),
            netbed::servers::named_echo(name),
        )
        .expect("server");
        let addr = std::net::SocketAddr::new(bed.backend_addr(0).into(), 7000);
        let reply = bed
            .client()
            .run(move || {
                let mut s = common::connect(addr).expect("direct connect");
                common::exchange(&mut s, "x\n")
            })
            .expect("client");
        assert_eq!(reply, format!("{name}: x\n"));
    }
    drop(a);
    drop(b);
    let list = netbed::ip(&["netns", "list"]).expect("ip netns list");
    for n in &names {
        assert!(!list.contains(n.as_str()), "{n} removed");
    }
}
