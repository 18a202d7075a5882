//! The step kinds of a job file. A step is a name, exactly one kind key (`sql`, `kmeans` or
//! `clv`) and optional `settings`; the kind is a tagged enum ([`StepKindSpec`]), read by a
//! small hand-written deserializer so that the YAML users write stays `{ name: x, sql: ... }`
//! (serde's `flatten` would lose line numbers and `deny_unknown_fields`). Adding a kind is a
//! variant here with its spec struct, and its step in `crate::steps`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

/// One step of a job.
#[derive(Debug, Clone)]
pub struct StepSpec {
    /// Table name of the result; later steps and outputs refer to it.
    pub name: String,
    /// What the step does.
    pub kind: StepKindSpec,
    /// DataFusion settings for this step only, by full key (values quoted), on top of
    /// `engine.settings`; e.g. more hash partitions for a large aggregation.
    pub settings: BTreeMap<String, String>,
    /// `split_by: <column>`: the step's SQL computes every result row from the rows of one
    /// value of this column (in every table it reads that has the column), so when its data
    /// does not fit the memory limit it may run bucket by bucket of that column's values.
    pub split_by: Option<String>,
    /// `split_result`: what the buckets' results of a split step are (default `whole`).
    pub split_result: SplitResult,
}

/// `split_result:` of a `split_by` step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitResult {
    /// Every result row comes from the rows of one value of the column: the buckets' results
    /// together are the whole query's result, and the result keeps the column.
    #[default]
    Whole,
    /// Each bucket gives rows of its own (e.g. sums per group over the bucket's customers):
    /// the result is the union of the buckets' results, so a group may have one row per bucket,
    /// and a later step combines them (sums of sums). The result need not have the column.
    Partial,
}

/// The kind of a step: the key that names it in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKindSpec {
    /// `sql: sql/<file>.sql`: the path of a SQL file (relative to the project folder) with one
    /// query.
    Sql(String),
    /// `kmeans: { ... }`: K-means segmentation. Also registers `<name>_profile`.
    Kmeans(KmeansSpec),
    /// `clv: { ... }`: a customer lifetime value model. Also registers `<name>_fit`.
    Clv(ClvSpec),
}

impl StepKindSpec {
    /// The key the kind is written under.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Sql(_) => "sql",
            Self::Kmeans(_) => "kmeans",
            Self::Clv(_) => "clv",
        }
    }
}

/// The keys of a step, in the order the error for an unknown one lists them.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum StepKey {
    Name,
    Sql,
    Kmeans,
    Clv,
    Settings,
    SplitBy,
    SplitResult,
}

impl<'de> Deserialize<'de> for StepSpec {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StepVisitor;
        impl<'de> Visitor<'de> for StepVisitor {
            type Value = StepSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a step: `{ name: <table>, sql: sql/<file>.sql }`, or `kmeans:` or `clv:` instead of `sql:`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StepSpec, A::Error> {
                let mut name: Option<String> = None;
                let mut settings: Option<BTreeMap<String, String>> = None;
                let mut split_by: Option<String> = None;
                let mut split_result: Option<SplitResult> = None;
                let mut kinds: Vec<StepKindSpec> = Vec::new();
                while let Some(key) = map.next_key::<StepKey>()? {
                    match key {
                        StepKey::Name if name.is_some() => {
                            return Err(de::Error::duplicate_field("name"));
                        }
                        StepKey::Settings if settings.is_some() => {
                            return Err(de::Error::duplicate_field("settings"));
                        }
                        StepKey::SplitBy if split_by.is_some() => {
                            return Err(de::Error::duplicate_field("split_by"));
                        }
                        StepKey::SplitResult if split_result.is_some() => {
                            return Err(de::Error::duplicate_field("split_result"));
                        }
                        StepKey::SplitBy => split_by = Some(map.next_value()?),
                        StepKey::SplitResult => split_result = Some(map.next_value()?),
                        StepKey::Name => name = Some(map.next_value()?),
                        StepKey::Settings => settings = Some(map.next_value()?),
                        StepKey::Sql => kinds.push(StepKindSpec::Sql(map.next_value()?)),
                        StepKey::Kmeans => kinds.push(StepKindSpec::Kmeans(map.next_value()?)),
                        StepKey::Clv => kinds.push(StepKindSpec::Clv(map.next_value()?)),
                    }
                }
                let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
                let kind = match kinds.len() {
                    1 => kinds.remove(0),
                    0 => {
                        return Err(de::Error::custom(
                            "a step needs exactly one kind: `sql: sql/<file>.sql`, `clv: { from: <step> }` or `kmeans: { from: <step>, features: [...] }`",
                        ));
                    }
                    _ => {
                        let keys: Vec<&str> = kinds.iter().map(StepKindSpec::key).collect();
                        return Err(de::Error::custom(format!(
                            "a step has exactly one kind, this one has {}: split it into steps",
                            keys.join(" and ")
                        )));
                    }
                };
                Ok(StepSpec {
                    name,
                    kind,
                    settings: settings.unwrap_or_default(),
                    split_by,
                    split_result: split_result.unwrap_or_default(),
                })
            }
        }
        d.deserialize_map(StepVisitor)
    }
}

/// The K-means step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmeansSpec {
    /// A step or input with the id and feature columns.
    pub from: String,
    /// The id column (integer).
    #[serde(default = "default_id")]
    pub id: String,
    /// Numeric features, all ≥ 0 (they are log-transformed, then standardised).
    pub features: Vec<String>,
    /// `auto` (chosen by silhouette) or a number of clusters.
    #[serde(default)]
    pub k: KmeansK,
    /// Largest k tried by `auto`.
    #[serde(default = "default_k_max")]
    pub k_max: usize,
    /// Random seed: same input and seed, same clusters.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The feature that orders clusters: cluster 1 has its highest mean. Default: the last feature.
    #[serde(default)]
    pub value: String,
    /// Rows used to choose k and score the silhouette.
    #[serde(default = "default_sample")]
    pub sample: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum KmeansK {
    Fixed(usize),
    Auto(AutoK),
}

impl Default for KmeansK {
    fn default() -> Self {
        Self::Auto(AutoK::Auto)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AutoK {
    #[serde(rename = "auto")]
    Auto,
}

fn default_id() -> String {
    "customer_id".into()
}
fn default_k_max() -> usize {
    8
}
fn default_seed() -> u64 {
    7
}
fn default_sample() -> usize {
    2000
}

/// The CLV step: one model, picked by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClvSpec {
    /// For the predictive models (`bgnbd_gamma_gamma`, `mbgnbd_gamma_gamma`,
    /// `pareto_nbd_gamma_gamma`, `auto`): a step with `customer_id`, `x`, `t_x`, `t` (weeks) and
    /// `mean_repeat_spend`, such as `sql/customer_features.sql`. For the other models: an order table
    /// with `customer_id`, `order_ts` and `net_amount`, such as `sql/orders_clean.sql`.
    pub from: String,
    /// `bgnbd_gamma_gamma` (default), `mbgnbd_gamma_gamma`, `pareto_nbd_gamma_gamma`, `auto`
    /// (the one of those three with the smallest holdout error), `historical`, `formula`,
    /// `formula_retention` or `discounted`.
    #[serde(default)]
    pub model: ClvModel,
    /// Months of future purchases valued (`bgnbd_gamma_gamma`).
    #[serde(default = "default_horizon_months")]
    pub horizon_months: u32,
    /// Annual discount rate (0.10 = 10 % a year): applied monthly by `bgnbd_gamma_gamma`, yearly
    /// by `discounted`.
    #[serde(default = "default_discount_rate")]
    pub discount_rate: f64,
    /// Share of spend that is gross profit. Unset: the job's `params.gross_margin` when it has
    /// one (so the SQL steps and the CLV models use one margin), else 0.30. Read it with
    /// [`ClvSpec::margin`].
    #[serde(default)]
    pub margin: Option<f64>,
    /// `formula`: expected relationship length in years.
    #[serde(default)]
    pub expected_years: Option<f64>,
    /// `formula`, `formula_retention`: purchases per year for every customer. Unset: each
    /// customer's own rate, orders / max(1, years since the first order).
    #[serde(default)]
    pub purchases_per_year: Option<f64>,
    /// `formula_retention`: the yearly retention rate. Unset: estimated from the history (share of
    /// the customers who ordered in the year before last that ordered again in the last year).
    #[serde(default)]
    pub retention_rate: Option<f64>,
    /// `discounted`: a table with `customer_id` and `acquisition_cost` (missing costs count as 0).
    #[serde(default)]
    pub acquisition_costs: Option<String>,
    /// `discounted`: relationship years counted (t = 1..years). Unset: all years so far.
    #[serde(default)]
    pub years: Option<u32>,
    /// The predictive models: a calibration/holdout table (`customer_id`, `x`, `t_x`, `t`,
    /// `x_holdout`, `holdout_weeks`, such as `sql/btyd_backtest.sql`). The step refits the model on
    /// the calibration columns and writes `<step>_backtest`: predicted vs actual holdout purchases.
    #[serde(default)]
    pub backtest: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClvModel {
    #[default]
    BgnbdGammaGamma,
    MbgnbdGammaGamma,
    ParetoNbdGammaGamma,
    /// BG/NBD, MBG/NBD and Pareto/NBD compared on the backtest's holdout.
    Auto,
    Historical,
    Formula,
    FormulaRetention,
    Discounted,
}

impl ClvModel {
    /// Whether this is one of the predictive (transaction + spend) models.
    pub fn is_predictive(self) -> bool {
        matches!(
            self,
            Self::BgnbdGammaGamma | Self::MbgnbdGammaGamma | Self::ParetoNbdGammaGamma | Self::Auto
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::BgnbdGammaGamma => "bgnbd_gamma_gamma",
            Self::MbgnbdGammaGamma => "mbgnbd_gamma_gamma",
            Self::ParetoNbdGammaGamma => "pareto_nbd_gamma_gamma",
            Self::Auto => "auto",
            Self::Historical => "historical",
            Self::Formula => "formula",
            Self::FormulaRetention => "formula_retention",
            Self::Discounted => "discounted",
        }
    }
}

fn default_horizon_months() -> u32 {
    12
}
fn default_discount_rate() -> f64 {
    0.10
}

/// The CLV steps' margin when neither the step nor `params.gross_margin` gives one.
pub const DEFAULT_MARGIN: f64 = 0.30;

impl ClvSpec {
    /// The margin the step uses (loading a job fills in `params.gross_margin`).
    pub fn margin(&self) -> f64 {
        self.margin.unwrap_or(DEFAULT_MARGIN)
    }
}
