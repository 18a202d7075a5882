//! Parquet inputs: a folder (Hive-partitioned or not), a file, or a glob. Every file's footer is
//! read (schema and row count, not the data) and checked against the declaration before the run.

use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectMeta;

use super::{Input, InputSummary, column_problems, declared_type, list, register_declared};
use crate::error::{Error, Result};
use crate::storage::{footer, listing};

/// Checks every file of `input` and registers it on `ctx`.
pub(super) async fn register(
    ctx: &SessionContext,
    job: &str,
    input: &Input,
) -> Result<InputSummary> {
    let store = input.location.store.object_store.clone();
    let mut url = input.location.url.clone();
    let mut files = list(ctx, input, &url, listing::Format::Parquet).await?;
    let globbed = url.contains(['*', '?', '[']);
    if files.is_empty() && !url.ends_with('/') && !globbed {
        url.push('/');
        files = list(ctx, input, &url, listing::Format::Parquet).await?;
    }
    if files.is_empty() {
        if input.allow_empty {
            register_declared(ctx, input)?;
            return Ok(InputSummary::default());
        }
        return Err(input.error(job, format!(
            "no .parquet files at {}; check the url, or set `allow_empty: true` on this input if an empty export is expected",
            input.location.written
        )));
    }
    files.sort_by(|a, b| a.location.cmp(&b.location));

    let footers: Vec<(ObjectMeta, footer::Footer)> = futures::stream::iter(files)
        .map(|meta| {
            let store = store.clone();
            async move {
                let res = footer::read(store.as_ref(), &meta).await;
                (meta, res)
            }
        })
        .buffered(16)
        .map(|(meta, res)| match res {
            Ok(f) => Ok((meta, f)),
            Err(e) => Err(input.file_error(
                job,
                &meta.location,
                format!("not a readable Parquet file: {e}"),
            )),
        })
        .try_collect()
        .await?;

    let mut fields = Vec::with_capacity(input.columns.len());
    for (i, (meta, footer)) in footers.iter().enumerate() {
        let schema = &footer.schema;
        if let Some((problems, found)) = column_problems(input, schema, "the file") {
            return Err(input.file_error(
                job,
                &meta.location,
                format!(
                    "{problems}; the file has: {found}. Fix the export or the `columns:` of this input"
                ),
            ));
        }
        if i == 0 {
            fields = input
                .columns
                .iter()
                .filter_map(|(name, _)| schema.field_with_name(name).ok())
                .map(|f| Field::new(f.name(), f.data_type().clone(), true))
                .collect();
        }
    }
    let rows: u64 = footers.iter().map(|(_, f)| f.rows).sum();
    let bytes: u64 = footers.iter().map(|(m, _)| m.size).sum();
    let memory_bytes: u64 = footers.iter().map(|(_, f)| f.uncompressed).sum();
    if rows == 0 && !input.allow_empty {
        return Err(input.error(job, format!(
            "{} file(s) at {} hold no rows; set `allow_empty: true` on this input if that is expected",
            footers.len(),
            input.location.written
        )));
    }
    let partitions = input
        .partition_columns
        .iter()
        .map(|(n, t)| (n.clone(), declared_type(*t)))
        .collect();
    let table = listing::table(
        &ctx.state(),
        &url,
        listing::Format::Parquet,
        Some(Arc::new(Schema::new(fields))),
        partitions,
    )
    .await
    .map_err(|e| Error::df(format!("input `{}`", input.name), e))?;
    ctx.register_table(&input.name, table)
        .map_err(|e| Error::df(format!("register input `{}`", input.name), e))?;
    Ok(InputSummary {
        files: footers.len(),
        rows,
        bytes,
        memory_bytes,
    })
}
