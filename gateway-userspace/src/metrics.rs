//! Prometheus metrics and the health endpoints, served over HTTP.
//!
//! `/metrics` (text exposition format, `prometheus-client`), `/healthz` (the programs
//! are loaded: the process is alive and useful) and `/readyz` (the desired state is
//! programmed in the maps and every listener is bound). Per-listener connection and
//! byte counters are read from `GW_STATS` at scrape time, so they agree with
//! `sockgate status` and `bpftool`; the agent's own histograms and counters live here.
//! The same endpoint serves `/connections`, the socket paths' live connections.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use gateway_common::{FwdStats, ListenerStats};

use crate::{
    access_log::LiveSource,
    backend_filter::{RefusalReason, RefusedBackend},
    desired::{UnreadyBackendRef, UnreadyShare},
    ebpf::Datapath,
    model::limits::{LeftOut, Limit},
};

/// Labels of a per-listener metric.
pub type ListenerLabels = Vec<(&'static str, String)>;

/// Labels of a metric counted by reason.
pub type ReasonLabels = Vec<(&'static str, &'static str)>;

/// Reasons of `sockgate_accept_errors_total`, present from the start (0).
const ACCEPT_ERROR_REASONS: [&str; 4] = ["descriptors", "memory", "connection", "other"];
/// Reasons of `sockgate_sockmap_pair_failures_total`, present from the start (0).
pub const PAIR_FAILURE_REASONS: [&str; 2] = ["map_full", "other"];

/// The agent's metrics and health flags.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Backend connect latency (successful connects), per listener.
    pub connect_seconds: Family<ListenerLabels, Histogram>,
    /// Desired states computed and programmed.
    pub reconciles: Counter,
    /// Reconciles that failed (bad input kept the last good state, or a map write failed).
    pub reconcile_errors: Counter,
    /// Time to compute and program one desired state.
    pub reconcile_seconds: Histogram,
    /// Status writes sent to the API server.
    pub status_writes: Counter,
    /// Endpoints refused in the current desired state, by reason.
    pub backends_refused: BackendsRefused,
    /// What the data path's capacities left out of the current desired state.
    pub not_programmed: NotProgrammed,
    /// Map writes that failed and were skipped, by map.
    pub map_write_failures: Family<Vec<(&'static str, String)>, Counter>,
    /// backendRefs without ready endpoint in the current desired state, by what became
    /// of their share.
    pub backend_refs_unready: BackendRefsUnready,
    /// Failed `accept(2)` calls of the listeners, by reason
    /// (`proxy::accept::AcceptErrorReason`).
    pub accept_errors: Family<ReasonLabels, Counter>,
    /// Connections that could not be paired in the sockmap and took splice, by reason
    /// (`map_full`: `GW_SOCKS` or `GW_PEERS` is full; `other`).
    pub sockmap_pair_failures: Family<ReasonLabels, Counter>,
    /// Per-connection records: the access log and the metrics drawn from it.
    pub access: Arc<crate::access_log::Sink>,
    /// The programs are loaded and attached.
    pub healthy: AtomicBool,
    /// The desired state is programmed and the listeners are bound.
    pub ready: AtomicBool,
    /// The source has delivered its first desired state (the kube source clears it
    /// until its initial lists are done; the file and `--route` sources start with it).
    pub source_ready: Arc<AtomicBool>,
}

/// `sockgate_backends_refused`: backend endpoints left out of the current desired state
/// because their address is refused (loopback, link-local, ...), by reason; every reason
/// is always present, 0 when nothing is refused for it.
#[derive(Clone, Debug, Default)]
pub struct BackendsRefused {
    gauge: Family<Vec<(&'static str, String)>, Gauge>,
}

impl BackendsRefused {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "sockgate_backends_refused",
            "Backend endpoints not programmed because their address is refused (see --allow-backend-cidr), by reason",
            self.gauge.clone(),
        );
        self.set(&[]);
    }

    /// Sets the gauge from the refusals of the desired state being programmed.
    pub fn set(&self, refused: &[RefusedBackend]) {
        for reason in RefusalReason::ALL {
            let n = refused.iter().filter(|r| r.reason == reason).count();
            self.gauge
                .get_or_create(&vec![("reason", reason.as_str().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// `sockgate_listeners_not_programmed{limit}` (listeners left out because
/// `GW_LISTENERS` or `GW_BACKENDS` has no room, or because their port is outside
/// `--listener-ports`) and
/// `sockgate_endpoints_not_programmed` (endpoints beyond a listener's limit), for the
/// current desired state; always present, 0 when everything fits.
#[derive(Clone, Debug, Default)]
pub struct NotProgrammed {
    listeners: Family<Vec<(&'static str, String)>, Gauge>,
    endpoints: Gauge,
}

impl NotProgrammed {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "sockgate_listeners_not_programmed",
            "Listeners not programmed because the node's listener or backend table is full (see --max-listeners, --max-backends) or their port is not allowed (--listener-ports), by limit",
            self.listeners.clone(),
        );
        registry.register(
            "sockgate_endpoints_not_programmed",
            "Ready endpoints left out because a listener holds at most --max-backends-per-listener entries",
            self.endpoints.clone(),
        );
        self.set(&[]);
    }

    /// Sets the gauges from what the desired state being programmed left out.
    pub fn set(&self, left_out: &[LeftOut]) {
        for limit in [Limit::Listeners, Limit::Backends, Limit::ListenerPorts] {
            let n = left_out.iter().filter(|l| l.limit == limit).count();
            self.listeners
                .get_or_create(&vec![("limit", limit.as_str().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let endpoints: u64 = left_out
            .iter()
            .filter(|l| l.limit == Limit::BackendsPerListener)
            .map(|l| u64::from(l.count))
            .sum();
        self.endpoints
            .set(i64::try_from(endpoints).unwrap_or(i64::MAX));
    }
}

/// `sockgate_backendrefs_without_ready_endpoints`: backendRefs (weight > 0) of the
/// current desired state that resolve but have no ready endpoint, by `share`: `moved`
/// (their share went to the backendRefs of the rule with ready endpoints) or `refused`
/// (no backendRef of the rule has one: connections are refused). Both are always
/// present, 0 when there is none.
#[derive(Clone, Debug, Default)]
pub struct BackendRefsUnready {
    gauge: Family<Vec<(&'static str, String)>, Gauge>,
}

impl BackendRefsUnready {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "sockgate_backendrefs_without_ready_endpoints",
            "backendRefs that resolve but have no ready endpoint, by what became of their share (moved to the backendRefs with ready endpoints, or refused when none has one)",
            self.gauge.clone(),
        );
        self.set(&[]);
    }

    /// Sets the gauge from the desired state being programmed.
    pub fn set(&self, unready: &[UnreadyBackendRef]) {
        for share in UnreadyShare::ALL {
            let n = unready.iter().filter(|u| u.share == share).count();
            self.gauge
                .get_or_create(&vec![("share", share.as_str().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

#[derive(Debug)]
struct MapCollector {
    dp: Arc<Datapath>,
}

fn labels(port: u16) -> ListenerLabels {
    vec![("listener", port.to_string())]
}

/// Encodes one metric family from `(labels, value)` rows.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (ListenerLabels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut rows = rows.into_iter().peekable();
    let Some((_, first)) = rows.peek() else {
        return Ok(());
    };
    let mut e = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, metric) in rows {
        metric.encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

fn with(port: u16, more: &[(&'static str, &str)]) -> ListenerLabels {
    let mut l = labels(port);
    l.extend(more.iter().map(|&(k, v)| (k, v.to_owned())));
    l
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl MapCollector {
    /// The forward path's counters and live connections; returns the connection table's
    /// entry count.
    fn encode_forward(
        &self,
        e: &mut DescriptorEncoder,
        ports: &[u16],
    ) -> Result<usize, std::fmt::Error> {
        let flows = self.dp.flows();
        let mut active: std::collections::BTreeMap<u16, u64> = std::collections::BTreeMap::new();
        for (_, f) in &flows {
            if u32::from(f.direction) == gateway_common::DIR_CLIENT_TO_BACKEND {
                *active.entry(f.listener_port).or_default() += 1;
            }
        }
        let fwd: Vec<_> = ports
            .iter()
            .map(|&p| {
                (
                    p,
                    self.dp.fwd_stats(p),
                    active.get(&p).copied().unwrap_or(0),
                )
            })
            .collect();
        forward_families(e, &fwd)?;
        Ok(flows.len())
    }

    /// The XDP listener guard's counters, read from `GW_XDP_STATS`.
    fn encode_xdp(&self, e: &mut DescriptorEncoder, ports: &[u16]) -> Result<(), std::fmt::Error> {
        let xdp: Vec<_> = ports.iter().map(|&p| (p, self.dp.xdp_stats(p))).collect();
        family(
            e,
            "sockgate_xdp_packets",
            "TCP packets to the listener port seen by the XDP listener guard",
            xdp.iter()
                .map(|(p, s)| (labels(*p), ConstCounter::new(s.packets))),
        )?;
        family(
            e,
            "sockgate_xdp_syn_admitted",
            "SYNs the XDP listener guard passed to the stack",
            xdp.iter()
                .map(|(p, s)| (labels(*p), ConstCounter::new(s.syn_admitted))),
        )?;
        family(
            e,
            "sockgate_xdp_dropped",
            "SYNs the XDP listener guard dropped, by reason",
            xdp.iter().flat_map(|(p, s)| {
                [
                    ("denied", s.dropped_denied),
                    ("not_allowed", s.dropped_not_allowed),
                    ("rate_limited", s.dropped_rate_limited),
                ]
                .map(|(reason, v)| (with(*p, &[("reason", reason)]), ConstCounter::new(v)))
            }),
        )?;
        family(
            e,
            "sockgate_xdp_rate_contended",
            "SYNs of sockgate_xdp_dropped{reason=\"rate_limited\"} dropped because other CPUs kept changing the token bucket",
            xdp.iter()
                .map(|(p, s)| (labels(*p), ConstCounter::new(s.rate_contended))),
        )?;
        Ok(())
    }
}

/// The forward path's counters, read from `GW_FWD_STATS`, and its live connections
/// from `GW_FWD_FLOWS`.
fn forward_families(
    e: &mut DescriptorEncoder,
    fwd: &[(u16, FwdStats, u64)],
) -> Result<(), std::fmt::Error> {
    family(
        e,
        "sockgate_forward_connections",
        "Connections the forward program took (translated in the kernel, never terminated on the node)",
        fwd.iter()
            .map(|(p, s, _)| (labels(*p), ConstCounter::new(s.connections))),
    )?;
    family(
        e,
        "sockgate_forward_connections_active",
        "Forwarded connections in the connection table now",
        fwd.iter().map(|(p, _, a)| (labels(*p), gauge(*a))),
    )?;
    family(
        e,
        "sockgate_forward_rejected",
        "Client SYNs the forward program answered with a RST, by reason",
        fwd.iter().flat_map(|(p, s, _)| {
            [
                ("no_backend", s.rejected_no_backend),
                ("invalid_backend", s.rejected_invalid_backend),
                ("connect_failed", s.rejected_connect_failed),
            ]
            .map(|(reason, v)| (with(*p, &[("reason", reason)]), ConstCounter::new(v)))
        }),
    )?;
    family(
        e,
        "sockgate_forward_connect_failures",
        "Backend attempts of the forward program that failed (reset or unanswered SYN)",
        fwd.iter()
            .map(|(p, s, _)| (labels(*p), ConstCounter::new(s.connect_failures))),
    )?;
    family(
        e,
        "sockgate_forward_passed",
        "SYNs the forward program left to the socket paths, by reason",
        fwd.iter().flat_map(|(p, s, _)| {
            [
                ("nat_ports_exhausted", s.nat_exhausted),
                ("table_full", s.table_full),
                ("no_route", s.no_route),
                ("not_attached", s.not_attached),
            ]
            .map(|(reason, v)| (with(*p, &[("reason", reason)]), ConstCounter::new(v)))
        }),
    )?;
    family(
        e,
        "sockgate_forward_bytes",
        "Payload bytes the forward program forwarded, by direction",
        fwd.iter().flat_map(|(p, s, _)| {
            [
                ("client_to_backend", s.bytes_c2b),
                ("backend_to_client", s.bytes_b2c),
            ]
            .map(|(dir, v)| (with(*p, &[("direction", dir)]), ConstCounter::new(v)))
        }),
    )?;
    family(
        e,
        "sockgate_forward_log_events_lost",
        "Connection ends the forward program could not put in GW_FWD_EVENTS (full): the sweeper logs those connections when it removes them",
        fwd.iter()
            .map(|(p, s, _)| (labels(*p), ConstCounter::new(s.events_lost))),
    )
}

/// The kernel path's own events: throttles and repeated bytes cut off.
fn kernel_path_families(
    e: &mut DescriptorEncoder,
    stats: &[(u16, ListenerStats)],
) -> Result<(), std::fmt::Error> {
    family(
        e,
        "sockgate_kernel_throttles",
        "Times the verdict program throttled a kernel-path socket whose peer's queue was full",
        stats
            .iter()
            .map(|(p, s)| (labels(*p), ConstCounter::new(s.kernel_throttles))),
    )?;
    family(
        e,
        "sockgate_duplicate_bytes_dropped",
        "Bytes the verdict program cut off retransmitted segments because they repeated bytes already handed on",
        stats
            .iter()
            .map(|(p, s)| (labels(*p), ConstCounter::new(s.duplicate_bytes_dropped))),
    )?;
    Ok(())
}

impl Collector for MapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ports: Vec<u16> = self.dp.listener_keys().iter().map(|k| k.port).collect();
        let stats: Vec<_> = ports
            .iter()
            .map(|&p| (p, self.dp.listener_stats(p)))
            .collect();
        let e = &mut encoder;
        family(
            e,
            "sockgate_connections_accepted",
            "Client connections accepted",
            stats
                .iter()
                .map(|(p, s)| (labels(*p), ConstCounter::new(s.accepted))),
        )?;
        family(
            e,
            "sockgate_connections_rejected",
            "Client connections reset instead of proxied, by reason",
            stats.iter().flat_map(|(p, s)| {
                [
                    ("no_backend", s.rejected_no_backend),
                    ("invalid_backend", s.rejected_invalid_backend),
                    ("connect_failed", s.rejected_connect_failed),
                ]
                .map(|(reason, v)| (with(*p, &[("reason", reason)]), ConstCounter::new(v)))
            }),
        )?;
        family(
            e,
            "sockgate_connections",
            "Connections proxied, by data path",
            stats.iter().flat_map(|(p, s)| {
                [
                    ("kernel", s.kernel_connections),
                    ("userspace", s.userspace_connections),
                ]
                .map(|(path, v)| (with(*p, &[("path", path)]), ConstCounter::new(v)))
            }),
        )?;
        family(
            e,
            "sockgate_backend_connect_failures",
            "Backend connect attempts that failed or timed out",
            stats
                .iter()
                .map(|(p, s)| (labels(*p), ConstCounter::new(s.connect_failures))),
        )?;
        kernel_path_families(e, &stats)?;
        family(
            e,
            "sockgate_connections_active",
            "Connections open now, by data path",
            stats.iter().flat_map(|(p, s)| {
                [
                    ("kernel", s.active_kernel),
                    ("userspace", s.active_userspace),
                ]
                .map(|(path, v)| (with(*p, &[("path", path)]), gauge(v)))
            }),
        )?;
        family(
            e,
            "sockgate_bytes",
            "Bytes moved, by data path and direction",
            stats.iter().flat_map(|(p, s)| {
                [
                    ("kernel", "client_to_backend", s.bytes_c2b_kernel),
                    ("kernel", "backend_to_client", s.bytes_b2c_kernel),
                    ("userspace", "client_to_backend", s.bytes_c2b_userspace),
                    ("userspace", "backend_to_client", s.bytes_b2c_userspace),
                ]
                .map(|(path, dir, v)| {
                    (
                        with(*p, &[("path", path), ("direction", dir)]),
                        ConstCounter::new(v),
                    )
                })
            }),
        )?;
        self.encode_xdp(e, &ports)?;
        let flows = self.encode_forward(e, &ports)?;
        family(
            e,
            "sockgate_map_entries",
            "Entries in each pinned map",
            [
                (gateway_common::GW_LISTENERS, ports.len()),
                (gateway_common::GW_BACKENDS, self.dp.backend_keys().len()),
                (gateway_common::GW_PEERS, self.dp.peer_count()),
                (gateway_common::GW_FWD_FLOWS, flows),
            ]
            .map(|(map, n)| (vec![("map", map.to_owned())], gauge(n as u64))),
        )
    }
}

impl Metrics {
    /// Metrics reading `dp`'s maps at scrape time.
    pub fn new(dp: Arc<Datapath>) -> Self {
        let mut registry = Registry::default();
        let connect_seconds = Family::<ListenerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        registry.register(
            "sockgate_backend_connect_seconds",
            "Backend connect latency",
            connect_seconds.clone(),
        );
        let reconciles = Counter::default();
        registry.register(
            "sockgate_reconciles",
            "Desired states programmed",
            reconciles.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "sockgate_reconcile_errors",
            "Reconciles that failed; the last good state keeps serving",
            reconcile_errors.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 20));
        registry.register(
            "sockgate_reconcile_seconds",
            "Time to compute and program one desired state",
            reconcile_seconds.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "sockgate_status_writes",
            "Status writes sent",
            status_writes.clone(),
        );
        let backends_refused = BackendsRefused::default();
        backends_refused.register(&mut registry);
        let not_programmed = NotProgrammed::default();
        not_programmed.register(&mut registry);
        let map_write_failures = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "sockgate_map_write_failures",
            "Map writes that failed and were skipped (the listener kept its previous entry), by map",
            map_write_failures.clone(),
        );
        let backend_refs_unready = BackendRefsUnready::default();
        backend_refs_unready.register(&mut registry);
        let accept_errors = Family::<ReasonLabels, Counter>::default();
        for reason in ACCEPT_ERROR_REASONS {
            drop(accept_errors.get_or_create(&vec![("reason", reason)]));
        }
        registry.register(
            "sockgate_accept_errors",
            "Failed accepts on the listeners, by reason (descriptors: the open-file limit)",
            accept_errors.clone(),
        );
        let sockmap_pair_failures = Family::<ReasonLabels, Counter>::default();
        for reason in PAIR_FAILURE_REASONS {
            drop(sockmap_pair_failures.get_or_create(&vec![("reason", reason)]));
        }
        registry.register(
            "sockgate_sockmap_pair_failures",
            "Connections that could not be paired in the sockmap and took splice, by reason (map_full: GW_SOCKS or GW_PEERS is full, see --max-sockets)",
            sockmap_pair_failures.clone(),
        );
        let access = Arc::new(crate::access_log::Sink::default());
        access.register(&mut registry);
        registry.register_collector(Box::new(MapCollector { dp }));
        Self {
            registry,
            connect_seconds,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            status_writes,
            backends_refused,
            not_programmed,
            map_write_failures,
            backend_refs_unready,
            accept_errors,
            sockmap_pair_failures,
            access,
            healthy: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            source_ready: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Counts a failed accept.
    pub fn accept_error(&self, reason: &'static str) {
        self.accept_errors
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts a connection that could not be paired in the sockmap.
    pub fn sockmap_pair_failure(&self, reason: &'static str) {
        self.sockmap_pair_failures
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Labels for the per-listener families.
    pub fn listener(port: u16) -> ListenerLabels {
        labels(port)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "encoding metrics");
        }
        out
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.healthy.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok: programs loaded\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "programs not loaded\n")
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if !m.source_ready.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first state from the source\n",
        )
    } else if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok: state programmed\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "state not programmed yet\n",
        )
    }
}

/// Errors of starting the HTTP endpoint.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint {addr}: {source}")]
pub struct ServeError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// `/connections`: the socket paths' live connections, a JSON array of
/// [`crate::access_log::LiveConnection`] (read by `sockgate connections`).
async fn connections(State(live): State<Arc<dyn LiveSource>>) -> impl IntoResponse {
    let body = serde_json::to_string(&live.live()).unwrap_or_else(|_| "[]".into());
    ([(CONTENT_TYPE, "application/json")], body)
}

/// Binds `addr` and serves `/metrics`, `/healthz`, `/readyz` and `/connections` until
/// `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
    live: Arc<dyn LiveSource>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    info!(addr = %bound, "metrics and health endpoint listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(m)
        .merge(
            Router::new()
                .route("/connections", get(connections))
                .with_state(live),
        );
    Ok(tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            warn!(error = %e, "metrics endpoint stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(addr: &str, reason: RefusalReason) -> RefusedBackend {
        RefusedBackend {
            backend_ref: "default/etcd:2379".into(),
            address: addr.parse().expect("addr"),
            reason,
        }
    }

    fn exposition(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).expect("encode");
        out
    }

    #[test]
    fn backends_refused_counts_the_current_refusals_by_reason() {
        let mut registry = Registry::default();
        let m = BackendsRefused::default();
        m.register(&mut registry);
        let text = exposition(&registry);
        for reason in RefusalReason::ALL {
            let line = format!("sockgate_backends_refused{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        m.set(&[
            refused("127.0.0.1:2379", RefusalReason::Loopback),
            refused("[::1]:2379", RefusalReason::Loopback),
            refused("169.254.169.254:80", RefusalReason::LinkLocal),
        ]);
        let text = exposition(&registry);
        assert!(
            text.contains("# TYPE sockgate_backends_refused gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("sockgate_backends_refused{reason=\"loopback\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sockgate_backends_refused{reason=\"link_local\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sockgate_backends_refused{reason=\"multicast\"} 0\n"),
            "{text}"
        );
        // A gauge of the current state: refusals gone are no longer counted.
        m.set(&[]);
        let text = exposition(&registry);
        assert!(
            text.contains("sockgate_backends_refused{reason=\"loopback\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn backend_refs_without_ready_endpoints_are_counted_by_share() {
        let mut registry = Registry::default();
        let m = BackendRefsUnready::default();
        m.register(&mut registry);
        let text = exposition(&registry);
        for share in ["moved", "refused"] {
            let line =
                format!("sockgate_backendrefs_without_ready_endpoints{{share=\"{share}\"}} 0\n");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        let u = |route: &str, share| UnreadyBackendRef {
            route: route.into(),
            backend_ref: "default/db:5432".into(),
            share,
        };
        m.set(&[
            u("default/a", UnreadyShare::Moved),
            u("default/b", UnreadyShare::Moved),
            u("default/c", UnreadyShare::Refused),
        ]);
        let text = exposition(&registry);
        assert!(
            text.contains("# TYPE sockgate_backendrefs_without_ready_endpoints gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("sockgate_backendrefs_without_ready_endpoints{share=\"moved\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sockgate_backendrefs_without_ready_endpoints{share=\"refused\"} 1\n"),
            "{text}"
        );
        m.set(&[]);
        let text = exposition(&registry);
        assert!(
            text.contains("sockgate_backendrefs_without_ready_endpoints{share=\"moved\"} 0\n"),
            "{text}"
        );
    }
}
