//! Delta Lake outputs (`format: delta`): the run's files are staged and verified exactly as for
//! Parquet outputs, then moved into the table folder (where no Delta reader sees them: a reader
//! sees only the files the log names) and named by ONE Delta commit, which removes every file of
//! the run's partitions and adds the run's files:
//!
//! ```text
//!  stage + verify ─▶ create the table (version 0, no files) if there is none
//!                 ─▶ move the files into the table folder   (invisible: not in the log)
//!                 ─▶ commit version v+1: remove the run's partitions' files, add the run's
//!                    files, txn(appId = clvflow-<run>-<output>), commitInfo(run, job, date)
//!                    by a create-only put of _delta_log/<v+1>.json: the switch
//! ```
//!
//! A run killed before the put leaves the table at version v (the moved files are orphans that
//! `clvflow vacuum` deletes once they are older than the retention); a run killed after it has
//! committed. A concurrent writer that committed v+1 first makes the put fail: the commit is
//! rebuilt on the new version (its partitions' files, now the other writer's, are the ones
//! removed), so the later commit replaces the earlier one's rows instead of adding to them. The
//! transaction id makes a retried commit of the same run a no-op.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use datafusion::arrow::datatypes::{Field, Schema};
use deltalake_core::DeltaTableError;
use deltalake_core::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake_core::kernel::{Action, Add, StructType, Transaction};
use deltalake_core::operations::create::CreateBuilder;
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::{DeltaTable, TableProperty};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use super::log::{AddedFile, TableLog};
use super::{Output, Replaced, RunInfo, failpoint, publish};
use crate::error::{Error, Result};
use crate::storage::delta;

/// Settings of a `format: delta` output.
#[derive(Debug, Clone, Copy)]
pub struct DeltaOptions {
    pub parquet: super::ParquetOptions,
    /// How long removed files are kept for time travel (`delta.deletedFileRetentionDuration`).
    pub retention: Duration,
    /// A checkpoint every this many commits (`delta.checkpointInterval`).
    pub checkpoint_interval: u64,
}

/// Default `retention:`: Delta's own default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// Default `checkpoint_interval:` (Spark's; a nightly job reads at most 10 JSON commits).
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 10;

/// A staging folder older than this belongs to a run that died: deleted by the next run. Younger
/// ones may be another writer's (two jobs writing one Delta table) and are left alone.
const STALE_STAGING: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// How often a commit is rebuilt on a version another writer committed first.
const MAX_ATTEMPTS: usize = 20;

const CONCURRENCY: usize = 16;

fn interval(d: Duration) -> String {
    format!("interval {} seconds", d.as_secs().max(1))
}

/// Deletes the staging folders of runs that started more than [`STALE_STAGING`] ago.
pub(super) async fn recover_staging(log: &TableLog) -> Result<usize> {
    let staging = log.log_path("staging");
    let metas = log.list(&staging).await?;
    let now = chrono::Utc::now().naive_utc();
    let stale: Vec<_> = metas
        .into_iter()
        .filter(|m| {
            let rel = super::relative(&staging, &m.location);
            let run = rel.split('/').next().unwrap_or_default();
            run.get(..15)
                .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y%m%dT%H%M%S").ok())
                .is_none_or(|t| now - t > STALE_STAGING)
        })
        .collect();
    let n = stale.len();
    publish::delete_objects(log, stale).await?;
    Ok(n)
}

/// The table's columns as Delta declares them: every column nullable (a later run's step may
/// produce NULLs where this one did not).
fn delta_schema(schema: &Schema) -> std::result::Result<StructType, String> {
    let nullable: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    StructType::try_from_arrow(&Schema::new(nullable)).map_err(|e| e.to_string())
}

/// Opens the output's table, creating it (version 0: schema, partitioning, properties, no
/// files) when the folder is empty.
async fn open_or_create(
    out: &Output,
    run: &RunInfo,
    options: &DeltaOptions,
    schema: &Schema,
) -> Result<DeltaTable> {
    let loc = &out.location;
    if let Some(t) = delta::open(loc, &delta::Version::Latest).await? {
        return Ok(t);
    }
    if !delta::is_empty(loc).await? {
        return Err(not_delta(out, run));
    }
    let columns = delta_schema(schema)
        .map_err(|m| run.output_err(out, format!("the columns cannot be a Delta table: {m}")))?;
    let log_store = delta::builder(loc)?
        .build()
        .map_err(|e| delta::err(loc, "open the table", e))?
        .log_store();
    let log_retention = options.retention.max(Duration::from_secs(30 * 86_400));
    let created = CreateBuilder::new()
        .with_log_store(log_store)
        .with_table_name(out.from.clone())
        .with_columns(columns.fields().cloned())
        .with_partition_columns(out.partition_by.clone())
        .with_save_mode(SaveMode::ErrorIfExists)
        .with_configuration_property(
            TableProperty::CheckpointInterval,
            Some(options.checkpoint_interval.to_string()),
        )
        .with_configuration_property(
            TableProperty::DeletedFileRetentionDuration,
            Some(interval(options.retention)),
        )
        .with_configuration_property(
            TableProperty::LogRetentionDuration,
            Some(interval(log_retention)),
        )
        .with_configuration_property(
            TableProperty::SetTransactionRetentionDuration,
            Some(interval(log_retention)),
        )
        .with_commit_properties(CommitProperties::default().with_metadata(commit_info(run, out)))
        .await;
    match created {
        Ok(t) => Ok(t),
        // Another writer created it first: use theirs (its schema is checked next).
        Err(_) if delta::is_delta(loc).await? => delta::open(loc, &delta::Version::Latest)
            .await?
            .ok_or_else(|| Error::Internal(format!("{} vanished after creation", loc.written))),
        Err(e) => Err(delta::err(loc, "create the table", e)),
    }
}

fn not_delta(out: &Output, run: &RunInfo) -> Error {
    run.output_err(
        out,
        format!(
            "{} holds files but no {}/: it is not a Delta table. Point the output at an empty folder, or remove `format: delta`",
            out.location.written,
            delta::LOG_FOLDER
        ),
    )
}

/// Checked once the run's files are staged, before any output of the run commits: the folder
/// is empty, or a Delta table with the output's partitioning and the step's columns.
pub(super) async fn check_target(out: &Output, run: &RunInfo, schema: &Schema) -> Result<()> {
    match delta::open(&out.location, &delta::Version::Latest).await? {
        Some(table) => check_table(&table, out, run, schema),
        None if delta::is_empty(&out.location).await? => delta_schema(schema)
            .map(|_| ())
            .map_err(|m| run.output_err(out, format!("the columns cannot be a Delta table: {m}"))),
        None => Err(not_delta(out, run)),
    }
}

/// What a commit records about the run (Delta's `commitInfo`).
fn commit_info(run: &RunInfo, out: &Output) -> Vec<(String, serde_json::Value)> {
    vec![
        ("clvflow.runId".into(), json!(run.run_id)),
        ("clvflow.job".into(), json!(run.job)),
        ("clvflow.runDate".into(), json!(run.run_date.to_string())),
        ("clvflow.output".into(), json!(out.from)),
        ("clvflow.version".into(), json!(env!("CARGO_PKG_VERSION"))),
    ]
}

/// The table's schema and partitioning must be the run's.
fn check_table(table: &DeltaTable, out: &Output, run: &RunInfo, schema: &Schema) -> Result<()> {
    let snapshot = table
        .snapshot()
        .map_err(|e| delta::err(&out.location, "read the table's metadata", e))?;
    let theirs = snapshot.metadata().partition_columns();
    if theirs != out.partition_by.as_slice() {
        return Err(run.output_err(
            out,
            format!(
                "the Delta table at {} is partitioned by [{}], the output by [{}]; write to a new table or change `partition_by`",
                out.location.written,
                theirs.join(", "),
                out.partition_by.join(", ")
            ),
        ));
    }
    let ours = delta_schema(schema)
        .map_err(|m| run.output_err(out, format!("the columns cannot be a Delta table: {m}")))?;
    let table_schema = snapshot.schema();
    let mut problems = Vec::new();
    for f in ours.fields() {
        match table_schema.field(f.name()) {
            None => problems.push(format!("`{}` is new", f.name())),
            Some(t) if t.data_type() != f.data_type() => problems.push(format!(
                "`{}` is {} in the table, {} in the run",
                f.name(),
                t.data_type(),
                f.data_type()
            )),
            Some(_) => {}
        }
    }
    for t in table_schema.fields() {
        if ours.field(t.name()).is_none() {
            problems.push(format!("`{}` is missing from the run", t.name()));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(run.output_err(
        out,
        format!(
            "the step's columns differ from the Delta table at {}: {}. Write to a new table (a Delta table keeps one schema)",
            out.location.written,
            problems.join("; ")
        ),
    ))
}

/// `k=v/k2=v2/part-x.parquet` → the partition values (`null_partition_value` → NULL).
fn partition_values(out: &Output, path: &str) -> HashMap<String, Option<String>> {
    let mut values: HashMap<String, Option<String>> = HashMap::new();
    for seg in path.split('/') {
        if let Some((k, v)) = seg.split_once('=')
            && out.partition_by.iter().any(|p| p == k)
        {
            let v = percent_decode(v);
            let null = out.null_partition_value.as_deref() == Some(v.as_str());
            values.insert(k.to_string(), (!null).then_some(v));
        }
    }
    values
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("v={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}

fn add_action(out: &Output, a: &AddedFile, now_ms: i64) -> Action {
    Action::Add(Add {
        path: a.file.path.clone(),
        partition_values: partition_values(out, &a.file.path),
        size: a.file.bytes as i64,
        modification_time: now_ms,
        data_change: true,
        stats: Some(json!({ "numRecords": a.file.rows }).to_string()),
        ..Default::default()
    })
}

/// Moves the staged files into the table folder (a reader does not see them yet).
async fn move_in(log: &TableLog, added: &[AddedFile]) -> Result<()> {
    let store = log.table.store.object_store.clone();
    // Owned paths: a closure over borrowed items makes this future fail the Send check.
    let moves: Vec<_> = added
        .iter()
        .map(|a| (log.log_path(&a.staged), log.table_path(&a.file.path)))
        .collect();
    futures::stream::iter(moves.into_iter().map(|(from, to)| {
        let store = store.clone();
        async move { publish::move_one(store.as_ref(), log, &from, &to).await }
    }))
    .buffer_unordered(CONCURRENCY)
    .try_collect::<Vec<()>>()
    .await?;
    Ok(())
}

/// Whether a commit failed only because another writer committed that version first.
fn lost_race(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::MaxCommitAttempts(_)
                    | TransactionError::VersionAlreadyExists(_)
            }
    )
}

/// Commits the staged files of `run` as one Delta version replacing the run's partitions.
pub(super) async fn commit(
    log: &TableLog,
    out: &Output,
    run: &RunInfo,
    options: &DeltaOptions,
    schema: &Schema,
    added: &[AddedFile],
    replaced: &Replaced,
) -> Result<u64> {
    let loc = &out.location;
    let mut table = open_or_create(out, run, options, schema).await?;
    check_table(&table, out, run, schema)?;
    move_in(log, added).await?;
    failpoint::hit(failpoint::DELTA_FILES_IN).await?;

    let first = out.partition_by.first();
    let values: BTreeSet<Option<String>> = match replaced {
        Replaced::WholeTable => BTreeSet::new(),
        Replaced::Partitions(folders) => folders
            .iter()
            .map(|f| {
                partition_values(out, f)
                    .remove(first.map_or("", String::as_str))
                    .flatten()
            })
            .collect(),
    };
    let predicate = match (first, replaced) {
        (Some(c), Replaced::Partitions(_)) => Some(format!(
            "{c} IN ({})",
            values
                .iter()
                .map(|v| v
                    .as_deref()
                    .map_or("NULL".into(), |v| format!("'{}'", v.replace('\'', "''"))))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => None,
    };
    let app_id = format!("clvflow-{}-{}", run.run_id, out.from);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let adds: Vec<Action> = added.iter().map(|a| add_action(out, a, now_ms)).collect();
    let operation = DeltaOperation::Write {
        mode: SaveMode::Overwrite,
        partition_by: (!out.partition_by.is_empty()).then(|| out.partition_by.clone()),
        predicate,
    };
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            table
                .update_state()
                .await
                .map_err(|e| delta::err(loc, "reload the table", e))?;
        }
        let snapshot = table
            .snapshot()
            .map_err(|e| delta::err(loc, "read the table", e))?;
        if snapshot
            .transaction_version(table.log_store().as_ref(), &app_id)
            .await
            .map_err(|e| delta::err(loc, "read the table's transactions", e))?
            .is_some()
        {
            // An earlier attempt of this commit landed (its reply was lost).
            return Ok(snapshot.version());
        }
        let mut actions: Vec<Action> = snapshot
            .log_data()
            .iter()
            .filter(|f| match (first, replaced) {
                (Some(c), Replaced::Partitions(_)) => {
                    values.contains(&f.partition_values_map().remove(c).flatten())
                }
                _ => true,
            })
            .map(|f| Action::Remove(f.remove_action(true)))
            .collect();
        actions.extend(adds.iter().cloned());
        let properties = CommitProperties::default()
            .with_metadata(commit_info(run, out))
            .with_application_transaction(Transaction::new_with_last_update(
                &app_id,
                0,
                Some(now_ms),
            ))
            .with_max_retries(0);
        let done = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), table.log_store(), operation.clone())
            .await;
        match done {
            Ok(c) => return Ok(c.version()),
            Err(e) if lost_race(&e) => {
                tracing::info!(table = %loc.written, attempt, "another writer committed first; rebuilding the commit on its version");
            }
            Err(e) => return Err(delta::err(loc, "commit the run", e)),
        }
    }
    Err(run.output_err(
        out,
        format!(
            "other writers committed to {} {MAX_ATTEMPTS} times while this run tried to; nothing of this run is visible. Run it again",
            loc.written
        ),
    ))
}

/// Deletes this run's staging folder (after its commit, or when it is abandoned).
pub(super) async fn drop_staging(log: &TableLog, run_id: &str) -> Result<()> {
    publish::delete_prefix(log, &log.log_path(&super::staging_rel(run_id))).await
}

/// Files and rows of the table's current version (for `clvflow files` and the run summary).
pub fn current_files(table: &DeltaTable) -> Result<Vec<(String, u64, Option<u64>)>> {
    let snapshot = table
        .snapshot()
        .map_err(|e| Error::Internal(format!("an opened Delta table has no snapshot: {e}")))?;
    Ok(snapshot
        .log_data()
        .iter()
        .map(|f| {
            (
                f.path().to_string(),
                f.size().max(0) as u64,
                f.num_records().map(|n| n as u64),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(null: Option<&str>) -> Output {
        let stores = crate::storage::Stores::new(
            vec![
                crate::storage::build(
                    "local",
                    &crate::config::project::StoreSpec {
                        url: "file:///tmp/clvflow-test".into(),
                        endpoint: None,
                        region: None,
                        allow_http: false,
                        max_retries: 1,
                        retry_timeout: crate::config::types::DurationSpec(Duration::from_secs(1)),
                        options: Default::default(),
                    },
                    std::path::Path::new("/"),
                )
                .unwrap(),
            ],
            "/".into(),
        );
        Output {
            from: "t".into(),
            location: stores.resolve("file:///tmp/clvflow-test/t/").unwrap(),
            partition_by: vec!["run_date".into(), "channel".into()],
            null_partition_value: null.map(str::to_string),
            format: super::super::OutputFormat::Delta(DeltaOptions {
                parquet: super::super::ParquetOptions {
                    compression: Default::default(),
                    row_group_size: 10,
                },
                retention: DEFAULT_RETENTION,
                checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            }),
        }
    }

    #[test]
    fn partition_values_come_from_the_folders_and_the_null_folder_is_null() {
        let out = output(Some("__HIVE_DEFAULT_PARTITION__"));
        let v = partition_values(
            &out,
            "run_date=2026-11-22/channel=__HIVE_DEFAULT_PARTITION__/part-x-00000.parquet",
        );
        assert_eq!(v["run_date"].as_deref(), Some("2026-11-22"));
        assert_eq!(v["channel"], None);
        let v = partition_values(
            &out,
            "run_date=2026-11-22/channel=paid%20search/part-x.parquet",
        );
        assert_eq!(v["channel"].as_deref(), Some("paid search"));
        let v = partition_values(&out, "run_date=2026-11-22/channel=a+b/part-x.parquet");
        assert_eq!(
            v["channel"].as_deref(),
            Some("a+b"),
            "a plus is a plus, not a space"
        );
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn retention_is_written_as_a_delta_interval() {
        assert_eq!(
            interval(Duration::from_secs(7 * 86_400)),
            "interval 604800 seconds"
        );
        assert_eq!(interval(Duration::ZERO), "interval 1 seconds");
    }

    #[test]
    fn only_a_lost_race_is_retried() {
        assert!(lost_race(&DeltaTableError::VersionAlreadyExists(3)));
        assert!(lost_race(&DeltaTableError::Transaction {
            source: TransactionError::MaxCommitAttempts(0)
        }));
        assert!(!lost_race(&DeltaTableError::NotATable("x".into())));
    }
}
