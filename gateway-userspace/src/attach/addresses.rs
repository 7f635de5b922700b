//! This node's addresses: those of its interfaces, loopback excluded, as the model
//! reads them for Gateways with `spec.addresses` ([`crate::model::Params::node_addresses`]).
//! Listed at start, then again at every rtnetlink link or address event (an address
//! added to or removed from an interface, an interface gone) and every [`RESYNC`]; each
//! change is published on a `watch` channel, so the sources reconcile again.
use std::{collections::BTreeSet, net::IpAddr};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AttachError, DEBOUNCE, Iface, Netlink, RESYNC, list_ifaces, next_event};

/// The receiving end of this node's addresses.
pub type NodeAddresses = watch::Receiver<BTreeSet<IpAddr>>;

/// The addresses of `ifaces` clients may connect to: every address of every interface
/// but loopback, IPv4-mapped IPv6 as IPv4.
pub fn of<'a>(ifaces: impl IntoIterator<Item = &'a Iface>) -> BTreeSet<IpAddr> {
    ifaces
        .into_iter()
        .filter(|i| !i.loopback)
        .flat_map(|i| i.addrs.iter().map(IpAddr::to_canonical))
        .filter(|a| !a.is_loopback())
        .collect()
}

/// Lists this node's addresses now, then follows them until `shutdown`.
pub async fn follow(shutdown: CancellationToken) -> Result<NodeAddresses, AttachError> {
    let mut nl = Netlink::open()?;
    let first = of(list_ifaces(nl.handle()).await?.values());
    info!(addresses = ?first, "node addresses (for Gateways with spec.addresses)");
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut said = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RESYNC) => {}
                ev = next_event(&mut nl.events) => {
                    if ev {
                        tokio::time::sleep(DEBOUNCE).await;
                        if let Some(events) = &mut nl.events {
                            while events.try_recv().is_ok() {}
                        }
                    } else {
                        warn!(every = ?RESYNC, "rtnetlink events ended: node addresses listed periodically only");
                        nl.events = None;
                    }
                }
            }
            match list_ifaces(nl.handle()).await {
                Ok(ifaces) => {
                    said = false;
                    let now = of(ifaces.values());
                    tx.send_if_modified(|old| {
                        if *old == now {
                            return false;
                        }
                        info!(addresses = ?now, was = ?old, "node addresses changed");
                        *old = now;
                        true
                    });
                }
                Err(e) => {
                    if !said {
                        warn!(error = %e, "listing the node's addresses failed; retried");
                        said = true;
                    }
                }
            }
        }
    });
    Ok(rx)
}
