//! The XDP listener guard's [`Hook`]: `gw_xdp` attached in the mode [`mode_for`]
//! chooses, as a bpf link the agent holds (the kernel detaches it with the link's last
//! descriptor, and with its interface).
//!
//! **Which mode**: `--xdp-mode auto` takes generic XDP on veth (native mode there turns
//! TSO off on the peer, see `docs/xdp.md`) and native elsewhere, falling back to
//! generic when the driver refuses; `native` fails when refused.
use std::{collections::BTreeMap, sync::Arc};

use aya::programs::xdp::XdpLink;
use tracing::info;

use super::{Attachment, Hook, Iface, Manager, Words};
use crate::{
    ebpf::Datapath,
    xdp::{AttachMode, XdpError, XdpKind},
};

/// The mode to try first on `iface`, the mode to fall back to when that one is
/// refused, and why.
pub fn mode_for(mode: AttachMode, iface: &Iface) -> (XdpKind, Option<XdpKind>, &'static str) {
    match mode {
        AttachMode::Generic => (XdpKind::Generic, None, "--xdp-mode generic"),
        AttachMode::Native => (XdpKind::Native, None, "--xdp-mode native"),
        AttachMode::Auto if iface.kind.as_deref() == Some("veth") => (
            XdpKind::Generic,
            None,
            "auto: veth, where native XDP turns TSO off on the peer and costs throughput",
        ),
        AttachMode::Auto => (
            XdpKind::Native,
            Some(XdpKind::Generic),
            "auto: native where the driver supports it",
        ),
    }
}

/// `gw_xdp` of a loaded [`Datapath`], attached in a mode.
pub struct Guard {
    dp: Arc<Datapath>,
    mode: AttachMode,
    prog_id: u32,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("mode", &self.mode)
            .field("prog_id", &self.prog_id)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// The guard of `dp` in `mode`; loads the program.
    pub fn new(dp: Arc<Datapath>, mode: AttachMode) -> Result<Self, XdpError> {
        let prog_id = dp.xdp_program_id()?;
        Ok(Self { dp, mode, prog_id })
    }
}

impl Manager<Guard> {
    /// A manager attaching `dp`'s `gw_xdp` in `mode`; loads the program.
    pub fn new(dp: Arc<Datapath>, mode: AttachMode) -> Result<Self, XdpError> {
        Ok(Self::with_hook(Guard::new(dp, mode)?))
    }
}

const WORDS: Words = Words {
    chosen: "XDP guard interfaces",
    off: "the guard is not attached",
    named: "named with --xdp-iface",
    missing: "XDP guard: no such interface (yet); attached when it appears",
    forgotten: "XDP guard attachment forgotten",
    detached: "XDP listener guard detached: interface no longer selected",
    failed: "XDP guard not attached (retried; said again only if the error changes)",
    still_failing: "XDP guard still not attached",
    synced_failed: "XDP guard: after the sync",
    list_failed: "XDP guard: listing interfaces failed; retrying",
};

impl Hook for Guard {
    type Link = (XdpKind, XdpLink);
    type Error = XdpError;
    const WORDS: &'static Words = &WORDS;

    fn mode(&self) -> String {
        self.mode.to_string()
    }

    fn carries(&self, iface: &Iface) -> bool {
        iface.xdp.contains_key(&self.prog_id)
    }

    fn attach(&mut self, iface: &Iface) -> Result<Self::Link, XdpError> {
        let (first, fallback, why) = mode_for(self.mode, iface);
        let (mode, link) = match (self.dp.attach_xdp(iface.index, first), fallback) {
            (Ok(link), _) => (first, link),
            (Err(e), Some(next)) => {
                info!(
                    iface = %iface.name, refused = %first, error = %e, fallback = %next,
                    "XDP guard: the driver refuses native mode; falling back"
                );
                let link =
                    self.dp
                        .attach_xdp(iface.index, next)
                        .map_err(|source| XdpError::Attach {
                            iface: iface.name.clone(),
                            mode: next,
                            source,
                        })?;
                (next, link)
            }
            (Err(source), None) if first == XdpKind::Native => {
                return Err(XdpError::NativeRefused {
                    iface: iface.name.clone(),
                    source,
                });
            }
            (Err(source), None) => {
                return Err(XdpError::Attach {
                    iface: iface.name.clone(),
                    mode: first,
                    source,
                });
            }
        };
        info!(
            iface = %iface.name, ifindex = iface.index, %mode, why,
            "XDP listener guard attached"
        );
        Ok((mode, link))
    }

    fn stop(&mut self, held: BTreeMap<String, Attachment<Self::Link>>) {
        let n = held.len();
        drop(held);
        if n > 0 {
            info!(interfaces = n, "XDP listener guard detached");
        }
    }
}
