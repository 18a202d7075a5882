//! The `clv` step. Model `bgnbd_gamma_gamma` fits BG/NBD and Gamma-Gamma on a BTYD summary and
//! predicts, per customer, P(alive), expected purchases and spend over the horizon, and the
//! discounted CLV, appended to the rows of `from` (whose buffers are shared, not copied; plus
//! `run_date` when `from` has none); with `backtest` it also refits on a calibration period and
//! compares predicted with actual holdout purchases (`<step>_backtest`). The rule-based models
//! (`historical`, `formula`, `formula_retention`, `discounted`) are in [`super::rules`]. Every
//! model registers `<step>` (per customer) and `<step>_fit` (parameters, log-likelihood,
//! iterations, totals).
//!
//! Units: time in weeks (input), horizon in months (a month = 365.25/12/7 weeks), money in the
//! currency of the exports. CLV = margin × E[spend] × Σ_{m=1..H} ΔE[purchases in month m] / (1+d_m)^m
//! with d_m = (1 + annual rate)^(1/12) − 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::prelude::SessionContext;

use super::rules;
use super::{bgnbd, gamma_gamma};
use crate::config::{ClvModel, ClvSpec};
use crate::error::{Error, Result};
use crate::steps::register;
use crate::steps::sql::StepOutcome;

/// Weeks in a month.
pub const WEEKS_PER_MONTH: f64 = 365.25 / 12.0 / 7.0;

/// The columns the predictive model appends to its input's rows.
pub fn prediction_fields() -> Vec<Field> {
    let mut fields: Vec<Field> = ["p_alive", "expected_purchases", "expected_spend", "clv"]
        .into_iter()
        .map(|n| Field::new(n, DataType::Float64, false))
        .collect();
    fields.push(Field::new("clv_rank", DataType::Int64, false));
    fields
}

/// Each customer's rank by `clv`: 1 = the highest, ties broken by the smaller `customer_id`
/// (what `row_number() over (order by clv desc, customer_id)` gives, without a sort of the
/// whole table in SQL). Floats are ordered as Arrow and DataFusion sort them (IEEE total
/// order: -0.0 below 0.0).
pub fn clv_ranks(clv: &[f64], ids: &[i64]) -> Vec<i64> {
    // Ascending keys = descending CLV: the float's bits made order-preserving, then inverted.
    let key = |v: f64| {
        let bits = v.to_bits();
        let ordered = if bits >> 63 == 1 {
            !bits
        } else {
            bits | 1 << 63
        };
        !ordered
    };
    let mut order: Vec<(u64, i64, u32)> = clv
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (v, id))| (key(*v), *id, i as u32))
        .collect();
    // Sorted in chunks on all cores, then merged: the standard stable sort finds the sorted
    // runs and merges them in linear time per run.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let chunk = order.len().div_ceil(threads).max(50_000);
    std::thread::scope(|s| {
        for part in order.chunks_mut(chunk) {
            s.spawn(|| part.sort_unstable());
        }
    });
    order.sort();
    let mut rank = vec![0i64; clv.len()];
    for (r, (_, _, i)) in order.iter().enumerate() {
        rank[*i as usize] = r as i64 + 1;
    }
    rank
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
            "a BTYD summary such as sql/customer_features.sql has them",
        )
        .await?;
        let from = ctx
            .table(spec.from.as_str())
            .await
            .map_err(|e| format!("`{}`: {e}", spec.from))?;
        let out = crate::steps::appended_schema(from.schema().as_arrow(), &prediction_fields())
            .map_err(|e| format!("`{}`: {e}", spec.from))?;
        tables.push((name.to_string(), out));
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
        let mut queries = vec![(spec.from.as_str(), rules::orders_sql(spec, run_date))];
        queries.extend(
            spec.acquisition_costs
                .as_deref()
                .map(|t| (t, rules::costs_sql(t))),
        );
        for (table, sql) in queries {
            ctx.sql(&sql).await.map_err(|e| {
                format!(
                    "the `{}` model does not plan on `{table}`: {e}",
                    spec.model.name()
                )
            })?;
        }
        tables.push((name.to_string(), rules::schema(spec.model)));
    }
    tables.push((fit, fit_schema()));
    for (table, schema) in &tables {
        register(ctx, table, schema.clone(), vec![]).map_err(|e| e.to_string())?;
    }
    Ok(tables)
}

/// The model's inputs, row by row in the order of `from`'s batches.
struct History {
    rows: crate::steps::Rows,
    /// `customer_id`, for ties in the CLV rank.
    ids: Vec<i64>,
    hist: Vec<bgnbd::History>,
    spend: Vec<f64>,
}

async fn read(ctx: &SessionContext, job: &str, name: &str, spec: &ClvSpec) -> Result<History> {
    let rows = crate::steps::Rows::read(ctx, &spec.from)
        .await
        .map_err(|source| Error::Step {
            job: job.to_string(),
            step: name.to_string(),
            source,
        })?;
    let model_err = |message: String| Error::Model {
        job: job.to_string(),
        step: name.to_string(),
        message: format!("`{}`: {message}", spec.from),
    };
    let ids = rows.integers("customer_id").map_err(model_err)?;
    let x = rows.floats("x", None).map_err(model_err)?;
    let t_x = rows.floats("t_x", None).map_err(model_err)?;
    let t = rows.floats("t", None).map_err(model_err)?;
    let hist = x
        .iter()
        .zip(&t_x)
        .zip(&t)
        .map(|((x, t_x), t)| bgnbd::History {
            x: *x,
            t_x: *t_x,
            t: *t,
        })
        .collect();
    // No repeat purchase, no mean repeat spend: Gamma-Gamma ignores those customers.
    let spend = rows
        .floats("mean_repeat_spend", Some(0.0))
        .map_err(model_err)?;
    Ok(History {
        rows,
        ids,
        hist,
        spend,
    })
}

/// The monthly horizons (in weeks) and discount factors of a CLV over `spec.horizon_months`.
fn horizon(spec: &ClvSpec) -> (Vec<f64>, Vec<f64>) {
    let monthly = (1.0 + spec.discount_rate).powf(1.0 / 12.0) - 1.0;
    (1..=spec.horizon_months)
        .map(|m| {
            (
                f64::from(m) * WEEKS_PER_MONTH,
                (1.0 + monthly).powi(-(m as i32)),
            )
        })
        .unzip()
}

/// For one history: expected purchases over the whole horizon, and the discounted sum of each
/// month's expected purchases (CLV = margin × expected spend × that sum).
pub fn horizon_purchases(
    p: &bgnbd::Params,
    h: &bgnbd::History,
    weeks: &[f64],
    discounts: &[f64],
) -> (f64, f64) {
    let mut cumulative = vec![0.0; weeks.len()];
    bgnbd::expected_purchases_many(p, h, weeks, &mut cumulative);
    let (mut prev, mut value) = (0.0, 0.0);
    for (e, d) in cumulative.iter().zip(discounts) {
        value += (e - prev) * d;
        prev = *e;
    }
    (prev, value)
}

/// What the fit took, for logs.
#[derive(Debug, Clone)]
pub struct FitTimes {
    pub bgnbd: Duration,
    pub gamma_gamma: Duration,
    pub predict: Duration,
    pub backtest: Duration,
}

fn fit_batch(run_date: chrono::NaiveDate, report: &[(&str, &str, f64)]) -> Result<RecordBatch> {
    RecordBatch::try_new(
        fit_schema(),
        vec![
            Arc::new(Date32Array::from(vec![
                crate::steps::date32(run_date);
                report.len()
            ])),
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

/// The rows of `sql`; errors name the job and step.
async fn collect(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    sql: &str,
) -> Result<Vec<RecordBatch>> {
    let step_err = |source| Error::Step {
        job: job.to_string(),
        step: name.to_string(),
        source,
    };
    ctx.sql(sql)
        .await
        .map_err(step_err)?
        .collect()
        .await
        .map_err(step_err)
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
    let orders = collect(ctx, job, name, &rules::orders_sql(spec, run_date)).await?;
    let costs = match &spec.acquisition_costs {
        Some(table) if spec.model == ClvModel::Discounted => {
            collect(ctx, job, name, &rules::costs_sql(table)).await?
        }
        _ => Vec::new(),
    };
    let config = ctx.state().config().clone();
    let computed = rules::compute(
        spec,
        run_date,
        &orders,
        &costs,
        config.target_partitions(),
        config.batch_size(),
    )
    .map_err(|m| Error::Internal(format!("the `{name}` step's {model} model: {m}")))?;
    drop((orders, costs));
    let mut report: Vec<(&str, &str, f64)> = Vec::new();
    if let Some((rate, base)) = computed.retention {
        let rate = rate.ok_or_else(|| Error::Model {
            job: job.to_string(),
            step: name.to_string(),
            message: format!(
                "cannot estimate the retention rate: no customer in `{}` ordered in the year before last (the history is shorter than two years); set `retention_rate`",
                spec.from
            ),
        })?;
        report.push((model, "retention_base_customers", base as f64));
        report.push((model, "retention_rate", rate));
    } else if let Some(rate) = spec
        .retention_rate
        .filter(|_| spec.model == ClvModel::FormulaRetention)
    {
        report.push((model, "retention_rate", rate));
    }
    let rows = computed.customers;
    let bytes = crate::memstat::batches_bytes(computed.parts.iter().flatten()) as usize;
    report.push((model, "customers", rows as f64));
    report.push((model, "total_clv", computed.total_clv));
    report.push((model, "margin", spec.margin()));
    match spec.model {
        ClvModel::Formula => {
            report.push((model, "expected_years", spec.expected_years.unwrap_or(0.0)))
        }
        ClvModel::Discounted => report.push((model, "discount_rate", spec.discount_rate)),
        _ => {}
    }
    let schema = rules::schema(spec.model);
    register(ctx, name, schema.clone(), computed.parts)?;
    register(
        ctx,
        &format!("{name}_fit"),
        fit_schema(),
        vec![vec![fit_batch(run_date, &report)?]],
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
    start: &bgnbd::Params,
) -> Result<(Vec<RecordBatch>, Vec<(&'static str, f64)>)> {
    let model_err = |message: String| Error::Model {
        job: job.to_string(),
        step: name.to_string(),
        message,
    };
    let sql = format!(
        "SELECT CAST(customer_id AS BIGINT), CAST(x AS DOUBLE), CAST(t_x AS DOUBLE), CAST(t AS DOUBLE), CAST(x_holdout AS DOUBLE), CAST(holdout_weeks AS DOUBLE) FROM {}",
        crate::engine::quote_ident(table)
    );
    let batches = collect(ctx, job, name, &sql).await?;
    // The output reuses these columns as they are (customer_id, x, t, holdout weeks, actual):
    // only the predictions and errors are new arrays.
    let mut cols = Vec::with_capacity(batches.len());
    for b in batches.iter().filter(|b| b.num_rows() > 0) {
        if b.columns().iter().any(|c| c.null_count() > 0) {
            return Err(model_err(format!(
                "backtest table `{table}` has a row with a NULL customer_id, x, t_x, t, x_holdout or holdout_weeks"
            )));
        }
        let f = |i: usize| b.column(i).as_primitive::<Float64Type>().clone();
        cols.push((b.column(0).clone(), f(1), f(2), f(3), f(4), f(5)));
    }
    drop(batches);
    let n: usize = cols.iter().map(|c| c.0.len()).sum();
    let hist: Vec<bgnbd::History> = cols
        .iter()
        .flat_map(|(_, x, t_x, t, _, _)| {
            x.values()
                .iter()
                .zip(t_x.values())
                .zip(t.values())
                .map(|((x, t_x), t)| bgnbd::History {
                    x: *x,
                    t_x: *t_x,
                    t: *t,
                })
        })
        .collect();
    let weeks = || cols.iter().flat_map(|c| c.5.values().iter().copied());
    let (distinct, index) = bgnbd::compress_indexed(&hist);
    // Started from the full-history fit: the calibration optimum is close to it.
    let fit = bgnbd::fit_from(&distinct, Some(start)).map_err(|e| {
        model_err(format!(
            "backtest (calibration period of `{table}`): BG/NBD: {e}"
        ))
    })?;
    let p = fit.params;
    let first = weeks().next();
    let one_length = weeks().all(|w| Some(w) == first);
    let predicted: Vec<f64> = match (one_length, first) {
        // The usual case: one holdout length, so one prediction per distinct history.
        (true, Some(w)) => {
            let per = super::par_map(&distinct, |(h, _)| bgnbd::expected_purchases(&p, h, w))
                .ok_or_else(|| model_err("a prediction thread failed".into()))?;
            index.iter().map(|i| per[*i as usize]).collect()
        }
        _ => hist
            .iter()
            .zip(weeks())
            .map(|(h, w)| bgnbd::expected_purchases(&p, h, w))
            .collect(),
    };
    drop((hist, distinct, index));
    let day = crate::steps::date32(run_date);
    let (mut actual_total, mut predicted_total, mut abs_error, mut square_error) =
        (0.0, 0.0, 0.0, 0.0);
    let mut holdout = 0.0_f64;
    let mut out = Vec::with_capacity(cols.len());
    let mut offset = 0;
    for (id, x, _, t, actual, weeks) in cols {
        let m = id.len();
        let predicted = &predicted[offset..offset + m];
        offset += m;
        let error: Vec<f64> = predicted
            .iter()
            .zip(actual.values())
            .map(|(p, a)| p - a)
            .collect();
        actual_total += actual.values().iter().sum::<f64>();
        predicted_total += predicted.iter().sum::<f64>();
        abs_error += error.iter().map(|e| e.abs()).sum::<f64>();
        square_error += error.iter().map(|e| e * e).sum::<f64>();
        holdout = weeks.values().iter().copied().fold(holdout, f64::max);
        let batch = RecordBatch::try_new(
            backtest_schema(),
            vec![
                Arc::new(Date32Array::from(vec![day; m])),
                id,
                Arc::new(x),
                Arc::new(t),
                Arc::new(weeks),
                Arc::new(actual),
                Arc::new(Float64Array::from(predicted.to_vec())),
                Arc::new(Float64Array::from(error)),
            ],
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        out.push(batch);
    }
    let mae = abs_error / n.max(1) as f64;
    let rmse = (square_error / n.max(1) as f64).sqrt();
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
    Ok((out, totals))
}

async fn run_predictive(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    spec: &ClvSpec,
    run_date: chrono::NaiveDate,
) -> Result<(StepOutcome, FitTimes)> {
    let day = crate::steps::date32(run_date);
    let started = Instant::now();
    let model_err = |message: String| Error::Model {
        job: job.to_string(),
        step: name.to_string(),
        message,
    };
    let rows = read(ctx, job, name, spec).await?;

    let t = Instant::now();
    // Customers with the same (x, t_x, T) have the same fit terms and purchase predictions:
    // the fit and the predictions run once per distinct history (a third of the customers on
    // the generator's data; one-time buyers collapse to one row per age).
    let (distinct, index) = bgnbd::compress_indexed(&rows.hist);
    let fit = bgnbd::fit(&distinct).map_err(|e| model_err(format!("BG/NBD: {e}")))?;
    let t_bgnbd = t.elapsed();
    let t = Instant::now();
    let spend_data: Vec<(f64, f64)> = rows
        .hist
        .iter()
        .zip(&rows.spend)
        .map(|(h, m)| (h.x, *m))
        .collect();
    let gg = gamma_gamma::fit(&spend_data).map_err(|e| model_err(format!("Gamma-Gamma: {e}")))?;
    drop(spend_data);
    let t_gg = t.elapsed();

    let t = Instant::now();
    let p = fit.params;
    let n = rows.hist.len();
    let (weeks, discounts) = horizon(spec);
    // Per distinct history: P(alive), purchases over the horizon, their discounted sum.
    let per_history = super::par_map(&distinct, |(h, _)| {
        let (e, d) = horizon_purchases(&p, h, &weeks, &discounts);
        [bgnbd::p_alive(&p, h), e, d]
    })
    .ok_or_else(|| model_err("a prediction thread failed".into()))?;
    let mut alive = Vec::with_capacity(n);
    let mut purchases = Vec::with_capacity(n);
    let mut spend = Vec::with_capacity(n);
    let mut value = Vec::with_capacity(n);
    for ((h, m), i) in rows.hist.iter().zip(&rows.spend).zip(&index) {
        let [a, e, d] = per_history[*i as usize];
        let s = gamma_gamma::expected_spend(&gg.params, h.x, *m);
        alive.push(a);
        purchases.push(e);
        spend.push(s);
        value.push(d * s * spec.margin());
    }
    let rank = clv_ranks(&value, &rows.ids);
    let t_predict = t.elapsed();
    let values: Vec<ArrayRef> = [alive, purchases, spend, value]
        .into_iter()
        .map(|v| Arc::new(Float64Array::from(v)) as ArrayRef)
        .chain([Arc::new(Int64Array::from(rank)) as ArrayRef])
        .collect();
    let added: Vec<(Field, ArrayRef)> = prediction_fields().into_iter().zip(values).collect();
    let (schema, parts) = crate::steps::append_columns(&rows.rows, day, added)
        .map_err(|m| model_err(format!("`{}`: {m}", spec.from)))?;
    let bytes = crate::memstat::batches_bytes(parts.iter().flatten()) as usize;
    register(ctx, name, schema.clone(), parts)?;
    // The backtest's own arrays come next: what only the predictions needed goes first.
    drop((rows, distinct, index, per_history));
    crate::memstat::release();

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
        let (batches, totals) = backtest(ctx, job, name, table, run_date, &p).await?;
        report.extend(totals.into_iter().map(|(k, v)| ("backtest", k, v)));
        register(
            ctx,
            &format!("{name}_backtest"),
            backtest_schema(),
            vec![batches],
        )?;
    }
    let t_backtest = t.elapsed();
    let fit_batch = fit_batch(run_date, &report)?;
    register(
        ctx,
        &format!("{name}_fit"),
        fit_schema(),
        vec![vec![fit_batch]],
    )?;
    Ok((
        StepOutcome {
            rows: n,
            bytes,
            elapsed: started.elapsed(),
            schema,
        },
        FitTimes {
            bgnbd: t_bgnbd,
            gamma_gamma: t_gg,
            predict: t_predict,
            backtest: t_backtest,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Int64Type;
    use std::collections::HashMap;

    /// The rank equals DataFusion's `row_number() over (order by clv desc, customer_id)` on
    /// values with many ties, 0.0 and -0.0 (which Arrow orders apart), negatives and customer
    /// ids in random order.
    #[tokio::test]
    async fn clv_rank_is_row_number_by_clv_desc_then_customer_id() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Enough rows for the sort to run in chunks on several threads.
        let mut ids: Vec<i64> = (1..=120_000).map(|i| i * 7 - 5000).collect();
        ids.shuffle(&mut rng);
        let clv: Vec<f64> = ids
            .iter()
            .map(|_| match rng.random_range(0..4) {
                0 => 0.0,
                1 => -0.0,
                2 => f64::from(rng.random_range(-3..20)),
                _ => rng.random_range(-50.0..5000.0),
            })
            .collect();
        let got = clv_ranks(&clv, &ids);

        let schema = Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, false),
            Field::new("clv", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids.clone())),
                Arc::new(Float64Array::from(clv.clone())),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        register(&ctx, "clv", schema, vec![vec![batch]]).unwrap();
        let sql = "SELECT customer_id, CAST(row_number() OVER (ORDER BY clv DESC, customer_id) AS BIGINT) FROM clv";
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut want: HashMap<i64, i64> = HashMap::new();
        for b in &batches {
            let id = b.column(0).as_primitive::<Int64Type>();
            let rank = b.column(1).as_primitive::<Int64Type>();
            want.extend(
                id.values()
                    .iter()
                    .copied()
                    .zip(rank.values().iter().copied()),
            );
        }
        assert_eq!(want.len(), ids.len());
        for (id, rank) in ids.iter().zip(&got) {
            assert_eq!(Some(rank), want.get(id), "customer {id}");
        }
    }
}
