//! One run of one job for one run date: check and register the inputs, run the steps in order
//! (each output staged as soon as its step is done, each step result dropped after its last
//! reader: [`results`], [`staging`]), then commit every output. [`explain`] runs a job up to one
//! SQL step and shows that step's plan.
//!
//! The scheduler's executor (`crate::scheduler::execute`) calls [`run_job`] for every run,
//! scheduled, backfilled or manual; it holds the job's lease and records the history.

pub mod explain;
pub mod results;
mod staging;

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use datafusion::prelude::SessionContext;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::engine::{self, memory};
use crate::error::{Error, Result};
use crate::inputs::{self, InputSummary};
use crate::job::JobPlan;
use crate::project::Project;
use crate::report::{Fact, RunFacts};
use crate::sink::{self, OutputOutcome, RunInfo, failpoint};
use crate::steps::{StepContext, StepOutcome};
use results::ResultLifetimes;
use staging::Staging;

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
    /// The engine that ran it (`local`, `ballista df://…`).
    pub engine: String,
    /// Where the run's HTML report was written (when the job has `report:`).
    pub report_url: Option<String>,
}

impl RunReport {
    /// What the run report and the history keep of this run.
    pub fn facts(&self) -> RunFacts {
        let ms = |d: Duration| d.as_millis() as u64;
        let fact = |name: &str, rows: u64| Fact {
            name: name.to_string(),
            rows,
            files: None,
            ms: None,
            version: None,
        };
        RunFacts {
            engine: self.engine.clone(),
            elapsed_ms: ms(self.elapsed),
            inputs: (self.inputs.iter())
                .map(|(n, s)| Fact {
                    files: Some(s.files as u64),
                    ..fact(n, s.rows)
                })
                .collect(),
            steps: (self.steps.iter())
                .map(|(n, s)| Fact {
                    ms: Some(ms(s.elapsed)),
                    ..fact(n, s.rows as u64)
                })
                .collect(),
            outputs: (self.outputs.iter())
                .map(|o| Fact {
                    files: Some(o.files as u64),
                    version: Some(o.version),
                    ..fact(&o.table_url, o.rows)
                })
                .collect(),
        }
    }

    /// Rows and files written in all.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.outputs.iter().map(|o| o.rows).sum(),
            self.outputs.iter().map(|o| o.files as u64).sum(),
        )
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "run {} of job {} for {} succeeded in {:.2}s",
            self.run_id,
            self.job,
            self.run_date,
            self.elapsed.as_secs_f64()
        )?;
        for (name, s) in &self.inputs {
            writeln!(
                f,
                "  input  {name:<20} {:>10} rows in {:>4} files",
                s.rows, s.files
            )?;
        }
        for (name, s) in &self.steps {
            writeln!(
                f,
                "  step   {name:<20} {:>10} rows  {:>8.0} ms",
                s.rows,
                s.elapsed.as_secs_f64() * 1000.0
            )?;
        }
        for o in &self.outputs {
            writeln!(
                f,
                "  output {:<60} v{} {:>8} rows in {} files, replaced {}",
                o.table_url, o.version, o.rows, o.files, o.replaced
            )?;
        }
        if let Some(url) = &self.report_url {
            writeln!(f, "  report {url}")?;
        }
        Ok(())
    }
}

/// A fresh run id: sortable by time, unique.
pub fn new_run_id() -> String {
    let ts = chrono::Utc::now().format("%Y%m%dT%H%M%S");
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{ts}-{}", &rand[..12])
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// Runs `job` for `run_date` on the project's engine. Cancelling `cancel` before every output
/// is staged stops the run with nothing published (what was staged is deleted). Once all
/// outputs are staged they are committed and published regardless (a few object-store calls),
/// so a run is never cut between two outputs by a cancel.
pub async fn run_job(
    project: &Project,
    job: &JobPlan,
    run_date: NaiveDate,
    run_id: &str,
    cancel: &CancellationToken,
) -> Result<RunReport> {
    let started = Instant::now();
    let engine = project.engine()?;
    info!(job = %job.name, %run_date, run_id, engine = engine.describe(), "run started");
    let ctx = engine.session()?;
    // The caller holds the job's lease: scratch folders of earlier runs of the job are dead.
    let scratch = begin_cluster_run(&engine, &ctx, &job.name, run_id, true).await?;
    let result = run_job_on(&ctx, job, run_date, run_id, cancel, started).await;
    if let Some(scratch) = scratch {
        scratch.remove().await;
    }
    let mut report = result?;
    report.engine = engine.describe().to_string();
    // The outputs are committed: a report that cannot be written is a warning, not a failed
    // run (a retry would redo committed work); `clvflow report` writes it again.
    let Some(plan) = &job.report else {
        return Ok(report);
    };
    let facts = report.facts();
    let run = crate::report::RunRef {
        run_id: &report.run_id,
        facts: Some(&facts),
    };
    let t = Instant::now();
    match crate::report::write_after_run(project, &job.subject(), plan, run_date, run).await {
        Ok(url) => {
            info!(job = %job.name, %run_date, run_id, report = %url, ms = t.elapsed().as_millis() as u64,
                  "report written");
            report.report_url = Some(url);
        }
        Err(e) => {
            tracing::warn!(job = %job.name, %run_date, run_id, error = %crate::error::chain(&e),
                "the run's outputs are committed, but its report was not written; `clvflow report` writes it")
        }
    }
    Ok(report)
}

/// On the cluster engine: checks that the scheduler answers and starts the run's scratch
/// folder on `ctx` (see [`engine::cluster`]); `None` on the local engine.
async fn begin_cluster_run(
    engine: &engine::Engine,
    ctx: &SessionContext,
    job: &str,
    run_id: &str,
    remove_stale: bool,
) -> Result<Option<std::sync::Arc<engine::cluster::RunScratch>>> {
    let Some(cluster) = engine.cluster() else {
        return Ok(None);
    };
    cluster.check_reachable().await?;
    cluster
        .begin_run(ctx, job, run_id, remove_stale)
        .await
        .map(Some)
}

async fn run_job_on(
    ctx: &SessionContext,
    job: &JobPlan,
    run_date: NaiveDate,
    run_id: &str,
    cancel: &CancellationToken,
    started: Instant,
) -> Result<RunReport> {
    let ctx = ctx.clone();
    let run = RunInfo {
        run_id: run_id.to_string(),
        job: job.name.clone(),
        run_date,
    };
    let staging = Staging::new(
        &run,
        ResultLifetimes::compute(&ctx, job, &job.vars(run_date)),
    );
    let work = async {
        let r = execute(&ctx, job, run_date, None, &[], Some(&staging), None).await?;
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
        info!(job = %job.name, output = %out.from, format = out.format.name(), table = %o.table_url, version = o.version, rows = o.rows,
              files = o.files, bytes = o.bytes, replaced = %o.replaced,
              stage_ms = staging_time.as_millis() as u64, commit_ms = t.elapsed().as_millis() as u64,
              "output committed");
        output_report.push(o);
    }
    let elapsed = started.elapsed();
    info!(job = %job.name, %run_date, run_id, ms = elapsed.as_millis() as u64,
          max_rss_mb = memory::max_rss().map(mib),
          store_retries_in_process = crate::storage::instrumented::StoreOps::global().all_retries(),
          "run succeeded");
    Ok(RunReport {
        run_id: run_id.to_string(),
        job: job.name.clone(),
        run_date,
        inputs: input_report,
        steps: step_report,
        outputs: output_report,
        elapsed,
        engine: String::new(),
        report_url: None,
    })
}

type Executed = (Vec<(String, InputSummary)>, Vec<(String, StepOutcome)>);

/// Checks and registers the inputs, then runs every step (stopping after step `until` when
/// given; not running those in `skip`). With `staging`, outputs are staged and step results
/// dropped as the run goes; without it every step result stays registered on `ctx`, unless
/// `keep` says which steps still read them (a result is dropped once no step up to `keep.pos`
/// reads it).
async fn execute(
    ctx: &SessionContext,
    job: &JobPlan,
    run_date: NaiveDate,
    until: Option<&str>,
    skip: &[&str],
    staging: Option<&Staging<'_>>,
    keep: Option<&Keep>,
) -> Result<Executed> {
    let mut input_report = Vec::new();
    for input in &job.inputs {
        let t = Instant::now();
        let s = inputs::register_checked(ctx, &job.name, input).await?;
        info!(job = %job.name, input = %input.name, files = s.files, rows = s.rows, bytes = s.bytes,
              ms = t.elapsed().as_millis() as u64, "input checked");
        input_report.push((input.name.clone(), s));
    }
    let vars = job.vars(run_date);
    let mut step_report = Vec::new();
    for (i, step) in job.steps.iter().enumerate() {
        if skip.contains(&step.name.as_str()) {
            if until == Some(step.name.as_str()) {
                break;
            }
            continue;
        }
        let started = Instant::now();
        memory::reset_peak();
        crate::engine::pool::take_peak(ctx);
        let streamed = staging.is_some_and(|s| s.streamed(i));
        // Sizes of the tables a step may read that are files: inputs, and results read back
        // from their staged outputs.
        let mut known = input_report.clone();
        known.extend(staging.map(Staging::read_back).unwrap_or_default());
        // The session with the step's own settings; a streamed step is computed by its
        // output's write, so that write uses it too.
        let settings =
            crate::steps::sql::partitions::resolve(ctx, &job.name, step, &vars, &known).await;
        let step_ctx = engine::session_for_settings(ctx, &settings, &step.field)?;
        let split = match streamed {
            false => crate::steps::sql::split::plan(ctx, &job.name, step, &vars, &known).await,
            true => None,
        };
        let cx = StepContext {
            session: &step_ctx,
            job: &job.name,
            step,
            run_date,
            vars: &vars,
            keep: staging.and_then(|s| s.keep_columns(i)),
            split: split.as_ref(),
        };
        let mut out = match (&step.kind, staging) {
            (crate::steps::StepKind::Sql(sql), Some(staging)) if streamed => {
                // Computed while it is written to its output.
                sql.register_view(&cx).await?;
                let rows = staging.after_step(&step_ctx, job, i).await?;
                StepOutcome {
                    rows: rows as usize,
                    elapsed: started.elapsed(),
                    ..StepOutcome::default()
                }
            }
            (kind, _) => {
                let out = kind.run(&cx).await?;
                // On the cluster, a model step's results (held here) go where the cluster
                // reads them.
                if !kind.is_sql()
                    && let Some(scratch) = engine::cluster::RunScratch::of(ctx)
                {
                    for table in kind.produces(&step.name) {
                        engine::cluster::share(ctx, &scratch, &table).await?;
                    }
                }
                out
            }
        };
        if !out.timings.is_empty() {
            let ms: Vec<String> = out
                .timings
                .iter()
                .map(|(k, d)| format!("{k}={}", d.as_millis()))
                .collect();
            info!(job = %job.name, step = %step.name, timings = %ms.join(" "), "models fitted");
        }
        out.elapsed = started.elapsed();
        let peak = crate::engine::pool::take_peak(ctx);
        info!(job = %job.name, step = %step.name, rows = out.rows, bytes = out.bytes, spilled_bytes = out.spilled,
              ms = out.elapsed.as_millis() as u64, peak_rss_mb = memory::peak_rss().map(mib),
              pool_peak_mb = peak.map(|p| mib(p.pool as u64)), heap_peak_mb = peak.map(|p| mib(p.process as u64)),
              rss_mb = memory::rss().map(mib), heap_mb = engine::heap::live().map(|b| mib(b as u64)),
              streamed, "step done");
        step_report.push((step.name.clone(), out));
        if !streamed && let Some(staging) = staging {
            staging.after_step(ctx, job, i).await?;
        }
        if staging.is_none()
            && let Some(keep) = keep
            && i < keep.pos
        {
            for table in keep.unneeded_after(job, i) {
                ctx.deregister_table(&table)
                    .map_err(|e| Error::df(format!("drop step result `{table}`"), e))?;
            }
            memory::release();
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
    let engine = project.engine()?;
    let ctx = engine.session()?;
    // Its scratch stays while the caller reads the results; the job's next run removes it.
    begin_cluster_run(&engine, &ctx, &job.name, &new_run_id(), false).await?;
    execute(&ctx, job, run_date, until, &[], None, None).await?;
    Ok(ctx)
}

/// Runs the steps of `job` before step `pos` on `ctx`, dropping each step result as soon as
/// neither a later step before `pos` nor step `pos` reads it (for `explain`: holding every
/// result would not fit the memory limit that a run fits in).
pub async fn run_steps_before(
    ctx: &SessionContext,
    job: &JobPlan,
    run_date: NaiveDate,
    pos: usize,
) -> Result<Vec<(String, InputSummary)>> {
    let vars = job.vars(run_date);
    let reads: Option<Vec<BTreeSet<String>>> = job.steps[..=pos]
        .iter()
        .map(|s| s.kind.reads(ctx, &vars))
        .collect();
    let later: Vec<&str> = job.steps[pos..].iter().map(|s| s.name.as_str()).collect();
    let keep = reads.map(|reads| Keep { pos, reads });
    let (inputs, _) = execute(ctx, job, run_date, None, &later, None, keep.as_ref()).await?;
    Ok(inputs)
}

/// For a run without staging up to step `pos`: what steps `..=pos` read (lower-cased).
struct Keep {
    pos: usize,
    reads: Vec<BTreeSet<String>>,
}

impl Keep {
    /// The tables of steps `..=i` that no step in `i + 1..=pos` reads.
    fn unneeded_after(&self, job: &JobPlan, i: usize) -> Vec<String> {
        let later = &self.reads[(i + 1).min(self.pos)..];
        job.steps[..=i]
            .iter()
            .flat_map(|s| s.kind.produces(&s.name))
            .filter(|t| !later.iter().any(|r| r.contains(&t.to_lowercase())))
            .collect()
    }
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
    execute(ctx, job, run_date, until, skip, None, None).await?;
    Ok(())
}
