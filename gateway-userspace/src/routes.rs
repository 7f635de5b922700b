//! The fixed route table of `--route PORT=ADDR:PORT[*WEIGHT][,ADDR:PORT[*WEIGHT]...]`:
//! a desired state without Gateway API objects, for quick use and data path tests.
use std::{collections::BTreeMap, net::SocketAddr};

use crate::desired::{Backend, DesiredState, Listener};

/// A `--route` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid --route {spec:?}: {reason} (expected PORT=ADDR:PORT[*WEIGHT][,...], e.g. 8088=10.0.0.2:3001*2)"
)]
pub struct RouteError {
    pub spec: String,
    pub reason: String,
}

/// Parses `--route` values into a desired state.
pub fn parse(specs: &[String]) -> Result<DesiredState, RouteError> {
    let mut listeners = BTreeMap::new();
    for spec in specs {
        let err = |reason: &str| RouteError {
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
                (Some(a), a.to_string())
            };
            backends.push(Backend {
                addr,
                weight,
                backend_ref,
            });
        }
        listeners.insert(
            port,
            Listener {
                port,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weights_and_invalid() {
        let d = parse(&["8088=10.0.0.2:3001*2,invalid*3,[::1]:5".into()]).expect("parses");
        let l = &d.listeners[&8088];
        assert_eq!(l.backends.len(), 3);
        assert_eq!(l.backends[0].weight, 2);
        assert_eq!(l.backends[1].addr, None);
        assert_eq!(l.backends[1].weight, 3);
        assert_eq!(l.backends[2].addr, Some("[::1]:5".parse().expect("addr")));
        assert!(parse(&["x=1".into()]).is_err());
        assert!(parse(&["80=nope".into()]).is_err());
    }
}
