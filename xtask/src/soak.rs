//! `cargo xtask soak --minutes N`: builds sockgate and runs the soak of
//! [`netbed::soak`] (every data path at once, mixed load, configuration churn, backend
//! processes killed and started again); prints per data path what was sent, received
//! intact and refused, samples the resources every minute, writes `soak.csv`,
//! `soak.svg` and `summary.md` (default `bench/soak/`) and fails when a check fails.
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::Context as _;
use netbed::soak;

use crate::root;

/// What `cargo xtask soak` was asked to do.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Minutes of load (the run adds start-up and the wait for the figures to settle).
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// Seconds between two configuration changes.
    #[arg(long, default_value_t = 5)]
    pub change_secs: u64,
    /// Seconds between two samples.
    #[arg(long, default_value_t = 60)]
    pub sample_secs: u64,
    /// Directory of soak.csv, soak.svg and summary.md (default: bench/soak).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Soak the release build instead of the debug one.
    #[arg(long)]
    pub release: bool,
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    println!("soak: building sockgate");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args([
        "build",
        "--quiet",
        "--message-format=json-render-diagnostics",
        "-p",
        "gateway-userspace",
        "--bin",
        "sockgate",
    ]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    anyhow::ensure!(out.status.success(), "cargo build failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "sockgate")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo reported no sockgate executable")
}

/// Runs the soak; an error when it could not run or a check failed.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(opts.minutes > 0, "--minutes must be at least 1");
    let sockgate = build(opts.release)?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| root().join("bench/soak"));
    let run = soak::Options {
        change_every: Duration::from_secs(opts.change_secs.max(1)),
        sample_every: Duration::from_secs(opts.sample_secs.max(1)),
        ..soak::Options::new(sockgate, Duration::from_mins(opts.minutes), out)
    };
    let outcome = soak::run(&run).context("the soak could not run")?;
    println!("\n{}", outcome.summary);
    for f in &outcome.files {
        println!("soak: wrote {}", f.display());
    }
    anyhow::ensure!(
        outcome.failures.is_empty(),
        "{} soak check(s) failed:\n{}",
        outcome.failures.len(),
        outcome.failures.join("\n")
    );
    Ok(())
}
