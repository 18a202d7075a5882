//! `validate`: every shipped job passes; mistakes are all reported as file:line:col: field: message.

use crate::common::*;

#[test]
fn every_shipped_job_validates() {
    let p = TestProject::shipped();
    let out = p.ok(&["validate"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let jobs = std::fs::read_dir(p.file("jobs")).unwrap().count();
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count(),
        jobs,
        "{stdout}"
    );
}

#[test]
fn three_mistakes_are_reported_together_with_positions() {
    let p = TestProject::shipped();
    // 1: unknown key (line 2), 2: SQL file that does not exist, 3: partition column not in the step.
    p.edit(
        "jobs/customer_value.yaml",
        "schedule: \"30 2 * * *\"",
        "schedul: \"30 2 * * *\"",
    );
    p.edit(
        "jobs/customer_value.yaml",
        "sql: sql/channel_summary.sql",
        "sql: sql/channel_sumary.sql",
    );
    p.edit(
        "jobs/customer_value.yaml",
        "partition_by: [run_date, acquisition_channel]",
        "partition_by: [run_date, segment_name]",
    );
    let out = p.clvflow(&["validate", "customer_value"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("jobs/customer_value.yaml:"))
        .collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].ends_with("jobs/customer_value.yaml:2:1: schedul: unknown field `schedul`, expected one of `description`, `schedule`, `timezone`, `depends_on`, `retries`, `timeout`, `catchup`, `params`, `inputs`, `steps`, `outputs`, `report` (remove it or fix its spelling)") , "{err}");
    assert!(
        lines.iter().any(|l| l.contains("customer_value.yaml:61:")
            && l.contains("steps[9].sql: cannot read SQL file `sql/channel_sumary.sql`")),
        "{err}"
    );
    assert!(lines.iter().any(|l| l.contains("customer_value.yaml:68:") && l.contains("outputs[0].partition_by[1]: `segment_name` is not a column of step `customer_value`")), "{err}");
}

#[test]
fn dependency_cycles_and_unknown_jobs_are_rejected() {
    let p = TestProject::shipped();
    p.write("jobs/a.yaml", "depends_on: [b]\ninputs:\n  customers: { url: file://./data/exports/customers/, columns: { customer_id: int64 } }\nsteps:\n  - { name: x, sql: sql/x.sql }\n");
    p.write("jobs/b.yaml", "depends_on: [a, nope]\ninputs:\n  customers: { url: file://./data/exports/customers/, columns: { customer_id: int64 } }\nsteps:\n  - { name: x, sql: sql/x.sql }\n");
    p.write("sql/x.sql", "select customer_id from customers");
    let out = p.clvflow(&["validate", "a", "b"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("b.yaml:1:") && err.contains("depends_on[1]: no job named `nope`"),
        "{err}"
    );
    // b does not load (unknown dependency), so the cycle a -> b -> a is only visible once b is fixed.
    p.write("jobs/b.yaml", "depends_on: [a]\ninputs:\n  customers: { url: file://./data/exports/customers/, columns: { customer_id: int64 } }\nsteps:\n  - { name: x, sql: sql/x.sql }\n");
    let err = stderr(&p.clvflow(&["validate", "a", "b"]));
    assert!(
        err.contains("a.yaml:1:1: depends_on: dependency cycle: a -> b -> a"),
        "{err}"
    );
}

#[test]
fn clv_model_options_are_checked_per_model() {
    let p = TestProject::shipped();
    // historical takes no backtest; formula needs expected_years; a costs table must exist.
    p.edit(
        "jobs/customer_value.yaml",
        "  - name: clv_discounted ",
        "  - { name: clv_historical, clv: { from: orders_clean, model: historical, backtest: btyd_backtest } }\n  - name: clv_discounted ",
    );
    p.edit(
        "jobs/customer_value.yaml",
        "model: discounted, discount_rate: 0.10, acquisition_costs: customers }",
        "model: discounted, discount_rate: 0.10, acquisition_costs: costs }",
    );
    p.edit(
        "jobs/customer_clv.yaml",
        "model: bgnbd_gamma_gamma, horizon_months: 12",
        "model: formula, horizon_months: 12",
    );
    let err = stderr(&p.clvflow(&["validate", "customer_value", "customer_clv"]));
    assert!(
        err.contains("customer_value.yaml:51:")
            && err.contains("steps[3].clv.backtest: not used by the `historical` model; remove it"),
        "{err}"
    );
    assert!(
        err.contains("steps[4].clv.acquisition_costs: no input or earlier step named `costs`"),
        "{err}"
    );
    assert!(
        err.contains("customer_clv.yaml:")
            && err.contains("steps[2].clv: the `formula` model needs `expected_years`"),
        "{err}"
    );
    // auto compares the models on a holdout: without a backtest table it has none.
    p.edit(
        "jobs/customer_clv.yaml",
        "model: formula, horizon_months: 12",
        "model: auto, horizon_months: 12",
    );
    let err = stderr(&p.clvflow(&["validate", "customer_clv"]));
    assert!(
        err.contains("customer_clv.yaml:")
            && err.contains("steps[2].clv: `model: auto` picks the model with the smallest holdout error: it needs `backtest`"),
        "{err}"
    );
}

#[test]
fn the_shipped_job_stages_each_output_after_its_step_and_drops_each_table_after_its_last_reader() {
    let p = TestProject::shipped();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (job, lifetimes) = rt.block_on(async {
        let project = clvflow::project::Project::load(&p.file("config.yaml")).unwrap();
        let job = clvflow::job::validate(&project, "customer_value")
            .await
            .unwrap();
        let ctx = project.engine().unwrap().session().unwrap();
        let date = chrono::NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
        let lifetimes =
            clvflow::run::results::ResultLifetimes::compute(&ctx, &job, &job.vars(date));
        (job, lifetimes)
    });
    let step = |name: &str| job.steps.iter().position(|s| s.name == name).unwrap();
    let dropped_after = |table: &str| {
        lifetimes
            .drop_after
            .iter()
            .position(|d| d.iter().any(|t| t == table))
            .unwrap_or_else(|| panic!("`{table}` is never dropped: {lifetimes:?}"))
    };
    // orders_clean: read last by clv_discounted (cohort_daily, the dynamic LTV's pass over the
    // orders, runs first, while nothing else is held); customer_features: by rfm (btyd_backtest
    // reads it earlier); the rfm -> clusters -> clv chain: by customer_value.
    assert!(step("cohort_daily") < step("customer_features"));
    assert_eq!(dropped_after("orders_clean"), step("clv_discounted"));
    // orders_clean is held with the three columns its readers use (customer_features and
    // cohort_daily: from their plans; clv_discounted: the rule models' order columns), not
    // order_id and gross_amount; a result that later model steps pass through whole (rfm, read
    // by the K-means step) keeps every column.
    let keep = |name: &str| lifetimes.keep_columns[step(name)].clone();
    assert_eq!(
        keep("orders_clean"),
        Some(
            ["customer_id", "net_amount", "order_ts"]
                .map(String::from)
                .into()
        )
    );
    assert_eq!(keep("rfm"), None);
    // Model steps hold only what later steps read too: `clv` (read by customer_value alone)
    // lets go of the BTYD summary it passes through from `clusters`, and the rule model's
    // result keeps the two values customer_value takes from it; `clusters`, which the clv
    // step passes through whole, keeps every column.
    let clv = keep("clv").expect("customer_value's reads of `clv` are known");
    for gone in ["run_date", "x", "t_x", "t", "mean_repeat_spend"] {
        assert!(!clv.contains(gone), "{gone}: {clv:?}");
    }
    for kept in [
        "customer_id",
        "segment",
        "cluster",
        "p_alive",
        "clv",
        "clv_rank",
    ] {
        assert!(clv.contains(kept), "{kept}: {clv:?}");
    }
    assert_eq!(
        keep("clv_discounted"),
        Some(["clv", "customer_id", "revenue"].map(String::from).into())
    );
    assert_eq!(keep("clusters"), None);
    assert_eq!(keep("customer_value"), None, "an output writes it");
    assert_eq!(dropped_after("cohort_daily"), step("cohort_value"));
    assert_eq!(dropped_after("customer_features"), step("rfm"));
    assert_eq!(dropped_after("clv"), step("customer_value"));
    assert_eq!(dropped_after("btyd_backtest"), step("clv"));
    // Every output is staged once, right after the step that makes it.
    let staged: Vec<usize> = lifetimes.stage_after.iter().flatten().copied().collect();
    assert_eq!(staged.len(), job.outputs.len(), "{lifetimes:?}");
    for (o, out) in job.outputs.iter().enumerate() {
        let maker = job
            .steps
            .iter()
            .position(|s| out.from == s.name || out.from.starts_with(&format!("{}_", s.name)))
            .unwrap();
        assert!(
            lifetimes.stage_after[maker].contains(&o),
            "{}: {lifetimes:?}",
            out.from
        );
    }
    // SQL steps written to outputs stream into the first (the Delta twin of customer_value reads
    // its files); model steps never stream.
    assert!(lifetimes.streamed[step("customer_value")]);
    assert!(lifetimes.streamed[step("ltv_cac")]);
    assert!(!lifetimes.streamed[step("clv")]);
    assert!(!lifetimes.streamed[step("rfm")]);
}

#[test]
fn a_bad_step_setting_is_reported_at_its_key_without_noise_from_later_steps() {
    let p = TestProject::shipped();
    let good = p.read("jobs/customer_value.yaml");
    let bad = good.replacen(
        "datafusion.execution.target_partitions: auto",
        "datafusion.execution.target_partitions: \"lots\"",
        1,
    );
    assert_ne!(bad, good);
    p.write("jobs/customer_value.yaml", &bad);
    p.edit(
        "jobs/customer_value.yaml",
        "skip_partial_aggregation_probe_rows_threshold: \"8192\"\n  - name: cohort_daily",
        "skip_partial_aggregation_probe_rows_threshold: \"8192\"\n      datafusion.execution.no_such_option: \"1\"\n  - name: cohort_daily",
    );
    let out = p.clvflow(&["validate", "customer_value"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(".yaml:") || l.contains(".sql:"))
        .collect();
    // Exactly the two settings: the steps that read orders_clean are not planned, not reported.
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines.iter().any(|l| l.contains("customer_value.yaml:36:7: steps[0].settings.datafusion.execution.target_partitions: `datafusion.execution.target_partitions: lots`")
        && l.contains("Error parsing 'lots' as usize")), "{err}");
    assert!(
        lines.iter().any(|l| l.contains(
            "customer_value.yaml:38:7: steps[0].settings.datafusion.execution.no_such_option:"
        ) && l.contains("no_such_option")),
        "{err}"
    );
}

#[test]
fn split_keys_are_checked_at_their_lines() {
    let p = TestProject::shipped();
    // cohort_daily (no customer_id in its rows) without `split_result: partial`; `split_result`
    // without `split_by` (customer_features); `split_by` on a model step (clv_discounted).
    p.edit(
        "jobs/customer_value.yaml",
        "    split_result: partial ",
        "    # split_result: partial ",
    );
    p.edit(
        "jobs/customer_value.yaml",
        "    split_by: customer_id                # reads orders_clean's buckets",
        "    split_result: partial                # reads orders_clean's buckets",
    );
    p.edit(
        "jobs/customer_value.yaml",
        "acquisition_costs: customers }\n",
        "acquisition_costs: customers }\n    split_by: customer_id\n",
    );
    let out = p.clvflow(&["validate", "customer_value"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(".yaml:")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines.iter().any(
            |l| l.contains("customer_value.yaml:40:5: steps[1].split_by:")
                && l.contains("the step's result has no column `customer_id`")
                && l.contains("split_result: partial")
        ),
        "{err}"
    );
    assert!(
        lines.iter().any(
            |l| l.contains("customer_value.yaml:47:5: steps[2].split_result:")
                && l.contains("has no `split_by`")
        ),
        "{err}"
    );
    assert!(
        lines.iter().any(
            |l| l.contains("customer_value.yaml:54:5: steps[3].split_by:")
                && l.contains("applies to `sql` steps only")
        ),
        "{err}"
    );
}

#[test]
fn step_settings_apply_to_their_step_only() {
    let p = TestProject::shipped();
    p.generate(300);
    // parse_float_as_decimal changes a literal's type: visible in each step's schema.
    p.write(
        "jobs/settings.yaml",
        "inputs:\n  customers: { url: file://./data/exports/customers/, columns: { customer_id: int64 } }\nsteps:\n  - name: a\n    sql: sql/a.sql\n    settings: { datafusion.sql_parser.parse_float_as_decimal: \"true\", datafusion.execution.target_partitions: \"3\" }\n  - { name: b, sql: sql/b.sql }\n",
    );
    p.write(
        "sql/a.sql",
        "select customer_id, 1.5 as x from customers group by customer_id",
    );
    p.write(
        "sql/b.sql",
        "select customer_id, x, 1.5 as y from a group by customer_id, x",
    );
    p.ok(&["validate", "settings"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let project = clvflow::project::Project::load(&p.file("config.yaml")).unwrap();
        // One engine (one memory pool) per project, whoever asks.
        assert!(std::sync::Arc::ptr_eq(
            &project.engine().unwrap(),
            &project.engine().unwrap()
        ));
        let job = clvflow::job::validate(&project, "settings").await.unwrap();
        let date = chrono::NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
        let ctx = clvflow::run::run_steps(&project, &job, date, None)
            .await
            .unwrap();
        let partitions = |t: &'static str| {
            let ctx = ctx.clone();
            async move {
                let provider = ctx.table_provider(t).await.unwrap();
                let held = provider
                    .downcast_ref::<clvflow::steps::rows::HeldTable>()
                    .unwrap();
                held.table().batches.len()
            }
        };
        let a = ctx.table("a").await.unwrap();
        let b = ctx.table("b").await.unwrap();
        assert!(
            matches!(
                a.schema().field_with_name(None, "x").unwrap().data_type(),
                datafusion::arrow::datatypes::DataType::Decimal128(..)
            ),
            "{:?}",
            a.schema()
        );
        assert_eq!(
            b.schema().field_with_name(None, "y").unwrap().data_type(),
            &datafusion::arrow::datatypes::DataType::Float64
        );
        // a hash-partitioned its aggregation 3 ways; b (and the session) keep config.yaml's 2.
        assert_eq!(partitions("a").await, 3);
        assert_eq!(partitions("b").await, 2);
        assert_eq!(ctx.state().config().target_partitions(), 2);
        let (na, nb) = (a.count().await.unwrap(), b.count().await.unwrap());
        assert_eq!((na, nb), (300, 300));
    });
}

#[test]
fn clv_steps_without_a_margin_use_the_jobs_gross_margin() {
    let p = TestProject::shipped();
    p.edit(
        "jobs/customer_value.yaml",
        "  gross_margin: 0.30 ",
        "  gross_margin: 0.42 ",
    );
    p.edit(
        "jobs/customer_value.yaml",
        "discount_rate: 0.10, acquisition_costs: customers }",
        "discount_rate: 0.10, acquisition_costs: customers, margin: 0.25 }",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let margins = |job: &str| {
        let project = clvflow::project::Project::load(&p.file("config.yaml")).unwrap();
        let job = rt.block_on(clvflow::job::validate(&project, job)).unwrap();
        job.steps
            .iter()
            .filter_map(|s| match &s.kind {
                clvflow::steps::StepKind::Clv(c) => Some((s.name.clone(), c.margin())),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let named = |v: &[(&str, f64)]| {
        v.iter()
            .map(|(n, m)| (n.to_string(), *m))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        margins("customer_value"),
        named(&[("clv_discounted", 0.25), ("clv", 0.42)])
    );
    // customer_clv has no params.gross_margin and sets its margin.
    assert_eq!(margins("customer_clv"), named(&[("clv", 0.30)]));
    p.edit(
        "jobs/customer_value.yaml",
        "acquisition_costs: customers, margin: 0.25 }",
        "acquisition_costs: customers }",
    );
    p.edit(
        "jobs/customer_value.yaml",
        "  gross_margin: 0.42 ",
        "  gross_margin: 1.5 ",
    );
    let err = stderr(&p.clvflow(&["validate", "customer_value"]));
    // Once, though two steps take their margin from it.
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("params.gross_margin"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(
        said[0].contains("customer_value.yaml:6:")
            && said[0]
                .contains("params.gross_margin: `1.5`: the CLV steps without `margin` use it"),
        "{err}"
    );
}

/// Defect: `customer_value` and `customer_clv` both wrote `data/marts/clv_fit/`. Two jobs whose
/// outputs are the same table, or one inside the other, are rejected, naming both places.
#[test]
fn two_jobs_writing_one_table_are_rejected_naming_both_files() {
    let p = TestProject::shipped();
    p.edit(
        "jobs/customer_clv.yaml",
        "url: file://./data/marts/customer_clv_fit/",
        "url: file://./data/marts/clv_fit/",
    );
    let out = p.clvflow(&["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("writes the same table"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("jobs/customer_value.yaml:74:5: outputs[2].url: job `customer_clv`")
            && lines[0].contains("jobs/customer_clv.yaml:30:")
            && lines[0].contains("outputs[1] `file://./data/marts/clv_fit/`"),
        "{err}"
    );
    // Running either job is refused too (exit 2), before anything is read.
    let run = p.clvflow(&["run", "customer_clv", "--date", RUN_DATE]);
    assert_eq!(run.status.code(), Some(2), "{}", show(&run));
    assert!(
        stderr(&run).contains("writes the same table"),
        "{}",
        show(&run)
    );
    // A table inside another one's folder is the same conflict.
    p.edit(
        "jobs/customer_clv.yaml",
        "url: file://./data/marts/clv_fit/",
        "url: file://./data/marts/value_tiers/clv/",
    );
    let err = stderr(&p.clvflow(&["validate", "customer_clv"]));
    assert!(
        err.contains("jobs/customer_clv.yaml:30:")
            && err.contains("job `customer_value` writes the same table or one inside it"),
        "{err}"
    );
    // Within one job as well.
    p.edit(
        "jobs/customer_clv.yaml",
        "url: file://./data/marts/value_tiers/clv/",
        "url: file://./data/marts/customer_clv/fit/",
    );
    let err = stderr(&p.clvflow(&["validate", "customer_clv"]));
    assert!(
        err.contains("outputs[1].url: outputs[0] writes the same table or one inside it"),
        "{err}"
    );
}

/// Defect: an error on a line with `{{ … }}` was reported at its column in the rendered SQL.
#[test]
fn sql_errors_are_located_in_the_file_as_written() {
    let p = TestProject::shipped();
    p.write(
        "jobs/pos.yaml",
        "params: { long_parameter_name: 1 }\ninputs:\n  customers: { url: file://./data/exports/customers/, columns: { customer_id: int64 } }\nsteps:\n  - { name: s, sql: sql/pos.sql }\n",
    );
    let line = "select {{ params.long_parameter_name }} as a, no_such_column from customers";
    p.write("sql/pos.sql", &format!("-- a comment\n{line}\n"));
    let out = p.clvflow(&["validate", "pos"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    let col = line.find("no_such_column").unwrap() + 1;
    assert!(
        err.contains(&format!(
            "sql/pos.sql:2:{col}: steps[0].sql: SQL does not plan"
        )),
        "want 2:{col}:\n{err}"
    );
    // A syntax error after a template: the parser's own position is the rendered one, so it
    // is not repeated in the message.
    p.write(
        "sql/pos.sql",
        "select {{ params.long_parameter_name }} as a, from from customers\n",
    );
    let err = stderr(&p.clvflow(&["validate", "pos"]));
    let col = "select {{ params.long_parameter_name }} as a, from from customers"
        .find("from from")
        .unwrap()
        + 6;
    assert!(
        err.contains(&format!("sql/pos.sql:1:{col}:")),
        "want 1:{col}:\n{err}"
    );
    assert!(!err.contains("at Line:"), "{err}");
}

/// Defect: `99999999999d` overflowed (a panic in debug builds).
#[test]
fn a_duration_too_large_is_a_config_error_at_its_line() {
    let p = TestProject::shipped();
    p.edit(
        "jobs/customer_value.yaml",
        "timeout: 30m",
        "timeout: 99999999999d",
    );
    let out = p.clvflow(&["validate", "customer_value"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("customer_value.yaml:3:")
            && err.contains("timeout")
            && err.contains("99999999999d"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_report_setting_is_checked_at_its_line() {
    let p = TestProject::shipped();
    let lines = p.read("jobs/customer_value.yaml").lines().count();
    p.edit(
        "jobs/customer_value.yaml",
        "report: { url: file://./data/reports/, currency: USD }",
        "report: { url: s3://nowhere/reports/, currency: \"\" }",
    );
    let out = p.clvflow(&["validate", "customer_value"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    for field in ["report.url", "report.currency"] {
        assert!(
            err.contains(&format!("customer_value.yaml:{lines}:")) && err.contains(field),
            "{field}: {err}"
        );
    }
    // Inside an output table: refused.
    let p = TestProject::shipped();
    p.edit(
        "jobs/customer_value.yaml",
        "report: { url: file://./data/reports/",
        "report: { url: file://./data/marts/ltv_cac/",
    );
    let out = p.clvflow(&["validate", "customer_value"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("report.url"), "{}", show(&out));
}

#[test]
fn delta_settings_are_checked_at_their_lines() {
    let p = TestProject::shipped();
    let job = p.read("jobs/customer_value.yaml");
    let line_of = |needle: &str| job.lines().position(|l| l.contains(needle)).unwrap() + 1;
    // `retention:` belongs to Delta outputs only; a checkpoint interval must be positive.
    let retention = line_of("retention: 7d");
    p.edit(
        "jobs/customer_value.yaml",
        "    format: delta  ",
        "    format: parquet  ",
    );
    p.edit(
        "jobs/customer_value.yaml",
        "retention: 7d",
        "retention: 7d\n    checkpoint_interval: 0",
    );
    let out = p.clvflow(&["validate", "customer_value"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("customer_value.yaml:{retention}:"))
            && err.contains("outputs[8].retention"),
        "{err}"
    );
    assert!(
        err.contains("is a setting of Delta tables: add `format: delta`"),
        "{err}"
    );
    assert!(
        err.contains(&format!("customer_value.yaml:{}:", retention + 1))
            && err.contains("outputs[8].checkpoint_interval: must be at least 1"),
        "{err}"
    );
    // A version of a Parquet input, and an unreadable as_of.
    let p = TestProject::shipped();
    let orders = line_of("url: file://./data/exports/orders/") + 1;
    p.edit(
        "jobs/customer_value.yaml",
        "url: file://./data/exports/orders/",
        "url: file://./data/exports/orders/\n    version: 3",
    );
    let out = p.clvflow(&["validate", "customer_value"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("customer_value.yaml:{orders}:"))
            && err.contains("inputs.orders.version"),
        "{err}"
    );
    assert!(err.contains("selects a version of a Delta table"), "{err}");
}
