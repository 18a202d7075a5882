//! `split_by: <column>` on a SQL step: the step declares that its query computes every result row
//! from the rows of one value of the column (in every table it reads that has the column) —
//! `orders_clean` collapses and nets each customer's order lines, `customer_features` sums each
//! customer's orders. When the tables it reads take more than `engine.split_above` (default: half
//! the memory limit, where `auto` partitions would spill, [`super::partitions`]), it then runs
//! bucket by bucket of the column's values instead of in one piece:
//!
//! 1. every table the step reads that has the column is scattered, in one scan, into bucket
//!    files in scratch (Arrow IPC, only the columns the query reads of it); a step result that a
//!    split step before wrote, split by the same column, is read bucket by bucket as it is;
//! 2. the query runs on each bucket in turn, in memory: its hash aggregations hold one bucket's
//!    groups and do not spill. Tables without the column are read whole by every bucket;
//! 3. bucket k's rows go to scratch file k of the result, which is registered as split by the
//!    column ([`super::super::spill::SpilledFiles::split_by`]), so the next split step skips 1.
//!
//! A row's bucket is its value's euclidean remainder by the bucket count (integer columns; the
//! same buckets as the rule-based CLV models' `bucket_filter`) or an FNV-1a hash of its bytes
//! modulo the count (text); NULL is bucket 0. The count comes from the data: the bytes of the
//! tables read over an eighth of the memory limit ([`BUCKET_SHARE`]), a power of two, at most
//! [`MAX_BUCKETS`].
//!
//! Why: DataFusion 55's hash aggregation spills by sorting its groups and merging the sorted
//! runs back; at 96M order rows under the shipped 2 GiB, `orders_clean`'s two aggregations did
//! that with every row and took 2.4× DuckDB's time for the same SQL.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, take_record_batch};
use datafusion::arrow::datatypes::{
    DataType, Field, Int8Type, Int16Type, Int32Type, Int64Type, Schema, SchemaRef, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider, SchemaProvider, TableProvider,
};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryReservation};
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use super::SqlStep;
use super::partitions::{self, HASH_JOIN_KEY, JoinsSetByEngine};
use crate::config::Diagnostic;
use crate::engine::memory::BufferCounter;
use crate::engine::scratch::ResultSpace;
use crate::error::{Error, Result};
use crate::inputs::InputSummary;
use crate::steps::spill::{SpillFile, SpilledTable};
use crate::steps::{StepContext, StepKind, StepOutcome};

/// A bucket may hold at most `split_above / BUCKET_SHARE` bytes of the tables read (an eighth of
/// the memory limit by default): the query's hash tables come on top of a bucket's rows, and a
/// bucket's result waits for its write while the next bucket runs.
pub const BUCKET_SHARE: u64 = 4;
/// The most buckets: each scan partition of the scatter holds one open file per bucket.
pub const MAX_BUCKETS: usize = 256;
/// The most files the scatter holds open (its partitions times the buckets): fewer partitions
/// scan when there are many buckets.
const MAX_OPEN_FILES: usize = 512;

/// How a split step runs: chosen from the data by [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// The `split_by` column.
    pub column: String,
    pub count: usize,
    /// The run session's partitions (the floor of `auto` for each bucket).
    pub floor: usize,
    /// The memory limit; `None`: none.
    pub limit: Option<u64>,
}

/// The buckets `step` runs in, when it has `split_by` and the tables it reads (sized as
/// [`partitions::table_size`] sizes them) take more than `engine.split_above` (default: half the
/// memory limit, where `auto` partitions would spill); `None` when it runs whole: no `split_by`,
/// data that fits, no limit, or the cluster engine (whose executors plan their own memory). A
/// table read that is already split by the column gives its count.
pub async fn plan(
    ctx: &SessionContext,
    job: &str,
    step: &crate::steps::Step,
    vars: &BTreeMap<String, String>,
    known: &[(String, InputSummary)],
) -> Option<Buckets> {
    let column = step.split_by.as_ref()?;
    let StepKind::Sql(sql) = &step.kind else {
        return None;
    };
    if crate::engine::cluster::RunScratch::of(ctx).is_some() {
        return None;
    }
    let above = ResultSpace::of(ctx)?.split_above()? as u64;
    let limit = match ctx.runtime_env().memory_pool.memory_limit() {
        MemoryLimit::Finite(l) => Some(l as u64),
        _ => None,
    };
    let (mut bytes, mut already) = (0u64, None);
    for table in sql.reads(ctx, vars).unwrap_or_default() {
        if let Some((_, b)) = partitions::table_size(ctx, &table, known).await {
            bytes = bytes.saturating_add(b);
        }
        if let Some(n) = split_count(ctx, &table, column).await {
            already = Some(already.map_or(n, |a: usize| a.max(n)));
        }
    }
    if bytes <= above {
        return None;
    }
    let count = already.unwrap_or_else(|| count_for(bytes, above));
    tracing::info!(job, step = %step.name, column = %column, buckets = count, bytes,
                   split_above = above, from_earlier_split = already.is_some(),
                   "step runs split: its tables take more than split_above");
    Some(Buckets {
        column: column.clone(),
        count,
        floor: ctx.state().config().target_partitions(),
        limit,
    })
}

/// Buckets for `bytes` of tables when a step splits above `above` bytes: buckets of at most
/// `above / BUCKET_SHARE` bytes, a power of two, at least 2.
pub fn count_for(bytes: u64, above: u64) -> usize {
    let per = (above / BUCKET_SHARE).max(1);
    usize::try_from(bytes.div_ceil(per))
        .unwrap_or(MAX_BUCKETS)
        .max(2)
        .checked_next_power_of_two()
        .unwrap_or(MAX_BUCKETS)
        .min(MAX_BUCKETS)
}

/// The bucket count of table `name` when it is a step result split by `column`.
async fn split_count(ctx: &SessionContext, name: &str, column: &str) -> Option<usize> {
    let provider = ctx.table_provider(name).await.ok()?;
    let t = provider.downcast_ref::<SpilledTable>()?;
    let (c, n) = t.files().split_by()?;
    c.eq_ignore_ascii_case(column).then_some(n)
}

/// The field of `schema` named `column` (exactly, else ignoring case).
fn find_field<'a>(schema: &'a Schema, column: &str) -> Option<&'a Field> {
    let fields = schema.fields();
    (fields.iter().find(|f| f.name() == column))
        .or_else(|| {
            fields
                .iter()
                .find(|f| f.name().eq_ignore_ascii_case(column))
        })
        .map(|f| f.as_ref())
}

/// Whether a column of type `t` can be split on.
fn splittable(t: &DataType) -> bool {
    match t {
        DataType::Dictionary(_, v) => splittable(v),
        t => {
            t.is_integer() || matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
        }
    }
}

/// What `validate` says about `split_by: column` of a step whose result has `result` and which
/// reads `tables` (name and schema): the result and at least one table must have the column, as
/// an integer or text.
pub fn check(
    column: &str,
    result: &Schema,
    tables: &[(String, SchemaRef)],
    diag: impl Fn(String) -> Diagnostic,
) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let bad_type = |what: &str, f: &Field| {
        format!(
            "`split_by: {column}`: {what} has `{}` as {}; a split column is an integer or text",
            f.name(),
            f.data_type()
        )
    };
    match find_field(result, column) {
        None => diags.push(diag(format!(
            "`split_by: {column}`: the step's result has no column `{column}` (later steps read its rows by it)"
        ))),
        Some(f) if !splittable(f.data_type()) => diags.push(diag(bad_type("the result", f))),
        Some(_) => {}
    }
    let mut with = 0;
    for (name, schema) in tables {
        if let Some(f) = find_field(schema, column) {
            with += 1;
            if !splittable(f.data_type()) {
                diags.push(diag(bad_type(&format!("table `{name}`"), f)));
            }
        }
    }
    if with == 0 {
        let names: Vec<&str> = tables.iter().map(|(n, _)| n.as_str()).collect();
        diags.push(diag(format!(
            "`split_by: {column}`: no table the step reads has a column `{column}` (it reads {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    diags
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The bucket (of `count`) of every value of `key`.
pub fn bucket_of(key: &dyn Array, count: usize) -> std::result::Result<Vec<u32>, String> {
    let n = count as u64;
    macro_rules! signed {
        ($t:ty) => {
            key.as_primitive::<$t>()
                .iter()
                .map(|v| v.map_or(0, |v| i64::from(v).rem_euclid(n as i64) as u32))
                .collect()
        };
    }
    macro_rules! unsigned {
        ($t:ty) => {
            key.as_primitive::<$t>()
                .iter()
                .map(|v| v.map_or(0, |v| (u64::from(v) % n) as u32))
                .collect()
        };
    }
    let text = |v: Option<&str>| v.map_or(0, |s| (fnv1a(s.as_bytes()) % n) as u32);
    Ok(match key.data_type() {
        DataType::Int64 => {
            let a = key.as_primitive::<Int64Type>();
            if a.null_count() == 0 {
                (a.values().iter())
                    .map(|&v| v.rem_euclid(n as i64) as u32)
                    .collect()
            } else {
                signed!(Int64Type)
            }
        }
        DataType::Int32 => signed!(Int32Type),
        DataType::Int16 => signed!(Int16Type),
        DataType::Int8 => signed!(Int8Type),
        DataType::UInt64 => unsigned!(UInt64Type),
        DataType::UInt32 => unsigned!(UInt32Type),
        DataType::UInt16 => unsigned!(UInt16Type),
        DataType::UInt8 => unsigned!(UInt8Type),
        DataType::Utf8 => key.as_string::<i32>().iter().map(text).collect(),
        DataType::LargeUtf8 => key.as_string::<i64>().iter().map(text).collect(),
        DataType::Utf8View => key.as_string_view().iter().map(text).collect(),
        t => return Err(format!("a split column is an integer or text, not {t}")),
    })
}

/// The type a column is scattered as: views and dictionaries as their plain type (an IPC file
/// holds one dictionary per column, and a slice of a view array would carry all its buffers).
fn plain(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::Dictionary(_, v) => plain(v),
        t => t.clone(),
    }
}

/// A table split into buckets: where bucket k's rows are, and how many there are.
struct SplitTable {
    name: String,
    schema: SchemaRef,
    /// Per bucket: a folder of Arrow IPC files, or one Parquet scratch file.
    buckets: Vec<(PathBuf, crate::storage::listing::Format)>,
    rows: Vec<u64>,
    bytes: Vec<u64>,
}

/// Scatters the columns `columns` (lower-cased; `None`: all) of table `name` on `session` into
/// `count` buckets by `column`, one folder of Arrow IPC files per bucket under `dir`, in one scan
/// with `partitions` partitions (each writes its own file of each bucket).
async fn scatter(
    session: &SessionContext,
    name: &str,
    columns: Option<&BTreeSet<String>>,
    column: &str,
    count: usize,
    partitions: usize,
    dir: &Path,
) -> Result<SplitTable> {
    let err = |e| Error::df(format!("split table `{name}` into buckets"), e);
    let schema = (session.table(name).await.map_err(err)?)
        .schema()
        .as_arrow()
        .clone();
    let key = find_field(&schema, column)
        .ok_or_else(|| Error::Internal(format!("`{name}` has no column `{column}`")))?
        .name()
        .clone();
    let fields: Vec<&Field> = (schema.fields().iter())
        .filter(|f| {
            *f.name() == key || columns.is_none_or(|c| c.contains(&f.name().to_lowercase()))
        })
        .map(|f| f.as_ref())
        .collect();
    let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    let out: SchemaRef = Arc::new(Schema::new(
        (fields.iter())
            .map(|f| Field::new(f.name(), plain(f.data_type()), f.is_nullable()))
            .collect::<Vec<_>>(),
    ));
    let key_index = names.iter().position(|n| *n == key).unwrap_or(0);
    let mut dirs = Vec::with_capacity(count);
    for k in 0..count {
        let d = dir.join(format!("{name}-b{k:04}"));
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, "create a bucket folder", e))?;
        dirs.push(d);
    }
    // Large scan batches: each bucket's slice of one is a batch of its files.
    let mut state = session.state();
    let options = state.config_mut().options_mut();
    options.execution.target_partitions = partitions.min(MAX_OPEN_FILES / count).max(1);
    options.execution.batch_size =
        datafusion::config::ConfigNonZeroUsize::try_new((8192 * count).clamp(8192, 1 << 17))
            .map_err(err)?;
    let scan = SessionContext::new_with_state(state);
    let df = scan.table(name).await.map_err(err)?;
    let df = df.select_columns(&names).map_err(err)?;
    let streams = df.execute_stream_partitioned().await.map_err(err)?;
    let dirs = Arc::new(dirs);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let (dirs, out) = (dirs.clone(), out.clone());
        let name = name.to_string();
        tasks.spawn(async move {
            let mut writers: Vec<Option<(PathBuf, FileWriter<std::io::BufWriter<File>>)>> =
                (0..count).map(|_| None).collect();
            let (mut rows, mut bytes) = (vec![0u64; count], vec![0u64; count]);
            let ipc = |path: &Path, e: datafusion::arrow::error::ArrowError| {
                Error::Internal(format!("write bucket file {}: {e}", path.display()))
            };
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| Error::df(format!("read `{name}`"), e))?;
                let cols = (batch.columns().iter().zip(out.fields()))
                    .map(|(c, f)| match c.data_type() == f.data_type() {
                        true => Ok(c.clone()),
                        false => cast(c, f.data_type()),
                    })
                    .collect::<std::result::Result<Vec<ArrayRef>, _>>()
                    .map_err(|e| Error::arrow("scatter a batch into buckets", e))?;
                let batch = RecordBatch::try_new(out.clone(), cols)
                    .map_err(|e| Error::arrow("scatter a batch into buckets", e))?;
                let of =
                    bucket_of(batch.column(key_index).as_ref(), count).map_err(Error::Internal)?;
                // A counting sort of the row numbers by bucket, then one take: each bucket's
                // rows are a slice of the taken batch.
                let mut starts = vec![0usize; count + 1];
                for &b in &of {
                    starts[b as usize + 1] += 1;
                }
                for k in 0..count {
                    starts[k + 1] += starts[k];
                }
                let mut next = starts.clone();
                let mut order = vec![0u32; of.len()];
                for (row, &b) in of.iter().enumerate() {
                    order[next[b as usize]] = row as u32;
                    next[b as usize] += 1;
                }
                let taken = take_record_batch(&batch, &UInt32Array::from(order))
                    .map_err(|e| Error::arrow("scatter a batch into buckets", e))?;
                for k in 0..count {
                    let len = starts[k + 1] - starts[k];
                    if len == 0 {
                        continue;
                    }
                    let part = taken.slice(starts[k], len);
                    let (path, w) = match &mut writers[k] {
                        Some(w) => w,
                        None => {
                            let path = dirs[k].join(format!("part-{i:03}.arrow"));
                            let file = File::create(&path)
                                .map_err(|e| Error::io(&path, "create a bucket file", e))?;
                            let w = FileWriter::try_new_buffered(file, &out)
                                .map_err(|e| ipc(&path, e))?;
                            writers[k].insert((path, w))
                        }
                    };
                    w.write(&part).map_err(|e| ipc(path, e))?;
                    rows[k] += len as u64;
                    bytes[k] += crate::steps::spill::slice_bytes(&part) as u64;
                }
            }
            for (path, mut w) in writers.into_iter().flatten() {
                w.finish().map_err(|e| ipc(&path, e))?;
            }
            Ok::<_, Error>((rows, bytes))
        });
    }
    let (mut rows, mut bytes) = (vec![0u64; count], vec![0u64; count]);
    while let Some(done) = tasks.join_next().await {
        let (r, b) = done.map_err(|e| Error::Internal(format!("a scatter task failed: {e}")))??;
        for k in 0..count {
            rows[k] += r[k];
            bytes[k] += b[k];
        }
    }
    let dirs = Arc::try_unwrap(dirs).unwrap_or_else(|d| d.as_ref().clone());
    Ok(SplitTable {
        name: name.to_string(),
        schema: out,
        buckets: (dirs.into_iter())
            .map(|d| (d, crate::storage::listing::Format::Arrow))
            .collect(),
        rows,
        bytes,
    })
}

/// A split step result, bucket by bucket as it is: file k holds bucket k.
fn as_split(name: &str, t: &SpilledTable) -> Option<SplitTable> {
    let files = t.files();
    let paths = files.single_layer()?;
    let rows: Vec<u64> = (0..paths.len())
        .map(|k| files.file_rows(k) as u64)
        .collect();
    let total = files.rows().max(1) as u64;
    let bytes = (rows.iter())
        .map(|r| (files.bytes() as u64).saturating_mul(*r) / total)
        .collect();
    Some(SplitTable {
        name: name.to_string(),
        schema: files.schema().clone(),
        buckets: (paths.iter())
            .map(|p| (p.clone(), crate::storage::listing::Format::Parquet))
            .collect(),
        rows,
        bytes,
    })
}

/// A session like `base` whose tables are its own (the default schema's, copied), so that
/// replacing one for a bucket leaves `base`'s alone.
async fn overlay(base: &SessionContext) -> Result<SessionContext> {
    let state = base.state();
    let names = state.config().options().catalog.clone();
    let schema = MemorySchemaProvider::new();
    if let Some(old) = (state.catalog_list().catalog(&names.default_catalog))
        .and_then(|c| c.schema(&names.default_schema))
    {
        for table in old.table_names() {
            let provider = (old.table(&table).await)
                .map_err(|e| Error::df(format!("copy table `{table}` for a bucket"), e))?;
            if let Some(p) = provider {
                schema
                    .register_table(table.clone(), p)
                    .map_err(|e| Error::df(format!("copy table `{table}` for a bucket"), e))?;
            }
        }
    }
    let catalog = MemoryCatalogProvider::new();
    catalog
        .register_schema(&names.default_schema, Arc::new(schema))
        .map_err(|e| Error::df("a session for the buckets", e))?;
    let list = MemoryCatalogProviderList::new();
    list.register_catalog(names.default_catalog.clone(), Arc::new(catalog));
    let state = SessionStateBuilder::new_from_existing(state)
        .with_catalog_list(Arc::new(list))
        .build();
    Ok(SessionContext::new_with_state(state))
}

/// A step result split by a column, read in coarser buckets: bucket k of `buckets` (which
/// divides the result's count) is its files j with j % buckets == k. For a model step that takes
/// its customers in buckets of the same kind (the rule-based CLV models): one read of each file
/// instead of one filtered read of every file per bucket.
pub struct CoarseBuckets {
    session: SessionContext,
    name: String,
    schema: SchemaRef,
    files: Vec<PathBuf>,
    buckets: usize,
}

impl CoarseBuckets {
    /// `Some` when table `name` on `ctx` is a step result split by `column` in one layer, in a
    /// count that `buckets` divides.
    pub async fn of(
        ctx: &SessionContext,
        name: &str,
        column: &str,
        buckets: usize,
    ) -> Result<Option<Self>> {
        let Ok(provider) = ctx.table_provider(name).await else {
            return Ok(None);
        };
        let Some(t) = provider.downcast_ref::<SpilledTable>() else {
            return Ok(None);
        };
        let files = t.files();
        let (Some((c, count)), Some(paths)) = (files.split_by(), files.single_layer()) else {
            return Ok(None);
        };
        if !c.eq_ignore_ascii_case(column) || buckets == 0 || count % buckets != 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            session: overlay(ctx).await?,
            name: name.to_string(),
            schema: files.schema().clone(),
            files: paths.to_vec(),
            buckets,
        }))
    }

    /// A session on which the table holds only bucket `k`'s rows (every other table as on the
    /// session this was made from).
    pub async fn bucket(&self, k: usize) -> Result<&SessionContext> {
        use datafusion::datasource::listing::{
            ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
        };
        let err = |e| Error::df(format!("read bucket {k} of `{}`", self.name), e);
        let urls = (self.files.iter().enumerate())
            .filter(|(j, _)| j % self.buckets == k)
            .map(|(_, p)| ListingTableUrl::parse(p.display().to_string()))
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(err)?;
        let format = crate::storage::listing::Format::Parquet;
        let options = ListingOptions::new(Arc::new(
            datafusion::datasource::file_format::parquet::ParquetFormat::default(),
        ))
        .with_file_extension(format.extension());
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(self.schema.clone());
        let table = ListingTable::try_new(config).map_err(err)?;
        self.session
            .deregister_table(&self.name)
            .and_then(|_| self.session.register_table(&self.name, Arc::new(table)))
            .map_err(err)?;
        Ok(&self.session)
    }
}

/// Bucket k's rows of `t` as a table.
async fn bucket_table(
    session: &SessionContext,
    t: &SplitTable,
    k: usize,
) -> Result<Arc<dyn TableProvider>> {
    let (path, format) = &t.buckets[k];
    let url = match format {
        crate::storage::listing::Format::Parquet => path.display().to_string(),
        _ => format!("{}/", path.display()),
    };
    let table = crate::storage::listing::table(
        &session.state(),
        &url,
        *format,
        Some(t.schema.clone()),
        vec![],
    )
    .await
    .map_err(|e| Error::df(format!("read bucket {k} of `{}`", t.name), e))?;
    Ok(table)
}

/// A bucket's result on its way to its file, with the memory it holds counted.
type Written = (usize, Vec<RecordBatch>, MemoryReservation);

/// Runs `sql` bucket by bucket ([`Buckets`]) and registers its result, split by the column, in
/// scratch files. See the module documentation.
pub async fn run(sql: &SqlStep, cx: &StepContext<'_>, b: &Buckets) -> Result<StepOutcome> {
    let started = Instant::now();
    let space = ResultSpace::of(cx.session)
        .ok_or_else(|| Error::Internal("a split step needs the engine's scratch space".into()))?;
    // The result as the query gives it whole: each bucket's is cast to it.
    let whole = sql.dataframe(cx).await?;
    let names: Vec<String> = (whole.schema().fields().iter())
        .map(|f| f.name().clone())
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // The split column stays (its buckets are what later split steps read), whoever reads it.
    let kept: Option<Vec<String>> = cx.kept_columns(&refs).map(|ix| {
        let mut kept: Vec<String> = ix.iter().map(|&i| names[i].clone()).collect();
        if let Some(key) = names.iter().find(|n| n.eq_ignore_ascii_case(&b.column))
            && !kept.contains(key)
        {
            kept.insert(0, key.clone());
        }
        kept
    });
    let whole = match &kept {
        Some(k) => {
            let k: Vec<&str> = k.iter().map(String::as_str).collect();
            whole.select_columns(&k).map_err(|e| cx.df_err(e))?
        }
        None => whole,
    };
    let schema: SchemaRef = Arc::new(whole.schema().as_arrow().clone());
    if find_field(&schema, &b.column).is_none() {
        return Err(cx.model_err(format!(
            "`split_by: {}`: the step's result has no such column",
            b.column
        )));
    }
    // Scatter what is not split yet.
    let reads = sql
        .column_reads(cx.session, cx.vars)
        .await
        .unwrap_or_default();
    let scratch = space.folder(&format!("{}_buckets", cx.step.name))?;
    let t = Instant::now();
    let mut tables = Vec::new();
    for name in sql.reads(cx.session, cx.vars).unwrap_or_default() {
        let provider = (cx.session.table_provider(&name).await).map_err(|e| cx.df_err(e))?;
        if find_field(&provider.schema(), &b.column).is_none() {
            continue;
        }
        if split_count(cx.session, &name, &b.column).await == Some(b.count)
            && let Some(s) = provider
                .downcast_ref::<SpilledTable>()
                .and_then(|t| as_split(&name, t))
        {
            tables.push(s);
            continue;
        }
        let columns = reads.get(&name).cloned().flatten();
        tables.push(
            scatter(
                cx.session,
                &name,
                columns.as_ref(),
                &b.column,
                b.count,
                b.floor,
                scratch.path(),
            )
            .await
            .map_err(|e| with_step(cx, e))?,
        );
    }
    let scattered = t.elapsed();
    if tables.is_empty() {
        return Err(cx.model_err(format!(
            "`split_by: {}`: no table the step reads has this column",
            b.column
        )));
    }
    let session = overlay(cx.session).await?;
    let auto = partitions::wants_auto(&cx.step.settings);
    let reset_joins = !cx.step.settings.contains_key(HASH_JOIN_KEY)
        && (cx.session.state().config())
            .get_extension::<JoinsSetByEngine>()
            .is_none();
    let bcx = StepContext {
        session: &session,
        job: cx.job,
        step: cx.step,
        run_date: cx.run_date,
        vars: cx.vars,
        keep: cx.keep,
        split: None,
    };
    // Bucket k's result is written (on its own thread) while bucket k + 1 runs.
    let out = space.folder(&cx.step.name)?;
    let (send, recv) = std::sync::mpsc::sync_channel::<Written>(1);
    let (dir, file_schema) = (out.path().to_path_buf(), schema.clone());
    let writer = std::thread::spawn(move || -> Result<(Vec<PathBuf>, Duration)> {
        let (mut files, mut busy) = (Vec::new(), Duration::ZERO);
        for (k, batches, memory) in recv {
            let t = Instant::now();
            let mut f = SpillFile::create(&dir, k, file_schema.clone())?;
            for batch in &batches {
                f.write(batch)?;
            }
            files.push(f.close()?);
            drop(memory);
            busy += t.elapsed();
        }
        Ok((files, busy))
    });
    let pool = cx.session.runtime_env().memory_pool.clone();
    let what = format!("step `{}`: its result", cx.step.name);
    let (mut rows, mut bytes, mut most) = (0usize, 0usize, 0usize);
    let mut sent = Ok(());
    for k in 0..b.count {
        for t in &tables {
            let table = bucket_table(&session, t, k).await?;
            session
                .deregister_table(&t.name)
                .and_then(|_| session.register_table(&t.name, table))
                .map_err(|e| cx.df_err(e))?;
        }
        {
            let state = session.state_ref();
            let mut state = state.write();
            let options = state.config_mut().options_mut();
            if auto {
                let rows_k = tables.iter().map(|t| t.rows[k]).max().unwrap_or(0);
                let bytes_k = tables.iter().map(|t| t.bytes[k]).sum();
                let c = partitions::choose(
                    rows_k,
                    bytes_k,
                    b.limit,
                    b.floor,
                    partitions::MAX_PARTITIONS,
                );
                options.execution.target_partitions = c.partitions;
                most = most.max(c.partitions);
            }
            if reset_joins {
                options.optimizer.prefer_hash_join = true;
            }
        }
        let mut df = sql.dataframe(&bcx).await?;
        if let Some(k) = &kept {
            let k: Vec<&str> = k.iter().map(String::as_str).collect();
            df = df.select_columns(&k).map_err(|e| cx.df_err(e))?;
        }
        let parts = crate::engine::memory::collect_counted(&session, &what, df)
            .await
            .map_err(|e| cx.df_err(e))?;
        let mut counter = BufferCounter::default();
        let memory = MemoryConsumer::new(what.clone()).register(&pool);
        let mut batches = Vec::new();
        for batch in parts.into_iter().flatten() {
            let batch = conform(batch, &schema)?;
            rows += batch.num_rows();
            let add = counter.add(&batch) as usize;
            bytes += add;
            memory.try_grow(add).map_err(|e| cx.df_err(e))?;
            batches.push(batch);
        }
        if send.send((k, batches, memory)).is_err() {
            sent = Err(());
            break;
        }
    }
    drop(send);
    let written = writer
        .join()
        .map_err(|_| Error::Internal("the writer of a split step's result panicked".into()))?;
    let (files, busy) = written?;
    if sent.is_err() || files.len() != b.count {
        return Err(Error::Internal(format!(
            "the writer of step `{}`'s buckets stopped after {} of {}",
            cx.step.name,
            files.len(),
            b.count
        )));
    }
    drop(tables);
    drop(scratch);
    tracing::info!(job = %cx.job, step = %cx.step.name, buckets = b.count, rows,
                   partitions_per_bucket = most, scatter_ms = scattered.as_millis() as u64,
                   write_ms = busy.as_millis() as u64, "split step done");
    crate::steps::spill::register_split(
        cx.session,
        &cx.step.name,
        schema,
        out,
        files,
        (rows, bytes),
        (b.column.clone(), b.count),
    )
    .await?;
    Ok(StepOutcome {
        rows,
        bytes: 0,
        spilled: bytes,
        elapsed: started.elapsed(),
        timings: vec![("scatter", scattered), ("write", busy)],
    })
}

/// `batch` with the columns of `schema` (a bucket's plan may type text as plain strings where
/// the whole query has views).
fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let cols = (batch.columns().iter().zip(schema.fields()))
        .map(|(c, f)| match c.data_type() == f.data_type() {
            true => Ok(c.clone()),
            false => cast(c, f.data_type()),
        })
        .collect::<std::result::Result<Vec<ArrayRef>, _>>()
        .map_err(|e| Error::arrow("a bucket's result", e))?;
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::arrow("a bucket's result", e))
}

/// An error of the scatter, as the step's.
fn with_step(cx: &StepContext<'_>, e: Error) -> Error {
    match e {
        Error::DataFusion { source, .. } => cx.df_err(source),
        e => e,
    }
}

#[cfg(test)]
mod tests;
