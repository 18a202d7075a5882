//! SQL steps: a file with one query, templated (`{{ run_date }}`, `{{ params.x }}`), planned by
//! DataFusion against the inputs and earlier steps, materialised once so outputs and later steps
//! do not recompute it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::{DataFrame, SessionContext};

use crate::config::Diagnostic;
use crate::error::{Error, Result};
use crate::job::{JobPlan, StepKind, StepPlan};

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub rows: usize,
    pub bytes: usize,
    pub elapsed: Duration,
    pub schema: SchemaRef,
}

/// Renders `step`'s SQL for `run_date` and plans it on `ctx`. Errors name the job and step.
pub async fn dataframe(
    ctx: &SessionContext,
    job: &JobPlan,
    step: &StepPlan,
    run_date: chrono::NaiveDate,
) -> Result<DataFrame> {
    let sql = job.render_sql(step, run_date).map_err(Error::Config)?;
    ctx.sql(&sql).await.map_err(|e| step_err(job, step, e))
}

fn step_err(job: &JobPlan, step: &StepPlan, source: DataFusionError) -> Error {
    Error::Step {
        job: job.name.clone(),
        step: step.name.clone(),
        source,
    }
}

/// Runs `step` and registers its (materialised) result under the step's name.
pub async fn run(
    ctx: &SessionContext,
    job: &JobPlan,
    step: &StepPlan,
    run_date: chrono::NaiveDate,
) -> Result<StepOutcome> {
    let started = Instant::now();
    let df = dataframe(ctx, job, step, run_date).await?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    // Kept in the plan's output partitions: later steps scan them in parallel as they are.
    let partitions = df
        .collect_partitioned()
        .await
        .map_err(|e| step_err(job, step, e))?;
    let partitions = super::compact(partitions).map_err(|m| {
        step_err(
            job,
            step,
            DataFusionError::Internal(format!("compact the result: {m}")),
        )
    })?;
    let rows = partitions.iter().flatten().map(|b| b.num_rows()).sum();
    let bytes = crate::memstat::batches_bytes(partitions.iter().flatten()) as usize;
    super::register(ctx, &step.name, schema.clone(), partitions)?;
    Ok(StepOutcome {
        rows,
        bytes,
        elapsed: started.elapsed(),
        schema,
    })
}

/// Registers `step` as a view (planned now, run when read): for a step whose result streams
/// straight into its output's files. Returns the result's schema.
pub async fn register_view(
    ctx: &SessionContext,
    job: &JobPlan,
    step: &StepPlan,
    run_date: chrono::NaiveDate,
) -> Result<SchemaRef> {
    let df = dataframe(ctx, job, step, run_date).await?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    ctx.register_table(&step.name, df.into_view())
        .map_err(|e| step_err(job, step, e))?;
    Ok(schema)
}

/// Plans `step` without reading data and registers an empty table of its result schema, so
/// later steps can be planned too. Problems point into the SQL file.
pub async fn plan(
    ctx: &SessionContext,
    job: &JobPlan,
    step: &StepPlan,
    run_date: chrono::NaiveDate,
) -> std::result::Result<SchemaRef, Vec<Diagnostic>> {
    let sql = job.render_sql(step, run_date)?;
    let file = match &step.kind {
        StepKind::Sql { file, .. } => file,
        StepKind::Clv(_) | StepKind::Kmeans(_) => &job.doc.file,
    };
    let diag = |e: DataFusionError| {
        let (line, col) = e
            .diagnostic()
            .and_then(|d| d.span)
            .map(|s| (s.start.line as usize, s.start.column as usize))
            .unwrap_or((1, 1));
        let message = e.strip_backtrace();
        let message = message.lines().next().unwrap_or_default().to_string();
        vec![Diagnostic {
            file: file.clone(),
            line: line.max(1),
            col: col.max(1),
            field: format!("{}.sql", step.field),
            message: format!("SQL does not plan: {message}"),
        }]
    };
    let df = ctx.sql(&sql).await.map_err(diag)?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let table = MemTable::try_new(schema.clone(), vec![vec![]]).map_err(diag)?;
    ctx.register_table(&step.name, Arc::new(table))
        .map_err(diag)?;
    Ok(schema)
}
