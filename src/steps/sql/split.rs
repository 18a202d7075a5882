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
//! With `split_result: partial` the query instead gives rows per bucket that a later step
//! combines (sums per group over the bucket's customers: `cohort_daily`); the result is the
//! union of the buckets' rows, need not have the column, and is not registered as split.
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
use crate::config::steps::SplitResult;
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
/// reads `tables` (name and schema): at least one table must have the column, and the result
/// too unless it is `split_result: partial`, as an integer or text.
pub fn check(
    column: &str,
    kind: SplitResult,
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
        None if kind == SplitResult::Partial => {}
        None => diags.push(diag(format!(
            "`split_by: {column}`: the step's result has no column `{column}` (later steps read its rows by it; \
             a result of partial rows per bucket, e.g. sums per group, says `split_result: partial`)"
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
    let partial = cx.step.split_result == SplitResult::Partial;
    // The split column of a whole result stays (its buckets are what later split steps read),
    // whoever reads it.
    let kept: Option<Vec<String>> = cx.kept_columns(&refs).map(|ix| {
        let mut kept: Vec<String> = ix.iter().map(|&i| names[i].clone()).collect();
        if !partial
            && let Some(key) = names.iter().find(|n| n.eq_ignore_ascii_case(&b.column))
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
    if !partial && find_field(&schema, &b.column).is_none() {
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
        (!partial).then(|| (b.column.clone(), b.count)),
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

/// An error of the scatter, as the step's.
fn with_step(cx: &StepContext<'_>, e: Error) -> Error {
    match e {
        Error::DataFusion { source, .. } => cx.df_err(source),
        e => e,
    }
}

mod coarse;
mod scatter;
#[cfg(test)]
mod tests;

pub use coarse::CoarseBuckets;
use coarse::overlay;
pub use scatter::bucket_of;
use scatter::{SplitTable, as_split, conform, scatter};
