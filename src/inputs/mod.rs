//! Input tables, one file per format ([`parquet`], [`csv`], [`delta`]). An [`Input`] is the checked form
//! of an `inputs:` entry. Before a run its declared columns are checked against every file
//! (a missing or mistyped column names the input, the file, the column, expected vs found), then
//! it is registered on the session exposing exactly the declared columns (plus Hive partition
//! keys). For `validate`, the same table is registered empty from the declarations alone, so SQL
//! is planned against the schema the run will see.

mod csv;
mod delta;
mod parquet;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use crate::config::Problem;
use crate::config::job::{InputFormat, InputSpec, Partitioning};
use crate::config::types::ColumnType;
use crate::error::{Error, Result};
use crate::storage::{Location, Stores};

/// A checked input: where it is, its format, the columns the job may use.
#[derive(Debug, Clone)]
pub struct Input {
    /// The table name SQL uses.
    pub name: String,
    pub location: Location,
    pub format: InputFormat,
    /// Hive partition keys and their types, outermost first.
    pub partition_columns: Vec<(String, ColumnType)>,
    pub columns: Vec<(String, ColumnType)>,
    pub allow_empty: bool,
    /// `format: delta`: which version of the table.
    pub delta_version: crate::storage::delta::Version,
}

impl Input {
    /// Checks the input `name` declared by `spec`. Problems are at fields under the input.
    pub fn check(
        name: &str,
        spec: &InputSpec,
        stores: &Stores,
    ) -> std::result::Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let location = stores
            .resolve(&spec.url)
            .map_err(|m| problems.push(Problem::new("url", m)))
            .ok();
        if spec.columns.is_empty() {
            problems.push(Problem::new(
                "columns",
                "declare at least one column with its type",
            ));
        }
        match (spec.partitioning, spec.partition_columns.is_empty()) {
            (Partitioning::Hive, true) => problems.push(Problem::new(
                "partition_columns",
                "`partitioning: hive` needs `partition_columns:` (the folder keys and their types)",
            )),
            (Partitioning::None, false) => problems.push(Problem::new(
                "partitioning",
                "`partition_columns:` is set: add `partitioning: hive`",
            )),
            _ => {}
        }
        if spec.format == InputFormat::Csv && !spec.partition_columns.is_empty() {
            problems.push(Problem::new(
                "partition_columns",
                "CSV inputs are single reference tables; they have no partition folders",
            ));
        }
        let is_delta = spec.format == InputFormat::Delta;
        if is_delta && spec.partitioning != Partitioning::None {
            problems.push(Problem::new(
                "partitioning",
                "a Delta table carries its own partitioning; list its partition columns under `columns:`",
            ));
        }
        for (set, field) in [
            (spec.version.is_some(), "version"),
            (spec.as_of.is_some(), "as_of"),
        ] {
            if set && !is_delta {
                problems.push(Problem::new(
                    field,
                    "selects a version of a Delta table: add `format: delta`, or remove it",
                ));
            }
        }
        if spec.version.is_some() && spec.as_of.is_some() {
            problems.push(Problem::new(
                "as_of",
                "set `version:` or `as_of:`, not both",
            ));
        }
        let delta_version = match (spec.version, spec.as_of.as_deref()) {
            (Some(v), _) => crate::storage::delta::Version::Number(v),
            (None, Some(t)) => match chrono::DateTime::parse_from_rfc3339(t) {
                Ok(t) => crate::storage::delta::Version::AsOf(t.with_timezone(&chrono::Utc)),
                Err(e) => {
                    problems.push(Problem::new(
                        "as_of",
                        format!("`{t}` is not an RFC 3339 time such as 2026-11-22T03:00:00Z: {e}"),
                    ));
                    crate::storage::delta::Version::Latest
                }
            },
            (None, None) => crate::storage::delta::Version::Latest,
        };
        for k in spec.partition_columns.keys() {
            if spec.columns.get(k).is_some() {
                problems.push(Problem::new(
                    format!("columns.{k}"),
                    format!("`{k}` is a partition column; list it only under `partition_columns`"),
                ));
            }
        }
        match location {
            Some(location) if problems.is_empty() => Ok(Self {
                name: name.to_string(),
                location,
                format: spec.format,
                partition_columns: spec.partition_columns.0.clone(),
                columns: spec.columns.0.clone(),
                allow_empty: spec.allow_empty,
                delta_version,
            }),
            _ => Err(problems),
        }
    }

    fn error(&self, job: &str, message: String) -> Error {
        Error::input(job, &self.name, message)
    }

    fn file_error(&self, job: &str, file: &object_store::path::Path, message: String) -> Error {
        Error::InputFile {
            job: job.to_string(),
            input: self.name.clone(),
            file: self.location.show(file),
            message,
        }
    }

    fn partition_fields(&self) -> Vec<(String, DataType)> {
        self.partition_columns
            .iter()
            .map(|(n, t)| (n.clone(), declared_type(*t)))
            .collect()
    }

    /// The table schema from declarations only (columns, then partition columns).
    pub fn declared_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .columns
            .iter()
            .map(|(n, t)| Field::new(n, declared_type(*t), true))
            .collect();
        fields.extend(
            self.partition_fields()
                .into_iter()
                .map(|(n, t)| Field::new(n, t, true)),
        );
        Arc::new(Schema::new(fields))
    }
}

/// What `schema` (of a file, or of a table) lacks or mistypes of `input`'s declared columns,
/// and the columns it has; `None` when it has them all. `place` names it: "the file".
fn column_problems(input: &Input, schema: &Schema, place: &str) -> Option<(String, String)> {
    let mut problems = Vec::new();
    for (name, declared) in &input.columns {
        match schema.field_with_name(name) {
            Err(_) => problems.push(format!("missing column `{name}` (declared {declared})")),
            Ok(f) if !type_matches(*declared, f.data_type()) => problems.push(format!(
                "column `{name}` is {} in {place}, declared {declared}",
                f.data_type()
            )),
            Ok(_) => {}
        }
    }
    if problems.is_empty() {
        return None;
    }
    let found: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect();
    Some((problems.join("; "), found.join(", ")))
}

/// The Arrow type a declaration stands for when no file is at hand (validate).
pub fn declared_type(t: ColumnType) -> DataType {
    match t {
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Int32 => DataType::Int32,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float32 => DataType::Float32,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Utf8 => DataType::Utf8,
        ColumnType::Date => DataType::Date32,
        ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        ColumnType::Decimal => DataType::Decimal128(38, 10),
    }
}

/// Whether a file's Arrow type satisfies a declaration.
pub fn type_matches(declared: ColumnType, found: &DataType) -> bool {
    use DataType as D;
    match declared {
        ColumnType::Bool => matches!(found, D::Boolean),
        ColumnType::Int32 => matches!(found, D::Int32),
        ColumnType::Int64 => matches!(found, D::Int64),
        ColumnType::Float32 => matches!(found, D::Float32),
        ColumnType::Float64 => matches!(found, D::Float64),
        ColumnType::Utf8 => matches!(found, D::Utf8 | D::LargeUtf8 | D::Utf8View),
        ColumnType::Date => matches!(found, D::Date32 | D::Date64),
        ColumnType::Timestamp => matches!(found, D::Timestamp(..)),
        ColumnType::Decimal => matches!(found, D::Decimal128(..) | D::Decimal256(..)),
    }
}

/// Registers an empty table with the declared schema (for planning without data).
pub fn register_declared(ctx: &SessionContext, input: &Input) -> Result<()> {
    let table = MemTable::try_new(input.declared_schema(), vec![vec![]])
        .map_err(|e| Error::df(format!("declare input `{}`", input.name), e))?;
    ctx.register_table(&input.name, Arc::new(table))
        .map_err(|e| Error::df(format!("register input `{}`", input.name), e))?;
    Ok(())
}

/// What was found when checking an input.
#[derive(Debug, Clone, Default)]
pub struct InputSummary {
    pub files: usize,
    pub rows: u64,
    pub bytes: u64,
    /// What its rows take decoded, estimated: Parquet files' uncompressed size (from their
    /// footers), a CSV file's size; for a Delta table its files' size (compressed, so low).
    pub memory_bytes: u64,
}

/// Checks every file of `input` against its declaration and registers it on `ctx`.
pub async fn register_checked(
    ctx: &SessionContext,
    job: &str,
    input: &Input,
) -> Result<InputSummary> {
    match input.format {
        InputFormat::Parquet => parquet::register(ctx, job, input).await,
        InputFormat::Csv => csv::register(ctx, job, input).await,
        InputFormat::Delta => delta::register(ctx, job, input).await,
    }
}

/// The files of `input` at `url` in `format`, listed through its store; an error names the
/// store and what to check.
async fn list(
    ctx: &SessionContext,
    input: &Input,
    url: &str,
    format: crate::storage::listing::Format,
) -> Result<Vec<object_store::ObjectMeta>> {
    let store = &input.location.store;
    crate::storage::listing::list_files(&ctx.state(), url, store.object_store.as_ref(), format)
        .await
        .map_err(|e| {
            let source = match e {
                datafusion::error::DataFusionError::ObjectStore(inner) => *inner,
                other => object_store::Error::Generic {
                    store: "listing",
                    source: Box::new(other),
                },
            };
            Error::store(
                url,
                format!("list input files (store `{}`: check its url/endpoint in config.yaml and the AWS_* credentials)", store.name),
                source,
            )
        })
}
