//! Input tables: declared columns checked against every file's real Parquet schema before a run
//! (a missing or mistyped column names the input, the file, the column, expected vs found), then
//! registered on the session exposing exactly the declared columns (plus Hive partition keys).
//! For `validate`, the same tables are registered empty from the declarations alone.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectMeta, ObjectStoreExt};

use datafusion::arrow::array::AsArray;
use datafusion::datasource::file_format::csv::CsvFormat;

use crate::config::InputFormat;
use crate::config::types::ColumnType;
use crate::error::{Error, Result};
use crate::job::InputPlan;

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

fn partition_fields(input: &InputPlan) -> Vec<(String, DataType)> {
    input
        .partition_columns
        .iter()
        .map(|(n, t)| (n.clone(), declared_type(*t)))
        .collect()
}

/// The table schema from declarations only (columns, then partition columns).
pub fn declared_schema(input: &InputPlan) -> SchemaRef {
    let mut fields: Vec<Field> = input
        .columns
        .iter()
        .map(|(n, t)| Field::new(n, declared_type(*t), true))
        .collect();
    fields.extend(
        partition_fields(input)
            .into_iter()
            .map(|(n, t)| Field::new(n, t, true)),
    );
    Arc::new(Schema::new(fields))
}

/// Registers an empty table with the declared schema (for planning without data).
pub fn register_declared(ctx: &SessionContext, input: &InputPlan) -> Result<()> {
    let table = MemTable::try_new(declared_schema(input), vec![vec![]])
        .map_err(|e| Error::df(format!("declare input `{}`", input.name), e))?;
    ctx.register_table(&input.name, Arc::new(table))
        .map_err(|e| Error::df(format!("register input `{}`", input.name), e))?;
    Ok(())
}

/// What was found when checking an input.
#[derive(Debug, Clone)]
pub struct InputSummary {
    pub files: usize,
    pub rows: u64,
    pub bytes: u64,
}

/// Checks every file of `input` against its declaration and registers it on `ctx`.
pub async fn register_checked(
    ctx: &SessionContext,
    job: &str,
    input: &InputPlan,
) -> Result<InputSummary> {
    if input.format == InputFormat::Csv {
        return register_csv(ctx, job, input).await;
    }
    let err = |message: String| Error::Input {
        job: job.to_string(),
        input: input.name.clone(),
        message,
    };
    let store = input.location.store.object_store.clone();
    let mut url = input.location.url.clone();
    let mut files = list(
        ctx,
        &url,
        store.as_ref(),
        &input.location.store.name,
        ".parquet",
    )
    .await?;
    let globbed = url.contains(['*', '?', '[']);
    if files.is_empty() && !url.ends_with('/') && !globbed {
        url.push('/');
        files = list(
            ctx,
            &url,
            store.as_ref(),
            &input.location.store.name,
            ".parquet",
        )
        .await?;
    }
    if files.is_empty() {
        if input.allow_empty {
            register_declared(ctx, input)?;
            return Ok(InputSummary {
                files: 0,
                rows: 0,
                bytes: 0,
            });
        }
        return Err(err(format!(
            "no .parquet files at {url}; check the url, or set `allow_empty: true` on this input if an empty export is expected"
        )));
    }
    files.sort_by(|a, b| a.location.cmp(&b.location));

    let footers: Vec<(ObjectMeta, Schema, u64)> = futures::stream::iter(files.clone())
        .map(|meta| {
            let store = store.clone();
            async move {
                let res = super::footer::read(store.as_ref(), &meta).await;
                (meta, res)
            }
        })
        .buffered(16)
        .map(|(meta, res)| match res {
            Ok((schema, rows)) => Ok((meta, schema, rows)),
            Err(e) => Err(Error::InputFile {
                job: job.to_string(),
                input: input.name.clone(),
                file: meta.location.to_string(),
                message: format!("not a readable Parquet file: {e}"),
            }),
        })
        .try_collect()
        .await?;

    let mut fields = Vec::with_capacity(input.columns.len());
    for (i, (meta, schema, _)) in footers.iter().enumerate() {
        let mut problems = Vec::new();
        for (name, declared) in &input.columns {
            match schema.field_with_name(name) {
                Err(_) => problems.push(format!("missing column `{name}` (declared {declared})")),
                Ok(f) if !type_matches(*declared, f.data_type()) => problems.push(format!(
                    "column `{name}` is {} in the file, declared {declared}",
                    f.data_type()
                )),
                Ok(f) if i == 0 => fields.push(Field::new(name, f.data_type().clone(), true)),
                Ok(_) => {}
            }
        }
        if !problems.is_empty() {
            let found: Vec<String> = schema
                .fields()
                .iter()
                .map(|f| format!("{} {}", f.name(), f.data_type()))
                .collect();
            return Err(Error::InputFile {
                job: job.to_string(),
                input: input.name.clone(),
                file: meta.location.to_string(),
                message: format!(
                    "{}; the file has: {}. Fix the export or the `columns:` of this input",
                    problems.join("; "),
                    found.join(", ")
                ),
            });
        }
    }
    let rows: u64 = footers.iter().map(|(_, _, r)| r).sum();
    let bytes: u64 = footers.iter().map(|(m, _, _)| m.size).sum();
    if rows == 0 && !input.allow_empty {
        return Err(err(format!(
            "{} file(s) at {url} hold no rows; set `allow_empty: true` on this input if that is expected",
            footers.len()
        )));
    }

    let table_url = ListingTableUrl::parse(&url)
        .map_err(|e| Error::df(format!("input `{}` url {url}", input.name), e))?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(partition_fields(input));
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(options)
        .with_schema(Arc::new(Schema::new(fields)));
    let table = ListingTable::try_new(config)
        .map_err(|e| Error::df(format!("input `{}`", input.name), e))?;
    ctx.register_table(&input.name, Arc::new(table))
        .map_err(|e| Error::df(format!("register input `{}`", input.name), e))?;
    Ok(InputSummary {
        files: footers.len(),
        rows,
        bytes,
    })
}

/// A CSV reference table, read whole with the declared schema; its header must name the
/// declared columns in order.
async fn register_csv(ctx: &SessionContext, job: &str, input: &InputPlan) -> Result<InputSummary> {
    let err = |message: String| Error::Input {
        job: job.to_string(),
        input: input.name.clone(),
        message,
    };
    let url = input.location.url.clone();
    let store = input.location.store.object_store.clone();
    let files = list(
        ctx,
        &url,
        store.as_ref(),
        &input.location.store.name,
        ".csv",
    )
    .await?;
    if files.is_empty() {
        return Err(err(format!("no .csv file at {url}")));
    }
    let mut bytes = 0;
    for meta in &files {
        bytes += meta.size;
        let head = store
            .get_range(&meta.location, 0..meta.size.min(4096))
            .await
            .map_err(|e| Error::store(url.clone(), "read CSV header", e))?;
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
            return Err(Error::InputFile {
                job: job.to_string(),
                input: input.name.clone(),
                file: meta.location.to_string(),
                message: format!(
                    "header is `{}`, declared columns are `{}`",
                    header.join(","),
                    declared.join(",")
                ),
            });
        }
    }
    let fields: Vec<Field> = input
        .columns
        .iter()
        .map(|(n, t)| Field::new(n, declared_type(*t), true))
        .collect();
    let options = ListingOptions::new(Arc::new(CsvFormat::default().with_has_header(true)))
        .with_file_extension(".csv");
    let table_url = ListingTableUrl::parse(&url)
        .map_err(|e| Error::df(format!("input `{}` url {url}", input.name), e))?;
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(options)
        .with_schema(Arc::new(Schema::new(fields)));
    let table = ListingTable::try_new(config)
        .map_err(|e| Error::df(format!("input `{}`", input.name), e))?;
    ctx.register_table(&input.name, Arc::new(table))
        .map_err(|e| Error::df(format!("register input `{}`", input.name), e))?;
    let rows = ctx
        .sql(&format!(
            "SELECT count(*) FROM {}",
            crate::engine::quote_ident(&input.name)
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
        })?
        .first()
        .and_then(|b| {
            b.column(0)
                .as_primitive_opt::<datafusion::arrow::datatypes::Int64Type>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0) as u64;
    Ok(InputSummary {
        files: files.len(),
        rows,
        bytes,
    })
}

async fn list(
    ctx: &SessionContext,
    url: &str,
    store: &dyn object_store::ObjectStore,
    store_name: &str,
    extension: &str,
) -> Result<Vec<ObjectMeta>> {
    let table_url =
        ListingTableUrl::parse(url).map_err(|e| Error::df(format!("parse input url {url}"), e))?;
    let state = ctx.state();
    let listed: std::result::Result<Vec<ObjectMeta>, _> =
        match table_url.list_all_files(&state, store, extension).await {
            Ok(stream) => stream.try_collect().await,
            Err(e) => Err(e),
        };
    listed.map_err(|e| {
        let source = match e {
            datafusion::error::DataFusionError::ObjectStore(inner) => *inner,
            other => object_store::Error::Generic {
                store: "listing",
                source: Box::new(other),
            },
        };
        Error::store(
            url,
            format!("list input files (store `{store_name}`: check its url/endpoint in config.yaml and the AWS_* credentials)"),
            source,
        )
    })
}
