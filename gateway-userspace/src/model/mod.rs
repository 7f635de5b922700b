//! The Gateway API model: from GatewayClass, Gateway, TCPRoute, ReferenceGrant,
//! Namespace, Service and EndpointSlice objects to the [`DesiredState`] the data path
//! serves and the status sockgate writes.
//!
//! Everything here is pure (no kube client, no aya, no clock): sources build a
//! [`Snapshot`], [`reconcile`] computes, and adapters at the edges write maps and status.
//! The rules are documented for users in `docs/gateway-api.md`.
//!
//! * [`snapshot`]: the input and the parameters.
//! * [`reconcile`](mod@reconcile): attachment, conflicts, conditions.
//! * [`backends`]: backendRef resolution and weight spreading.
//! * [`conditions`]: condition types and reasons.
//! * [`guards`]: `ListenerPolicy` resolution into per-listener guards.
//! * [`limits`]: the data path's capacities and what fits them.
//! * [`report`]: what `sockgate check` prints.
//!
//! [`DesiredState`]: crate::desired::DesiredState
pub mod backends;
pub mod conditions;
pub mod guards;
pub mod limits;
pub mod reconcile;
pub mod report;
pub mod snapshot;

pub use reconcile::{StatusSet, reconcile};
pub use snapshot::{CrdBundle, Params, Snapshot, TcpRouteObject, TcpRouteVersion};
