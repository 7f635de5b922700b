//! Shared harness of the end-to-end tests: the `sockgate` binary run inside a bed's
//! node namespace, with its own pin directory.
#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use netbed::{Bed, servers};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

static PINS: AtomicU32 = AtomicU32::new(0);

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}

/// The `sockgate` binary: `SOCKGATE_BIN` when set (`cargo xtask test` builds the
/// workspace first and sets it), else built on first use.
pub fn sockgate_bin() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    if let Some(bin) = std::env::var_os("SOCKGATE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "SOCKGATE_BIN={} is not a file",
            bin.display()
        );
        return bin;
    }
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

/// A kubeconfig whose API server is port 1 on the node namespace's loopback: nothing
/// listens there, every connect is refused. Returns (its directory, the file).
pub fn unreachable_kubeconfig(tag: &str) -> (PathBuf, PathBuf) {
    kubeconfig(tag, 1)
}

/// A kubeconfig whose API server is `http://127.0.0.1:PORT` (in the node namespace).
/// Returns (its directory, the file).
pub fn kubeconfig(tag: &str, port: u16) -> (PathBuf, PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("sockgate-kubeconfig-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("config");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n\
         users:\n- name: u\n  user: {{}}\n"),
    )
    .expect("kubeconfig");
    (dir, kubeconfig)
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
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
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

/// Write sizes: fixed, or varied small writes.
#[derive(Clone, Copy)]
pub enum Writes {
    Large,
    Small,
}

pub fn send_stream(mut s: TcpStream, seed: u64, total: u64, writes: Writes) -> io::Result<()> {
    let mut stream = Stream::new(seed);
    let mut sizes = Stream::new(seed ^ 0xABCD);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = match writes {
            Writes::Large => buf.len(),
            Writes::Small => {
                let mut b = [0u8; 2];
                sizes.fill(&mut b);
                1 + usize::from(u16::from_le_bytes(b)) % 1500
            }
        };
        let n = n.min(usize::try_from(left).unwrap_or(usize::MAX));
        stream.fill(&mut buf[..n]);
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)
}

/// Reads until EOF; returns the byte count and the offset of the first wrong byte.
pub fn recv_stream(mut s: TcpStream, seed: u64) -> io::Result<(u64, Option<u64>)> {
    let mut stream = Stream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut bad = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((total, bad));
        }
        stream.fill(&mut want[..n]);
        if bad.is_none()
            && let Some(i) = (0..n).find(|&i| buf[i] != want[i])
        {
            bad = Some(total + i as u64);
        }
        total += n as u64;
    }
}

/// Sends `total` bytes each way at once through `s`; the peer does the same with the
/// seeds swapped. Returns what this side received.
pub fn duplex(
    s: &TcpStream,
    send_seed: u64,
    recv_seed: u64,
    total: u64,
    writes: Writes,
) -> (u64, Option<u64>) {
    let tx = s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || send_stream(tx, send_seed, total, writes));
    let got = recv_stream(s.try_clone().expect("clone"), recv_seed).expect("receive");
    sender.join().expect("sender").expect("send");
    got
}

/// One plain HTTP/1.1 GET from the node namespace: (status code, body).
pub fn http_get(bed: &Bed, addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    bed.node()
        .run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            io::Result::Ok(text)
        })
        .expect("node namespace")
        .map(|text| {
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            (code, body.to_owned())
        })
        .expect("HTTP GET")
}

/// The agent's `/metrics` text (the default address, in the node namespace).
pub fn metrics(bed: &Bed) -> String {
    let (code, text) = http_get(bed, SocketAddr::from(([127, 0, 0, 1], 9464)), "/metrics");
    assert_eq!(code, 200, "{text}");
    text
}

/// Listener `port` on the node's address on the client link.
pub fn listener_addr(bed: &Bed, port: u16) -> SocketAddr {
    SocketAddr::new(bed.node_addr().into(), port)
}

/// Port `port` of backend `i`.
pub fn backend_addr(bed: &Bed, i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(bed.backend_addr(i).into(), port)
}

/// Makes the next close of `s` a reset (`SO_LINGER` 0).
pub fn reset_with_linger(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
}

/// Half-close each way: through listener 8088 (to an echo server on backend 0:3001)
/// the client sends its FIN first and still reads the echo; through 8089 (backend
/// 0:3002) the backend sends its FIN first and still reads what the client sends
/// after it. `start` starts the agent with the two `--route` specs; it is returned for
/// the caller's checks of the path taken.
pub fn half_close_both_ways(bed: &Bed, start: impl FnOnce(&str, &str) -> Agent) -> Agent {
    half_close_both_ways_from(bed, bed.client(), start)
}

/// As [`half_close_both_ways`], with the client in `client_ns` (the node's own
/// namespace for a node-local client).
pub fn half_close_both_ways_from(
    bed: &Bed,
    client_ns: &netbed::Netns,
    start: impl FnOnce(&str, &str) -> Agent,
) -> Agent {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    let backend_fin_first: servers::Handler = Arc::new(move |mut s: TcpStream| {
        let mut go = [0u8; 2];
        let _ = s.read_exact(&mut go);
        let _ = s.write_all(b"backend says bye first");
        let _ = s.shutdown(Shutdown::Write);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = tx.lock().expect("lock").send(got);
    });
    let _echo = servers::Server::start(bed.backend(0), backend_addr(bed, 0, 3001), servers::echo())
        .expect("echo");
    let _fin = servers::Server::start(
        bed.backend(0),
        backend_addr(bed, 0, 3002),
        backend_fin_first,
    )
    .expect("fin");
    let r1 = format!("8088={}", backend_addr(bed, 0, 3001));
    let r2 = format!("8089={}", backend_addr(bed, 0, 3002));
    let agent = start(&r1, &r2);
    let (a1, a2) = (listener_addr(bed, 8088), listener_addr(bed, 8089));
    let (echoed, from_backend) = client_ns
        .run(move || {
            // Client FIN first (after one exchange: the pair is made by then).
            let mut s = connect(a1).expect("connect");
            assert_eq!(exchange(&mut s, "ping\n"), "ping\n");
            s.write_all(b"client half-closes").expect("write");
            s.shutdown(Shutdown::Write).expect("shutdown");
            let mut echoed = Vec::new();
            s.read_to_end(&mut echoed).expect("read");
            // Backend FIN first.
            let mut s = connect(a2).expect("connect");
            s.write_all(b"go").expect("write");
            let mut from_backend = Vec::new();
            s.read_to_end(&mut from_backend)
                .expect("read to the backend's FIN");
            s.write_all(b"client keeps talking after the backend's FIN")
                .expect("write after FIN");
            s.shutdown(Shutdown::Write).expect("shutdown");
            (echoed, from_backend)
        })
        .expect("client");
    assert_eq!(echoed, b"client half-closes");
    assert_eq!(from_backend, b"backend says bye first");
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("backend result");
    assert_eq!(got, b"client keeps talking after the backend's FIN");
    agent
}

/// The backends of a reset test: 0:3001 reads until an error and sends its kind on the
/// returned channel (the client resets); 0:3002 reads 5 bytes and resets the
/// connection. Both serve while the returned servers live.
pub fn reset_backends(
    bed: &Bed,
) -> (
    servers::Server,
    servers::Server,
    mpsc::Receiver<io::ErrorKind>,
) {
    let (tx, rx) = mpsc::channel::<io::ErrorKind>();
    let tx = std::sync::Mutex::new(tx);
    let watcher: servers::Handler = Arc::new(move |mut s: TcpStream| {
        let mut buf = [0u8; 1024];
        let kind = loop {
            match s.read(&mut buf) {
                Ok(0) => break io::ErrorKind::UnexpectedEof,
                Ok(_) => {}
                Err(e) => break e.kind(),
            }
        };
        let _ = tx.lock().expect("lock").send(kind);
    });
    let resetter: servers::Handler = Arc::new(|mut s: TcpStream| {
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf);
        reset_with_linger(&s);
    });
    let w = servers::Server::start(bed.backend(0), backend_addr(bed, 0, 3001), watcher)
        .expect("watcher");
    let r = servers::Server::start(bed.backend(0), backend_addr(bed, 0, 3002), resetter)
        .expect("resetter");
    (w, r, rx)
}

/// A reset from either side resets the other: the client's RST (`SO_LINGER` 0, then
/// close) through listener 8088 reaches backend 0:3001 as a reset, and backend
/// 0:3002's RST reaches the client through 8089. `start` starts the agent with the two
/// `--route` specs; it is returned for the caller's checks.
pub fn resets_both_ways(bed: &Bed, start: impl FnOnce(&str, &str) -> Agent) -> Agent {
    let (_w, _r, rx) = reset_backends(bed);
    let r1 = format!("8088={}", backend_addr(bed, 0, 3001));
    let r2 = format!("8089={}", backend_addr(bed, 0, 3002));
    let agent = start(&r1, &r2);
    let (a1, a2) = (listener_addr(bed, 8088), listener_addr(bed, 8089));
    let client_saw = bed
        .client()
        .run(move || {
            let mut s = connect(a1).expect("connect");
            s.write_all(b"hello").expect("write");
            std::thread::sleep(Duration::from_millis(200));
            reset_with_linger(&s);
            drop(s);
            let mut s = connect(a2).expect("connect");
            s.write_all(b"hello").expect("write");
            let mut buf = [0u8; 16];
            match s.read(&mut buf) {
                Ok(n) => panic!("expected a reset, read {n} bytes"),
                Err(e) => e.kind(),
            }
        })
        .expect("client");
    assert_eq!(
        client_saw,
        io::ErrorKind::ConnectionReset,
        "backend reset reaches the client"
    );
    let backend_saw = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("watcher result");
    assert_eq!(
        backend_saw,
        io::ErrorKind::ConnectionReset,
        "client reset reaches the backend"
    );
    agent
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

/// How one side saw its connection end.
#[derive(Debug)]
pub struct End {
    /// Bytes received before the end, and the offset of the first wrong one.
    pub received: u64,
    pub bad: Option<u64>,
    /// `None` for EOF, else the read error's kind.
    pub error: Option<io::ErrorKind>,
    /// The writer's error, if a write failed first. A socket error (a timeout, a reset)
    /// is reported once: to whichever of the reader and the writer asked first, and
    /// the other then sees EOF or a broken pipe.
    pub write_error: Option<io::ErrorKind>,
    pub at: Instant,
}

impl End {
    /// Whether the connection ended with the socket error `kind`, whether the reader saw
    /// it, or the writer did and the reader then saw EOF.
    pub fn ended_with(&self, kind: io::ErrorKind) -> bool {
        self.error == Some(kind) || (self.error.is_none() && self.write_error == Some(kind))
    }
}

/// Sends the stream of `send_seed` in 64 KiB writes every 5 ms (at most 2 GiB, in
/// practice until the connection breaks) while reading the stream of `recv_seed`
/// until EOF or an error.
pub fn transfer_until_end(s: &TcpStream, send_seed: u64, recv_seed: u64) -> End {
    let mut out = s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let mut stream = Stream::new(send_seed);
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..32 * 1024 {
            stream.fill(&mut buf);
            if let Err(e) = out.write_all(&buf) {
                return Some(e.kind());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    });
    let mut s = s.try_clone().expect("clone");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut stream = Stream::new(recv_seed);
    let (mut buf, mut want) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let (mut received, mut bad) = (0u64, None);
    let error = loop {
        match s.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                stream.fill(&mut want[..n]);
                if bad.is_none()
                    && let Some(i) = (0..n).find(|&i| buf[i] != want[i])
                {
                    bad = Some(received + i as u64);
                }
                received += n as u64;
            }
            Err(e) => break Some(e.kind()),
        }
    };
    let at = Instant::now();
    // The connection is over: the writer fails at its next write.
    let _ = s.shutdown(Shutdown::Both);
    let write_error = sender.join().ok().flatten();
    End {
        received,
        bad,
        error,
        write_error,
        at,
    }
}

/// TCP sockets of `ns` on `port` (either end) in a state other than LISTEN and
/// TIME-WAIT: connections still open, or half-open.
pub fn open_connections(ns: &netbed::Netns, port: u16) -> Vec<String> {
    let out = ns.output("ss", &["-Htan"]).expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 5
                && !matches!(f[0], "LISTEN" | "TIME-WAIT")
                && (f[3].ends_with(&format!(":{port}")) || f[4].ends_with(&format!(":{port}")))
        })
        .map(str::to_owned)
        .collect()
}

/// Entries of the pinned map `name` in `dir`.
pub fn map_entries(dir: &std::path::Path, name: &str) -> usize {
    let path = dir.join(name).display().to_string();
    bpftool_json(&["map", "dump", "pinned", &path])
        .as_array()
        .map_or(0, Vec::len)
}

/// Entries of `GW_LISTENERS`, `GW_BACKENDS`, `GW_SOCKS` and `GW_PEERS` pinned in `dir`.
pub fn map_counts(dir: &std::path::Path) -> [usize; 4] {
    [
        gateway_common::GW_LISTENERS,
        gateway_common::GW_BACKENDS,
        gateway_common::GW_SOCKS,
        gateway_common::GW_PEERS,
    ]
    .map(|m| map_entries(dir, m))
}
