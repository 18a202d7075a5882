//! `clvflow explain JOB STEP`: runs the job's steps before STEP (nothing is written), then shows
//! the physical plan of SQL step STEP; with `--analyze` it runs the step and shows each
//! operator's rows, time and memory (for tuning SQL).

use chrono::NaiveDate;
use datafusion::prelude::SessionContext;

use crate::engine;
use crate::error::{Error, Result};
use crate::job::JobPlan;
use crate::project::Project;
use crate::steps::{StepContext, StepKind};

/// The physical plan of SQL step `step` of `job` for `run_date`, as a table of text.
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
    if !job.steps[pos].kind.is_sql() {
        return Err(Error::Usage(format!(
            "step `{step}` is not a SQL step; only SQL steps have a query plan"
        )));
    }
    let engine = project.engine()?;
    if analyze && engine.cluster().is_some() {
        return Err(Error::Usage(
            "explain --analyze needs per-operator metrics, which clvflow's executors do not report to the Ballista scheduler (see README, Running on a cluster); run it with engine kind: local, or drop --analyze for the distributed plan".into(),
        ));
    }
    let ctx = engine.session()?;
    let scratch =
        super::begin_cluster_run(&engine, &ctx, &job.name, &super::new_run_id(), false).await?;
    let text = explain_on(&ctx, job, run_date, pos, analyze).await;
    if let Some(scratch) = scratch {
        scratch.remove().await;
    }
    text
}

async fn explain_on(
    ctx: &SessionContext,
    job: &JobPlan,
    run_date: NaiveDate,
    pos: usize,
    analyze: bool,
) -> Result<String> {
    let plan = &job.steps[pos];
    let StepKind::Sql(sql) = &plan.kind else {
        return Err(Error::Internal("explain of a step that is not SQL".into()));
    };
    // The inputs and the steps before `step` (each result dropped once `step` and the steps
    // before it no longer need it); `step` and the ones after it are skipped.
    let inputs = super::run_steps_before(ctx, job, run_date, pos).await?;
    let vars = job.vars(run_date);
    let settings =
        crate::steps::sql::partitions::resolve(ctx, &job.name, plan, &vars, &inputs).await;
    let step_ctx = engine::session_for_settings(ctx, &settings, &plan.field)?;
    let cx = StepContext {
        session: &step_ctx,
        job: &job.name,
        step: plan,
        run_date,
        vars: &vars,
        keep: None,
        split: None,
    };
    let batches = sql
        .dataframe(&cx)
        .await?
        .explain(false, analyze)
        .map_err(|e| cx.df_err(e))?
        .collect()
        .await
        .map_err(|e| cx.df_err(e))?;
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .map_err(|e| Error::arrow("format the plan", e))?;
    Ok(format!("{text}\n"))
}
