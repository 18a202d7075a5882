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
//! pass in Rust, on one thread per shard of customers. The discounted model needs each
//! customer's first order before it can place an order in its relationship year: in SQL that is
//! an aggregation joined back to every order and aggregated again (about 2 s on 10M orders), here
//! a second pass over the same rows that reads the first order from an array.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Float64Array, Int64Array, RecordBatch,
};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};

use super::KeyHasher;
use crate::config::{ClvModel, ClvSpec};
use crate::engine::quote_ident;

/// Seconds in a year of 365.25 days.
pub const YEAR_SECONDS: f64 = 31_557_600.0;

/// Required columns of `from` for the rule-based models.
pub const ORDER_COLUMNS: [&str; 3] = ["customer_id", "order_ts", "net_amount"];

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
        ClvModel::Historical | ClvModel::BgnbdGammaGamma => {}
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

/// Which of `shards` threads owns a customer: the high bits of a multiplicative hash (the id
/// map's own hash is different, so its buckets stay spread within a shard).
fn shard_of(id: i64, shards: usize) -> usize {
    let h = (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    ((h * shards as u64) >> 32) as usize
}

/// One customer's sums, together in one cache line: customers come in random order, so each
/// row then costs one miss for its customer's sums, not one per array of sums.
#[derive(Clone, Copy)]
struct Acc {
    orders: i64,
    revenue: f64,
    first_e: f64,
    /// Discounted: the discounted profit, the acquisition cost, the last relationship year
    /// counted.
    discounted: f64,
    cost: f64,
    years: i32,
    has_cost: bool,
    /// Retention: ordered in the year before last / in the last year.
    before_last: bool,
    last: bool,
}

/// Customer id to its index in [`Shard::accs`].
type IdMap = HashMap<i64, u32, BuildHasherDefault<KeyHasher>>;

/// One shard's customers, in the order of their first row, with their sums.
struct Shard {
    ids: Vec<i64>,
    accs: Vec<Acc>,
}

/// The run's settings a shard needs.
struct Settings {
    now_e: f64,
    margin: f64,
    discount_rate: f64,
    years: Option<i64>,
    retention: bool,
    discounted: bool,
}

/// The (customer_id, e, amount) columns of one batch of [`orders_sql`].
type OrderCols<'a> = (
    &'a datafusion::arrow::array::PrimitiveArray<Int64Type>,
    &'a datafusion::arrow::array::PrimitiveArray<Float64Type>,
    &'a datafusion::arrow::array::PrimitiveArray<Float64Type>,
);

fn order_cols(b: &RecordBatch) -> Result<OrderCols<'_>, String> {
    let id = b.column(0).as_primitive_opt::<Int64Type>();
    let e = b.column(1).as_primitive_opt::<Float64Type>();
    let amount = b.column(2).as_primitive_opt::<Float64Type>();
    match (id, e, amount) {
        (Some(id), Some(e), Some(amount)) => Ok((id, e, amount)),
        _ => Err("the orders query did not return (BIGINT, DOUBLE, DOUBLE)".into()),
    }
}

/// Calls `f(id, e, amount)` for every row of `orders` this shard owns, batch by batch (a NULL
/// amount is 0; rows with a NULL id or time, which the query filters out, are skipped). The
/// shard's rows of a batch are picked first without a branch, so the loop that calls `f` (whose
/// memory accesses are random) is not interrupted by a mispredicted branch every other row.
fn for_rows(
    orders: &[RecordBatch],
    shard: usize,
    shards: usize,
    mut f: impl FnMut(i64, f64, f64),
) -> Result<(), String> {
    let mut picked: Vec<u32> = Vec::new();
    for b in orders {
        let (id, e, amount) = order_cols(b)?;
        let checked = id.null_count() + e.null_count() + amount.null_count() > 0;
        let (ids, es, amounts) = (id.values(), e.values(), amount.values());
        picked.clear();
        picked.resize(ids.len(), 0);
        let mut n = 0;
        for (i, c) in ids.iter().enumerate() {
            picked[n] = i as u32;
            n += usize::from(shard_of(*c, shards) == shard);
        }
        for &i in &picked[..n] {
            let i = i as usize;
            if checked && (id.is_null(i) || e.is_null(i)) {
                continue;
            }
            let a = if checked && amount.is_null(i) {
                0.0
            } else {
                amounts[i]
            };
            f(ids[i], es[i], a);
        }
    }
    Ok(())
}

fn run_shard(
    shard: usize,
    shards: usize,
    orders: &[RecordBatch],
    costs: &[RecordBatch],
    s: &Settings,
) -> Result<Shard, String> {
    let rows: usize = orders.iter().map(|b| b.num_rows()).sum();
    // Sized for about three orders a customer (growing costs a copy of everything so far).
    let customers = rows / shards / 3 + 16;
    let mut map = IdMap::with_capacity_and_hasher(customers, Default::default());
    let mut out = Shard {
        ids: Vec::with_capacity(customers),
        accs: Vec::with_capacity(customers),
    };
    // Each of this shard's rows' customer, for the second pass.
    let mut row_index: Vec<u32> = Vec::with_capacity(if s.discounted { rows / shards } else { 0 });
    for_rows(orders, shard, shards, |c, t, a| {
        let next = out.ids.len() as u32;
        let k = *map.entry(c).or_insert(next);
        if k == next {
            out.ids.push(c);
            out.accs.push(Acc {
                orders: 0,
                revenue: 0.0,
                first_e: f64::INFINITY,
                discounted: 0.0,
                cost: 0.0,
                years: 0,
                has_cost: false,
                before_last: false,
                last: false,
            });
        }
        let acc = &mut out.accs[k as usize];
        acc.orders += 1;
        acc.revenue += a;
        acc.first_e = acc.first_e.min(t);
        if s.retention {
            let before = s.now_e - t;
            acc.before_last |= before > YEAR_SECONDS && before <= 2.0 * YEAR_SECONDS;
            acc.last |= before <= YEAR_SECONDS;
        }
        if s.discounted {
            row_index.push(k);
        }
    })?;
    if !s.discounted {
        return Ok(out);
    }
    let mut next = row_index.iter();
    let mut lost = false;
    for_rows(orders, shard, shards, |_, t, a| {
        let Some(&k) = next.next() else {
            lost = true;
            return;
        };
        let acc = &mut out.accs[k as usize];
        let year = ((t - acc.first_e) / YEAR_SECONDS).floor() as i64 + 1;
        if s.years.is_some_and(|cap| year > cap) {
            return;
        }
        acc.years = acc.years.max(year.clamp(0, i32::MAX.into()) as i32);
        acc.discounted += a * s.margin / (1.0 + s.discount_rate).powi(year as i32);
    })?;
    if lost {
        return Err("the orders changed between the two passes".into());
    }
    drop(row_index);
    // A customer's acquisition cost: the largest given (customers without one cost 0).
    for b in costs {
        let id = b.column(0).as_primitive_opt::<Int64Type>();
        let cost = b.column(1).as_primitive_opt::<Float64Type>();
        let (Some(id), Some(cost)) = (id, cost) else {
            return Err("the acquisition cost query did not return (BIGINT, DOUBLE)".into());
        };
        for i in 0..b.num_rows() {
            if id.is_null(i) || cost.is_null(i) || shard_of(id.value(i), shards) != shard {
                continue;
            }
            if let Some(&k) = map.get(&id.value(i)) {
                let acc = &mut out.accs[k as usize];
                let v = cost.value(i);
                acc.cost = if acc.has_cost { acc.cost.max(v) } else { v };
                acc.has_cost = true;
            }
        }
    }
    Ok(out)
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

/// Runs `spec`'s rule-based model over `orders` (batches of [`orders_sql`]) and `costs`
/// (batches of [`costs_sql`]) on `shards` threads, in batches of `batch_size` rows.
pub fn compute(
    spec: &ClvSpec,
    run_date: chrono::NaiveDate,
    orders: &[RecordBatch],
    costs: &[RecordBatch],
    shards: usize,
    batch_size: usize,
) -> Result<Computed, String> {
    let shards = shards.max(1);
    let estimate = spec.model == ClvModel::FormulaRetention && spec.retention_rate.is_none();
    let settings = Settings {
        now_e: run_date
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
            .timestamp() as f64,
        margin: spec.margin(),
        discount_rate: spec.discount_rate,
        years: spec.years.map(i64::from),
        retention: estimate,
        discounted: spec.model == ClvModel::Discounted,
    };
    let results: Vec<Result<Shard, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..shards)
            .map(|k| {
                let settings = &settings;
                scope.spawn(move || run_shard(k, shards, orders, costs, settings))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a worker thread failed".into()))
            })
            .collect()
    });
    let results = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let retention = estimate.then(|| {
        let (mut base, mut kept) = (0u64, 0u64);
        for r in &results {
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
    let day = crate::steps::date32(run_date);
    let batch_size = batch_size.max(1);
    let schema = schema(spec.model);
    let (mut customers, mut total_clv) = (0, 0.0);
    let mut parts = Vec::with_capacity(results.len());
    for r in results {
        let n = r.ids.len();
        customers += n;
        let mut batches = Vec::with_capacity(n.div_ceil(batch_size));
        for (ids, accs) in r.ids.chunks(batch_size).zip(r.accs.chunks(batch_size)) {
            let m = ids.len();
            let floats = |f: &dyn Fn(&Acc) -> f64| {
                Arc::new(Float64Array::from_iter_values(accs.iter().map(f))) as ArrayRef
            };
            let ints = |f: &dyn Fn(&Acc) -> i64| {
                Arc::new(Int64Array::from_iter_values(accs.iter().map(f))) as ArrayRef
            };
            let aov = |a: &Acc| a.revenue / a.orders as f64;
            let ppy = |a: &Acc| match spec.purchases_per_year {
                Some(v) => v,
                None => a.orders as f64 / ((settings.now_e - a.first_e) / YEAR_SECONDS).max(1.0),
            };
            let mut cols: Vec<ArrayRef> = vec![
                Arc::new(Date32Array::from(vec![day; m])),
                Arc::new(Int64Array::from(ids.to_vec())),
                ints(&|a| a.orders),
                floats(&|a| a.revenue),
            ];
            let clv: Vec<f64> = match spec.model {
                ClvModel::Historical => accs.iter().map(|a| a.revenue * spec.margin()).collect(),
                ClvModel::Formula | ClvModel::FormulaRetention => {
                    let factor = if spec.model == ClvModel::Formula {
                        spec.expected_years.unwrap_or(0.0)
                    } else {
                        rate
                    };
                    cols.extend([floats(&aov), floats(&ppy), floats(&|_| factor)]);
                    accs.iter()
                        .map(|a| aov(a) * ppy(a) * factor * spec.margin())
                        .collect()
                }
                ClvModel::Discounted => {
                    cols.extend([
                        ints(&|a| a.years.into()),
                        floats(&|a| a.discounted),
                        floats(&|a| a.cost),
                    ]);
                    accs.iter().map(|a| a.discounted - a.cost).collect()
                }
                ClvModel::BgnbdGammaGamma => {
                    return Err("bgnbd_gamma_gamma is not a rule-based model".into());
                }
            };
            total_clv += clv.iter().sum::<f64>();
            cols.push(Arc::new(Float64Array::from(clv)));
            batches.push(RecordBatch::try_new(schema.clone(), cols).map_err(|e| e.to_string())?);
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

#[cfg(test)]
mod tests {
    //! Each model against values worked out by hand from its definition.
    use std::sync::Arc;

    use datafusion::arrow::array::{
        AsArray, Float64Array, Int64Array, RecordBatch, TimestampMicrosecondArray,
    };
    use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, TimeUnit};
    use datafusion::prelude::SessionContext;

    use crate::config::{ClvModel, ClvSpec};
    use crate::steps::clv::rules::YEAR_SECONDS;
    use crate::steps::clv::step;

    const DAY: i64 = 86_400_000_000;

    fn date() -> chrono::NaiveDate {
        chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap_or_default()
    }

    fn micros(days_before_run: f64) -> i64 {
        let run = date()
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
            .timestamp_micros();
        run - (days_before_run * DAY as f64) as i64
    }

    fn spec(model: ClvModel) -> ClvSpec {
        ClvSpec {
            from: "orders".into(),
            model,
            horizon_months: 12,
            discount_rate: 0.10,
            margin: Some(1.0),
            expected_years: None,
            purchases_per_year: None,
            retention_rate: None,
            acquisition_costs: None,
            years: None,
            backtest: None,
        }
    }

    /// Registers `orders` (customer_id, order_ts, net_amount) and `costs`.
    fn ctx(orders: &[(i64, f64, f64)], costs: &[(i64, f64)]) -> SessionContext {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, true),
            Field::new(
                "order_ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("net_amount", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(orders.iter().map(|o| o.0))),
                Arc::new(TimestampMicrosecondArray::from_iter_values(
                    orders.iter().map(|o| micros(o.1)),
                )),
                Arc::new(Float64Array::from_iter_values(orders.iter().map(|o| o.2))),
            ],
        )
        .unwrap();
        crate::steps::register(&ctx, "orders", schema, vec![vec![batch]]).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, false),
            Field::new("acquisition_cost", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(costs.iter().map(|c| c.0))),
                Arc::new(Float64Array::from_iter_values(costs.iter().map(|c| c.1))),
            ],
        )
        .unwrap();
        crate::steps::register(&ctx, "costs", schema, vec![vec![batch]]).unwrap();
        ctx
    }

    /// (customer_id, clv) of the step's result, by id; and the fit report as (name, value).
    async fn run(ctx: &SessionContext, spec: &ClvSpec) -> (Vec<(i64, f64)>, Vec<(String, f64)>) {
        step::run(ctx, "j", "m", spec, date()).await.unwrap();
        let b = ctx
            .sql("SELECT customer_id, clv FROM m ORDER BY customer_id")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut rows = Vec::new();
        for b in &b {
            let id = b
                .column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            let v = b.column(1).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                rows.push((id.value(i), v.value(i)));
            }
        }
        let f = ctx
            .sql("SELECT name, value FROM m_fit")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut fit = Vec::new();
        for b in &f {
            let n = b.column(0).as_string::<i32>();
            let v = b.column(1).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                fit.push((n.value(i).to_string(), v.value(i)));
            }
        }
        (rows, fit)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[tokio::test]
    async fn formula_is_aov_times_purchases_per_year_times_years() {
        // The textbook example: 500 a purchase, 12 purchases a year, 4 years: 24,000.
        let c = ctx(
            &[
                (1, 10.0, 400.0),
                (1, 5.0, 600.0),
                (2, 800.0, 100.0),
                (2, 30.0, 300.0),
                (2, 1.0, 200.0),
            ],
            &[],
        );
        let mut s = spec(ClvModel::Formula);
        s.expected_years = Some(4.0);
        s.purchases_per_year = Some(12.0);
        let (rows, _) = run(&c, &s).await;
        assert!(close(rows[0].1, 24_000.0), "{rows:?}");
        assert!(close(rows[1].1, 200.0 * 12.0 * 4.0), "{rows:?}");
        // Own rate: customer 2 has 3 orders over 800 days = 2.19 years -> 3 / 2.19 a year;
        // customer 1's 10 days count as one year (the rate is not extrapolated from days).
        s.purchases_per_year = None;
        s.margin = Some(0.5);
        let (rows, _) = run(&c, &s).await;
        assert!(close(rows[0].1, 500.0 * 2.0 * 4.0 * 0.5), "{rows:?}");
        let years = 800.0 / 365.25;
        assert!(
            close(rows[1].1, 200.0 * (3.0 / years) * 4.0 * 0.5),
            "{rows:?}"
        );
    }

    #[tokio::test]
    async fn retention_is_estimated_from_the_two_last_years() {
        // Ordered in the year before last: 1, 2, 3, 4; of those 1, 2, 3 ordered in the last
        // year: retention 3/4. Customer 5 only ordered last year (not in the base).
        let c = ctx(
            &[
                (1, 500.0, 100.0),
                (1, 100.0, 100.0),
                (2, 400.0, 100.0),
                (2, 50.0, 100.0),
                (3, 700.0, 100.0),
                (3, 300.0, 100.0),
                (4, 600.0, 100.0),
                (5, 20.0, 100.0),
            ],
            &[],
        );
        let mut s = spec(ClvModel::FormulaRetention);
        s.purchases_per_year = Some(2.0);
        let (rows, fit) = run(&c, &s).await;
        let rate = fit.iter().find(|f| f.0 == "retention_rate").unwrap().1;
        assert!(close(rate, 0.75), "{fit:?}");
        assert!(close(rows[0].1, 100.0 * 2.0 * 0.75), "{rows:?}");
        // Given rate wins; history shorter than two years without a rate is a clear error.
        s.retention_rate = Some(0.5);
        let (rows, _) = run(&c, &s).await;
        assert!(close(rows[0].1, 100.0), "{rows:?}");
        let short = ctx(&[(1, 30.0, 10.0), (1, 20.0, 10.0)], &[]);
        s.retention_rate = None;
        let err = step::run(&short, "j", "m", &s, date())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot estimate the retention rate"), "{err}");
    }

    #[tokio::test]
    async fn historical_is_realized_gross_profit() {
        let c = ctx(&[(1, 10.0, 100.0), (1, 5.0, 60.0), (2, 3.0, 40.0)], &[]);
        let mut s = spec(ClvModel::Historical);
        s.margin = Some(0.3);
        let (rows, fit) = run(&c, &s).await;
        assert!(close(rows[0].1, 48.0) && close(rows[1].1, 12.0), "{rows:?}");
        assert!(
            fit.iter().any(|f| f.0 == "total_clv" && close(f.1, 60.0)),
            "{fit:?}"
        );
    }

    #[tokio::test]
    async fn discounted_sums_yearly_profit_over_one_plus_d_to_the_t_net_of_cac() {
        // Customer 1: first order 800 days ago. Year 1 (days 800..435 ago): 100 + 50; year 2
        // (435..70 ago): 200; year 3: 40. Margin 0.5, d = 10 %, CAC 30.
        let c = ctx(
            &[
                (1, 800.0, 100.0),
                (1, 500.0, 50.0),
                (1, 300.0, 200.0),
                (1, 10.0, 40.0),
                (2, 100.0, 80.0),
            ],
            &[(1, 30.0), (3, 99.0)],
        );
        let mut s = spec(ClvModel::Discounted);
        s.margin = Some(0.5);
        s.acquisition_costs = Some("costs".into());
        let (rows, _) = run(&c, &s).await;
        let one = 75.0 / 1.1 + 100.0 / 1.1_f64.powi(2) + 20.0 / 1.1_f64.powi(3) - 30.0;
        assert!(close(rows[0].1, one), "{rows:?} want {one}");
        assert!(close(rows[1].1, 40.0 / 1.1), "{rows:?}"); // no cost row: CAC 0
        s.years = Some(1);
        let (rows, _) = run(&c, &s).await;
        assert!(close(rows[0].1, 75.0 / 1.1 - 30.0), "{rows:?}");
    }

    /// (customer_id, orders, revenue, years, clv) of every row, from the columns at `cols`.
    fn per_customer(batches: &[RecordBatch], cols: [usize; 5]) -> Vec<(i64, i64, f64, i64, f64)> {
        use datafusion::arrow::datatypes::Int64Type;
        let mut rows = Vec::new();
        for b in batches {
            let int = |c: usize| b.column(cols[c]).as_primitive::<Int64Type>();
            let float = |c: usize| b.column(cols[c]).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                rows.push((
                    int(0).value(i),
                    int(1).value(i),
                    float(2).value(i),
                    int(3).value(i),
                    float(4).value(i),
                ));
            }
        }
        rows
    }

    /// The same models written as SQL and run by DataFusion (an aggregation joined back to every
    /// order for the relationship year), on random orders: every customer's numbers agree, and
    /// do not depend on how many threads share the customers.
    #[tokio::test]
    async fn rust_passes_equal_the_sql_formulation_on_random_orders() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let orders: Vec<(i64, f64, f64)> = (0..5000)
            .map(|_| {
                (
                    rng.random_range(1..700),
                    rng.random_range(0.0..1500.0),
                    rng.random_range(-20.0..400.0),
                )
            })
            .collect();
        let costs: Vec<(i64, f64)> = (1..500).map(|c| (c, f64::from(c as u32 % 50))).collect();
        let c = ctx(&orders, &costs);
        let run_date = date();
        let sql = format!(
            "WITH o AS (SELECT customer_id, date_part('epoch', order_ts) AS e, net_amount AS amount FROM orders), \
             c AS (SELECT customer_id, COUNT(*) AS orders, SUM(amount) AS revenue, MIN(e) AS first_e FROM o GROUP BY customer_id), \
             y AS (SELECT o.customer_id, CAST(FLOOR((o.e - c.first_e) / {YEAR_SECONDS:?}) AS BIGINT) + 1 AS t, SUM(o.amount) AS revenue \
                   FROM o JOIN c ON o.customer_id = c.customer_id GROUP BY 1, 2), \
             d AS (SELECT customer_id, SUM(revenue * 0.3 / POWER(1.1, CAST(t AS DOUBLE))) AS disc, MAX(t) AS years FROM y GROUP BY 1), \
             a AS (SELECT customer_id, MAX(acquisition_cost) AS cost FROM costs GROUP BY 1) \
             SELECT c.customer_id, c.orders, c.revenue, d.years, d.disc - COALESCE(a.cost, 0.0) AS clv \
             FROM c JOIN d ON c.customer_id = d.customer_id LEFT JOIN a ON a.customer_id = c.customer_id \
             ORDER BY c.customer_id"
        );
        let want = c.sql(&sql).await.unwrap().collect().await.unwrap();
        let expected = per_customer(&want, [0, 1, 2, 3, 4]);
        assert!(expected.len() > 600, "{}", expected.len());
        let mut s = spec(ClvModel::Discounted);
        s.margin = Some(0.3);
        s.acquisition_costs = Some("costs".into());
        let read = |q: String| {
            let c = &c;
            async move { c.sql(&q).await.unwrap().collect().await.unwrap() }
        };
        let o = read(super::orders_sql(&s, run_date)).await;
        let k = read(super::costs_sql("costs")).await;
        for shards in [1, 3] {
            let got = super::compute(&s, run_date, &o, &k, shards, 100).unwrap();
            assert_eq!(got.parts.len(), shards);
            assert!(got.parts.iter().flatten().all(|b| b.num_rows() <= 100));
            let batches: Vec<RecordBatch> = got.parts.into_iter().flatten().collect();
            // run_date, customer_id, orders, revenue, years_counted, ..., clv
            let mut rows = per_customer(&batches, [1, 2, 3, 4, 7]);
            rows.sort_by_key(|r| r.0);
            assert_eq!(rows.len(), expected.len(), "shards {shards}");
            for (g, w) in rows.iter().zip(&expected) {
                assert_eq!((g.0, g.1, g.3), (w.0, w.1, w.3), "shards {shards}");
                assert!(
                    close(g.2, w.2) && close(g.4, w.4),
                    "shards {shards}: {g:?} vs {w:?}"
                );
            }
        }
    }
}
