//! Tables of a step's rows: reading a registered table's batches in their partitions, taking
//! numeric columns out of them, appending new columns (the model steps append their results to
//! the rows they read: the input's Arrow buffers are shared, not copied), and registering
//! batches as a table.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, MutableArrayData, RecordBatch, make_array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Constraints, Statistics};
use datafusion::datasource::{MemTable, TableType};
use datafusion::execution::memory_pool::MemoryReservation;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use crate::error::Error;

/// A column of a step's input that cannot be used as the step needs it.
#[derive(Debug, thiserror::Error)]
pub enum ColumnError {
    #[error("no column `{0}`")]
    Missing(String),
    #[error("column `{0}` has NULL values")]
    Nulls(String),
    #[error("column `{column}` is not a {wanted}")]
    Type {
        column: String,
        wanted: &'static str,
        #[source]
        source: ArrowError,
    },
    #[error(
        "its input already has a column `{0}`, which this step adds; rename or drop it in the input"
    )]
    Exists(String),
}

/// Registers `parts` (batches per partition) as table `name` on `ctx`, replacing a table of that
/// name (a re-run on the same session replaces the step's results). The table's memory is taken
/// from the session's memory pool until the table is dropped, so that `engine.memory_limit`
/// counts step results too; a result that does not fit is an [`Error::OutOfMemory`]. (A model
/// step's result shares its input's buffers: while both are registered they are counted twice.)
/// Returns the bytes the table holds (each buffer counted once).
pub fn register(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    parts: Vec<Vec<RecordBatch>>,
) -> crate::error::Result<usize> {
    register_counted(ctx, name, schema, parts, Vec::new())
}

/// [`register`] for rows that `counted` already count against the pool (taken while they
/// arrived): the table keeps those reservations, and only the difference to its bytes is
/// asked for or given back. Letting go of them first and asking anew would count the rows
/// twice for a moment, as held by nobody and as asked for (the pool sees the live heap).
pub fn register_counted(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    parts: Vec<Vec<RecordBatch>>,
    mut counted: Vec<MemoryReservation>,
) -> crate::error::Result<usize> {
    let err = |e| Error::df(format!("register `{name}`"), e);
    let parts = if parts.is_empty() {
        vec![vec![]]
    } else {
        parts
    };
    let bytes = crate::engine::memory::batches_bytes(parts.iter().flatten()) as usize;
    // The table it replaces gives its memory back first.
    ctx.deregister_table(name).map_err(err)?;
    let have: usize = counted.iter().map(MemoryReservation::size).sum();
    if bytes > have {
        let more =
            crate::engine::memory::reserve(ctx, format!("step result `{name}`"), bytes - have)
                .map_err(|e| {
                    Error::df(
                        format!(
                            "step `{name}`: keeping its result ({} MiB) in memory",
                            bytes >> 20
                        ),
                        e,
                    )
                    .out_of_memory(ctx.runtime_env().memory_pool.as_ref())
                })?;
        counted.push(more);
    } else {
        let mut surplus = have - bytes;
        for r in &mut counted {
            let give = surplus.min(r.size());
            r.shrink(give);
            surplus -= give;
        }
    }
    let held = crate::engine::scratch::ResultSpace::of(ctx).map(|s| s.hold(bytes));
    let table = HeldTable {
        table: MemTable::try_new(schema, parts.clone()).map_err(err)?,
        parts,
        reservations: counted,
        _counted: held,
    };
    ctx.register_table(name, Arc::new(table)).map_err(err)?;
    Ok(bytes)
}

/// A step result in memory, holding its share of the memory pool until it is dropped.
#[derive(Debug)]
pub struct HeldTable {
    table: MemTable,
    /// The same batches (shared buffers), for model steps that read them in order.
    parts: Vec<Vec<RecordBatch>>,
    /// Its bytes, counted against the pool.
    reservations: Vec<MemoryReservation>,
    /// Counted against the share of memory for held results.
    _counted: Option<crate::engine::scratch::HeldBytes>,
}

impl HeldTable {
    /// The rows, as DataFusion's in-memory table.
    pub fn table(&self) -> &MemTable {
        &self.table
    }

    /// The batches, per partition.
    pub fn parts(&self) -> &[Vec<RecordBatch>] {
        &self.parts
    }

    /// The bytes its batches hold (as counted against the pool).
    pub fn bytes(&self) -> usize {
        self.reservations.iter().map(MemoryReservation::size).sum()
    }
}

#[async_trait::async_trait]
impl TableProvider for HeldTable {
    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn constraints(&self) -> Option<&Constraints> {
        self.table.constraints()
    }

    fn table_type(&self) -> TableType {
        self.table.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        self.table.scan(state, projection, filters, limit).await
    }

    fn statistics(&self) -> Option<Statistics> {
        self.table.statistics()
    }
}

/// A registered table's rows, batch by batch in its partitions.
#[derive(Debug)]
pub struct Rows {
    pub schema: SchemaRef,
    pub parts: Vec<Vec<RecordBatch>>,
}

impl Rows {
    /// Reads `table` from `ctx` (a step result: no copy).
    pub async fn read(
        ctx: &SessionContext,
        table: &str,
    ) -> Result<Self, datafusion::error::DataFusionError> {
        let df = ctx.table(table).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let parts = df.collect_partitioned().await?;
        Ok(Self { schema, parts })
    }

    pub fn len(&self) -> usize {
        self.parts.iter().flatten().map(|b| b.num_rows()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn column<'a>(&'a self, name: &str) -> Result<impl Iterator<Item = &'a ArrayRef>, ColumnError> {
        let i = self
            .schema
            .index_of(name)
            .map_err(|_| ColumnError::Missing(name.to_string()))?;
        Ok(self.parts.iter().flatten().map(move |b| b.column(i)))
    }

    /// Column `name` as floats (cast from any number), in row order. A NULL becomes `if_null`,
    /// or is an error naming the column when that is `None`.
    pub fn floats(&self, name: &str, if_null: Option<f64>) -> Result<Vec<f64>, ColumnError> {
        let mut out = Vec::with_capacity(self.len());
        for a in self.column(name)? {
            let a = cast(a, &DataType::Float64).map_err(|source| ColumnError::Type {
                column: name.to_string(),
                wanted: "number",
                source,
            })?;
            let a = a.as_primitive::<Float64Type>();
            match (a.null_count(), if_null) {
                (0, _) => out.extend_from_slice(a.values()),
                (_, Some(v)) => out.extend(a.iter().map(|x| x.unwrap_or(v))),
                (_, None) => return Err(ColumnError::Nulls(name.to_string())),
            }
        }
        Ok(out)
    }

    /// Column `name` as integers (cast from any integer), in row order; a NULL is an error
    /// naming the column.
    pub fn integers(&self, name: &str) -> Result<Vec<i64>, ColumnError> {
        let mut out = Vec::with_capacity(self.len());
        for a in self.column(name)? {
            let a = cast(a, &DataType::Int64).map_err(|source| ColumnError::Type {
                column: name.to_string(),
                wanted: "whole number",
                source,
            })?;
            if a.null_count() > 0 {
                return Err(ColumnError::Nulls(name.to_string()));
            }
            out.extend_from_slice(a.as_primitive::<Int64Type>().values());
        }
        Ok(out)
    }
}

/// The schema of `from` with `added` columns appended, and `run_date` (a DATE) before them when
/// `from` has none. A name `from` already has is an error that says which.
pub fn appended_schema(from: &Schema, added: &[Field]) -> Result<SchemaRef, ColumnError> {
    let mut fields: Vec<Field> = from.fields().iter().map(|f| f.as_ref().clone()).collect();
    if from.field_with_name("run_date").is_err() {
        fields.push(Field::new("run_date", DataType::Date32, false));
    }
    for f in added {
        if from.field_with_name(f.name()).is_ok() {
            return Err(ColumnError::Exists(f.name().clone()));
        }
        fields.push(f.clone());
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// `rows` with `added` columns (each as long as all rows together) appended to every batch,
/// and `run_date` = `day` (days since 1970-01-01) when the rows have none. The input's buffers
/// are shared, not copied; partitions are kept.
pub fn append_columns(
    rows: &Rows,
    day: i32,
    added: Vec<(Field, ArrayRef)>,
) -> Result<(SchemaRef, Vec<Vec<RecordBatch>>), Error> {
    let fields: Vec<Field> = added.iter().map(|(f, _)| f.clone()).collect();
    let schema = appended_schema(&rows.schema, &fields)
        .map_err(|e| Error::Internal(format!("append columns: {e} (checked before)")))?;
    let mut offset = 0;
    let mut parts = Vec::with_capacity(rows.parts.len());
    for part in &rows.parts {
        let mut batches = Vec::with_capacity(part.len());
        for b in part {
            let n = b.num_rows();
            // Each batch gets its own copy of its part: DataFusion charges every batch for the
            // whole buffer behind a slice, so slices of one buffer would count it once per batch.
            let cols = added
                .iter()
                .map(|(_, a)| copied(a.slice(offset, n).as_ref()))
                .collect::<Result<Vec<_>, _>>()?;
            offset += n;
            batches.push(extend_batch(&schema, b, day, cols)?);
        }
        parts.push(batches);
    }
    Ok((schema, parts))
}

/// Batch `b` with the columns `added` (as long as `b`) appended, and `run_date` = `day` before
/// them when `schema` (from [`appended_schema`]) has one more column than `b` and `added`
/// together. The batch's buffers are shared, the added arrays taken as they are (build them per
/// batch, not as slices of one long array).
pub fn extend_batch(
    schema: &SchemaRef,
    b: &RecordBatch,
    day: i32,
    added: Vec<ArrayRef>,
) -> Result<RecordBatch, Error> {
    let n = b.num_rows();
    let mut cols: Vec<ArrayRef> = b.columns().to_vec();
    if schema.fields().len() > cols.len() + added.len() {
        cols.push(Arc::new(Date32Array::from(vec![day; n])));
    }
    cols.extend(added);
    RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| Error::arrow("append the step's columns", e))
}

/// Days since 1970-01-01.
pub fn date32(day: chrono::NaiveDate) -> i32 {
    (day - chrono::NaiveDate::default()).num_days() as i32
}

/// A copy of `array` in buffers of its own, sized to it (Arrow's `concat` of a single array
/// returns a slice of the same buffers instead).
pub fn copied(array: &dyn Array) -> Result<ArrayRef, Error> {
    let data = array.to_data();
    let mut copy = MutableArrayData::new(vec![&data], false, data.len());
    copy.try_extend(0, 0, data.len())
        .map_err(|e| Error::arrow("copy a column", e))?;
    Ok(make_array(copy.freeze()))
}

/// Copies the columns of batches that share buffers with other batches (an aggregation emits
/// its result as slices of one buffer), so that each batch owns exactly its data. DataFusion
/// charges a batch for every buffer it points into: a sort or join over such slices would be
/// charged the shared buffer once per batch and run out of memory on a fraction of the limit.
/// Results whose batches do not share much are returned as they are.
pub fn compact(parts: Vec<Vec<RecordBatch>>) -> Result<Vec<Vec<RecordBatch>>, Error> {
    let charged: usize = parts
        .iter()
        .flatten()
        .map(|b| b.get_array_memory_size())
        .sum();
    let held = crate::engine::memory::batches_bytes(parts.iter().flatten()) as usize;
    if charged <= 2 * held + (1 << 20) {
        return Ok(parts);
    }
    parts
        .into_iter()
        .map(|part| {
            part.into_iter()
                .map(|b| {
                    let cols = b
                        .columns()
                        .iter()
                        .map(|c| copied(c.as_ref()))
                        .collect::<Result<Vec<_>, _>>()?;
                    RecordBatch::try_new(b.schema(), cols)
                        .map_err(|e| Error::arrow("compact a step result", e))
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, Int64Array};
    use datafusion::arrow::datatypes::Int64Type;

    #[test]
    fn appended_columns_line_up_with_rows_across_batches() {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let batch = |v: Vec<i64>| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(v))]).unwrap()
        };
        let rows = Rows {
            schema: schema.clone(),
            parts: vec![
                vec![batch(vec![1, 2]), batch(vec![3])],
                vec![batch(vec![4])],
            ],
        };
        let added: ArrayRef = Arc::new(Float64Array::from(vec![10.0, 20.0, 30.0, 40.0]));
        let (out_schema, parts) = append_columns(
            &rows,
            5,
            vec![(Field::new("v", DataType::Float64, false), added)],
        )
        .unwrap();
        assert_eq!(
            out_schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>(),
            ["id", "run_date", "v"]
        );
        let mut seen = Vec::new();
        for b in parts.iter().flatten() {
            let id = b.column(0).as_primitive::<Int64Type>();
            let v = b.column(2).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                seen.push((id.value(i), v.value(i)));
            }
        }
        assert_eq!(seen, [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]);
        // The input's columns are shared, not copied.
        let original = rows.parts[0][0].column(0).to_data().buffers()[0].data_ptr();
        assert_eq!(
            parts[0][0].column(0).to_data().buffers()[0].data_ptr(),
            original
        );
        assert!(
            appended_schema(&out_schema, &[Field::new("v", DataType::Int64, false)])
                .unwrap_err()
                .to_string()
                .contains("already has a column `v`")
        );
    }

    /// What DataFusion charges a sort or join for the batches: each batch's buffers in full.
    fn charged(parts: &[Vec<RecordBatch>]) -> usize {
        parts
            .iter()
            .flatten()
            .map(|b| b.get_array_memory_size())
            .sum()
    }

    #[test]
    fn appended_and_compacted_batches_are_charged_for_their_own_rows_only() {
        // 8 batches of 10,000 rows: 80 KB of data each, 640 KB in all.
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let whole = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..80_000))],
        )
        .unwrap();
        let slices = vec![
            (0..8)
                .map(|i| whole.slice(i * 10_000, 10_000))
                .collect::<Vec<_>>(),
        ];
        assert!(
            charged(&slices) >= 8 * 640_000,
            "slices are charged the whole buffer each"
        );
        let compacted = compact(slices.clone()).unwrap();
        assert!(charged(&compacted) < 2 * 640_000, "{}", charged(&compacted));
        let rows = Rows {
            schema,
            parts: slices,
        };
        let added: ArrayRef = Arc::new(Float64Array::from_iter_values((0..80_000).map(f64::from)));
        let (_, parts) = append_columns(
            &rows,
            0,
            vec![(Field::new("v", DataType::Float64, false), added)],
        )
        .unwrap();
        let added_charged: usize = parts
            .iter()
            .flatten()
            .map(|b| b.column(2).get_array_memory_size())
            .sum();
        assert!(added_charged < 2 * 640_000, "{added_charged}");
    }
}
