//! Per-connection records: one access log line (JSON) per connection when it ends, on
//! every data path, and the metrics drawn from the same records (duration and bytes
//! per connection by listener, ended connections by reason).
//!
//! The data path never waits for the log: a record goes into a bounded channel
//! (`try_send`); when the channel is full the record is dropped and counted
//! (`sockgate_access_log_dropped_total`). A writer thread owns the output (stdout or
//! a file opened for appending) and reopens the file when asked (`SIGHUP`, for
//! logrotate's `create` mode). The metrics are observed before the channel, so they
//! count every connection, logged or dropped.
use std::{
    fs::File,
    io::{self, BufWriter, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tracing::{info, warn};

/// Records the channel holds by default before new ones are dropped.
pub const DEFAULT_BUFFER: usize = 8192;

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Both directions ended with a FIN.
    Fin,
    /// The client reset the connection.
    ClientReset,
    /// The backend reset the connection.
    BackendReset,
    /// No backend could be connected (every attempt failed or timed out); the client
    /// was reset.
    ConnectFailed,
    /// Refused without a connect attempt (no backend with a weight, an invalid
    /// backendRef, or no listener any more); the client was reset.
    Refused,
    /// Still open when its listener was removed (or the agent stopped) and the drain
    /// timeout ran out: both sides reset.
    Drained,
    /// Silent for longer than the idle timeout (forward path).
    IdleTimeout,
    /// The handshake did not complete in time (forward path).
    HandshakeTimeout,
    /// Another error on one of the sockets (in `detail`); both sides reset.
    Error,
}

impl EndReason {
    /// Every reason, in the order the metric lists them.
    pub const ALL: [Self; 9] = [
        Self::Fin,
        Self::ClientReset,
        Self::BackendReset,
        Self::ConnectFailed,
        Self::Refused,
        Self::Drained,
        Self::IdleTimeout,
        Self::HandshakeTimeout,
        Self::Error,
    ];

    /// The log and metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::ClientReset => "client_reset",
            Self::BackendReset => "backend_reset",
            Self::ConnectFailed => "connect_failed",
            Self::Refused => "refused",
            Self::Drained => "drained",
            Self::IdleTimeout => "idle_timeout",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Error => "error",
        }
    }
}

/// Which data path carried a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathName {
    /// The tc program, no socket on the node.
    Forward,
    /// sockmap redirect between the two sockets.
    Sockmap,
    /// `splice(2)` in the agent.
    Splice,
    /// Not carried: refused or failed before a path was chosen.
    None,
}

/// The listener a connection arrived on.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListenerRef {
    /// The Gateway (`namespace/name`); `None` for the `--route` table.
    pub gateway: Option<String>,
    /// The listener's name (`--route PORT` for the `--route` table).
    pub listener: String,
    /// The listener's port.
    pub port: u16,
    /// The route carrying its traffic (`namespace/name`).
    pub route: Option<String>,
}

impl ListenerRef {
    /// Listener `port` as `desired` names it (its origin and route); only the port
    /// when `desired` has no such listener.
    pub fn of(desired: &crate::desired::DesiredState, port: u16) -> Self {
        desired.listeners.get(&port).map_or_else(
            || Self::from_origin("", port, None),
            |l| Self::from_origin(&l.origin, port, l.route.as_deref()),
        )
    }

    /// From a listener's origin (`namespace/gateway/listener`, or `--route PORT`).
    pub fn from_origin(origin: &str, port: u16, route: Option<&str>) -> Self {
        let (gateway, listener) = match origin.rsplit_once('/') {
            Some((g, l)) if !origin.starts_with("--") => (Some(g.to_owned()), l.to_owned()),
            _ => (None, origin.to_owned()),
        };
        Self {
            gateway,
            listener,
            port,
            route: route.map(str::to_owned),
        }
    }
}

/// One access log record: a connection that ended.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// When it ended (RFC 3339, UTC).
    pub time: String,
    /// When it started (RFC 3339, UTC).
    pub start_time: String,
    /// Seconds from the client's connection to the end.
    pub duration_seconds: f64,
    /// Where it arrived.
    #[serde(flatten)]
    pub listener: ListenerRef,
    /// The client's address and port.
    pub client: SocketAddr,
    /// The backend's address and port, once one was picked.
    pub backend: Option<SocketAddr>,
    /// The backendRef (`namespace/service:port`) the backend endpoint belongs to.
    pub backend_ref: Option<String>,
    /// The `EndpointSlice` (`namespace/name`) the backend endpoint was read from; null
    /// for the `--route` table and on the forward path.
    #[serde(default)]
    pub endpoint_slice: Option<String>,
    /// The data path that carried it.
    pub datapath: PathName,
    /// Payload bytes client -> backend.
    pub bytes_client_to_backend: u64,
    /// Payload bytes backend -> client.
    pub bytes_backend_to_client: u64,
    /// Segments client -> backend. Socket paths: the data segments (those carrying
    /// payload) the client sent, as they arrived at the node (`TCP_INFO`
    /// `tcpi_data_segs_in` of the client's socket, read when the connection ends; a
    /// GRO super-packet counts as the wire segments it holds, a retransmission again).
    /// Forward path: every packet of that direction (ACKs included; a GSO super-packet
    /// counts once). Null when no path carried it.
    pub segments_client_to_backend: Option<u64>,
    /// Segments backend -> client, likewise (socket paths: `tcpi_data_segs_in` of the
    /// backend's socket).
    pub segments_backend_to_client: Option<u64>,
    /// How it ended.
    pub end: EndReason,
    /// The error behind `connect_failed`, `refused` or `error`.
    pub detail: Option<String>,
}

impl Record {
    /// Fills the listener's names and the backendRef from `desired` (the forward
    /// path's records, made from the port and addresses alone).
    pub fn name_from(&mut self, desired: &crate::desired::DesiredState) {
        self.listener = ListenerRef::of(desired, self.listener.port);
        self.backend_ref = self
            .backend
            .and_then(|b| desired.backend_ref(self.listener.port, b))
            .map(str::to_owned);
    }
}

/// One live connection, as `sockgate connections` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LiveConnection {
    /// Where it arrived.
    #[serde(flatten)]
    pub listener: ListenerRef,
    /// The client's address and port.
    pub client: SocketAddr,
    /// The backend's address and port, once one was picked.
    pub backend: Option<SocketAddr>,
    /// The backendRef (`namespace/service:port`), where known.
    pub backend_ref: Option<String>,
    /// The `EndpointSlice` (`namespace/name`) of the backend endpoint, where known.
    #[serde(default)]
    pub endpoint_slice: Option<String>,
    /// The data path carrying it (`none` while the backend is being connected).
    pub datapath: PathName,
    /// Seconds since the client connected.
    pub age_seconds: f64,
    /// Payload bytes client -> backend so far.
    pub bytes_client_to_backend: u64,
    /// Payload bytes backend -> client so far.
    pub bytes_backend_to_client: u64,
    /// `connecting`, `established`, or on the forward path what the segments showed
    /// (`syn_sent`, `established`, `client_fin`, `backend_fin`, `closing`, `reset`).
    pub state: String,
}

/// Whatever can list live connections (the socket paths' table).
pub trait LiveSource: Send + Sync {
    /// The live connections now.
    fn live(&self) -> Vec<LiveConnection>;
}

/// Where the log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The agent's standard output.
    Stdout,
    /// A file, appended to, reopened on `SIGHUP`.
    File(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "stdout" || s == "-" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(s))
        })
    }
}

/// Errors of opening the log.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("access log {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("access log writer thread: {0}")]
    Thread(#[source] io::Error),
}

/// Labels of the per-listener families.
type Labels = Vec<(&'static str, String)>;

/// The per-connection records' destination: the metrics, and the log when it is on.
#[derive(Debug)]
pub struct Sink {
    tx: OnceLock<SyncSender<Record>>,
    /// Records dropped because the writer fell behind (`sockgate_access_log_dropped`).
    pub dropped: Counter,
    /// Records handed to the writer.
    pub queued: Counter,
    /// Connection duration, by listener.
    pub duration: Family<Labels, Histogram>,
    /// Bytes per connection, by listener and direction.
    pub bytes: Family<Labels, Histogram>,
    /// Ended connections, by listener and reason.
    pub ended: Family<Labels, Counter>,
}

impl Default for Sink {
    fn default() -> Self {
        Self {
            tx: OnceLock::new(),
            dropped: Counter::default(),
            queued: Counter::default(),
            duration: Family::new_with_constructor(|| {
                // 1 ms to about 36 hours.
                Histogram::new(exponential_buckets(0.001, 4.0, 14))
            }),
            bytes: Family::new_with_constructor(|| {
                // 64 B to 64 GiB.
                Histogram::new(exponential_buckets(64.0, 8.0, 11))
            }),
            ended: Family::default(),
        }
    }
}

impl Sink {
    /// Registers the metrics.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "sockgate_access_log_dropped",
            "Access log records dropped because the writer fell behind (the data path never waits for the log)",
            self.dropped.clone(),
        );
        registry.register(
            "sockgate_connection_duration_seconds",
            "Duration of ended connections, by listener",
            self.duration.clone(),
        );
        registry.register(
            "sockgate_connection_bytes",
            "Payload bytes of ended connections, by listener and direction (client_to_backend, backend_to_client)",
            self.bytes.clone(),
        );
        registry.register(
            "sockgate_connections_ended",
            "Ended connections, by listener and how they ended (fin, client_reset, backend_reset, connect_failed, refused, drained, idle_timeout, handshake_timeout, error)",
            self.ended.clone(),
        );
    }

    /// Sends records to `tx` from now on.
    pub fn attach(&self, tx: SyncSender<Record>) {
        let _ = self.tx.set(tx);
    }

    /// Whether records are written (an access log is configured): the metrics use
    /// only the end, the duration and the bytes, so what only the record carries
    /// (the segments) need not be read otherwise.
    pub fn writes_records(&self) -> bool {
        self.tx.get().is_some()
    }

    /// A connection ended: observes the metrics and queues the record (never waits;
    /// a full queue drops it and counts).
    pub fn end(&self, r: Record) {
        let port = r.listener.port.to_string();
        self.ended
            .get_or_create(&vec![
                ("listener", port.clone()),
                ("reason", r.end.as_str().to_owned()),
            ])
            .inc();
        if r.datapath != PathName::None {
            self.duration
                .get_or_create(&vec![("listener", port.clone())])
                .observe(r.duration_seconds);
            #[expect(
                clippy::cast_precision_loss,
                reason = "histogram observation: f64 precision is plenty"
            )]
            for (dir, n) in [
                ("client_to_backend", r.bytes_client_to_backend as f64),
                ("backend_to_client", r.bytes_backend_to_client as f64),
            ] {
                self.bytes
                    .get_or_create(&vec![("listener", port.clone()), ("direction", dir.into())])
                    .observe(n);
            }
        }
        let Some(tx) = self.tx.get() else { return };
        match tx.try_send(r) {
            Ok(()) => {
                self.queued.inc();
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// The writer thread's handle: ask it to reopen the file, or to finish.
#[derive(Debug)]
pub struct Writer {
    flags: Arc<Flags>,
    thread: std::thread::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Flags {
    reopen: AtomicBool,
    finish: AtomicBool,
}

impl Writer {
    /// The file is reopened before the next record is written.
    pub fn reopen(&self) {
        self.flags.reopen.store(true, Ordering::Release);
    }

    /// Writes what is queued, flushes and stops; waits for that up to `within`.
    pub fn finish(self, within: Duration) {
        self.flags.finish.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + within;
        while !self.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Opens `target` and starts the writer thread; records sent to the returned sender
/// (capacity `buffer`) are written one JSON line each. The thread ends when every
/// sender is gone, after writing what was queued.
pub fn open(target: Target, buffer: usize) -> Result<(SyncSender<Record>, Writer), OpenError> {
    let out = Output::open(&target)?;
    let (tx, rx) = mpsc::sync_channel(buffer.max(1));
    let flags = Arc::new(Flags::default());
    let f = flags.clone();
    let thread = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_loop(&rx, out, &target, &f))
        .map_err(OpenError::Thread)?;
    Ok((tx, Writer { flags, thread }))
}

enum Output {
    Stdout(io::Stdout),
    File(BufWriter<File>),
}

impl Output {
    fn open(target: &Target) -> Result<Self, OpenError> {
        Ok(match target {
            Target::Stdout => Self::Stdout(io::stdout()),
            Target::File(path) => Self::File(BufWriter::with_capacity(
                64 * 1024,
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| OpenError::File {
                        path: path.clone(),
                        source,
                    })?,
            )),
        })
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Self::Stdout(s) => s.lock().write_all(line),
            Self::File(f) => f.write_all(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout(s) => s.lock().flush(),
            Self::File(f) => f.flush(),
        }
    }
}

fn write_loop(rx: &Receiver<Record>, mut out: Output, target: &Target, flags: &Flags) {
    let mut failing = false;
    let mut dirty = false;
    loop {
        let next = if dirty || flags.finish.load(Ordering::Acquire) {
            // Flush as soon as the queue is empty: lines appear without delay.
            match rx.try_recv() {
                Ok(r) => Ok(r),
                Err(mpsc::TryRecvError::Empty) if dirty => {
                    let _ = out.flush();
                    dirty = false;
                    continue;
                }
                Err(_) => Err(RecvTimeoutError::Disconnected),
            }
        } else {
            rx.recv_timeout(Duration::from_millis(200))
        };
        if flags.reopen.swap(false, Ordering::AcqRel) && matches!(target, Target::File(_)) {
            let _ = out.flush();
            match Output::open(target) {
                Ok(o) => {
                    out = o;
                    info!("access log reopened");
                }
                Err(e) => warn!(error = %e, "access log not reopened; writing to the old file"),
            }
        }
        let record = match next {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut line = match serde_json::to_vec(&record) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "access log record not encoded");
                continue;
            }
        };
        line.push(b'\n');
        match out.write_line(&line) {
            Ok(()) => {
                dirty = true;
                failing = false;
            }
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "access log write failed (logged once until it works again)");
            }
            Err(_) => {}
        }
    }
    let _ = out.flush();
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-11-30T19:50:01.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's days_from_civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(port: u16) -> Record {
        Record {
            time: rfc3339(SystemTime::UNIX_EPOCH),
            start_time: rfc3339(SystemTime::UNIX_EPOCH),
            duration_seconds: 0.5,
            listener: ListenerRef::from_origin("default/gw/tcp", port, Some("default/r")),
            client: "10.200.0.2:40000".parse().expect("addr"),
            backend: Some("10.200.1.2:3001".parse().expect("addr")),
            backend_ref: Some("default/echo:3001".into()),
            endpoint_slice: Some("default/echo-abc12".into()),
            datapath: PathName::Splice,
            bytes_client_to_backend: 5,
            bytes_backend_to_client: 7,
            segments_client_to_backend: None,
            segments_backend_to_client: None,
            end: EndReason::Fin,
            detail: None,
        }
    }

    #[test]
    fn rfc3339_known_instants() {
        let at = |s: u64, ms: u64| {
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_796_064_601, 123), "2026-11-30T18:50:01.123Z");
    }

    #[test]
    fn listener_names_from_origin() {
        let l = ListenerRef::from_origin("ns/gw/tcp-a", 80, None);
        assert_eq!(l.gateway.as_deref(), Some("ns/gw"));
        assert_eq!(l.listener, "tcp-a");
        let l = ListenerRef::from_origin("--route 8088", 8088, None);
        assert_eq!(l.gateway, None);
        assert_eq!(l.listener, "--route 8088");
    }

    #[test]
    fn record_is_one_flat_json_object() {
        let v = serde_json::to_value(record(8088)).expect("json");
        assert_eq!(v["gateway"], "default/gw");
        assert_eq!(v["listener"], "tcp");
        assert_eq!(v["port"], 8088);
        assert_eq!(v["route"], "default/r");
        assert_eq!(v["end"], "fin");
        assert_eq!(v["datapath"], "splice");
        let back: Record = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, record(8088));
    }

    #[test]
    fn full_queue_drops_and_counts_without_waiting() {
        let sink = Sink::default();
        let (tx, rx) = mpsc::sync_channel(2);
        sink.attach(tx);
        for _ in 0..5 {
            sink.end(record(1));
        }
        assert_eq!(sink.queued.get(), 2);
        assert_eq!(sink.dropped.get(), 3);
        assert_eq!(rx.try_iter().count(), 2);
        let ended = sink
            .ended
            .get_or_create(&vec![("listener", "1".into()), ("reason", "fin".into())])
            .get();
        assert_eq!(ended, 5, "metrics count every connection, logged or not");
    }

    #[test]
    fn records_are_written_once_a_log_is_attached() {
        let sink = Sink::default();
        assert!(!sink.writes_records());
        let (tx, _rx) = mpsc::sync_channel(1);
        sink.attach(tx);
        assert!(sink.writes_records());
    }

    #[test]
    fn file_written_and_reopened() {
        let dir = std::env::temp_dir().join(format!("sg-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("access.log");
        let (tx, writer) = open(Target::File(path.clone()), 16).expect("open");
        tx.send(record(1)).expect("send");
        let wait_lines = |p: &std::path::Path, n: usize| {
            for _ in 0..200 {
                if std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .count()
                    >= n
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("{} never had {n} lines", p.display());
        };
        wait_lines(&path, 1);
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).expect("rotate");
        writer.reopen();
        tx.send(record(2)).expect("send");
        wait_lines(&path, 1);
        let first = std::fs::read_to_string(&rotated).expect("rotated");
        let second = std::fs::read_to_string(&path).expect("new");
        assert_eq!(first.lines().count(), 1);
        assert!(second.contains("\"port\":2"), "{second}");
        drop(tx);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
