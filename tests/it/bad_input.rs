//! Every bad input gets a clear error, the right exit code, and leaves the last good output as
//! it was (file for file).

use crate::common::*;

/// A project with generated data and one good committed run.
fn committed() -> (TestProject, Vec<(String, u64)>, (i64, f64)) {
    let p = TestProject::shipped();
    p.generate(800);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let snap = p.snapshot("data/marts");
    let totals = summary_totals(&p);
    (p, snap, totals)
}

/// Runs the job, expects `code` and every part of `needles` in stderr, and the output intact.
fn fails(p: &TestProject, snap: &[(String, u64)], totals: (i64, f64), code: i32, needles: &[&str]) {
    let out = p.run();
    assert_eq!(out.status.code(), Some(code), "{}", show(&out));
    let err = stderr(&out);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        p.snapshot("data/marts"),
        snap,
        "the committed output changed"
    );
    assert_eq!(summary_totals(p), totals);
}

#[test]
fn config_mistakes_exit_2_and_name_file_line_column_and_field() {
    let (p, snap, totals) = committed();
    let job = "jobs/customer_value.yaml";
    let good = p.read(job);

    p.write(job, &good.replace("params:\n", "params: [\n"));
    fails(
        &p,
        &snap,
        totals,
        2,
        &["customer_value.yaml:", "(document): invalid YAML"],
    );

    p.write(
        job,
        &good.replace("timeout: 30m", "timeout: 30m\nowner: me"),
    );
    fails(
        &p,
        &snap,
        totals,
        2,
        &["customer_value.yaml:4:1: owner: unknown field `owner`"],
    );

    p.write(
        job,
        &good.replace("gross_margin: 0.30", "gross_margin: [0.30]"),
    );
    fails(
        &p,
        &snap,
        totals,
        2,
        &["customer_value.yaml:6:", "params.gross_margin"],
    );

    p.write(
        job,
        &good.replace(
            "partition_by: [run_date]\n",
            "partition_by: [run_date]\n    row_group_size: many\n",
        ),
    );
    fails(
        &p,
        &snap,
        totals,
        2,
        &["outputs[1].row_group_size", "invalid type"],
    );

    p.write(job, &good.replace("sql/orders_clean.sql", "sql/nope.sql"));
    fails(
        &p,
        &snap,
        totals,
        2,
        &[
            "customer_value.yaml:33:",
            "steps[0].sql: cannot read SQL file `sql/nope.sql`",
        ],
    );

    p.write(job, &good);
    let sql = p.read("sql/customer_value.sql");
    p.write(
        "sql/customer_value.sql",
        &sql.replace("{{ params.gross_margin }}", "{{ params.margin }}"),
    );
    fails(
        &p,
        &snap,
        totals,
        2,
        &[
            "sql/customer_value.sql:",
            "steps[8].sql: undefined template variable `params.margin`: add `margin` under `params:`",
        ],
    );

    p.write(
        "sql/customer_value.sql",
        &sql.replace("b.tenure_days,", "b.tenure_weeks,"),
    );
    fails(
        &p,
        &snap,
        totals,
        2,
        &[
            "sql/customer_value.sql:",
            "steps[8].sql: SQL does not plan",
            "tenure_weeks",
        ],
    );

    p.write("sql/customer_value.sql", &sql);
    p.write(
        job,
        &good.replace(
            "partition_by: [run_date, acquisition_channel]",
            "partition_by: [run_date, segment_name]",
        ),
    );
    fails(
        &p,
        &snap,
        totals,
        2,
        &[
            "customer_value.yaml:68:",
            "outputs[0].partition_by[1]: `segment_name` is not a column of step `customer_value`",
        ],
    );

    p.write(
        job,
        &good.replace(
            "url: file://./data/exports/orders/",
            "url: s3://nowhere/orders/",
        ),
    );
    fails(
        &p,
        &snap,
        totals,
        2,
        &[
            "customer_value.yaml:20:",
            "inputs.orders.url: `s3://nowhere/orders/` is in no store of config.yaml",
        ],
    );
}

#[test]
fn bad_data_exits_1_and_names_input_file_and_column() {
    let (p, snap, totals) = committed();
    let job = "jobs/customer_value.yaml";
    let good = p.read(job);
    // A file whose `amount` column was renamed upstream (pyarrow writes it, beside good files).
    let code = "import pyarrow.parquet as pq, sys, json\nt = pq.read_table(sys.argv[1])\npq.write_table(t.rename_columns(['customer_id', 'order_id', 'order_ts', 'amount_usd', 'channel']), sys.argv[2])\nprint(json.dumps(t.num_rows))";
    let dir = p.file("data/exports/orders/order_month=2026-02");
    py_json(
        code,
        &[
            dir.join("part-00000.parquet").to_str().unwrap(),
            dir.join("part-renamed.parquet").to_str().unwrap(),
        ],
    );
    fails(
        &p,
        &snap,
        totals,
        1,
        &[
            "input `orders`",
            // As the input's url is written, not a path without its leading `/`.
            "file file://./data/exports/orders/order_month=2026-02/part-renamed.parquet:",
            "missing column `amount` (declared float64)",
            "amount_usd Float64",
        ],
    );
    std::fs::remove_file(dir.join("part-renamed.parquet")).unwrap();
    // A column of another type.
    p.write(
        job,
        &good.replace("acquisition_cost: float64", "acquisition_cost: int64"),
    );
    fails(
        &p,
        &snap,
        totals,
        1,
        &[
            "input `customers`",
            "file file://./data/exports/customers/part-00000.parquet:",
            "column `acquisition_cost` is Float64 in the file, declared int64",
        ],
    );
    p.write(job, &good);

    // A corrupt Parquet file among good ones.
    p.write(
        "data/exports/orders/order_month=2026-01/zz-corrupt.parquet",
        "this is not parquet",
    );
    fails(
        &p,
        &snap,
        totals,
        1,
        &[
            "input `orders`",
            "zz-corrupt.parquet",
            "not a readable Parquet file",
        ],
    );
    std::fs::remove_file(p.file("data/exports/orders/order_month=2026-01/zz-corrupt.parquet"))
        .unwrap();

    // An empty input: no files at all.
    std::fs::rename(
        p.file("data/exports/customers"),
        p.file("data/exports/customers_away"),
    )
    .unwrap();
    fails(
        &p,
        &snap,
        totals,
        1,
        &["input `customers`", "no .parquet files", "allow_empty"],
    );
    std::fs::rename(
        p.file("data/exports/customers_away"),
        p.file("data/exports/customers"),
    )
    .unwrap();

    // An unreachable store.
    p.write("config.yaml", &format!("{}\n", p.read("config.yaml").replace(
        "stores:\n",
        "stores:\n  dead: { url: s3://dead, endpoint: \"http://127.0.0.1:9\", region: us-east-1, allow_http: true, max_retries: 0, options: { aws_access_key_id: x, aws_secret_access_key: y } }\n",
    )));
    p.write(
        job,
        &good.replace(
            "url: file://./data/exports/customers/",
            "url: s3://dead/customers/",
        ),
    );
    fails(
        &p,
        &snap,
        totals,
        1,
        &["s3://dead/customers/", "list input files", "store `dead`"],
    );
}

#[test]
fn null_partition_values_are_rejected_or_mapped_never_misfiled() {
    let (p, snap, totals) = committed();
    let sql = p.read("sql/customer_value.sql");
    // Customers with no customers-table row get a NULL channel when the COALESCE is removed.
    std::fs::remove_dir_all(p.file("data/exports/customers")).unwrap();
    p.ok(&[
        "generate",
        "--customers",
        "400",
        "--end",
        RUN_DATE,
        "--url",
        "file://./data/tmp/",
    ]);
    std::fs::rename(
        p.file("data/tmp/customers"),
        p.file("data/exports/customers"),
    )
    .unwrap();
    p.write(
        "sql/customer_value.sql",
        &sql.replace(
            "coalesce(c.acquisition_channel, 'unknown')",
            "c.acquisition_channel",
        ),
    );
    fails(
        &p,
        &snap,
        totals,
        1,
        &[
            "output `customer_value`",
            "partition column `acquisition_channel` has",
            "NULL value",
            "null_partition_value",
        ],
    );

    // Both outputs of the table: the Parquet one and the Delta one.
    let job = p.read("jobs/customer_value.yaml");
    p.write(
        "jobs/customer_value.yaml",
        &job.replace("partition_by: [run_date, acquisition_channel]", "partition_by: [run_date, acquisition_channel]\n    null_partition_value: __HIVE_DEFAULT_PARTITION__"),
    );
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    // The NULLs sit in the Hive default folder, which DuckDB (like Hive and Spark) reads as NULL.
    assert!(p.file("data/marts/customer_value/run_date=2026-11-22/acquisition_channel=__HIVE_DEFAULT_PARTITION__").is_dir());
    let rows = duckdb(
        p.path(),
        "select acquisition_channel, count(*) from read_parquet('data/marts/customer_value/*/*/*.parquet', hive_partitioning = true) group by 1 order by 1",
    );
    let nulls = rows
        .iter()
        .find(|r| r[0].is_null())
        .map(|r| r[1].as_i64().unwrap());
    let buyers_without_customer_row = duckdb(
        p.path(),
        "select count(distinct customer_id) from read_parquet('data/exports/orders/*/*.parquet') where customer_id > 400 and order_ts < timestamp '2026-11-22'",
    );
    assert!(
        nulls.is_some_and(|n| n > 0 && n <= buyers_without_customer_row[0][0].as_i64().unwrap()),
        "{rows:?}"
    );
    let total: i64 = rows.iter().map(|r| r[1].as_i64().unwrap()).sum();
    assert_eq!(total, expected_totals(&p, RUN_DATE).0);
    // In the Delta table the mapped folder is a NULL partition value, as Delta readers expect.
    let delta_nulls = crate::delta::delta_py(
        "import deltalake, json, os, sys\nt = deltalake.DeltaTable(sys.argv[1]).to_pyarrow_dataset().to_table()\nprint(json.dumps(t.column('acquisition_channel').null_count), flush=True)\nos._exit(0)",
        &[p.file("data/delta/customer_value").to_str().unwrap()],
    );
    assert_eq!(delta_nulls.as_i64(), nulls, "{rows:?}");
    assert!(
        !p.file("data/marts/customer_value/run_date=2026-11-22/acquisition_channel=")
            .exists()
    );
}

/// A run whose memory pool is too small fails (exit 1, outputs intact) with an error that says
/// which step and which settings to change, not only DataFusion's list of consumers.
#[test]
fn a_run_that_does_not_fit_its_memory_limit_says_what_to_set() {
    let (p, snap, totals) = committed();
    p.edit("config.yaml", "memory_limit: 2GiB", "memory_limit: 1MiB");
    fails(
        &p,
        &snap,
        totals,
        1,
        &[
            "memory budget exceeded: it needs more memory than engine.memory_limit (1 MiB) gives it: raise engine.memory_limit (aggregations and sorts already spill",
            "or lower the step's datafusion.execution.target_partitions",
            "Resources exhausted",
        ],
    );
    let err = stderr(&p.run());
    assert!(
        err.lines().any(|l| l.starts_with("error: ")
            && l.contains("step `")
            && l.contains("needs more memory")),
        "{err}"
    );
    // Under the greedy pool, the balanced one is advised.
    p.edit(
        "config.yaml",
        "memory_limit: 1MiB",
        "memory_limit: 1MiB, memory_pool: greedy",
    );
    fails(
        &p,
        &snap,
        totals,
        1,
        &["gives it: raise engine.memory_limit, or set engine.memory_pool: balanced (the default)"],
    );
}
