//! The run report: one self-contained HTML page per job and run date, at
//! `<report.url>/<job>/run_date=<date>/report.html`, written through the same object store as
//! the outputs and only after every output of the run committed (a failed run writes none, so
//! it never replaces an earlier page). The page is built from the committed output tables
//! alone ([`data`]) plus the run's facts (kept in its history record), so `clvflow report`
//! rebuilds the same page later without running the job.
//!
//! Which sections appear depends on which tables the job wrote (found by their columns):
//! [`customers`] (segments, concentration, CLV distribution, P(alive) matrices), [`model`] (fit
//! and backtest), [`business`] (clusters, channels, cohorts). Charts are inline SVG drawn with
//! plotters ([`charts`]); nothing is loaded from the network.

mod business;
mod charts;
mod customers;
pub mod data;
mod html;
mod model;

use bytes::Bytes;
use chrono::NaiveDate;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::config::job::ReportSpec;
use crate::error::{Error, Problem, Result};
use crate::project::Project;
use crate::sink::Output;
use crate::storage::{Location, Stores};
use html::{Fmt, Section, Table, esc, int};

/// A job's checked `report:` setting.
#[derive(Debug, Clone)]
pub struct ReportPlan {
    pub location: Location,
    pub currency: String,
}

impl ReportPlan {
    pub fn check(spec: &ReportSpec, stores: &Stores) -> std::result::Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        if spec.currency.trim().is_empty() || spec.currency.chars().count() > 8 {
            problems.push(Problem::new(
                "currency",
                "must be a currency code such as EUR or a symbol such as €",
            ));
        }
        match stores.resolve(&spec.url) {
            Ok(location) if problems.is_empty() => Ok(Self {
                location,
                currency: spec.currency.trim().to_string(),
            }),
            Ok(_) => Err(problems),
            Err(m) => {
                problems.push(Problem::new("url", m));
                Err(problems)
            }
        }
    }

    /// Where the page of `job` for `date` goes.
    pub fn page(&self, job: &str, date: NaiveDate) -> Location {
        self.location
            .child(&format!("{job}/run_date={date}/report.html"))
    }
}

/// What a run did, as the report shows it (and the history keeps it for rebuilding the page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFacts {
    pub engine: String,
    pub elapsed_ms: u64,
    pub inputs: Vec<Fact>,
    pub steps: Vec<Fact>,
    pub outputs: Vec<Fact>,
}

/// One input, step or output: rows, files (inputs, outputs) and time (steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub name: String,
    pub rows: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// What a page is about: a job's name, description and output tables.
pub struct Subject<'a> {
    pub job: &'a str,
    pub description: Option<&'a str>,
    pub outputs: &'a [Output],
}

/// The run that a page shows.
pub struct RunRef<'a> {
    pub run_id: &'a str,
    pub facts: Option<&'a RunFacts>,
}

/// Builds the page of `job` for `date` from its committed outputs.
pub async fn build(
    project: &Project,
    job: &Subject<'_>,
    currency: &str,
    date: NaiveDate,
    run: Option<RunRef<'_>>,
) -> Result<String> {
    let tables = data::Tables::open(project, job, date).await?;
    if tables.list.is_empty() {
        return Err(Error::Usage(format!(
            "job `{}` has no committed output rows for {date}: run it for that date first",
            job.job
        )));
    }
    let f = Fmt::new(currency);
    let mut warnings = Vec::new();
    let mut sections: Vec<Section> = Vec::new();
    for s in [
        customers::segments(&tables, &f).await?,
        customers::concentration(&tables, &f).await?,
        customers::distribution(&tables, &f).await?,
        customers::matrices(&tables, &f).await?,
        model::fit(&tables, &f, &mut warnings).await?,
        business::clusters(&tables, &f).await?,
        business::channels(&tables, &f, &mut warnings).await?,
        business::cohorts(&tables, &f).await?,
    ]
    .into_iter()
    .flatten()
    {
        sections.push(s);
    }
    let glance: Vec<(String, String)> = sections.iter().flat_map(|s| s.kpis.clone()).collect();
    sections.insert(0, run_section(job, date, &tables, run.as_ref(), &warnings));
    if !glance.is_empty() {
        sections.insert(
            0,
            Section {
                id: "glance",
                title: "At a glance".into(),
                lead: "The headline answers of this run; each is explained in its section below."
                    .into(),
                body: html::kpis(&glance),
                kpis: Vec::new(),
            },
        );
    }
    let subtitle = match job.description {
        Some(d) => format!("run date {date} · {d}"),
        None => format!("run date {date}"),
    };
    Ok(html::page(
        &format!("clvflow report: {}", job.job),
        &subtitle,
        &sections,
    ))
}

fn run_section(
    job: &Subject<'_>,
    date: NaiveDate,
    tables: &data::Tables,
    run: Option<&RunRef<'_>>,
    warnings: &[String],
) -> Section {
    let mut body = String::new();
    let facts = run.and_then(|r| r.facts);
    let mut items = vec![(job.job.to_string(), "job"), (date.to_string(), "run date")];
    if let Some(r) = run {
        items.push((r.run_id.to_string(), "run id"));
    }
    if let Some(f) = facts {
        items.push((f.engine.clone(), "engine"));
        items.push((format!("{:.1} s", f.elapsed_ms as f64 / 1000.0), "run time"));
    }
    body.push_str(&html::kpis(&items));
    for w in warnings {
        body.push_str(&format!("<p class=\"warn\">{}</p>", esc(w)));
    }
    match facts {
        Some(f) => {
            let mut t = Table::new("run-facts", &["", "name", "rows", "files", "time", "version"]);
            let groups = [("input", &f.inputs), ("step", &f.steps), ("output", &f.outputs)];
            for (kind, list) in groups {
                for x in list {
                    t.row(
                        &[("kind", kind.to_string()), ("rows", x.rows.to_string())],
                        &[
                            kind.to_string(),
                            esc(&x.name),
                            int(x.rows as f64),
                            x.files.map_or(String::new(), |n| int(n as f64)),
                            x.ms.map_or(String::new(), |ms| format!("{:.2} s", ms as f64 / 1000.0)),
                            x.version.map_or(String::new(), |v| format!("v{v}")),
                        ],
                    );
                }
            }
            body.push_str(&format!(
                "<details><summary>Rows and time per input, step and output</summary>{}</details>",
                t.html()
            ));
        }
        None => body.push_str(
            "<p>No record of the run that wrote these tables was found in the history: the page shows the committed tables only.</p>",
        ),
    }
    let mut t = Table::new("tables", &["table read for this page", "from step"]);
    for tab in &tables.list {
        t.row(&[], &[esc(&tab.url), esc(&tab.name)]);
    }
    body.push_str(&format!(
        "<details><summary>Tables this page was built from</summary>{}</details>",
        t.html()
    ));
    Section {
        id: "run",
        title: "Run facts".into(),
        lead: if warnings.is_empty() {
            "What ran, how much data it read and wrote, and how long it took.".into()
        } else {
            format!("{} warning(s) below.", warnings.len())
        },
        body,
        kpis: Vec::new(),
    }
}

/// After a run's outputs committed: builds and writes its page; returns the page's URL.
pub async fn write_after_run(
    project: &Project,
    job: &Subject<'_>,
    plan: &ReportPlan,
    date: NaiveDate,
    run: RunRef<'_>,
) -> Result<String> {
    let page = build(project, job, &plan.currency, date, Some(run)).await?;
    let at = plan.page(job.job, date);
    put(&at, page).await?;
    Ok(at.written)
}

/// Writes one page (object stores replace an object whole: a reader sees the old page or the
/// new one).
async fn put(at: &Location, page: String) -> Result<()> {
    at.store
        .object_store
        .put(&at.path, PutPayload::from(Bytes::from(page)))
        .await
        .map(|_| ())
        .map_err(|e| Error::store(&at.written, "write the run report", e))
}

/// `clvflow report`: rebuilds the page of `job` for `date` from its committed outputs and the
/// run that wrote them (from the history; None when there is no record); writes it to `out` (a
/// local file) or to its place under `report.url`. Returns where it went.
pub async fn rebuild(
    project: &Project,
    job: &Subject<'_>,
    plan: Option<&ReportPlan>,
    date: NaiveDate,
    run: Option<RunRef<'_>>,
    out: Option<&std::path::Path>,
) -> Result<String> {
    if job.outputs.is_empty() {
        return Err(Error::Usage(format!(
            "job `{}` has no outputs to report on",
            job.job
        )));
    }
    let currency = plan.map_or(crate::config::job::DEFAULT_CURRENCY, |p| &p.currency);
    match (out, plan) {
        (Some(path), _) => {
            let page = build(project, job, currency, date, run).await?;
            std::fs::write(path, page).map_err(|e| Error::io(path, "write the report", e))?;
            Ok(path.display().to_string())
        }
        (None, Some(plan)) => {
            let page = build(project, job, currency, date, run).await?;
            let at = plan.page(job.job, date);
            put(&at, page).await?;
            Ok(at.written)
        }
        (None, None) => Err(Error::Usage(format!(
            "job `{}` has no `report:` setting; add one, or give --out FILE",
            job.job
        ))),
    }
}
