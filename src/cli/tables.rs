//! `clvflow files` and `clvflow vacuum`: an output table's committed files, and deleting the
//! files no version of a Delta table needs any more.

use anyhow::anyhow;

use crate::error::Error;
use crate::project::Project;
use crate::sink::log::TableLog;
use crate::storage::delta;

/// Prints the data files of the table's committed state: a Delta table's current version, or
/// the last published commit of clvflow's log.
pub async fn files(project: &Project, url: &str) -> anyhow::Result<()> {
    let loc = project.stores.resolve(url).map_err(Error::Usage)?;
    if delta::is_delta(&loc).await? {
        let Some(table) = delta::open(&loc, &delta::Version::Latest).await? else {
            return Err(anyhow!("{url} has no Delta log"));
        };
        for (path, _, _) in crate::sink::delta::current_files(&table)? {
            println!("{}", loc.child(&path).url);
        }
        return Ok(());
    }
    let log = TableLog::new(loc)?;
    let v = log.published().await?;
    if v == 0 {
        return Err(anyhow!("{url} has no published commit yet"));
    }
    let commit = log.read_commit(v).await?;
    for f in &commit.files {
        println!("{}", log.table.child(&f.path).url);
    }
    Ok(())
}

/// Vacuums the Delta table at `url`; prints the files deleted (or, dry, to be deleted).
pub async fn vacuum(
    project: &Project,
    url: &str,
    retain: Option<std::time::Duration>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let loc = project.stores.resolve(url).map_err(Error::Usage)?;
    let done = crate::sink::vacuum::vacuum(&loc, retain, dry_run).await?;
    for f in &done.files {
        println!("{}", loc.child(f).url);
    }
    eprintln!(
        "{} {} file(s) of {url} (retention {})",
        if dry_run { "would delete" } else { "deleted" },
        done.files.len(),
        humantime::format_duration(done.retention)
    );
    Ok(())
}
