//! The Kubernetes side of the agent (`sockgate run --source kube`): what it may do in
//! the API ([`access`]), the reflectors and the debounced reconcile ([`source`]), the leader election of the status writer ([`lease`]), the status writer
//! ([`status`]).
//!
//! Every agent watches the objects and programs its own node; only the agent holding
//! the Lease writes status.
pub mod access;
pub mod lease;
pub mod source;
pub mod status;
