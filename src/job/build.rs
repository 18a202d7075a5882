//! From a parsed job file to a [`JobPlan`]: stores resolved, SQL files read and their templates
//! checked, names cross-checked, schedule parsed. Every problem found is collected (never only
//! the first) as a [`Diagnostic`] pointing into the job or SQL file; each component checks its
//! own settings (`Input::check`, `StepKind::check`, `Output::check`) and this module checks
//! what ties them together.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::schedule::Schedule;
use super::{JobPlan, RetryPolicy};
use crate::config::job::JobSpec;
use crate::config::{self, Diagnostic, Document};
use crate::engine::EngineConfig;
use crate::engine::setting_problem;
use crate::error::{Error, Result};
use crate::inputs::Input;
use crate::project::Project;
use crate::sink::Output;
use crate::steps::{CheckContext, Step, StepKind};

/// Loads job `name` as far as it goes: the plan holds every part that checked out, and the
/// diagnostics every problem (for `validate`, which goes on to plan what it can). A job file
/// that is missing or does not parse at all is an error.
pub fn check(project: &Project, name: &str) -> Result<(JobPlan, Vec<Diagnostic>)> {
    let file = project.job_file(name);
    if !file.exists() {
        return Err(project.no_such_job(name));
    }
    let doc: Document<JobSpec> = config::load(&file).map_err(Error::Config)?;
    let known_jobs: BTreeSet<String> = project.job_names()?.into_iter().collect();
    Ok(build(name, doc, project, &known_jobs))
}

/// Names a step or input may have: SQL identifiers that need no quoting.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn build(
    name: &str,
    doc: Document<JobSpec>,
    project: &Project,
    known_jobs: &BTreeSet<String>,
) -> (JobPlan, Vec<Diagnostic>) {
    let spec = &doc.value;
    let source = &doc.source;
    // Structural problems first; the checks below still run on what parsed.
    let mut diags = doc.problems.clone();
    let mut params = BTreeMap::new();
    for (k, v) in spec.params.iter() {
        params.insert(format!("params.{k}"), v.to_string());
    }
    params.insert("job".into(), name.to_string());
    let mut template_names = params.clone();
    for date_var in ["run_date", "run_date_nodash"] {
        template_names.insert(date_var.into(), String::new());
    }

    let mut tables = BTreeSet::new();
    let mut inputs = Vec::new();
    for (iname, ispec) in spec.inputs.iter() {
        let field = format!("inputs.{iname}");
        if !valid_name(iname) {
            diags.push(source.diag(
                &field,
                format!("input name `{iname}` must be lower_snake_case (it is a SQL table name)"),
            ));
        }
        tables.insert(iname.clone());
        match Input::check(iname, ispec, &project.stores) {
            Ok(input) => {
                let on_cluster = matches!(project.engine_config, EngineConfig::Ballista { .. });
                if on_cluster && input.format == crate::config::job::InputFormat::Delta {
                    // deltalake's scan is not one Ballista can ship to its executors.
                    diags.push(source.diag(
                        &format!("{field}.format"),
                        "Delta inputs are read on the local engine (`engine: { kind: local }`) only; on a cluster, read the table's Parquet output instead",
                    ));
                }
                inputs.push(input)
            }
            Err(problems) => diags.extend(source.problems(&field, problems)),
        }
    }

    // The job's gross margin, the default of its CLV steps' `margin`. Reported once, if a step
    // without `margin` needs it.
    let gross_margin = spec.params.get("gross_margin").map(|v| {
        v.to_string()
            .parse::<f64>()
            .ok()
            .filter(|m| (0.0..=1.0).contains(m))
            .ok_or(())
    });
    let bad_gross_margin_used = Cell::new(false);
    let mut steps = Vec::new();
    // Steps whose kind did not check: their extra tables are unknown.
    let mut unchecked: Vec<&str> = Vec::new();
    for (i, s) in spec.steps.iter().enumerate() {
        let field = format!("steps[{i}]");
        if !valid_name(&s.name) {
            diags.push(source.diag(
                &format!("{field}.name"),
                format!(
                    "step name `{}` must be lower_snake_case (it is a SQL table name)",
                    s.name
                ),
            ));
        }
        if tables.contains(&s.name) {
            diags.push(source.diag(
                &format!("{field}.name"),
                format!(
                    "`{}` is already the name of an input or earlier step; pick another",
                    s.name
                ),
            ));
        }
        let mut settings_ok = true;
        for (key, value) in &s.settings {
            // `auto` partitions: chosen from the data when the step runs.
            if crate::steps::sql::partitions::is_auto(key, value) {
                continue;
            }
            if let Some(m) = setting_problem(key, value) {
                diags.push(source.diag(&format!("{field}.settings.{key}"), m));
                settings_ok = false;
            }
        }
        let cx = CheckContext {
            step: &s.name,
            field: &field,
            source,
            tables: &tables,
            root: &project.root,
            template_names: &template_names,
            gross_margin,
            bad_gross_margin_used: &bad_gross_margin_used,
        };
        let kind = StepKind::check(&s.kind, &cx);
        if let Some(column) = &s.split_by
            && !matches!(s.kind, crate::config::steps::StepKindSpec::Sql(_))
        {
            diags.push(source.diag(
                &format!("{field}.split_by"),
                format!(
                    "`split_by: {column}` applies to `sql` steps only (a `{}` step reads its input as it is)",
                    s.kind.key()
                ),
            ));
        }
        if s.split_by.is_none() && s.split_result != crate::config::steps::SplitResult::default() {
            diags.push(source.diag(
                &format!("{field}.split_result"),
                "`split_result` says what the buckets of a `split_by` step give: this step has no `split_by`".to_string(),
            ));
        }
        tables.insert(s.name.clone());
        match kind {
            Ok(kind) => {
                for t in kind.produces(&s.name).into_iter().skip(1) {
                    if !tables.insert(t.clone()) {
                        diags.push(source.diag(
                            &format!("{field}.name"),
                            format!("`{t}` (a table this step registers) is already a table name"),
                        ));
                    }
                }
                // A step with a bad setting is left out, as one that does not check: validate
                // then reports the setting, not every later step that reads it.
                if settings_ok {
                    steps.push(Step {
                        name: s.name.clone(),
                        field,
                        settings: s.settings.clone(),
                        split_by: s.split_by.clone(),
                        split_result: s.split_result,
                        kind,
                    });
                } else {
                    unchecked.push(&s.name);
                }
            }
            Err(d) => {
                diags.extend(d);
                unchecked.push(&s.name);
            }
        }
    }
    if bad_gross_margin_used.get()
        && let Some(v) = spec.params.get("gross_margin")
    {
        diags.push(source.diag(
            "params.gross_margin",
            format!("`{v}`: the CLV steps without `margin` use it as theirs; a share of spend between 0 and 1"),
        ));
    }
    if spec.steps.is_empty() {
        diags.push(source.diag("steps", "a job needs at least one step"));
    }

    let mut outputs: Vec<Output> = Vec::new();
    for (i, o) in spec.outputs.iter().enumerate() {
        let field = format!("outputs[{i}]");
        let of_unchecked = unchecked
            .iter()
            .any(|u| o.from.strip_prefix(u).is_some_and(|r| r.starts_with('_')));
        if (!tables.contains(&o.from) || spec.inputs.get(&o.from).is_some()) && !of_unchecked {
            let known: Vec<&str> = tables
                .iter()
                .filter(|t| spec.inputs.get(t.as_str()).is_none())
                .map(String::as_str)
                .collect();
            diags.push(source.diag(
                &format!("{field}.from"),
                format!("no step named `{}`; steps: {}", o.from, known.join(", ")),
            ));
        }
        match Output::check(o, &project.stores) {
            Ok(out) => {
                let earlier = outputs
                    .iter()
                    .position(|e| e.location.overlaps(&out.location));
                if let Some(j) = earlier {
                    diags.push(source.diag(
                        &format!("{field}.url"),
                        format!(
                            "outputs[{j}] writes the same table or one inside it; give each output its own folder"
                        ),
                    ));
                }
                outputs.push(out);
            }
            Err(problems) => diags.extend(source.problems(&field, problems)),
        }
    }

    let report = spec.report.as_ref().and_then(|r| {
        match crate::report::ReportPlan::check(r, &project.stores) {
            Ok(plan) => {
                if let Some(o) = outputs.iter().find(|o| {
                    o.location.overlaps(&plan.location.child(name))
                }) {
                    diags.push(source.diag(
                        "report.url",
                        format!(
                            "the reports of this job would be written inside the output table {}; use a folder of its own",
                            o.location.written
                        ),
                    ));
                }
                Some(plan)
            }
            Err(problems) => {
                diags.extend(source.problems("report", problems));
                None
            }
        }
    });

    for (i, d) in spec.depends_on.iter().enumerate() {
        if d == name {
            diags.push(source.diag(&format!("depends_on[{i}]"), "a job cannot depend on itself"));
        } else if !known_jobs.contains(d) {
            diags.push(source.diag(
                &format!("depends_on[{i}]"),
                format!("no job named `{d}` in the jobs folder"),
            ));
        }
    }
    let tz = match &spec.timezone {
        None => Some(project.timezone),
        Some(tz) => {
            let parsed = tz.parse::<chrono_tz::Tz>().ok();
            if parsed.is_none() {
                diags.push(source.diag(
                    "timezone",
                    format!("unknown time zone `{tz}`; use an IANA name such as Europe/Berlin"),
                ));
            }
            parsed
        }
    };
    let schedule = match (&spec.schedule, tz) {
        (Some(expr), Some(tz)) => match Schedule::parse(expr, tz) {
            Ok(s) => Some(s),
            Err(m) => {
                diags.push(source.diag("schedule", m));
                None
            }
        },
        _ => None,
    };
    let retries = spec.retries.as_ref().map_or(
        RetryPolicy {
            max: 0,
            backoff: Duration::from_secs(60),
        },
        |r| RetryPolicy {
            max: r.max,
            backoff: r.backoff.0,
        },
    );
    let plan = JobPlan {
        name: name.to_string(),
        description: spec.description.clone(),
        source: source.clone(),
        schedule,
        depends_on: spec.depends_on.clone(),
        retries,
        timeout: spec.timeout.map(|t| t.0),
        catchup: spec.catchup.unwrap_or(project.scheduler.catchup),
        params,
        inputs,
        steps,
        outputs,
        report,
        left_out: unchecked.into_iter().map(str::to_string).collect(),
        column_reads: Vec::new(),
    };
    (plan, diags)
}
