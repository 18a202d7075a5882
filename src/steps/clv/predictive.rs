//! The predictive model of the `clv` step (`bgnbd_gamma_gamma`): BG/NBD and Gamma-Gamma fitted
//! by maximum likelihood on a BTYD summary (`customer_id, x, t_x, t, mean_repeat_spend`), then,
//! per customer, P(alive), expected purchases and spend over the horizon, the discounted CLV and
//! its rank, appended to the rows of `from` (whose buffers are shared, not copied; plus
//! `run_date` when `from` has none). With `backtest` it also refits on a calibration period
//! ([`super::backtest`]).
//!
//! Units: time in weeks (input), horizon in months (a month = 365.25/12/7 weeks), money in the
//! currency of the exports. CLV = margin × E[spend] × Σ_{m=1..H} ΔE[purchases in month m] / (1+d_m)^m
//! with d_m = (1 + annual rate)^(1/12) − 1.

use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array};
use datafusion::arrow::datatypes::{DataType, Field, SchemaRef};

use super::models::special::SeriesError;
use super::models::transaction::{Model, Params, aic_bic};
use super::models::{bgnbd, gamma_gamma, par_map};
use super::rank::{PARALLEL_RANK_MAX, rank_keys, ranks_sorted};
use super::{ClvStep, backtest, register_fit};
use crate::config::steps::ClvSpec;
use crate::error::Result;
use crate::steps::rows::{Rows, appended_schema, date32};
use crate::steps::source::Source;
use crate::steps::spill::ResultWriter;
use crate::steps::{StepContext, StepOutcome, require_columns};

/// Weeks in a month.
pub const WEEKS_PER_MONTH: f64 = 365.25 / 12.0 / 7.0;

/// The columns the predictive model needs in `from`.
const BTYD_COLUMNS: [&str; 5] = ["customer_id", "x", "t_x", "t", "mean_repeat_spend"];

/// Bytes the step holds per customer while it fits and predicts (its input is read as it
/// goes, not held, once per phase): each row's history index (4) and rank (4), the distinct
/// histories with their predictions (56 when every history is distinct; a third of that on
/// the generator's data; the grouping map while they are counted), and either the
/// Gamma-Gamma pairs of the repeat buyers (16) or the rank's sort keys (24), rounded up.
const BYTES_PER_CUSTOMER: usize = 56;

/// `from` gave a different number of rows when read again (it cannot: a step result is
/// fixed once registered).
fn reread_error(from: &str, got: usize, want: usize) -> crate::error::Error {
    crate::error::Error::Internal(format!(
        "`{from}` gave {got} rows when read again, {want} the first time"
    ))
}

/// The columns the predictive model appends to its input's rows.
pub fn prediction_fields() -> Vec<Field> {
    let mut fields: Vec<Field> = ["p_alive", "expected_purchases", "expected_spend", "clv"]
        .into_iter()
        .map(|n| Field::new(n, DataType::Float64, false))
        .collect();
    fields.push(Field::new("clv_rank", DataType::Int64, false));
    fields
}

/// Adds a fitted parameter block: each value, and with standard errors its `_se` and the 95 %
/// interval `_ci_low`/`_ci_high` (Wald on the log scale, exp(ln θ ± 1.96 se/θ): inside the
/// positive range the parameters live in), then `hessian_positive_definite` (1, or 0 when the
/// observed information could not be inverted: no standard errors then).
fn push_params<const N: usize>(
    report: &mut Vec<(&'static str, String, f64)>,
    component: &'static str,
    names: &[&'static str; N],
    values: &[f64; N],
    errors: &std::result::Result<[f64; N], String>,
) {
    for i in 0..N {
        report.push((component, names[i].to_string(), values[i]));
    }
    if let Ok(se) = errors {
        for i in 0..N {
            let (name, v, e) = (names[i], values[i], se[i]);
            let half = 1.96 * e / v;
            report.extend([
                (component, format!("{name}_se"), e),
                (component, format!("{name}_ci_low"), v * (-half).exp()),
                (component, format!("{name}_ci_high"), v * half.exp()),
            ]);
        }
    }
    report.push((
        component,
        "hessian_positive_definite".to_string(),
        if errors.is_ok() { 1.0 } else { 0.0 },
    ));
}

/// For `validate`: the schemas of `<step>` (and `<step>_backtest`).
pub(super) async fn declare(
    cx: &StepContext<'_>,
    spec: &ClvSpec,
) -> std::result::Result<Vec<(String, SchemaRef)>, String> {
    let from = require_columns(
        cx.session,
        &spec.from,
        &BTYD_COLUMNS,
        "a BTYD summary such as sql/customer_features.sql has them",
    )
    .await?;
    let out = appended_schema(&from, &prediction_fields())
        .map_err(|e| format!("`{}`: {e}", spec.from))?;
    let mut tables = vec![(cx.step.name.clone(), out)];
    if let Some(b) = &spec.backtest {
        tables.push(backtest::declare(cx, b).await?);
    }
    Ok(tables)
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

/// For one history: P(alive), expected purchases over the whole horizon, and the discounted
/// sum of each month's expected purchases (CLV = margin × expected spend × that sum).
pub fn horizon_purchases(
    p: &Params,
    h: &bgnbd::History,
    weeks: &[f64],
    discounts: &[f64],
) -> std::result::Result<(f64, f64, f64), SeriesError> {
    let mut cumulative = vec![0.0; weeks.len()];
    let alive = p.predict_many(h, weeks, &mut cumulative)?;
    let (mut prev, mut value) = (0.0, 0.0);
    for (e, d) in cumulative.iter().zip(discounts) {
        value += (e - prev) * d;
        prev = *e;
    }
    Ok((alive, prev, value))
}

/// Runs the predictive model. `from` is read three times in the same order (histories for
/// BG/NBD, spend for Gamma-Gamma, then every row to append the predictions to), so the step
/// holds a few numbers per customer, never the input's rows.
pub(super) async fn run(cx: &StepContext<'_>, step: &ClvStep) -> Result<StepOutcome> {
    let spec = &step.spec;
    let day = date32(cx.run_date);
    let started = Instant::now();
    let source = Source::open(cx.session, &spec.from)
        .await
        .map_err(|e| cx.df_err(e))?;
    let n = source.rows();
    let _memory = crate::steps::evict::reserve_evicting(
        cx.session,
        format!("clv step `{}`: model buffers", cx.step.name),
        n * BYTES_PER_CUSTOMER,
        &[&spec.from],
    )
    .await
    .map_err(|e| cx.df_err(e))?;
    let column_err = |e| cx.model_err(format!("`{}`: {e}", spec.from));

    let t = Instant::now();
    // Customers with the same (x, t_x, T) have the same fit terms and purchase predictions:
    // the fit and the predictions run once per distinct history (a third of the customers on
    // the generator's data; one-time buyers collapse to one row per age).
    let mut grouper = bgnbd::HistoryGrouper::with_capacity(n / 4);
    source.each_rows(&BTYD_COLUMNS[1..4], |rows| {
        super::group_histories(rows, &mut grouper).map_err(column_err)
    })?;
    let (distinct, index) = grouper.finish();
    // `model: auto` scores the candidates on the backtest first; the chosen model is then
    // fitted on all data, from its calibration fit. A named model is fitted on all data first
    // and its backtest starts from that fit.
    let (fit, backtest_report, t_backtest) = match step.transaction_model() {
        Some(model) => {
            let fit = model
                .fit(&distinct, None)
                .map_err(|e| cx.model_err(format!("{}: {e}", model.title())))?;
            (fit, None, std::time::Duration::ZERO)
        }
        None => {
            let table = spec
                .backtest
                .as_deref()
                .ok_or_else(|| cx.model_err("`model: auto` needs `backtest`".to_string()))?;
            let tb = Instant::now();
            let candidates: Vec<_> = Model::ALL.iter().map(|m| (*m, None)).collect();
            let outcome = backtest::run(cx, table, &spec.from, &candidates).await?;
            let model = outcome.calibration.params.model();
            let t_backtest = tb.elapsed();
            let fit = model
                .fit(&distinct, Some(&outcome.calibration.params))
                .map_err(|e| {
                    cx.model_err(format!("{} (chosen by model: auto): {e}", model.title()))
                })?;
            (fit, Some(outcome.report), t_backtest)
        }
    };
    let model = fit.params.model();
    let std_errors = fit.params.standard_errors(&distinct);
    let t_bgnbd = t.elapsed() - t_backtest;
    let t = Instant::now();
    let x_of = |i: usize| distinct[index[i] as usize].0.x;
    // Gamma-Gamma fits on the repeat buyers only (it ignores the others); no repeat purchase,
    // no mean repeat spend.
    let mut spend_data: Vec<(f64, f64)> = Vec::new();
    let mut offset = 0;
    source.each_rows(&BTYD_COLUMNS[4..], |rows| {
        let spend = rows
            .floats("mean_repeat_spend", Some(0.0))
            .map_err(column_err)?;
        if offset + spend.len() > n {
            return Err(reread_error(&spec.from, offset + spend.len(), n));
        }
        for (i, m) in (offset..).zip(spend) {
            if gamma_gamma::used(x_of(i), m) {
                spend_data.push((x_of(i), m));
            }
        }
        offset += rows.len();
        Ok(())
    })?;
    let gg =
        gamma_gamma::fit(&spend_data).map_err(|e| cx.model_err(format!("Gamma-Gamma: {e}")))?;
    let gg_errors = gamma_gamma::standard_errors(&gg.params, &spend_data);
    drop(spend_data);
    let t_gg = t.elapsed();

    let t = Instant::now();
    let p = fit.params;
    let (weeks, discounts) = horizon(spec);
    // Per distinct history: P(alive), purchases over the horizon, their discounted sum.
    let per_history = par_map(&distinct, |(h, _)| {
        horizon_purchases(&p, h, &weeks, &discounts).map(|(alive, e, d)| [alive, e, d])
    })
    .ok_or_else(|| cx.model_err("a prediction thread failed"))?
    .into_iter()
    .zip(&distinct)
    .map(|(r, (h, _))| {
        r.map_err(|e| {
            cx.model_err(format!(
                "expected purchases of a customer with x = {}, t_x = {}, T = {} (weeks): {e}",
                h.x, h.t_x, h.t
            ))
        })
    })
    .collect::<Result<Vec<[f64; 3]>>>()?;
    let margin = step.margin();
    // Row i's expected spend and CLV, from its mean repeat spend.
    let predict = |i: usize, m: f64| {
        let s = gamma_gamma::expected_spend(&gg.params, x_of(i), m);
        (s, per_history[index[i] as usize][2] * s * margin)
    };
    // The rank's keys hold each CLV (and the id), so neither is kept beside them.
    let mut keys: Vec<(u64, i64, u32)> = Vec::with_capacity(n);
    let mut offset = 0;
    source.each_rows(&[BTYD_COLUMNS[0], BTYD_COLUMNS[4]], |rows| {
        let ids = rows.integers("customer_id").map_err(column_err)?;
        let spend = rows
            .floats("mean_repeat_spend", Some(0.0))
            .map_err(column_err)?;
        if offset + ids.len() > n {
            return Err(reread_error(&spec.from, offset + ids.len(), n));
        }
        let value: Vec<f64> = (offset..)
            .zip(&spend)
            .map(|(i, m)| predict(i, *m).1)
            .collect();
        keys.extend(
            rank_keys(&value, ids)
                .into_iter()
                .map(|(k, id, i)| (k, id, i + offset as u32)),
        );
        offset += spend.len();
        Ok(())
    })?;
    let rank = ranks_sorted(keys, PARALLEL_RANK_MAX);
    let t_predict = t.elapsed();

    // Every row of `from` with its predictions, in the order read above.
    let schema = appended_schema(source.schema(), &prediction_fields())
        .map_err(|e| cx.model_err(format!("`{}`: {e}", spec.from)))?;
    let mut writer = ResultWriter::appending(cx, &source, schema)?;
    // When only the predictions are written, the spend is all this pass reads.
    let read = writer.appends().then_some(&["mean_repeat_spend"][..]);
    let mut offset = 0;
    source.scan(read, |part, b| {
        let m = b.num_rows();
        if offset + m > n {
            return Err(reread_error(&spec.from, offset + m, n));
        }
        let rows = offset..offset + m;
        let f = |g: &dyn Fn(usize) -> f64| {
            Arc::new(Float64Array::from_iter_values(rows.clone().map(g))) as ArrayRef
        };
        let batch_rows = Rows {
            schema: b.schema(),
            parts: vec![vec![b.clone()]],
        };
        let spend = batch_rows
            .floats("mean_repeat_spend", Some(0.0))
            .map_err(column_err)?;
        let predicted: Vec<(f64, f64)> = rows
            .clone()
            .zip(&spend)
            .map(|(i, m)| predict(i, *m))
            .collect();
        let added = vec![
            f(&|i| per_history[index[i] as usize][0]),
            f(&|i| per_history[index[i] as usize][1]),
            f(&|i| predicted[i - offset].0),
            f(&|i| predicted[i - offset].1),
            Arc::new(Int64Array::from_iter_values(
                rank[rows.clone()].iter().map(|r| i64::from(*r)),
            )) as ArrayRef,
        ];
        offset += m;
        writer.push_appended(part, &b, day, added)
    })?;
    if offset != n {
        return Err(reread_error(&spec.from, offset, n));
    }
    let kept = writer.finish().await?;
    // The backtest's own arrays come next: what only the predictions needed goes first.
    drop((rank, index, distinct, per_history, _memory));
    crate::engine::memory::release();

    let name = model.name();
    let mut report: Vec<(&'static str, String, f64)> = Vec::new();
    let values = p.values();
    let (aic, bic) = aic_bic(fit.log_likelihood, fit.customers);
    push_params(
        &mut report,
        name,
        &model.param_names(),
        &values,
        &std_errors,
    );
    let rows = |c: &'static str, rows: &[(&str, f64)]| -> Vec<(&'static str, String, f64)> {
        rows.iter().map(|(n, v)| (c, n.to_string(), *v)).collect()
    };
    report.extend(rows(
        name,
        &[
            ("log_likelihood", fit.log_likelihood),
            ("aic", aic),
            ("bic", bic),
            ("iterations", fit.iterations as f64),
            ("customers", fit.customers as f64),
        ],
    ));
    let gg_values = [gg.params.p, gg.params.q, gg.params.gamma];
    push_params(
        &mut report,
        "gamma_gamma",
        &["p", "q", "gamma"],
        &gg_values,
        &gg_errors,
    );
    report.extend(rows(
        "gamma_gamma",
        &[
            ("log_likelihood", gg.log_likelihood),
            ("iterations", gg.iterations as f64),
            ("customers", gg.customers as f64),
        ],
    ));
    for (component, e) in [
        (name, std_errors.as_ref().err()),
        ("gamma_gamma", gg_errors.as_ref().err()),
    ] {
        if let Some(e) = e {
            tracing::warn!(job = %cx.job, step = %cx.step.name, model = component, why = %e,
                "no standard errors for the fitted parameters");
        }
    }
    let t = Instant::now();
    match (backtest_report, &spec.backtest) {
        (Some(done), _) => report.extend(done.into_iter().map(|(c, n, v)| (c, n.to_string(), v))),
        (None, Some(table)) => {
            let outcome = backtest::run(cx, table, &spec.from, &[(model, Some(p))]).await?;
            report.extend(
                outcome
                    .report
                    .into_iter()
                    .map(|(c, n, v)| (c, n.to_string(), v)),
            );
        }
        (None, None) => {}
    }
    let t_backtest = t_backtest + t.elapsed();
    register_fit(cx, &report)?;
    Ok(StepOutcome {
        rows: n,
        bytes: kept.held,
        spilled: kept.spilled,
        elapsed: started.elapsed(),
        timings: vec![
            ("transaction_model_ms", t_bgnbd),
            ("gamma_gamma_ms", t_gg),
            ("predict_ms", t_predict),
            ("backtest_ms", t_backtest),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::RecordBatch;
    use datafusion::arrow::datatypes::Schema;

    /// The step's buffers come from the engine's memory pool: under a limit far too small the
    /// step fails at once, naming itself, instead of allocating past `memory_limit`.
    #[tokio::test]
    async fn model_buffers_are_taken_from_the_memory_pool() {
        use crate::engine::{Engine, EngineConfig, LocalEngine};
        let config = EngineConfig::Local(LocalEngine {
            target_partitions: Some(2),
            memory_limit: Some(1 << 20),
            result_memory: None,
            split_above: None,
            memory_pool: crate::config::project::MemoryPoolKind::Greedy,
            spill_dir: None,
            batch_size: None,
            settings: Default::default(),
            transparent_huge_pages: false,
        });
        let engine = Engine::new(&config, &crate::storage::Stores::default()).unwrap();
        let ctx = engine.session().unwrap();
        let n = 20_000;
        let f = |name: &str| Field::new(name, DataType::Float64, false);
        let schema = Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, false),
            f("x"),
            f("t_x"),
            f("t"),
            f("mean_repeat_spend"),
        ]));
        let x: Vec<f64> = (0..n).map(|i| (i % 5) as f64).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
                Arc::new(Float64Array::from(x.clone())),
                Arc::new(Float64Array::from_iter_values(x.iter().map(|x| x * 5.0))),
                Arc::new(Float64Array::from(vec![30.0; n])),
                Arc::new(Float64Array::from_iter_values(x.iter().map(|x| x * 10.0))),
            ],
        )
        .unwrap();
        crate::steps::rows::register(&ctx, "summary", schema, vec![vec![batch]]).unwrap();
        // The step result held in memory is counted in the pool too (5 columns x 20,000 rows).
        let held = ctx.runtime_env().memory_pool.reserved();
        assert_eq!(held, 5 * 8 * 20_000);
        let spec: crate::config::steps::ClvSpec =
            serde_json::from_str(r#"{"from": "summary", "margin": 0.3}"#).unwrap();
        let step = crate::steps::Step {
            name: "m".into(),
            field: "steps[0]".into(),
            settings: Default::default(),
            split_by: None,
            split_result: Default::default(),
            kind: crate::steps::StepKind::Clv(ClvStep { spec }),
        };
        let vars = Default::default();
        let cx = StepContext {
            session: &ctx,
            job: "j",
            step: &step,
            run_date: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            vars: &vars,
            keep: None,
            split: None,
        };
        let err = step.kind.run(&cx).await.unwrap_err();
        let text = crate::error::chain(&err);
        assert!(
            text.contains("clv step `m`: model buffers") && text.contains("Resources exhausted"),
            "{text}"
        );
        assert_eq!(
            ctx.runtime_env().memory_pool.reserved(),
            held,
            "the model buffers are released on failure"
        );
        ctx.deregister_table("summary").unwrap();
        assert_eq!(
            ctx.runtime_env().memory_pool.reserved(),
            0,
            "and the result when dropped"
        );
    }
}
