//! sockgate: the Gateway API `TCPRoute` node agent and its CLI.
//!
//! # Layout
//!
//! * [`cluster`]: the Kubernetes side: API access list, leader election of the status writer.
//! * [`desired`]: the desired state the data path serves.
//! * [`ebpf`]: the embedded eBPF object, loading, pinning and the pin compatibility check.
//! * [`mapsync`]: writes the desired state to `GW_LISTENERS` / `GW_BACKENDS`.
//! * [`metrics`]: Prometheus metrics, `/healthz` and `/readyz`.
//! * [`proxy`]: listeners, backend selection, the kernel and userspace data paths.
//! * [`routes`]: the `--route` fixed table.
//! * [`status`]: `sockgate status`, read from the pinned maps.
pub mod cluster;
pub mod desired;
pub mod ebpf;
pub mod mapsync;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod status;
