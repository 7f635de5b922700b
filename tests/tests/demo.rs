//! `cargo xtask demo` runs end to end and leaves no namespace, pin or process behind.
mod common;

use std::process::Command;

#[test]
fn demo_runs_and_leaves_nothing_behind() {
    common::require_root();
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "-p", "xtask", "--", "demo"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("xtask demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("answered: foo: hello"), "{stdout}");
    assert!(stdout.contains("answered: bar: hello"), "{stdout}");
    assert!(stdout.contains("on the kernel (sockmap) path"), "{stdout}");
    assert!(
        stdout.contains("\"port\": 8088"),
        "bpftool dump by field name:\n{stdout}"
    );
    assert!(
        stdout.contains("listener :8089"),
        "sockgate status:\n{stdout}"
    );
    assert!(
        stdout.contains("denied client 10.200.0.3 -> 10.200.0.1:8088 (listener foo)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("allowed client 10.200.0.2 -> 10.200.0.1:8088: connected"),
        "{stdout}"
    );
    let guard = stdout
        .lines()
        .find(|l| l.starts_with("demo: listener 8088 XDP guard:"))
        .expect("the demo shows the guard's counters");
    assert!(
        guard.contains("SYNs admitted") && !guard.contains(" 0 dropped (denied)"),
        "{guard}"
    );
    assert!(
        stdout.contains("xdp guard:"),
        "sockgate status shows the guard:\n{stdout}"
    );
    assert!(stdout.contains("demo: cleaned up"), "{stdout}");

    let names: Vec<String> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("demo: bed namespaces: "))
        .expect("the demo names its namespaces")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(!names.is_empty());
    let list = netbed::ip(&["netns", "list"]).expect("ip netns list");
    for n in &names {
        assert!(!list.contains(n.as_str()), "namespace {n} left behind");
    }
    let pin_dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("$ sockgate status --pin-dir "))
        .expect("the demo shows its pin dir")
        .trim()
        .to_owned();
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "pins left in {pin_dir}"
    );
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline);
            assert!(!cmdline.contains(&pin_dir), "a process is left: {cmdline}");
        }
    }
}
