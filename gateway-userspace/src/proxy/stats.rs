//! Agent-side counters per listener, flushed to the agent-owned entries of `GW_STATS`.
//!
//! Connection tasks bump atomics; a flusher writes every listener whose counters
//! changed to the map a few times a second, so `sockgate status` and `bpftool` see
//! them without any agent API.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use gateway_common::ListenerStats;

/// Why a client connection was reset instead of proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The listener has no backend with a weight above 0.
    NoBackend,
    /// The backendRef picked is invalid.
    InvalidBackend,
    /// Every connect attempt failed or timed out.
    ConnectFailed,
}

/// Which path carries a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// sockmap redirect in the kernel.
    Kernel,
    /// `splice(2)` in the agent.
    Userspace,
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub connected: AtomicU64,
    pub rejected_no_backend: AtomicU64,
    pub rejected_invalid_backend: AtomicU64,
    pub rejected_connect_failed: AtomicU64,
    pub connect_failures: AtomicU64,
    pub kernel_connections: AtomicU64,
    pub userspace_connections: AtomicU64,
    pub active_kernel: AtomicU64,
    pub active_userspace: AtomicU64,
    pub bytes_c2b_userspace: AtomicU64,
    pub bytes_b2c_userspace: AtomicU64,
    /// Bumped on every change; the flusher writes when it moved.
    pub version: AtomicU64,
}

impl Counters {
    fn bump(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// A client connection was accepted.
    pub fn accepted(&self) {
        self.bump(&self.accepted, 1);
    }

    /// A backend connect attempt failed.
    pub fn connect_failure(&self) {
        self.bump(&self.connect_failures, 1);
    }

    /// A client connection was reset for `reason`.
    pub fn rejected(&self, reason: RejectReason) {
        let c = match reason {
            RejectReason::NoBackend => &self.rejected_no_backend,
            RejectReason::InvalidBackend => &self.rejected_invalid_backend,
            RejectReason::ConnectFailed => &self.rejected_connect_failed,
        };
        self.bump(c, 1);
    }

    /// A connection was connected and starts on `path`.
    pub fn opened(&self, path: Path) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        match path {
            Path::Kernel => {
                self.kernel_connections.fetch_add(1, Ordering::Relaxed);
                self.bump(&self.active_kernel, 1);
            }
            Path::Userspace => {
                self.userspace_connections.fetch_add(1, Ordering::Relaxed);
                self.bump(&self.active_userspace, 1);
            }
        }
    }

    /// A connection was connected and starts on `path`; it counts as closed when the
    /// returned guard is dropped, whether its task ran to the end or was cancelled
    /// (the drain timeout of a removed listener, the agent's shutdown).
    pub fn open(self: &Arc<Self>, path: Path) -> Open {
        self.opened(path);
        Open {
            counters: self.clone(),
            path,
        }
    }

    /// A connection on `path` ended.
    pub fn closed(&self, path: Path) {
        let c = match path {
            Path::Kernel => &self.active_kernel,
            Path::Userspace => &self.active_userspace,
        };
        c.fetch_sub(1, Ordering::Relaxed);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Bytes moved by the agent (userspace path, early data).
    pub fn moved(&self, client_to_backend: bool, n: u64) {
        if n == 0 {
            return;
        }
        if client_to_backend {
            self.bump(&self.bytes_c2b_userspace, n);
        } else {
            self.bump(&self.bytes_b2c_userspace, n);
        }
    }

    /// A snapshot in the map's layout.
    pub fn snapshot(&self) -> ListenerStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ListenerStats {
            accepted: r(&self.accepted),
            connected: r(&self.connected),
            rejected_no_backend: r(&self.rejected_no_backend),
            rejected_invalid_backend: r(&self.rejected_invalid_backend),
            rejected_connect_failed: r(&self.rejected_connect_failed),
            connect_failures: r(&self.connect_failures),
            kernel_connections: r(&self.kernel_connections),
            userspace_connections: r(&self.userspace_connections),
            active_kernel: r(&self.active_kernel),
            active_userspace: r(&self.active_userspace),
            bytes_c2b_userspace: r(&self.bytes_c2b_userspace),
            bytes_b2c_userspace: r(&self.bytes_b2c_userspace),
            ..ListenerStats::default()
        }
    }
}

/// An open connection on a path, counted closed when dropped ([`Counters::open`]).
#[derive(Debug)]
pub struct Open {
    counters: Arc<Counters>,
    path: Path,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.counters.closed(self.path);
    }
}

/// Counters of every listener the agent has served, by port. Entries live as long as
/// the agent, so a listener removed and added again keeps counting.
#[derive(Debug, Default)]
pub struct Registry {
    by_port: Mutex<BTreeMap<u16, (Arc<Counters>, u64)>>,
}

impl Registry {
    /// The counters of `port`, created on first use.
    pub fn get(&self, port: u16) -> Arc<Counters> {
        let mut m = self
            .by_port
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(port)
            .or_insert_with(|| (Arc::new(Counters::default()), u64::MAX))
            .0
            .clone()
    }

    /// Snapshots of the listeners whose counters changed since the last call.
    pub fn changed(&self) -> Vec<(u16, ListenerStats)> {
        let mut m = self
            .by_port
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        for (port, (c, seen)) in m.iter_mut() {
            let v = c.version.load(Ordering::Acquire);
            if v != *seen {
                *seen = v;
                out.push((*port, c.snapshot()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancelled_connection_counts_as_closed() {
        let c = Arc::new(Counters::default());
        let guard = c.open(Path::Userspace);
        assert_eq!(c.snapshot().active_userspace, 1);
        drop(guard);
        assert_eq!(c.snapshot().active_userspace, 0);
        // A connection task cancelled mid-way (as the drain timeout does).
        let task = {
            let c = c.clone();
            async move {
                let _open = c.open(Path::Kernel);
                std::future::pending::<()>().await;
            }
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        cancel.cancel();
        // Biased: the task is polled once (and opens) before the cancellation wins.
        tokio::select! {
            biased;
            () = task => unreachable!("the task never ends by itself"),
            () = cancel.cancelled() => {}
        }
        let s = c.snapshot();
        assert_eq!((s.active_kernel, s.kernel_connections), (0, 1));
        assert_eq!(s.connected, 2);
    }
}
