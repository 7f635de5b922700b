//! `cargo xtask`: set-up, demo and test helpers for sockgate.
//!
//! * `setup`: installs what building and testing need, when missing: Debian packages
//!   (LLVM 22 for bpf-linker, bpftool, iproute2, ...), nightly's `rust-src`, and
//!   `bpf-linker` 0.13 built against LLVM 22. A second run on a ready machine installs
//!   nothing and takes a few seconds.
//! * `demo`: builds, makes a network-namespace bed, runs sockgate on it, sends traffic,
//!   shows which backend answered and which data path carried it, and cleans up.
//! * `test`: `setup`, then every test (unit and privileged end-to-end).
//! * `conformance`: `setup`, then sockgate's rebuilds of the upstream Gateway API
//!   conformance cases for `TCPRoute`; writes the upstream `ConformanceReport` YAML
//!   (`conformance/report.yaml`) from their results.
//! * `bench`: sockgate's data paths side by side with no proxy and with `HAProxy`,
//!   nginx, socat and Envoy; writes `bench/results.csv`, `BENCHMARKS.md` and a chart.
//! * `image`: the agent's OCI image from this machine's files (no base image pulled),
//!   loaded into podman and run.
//! * `fuzz`: one fuzz target on random inputs for a set time (`docs/fuzzing.md`); the
//!   `test` run gives each a bounded count of inputs.
//! * `soak --minutes N`: every data path at once under mixed load and configuration
//!   churn for N minutes; checks that nothing was lost and nothing grew, writes
//!   `bench/soak/` (CSV, SVG plot, summary).
mod bench;
mod conformance;
mod demo;
mod fuzz;
mod image;
mod setup;
mod soak;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing to build and test sockgate.
    Setup,
    /// Run the demo in network namespaces.
    Demo,
    /// Benchmark the data paths against no proxy and userspace proxies.
    Bench(bench::Options),
    /// Run the Gateway API conformance cases and write the conformance report.
    Conformance(conformance::Options),
    /// Build the agent's OCI image (no base image pulled), load it into podman and run
    /// it.
    Image(image::Options),
    /// Run one fuzz target for a set time.
    Fuzz(fuzz::Options),
    /// Soak every data path under mixed load and configuration churn.
    Soak(soak::Options),
    /// Run all tests (unit and privileged end-to-end).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    // The soak starts this executable again as its backend processes.
    netbed::soak::backend::serve_if_asked();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Demo => setup::run().and_then(|()| demo::run()),
        Cmd::Bench(opts) => setup::run().and_then(|()| bench::run(&opts)),
        Cmd::Conformance(opts) => setup::run().and_then(|()| conformance::run(&opts)),
        Cmd::Fuzz(opts) => setup::run().and_then(|()| fuzz::run(&opts)),
        Cmd::Soak(opts) => setup::run().and_then(|()| soak::run(&opts)),
        Cmd::Test { args } => setup::run().and_then(|()| test(&args)),
        // A release build needs the eBPF toolchain; a binary given does not.
        Cmd::Image(opts) if opts.binary.is_none() => setup::run().and_then(|()| image::run(&opts)),
        Cmd::Image(opts) => image::run(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs a command, failing with its name when it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let text = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {text}"))?;
    if !status.success() {
        bail!("{text} failed ({status})");
    }
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: building");
    run_cmd(
        Command::new(&cargo)
            .current_dir(root())
            .args(["build", "--all-targets"]),
    )?;
    println!("xtask: running all tests (unit and privileged end-to-end)");
    // The end-to-end tests run the agent built just now, with the workspace's
    // features, instead of building it again with the features of one package.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), std::path::PathBuf::from);
    run_cmd(
        Command::new(&cargo)
            .current_dir(root())
            .env("SOCKGATE_BIN", target.join("debug/sockgate"))
            .args(["test", "--no-fail-fast"])
            .args(extra),
    )
}
