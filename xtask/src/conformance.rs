//! `cargo xtask conformance`: runs sockgate's rebuilds of the upstream Gateway API
//! conformance cases (`tests/tests/conformance.rs`, one test per upstream `ShortName`)
//! with the agent built just now, and writes a report in the upstream
//! `ConformanceReport` shape (`gateway.networking.k8s.io/v1`, the type of the Gateway
//! API's `conformance/apis/v1`) from their real results.
//!
//! The report has one profile, `GATEWAY-TCP` (core features `Gateway`, `TCPRoute` and
//! `ReferenceGrant`). A case is core when all its features are core features of the
//! profile, as upstream classifies it. The upstream cases of the profile that need
//! something sockgate does not serve (an HTTP or HTTPS listener accepted, TLS, a
//! `parametersRef`) are not rebuilt: they are reported as skipped, with why in
//! [`NOT_REBUILT`], and make the core result `partial`, as upstream counts a skip.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

use crate::{root, run_cmd};

/// `cargo xtask conformance` options.
#[derive(clap::Args)]
pub struct Options {
    /// Where the report is written (relative to the workspace root).
    #[arg(long, default_value = "conformance/report.yaml")]
    pub out: PathBuf,
    /// `implementation.organization` of the report.
    #[arg(long, default_value = "sockgate")]
    pub organization: String,
    /// `implementation.url` of the report.
    #[arg(long, default_value = "https://sockgate.dev")]
    pub url: String,
    /// `implementation.contact` of the report (repeatable).
    #[arg(long, default_value = "@sockgate/maintainers")]
    pub contact: Vec<String>,
}

/// The Gateway API release whose conformance cases are rebuilt.
pub const GATEWAY_API_VERSION: &str = "v1.6.1";
/// Their manifests use `TCPRoute` `v1alpha2`: the experimental channel.
pub const GATEWAY_API_CHANNEL: &str = "experimental";
/// The profile's name and its core features.
const PROFILE: &str = "GATEWAY-TCP";
const CORE_FEATURES: [&str; 3] = ["Gateway", "ReferenceGrant", "TCPRoute"];

/// One upstream conformance case rebuilt in `tests/tests/conformance.rs`.
pub struct Case {
    /// The upstream `ShortName`, also the test's name.
    pub short_name: &'static str,
    /// The upstream features the case needs.
    pub features: &'static [&'static str],
    /// Marked `Provisional` upstream.
    pub provisional: bool,
}

const GW_TCP: &[&str] = &["Gateway", "TCPRoute"];
const GW_TCP_GRANT: &[&str] = &["Gateway", "TCPRoute", "ReferenceGrant"];

/// The rebuilt cases: every upstream `TCPRoute` case, and the `Gateway` and `GatewayClass`
/// cases of the profile that sockgate's TCP-only support can pass as written.
pub const CASES: &[Case] = &[
    Case {
        short_name: "TCPRouteInvalidBackendRefNonexistent",
        features: GW_TCP,
        provisional: true,
    },
    Case {
        short_name: "TCPRouteInvalidCrossNamespaceBackendRef",
        features: GW_TCP_GRANT,
        provisional: true,
    },
    Case {
        short_name: "TCPRouteInvalidNonTCPListener",
        features: GW_TCP,
        provisional: true,
    },
    Case {
        short_name: "TCPRouteMultipleRoutesAttachment",
        features: GW_TCP,
        provisional: false,
    },
    Case {
        short_name: "TCPRouteParentRefAttachAll",
        features: GW_TCP,
        provisional: true,
    },
    Case {
        short_name: "TCPRouteParentRefPortAndSectionName",
        features: GW_TCP,
        provisional: true,
    },
    Case {
        short_name: "TCPRouteReferenceGrant",
        features: GW_TCP_GRANT,
        provisional: true,
    },
    Case {
        short_name: "TCPRouteWeightedRouting",
        features: GW_TCP,
        provisional: true,
    },
    Case {
        short_name: "GatewayClassObservedGenerationBump",
        features: &["Gateway"],
        provisional: false,
    },
    Case {
        short_name: "GatewayNameMaximumLength",
        features: &["Gateway"],
        provisional: false,
    },
    Case {
        short_name: "GatewayObservedGenerationBump",
        features: &["Gateway"],
        provisional: false,
    },
];

/// Upstream core cases of the profile (feature `Gateway` only) that are not rebuilt,
/// and why: reported as skipped.
pub const NOT_REBUILT: &[(&str, &str)] = &[
    (
        "GatewayInvalidParametersRef",
        "sockgate does not read spec.infrastructure.parametersRef",
    ),
    (
        "GatewayInvalidRouteKind",
        "expects an HTTP listener with HTTPRoute in supportedKinds; sockgate serves TCP listeners only",
    ),
    (
        "GatewayInvalidTLSConfiguration",
        "HTTPS listeners: sockgate serves TCP listeners only",
    ),
    (
        "GatewayListenerUnsupportedProtocol",
        "expects an HTTP listener Accepted; sockgate serves TCP listeners only",
    ),
    (
        "GatewayModifyListeners",
        "HTTP and HTTPS listeners: sockgate serves TCP listeners only",
    ),
];

/// What one test run said of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Skipped,
}

/// Reads `test NAME ... ok|FAILED|ignored` lines of libtest's output.
pub fn parse_results(output: &str) -> BTreeMap<String, Outcome> {
    output
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("test ")?;
            let (name, result) = rest.split_once(" ... ")?;
            let word = result.split_whitespace().next()?.trim_end_matches(',');
            let outcome = match word {
                "ok" => Outcome::Passed,
                "FAILED" => Outcome::Failed,
                "ignored" => Outcome::Skipped,
                _ => return None,
            };
            Some((name.trim().to_owned(), outcome))
        })
        .collect()
}

/// One level's (core or extended) results.
#[derive(Default)]
struct Level {
    passed: u32,
    failed: u32,
    skipped: u32,
    failed_tests: Vec<String>,
    skipped_tests: Vec<String>,
}

impl Level {
    fn result(&self) -> &'static str {
        if self.failed > 0 {
            "failure"
        } else if self.skipped > 0 {
            "partial"
        } else {
            "success"
        }
    }

    fn summary(&self) -> String {
        match self.result() {
            "failure" => format!("failed with {} test failures", self.failed),
            "partial" => format!("partially succeeded with {} test skips", self.skipped),
            _ => "succeeded".to_owned(),
        }
    }

    fn write(&self, out: &mut String, indent: &str) {
        let _ = writeln!(out, "{indent}result: {}", self.result());
        let _ = writeln!(out, "{indent}statistics:");
        let _ = writeln!(out, "{indent}  Failed: {}", self.failed);
        let _ = writeln!(out, "{indent}  Passed: {}", self.passed);
        let _ = writeln!(out, "{indent}  Skipped: {}", self.skipped);
        for (key, list) in [
            ("failedTests", &self.failed_tests),
            ("skippedTests", &self.skipped_tests),
        ] {
            if !list.is_empty() {
                let _ = writeln!(out, "{indent}{key}:");
                for t in list {
                    let _ = writeln!(out, "{indent}- {t}");
                }
            }
        }
    }
}

/// The implementation's identity in the report, and the report's date.
pub struct Implementation {
    pub organization: String,
    pub url: String,
    pub contact: Vec<String>,
    pub version: String,
    pub date: String,
}

/// The report, as YAML in the upstream `ConformanceReport` shape. A case without a
/// result (its test did not run) counts as failed.
pub fn render(results: &BTreeMap<String, Outcome>, implementation: &Implementation) -> String {
    let mut core = Level::default();
    let mut extended = Level::default();
    let mut provisional_passed = Vec::new();
    for case in CASES {
        let is_core = case.features.iter().all(|f| CORE_FEATURES.contains(f));
        let level = if is_core { &mut core } else { &mut extended };
        match results.get(case.short_name) {
            Some(Outcome::Passed) => {
                level.passed += 1;
                if case.provisional {
                    provisional_passed.push(case.short_name);
                }
            }
            Some(Outcome::Skipped) => {
                level.skipped += 1;
                level.skipped_tests.push(case.short_name.to_owned());
            }
            Some(Outcome::Failed) | None => {
                level.failed += 1;
                level.failed_tests.push(case.short_name.to_owned());
            }
        }
    }
    for (name, _) in NOT_REBUILT {
        core.skipped += 1;
        core.skipped_tests.push((*name).to_owned());
    }
    let mut out = String::new();
    out.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: ConformanceReport\n");
    let _ = writeln!(out, "date: \"{}\"", implementation.date);
    let _ = writeln!(out, "gatewayAPIChannel: {GATEWAY_API_CHANNEL}");
    let _ = writeln!(out, "gatewayAPIVersion: {GATEWAY_API_VERSION}");
    out.push_str("implementation:\n  contact:\n");
    for c in &implementation.contact {
        let _ = writeln!(out, "  - \"{c}\"");
    }
    let _ = writeln!(out, "  organization: {}", implementation.organization);
    out.push_str("  project: sockgate\n");
    let _ = writeln!(out, "  url: {}", implementation.url);
    let _ = writeln!(out, "  version: v{}", implementation.version);
    out.push_str("mode: default\nprofiles:\n");
    let _ = writeln!(out, "- name: {PROFILE}");
    let _ = writeln!(
        out,
        "  summary: Core tests {}. Extended tests {}.",
        core.summary(),
        extended.summary()
    );
    out.push_str("  core:\n");
    core.write(&mut out, "    ");
    out.push_str("  extended:\n");
    extended.write(&mut out, "    ");
    out.push_str("    supportedFeatures:\n");
    for f in CORE_FEATURES {
        let _ = writeln!(out, "    - {f}");
    }
    if !provisional_passed.is_empty() {
        out.push_str("succeededProvisionalTests:\n");
        for t in provisional_passed {
            let _ = writeln!(out, "- {t}");
        }
    }
    out.push_str("# Cases not rebuilt (reported as skipped above):\n");
    for (name, why) in NOT_REBUILT {
        let _ = writeln!(out, "#   {name}: {why}");
    }
    out
}

/// `seconds` since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(seconds: u64) -> String {
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let secs = seconds % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Builds the agent, runs the conformance tests with it and writes the report; fails
/// when a case failed (after writing the report).
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: building the agent");
    run_cmd(Command::new(&cargo).current_dir(root()).args([
        "build",
        "-p",
        "gateway-userspace",
        "--bin",
        "sockgate",
    ]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    println!("xtask: running the conformance cases (tests/tests/conformance.rs)");
    let mut child = Command::new(&cargo)
        .current_dir(root())
        .env("SOCKGATE_BIN", target.join("debug/sockgate"))
        .args([
            "test",
            "-p",
            "sockgate-tests",
            "--test",
            "conformance",
            "--no-fail-fast",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut output = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading the test output")?;
            println!("{line}");
            output.push_str(&line);
            output.push('\n');
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    let results = parse_results(&output);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let report = render(
        &results,
        &Implementation {
            organization: opts.organization.clone(),
            url: opts.url.clone(),
            contact: opts.contact.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            date: rfc3339(now),
        },
    );
    let out = root().join(&opts.out);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    println!("xtask: wrote {}", out.display());
    let failed: Vec<&str> = CASES
        .iter()
        .filter(|c| results.get(c.short_name) != Some(&Outcome::Passed))
        .map(|c| c.short_name)
        .collect();
    if !failed.is_empty() || !status.success() {
        bail!("conformance cases not passed: {failed:?} (cargo test: {status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_lines_are_read() {
        let out = "running 3 tests\ntest TCPRouteReferenceGrant ... ok\n\
                   test TCPRouteWeightedRouting ... FAILED\ntest X ... ignored, slow\n\
                   test result: FAILED. 1 passed; 1 failed\n";
        let r = parse_results(out);
        assert_eq!(r["TCPRouteReferenceGrant"], Outcome::Passed);
        assert_eq!(r["TCPRouteWeightedRouting"], Outcome::Failed);
        assert_eq!(r["X"], Outcome::Skipped);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn report_counts_real_results_and_skips() {
        let mut results: BTreeMap<String, Outcome> = CASES
            .iter()
            .map(|c| (c.short_name.to_owned(), Outcome::Passed))
            .collect();
        results.insert("TCPRouteWeightedRouting".into(), Outcome::Failed);
        results.remove("GatewayNameMaximumLength");
        let text = render(
            &results,
            &Implementation {
                organization: "o".into(),
                url: "https://example.org".into(),
                contact: vec!["@c".into()],
                version: "0.1.0".into(),
                date: "2026-01-01T00:00:00Z".into(),
            },
        );
        let passed = u32::try_from(CASES.len() - 2).expect("count");
        let skipped = NOT_REBUILT.len();
        assert!(text.contains("kind: ConformanceReport\n"), "{text}");
        assert!(
            text.contains(&format!(
                "  core:\n    result: failure\n    statistics:\n      Failed: 2\n      Passed: {passed}\n      Skipped: {skipped}\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "    failedTests:\n    - TCPRouteWeightedRouting\n    - GatewayNameMaximumLength\n"
            ),
            "{text}"
        );
        assert!(text.contains("- name: GATEWAY-TCP\n"), "{text}");
        assert!(text.contains("  version: v0.1.0\n"), "{text}");
        assert!(
            !text.contains("succeededProvisionalTests:\n- TCPRouteWeightedRouting\n"),
            "{text}"
        );
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
