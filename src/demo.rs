//! `clvflow demo`: the one-command tour. Generates sample exports into the local store if they
//! are missing, validates and runs every job in dependency order, then reads each committed
//! output back (as a BI tool would, from the Hive folders) and shows what is there.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use chrono::NaiveDate;
use datafusion::arrow::datatypes::DataType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};

use crate::cli::print_report;
use crate::job::{JobPlan, Project};
use crate::sink::log::TableLog;
use crate::{deps, engine, generate, runner};

const EXPORTS: &str = "file://./data/exports/";

pub async fn run(project: &Project, date: NaiveDate, customers: u64) -> anyhow::Result<()> {
    let exports = project
        .stores
        .resolve(EXPORTS)
        .map_err(|m| anyhow!("the demo writes sample data to {EXPORTS}: {m}"))?;
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

    let order = deps::run_order(project)?;
    let mut plans = Vec::new();
    for name in &order {
        plans.push(runner::validate_job(project, name).await?);
        println!("validated job {name}");
    }
    for plan in &plans {
        let report = runner::run_job(project, plan, date, &runner::new_run_id()).await?;
        print_report(&report);
    }

    println!("\nWhat a BI tool reads now:");
    for plan in &plans {
        for out in &plan.outputs {
            show_table(project, TableLog::new(out.location.clone())?).await?;
        }
    }
    summary(project, &plans, date).await?;
    Ok(())
}

async fn show_table(project: &Project, log: TableLog) -> anyhow::Result<()> {
    let v = log.published().await?;
    let commit = log.read_commit(v).await?;
    let mut folders: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for f in &commit.files {
        let folder = f
            .path
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .unwrap_or_default();
        let e = folders.entry(folder).or_default();
        e.0 += 1;
        e.1 += f.rows;
    }
    let total: u64 = commit.files.iter().map(|f| f.rows).sum();
    println!(
        "\n{}  (commit v{}, {} rows, {} files, {} partition folders)",
        log.table.url,
        commit.version,
        total,
        commit.files.len(),
        folders.len()
    );
    for (folder, (files, rows)) in folders.iter().take(8) {
        println!("  {folder:<60} {rows:>8} rows  {files} file(s)");
    }
    if folders.len() > 8 {
        println!("  ... {} more folders", folders.len() - 8);
    }

    let ctx = engine::session(project)?;
    register(&ctx, &log, &commit.partition_by, "t").await?;
    // Wide tables (customer_value has ~40 columns) show their first columns only.
    let df = ctx.sql("SELECT * FROM t LIMIT 3").await?;
    let names: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
    df.select_columns(&shown)?
        .show()
        .await
        .context("read the table back")?;
    if names.len() > shown.len() {
        println!("  ... and {} more columns", names.len() - shown.len());
    }
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

/// Registers a committed output table (Hive folders, partition values as strings) as `name`.
async fn register(
    ctx: &datafusion::prelude::SessionContext,
    log: &TableLog,
    partition_by: &[String],
    name: &str,
) -> anyhow::Result<()> {
    let parts: Vec<(String, DataType)> = partition_by
        .iter()
        .map(|c| (c.clone(), DataType::Utf8))
        .collect();
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(parts);
    let url = ListingTableUrl::parse(log.table.dir_url())?;
    let schema = options.infer_schema(&ctx.state(), &url).await?;
    let table = ListingTable::try_new(
        ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(schema),
    )?;
    ctx.register_table(name, Arc::new(table))?;
    Ok(())
}

/// The answers the marketing and finance teams ask for, from the committed outputs of the
/// shipped customer_value job (skipped when a project has no such outputs).
async fn summary(project: &Project, plans: &[JobPlan], date: NaiveDate) -> anyhow::Result<()> {
    let ctx = engine::session(project)?;
    let mut have = Vec::new();
    for table in ["customer_value", "value_tiers", "ltv_cac"] {
        if let Some(out) = plans
            .iter()
            .flat_map(|p| &p.outputs)
            .find(|o| o.from == table)
        {
            let log = TableLog::new(out.location.clone())?;
            register(&ctx, &log, &out.partition_by, table).await?;
            have.push(table);
        }
    }
    if have.len() < 3 {
        return Ok(());
    }
    let rows = |sql: String| {
        let ctx = ctx.clone();
        async move {
            let batches = ctx.sql(&sql).await?.collect().await?;
            let mut out = Vec::new();
            for b in &batches {
                let cols: Vec<_> = b.columns().to_vec();
                for i in 0..b.num_rows() {
                    let mut row = Vec::new();
                    for c in &cols {
                        row.push(datafusion::arrow::util::display::array_value_to_string(
                            c, i,
                        )?);
                    }
                    out.push(row);
                }
            }
            anyhow::Ok(out)
        }
    };
    println!(
        "
Summary for {date}:"
    );
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
