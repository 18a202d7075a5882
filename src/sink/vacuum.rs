//! `clvflow vacuum`: deleting the files of a Delta table that no version inside its retention
//! window needs (deltalake's vacuum, in two passes with different floors).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::storage::delta;

/// What `clvflow vacuum` did.
#[derive(Debug, Clone)]
pub struct Vacuumed {
    /// The retention window used for replaced files.
    pub retention: Duration,
    /// Files deleted (or, with `dry_run`, that would be), relative to the table.
    pub files: Vec<String>,
}

/// A file that no commit ever named (a run that died between moving its files in and its
/// commit) is deleted only when older than this, whatever the retention: it may belong to a
/// run that is committing right now.
const ORPHAN_AGE: Duration = Duration::from_secs(24 * 3_600);

/// Deletes the files of the Delta table at `loc` that neither its current version nor any
/// version committed inside the retention window (`retain`, default the table's
/// `delta.deletedFileRetentionDuration`) needs: files removed by a commit longer ago than the
/// window, and files never committed that are older than the window and at least a day.
pub async fn vacuum(
    loc: &crate::storage::Location,
    retain: Option<Duration>,
    dry_run: bool,
) -> Result<Vacuumed> {
    use deltalake_core::operations::vacuum::VacuumMode;
    use deltalake_core::table::config::TablePropertiesExt;
    let Some(table) = delta::open(loc, &delta::Version::Latest).await? else {
        return Err(Error::Usage(format!(
            "{} is not a Delta table (it has no {}/)",
            loc.written,
            delta::LOG_FOLDER
        )));
    };
    let configured = table
        .snapshot()
        .map_err(|e| delta::err(loc, "read the table", e))?
        .table_config()
        .deleted_file_retention_duration();
    let retention = retain.unwrap_or(configured);
    let window = |d: Duration| {
        chrono::TimeDelta::from_std(d)
            .map_err(|_| Error::Usage(format!("retention {d:?} is too long")))
    };
    let mut files = Vec::new();
    let mut table = table;
    // Replaced files past the window, then never-committed files past the window and a day.
    for (mode, keep) in [
        (VacuumMode::Lite, retention),
        (VacuumMode::Full, retention.max(ORPHAN_AGE)),
    ] {
        let (t, metrics) = table
            .vacuum()
            .with_mode(mode)
            .with_retention_period(window(keep)?)
            .with_enforce_retention_duration(false)
            .with_dry_run(dry_run)
            .await
            .map_err(|e| delta::err(loc, "vacuum", e))?;
        table = t;
        files.extend(metrics.files_deleted);
    }
    files.sort();
    files.dedup();
    Ok(Vacuumed { retention, files })
}
