//! `cargo xtask demo`: the Envoy Gateway TCP-routing example, end to end, in network
//! namespaces made for the occasion.
//!
//! The scenario is plain Gateway API YAML, `deploy/examples/envoy-gateway`: Gateway
//! `tcp-gateway` has TCP listeners `foo` (8088) and `bar` (8089); `TCPRoutes` send them to
//! Services `foo` (port 3001) and `bar` (port 3002), whose `EndpointSlices` are echo
//! servers in two backend namespaces that answer with their service name. The agent
//! runs on it with `--source files`, with the XDP listener guard on the node's
//! interface towards the client denying a second client address on listener foo.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netbed::{Bed, servers};

use crate::{root, run_cmd};

struct AgentProcess {
    child: Child,
    pin_dir: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn sockgate() -> PathBuf {
    root().join("target/debug/sockgate")
}

fn wait_listening(bed: &Bed, agent: &mut AgentProcess, ports: &[u16]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = agent.child.try_wait()? {
            bail!("sockgate exited early: {status}");
        }
        let out = bed.node().output("ss", &["-Hltn"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if ports.iter().all(|p| text.contains(&format!(":{p} "))) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("sockgate did not listen on {ports:?} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ask(bed: &Bed, addr: SocketAddr, line: String) -> anyhow::Result<String> {
    bed.client().run(move || -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(line.as_bytes())?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        Ok(reply)
    })?
}

/// The demo's denied client address (added to the client namespace).
const DENIED: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 200, 0, 3);

/// Connects from `src` to `addr` within 1.5 s: `Ok` when connected, else the error.
fn try_connect(
    bed: &Bed,
    src: std::net::Ipv4Addr,
    addr: SocketAddr,
) -> anyhow::Result<std::io::Result<()>> {
    Ok(bed.client().run(move || -> std::io::Result<()> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::new(src.into(), 0).into())?;
        s.connect_timeout(&addr.into(), Duration::from_millis(1500))
    })?)
}

/// A client address the guard denies on listener foo times out; the allowed one
/// connects.
fn denied_and_allowed(bed: &Bed) -> anyhow::Result<()> {
    bed.client()
        .ip(&["addr", "add", &format!("{DENIED}/24"), "dev", "eth0"])
        .context("adding the denied client's address")?;
    let addr = SocketAddr::new(bed.node_addr().into(), 8088);
    match try_connect(bed, DENIED, addr)? {
        Ok(()) => bail!("the denied client {DENIED} connected to {addr}"),
        Err(e) => println!(
            "demo: denied client {DENIED} -> {addr} (listener foo): {e} (its SYNs were dropped by the XDP guard)"
        ),
    }
    try_connect(bed, bed.client_addr(), addr)?.context("the allowed client")?;
    println!(
        "demo: allowed client {} -> {addr}: connected",
        bed.client_addr()
    );
    Ok(())
}

/// Each listener's connection and XDP guard counters, from `sockgate status --json`.
fn print_counters(pin_dir: &Path) -> anyhow::Result<()> {
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new(sockgate())
        .args(["status", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()?;
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).context("status JSON")?;
    for l in status["listeners"].as_array().into_iter().flatten() {
        let s = &l["stats"];
        let path = if s["kernel_connections"].as_u64() > Some(0) {
            "kernel (sockmap)"
        } else if s["userspace_connections"].as_u64() > Some(0) {
            "userspace (splice)"
        } else {
            "none"
        };
        println!(
            "demo: listener {} carried {} connection(s) on the {path} path ({} bytes client->backend, {} backend->client in the kernel)",
            l["port"],
            s["connected"],
            s["bytes_client_to_backend_kernel"],
            s["bytes_backend_to_client_kernel"]
        );
        let x = &l["xdp"];
        println!(
            "demo: listener {} XDP guard: {} packets, {} SYNs admitted, {} dropped (denied), {} (not allowed), {} (rate limited)",
            l["port"],
            x["packets"],
            x["syn_admitted"],
            x["dropped_denied"],
            x["dropped_not_allowed"],
            x["dropped_rate_limited"]
        );
    }
    Ok(())
}

fn show(title: &str, cmd: &mut Command) -> anyhow::Result<String> {
    println!("\n$ {title}");
    let out = cmd.output().with_context(|| format!("running {title}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    if !out.status.success() {
        bail!("{title} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

/// Runs the demo; everything it made is gone when it returns, error or not.
pub fn run() -> anyhow::Result<()> {
    println!("demo: building sockgate");
    run_cmd(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args([
                "build",
                "--quiet",
                "-p",
                "gateway-userspace",
                "--bin",
                "sockgate",
            ]),
    )?;
    let removed = netbed::sweep_stale();
    if !removed.is_empty() {
        println!(
            "demo: removed namespaces left by earlier runs: {}",
            removed.join(" ")
        );
    }
    let bed = Bed::new(2).context("making the network-namespace bed")?;
    println!("demo: bed namespaces: {}", bed.names().join(" "));
    println!(
        "demo: client {} -> node {} (sockgate) -> backends foo {}:3001, bar {}:3002",
        bed.client_addr(),
        bed.node_addr(),
        bed.backend_addr(0),
        bed.backend_addr(1)
    );
    let _foo = servers::Server::start(
        bed.backend(0),
        SocketAddr::new(bed.backend_addr(0).into(), 3001),
        servers::named_echo("foo"),
    )?;
    let _bar = servers::Server::start(
        bed.backend(1),
        SocketAddr::new(bed.backend_addr(1).into(), 3002),
        servers::named_echo("bar"),
    )?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sockgate-demo-{}", std::process::id()));
    let result = with_agent(&bed, &pin_dir);
    drop(bed);
    let leftovers = check_clean(&pin_dir);
    result?;
    leftovers?;
    println!("\ndemo: cleaned up: namespaces deleted, pins removed, agent exited");
    Ok(())
}

/// The scenario the demo serves.
const EXAMPLE: &str = "deploy/examples/envoy-gateway";

fn with_agent(bed: &Bed, pin_dir: &Path) -> anyhow::Result<()> {
    // The example's EndpointSlices name the bed's backend addresses.
    let slices = std::fs::read_to_string(root().join(EXAMPLE).join("backends.yaml"))?;
    for i in 0..2 {
        let addr = bed.backend_addr(i).to_string();
        if !slices.contains(&format!("\"{addr}\"")) {
            bail!("{EXAMPLE}/backends.yaml does not name backend {i} of the bed ({addr})");
        }
    }
    println!(
        "demo: serving the Envoy Gateway TCP routing example, plain Gateway API YAML in {EXAMPLE} \
         (tcp-gateway: foo 8088 -> Service foo:3001, bar 8089 -> Service bar:3002)"
    );
    println!(
        "demo: data path --datapath sockmap, to show the kernel path (the default, auto, \
         chooses splice: it measured faster on this machine, see docs/performance.md)"
    );
    show(
        &format!("sockgate check -f {EXAMPLE}"),
        Command::new(sockgate())
            .current_dir(root())
            .args(["check", "-f", EXAMPLE]),
    )?;
    let mut agent = AgentProcess {
        child: bed
            .node()
            .command(sockgate())
            .arg("run")
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(["--source", "files", "--dir"])
            .arg(root().join(EXAMPLE))
            .args(["--drain-timeout", "2"])
            // The kernel path, shown on purpose: the default `auto` picks splice, which
            // measured faster here (docs/performance.md).
            .args(["--datapath", "sockmap"])
            .args(["--xdp-iface", "c0", "--xdp-deny"])
            .arg(format!("8088={DENIED}/32"))
            .stdin(Stdio::null())
            .spawn()
            .context("starting sockgate")?,
        pin_dir: pin_dir.to_path_buf(),
    };
    wait_listening(bed, &mut agent, &[8088, 8089])?;
    for (port, listener) in [(8088, "foo"), (8089, "bar")] {
        let addr = SocketAddr::new(bed.node_addr().into(), port);
        let reply = ask(
            bed,
            addr,
            format!("hello from the client to listener {listener}\n"),
        )?;
        println!(
            "demo: client -> {addr} (listener {listener}) answered: {}",
            reply.trim_end()
        );
    }
    denied_and_allowed(bed)?;
    print_counters(pin_dir)?;
    show(
        &format!("bpftool map dump pinned {}/GW_LISTENERS", pin_dir.display()),
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(pin_dir.join("GW_LISTENERS")),
    )?;
    show(
        &format!("sockgate status --pin-dir {}", pin_dir.display()),
        Command::new(sockgate())
            .args(["status", "--pin-dir"])
            .arg(pin_dir),
    )?;
    println!("\ndemo: stopping sockgate (SIGTERM)");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent.child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("sockgate did not exit within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn check_clean(pin_dir: &Path) -> anyhow::Result<()> {
    let prefix = format!("sg{}-", std::process::id());
    let list = netbed::ip(&["netns", "list"])?;
    let left: Vec<&str> = list.lines().filter(|l| l.starts_with(&prefix)).collect();
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    if pin_dir.exists() {
        bail!("pins left behind in {}", pin_dir.display());
    }
    Ok(())
}
