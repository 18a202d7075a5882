//! Parquet outputs: the step's rows written by DataFusion into the run's staging folder (Hive
//! folders of the partition columns, each partition value checked on the way), then every
//! staged file's footer read back and its place in the table named.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::config::{ParquetColumnOptions, TableParquetOptions};
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{DataFrame, SessionContext};
use futures::{StreamExt, TryStreamExt};

use super::log::{AddedFile, DataFile, TableLog};
use super::{Output, ParquetOptions, RunInfo, relative};
use crate::engine::{functions, quote_ident};
use crate::error::{Error, Result};
use crate::storage::footer;

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Writes step `out.from` (registered on `ctx`) below `staging_rel` of the table's log; returns
/// the schema the commit records and the staged files.
pub(super) async fn write(
    ctx: &SessionContext,
    out: &Output,
    run: &RunInfo,
    options: &ParquetOptions,
    log: &TableLog,
    staging_rel: &str,
) -> Result<super::Written> {
    let (df, schema) = prepare(ctx, out, run).await?;
    let mut parquet = TableParquetOptions::default();
    parquet.global.compression = Some(options.compression.datafusion_name());
    parquet.global.max_row_group_size = options.row_group_size;
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
    let write = DataFrameWriteOptions::new()
        .with_partition_by(out.partition_by.clone())
        .with_single_file_output(false);
    let staging = log.log.child(staging_rel);
    let staged = async {
        let counts = df
            .write_parquet(&staging.dir_url(), write, Some(parquet))
            .await
            .map_err(|e| {
                Error::df(format!("write output `{}` to {}", out.from, staging.url), e)
                    .out_of_memory(ctx.runtime_env().memory_pool.as_ref())
            })?;
        let written = counts
            .first()
            .and_then(|b| {
                b.column(0)
                    .as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>()
                    .map(|a| a.value(0))
            })
            .unwrap_or(0);
        stage_files(log, staging_rel, run, written).await
    }
    .await?;
    let (added, decoded) = staged;
    Ok(super::Written {
        schema,
        added,
        decoded,
    })
}

/// The step's rows, with partition columns checked: they exist, and NULL or empty values are
/// rejected or mapped to `null_partition_value`. Also the schema the table's commit records and
/// readers see: the written one, except that a DATE partition column, which the writer is handed
/// as its folder names (see `functions`), stays a DATE.
pub(super) async fn prepare(
    ctx: &SessionContext,
    out: &Output,
    run: &RunInfo,
) -> Result<(DataFrame, Schema)> {
    let df = ctx
        .table(out.from.as_str())
        .await
        .map_err(|e| Error::df(format!("output `{}`", out.from), e))?;
    let schema = df.schema().as_arrow().clone();
    // Validate checked this against the declared schemas; the inputs match their declarations.
    if let Some(p) = out.partition_problem(&schema) {
        return Err(run.output_err(out, p.message));
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
    let check = functions::PARTITION_VALUE;
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
            let folder_names = written.data_type() == &functions::date_folder_type();
            // A Delta table keeps a partition column's own type (its partition values are
            // strings in the log, a mapped NULL folder is a NULL value there).
            let delta_partition = out.format.is_delta() && out.partition_by.contains(source.name());
            if (folder_names && source.data_type() == &DataType::Date32) || delta_partition {
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
) -> Result<(Vec<AddedFile>, u64)> {
    let staging = log.log_path(staging_rel);
    let mut metas = log.list(&staging).await?;
    metas.retain(|m| m.location.as_ref().ends_with(".parquet"));
    metas.sort_by(|a, b| a.location.cmp(&b.location));
    let store = log.table.store.object_store.clone();
    // The whole run id (time and random suffix): two runs that start in the same second must
    // not name a file alike, or the second one's publish would move its file onto the first
    // one's name and then delete it as replaced.
    let short = run.run_id.clone();
    let added: Vec<(AddedFile, u64)> = futures::stream::iter(metas.into_iter().enumerate())
        .map(|(i, meta)| {
            let store = store.clone();
            let staging = staging.clone();
            let short = short.clone();
            let staging_rel = staging_rel.to_string();
            async move {
                let footer = footer::read(store.as_ref(), &meta).await.map_err(|e| {
                    Error::df(format!("read back the staged file {}", meta.location), e)
                })?;
                let rel = relative(&staging, &meta.location);
                let folder = rel
                    .rsplit_once('/')
                    .map(|(d, _)| format!("{d}/"))
                    .unwrap_or_default();
                let added = AddedFile {
                    file: DataFile {
                        path: format!("{folder}part-{short}-{i:05}.parquet"),
                        rows: footer.rows,
                        bytes: meta.size,
                    },
                    staged: format!("{staging_rel}/{rel}"),
                };
                Ok::<_, Error>((added, footer.uncompressed))
            }
        })
        .buffered(16)
        .try_collect()
        .await?;
    let total: u64 = added.iter().map(|(a, _)| a.file.rows).sum();
    if total != written {
        return Err(Error::Internal(format!(
            "DataFusion reported {written} rows written but the staged files hold {total}; nothing was committed"
        )));
    }
    let decoded = added.iter().map(|(_, d)| d).sum();
    Ok((added.into_iter().map(|(a, _)| a).collect(), decoded))
}
