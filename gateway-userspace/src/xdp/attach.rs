//! Keeping `gw_xdp` attached to the interfaces it should guard, and to no other.
//!
//! * **Which interfaces** ([`Selection`]): the ones named with `--xdp-iface`; in the
//!   cluster without it, the interfaces holding this node's addresses (the `InternalIP`
//!   and `ExternalIP` of its `Node`, which may change at run time); none when switched
//!   off (`--xdp-iface none`) or in file mode without `--xdp-iface`.
//! * **Which mode** ([`mode_for`]): `--xdp-mode auto` takes generic XDP on veth (native
//!   mode there turns TSO off on the peer, see `docs/xdp.md`) and native elsewhere,
//!   falling back to generic when the driver refuses; `native` fails when refused.
//! * **Kept in step** ([`run`]): rtnetlink link and address events (an interface
//!   created, deleted, renamed, an address added or removed) trigger a level-triggered
//!   resync: the interfaces and their addresses are listed again, the desired set is
//!   computed, and [`plan`] compares it with the links this agent holds and with the
//!   program ids the kernel reports on each interface. An interface that disappeared
//!   takes its attachment with it (the link is forgotten); one that appears with a
//!   desired name, possibly with a new ifindex, is attached again; one that is no
//!   longer desired is detached. A resync also runs every [`RESYNC`] (and sooner after
//!   a failed attach), in case an event was lost.
//!
//! Every attachment is a bpf link held by the agent: never two of ours on one
//! interface (the kernel refuses a second program on an interface anyway), and none
//! left behind after a stop or a crash (the kernel detaches a link with its last
//! descriptor).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use aya::programs::xdp::XdpLink;
use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::packet_route::{
    RouteNetlinkMessage,
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{AttachMode, XdpError, XdpKind};
use crate::ebpf::Datapath;

/// The longest time between two resyncs without any event.
pub const RESYNC: Duration = Duration::from_secs(30);
/// The time between resyncs while an attach is failing.
pub const RETRY: Duration = Duration::from_secs(5);
/// Quiet time after a netlink event before the resync (events come in bursts).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Which interfaces the guard is attached to.
#[derive(Clone, Debug)]
pub enum Selection {
    /// None (`--xdp-iface none`, or file mode without `--xdp-iface`).
    Off,
    /// The interfaces named with `--xdp-iface`, when (and while) they exist.
    Named(BTreeSet<String>),
    /// The interfaces holding any of these addresses (the cluster default: the
    /// addresses of this node's `Node`, kept current by the kube source).
    NodeAddresses(watch::Receiver<BTreeSet<IpAddr>>),
}

/// An interface as the kernel reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Iface {
    /// Its name.
    pub name: String,
    /// Its index (a deleted and recreated interface has a new one).
    pub index: u32,
    /// The link kind (`veth`, `bridge`, ...); `None` for a physical device.
    pub kind: Option<String>,
    /// A loopback device.
    pub loopback: bool,
    /// The XDP programs attached to it, by program id.
    pub xdp: BTreeMap<u32, XdpKind>,
    /// Its addresses.
    pub addrs: BTreeSet<IpAddr>,
}

/// The interfaces holding any of `addrs`, loopback devices excepted (traffic on
/// them comes from the node itself, which the guard does not judge).
pub fn holding<'a>(
    addrs: &BTreeSet<IpAddr>,
    ifaces: impl IntoIterator<Item = &'a Iface>,
) -> BTreeSet<String> {
    ifaces
        .into_iter()
        .filter(|i| !i.loopback && !i.addrs.is_disjoint(addrs))
        .map(|i| i.name.clone())
        .collect()
}

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

/// An attachment this agent holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The interface index it was made on.
    pub index: u32,
    /// Its mode.
    pub mode: XdpKind,
}

/// One change to the attachments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Drop the link of an interface that is gone, was replaced (a new index), or no
    /// longer carries the program: the kernel already detached it.
    Forget { name: String, why: &'static str },
    /// Detach from an interface that is no longer desired.
    Detach { name: String },
    /// Attach to a desired interface.
    Attach { name: String, index: u32 },
}

/// The steps that make the held attachments equal to `desired`, given the interfaces
/// the kernel reports (by name) and the id of our program. Forgets and detaches come
/// first, so that an interface replaced under the same name is attached once, anew.
pub fn plan(
    desired: &BTreeSet<String>,
    ifaces: &BTreeMap<String, Iface>,
    held: &BTreeMap<String, Held>,
    prog_id: u32,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut kept = BTreeSet::new();
    for (name, h) in held {
        let why = match ifaces.get(name) {
            None => Some("the interface is gone"),
            Some(i) if i.index != h.index => Some("the interface was replaced (new ifindex)"),
            Some(i) if !i.xdp.contains_key(&prog_id) => Some("the program is no longer attached"),
            Some(_) => None,
        };
        if let Some(why) = why {
            steps.push(Step::Forget {
                name: name.clone(),
                why,
            });
        } else if desired.contains(name) {
            kept.insert(name);
        } else {
            steps.push(Step::Detach { name: name.clone() });
        }
    }
    for name in desired {
        if let Some(i) = ifaces.get(name)
            && !kept.contains(name)
        {
            steps.push(Step::Attach {
                name: name.clone(),
                index: i.index,
            });
        }
    }
    steps
}

fn iface_of(msg: LinkMessage) -> Option<Iface> {
    let mut iface = Iface {
        index: msg.header.index,
        loopback: msg.header.flags.contains(LinkFlags::Loopback),
        ..Iface::default()
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => iface.name = n,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        iface.kind = Some(match k {
                            InfoKind::Veth => "veth".to_owned(),
                            other => other.to_string(),
                        });
                    }
                }
            }
            LinkAttribute::Xdp(xdp) => {
                for x in xdp {
                    let (id, kind) = match x {
                        LinkXdp::SkbProgId(id) => (id, XdpKind::Generic),
                        LinkXdp::DrvProgId(id) => (id, XdpKind::Native),
                        LinkXdp::HwProgId(id) => (id, XdpKind::Offload),
                        _ => continue,
                    };
                    if id != 0 {
                        iface.xdp.insert(id, kind);
                    }
                }
            }
            _ => {}
        }
    }
    (!iface.name.is_empty()).then_some(iface)
}

/// Lists the interfaces of this network namespace with their addresses and XDP
/// programs, by name.
pub async fn list_ifaces(handle: &rtnetlink::Handle) -> Result<BTreeMap<String, Iface>, XdpError> {
    let mut by_index = BTreeMap::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(XdpError::Netlink)? {
        if let Some(i) = iface_of(msg) {
            by_index.insert(i.index, i);
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(XdpError::Netlink)? {
        let Some(iface) = by_index.get_mut(&msg.header.index) else {
            continue;
        };
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on a
        // point-to-point link); IPv6 carries only IFA_ADDRESS.
        let (mut local, mut address) = (None, None);
        for attr in msg.attributes {
            match attr {
                AddressAttribute::Local(a) => local = Some(a),
                AddressAttribute::Address(a) => address = Some(a),
                _ => {}
            }
        }
        if let Some(a) = local.or(address) {
            iface.addrs.insert(a);
        }
    }
    Ok(by_index
        .into_values()
        .map(|i| (i.name.clone(), i))
        .collect())
}

/// The attachment manager: the links it holds, by interface name.
pub struct Manager {
    dp: Arc<Datapath>,
    mode: AttachMode,
    prog_id: u32,
    held: BTreeMap<String, (Held, XdpLink)>,
    /// The last desired set and why, logged when it changes.
    said: Option<(BTreeSet<String>, String)>,
    /// Desired interfaces not present, logged once each.
    missing: BTreeSet<String>,
    /// Interfaces whose attach fails, with the error last logged: a failure is logged
    /// at error level when it starts or changes, and at debug level on the retries.
    failing: BTreeMap<String, String>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("mode", &self.mode)
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The desired interfaces under `sel` and why they were chosen.
fn desired(sel: &Selection, ifaces: &BTreeMap<String, Iface>) -> (BTreeSet<String>, String) {
    match sel {
        Selection::Off => (BTreeSet::new(), "the guard is not attached".to_owned()),
        Selection::Named(names) => (names.clone(), "named with --xdp-iface".to_owned()),
        Selection::NodeAddresses(rx) => {
            let addrs = rx.borrow().clone();
            let set = holding(&addrs, ifaces.values());
            let why = if addrs.is_empty() {
                "the Node's addresses are not known yet".to_owned()
            } else if set.is_empty() {
                format!("none of the Node's addresses {addrs:?} is on a local interface")
            } else {
                format!("they hold the Node's addresses {addrs:?}")
            };
            (set, why)
        }
    }
}

impl Manager {
    /// A manager attaching `dp`'s `gw_xdp` in `mode`; loads the program.
    pub fn new(dp: Arc<Datapath>, mode: AttachMode) -> Result<Self, XdpError> {
        let prog_id = dp.xdp_program_id()?;
        Ok(Self {
            dp,
            mode,
            prog_id,
            held: BTreeMap::new(),
            said: None,
            missing: BTreeSet::new(),
            failing: BTreeMap::new(),
        })
    }

    /// The interfaces attached now, with their index and mode.
    pub fn attached(&self) -> BTreeMap<String, Held> {
        self.held
            .iter()
            .map(|(n, (h, _))| (n.clone(), *h))
            .collect()
    }

    /// One resync: lists the interfaces, computes the desired set under `sel`, and
    /// applies the plan. Returns the attach errors (the others were applied).
    pub async fn sync(
        &mut self,
        handle: &rtnetlink::Handle,
        sel: &Selection,
    ) -> Result<Vec<XdpError>, XdpError> {
        let ifaces = list_ifaces(handle).await?;
        let (want, why) = desired(sel, &ifaces);
        if self.said.as_ref() != Some(&(want.clone(), why.clone())) {
            info!(ifaces = ?want, mode = %self.mode, why = %why, "XDP guard interfaces");
            self.said = Some((want.clone(), why));
        }
        for name in &want {
            if ifaces.contains_key(name) {
                self.missing.remove(name);
            } else if self.missing.insert(name.clone()) {
                warn!(iface = %name, "XDP guard: no such interface (yet); attached when it appears");
            }
        }
        self.failing.retain(|name, _| want.contains(name));
        let held: BTreeMap<String, Held> = self.attached();
        let mut errors = Vec::new();
        for step in plan(&want, &ifaces, &held, self.prog_id) {
            match step {
                Step::Forget { name, why } => {
                    // The kernel detached it with the interface: dropping only
                    // releases our descriptor.
                    self.held.remove(&name);
                    info!(iface = %name, why, "XDP guard attachment forgotten");
                }
                Step::Detach { name } => {
                    self.held.remove(&name);
                    info!(iface = %name, "XDP listener guard detached: interface no longer selected");
                }
                Step::Attach { name, .. } => {
                    let Some(iface) = ifaces.get(&name) else {
                        continue;
                    };
                    match self.attach(iface) {
                        Ok(held) => {
                            self.failing.remove(&name);
                            self.held.insert(name, held);
                        }
                        Err(e) => {
                            let text = e.to_string();
                            if self.failing.get(&name) == Some(&text) {
                                debug!(iface = %name, error = %e, "XDP guard still not attached");
                            } else {
                                error!(
                                    iface = %name, error = %e,
                                    "XDP guard not attached (retried; said again only if the error changes)"
                                );
                                self.failing.insert(name, text);
                            }
                            errors.push(e);
                        }
                    }
                }
            }
        }
        Ok(errors)
    }

    fn attach(&self, iface: &Iface) -> Result<(Held, XdpLink), XdpError> {
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
        Ok((
            Held {
                index: iface.index,
                mode,
            },
            link,
        ))
    }
}

type Events = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A netlink connection for requests, and one for link and address events.
pub struct Netlink {
    handle: rtnetlink::Handle,
    events: Option<Events>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Netlink {
    /// Opens both connections (inside a tokio runtime) in the caller's network
    /// namespace.
    pub fn open() -> Result<Self, XdpError> {
        use rtnetlink::MulticastGroup as G;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(XdpError::NetlinkSocket)?;
        tokio::spawn(conn);
        let (conn, _, events) =
            rtnetlink::new_multicast_connection(&[G::Link, G::Ipv4Ifaddr, G::Ipv6Ifaddr])
                .map_err(XdpError::NetlinkSocket)?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            events: Some(events),
        })
    }

    /// The request handle.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }
}

/// Waits for the next event: `false` when the stream ended; never returns without
/// a stream.
async fn next_event(events: &mut Option<Events>) -> bool {
    match events {
        Some(e) => e.next().await.is_some(),
        None => std::future::pending().await,
    }
}

/// Keeps the attachments in step with `sel` and the interfaces until `shutdown`, then
/// detaches them all. `failing`: the initial sync made by the caller had errors (the
/// next resync comes after [`RETRY`]).
pub async fn run(
    mut manager: Manager,
    mut nl: Netlink,
    mut sel: Selection,
    mut failing: bool,
    shutdown: CancellationToken,
) {
    loop {
        let wait = if failing { RETRY } else { RESYNC };
        let node_changed = async {
            match &mut sel {
                Selection::NodeAddresses(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
            () = node_changed => {}
            ev = next_event(&mut nl.events) => {
                if ev {
                    // Let the burst settle, draining what came meanwhile.
                    tokio::time::sleep(DEBOUNCE).await;
                    if let Some(events) = &mut nl.events {
                        while events.try_recv().is_ok() {}
                    }
                } else {
                    warn!(every = ?RESYNC, "rtnetlink events ended: periodic resyncs only");
                    nl.events = None;
                }
            }
        }
        match manager.sync(nl.handle(), &sel).await {
            Ok(errors) => failing = !errors.is_empty(),
            Err(e) => {
                warn!(error = %e, "XDP guard: listing interfaces failed; retrying");
                failing = true;
            }
        }
    }
    let n = manager.held.len();
    manager.held.clear();
    if n > 0 {
        info!(interfaces = n, "XDP listener guard detached");
    }
}

#[cfg(test)]
mod tests;
