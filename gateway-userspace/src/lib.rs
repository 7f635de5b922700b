//! sockgate: the Gateway API `TCPRoute` node agent and its CLI.
//!
//! # Layout
//!
//! * [`access_log`]: one record per ended connection (the access log, the duration
//!   and bytes histograms, ended connections by reason).
//! * [`attach`]: one attachment manager for every program that goes on an interface
//!   (the XDP guard, the forward program): which interfaces, kept in step with
//!   rtnetlink events.
//! * [`backend_filter`]: the backend addresses refused by default (loopback,
//!   link-local, unspecified, multicast) and `--allow-backend-cidr`.
//! * [`btf`]: member offsets from the kernel's BTF, for the verdict program.
//! * [`check`]: `sockgate check`, the offline report.
//! * [`cluster`]: the Kubernetes side: API access list, leader election of the status writer.
//! * [`connections`]: `sockgate connections`, the live connections (agent and pinned
//!   forward table).
//! * [`desired`]: the desired state the data path serves.
//! * [`diff`]: the map delta between what is programmed and what is desired.
//! * [`ebpf`]: the embedded eBPF object, loading, pinning and the pin compatibility check.
//! * [`forward`]: the forward data path's agent side: NAT port range, selection
//!   tables, the connection table sweeper (attached by [`attach::forward`]).
//! * [`map_error`]: the error of a map operation.
//! * [`mapsync`]: writes the desired state to `GW_LISTENERS` / `GW_BACKENDS`.
//! * [`pin_watch`]: puts the maps' pins back when they are removed while the agent runs.
//! * [`model`]: the Gateway API model: snapshot, reconcile, status.
//! * [`metrics`]: Prometheus metrics, `/healthz` and `/readyz`.
//! * [`policy`]: the `ListenerPolicy` resource (XDP guard policy attachment) and its
//!   resolution into per-listener guards.
//! * [`proxy`]: listeners, backend selection, the kernel and userspace data paths.
//! * [`routes`]: the `--route` fixed table.
//! * [`source`]: where Gateway API objects come from (manifest files).
//! * [`status`]: `sockgate status`, read from the pinned maps.
//! * [`xdp`]: the XDP listener guard: policy, its map entries and attach modes
//!   (attached by [`attach::xdp`]).
pub mod access_log;
pub mod attach;
pub mod backend_filter;
pub mod btf;
pub mod check;
pub mod cluster;
pub mod connections;
pub mod desired;
pub mod diff;
pub mod ebpf;
pub mod forward;
pub mod map_error;
pub mod mapsync;
pub mod metrics;
#[expect(
    clippy::doc_markdown,
    reason = "Gateway API kind names (GatewayClass, TCPRoute, EndpointSlice) are words in these docs"
)]
pub mod model;
pub mod pin_watch;
pub mod policy;
pub mod proxy;
pub mod routes;
#[expect(
    clippy::doc_markdown,
    reason = "Gateway API kind names (GatewayClass, TCPRoute, EndpointSlice) are words in these docs"
)]
pub mod source;
pub mod status;
pub mod xdp;
