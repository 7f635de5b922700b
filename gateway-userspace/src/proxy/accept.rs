//! What the accept loop does when `accept(2)` fails.
//!
//! A failed accept leaves the pending connection in the listen queue, so the listener
//! stays readable and the next accept fails at once: retried without a pause, the
//! loop spins and logs at the rate of the retries. Errors are sorted into:
//!
//! * resource errors (`EMFILE`/`ENFILE`: the descriptor limit; `ENOBUFS`/`ENOMEM`):
//!   the agent pauses before the next accept, doubling the pause from
//!   [`FIRST_PAUSE`] up to [`MAX_PAUSE`], keeps the listener, warns once when the
//!   episode starts, logs at debug while it lasts and at info once accepting works
//!   again;
//! * errors of one pending connection (`ECONNABORTED`, `EPROTO`, `EPERM`): that
//!   connection is gone, the next one is accepted at once (debug);
//! * anything else: the same pause and logs as a resource error.
//!
//! Every failure is counted by reason (`sockgate_accept_errors_total`).
use std::{io, time::Duration};

/// First pause after a resource error.
pub const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between two accept attempts while the error persists.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Why an accept failed, as counted in `sockgate_accept_errors_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AcceptErrorReason {
    /// The process or the system reached its open-file limit.
    Descriptors,
    /// The kernel lacked memory for the socket.
    Memory,
    /// The pending connection was aborted before it could be accepted.
    Connection,
    /// Any other error.
    Other,
}

impl AcceptErrorReason {
    /// Sorts an accept error.
    pub fn of(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => Self::Descriptors,
            Some(libc::ENOBUFS | libc::ENOMEM) => Self::Memory,
            Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => Self::Connection,
            _ => Self::Other,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Descriptors => "descriptors",
            Self::Memory => "memory",
            Self::Connection => "connection",
            Self::Other => "other",
        }
    }

    /// Whether the failure is about one pending connection only: retry at once.
    fn per_connection(self) -> bool {
        self == Self::Connection
    }
}

/// What to do after a failed accept.
#[derive(Debug, PartialEq, Eq)]
pub struct AfterFailure {
    /// Pause before the next attempt (zero: at once).
    pub pause: Duration,
    /// The failure starts an episode: log it at warn (otherwise at debug).
    pub first: bool,
}

/// The state of one listener's accept loop across failures.
#[derive(Debug, Default)]
pub struct Backoff {
    /// Pause of the current episode; `None` outside an episode.
    pause: Option<Duration>,
    /// Failed attempts in the current episode.
    failures: u64,
}

impl Backoff {
    /// Records a failed accept.
    pub fn failed(&mut self, reason: AcceptErrorReason) -> AfterFailure {
        if reason.per_connection() {
            return AfterFailure {
                pause: Duration::ZERO,
                first: false,
            };
        }
        self.failures += 1;
        let (pause, first) = match self.pause {
            None => (FIRST_PAUSE, true),
            Some(p) => ((p * 2).min(MAX_PAUSE), false),
        };
        self.pause = Some(pause);
        AfterFailure { pause, first }
    }

    /// Records a successful accept; returns the failed attempts of the episode it
    /// ends, if one was under way (then log at info that accepting works again).
    pub fn succeeded(&mut self) -> Option<u64> {
        self.pause.take()?;
        Some(std::mem::take(&mut self.failures))
    }
}

/// The soft open-file limit of this process, for the log line.
pub fn open_file_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn reasons() {
        assert_eq!(
            AcceptErrorReason::of(&err(libc::EMFILE)),
            AcceptErrorReason::Descriptors
        );
        assert_eq!(
            AcceptErrorReason::of(&err(libc::ENFILE)),
            AcceptErrorReason::Descriptors
        );
        assert_eq!(
            AcceptErrorReason::of(&err(libc::ENOBUFS)),
            AcceptErrorReason::Memory
        );
        assert_eq!(
            AcceptErrorReason::of(&err(libc::ECONNABORTED)),
            AcceptErrorReason::Connection
        );
        assert_eq!(
            AcceptErrorReason::of(&err(libc::EINVAL)),
            AcceptErrorReason::Other
        );
    }

    #[test]
    fn pause_doubles_up_to_the_bound_and_warns_once() {
        let mut b = Backoff::default();
        let first = b.failed(AcceptErrorReason::Descriptors);
        assert_eq!(
            first,
            AfterFailure {
                pause: FIRST_PAUSE,
                first: true
            }
        );
        let pauses: Vec<Duration> = (0..20)
            .map(|_| {
                let a = b.failed(AcceptErrorReason::Descriptors);
                assert!(!a.first);
                a.pause
            })
            .collect();
        assert_eq!(pauses[0], FIRST_PAUSE * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(pauses.last(), Some(&MAX_PAUSE));
        // 21 failures in the episode, ended by a success; the next one starts anew.
        assert_eq!(b.succeeded(), Some(21));
        assert_eq!(b.succeeded(), None);
        assert!(b.failed(AcceptErrorReason::Memory).first);
    }

    #[test]
    fn an_aborted_connection_is_no_episode() {
        let mut b = Backoff::default();
        let a = b.failed(AcceptErrorReason::Connection);
        assert_eq!(a.pause, Duration::ZERO);
        assert!(!a.first);
        assert_eq!(b.succeeded(), None);
    }
}
