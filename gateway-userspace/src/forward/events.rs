//! The forward program's connection ends, read from its ring buffer `GW_FWD_EVENTS`
//! and turned into access log records.
//!
//! The program emits one [`FwdEvent`] per connection it sees end (a RST either way, or
//! the segment carrying the second FIN); this task waits on the ring buffer's
//! descriptor (tokio `AsyncFd`), makes each event a [`Record`] named from the agent's
//! desired state (listener, route, backendRef) and hands it to the [`Sink`]. The
//! connections the program does not report (timeouts, drains, ends whose event did not
//! fit the ring buffer) are logged by the sweeper (`super::Sweeper`).
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use gateway_common::{FWD_END_BACKEND_RESET, FWD_END_CLIENT_RESET, FWD_END_FIN, FwdEvent};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::monotonic_ns;
use crate::{
    access_log::{EndReason, ListenerRef, PathName, Record, Sink, rfc3339},
    desired::DesiredState,
    ebpf::Datapath,
};

/// Events taken from the ring buffer per read (the rest wait for the next one).
const BATCH: usize = 1024;

/// The access log's reason of an event's `end` code; `None` for an unknown code.
pub fn end_of(code: u16) -> Option<EndReason> {
    match code {
        FWD_END_FIN => Some(EndReason::Fin),
        FWD_END_CLIENT_RESET => Some(EndReason::ClientReset),
        FWD_END_BACKEND_RESET => Some(EndReason::BackendReset),
        _ => None,
    }
}

fn addr_of(be: [u8; 16], port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(std::net::Ipv6Addr::from(be).to_canonical(), port)
}

/// The record of event `e`, read at monotonic time `now_ns` and wall time `wall`
/// (the event's times are monotonic); listener names and backendRef empty (see
/// [`Record::name_from`]). `None` for an unknown end code.
pub fn record_of_event(e: &FwdEvent, now_ns: u64, wall: SystemTime) -> Option<Record> {
    let end = end_of(e.end)?;
    let ago = |ns: u64| wall - Duration::from_nanos(now_ns.saturating_sub(ns));
    Some(Record {
        time: rfc3339(ago(e.last_seen_ns)),
        start_time: rfc3339(ago(e.created_ns)),
        duration_seconds: Duration::from_nanos(e.last_seen_ns.saturating_sub(e.created_ns))
            .as_secs_f64(),
        listener: ListenerRef {
            gateway: None,
            listener: String::new(),
            port: e.listener_port,
            route: None,
        },
        client: addr_of(e.client_be, e.client_port),
        backend: Some(addr_of(e.backend_be, e.backend_port)),
        backend_ref: None,
        endpoint_slice: None,
        datapath: PathName::Forward,
        bytes_client_to_backend: e.bytes_c2b,
        bytes_backend_to_client: e.bytes_b2c,
        segments_client_to_backend: Some(e.packets_c2b),
        segments_backend_to_client: Some(e.packets_b2c),
        end,
        detail: None,
    })
}

/// Logs every event waiting in `dp`'s ring buffer; returns how many.
fn drain(
    dp: &Datapath,
    access: &Sink,
    names: Option<&watch::Receiver<Arc<DesiredState>>>,
) -> usize {
    let mut n = 0;
    loop {
        let events = dp.take_fwd_events(BATCH);
        if events.is_empty() {
            return n;
        }
        n += events.len();
        let (now_ns, wall) = (monotonic_ns(), SystemTime::now());
        let desired = names.map(|n| n.borrow().clone());
        for e in &events {
            let Some(mut r) = record_of_event(e, now_ns, wall) else {
                debug!(end = e.end, "forward event with an unknown end code");
                continue;
            };
            if let Some(d) = &desired {
                r.name_from(d);
            }
            access.end(r);
        }
    }
}

/// Reads `dp`'s connection ends into `access` until `shutdown` (then once more, so
/// that the ends already emitted are logged). `names` names the records.
pub async fn run(
    dp: Arc<Datapath>,
    access: Arc<Sink>,
    names: Option<watch::Receiver<Arc<DesiredState>>>,
    shutdown: CancellationToken,
) {
    let fd = match dp.fwd_events_fd().and_then(|fd| {
        // SAFETY: the AsyncFd owns the descriptor (a duplicate of the ring buffer's)
        // and keeps it open, unchanged, for as long as it is registered.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(std::io::Error::from)
    }) {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot wait on GW_FWD_EVENTS: forwarded connections are logged by the sweeper only when the event is lost");
            return;
        }
    };
    drain(&dp, &access, names.as_ref());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                drain(&dp, &access, names.as_ref());
                return;
            }
            ready = fd.readable() => match ready {
                Ok(mut guard) => {
                    guard.clear_ready();
                    drain(&dp, &access, names.as_ref());
                }
                Err(e) => {
                    warn!(error = %e, "waiting on GW_FWD_EVENTS");
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_a_record_of_its_counters() {
        let e = FwdEvent {
            client_be: std::net::Ipv4Addr::new(10, 200, 1, 2)
                .to_ipv6_mapped()
                .octets(),
            backend_be: std::net::Ipv4Addr::new(10, 200, 2, 2)
                .to_ipv6_mapped()
                .octets(),
            client_port: 40000,
            backend_port: 9000,
            listener_port: 8080,
            end: FWD_END_CLIENT_RESET,
            created_ns: 1_000_000_000,
            last_seen_ns: 3_500_000_000,
            bytes_c2b: 11,
            bytes_b2c: 22,
            packets_c2b: 3,
            packets_b2c: 4,
        };
        let r = record_of_event(&e, 4_000_000_000, SystemTime::now()).expect("known end");
        assert_eq!(r.client, "10.200.1.2:40000".parse().expect("addr"));
        assert_eq!(r.backend, Some("10.200.2.2:9000".parse().expect("addr")));
        assert_eq!(r.listener.port, 8080);
        assert_eq!(r.end, EndReason::ClientReset);
        assert!((r.duration_seconds - 2.5).abs() < 1e-9, "{r:?}");
        assert_eq!(
            (r.bytes_client_to_backend, r.bytes_backend_to_client),
            (11, 22)
        );
        assert_eq!(
            (r.segments_client_to_backend, r.segments_backend_to_client),
            (Some(3), Some(4))
        );
        assert_eq!(r.datapath, PathName::Forward);
        assert!(record_of_event(&FwdEvent { end: 0, ..e }, 0, SystemTime::now()).is_none());
    }

    #[test]
    fn records_are_named_from_the_desired_state() {
        use crate::desired::{Backend, Listener};
        let mut d = DesiredState::default();
        d.listeners.insert(
            8080,
            Listener {
                port: 8080,
                origin: "ns/gw/tcp".into(),
                route: Some("ns/r".into()),
                backends: vec![Backend {
                    addr: Some("10.200.2.2:9000".parse().expect("addr")),
                    weight: 1,
                    backend_ref: "ns/svc:9000".into(),
                    endpoint_slice: None,
                }],
                ..Listener::default()
            },
        );
        let e = FwdEvent {
            backend_be: std::net::Ipv4Addr::new(10, 200, 2, 2)
                .to_ipv6_mapped()
                .octets(),
            backend_port: 9000,
            listener_port: 8080,
            end: FWD_END_FIN,
            ..FwdEvent::default()
        };
        let mut r = record_of_event(&e, 0, SystemTime::now()).expect("known end");
        r.name_from(&d);
        assert_eq!(r.listener.gateway.as_deref(), Some("ns/gw"));
        assert_eq!(r.listener.listener, "tcp");
        assert_eq!(r.listener.route.as_deref(), Some("ns/r"));
        assert_eq!(r.backend_ref.as_deref(), Some("ns/svc:9000"));
        let mut other = record_of_event(
            &FwdEvent {
                backend_port: 9001,
                ..e
            },
            0,
            SystemTime::now(),
        )
        .expect("known end");
        other.name_from(&d);
        assert_eq!(other.backend_ref, None, "another port is another endpoint");
    }
}
