//! The forward program's [`Hook`]: `gw_fwd` on the tc ingress of each chosen interface
//! as a tcx link pinned under `PIN_DIR/links/fwd-IFACE` (an earlier agent's pinned link
//! is taken over, see `Datapath::attach_fwd`); after each sync the node's addresses go
//! to `GW_FWD_ADDRS` and the attached interfaces to `GW_FWD_IFACES` (the program
//! forwards a connection only when its backend is reached by one of them). At a stop
//! the links are unpinned (the program detaches), unless `--keep-pins`.
//!
//! [`start`] runs the manager and the connection table's sweeper
//! ([`crate::forward::sweep_until`]) side by side in one task.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    sync::Arc,
};

use aya::programs::{SchedClassifier, links::PinnedLink, tc::TcAttachType};
use gateway_common::NodeAddr;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{AttachError, Attachment, Hook, Iface, Manager, Netlink, Selection, Words};
use crate::{
    ebpf::Datapath,
    forward::{self, ForwardError, ForwardOptions, LINKS_DIR, link_pin, node_addr},
};

/// The node's addresses clients may connect to: those of every interface but loopback.
pub fn node_addrs<'a>(ifaces: impl IntoIterator<Item = &'a Iface>) -> BTreeSet<NodeAddr> {
    ifaces
        .into_iter()
        .filter(|i| !i.loopback)
        .flat_map(|i| i.addrs.iter().copied())
        .filter(|a| !a.is_loopback())
        .map(node_addr)
        .collect()
}

/// `gw_fwd` of a loaded [`Datapath`].
pub struct Program {
    dp: Arc<Datapath>,
    prog_id: u32,
    keep_pins: bool,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("prog_id", &self.prog_id)
            .field("keep_pins", &self.keep_pins)
            .finish_non_exhaustive()
    }
}

impl Program {
    /// The forward program of `dp` (loaded here); `keep_pins`: leave the links pinned
    /// at a stop.
    pub fn new(dp: Arc<Datapath>, keep_pins: bool) -> Result<Self, ForwardError> {
        let prog_id = dp.fwd_program_id().map_err(ForwardError::Program)?;
        Ok(Self {
            dp,
            prog_id,
            keep_pins,
        })
    }
}

const WORDS: Words = Words {
    chosen: "forward path interfaces",
    off: "the forward path is off",
    named: "named with --forward-iface",
    missing: "forward path: no such interface (yet); attached when it appears",
    forgotten: "forward program attachment forgotten",
    detached: "forward program detached: interface no longer selected",
    failed: "forward program not attached (retried; said again only if the error changes)",
    still_failing: "forward program still not attached",
    synced_failed: "forward path: publishing the node's addresses and interfaces failed (retried)",
    list_failed: "forward path: listing interfaces failed; retrying",
};

impl Hook for Program {
    type Link = PinnedLink;
    type Error = ForwardError;
    const WORDS: &'static Words = &WORDS;

    fn mode(&self) -> String {
        "tcx ingress".to_owned()
    }

    fn carries(&self, iface: &Iface) -> bool {
        match SchedClassifier::query_tcx(&iface.name, TcAttachType::Ingress) {
            Ok((_, progs)) => progs.iter().any(|p| p.id() == self.prog_id),
            Err(e) => {
                // Cannot tell (the interface is going away, most likely): the next
                // listing says.
                debug!(iface = %iface.name, error = %e, "querying the tcx programs");
                true
            }
        }
    }

    fn attach(&mut self, iface: &Iface) -> Result<PinnedLink, ForwardError> {
        let _ = fs::create_dir_all(self.dp.pin_dir().join(LINKS_DIR));
        let (link, adopted) = self
            .dp
            .attach_fwd(&iface.name, &link_pin(self.dp.pin_dir(), &iface.name))
            .map_err(|source| ForwardError::Attach {
                iface: iface.name.clone(),
                source,
            })?;
        if adopted {
            info!(
                iface = %iface.name, ifindex = iface.index,
                "forward program replaced on the link an earlier agent pinned (its connections keep flowing)"
            );
        } else {
            info!(iface = %iface.name, ifindex = iface.index, "forward program attached (tc ingress, tcx)");
        }
        Ok(link)
    }

    fn release(&mut self, name: &str, attachment: Attachment<PinnedLink>) {
        // The pin holds the link: removing it detaches the program (or lets go of a
        // link the kernel already detached, so that a successor is attached anew).
        let _ = fs::remove_file(link_pin(self.dp.pin_dir(), name));
        drop(attachment);
    }

    fn synced(
        &mut self,
        ifaces: &BTreeMap<String, Iface>,
        held: &BTreeMap<String, Attachment<PinnedLink>>,
    ) -> Result<(), ForwardError> {
        self.dp.set_node_addrs(&node_addrs(ifaces.values()))?;
        self.dp
            .set_fwd_ifaces(&held.values().map(|a| a.index).collect())?;
        Ok(())
    }

    fn stop(&mut self, held: BTreeMap<String, Attachment<PinnedLink>>) {
        if self.keep_pins {
            info!(
                interfaces = held.len(),
                "forward program left attached (--keep-pins): forwarded connections keep flowing"
            );
            return;
        }
        let _ = self.dp.set_fwd_ifaces(&BTreeSet::new());
        for name in held.keys() {
            let _ = fs::remove_file(link_pin(self.dp.pin_dir(), name));
        }
        let n = held.len();
        drop(held);
        let _ = fs::remove_dir(self.dp.pin_dir().join(LINKS_DIR));
        info!(interfaces = n, "forward program detached");
    }
}

/// Attaches the forward program to the interfaces of `sel` before the first client
/// arrives, then keeps them in step and sweeps the connection table until `shutdown`.
/// Errors here are the agent's start-up errors: a netlink or program error, or (for
/// named interfaces) an interface that cannot be attached; under the cluster default
/// a failing attach is logged and retried.
pub async fn start(
    dp: &Arc<Datapath>,
    sel: Selection,
    opts: ForwardOptions,
    shutdown: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, AttachError> {
    let nl = Netlink::open_for(&sel)?;
    let mut manager = Manager::with_hook(Program::new(dp.clone(), opts.keep_pins)?);
    let errors = manager.sync(nl.handle(), &sel).await?;
    let failing = !errors.is_empty();
    if matches!(sel, Selection::Named(_))
        && let Some(e) = errors.into_iter().next()
    {
        manager.stop();
        return Err(e.into());
    }
    info!(
        ifaces = ?manager.attached().keys().collect::<Vec<_>>(), idle_secs = opts.timeouts.idle.as_secs(),
        "forward data path on: connections arriving on these interfaces are forwarded in the kernel"
    );
    let sweep = forward::sweep_until(
        dp.clone(),
        opts.timeouts,
        opts.drain,
        opts.access.clone(),
        opts.names.clone(),
        shutdown.clone(),
    );
    let events = forward::events::run(
        dp.clone(),
        opts.access.clone(),
        opts.names.clone(),
        shutdown.clone(),
    );
    let attach = super::run(manager, nl, sel, failing, shutdown.clone());
    Ok(tokio::spawn(async move {
        tokio::join!(attach, sweep, events);
    }))
}
