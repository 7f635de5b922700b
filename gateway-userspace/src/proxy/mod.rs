//! The data path: one TCP listener per port of the desired state, a backend picked
//! by weight for each client connection, and the two sockets spliced in the kernel
//! (sockmap) or in the agent (`splice(2)`).
//!
//! The desired state arrives through a `tokio::sync::watch` channel. A connection reads
//! it once, when it is accepted: established connections keep their backend whatever
//! changes later. A port that leaves the desired state stops accepting at once; its
//! established connections may finish for up to the drain timeout, then are reset.
pub mod accept;
pub mod conn;
pub mod kernel;
pub mod local;
pub mod pool;
pub mod select;
pub mod sock;
pub mod splice;
pub mod stats;

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::{
    conn::{BackendPick, Conn},
    select::Swrr,
    stats::{Counters, Path, Registry, RejectReason},
};
use crate::{
    access_log::{EndReason, ListenerRef, PathName},
    desired::{DesiredState, Listener},
    ebpf::Datapath,
    metrics::Metrics,
};

/// Which data path carries connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// The forward path for connections arriving on the interfaces it is attached to
    /// (`--forward-iface`); for the connections that reach a listener socket, the socket
    /// path measured faster for the workloads `cargo xtask bench` covers: today that is
    /// splice (bulk throughput, CPU per GB and new connections per second all favour
    /// it, request/response latency is even; see `docs/performance.md`). The choice is
    /// logged once.
    #[default]
    Auto,
    /// The kernel path only; a connection that cannot be paired still falls back to
    /// splice (data is never refused), with a warning.
    Sockmap,
    /// The userspace `splice(2)` path only.
    Splice,
    /// The forward path (`--forward-iface`): connections arriving on those interfaces
    /// are translated and redirected in the kernel, never terminated on the node; the
    /// ones that still reach a listener socket (node-local clients, a full table) take
    /// splice.
    Forward,
}

/// Tunables of the data path.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub mode: DatapathMode,
    /// Time allowed for one backend connect.
    pub connect_timeout: Duration,
    /// Backends tried per client connection before it is reset.
    pub connect_attempts: usize,
    /// Time established connections of a removed listener may still run.
    pub drain_timeout: Duration,
    /// Time a backend may acknowledge nothing before its connection ends (and the
    /// client is reset): [`sock::set_dead_peer_timeout`]. Zero keeps the kernel's
    /// defaults.
    pub backend_timeout: Duration,
    /// Address listeners bind (port from the desired state); `[::]` takes IPv4 too.
    pub bind: std::net::IpAddr,
    /// Bytes the kernel path may queue towards a socket before the sender is
    /// throttled (`Peer::queue_limit`).
    pub kernel_queue_limit: u32,
    /// A throttle on the kernel path also stops the sender with TCP flow control
    /// (`kernel::Brake`), so that few bytes cross userspace under a slow receiver.
    pub kernel_brake: bool,
    /// Buffer sizes set on both sockets of a connection (client and backend) before
    /// they are paired; `None` leaves the kernel's `tcp_wmem`/`tcp_rmem` defaults.
    pub socket_buffer: Option<sock::BufferSize>,
    /// The node-local shortcut (`--local-shortcut`): a pair whose client is a socket the
    /// `sock_ops` program took gets a `GW_LOCAL_PAIRS` entry ([`local`]).
    pub local_shortcut: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            mode: DatapathMode::Auto,
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 3,
            drain_timeout: Duration::from_secs(30),
            backend_timeout: Duration::from_secs(30),
            bind: Ipv6Addr::UNSPECIFIED.into(),
            kernel_queue_limit: kernel::QUEUE_LIMIT,
            kernel_brake: false,
            socket_buffer: None,
            local_shortcut: false,
        }
    }
}

/// Errors of starting a listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listener port {port}: cannot bind {addr}: {source}")]
    Bind {
        port: u16,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Selection state of a listener, rebuilt when its backend weights change.
#[derive(Default)]
struct Selector {
    swrr: Mutex<Swrr>,
}

impl Selector {
    /// Picks one of `backends` by weight, skipping the indexes in `exclude`; the
    /// selection state is rebuilt only when the weights changed.
    fn pick(&self, backends: &[crate::desired::Backend], exclude: &[usize]) -> Option<usize> {
        let mut s = self
            .swrr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !s
            .weights()
            .iter()
            .copied()
            .eq(backends.iter().map(|b| b.weight))
        {
            *s = Swrr::new(backends.iter().map(|b| b.weight).collect());
        }
        s.pick(exclude)
    }
}

/// What every connection of one listener uses, looked up once per accept loop rather
/// than per connection.
struct PerListener {
    counters: Arc<Counters>,
    selector: Arc<Selector>,
    /// `sockgate_backend_connect_seconds` of this listener.
    connect_seconds: prometheus_client::metrics::histogram::Histogram,
}

struct Running {
    /// The addresses bound (the listener's own; empty: the `--bind` address).
    addrs: Vec<std::net::IpAddr>,
    stop_accepting: CancellationToken,
    drain: CancellationToken,
}

/// The keys seen so far, for logging something once per distinct key.
#[derive(Default)]
struct SeenOnce {
    seen: Mutex<std::collections::BTreeSet<String>>,
}

impl SeenOnce {
    /// Whether `key` is new (it is remembered).
    fn first(&self, key: &str) -> bool {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !seen.contains(key) && seen.insert(key.to_owned())
    }
}

/// Logs a data path choice once per reason.
#[derive(Default)]
struct ChoiceLog {
    seen: SeenOnce,
}

impl ChoiceLog {
    fn once(&self, path: &str, reason: &str) {
        if self.seen.first(&format!("{path}:{reason}")) {
            info!(path, reason, "data path chosen (logged once per reason)");
        }
    }
}

/// Shared by every listener and connection task.
struct Shared {
    dp: Arc<Datapath>,
    cfg: ProxyConfig,
    state: watch::Receiver<Arc<DesiredState>>,
    counters: Arc<Registry>,
    selectors: Mutex<BTreeMap<u16, Arc<Selector>>>,
    choices: ChoiceLog,
    /// Sockmap pairing errors already logged.
    pair_failures: SeenOnce,
    metrics: Arc<Metrics>,
    /// Every connection task, so shutdown can wait for them.
    tracker: tokio_util::task::TaskTracker,
    /// The live connections.
    conns: Arc<conn::Table>,
}

impl Shared {
    fn selector(&self, port: u16) -> Arc<Selector> {
        self.selectors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(port)
            .or_default()
            .clone()
    }
}

/// Serves the desired state until `shutdown` is cancelled; then stops accepting on
/// every listener, lets established connections finish for up to the drain timeout,
/// and returns (connections still open then are closed).
pub async fn serve(
    dp: Arc<Datapath>,
    cfg: ProxyConfig,
    mut state: watch::Receiver<Arc<DesiredState>>,
    counters: Arc<Registry>,
    metrics: Arc<Metrics>,
    conns: Arc<conn::Table>,
    shutdown: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    let shared = Arc::new(Shared {
        dp: dp.clone(),
        cfg: cfg.clone(),
        state: state.clone(),
        counters: counters.clone(),
        selectors: Mutex::default(),
        choices: ChoiceLog::default(),
        pair_failures: SeenOnce::default(),
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        conns,
    });
    let flush_stop = CancellationToken::new();
    let flusher = tokio::spawn(flush_counters(dp, counters, flush_stop.clone()));
    let mut running: BTreeMap<u16, Running> = BTreeMap::new();
    let mut bind_failures = std::collections::BTreeSet::new();
    loop {
        let desired = state.borrow_and_update().clone();
        reconcile_listeners(&shared, &desired, &mut running, &mut bind_failures);
        let all_bound = desired.listeners.keys().all(|p| running.contains_key(p));
        metrics
            .ready
            .store(all_bound, std::sync::atomic::Ordering::Relaxed);
        // A listener that did not bind (its address not yet released by the socket
        // it replaces, most likely) is tried again shortly.
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = state.changed() => if changed.is_err() { shutdown.cancelled().await; break },
            () = tokio::time::sleep(REBIND_PAUSE), if !all_bound => {}
        }
    }
    metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let drains: Vec<CancellationToken> = running.values().map(|r| r.drain.clone()).collect();
    for r in running.values() {
        r.stop_accepting.cancel();
    }
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        info!(
            connections = open,
            drain_secs = cfg.drain_timeout.as_secs_f64(),
            "draining established connections"
        );
    }
    if tokio::time::timeout(cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            connections = tracker.len(),
            "drain timeout: closing the connections still open"
        );
        for d in drains {
            d.cancel();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
    flush_stop.cancel();
    let _ = flusher.await;
}

/// How long a listener that did not bind waits before it is tried again.
const REBIND_PAUSE: Duration = Duration::from_millis(500);

fn stop_listener(port: u16, r: Running, drain: Duration) {
    info!(
        listener = port,
        drain_secs = drain.as_secs_f64(),
        "listener removed: stops accepting, connections drain"
    );
    r.stop_accepting.cancel();
    tokio::spawn(async move {
        tokio::time::sleep(drain).await;
        r.drain.cancel();
    });
}

fn reconcile_listeners(
    shared: &Arc<Shared>,
    desired: &DesiredState,
    running: &mut BTreeMap<u16, Running>,
    bind_failures: &mut std::collections::BTreeSet<u16>,
) {
    bind_failures.retain(|p| desired.listeners.contains_key(p));
    // Gone, or now on other addresses (started again below).
    let gone: Vec<u16> = running
        .iter()
        .filter(|(p, r)| {
            desired
                .listeners
                .get(p)
                .is_none_or(|l| l.addresses != r.addrs)
        })
        .map(|(p, _)| *p)
        .collect();
    for port in gone {
        if let Some(r) = running.remove(&port) {
            stop_listener(port, r, shared.cfg.drain_timeout);
        }
    }
    for (&port, l) in &desired.listeners {
        if running.contains_key(&port) {
            continue;
        }
        let addrs = if l.addresses.is_empty() {
            vec![shared.cfg.bind]
        } else {
            l.addresses.clone()
        };
        let bound: Result<Vec<TcpListener>, ListenError> = addrs
            .iter()
            .map(|&a| bind(a, port, shared.cfg.socket_buffer))
            .collect();
        match bound {
            Ok(sockets) => {
                if l.addresses.is_empty() {
                    info!(listener = port, origin = %l.origin, backends = l.backends.len(), "listening");
                } else {
                    info!(listener = port, origin = %l.origin, backends = l.backends.len(), addresses = ?l.addresses, "listening on the Gateway's addresses");
                }
                let r = Running {
                    addrs: l.addresses.clone(),
                    stop_accepting: CancellationToken::new(),
                    drain: CancellationToken::new(),
                };
                for listener in sockets {
                    tokio::spawn(accept_loop(
                        shared.clone(),
                        port,
                        listener,
                        r.stop_accepting.clone(),
                        r.drain.clone(),
                    ));
                }
                running.insert(port, r);
                if bind_failures.remove(&port) {
                    info!(listener = port, "listener started after all");
                }
            }
            Err(e) => {
                if bind_failures.insert(port) {
                    warn!(listener = port, error = %e, "listener not started (tried again shortly; said once)");
                } else {
                    debug!(listener = port, error = %e, "listener still not started");
                }
            }
        }
    }
}

/// Binds `addr:port`; on `[::]` also takes IPv4 (dual stack), falling back to
/// `0.0.0.0` where IPv6 is disabled. `buffers`, when given, sizes the listener's
/// buffers, which its accepted sockets inherit.
pub fn bind(
    addr: std::net::IpAddr,
    port: u16,
    buffers: Option<sock::BufferSize>,
) -> Result<TcpListener, ListenError> {
    let sa = SocketAddr::new(addr, port);
    let make = |sa: SocketAddr| -> io::Result<TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(sa),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if sa.is_ipv6() {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        // Accepted sockets inherit it (the child is a copy of the listener,
        // `sk_clone_lock()`): no setsockopt per connection.
        s.set_tcp_nodelay(true)?;
        // Likewise the buffer sizes and their locks (`sk_sndbuf`, `sk_rcvbuf`,
        // `sk_userlocks`); the SYN-ACK's window already follows them.
        if let Some(size) = buffers {
            sock::set_buffers(&s, size)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&sa.into())?;
        s.listen(4096)?;
        TcpListener::from_std(s.into())
    };
    match make(sa) {
        Ok(l) => Ok(l),
        Err(e)
            if addr == std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
            make(v4).map_err(|source| ListenError::Bind {
                port,
                addr: v4,
                source,
            })
        }
        Err(source) => Err(ListenError::Bind {
            port,
            addr: sa,
            source,
        }),
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    port: u16,
    listener: TcpListener,
    stop: CancellationToken,
    drain: CancellationToken,
) {
    let counters = shared.counters.get(port);
    let per_listener = Arc::new(PerListener {
        counters: counters.clone(),
        selector: shared.selector(port),
        connect_seconds: shared
            .metrics
            .connect_seconds
            .get_or_create(&Metrics::listener(port))
            .clone(),
    });
    let mut backoff = accept::Backoff::default();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, peer)) => {
                if let Some(failures) = backoff.succeeded() {
                    info!(listener = port, failures, "accepting again");
                }
                counters.accepted();
                let task_shared = shared.clone();
                let per_listener = per_listener.clone();
                let drain = drain.clone();
                shared.tracker.spawn(async move {
                    let shared = task_shared;
                    let desired = shared.state.borrow().clone();
                    let listener = desired.listeners.get(&port);
                    let conn = shared.conns.open(ListenerRef::of(&desired, port), peer);
                    if shared.metrics.access.writes_records() {
                        conn.want_segments();
                    }
                    let (end, detail) = tokio::select! {
                        r = handle(&shared, listener, client, &per_listener, &conn) => r,
                        () = drain.cancelled() => {
                            debug!(listener = port, %peer, "drain timeout: connection closed");
                            (EndReason::Drained, None)
                        }
                    };
                    shared.conns.remove(&conn);
                    shared.metrics.access.end(conn.record(end, detail));
                });
            }
            Err(e) => {
                let reason = accept::AcceptErrorReason::of(&e);
                shared.metrics.accept_error(reason.label());
                let after = backoff.failed(reason);
                if after.first && reason == accept::AcceptErrorReason::Descriptors {
                    warn!(
                        listener = port,
                        error = %e,
                        open_file_limit = accept::open_file_limit(),
                        max_pause_ms = accept::MAX_PAUSE.as_millis(),
                        "accept failed: descriptor limit reached; connections wait in the listen queue, accept retried with a growing pause (logged once until it works again)"
                    );
                } else if after.first {
                    warn!(
                        listener = port,
                        error = %e,
                        max_pause_ms = accept::MAX_PAUSE.as_millis(),
                        "accept failed; retried with a growing pause (logged once until it works again)"
                    );
                } else {
                    debug!(listener = port, error = %e, pause_ms = after.pause.as_millis(), "accept failed");
                }
                if !after.pause.is_zero() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(after.pause) => {}
                    }
                }
            }
        }
    }
}

/// Resets `client` (RST, not FIN) and counts why.
fn reject(client: &TcpStream, counters: &Counters, reason: RejectReason, port: u16) {
    debug!(listener = port, ?reason, "client connection reset");
    counters.rejected(reason);
    sock::arm_reset(&client.as_fd());
}

/// Picks and connects a backend, retrying others on failure. The error comes with
/// what the last attempt saw.
async fn connect_backend(
    shared: &Shared,
    port: u16,
    listener: &Listener,
    per_listener: &PerListener,
    conn: &Conn,
) -> Result<TcpStream, (RejectReason, String)> {
    let counters = &per_listener.counters;
    let mut failed = Vec::new();
    let mut last = (
        RejectReason::NoBackend,
        "no backend with a weight above 0".to_owned(),
    );
    for _ in 0..shared.cfg.connect_attempts.max(1) {
        let Some(i) = per_listener.selector.pick(&listener.backends, &failed) else {
            return Err(last);
        };
        let backend = &listener.backends[i];
        let Some(addr) = backend.addr else {
            return Err((
                RejectReason::InvalidBackend,
                format!("invalid backendRef {}", backend.backend_ref),
            ));
        };
        conn.set_backend(BackendPick {
            addr,
            backend_ref: backend.backend_ref.clone(),
            endpoint_slice: backend.endpoint_slice.clone(),
        });
        let started = std::time::Instant::now();
        let connect = async {
            let s = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }?;
            let _ = s.set_nodelay(true);
            if let Some(size) = shared.cfg.socket_buffer
                && let Err(e) = sock::set_buffers(&s, size)
            {
                debug!(listener = port, backend = %addr, error = %e, "socket buffer size not set");
            }
            s.connect(addr).await
        };
        match tokio::time::timeout(shared.cfg.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                per_listener
                    .connect_seconds
                    .observe(started.elapsed().as_secs_f64());
                if let Err(e) = sock::set_dead_peer_timeout(&s, shared.cfg.backend_timeout) {
                    debug!(listener = port, backend = %addr, error = %e, "backend timeout not set");
                }
                return Ok(s);
            }
            Ok(Err(e)) => {
                debug!(listener = port, backend = %addr, error = %e, "backend connect failed");
                last = (RejectReason::ConnectFailed, format!("connect {addr}: {e}"));
            }
            Err(_) => {
                debug!(listener = port, backend = %addr, "backend connect timed out");
                last = (
                    RejectReason::ConnectFailed,
                    format!(
                        "connect {addr}: timed out after {:?}",
                        shared.cfg.connect_timeout
                    ),
                );
            }
        }
        counters.connect_failure();
        failed.push(i);
    }
    Err(last)
}

/// Carries one accepted connection to its end; says how it ended (with the error
/// behind it, if any).
async fn handle(
    shared: &Shared,
    listener: Option<&Listener>,
    client: TcpStream,
    per_listener: &PerListener,
    conn: &Arc<Conn>,
) -> (EndReason, Option<String>) {
    let counters = &per_listener.counters;
    let port = conn.listener.port;
    let peer = conn.client;
    let Some(listener) = listener else {
        reject(&client, counters, RejectReason::NoBackend, port);
        return (EndReason::Refused, Some("no listener".into()));
    };
    let backend = match connect_backend(shared, port, listener, per_listener, conn).await {
        Ok(b) => b,
        Err((reason, detail)) => {
            reject(&client, counters, reason, port);
            let end = if reason == RejectReason::ConnectFailed {
                EndReason::ConnectFailed
            } else {
                EndReason::Refused
            };
            return (end, Some(detail));
        }
    };
    let splice_reason = match shared.cfg.mode {
        DatapathMode::Sockmap => None,
        DatapathMode::Auto => Some(
            "--datapath auto: splice measured faster than the kernel path (docs/performance.md)",
        ),
        DatapathMode::Splice => Some("--datapath splice"),
        DatapathMode::Forward => Some(
            "--datapath forward: a connection that reached the listener socket (a node-local client, or not forwarded) takes splice",
        ),
    };
    let kernel = match splice_reason {
        Some(reason) => {
            shared.choices.once("userspace", reason);
            None
        }
        None => match kernel::insert(
            &shared.dp,
            &client,
            &backend,
            port,
            (shared.cfg.kernel_queue_limit, shared.cfg.kernel_brake),
            conn,
        ) {
            Ok(paired) => Some(paired),
            Err(e) => {
                let error = e.to_string();
                shared.metrics.sockmap_pair_failure(e.reason());
                if shared.pair_failures.first(&error) {
                    warn!(
                        listener = port,
                        error,
                        reason = e.reason(),
                        "sockmap pairing failed; the connection uses splice (logged once per distinct error; counted in sockgate_sockmap_pair_failures_total)"
                    );
                } else {
                    debug!(
                        listener = port,
                        error, "sockmap pairing failed; the connection uses splice"
                    );
                }
                None
            }
        },
    };
    // Counted closed when dropped: at the end, or when the drain timeout cancels this.
    let (_open, result) = if let Some((pair, bases)) = kernel {
        shared.choices.once("kernel", "pair in sockmap");
        // Dropped after the pair's run, which removed the pair from the maps.
        let _local = if shared.cfg.local_shortcut {
            local::enable(&shared.dp, (&client, &backend), pair.cookies(), bases[1])
        } else {
            None
        };
        let open = counters.open(Path::Kernel);
        conn.set_path(PathName::Sockmap);
        (
            open,
            kernel::run(pair, bases, client, backend, counters.clone()).await,
        )
    } else {
        let open = counters.open(Path::Userspace);
        conn.set_path(PathName::Splice);
        (
            open,
            splice::run(client, backend, counters.clone(), conn).await,
        )
    };
    match result {
        Ok(()) => (EndReason::Fin, None),
        Err(e) => {
            debug!(listener = port, %peer, error = %e, "connection ended with an error; both sides reset");
            (e.end_reason(), Some(e.to_string()))
        }
    }
}

async fn flush_counters(dp: Arc<Datapath>, counters: Arc<Registry>, shutdown: CancellationToken) {
    loop {
        for (port, snapshot) in counters.changed() {
            if let Err(e) = dp.write_agent_stats(port, snapshot) {
                warn!(listener = port, error = %e, "writing counters");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => continue,
        }
        for (port, snapshot) in counters.changed() {
            let _ = dp.write_agent_stats(port, snapshot);
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = bind(std::net::Ipv4Addr::LOCALHOST.into(), 0, None).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_buffer_sizes() {
        let size = sock::BufferSize {
            bytes: 1 << 20,
            autotune: false,
        };
        let listener = bind(std::net::Ipv4Addr::LOCALHOST.into(), 0, Some(size)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let s = socket2::SockRef::from(&accepted);
        // Root (CAP_NET_ADMIN, as the tests run) gets the size asked for.
        assert_eq!(s.send_buffer_size().expect("SO_SNDBUF"), 1 << 20);
        assert_eq!(s.recv_buffer_size().expect("SO_RCVBUF"), 1 << 20);
        let unsized_listener = bind(std::net::Ipv4Addr::LOCALHOST.into(), 0, None).expect("bind");
        let _client = TcpStream::connect(unsized_listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = unsized_listener.accept().await.expect("accept");
        assert_ne!(
            socket2::SockRef::from(&accepted)
                .send_buffer_size()
                .expect("SO_SNDBUF"),
            1 << 20,
            "without a size, the kernel's default"
        );
    }
}
