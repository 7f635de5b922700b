//! Watches the pinned maps: when their pins (or the whole pin directory) are removed
//! from outside the agent while it runs, it says so once and pins the maps it holds
//! again, so that `sockgate status`, `bpftool` and the next agent find them.
//!
//! Removing a pin does not remove the map: the agent holds every map open, and the
//! programs keep using them. Only the names in bpffs are lost until this puts them
//! back. The forward program's pinned links (`links/`) are not re-pinned here: the
//! attachment manager owns them.
use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::ebpf::Datapath;

/// How often the pins are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Checks the pins every `interval` until `shutdown`.
pub async fn run(dp: Arc<Datapath>, interval: Duration, shutdown: CancellationToken) {
    // Whether the last attempt to pin again failed, so a persistent failure is said once.
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let missing = dp.missing_pins();
        if missing.is_empty() {
            failing = false;
            continue;
        }
        match dp.repin(&missing) {
            Ok(()) => {
                failing = false;
                warn!(
                    pin_dir = %dp.pin_dir().display(),
                    maps = ?missing,
                    "pinned maps were removed from outside the agent; pinned them again (the maps and their entries were never lost)"
                );
            }
            Err(e) if failing => {
                debug!(pin_dir = %dp.pin_dir().display(), error = %e, "pinning the maps again failed");
            }
            Err(e) => {
                failing = true;
                warn!(
                    pin_dir = %dp.pin_dir().display(),
                    maps = ?missing,
                    error = %e,
                    "pinned maps were removed from outside the agent and cannot be pinned again; retrying (logged once until it works)"
                );
            }
        }
    }
}
