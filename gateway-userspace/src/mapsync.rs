//! Writes the desired state to `GW_LISTENERS`, `GW_BACKENDS` and the XDP guard's maps: reads what the maps
//! hold, computes the delta with [`diff`](crate::diff::diff) (backends first, then
//! listeners; deletes in reverse) and writes only that.
use tracing::{debug, instrument};

pub use crate::diff::{backend_addr, backend_value};
use crate::{
    desired::DesiredState,
    diff::{MapOp, Programmed, diff},
    ebpf::{Datapath, MapOpError},
};

/// What the maps of `dp` hold now.
pub fn read(dp: &Datapath) -> Programmed {
    Programmed {
        listeners: dp.listener_entries().into_iter().collect(),
        backends: dp.backend_entries().into_iter().collect(),
    }
}

/// Programs `desired` into the maps, writing only the entries that differ.
#[instrument(skip_all, fields(generation = desired.generation))]
pub fn apply(dp: &Datapath, desired: &DesiredState) -> Result<(), MapOpError> {
    let ops = diff(&read(dp), desired);
    debug!(ops = ops.len(), "map delta");
    for op in ops {
        match op {
            MapOp::SetBackend(k, v) => dp.set_backend(k, v)?,
            MapOp::SetListener(k, v) => dp.set_listener(k, v)?,
            MapOp::RemoveListener(k) => {
                debug!(listener = k.port, "removing listener entry");
                dp.remove_listener(k)?;
            }
            MapOp::RemoveBackend(k) => dp.remove_backend(k)?,
        }
    }
    dp.apply_guards(&desired.guards)
}
