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
use crate::job::Project;
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
    let parts: Vec<(String, DataType)> = commit
        .partition_by
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
    ctx.register_table("t", Arc::new(table))?;
    let df = ctx.sql("SELECT * FROM t LIMIT 5").await?;
    df.show().await.context("read the table back")?;
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
