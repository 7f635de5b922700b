//! `sockgate check`: reads manifests, reconciles offline (no privileges, no maps) and
//! renders the status sockgate would write and the listener/backend table, beside the
//! kinds it skipped (said apart, so the report stays parseable).
use std::path::Path;

use crate::{
    model::{Params, reconcile, report},
    source::{
        files::{self, SourceError},
        manifest::Skipped,
    },
};

/// Output format of `sockgate check`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// YAML.
    #[default]
    Yaml,
    /// JSON.
    Json,
}

/// `sockgate check` failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The input does not read or parse.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The report cannot be rendered.
    #[error("rendering the report: {0}")]
    Render(String),
}

/// What `sockgate check` says about a path.
#[derive(Debug)]
pub struct Rendered {
    /// The report in the asked format (for stdout).
    pub report: String,
    /// The documents of kinds sockgate does not read (for stderr); its `Display` is
    /// one line per file.
    pub skipped: Skipped,
}

/// Renders the report of the manifests under `path` (a file or a directory).
pub fn render(path: &Path, params: &Params, format: Format) -> Result<Rendered, CheckError> {
    let loaded = files::load(path)?;
    let snap = &loaded.snapshot;
    let (desired, status) = reconcile(snap, params);
    let r = report::build(snap, &desired, &status);
    let report = match format {
        Format::Yaml => serde_yaml::to_string(&r).map_err(|e| CheckError::Render(e.to_string())),
        Format::Json => serde_json::to_string_pretty(&r)
            .map(|s| s + "\n")
            .map_err(|e| CheckError::Render(e.to_string())),
    }?;
    Ok(Rendered {
        report,
        skipped: loaded.skipped,
    })
}
