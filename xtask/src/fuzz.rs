//! `cargo xtask fuzz --target NAME --seconds N`: runs one fuzz target (a bolero test in
//! `gateway-userspace/tests/fuzz_*.rs`) on random inputs for a set time, instead of the
//! bounded count a plain `cargo test` gives it. A failing input is printed with the seed
//! that reproduces it (`BOLERO_RANDOM_SEED`); keep it as a fixture in the target's file.
//! `docs/fuzzing.md` lists the targets and what each checks.
use std::process::Command;

use anyhow::bail;
use clap::Args;

use crate::{root, run_cmd};

/// The targets: (test name, integration-test file, needs root).
const TARGETS: [(&str, &str, bool); 8] = [
    ("manifest_bytes", "fuzz_manifest", false),
    ("manifest_edits", "fuzz_manifest", false),
    ("xdp_bytes", "fuzz_packets", true),
    ("xdp_well_formed", "fuzz_packets", true),
    ("xdp_mutated", "fuzz_packets", true),
    ("fwd_bytes", "fuzz_packets", true),
    ("fwd_well_formed", "fuzz_packets", true),
    ("fwd_mutated", "fuzz_packets", true),
];

#[derive(Args)]
pub struct Options {
    /// The target (`manifest_bytes`, `manifest_edits`, `xdp_bytes`, `xdp_well_formed`,
    /// `xdp_mutated`, `fwd_bytes`, `fwd_well_formed`, `fwd_mutated`).
    #[arg(long)]
    target: String,
    /// How long to run it.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The first random seed (a failure prints the seed of its input).
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let Some(&(name, file, root_needed)) = TARGETS.iter().find(|(n, _, _)| *n == opts.target)
    else {
        let names: Vec<&str> = TARGETS.iter().map(|(n, _, _)| *n).collect();
        bail!(
            "unknown fuzz target {:?}; targets: {}",
            opts.target,
            names.join(", ")
        );
    };
    if root_needed && !nix::unistd::Uid::effective().is_root() {
        bail!("fuzz target {name} loads eBPF programs: run it as root");
    }
    if opts.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: fuzzing {name} for {} s", opts.seconds);
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root())
        // The time bounds the run; the count only has to outlast it.
        .env(
            "BOLERO_RANDOM_TEST_TIME_MS",
            (opts.seconds * 1000).to_string(),
        )
        .env("BOLERO_RANDOM_ITERATIONS", u32::MAX.to_string())
        .args(["test", "-p", "gateway-userspace", "--test", file, "--"])
        .args([name, "--exact", "--nocapture"]);
    if let Some(seed) = opts.seed {
        cmd.env("BOLERO_RANDOM_SEED", seed.to_string());
    }
    run_cmd(&mut cmd)
}
