//! Writing an output table so that a BI reader never sees a half-written table.
//!
//! ```text
//!  recover ─▶ stage ─▶ verify ─▶ COMMIT MARKER ─▶ publish
//!  (finish a    (DataFusion   (footers,  (create-only-  (move staged files in,
//!   killed       writes to     row        if-absent:     published.json, then
//!   publish,     _clvflow/     counts)    the commit     delete replaced files;
//!   drop         <t>/staging/             point)         idempotent, so a killed
//!   leftovers)   <run>/)                                 publish is rolled forward)
//! ```
//!
//! Guarantees:
//! - before the commit marker exists, the table folder is untouched: a failed, cancelled or
//!   killed run leaves the last committed output exactly as it was;
//! - once a run commits, each replaced partition holds that run's rows only: re-running a date
//!   replaces that date's partitions (the values of the first `partition_by` column written, and
//!   always `run_date=<date>` when that is the first column; the whole table when unpartitioned);
//! - NULL (or empty) partition values are rejected, or mapped to `null_partition_value`, before
//!   anything is written (DataFusion 55 would put a NULL number in `p=0`).
//!
//! [`Output`] is the checked form of an `outputs:` entry. The files are written by [`parquet`];
//! the table's commit log is [`log`], publishing and recovery [`publish`]; tests make runs fail
//! at known points of the protocol with [`failpoint`]. What a plain Hive reader sees during
//! publish is described in the README ("Output guarantees").
//!
//! A `format: delta` output is staged and checked the same way; then, instead of the commit
//! marker and publish above, its files are moved into the table folder and named by one Delta
//! commit ([`delta`]; README "Delta Lake tables").

pub mod delta;
pub mod failpoint;
pub mod log;
mod parquet;
pub mod publish;
pub mod vacuum;

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::catalog::TableProvider;
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};

use crate::config::Problem;
use crate::config::job::{OutputFormatSpec, OutputSpec};
use crate::config::types::Compression;
use crate::error::{Error, Result};
use crate::storage::{Stores, listing};
use log::{AddedFile, ColumnInfo, Commit, DataFile, TableLog};

/// A checked output: which step result goes to which table folder, how.
#[derive(Debug, Clone)]
pub struct Output {
    /// The step (or extra step table) whose result is written.
    pub from: String,
    pub location: crate::storage::Location,
    /// Hive partition columns, outermost first.
    pub partition_by: Vec<String>,
    /// Folder name of NULL partition values; `None`: they are an error.
    pub null_partition_value: Option<String>,
    pub format: OutputFormat,
}

/// How an output's files are written.
#[derive(Debug, Clone)]
pub enum OutputFormat {
    /// Plain Parquet files with clvflow's commit log beside the table.
    Parquet(ParquetOptions),
    /// A Delta Lake table (its own log inside the table folder).
    Delta(delta::DeltaOptions),
}

impl OutputFormat {
    /// How its Parquet files are written.
    pub fn parquet(&self) -> &ParquetOptions {
        match self {
            OutputFormat::Parquet(p) => p,
            OutputFormat::Delta(d) => &d.parquet,
        }
    }

    pub fn is_delta(&self) -> bool {
        matches!(self, OutputFormat::Delta(_))
    }

    /// `parquet` or `delta`, as in the job file.
    pub fn name(&self) -> &'static str {
        match self {
            OutputFormat::Parquet(_) => "parquet",
            OutputFormat::Delta(_) => "delta",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ParquetOptions {
    pub compression: Compression,
    pub row_group_size: usize,
}

impl Output {
    /// Checks `spec`. Problems are at fields under the output.
    pub fn check(spec: &OutputSpec, stores: &Stores) -> std::result::Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut seen = BTreeSet::new();
        for (j, c) in spec.partition_by.iter().enumerate() {
            if !seen.insert(c) {
                problems.push(Problem::new(
                    format!("partition_by[{j}]"),
                    format!("`{c}` is listed twice"),
                ));
            }
        }
        if spec
            .null_partition_value
            .as_deref()
            .is_some_and(|v| v.is_empty() || v.contains('/'))
        {
            problems.push(Problem::new(
                "null_partition_value",
                "must be a non-empty folder name without `/`",
            ));
        }
        if spec.row_group_size == 0 {
            problems.push(Problem::new("row_group_size", "must be at least 1"));
        }
        let delta = spec.format == OutputFormatSpec::Delta;
        for (set, field) in [
            (spec.retention.is_some(), "retention"),
            (spec.checkpoint_interval.is_some(), "checkpoint_interval"),
        ] {
            if set && !delta {
                problems.push(Problem::new(
                    field,
                    "is a setting of Delta tables: add `format: delta`, or remove it",
                ));
            }
        }
        if spec.checkpoint_interval == Some(0) {
            problems.push(Problem::new("checkpoint_interval", "must be at least 1"));
        }
        let location = match stores.resolve(&spec.url) {
            Ok(l) if l.split_last().is_none() => {
                problems.push(Problem::new(
                    "url",
                    "an output must be a folder below the store root (its commit log lives beside it)",
                ));
                None
            }
            Ok(l) => Some(l),
            Err(m) => {
                problems.push(Problem::new("url", m));
                None
            }
        };
        match location {
            Some(location) if problems.is_empty() => Ok(Self {
                from: spec.from.clone(),
                location,
                partition_by: spec.partition_by.clone(),
                null_partition_value: spec.null_partition_value.clone(),
                format: {
                    let parquet = ParquetOptions {
                        compression: spec.compression,
                        row_group_size: spec.row_group_size,
                    };
                    if delta {
                        OutputFormat::Delta(delta::DeltaOptions {
                            parquet,
                            retention: spec.retention.map_or(delta::DEFAULT_RETENTION, |d| d.0),
                            checkpoint_interval: spec
                                .checkpoint_interval
                                .unwrap_or(delta::DEFAULT_CHECKPOINT_INTERVAL),
                        })
                    } else {
                        OutputFormat::Parquet(parquet)
                    }
                },
            }),
            _ => Err(problems),
        }
    }

    /// The problem with the output's partition columns given the schema of its step, if any
    /// (`validate`, and again before a run writes).
    pub fn partition_problem(&self, schema: &Schema) -> Option<Problem> {
        let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        for (j, c) in self.partition_by.iter().enumerate() {
            if schema.field_with_name(c).is_err() {
                return Some(Problem::new(
                    format!("partition_by[{j}]"),
                    format!(
                        "`{c}` is not a column of step `{}`; it has: {}",
                        self.from,
                        have.join(", ")
                    ),
                ));
            }
        }
        (self.partition_by.len() == schema.fields().len() && !have.is_empty()).then(|| {
            Problem::new(
                "partition_by",
                "every column is a partition column; the files would hold no data",
            )
        })
    }
}

/// Identity of the run that writes.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run_id: String,
    pub job: String,
    pub run_date: chrono::NaiveDate,
}

impl RunInfo {
    fn output_err(&self, out: &Output, message: String) -> Error {
        Error::output(&self.job, &out.from, message)
    }
}

/// What a committed run replaced in its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replaced {
    /// An unpartitioned table: all of it.
    WholeTable,
    /// These partition folders (relative to the table, e.g. `run_date=2026-11-22`).
    Partitions(Vec<String>),
}

impl Replaced {
    /// The replaced folders relative to the table (`""`: the table folder itself), as the
    /// commit marker records them.
    pub fn prefixes(&self) -> Vec<String> {
        match self {
            Replaced::WholeTable => vec![String::new()],
            Replaced::Partitions(p) => p.clone(),
        }
    }
}

impl std::fmt::Display for Replaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replaced::WholeTable => f.write_str("the whole table"),
            Replaced::Partitions(p) => f.write_str(&p.join(", ")),
        }
    }
}

/// What an output write did.
#[derive(Debug, Clone)]
pub struct OutputOutcome {
    pub table_url: String,
    pub version: u64,
    pub rows: u64,
    pub files: usize,
    pub bytes: u64,
    pub replaced: Replaced,
    pub recovery: publish::Recovery,
}

/// What writing an output to staging gave.
struct Written {
    /// The schema the table's commit records.
    schema: Schema,
    added: Vec<AddedFile>,
    /// The files' uncompressed size, from their footers.
    decoded: u64,
}

/// An output written to staging, not yet committed.
#[derive(Debug)]
pub struct Staged {
    log: TableLog,
    out: Output,
    run: RunInfo,
    schema: Schema,
    staging_rel: String,
    added: Vec<AddedFile>,
    /// The staged files' uncompressed size (what reading them back takes, roughly).
    decoded: u64,
    recovery: publish::Recovery,
}

/// Recovers the table, then writes the step's rows to staging and checks them. Nothing in the
/// table changes; dropping the future (cancellation) leaves only staged files for the next run
/// to delete.
pub async fn stage(ctx: &SessionContext, out: &Output, run: &RunInfo) -> Result<Staged> {
    let (log, recovery) = recover(out).await?;
    let staging_rel = staging_rel(&run.run_id);
    let options = out.format.parquet();
    let written = parquet::write(ctx, out, run, options, &log, &staging_rel).await;
    finish_staging(out, run, log, recovery, staging_rel, written).await
}

/// Where run `run_id` stages an output's files, relative to the table's log folder.
pub(super) fn staging_rel(run_id: &str) -> String {
    format!("staging/{run_id}")
}

/// The table's log, after finishing what a dead run left (see [`publish::recover`]).
async fn recover(out: &Output) -> Result<(TableLog, publish::Recovery)> {
    let log = TableLog::new(out.location.clone())?;
    let recovery = match &out.format {
        OutputFormat::Parquet(_) => publish::recover(&log).await?,
        OutputFormat::Delta(_) => publish::Recovery {
            rolled_forward: None,
            staged_files_removed: delta::recover_staging(&log).await?,
        },
    };
    Ok((log, recovery))
}

/// Whether `out` can take the files `staged` wrote instead of writing its own: another output of
/// the same rows, in the same object store, with the same partitioning, NULL folder name and
/// Parquet settings. (A Delta table's data files are plain Parquet files without the partition
/// columns, exactly as a Parquet output's.)
pub fn same_files(out: &Output, staged: &Staged) -> bool {
    let (a, b) = (out.format.parquet(), staged.out.format.parquet());
    out.from.eq_ignore_ascii_case(&staged.out.from)
        && out.partition_by == staged.out.partition_by
        && out.null_partition_value == staged.out.null_partition_value
        && a.compression == b.compression
        && a.row_group_size == b.row_group_size
        && out.location.store.registry_url == staged.out.location.store.registry_url
}

/// Stages `out` with copies of the files `from` staged (see [`same_files`]): the store copies
/// them (a hard link on a local disk, a server-side copy on S3) instead of encoding the rows a
/// second time. The schema and the target's checks are `out`'s own, as in [`stage`].
pub async fn stage_copy(
    ctx: &SessionContext,
    out: &Output,
    run: &RunInfo,
    from: &Staged,
) -> Result<Staged> {
    let (log, recovery) = recover(out).await?;
    let staging_rel = staging_rel(&run.run_id);
    let copied = async {
        let (_, schema) = parquet::prepare(ctx, out, run).await?;
        let store = log.log.store.object_store.clone();
        let url = from.log.log.url.clone();
        // Owned paths: a stream over borrowed items makes the run's future not `Send`.
        let copies: Vec<_> = from
            .added
            .iter()
            .map(|a| (from.log.log_path(&a.staged), log.log_path(&a.staged)))
            .collect();
        futures::stream::iter(copies)
            .map(move |(src, dst)| {
                let (store, url) = (store.clone(), url.clone());
                async move {
                    object_store::ObjectStoreExt::copy(store.as_ref(), &src, &dst)
                        .await
                        .map_err(|e| Error::store(url, format!("copy {src} to {dst}"), e))
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(Written {
            schema,
            added: from.added.clone(),
            decoded: from.decoded,
        })
    }
    .await;
    finish_staging(out, run, log, recovery, staging_rel, copied).await
}

/// Checks a Delta target, and deletes the staging folder when anything failed.
async fn finish_staging(
    out: &Output,
    run: &RunInfo,
    log: TableLog,
    recovery: publish::Recovery,
    staging_rel: String,
    mut written: Result<Written>,
) -> Result<Staged> {
    if let (Ok(w), OutputFormat::Delta(_)) = (&written, &out.format)
        && let Err(e) = delta::check_target(out, run, &w.schema).await
    {
        written = Err(e);
    }
    let Written {
        schema,
        added,
        decoded,
    } = match written {
        Ok(w) => w,
        Err(e) => {
            // Best effort: the next run removes whatever is left anyway.
            let _ = publish::delete_prefix(&log, &log.log_path(&staging_rel)).await;
            return Err(e);
        }
    };
    Ok(Staged {
        log,
        out: out.clone(),
        run: run.clone(),
        schema,
        staging_rel,
        added,
        decoded,
        recovery,
    })
}

impl Staged {
    /// Rows written.
    pub fn rows(&self) -> u64 {
        self.added.iter().map(|a| a.file.rows).sum()
    }

    /// Bytes written.
    pub fn bytes(&self) -> u64 {
        self.added.iter().map(|a| a.file.bytes).sum()
    }

    /// The staged files, rows and sizes, as an input's are summarised: what a later step that
    /// reads them back plans with ([`crate::steps::sql::partitions::table_size`]).
    pub fn summary(&self) -> crate::inputs::InputSummary {
        crate::inputs::InputSummary {
            files: self.added.len(),
            rows: self.rows(),
            bytes: self.bytes(),
            memory_bytes: self.decoded,
        }
    }

    /// The staged files as a table with the step's columns (partition columns last, typed as in
    /// the step), so later steps of the run can read an output that was streamed to its files
    /// instead of being held in memory.
    pub async fn as_table(&self, ctx: &SessionContext) -> Result<Arc<dyn TableProvider>> {
        let url = self.log.log.child(&self.staging_rel).dir_url();
        let file_fields: Vec<_> = self
            .schema
            .fields()
            .iter()
            .filter(|f| !self.out.partition_by.contains(f.name()))
            .cloned()
            .collect();
        let partitions: Vec<(String, DataType)> = self
            .out
            .partition_by
            .iter()
            .filter_map(|p| {
                self.schema
                    .field_with_name(p)
                    .ok()
                    .map(|f| (p.clone(), f.data_type().clone()))
            })
            .collect();
        let table = listing::table(
            &ctx.state(),
            &url,
            listing::Format::Parquet,
            Some(Arc::new(Schema::new(file_fields))),
            partitions,
        )
        .await
        .map_err(|e| Error::df(format!("read back {url}"), e))?;
        Ok(table)
    }
}

/// Deletes a staged output that will not be committed.
pub async fn abandon(staged: Staged) {
    let _ = publish::delete_prefix(&staged.log, &staged.log.log_path(&staged.staging_rel)).await;
}

/// Creates the commit marker of a staged output and publishes it. Not to be cancelled: once the
/// marker exists the publish is completed, by this run or by the next.
pub async fn commit(staged: Staged) -> Result<OutputOutcome> {
    let Staged {
        log,
        out,
        run,
        schema,
        added,
        recovery,
        ..
    } = staged;
    let (out, run) = (&out, &run);
    let replaced = replaced_partitions(out, run, &added);
    if let OutputFormat::Delta(options) = &out.format {
        let version = delta::commit(&log, out, run, options, &schema, &added, &replaced).await?;
        failpoint::hit(failpoint::DELTA_COMMITTED).await?;
        delta::drop_staging(&log, &run.run_id).await?;
        return Ok(OutputOutcome {
            table_url: log.table.url.clone(),
            version,
            rows: added.iter().map(|a| a.file.rows).sum(),
            files: added.len(),
            bytes: added.iter().map(|a| a.file.bytes).sum(),
            replaced,
            recovery,
        });
    }
    let mut removed = Vec::new();
    for prefix in replaced.prefixes() {
        let base = if prefix.is_empty() {
            log.table.path.clone()
        } else {
            log.table_path(&prefix)
        };
        for meta in log.list(&base).await? {
            let rel = relative(&log.table.path, &meta.location);
            if rel.ends_with(".parquet") && !added.iter().any(|a| a.file.path == rel) {
                removed.push(rel);
            }
        }
    }
    let previous = log.latest().await?;
    let removed_set: BTreeSet<&String> = removed.iter().collect();
    let mut files: Vec<DataFile> = previous
        .as_ref()
        .map(|c| {
            c.files
                .iter()
                .filter(|f| !removed_set.contains(&f.path))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    files.extend(added.iter().map(|a| a.file.clone()));
    let rows = added.iter().map(|a| a.file.rows).sum();
    let columns = schema
        .fields()
        .iter()
        .map(|f| ColumnInfo {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            partition: out.partition_by.contains(f.name()),
        })
        .collect();
    let commit = Commit {
        version: previous.as_ref().map_or(1, |c| c.version + 1),
        run_id: run.run_id.clone(),
        job: run.job.clone(),
        run_date: run.run_date.to_string(),
        output: out.from.clone(),
        table_url: log.table.url.clone(),
        committed_at: chrono::Utc::now().to_rfc3339(),
        schema: columns,
        partition_by: out.partition_by.clone(),
        replaced: replaced.prefixes(),
        rows,
        added,
        removed,
        files,
    };
    log.create_commit(&commit).await?;
    failpoint::hit(failpoint::AFTER_COMMIT).await?;
    publish::publish(&log, &commit).await?;
    Ok(OutputOutcome {
        table_url: log.table.url.clone(),
        version: commit.version,
        rows,
        files: commit.added.len(),
        bytes: commit.added.iter().map(|a| a.file.bytes).sum(),
        replaced,
        recovery,
    })
}

/// The partition folders this run replaces.
fn replaced_partitions(out: &Output, run: &RunInfo, added: &[AddedFile]) -> Replaced {
    let Some(first) = out.partition_by.first() else {
        return Replaced::WholeTable;
    };
    let mut set: BTreeSet<String> = added
        .iter()
        .filter_map(|a| a.file.path.split('/').next().map(str::to_string))
        .filter(|p| p.starts_with(&format!("{first}=")))
        .collect();
    if first == "run_date" {
        set.insert(format!("run_date={}", run.run_date));
    }
    Replaced::Partitions(set.into_iter().collect())
}

fn relative(base: &object_store::path::Path, full: &object_store::path::Path) -> String {
    let b = base.as_ref();
    let f = full.as_ref();
    f.strip_prefix(b)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(f)
        .to_string()
}
