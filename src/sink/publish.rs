//! Publishing a committed run, and recovering from runs that died.
//!
//! Publishing moves each staged file to its place in the table, then records `published.json`,
//! then deletes the files the commit replaced and the run's staging folder. So every file of the
//! published version exists at any time: before the switch the old version's files are all still
//! there, after it the new version's files are all moved in. Every step is idempotent, so a
//! publish that was killed half way is simply done again by the next run ("roll forward"): a
//! commit marker, once created, always ends up fully published, and the replaced files of the
//! latest commit are deleted again by every recovery (deleting an absent file is a no-op). Staged
//! files of runs that never committed are deleted by the next run.

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt};

use super::failpoint;
use super::log::{Commit, TableLog};
use crate::error::{Error, Result};

/// How many files are moved or deleted at once.
const CONCURRENCY: usize = 16;

/// Makes `commit` fully visible in the table. Safe to call again after any interruption.
pub async fn publish(log: &TableLog, commit: &Commit) -> Result<()> {
    let store = log.table.store.object_store.clone();
    let moves: Vec<_> = commit
        .added
        .iter()
        .map(|a| (log.log_path(&a.staged), log.table_path(&a.file.path)))
        .collect();
    let mut moves = moves.into_iter();
    if let Some(first) = moves.next() {
        move_one(store.as_ref(), log, &first.0, &first.1).await?;
        failpoint::hit(failpoint::MID_PUBLISH).await?;
    }
    futures::stream::iter(moves.map(|(from, to)| {
        let store = store.clone();
        async move { move_one(store.as_ref(), log, &from, &to).await }
    }))
    .buffer_unordered(CONCURRENCY)
    .try_collect::<Vec<()>>()
    .await?;

    log.set_published(commit.version).await?;
    failpoint::hit(failpoint::AFTER_PUBLISHED).await?;
    delete_replaced(log, commit).await?;
    delete_prefix(log, &log.log_path(&super::staging_rel(&commit.run_id))).await
}

/// Deletes the files `commit` replaced (already gone is fine).
async fn delete_replaced(log: &TableLog, commit: &Commit) -> Result<()> {
    let store = log.table.store.object_store.clone();
    // Owned paths: a closure over borrowed items makes this future fail the Send check.
    let removed: Vec<object_store::path::Path> = commit
        .removed
        .iter()
        .map(|rel| log.table_path(rel))
        .collect();
    futures::stream::iter(removed.into_iter().map(|path| {
        let store = store.clone();
        async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::store(
                    log.table.url.clone(),
                    format!("delete replaced file {path}"),
                    e,
                )),
            }
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .try_collect::<Vec<()>>()
    .await?;

    Ok(())
}

/// Moves a staged file into the table. Already moved (staged gone, target there) is fine.
pub(super) async fn move_one(
    store: &dyn ObjectStore,
    log: &TableLog,
    from: &object_store::path::Path,
    to: &object_store::path::Path,
) -> Result<()> {
    match store.rename(from, to).await {
        Ok(()) => Ok(()),
        Err(object_store::Error::NotFound { .. }) => match store.head(to).await {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::store(
                log.table.url.clone(),
                format!(
                    "publish {to}: neither the staged file {from} nor the published file exists"
                ),
                e,
            )),
        },
        Err(e) => Err(Error::store(
            log.table.url.clone(),
            format!("move {from} to {to}"),
            e,
        )),
    }
}

/// Deletes everything under `prefix`.
pub async fn delete_prefix(log: &TableLog, prefix: &object_store::path::Path) -> Result<()> {
    let metas = log.list(prefix).await?;
    delete_objects(log, metas).await
}

/// Deletes these objects of the log's store (already gone is fine).
pub(super) async fn delete_objects(
    log: &TableLog,
    metas: Vec<object_store::ObjectMeta>,
) -> Result<()> {
    let store = log.table.store.object_store.clone();
    futures::stream::iter(metas.into_iter().map(|m| {
        let store = store.clone();
        async move {
            match store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::store(
                    log.log.url.clone(),
                    format!("delete {}", m.location),
                    e,
                )),
            }
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .try_collect::<Vec<()>>()
    .await?;
    Ok(())
}

/// What recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// A commit whose publish was interrupted and has now been completed.
    pub rolled_forward: Option<u64>,
    /// Staged files of uncommitted runs that were deleted.
    pub staged_files_removed: usize,
}

/// Brings the table to a clean state before a new run writes: finishes an interrupted publish,
/// deletes what uncommitted runs left. Assumes no other run writes this table now (one job owns
/// a table; the scheduler never runs a job twice at once).
pub async fn recover(log: &TableLog) -> Result<Recovery> {
    let mut rec = Recovery::default();
    if let Some(latest) = log.latest().await? {
        if log.published().await? < latest.version {
            publish(log, &latest).await?;
            rec.rolled_forward = Some(latest.version);
        } else {
            // Published, but the run may have died before its replaced files were all gone.
            delete_replaced(log, &latest).await?;
        }
    }
    let staging = log.log_path("staging");
    rec.staged_files_removed = log.list(&staging).await?.len();
    if rec.staged_files_removed > 0 {
        delete_prefix(log, &staging).await?;
    }
    Ok(rec)
}
