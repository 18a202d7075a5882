//! Each model against values worked out by hand from its definition.
use std::sync::Arc;

use datafusion::arrow::array::{
    AsArray, Float64Array, Int64Array, RecordBatch, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, TimeUnit};
use datafusion::prelude::SessionContext;

use crate::config::steps::{ClvModel, ClvSpec};
use crate::steps::clv::ClvStep;
use crate::steps::clv::rules::YEAR_SECONDS;

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
    crate::steps::rows::register(&ctx, "orders", schema, vec![vec![batch]]).unwrap();
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
    crate::steps::rows::register(&ctx, "costs", schema, vec![vec![batch]]).unwrap();
    ctx
}

/// Runs the model as step `m` of job `j`.
async fn run_step(ctx: &SessionContext, spec: &ClvSpec) -> crate::error::Result<()> {
    let step = crate::steps::Step {
        name: "m".into(),
        field: "steps[0]".into(),
        settings: Default::default(),
        split_by: None,
        split_result: Default::default(),
        kind: crate::steps::StepKind::Clv(ClvStep { spec: spec.clone() }),
    };
    let vars = Default::default();
    let cx = crate::steps::StepContext {
        session: ctx,
        job: "j",
        step: &step,
        run_date: date(),
        vars: &vars,
        keep: None,
        split: None,
    };
    step.kind.run(&cx).await.map(|_| ())
}

/// (customer_id, clv) of the step's result, by id; and the fit report as (name, value).
async fn run(ctx: &SessionContext, spec: &ClvSpec) -> (Vec<(i64, f64)>, Vec<(String, f64)>) {
    run_step(ctx, spec).await.unwrap();
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
    let err = run_step(&short, &s).await.unwrap_err().to_string();
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
/// (customer_id, orders, revenue, years_counted, clv) of a discounted result.
type Row = (i64, i64, f64, i64, f64);

fn per_customer(batches: &[RecordBatch], cols: [usize; 5]) -> Vec<Row> {
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
/// do not depend on how many threads share the customers, for dense ids (1..700: the direct
/// layout) and for the same customers under sparse ids (the hashed layout).
#[tokio::test]
async fn rust_passes_equal_the_sql_formulation_on_random_orders() {
    equal_the_sql_formulation(|c| c, true).await;
    equal_the_sql_formulation(|c| c * 1_000_000_007 - 4_000_000_000_000, false).await;
}

async fn equal_the_sql_formulation(id: fn(i64) -> i64, dense: bool) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let orders: Vec<(i64, f64, f64)> = (0..5000)
        .map(|_| {
            (
                id(rng.random_range(1..700)),
                rng.random_range(0.0..1500.0),
                rng.random_range(-20.0..400.0),
            )
        })
        .collect();
    // Costs also of customers without orders, outside the orders' ids (below and above).
    let costs: Vec<(i64, f64)> = (1..500)
        .chain([-3, 0, 5000, 90_000])
        .map(|c| (id(c), f64::from(c.rem_euclid(50) as u32)))
        .collect();
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
    let layout = super::Layout::of(&o, 1).unwrap();
    assert_eq!(
        matches!(layout, super::Layout::Dense { .. }),
        dense,
        "{layout:?}"
    );
    // Dense: blocks of 8 customers as well as the shipped size (one block here); every split
    // gives the same bits (the sums are exact, so the order rows are taken in does not matter).
    let shipped = super::passes::BUCKET_SHIFT;
    let mut first: Option<Vec<Row>> = None;
    let bits = |r: &[Row]| {
        r.iter()
            .map(|r| (r.0, r.1, r.2.to_bits(), r.3, r.4.to_bits()))
            .collect::<Vec<_>>()
    };
    for (shards, shift) in [(1, shipped), (3, shipped), (7, shipped), (1, 3), (3, 3)] {
        let split = super::Split {
            shards,
            batch_size: 100,
            stride: 1,
        };
        let got = super::compute_in_blocks(&s, 0.3, run_date, (&o, &k), split, shift).unwrap();
        assert_eq!(got.parts.len(), shards);
        assert!(got.parts.iter().flatten().all(|b| b.num_rows() <= 100));
        let batches: Vec<RecordBatch> = got.parts.into_iter().flatten().collect();
        // run_date, customer_id, orders, revenue, years_counted, ..., clv
        let mut rows = per_customer(&batches, [1, 2, 3, 4, 7]);
        rows.sort_by_key(|r| r.0);
        assert_eq!(rows.len(), expected.len(), "shards {shards}, {layout:?}");
        for (g, w) in rows.iter().zip(&expected) {
            assert_eq!(
                (g.0, g.1, g.3),
                (w.0, w.1, w.3),
                "shards {shards}, {layout:?}"
            );
            assert!(
                close(g.2, w.2) && close(g.4, w.4),
                "shards {shards}, {layout:?}: {g:?} vs {w:?}"
            );
        }
        match &first {
            None => first = Some(rows),
            Some(f) => assert_eq!(bits(&rows), bits(f), "shards {shards}, blocks of 2^{shift}"),
        }
    }
    // In buckets by id modulo (the step's way under a small limit): the same bits, and a dense
    // id range stays dense within each bucket (every third id).
    let buckets = 3;
    let mut bucketed = Vec::new();
    for b in 0..buckets {
        let f = super::bucket_filter(b, buckets);
        let o = read(format!("{}{f}", super::orders_sql(&s, run_date))).await;
        let k = read(format!("{}{f}", super::costs_sql("costs"))).await;
        let layout = super::Layout::of(&o, buckets as u64).unwrap();
        assert_eq!(
            matches!(layout, super::Layout::Dense { stride: 3, .. }),
            dense,
            "{layout:?}"
        );
        let split = super::Split {
            shards: 2,
            batch_size: 100,
            stride: buckets as u64,
        };
        let got = super::compute_in_blocks(&s, 0.3, run_date, (&o, &k), split, 3).unwrap();
        let batches: Vec<RecordBatch> = got.parts.into_iter().flatten().collect();
        bucketed.extend(per_customer(&batches, [1, 2, 3, 4, 7]));
    }
    bucketed.sort_by_key(|r| r.0);
    assert_eq!(bits(&bucketed), bits(first.as_deref().unwrap_or_default()));
}
