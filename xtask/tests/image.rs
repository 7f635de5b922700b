//! `cargo xtask image` as a user runs it, on the debug agent the end-to-end tests use
//! (`SOCKGATE_BIN`, else `target/debug/sockgate`) so that `cargo xtask test` makes no
//! second, release build: the OCI layout is written, loaded into podman and run
//! (`--version`, `check -f` on the examples, the init container's tools), then the
//! image is removed. Needs root (podman, and apt-get when podman is missing).
use std::{path::PathBuf, process::Command};

fn agent() -> PathBuf {
    if let Some(bin) = std::env::var_os("SOCKGATE_BIN") {
        return bin.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("debug/sockgate")
}

#[test]
fn the_image_is_built_loaded_and_run_in_podman() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs podman and needs root: run it as root (cargo xtask test does)"
    );
    let bin = agent();
    assert!(
        bin.is_file(),
        "{} not found: build the agent first (cargo build -p gateway-userspace --bin sockgate) or set SOCKGATE_BIN",
        bin.display()
    );
    let name = format!("localhost/sockgate:test-{}", std::process::id());
    let out = std::env::temp_dir().join(format!("sockgate-image-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("image")
        .arg("--binary")
        .arg(&bin)
        .args(["--name", &name])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("xtask runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    // Remove what was made before judging it.
    let rmi = Command::new("podman")
        .args(["rmi", "--force", &name])
        .output();
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        run.status.success(),
        "xtask image failed:\n{stdout}\n{stderr}"
    );
    for line in [
        format!("image: loaded into podman as {name}"),
        format!(
            "image: podman run {name} --version: sockgate {}",
            env!("CARGO_PKG_VERSION")
        ),
        format!("image: podman run {name} check -f /examples/gateway-api-basic:"),
        "listener 8080 programmed".to_owned(),
        "image: the bpffs init container's sh, mountpoint and mount run".to_owned(),
    ] {
        assert!(
            stdout.contains(&line),
            "{line:?} missing from:\n{stdout}\n{stderr}"
        );
    }
    let rmi = rmi.expect("podman rmi runs");
    assert!(
        rmi.status.success(),
        "the image was loaded under {name}: {}",
        String::from_utf8_lossy(&rmi.stderr)
    );
}
