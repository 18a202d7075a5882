//! CSV inputs: small reference tables shipped with a project (the RFM segment map). The header
//! must name the declared columns, in order; values are read with the declared types.

use std::sync::Arc;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{Field, Int64Type, Schema};
use datafusion::prelude::SessionContext;
use object_store::ObjectStoreExt;

use super::{Input, InputSummary, declared_type, list};
use crate::engine::quote_ident;
use crate::error::{Error, Result};
use crate::storage::listing;

/// Checks the header of every file of `input` and registers it on `ctx`.
pub(super) async fn register(
    ctx: &SessionContext,
    job: &str,
    input: &Input,
) -> Result<InputSummary> {
    let url = input.location.url.clone();
    let store = input.location.store.object_store.clone();
    let files = list(ctx, input, &url, listing::Format::Csv).await?;
    if files.is_empty() {
        return Err(input.error(job, format!("no .csv file at {}", input.location.written)));
    }
    let mut bytes = 0;
    for meta in &files {
        bytes += meta.size;
        let head = store
            .get_range(&meta.location, 0..meta.size.min(4096))
            .await
            .map_err(|e| Error::store(input.location.show(&meta.location), "read CSV header", e))?;
        let text = String::from_utf8_lossy(&head);
        let header: Vec<&str> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .collect();
        let declared: Vec<&str> = input.columns.iter().map(|(n, _)| n.as_str()).collect();
        if header != declared {
            return Err(input.file_error(
                job,
                &meta.location,
                format!(
                    "header is `{}`, declared columns are `{}`",
                    header.join(","),
                    declared.join(",")
                ),
            ));
        }
    }
    let fields: Vec<Field> = input
        .columns
        .iter()
        .map(|(n, t)| Field::new(n, declared_type(*t), true))
        .collect();
    let table = listing::table(
        &ctx.state(),
        &url,
        listing::Format::Csv,
        Some(Arc::new(Schema::new(fields))),
        Vec::new(),
    )
    .await
    .map_err(|e| Error::df(format!("input `{}`", input.name), e))?;
    ctx.register_table(&input.name, table)
        .map_err(|e| Error::df(format!("register input `{}`", input.name), e))?;
    // Counting reads the values with the declared types: a bad value fails here, at the input.
    let count = ctx
        .sql(&format!(
            "SELECT count(*) FROM {}",
            quote_ident(&input.name)
        ))
        .await
        .map_err(|e| Error::df(format!("read input `{}`", input.name), e))?
        .collect()
        .await
        .map_err(|e| {
            Error::df(
                format!(
                    "read input `{}` (check its values against the declared types)",
                    input.name
                ),
                e,
            )
        })?;
    let rows = count
        .first()
        .and_then(|b| {
            b.column(0)
                .as_primitive_opt::<Int64Type>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0);
    Ok(InputSummary {
        files: files.len(),
        rows: u64::try_from(rows).unwrap_or(0),
        bytes,
        memory_bytes: bytes,
    })
}
