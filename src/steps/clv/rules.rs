//! The rule-based CLV models of the `clv` step, computed by DataFusion from an order table
//! (`customer_id`, `order_ts`, `net_amount`; e.g. `sql/orders_clean.sql`). Time: a year is 365.25
//! days; orders at or after the run date are ignored. Money: the currency of the exports.
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

use crate::config::{ClvModel, ClvSpec};

/// Seconds in a year of 365.25 days.
pub const YEAR_SECONDS: f64 = 31_557_600.0;

/// Required columns of `from` for the rule-based models.
pub const ORDER_COLUMNS: [&str; 3] = ["customer_id", "order_ts", "net_amount"];

fn lit(v: f64) -> String {
    format!("CAST({v:?} AS DOUBLE)")
}

fn quote(table: &str) -> String {
    format!("\"{}\"", table.replace('"', "\"\""))
}

/// The run date's epoch seconds and the `orders` CTE every model starts from.
fn orders_cte(spec: &ClvSpec, run_date: chrono::NaiveDate) -> String {
    format!(
        "o AS (SELECT CAST(customer_id AS BIGINT) AS customer_id, date_part('epoch', order_ts) AS e, \
         CAST(net_amount AS DOUBLE) AS amount FROM {} \
         WHERE customer_id IS NOT NULL AND date_part('epoch', order_ts) < date_part('epoch', TIMESTAMP '{run_date} 00:00:00'))",
        quote(&spec.from)
    )
}

/// The query that estimates the yearly retention rate from the history: one row, one column
/// (`retention_rate`, NULL when nobody ordered in the year before last), plus the base count.
pub fn retention_sql(spec: &ClvSpec, run_date: chrono::NaiveDate) -> String {
    format!(
        "WITH {orders}, \
         b AS (SELECT date_part('epoch', TIMESTAMP '{run_date} 00:00:00') AS now_e), \
         c AS (SELECT o.customer_id, \
                 MAX(CASE WHEN o.e >= b.now_e - 2 * {y} AND o.e < b.now_e - {y} THEN 1 ELSE 0 END) AS before_last, \
                 MAX(CASE WHEN o.e >= b.now_e - {y} THEN 1 ELSE 0 END) AS last \
               FROM o CROSS JOIN b GROUP BY o.customer_id) \
         SELECT CAST(SUM(before_last * last) AS DOUBLE) / CAST(NULLIF(SUM(before_last), 0) AS DOUBLE) AS retention_rate, \
                CAST(SUM(before_last) AS BIGINT) AS base FROM c",
        orders = orders_cte(spec, run_date),
        y = lit(YEAR_SECONDS),
    )
}

/// The per-customer query of a rule-based model. `retention` is the rate for
/// `formula_retention` (given or estimated beforehand).
pub fn model_sql(spec: &ClvSpec, run_date: chrono::NaiveDate, retention: f64) -> String {
    let orders = orders_cte(spec, run_date);
    let margin = lit(spec.margin);
    let now = format!("date_part('epoch', TIMESTAMP '{run_date} 00:00:00')");
    let per_customer =
        "c AS (SELECT customer_id, COUNT(*) AS orders, SUM(amount) AS revenue, MIN(e) AS first_e \
         FROM o GROUP BY customer_id)"
            .to_string();
    let ppy = match spec.purchases_per_year {
        Some(v) => lit(v),
        None => format!(
            "CAST(orders AS DOUBLE) / GREATEST(({now} - first_e) / {}, 1.0)",
            lit(YEAR_SECONDS)
        ),
    };
    match spec.model {
        ClvModel::Historical => format!(
            "WITH {orders}, {per_customer} \
             SELECT DATE '{run_date}' AS run_date, customer_id, orders, revenue, \
                    revenue * {margin} AS clv \
             FROM c"
        ),
        ClvModel::Formula => {
            let years = lit(spec.expected_years.unwrap_or(0.0));
            format!(
                "WITH {orders}, {per_customer}, \
                 f AS (SELECT customer_id, orders, revenue, revenue / CAST(orders AS DOUBLE) AS avg_order_value, \
                        {ppy} AS purchases_per_year FROM c) \
                 SELECT DATE '{run_date}' AS run_date, customer_id, orders, revenue, avg_order_value, \
                        purchases_per_year, {years} AS expected_years, \
                        avg_order_value * purchases_per_year * {years} * {margin} AS clv \
                 FROM f"
            )
        }
        ClvModel::FormulaRetention => {
            let rate = lit(retention);
            format!(
                "WITH {orders}, {per_customer}, \
                 f AS (SELECT customer_id, orders, revenue, revenue / CAST(orders AS DOUBLE) AS avg_order_value, \
                        {ppy} AS purchases_per_year FROM c) \
                 SELECT DATE '{run_date}' AS run_date, customer_id, orders, revenue, avg_order_value, \
                        purchases_per_year, {rate} AS retention_rate, \
                        avg_order_value * purchases_per_year * {rate} * {margin} AS clv \
                 FROM f"
            )
        }
        ClvModel::Discounted => {
            let d = lit(spec.discount_rate);
            // Years beyond the cap (when given) count towards orders and revenue, not the sum.
            let counted = spec
                .years
                .map(|n| format!("t <= {n}"))
                .unwrap_or_else(|| "TRUE".to_string());
            let costs = match &spec.acquisition_costs {
                Some(table) => format!(
                    "a AS (SELECT CAST(customer_id AS BIGINT) AS customer_id, MAX(CAST(acquisition_cost AS DOUBLE)) AS acquisition_cost \
                     FROM {} WHERE customer_id IS NOT NULL GROUP BY customer_id)",
                    quote(table)
                ),
                None => "a AS (SELECT CAST(NULL AS BIGINT) AS customer_id, CAST(NULL AS DOUBLE) AS acquisition_cost)"
                    .to_string(),
            };
            // `c` is read once (DataFusion would compute a CTE read twice twice): orders and
            // revenue per customer are summed again from the per-year rows.
            format!(
                "WITH {orders}, {per_customer}, {costs}, \
                 y AS (SELECT o.customer_id, CAST(FLOOR((o.e - c.first_e) / {year}) AS BIGINT) + 1 AS t, \
                        COUNT(*) AS orders, SUM(o.amount) AS revenue \
                       FROM o JOIN c ON o.customer_id = c.customer_id \
                       GROUP BY o.customer_id, CAST(FLOOR((o.e - c.first_e) / {year}) AS BIGINT) + 1), \
                 n AS (SELECT customer_id, SUM(orders) AS orders, SUM(revenue) AS revenue, \
                        MAX(CASE WHEN {counted} THEN t END) AS years_counted, \
                        SUM(CASE WHEN {counted} THEN revenue * {margin} / POWER(1.0 + {d}, CAST(t AS DOUBLE)) END) AS discounted_profit \
                       FROM y GROUP BY customer_id) \
                 SELECT DATE '{run_date}' AS run_date, n.customer_id, n.orders, n.revenue, \
                        COALESCE(n.years_counted, 0) AS years_counted, \
                        COALESCE(n.discounted_profit, 0.0) AS discounted_profit, \
                        COALESCE(a.acquisition_cost, 0.0) AS acquisition_cost, \
                        COALESCE(n.discounted_profit, 0.0) - COALESCE(a.acquisition_cost, 0.0) AS clv \
                 FROM n LEFT JOIN a ON a.customer_id = n.customer_id",
                year = lit(YEAR_SECONDS),
            )
        }
        // Not a rule-based model; the step never asks.
        ClvModel::BgnbdGammaGamma => String::new(),
    }
}

#[cfg(test)]
mod tests {
    //! Each model against values worked out by hand from its definition.
    use std::sync::Arc;

    use datafusion::arrow::array::{
        AsArray, Float64Array, Int64Array, RecordBatch, TimestampMicrosecondArray,
    };
    use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, TimeUnit};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    use crate::config::{ClvModel, ClvSpec};
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
            margin: 1.0,
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
        ctx.register_table(
            "orders",
            Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
        )
        .unwrap();
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
        ctx.register_table(
            "costs",
            Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
        )
        .unwrap();
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
        s.margin = 0.5;
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
        s.margin = 0.3;
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
        s.margin = 0.5;
        s.acquisition_costs = Some("costs".into());
        let (rows, _) = run(&c, &s).await;
        let one = 75.0 / 1.1 + 100.0 / 1.1_f64.powi(2) + 20.0 / 1.1_f64.powi(3) - 30.0;
        assert!(close(rows[0].1, one), "{rows:?} want {one}");
        assert!(close(rows[1].1, 40.0 / 1.1), "{rows:?}"); // no cost row: CAC 0
        s.years = Some(1);
        let (rows, _) = run(&c, &s).await;
        assert!(close(rows[0].1, 75.0 / 1.1 - 30.0), "{rows:?}");
    }
}
