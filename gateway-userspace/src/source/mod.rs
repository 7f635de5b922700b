//! Sources of Gateway API objects for the model.
//!
//! * [`manifest`]: YAML manifests into typed objects, errors with file and line.
//! * [`files`]: a directory of manifests, followed by polling (`--source files`).
pub mod files;
pub mod manifest;
