//! The error of a map operation at run time, shared by the modules that own map
//! handles (`ebpf`, `xdp`) without their importing each other.

/// Errors of writing or reading the maps at run time.
#[derive(Debug, thiserror::Error)]
#[error("map {map}: {source}")]
pub struct MapOpError {
    pub map: &'static str,
    #[source]
    pub source: aya::maps::MapError,
}
