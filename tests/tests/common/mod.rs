//! Shared harness of the end-to-end tests: the `sockgate` binary run inside a bed's
//! node namespace, with its own pin directory.
#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use netbed::Bed;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

static PINS: AtomicU32 = AtomicU32::new(0);

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}

/// The `sockgate` binary, built on first use if missing.
pub fn sockgate_bin() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let bin = target_dir().join("debug/sockgate");
    BUILD.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "gateway-userspace",
                "--bin",
                "sockgate",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building sockgate failed");
    });
    bin
}

/// Fails loudly (never skips) when the test cannot have what it needs.
pub fn require_root() {
    if let Err(e) = netbed::check_privileges() {
        panic!("this end-to-end test needs privileges: {e}");
    }
    // Tests hold thousands of sockets (client and backend sides in this process).
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A unique pin directory for one agent.
pub fn pin_dir() -> PathBuf {
    let n = PINS.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(format!("/sys/fs/bpf/sg-test-{}-{n}", std::process::id()))
}

/// A running agent; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Agent {
    pub child: Child,
    pub pin_dir: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts `sockgate run ARGS` in the node namespace and waits until every port in
    /// `ports` listens.
    pub fn start(bed: &Bed, args: &[&str], ports: &[u16]) -> Self {
        Self::start_with_pin_dir(bed, pin_dir(), args, ports)
    }

    /// [`Agent::start`] with a given pin directory.
    pub fn start_with_pin_dir(bed: &Bed, pin_dir: PathBuf, args: &[&str], ports: &[u16]) -> Self {
        Self::spawn(bed, pin_dir, args, ports, &[])
    }

    /// [`Agent::start`] with extra environment variables for the agent.
    pub fn start_with_env(
        bed: &Bed,
        args: &[&str],
        ports: &[u16],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        Self::spawn(bed, pin_dir(), args, ports, env)
    }

    fn spawn(
        bed: &Bed,
        pin_dir: PathBuf,
        args: &[&str],
        ports: &[u16],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let log = std::env::temp_dir().join(format!(
            "sockgate-test-{}-{}.log",
            std::process::id(),
            pin_dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        ));
        let logf = std::fs::File::create(&log).expect("log file");
        let child = bed
            .node()
            .command(sockgate_bin())
            .arg("run")
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(args)
            .env("RUST_LOG", "info,sockgate=debug,gateway=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("sockgate starts");
        let mut agent = Self {
            child,
            pin_dir,
            log,
        };
        agent.wait_listening(bed, ports);
        agent
    }

    fn wait_listening(&mut self, bed: &Bed, ports: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sockgate exited early ({status}):\n{}", self.log_text());
            }
            let out = bed.node().output("ss", &["-Hltn"]).expect("ss runs");
            let text = String::from_utf8_lossy(&out.stdout);
            if ports.iter().all(|p| text.contains(&format!(":{p} "))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sockgate did not listen on {ports:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `sockgate status --json` against this agent's pins.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(sockgate_bin())
            .args(["status", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .expect("status runs");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Counters of listener `port` (after the agent's next flush).
    pub fn stats(&self, port: u16) -> serde_json::Value {
        std::thread::sleep(Duration::from_millis(250));
        let s = self.status();
        s["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["port"] == port))
            .map_or_else(
                || panic!("listener {port} not in status: {s}"),
                |l| l["stats"].clone(),
            )
    }

    /// Kills the agent (SIGKILL: no cleanup of its own) and leaves its pins in place.
    pub fn kill_keeping_pins(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Drop must not remove the pins another agent is about to reuse.
        self.pin_dir = PathBuf::new();
    }

    /// Kills the agent (SIGKILL: no cleanup of its own) and waits for it, keeping
    /// this handle (and its pin directory).
    pub fn stop_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        if std::thread::panicking() {
            eprintln!("sockgate log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
        // The agent removes its pins on a clean exit; make sure of it after a crash.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Connects with a timeout (from the calling thread's namespace).
pub fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Writes `line`, reads one reply line.
pub fn exchange(s: &mut TcpStream, line: &str) -> String {
    s.write_all(line.as_bytes()).expect("write");
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).expect("read") == 1 {
        out.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// xorshift64* stream: the same bytes from the same seed, in pieces of any size, so a
/// receiver can check what a sender sent without keeping it.
pub struct Stream {
    state: u64,
    buf: [u8; 8],
    pos: usize,
}

impl Stream {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed | 1,
            buf: [0; 8],
            pos: 8,
        }
    }

    /// The next `out.len()` bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.pos == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.buf = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.pos = 0;
            }
            *b = self.buf[self.pos];
            self.pos += 1;
        }
    }
}

/// `bpftool -j ARGS`, parsed; fails loudly when bpftool does.
pub fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool runs (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "bpftool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// Raw IPv4/TCP packets, for segments a normal socket never sends (SYN floods, forged
/// retransmits), sent from the calling thread's namespace.
pub mod raw {
    use std::{
        io,
        net::{Ipv4Addr, SocketAddrV4},
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    /// TCP flags.
    pub const SYN: u8 = 0x02;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;

    fn sum(data: &[u8], mut acc: u32) -> u32 {
        for c in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        acc
    }

    fn fold(mut acc: u32) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    /// An IPv4 packet holding a TCP segment without options from `src` to `dst`, with
    /// both checksums set.
    pub fn tcp_packet(
        src: SocketAddrV4,
        dst: SocketAddrV4,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let tcp_len = 20 + payload.len();
        let total = u16::try_from(20 + tcp_len).expect("packet fits in 64 KiB");
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src.ip().octets());
        ip[16..20].copy_from_slice(&dst.ip().octets());
        let c = fold(sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        tcp.extend_from_slice(payload);
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&src.ip().octets());
        pseudo.extend_from_slice(&dst.ip().octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&u16::try_from(tcp_len).expect("fits").to_be_bytes());
        let c = fold(sum(&tcp, sum(&pseudo, 0)));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&tcp);
        ip
    }

    /// A raw socket that sends whole IPv4 packets (`IPPROTO_RAW`).
    pub struct Sender(OwnedFd);

    impl Sender {
        pub fn new() -> io::Result<Self> {
            // SAFETY: plain socket(2); the descriptor is owned below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a new descriptor nobody else owns.
            Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        /// Sends `pkt` (an IPv4 packet) towards `dst`; true when all of it went.
        pub fn send(&self, dst: Ipv4Addr, pkt: &[u8]) -> bool {
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: buffer and address valid for the call.
            let r = unsafe {
                libc::sendto(
                    self.0.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    std::ptr::from_ref(&to).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            usize::try_from(r).is_ok_and(|r| r == pkt.len())
        }
    }

    /// The next sequence number `s` will send and the next it expects, read in TCP
    /// repair mode (`TCP_REPAIR`, `TCP_QUEUE_SEQ`; needs `CAP_NET_ADMIN`), which is left
    /// again at once.
    pub fn tcp_seqs(s: &std::net::TcpStream) -> io::Result<(u32, u32)> {
        const TCP_REPAIR: libc::c_int = 19;
        const TCP_REPAIR_QUEUE: libc::c_int = 20;
        const TCP_QUEUE_SEQ: libc::c_int = 21;
        const TCP_RECV_QUEUE: libc::c_int = 1;
        const TCP_SEND_QUEUE: libc::c_int = 2;
        let fd = s.as_raw_fd();
        let set = |opt: libc::c_int, v: libc::c_int| {
            // SAFETY: an int option, valid for the call.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    opt,
                    std::ptr::from_ref(&v).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let get_seq = || {
            let mut v: u32 = 0;
            let mut len = size_of::<u32>() as libc::socklen_t;
            // SAFETY: a u32 option, valid for the call.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    TCP_QUEUE_SEQ,
                    std::ptr::from_mut(&mut v).cast(),
                    &raw mut len,
                )
            };
            if rc == 0 {
                Ok(v)
            } else {
                Err(io::Error::last_os_error())
            }
        };
        set(TCP_REPAIR, 1)?;
        let seqs = (|| {
            set(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
            let snd = get_seq()?;
            set(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
            let rcv = get_seq()?;
            Ok((snd, rcv))
        })();
        set(TCP_REPAIR, 0)?;
        seqs
    }
}
