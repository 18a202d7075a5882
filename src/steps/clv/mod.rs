//! The `clv` step: one customer lifetime value model, picked by name.
//!
//! - `bgnbd_gamma_gamma` ([`predictive`]): BG/NBD and Gamma-Gamma fitted on a BTYD summary;
//!   P(alive), expected purchases and spend over the horizon and the discounted CLV, appended to
//!   the rows of `from`; with `backtest` also a calibration/holdout check ([`backtest`]).
//! - `historical`, `formula`, `formula_retention`, `discounted` ([`rules`]): per-customer sums
//!   over an order table.
//!
//! Every model registers `<step>` (per customer) and `<step>_fit` (parameters, log-likelihood,
//! iterations, totals). The fitting code itself is in [`models`].

pub mod backtest;
pub mod models;
pub mod predictive;
mod rank;
pub mod rules;

use std::sync::Arc;

use datafusion::arrow::array::{Date32Array, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::rows::{date32, register};
use super::{CheckContext, StepContext, StepOutcome};
use crate::config::Diagnostic;
use crate::config::steps::{ClvModel, ClvSpec, DEFAULT_MARGIN};
use crate::error::{Error, Result};

/// A checked CLV step: its spec, with `margin` filled in (from `params.gross_margin` when the
/// step has none, else 0.30).
#[derive(Debug, Clone, PartialEq)]
pub struct ClvStep {
    pub spec: ClvSpec,
}

impl ClvStep {
    pub fn check(spec: &ClvSpec, cx: &CheckContext) -> std::result::Result<Self, Vec<Diagnostic>> {
        let mut diags = Vec::new();
        diags.extend(cx.check_table("clv.from", &spec.from));
        if spec.horizon_months == 0 || spec.horizon_months > 600 {
            diags.push(cx.diag("clv.horizon_months", "must be between 1 and 600"));
        }
        if !(0.0..1.0).contains(&spec.discount_rate) {
            diags.push(cx.diag(
                "clv.discount_rate",
                "an annual rate: at least 0 and below 1 (0.10 = 10 %)",
            ));
        }
        // Unset: the margin the job's SQL uses, when it declares one.
        let mut spec = spec.clone();
        if spec.margin.is_none() {
            match cx.gross_margin {
                Some(Ok(m)) => spec.margin = Some(m),
                Some(Err(())) => cx.bad_gross_margin_used.set(true),
                None => spec.margin = Some(DEFAULT_MARGIN),
            }
        }
        if spec.margin.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
            diags.push(cx.diag("clv.margin", "a share of spend: between 0 and 1"));
        }
        use ClvModel as M;
        let model = spec.model;
        // Options that only some models read: a stray one is a mistake, not a no-op.
        let only = [
            (
                "expected_years",
                spec.expected_years.is_some(),
                model == M::Formula,
            ),
            (
                "purchases_per_year",
                spec.purchases_per_year.is_some(),
                matches!(model, M::Formula | M::FormulaRetention),
            ),
            (
                "retention_rate",
                spec.retention_rate.is_some(),
                model == M::FormulaRetention,
            ),
            (
                "acquisition_costs",
                spec.acquisition_costs.is_some(),
                model == M::Discounted,
            ),
            ("years", spec.years.is_some(), model == M::Discounted),
            ("backtest", spec.backtest.is_some(), model.is_predictive()),
        ];
        for (key, given, read) in only {
            if given && !read {
                diags.push(cx.diag(
                    &format!("clv.{key}"),
                    format!("not used by the `{}` model; remove it", model.name()),
                ));
            }
        }
        if model == M::Auto && spec.backtest.is_none() {
            diags.push(cx.diag(
                "clv",
                "`model: auto` picks the model with the smallest holdout error: it needs `backtest` (a calibration/holdout table such as sql/btyd_backtest.sql)",
            ));
        }
        if model == M::Formula && spec.expected_years.is_none() {
            diags.push(cx.diag(
                "clv",
                "the `formula` model needs `expected_years` (the expected relationship length in years)",
            ));
        }
        if let Some(y) = spec.expected_years
            && !(y > 0.0 && y <= 100.0)
        {
            diags.push(cx.diag(
                "clv.expected_years",
                "a number of years above 0 and at most 100",
            ));
        }
        if let Some(v) = spec.purchases_per_year
            && !(v > 0.0 && v.is_finite())
        {
            diags.push(cx.diag("clv.purchases_per_year", "a positive number"));
        }
        if let Some(r) = spec.retention_rate
            && !(0.0..=1.0).contains(&r)
        {
            diags.push(cx.diag("clv.retention_rate", "a yearly rate between 0 and 1"));
        }
        if spec.years == Some(0) {
            diags.push(cx.diag("clv.years", "at least 1"));
        }
        for (key, table) in [
            ("clv.backtest", &spec.backtest),
            ("clv.acquisition_costs", &spec.acquisition_costs),
        ] {
            if let Some(t) = table {
                diags.extend(cx.check_table(key, t));
            }
        }
        if diags.is_empty() {
            Ok(Self { spec })
        } else {
            Err(diags)
        }
    }

    /// The transaction model of a predictive step; `None` for `model: auto` (chosen by the
    /// backtest) and for the rule-based models.
    pub fn transaction_model(&self) -> Option<models::transaction::Model> {
        use models::transaction::Model;
        match self.spec.model {
            ClvModel::BgnbdGammaGamma => Some(Model::BgNbd),
            ClvModel::MbgnbdGammaGamma => Some(Model::MbgNbd),
            ClvModel::ParetoNbdGammaGamma => Some(Model::ParetoNbd),
            _ => None,
        }
    }

    /// The margin the models use.
    pub fn margin(&self) -> f64 {
        self.spec.margin.unwrap_or(DEFAULT_MARGIN)
    }

    /// The tables the step registers besides its own.
    pub fn extra_tables(&self, name: &str) -> Vec<String> {
        let mut tables = vec![format!("{name}_fit")];
        if self.spec.backtest.is_some() {
            tables.push(format!("{name}_backtest"));
        }
        tables
    }

    /// The tables the step reads.
    pub fn reads(&self) -> Vec<&str> {
        [
            Some(&self.spec.from),
            self.spec.backtest.as_ref(),
            self.spec.acquisition_costs.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect()
    }

    /// The columns the step reads of each table it reads (lower-cased); `None`: every column.
    /// The predictive models pass their `from` through whole (and read the backtest table
    /// whole); the rule models read only the order and cost columns of their queries.
    pub fn column_reads(&self) -> super::ColumnReads {
        if self.spec.model.is_predictive() {
            return self
                .reads()
                .into_iter()
                .map(|t| (t.to_lowercase(), None))
                .collect();
        }
        let mut reads = super::ColumnReads::new();
        let mut add = |table: &str, cols: &[&str]| {
            // One table may be both the orders and the costs: it is read for both.
            if let Some(set) = reads
                .entry(table.to_lowercase())
                .or_insert_with(|| Some(Default::default()))
            {
                set.extend(cols.iter().map(|c| c.to_string()));
            }
        };
        add(&self.spec.from, &rules::ORDER_COLUMNS);
        if let Some(costs) = &self.spec.acquisition_costs {
            add(costs, &rules::COST_COLUMNS);
        }
        reads
    }

    /// For `validate`: checks the source tables and registers empty tables of the step's
    /// schemas. Returns the tables registered with their schemas.
    pub async fn declare(
        &self,
        cx: &StepContext<'_>,
    ) -> std::result::Result<Vec<(String, SchemaRef)>, String> {
        let name = &cx.step.name;
        let mut tables = if self.spec.model.is_predictive() {
            predictive::declare(cx, &self.spec).await?
        } else {
            rules::declare(cx, &self.spec).await?
        };
        tables.push((format!("{name}_fit"), fit_schema()));
        for (table, schema) in &tables {
            register(cx.session, table, schema.clone(), vec![]).map_err(|e| e.to_string())?;
        }
        Ok(tables)
    }

    /// Runs the step with the model its spec names.
    pub async fn run(&self, cx: &StepContext<'_>) -> Result<StepOutcome> {
        if self.spec.model.is_predictive() {
            predictive::run(cx, self).await
        } else {
            rules::run(cx, self).await
        }
    }
}

/// The fit report every model registers as `<step>_fit`: (model, name, value) rows.
pub fn fit_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_date", DataType::Date32, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
    ]))
}

/// Registers the fit report `report` as `<step>_fit`.
fn register_fit(
    cx: &StepContext<'_>,
    report: &[(impl AsRef<str>, impl AsRef<str>, f64)],
) -> Result<()> {
    let batch = RecordBatch::try_new(
        fit_schema(),
        vec![
            Arc::new(Date32Array::from(vec![date32(cx.run_date); report.len()])),
            Arc::new(StringArray::from_iter_values(
                report.iter().map(|r| r.0.as_ref()),
            )),
            Arc::new(StringArray::from_iter_values(
                report.iter().map(|r| r.1.as_ref()),
            )),
            Arc::new(Float64Array::from_iter_values(report.iter().map(|r| r.2))),
        ],
    )
    .map_err(|e| Error::arrow("build the fit report", e))?;
    register(
        cx.session,
        &format!("{}_fit", cx.step.name),
        fit_schema(),
        vec![vec![batch]],
    )?;
    Ok(())
}

/// Adds the histories (columns `x`, `t_x`, `t`) of `rows` to `grouper`.
fn group_histories(
    rows: &crate::steps::rows::Rows,
    grouper: &mut models::bgnbd::HistoryGrouper,
) -> std::result::Result<(), crate::steps::rows::ColumnError> {
    let x = rows.floats("x", None)?;
    let t_x = rows.floats("t_x", None)?;
    let t = rows.floats("t", None)?;
    for ((x, t_x), t) in x.into_iter().zip(t_x).zip(t) {
        grouper.push(&models::bgnbd::History { x, t_x, t });
    }
    Ok(())
}

/// The rows of `sql`, run on the step's session; errors name the job and step.
async fn collect(cx: &StepContext<'_>, sql: &str) -> Result<Vec<RecordBatch>> {
    cx.session
        .sql(sql)
        .await
        .map_err(|e| cx.df_err(e))?
        .collect()
        .await
        .map_err(|e| cx.df_err(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(spec: serde_json::Value) -> ClvStep {
        ClvStep {
            spec: serde_json::from_value(spec).unwrap(),
        }
    }

    #[test]
    fn column_reads_name_the_rule_models_columns_and_everything_for_the_predictive_ones() {
        let set = |c: &[&str]| Some(c.iter().map(|s| s.to_string()).collect());
        let rule = step(
            serde_json::json!({"from": "Orders", "model": "discounted", "acquisition_costs": "customers"}),
        );
        assert_eq!(
            rule.column_reads(),
            [
                ("orders".to_string(), set(&rules::ORDER_COLUMNS)),
                ("customers".to_string(), set(&rules::COST_COLUMNS)),
            ]
            .into()
        );
        // Orders and costs in one table: the columns of both, not the last ones written.
        let one =
            step(serde_json::json!({"from": "t", "model": "discounted", "acquisition_costs": "t"}));
        let mut both = rules::ORDER_COLUMNS.to_vec();
        both.extend(rules::COST_COLUMNS);
        assert_eq!(one.column_reads(), [("t".to_string(), set(&both))].into());
        let predictive = step(
            serde_json::json!({"from": "clusters", "model": "bgnbd_gamma_gamma", "backtest": "bt"}),
        );
        assert_eq!(
            predictive.column_reads(),
            [("clusters".to_string(), None), ("bt".to_string(), None)].into()
        );
    }
}
