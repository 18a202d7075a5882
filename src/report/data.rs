//! What a report reads: the committed output tables of one job, each registered for SQL under
//! its step's name and narrowed to the run date (`<name>` holds the run date's rows when the
//! table is partitioned by `run_date`, `<name>__all` every run date). A section finds its
//! table by the columns it needs, not by name, so a job of a user's own gets the sections its
//! tables support.

use chrono::NaiveDate;
use datafusion::arrow::array::{Array, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::project::Project;
use crate::sink::log::TableLog;
use crate::storage::listing;

/// One value of a query result, as a report shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Num(f64),
    Text(String),
}

impl Cell {
    pub fn num(&self) -> Option<f64> {
        match self {
            Cell::Num(v) => Some(*v),
            _ => None,
        }
    }

    pub fn text(&self) -> String {
        match self {
            Cell::Null => String::new(),
            Cell::Num(v) => v.to_string(),
            Cell::Text(s) => s.clone(),
        }
    }
}

pub type Row = Vec<Cell>;

/// A committed output table of the job.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// The step it was written from: the name SQL uses.
    pub name: String,
    pub url: String,
    pub columns: Vec<String>,
    /// Partitioned by run_date: `<name>__all` has the other run dates.
    pub dated: bool,
}

impl TableInfo {
    pub fn has(&self, column: &str) -> bool {
        self.columns.iter().any(|c| c == column)
    }
}

pub struct Tables {
    ctx: SessionContext,
    pub date: NaiveDate,
    pub list: Vec<TableInfo>,
}

fn df_err(e: datafusion::error::DataFusionError) -> Error {
    Error::df("read an output table for the report", e)
}

/// Registers a committed output table (Hive folders, partition values as strings) as `name`.
pub async fn register_output(
    ctx: &SessionContext,
    log: &TableLog,
    partition_by: &[String],
    name: &str,
) -> Result<()> {
    let parts: Vec<(String, DataType)> = partition_by
        .iter()
        .map(|c| (c.clone(), DataType::Utf8))
        .collect();
    let url = log.table.dir_url();
    let table = listing::table(&ctx.state(), &url, listing::Format::Parquet, None, parts)
        .await
        .map_err(|e| Error::df("read the table back", e))?;
    ctx.register_table(name, table)
        .map_err(|e| Error::df("read the table back", e))?;
    Ok(())
}

impl Tables {
    /// The job's outputs that have committed rows for `date` (all of a table's rows when it is
    /// not partitioned by run_date).
    pub async fn open(
        project: &Project,
        job: &super::Subject<'_>,
        date: NaiveDate,
    ) -> Result<Self> {
        let ctx = project.engine()?.session()?;
        let mut list = Vec::new();
        let mut registered = std::collections::BTreeSet::new();
        for out in job.outputs {
            let name = out.from.clone();
            // A step written twice (as Parquet and as Delta) is read from its first output.
            if registered.contains(&name) {
                continue;
            }
            let all = format!("{name}__all");
            if out.format.is_delta() {
                let latest = crate::storage::delta::Version::Latest;
                let Some(table) = crate::storage::delta::open(&out.location, &latest).await? else {
                    continue;
                };
                let provider = table
                    .table_provider()
                    .await
                    .map_err(|e| Error::df("read the Delta table back", e))?;
                ctx.register_table(all.as_str(), provider).map_err(df_err)?;
            } else {
                let log = TableLog::new(out.location.clone())?;
                if log.published().await? == 0 {
                    continue;
                }
                register_output(&ctx, &log, &out.partition_by, &all).await?;
            }
            registered.insert(name.clone());
            let dated = out.partition_by.iter().any(|c| c == "run_date");
            let sql = if dated {
                format!(
                    "CREATE VIEW \"{name}\" AS SELECT * FROM \"{all}\" WHERE run_date = '{date}'"
                )
            } else {
                format!("CREATE VIEW \"{name}\" AS SELECT * FROM \"{all}\"")
            };
            ctx.sql(&sql).await.map_err(df_err)?;
            // A table without rows for the date (never written for it) gets no section.
            let empty = ctx
                .sql(&format!("SELECT 1 FROM \"{name}\" LIMIT 1"))
                .await
                .map_err(df_err)?
                .collect()
                .await
                .map_err(df_err)?
                .iter()
                .all(|b| b.num_rows() == 0);
            if empty {
                ctx.deregister_table(name.as_str()).map_err(df_err)?;
                continue;
            }
            let columns = ctx
                .table(name.as_str())
                .await
                .map_err(df_err)?
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            list.push(TableInfo {
                name,
                url: out.location.written.clone(),
                columns,
                dated,
            });
        }
        Ok(Self { ctx, date, list })
    }

    /// The first table that has every one of `columns`.
    pub fn find(&self, columns: &[&str]) -> Option<&TableInfo> {
        self.list.iter().find(|t| columns.iter().all(|c| t.has(c)))
    }

    /// Runs `sql`; numbers (and booleans, as 0/1) come back as [`Cell::Num`], the rest as text.
    pub async fn query(&self, sql: &str) -> Result<Vec<Row>> {
        let batches = self
            .ctx
            .sql(sql)
            .await
            .map_err(df_err)?
            .collect()
            .await
            .map_err(df_err)?;
        let mut rows = Vec::new();
        for b in &batches {
            rows.extend(cells(b)?);
        }
        Ok(rows)
    }
}

fn cells(b: &RecordBatch) -> Result<Vec<Row>> {
    let mut cols: Vec<Vec<Cell>> = Vec::new();
    for c in b.columns() {
        let dt = c.data_type();
        let numeric = dt.is_numeric() || matches!(dt, DataType::Boolean);
        let col = if numeric {
            let a = cast(c, &DataType::Float64).map_err(|e| Error::arrow("read a number", e))?;
            let a = a
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| Error::Internal("a cast to Float64 gave another type".into()))?;
            (0..a.len())
                .map(|i| {
                    if a.is_null(i) {
                        Cell::Null
                    } else {
                        Cell::Num(a.value(i))
                    }
                })
                .collect()
        } else {
            let a = cast(c, &DataType::Utf8).map_err(|e| Error::arrow("read a value", e))?;
            let a = a
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| Error::Internal("a cast to Utf8 gave another type".into()))?;
            (0..a.len())
                .map(|i| {
                    if a.is_null(i) {
                        Cell::Null
                    } else {
                        Cell::Text(a.value(i).to_string())
                    }
                })
                .collect()
        };
        cols.push(col);
    }
    Ok((0..b.num_rows())
        .map(|i| cols.iter().map(|c| c[i].clone()).collect())
        .collect())
}

/// `name` quoted for SQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
