//! The embedded eBPF object.

/// The eBPF object built by `build.rs` from `gateway-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));
