//! `clvflow demo`: the one-command tour. Generates sample exports into the local store if they
//! are missing ([`generate`]), validates and runs every job in dependency order (as `clvflow
//! run` does: lease, history), then reads each committed output back (as a BI tool would, from
//! the Hive folders) and shows what is there.

pub mod generate;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::NaiveDate;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::job::{self, JobPlan, graph};
use crate::project::Project;
use crate::report::data::register_output;
use crate::scheduler::execute::{self, JobExecutor, Outcome, Request, RunContext};
use crate::scheduler::metrics::Metrics;
use crate::sink::log::TableLog;
use crate::state::{StateStore, Status, Trigger};

const EXPORTS: &str = "file://./data/exports/";

fn df_err(context: &str) -> impl Fn(datafusion::error::DataFusionError) -> Error + '_ {
    move |e| Error::df(context.to_string(), e)
}

pub async fn run(project: &Project, date: NaiveDate, customers: u64) -> Result<()> {
    let exports = project
        .stores
        .resolve(EXPORTS)
        .map_err(|m| Error::Usage(format!("the demo writes sample data to {EXPORTS}: {m}")))?;
    let marker = project.root.join("data/exports/customers");
    if marker.exists() {
        println!(
            "using the sample exports in {} (delete the folder to regenerate)",
            exports.url
        );
    } else {
        let opts = generate::Options {
            customers,
            end: date,
            ..generate::Options::default()
        };
        let s = generate::generate(&opts, &exports).await?;
        println!(
            "generated {} customers and {} order rows ({} files) in {}",
            s.customers, s.order_rows, s.files, exports.url
        );
    }

    let order = graph::run_order(&graph::load_all(project)?);
    let mut plans = Vec::new();
    for name in &order {
        plans.push(job::validate(project, name).await?);
        println!("validated job {name}");
    }
    let ctx = RunContext {
        state: StateStore::open(project)?,
        executor: Arc::new(JobExecutor {
            project: project.clone(),
        }),
        jobs: plans.iter().map(|p| (p.name.clone(), p.clone())).collect(),
        lease_ttl: project.scheduler.lease_ttl,
        owner: execute::owner(),
        metrics: Arc::new(Metrics::default()),
    };
    for plan in &plans {
        let req = Request {
            force: true,
            ..Request::new(&plan.name, date, Trigger::Manual)
        };
        match ctx
            .execute_reporting(&req, &CancellationToken::new())
            .await?
        {
            (Outcome::Finished(Status::Succeeded), Some(report)) => print!("{report}"),
            (Outcome::Busy, _) => {
                return Err(Error::Usage(format!(
                    "job `{}` is running in another process; run the demo when it ends",
                    plan.name
                )));
            }
            (other, _) => {
                return Err(Error::Internal(format!(
                    "job `{}` ended {other:?} without an error",
                    plan.name
                )));
            }
        }
    }

    println!("\nWhat a BI tool reads now:");
    for plan in &plans {
        for out in &plan.outputs {
            if out.format.is_delta() {
                show_delta_table(project, out).await?;
            } else {
                show_table(project, TableLog::new(out.location.clone())?).await?;
            }
        }
    }
    summary(project, &plans, date).await?;
    let pages: Vec<String> = plans
        .iter()
        .filter_map(|p| p.report.as_ref().map(|r| r.page(&p.name, date).url))
        .collect();
    if !pages.is_empty() {
        println!("\nRun reports (open in a browser):");
        for url in pages {
            println!("  {url}");
        }
    }
    Ok(())
}

/// Prints a table's files per partition folder (path relative to the table, rows).
fn show_files(url: &str, what: &str, files: &[(String, u64)]) {
    let mut folders: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (path, rows) in files {
        let folder = path
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .unwrap_or_default();
        let e = folders.entry(folder).or_default();
        e.0 += 1;
        e.1 += rows;
    }
    let total: u64 = files.iter().map(|f| f.1).sum();
    println!(
        "\n{url}  ({what}, {total} rows, {} files, {} partition folders)",
        files.len(),
        folders.len()
    );
    for (folder, (files, rows)) in folders.iter().take(8) {
        println!("  {folder:<60} {rows:>8} rows  {files} file(s)");
    }
    if folders.len() > 8 {
        println!("  ... {} more folders", folders.len() - 8);
    }
}

/// Prints the first columns of the first rows of table `t` on `ctx`.
async fn show_rows(ctx: &datafusion::prelude::SessionContext) -> Result<()> {
    // Wide tables (customer_value has ~40 columns) show their first columns only.
    let df = ctx
        .sql("SELECT * FROM t LIMIT 3")
        .await
        .map_err(df_err("read the table back"))?;
    let names: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
    df.select_columns(&shown)
        .map_err(df_err("read the table back"))?
        .show()
        .await
        .map_err(df_err("read the table back"))?;
    if names.len() > shown.len() {
        println!("  ... and {} more columns", names.len() - shown.len());
    }
    Ok(())
}

async fn show_delta_table(project: &Project, out: &crate::sink::Output) -> Result<()> {
    let latest = crate::storage::delta::Version::Latest;
    let Some(table) = crate::storage::delta::open(&out.location, &latest).await? else {
        return Ok(());
    };
    let files: Vec<(String, u64)> = crate::sink::delta::current_files(&table)?
        .into_iter()
        .map(|(p, _, rows)| (p, rows.unwrap_or(0)))
        .collect();
    let version = table.version().unwrap_or_default();
    show_files(
        &out.location.url,
        &format!("Delta table, version {version}"),
        &files,
    );
    let ctx = project.engine()?.session()?;
    let provider = table
        .table_provider()
        .await
        .map_err(df_err("read the Delta table back"))?;
    ctx.register_table("t", provider)
        .map_err(df_err("read the Delta table back"))?;
    show_rows(&ctx).await?;
    if let Some(path) = out.location.url.strip_prefix("file://") {
        println!(
            "  duckdb: LOAD delta; SELECT * FROM delta_scan('{}');",
            path.trim_end_matches('/')
        );
    }
    Ok(())
}

async fn show_table(project: &Project, log: TableLog) -> Result<()> {
    let v = log.published().await?;
    let commit = log.read_commit(v).await?;
    let files: Vec<(String, u64)> = commit
        .files
        .iter()
        .map(|f| (f.path.clone(), f.rows))
        .collect();
    show_files(
        &log.table.url,
        &format!("commit v{}", commit.version),
        &files,
    );
    let ctx = project.engine()?.session()?;
    register_output(&ctx, &log, &commit.partition_by, "t").await?;
    show_rows(&ctx).await?;
    if let Some(path) = log
        .table
        .url
        .strip_prefix("file://")
        .map(|p| p.trim_end_matches('/'))
    {
        let depth = "*/".repeat(commit.partition_by.len());
        println!(
            "  duckdb: SELECT * FROM read_parquet('{path}/{depth}*.parquet', hive_partitioning = true);"
        );
    }
    Ok(())
}

/// The answers the marketing and finance teams ask for, from the committed outputs of the
/// shipped customer_value job (skipped when a project has no such outputs).
async fn summary(project: &Project, plans: &[JobPlan], date: NaiveDate) -> Result<()> {
    let ctx = project.engine()?.session()?;
    let mut have = Vec::new();
    for table in ["customer_value", "value_tiers", "ltv_cac"] {
        if let Some(out) = plans
            .iter()
            .flat_map(|p| &p.outputs)
            .find(|o| o.from == table && !o.format.is_delta())
        {
            let log = TableLog::new(out.location.clone())?;
            register_output(&ctx, &log, &out.partition_by, table).await?;
            have.push(table);
        }
    }
    if have.len() < 3 {
        return Ok(());
    }
    let rows = |sql: String| {
        let ctx = ctx.clone();
        async move {
            let batches = ctx
                .sql(&sql)
                .await
                .map_err(df_err("summarise the outputs"))?
                .collect()
                .await
                .map_err(df_err("summarise the outputs"))?;
            let mut out = Vec::new();
            for b in &batches {
                let cols: Vec<_> = b.columns().to_vec();
                for i in 0..b.num_rows() {
                    let mut row = Vec::new();
                    for c in &cols {
                        row.push(
                            datafusion::arrow::util::display::array_value_to_string(c, i)
                                .map_err(|e| Error::arrow("show a value", e))?,
                        );
                    }
                    out.push(row);
                }
            }
            Ok::<_, Error>(out)
        }
    };
    println!("\nSummary for {date}:");
    println!("  RFM segments (customers):");
    for r in rows(format!(
        "SELECT segment, COUNT(*) AS n FROM customer_value WHERE run_date = '{date}' GROUP BY segment ORDER BY n DESC, segment"
    ))
    .await?
    {
        println!("    {:<22} {:>8}", r[0], r[1]);
    }
    for r in rows(format!(
        "SELECT customer_share, predicted_value_share, historical_value_share FROM value_tiers WHERE run_date = '{date}' AND value_tier = 'top_20'"
    ))
    .await?
    {
        println!(
            "  top 20% of customers by predicted CLV: {:.1}% of predicted value, {:.1}% of profit to date",
            r[1].parse::<f64>().unwrap_or(f64::NAN) * 100.0,
            r[2].parse::<f64>().unwrap_or(f64::NAN) * 100.0
        );
    }
    let channels = rows(format!(
        "SELECT acquisition_channel, ltv_to_cac FROM ltv_cac WHERE run_date = '{date}' ORDER BY ltv_to_cac"
    ))
    .await?;
    let below: Vec<String> = channels
        .iter()
        .filter(|r| r[1].parse::<f64>().is_ok_and(|v| v < 1.0))
        .map(|r| format!("{} ({})", r[0], r[1]))
        .collect();
    println!(
        "  LTV:CAC by channel: {}",
        channels
            .iter()
            .map(|r| format!("{} {}", r[0], r[1]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if below.is_empty() {
        println!("  channels below LTV:CAC = 1: none");
    } else {
        println!("  channels below LTV:CAC = 1: {}", below.join(", "));
    }
    Ok(())
}
