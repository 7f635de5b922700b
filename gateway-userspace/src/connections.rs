//! `sockgate connections`: the live connections, one per line. The socket paths'
//! come from the agent (its `/connections` endpoint); the forward path's from the
//! pinned `GW_FWD_FLOWS` alone, so they are listed whether the agent runs or not.
use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use aya::maps::{HashMap, Map};
use gateway_common::{
    DIR_CLIENT_TO_BACKEND, FLOW_S_ACK, FLOW_S_FIN, FLOW_S_RST, FLOW_S_SYN, Flow, FlowKey,
    GW_FWD_FLOWS,
};

use crate::{
    access_log::{ListenerRef, LiveConnection, PathName},
    status::{self, StatusError},
    xdp::Cidr,
};

/// Errors of listing connections.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("agent at {addr}: {source}")]
    Agent {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("agent at {addr} answered {status:?}")]
    AgentStatus { addr: SocketAddr, status: String },
    #[error("agent at {addr}: not a connection list: {source}")]
    Decode {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Pinned(#[from] StatusError),
}

/// Which connections to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Listener port.
    pub listener: Option<u16>,
    /// Client addresses.
    pub client: Option<Cidr>,
    /// Backend: `IP`, `IP:PORT`, or a backendRef (`namespace/service[:port]`).
    pub backend: Option<String>,
}

impl Filter {
    /// Whether `c` passes.
    pub fn keeps(&self, c: &LiveConnection) -> bool {
        if self.listener.is_some_and(|p| p != c.listener.port) {
            return false;
        }
        if self
            .client
            .is_some_and(|cidr| !cidr.contains(c.client.ip()))
        {
            return false;
        }
        match &self.backend {
            None => true,
            Some(b) => {
                if let Ok(sa) = b.parse::<SocketAddr>() {
                    c.backend == Some(sa)
                } else if let Ok(ip) = b.parse::<IpAddr>() {
                    c.backend.is_some_and(|a| a.ip() == ip)
                } else {
                    c.backend_ref
                        .as_deref()
                        .is_some_and(|r| r.starts_with(b.as_str()))
                }
            }
        }
    }
}

/// The socket paths' live connections, from the agent's endpoint at `addr`.
pub fn from_agent(addr: SocketAddr) -> Result<Vec<LiveConnection>, ListError> {
    let agent = |source| ListError::Agent { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(agent)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(agent)?;
    write!(
        s,
        "GET /connections HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(agent)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(agent)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_owned();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ListError::AgentStatus { addr, status });
    }
    serde_json::from_str(body).map_err(|source| ListError::Decode { addr, source })
}

fn addr_of(be: [u8; 16], port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::from(be).to_canonical(), port)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// What the segments of both directions showed.
fn state(c2b: u32, b2c: u32) -> &'static str {
    if (c2b | b2c) & FLOW_S_RST != 0 {
        "reset"
    } else if c2b & FLOW_S_FIN != 0 && b2c & FLOW_S_FIN != 0 {
        "closing"
    } else if c2b & FLOW_S_FIN != 0 {
        "client_fin"
    } else if b2c & FLOW_S_FIN != 0 {
        "backend_fin"
    } else if b2c & FLOW_S_SYN != 0 && c2b & FLOW_S_ACK != 0 {
        "established"
    } else {
        "syn_sent"
    }
}

/// The forward path's live connections, from the pinned `GW_FWD_FLOWS` (none when
/// it is not pinned). Bytes are payload bytes, as the program counts them.
pub fn from_flows(pin_dir: &Path) -> Result<Vec<LiveConnection>, ListError> {
    if !pin_dir.join(GW_FWD_FLOWS).exists() {
        return Ok(Vec::new());
    }
    let flows: HashMap<_, FlowKey, Flow> =
        HashMap::try_from(Map::HashMap(status::open(pin_dir, GW_FWD_FLOWS)?))
            .map_err(status::map_err(pin_dir, GW_FWD_FLOWS))?;
    let now = monotonic_ns();
    let mut out = Vec::new();
    for (k, f) in flows.iter().filter_map(Result::ok) {
        if u32::from(f.direction) != DIR_CLIENT_TO_BACKEND {
            continue;
        }
        let reverse = FlowKey {
            src_be: f.new_dst_be,
            dst_be: f.new_src_be,
            sport: f.new_dport,
            dport: f.new_sport,
            _pad: 0,
        };
        let back = flows.get(&reverse, 0).ok();
        #[expect(clippy::cast_precision_loss, reason = "an age in seconds for display")]
        let age_seconds = now.saturating_sub(f.created_ns) as f64 / 1e9;
        out.push(LiveConnection {
            listener: ListenerRef {
                gateway: None,
                listener: String::new(),
                port: f.listener_port,
                route: None,
            },
            client: addr_of(k.src_be, k.sport),
            backend: Some(addr_of(f.new_dst_be, f.new_dport)),
            backend_ref: None,
            endpoint_slice: None,
            datapath: PathName::Forward,
            age_seconds,
            bytes_client_to_backend: f.bytes,
            bytes_backend_to_client: back.map_or(0, |b| b.bytes),
            state: state(f.state, back.map_or(0, |b| b.state)).to_owned(),
        });
    }
    out.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
    Ok(out)
}

/// One line per connection under a header.
pub fn render(conns: &[LiveConnection]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<8} {:<8} {:<46} {:<46} {:>9} {:>14} {:>14}  {:<12} ROUTE / BACKENDREF [ENDPOINTSLICE]",
        "LISTENER",
        "PATH",
        "CLIENT",
        "BACKEND",
        "AGE",
        "CLIENT->BACKEND",
        "BACKEND->CLIENT",
        "STATE"
    );
    for c in conns {
        let backend = c.backend.map_or_else(|| "-".to_owned(), |b| b.to_string());
        let path = serde_json::to_value(c.datapath)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let slice = c
            .endpoint_slice
            .as_deref()
            .map_or_else(String::new, |s| format!(" [{s}]"));
        let _ = writeln!(
            o,
            "{:<8} {:<8} {:<46} {:<46} {:>8.1}s {:>14} {:>14}  {:<12} {} {}{slice}",
            c.listener.port,
            path,
            c.client,
            backend,
            c.age_seconds,
            c.bytes_client_to_backend,
            c.bytes_backend_to_client,
            c.state,
            c.listener.route.as_deref().unwrap_or("-"),
            c.backend_ref.as_deref().unwrap_or("-"),
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(port: u16, client: &str, backend: &str, backend_ref: &str) -> LiveConnection {
        LiveConnection {
            listener: ListenerRef::from_origin("ns/gw/tcp", port, Some("ns/r")),
            client: client.parse().expect("client"),
            backend: Some(backend.parse().expect("backend")),
            backend_ref: Some(backend_ref.into()),
            endpoint_slice: None,
            datapath: PathName::Splice,
            age_seconds: 1.5,
            bytes_client_to_backend: 10,
            bytes_backend_to_client: 20,
            state: "established".into(),
        }
    }

    #[test]
    fn filters_by_listener_client_and_backend() {
        let c = conn(80, "10.0.0.7:4000", "10.1.0.2:8080", "ns/web:8080");
        let f = |listener, client: Option<&str>, backend: Option<&str>| Filter {
            listener,
            client: client.map(|c| c.parse().expect("cidr")),
            backend: backend.map(str::to_owned),
        };
        assert!(f(None, None, None).keeps(&c));
        assert!(f(Some(80), Some("10.0.0.0/24"), Some("10.1.0.2")).keeps(&c));
        assert!(!f(Some(81), None, None).keeps(&c));
        assert!(!f(None, Some("10.0.1.0/24"), None).keeps(&c));
        assert!(f(None, None, Some("10.1.0.2:8080")).keeps(&c));
        assert!(!f(None, None, Some("10.1.0.2:8081")).keeps(&c));
        assert!(f(None, None, Some("ns/web")).keeps(&c));
        assert!(!f(None, None, Some("ns/db")).keeps(&c));
    }

    #[test]
    fn forward_states_from_both_directions() {
        assert_eq!(state(FLOW_S_SYN, 0), "syn_sent");
        assert_eq!(
            state(FLOW_S_SYN | FLOW_S_ACK, FLOW_S_SYN | FLOW_S_ACK),
            "established"
        );
        assert_eq!(state(FLOW_S_ACK | FLOW_S_FIN, FLOW_S_ACK), "client_fin");
        assert_eq!(state(FLOW_S_ACK | FLOW_S_FIN, FLOW_S_FIN), "closing");
        assert_eq!(state(FLOW_S_ACK, FLOW_S_RST), "reset");
    }

    #[test]
    fn renders_one_line_per_connection() {
        let mut c = conn(80, "10.0.0.7:4000", "10.1.0.2:8080", "ns/web:8080");
        let text = render(std::slice::from_ref(&c));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("80 "), "{text}");
        assert!(lines[1].contains("10.0.0.7:4000") && lines[1].contains("ns/web:8080"));
        assert!(!lines[1].contains('['), "{text}");
        c.endpoint_slice = Some("ns/web-x7k2p".into());
        let text = render(&[c]);
        assert!(
            text.lines()
                .nth(1)
                .is_some_and(|l| l.ends_with("ns/web:8080 [ns/web-x7k2p]")),
            "{text}"
        );
    }
}
