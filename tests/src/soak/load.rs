//! The soak's client side: per data path, a steady rate of short connections, long
//! hashed bulk transfers, request/response connections, half-closes and resets from
//! both sides, and short connections to the listener whose route comes and goes. Every
//! outcome is tallied per kind: bytes sent, bytes received intact (length and hash
//! checked), failures by reason, and whether a failure overlapped a disturbance the
//! soak made on purpose (a backend killed, a route removed).
use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{backend, stream};
use crate::{BedError, Netns};

/// Kinds of connection the load makes.
pub const KINDS: [&str; 7] = [
    "short",
    "bulk",
    "request-response",
    "server-half-close",
    "server-reset",
    "client-reset",
    "churned-route",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// How heavy the load is.
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    /// Pause between two short connections.
    pub short_every: Duration,
    /// Bytes of each bulk transfer, each way.
    pub bulk_bytes: u64,
    /// Exchanges of each request/response connection.
    pub rr_exchanges: u32,
    /// Bytes the server sends before it half-closes.
    pub download_bytes: u64,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            short_every: Duration::from_millis(50),
            bulk_bytes: 16 << 20,
            rr_exchanges: 100,
            download_bytes: 1 << 20,
        }
    }
}

/// What one kind of connection did on one data path.
#[derive(Clone, Debug, Default)]
pub struct KindTally {
    pub attempts: u64,
    pub ok: u64,
    pub bytes_sent: u64,
    pub bytes_intact: u64,
    /// Transfers that ended cleanly with the wrong length or hash: data lost or
    /// changed without an error.
    pub corrupted: u64,
    /// Failures by reason: (overlapping a disturbance made on purpose, not).
    pub failures: BTreeMap<String, (u64, u64)>,
}

impl KindTally {
    /// Failures that overlapped no disturbance made on purpose.
    pub fn unexpected(&self) -> u64 {
        self.failures.values().map(|(_, u)| u).sum()
    }
}

/// The tallies of one data path, by kind.
#[derive(Debug, Default)]
pub struct Tally {
    kinds: Mutex<BTreeMap<&'static str, KindTally>>,
}

impl Tally {
    /// A copy of the tallies now.
    pub fn snapshot(&self) -> BTreeMap<&'static str, KindTally> {
        self.kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn record(&self, kind: &'static str, r: &Result<(u64, u64), Fail>, disturbed: bool) {
        let mut kinds = self
            .kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let t = kinds.entry(kind).or_default();
        t.attempts += 1;
        match r {
            Ok((sent, intact)) => {
                t.ok += 1;
                t.bytes_sent += sent;
                t.bytes_intact += intact;
            }
            Err(f) => {
                t.bytes_sent += f.sent;
                // A clean close before the end is a loss unless a backend was killed
                // meanwhile (a killed server's kernel closes with a FIN when nothing
                // was left unread).
                if f.corrupted && !(f.truncated && disturbed) {
                    t.corrupted += 1;
                }
                let e = t.failures.entry(f.reason.clone()).or_default();
                if disturbed || kind == "churned-route" {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                }
            }
        }
    }
}

/// The disturbances the soak makes on purpose: a counter that is odd while a backend is
/// down and moves at every kill and restart. A connection that saw it move, or saw it
/// odd, overlapped one.
#[derive(Debug, Default)]
pub struct Disturbance(AtomicU64);

impl Disturbance {
    /// A backend goes down, or comes back.
    pub fn step(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Fail {
    reason: String,
    sent: u64,
    corrupted: bool,
    /// The peer closed cleanly before everything arrived: a loss when nothing was
    /// disturbed, what a killed backend does otherwise.
    truncated: bool,
}

fn fail(e: &io::Error, sent: u64) -> Fail {
    let reason = match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused (reset answering the SYN)",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset",
        io::ErrorKind::BrokenPipe => "broken pipe (peer gone while writing)",
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out",
        io::ErrorKind::UnexpectedEof => "closed early",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        other => {
            return Fail {
                reason: format!("other error ({other})"),
                sent,
                corrupted: false,
                truncated: false,
            };
        }
    };
    Fail {
        reason: reason.to_owned(),
        sent,
        corrupted: false,
        truncated: false,
    }
}

fn corrupted(what: &str, sent: u64) -> Fail {
    Fail {
        reason: format!("corrupted: {what}"),
        sent,
        corrupted: true,
        truncated: false,
    }
}

fn truncated(what: &str, sent: u64) -> Fail {
    Fail {
        reason: format!("closed cleanly early: {what}"),
        sent,
        corrupted: true,
        truncated: true,
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0x5eed);
    NEXT.fetch_add(0x9e37_79b9, Ordering::Relaxed)
}

/// One short connection: the backend's name, then its FIN.
fn short(addr: SocketAddr) -> Result<(u64, u64), Fail> {
    let mut s = connect(addr).map_err(|e| fail(&e, 0))?;
    s.write_all(&[backend::SHORT]).map_err(|e| fail(&e, 0))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| fail(&e, 1))?;
    if got.is_empty() {
        return Err(truncated("no reply", 1));
    }
    if got.len() < 3 || got.first() != Some(&b'b') || got.last() != Some(&b'\n') {
        return Err(corrupted("short reply", 1));
    }
    Ok((1, got.len() as u64))
}

/// A bulk transfer: `len` bytes of a stream each way through the echo, the client
/// half-closing after its last byte and reading the echo to its end.
fn bulk(addr: SocketAddr, len: u64) -> Result<(u64, u64), Fail> {
    let mut s = connect(addr).map_err(|e| fail(&e, 0))?;
    s.write_all(&[backend::ECHO]).map_err(|e| fail(&e, 0))?;
    let mut w = s.try_clone().map_err(|e| fail(&e, 0))?;
    let seed = seed();
    let writer = std::thread::spawn(move || -> io::Result<u64> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            stream::fill(seed, off, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
        w.shutdown(Shutdown::Write)?;
        Ok(off)
    });
    let mut h = stream::Hasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    let read = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    if read.is_err() {
        // Unblock the writer.
        let _ = s.shutdown(Shutdown::Both);
    }
    let wrote = writer.join().unwrap_or(Ok(0));
    let sent = *wrote.as_ref().unwrap_or(&0);
    read.map_err(|e| fail(&e, sent))?;
    let sent = wrote.map_err(|e| fail(&e, 0))?;
    if h.len() != len {
        return Err(truncated("bulk echo short", sent));
    }
    if h.finish() != stream::hash_of(seed, len) {
        return Err(corrupted("bulk echo hash differs", sent));
    }
    Ok((sent, h.len()))
}

/// Request/response: `n` exchanges of 64 bytes, each answer checked, then the
/// client's FIN and the server's.
fn request_response(addr: SocketAddr, n: u32, stop: &AtomicBool) -> Result<(u64, u64), Fail> {
    let mut s = connect(addr).map_err(|e| fail(&e, 0))?;
    s.write_all(&[backend::ECHO]).map_err(|e| fail(&e, 0))?;
    let seed = seed();
    let (mut sent, mut intact) = (0, 0);
    for i in 0..u64::from(n) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut req = [0u8; 64];
        stream::fill(seed, i * 64, &mut req);
        s.write_all(&req).map_err(|e| fail(&e, sent))?;
        sent += 64;
        let mut resp = [0u8; 64];
        s.read_exact(&mut resp).map_err(|e| fail(&e, sent))?;
        if resp != req {
            return Err(corrupted("request/response answer differs", sent));
        }
        intact += 64;
        std::thread::sleep(Duration::from_millis(10));
    }
    s.shutdown(Shutdown::Write).map_err(|e| fail(&e, sent))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).map_err(|e| fail(&e, sent))?;
    if !rest.is_empty() {
        return Err(corrupted("bytes after the last answer", sent));
    }
    Ok((sent, intact))
}

/// The server sends `len` bytes and half-closes first; the client reads them to EOF,
/// then still sends on its side, then closes.
fn server_half_close(addr: SocketAddr, len: u64) -> Result<(u64, u64), Fail> {
    let mut s = connect(addr).map_err(|e| fail(&e, 0))?;
    let seed = seed();
    let mut head = vec![backend::DOWNLOAD];
    head.extend_from_slice(&len.to_le_bytes());
    head.extend_from_slice(&seed.to_le_bytes());
    s.write_all(&head).map_err(|e| fail(&e, 0))?;
    let mut h = stream::Hasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) => return Err(fail(&e, 17)),
        }
    }
    if h.len() != len {
        return Err(truncated("download short", 17));
    }
    if h.finish() != stream::hash_of(seed, len) {
        return Err(corrupted("download after the server's FIN differs", 17));
    }
    // The server's side is closed; ours still carries data.
    let tail = [7u8; 4096];
    s.write_all(&tail).map_err(|e| fail(&e, 17))?;
    s.shutdown(Shutdown::Write).map_err(|e| fail(&e, 17))?;
    Ok((17 + 4096, len))
}

/// The server resets the connection: the client must see the reset.
fn server_reset(addr: SocketAddr) -> Result<(u64, u64), Fail> {
    let mut s = connect(addr).map_err(|e| fail(&e, 0))?;
    s.write_all(&[backend::RESET]).map_err(|e| fail(&e, 0))?;
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
            ) =>
        {
            Ok((1, 0))
        }
        Ok(0) => Err(Fail {
            reason: "server's reset arrived as a clean close".into(),
            sent: 1,
            corrupted: false,
            truncated: false,
        }),
        Ok(_) => Err(corrupted("data after the server's reset", 1)),
        Err(e) => Err(fail(&e, 1)),
    }
}

/// The client resets the connection in the middle of an echo.
fn client_reset(addr: SocketAddr) -> Result<(u64, u64), Fail> {
    let mut s = connect(addr).map_err(|e| fail(&e, 0))?;
    s.write_all(&[backend::ECHO]).map_err(|e| fail(&e, 0))?;
    let seed = seed();
    let mut buf = vec![0u8; 64 * 1024];
    stream::fill(seed, 0, &mut buf);
    s.write_all(&buf).map_err(|e| fail(&e, 1))?;
    let mut first = vec![0u8; 4096];
    s.read_exact(&mut first).map_err(|e| fail(&e, 1))?;
    if first[..] != buf[..4096] {
        return Err(corrupted("echo before the client's reset differs", 1));
    }
    s.write_all(&buf).map_err(|e| fail(&e, 1))?;
    backend::linger_zero(&s).map_err(|e| fail(&e, 1))?;
    drop(s);
    Ok((1 + 2 * buf.len() as u64, 4096))
}

/// One connection of some kind: its kind and outcome.
type Op = Box<dyn Fn(u64, &AtomicBool) -> (&'static str, Result<(u64, u64), Fail>) + Send>;

/// The load on one data path: its worker threads, until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts the workers in the client namespace `ns`: `main` is the listener whose
    /// route stays, `churned` the one whose route comes and goes.
    pub fn start(
        ns: &Netns,
        main: SocketAddr,
        churned: SocketAddr,
        rates: Rates,
        tally: &Arc<Tally>,
        disturbance: &Arc<Disturbance>,
    ) -> Result<Self, BedError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        let mut spawn = |pause: Duration, op: Op| -> Result<(), BedError> {
            let (stop, tally, dist) = (stop.clone(), tally.clone(), disturbance.clone());
            workers.push(ns.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let before = dist.now();
                    let (kind, r) = op(i, &stop);
                    let after = dist.now();
                    let disturbed = before != after || before % 2 == 1;
                    tally.record(kind, &r, disturbed);
                    i += 1;
                    if let Some(rest) = pause.checked_sub(started.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            })?);
            Ok(())
        };
        spawn(
            rates.short_every,
            Box::new(move |_, _| ("short", short(main))),
        )?;
        spawn(
            Duration::from_millis(500),
            Box::new(move |_, _| ("bulk", bulk(main, rates.bulk_bytes))),
        )?;
        spawn(
            Duration::from_millis(100),
            Box::new(move |_, stop| {
                (
                    "request-response",
                    request_response(main, rates.rr_exchanges, stop),
                )
            }),
        )?;
        spawn(
            Duration::from_millis(100),
            Box::new(move |i, _| match i % 3 {
                0 => (
                    "server-half-close",
                    server_half_close(main, rates.download_bytes),
                ),
                1 => ("server-reset", server_reset(main)),
                _ => ("client-reset", client_reset(main)),
            }),
        )?;
        spawn(
            Duration::from_millis(200),
            Box::new(move |_, _| ("churned-route", short(churned))),
        )?;
        Ok(Self { stop, workers })
    }

    /// Asks the workers to stop after their current connection.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops and waits for the workers (each connection is bounded by its timeouts).
    pub fn join(self) {
        self.stop();
        for w in self.workers {
            let _ = w.join();
        }
    }
}
