//! `sockgate run` refusing its configuration before it loads anything: a `--route`
//! backend in a refused range (loopback, link-local, ...) is a one-line error naming the
//! address and the flag that allows it. `--kernel-btf` points nowhere, so that a
//! regression fails at load time instead of starting an agent, even as root.
use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sockgate"))
        .args(["run", "--kernel-btf", "/nonexistent/sockgate-btf"])
        .args(args)
        .output()
        .expect("sockgate runs")
}

#[test]
fn a_refused_route_backend_stops_the_start() {
    for (route, addr, why, allow) in [
        (
            "8088=127.0.0.1:22",
            "127.0.0.1:22",
            "loopback address",
            "127.0.0.1",
        ),
        (
            "8088=10.0.0.2:80,169.254.169.254:80",
            "169.254.169.254:80",
            "link-local address",
            "169.254.169.254",
        ),
        ("8088=[::1]:22", "[::1]:22", "loopback address", "::1"),
        (
            "8088=[::ffff:127.0.0.1]:22",
            "[::ffff:127.0.0.1]:22",
            "loopback address",
            "127.0.0.1",
        ),
    ] {
        let out = run(&["--route", route]);
        assert!(!out.status.success(), "{route}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim_end(),
            format!(
                "sockgate: --route \"{route}\": backend {addr} refused: {why} (allow it with --allow-backend-cidr {allow})"
            ),
            "{route}"
        );
    }
}

#[test]
fn an_allowed_route_backend_gets_past_the_check() {
    let out = run(&[
        "--route",
        "8088=127.0.0.1:22",
        "--allow-backend-cidr",
        "127.0.0.0/8",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("refused"), "{err}");
    // It fails later, at load time (privileges or the missing BTF).
    assert!(err.contains("privileges") || err.contains("BTF"), "{err}");
}
