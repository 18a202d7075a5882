//! The calibration/holdout backtest of the predictive CLV model: BG/NBD refitted on what was
//! known at a cut-off (`x`, `t_x`, `t` of the calibration period, e.g. `sql/btyd_backtest.sql`)
//! predicts each customer's purchases in the holdout weeks after it; `<step>_backtest` holds
//! predicted against actual per customer, and the fit report the totals and errors.

use std::sync::Arc;

use datafusion::arrow::array::{Date32Array, Float64Array, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::models::{ExactSum, bgnbd, par_map};
use crate::error::{Error, Result};
use crate::steps::rows::{ColumnError, date32};
use crate::steps::source::Source;
use crate::steps::spill::ResultWriter;
use crate::steps::{StepContext, require_columns};

/// The columns the backtest reads.
const COLUMNS: [&str; 6] = ["customer_id", "x", "t_x", "t", "x_holdout", "holdout_weeks"];

/// Bytes held per customer (the input is read as it goes, not held): each row's history index
/// (4) and the grouping map with the distinct histories (up to 40 when every history is
/// distinct), rounded up.
const BYTES_PER_CUSTOMER: usize = 48;

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
/// the holdout, registers `<step>_backtest` and returns the totals for the fit report. `from`
/// is the step's own input, read at the same time.
pub(super) async fn run(
    cx: &StepContext<'_>,
    table: &str,
    from: &str,
    start: &bgnbd::Params,
) -> Result<Vec<(&'static str, f64)>> {
    let model_err = |message: String| cx.model_err(message);
    let source = Source::open(cx.session, table)
        .await
        .map_err(|e| cx.df_err(e))?;
    let n = source.rows();
    let _memory = crate::steps::evict::reserve_evicting(
        cx.session,
        format!("clv step `{}`: backtest buffers", cx.step.name),
        n * BYTES_PER_CUSTOMER,
        &[table, from],
    )
    .await
    .map_err(|e| cx.df_err(e))?;
    let column_err = |e: ColumnError| match e {
        ColumnError::Nulls(_) => model_err(format!(
            "backtest table `{table}` has a row with a NULL customer_id, x, t_x, t, x_holdout or holdout_weeks"
        )),
        e => model_err(format!("backtest table `{table}`: {e}")),
    };
    // The table is read twice in the same order: the calibration histories to fit, then every
    // row to predict and compare.
    let mut grouper = bgnbd::HistoryGrouper::with_capacity(n / 4);
    let mut first_weeks = None;
    let mut one_length = true;
    source.each_rows(&COLUMNS, |rows| {
        rows.integers("customer_id").map_err(column_err)?;
        rows.floats("x_holdout", None).map_err(column_err)?;
        for w in rows.floats("holdout_weeks", None).map_err(column_err)? {
            let first = *first_weeks.get_or_insert(w);
            one_length &= w.to_bits() == first.to_bits();
        }
        super::group_histories(rows, &mut grouper).map_err(column_err)
    })?;
    let (distinct, index) = grouper.finish();
    // Started from the full-history fit: the calibration optimum is close to it.
    let fit = bgnbd::fit_from(&distinct, Some(start)).map_err(|e| {
        model_err(format!(
            "backtest (calibration period of `{table}`): BG/NBD: {e}"
        ))
    })?;
    let p = fit.params;
    // The usual case: one holdout length, so one prediction per distinct history.
    let per_history: Option<Vec<f64>> = match (one_length, first_weeks) {
        (true, Some(w)) => Some(
            par_map(&distinct, |(h, _)| bgnbd::expected_purchases(&p, h, w))
                .ok_or_else(|| model_err("a prediction thread failed".into()))?
                .into_iter()
                .collect::<std::result::Result<Vec<f64>, _>>()
                .map_err(|e| model_err(format!("backtest prediction: {e}")))?,
        ),
        _ => None,
    };
    drop(distinct);
    let day = date32(cx.run_date);
    // Exact sums: the rows come in an order that changes from run to run.
    let (mut actual_total, mut predicted_total, mut abs_error, mut square_error) = (
        ExactSum::default(),
        ExactSum::default(),
        ExactSum::default(),
        ExactSum::default(),
    );
    let mut holdout = 0.0_f64;
    let mut writer = ResultWriter::new(cx.session, &format!("{}_backtest", cx.step.name), schema());
    let mut offset = 0;
    source.each_rows(&COLUMNS, |rows| {
        let ids = rows.integers("customer_id").map_err(column_err)?;
        let x = rows.floats("x", None).map_err(column_err)?;
        let t_x = rows.floats("t_x", None).map_err(column_err)?;
        let t = rows.floats("t", None).map_err(column_err)?;
        let actual = rows.floats("x_holdout", None).map_err(column_err)?;
        let weeks = rows.floats("holdout_weeks", None).map_err(column_err)?;
        let m = ids.len();
        let predicted: Vec<f64> = match &per_history {
            Some(per) => index
                .get(offset..offset + m)
                .ok_or_else(|| {
                    Error::Internal(format!("`{table}` gave more rows when read again"))
                })?
                .iter()
                .map(|i| per[*i as usize])
                .collect(),
            None => (0..m)
                .map(|i| {
                    let h = bgnbd::History {
                        x: x[i],
                        t_x: t_x[i],
                        t: t[i],
                    };
                    bgnbd::expected_purchases(&p, &h, weeks[i])
                })
                .collect::<std::result::Result<Vec<f64>, _>>()
                .map_err(|e| model_err(format!("backtest prediction: {e}")))?,
        };
        offset += m;
        let error: Vec<f64> = predicted.iter().zip(&actual).map(|(p, a)| p - a).collect();
        actual.iter().for_each(|v| actual_total.add(*v));
        predicted.iter().for_each(|v| predicted_total.add(*v));
        error.iter().for_each(|e| {
            abs_error.add(e.abs());
            square_error.add(e * e);
        });
        holdout = weeks.iter().copied().fold(holdout, f64::max);
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Date32Array::from(vec![day; m])),
                Arc::new(Int64Array::from(ids)),
                Arc::new(Float64Array::from(x)),
                Arc::new(Float64Array::from(t)),
                Arc::new(Float64Array::from(weeks)),
                Arc::new(Float64Array::from(actual)),
                Arc::new(Float64Array::from(predicted)),
                Arc::new(Float64Array::from(error)),
            ],
        )
        .map_err(|e| Error::arrow("build the backtest table", e))?;
        writer.push(0, batch)
    })?;
    if offset != n {
        return Err(Error::Internal(format!(
            "`{table}` gave {offset} rows when read again, {n} the first time"
        )));
    }
    writer.finish().await?;
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
    Ok(totals)
}
