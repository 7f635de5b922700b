//! sockgate: the Gateway API TCPRoute node agent and its CLI.
//!
//! # Layout
//!
//! * [`desired`]: the desired state the data path serves.
//! * [`ebpf`]: the embedded eBPF object, loading, pinning and the pin compatibility check.
pub mod desired;
pub mod ebpf;
