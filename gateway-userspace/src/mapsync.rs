//! Writes the desired state to `GW_LISTENERS`, `GW_BACKENDS`, the forward path's
//! selection tables (`GW_FWD_SLOTS`) and the XDP guard's maps: reads what the maps
//! hold, computes the delta with [`diff`](crate::diff::diff) (backends first, then
//! listeners; deletes in reverse) and writes only that.
use tracing::{debug, instrument};

pub use crate::diff::{backend_addr, backend_value};
use crate::{
    desired::DesiredState,
    diff::{MapOp, Programmed, diff},
    ebpf::{Datapath, MapOpError},
    forward::slots,
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
    // Backend writes, then the forward path's selection tables (which index the
    // backends), then listener writes; removals after, in reverse.
    let (sets, removes): (Vec<MapOp>, Vec<MapOp>) = ops
        .into_iter()
        .partition(|op| matches!(op, MapOp::SetBackend(..) | MapOp::SetListener(..)));
    for op in sets.iter().filter(|op| matches!(op, MapOp::SetBackend(..))) {
        if let MapOp::SetBackend(k, v) = op {
            dp.set_backend(*k, *v)?;
        }
    }
    for (&port, l) in &desired.listeners {
        dp.set_slots(port, Some(&slots::table(&l.backends)))?;
    }
    for port in dp.slot_ports() {
        if !desired.listeners.contains_key(&port) {
            dp.set_slots(port, None)?;
        }
    }
    for op in sets
        .into_iter()
        .filter(|op| matches!(op, MapOp::SetListener(..)))
        .chain(removes)
    {
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
