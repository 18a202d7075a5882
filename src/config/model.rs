//! The typed shape of `config.yaml` and `jobs/<name>.yaml`, exactly as users write them.
//! Unknown keys are rejected everywhere. Meaning (stores resolved, files read) is given to
//! these by `crate::job`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::types::{ByteSize, ColumnType, Compression, DurationSpec, OrderedMap, ParamValue};

/// `config.yaml`: where data lives, which engine runs the SQL, where run state is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Named object stores. A job URL belongs to the store whose `url` is its longest prefix.
    #[serde(default)]
    pub stores: BTreeMap<String, StoreSpec>,
    /// The query engine.
    #[serde(default)]
    pub engine: EngineSpec,
    /// Where run history and leases are kept (used by the scheduler).
    #[serde(default)]
    pub state: Option<StateSpec>,
    /// Default IANA time zone of schedules, e.g. `Europe/Berlin`.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Folder of job files, relative to this file.
    #[serde(default = "default_jobs_dir")]
    pub jobs_dir: String,
    /// How `clvflow schedule` runs jobs.
    #[serde(default)]
    pub scheduler: SchedulerSpec,
}

/// Daemon settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSpec {
    /// Runs executing at once, across all jobs (one job never runs twice at once).
    #[serde(default = "default_max_active_runs")]
    pub max_active_runs: usize,
    /// Run, on start, the runs missed while the daemon was down.
    #[serde(default = "default_true")]
    pub catchup: bool,
    /// At most this many missed runs per job (the most recent ones), oldest first.
    #[serde(default = "default_max_catchup")]
    pub max_catchup: usize,
    /// A lease not renewed for this long is considered abandoned (its holder died).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: DurationSpec,
    /// On SIGTERM/SIGINT, how long running runs may go on before they are cancelled.
    #[serde(default = "default_grace_period")]
    pub grace_period: DurationSpec,
    /// How often runs waiting for an upstream job or a lease are looked at again.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: DurationSpec,
}

impl Default for SchedulerSpec {
    fn default() -> Self {
        Self {
            max_active_runs: default_max_active_runs(),
            catchup: true,
            max_catchup: default_max_catchup(),
            lease_ttl: default_lease_ttl(),
            grace_period: default_grace_period(),
            poll_interval: default_poll_interval(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_active_runs() -> usize {
    2
}
fn default_max_catchup() -> usize {
    3
}
fn default_lease_ttl() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(300))
}
fn default_grace_period() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(60))
}
fn default_poll_interval() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(30))
}

fn default_timezone() -> String {
    "UTC".into()
}

fn default_jobs_dir() -> String {
    "jobs".into()
}

/// One object store: `file://./data`, `s3://bucket`, `gs://bucket`, `az://container`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// Root URL of the store. `file://` paths are relative to the config file.
    pub url: String,
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (S3).
    #[serde(default)]
    pub region: Option<String>,
    /// Allow plain-HTTP endpoints (local S3-compatible servers). Off by default.
    #[serde(default)]
    pub allow_http: bool,
    /// Retries of a failed request (object_store backs off exponentially between them).
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Give up retrying a request after this long.
    #[serde(default = "default_retry_timeout")]
    pub retry_timeout: DurationSpec,
    /// Extra builder options passed to object_store, e.g. `aws_virtual_hosted_style_request: "false"`.
    /// Credentials come from the standard environment (`AWS_ACCESS_KEY_ID`, ...), never from here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_max_retries() -> usize {
    10
}

fn default_retry_timeout() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(180))
}

/// Which engine executes SQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EngineSpec {
    /// In-process DataFusion.
    Local {
        /// Parallelism of scans and joins; defaults to the number of cores.
        #[serde(default)]
        target_partitions: Option<usize>,
        /// Memory for query execution; operators that can spill do so above it.
        #[serde(default)]
        memory_limit: Option<ByteSize>,
        /// Folder for spill files; defaults to the OS temp folder.
        #[serde(default)]
        spill_dir: Option<String>,
        /// Rows per Arrow batch.
        #[serde(default)]
        batch_size: Option<usize>,
        /// How `memory_limit` is shared between operators that hold memory at the same time.
        #[serde(default)]
        memory_pool: MemoryPoolKind,
        /// Any DataFusion setting by its full key, e.g.
        /// `datafusion.optimizer.repartition_joins: "false"` (values quoted); unknown keys and
        /// bad values are config errors.
        #[serde(default)]
        settings: BTreeMap<String, String>,
        /// Let the kernel back clvflow's memory with transparent huge pages (Linux). Off by
        /// default: a run allocates gigabytes of fresh hash tables, and the first touch of a
        /// huge page clears 2 MiB at once, which on virtual machines cost 2-5 s of kernel time
        /// per run against ~1 s with normal pages (see README, Benchmarks).
        #[serde(default)]
        transparent_huge_pages: bool,
    },
    /// A DataFusion Ballista cluster (`df://host:50050`).
    Ballista { url: String },
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self::Local {
            target_partitions: None,
            memory_limit: None,
            spill_dir: None,
            batch_size: None,
            memory_pool: MemoryPoolKind::default(),
            settings: BTreeMap::new(),
            transparent_huge_pages: false,
        }
    }
}

/// How the memory limit is shared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryPoolKind {
    /// First come, first served up to the limit; an operator that cannot grow spills (or, if it
    /// cannot spill, fails). Best when one large operator runs at a time, as in clvflow's steps.
    #[default]
    Greedy,
    /// Each spilling operator gets an equal share of the limit: several operators running at
    /// once never starve each other, at the price of spilling earlier.
    Fair,
}

/// Run history and leases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    pub url: String,
}

/// `jobs/<name>.yaml`: inputs, steps and outputs of one job. The job's name is the file stem.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Free text shown in logs and `validate`.
    #[serde(default)]
    pub description: Option<String>,
    /// Standard 5-field cron (`30 2 * * *`), used by `clvflow schedule`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule`; defaults to the config's.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Jobs whose run for the same date must have committed first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Retry policy of the scheduler.
    #[serde(default)]
    pub retries: Option<RetrySpec>,
    /// Per-attempt time limit; a run past it is cancelled and publishes nothing.
    #[serde(default)]
    pub timeout: Option<DurationSpec>,
    /// Overrides `scheduler.catchup` for this job.
    #[serde(default)]
    pub catchup: Option<bool>,
    /// Values for `{{ params.name }}` in SQL.
    #[serde(default)]
    pub params: OrderedMap<ParamValue>,
    /// Input tables by logical name (the name SQL uses).
    pub inputs: OrderedMap<InputSpec>,
    /// Steps run in order; each result is a table named after the step.
    pub steps: Vec<StepSpec>,
    /// Tables written back to object storage.
    #[serde(default)]
    pub outputs: Vec<OutputSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts after the first.
    pub max: u32,
    /// Wait before the first retry; doubles each time.
    #[serde(default = "default_backoff")]
    pub backoff: DurationSpec,
}

fn default_backoff() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(60))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    #[default]
    Parquet,
    /// Comma-separated with a header row; for small reference tables (e.g. the RFM segment map).
    /// Typed by the declared columns, which must be all its columns, in order.
    Csv,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioning {
    /// Files directly under the URL (or matching its glob).
    #[default]
    None,
    /// `key=value/` folders; declare the keys in `partition_columns`.
    Hive,
}

/// One input table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// A folder (ending in `/`), a file, or a glob (`.../*.parquet`) in a configured store.
    pub url: String,
    #[serde(default)]
    pub format: InputFormat,
    #[serde(default)]
    pub partitioning: Partitioning,
    /// Hive partition keys and their types, in folder order.
    #[serde(default)]
    pub partition_columns: OrderedMap<ColumnType>,
    /// The columns the job uses, with their types. The table exposes exactly these (plus the
    /// partition columns); every file must have them with a matching type.
    pub columns: OrderedMap<ColumnType>,
    /// Accept an input with no files or no rows (otherwise that is an error).
    #[serde(default)]
    pub allow_empty: bool,
}

/// One step. Exactly one kind key (`sql` or `clv`) is given.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Table name of the result; later steps and outputs refer to it.
    pub name: String,
    /// Path of a SQL file (relative to the project folder) with one query.
    #[serde(default)]
    pub sql: Option<String>,
    /// Predictive customer lifetime value (BG/NBD + Gamma-Gamma). Also registers `<name>_fit`.
    #[serde(default)]
    pub clv: Option<ClvSpec>,
    /// K-means segmentation. Also registers `<name>_profile`.
    #[serde(default)]
    pub kmeans: Option<KmeansSpec>,
    /// DataFusion settings for this step only, by full key (values quoted), on top of
    /// `engine.settings`; e.g. more hash partitions for a large aggregation.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
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
    /// For `bgnbd_gamma_gamma`: a step with `customer_id`, `x`, `t_x`, `t` (weeks) and
    /// `mean_repeat_spend`, such as `sql/customer_features.sql`. For the other models: an order table
    /// with `customer_id`, `order_ts` and `net_amount`, such as `sql/orders_clean.sql`.
    pub from: String,
    /// `bgnbd_gamma_gamma` (default), `historical`, `formula`, `formula_retention` or `discounted`.
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
    /// `bgnbd_gamma_gamma`: a calibration/holdout table (`customer_id`, `x`, `t_x`, `t`,
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
    Historical,
    Formula,
    FormulaRetention,
    Discounted,
}

impl ClvModel {
    pub fn name(self) -> &'static str {
        match self {
            Self::BgnbdGammaGamma => "bgnbd_gamma_gamma",
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

/// One output table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The step whose result is written.
    pub from: String,
    /// Table folder in a configured store, e.g. `s3://warehouse/marts/customer_value/`.
    pub url: String,
    /// Hive partition columns, outermost first. Their values become folders and leave the files.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Parquet compression.
    #[serde(default)]
    pub compression: Compression,
    /// Maximum rows per Parquet row group.
    #[serde(default = "default_row_group_size")]
    pub row_group_size: usize,
    /// Folder name used for NULL partition values (e.g. `__HIVE_DEFAULT_PARTITION__`).
    /// Unset: a NULL partition value is an error.
    #[serde(default)]
    pub null_partition_value: Option<String>,
}

fn default_row_group_size() -> usize {
    1_048_576
}
