//! Listing the files of a table folder (or glob) and building the DataFusion `ListingTable`
//! that reads them: the one place both are done, for inputs, staged outputs and read-backs.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::Session;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::Result;
use futures::TryStreamExt;
use object_store::{ObjectMeta, ObjectStore};

/// The file formats clvflow reads as tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Parquet,
    /// Comma-separated with a header row.
    Csv,
    /// Arrow IPC files (scratch only: a split step's buckets).
    Arrow,
}

impl Format {
    /// The file name ending of the format's files.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => ".parquet",
            Format::Csv => ".csv",
            Format::Arrow => ".arrow",
        }
    }

    fn file_format(self) -> Arc<dyn FileFormat> {
        match self {
            Format::Parquet => Arc::new(ParquetFormat::default()),
            Format::Csv => Arc::new(CsvFormat::default().with_has_header(true)),
            Format::Arrow => Arc::new(datafusion::datasource::file_format::arrow::ArrowFormat),
        }
    }
}

/// Every file of `format` at `url` (a folder ending in `/`, a file, or a glob), recursively.
pub async fn list_files(
    state: &dyn Session,
    url: &str,
    store: &dyn ObjectStore,
    format: Format,
) -> Result<Vec<ObjectMeta>> {
    let table_url = ListingTableUrl::parse(url)?;
    table_url
        .list_all_files(state, store, format.extension())
        .await?
        .try_collect()
        .await
}

/// A table over the files at `url` with columns `file_schema` (inferred from the files when
/// `None`), followed by the Hive partition columns `partitions` taken from the folder names.
pub async fn table(
    state: &dyn Session,
    url: &str,
    format: Format,
    file_schema: Option<SchemaRef>,
    partitions: Vec<(String, DataType)>,
) -> Result<Arc<ListingTable>> {
    let table_url = ListingTableUrl::parse(url)?;
    let options = ListingOptions::new(format.file_format())
        .with_file_extension(format.extension())
        .with_table_partition_cols(partitions);
    let schema = match file_schema {
        Some(s) => s,
        None => options.infer_schema(state, &table_url).await?,
    };
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// A `ListingTable` over exactly the files `paths` (absolute local paths or URLs) of `format`,
/// with `schema`.
pub fn table_of_files(
    paths: &[String],
    format: Format,
    schema: SchemaRef,
) -> Result<Arc<ListingTable>> {
    let urls = paths
        .iter()
        .map(ListingTableUrl::parse)
        .collect::<Result<Vec<_>>>()?;
    let options = ListingOptions::new(format.file_format()).with_file_extension(format.extension());
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Arc::new(ListingTable::try_new(config)?))
}
