//! The soak's configuration and its changes: Gateway API manifests in a directory that
//! the agent reads (`--source files`), rewritten whole (write, then rename) at every
//! step of [`SCRIPT`].
//!
//! Every bed gets the same manifests: a Gateway with listener `main` ([`MAIN_PORT`],
//! its route to Services `svc-0`..`svc-2` with weights) and listener `churn`
//! ([`CHURN_PORT`], whose route comes and goes). Service `svc-i` is backend `i`'s
//! [`BACKEND_PORT`].
use std::{fmt::Write as _, io, net::Ipv4Addr, path::Path};

/// The listener whose route stays.
pub const MAIN_PORT: u16 = 17000;
/// The listener whose route is added and removed.
pub const CHURN_PORT: u16 = 17001;
/// Where every backend listens.
pub const BACKEND_PORT: u16 = 7000;
/// Backends per bed.
pub const BACKENDS: usize = 3;

/// The configuration at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// Weight of each backendRef of the main route.
    pub weights: [u32; BACKENDS],
    /// Whether each backend's endpoint is ready.
    pub ready: [bool; BACKENDS],
    /// Whether the churned listener has its route.
    pub churn_route: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            weights: [1; BACKENDS],
            ready: [true; BACKENDS],
            churn_route: false,
        }
    }
}

/// One step of the script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Weights([u32; BACKENDS]),
    ChurnRoute(bool),
    Ready(usize, bool),
    /// Kill backend `i`'s process (SIGKILL).
    Kill(usize),
    /// Start backend `i`'s process again.
    Restart(usize),
}

/// The changes, one every period, in a loop. Ends where it started (weights equal,
/// all ready, the churned route absent, every backend running).
pub const SCRIPT: [Step; 8] = [
    Step::Weights([3, 1, 1]),
    Step::ChurnRoute(true),
    Step::Ready(1, false),
    Step::Ready(1, true),
    Step::Kill(2),
    Step::Restart(2),
    Step::ChurnRoute(false),
    Step::Weights([1, 1, 1]),
];

impl State {
    /// The state after `step` (processes are not part of it).
    pub fn apply(&mut self, step: Step) {
        match step {
            Step::Weights(w) => self.weights = w,
            Step::ChurnRoute(on) => self.churn_route = on,
            Step::Ready(i, r) => self.ready[i] = r,
            Step::Kill(_) | Step::Restart(_) => {}
        }
    }

    /// The manifests of this state, with backend `i` at `backend_addr(i)`.
    pub fn manifests(&self, backend_addr: impl Fn(usize) -> Ipv4Addr) -> String {
        let mut y = String::from(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: sockgate\n\
             spec:\n  controllerName: sockgate.dev/gateway-controller\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: soak\n\
             spec:\n  gatewayClassName: sockgate\n  listeners:\n",
        );
        for (name, port) in [("main", MAIN_PORT), ("churn", CHURN_PORT)] {
            let _ = write!(y, "  - name: {name}\n    protocol: TCP\n    port: {port}\n");
        }
        let _ = write!(
            y,
            "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: main\n\
             spec:\n  parentRefs:\n  - name: soak\n    sectionName: main\n  rules:\n  - backendRefs:\n"
        );
        for (i, w) in self.weights.iter().enumerate() {
            let _ = write!(
                y,
                "    - name: svc-{i}\n      port: {BACKEND_PORT}\n      weight: {w}\n"
            );
        }
        if self.churn_route {
            let _ = write!(
                y,
                "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: churn\n\
                 spec:\n  parentRefs:\n  - name: soak\n    sectionName: churn\n  rules:\n  - backendRefs:\n\
                 \x20   - name: svc-0\n      port: {BACKEND_PORT}\n"
            );
        }
        for i in 0..BACKENDS {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\nspec:\n  ports:\n\
                 \x20 - protocol: TCP\n    port: {BACKEND_PORT}\n    targetPort: {BACKEND_PORT}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n\
                 \x20 labels:\n    kubernetes.io/service-name: svc-{i}\naddressType: IPv4\nports:\n\
                 - port: {BACKEND_PORT}\n  protocol: TCP\nendpoints:\n- addresses: [\"{}\"]\n  conditions:\n    ready: {}\n",
                backend_addr(i),
                self.ready[i]
            );
        }
        y
    }

    /// Writes the manifests into `dir` whole (a temporary file renamed), so the agent
    /// never reads half of them.
    pub fn write(&self, dir: &Path, backend_addr: impl Fn(usize) -> Ipv4Addr) -> io::Result<()> {
        let tmp = dir.join(".soak.yaml.tmp");
        std::fs::write(&tmp, self.manifests(backend_addr))?;
        std::fs::rename(&tmp, dir.join("soak.yaml"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_ends_where_it_started() {
        let mut s = State::default();
        for step in SCRIPT {
            s.apply(step);
        }
        assert_eq!(s, State::default());
        let kills = SCRIPT.iter().filter(|s| matches!(s, Step::Kill(_))).count();
        let restarts = SCRIPT
            .iter()
            .filter(|s| matches!(s, Step::Restart(_)))
            .count();
        assert_eq!(kills, restarts);
    }

    #[test]
    fn manifests_carry_weights_readiness_and_the_churned_route() {
        let s = State {
            weights: [3, 1, 0],
            ready: [true, false, true],
            churn_route: true,
        };
        let y = s.manifests(|i| Ipv4Addr::new(10, 200, i as u8 + 1, 2));
        assert!(y.contains("weight: 3"), "{y}");
        assert!(y.contains("ready: false"), "{y}");
        assert!(y.contains("name: churn\nspec"), "{y}");
        assert!(y.contains("10.200.3.2"), "{y}");
        let y = State::default().manifests(|_| Ipv4Addr::LOCALHOST);
        assert!(!y.contains("name: churn\nspec"), "{y}");
    }
}
