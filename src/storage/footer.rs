//! Reading a Parquet file's footer (schema and row count) without reading its data.

use datafusion::arrow::datatypes::Schema;
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::error::{DataFusionError, Result};
use object_store::{ObjectMeta, ObjectStore};

/// The Arrow schema and row count of the Parquet file `meta`.
pub async fn read(store: &dyn ObjectStore, meta: &ObjectMeta) -> Result<(Schema, u64)> {
    let metadata = DFParquetMetadata::new(store, meta).fetch_metadata().await?;
    let file = metadata.file_metadata();
    let schema =
        parquet::arrow::parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
            .map_err(DataFusionError::from)?;
    Ok((schema, file.num_rows().max(0) as u64))
}
