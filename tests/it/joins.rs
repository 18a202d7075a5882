//! Joins over a table too large for a hash table under the memory limit are planned as
//! sort-merge joins (which spill), also when the table is a step result that was streamed to
//! its output and is read back from the staged files.

use crate::common::*;

/// A job whose first step streams a wide per-customer table (about 90 MB decoded) to its output;
/// the second step joins it back to the customers. Under a 128 MiB limit the read-back table is
/// above half the limit.
const JOB: &str = r#"
description: a join over a result read back from its output
inputs:
  customers:
    url: file://./data/exports/customers/
    columns: { customer_id: int64, acquisition_channel: utf8, acquisition_cost: float64 }
steps:
  - { name: wide, sql: sql/t_wide.sql }
  - { name: joined, sql: sql/t_joined.sql }
outputs:
  - { from: wide, url: file://./data/marts/wide/, partition_by: [run_date] }
  - { from: joined, url: file://./data/marts/joined/, partition_by: [run_date] }
"#;

const WIDE: &str = "select date '{{ run_date }}' as run_date, customer_id, \
     sha256(cast(customer_id as varchar)) as h1, md5(cast(customer_id as varchar)) as h2, \
     acquisition_cost * 2 as cost2 from customers";

const JOINED: &str = "select date '{{ run_date }}' as run_date, c.acquisition_channel, \
     count(*) as customers, sum(w.cost2) as cost2, max(w.h2) as h2 \
     from customers as c join wide as w on w.customer_id = c.customer_id \
     group by c.acquisition_channel";

const CUSTOMERS: u64 = 800_000;

fn project() -> TestProject {
    let p = TestProject::shipped();
    p.write("jobs/wide_join.yaml", JOB);
    p.write("sql/t_wide.sql", WIDE);
    p.write("sql/t_joined.sql", JOINED);
    p.edit("config.yaml", "memory_limit: 2GiB", "memory_limit: 128MiB");
    std::fs::create_dir_all(p.file("data/exports/customers")).unwrap();
    duckdb(
        p.path(),
        &format!(
            "copy (select range as customer_id, ['web', 'store', 'app'][range % 3 + 1] as acquisition_channel, \
             cast(range % 97 as double) / 4 as acquisition_cost from range({CUSTOMERS})) \
             to 'data/exports/customers/part-0.parquet' (format parquet)"
        ),
    );
    p
}

#[test]
fn a_join_over_a_large_result_read_back_from_its_output_is_planned_to_spill() {
    let p = project();
    let out = p.ok(&["run", "wide_join", "--date", RUN_DATE]);
    let log = stderr(&out);
    assert!(
        log.lines()
            .any(|l| l.contains("joins planned as sort-merge joins")
                && l.contains("step=joined")
                && l.contains("wide (")),
        "the read-back `wide` was not sized:\n{log}"
    );
    // The rows are those DuckDB computes from the exports.
    let got = duckdb(
        p.path(),
        "select acquisition_channel, customers, cost2, h2 from read_parquet('data/marts/joined/*/*.parquet') order by 1",
    );
    let want = duckdb(
        p.path(),
        "select acquisition_channel, count(*), sum(acquisition_cost * 2), max(md5(cast(customer_id as varchar))) \
         from read_parquet('data/exports/customers/*.parquet') group by 1 order by 1",
    );
    assert_eq!(got.len(), 3, "{got:?}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            (&g[0], &g[1], &g[3]),
            (&w[0], &w[1], &w[3]),
            "{got:?} vs {want:?}"
        );
        assert!(
            (f64_of(&g[2]) - f64_of(&w[2])).abs() < 1e-6,
            "{got:?} vs {want:?}"
        );
    }
}

/// A step's own `prefer_hash_join` wins over the size-based choice.
#[test]
fn a_steps_own_join_setting_is_kept() {
    let p = project();
    p.edit(
        "jobs/wide_join.yaml",
        "{ name: joined, sql: sql/t_joined.sql }",
        "{ name: joined, sql: sql/t_joined.sql, settings: { datafusion.optimizer.prefer_hash_join: \"true\" } }",
    );
    let out = p.clvflow(&["run", "wide_join", "--date", RUN_DATE]);
    let log = stderr(&out);
    assert!(!log.contains("joins planned as sort-merge joins"), "{log}");
    eprintln!("with a hash join: {}", show(&out));
}
