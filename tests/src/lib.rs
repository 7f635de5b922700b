//! `netbed`: a network-namespace test bed for end-to-end tests, the demo and the
//! benchmarks.
//!
//! A [`Bed`] is a client namespace, a node namespace (where sockgate runs) and one
//! namespace per backend, joined by veth pairs whose ends are created directly inside
//! their namespaces (so interface names never collide between beds):
//!
//! ```text
//!  client 10.200.0.2 ──veth── 10.200.0.1 node 10.200.N.1 ──veth── 10.200.N.2 backend N-1
//!     fd00:200::2                fd00:200::1  fd00:200:N::1        fd00:200:N::2
//! ```
//!
//! The node forwards between its links, so the client reaches a backend directly (the
//! no-proxy baseline) or through a listener on the node. Namespace names carry the
//! process id and a counter (`sg<pid>-<n>-client`), so two runs at once never collide.
//! Everything is removed when the [`Bed`] is dropped, on panic (unwinding drops it) and
//! on Ctrl-C (a handler removes every namespace this process made, then exits).
//! [`sweep_stale`] removes namespaces left by processes that no longer exist.
//!
//! Addresses come from 10.200.0.0/16 and `fd00:200::/32` (N in hex) and exist only
//! inside the bed's namespaces.
use std::{
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
};

use nix::sched::{CloneFlags, setns};

/// Errors of building or using a bed.
#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error(
        "cannot create network namespaces: {0} (the end-to-end tests need root, or CAP_SYS_ADMIN and CAP_NET_ADMIN, and iproute2's `ip`)"
    )]
    Privileges(String),
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("running `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("entering namespace {name}: {source}")]
    Setns {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Namespaces made by this process and not yet removed, for the Ctrl-C handler.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());
static COUNTER: AtomicU32 = AtomicU32::new(0);
static HANDLER: Once = Once::new();

fn live() -> std::sync::MutexGuard<'static, Vec<String>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Prefix of every namespace made by this process.
fn prefix() -> String {
    format!("sg{}-", std::process::id())
}

fn install_interrupt_handler() {
    HANDLER.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            for name in live().drain(..) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
            eprintln!("netbed: interrupted; removed this run's network namespaces");
            std::process::exit(130);
        });
    });
}

/// Runs `ip ARGS`, returning its stdout.
pub fn ip(args: &[&str]) -> Result<String, BedError> {
    run_cmd(Command::new("ip").args(args))
}

fn run_cmd(cmd: &mut Command) -> Result<String, BedError> {
    let text = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BedError::Spawn {
            cmd: text.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BedError::Command {
            cmd: text,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Checks that this process can make namespaces, with a message saying what is missing.
pub fn check_privileges() -> Result<(), BedError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BedError::Privileges(format!(
            "running as uid {}, not root",
            nix::unistd::geteuid()
        )));
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err(BedError::Privileges(
            "`ip` (iproute2) is not installed".into(),
        ));
    }
    Ok(())
}

/// Removes namespaces named like this crate's whose process is gone (left by a run
/// that was killed with SIGKILL). Returns the names removed.
pub fn sweep_stale() -> Vec<String> {
    let Ok(list) = ip(&["netns", "list"]) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix("sg")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() && ip(&["netns", "del", name]).is_ok() {
            removed.push(name.to_owned());
        }
    }
    removed
}

/// One named network namespace, removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace `sg<pid>-<n>-<role>` with `lo` up.
    pub fn new(role: &str) -> Result<Self, BedError> {
        check_privileges()?;
        install_interrupt_handler();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{n}-{role}", prefix());
        ip(&["netns", "add", &name]).map_err(|e| match e {
            BedError::Command { stderr, .. } => BedError::Privileges(stderr),
            other => other,
        })?;
        live().push(name.clone());
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String, BedError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs inside this namespace. Only the network namespace is
    /// entered (not the mount namespace, unlike `ip netns exec`), so bpffs pins stay
    /// visible.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let path = self.path();
        // SAFETY: pre_exec runs in the forked child before exec; open and setns are
        // async-signal-safe system calls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let f = File::open(&path)?;
                setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        cmd
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output, BedError> {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| BedError::Spawn {
                cmd: format!("{program} {}", args.join(" ")),
                source,
            })
    }

    /// Drops `per_mille` of every thousand IP packets this namespace receives or sends,
    /// at random (an nftables `numgen random` rule on input and output), so that TCP
    /// loses segments and acknowledgements and retransmits. Needs `nft` (Debian
    /// package nftables). The rules go with the namespace.
    pub fn drop_at_random(&self, per_mille: u32) -> Result<(), BedError> {
        let rule = format!("numgen random mod 1000 < {per_mille} drop");
        let input = "{ type filter hook input priority 0; }";
        let output = "{ type filter hook output priority 0; }";
        let steps: [&[&str]; 5] = [
            &["add", "table", "inet", "loss"],
            &["add", "chain", "inet", "loss", "in", input],
            &["add", "chain", "inet", "loss", "out", output],
            &["add", "rule", "inet", "loss", "in", &rule],
            &["add", "rule", "inet", "loss", "out", &rule],
        ];
        for args in steps {
            let out = self.output("nft", args)?;
            if !out.status.success() {
                return Err(BedError::Command {
                    cmd: format!("nft {}", args.join(" ")),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        Ok(())
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its
    /// result. Sockets made by `f` belong to the namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R, BedError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let handle = self.spawn(f)?;
        Ok(handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p)))
    }

    /// Starts `f` on a new thread inside this namespace.
    pub fn spawn<F, R>(&self, f: F) -> Result<std::thread::JoinHandle<R>, BedError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = File::open(self.path()).map_err(|source| BedError::Setns {
            name: self.name.clone(),
            source,
        })?;
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            match setns(file.as_fd(), CloneFlags::CLONE_NEWNET) {
                Ok(()) => {
                    let _ = tx.send(Ok(()));
                }
                Err(e) => {
                    let _ = tx.send(Err(io::Error::from(e)));
                    // The caller gets the error; this thread must not run `f` outside.
                    std::panic::resume_unwind(Box::new("setns failed"));
                }
            }
            f()
        });
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(source)) => Err(BedError::Setns { name, source }),
            Err(_) => Err(BedError::Setns {
                name,
                source: io::Error::other("thread ended before entering the namespace"),
            }),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        live().retain(|n| n != &self.name);
    }
}

/// Makes a veth pair with end `a_if` in `a` and `b_if` in `b`, both up.
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<(), BedError> {
    ip(&[
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Makes the client link (`eth0` in the client, `c0` in the node) with its addresses
/// and the client's default route.
fn link_client(client: &Netns, node: &Netns) -> Result<(), BedError> {
    veth(client, "eth0", node, "c0")?;
    client.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"])?;
    node.ip(&["addr", "add", "10.200.0.1/24", "dev", "c0"])?;
    client.ip(&["route", "add", "default", "via", "10.200.0.1"])?;
    // `nodad`: usable at once, no duplicate address detection to wait for.
    client.ip(&["addr", "add", "fd00:200::2/64", "dev", "eth0", "nodad"])?;
    node.ip(&["addr", "add", "fd00:200::1/64", "dev", "c0", "nodad"])?;
    client.ip(&["-6", "route", "add", "default", "via", "fd00:200::1"])?;
    Ok(())
}

/// The client, node and backend namespaces, linked and addressed.
#[derive(Debug)]
pub struct Bed {
    // Field order is drop order: backends and client before the node.
    backends: Vec<Netns>,
    client: Netns,
    node: Netns,
}

impl Bed {
    /// Builds a bed with `backends` backend namespaces.
    pub fn new(backends: usize) -> Result<Self, BedError> {
        assert!(backends < 250, "at most 249 backends");
        let node = Netns::new("node")?;
        let client = Netns::new("client")?;
        link_client(&client, &node)?;
        node.output("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        node.output("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        let mut list = Vec::with_capacity(backends);
        for i in 0..backends {
            let ns = Netns::new(&format!("b{i}"))?;
            let node_if = format!("b{i}");
            veth(&ns, "eth0", &node, &node_if)?;
            let net = i + 1;
            ns.ip(&["addr", "add", &format!("10.200.{net}.2/24"), "dev", "eth0"])?;
            node.ip(&[
                "addr",
                "add",
                &format!("10.200.{net}.1/24"),
                "dev",
                &node_if,
            ])?;
            ns.ip(&["route", "add", "default", "via", &format!("10.200.{net}.1")])?;
            let (node6, peer6) = (
                format!("fd00:200:{net:x}::1"),
                format!("fd00:200:{net:x}::2"),
            );
            ns.ip(&[
                "addr",
                "add",
                &format!("{peer6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            node.ip(&[
                "addr",
                "add",
                &format!("{node6}/64"),
                "dev",
                &node_if,
                "nodad",
            ])?;
            ns.ip(&["-6", "route", "add", "default", "via", &node6])?;
            list.push(ns);
        }
        Ok(Self {
            backends: list,
            client,
            node,
        })
    }

    /// Makes the client link again after it was deleted (`ip link del c0` in the
    /// node): same names and addresses, new interface indexes. The client's extra
    /// addresses went with the old link.
    pub fn relink_client(&self) -> Result<(), BedError> {
        link_client(&self.client, &self.node)
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The node namespace, where sockgate runs.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// Backend namespace `i`.
    pub fn backend(&self, i: usize) -> &Netns {
        &self.backends[i]
    }

    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The node's address on the client link: where the client connects to listeners.
    pub fn node_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, 1)
    }

    /// The client's address.
    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, 2)
    }

    /// Backend `i`'s address.
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, u8::try_from(i + 1).unwrap_or(u8::MAX), 2)
    }

    /// The node's IPv6 address on the client link.
    pub fn node_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1)
    }

    /// The client's IPv6 address.
    pub fn client_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2)
    }

    /// Backend `i`'s IPv6 address.
    pub fn backend_addr6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x200,
            u16::try_from(i + 1).unwrap_or(u16::MAX),
            0,
            0,
            0,
            0,
            2,
        )
    }

    /// Names of the bed's namespaces.
    pub fn names(&self) -> Vec<String> {
        std::iter::once(&self.node)
            .chain(std::iter::once(&self.client))
            .chain(&self.backends)
            .map(|n| n.name().to_owned())
            .collect()
    }
}

pub mod raw;
pub mod records;
pub mod servers;
pub mod soak;
