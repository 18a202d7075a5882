//! The calibration/holdout backtest of the predictive CLV model: BG/NBD refitted on what was
//! known at a cut-off (`x`, `t_x`, `t` of the calibration period, e.g. `sql/btyd_backtest.sql`)
//! predicts each customer's purchases in the holdout weeks after it; `<step>_backtest` holds
//! predicted against actual per customer, and the fit report the totals and errors.

use std::sync::Arc;

use datafusion::arrow::array::{AsArray, Date32Array, Float64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};

use super::collect;
use super::models::{ExactSum, bgnbd, par_map};
use crate::error::{Error, Result};
use crate::steps::rows::{date32, register};
use crate::steps::{StepContext, require_columns};

/// The columns the backtest reads.
const COLUMNS: [&str; 6] = ["customer_id", "x", "t_x", "t", "x_holdout", "holdout_weeks"];

/// Bytes held per customer: the six input columns are reused; histories (24), grouping (36),
/// predictions and errors (16), rounded up.
const BYTES_PER_CUSTOMER: usize = 80;

/// The per-customer table `<step>_backtest`.
pub fn schema() -> SchemaRef {
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

/// For `validate`: checks `table` has the columns; the schema of `<step>_backtest`.
pub(super) async fn declare(
    cx: &StepContext<'_>,
    table: &str,
) -> std::result::Result<(String, SchemaRef), String> {
    require_columns(
        cx.session,
        table,
        &COLUMNS,
        "a calibration/holdout summary such as sql/btyd_backtest.sql has them",
    )
    .await?;
    Ok((format!("{}_backtest", cx.step.name), schema()))
}

/// Refits BG/NBD on the calibration columns of `table`, predicts each customer's purchases in
/// the holdout, registers `<step>_backtest` and returns the totals for the fit report.
pub(super) async fn run(
    cx: &StepContext<'_>,
    table: &str,
    start: &bgnbd::Params,
) -> Result<Vec<(&'static str, f64)>> {
    let model_err = |message: String| cx.model_err(message);
    let sql = format!(
        "SELECT CAST(customer_id AS BIGINT), CAST(x AS DOUBLE), CAST(t_x AS DOUBLE), CAST(t AS DOUBLE), CAST(x_holdout AS DOUBLE), CAST(holdout_weeks AS DOUBLE) FROM {}",
        crate::engine::quote_ident(table)
    );
    let batches = collect(cx, &sql).await?;
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
    let _memory = crate::engine::memory::reserve(
        cx.session,
        format!("clv step `{}`: backtest buffers", cx.step.name),
        n * BYTES_PER_CUSTOMER,
    )
    .map_err(|e| cx.df_err(e))?;
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
            let per = par_map(&distinct, |(h, _)| bgnbd::expected_purchases(&p, h, w))
                .ok_or_else(|| model_err("a prediction thread failed".into()))?
                .into_iter()
                .collect::<std::result::Result<Vec<f64>, _>>()
                .map_err(|e| model_err(format!("backtest prediction: {e}")))?;
            index.iter().map(|i| per[*i as usize]).collect()
        }
        _ => hist
            .iter()
            .zip(weeks())
            .map(|(h, w)| bgnbd::expected_purchases(&p, h, w))
            .collect::<std::result::Result<Vec<f64>, _>>()
            .map_err(|e| model_err(format!("backtest prediction: {e}")))?,
    };
    drop((hist, distinct, index));
    let day = date32(cx.run_date);
    // Exact sums: the rows come in an order that changes from run to run.
    let (mut actual_total, mut predicted_total, mut abs_error, mut square_error) = (
        ExactSum::default(),
        ExactSum::default(),
        ExactSum::default(),
        ExactSum::default(),
    );
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
        actual.values().iter().for_each(|v| actual_total.add(*v));
        predicted.iter().for_each(|v| predicted_total.add(*v));
        error.iter().for_each(|e| {
            abs_error.add(e.abs());
            square_error.add(e * e);
        });
        holdout = weeks.values().iter().copied().fold(holdout, f64::max);
        let batch = RecordBatch::try_new(
            schema(),
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
        .map_err(|e| Error::arrow("build the backtest table", e))?;
        out.push(batch);
    }
    let (actual_total, predicted_total) = (actual_total.value(), predicted_total.value());
    let mae = abs_error.value() / n.max(1) as f64;
    let rmse = (square_error.value() / n.max(1) as f64).sqrt();
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
    register(
        cx.session,
        &format!("{}_backtest", cx.step.name),
        schema(),
        vec![out],
    )?;
    Ok(totals)
}
