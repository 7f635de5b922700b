use std::collections::BTreeSet;

use super::*;

fn v4(a: [u8; 4]) -> [u8; 16] {
    std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
}

/// A connection client 10.0.0.2:40000 -> 10.0.0.1:8088, NAT 10.0.1.1:61000 ->
/// backend 10.0.1.2:3001, with the client entry's and backend entry's states.
fn conn(c_state: u32, b_state: Option<u32>, c_seen: u64, b_seen: u64) -> Vec<(FlowKey, Flow)> {
    let ck = FlowKey {
        src_be: v4([10, 0, 0, 2]),
        dst_be: v4([10, 0, 0, 1]),
        sport: 40000,
        dport: 8088,
        _pad: 0,
    };
    let c = Flow {
        new_src_be: v4([10, 0, 1, 1]),
        new_dst_be: v4([10, 0, 1, 2]),
        new_sport: 61000,
        new_dport: 3001,
        listener_port: 8088,
        direction: DIR_CLIENT_TO_BACKEND as u8,
        state: c_state,
        last_seen_ns: c_seen,
        ..Flow::default()
    };
    let mut v = vec![(ck, c)];
    if let Some(bs) = b_state {
        let b = Flow {
            new_src_be: ck.dst_be,
            new_dst_be: ck.src_be,
            new_sport: 8088,
            new_dport: 40000,
            listener_port: 8088,
            direction: gateway_common::DIR_BACKEND_TO_CLIENT as u8,
            state: bs,
            last_seen_ns: b_seen,
            ..Flow::default()
        };
        v.push((reverse_key(&c), b));
    }
    v
}

const S: u64 = 1_000_000_000;

#[test]
fn established_idle_connection_lives_until_the_idle_timeout() {
    let t = Timeouts::default();
    let flows = conn(FLOW_S_SYN | 2, Some(FLOW_S_SYN | 2), 100 * S, 100 * S);
    let (rm, live, _) = expired(&flows, 100 * S + 3599 * S, &t, &BTreeSet::new());
    assert!(rm.is_empty());
    assert_eq!(live, 1);
    let (rm, live, removed) = expired(&flows, 100 * S + 3601 * S, &t, &BTreeSet::new());
    assert_eq!(rm.len(), 2, "both entries go");
    assert_eq!((live, removed), (0, 1));
}

#[test]
fn a_busy_direction_keeps_the_connection() {
    let t = Timeouts::default();
    // The client is silent for two hours, the backend sent a second ago.
    let flows = conn(FLOW_S_SYN | 2, Some(FLOW_S_SYN | 2), 0, 7199 * S);
    let (rm, _, _) = expired(&flows, 7200 * S, &t, &BTreeSet::new());
    assert!(rm.is_empty());
}

#[test]
fn closing_connections_go_within_seconds() {
    let t = Timeouts::default();
    let closed = conn(FLOW_S_SYN | FLOW_S_FIN, Some(FLOW_S_SYN | FLOW_S_FIN), 0, 0);
    assert!(expired(&closed, S, &t, &BTreeSet::new()).0.is_empty());
    assert_eq!(expired(&closed, 3 * S, &t, &BTreeSet::new()).0.len(), 2);
    let reset = conn(FLOW_S_SYN | FLOW_S_RST, Some(FLOW_S_SYN), 0, 0);
    assert!(expired(&reset, S / 2, &t, &BTreeSet::new()).0.is_empty());
    assert_eq!(expired(&reset, 2 * S, &t, &BTreeSet::new()).0.len(), 2);
    // Half-closed: still carrying the other direction, idle timeout applies.
    let half = conn(FLOW_S_SYN | FLOW_S_FIN, Some(FLOW_S_SYN), 0, 0);
    assert!(expired(&half, 11 * S, &t, &BTreeSet::new()).0.is_empty());
}

#[test]
fn a_handshake_the_client_never_completes_times_out_like_a_syn() {
    let t = Timeouts::default();
    // The backend answered, the client (a spoofed source) never acknowledged.
    let flows = conn(FLOW_S_SYN, Some(FLOW_S_SYN), 0, 0);
    assert!(expired(&flows, 59 * S, &t, &BTreeSet::new()).0.is_empty());
    assert_eq!(expired(&flows, 61 * S, &t, &BTreeSet::new()).0.len(), 2);
}

#[test]
fn unanswered_syn_times_out() {
    let t = Timeouts::default();
    let flows = conn(FLOW_S_SYN, Some(0), 0, 0);
    assert!(expired(&flows, 59 * S, &t, &BTreeSet::new()).0.is_empty());
    assert_eq!(expired(&flows, 61 * S, &t, &BTreeSet::new()).0.len(), 2);
}

#[test]
fn drained_listener_connections_go_and_orphans_are_collected() {
    let t = Timeouts::default();
    let flows = conn(FLOW_S_SYN | 2, Some(FLOW_S_SYN | 2), 10 * S, 10 * S);
    let drained: BTreeSet<u16> = [8088].into();
    assert_eq!(expired(&flows, 10 * S, &t, &drained).0.len(), 2);
    // A backend entry left alone (its client entry moved to another backend).
    let orphan = vec![conn(FLOW_S_SYN, Some(0), 0, 0)[1]];
    assert!(expired(&orphan, S, &t, &BTreeSet::new()).0.is_empty());
    assert_eq!(expired(&orphan, 3 * S, &t, &BTreeSet::new()).0.len(), 1);
}

#[test]
fn ports_parse_and_reserved_ranges_read() {
    assert_eq!(parse_ports("61000-65535").ok(), Some((61000, 65535)));
    assert!(parse_ports("65535-61000").is_err());
    assert!(parse_ports("80-90").is_err());
    assert!(parse_ports("x").is_err());
    assert_eq!(
        reserved_ranges("8080,61000-65535\n"),
        vec![(8080, 8080), (61000, 65535)]
    );
    assert!(reserved_ranges("\n").is_empty());
}

#[test]
fn removed_connections_say_how_they_ended() {
    let flow = |state| Flow {
        state,
        ..Flow::default()
    };
    let est = FLOW_S_SYN | FLOW_S_ACK;
    let reason = |c, b: Option<u32>, drained| end_reason(&flow(c), b.map(flow).as_ref(), drained);
    assert_eq!(
        reason(est | FLOW_S_RST, Some(est), false),
        EndReason::ClientReset
    );
    assert_eq!(
        reason(est, Some(est | FLOW_S_RST), false),
        EndReason::BackendReset
    );
    assert_eq!(
        reason(est | FLOW_S_FIN, Some(est | FLOW_S_FIN), false),
        EndReason::Fin
    );
    assert_eq!(reason(est, Some(est), true), EndReason::Drained);
    assert_eq!(reason(FLOW_S_SYN, None, false), EndReason::HandshakeTimeout);
    // The program reset the client after its last attempt and removed the backend's
    // entry; or the backend reset the SYN and the client gave up before retrying.
    assert_eq!(
        reason(FLOW_S_SYN | FLOW_S_RST, None, false),
        EndReason::ConnectFailed
    );
    assert_eq!(
        reason(FLOW_S_SYN, Some(FLOW_S_RST), false),
        EndReason::ConnectFailed
    );
    assert_eq!(
        reason(FLOW_S_SYN, Some(0), false),
        EndReason::HandshakeTimeout
    );
    assert_eq!(reason(est, Some(est), false), EndReason::IdleTimeout);
}

#[test]
fn removed_connection_record_carries_the_counters() {
    let k = FlowKey {
        src_be: v4([10, 200, 0, 2]),
        sport: 40_000,
        ..FlowKey::default()
    };
    let c = Flow {
        new_dst_be: v4([10, 200, 1, 2]),
        new_dport: 3001,
        listener_port: 8088,
        created_ns: 1_000_000_000,
        last_seen_ns: 3_000_000_000,
        packets: 5,
        bytes: 600,
        ..Flow::default()
    };
    let b = Flow {
        last_seen_ns: 3_500_000_000,
        packets: 4,
        bytes: 400,
        ..Flow::default()
    };
    let r = record_of(&k, &c, Some(&b), EndReason::Fin, 4_000_000_000);
    assert_eq!(r.client, "10.200.0.2:40000".parse().expect("addr"));
    assert_eq!(r.backend, Some("10.200.1.2:3001".parse().expect("addr")));
    assert_eq!(r.listener.port, 8088);
    assert_eq!(r.datapath, PathName::Forward);
    assert!((r.duration_seconds - 2.5).abs() < 1e-9);
    assert_eq!(
        (r.bytes_client_to_backend, r.bytes_backend_to_client),
        (600, 400)
    );
    assert_eq!(
        (r.segments_client_to_backend, r.segments_backend_to_client),
        (Some(5), Some(4))
    );
}

#[test]
fn a_failed_connect_record_says_how_many_attempts() {
    let c = Flow {
        state: FLOW_S_SYN | FLOW_S_RST,
        attempts: 2,
        ..Flow::default()
    };
    let end = end_reason(&c, None, false);
    let r = record_of(&FlowKey::default(), &c, None, end, 0);
    assert_eq!(r.end, EndReason::ConnectFailed);
    assert_eq!(
        r.detail.as_deref(),
        Some("no connect succeeded (2 attempts)")
    );
    let ok = record_of(&FlowKey::default(), &c, None, EndReason::Fin, 0);
    assert_eq!(ok.detail, None);
}
