//! Sources of Gateway API objects for the model, and what every source (and `sockgate
//! check`) needs to reconcile what it read.
//!
//! * [`manifest`]: YAML manifests into typed objects, errors with file and line.
//! * [`files`]: a directory of manifests, followed by polling (`--source files`).
//!
//! Imports flow one way: [`crate::check`] and [`crate::cluster`] use this module, never
//! the reverse.
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use crate::{
    backend_filter::BackendFilter,
    model::{Params, limits::Limits},
};

pub mod files;
pub mod manifest;

/// Parameters for a reconcile happening now (the edges read the clock, the model does
/// not).
pub fn params_now(controller_name: &str, backend_filter: &BackendFilter, limits: Limits) -> Params {
    Params {
        controller_name: controller_name.to_owned(),
        now: Time(Timestamp::now()),
        backend_filter: backend_filter.clone(),
        limits,
        crd_bundle: crate::model::CrdBundle::NotRead,
        node_addresses: std::collections::BTreeSet::new(),
        other_nodes_addresses: std::collections::BTreeSet::new(),
    }
}
