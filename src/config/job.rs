//! The typed shape of `jobs/<name>.yaml`, exactly as users write it (the step kinds are in
//! [`super::steps`]). Unknown keys are rejected everywhere. `crate::job` turns it into a checked
//! plan.

use serde::Deserialize;

use super::steps::StepSpec;
use super::types::{ColumnType, Compression, DurationSpec, OrderedMap, ParamValue};

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
    /// An HTML page per run date, written after the run's outputs committed.
    #[serde(default)]
    pub report: Option<ReportSpec>,
}

/// `report:` of a job: where each run's `report.html` goes, and how money is shown in it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    /// Folder in a configured store; the page of a run is
    /// `<url>/<job>/run_date=<date>/report.html`.
    pub url: String,
    /// Currency of the exports' amounts (ISO code such as `EUR`, or a symbol); default `USD`.
    #[serde(default = "default_currency")]
    pub currency: String,
}

/// The currency of a report without `currency:`.
pub const DEFAULT_CURRENCY: &str = "USD";

fn default_currency() -> String {
    DEFAULT_CURRENCY.to_string()
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
    /// A Delta Lake table (its latest version, or `version:` / `as_of:`); partition columns
    /// come from the table's own metadata.
    Delta,
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
    /// `format: delta`: read this table version instead of the latest.
    #[serde(default)]
    pub version: Option<u64>,
    /// `format: delta`: read the latest version committed at or before this time (RFC 3339,
    /// e.g. `2026-11-22T03:00:00Z`).
    #[serde(default)]
    pub as_of: Option<String>,
}

/// How an output table is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormatSpec {
    /// Hive-partitioned Parquet with clvflow's commit log beside the table.
    #[default]
    Parquet,
    /// A Delta Lake table: one atomic Delta commit per run.
    Delta,
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
    /// `parquet` (default) or `delta`.
    #[serde(default)]
    pub format: OutputFormatSpec,
    /// `format: delta`: how long replaced files (and the versions that need them) are kept for
    /// time travel before `clvflow vacuum` may delete them; default 7 days.
    #[serde(default)]
    pub retention: Option<DurationSpec>,
    /// `format: delta`: a checkpoint every this many commits; default 10.
    #[serde(default)]
    pub checkpoint_interval: Option<u64>,
}

fn default_row_group_size() -> usize {
    1_048_576
}
