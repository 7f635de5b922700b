//! The fixed route table of `--route PORT=ADDR:PORT[*WEIGHT][,ADDR:PORT[*WEIGHT]...]`:
//! a desired state without Gateway API objects, for quick use and data path tests.
//!
//! A backend whose address the [`BackendFilter`] refuses (loopback, link-local, ...) is
//! an error at start: the agent does not run with a table it would not fully serve.
use std::{collections::BTreeMap, net::SocketAddr};

use crate::{
    backend_filter::{ALLOW_FLAG, BackendFilter, RefusalReason},
    desired::{Backend, DesiredState, Listener},
};

/// A `--route` value that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The value does not parse.
    #[error(
        "invalid --route {spec:?}: {reason} (expected PORT=ADDR:PORT[*WEIGHT][,...], e.g. 8088=10.0.0.2:3001*2)"
    )]
    Syntax {
        /// The `--route` value.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A backend address is in a refused range.
    #[error(
        "--route {spec:?}: backend {addr} refused: {} (allow it with {ALLOW_FLAG} {})",
        reason.describe(),
        addr.ip().to_canonical()
    )]
    Refused {
        /// The `--route` value.
        spec: String,
        /// The refused backend.
        addr: SocketAddr,
        /// Why it is refused.
        reason: RefusalReason,
    },
}

/// Parses `--route` values into a desired state; every backend address must pass
/// `filter`.
pub fn parse(specs: &[String], filter: &BackendFilter) -> Result<DesiredState, RouteError> {
    let mut listeners = BTreeMap::new();
    for spec in specs {
        let err = |reason: &str| RouteError::Syntax {
            spec: spec.clone(),
            reason: reason.to_owned(),
        };
        let (port, rest) = spec.split_once('=').ok_or_else(|| err("no '='"))?;
        let port: u16 = port.trim().parse().map_err(|_| err("bad listener port"))?;
        let mut backends = Vec::new();
        for item in rest.split(',').filter(|s| !s.is_empty()) {
            let (addr, weight) = match item.split_once('*') {
                Some((a, w)) => (a, w.parse::<u32>().map_err(|_| err("bad weight"))?),
                None => (item, 1),
            };
            let (addr, backend_ref) = if addr == "invalid" {
                (None, "invalid".to_owned())
            } else {
                let a: SocketAddr = addr.parse().map_err(|_| err("bad backend address"))?;
                filter.check(a.ip()).map_err(|reason| RouteError::Refused {
                    spec: spec.clone(),
                    addr: a,
                    reason,
                })?;
                (Some(a), a.to_string())
            };
            backends.push(Backend {
                addr,
                weight,
                backend_ref,
                endpoint_slice: None,
            });
        }
        listeners.insert(
            port,
            Listener {
                port,
                addresses: Vec::new(),
                origin: format!("--route {port}"),
                route: None,
                backends,
            },
        );
    }
    Ok(DesiredState {
        generation: 1,
        listeners,
        guards: BTreeMap::new(),
        refused: Vec::new(),
        left_out: Vec::new(),
        unready: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weights_and_invalid() {
        let f = BackendFilter::default();
        let d = parse(&["8088=10.0.0.2:3001*2,invalid*3,[fd00::1]:5".into()], &f).expect("parses");
        let l = &d.listeners[&8088];
        assert_eq!(l.backends.len(), 3);
        assert_eq!(l.backends[0].weight, 2);
        assert_eq!(l.backends[1].addr, None);
        assert_eq!(l.backends[1].weight, 3);
        assert_eq!(
            l.backends[2].addr,
            Some("[fd00::1]:5".parse().expect("addr"))
        );
        assert!(matches!(
            parse(&["x=1".into()], &f),
            Err(RouteError::Syntax { .. })
        ));
        assert!(matches!(
            parse(&["80=nope".into()], &f),
            Err(RouteError::Syntax { .. })
        ));
    }

    #[test]
    fn refused_backends_are_an_error_naming_address_and_flag() {
        let f = BackendFilter::default();
        let e = parse(&["8088=10.0.0.2:3001,127.0.0.1:22".into()], &f).expect_err("refused");
        assert!(matches!(
            e,
            RouteError::Refused {
                reason: RefusalReason::Loopback,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "--route \"8088=10.0.0.2:3001,127.0.0.1:22\": backend 127.0.0.1:22 refused: loopback address (allow it with --allow-backend-cidr 127.0.0.1)"
        );
        for (spec, reason) in [
            ("1=[::1]:22", RefusalReason::Loopback),
            ("1=[::ffff:127.0.0.1]:22", RefusalReason::Loopback),
            ("1=169.254.169.254:80", RefusalReason::LinkLocal),
            ("1=[fe80::1]:80", RefusalReason::LinkLocal),
            ("1=0.0.0.0:80", RefusalReason::Unspecified),
            ("1=224.0.0.1:80", RefusalReason::Multicast),
        ] {
            match parse(&[spec.into()], &f) {
                Err(RouteError::Refused { reason: r, .. }) => assert_eq!(r, reason, "{spec}"),
                other => panic!("{spec}: {other:?}"),
            }
        }
        let allow = BackendFilter::allowing(["127.0.0.0/8".parse().expect("cidr")]);
        let d = parse(&["8088=127.0.0.1:22".into()], &allow).expect("allowed");
        assert_eq!(
            d.listeners[&8088].backends[0].addr,
            Some("127.0.0.1:22".parse().expect("addr"))
        );
    }
}
