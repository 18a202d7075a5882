//! A job, checked: from its file (`jobs/<name>.yaml`) to a closed [`JobPlan`] that runs, the
//! scheduler and every command read instead of the raw spec.
//!
//! - [`build`]: the spec into a plan (names, stores, step kinds, outputs, schedule, retries),
//!   every problem collected as a diagnostic, nothing read but the SQL files;
//! - [`validate`]: the plan checked end to end without data: SQL planned against the declared
//!   input schemas, step and output schemas, and the checks across jobs;
//! - [`graph`]: across jobs: `depends_on` cycles, the run order, one writer per table;
//! - [`schedule`]: when a job fires (cron in its time zone, DST-correct).

pub mod build;
pub mod graph;
pub mod schedule;
pub mod validate;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::NaiveDate;

use crate::config::Source;
use crate::inputs::Input;
use crate::project::Project;
use crate::sink::Output;
use crate::steps::Step;
use schedule::Schedule;

pub use validate::{validate, validate_jobs};

/// A checked job, ready to validate against schemas or to run.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// The file stem of the job file.
    pub name: String,
    pub description: Option<String>,
    /// The job file, to point diagnostics into it.
    pub source: Source,
    /// When the daemon runs it (None: only on demand).
    pub schedule: Option<Schedule>,
    /// Jobs whose run for the same date must have committed first.
    pub depends_on: Vec<String>,
    pub retries: RetryPolicy,
    /// Per-attempt time limit.
    pub timeout: Option<Duration>,
    /// Whether the daemon runs fires missed while it was down.
    pub catchup: bool,
    /// Template variables that do not depend on the run date (`job`, `params.*`).
    params: BTreeMap<String, String>,
    pub inputs: Vec<Input>,
    pub steps: Vec<Step>,
    pub outputs: Vec<Output>,
    /// Where each run's HTML report goes (None: no report).
    pub report: Option<crate::report::ReportPlan>,
    /// Steps of the file that did not check (only in a plan with problems, for `validate`).
    left_out: Vec<String>,
    /// Per step, the columns it reads of each table, found when `validate` planned it (empty
    /// before that; `None` for a step it could not plan).
    pub column_reads: Vec<Option<crate::steps::ColumnReads>>,
}

/// Attempts after the first, and the wait before the first retry (doubled each time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max: u32,
    pub backoff: Duration,
}

impl JobPlan {
    /// What this job's run report is about.
    pub fn subject(&self) -> crate::report::Subject<'_> {
        crate::report::Subject {
            job: &self.name,
            description: self.description.as_deref(),
            outputs: &self.outputs,
        }
    }

    /// Template variables for a run date.
    pub fn vars(&self, run_date: NaiveDate) -> BTreeMap<String, String> {
        let mut v = self.params.clone();
        v.insert("run_date".into(), run_date.format("%Y-%m-%d").to_string());
        v.insert(
            "run_date_nodash".into(),
            run_date.format("%Y%m%d").to_string(),
        );
        v
    }

    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }
}

/// Loads and checks job `name` (everything but SQL planning; see [`validate`]).
pub fn load(project: &Project, name: &str) -> crate::error::Result<JobPlan> {
    let (plan, diags) = build::check(project, name)?;
    if diags.is_empty() {
        Ok(plan)
    } else {
        Err(crate::error::Error::Config(diags))
    }
}
