//! Joins whose smaller side is too large for a hash table under the memory limit are planned as
//! sort-merge joins (which spill), also when the tables are step results that were streamed to
//! their outputs and are read back from the staged files; a join of such a table to a small one
//! stays a hash join.

use crate::common::*;

/// A job whose first step streams a wide per-customer table (about 90 MB decoded) to its output;
/// `joined` joins it back to the (small) customers, `paired` to itself. Under a 192 MiB limit the
/// read-back table (67 MiB in its footers) is above a quarter of the limit, the customers (about
/// 8 MB) are not.
const JOB: &str = r#"
description: joins over a result read back from its output
inputs:
  customers:
    url: file://./data/exports/customers/
    columns: { customer_id: int64, acquisition_channel: utf8, acquisition_cost: float64 }
steps:
  - { name: wide, sql: sql/t_wide.sql }
  - { name: joined, sql: sql/t_joined.sql }
  - { name: paired, sql: sql/t_paired.sql }
outputs:
  - { from: wide, url: file://./data/marts/wide/, partition_by: [run_date] }
  - { from: joined, url: file://./data/marts/joined/, partition_by: [run_date] }
  - { from: paired, url: file://./data/marts/paired/, partition_by: [run_date] }
"#;

const WIDE: &str = "select date '{{ run_date }}' as run_date, customer_id, \
     sha256(cast(customer_id as varchar)) as h1, md5(cast(customer_id as varchar)) as h2, \
     acquisition_cost * 2 as cost2 from customers";

const JOINED: &str = "select date '{{ run_date }}' as run_date, c.acquisition_channel, \
     count(*) as customers, sum(w.cost2) as cost2, max(w.h2) as h2 \
     from customers as c join wide as w on w.customer_id = c.customer_id \
     group by c.acquisition_channel";

const PAIRED: &str = "select date '{{ run_date }}' as run_date, w.h1 = v.h1 as same, \
     count(*) as pairs, sum(v.cost2) as cost2, max(v.h2) as h2 \
     from wide as w join wide as v on v.customer_id = w.customer_id group by 2";

const CUSTOMERS: u64 = 800_000;

fn project() -> TestProject {
    let p = TestProject::shipped();
    p.write("jobs/wide_join.yaml", JOB);
    p.write("sql/t_wide.sql", WIDE);
    p.write("sql/t_joined.sql", JOINED);
    p.write("sql/t_paired.sql", PAIRED);
    p.edit("config.yaml", "memory_limit: 2GiB", "memory_limit: 192MiB");
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

/// The log lines that say a step's joins were planned as sort-merge joins.
fn sort_merge_lines(log: &str) -> Vec<&str> {
    (log.lines())
        .filter(|l| l.contains("joins planned as sort-merge joins"))
        .collect()
}

#[test]
fn a_join_of_two_large_results_read_back_from_their_output_is_planned_to_spill() {
    let p = project();
    let out = p.ok(&["run", "wide_join", "--date", RUN_DATE]);
    let log = stderr(&out);
    let lines = sort_merge_lines(&log);
    // `paired` joins the read-back `wide` (sized from its staged files) to itself; `joined`
    // builds its hash table from the small customers; `wide` has no join.
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("step=paired") && lines[0].contains("wide ("),
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
    let got = duckdb(
        p.path(),
        "select same, pairs, cost2, h2 from read_parquet('data/marts/paired/*/*.parquet')",
    );
    let want = duckdb(
        p.path(),
        "select true, count(*), sum(acquisition_cost * 2), max(md5(cast(customer_id as varchar))) \
         from read_parquet('data/exports/customers/*.parquet')",
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (&got[0][0], &got[0][1], &got[0][3]),
        (&want[0][0], &want[0][1], &want[0][3])
    );
    assert_eq!(f64_of(&got[0][1]), CUSTOMERS as f64);
    assert!((f64_of(&got[0][2]) - f64_of(&want[0][2])).abs() < 1e-6);
}

/// A step's own `prefer_hash_join`, or one in `engine.settings`, wins over the size-based choice.
#[test]
fn a_join_setting_of_the_step_or_the_engine_is_kept() {
    let p = project();
    p.edit(
        "jobs/wide_join.yaml",
        "{ name: paired, sql: sql/t_paired.sql }",
        "{ name: paired, sql: sql/t_paired.sql, settings: { datafusion.optimizer.prefer_hash_join: \"true\" } }",
    );
    let out = p.clvflow(&["run", "wide_join", "--date", RUN_DATE]);
    let log = stderr(&out);
    assert!(sort_merge_lines(&log).is_empty(), "{log}");
    eprintln!("with a hash join set on the step: {}", show(&out));

    let p = project();
    p.edit(
        "config.yaml",
        "memory_limit: 192MiB",
        "memory_limit: 192MiB, settings: { datafusion.optimizer.prefer_hash_join: \"true\" }",
    );
    let out = p.clvflow(&["run", "wide_join", "--date", RUN_DATE]);
    let log = stderr(&out);
    assert!(sort_merge_lines(&log).is_empty(), "{log}");
    eprintln!("with a hash join set on the engine: {}", show(&out));
}
