//! `validate`: a job checked end to end without reading data. After [`super::build`] (the job
//! file and its SQL files), every step is planned on a session where the inputs are empty tables
//! of their declared schemas, so SQL is checked against the columns the run will see; outputs'
//! partition columns are checked against their steps' schemas; and across jobs, cycles of
//! `depends_on` and tables with two writers ([`super::graph`]). Every problem is reported.

use datafusion::arrow::datatypes::SchemaRef;

use super::{JobPlan, build, graph};
use crate::config::Diagnostic;
use crate::error::{Error, Result};
use crate::inputs;
use crate::project::Project;
use crate::steps::{ColumnReads, StepContext};

/// Checks job `name` end to end without reading data. Returns the plan, or every problem.
pub async fn validate(project: &Project, name: &str) -> Result<JobPlan> {
    let (mut plans, diags) = validate_jobs(project, &[name.to_string()]).await?;
    match (plans.pop(), diags.is_empty()) {
        (Some(plan), true) => Ok(plan),
        _ => Err(Error::Config(diags)),
    }
}

/// Checks `names` (each end to end, and the checks across jobs once). Returns the plans of the
/// jobs without problems and every problem found.
pub async fn validate_jobs(
    project: &Project,
    names: &[String],
) -> Result<(Vec<JobPlan>, Vec<Diagnostic>)> {
    let mut ok = Vec::new();
    let mut diags = Vec::new();
    for name in names {
        let found = match build::check(project, name) {
            Ok((mut plan, mut d)) => {
                let (problems, column_reads) = plan_schemas(project, &plan).await?;
                d.extend(problems);
                plan.column_reads = column_reads;
                (plan, d)
            }
            Err(Error::Config(d)) => {
                diags.extend(d);
                continue;
            }
            Err(e) => return Err(e),
        };
        match found {
            (plan, d) if d.is_empty() => ok.push(plan),
            (_, d) => diags.extend(d),
        }
    }
    let all = graph::load_all(project)?;
    diags.extend(graph::cycle(&all, names));
    let shared = graph::shared_tables(&all, names);
    let bad: Vec<&std::path::Path> = shared.iter().map(|d| d.file.as_path()).collect();
    ok.retain(|p| !bad.contains(&p.source.file.as_path()));
    let in_cycle = diags
        .iter()
        .any(|d| d.message.starts_with("dependency cycle"));
    if in_cycle {
        ok.clear();
    }
    diags.extend(shared);
    Ok((ok, diags))
}

/// Plans every step of `job` against its declared inputs, and checks the outputs' partition
/// columns against the schemas of their steps. Returns the problems and, per step, the columns
/// it reads of each table (`None` for a step that did not plan).
async fn plan_schemas(
    project: &Project,
    job: &JobPlan,
) -> Result<(Vec<Diagnostic>, Vec<Option<ColumnReads>>)> {
    let engine = project.engine()?;
    let session = engine.session()?;
    // Spans of identifiers: "column not found" then points at its place in the SQL file.
    session
        .state_ref()
        .write()
        .config_mut()
        .options_mut()
        .sql_parser
        .collect_spans = true;
    for input in &job.inputs {
        inputs::register_declared(&session, input)?;
    }
    let today = chrono::Utc::now().date_naive();
    let vars = job.vars(today);
    let source = &job.source;
    let mut diags = Vec::new();
    // Steps that did not check (a missing SQL file, a bad setting) count as failed for the noise
    // filter below.
    let mut failed: Vec<String> = job.left_out.clone();
    let mut schemas: Vec<(String, SchemaRef)> = Vec::new();
    let mut column_reads = Vec::with_capacity(job.steps.len());
    for step in &job.steps {
        let step_session =
            crate::engine::session_for_settings(&session, &step.settings, &step.field)?;
        let cx = StepContext {
            session: &step_session,
            job: &job.name,
            step,
            run_date: today,
            vars: &vars,
            keep: None,
            split: None,
        };
        let reads = step.kind.reads(&step_session, &vars).unwrap_or_default();
        if !step.kind.is_sql()
            && reads
                .iter()
                .any(|t| failed.iter().any(|f| f.eq_ignore_ascii_case(t)))
        {
            failed.push(step.name.clone());
            column_reads.push(None);
            continue;
        }
        // Planned before the step declares its own results (a step never reads those).
        column_reads.push(step.kind.column_reads(&step_session, &vars).await);
        match step.kind.declare(&cx, source).await {
            Ok(tables) => {
                if let (Some(column), Some((_, result))) = (&step.split_by, tables.first()) {
                    let mut read = Vec::new();
                    for name in reads.iter() {
                        if let Ok(t) = step_session.table_provider(name.as_str()).await {
                            read.push((name.clone(), t.schema()));
                        }
                    }
                    let field = format!("{}.split_by", step.field);
                    diags.extend(crate::steps::sql::split::check(
                        column,
                        step.split_result,
                        result,
                        &read,
                        |m| source.diag(&field, m),
                    ));
                }
                schemas.extend(tables)
            }
            Err(d) => {
                // A step that fails makes later steps that use it fail too: report only the
                // cause.
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
    for (i, out) in job.outputs.iter().enumerate() {
        let Some((_, schema)) = schemas.iter().find(|(n, _)| *n == out.from) else {
            continue;
        };
        if let Some(p) = out.partition_problem(schema) {
            diags.extend(source.problems(&format!("outputs[{i}]"), vec![p]));
        }
    }
    Ok((diags, column_reads))
}
