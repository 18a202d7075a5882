//! The rule-based CLV models of the `clv` step, computed from an order table (`customer_id`,
//! `order_ts`, `net_amount`; e.g. `sql/orders_clean.sql`). Time: a year is 365.25 days; orders at
//! or after the run date, and rows without a customer, are ignored; a NULL `net_amount` counts
//! as an order of 0. Money: the currency of the exports.
//!
//! - `historical`: realized gross profit to date, margin × Σ net_amount.
//! - `formula`: average order value × purchases per year × expected years × margin
//!   (500 × 12 × 4 = 24,000 at margin 1).
//! - `formula_retention`: average order value × purchases per year × retention rate × margin, the
//!   retention rate given or estimated from the history (customers who ordered in the year before
//!   last and again in the last year, over those who ordered in the year before last).
//! - `discounted`: Σ_{t=1..n} margin × revenue_t / (1+d)^t − acquisition cost, with t the
//!   relationship year (t = 1: the year starting at the first order) and cost_t = (1 − margin) ×
//!   revenue_t.
//!
//! DataFusion reads the orders (one projection, no aggregation); the per-customer sums are one
//! pass in Rust, on one thread per shard of customers, each customer's sums found by a hash map
//! or, where the ids are dense (see `passes::Layout`), at their id's offset. The discounted model needs each
//! customer's first order before it can place an order in its relationship year: in SQL that is
//! an aggregation joined back to every order and aggregated again (about 2 s on 10M orders), here
//! a second pass over the same rows that reads the first order from an array.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::time::{Duration, Instant};

use super::{ClvStep, collect, register_fit};
use crate::config::steps::{ClvModel, ClvSpec};
use crate::engine::quote_ident;
use crate::error::{Error, Result};
use crate::steps::rows::date32;
use crate::steps::spill::ResultWriter;
use crate::steps::sql::split::CoarseBuckets;
use crate::steps::{StepContext, StepOutcome, require_columns};

mod passes;

use passes::{Acc, Layout, Settings, Shard, run_shard};

/// Seconds in a year of 365.25 days.
pub const YEAR_SECONDS: f64 = 31_557_600.0;

/// Required columns of `from` for the rule-based models.
pub const ORDER_COLUMNS: [&str; 3] = ["customer_id", "order_ts", "net_amount"];

/// Required columns of `acquisition_costs` (the discounted model).
pub const COST_COLUMNS: [&str; 2] = ["customer_id", "acquisition_cost"];

/// The orders the models read: (customer_id BIGINT, epoch seconds DOUBLE, amount DOUBLE), without
/// rows that have no customer or are at or after the run date.
pub fn orders_sql(spec: &ClvSpec, run_date: chrono::NaiveDate) -> String {
    format!(
        "SELECT CAST(customer_id AS BIGINT) AS customer_id, CAST(date_part('epoch', order_ts) AS DOUBLE) AS e, \
         CAST(net_amount AS DOUBLE) AS amount FROM {} \
         WHERE customer_id IS NOT NULL AND date_part('epoch', order_ts) < date_part('epoch', TIMESTAMP '{run_date} 00:00:00')",
        quote_ident(&spec.from)
    )
}

/// The acquisition costs the discounted model reads: (customer_id BIGINT, cost DOUBLE).
pub fn costs_sql(table: &str) -> String {
    format!(
        "SELECT CAST(customer_id AS BIGINT) AS customer_id, CAST(acquisition_cost AS DOUBLE) AS acquisition_cost \
         FROM {} WHERE customer_id IS NOT NULL",
        quote_ident(table)
    )
}

/// The per-customer columns of each model, after `run_date` and `customer_id`.
fn model_fields(model: ClvModel) -> Vec<Field> {
    let f = |name: &str| Field::new(name, DataType::Float64, false);
    let i = |name: &str| Field::new(name, DataType::Int64, false);
    let mut fields = vec![i("orders"), f("revenue")];
    match model {
        ClvModel::Formula => {
            fields.extend([
                f("avg_order_value"),
                f("purchases_per_year"),
                f("expected_years"),
            ]);
        }
        ClvModel::FormulaRetention => {
            fields.extend([
                f("avg_order_value"),
                f("purchases_per_year"),
                f("retention_rate"),
            ]);
        }
        ClvModel::Discounted => {
            fields.extend([
                i("years_counted"),
                f("discounted_profit"),
                f("acquisition_cost"),
            ]);
        }
        _ => {} // historical: clv alone; the predictive models have their own schema
    }
    fields.push(f("clv"));
    fields
}

/// The schema of a rule-based model's per-customer result.
pub fn schema(model: ClvModel) -> SchemaRef {
    let mut fields = vec![
        Field::new("run_date", DataType::Date32, false),
        Field::new("customer_id", DataType::Int64, false),
    ];
    fields.extend(model_fields(model));
    Arc::new(Schema::new(fields))
}

/// The per-customer result of a rule-based model, and the totals of its fit report.
pub struct Computed {
    /// One partition per shard.
    pub parts: Vec<Vec<RecordBatch>>,
    pub customers: usize,
    pub total_clv: f64,
    /// `formula_retention` without a given rate: the estimated rate (None when nobody ordered
    /// in the year before last) and the number of customers it is estimated on.
    pub retention: Option<(Option<f64>, u64)>,
}

/// How [`compute`] splits its work: `shards` threads, result batches of `batch_size` rows;
/// `stride`: the ids of the orders read are all congruent modulo it (the step's number of
/// buckets, see [`bucket_filter`]), which keeps a bucket of dense ids dense.
#[derive(Clone, Copy, Debug)]
pub struct Split {
    pub shards: usize,
    pub batch_size: usize,
    pub stride: u64,
}

/// Runs `spec`'s rule-based model over `orders` (batches of [`orders_sql`]) and `costs`
/// (batches of [`costs_sql`]) as `split` says; `margin` is the step's.
pub fn compute(
    spec: &ClvSpec,
    margin: f64,
    run_date: chrono::NaiveDate,
    (orders, costs): (&[RecordBatch], &[RecordBatch]),
    split: Split,
) -> Result<Computed> {
    compute_in_blocks(
        spec,
        margin,
        run_date,
        (orders, costs),
        split,
        passes::BUCKET_SHIFT,
    )
}

/// [`compute`] with dense customers taken in blocks of `1 << bucket_shift`.
fn compute_in_blocks(
    spec: &ClvSpec,
    margin: f64,
    run_date: chrono::NaiveDate,
    (orders, costs): (&[RecordBatch], &[RecordBatch]),
    Split {
        shards,
        batch_size,
        stride,
    }: Split,
    bucket_shift: u32,
) -> Result<Computed> {
    let shards = shards.max(1);
    let estimate = spec.model == ClvModel::FormulaRetention && spec.retention_rate.is_none();
    let settings = Settings {
        now_e: run_date
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
            .timestamp() as f64,
        margin,
        discount_rate: spec.discount_rate,
        growth: Settings::growth_table(spec.discount_rate),
        years: spec.years.map(i64::from),
        retention: estimate,
        discounted: spec.model == ClvModel::Discounted,
        bucket_shift,
    };
    let layout = Layout::of(orders, stride)?;
    tracing::debug!(?layout, shards, "rule model: customers laid out");
    // Dense, each thread takes its customers in SUB_SHARDS parts one after the other: a part's
    // rows are copied in block order (passes::by_block) and dropped before the next, so the
    // copies held at once are a quarter of the orders (55 MiB at 9.2M rows, not 221).
    let sub = if matches!(layout, Layout::Dense { .. }) {
        passes::SUB_SHARDS
    } else {
        1
    };
    let logical = shards * sub;
    let results: Vec<Result<Vec<Shard>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..shards)
            .map(|t| {
                let settings = &settings;
                scope.spawn(move || {
                    (t..logical)
                        .step_by(shards)
                        .map(|k| run_shard(k, logical, layout, orders, costs, settings))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Internal(
                        "a rule-model worker thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let results = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let retention = estimate.then(|| {
        let (mut base, mut kept) = (0u64, 0u64);
        for r in results.iter().flatten() {
            for acc in &r.accs {
                base += u64::from(acc.before_last);
                kept += u64::from(acc.before_last && acc.last);
            }
        }
        ((base > 0).then(|| kept as f64 / base as f64), base)
    });
    let rate = spec
        .retention_rate
        .or(retention.and_then(|r| r.0))
        .unwrap_or(0.0);
    let day = date32(run_date);
    let batch_size = batch_size.max(1);
    let schema = schema(spec.model);
    let (mut customers, mut total_clv) = (0, 0.0);
    let mut parts = Vec::with_capacity(results.len());
    for group in results {
        let n: usize = group.iter().map(|r| r.ids.len()).sum();
        customers += n;
        let mut batches = Vec::with_capacity(n.div_ceil(batch_size) + group.len());
        let chunks = group
            .iter()
            .flat_map(|r| r.ids.chunks(batch_size).zip(r.accs.chunks(batch_size)));
        for (ids, accs) in chunks {
            let m = ids.len();
            let floats = |f: &dyn Fn(&Acc) -> f64| {
                Arc::new(Float64Array::from_iter_values(accs.iter().map(f))) as ArrayRef
            };
            let ints = |f: &dyn Fn(&Acc) -> i64| {
                Arc::new(Int64Array::from_iter_values(accs.iter().map(f))) as ArrayRef
            };
            let aov = |a: &Acc| a.revenue.value() / a.orders as f64;
            let ppy = |a: &Acc| match spec.purchases_per_year {
                Some(v) => v,
                None => a.orders as f64 / ((settings.now_e - a.first_e) / YEAR_SECONDS).max(1.0),
            };
            let mut cols: Vec<ArrayRef> = vec![
                Arc::new(Date32Array::from(vec![day; m])),
                Arc::new(Int64Array::from(ids.to_vec())),
                ints(&|a| a.orders),
                floats(&|a| a.revenue.value()),
            ];
            let clv: Vec<f64> = match spec.model {
                ClvModel::Historical => accs.iter().map(|a| a.revenue.value() * margin).collect(),
                ClvModel::Formula | ClvModel::FormulaRetention => {
                    let factor = if spec.model == ClvModel::Formula {
                        spec.expected_years.unwrap_or(0.0)
                    } else {
                        rate
                    };
                    cols.extend([floats(&aov), floats(&ppy), floats(&|_| factor)]);
                    accs.iter()
                        .map(|a| aov(a) * ppy(a) * factor * margin)
                        .collect()
                }
                ClvModel::Discounted => {
                    cols.extend([
                        ints(&|a| a.years.into()),
                        floats(&|a| a.discounted.value()),
                        floats(&|a| a.cost),
                    ]);
                    accs.iter().map(|a| a.discounted.value() - a.cost).collect()
                }
                predictive => {
                    return Err(Error::Internal(format!(
                        "{} is not a rule-based model",
                        predictive.name()
                    )));
                }
            };
            total_clv += clv.iter().sum::<f64>();
            cols.push(Arc::new(Float64Array::from(clv)));
            batches.push(
                RecordBatch::try_new(schema.clone(), cols)
                    .map_err(|e| Error::arrow("build the rule model's result", e))?,
            );
        }
        parts.push(batches);
    }
    Ok(Computed {
        parts,
        customers,
        total_clv,
        retention,
    })
}

/// For `validate`: checks the order (and cost) tables and that the model's queries plan.
pub(super) async fn declare(
    cx: &StepContext<'_>,
    spec: &ClvSpec,
) -> std::result::Result<Vec<(String, SchemaRef)>, String> {
    require_columns(
        cx.session,
        &spec.from,
        &ORDER_COLUMNS,
        "an order table such as sql/orders_clean.sql has them",
    )
    .await?;
    if let Some(costs) = &spec.acquisition_costs {
        require_columns(
            cx.session,
            costs,
            &COST_COLUMNS,
            "acquisition_costs names a table such as the customers export",
        )
        .await?;
    }
    let mut queries = vec![(spec.from.as_str(), orders_sql(spec, cx.run_date))];
    queries.extend(spec.acquisition_costs.as_deref().map(|t| (t, costs_sql(t))));
    for (table, sql) in queries {
        cx.session.sql(&sql).await.map_err(|e| {
            format!(
                "the `{}` model does not plan on `{table}`: {e}",
                spec.model.name()
            )
        })?;
    }
    Ok(vec![(cx.step.name.clone(), schema(spec.model))])
}

/// The SQL condition that keeps the customers of bucket `k` of `buckets`.
fn bucket_filter(k: usize, buckets: usize) -> String {
    if buckets <= 1 {
        return String::new();
    }
    format!(" AND ((CAST(customer_id AS BIGINT) % {buckets}) + {buckets}) % {buckets} = {k}")
}

/// Runs the rule-based model of `step` and registers `<step>` and `<step>_fit`. When the orders
/// and sums would not fit in a third of the memory limit, the customers are taken in buckets
/// (by id), one read of the orders each, so the step's memory stays within it whatever the
/// data's size; the estimated retention rate needs every customer at once (one bucket).
pub(super) async fn run(cx: &StepContext<'_>, step: &ClvStep) -> Result<StepOutcome> {
    let spec = &step.spec;
    let started = Instant::now();
    let model = spec.model.name();
    let config = cx.session.state().config().clone();
    let rows_in_from = crate::steps::source::Source::count(cx.session, &spec.from)
        .await
        .map_err(|e| cx.df_err(e))?;
    // The orders read, per order a quarter of its copy in block order (dense ids; hashed ids
    // keep one index per order instead) and, per customer, the sums and the result (about
    // three orders a customer on the generator's data).
    let bytes_for = |rows: usize| rows * (24 + 24 / passes::SUB_SHARDS) + (rows / 2) * 64;
    let bytes_needed = bytes_for(rows_in_from);
    let estimate = spec.model == ClvModel::FormulaRetention && spec.retention_rate.is_none();
    let mut buckets = match cx.session.runtime_env().memory_pool.memory_limit() {
        datafusion::execution::memory_pool::MemoryLimit::Finite(limit) if !estimate => {
            bytes_needed.div_ceil((limit / 3).max(1)).max(1)
        }
        _ => 1,
    };
    // Orders a split step wrote by customer (`split_by: customer_id`) are read file by file: the
    // buckets (a power of two that divides the files) are unions of its files, one read in all.
    let split = match buckets {
        1 => None,
        n => {
            let n = n.next_power_of_two();
            CoarseBuckets::of(cx.session, &spec.from, "customer_id", n)
                .await?
                .inspect(|_| buckets = n)
        }
    };
    if buckets > 1 {
        tracing::info!(step = %cx.step.name, buckets, orders = rows_in_from,
            from_split_files = split.is_some(),
            "rule model: customers taken in buckets, one read of the orders each");
    }
    let mut writer = ResultWriter::for_step(cx, schema(spec.model))?;
    let (mut n, mut total_clv, mut retention) = (0, 0.0, None);
    // Where the step's time goes (the step log's "models fitted" line): reading the orders and
    // costs through DataFusion, the per-customer passes, handing the result to the writer.
    let (mut t_read, mut t_sums, mut t_write) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let keep = [Some(spec.from.as_str()), spec.acquisition_costs.as_deref()];
    let keep: Vec<&str> = keep.into_iter().flatten().collect();
    for k in 0..buckets {
        // Taken before the orders are read, so that they are counted while they arrive (the
        // pool sees the live heap: taken after, they would count twice), then set to what the
        // bucket's orders need.
        let memory = crate::steps::evict::reserve_evicting(
            cx.session,
            format!("clv step `{}`: orders and sums", cx.step.name),
            bytes_for(rows_in_from.div_ceil(buckets)),
            &keep,
        )
        .await
        .map_err(|e| cx.df_err(e))?;
        let filter = bucket_filter(k, buckets);
        let t = Instant::now();
        let orders = match &split {
            Some(split) => {
                let session = split.bucket(k).await?;
                let sql = orders_sql(spec, cx.run_date);
                let df = session.sql(&sql).await.map_err(|e| cx.df_err(e))?;
                df.collect().await.map_err(|e| cx.df_err(e))?
            }
            None => collect(cx, &format!("{}{filter}", orders_sql(spec, cx.run_date))).await?,
        };
        let costs = match &spec.acquisition_costs {
            Some(table) if spec.model == ClvModel::Discounted => {
                collect(cx, &format!("{}{filter}", costs_sql(table))).await?
            }
            _ => Vec::new(),
        };
        let rows: usize = orders.iter().map(|b| b.num_rows()).sum();
        memory
            .try_resize(bytes_for(rows))
            .map_err(|e| cx.df_err(e))?;
        t_read += t.elapsed();
        let t = Instant::now();
        let computed = compute(
            spec,
            step.margin(),
            cx.run_date,
            (&orders, &costs),
            Split {
                shards: config.target_partitions(),
                batch_size: config.batch_size(),
                stride: buckets as u64,
            },
        )?;
        drop((orders, costs));
        t_sums += t.elapsed();
        let t = Instant::now();
        n += computed.customers;
        total_clv += computed.total_clv;
        retention = computed.retention;
        for (i, part) in computed.parts.into_iter().enumerate() {
            for b in part {
                writer.push(i, b)?;
            }
        }
        t_write += t.elapsed();
    }
    let t = Instant::now();
    let kept = writer.finish().await?;
    t_write += t.elapsed();
    let mut report: Vec<(&str, &str, f64)> = Vec::new();
    if let Some((rate, base)) = retention {
        let rate = rate.ok_or_else(|| {
            cx.model_err(format!(
                "cannot estimate the retention rate: no customer in `{}` ordered in the year before last (the history is shorter than two years); set `retention_rate`",
                spec.from
            ))
        })?;
        report.push((model, "retention_base_customers", base as f64));
        report.push((model, "retention_rate", rate));
    } else if let Some(rate) = spec
        .retention_rate
        .filter(|_| spec.model == ClvModel::FormulaRetention)
    {
        report.push((model, "retention_rate", rate));
    }
    report.push((model, "customers", n as f64));
    report.push((model, "total_clv", total_clv));
    report.push((model, "margin", step.margin()));
    match spec.model {
        ClvModel::Formula => {
            report.push((model, "expected_years", spec.expected_years.unwrap_or(0.0)))
        }
        ClvModel::Discounted => report.push((model, "discount_rate", spec.discount_rate)),
        _ => {}
    }
    register_fit(cx, &report)?;
    Ok(StepOutcome {
        rows: n,
        bytes: kept.held,
        spilled: kept.spilled,
        elapsed: started.elapsed(),
        timings: vec![
            ("read_ms", t_read),
            ("sums_ms", t_sums),
            ("write_ms", t_write),
        ],
    })
}

#[cfg(test)]
mod tests;
