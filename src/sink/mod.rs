//! Writing an output table so that a BI reader never sees a half-written table.
//!
//! ```text
//!  recover ─▶ stage ─▶ verify ─▶ COMMIT MARKER ─▶ publish ─▶ published.json
//!  (finish a    (DataFusion   (footers,  (create-only-  (move staged files in,
//!   killed       writes to     row        if-absent:     delete replaced files;
//!   publish,     _clvflow/     counts)    the commit     idempotent, so a killed
//!   drop         <t>/staging/             point)         publish is rolled forward
//!   leftovers)   <run>/)                                 by the next run)
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
//! What a plain Hive reader sees during publish is described in the README ("Output guarantees").

pub mod log;
pub mod publish;

use std::collections::BTreeSet;

use std::sync::Arc;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::TableProvider;
use datafusion::common::config::{ParquetColumnOptions, TableParquetOptions};
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::{DataFrame, SessionContext};
use futures::{StreamExt, TryStreamExt};

use crate::engine::quote_ident;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::job::OutputPlan;
use log::{AddedFile, ColumnInfo, Commit, DataFile, TableLog};

/// Identity of the run that writes.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run_id: String,
    pub job: String,
    pub run_date: chrono::NaiveDate,
}

/// What an output write did.
#[derive(Debug, Clone)]
pub struct OutputOutcome {
    pub table_url: String,
    pub version: u64,
    pub rows: u64,
    pub files: usize,
    pub bytes: u64,
    pub replaced: Vec<String>,
    pub removed_files: usize,
    pub recovery: publish::Recovery,
}

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl RunInfo {
    fn output_err(&self, out: &OutputPlan, message: String) -> Error {
        Error::Output {
            job: self.job.clone(),
            output: out.from.clone(),
            message,
        }
    }
}

/// An output written to staging, not yet committed.
#[derive(Debug)]
pub struct Staged {
    log: TableLog,
    out: OutputPlan,
    run: RunInfo,
    schema: datafusion::arrow::datatypes::Schema,
    staging_rel: String,
    added: Vec<AddedFile>,
    recovery: publish::Recovery,
}

/// Writes step `out.from` (registered on `ctx`) to its table and commits it.
pub async fn write(ctx: &SessionContext, out: &OutputPlan, run: &RunInfo) -> Result<OutputOutcome> {
    let staged = stage(ctx, out, run).await?;
    commit(staged).await
}

/// Recovers the table, then writes the step's rows to staging and checks them. Nothing in the
/// table changes; dropping the future (cancellation) leaves only staged files for the next run
/// to delete.
pub async fn stage(ctx: &SessionContext, out: &OutputPlan, run: &RunInfo) -> Result<Staged> {
    let log = TableLog::new(out.location.clone())?;
    let recovery = publish::recover(&log).await?;
    let (df, schema) = prepare(ctx, out, run).await?;

    let staging_rel = format!("staging/{}", run.run_id);
    let staging = log.log.child(&staging_rel);
    let mut parquet = TableParquetOptions::default();
    parquet.global.compression = Some(out.compression.datafusion_name());
    parquet.global.max_row_group_size = out.row_group_size;
    // Float measures (CLV, probabilities, spend) are nearly all distinct: dictionary encoding
    // them costs write time and falls back to plain anyway once the dictionary page fills.
    for f in schema.fields() {
        if matches!(f.data_type(), DataType::Float64 | DataType::Float32) {
            let options = ParquetColumnOptions {
                dictionary_enabled: Some(false),
                ..Default::default()
            };
            parquet
                .column_specific_options
                .insert(f.name().clone(), options);
        }
    }
    let options = DataFrameWriteOptions::new()
        .with_partition_by(out.partition_by.clone())
        .with_single_file_output(false);
    let staged = async {
        let counts = df
            .write_parquet(&staging.dir_url(), options, Some(parquet))
            .await
            .map_err(|e| Error::df(format!("write output `{}` to {}", out.from, staging.url), e))?;
        let written = counts
            .first()
            .and_then(|b| {
                b.column(0)
                    .as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>()
                    .map(|a| a.value(0))
            })
            .unwrap_or(0);
        stage_files(&log, &staging_rel, run, written).await
    }
    .await;
    let added = match staged {
        Ok(a) => a,
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

    /// The staged files as a table with the step's columns (partition columns last, typed as in
    /// the step), so later steps of the run can read an output that was streamed to its files
    /// instead of being held in memory.
    pub fn as_table(&self) -> Result<Arc<dyn TableProvider>> {
        let staging = self.log.log.child(&self.staging_rel);
        let url = staging.dir_url();
        let table_url =
            ListingTableUrl::parse(&url).map_err(|e| Error::df(format!("read back {url}"), e))?;
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
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(partitions);
        let config = ListingTableConfig::new(table_url)
            .with_listing_options(options)
            .with_schema(Arc::new(Schema::new(file_fields)));
        let table =
            ListingTable::try_new(config).map_err(|e| Error::df(format!("read back {url}"), e))?;
        Ok(Arc::new(table))
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
    let mut removed = Vec::new();
    for prefix in &replaced {
        let base = if prefix.is_empty() {
            log.table.path.clone()
        } else {
            log.table_path(prefix)
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
        replaced: replaced.clone(),
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
        removed_files: commit.removed.len(),
        recovery,
    })
}

/// The step's rows, with partition columns checked: they exist, and NULL or empty values are
/// rejected or mapped to `null_partition_value`. Also the schema the table's commit records and
/// readers see: the written one, except that a DATE partition column, which the writer is handed
/// as its folder names (see `functions`), stays a DATE.
async fn prepare(
    ctx: &SessionContext,
    out: &OutputPlan,
    run: &RunInfo,
) -> Result<(DataFrame, Schema)> {
    let df = ctx
        .table(out.from.as_str())
        .await
        .map_err(|e| Error::df(format!("output `{}`", out.from), e))?;
    let schema = df.schema().as_arrow().clone();
    for c in &out.partition_by {
        if schema.field_with_name(c).is_err() {
            let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(run.output_err(
                out,
                format!(
                    "partition column `{c}` is not a column of step `{}` (it has: {})",
                    out.from,
                    have.join(", ")
                ),
            ));
        }
    }
    if out.partition_by.len() == schema.fields().len() && !schema.fields().is_empty() {
        return Err(run.output_err(
            out,
            "every column is a partition column; the files would hold no data".into(),
        ));
    }
    // Strings are written as plain UTF-8 columns: DataFusion's string functions and VARCHAR
    // casts return string views, but a table's schema should not depend on how a value was
    // computed, and not every reader knows the view type.
    let is_view = |f: &Field| f.data_type() == &DataType::Utf8View;
    if out.partition_by.is_empty() && !schema.fields().iter().any(|f| is_view(f)) {
        return Ok((df, schema));
    }
    // Partition values are checked while the rows stream to the files (no second pass over the
    // step): NULL or empty values fail the write, unless NULLs are mapped to a folder name.
    let check = crate::functions::PARTITION_VALUE;
    let select: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| {
            let name = quote_ident(f.name());
            let q = if is_view(f) {
                format!("arrow_cast({name}, 'Utf8')")
            } else {
                name.clone()
            };
            if !out.partition_by.contains(f.name()) {
                return format!("{q} AS {name}");
            }
            let value = match &out.null_partition_value {
                None => q.clone(),
                Some(v) => {
                    let text = if matches!(
                        f.data_type(),
                        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
                    ) {
                        q.clone()
                    } else {
                        format!("CAST({q} AS VARCHAR)")
                    };
                    format!("COALESCE({text}, {})", sql_str(v))
                }
            };
            format!("{check}({value}, {}) AS {name}", sql_str(f.name()))
        })
        .collect();
    let sql = format!(
        "SELECT {} FROM {}",
        select.join(", "),
        quote_ident(&out.from)
    );
    let df = ctx
        .sql(&sql)
        .await
        .map_err(|e| Error::df("check partition values", e))?;
    let recorded = df
        .schema()
        .as_arrow()
        .fields()
        .iter()
        .zip(schema.fields())
        .map(|(written, source)| {
            let folder_names = written.data_type() == &crate::functions::date_folder_type();
            if folder_names && source.data_type() == &DataType::Date32 {
                source.clone()
            } else {
                written.clone()
            }
        })
        .collect::<Vec<_>>();
    Ok((df, Schema::new(recorded)))
}

/// Lists the staged files, reads their footers, names their place in the table, and checks the
/// row total against what DataFusion reported writing.
async fn stage_files(
    log: &TableLog,
    staging_rel: &str,
    run: &RunInfo,
    written: u64,
) -> Result<Vec<AddedFile>> {
    let staging = log.log_path(staging_rel);
    let mut metas = log.list(&staging).await?;
    metas.retain(|m| m.location.as_ref().ends_with(".parquet"));
    metas.sort_by(|a, b| a.location.cmp(&b.location));
    let store = log.table.store.object_store.clone();
    let short = run
        .run_id
        .split('-')
        .next()
        .unwrap_or(&run.run_id)
        .to_string();
    let added: Vec<AddedFile> = futures::stream::iter(metas.into_iter().enumerate())
        .map(|(i, meta)| {
            let store = store.clone();
            let staging = staging.clone();
            let short = short.clone();
            let staging_rel = staging_rel.to_string();
            async move {
                let (_, rows) = crate::catalog::footer::read(store.as_ref(), &meta)
                    .await
                    .map_err(|e| {
                        Error::Internal(format!(
                            "staged file {} is not readable: {e}",
                            meta.location
                        ))
                    })?;
                let rel = relative(&staging, &meta.location);
                let folder = rel
                    .rsplit_once('/')
                    .map(|(d, _)| format!("{d}/"))
                    .unwrap_or_default();
                Ok::<_, Error>(AddedFile {
                    file: DataFile {
                        path: format!("{folder}part-{short}-{i:05}.parquet"),
                        rows,
                        bytes: meta.size,
                    },
                    staged: format!("{staging_rel}/{rel}"),
                })
            }
        })
        .buffered(16)
        .try_collect()
        .await?;
    let total: u64 = added.iter().map(|a| a.file.rows).sum();
    if total != written {
        return Err(Error::Internal(format!(
            "DataFusion reported {written} rows written but the staged files hold {total}; nothing was committed"
        )));
    }
    Ok(added)
}

/// The partition folders this run replaces.
fn replaced_partitions(out: &OutputPlan, run: &RunInfo, added: &[AddedFile]) -> Vec<String> {
    let Some(first) = out.partition_by.first() else {
        return vec![String::new()];
    };
    let mut set: BTreeSet<String> = added
        .iter()
        .filter_map(|a| a.file.path.split('/').next().map(str::to_string))
        .filter(|p| p.starts_with(&format!("{first}=")))
        .collect();
    if first == "run_date" {
        set.insert(format!("run_date={}", run.run_date));
    }
    set.into_iter().collect()
}

fn relative(base: &object_store::path::Path, full: &object_store::path::Path) -> String {
    let b = base.as_ref();
    let f = full.as_ref();
    f.strip_prefix(b)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(f)
        .to_string()
}
