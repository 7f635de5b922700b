//! `sockgate run --source kube` without a reachable API server: one clear error, retries
//! with backoff, no panic, a clean stop.
mod common;

use std::time::{Duration, Instant};

use common::{Agent, require_root, unreachable_kubeconfig};
use netbed::Bed;

#[test]
fn unreachable_api_server_one_error_then_backoff_and_clean_stop() {
    require_root();
    let bed = Bed::new(0).expect("bed");
    let (dir, kubeconfig) = unreachable_kubeconfig("retry");
    let mut agent = Agent::start_with_env(
        &bed,
        &["--source", "kube", "--node-name", "node-1"],
        &[],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent
        .log_text()
        .matches("API discovery failed; retrying")
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "no retries:\n{}",
            agent.log_text()
        );
        assert!(
            agent.child.try_wait().expect("wait").is_none(),
            "the agent exited:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log_text();
    assert_eq!(
        log.matches("Kubernetes API server unreachable").count(),
        1,
        "one error line, however many retries:\n{log}"
    );
    // The backoff grows: the retries are not a busy loop.
    let delays: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("API discovery failed; retrying"))
        .filter_map(|l| {
            l.split("retry_in_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(delays.windows(2).all(|w| w[1] > w[0]), "{delays:?}");
    assert!(!log.contains("panicked"), "{log}");
    let status = agent.stop();
    assert!(status.success(), "{status}: {}", agent.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn not_ready_until_the_cluster_state_is_programmed() {
    require_root();
    let bed = Bed::new(0).expect("bed");
    let (dir, kubeconfig) = unreachable_kubeconfig("ready");
    let mut agent = Agent::start_with_env(
        &bed,
        &["--source", "kube", "--node-name", "node-1"],
        &[],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent
        .log_text()
        .contains("Kubernetes API server unreachable")
    {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let get = |path: &str| -> String {
        let path = path.to_owned();
        bed.node()
            .run(move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect("127.0.0.1:9464")?;
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                std::io::Result::Ok(out)
            })
            .expect("node namespace")
            .expect("HTTP")
    };
    assert!(
        get("/healthz").starts_with("HTTP/1.1 200"),
        "programs loaded"
    );
    let ready = get("/readyz");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("waiting for the first state"), "{ready}");
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}
