//! One attachment manager for every program that goes on an interface: the XDP
//! listener guard ([`xdp`]) and the forward path's tc program ([`forward`]). What differs
//! between them (how one interface is attached, whether the kernel still shows the
//! program there, what follows a sync, what a stop leaves) is a [`Hook`]; the rest is
//! here, once.
//!
//! * **Which interfaces** ([`Selection`]): the ones named (`--xdp-iface`,
//!   `--forward-iface`); in the cluster without a name, the interfaces holding this
//!   node's addresses (the `InternalIP` and `ExternalIP` of its `Node`, which may change
//!   at run time), and for the forward path also the interfaces the routes towards the
//!   current backends leave by (the program must see the backends' replies); none when
//!   switched off (`none`) or in file mode without a name.
//! * **Kept in step** ([`run`]): rtnetlink link and address events (an interface
//!   created, deleted, renamed, an address added or removed; route events too when the
//!   selection follows routes) trigger a level-triggered resync: the interfaces and
//!   their addresses are listed again, the desired set is computed, and [`plan`]
//!   compares it with the links this agent holds and with what the kernel reports on
//!   each interface. An interface that disappeared takes its attachment with it (the
//!   link is forgotten); one that appears with a desired name, possibly with a new
//!   ifindex, is attached again; one that is no longer desired is detached. A resync
//!   also runs every [`RESYNC`] (and sooner after a failed attach), and whenever the
//!   Node's addresses or the desired state change.
//! * **Errors said once**: an attach that keeps failing is logged at error level when
//!   it starts failing or its error changes, and at debug level on the retries.
//!
//! [`addresses`] follows this node's addresses the same way, for the sources.
//!
//! Every attachment is a bpf link held by the agent: never two of ours on one
//! interface, and none left behind after a stop (the XDP guard's links go with their
//! last descriptor; the forward program's links are pinned, and unpinned at a stop
//! unless `--keep-pins`).
pub mod addresses;
pub mod forward;
pub mod xdp;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::packet_route::{
    RouteNetlinkMessage,
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp},
    route::RouteAttribute,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{desired::DesiredState, forward::ForwardError, xdp::XdpError, xdp::XdpKind};

/// The longest time between two resyncs without any event.
pub const RESYNC: Duration = Duration::from_secs(30);
/// The time between resyncs while an attach is failing.
pub const RETRY: Duration = Duration::from_secs(5);
/// Quiet time after a netlink event before the resync (events come in bursts).
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The backends named, per interface, in the log line of the chosen interfaces.
const NAMED_BACKENDS: usize = 3;

/// Errors of the attachment managers.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("rtnetlink socket: {0}")]
    NetlinkSocket(#[source] std::io::Error),
    #[error("listing interfaces (rtnetlink): {0}")]
    Netlink(#[source] rtnetlink::Error),
    #[error(transparent)]
    Xdp(#[from] XdpError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Which interfaces a program is attached to.
#[derive(Clone, Debug)]
pub enum Selection {
    /// None (`none`, or file mode without a name).
    Off,
    /// The interfaces named on the command line, when (and while) they exist.
    Named(BTreeSet<String>),
    /// The interfaces holding any of these addresses (the guard's cluster default: the
    /// addresses of this node's `Node`, kept current by the kube source).
    NodeAddresses(watch::Receiver<BTreeSet<IpAddr>>),
    /// The forward path's cluster default: the interfaces holding the `Node`'s
    /// addresses (where clients arrive), and those the routes towards the backends of
    /// the desired state leave by (where their replies arrive).
    NodeAndBackends {
        /// The `Node`'s addresses, from the kube source.
        node: watch::Receiver<BTreeSet<IpAddr>>,
        /// The desired state the proxy serves.
        desired: watch::Receiver<Arc<DesiredState>>,
    },
}

/// Waits for the next change of `rx`; never returns once its sender is gone.
async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Selection {
    /// Whether the selection depends on routes (their events trigger a resync).
    pub const fn follows_routes(&self) -> bool {
        matches!(self, Self::NodeAndBackends { .. })
    }

    /// The backend addresses whose routes the selection follows.
    pub fn backends(&self) -> BTreeSet<IpAddr> {
        match self {
            Self::NodeAndBackends { desired, .. } => backend_addrs(&desired.borrow()),
            _ => BTreeSet::new(),
        }
    }

    /// Waits until an input of the selection changes; never returns for a fixed one.
    async fn changed(&mut self) {
        match self {
            Self::NodeAddresses(rx) => changed(rx).await,
            Self::NodeAndBackends { node, desired } => tokio::select! {
                () = changed(node) => {}
                () = changed(desired) => {}
            },
            Self::Off | Self::Named(_) => std::future::pending().await,
        }
    }
}

/// The addresses of every backend of `d`.
pub fn backend_addrs(d: &DesiredState) -> BTreeSet<IpAddr> {
    d.listeners
        .values()
        .flat_map(|l| l.backends.iter())
        .filter_map(|b| b.addr.map(|a| a.ip()))
        .collect()
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

/// The interfaces the routes towards the backends leave by (`routes`: the output
/// interface index of each backend address), loopback devices excepted (a backend on
/// the node itself is not forwarded), with the backends of each.
pub fn towards<'a>(
    routes: &BTreeMap<IpAddr, u32>,
    ifaces: impl IntoIterator<Item = &'a Iface>,
) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let by_index: BTreeMap<u32, &Iface> = ifaces.into_iter().map(|i| (i.index, i)).collect();
    let mut out: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for (addr, index) in routes {
        if let Some(i) = by_index.get(index)
            && !i.loopback
        {
            out.entry(i.name.clone()).or_default().insert(*addr);
        }
    }
    out
}

/// An attachment this agent holds.
#[derive(Debug)]
pub struct Attachment<L> {
    /// The interface index it was made on.
    pub index: u32,
    /// The link (whatever keeps the program there).
    pub link: L,
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

/// The steps that make the held attachments (interface index by name) equal to
/// `desired`, given the interfaces the kernel reports (by name) and whether it still
/// shows our program on one (`carries`). Forgets and detaches come first, so that an
/// interface replaced under the same name is attached once, anew.
pub fn plan(
    desired: &BTreeSet<String>,
    ifaces: &BTreeMap<String, Iface>,
    held: &BTreeMap<String, u32>,
    carries: impl Fn(&Iface) -> bool,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut kept = BTreeSet::new();
    for (name, index) in held {
        let why = match ifaces.get(name) {
            None => Some("the interface is gone"),
            Some(i) if i.index != *index => Some("the interface was replaced (new ifindex)"),
            Some(i) if !carries(i) => Some("the program is no longer attached"),
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
pub async fn list_ifaces(
    handle: &rtnetlink::Handle,
) -> Result<BTreeMap<String, Iface>, AttachError> {
    let mut by_index = BTreeMap::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(AttachError::Netlink)? {
        if let Some(i) = iface_of(msg) {
            by_index.insert(i.index, i);
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(AttachError::Netlink)? {
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

/// The output interface index of the route towards each of `dsts`, as `ip route get`
/// reports it (the kernel's own lookup, the one the forward program's FIB lookup
/// makes); an address without a route is left out.
pub async fn routes(handle: &rtnetlink::Handle, dsts: &BTreeSet<IpAddr>) -> BTreeMap<IpAddr, u32> {
    let mut out = BTreeMap::new();
    for dst in dsts {
        let msg = match *dst {
            IpAddr::V4(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let mut replies = handle.route().get(msg).execute();
        loop {
            match replies.try_next().await {
                Ok(Some(route)) => {
                    let oif = route.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    });
                    if let Some(oif) = oif {
                        out.insert(*dst, oif);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(backend = %dst, error = %e, "no route towards the backend");
                    break;
                }
            }
        }
    }
    out
}

/// The words of one hook's log lines.
#[derive(Debug)]
pub struct Words {
    /// The chosen interfaces (fields `ifaces`, `mode`, `why`).
    pub chosen: &'static str,
    /// Why, when the selection is [`Selection::Off`].
    pub off: &'static str,
    /// Why, when the selection is [`Selection::Named`].
    pub named: &'static str,
    /// A desired interface that does not exist (field `iface`).
    pub missing: &'static str,
    /// An attachment the kernel dropped (fields `iface`, `why`).
    pub forgotten: &'static str,
    /// An attachment removed because its interface is no longer selected.
    pub detached: &'static str,
    /// An attach failing, said once per distinct error (fields `iface`, `error`).
    pub failed: &'static str,
    /// The same error again, at debug level.
    pub still_failing: &'static str,
    /// The work after a sync failing, said once per distinct error (field `error`).
    pub synced_failed: &'static str,
    /// Listing the interfaces failed (field `error`).
    pub list_failed: &'static str,
}

/// What is particular to one program: how it is attached and what goes with it.
pub trait Hook {
    /// What keeps the program attached to one interface.
    type Link;
    /// Its errors.
    type Error: std::error::Error;
    /// Its log lines.
    const WORDS: &'static Words;

    /// How it is attached, for the log line of the chosen interfaces.
    fn mode(&self) -> String;

    /// Whether the kernel still shows this program on `iface`.
    fn carries(&self, iface: &Iface) -> bool;

    /// Attaches the program to `iface`.
    fn attach(&mut self, iface: &Iface) -> Result<Self::Link, Self::Error>;

    /// Lets go of the link of `name` (gone, replaced, or no longer selected).
    fn release(&mut self, name: &str, attachment: Attachment<Self::Link>) {
        let _ = (name, attachment);
    }

    /// The work after each sync, given the interfaces and what is attached now.
    fn synced(
        &mut self,
        ifaces: &BTreeMap<String, Iface>,
        held: &BTreeMap<String, Attachment<Self::Link>>,
    ) -> Result<(), Self::Error> {
        let _ = (ifaces, held);
        Ok(())
    }

    /// The end: what is attached is handed over.
    fn stop(&mut self, held: BTreeMap<String, Attachment<Self::Link>>);
}

/// The attachment manager of one program: the links it holds, by interface name.
pub struct Manager<H: Hook> {
    hook: H,
    held: BTreeMap<String, Attachment<H::Link>>,
    /// The last desired set and why, logged when it changes.
    said: Option<(BTreeSet<String>, String)>,
    /// Desired interfaces not present, logged once each.
    missing: BTreeSet<String>,
    /// Interfaces whose attach fails, with the error last logged: a failure is logged
    /// at error level when it starts or changes, and at debug level on the retries.
    failing: BTreeMap<String, String>,
    /// The error of the work after a sync, last logged.
    synced_failing: Option<String>,
}

impl<H: Hook> std::fmt::Debug for Manager<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("mode", &self.hook.mode())
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// How `addrs` reads in a log line.
fn listed(addrs: &BTreeSet<IpAddr>) -> String {
    let mut s: Vec<String> = addrs
        .iter()
        .take(NAMED_BACKENDS)
        .map(ToString::to_string)
        .collect();
    if addrs.len() > NAMED_BACKENDS {
        s.push(format!("{} more", addrs.len() - NAMED_BACKENDS));
    }
    s.join(", ")
}

/// The interfaces holding the `Node`'s `addrs`, and why.
fn node_choice(
    addrs: &BTreeSet<IpAddr>,
    ifaces: &BTreeMap<String, Iface>,
) -> (BTreeSet<String>, String) {
    let set = holding(addrs, ifaces.values());
    let why = if addrs.is_empty() {
        "the Node's addresses are not known yet".to_owned()
    } else if set.is_empty() {
        format!("none of the Node's addresses {addrs:?} is on a local interface")
    } else {
        format!("they hold the Node's addresses {addrs:?}")
    };
    (set, why)
}

/// The desired interfaces under `sel` and why they were chosen; `routes`: the output
/// interface of the route towards each backend (see [`routes`]).
fn desired(
    sel: &Selection,
    ifaces: &BTreeMap<String, Iface>,
    routes: &BTreeMap<IpAddr, u32>,
    words: &Words,
) -> (BTreeSet<String>, String) {
    match sel {
        Selection::Off => (BTreeSet::new(), words.off.to_owned()),
        Selection::Named(names) => (names.clone(), words.named.to_owned()),
        Selection::NodeAddresses(rx) => node_choice(&rx.borrow(), ifaces),
        Selection::NodeAndBackends { node, desired } => {
            let (mut set, node_why) = node_choice(&node.borrow(), ifaces);
            let backends = backend_addrs(&desired.borrow());
            let by_iface = towards(routes, ifaces.values());
            let backend_why = if backends.is_empty() {
                "no backends yet".to_owned()
            } else if by_iface.is_empty() {
                "no route towards the backends leaves by a local interface".to_owned()
            } else {
                let each: Vec<String> = by_iface
                    .iter()
                    .map(|(name, addrs)| format!("{name} towards {}", listed(addrs)))
                    .collect();
                format!("the routes towards the backends: {}", each.join("; "))
            };
            set.extend(by_iface.into_keys());
            (set, format!("{node_why}; {backend_why}"))
        }
    }
}

impl<H: Hook> Manager<H> {
    /// A manager of `hook`'s program, holding nothing yet.
    pub const fn with_hook(hook: H) -> Self {
        Self {
            hook,
            held: BTreeMap::new(),
            said: None,
            missing: BTreeSet::new(),
            failing: BTreeMap::new(),
            synced_failing: None,
        }
    }

    /// The hook.
    pub const fn hook(&self) -> &H {
        &self.hook
    }

    /// The interfaces attached now, with the index each was attached on.
    pub fn attached(&self) -> BTreeMap<String, u32> {
        self.held
            .iter()
            .map(|(n, a)| (n.clone(), a.index))
            .collect()
    }

    /// One resync: lists the interfaces, computes the desired set under `sel`, and
    /// applies the plan. Returns the attach errors (the others were applied).
    pub async fn sync(
        &mut self,
        handle: &rtnetlink::Handle,
        sel: &Selection,
    ) -> Result<Vec<H::Error>, AttachError> {
        let ifaces = list_ifaces(handle).await?;
        let routes = routes(handle, &sel.backends()).await;
        let (want, why) = desired(sel, &ifaces, &routes, H::WORDS);
        if self.said.as_ref() != Some(&(want.clone(), why.clone())) {
            info!(ifaces = ?want, mode = %self.hook.mode(), why = %why, "{}", H::WORDS.chosen);
            self.said = Some((want.clone(), why));
        }
        for name in &want {
            if ifaces.contains_key(name) {
                self.missing.remove(name);
            } else if self.missing.insert(name.clone()) {
                warn!(iface = %name, "{}", H::WORDS.missing);
            }
        }
        self.failing.retain(|name, _| want.contains(name));
        let steps = plan(&want, &ifaces, &self.attached(), |i| self.hook.carries(i));
        let mut errors = Vec::new();
        for step in steps {
            match step {
                Step::Forget { name, why } => {
                    // The kernel detached it with the interface: dropping only
                    // releases our descriptor.
                    if let Some(a) = self.held.remove(&name) {
                        self.hook.release(&name, a);
                    }
                    info!(iface = %name, why, "{}", H::WORDS.forgotten);
                }
                Step::Detach { name } => {
                    if let Some(a) = self.held.remove(&name) {
                        self.hook.release(&name, a);
                    }
                    info!(iface = %name, "{}", H::WORDS.detached);
                }
                Step::Attach { name, .. } => {
                    let Some(iface) = ifaces.get(&name) else {
                        continue;
                    };
                    match self.hook.attach(iface) {
                        Ok(link) => {
                            self.failing.remove(&name);
                            self.held.insert(
                                name,
                                Attachment {
                                    index: iface.index,
                                    link,
                                },
                            );
                        }
                        Err(e) => {
                            let text = e.to_string();
                            if self.failing.get(&name) == Some(&text) {
                                debug!(iface = %name, error = %e, "{}", H::WORDS.still_failing);
                            } else {
                                error!(iface = %name, error = %e, "{}", H::WORDS.failed);
                                self.failing.insert(name, text);
                            }
                            errors.push(e);
                        }
                    }
                }
            }
        }
        match self.hook.synced(&ifaces, &self.held) {
            Ok(()) => self.synced_failing = None,
            Err(e) => {
                let text = e.to_string();
                if self.synced_failing.as_ref() == Some(&text) {
                    debug!(error = %e, "{}", H::WORDS.synced_failed);
                } else {
                    error!(error = %e, "{}", H::WORDS.synced_failed);
                    self.synced_failing = Some(text);
                }
                errors.push(e);
            }
        }
        Ok(errors)
    }

    /// Hands what is attached to the hook's [`Hook::stop`].
    fn stop(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.hook.stop(held);
    }
}

type Events = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A netlink connection for requests, and one for link and address events (and route
/// events, for a selection that follows routes).
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
    /// namespace, with link and address events.
    pub fn open() -> Result<Self, AttachError> {
        Self::open_with(false)
    }

    /// As [`Netlink::open`], with route events too when `sel` follows routes.
    pub fn open_for(sel: &Selection) -> Result<Self, AttachError> {
        Self::open_with(sel.follows_routes())
    }

    fn open_with(routes: bool) -> Result<Self, AttachError> {
        use rtnetlink::MulticastGroup as G;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(AttachError::NetlinkSocket)?;
        tokio::spawn(conn);
        let mut groups = vec![G::Link, G::Ipv4Ifaddr, G::Ipv6Ifaddr];
        if routes {
            groups.extend([G::Ipv4Route, G::Ipv6Route]);
        }
        let (conn, _, events) =
            rtnetlink::new_multicast_connection(&groups).map_err(AttachError::NetlinkSocket)?;
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
/// hands them to [`Hook::stop`]. `failing`: the initial sync made by the caller had
/// errors (the next resync comes after [`RETRY`]).
pub async fn run<H: Hook>(
    mut manager: Manager<H>,
    mut nl: Netlink,
    mut sel: Selection,
    mut failing: bool,
    shutdown: CancellationToken,
) {
    loop {
        let wait = if failing { RETRY } else { RESYNC };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
            () = sel.changed() => {}
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
                warn!(error = %e, "{}", H::WORDS.list_failed);
                failing = true;
            }
        }
    }
    manager.stop();
}

#[cfg(test)]
mod tests;
