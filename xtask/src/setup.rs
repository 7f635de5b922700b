//! Installs the toolchain when something is missing; quiet and quick when nothing is.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run_cmd;

/// Debian packages the build, the tests, the demo and the benchmarks use.
const PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22.
    "llvm-22-dev",
    // Tests and docs dump the pinned maps with it.
    "bpftool",
    // `ip netns`, veth, `ss`.
    "iproute2",
    // `sysctl` in the bed.
    "procps",
    // `nft`: packet loss on the bed's links.
    "nftables",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn cargo_bin(name: &str) -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME").map_or_else(
        || std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"),
        std::path::PathBuf::from,
    );
    home.join("bin").join(name)
}

/// Installs whatever is missing and prints what it installs.
pub fn run() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut did = Vec::new();

    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        run_cmd(Command::new("apt-get").args(["update", "-q"]))
            .context("apt-get update (setup needs root)")?;
        run_cmd(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )?;
        did.push(format!("Debian packages {}", missing.join(" ")));
    }

    let nightly = output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|t| t.lines().any(|l| l.starts_with("nightly")));
    if !nightly {
        println!("setup: installing the nightly toolchain with rust-src");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        did.push("nightly toolchain".to_owned());
    }
    let rust_src = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|c| c.lines().any(|l| l.starts_with("rust-src")));
    if !rust_src {
        println!("setup: adding rust-src to nightly (the eBPF build needs -Z build-std)");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        did.push("nightly rust-src".to_owned());
    }

    let linker = cargo_bin("bpf-linker");
    let linker_ok = output(Command::new(&linker).arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        run_cmd(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                    "--force",
                ]),
        )?;
        did.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    if output(Command::new(&linker).arg("--version")).is_none() {
        bail!(
            "bpf-linker at {} does not run after set-up",
            linker.display()
        );
    }

    if did.is_empty() {
        println!(
            "setup: toolchain ready, nothing to install ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "setup: installed {} ({:.0}s)",
            did.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
