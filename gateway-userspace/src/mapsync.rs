//! Writes the desired state to `GW_LISTENERS`, `GW_BACKENDS`, the forward path's
//! selection tables (`GW_FWD_SLOTS`) and the XDP guard's maps: reads what the maps
//! hold, computes the delta with [`diff`](crate::diff::diff) (backends first, then
//! listeners; deletes in reverse) and writes only that.
//!
//! One entry that cannot be written never stops the others: the listener it belongs
//! to is left as it was (its new `GW_LISTENERS` entry is not written, and none of the
//! backends its old entry may still count is removed), every other listener is
//! programmed, and [`Applied::failures`] says what was skipped, for logs and metrics.
//! The model sizes the desired state to the maps ([`crate::model::limits`]), so a
//! failure here means something unexpected (a pin of another size, a kernel error).
use std::collections::BTreeSet;

use gateway_common::{Backend, BackendKey, ListenerInfo, ListenerKey, SlotTable};
use tracing::{debug, instrument};

pub use crate::diff::{backend_addr, backend_value};
use crate::{
    desired::DesiredState,
    diff::{MapOp, Programmed, diff},
    ebpf::{Datapath, MapOpError},
    forward::slots,
};

/// The map writes [`apply`] makes, so the delta logic is tested without a kernel.
pub trait MapWriter {
    /// What `GW_LISTENERS` and `GW_BACKENDS` hold now.
    fn programmed(&self) -> Programmed;
    /// Writes a `GW_BACKENDS` entry.
    fn set_backend(&self, key: BackendKey, value: Backend) -> Result<(), MapOpError>;
    /// Deletes a `GW_BACKENDS` entry.
    fn remove_backend(&self, key: BackendKey) -> Result<(), MapOpError>;
    /// Writes a `GW_LISTENERS` entry.
    fn set_listener(&self, key: ListenerKey, value: ListenerInfo) -> Result<(), MapOpError>;
    /// Deletes a `GW_LISTENERS` entry.
    fn remove_listener(&self, key: ListenerKey) -> Result<(), MapOpError>;
    /// Writes (or, with `None`, removes) the selection table of a listener.
    fn set_slots(&self, port: u16, table: Option<&SlotTable>) -> Result<(), MapOpError>;
    /// Listener ports that have a selection table.
    fn slot_ports(&self) -> Vec<u16>;
}

impl MapWriter for Datapath {
    fn programmed(&self) -> Programmed {
        read(self)
    }
    fn set_backend(&self, key: BackendKey, value: Backend) -> Result<(), MapOpError> {
        Datapath::set_backend(self, key, value)
    }
    fn remove_backend(&self, key: BackendKey) -> Result<(), MapOpError> {
        Datapath::remove_backend(self, key)
    }
    fn set_listener(&self, key: ListenerKey, value: ListenerInfo) -> Result<(), MapOpError> {
        Datapath::set_listener(self, key, value)
    }
    fn remove_listener(&self, key: ListenerKey) -> Result<(), MapOpError> {
        Datapath::remove_listener(self, key)
    }
    fn set_slots(&self, port: u16, table: Option<&SlotTable>) -> Result<(), MapOpError> {
        Datapath::set_slots(self, port, table)
    }
    fn slot_ports(&self) -> Vec<u16> {
        Datapath::slot_ports(self)
    }
}

/// A map write that failed and was skipped.
#[derive(Debug)]
pub struct Failure {
    /// The listener the entry belongs to (`None` for the XDP guard's maps as a whole).
    pub listener: Option<u16>,
    /// The error.
    pub error: MapOpError,
}

/// What one [`apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Map operations attempted.
    pub ops: usize,
    /// Writes that failed; their listeners were left as they were.
    pub failures: Vec<Failure>,
}

impl Applied {
    /// Listeners with a failed write, each once.
    pub fn failed_listeners(&self) -> BTreeSet<u16> {
        self.failures.iter().filter_map(|f| f.listener).collect()
    }
}

/// What the maps of `dp` hold now.
pub fn read(dp: &Datapath) -> Programmed {
    Programmed {
        listeners: dp.listener_entries().into_iter().collect(),
        backends: dp.backend_entries().into_iter().collect(),
    }
}

/// Programs `desired` into the maps, writing only the entries that differ, and the
/// XDP guard's maps.
#[instrument(skip_all, fields(generation = desired.generation))]
pub fn apply(dp: &Datapath, desired: &DesiredState) -> Applied {
    let mut applied = write(dp, desired);
    if let Err(error) = dp.apply_guards(&desired.guards) {
        applied.failures.push(Failure {
            listener: None,
            error,
        });
    }
    applied
}

/// Writes the listener, backend and selection table entries of `desired` through `w`,
/// skipping (and reporting) what fails. A pass that failed is followed by a second one:
/// near a map's capacity an entry may find room only once the first pass removed
/// what the new state no longer has (a listener shrinking while another grows).
pub fn write(w: &impl MapWriter, desired: &DesiredState) -> Applied {
    let first = pass(w, desired);
    if first.failures.is_empty() {
        return first;
    }
    let mut second = pass(w, desired);
    debug!(
        failed = first.failures.len(),
        still_failing = second.failures.len(),
        "map writes retried"
    );
    second.ops += first.ops;
    second
}

/// One pass of [`write`].
fn pass(w: &impl MapWriter, desired: &DesiredState) -> Applied {
    let ops = diff(&w.programmed(), desired);
    debug!(ops = ops.len(), "map delta");
    let mut applied = Applied {
        ops: ops.len(),
        failures: Vec::new(),
    };
    // Listeners with a failed write: their listener entry is not written and none of
    // their backends removed, so the entry the data path reads stays consistent.
    let mut broken: BTreeSet<u16> = BTreeSet::new();
    let mut fail = |port: Option<u16>, error: MapOpError, broken: &mut BTreeSet<u16>| {
        if let Some(p) = port {
            broken.insert(p);
        }
        applied.failures.push(Failure {
            listener: port,
            error,
        });
    };
    // Listeners that are gone first, with their selection tables and backends, so a
    // map at capacity has room for what replaces them; then backend writes, the
    // forward path's selection tables (which index the backends), listener writes,
    // and last the backends that listeners still present no longer count.
    for op in &ops {
        match *op {
            MapOp::RemoveListener(k) => {
                debug!(listener = k.port, "removing listener entry");
                if let Err(e) = w.remove_listener(k) {
                    fail(Some(k.port), e, &mut broken);
                }
            }
            MapOp::RemoveBackend(k) if !desired.listeners.contains_key(&k.listener_port) => {
                if let Err(e) = w.remove_backend(k) {
                    fail(Some(k.listener_port), e, &mut broken);
                }
            }
            _ => {}
        }
    }
    for port in w.slot_ports() {
        if !desired.listeners.contains_key(&port)
            && let Err(e) = w.set_slots(port, None)
        {
            fail(Some(port), e, &mut broken);
        }
    }
    for op in &ops {
        if let MapOp::SetBackend(k, v) = *op
            && let Err(e) = w.set_backend(k, v)
        {
            fail(Some(k.listener_port), e, &mut broken);
        }
    }
    for (&port, l) in &desired.listeners {
        if broken.contains(&port) {
            continue;
        }
        if let Err(e) = w.set_slots(port, Some(&slots::table(&l.backends))) {
            fail(Some(port), e, &mut broken);
        }
    }
    for op in &ops {
        if let MapOp::SetListener(k, v) = *op
            && !broken.contains(&k.port)
            && let Err(e) = w.set_listener(k, v)
        {
            fail(Some(k.port), e, &mut broken);
        }
    }
    for op in &ops {
        if let MapOp::RemoveBackend(k) = *op
            && desired.listeners.contains_key(&k.listener_port)
            && !broken.contains(&k.listener_port)
            && let Err(e) = w.remove_backend(k)
        {
            fail(Some(k.listener_port), e, &mut broken);
        }
    }
    applied
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap, net::SocketAddr};

    use gateway_common::{GW_BACKENDS, GW_FWD_SLOTS, GW_LISTENERS};

    use super::*;
    use crate::desired::{self, Listener};

    /// Maps in memory with the kernel's behaviour at capacity: an insert of a new key
    /// into a full hash map fails (`E2BIG`), a replace succeeds.
    struct Fake {
        maps: RefCell<Programmed>,
        slots: RefCell<BTreeMap<u16, SlotTable>>,
        max_listeners: usize,
        max_backends: usize,
        max_slots: usize,
    }

    fn full(map: &'static str) -> MapOpError {
        MapOpError {
            map,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
            }),
        }
    }

    impl MapWriter for Fake {
        fn programmed(&self) -> Programmed {
            self.maps.borrow().clone()
        }
        fn set_backend(&self, key: BackendKey, value: Backend) -> Result<(), MapOpError> {
            let mut m = self.maps.borrow_mut();
            if !m.backends.contains_key(&key) && m.backends.len() >= self.max_backends {
                return Err(full(GW_BACKENDS));
            }
            m.backends.insert(key, value);
            Ok(())
        }
        fn remove_backend(&self, key: BackendKey) -> Result<(), MapOpError> {
            self.maps.borrow_mut().backends.remove(&key);
            Ok(())
        }
        fn set_listener(&self, key: ListenerKey, value: ListenerInfo) -> Result<(), MapOpError> {
            let mut m = self.maps.borrow_mut();
            if !m.listeners.contains_key(&key) && m.listeners.len() >= self.max_listeners {
                return Err(full(GW_LISTENERS));
            }
            m.listeners.insert(key, value);
            Ok(())
        }
        fn remove_listener(&self, key: ListenerKey) -> Result<(), MapOpError> {
            self.maps.borrow_mut().listeners.remove(&key);
            Ok(())
        }
        fn set_slots(&self, port: u16, table: Option<&SlotTable>) -> Result<(), MapOpError> {
            let mut slots = self.slots.borrow_mut();
            match table {
                Some(_) if !slots.contains_key(&port) && slots.len() >= self.max_slots => {
                    return Err(full(GW_FWD_SLOTS));
                }
                Some(t) => slots.insert(port, *t),
                None => slots.remove(&port),
            };
            Ok(())
        }
        fn slot_ports(&self) -> Vec<u16> {
            self.slots.borrow().keys().copied().collect()
        }
    }

    fn fake(max_listeners: usize, max_backends: usize) -> Fake {
        Fake {
            maps: RefCell::default(),
            slots: RefCell::default(),
            max_listeners,
            max_backends,
            max_slots: usize::MAX,
        }
    }

    fn desired(listeners: &[(u16, usize)]) -> DesiredState {
        let mut d = DesiredState {
            generation: 1,
            ..DesiredState::default()
        };
        for &(port, n) in listeners {
            let backends = (0..n)
                .map(|i| desired::Backend {
                    addr: Some(SocketAddr::from(([10, 0, 0, 1], 1000 + i as u16))),
                    weight: 1,
                    backend_ref: String::new(),
                    endpoint_slice: None,
                })
                .collect();
            d.listeners.insert(
                port,
                Listener {
                    port,
                    backends,
                    ..Listener::default()
                },
            );
        }
        d
    }

    /// Every listener entry counts only backends that are written.
    fn consistent(m: &Programmed) -> bool {
        m.listeners.iter().all(|(k, info)| {
            (0..info.backend_count).all(|i| m.backends.contains_key(&BackendKey::new(k.port, i)))
        })
    }

    #[test]
    fn a_full_listener_map_skips_that_listener_and_programs_the_rest() {
        let w = fake(2, 100);
        let a = write(&w, &desired(&[(1, 1), (2, 2), (3, 1)]));
        assert_eq!(a.failed_listeners(), BTreeSet::from([3]));
        assert_eq!(a.failures[0].error.map, GW_LISTENERS);
        let m = w.programmed();
        assert_eq!(
            m.listeners.keys().map(|k| k.port).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(consistent(&m));
    }

    #[test]
    fn a_full_listener_map_takes_a_replacement_listener() {
        // At capacity, listener 2 goes and 3 comes: 2 is removed first.
        let w = fake(2, 100);
        assert!(write(&w, &desired(&[(1, 1), (2, 1)])).failures.is_empty());
        let target = desired(&[(1, 1), (3, 1)]);
        let a = write(&w, &target);
        assert!(a.failures.is_empty(), "{:?}", a.failures);
        assert_eq!(w.programmed(), Programmed::of(&target));
    }

    #[test]
    fn a_full_backend_map_is_retried_once_removals_made_room() {
        let w = fake(10, 4);
        assert!(write(&w, &desired(&[(1, 2), (2, 2)])).failures.is_empty());
        // Listener 1 grows to 3 backends while listener 2 shrinks to 1: the new
        // backend of 1 fits only once 2's is removed, which the first pass does
        // after; the second pass completes.
        let target = desired(&[(1, 3), (2, 1)]);
        let a = write(&w, &target);
        assert!(a.failures.is_empty(), "{:?}", a.failures);
        assert_eq!(w.programmed(), Programmed::of(&target));
    }

    #[test]
    fn a_backend_map_too_small_leaves_the_old_listener_entry_consistent() {
        let w = fake(10, 4);
        assert!(write(&w, &desired(&[(1, 2), (2, 2)])).failures.is_empty());
        // Listener 1 shrinks to 1, listener 2 grows to 4: 5 entries do not fit.
        // Listener 2 keeps its old entry (2 backends, both still written); 1 is
        // programmed.
        let a = write(&w, &desired(&[(1, 1), (2, 4)]));
        assert_eq!(a.failed_listeners(), BTreeSet::from([2]));
        assert_eq!(a.failures[0].error.map, GW_BACKENDS);
        let m = w.programmed();
        assert_eq!(m.listeners[&ListenerKey::new(1)].backend_count, 1);
        assert_eq!(m.listeners[&ListenerKey::new(2)].backend_count, 2);
        assert!(consistent(&m));
    }

    #[test]
    fn a_full_slot_table_map_skips_that_listener_and_programs_the_rest() {
        let mut w = fake(10, 100);
        w.max_slots = 2;
        let a = write(&w, &desired(&[(1, 1), (2, 2), (3, 1)]));
        // Listener 3's selection table fails in both passes: reported, its listener
        // entry not written; 1 and 2 are programmed, slot tables included.
        assert_eq!(a.failed_listeners(), BTreeSet::from([3]));
        assert!(a.failures.iter().all(|f| f.error.map == GW_FWD_SLOTS));
        let m = w.programmed();
        assert_eq!(
            m.listeners.keys().map(|k| k.port).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(w.slot_ports(), [1, 2]);
        assert!(consistent(&m));
        // Room made (listener 1 gone): 3 is programmed at the next apply.
        let target = desired(&[(2, 2), (3, 1)]);
        let a = write(&w, &target);
        assert!(a.failures.is_empty(), "{:?}", a.failures);
        assert_eq!(w.programmed(), Programmed::of(&target));
        assert_eq!(w.slot_ports(), [2, 3]);
    }
}
