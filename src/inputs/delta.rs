//! Delta Lake inputs (`format: delta`): a table at its latest version, `version: N` or
//! `as_of: <time>`. The table's own schema (partition columns included) is checked against the
//! declared columns before the run; the scan is deltalake's (only the files of that version,
//! partition values from the log).

use datafusion::arrow::datatypes::Schema;
use datafusion::prelude::SessionContext;
use deltalake_core::kernel::engine::arrow_conversion::TryIntoArrow;

use super::{Input, InputSummary, column_problems, register_declared};
use crate::engine::quote_ident;
use crate::error::{Error, Result};
use crate::storage::delta;

/// Checks `input`'s table version against its declaration and registers it on `ctx`.
pub(super) async fn register(
    ctx: &SessionContext,
    job: &str,
    input: &Input,
) -> Result<InputSummary> {
    let loc = &input.location;
    let Some(table) = delta::open(loc, &input.delta_version).await? else {
        if input.allow_empty && delta::is_empty(loc).await? {
            register_declared(ctx, input)?;
            return Ok(InputSummary::default());
        }
        return Err(input.error(
            job,
            format!(
                "{} is not a Delta table (it has no {}/); check the url, or the input's `format:`",
                loc.written,
                delta::LOG_FOLDER
            ),
        ));
    };
    let snapshot = table
        .snapshot()
        .map_err(|e| delta::err(loc, "read the table", e))?;
    let version = snapshot.version();
    let schema: Schema = snapshot.schema().as_ref().try_into_arrow().map_err(|e| {
        Error::arrow(
            format!("the schema of {} (version {version})", loc.written),
            e,
        )
    })?;
    if let Some((problems, found)) = column_problems(input, &schema, "the table") {
        return Err(input.error(
            job,
            format!(
                "Delta table {} (version {version}): {problems}; the table has: {found}. Fix the table or the `columns:` of this input",
                loc.written
            ),
        ));
    }
    let files = crate::sink::delta::current_files(&table)?;
    let rows: u64 = files.iter().map(|f| f.2.unwrap_or(0)).sum();
    let bytes: u64 = files.iter().map(|f| f.1).sum();
    if files.is_empty() && !input.allow_empty {
        return Err(input.error(
            job,
            format!(
                "Delta table {} (version {version}) holds no files; set `allow_empty: true` on this input if that is expected",
                loc.written
            ),
        ));
    }
    let provider = table
        .table_provider()
        .await
        .map_err(|e| Error::df(format!("input `{}`: scan {}", input.name, loc.written), e))?;
    let hidden = format!("__delta_{}", input.name);
    ctx.register_table(&hidden, provider)
        .map_err(|e| Error::df(format!("register input `{}`", input.name), e))?;
    let select: Vec<String> = input.columns.iter().map(|(n, _)| quote_ident(n)).collect();
    ctx.sql(&format!(
        "CREATE VIEW {} AS SELECT {} FROM {}",
        quote_ident(&input.name),
        select.join(", "),
        quote_ident(&hidden)
    ))
    .await
    .map_err(|e| Error::df(format!("register input `{}`", input.name), e))?;
    Ok(InputSummary {
        files: files.len(),
        rows,
        bytes,
        memory_bytes: bytes,
    })
}
