//! Job steps, one module per kind: [`sql`], [`kmeans`], [`clv`]. Each step's result is
//! registered on the run's session under the step's name, so later steps (and outputs) refer
//! to it like any table; model steps may register extra tables (`<step>_profile`,
//! `<step>_fit`, `<step>_backtest`).
//!
//! [`StepKind`] is the one place the kinds are told apart: what a kind checks when the job is
//! loaded ([`StepKind::check`]), which tables it reads and produces, how `validate` declares its
//! result schemas without data ([`StepKind::declare`]), and how it runs ([`StepKind::run`]).
//! Adding a kind is one module here, a variant in `crate::config::steps` and an arm in each
//! match below. A step knows nothing of jobs: it is given a [`StepContext`].

pub mod clv;
pub mod evict;
pub mod exact;
pub mod kmeans;
pub mod rows;
pub mod source;
pub mod spill;
pub mod sql;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use chrono::NaiveDate;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;

use crate::config::steps::StepKindSpec;
use crate::config::{Diagnostic, Source};
use crate::error::{Error, Result};

/// A checked step of a job.
#[derive(Debug, Clone)]
pub struct Step {
    /// Table name of the result.
    pub name: String,
    /// Field path in the job file (`steps[3]`), for diagnostics.
    pub field: String,
    /// DataFusion settings for this step only (checked).
    pub settings: BTreeMap<String, String>,
    /// `split_by`: the column whose values the step's SQL keeps apart (SQL steps only, checked;
    /// see [`sql::split`]).
    pub split_by: Option<String>,
    /// `split_result`: whether the buckets' results are the whole result or partial rows a later
    /// step combines ([`crate::config::steps::SplitResult`]).
    pub split_result: crate::config::steps::SplitResult,
    pub kind: StepKind,
}

/// Per table a step reads (lower-cased), the columns it reads (lower-cased); `None`: all of them.
pub type ColumnReads = BTreeMap<String, Option<BTreeSet<String>>>;

/// What a step does, checked.
#[derive(Debug, Clone)]
pub enum StepKind {
    Sql(sql::SqlStep),
    Kmeans(kmeans::KmeansStep),
    Clv(clv::ClvStep),
}

/// What checking a step's spec needs to know about the job.
pub struct CheckContext<'a> {
    /// The step's name.
    pub step: &'a str,
    /// The step's field path in the job file (`steps[3]`).
    pub field: &'a str,
    pub source: &'a Source,
    /// The tables the step may read: the inputs and the tables of earlier steps.
    pub tables: &'a BTreeSet<String>,
    /// The project folder (SQL file paths are relative to it).
    pub root: &'a Path,
    /// The names templates may use (`run_date`, `job`, `params.x`, ...).
    pub template_names: &'a BTreeMap<String, String>,
    /// The job's `params.gross_margin` as a share of spend: `Some(Ok(m))`, `Some(Err(()))` when
    /// it is not a number between 0 and 1, `None` when not set.
    pub gross_margin: Option<std::result::Result<f64, ()>>,
    /// Set by a step that takes its margin from `params.gross_margin` while it is invalid
    /// (reported once for the job, not once per step).
    pub bad_gross_margin_used: &'a Cell<bool>,
}

impl CheckContext<'_> {
    /// A diagnostic at `rel` under the step's field (`sql`, `kmeans.k`).
    pub fn diag(&self, rel: &str, message: impl Into<String>) -> Diagnostic {
        let field = if rel.is_empty() {
            self.field.to_string()
        } else {
            format!("{}.{rel}", self.field)
        };
        self.source.diag(&field, message)
    }

    /// The diagnostic for a table the step names that is neither an input nor an earlier step.
    pub fn check_table(&self, rel: &str, table: &str) -> Option<Diagnostic> {
        (!self.tables.contains(table) || table == self.step)
            .then(|| self.diag(rel, format!("no input or earlier step named `{table}`")))
    }
}

/// What running a step needs.
pub struct StepContext<'a> {
    /// The session the step runs on (with the step's own settings applied).
    pub session: &'a SessionContext,
    pub job: &'a str,
    pub step: &'a Step,
    pub run_date: NaiveDate,
    /// Template variables for the run date.
    pub vars: &'a BTreeMap<String, String>,
    /// The columns of the step's own result that later steps read (lower-cased), when no
    /// output writes it and every later reader is known: the result holds only those.
    /// `None`: every column.
    pub keep: Option<&'a BTreeSet<String>>,
    /// Set when the step runs bucket by bucket of its `split_by` column ([`sql::split`]).
    pub split: Option<&'a sql::split::Buckets>,
}

impl StepContext<'_> {
    /// Which of `names` (the columns of the step's result) it holds, by index, when
    /// [`StepContext::keep`] leaves some out; `None` when it holds them all. Logs what it
    /// leaves out. A result no later step reads a column of (say, only counted) keeps its
    /// first column.
    pub fn kept_columns(&self, names: &[&str]) -> Option<Vec<usize>> {
        let keep = self.keep?;
        let (mut kept, left): (Vec<usize>, Vec<usize>) =
            (0..names.len()).partition(|&i| keep.contains(&names[i].to_lowercase()));
        if kept.is_empty() {
            kept.push(0);
        }
        if kept.len() == names.len() {
            return None;
        }
        let list = |ix: &[usize]| ix.iter().map(|&i| names[i]).collect::<Vec<_>>().join(", ");
        tracing::info!(job = %self.job, step = %self.step.name, kept = %list(&kept),
                       left_out = %list(&left), "step result holds only the columns later steps read");
        Some(kept)
    }

    /// An error of the step's DataFusion work.
    pub fn df_err(&self, source: datafusion::error::DataFusionError) -> Error {
        Error::step(self.job, &self.step.name, source)
            .out_of_memory(self.session.runtime_env().memory_pool.as_ref())
    }

    /// A model step's refusal of its data (it says what to change).
    pub fn model_err(&self, message: impl Into<String>) -> Error {
        Error::model(self.job, &self.step.name, message)
    }
}

/// What one step produced.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    pub rows: usize,
    /// Memory held by the result (each buffer counted once); 0 when it was streamed or spilled.
    pub bytes: usize,
    /// What the result took in memory before it was written to scratch files; 0 when held.
    pub spilled: usize,
    pub elapsed: Duration,
    /// Extra timings worth a log line (model fits), as (name, duration).
    pub timings: Vec<(&'static str, Duration)>,
}

impl StepKind {
    /// Checks `spec` (no data read, no SQL planned). Diagnostics point into the job file, or
    /// into the SQL file for a SQL step's template.
    pub fn check(
        spec: &StepKindSpec,
        cx: &CheckContext,
    ) -> std::result::Result<Self, Vec<Diagnostic>> {
        match spec {
            StepKindSpec::Sql(file) => sql::SqlStep::check(file, cx).map(Self::Sql),
            StepKindSpec::Kmeans(s) => kmeans::KmeansStep::check(s, cx).map(Self::Kmeans),
            StepKindSpec::Clv(s) => clv::ClvStep::check(s, cx).map(Self::Clv),
        }
    }

    /// The tables the step registers: its own and the extra result tables.
    pub fn produces(&self, name: &str) -> Vec<String> {
        let mut tables = vec![name.to_string()];
        match self {
            StepKind::Sql(_) => {}
            StepKind::Kmeans(_) => tables.push(format!("{name}_profile")),
            StepKind::Clv(c) => tables.extend(c.extra_tables(name)),
        }
        tables
    }

    /// The tables the step reads, lower-cased; `None` when it cannot be told (SQL that does not
    /// parse: the run then fails at the step with the real error).
    pub fn reads(
        &self,
        session: &SessionContext,
        vars: &BTreeMap<String, String>,
    ) -> Option<BTreeSet<String>> {
        match self {
            StepKind::Sql(s) => s.reads(session, vars),
            StepKind::Kmeans(k) => Some([k.spec.from.to_lowercase()].into()),
            StepKind::Clv(c) => Some(c.reads().iter().map(|t| t.to_lowercase()).collect()),
        }
    }

    /// The columns the step reads of each table it reads, for holding step results without
    /// the columns no later step needs. Plans a SQL step's query on `session` (whose tables
    /// may be the empty ones `validate` declares). `None`: not known (the query does not plan).
    pub async fn column_reads(
        &self,
        session: &SessionContext,
        vars: &BTreeMap<String, String>,
    ) -> Option<ColumnReads> {
        match self {
            StepKind::Sql(s) => s.column_reads(session, vars).await,
            StepKind::Kmeans(k) => Some([(k.spec.from.to_lowercase(), None)].into()),
            StepKind::Clv(c) => Some(c.column_reads()),
        }
    }

    /// Whether the step is SQL (it has a query plan, and can stream into its output).
    pub fn is_sql(&self) -> bool {
        matches!(self, StepKind::Sql(_))
    }

    /// For `validate`: plans the step against the (empty) tables registered on the session,
    /// registers empty tables of its results, and returns them with their schemas.
    pub async fn declare(
        &self,
        cx: &StepContext<'_>,
        source: &Source,
    ) -> std::result::Result<Vec<(String, SchemaRef)>, Vec<Diagnostic>> {
        let field = &cx.step.field;
        let at = |kind: &str, m: String| vec![source.diag(&format!("{field}.{kind}"), m)];
        match self {
            StepKind::Sql(s) => s.declare(cx).await,
            StepKind::Kmeans(k) => k.declare(cx).await.map_err(|m| at("kmeans", m)),
            StepKind::Clv(c) => c.declare(cx).await.map_err(|m| at("clv", m)),
        }
    }

    /// Runs the step and registers its results on `cx.session`.
    pub async fn run(&self, cx: &StepContext<'_>) -> Result<StepOutcome> {
        match self {
            StepKind::Sql(s) => s.run(cx).await,
            StepKind::Kmeans(k) => k.run(cx).await,
            StepKind::Clv(c) => c.run(cx).await,
        }
    }
}

/// A model step's check that its input table has `columns`, for `declare`.
pub async fn require_columns(
    session: &SessionContext,
    table: &str,
    columns: &[&str],
    hint: &str,
) -> std::result::Result<SchemaRef, String> {
    let df = session
        .table(table)
        .await
        .map_err(|e| format!("`{table}`: {e}"))?;
    let schema = df.schema();
    let missing: Vec<&str> = columns
        .iter()
        .copied()
        .filter(|c| schema.field_with_unqualified_name(c).is_err())
        .collect();
    if missing.is_empty() {
        Ok(std::sync::Arc::new(schema.as_arrow().clone()))
    } else {
        Err(format!(
            "`{table}` lacks column(s) {} ({hint})",
            missing.join(", ")
        ))
    }
}
