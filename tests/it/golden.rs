//! Golden tests: every sql/*.sql on a small hand-made fixture whose expected results were
//! worked out by hand from the documented rules (tests/golden/<step>.txt), one case per rule:
//! duplicates, NULL ids, partial and full returns, lines on the run date, a customer missing
//! from the customers table.

use std::path::Path;
use std::sync::Arc;

use chrono::NaiveDate;
use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::util::pretty::pretty_format_batches;

use crate::common::*;

fn ts(s: &str) -> i64 {
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M")
        .unwrap()
        .and_utc()
        .timestamp_micros()
}

fn orders() -> RecordBatch {
    let rows: [(Option<i64>, &str, &str, f64, &str); 10] = [
        (Some(1), "o1", "2026-01-10 10:00", 100.0, "web"),
        (Some(1), "o1", "2026-01-10 10:00", 100.0, "web"), // exact duplicate
        (Some(1), "o2", "2026-11-01 09:00", 50.0, "app"),
        (Some(1), "o2", "2026-11-05 09:00", -20.0, "app"), // partial return
        (Some(2), "o3", "2025-11-22 00:00", 80.0, "store"),
        (Some(2), "o4", "2026-03-01 12:00", 40.0, "web"),
        (Some(2), "o4", "2026-03-03 12:00", -40.0, "web"), // full return
        (None, "o5", "2026-02-01 00:00", 999.0, "web"),    // no customer id
        (Some(3), "o6", "2026-11-22 00:00", 70.0, "web"),  // on the run date: not yet
        (Some(4), "o7", "2026-05-31 00:00", 25.0, "app"),  // not in the customers table
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Int64, true),
        Field::new("order_id", DataType::Utf8, false),
        Field::new(
            "order_ts",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
        Field::new("amount", DataType::Float64, false),
        Field::new("channel", DataType::Utf8, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        )),
        Arc::new(TimestampMicrosecondArray::from(
            rows.iter().map(|r| ts(r.2)).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.3).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.4).collect::<Vec<_>>(),
        )),
    ];
    RecordBatch::try_new(schema, cols).unwrap()
}

fn customers() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Int64, false),
        Field::new(
            "signup_ts",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
        Field::new("acquisition_channel", DataType::Utf8, false),
        Field::new("acquisition_cost", DataType::Float64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1, 2, 3])),
        Arc::new(TimestampMicrosecondArray::from(vec![
            ts("2025-12-01 00:00"),
            ts("2025-11-01 00:00"),
            ts("2026-11-20 00:00"),
        ])),
        Arc::new(StringArray::from(vec!["paid_search", "organic", "social"])),
        Arc::new(Float64Array::from(vec![40.0, 2.0, 30.0])),
    ];
    RecordBatch::try_new(schema, cols).unwrap()
}

/// Fixed results of the model steps of the shipped jobs, for the fixture's buyers 1, 2 and 4:
/// (step, the step it reads, the columns it appends to that step's rows).
fn model_results() -> Vec<(&'static str, &'static str, RecordBatch)> {
    let f = |name: &str| Field::new(name, DataType::Float64, false);
    let clv = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, false),
            f("p_alive"),
            f("expected_purchases"),
            f("expected_spend"),
            f("clv"),
            Field::new("clv_rank", DataType::Int64, false),
        ])),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 4])),
            Arc::new(Float64Array::from(vec![0.9, 0.3, 0.4])),
            Arc::new(Float64Array::from(vec![2.0, 0.5, 1.0])),
            Arc::new(Float64Array::from(vec![30.0, 40.0, 25.0])),
            Arc::new(Float64Array::from(vec![18.0, 6.0, 7.5])),
            Arc::new(Int64Array::from(vec![1, 3, 2])),
        ],
    )
    .unwrap();
    let clusters = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, false),
            Field::new("cluster", DataType::Int64, false),
        ])),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 4])),
            Arc::new(Int64Array::from(vec![1, 2, 2])),
        ],
    )
    .unwrap();
    vec![("clusters", "rfm", clusters), ("clv", "clusters", clv)]
}

/// Runs `job`'s steps up to `until`; the model steps in model_results() are not run but built
/// from their fixed columns appended to the rows of the step they read.
async fn run_with_fixed_models(
    ctx: &datafusion::prelude::SessionContext,
    job: &clvflow::job::JobPlan,
    date: NaiveDate,
    until: &str,
) {
    let names: Vec<&str> = job.steps.iter().map(|s| s.name.as_str()).collect();
    let pos = |n: &str| names.iter().position(|s| *s == n);
    let target = pos(until).unwrap();
    let fixed: Vec<_> = model_results()
        .into_iter()
        .filter(|(step, _, _)| pos(step).is_some_and(|i| i < target))
        .collect();
    let Some(first) = fixed.first().and_then(|(s, _, _)| pos(s)) else {
        clvflow::run::run_steps_on(ctx, job, date, Some(until), &[])
            .await
            .unwrap();
        return;
    };
    clvflow::run::run_steps_on(ctx, job, date, Some(names[first - 1]), &[])
        .await
        .unwrap();
    let mut last = first;
    for (step, base, batch) in &fixed {
        let mem =
            datafusion::datasource::MemTable::try_new(batch.schema(), vec![vec![batch.clone()]])
                .unwrap();
        ctx.register_table(format!("{step}__fixed"), Arc::new(mem))
            .unwrap();
        let cols: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .skip(1)
            .map(|f| format!("f.{}", f.name()))
            .collect();
        let sql = format!(
            "create table {step} as select b.*, {} from {base} as b join {step}__fixed as f on f.customer_id = b.customer_id",
            cols.join(", ")
        );
        ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        last = last.max(pos(step).unwrap());
    }
    let done: Vec<&str> = names[..=last].to_vec();
    // The second call registers the inputs again.
    for input in &job.inputs {
        ctx.deregister_table(input.name.as_str()).unwrap();
    }
    clvflow::run::run_steps_on(ctx, job, date, Some(until), &done)
        .await
        .unwrap();
}

#[test]
fn every_sql_file_matches_its_golden_table() {
    let p = TestProject::shipped();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    rt.block_on(async {
        let project = clvflow::project::Project::load(&p.file("config.yaml")).unwrap();
        let exports = project.stores.resolve("file://./data/exports/").unwrap();
        clvflow::demo::generate::put_parquet(&exports, "orders/order_month=fixture/part-00000.parquet", &orders()).await.unwrap();
        clvflow::demo::generate::put_parquet(&exports, "customers/part-00000.parquet", &customers()).await.unwrap();
        let date = NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
        let mut jobs = Vec::new();
        for name in project.job_names().unwrap() {
            jobs.push(clvflow::job::validate(&project, &name).await.unwrap());
        }
        let mut checked = 0;
        let mut diffs = Vec::new();
        for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("sql")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            // The first job with a step running this file; run its steps up to that one.
            let (job, step) = jobs
                .iter()
                .find_map(|j| j.steps.iter().find(|s| s.name == name).map(|s| (j, s)))
                .unwrap_or_else(|| panic!("sql/{name}.sql is used by no step named `{name}` in jobs/: give it one, and a golden test"));
            // Model steps (K-means, BG/NBD) are not run on this tiny fixture: their results are
            // fixed columns (above), so the SQL after them is checked on its own.
            let ctx = project.engine().unwrap().session().unwrap();
            run_with_fixed_models(&ctx, job, date, &step.name).await;
            let batches = ctx.sql(&format!("select * from {} order by 1, 2", step.name)).await.unwrap().collect().await.unwrap();
            let got = pretty_format_batches(&batches).unwrap().to_string();
            let want = std::fs::read_to_string(golden_dir.join(format!("{name}.txt"))).unwrap_or_default();
            if got.trim() != want.trim() {
                diffs.push(format!("sql/{name}.sql differs from tests/golden/{name}.txt; it gives:\n{got}\nthe golden file has:\n{want}"));
            }
            checked += 1;
        }
        assert!(diffs.is_empty(), "{}", diffs.join("\n\n"));
        assert_eq!(checked, std::fs::read_dir(golden_dir).unwrap().count(), "a golden file without its SQL file");
    });
}
