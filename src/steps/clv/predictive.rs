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
use super::models::{bgnbd, gamma_gamma, par_map};
use super::{ClvStep, backtest, register_fit};
use crate::config::steps::ClvSpec;
use crate::error::Result;
use crate::steps::rows::{Rows, append_columns, appended_schema, date32, register};
use crate::steps::{StepContext, StepOutcome, require_columns};

/// Weeks in a month.
pub const WEEKS_PER_MONTH: f64 = 365.25 / 12.0 / 7.0;

/// The columns the predictive model needs in `from`.
const BTYD_COLUMNS: [&str; 5] = ["customer_id", "x", "t_x", "t", "mean_repeat_spend"];

/// Bytes the step holds per customer while it fits and predicts, besides `from`'s rows: the
/// ids and histories (40), the grouping and per-history predictions (60 when every history is
/// distinct), five result columns (40) and the sort keys of the rank (32), rounded up.
const BYTES_PER_CUSTOMER: usize = 176;

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

/// The model's inputs, row by row in the order of `from`'s batches.
struct Inputs {
    rows: Rows,
    /// `customer_id`, for ties in the CLV rank.
    ids: Vec<i64>,
    hist: Vec<bgnbd::History>,
    spend: Vec<f64>,
}

fn inputs(cx: &StepContext<'_>, spec: &ClvSpec, rows: Rows) -> Result<Inputs> {
    let column_err = |e| cx.model_err(format!("`{}`: {e}", spec.from));
    let ids = rows.integers("customer_id").map_err(column_err)?;
    let x = rows.floats("x", None).map_err(column_err)?;
    let t_x = rows.floats("t_x", None).map_err(column_err)?;
    let t = rows.floats("t", None).map_err(column_err)?;
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
        .map_err(column_err)?;
    Ok(Inputs {
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
) -> std::result::Result<(f64, f64), SeriesError> {
    let mut cumulative = vec![0.0; weeks.len()];
    bgnbd::expected_purchases_many(p, h, weeks, &mut cumulative)?;
    let (mut prev, mut value) = (0.0, 0.0);
    for (e, d) in cumulative.iter().zip(discounts) {
        value += (e - prev) * d;
        prev = *e;
    }
    Ok((prev, value))
}

/// Runs the predictive model.
pub(super) async fn run(cx: &StepContext<'_>, step: &ClvStep) -> Result<StepOutcome> {
    let spec = &step.spec;
    let day = date32(cx.run_date);
    let started = Instant::now();
    let rows = Rows::read(cx.session, &spec.from)
        .await
        .map_err(|e| cx.df_err(e))?;
    let n = rows.len();
    let _memory = crate::engine::memory::reserve(
        cx.session,
        format!("clv step `{}`: model buffers", cx.step.name),
        n * BYTES_PER_CUSTOMER,
    )
    .map_err(|e| cx.df_err(e))?;
    let data = inputs(cx, spec, rows)?;

    let t = Instant::now();
    // Customers with the same (x, t_x, T) have the same fit terms and purchase predictions:
    // the fit and the predictions run once per distinct history (a third of the customers on
    // the generator's data; one-time buyers collapse to one row per age).
    let (distinct, index) = bgnbd::compress_indexed(&data.hist);
    let fit = bgnbd::fit(&distinct).map_err(|e| cx.model_err(format!("BG/NBD: {e}")))?;
    let t_bgnbd = t.elapsed();
    let t = Instant::now();
    let spend_data: Vec<(f64, f64)> = data
        .hist
        .iter()
        .zip(&data.spend)
        .map(|(h, m)| (h.x, *m))
        .collect();
    let gg =
        gamma_gamma::fit(&spend_data).map_err(|e| cx.model_err(format!("Gamma-Gamma: {e}")))?;
    drop(spend_data);
    let t_gg = t.elapsed();

    let t = Instant::now();
    let p = fit.params;
    let (weeks, discounts) = horizon(spec);
    // Per distinct history: P(alive), purchases over the horizon, their discounted sum.
    let per_history = par_map(&distinct, |(h, _)| {
        horizon_purchases(&p, h, &weeks, &discounts).map(|(e, d)| [bgnbd::p_alive(&p, h), e, d])
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
    let mut alive = Vec::with_capacity(n);
    let mut purchases = Vec::with_capacity(n);
    let mut spend = Vec::with_capacity(n);
    let mut value = Vec::with_capacity(n);
    let margin = step.margin();
    for ((h, m), i) in data.hist.iter().zip(&data.spend).zip(&index) {
        let [a, e, d] = per_history[*i as usize];
        let s = gamma_gamma::expected_spend(&gg.params, h.x, *m);
        alive.push(a);
        purchases.push(e);
        spend.push(s);
        value.push(d * s * margin);
    }
    let rank = clv_ranks(&value, &data.ids);
    let t_predict = t.elapsed();
    let values: Vec<ArrayRef> = [alive, purchases, spend, value]
        .into_iter()
        .map(|v| Arc::new(Float64Array::from(v)) as ArrayRef)
        .chain([Arc::new(Int64Array::from(rank)) as ArrayRef])
        .collect();
    let added: Vec<(Field, ArrayRef)> = prediction_fields().into_iter().zip(values).collect();
    let (schema, parts) = append_columns(&data.rows, day, added)?;
    let bytes = register(cx.session, &cx.step.name, schema, parts)?;
    // The backtest's own arrays come next: what only the predictions needed goes first.
    drop((data, distinct, index, per_history, _memory));
    crate::engine::memory::release();

    let mut report: Vec<(&str, &str, f64)> = vec![
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
    let t = Instant::now();
    if let Some(table) = &spec.backtest {
        let totals = backtest::run(cx, table, &p).await?;
        report.extend(totals.into_iter().map(|(k, v)| ("backtest", k, v)));
    }
    let t_backtest = t.elapsed();
    register_fit(cx, &report)?;
    Ok(StepOutcome {
        rows: n,
        bytes,
        elapsed: started.elapsed(),
        timings: vec![
            ("bgnbd_ms", t_bgnbd),
            ("gamma_gamma_ms", t_gg),
            ("predict_ms", t_predict),
            ("backtest_ms", t_backtest),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{AsArray, RecordBatch};
    use datafusion::arrow::datatypes::{Int64Type, Schema};
    use datafusion::prelude::SessionContext;
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
        crate::steps::rows::register(&ctx, "clv", schema, vec![vec![batch]]).unwrap();
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

    /// The step's buffers come from the engine's memory pool: under a limit far too small the
    /// step fails at once, naming itself, instead of allocating past `memory_limit`.
    #[tokio::test]
    async fn model_buffers_are_taken_from_the_memory_pool() {
        use crate::engine::{Engine, EngineConfig, LocalEngine};
        let config = EngineConfig::Local(LocalEngine {
            target_partitions: Some(2),
            memory_limit: Some(1 << 20),
            memory_pool: crate::config::project::MemoryPoolKind::Greedy,
            spill_dir: None,
            batch_size: None,
            settings: Default::default(),
            transparent_huge_pages: false,
        });
        let engine = Engine::new(&config, &crate::storage::Stores::default()).unwrap();
        let ctx = engine.session();
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
            kind: crate::steps::StepKind::Clv(ClvStep { spec }),
        };
        let vars = Default::default();
        let cx = StepContext {
            session: &ctx,
            job: "j",
            step: &step,
            run_date: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            vars: &vars,
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
