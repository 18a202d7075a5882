//! Runs one job for one run date: check and register inputs, run steps in order, write and
//! commit outputs. Also `validate`: the same path without data (SQL planned against the declared
//! schemas), collecting every problem.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::catalog::inputs::{self, InputSummary};
use crate::engine;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::job::{JobPlan, Project, StepKind};
use crate::lifetimes::{self, Lifetimes};
use crate::memstat;
use crate::sink::{self, OutputOutcome, RunInfo, Staged};
use crate::steps::sql::{self, StepOutcome};
use crate::steps::{self, clv, kmeans};

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

/// Runs `job` for `run_date`. Each output is staged as soon as the step that produces it is
/// done, and step results are dropped after their last reader (see [`crate::lifetimes`]), so a
/// run holds only what is still needed. Cancelling `cancel` before every output is staged stops
/// the run with nothing published (what was staged is deleted). Once all outputs are staged they
/// are committed and published regardless (a few object-store calls), so a run is never cut
/// between two outputs by a cancel.
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
    let staging = Staging {
        run: &run,
        lifetimes: lifetimes::plan(&ctx, job, run_date),
        staged: Mutex::new(Vec::new()),
    };
    let work = async {
        let r = execute_until(&ctx, job, run_date, None, &[], Some(&staging)).await?;
        failpoint::hit(failpoint::AFTER_STAGING).await?;
        Ok(r)
    };
    let cancelled = || {
        Error::Cancelled(format!(
            "job `{}` for {run_date} (nothing was published)",
            job.name
        ))
    };
    let result = tokio::select! {
        biased;
        _ = cancel.cancelled() => {
            info!(job = %job.name, %run_date, run_id, "run cancelled before commit; nothing published");
            Err(cancelled())
        }
        r = work => r.and_then(|r| if cancel.is_cancelled() { Err(cancelled()) } else { Ok(r) }),
    };
    let mut staged = staging.take();
    let (input_report, step_report) = match result {
        Ok(r) if staged.len() == job.outputs.len() => r,
        other => {
            for (_, _, s) in staged {
                sink::abandon(s).await;
            }
            return Err(other
                .err()
                .unwrap_or_else(|| Error::Internal("an output was not staged".into())));
        }
    };
    staged.sort_by_key(|(o, _, _)| *o);
    let mut output_report = Vec::new();
    for ((_, staging_time, staged), out) in staged.into_iter().zip(&job.outputs) {
        let t = Instant::now();
        let o = sink::commit(staged).await?;
        if let Some(v) = o.recovery.rolled_forward {
            info!(job = %job.name, output = %out.from, version = v, "finished publishing an interrupted earlier run");
        }
        info!(job = %job.name, output = %out.from, table = %o.table_url, version = o.version, rows = o.rows,
              files = o.files, bytes = o.bytes, replaced = ?o.replaced,
              stage_ms = staging_time.as_millis() as u64, commit_ms = t.elapsed().as_millis() as u64,
              "output committed");
        output_report.push(o);
    }
    let elapsed = started.elapsed();
    info!(job = %job.name, %run_date, run_id, ms = elapsed.as_millis() as u64,
          max_rss_mb = memstat::max_rss().map(mib), "run succeeded");
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

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// Outputs staged by a run while its steps go on.
struct Staging<'a> {
    run: &'a RunInfo,
    lifetimes: Lifetimes,
    /// (output index, time staging took, staged output).
    staged: Mutex<Vec<(usize, Duration, Staged)>>,
}

impl Staging<'_> {
    fn take(&self) -> Vec<(usize, Duration, Staged)> {
        std::mem::take(&mut *self.staged.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// After step `i`: drops what no later step reads (tables being staged now excepted), then
    /// stages the outputs the step produced, then drops those too if nothing else reads them.
    /// A streamed step (a view until now) is computed by its staging; if later steps read it,
    /// they read its staged files. Returns the rows staged from step `i` itself.
    async fn after_step(&self, ctx: &SessionContext, job: &JobPlan, i: usize) -> Result<u64> {
        let step = &job.steps[i];
        let streamed = self.lifetimes.streamed.get(i) == Some(&true);
        let mut written = 0;
        let staging: Vec<&str> = self
            .lifetimes
            .stage_after
            .get(i)
            .into_iter()
            .flatten()
            .map(|&o| job.outputs[o].from.as_str())
            .collect();
        let done: Vec<&String> = self
            .lifetimes
            .drop_after
            .get(i)
            .into_iter()
            .flatten()
            .collect();
        let (later, now): (Vec<&String>, Vec<&String>) = done
            .into_iter()
            .partition(|t| staging.iter().any(|s| s.eq_ignore_ascii_case(t)));
        drop_tables(ctx, &now)?;
        for &o in self.lifetimes.stage_after.get(i).into_iter().flatten() {
            let t = Instant::now();
            memstat::reset_peak();
            let staged = sink::stage(ctx, &job.outputs[o], self.run).await?;
            let took = t.elapsed();
            info!(job = %job.name, output = %job.outputs[o].from, ms = took.as_millis() as u64,
                  rows = staged.rows(), bytes = staged.bytes(),
                  peak_rss_mb = memstat::peak_rss().map(mib), "output staged");
            if job.outputs[o].from.eq_ignore_ascii_case(&step.name) {
                written = staged.rows();
                let read_later = !later.iter().any(|t| t.eq_ignore_ascii_case(&step.name));
                if streamed && read_later {
                    ctx.deregister_table(step.name.as_str())
                        .map_err(|e| Error::df(format!("replace `{}`", step.name), e))?;
                    ctx.register_table(step.name.as_str(), staged.as_table()?)
                        .map_err(|e| Error::df(format!("read back `{}`", step.name), e))?;
                }
            }
            self.staged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((o, took, staged));
        }
        drop_tables(ctx, &later)?;
        memstat::release();
        Ok(written)
    }
}

fn drop_tables(ctx: &SessionContext, tables: &[&String]) -> Result<()> {
    for table in tables {
        ctx.deregister_table(table.as_str())
            .map_err(|e| Error::df(format!("drop step result `{table}`"), e))?;
    }
    Ok(())
}

type Executed = (Vec<(String, InputSummary)>, Vec<(String, StepOutcome)>);

/// Checks and registers the inputs, then runs every step (stopping after step `until` when
/// given; not running those in `skip`). Without `staging` every step result stays registered on
/// `ctx`; with it, outputs are staged and step results dropped as the run goes.
async fn execute_until(
    ctx: &SessionContext,
    job: &JobPlan,
    run_date: NaiveDate,
    until: Option<&str>,
    skip: &[&str],
    staging: Option<&Staging<'_>>,
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
    for (i, step) in job.steps.iter().enumerate() {
        if skip.contains(&step.name.as_str()) {
            if until == Some(step.name.as_str()) {
                break;
            }
            continue;
        }
        let started = Instant::now();
        memstat::reset_peak();
        let streamed = staging.is_some_and(|s| s.lifetimes.streamed.get(i) == Some(&true));
        // The session with the step's own settings; a streamed step is computed by its
        // output's write, so that write uses it too.
        let step_ctx = steps::session_for(ctx, step)?;
        let mut out = match &step.kind {
            StepKind::Sql { .. } if streamed => {
                // Computed while it is written to its output (in `after_step` below).
                let schema = sql::register_view(&step_ctx, job, step, run_date).await?;
                StepOutcome {
                    rows: 0,
                    bytes: 0,
                    elapsed: started.elapsed(),
                    schema,
                }
            }
            StepKind::Sql { .. } => sql::run(&step_ctx, job, step, run_date).await?,
            StepKind::Kmeans(spec) => {
                kmeans::run(&step_ctx, &job.name, &step.name, spec, run_date).await?
            }
            StepKind::Clv(spec) => {
                let (out, t) =
                    clv::step::run(&step_ctx, &job.name, &step.name, spec, run_date).await?;
                if let Some(t) = t {
                    info!(job = %job.name, step = %step.name, bgnbd_ms = t.bgnbd.as_millis() as u64,
                          gamma_gamma_ms = t.gamma_gamma.as_millis() as u64, predict_ms = t.predict.as_millis() as u64,
                          backtest_ms = t.backtest.as_millis() as u64, "models fitted");
                }
                out
            }
        };
        if streamed && let Some(staging) = staging {
            let written = staging.after_step(&step_ctx, job, i).await?;
            out.rows = written as usize;
            out.elapsed = started.elapsed();
        }
        info!(job = %job.name, step = %step.name, rows = out.rows, bytes = out.bytes,
              ms = out.elapsed.as_millis() as u64, peak_rss_mb = memstat::peak_rss().map(mib),
              rss_mb = memstat::rss().map(mib), streamed, "step done");
        step_report.push((step.name.clone(), out));
        if !streamed && let Some(staging) = staging {
            staging.after_step(ctx, job, i).await?;
        }
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
    execute_until(&ctx, job, run_date, until, &[], None).await?;
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
    execute_until(ctx, job, run_date, until, skip, None).await?;
    Ok(())
}

/// Runs the steps of `job` before `step`, then returns the physical plan of SQL step `step`
/// (with each operator's metrics when `analyze`: the step is run).
pub async fn explain_step(
    project: &Project,
    job: &JobPlan,
    step: &str,
    run_date: NaiveDate,
    analyze: bool,
) -> Result<String> {
    let Some(pos) = job.steps.iter().position(|s| s.name == step) else {
        let names: Vec<&str> = job.steps.iter().map(|s| s.name.as_str()).collect();
        return Err(Error::Usage(format!(
            "job `{}` has no step `{step}`; its steps: {}",
            job.name,
            names.join(", ")
        )));
    };
    let plan = &job.steps[pos];
    if !matches!(plan.kind, StepKind::Sql { .. }) {
        return Err(Error::Usage(format!(
            "step `{step}` is not a SQL step; only SQL steps have a query plan"
        )));
    }
    let ctx = engine::session(project)?;
    // The inputs and the steps before `step`; `step` and the ones after it are skipped.
    let later: Vec<&str> = job.steps[pos..].iter().map(|s| s.name.as_str()).collect();
    execute_until(&ctx, job, run_date, None, &later, None).await?;
    let step_err = |source| Error::Step {
        job: job.name.clone(),
        step: step.to_string(),
        source,
    };
    let batches = sql::dataframe(&steps::session_for(&ctx, plan)?, job, plan, run_date)
        .await?
        .explain(false, analyze)
        .map_err(step_err)?
        .collect()
        .await
        .map_err(step_err)?;
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(format!("{text}\n"))
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
        // A bad setting is already reported (job checks); the step is not planned.
        let Ok(ctx) = steps::session_for(&ctx, step) else {
            failed.push(step.name.clone());
            continue;
        };
        if let StepKind::Kmeans(spec) = &step.kind {
            if failed.contains(&spec.from) {
                failed.push(step.name.clone());
                continue;
            }
            match kmeans::plan(&ctx, &step.name, spec).await {
                Ok(tables) => schemas.extend(tables),
                Err(m) => {
                    diags.push(job.doc.diag(&format!("{}.kmeans", step.field), m));
                    failed.push(step.name.clone());
                }
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
                        // DataFusion names a missing table bare or fully qualified.
                        x.message.contains(&format!("'{f}'"))
                            || x.message.contains(&format!(".{f}'"))
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
