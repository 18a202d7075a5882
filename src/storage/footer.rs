//! Reading a Parquet file's footer (schema and row count) without reading its data.

use datafusion::arrow::datatypes::Schema;
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::error::{DataFusionError, Result};
use object_store::{ObjectMeta, ObjectStore};

/// What a Parquet file's footer says of it.
#[derive(Debug)]
pub struct Footer {
    pub schema: Schema,
    pub rows: u64,
    /// The uncompressed size of all its row groups (every column), as the writer recorded it.
    pub uncompressed: u64,
}

/// The Arrow schema, row count and uncompressed size of the Parquet file `meta`.
pub async fn read(store: &dyn ObjectStore, meta: &ObjectMeta) -> Result<Footer> {
    let metadata = DFParquetMetadata::new(store, meta).fetch_metadata().await?;
    let file = metadata.file_metadata();
    let schema =
        parquet::arrow::parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
            .map_err(DataFusionError::from)?;
    let uncompressed = metadata
        .row_groups()
        .iter()
        .map(|g| u64::try_from(g.total_byte_size()).unwrap_or(0))
        .sum();
    Ok(Footer {
        schema,
        rows: file.num_rows().max(0) as u64,
        uncompressed,
    })
}
