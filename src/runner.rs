//! Runs one job for one run date: check and register inputs, run steps in order, write and
//! commit outputs. Also `validate`: the same path without data (SQL planned against the declared
//! schemas), collecting every problem.

use std::time::{Duration, Instant};

use chrono::NaiveDate;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::catalog::inputs::{self, InputSummary};
use crate::engine;
use crate::error::{Error, Result};
use crate::job::{JobPlan, Project, StepKind};
use crate::sink::{self, OutputOutcome, RunInfo};
use crate::steps::sql::{self, StepOutcome};
use crate::steps::{clv, kmeans};

/// Everything a run did, for logs, the CLI and run history.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_id: String,
    pub job: String,
    pub run_date: NaiveDate,
    pub inputs: Vec<(String, InputSummary)>,
    pub steps: Vec<(String, StepOutcome)>,
    pub outputs: Vec<OutputOutcome>,
    pub elapsed: Duration,
}

/// A fresh run id: sortable by time, unique.
pub fn new_run_id() -> String {
    let ts = chrono::Utc::now().format("%Y%m%dT%H%M%S");
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{ts}-{}", &rand[..12])
}

/// Runs `job` for `run_date`.
pub async fn run_job(
    project: &Project,
    job: &JobPlan,
    run_date: NaiveDate,
    run_id: &str,
) -> Result<RunReport> {
    run_job_cancellable(project, job, run_date, run_id, &CancellationToken::new()).await
}

/// Runs `job` for `run_date`; cancelling `cancel` before every output is staged stops the run
/// with nothing published. Once all outputs are staged they are committed and published
/// regardless (a few object-store calls), so a run is never cut between two outputs by a cancel.
pub async fn run_job_cancellable(
    project: &Project,
    job: &JobPlan,
    run_date: NaiveDate,
    run_id: &str,
    cancel: &CancellationToken,
) -> Result<RunReport> {
    let started = Instant::now();
    info!(job = %job.name, %run_date, run_id, "run started");
    let ctx = engine::session(project)?;
    let run = RunInfo {
        run_id: run_id.to_string(),
        job: job.name.clone(),
        run_date,
    };
    let work = async {
        let (inputs, steps) = execute(&ctx, job, run_date).await?;
        let mut staged = Vec::new();
        for out in &job.outputs {
            staged.push((Instant::now(), sink::stage(&ctx, out, &run).await?));
        }
        Ok::<_, Error>((inputs, steps, staged))
    };
    let cancelled = || {
        Error::Cancelled(format!(
            "job `{}` for {run_date} (nothing was published)",
            job.name
        ))
    };
    let (input_report, step_report, staged) = tokio::select! {
        biased;
        _ = cancel.cancelled() => {
            info!(job = %job.name, %run_date, run_id, "run cancelled before commit; nothing published");
            return Err(cancelled());
        }
        r = work => r?,
    };
    if cancel.is_cancelled() {
        for (_, s) in staged {
            sink::abandon(s).await;
        }
        return Err(cancelled());
    }
    let mut output_report = Vec::new();
    for ((t, staged), out) in staged.into_iter().zip(&job.outputs) {
        let o = sink::commit(staged).await?;
        if let Some(v) = o.recovery.rolled_forward {
            info!(job = %job.name, output = %out.from, version = v, "finished publishing an interrupted earlier run");
        }
        info!(job = %job.name, output = %out.from, table = %o.table_url, version = o.version, rows = o.rows,
              files = o.files, bytes = o.bytes, replaced = ?o.replaced, ms = t.elapsed().as_millis() as u64,
              "output committed");
        output_report.push(o);
    }
    let elapsed = started.elapsed();
    info!(job = %job.name, %run_date, run_id, ms = elapsed.as_millis() as u64, "run succeeded");
    Ok(RunReport {
        run_id: run_id.to_string(),
        job: job.name.clone(),
        run_date,
        inputs: input_report,
        steps: step_report,
        outputs: output_report,
        elapsed,
    })
}

type Executed = (Vec<(String, InputSummary)>, Vec<(String, StepOutcome)>);

/// Checks and registers the inputs, then runs every step; results stay registered on `ctx`.
async fn execute(ctx: &SessionContext, job: &JobPlan, run_date: NaiveDate) -> Result<Executed> {
    execute_until(ctx, job, run_date, None, &[]).await
}

/// Like [`execute`], stopping after step `until` when given.
async fn execute_until(
    ctx: &SessionContext,
    job: &JobPlan,
    run_date: NaiveDate,
    until: Option<&str>,
    skip: &[&str],
) -> Result<Executed> {
    let mut input_report = Vec::new();
    for input in &job.inputs {
        let t = Instant::now();
        let s = inputs::register_checked(ctx, &job.name, input).await?;
        info!(job = %job.name, input = %input.name, files = s.files, rows = s.rows, bytes = s.bytes,
              ms = t.elapsed().as_millis() as u64, "input checked");
        input_report.push((input.name.clone(), s));
    }
    let mut step_report = Vec::new();
    for step in &job.steps {
        if skip.contains(&step.name.as_str()) {
            if until == Some(step.name.as_str()) {
                break;
            }
            continue;
        }
        let out = match &step.kind {
            StepKind::Sql { .. } => sql::run(ctx, job, step, run_date).await?,
            StepKind::Kmeans(spec) => {
                kmeans::run(ctx, &job.name, &step.name, spec, run_date).await?
            }
            StepKind::Clv(spec) => {
                let (out, t) = clv::step::run(ctx, &job.name, &step.name, spec, run_date).await?;
                if let Some(t) = t {
                    info!(job = %job.name, step = %step.name, bgnbd_ms = t.bgnbd.as_millis() as u64,
                          gamma_gamma_ms = t.gamma_gamma.as_millis() as u64, predict_ms = t.predict.as_millis() as u64,
                          backtest_ms = t.backtest.as_millis() as u64, "models fitted");
                }
                out
            }
        };
        info!(job = %job.name, step = %step.name, rows = out.rows, bytes = out.bytes,
              ms = out.elapsed.as_millis() as u64, "step done");
        step_report.push((step.name.clone(), out));
        if until == Some(step.name.as_str()) {
            break;
        }
    }
    Ok((input_report, step_report))
}

/// Runs the steps of `job` (up to `until`, when given) without writing outputs, and returns the
/// session holding every step's result by name (for tests and inspection).
pub async fn run_steps(
    project: &Project,
    job: &JobPlan,
    run_date: NaiveDate,
    until: Option<&str>,
) -> Result<SessionContext> {
    let ctx = engine::session(project)?;
    execute_until(&ctx, job, run_date, until, &[]).await?;
    Ok(ctx)
}

/// Like [`run_steps`] on a session the caller made, not running the steps in `skip`: the caller
/// has registered tables of those names (e.g. fixed model results, to test the SQL after them).
pub async fn run_steps_on(
    ctx: &SessionContext,
    job: &JobPlan,
    run_date: NaiveDate,
    until: Option<&str>,
    skip: &[&str],
) -> Result<()> {
    execute_until(ctx, job, run_date, until, skip).await?;
    Ok(())
}

/// Checks job `name` end to end without reading data. Returns the plan, or every problem.
pub async fn validate_job(project: &Project, name: &str) -> Result<JobPlan> {
    if !project.job_file_exists(name) {
        return project.load_job(name); // the "no such job" diagnostic
    }
    let (job, mut diags) = project.check_job(name)?;
    let ctx = engine::session(project)?;
    for input in &job.inputs {
        inputs::register_declared(&ctx, input)?;
    }
    let today = chrono::Utc::now().date_naive();
    // Steps that did not load (e.g. a missing SQL file) count as failed for the noise filter.
    let mut failed: Vec<String> = job
        .doc
        .value
        .steps
        .iter()
        .filter(|s| !job.steps.iter().any(|p| p.name == s.name))
        .map(|s| s.name.clone())
        .collect();
    let mut schemas: Vec<(String, SchemaRef)> = Vec::new();
    for step in &job.steps {
        if let StepKind::Kmeans(spec) = &step.kind {
            if failed.contains(&spec.from) {
                failed.push(step.name.clone());
                continue;
            }
            if let Err(m) = kmeans::plan(&ctx, &step.name, spec).await {
                diags.push(job.doc.diag(&format!("{}.kmeans", step.field), m));
                failed.push(step.name.clone());
            } else {
                schemas.push((step.name.clone(), kmeans::output_schema(spec)));
                schemas.push((
                    format!("{}_profile", step.name),
                    kmeans::profile_schema(spec),
                ));
            }
            continue;
        }
        if let StepKind::Clv(spec) = &step.kind {
            let sources = [
                Some(&spec.from),
                spec.backtest.as_ref(),
                spec.acquisition_costs.as_ref(),
            ];
            if sources.iter().flatten().any(|t| failed.contains(t)) {
                failed.push(step.name.clone());
                continue;
            }
            match clv::step::plan(&ctx, &step.name, spec, today).await {
                Ok(tables) => schemas.extend(tables),
                Err(m) => {
                    diags.push(job.doc.diag(&format!("{}.clv", step.field), m));
                    failed.push(step.name.clone());
                }
            }
            continue;
        }
        match sql::plan(&ctx, &job, step, today).await {
            Ok(schema) => schemas.push((step.name.clone(), schema)),
            Err(d) => {
                // A step that fails makes later steps that use it fail too: report only the cause.
                let noise = d.iter().all(|x| {
                    failed.iter().any(|f| {
                        x.message.contains(&format!("'{f}'"))
                            || x.message.contains(&format!("\"{f}\""))
                    })
                });
                if failed.is_empty() || !noise {
                    diags.extend(d);
                }
                failed.push(step.name.clone());
            }
        }
    }
    for out in &job.outputs {
        let Some((_, schema)) = schemas.iter().find(|(n, _)| *n == out.from) else {
            continue;
        };
        for (j, c) in out.partition_by.iter().enumerate() {
            if schema.field_with_name(c).is_err() {
                let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                diags.push(job.doc.diag(
                    &format!("{}.partition_by[{j}]", out.field),
                    format!(
                        "`{c}` is not a column of step `{}`; it has: {}",
                        out.from,
                        have.join(", ")
                    ),
                ));
            }
        }
    }
    if diags.is_empty() {
        Ok(job)
    } else {
        Err(Error::Config(diags))
    }
}
