//! Foundation end-to-end tests: programs load for real, maps are pinned with BTF,
//! bpftool shows fields by name, bad input gets one clear line.
mod common;

use std::process::Command;

use common::{Agent, require_root};
use netbed::Bed;

fn bpftool_dump(path: &std::path::Path) -> serde_json::Value {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool runs (installed by `cargo xtask setup`)");
    assert!(out.status.success(), "bpftool failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
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
    assert_eq!(addr, vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 10, 200, 1, 2]);
}
