//! The `clv` step: fits BG/NBD and Gamma-Gamma on a BTYD summary and predicts, per customer,
//! P(alive), expected purchases and spend over the horizon, and the discounted CLV. Registers two
//! tables: `<step>` (per customer) and `<step>_fit` (parameters, log-likelihood, iterations).
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

use super::{bgnbd, gamma_gamma};
use crate::config::ClvSpec;
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

/// Registers empty tables of the step's schemas (for `validate`), after checking `from`'s columns.
pub async fn plan(
    ctx: &SessionContext,
    name: &str,
    spec: &ClvSpec,
) -> std::result::Result<(), String> {
    let table = ctx
        .table(spec.from.as_str())
        .await
        .map_err(|e| format!("`{}`: {e}", spec.from))?;
    let schema = table.schema();
    let missing: Vec<&str> = ["customer_id", "x", "t_x", "t", "mean_repeat_spend"]
        .into_iter()
        .filter(|c| schema.field_with_unqualified_name(c).is_err())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "`{}` lacks column(s) {} (a BTYD summary such as sql/btyd_summary.sql has them)",
            spec.from,
            missing.join(", ")
        ));
    }
    register(ctx, name, output_schema(), vec![]).map_err(|e| e.to_string())?;
    register(ctx, &format!("{name}_fit"), fit_schema(), vec![]).map_err(|e| e.to_string())?;
    Ok(())
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
}

/// Runs the step.
pub async fn run(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    spec: &ClvSpec,
    run_date: chrono::NaiveDate,
) -> Result<(StepOutcome, FitTimes)> {
    let day = (run_date - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default())
        .num_days() as i32;
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
    for (h, m) in rows.hist.iter().zip(&rows.spend) {
        let s = gamma_gamma::expected_spend(&gg.params, h.x, *m);
        let (e, v) = clv_one(&p, h, s, spec);
        alive.push(bgnbd::p_alive(&p, h));
        purchases.push(e);
        spend.push(s);
        value.push(v);
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
    let fit_batch = RecordBatch::try_new(
        fit_schema(),
        vec![
            Arc::new(Date32Array::from(vec![day; report.len()])),
            Arc::new(StringArray::from_iter_values(report.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(report.iter().map(|r| r.1))),
            Arc::new(Float64Array::from_iter_values(report.iter().map(|r| r.2))),
        ],
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
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
        },
    ))
}
