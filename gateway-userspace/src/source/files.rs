//! The file source: a directory of Kubernetes YAML (`*.yaml`, `*.yml`), re-read when a
//! file changes, fed to the same [`reconcile`] as the cluster would be. When the
//! directory stops parsing, the error names the file and line, and the last good
//! desired state keeps serving. Documents of kinds sockgate does not read are skipped
//! and logged once each time what is skipped changes. When the node's addresses change
//! (Gateways with `spec.addresses`), the last good objects are reconciled again.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::manifest::{self, ManifestError, Skipped};
use crate::{
    backend_filter::BackendFilter,
    desired::DesiredState,
    model::{Snapshot, StatusSet, limits::Limits, reconcile},
};

/// The directory cannot be read or does not parse.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A directory or file cannot be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifest does not parse.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The manifest files of `path`: the file itself, or the `*.yaml` / `*.yml` files of a
/// directory (not recursive), sorted by name.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io(path))? {
        let p = entry.map_err(io(path))?.path();
        let yaml = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// The manifests of a path, read.
#[derive(Debug)]
pub struct Loaded {
    /// The objects of the kinds sockgate reads.
    pub snapshot: Snapshot,
    /// The documents of other kinds, by file.
    pub skipped: Skipped,
}

/// Reads every manifest of `path` into a snapshot; documents of kinds sockgate does
/// not read are counted in [`Loaded::skipped`].
pub fn load(path: &Path) -> Result<Loaded, SourceError> {
    let mut objects = Vec::new();
    let mut skipped = Skipped::default();
    for f in manifest_files(path)? {
        let text = std::fs::read_to_string(&f).map_err(io(&f))?;
        let parsed = manifest::parse(&f, &text)?;
        objects.extend(parsed.objects);
        skipped.extend(parsed.skipped);
    }
    Ok(Loaded {
        snapshot: manifest::snapshot(objects)?,
        skipped,
    })
}

/// Name, modification time and size of every manifest: a change of any is a reason to
/// re-read.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(path: &Path) -> Result<Fingerprint, SourceError> {
    manifest_files(path)?
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(&f).map_err(io(&f))?;
            Ok((f, m.modified().ok(), m.len()))
        })
        .collect()
}

/// What one [`FileSource::poll`] found.
#[derive(Debug)]
pub enum Update {
    /// No file changed.
    Unchanged,
    /// Files changed and parse; the new state (its generation bumped when the
    /// listeners differ) and status.
    Changed(Arc<DesiredState>, Box<StatusSet>),
    /// Files changed and do not parse; the last good state stays.
    Failed(SourceError),
}

/// A directory followed by polling.
pub struct FileSource {
    dir: PathBuf,
    controller_name: String,
    backend_filter: BackendFilter,
    limits: Limits,
    seen: Option<Fingerprint>,
    /// The objects of the last good read.
    snapshot: Option<Snapshot>,
    node_addresses: BTreeSet<IpAddr>,
    current: Arc<DesiredState>,
    skipped: Skipped,
}

impl FileSource {
    /// Reads `dir` once; fails if it does not parse (there is no last good state yet).
    /// Endpoints are programmed when `backend_filter` allows their address; what does
    /// not fit `limits` is left out.
    pub fn open(
        dir: &Path,
        controller_name: &str,
        backend_filter: BackendFilter,
        limits: Limits,
    ) -> Result<Self, SourceError> {
        let mut s = Self {
            dir: dir.to_owned(),
            controller_name: controller_name.to_owned(),
            backend_filter,
            limits,
            seen: None,
            snapshot: None,
            node_addresses: BTreeSet::new(),
            current: Arc::new(DesiredState::default()),
            skipped: Skipped::default(),
        };
        if let Update::Failed(e) = s.poll() {
            return Err(e);
        }
        Ok(s)
    }

    /// The last good desired state.
    pub fn current(&self) -> &Arc<DesiredState> {
        &self.current
    }

    /// What the last good read skipped: documents of kinds sockgate does not read.
    pub fn skipped(&self) -> &Skipped {
        &self.skipped
    }

    /// Re-reads the directory if a manifest was added, removed or modified.
    pub fn poll(&mut self) -> Update {
        let fp = match fingerprint(&self.dir) {
            Ok(fp) => fp,
            Err(e) => return Update::Failed(e),
        };
        if self.seen.as_ref() == Some(&fp) {
            return Update::Unchanged;
        }
        self.seen = Some(fp);
        let Loaded { snapshot, skipped } = match load(&self.dir) {
            Ok(l) => l,
            Err(e) => return Update::Failed(e),
        };
        if skipped != self.skipped {
            log_skipped(&self.dir, &skipped);
            self.skipped = skipped;
        }
        self.snapshot = Some(snapshot);
        self.reconcile()
    }

    /// The node's addresses changed: the last good objects are reconciled again
    /// (`Unchanged` before a good read).
    pub fn set_node_addresses(&mut self, addresses: BTreeSet<IpAddr>) -> Update {
        self.node_addresses = addresses;
        if self.snapshot.is_none() {
            return Update::Unchanged;
        }
        self.reconcile()
    }

    fn reconcile(&mut self) -> Update {
        let Some(snapshot) = &self.snapshot else {
            return Update::Unchanged;
        };
        let mut params =
            super::params_now(&self.controller_name, &self.backend_filter, self.limits);
        params.node_addresses.clone_from(&self.node_addresses);
        let (mut desired, status) = reconcile(snapshot, &params);
        desired.generation = if desired.listeners == self.current.listeners {
            self.current.generation
        } else {
            self.current.generation.wrapping_add(1)
        };
        self.current = Arc::new(desired);
        Update::Changed(self.current.clone(), Box::new(status))
    }
}

/// Says what is skipped now, one line per file (called when that changed).
fn log_skipped(dir: &Path, skipped: &Skipped) {
    if skipped.is_empty() {
        info!(dir = %dir.display(), "manifests: no kinds skipped any more");
    }
    for (file, counts) in skipped.by_file() {
        info!(
            file = %file.display(),
            skipped = %counts,
            "manifests: skipped kinds sockgate does not read"
        );
    }
}

/// Polls `source` every `interval` until `shutdown`, and reconciles again when the
/// node's addresses (`node`) change, sending each new desired state to `tx` and
/// calling `program` with it first (the map writer). Errors are logged; the last good
/// state keeps serving.
pub async fn follow(
    mut source: FileSource,
    interval: Duration,
    mut node: Option<watch::Receiver<BTreeSet<IpAddr>>>,
    tx: watch::Sender<Arc<DesiredState>>,
    mut program: impl FnMut(&DesiredState) + Send,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The node's addresses as they are now count as a change.
    let mut first = node
        .as_mut()
        .map(|rx| source.set_node_addresses(rx.borrow_and_update().clone()));
    loop {
        let update = if let Some(u) = first.take() {
            u
        } else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => source.poll(),
                Some(addrs) = node_changed(node.as_mut()) => source.set_node_addresses(addrs),
            }
        };
        match update {
            Update::Unchanged => {}
            Update::Changed(desired, _) => {
                if **tx.borrow() != *desired {
                    info!(
                        dir = %source.dir.display(),
                        node_addresses = ?source.node_addresses,
                        generation = desired.generation,
                        listeners = desired.listeners.len(),
                        "manifests changed: new desired state"
                    );
                    program(&desired);
                    let _ = tx.send(desired);
                }
            }
            Update::Failed(e) => {
                error!(error = %e, "manifests rejected; the last good configuration keeps serving");
            }
        }
    }
}

/// The node's addresses when they change; `None` once the sender is gone, pending
/// without a receiver.
async fn node_changed(
    node: Option<&mut watch::Receiver<BTreeSet<IpAddr>>>,
) -> Option<BTreeSet<IpAddr>> {
    let Some(rx) = node else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        return std::future::pending().await;
    }
    Some(rx.borrow_and_update().clone())
}
