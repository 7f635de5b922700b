//! One connection on a socket path, from accept to its access log record: where it
//! arrived, the backend picked, the path taken, the bytes moved each way (the agent's
//! own and, on the kernel path, those the verdict redirected), and how it ended.
//!
//! The live ones are kept in a [`Table`] for `sockgate connections`.
use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use tokio::net::TcpStream;

use super::sock;
use crate::{
    access_log::{EndReason, ListenerRef, LiveConnection, LiveSource, PathName, Record, rfc3339},
    ebpf::Datapath,
};

/// Which socket of a connection an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
    /// The agent's own resources (a pipe, a timeout of its own).
    Agent,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Backend => "backend",
            Self::Agent => "agent",
        })
    }
}

/// An error that ended a connection, with the side it came from.
#[derive(Debug, thiserror::Error)]
#[error("{side} socket: {source}")]
pub struct SideError {
    pub side: Side,
    #[source]
    pub source: io::Error,
}

impl SideError {
    /// How a connection that ended with this error is recorded.
    pub fn end_reason(&self) -> EndReason {
        let reset = matches!(
            self.source.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        );
        match (self.side, reset) {
            (Side::Client, true) => EndReason::ClientReset,
            (Side::Backend, true) => EndReason::BackendReset,
            _ => EndReason::Error,
        }
    }
}

/// The error of one direction: on its source or on its destination socket.
#[derive(Debug)]
pub enum DirError {
    /// Reading the source (or waiting for it).
    Src(io::Error),
    /// Writing the destination, or passing the FIN on.
    Dst(io::Error),
    /// The agent's own resources (the pipe).
    Local(io::Error),
}

impl DirError {
    /// With the side it came from, for a direction client -> backend or the other.
    pub fn sided(self, client_to_backend: bool) -> SideError {
        let (src, dst) = if client_to_backend {
            (Side::Client, Side::Backend)
        } else {
            (Side::Backend, Side::Client)
        };
        match self {
            Self::Src(source) => SideError { side: src, source },
            Self::Dst(source) => SideError { side: dst, source },
            Self::Local(source) => SideError {
                side: Side::Agent,
                source,
            },
        }
    }
}

const PATH_NONE: u8 = 0;
const PATH_SPLICE: u8 = 1;
const PATH_SOCKMAP: u8 = 2;

/// The backend a connection was sent to (or last tried).
#[derive(Clone, Debug)]
pub struct BackendPick {
    pub addr: SocketAddr,
    pub backend_ref: String,
    /// The `EndpointSlice` the endpoint came from (`namespace/name`), if any.
    pub endpoint_slice: Option<String>,
}

/// One connection's state, shared by its task and the live table.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub listener: ListenerRef,
    pub client: SocketAddr,
    pub started: SystemTime,
    started_at: Instant,
    backend: Mutex<Option<BackendPick>>,
    path: AtomicU8,
    /// Bytes client -> backend counted so far (the agent's, plus the verdict's once
    /// the pair left the maps).
    pub c2b: AtomicU64,
    /// Bytes backend -> client, likewise.
    pub b2c: AtomicU64,
    /// The socket cookies while the pair is in the sockmap: (client, backend).
    cookies: Mutex<Option<(u64, u64)>>,
    /// Data segments (client -> backend, backend -> client), read from both sockets
    /// when the connection ends ([`SegmentsAtEnd`]).
    segments: Mutex<Option<(u64, u64)>>,
    /// Whether [`SegmentsAtEnd`] reads them (only the access log record uses them).
    segments_wanted: AtomicBool,
}

impl Conn {
    fn new(id: u64, listener: ListenerRef, client: SocketAddr) -> Self {
        Self {
            id,
            listener,
            client,
            started: SystemTime::now(),
            started_at: Instant::now(),
            backend: Mutex::new(None),
            path: AtomicU8::new(PATH_NONE),
            c2b: AtomicU64::new(0),
            b2c: AtomicU64::new(0),
            cookies: Mutex::new(None),
            segments: Mutex::new(None),
            segments_wanted: AtomicBool::new(false),
        }
    }

    /// The backend picked (or tried).
    pub fn set_backend(&self, pick: BackendPick) {
        *self.backend.lock().unwrap_or_else(PoisonError::into_inner) = Some(pick);
    }

    /// The backend picked (or tried last).
    pub fn backend(&self) -> Option<BackendPick> {
        self.backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The path carrying it.
    pub fn set_path(&self, path: PathName) {
        let v = match path {
            PathName::Splice => PATH_SPLICE,
            PathName::Sockmap => PATH_SOCKMAP,
            PathName::Forward | PathName::None => PATH_NONE,
        };
        self.path.store(v, Ordering::Relaxed);
    }

    /// The path carrying it.
    pub fn path(&self) -> PathName {
        match self.path.load(Ordering::Relaxed) {
            PATH_SPLICE => PathName::Splice,
            PATH_SOCKMAP => PathName::Sockmap,
            _ => PathName::None,
        }
    }

    /// Bytes the agent moved.
    pub fn moved(&self, client_to_backend: bool, n: u64) {
        if client_to_backend {
            self.c2b.fetch_add(n, Ordering::Relaxed);
        } else {
            self.b2c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The pair is in the sockmap under these cookies (`None`: it left).
    pub fn set_cookies(&self, cookies: Option<(u64, u64)>) {
        *self.cookies.lock().unwrap_or_else(PoisonError::into_inner) = cookies;
    }

    /// The cookies while the pair is in the sockmap.
    pub fn cookies(&self) -> Option<(u64, u64)> {
        *self.cookies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the data segments at the end ([`SegmentsAtEnd`]): set when its record is
    /// written to an access log, the only user of the segments.
    pub fn want_segments(&self) {
        self.segments_wanted.store(true, Ordering::Relaxed);
    }

    /// The data segments each way (client -> backend, backend -> client).
    pub fn set_segments(&self, segments: (u64, u64)) {
        *self.segments.lock().unwrap_or_else(PoisonError::into_inner) = Some(segments);
    }

    /// The data segments each way, once read.
    pub fn segments(&self) -> Option<(u64, u64)> {
        *self.segments.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Seconds since accept.
    pub fn age(&self) -> f64 {
        self.started_at.elapsed().as_secs_f64()
    }

    /// The access log record of its end.
    pub fn record(&self, end: EndReason, detail: Option<String>) -> Record {
        let backend = self.backend();
        let segments = self.segments();
        Record {
            time: rfc3339(SystemTime::now()),
            start_time: rfc3339(self.started),
            duration_seconds: self.age(),
            listener: self.listener.clone(),
            client: self.client,
            backend: backend.as_ref().map(|b| b.addr),
            endpoint_slice: backend.as_ref().and_then(|b| b.endpoint_slice.clone()),
            backend_ref: backend.map(|b| b.backend_ref),
            datapath: self.path(),
            bytes_client_to_backend: self.c2b.load(Ordering::Relaxed),
            bytes_backend_to_client: self.b2c.load(Ordering::Relaxed),
            segments_client_to_backend: segments.map(|s| s.0),
            segments_backend_to_client: segments.map(|s| s.1),
            end,
            detail,
        }
    }
}

/// Reads the data segments of both sockets into the connection when dropped: at the
/// end of a socket path's run, or when its task is dropped (drain), always before
/// the sockets close. Declare it after the sockets so that it is dropped first. Only
/// a connection that wants them ([`Conn::want_segments`]) pays for the two `TCP_INFO`
/// reads.
pub struct SegmentsAtEnd<'a> {
    pub client: &'a TcpStream,
    pub backend: &'a TcpStream,
    pub conn: &'a Conn,
}

impl Drop for SegmentsAtEnd<'_> {
    fn drop(&mut self) {
        if !self.conn.segments_wanted.load(Ordering::Relaxed) {
            return;
        }
        // Each direction as its sender's segments arrived at the node: what the
        // client's socket received, what the backend's socket received.
        if let (Ok((c2b, _)), Ok((b2c, _))) = (
            sock::data_segments(self.client),
            sock::data_segments(self.backend),
        ) {
            self.conn.set_segments((c2b, b2c));
        }
    }
}

/// The live connections of the socket paths.
#[derive(Debug, Default)]
pub struct Table {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Table {
    /// A new connection, in the table until [`Table::remove`]. An IPv4 client of a
    /// dual-stack listener is kept as IPv4 (not `::ffff:a.b.c.d`).
    pub fn open(&self, listener: ListenerRef, client: SocketAddr) -> Arc<Conn> {
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Conn::new(id, listener, client));
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, c.clone());
        c
    }

    /// The connection ended.
    pub fn remove(&self, c: &Conn) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&c.id);
    }

    /// The live connections, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Conn>> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// The socket paths' live connections, with the bytes the verdict redirected so far
/// read from `GW_PEERS`.
pub struct Live {
    pub table: Arc<Table>,
    pub dp: Arc<Datapath>,
}

impl LiveSource for Live {
    fn live(&self) -> Vec<LiveConnection> {
        self.table
            .snapshot()
            .iter()
            .map(|c| {
                let (kc2b, kb2c) = c.cookies().map_or((0, 0), |(cc, bc)| {
                    (
                        self.dp.bytes_redirected(cc).unwrap_or(0),
                        self.dp.bytes_redirected(bc).unwrap_or(0),
                    )
                });
                let backend = c.backend();
                let path = c.path();
                LiveConnection {
                    listener: c.listener.clone(),
                    client: c.client,
                    backend: backend.as_ref().map(|b| b.addr),
                    endpoint_slice: backend.as_ref().and_then(|b| b.endpoint_slice.clone()),
                    backend_ref: backend.map(|b| b.backend_ref),
                    datapath: path,
                    age_seconds: c.age(),
                    bytes_client_to_backend: c.c2b.load(Ordering::Relaxed) + kc2b,
                    bytes_backend_to_client: c.b2c.load(Ordering::Relaxed) + kb2c,
                    state: if path == PathName::None {
                        "connecting"
                    } else {
                        "established"
                    }
                    .to_owned(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_side_that_reset() {
        let e = |side, kind| SideError {
            side,
            source: io::Error::from(kind),
        };
        assert_eq!(
            e(Side::Client, io::ErrorKind::ConnectionReset).end_reason(),
            EndReason::ClientReset
        );
        assert_eq!(
            e(Side::Backend, io::ErrorKind::BrokenPipe).end_reason(),
            EndReason::BackendReset
        );
        assert_eq!(
            e(Side::Backend, io::ErrorKind::TimedOut).end_reason(),
            EndReason::Error
        );
        assert_eq!(
            e(Side::Agent, io::ErrorKind::ConnectionReset).end_reason(),
            EndReason::Error
        );
    }

    #[test]
    fn table_holds_live_connections() {
        let table = Table::default();
        let listener = ListenerRef::from_origin("--route 1", 1, None);
        let first = table.open(listener.clone(), "10.0.0.1:1".parse().expect("addr"));
        let second = table.open(listener, "[::ffff:10.0.0.1]:2".parse().expect("addr"));
        assert_eq!(second.client, "10.0.0.1:2".parse().expect("addr"));
        first.moved(true, 5);
        second.moved(false, 7);
        assert_eq!(table.snapshot().len(), 2);
        table.remove(&first);
        let live = table.snapshot();
        assert_eq!(live.len(), 1);
        let r = live[0].record(EndReason::Fin, None);
        assert_eq!(
            (r.bytes_client_to_backend, r.bytes_backend_to_client),
            (0, 7)
        );
        assert_eq!(r.datapath, PathName::None);
    }

    #[tokio::test]
    async fn segments_are_read_at_the_end_only_when_wanted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, (backend, _)) = (client.expect("connect"), accepted.expect("accept"));
        let table = Table::default();
        let listener_ref = ListenerRef::from_origin("--route 1", 1, None);
        let unwanted = table.open(listener_ref.clone(), addr);
        drop(SegmentsAtEnd {
            client: &client,
            backend: &backend,
            conn: &unwanted,
        });
        assert_eq!(unwanted.segments(), None, "no TCP_INFO read");
        assert_eq!(
            unwanted
                .record(EndReason::Fin, None)
                .segments_client_to_backend,
            None
        );
        let wanted = table.open(listener_ref, addr);
        wanted.want_segments();
        drop(SegmentsAtEnd {
            client: &client,
            backend: &backend,
            conn: &wanted,
        });
        assert_eq!(wanted.segments(), Some((0, 0)), "read, no payload yet");
        let r = wanted.record(EndReason::Fin, None);
        assert_eq!(
            (r.segments_client_to_backend, r.segments_backend_to_client),
            (Some(0), Some(0))
        );
    }
}
