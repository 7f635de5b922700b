//! sockgate: the Gateway API `TCPRoute` node agent and its CLI.
//!
//! # Layout
//!
//! * [`btf`]: member offsets from the kernel's BTF, for the verdict program.
//! * [`desired`]: the desired state the data path serves.
//! * [`ebpf`]: the embedded eBPF object, loading, pinning and the pin compatibility check.
//! * [`mapsync`]: writes the desired state to `GW_LISTENERS` / `GW_BACKENDS`.
//! * [`metrics`]: Prometheus metrics, `/healthz` and `/readyz`.
//! * [`proxy`]: listeners, backend selection, the kernel and userspace data paths.
//! * [`routes`]: the `--route` fixed table.
//! * [`status`]: `sockgate status`, read from the pinned maps.
pub mod btf;
pub mod desired;
pub mod ebpf;
pub mod mapsync;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod status;
