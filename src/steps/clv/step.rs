//! The `clv` step. Model `bgnbd_gamma_gamma` fits BG/NBD and Gamma-Gamma on a BTYD summary and
//! predicts, per customer, P(alive), expected purchases and spend over the horizon, and the
//! discounted CLV; with `backtest` it also refits on a calibration period and compares predicted
//! with actual holdout purchases (`<step>_backtest`). The rule-based models (`historical`,
//! `formula`, `formula_retention`, `discounted`) are in [`super::rules`]. Every model registers
//! `<step>` (per customer) and `<step>_fit` (parameters, log-likelihood, iterations, totals).
//!
//! Units: time in weeks (input), horizon in months (a month = 365.25/12/7 weeks), money in the
//! currency of the exports. CLV = margin × E[spend] × Σ_{m=1..H} ΔE[purchases in month m] / (1+d_m)^m
//! with d_m = (1 + annual rate)^(1/12) − 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use super::rules;
use super::{bgnbd, gamma_gamma};
use crate::config::{ClvModel, ClvSpec};
use crate::error::{Error, Result};
use crate::steps::sql::StepOutcome;

/// Weeks in a month.
pub const WEEKS_PER_MONTH: f64 = 365.25 / 12.0 / 7.0;

pub fn output_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_date", DataType::Date32, false),
        Field::new("customer_id", DataType::Int64, false),
        Field::new("p_alive", DataType::Float64, false),
        Field::new("expected_purchases", DataType::Float64, false),
        Field::new("expected_spend", DataType::Float64, false),
        Field::new("clv", DataType::Float64, false),
    ]))
}

pub fn fit_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_date", DataType::Date32, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
    ]))
}

pub fn backtest_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_date", DataType::Date32, false),
        Field::new("customer_id", DataType::Int64, false),
        Field::new("x", DataType::Float64, false),
        Field::new("t", DataType::Float64, false),
        Field::new("holdout_weeks", DataType::Float64, false),
        Field::new("actual_purchases", DataType::Float64, false),
        Field::new("predicted_purchases", DataType::Float64, false),
        Field::new("error", DataType::Float64, false),
    ]))
}

const BTYD_COLUMNS: [&str; 5] = ["customer_id", "x", "t_x", "t", "mean_repeat_spend"];
const BACKTEST_COLUMNS: [&str; 6] = ["customer_id", "x", "t_x", "t", "x_holdout", "holdout_weeks"];

async fn require(
    ctx: &SessionContext,
    table: &str,
    columns: &[&str],
    hint: &str,
) -> std::result::Result<(), String> {
    let df = ctx
        .table(table)
        .await
        .map_err(|e| format!("`{table}`: {e}"))?;
    let schema = df.schema();
    let missing: Vec<&str> = columns
        .iter()
        .copied()
        .filter(|c| schema.field_with_unqualified_name(c).is_err())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "`{table}` lacks column(s) {} ({hint})",
            missing.join(", ")
        ))
    }
}

/// Checks the step's source tables and registers empty tables of the step's schemas (for
/// `validate`). Returns the tables registered with their schemas.
pub async fn plan(
    ctx: &SessionContext,
    name: &str,
    spec: &ClvSpec,
    run_date: chrono::NaiveDate,
) -> std::result::Result<Vec<(String, SchemaRef)>, String> {
    let fit = format!("{name}_fit");
    let mut tables = Vec::new();
    if spec.model == ClvModel::BgnbdGammaGamma {
        require(
            ctx,
            &spec.from,
            &BTYD_COLUMNS,
            "a BTYD summary such as sql/btyd_summary.sql has them",
        )
        .await?;
        tables.push((name.to_string(), output_schema()));
        if let Some(b) = &spec.backtest {
            require(
                ctx,
                b,
                &BACKTEST_COLUMNS,
                "a calibration/holdout summary such as sql/btyd_backtest.sql has them",
            )
            .await?;
            tables.push((format!("{name}_backtest"), backtest_schema()));
        }
    } else {
        require(
            ctx,
            &spec.from,
            &rules::ORDER_COLUMNS,
            "an order table such as sql/orders_clean.sql has them",
        )
        .await?;
        if let Some(costs) = &spec.acquisition_costs {
            require(
                ctx,
                costs,
                &["customer_id", "acquisition_cost"],
                "acquisition_costs names a table such as the customers export",
            )
            .await?;
        }
        let sql = rules::model_sql(spec, run_date, 0.5);
        let df = ctx.sql(&sql).await.map_err(|e| {
            format!(
                "the `{}` model does not plan on `{}`: {e}",
                spec.model.name(),
                spec.from
            )
        })?;
        tables.push((name.to_string(), Arc::new(df.schema().as_arrow().clone())));
    }
    tables.push((fit, fit_schema()));
    for (table, schema) in &tables {
        register(ctx, table, schema.clone(), vec![]).map_err(|e| e.to_string())?;
    }
    Ok(tables)
}

fn register(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<()> {
    let parts = if batches.is_empty() {
        vec![vec![]]
    } else {
        vec![batches]
    };
    let table =
        MemTable::try_new(schema, parts).map_err(|e| Error::df(format!("register `{name}`"), e))?;
    // A re-run on the same session replaces the step's tables.
    ctx.deregister_table(name)
        .map_err(|e| Error::df(format!("register `{name}`"), e))?;
    ctx.register_table(name, Arc::new(table))
        .map_err(|e| Error::df(format!("register `{name}`"), e))?;
    Ok(())
}

struct Rows {
    ids: Vec<i64>,
    hist: Vec<bgnbd::History>,
    spend: Vec<f64>,
}

async fn read(ctx: &SessionContext, job: &str, name: &str, spec: &ClvSpec) -> Result<Rows> {
    let sql = format!(
        "SELECT CAST(customer_id AS BIGINT), CAST(x AS DOUBLE), CAST(t_x AS DOUBLE), CAST(t AS DOUBLE), CAST(mean_repeat_spend AS DOUBLE) FROM \"{}\"",
        spec.from
    );
    let step_err = |source| Error::Step {
        job: job.to_string(),
        step: name.to_string(),
        source,
    };
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(step_err)?
        .collect()
        .await
        .map_err(step_err)?;
    let mut rows = Rows {
        ids: Vec::new(),
        hist: Vec::new(),
        spend: Vec::new(),
    };
    for b in &batches {
        let id = b.column(0).as_primitive::<Int64Type>();
        let cols: Vec<&datafusion::arrow::array::PrimitiveArray<Float64Type>> = (1..5)
            .map(|i| b.column(i).as_primitive::<Float64Type>())
            .collect();
        for i in 0..b.num_rows() {
            if id.is_null(i) || cols[0].is_null(i) || cols[1].is_null(i) || cols[2].is_null(i) {
                return Err(Error::Model {
                    job: job.to_string(),
                    step: name.to_string(),
                    message: format!(
                        "`{}` has a row with a NULL customer_id, x, t_x or t",
                        spec.from
                    ),
                });
            }
            rows.ids.push(id.value(i));
            rows.hist.push(bgnbd::History {
                x: cols[0].value(i),
                t_x: cols[1].value(i),
                t: cols[2].value(i),
            });
            rows.spend.push(if cols[3].is_null(i) {
                0.0
            } else {
                cols[3].value(i)
            });
        }
    }
    Ok(rows)
}

/// Discounted CLV and expected purchases over the horizon for one customer.
pub fn clv_one(p: &bgnbd::Params, h: &bgnbd::History, spend: f64, spec: &ClvSpec) -> (f64, f64) {
    let monthly = (1.0 + spec.discount_rate).powf(1.0 / 12.0) - 1.0;
    let (mut prev, mut value, mut discount) = (0.0, 0.0, 1.0);
    for m in 1..=spec.horizon_months {
        let e = bgnbd::expected_purchases(p, h, f64::from(m) * WEEKS_PER_MONTH);
        discount /= 1.0 + monthly;
        value += (e - prev) * discount;
        prev = e;
    }
    (prev, value * spend * spec.margin)
}

/// What the fit took, for logs.
#[derive(Debug, Clone)]
pub struct FitTimes {
    pub bgnbd: Duration,
    pub gamma_gamma: Duration,
    pub predict: Duration,
    pub backtest: Duration,
}

fn date32(run_date: chrono::NaiveDate) -> i32 {
    (run_date - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()).num_days() as i32
}

fn fit_batch(run_date: chrono::NaiveDate, report: &[(&str, &str, f64)]) -> Result<RecordBatch> {
    RecordBatch::try_new(
        fit_schema(),
        vec![
            Arc::new(Date32Array::from(vec![date32(run_date); report.len()])),
            Arc::new(StringArray::from_iter_values(report.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(report.iter().map(|r| r.1))),
            Arc::new(Float64Array::from_iter_values(report.iter().map(|r| r.2))),
        ],
    )
    .map_err(|e| Error::Internal(e.to_string()))
}

/// Runs the step with the model its spec names. Fit times are given for `bgnbd_gamma_gamma`.
pub async fn run(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    spec: &ClvSpec,
    run_date: chrono::NaiveDate,
) -> Result<(StepOutcome, Option<FitTimes>)> {
    if spec.model == ClvModel::BgnbdGammaGamma {
        let (out, times) = run_predictive(ctx, job, name, spec, run_date).await?;
        Ok((out, Some(times)))
    } else {
        Ok((run_rules(ctx, job, name, spec, run_date).await?, None))
    }
}

async fn collect(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    sql: &str,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let step_err = |source| Error::Step {
        job: job.to_string(),
        step: name.to_string(),
        source,
    };
    let df = ctx.sql(sql).await.map_err(step_err)?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(step_err)?;
    Ok((schema, batches))
}

/// First value of a one-row result's float column, or None if NULL / absent.
fn scalar(batches: &[RecordBatch], col: usize) -> Option<f64> {
    let b = batches.iter().find(|b| b.num_rows() > 0)?;
    let a = b.column(col).as_primitive_opt::<Float64Type>()?;
    (!a.is_null(0)).then(|| a.value(0))
}

async fn run_rules(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    spec: &ClvSpec,
    run_date: chrono::NaiveDate,
) -> Result<StepOutcome> {
    let started = Instant::now();
    let model = spec.model.name();
    let mut report: Vec<(&str, &str, f64)> = Vec::new();
    let mut retention = spec.retention_rate.unwrap_or(0.0);
    if spec.model == ClvModel::FormulaRetention && spec.retention_rate.is_none() {
        let (_, b) = collect(ctx, job, name, &rules::retention_sql(spec, run_date)).await?;
        let base = b
            .iter()
            .find(|b| b.num_rows() > 0)
            .and_then(|b| {
                b.column(1)
                    .as_primitive_opt::<Int64Type>()
                    .map(|a| a.value(0))
            })
            .unwrap_or(0);
        retention = scalar(&b, 0).ok_or_else(|| Error::Model {
            job: job.to_string(),
            step: name.to_string(),
            message: format!(
                "cannot estimate the retention rate: no customer in `{}` ordered in the year before last (the history is shorter than two years); set `retention_rate`",
                spec.from
            ),
        })?;
        report.push((model, "retention_base_customers", base as f64));
    }
    if spec.model == ClvModel::FormulaRetention {
        report.push((model, "retention_rate", retention));
    }
    let (schema, batches) =
        collect(ctx, job, name, &rules::model_sql(spec, run_date, retention)).await?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let bytes = batches.iter().map(|b| b.get_array_memory_size()).sum();
    let clv_col = schema
        .index_of("clv")
        .map_err(|e| Error::Internal(e.to_string()))?;
    let total: f64 = batches
        .iter()
        .filter_map(|b| b.column(clv_col).as_primitive_opt::<Float64Type>())
        .map(|a| a.iter().flatten().sum::<f64>())
        .sum();
    report.push((model, "customers", rows as f64));
    report.push((model, "total_clv", total));
    report.push((model, "margin", spec.margin));
    match spec.model {
        ClvModel::Formula => {
            report.push((model, "expected_years", spec.expected_years.unwrap_or(0.0)))
        }
        ClvModel::Discounted => report.push((model, "discount_rate", spec.discount_rate)),
        _ => {}
    }
    register(ctx, name, schema.clone(), batches)?;
    register(
        ctx,
        &format!("{name}_fit"),
        fit_schema(),
        vec![fit_batch(run_date, &report)?],
    )?;
    Ok(StepOutcome {
        rows,
        bytes,
        elapsed: started.elapsed(),
        schema,
    })
}

/// The calibration/holdout backtest: refit BG/NBD on the calibration columns of `table` and
/// predict each customer's purchases in the holdout. Returns the per-customer table and totals.
async fn backtest(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    table: &str,
    run_date: chrono::NaiveDate,
) -> Result<(RecordBatch, Vec<(&'static str, f64)>)> {
    let model_err = |message: String| Error::Model {
        job: job.to_string(),
        step: name.to_string(),
        message,
    };
    let sql = format!(
        "SELECT CAST(customer_id AS BIGINT), CAST(x AS DOUBLE), CAST(t_x AS DOUBLE), CAST(t AS DOUBLE), CAST(x_holdout AS DOUBLE), CAST(holdout_weeks AS DOUBLE) FROM \"{table}\""
    );
    let (_, batches) = collect(ctx, job, name, &sql).await?;
    let n: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut ids = Vec::with_capacity(n);
    let mut hist = Vec::with_capacity(n);
    let mut actual = Vec::with_capacity(n);
    let mut weeks = Vec::with_capacity(n);
    for b in &batches {
        let id = b.column(0).as_primitive::<Int64Type>();
        let c: Vec<&datafusion::arrow::array::PrimitiveArray<Float64Type>> = (1..6)
            .map(|i| b.column(i).as_primitive::<Float64Type>())
            .collect();
        for i in 0..b.num_rows() {
            if id.is_null(i) || c.iter().any(|a| a.is_null(i)) {
                return Err(model_err(format!(
                    "backtest table `{table}` has a row with a NULL customer_id, x, t_x, t, x_holdout or holdout_weeks"
                )));
            }
            ids.push(id.value(i));
            hist.push(bgnbd::History {
                x: c[0].value(i),
                t_x: c[1].value(i),
                t: c[2].value(i),
            });
            actual.push(c[3].value(i));
            weeks.push(c[4].value(i));
        }
    }
    let fit = bgnbd::fit(&bgnbd::compress(hist.iter().copied())).map_err(|e| {
        model_err(format!(
            "backtest (calibration period of `{table}`): BG/NBD: {e}"
        ))
    })?;
    let predicted: Vec<f64> = hist
        .iter()
        .zip(&weeks)
        .map(|(h, w)| bgnbd::expected_purchases(&fit.params, h, *w))
        .collect();
    let error: Vec<f64> = predicted.iter().zip(&actual).map(|(p, a)| p - a).collect();
    let actual_total: f64 = actual.iter().sum();
    let predicted_total: f64 = predicted.iter().sum();
    let mae = error.iter().map(|e| e.abs()).sum::<f64>() / n.max(1) as f64;
    let rmse = (error.iter().map(|e| e * e).sum::<f64>() / n.max(1) as f64).sqrt();
    let holdout = weeks.iter().copied().fold(0.0, f64::max);
    let batch = RecordBatch::try_new(
        backtest_schema(),
        vec![
            Arc::new(Date32Array::from(vec![date32(run_date); n])),
            Arc::new(Int64Array::from(ids)),
            Arc::new(Float64Array::from_iter_values(hist.iter().map(|h| h.x))),
            Arc::new(Float64Array::from_iter_values(hist.iter().map(|h| h.t))),
            Arc::new(Float64Array::from(weeks)),
            Arc::new(Float64Array::from(actual)),
            Arc::new(Float64Array::from(predicted)),
            Arc::new(Float64Array::from(error)),
        ],
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    let p = fit.params;
    let totals = vec![
        ("r", p.r),
        ("alpha", p.alpha),
        ("a", p.a),
        ("b", p.b),
        ("log_likelihood", fit.log_likelihood),
        ("iterations", fit.iterations as f64),
        ("customers", fit.customers as f64),
        ("holdout_weeks", holdout),
        ("actual_purchases", actual_total),
        ("predicted_purchases", predicted_total),
        (
            "total_error_pct",
            if actual_total > 0.0 {
                100.0 * (predicted_total - actual_total) / actual_total
            } else {
                f64::NAN
            },
        ),
        ("mean_abs_error", mae),
        ("rmse", rmse),
    ];
    Ok((batch, totals))
}

async fn run_predictive(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    spec: &ClvSpec,
    run_date: chrono::NaiveDate,
) -> Result<(StepOutcome, FitTimes)> {
    let day = date32(run_date);
    let started = Instant::now();
    let model_err = |message: String| Error::Model {
        job: job.to_string(),
        step: name.to_string(),
        message,
    };
    let rows = read(ctx, job, name, spec).await?;

    let t = Instant::now();
    let fit = bgnbd::fit(&bgnbd::compress(rows.hist.iter().copied()))
        .map_err(|e| model_err(format!("BG/NBD: {e}")))?;
    let t_bgnbd = t.elapsed();
    let t = Instant::now();
    let spend_data: Vec<(f64, f64)> = rows
        .hist
        .iter()
        .zip(&rows.spend)
        .map(|(h, m)| (h.x, *m))
        .collect();
    let gg = gamma_gamma::fit(&spend_data).map_err(|e| model_err(format!("Gamma-Gamma: {e}")))?;
    let t_gg = t.elapsed();

    let t = Instant::now();
    let p = fit.params;
    let n = rows.ids.len();
    let mut alive = Vec::with_capacity(n);
    let mut purchases = Vec::with_capacity(n);
    let mut spend = Vec::with_capacity(n);
    let mut value = Vec::with_capacity(n);
    // Per customer predictions are independent: computed on scoped threads, in order.
    let predict = |hist: &[bgnbd::History], spends: &[f64]| -> Vec<[f64; 4]> {
        hist.iter()
            .zip(spends)
            .map(|(h, m)| {
                let s = gamma_gamma::expected_spend(&gg.params, h.x, *m);
                let (e, v) = clv_one(&p, h, s, spec);
                [bgnbd::p_alive(&p, h), e, s, v]
            })
            .collect()
    };
    let size = n.div_ceil(8).max(1);
    let parts: Vec<Vec<[f64; 4]>> = std::thread::scope(|sc| {
        let handles: Vec<_> = rows
            .hist
            .chunks(size)
            .zip(rows.spend.chunks(size))
            .map(|(h, m)| sc.spawn(move || predict(h, m)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for part in parts {
        for [a, e, s, v] in part {
            alive.push(a);
            purchases.push(e);
            spend.push(s);
            value.push(v);
        }
    }
    if alive.len() != n {
        return Err(model_err("a prediction thread failed".into()));
    }
    let t_predict = t.elapsed();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Date32Array::from(vec![day; n])),
        Arc::new(Int64Array::from(rows.ids)),
        Arc::new(Float64Array::from(alive)),
        Arc::new(Float64Array::from(purchases)),
        Arc::new(Float64Array::from(spend)),
        Arc::new(Float64Array::from(value)),
    ];
    let batch =
        RecordBatch::try_new(output_schema(), cols).map_err(|e| Error::Internal(e.to_string()))?;
    let bytes = batch.get_array_memory_size();
    register(ctx, name, output_schema(), vec![batch])?;

    let report: Vec<(&str, &str, f64)> = vec![
        ("bgnbd", "r", p.r),
        ("bgnbd", "alpha", p.alpha),
        ("bgnbd", "a", p.a),
        ("bgnbd", "b", p.b),
        ("bgnbd", "log_likelihood", fit.log_likelihood),
        ("bgnbd", "iterations", fit.iterations as f64),
        ("bgnbd", "customers", fit.customers as f64),
        ("gamma_gamma", "p", gg.params.p),
        ("gamma_gamma", "q", gg.params.q),
        ("gamma_gamma", "gamma", gg.params.gamma),
        ("gamma_gamma", "log_likelihood", gg.log_likelihood),
        ("gamma_gamma", "iterations", gg.iterations as f64),
        ("gamma_gamma", "customers", gg.customers as f64),
    ];
    let mut report = report;
    let t = Instant::now();
    if let Some(table) = &spec.backtest {
        let (batch, totals) = backtest(ctx, job, name, table, run_date).await?;
        report.extend(totals.into_iter().map(|(k, v)| ("backtest", k, v)));
        register(
            ctx,
            &format!("{name}_backtest"),
            backtest_schema(),
            vec![batch],
        )?;
    }
    let t_backtest = t.elapsed();
    let fit_batch = fit_batch(run_date, &report)?;
    register(ctx, &format!("{name}_fit"), fit_schema(), vec![fit_batch])?;
    Ok((
        StepOutcome {
            rows: n,
            bytes,
            elapsed: started.elapsed(),
            schema: output_schema(),
        },
        FitTimes {
            bgnbd: t_bgnbd,
            gamma_gamma: t_gg,
            predict: t_predict,
            backtest: t_backtest,
        },
    ))
}
