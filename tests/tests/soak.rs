//! The one-minute soak (`cargo xtask soak --minutes 1`, the same code): every data
//! path at once under mixed load and configuration churn; fails when data was lost or
//! changed, when a kind of connection never succeeded, when too many failed outside
//! the disturbances made on purpose, or when a map, descriptor or memory figure did
//! not come back to its starting level. Its own `main` (no libtest harness): this
//! executable is also the soak's backend process.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use netbed::soak;

fn sockgate_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SOCKGATE_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "gateway-userspace",
            "--bin",
            "sockgate",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "building sockgate failed"
    );
    target.join("debug/sockgate")
}

fn main() -> ExitCode {
    soak::backend::serve_if_asked();
    // `cargo test --test soak -- --list` and filters other than "soak": nothing to run.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("soak_one_minute_every_path: test");
        return ExitCode::SUCCESS;
    }
    if let Some(filter) = args
        .iter()
        .find(|a| !a.starts_with('-') && a.parse::<u64>().is_err())
        && !"soak_one_minute_every_path".contains(filter.as_str())
    {
        println!("running 0 tests");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = netbed::check_privileges() {
        eprintln!("soak_one_minute_every_path: this end-to-end test needs privileges: {e}");
        return ExitCode::FAILURE;
    }
    let out = std::env::temp_dir().join(format!("sockgate-soak-test-{}", std::process::id()));
    let opts = soak::Options {
        sample_every: Duration::from_secs(15),
        ..soak::Options::new(sockgate_bin(), Duration::from_mins(1), out.clone())
    };
    println!("running 1 test\ntest soak_one_minute_every_path ...");
    let result = soak::run(&opts);
    let code = match result {
        Ok(o) => {
            println!("{}", o.summary);
            for f in &o.files {
                println!("soak: wrote {}", f.display());
            }
            if o.failures.is_empty() {
                println!("test soak_one_minute_every_path ... ok");
                ExitCode::SUCCESS
            } else {
                for f in &o.failures {
                    eprintln!("soak check failed: {f}");
                }
                println!("test soak_one_minute_every_path ... FAILED");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("soak could not run: {e}");
            println!("test soak_one_minute_every_path ... FAILED");
            ExitCode::FAILURE
        }
    };
    let _ = std::fs::remove_dir_all(&out);
    code
}
