//! Delta Lake outputs (`format: delta`) read by two independent Delta readers: DuckDB's Delta
//! extension (delta_scan, loaded from the file the `duckdb-ext-delta` package ships) and
//! delta-rs's Python package, both from `.venv-delta` (scripts/test). The shipped job writes
//! `customer_value` both as Parquet (clvflow's commit log) and as Delta: the two must hold the
//! same rows.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

const DELTA: &str = "data/delta/customer_value";
const OTHER_DATE: &str = "2026-11-01";

fn delta_python() -> String {
    std::env::var("CLVFLOW_TEST_DELTA_PYTHON").unwrap_or_else(|_| {
        panic!("CLVFLOW_TEST_DELTA_PYTHON is not set: run the tests with ./scripts/test (it installs DuckDB's Delta extension and deltalake)")
    })
}

pub(crate) fn delta_py(code: &str, args: &[&str]) -> Value {
    py_json_in(&delta_python(), code, args)
}

/// Per run date: customers and net revenue, as DuckDB's delta_scan, deltalake (at `version`,
/// or the latest) and DuckDB's Hive Parquet reader (of the Parquet twin) see the tables; plus
/// the Delta table's version, history and current files.
const READ: &str = r#"
import glob, json, os, sys, sysconfig
import duckdb, deltalake
root, table, twin, version = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
os.chdir(root)
ext = glob.glob(os.path.join(sysconfig.get_paths()['purelib'], 'duckdb_ext', 'extensions', 'v1.4.4', '*', 'delta.duckdb_extension'))[0]
con = duckdb.connect(config={'allow_unsigned_extensions': 'true'})
con.execute(f"LOAD '{ext}'")
q = "select cast(run_date as varchar), count(*), round(sum(monetary), 2) from {} group by 1 order by 1"
out = {}
if version == 'latest':
    out['duckdb'] = con.execute(q.format(f"delta_scan('{os.path.abspath(table)}')")).fetchall()
    out['parquet'] = con.execute(q.format(f"read_parquet('{twin}/*/*/*.parquet', hive_partitioning = true)")).fetchall() if twin else []
dt = deltalake.DeltaTable(table) if version == 'latest' else deltalake.DeltaTable(table, version=int(version))
con.register('dl', dt.to_pyarrow_dataset().to_table())
out['deltalake'] = con.execute(q.format('dl')).fetchall()
out['version'] = dt.version()
out['history'] = dt.history()
out['files'] = sorted(dt.file_uris())
print(json.dumps(out, default=str), flush=True)
# DuckDB's Delta extension and deltalake each keep native threads; tearing both down at exit
# sometimes aborts ("terminate called without an active exception") after the answer is out.
os._exit(0)
"#;

fn read(p: &TestProject, version: Option<u64>, twin: bool) -> Value {
    let v = version.map_or("latest".to_string(), |v| v.to_string());
    delta_py(
        READ,
        &[
            p.path().to_str().unwrap(),
            DELTA,
            if twin {
                "data/marts/customer_value"
            } else {
                ""
            },
            &v,
        ],
    )
}

fn rows(v: &Value, reader: &str) -> Vec<(String, i64, f64)> {
    v[reader]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_i64().unwrap(),
                f64_of(&r[2]),
            )
        })
        .collect()
}

/// Both Delta readers see the Parquet twin's rows.
fn assert_same_as_twin(v: &Value) -> Vec<(String, i64, f64)> {
    let twin = rows(v, "parquet");
    assert!(!twin.is_empty());
    assert_eq!(
        rows(v, "duckdb"),
        twin,
        "DuckDB delta_scan vs the Parquet output"
    );
    assert_eq!(
        rows(v, "deltalake"),
        twin,
        "deltalake vs the Parquet output"
    );
    twin
}

#[test]
fn the_delta_output_reads_like_its_parquet_twin_and_reruns_replace_partitions() {
    let p = TestProject::shipped();
    p.generate(800);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let first = read(&p, None, true);
    let once = assert_same_as_twin(&first);
    assert_eq!(once.len(), 1);
    // Same rows, partitioning and Parquet settings in the same store: the Delta output's data
    // files are copies of the Parquet output's (byte for byte), not a second encoding.
    assert_eq!(
        data_files(&p, DELTA),
        data_files(&p, "data/marts/customer_value")
    );
    let v1 = first["version"].as_u64().unwrap();
    // The commit says which run wrote it.
    let commit = &first["history"][0];
    assert_eq!(commit["operation"], "WRITE", "{commit}");
    assert_eq!(commit["clvflow.job"], "customer_value", "{commit}");
    assert_eq!(commit["clvflow.runDate"], RUN_DATE, "{commit}");
    assert!(
        commit["clvflow.runId"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{commit}"
    );

    // A re-run of the date replaces it (one copy), in one new version.
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let again = read(&p, None, true);
    assert_eq!(assert_same_as_twin(&again), once);
    assert_eq!(again["version"].as_u64().unwrap(), v1 + 1);

    // A second date adds its partition; the first stays.
    p.ok(&["run", "customer_value", "--date", OTHER_DATE]);
    let both = read(&p, None, true);
    let two = assert_same_as_twin(&both);
    assert_eq!(two.len(), 2);
    assert!(two.contains(&once[0]));

    // Time travel: the version before the second date has the first date only.
    let before = read(&p, Some(v1 + 1), false);
    assert_eq!(rows(&before, "deltalake"), once);

    // `clvflow files` lists exactly the current version's files.
    let listed = p.ok(&["files", "file://./data/delta/customer_value/"]);
    let mut listed: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| l.trim_start_matches("file://").to_string())
        .collect();
    listed.sort();
    let mut current: Vec<String> = both["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            f.as_str()
                .unwrap()
                .trim_start_matches("file://")
                .to_string()
        })
        .collect();
    current.sort();
    assert_eq!(listed, current);

    // Vacuum with no retention deletes the files the re-run replaced, nothing a reader needs.
    let on_disk = |p: &TestProject| -> Vec<String> {
        p.snapshot(DELTA)
            .into_iter()
            .map(|(f, _)| f)
            .filter(|f| f.ends_with(".parquet") && !f.starts_with("_delta_log"))
            .collect()
    };
    let before_vacuum = on_disk(&p);
    assert!(
        before_vacuum.len() > current.len(),
        "the replaced files are still there"
    );
    // Inside the table's retention (the output's `retention: 7d`) nothing goes: time travel to
    // every version still works.
    let kept = p.ok(&["vacuum", "file://./data/delta/customer_value/"]);
    assert_eq!(String::from_utf8_lossy(&kept.stdout).lines().count(), 0);
    assert!(
        stderr(&kept).contains("deleted 0 file(s)"),
        "{}",
        stderr(&kept)
    );
    assert_eq!(on_disk(&p), before_vacuum);
    let dry = p.ok(&[
        "vacuum",
        "file://./data/delta/customer_value/",
        "--retain",
        "0s",
        "--dry-run",
    ]);
    assert_eq!(on_disk(&p), before_vacuum, "a dry run deletes nothing");
    let would = String::from_utf8_lossy(&dry.stdout).lines().count();
    assert_eq!(would, before_vacuum.len() - current.len());
    p.ok(&[
        "vacuum",
        "file://./data/delta/customer_value/",
        "--retain",
        "0s",
    ]);
    assert_eq!(on_disk(&p).len(), current.len());
    assert_eq!(assert_same_as_twin(&read(&p, None, true)), two);

    // Another compression: the Delta output writes its own files, with the same rows.
    p.edit(
        "jobs/customer_value.yaml",
        "    compression: zstd(1)\n    retention: 7d",
        "    compression: snappy\n    retention: 7d",
    );
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    assert_eq!(assert_same_as_twin(&read(&p, None, true)), two);
    let twin: std::collections::HashMap<String, Vec<u8>> =
        data_files(&p, "data/marts/customer_value")
            .into_iter()
            .collect();
    let written: Vec<(String, Vec<u8>)> = data_files(&p, DELTA)
        .into_iter()
        .filter(|(f, _)| f.contains(&format!("run_date={RUN_DATE}")))
        .collect();
    assert!(!written.is_empty());
    for (f, bytes) in &written {
        // The same run names its files alike in both tables, so each has a twin to differ from.
        let theirs = twin
            .get(f)
            .unwrap_or_else(|| panic!("{f} has no file of the same name in the Parquet output"));
        assert_ne!(theirs, bytes, "{f}: a snappy file equals the zstd twin's");
    }
}

/// The current data files of a table (the Delta log's, or the Parquet output's): path below the
/// table and contents, sorted.
fn data_files(p: &TestProject, table: &str) -> Vec<(String, Vec<u8>)> {
    let listed = p.ok(&["files", &format!("file://./{table}/")]);
    let root = p.file(table);
    let mut files: Vec<(String, Vec<u8>)> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| {
            let path = std::path::PathBuf::from(l.trim_start_matches("file://"));
            let rel = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            (rel, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_delta_output_in_a_folder_that_is_not_a_delta_table_is_refused() {
    let p = TestProject::shipped();
    p.generate(300);
    p.write(
        &format!("{DELTA}/run_date=2026-01-01/old.parquet"),
        "not ours",
    );
    let out = p.run();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("holds files but no _delta_log/: it is not a Delta table"),
        "{err}"
    );
    assert!(err.contains("data/delta/customer_value"), "{err}");
    // Nothing of the run was committed anywhere.
    assert!(!p.file("data/marts/customer_value").exists());
}

/// A job reading the Delta output of customer_value (its latest version, or a pinned one).
fn reader_job(p: &TestProject, extra: &str, columns: &str) {
    p.write(
        "sql/delta_reader.sql",
        "SELECT CAST(run_date AS VARCHAR) AS d, COUNT(*) AS customers, ROUND(SUM(monetary), 2) AS revenue FROM customers GROUP BY 1\n",
    );
    p.write(
        "jobs/delta_reader.yaml",
        &format!(
            "inputs:
  customers:
    url: file://./data/delta/customer_value/
    format: delta{extra}
    columns: {{ {columns} }}
steps:
  - name: per_date
    sql: sql/delta_reader.sql
outputs:
  - from: per_date
    url: file://./data/marts/delta_reader/
"
        ),
    );
}

#[test]
fn a_job_reads_a_delta_table_at_its_latest_or_a_pinned_version() {
    let p = TestProject::shipped();
    p.generate(500);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    p.ok(&["run", "customer_value", "--date", OTHER_DATE]);
    let latest = read(&p, None, true);
    let want = rows(&latest, "parquet");
    let v = latest["version"].as_u64().unwrap();
    let cols = "customer_id: int64, monetary: float64, run_date: date";
    let got = |p: &TestProject| -> Vec<(String, i64, f64)> {
        duckdb(
            p.path(),
            "select d, customers, revenue from read_parquet('data/marts/delta_reader/*.parquet') order by d",
        )
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap(), f64_of(&r[2])))
        .collect()
    };
    reader_job(&p, "", cols);
    p.ok(&["validate", "delta_reader"]);
    p.ok(&["run", "delta_reader", "--date", RUN_DATE]);
    assert_eq!(got(&p), want);
    // The version before the second date: the first date only.
    reader_job(&p, &format!("\n    version: {}", v - 1), cols);
    p.ok(&["run", "delta_reader", "--date", RUN_DATE]);
    assert_eq!(
        got(&p),
        vec![want.iter().find(|r| r.0 == RUN_DATE).unwrap().clone()]
    );

    // `as_of` a millisecond after version v-1 was committed: the same version. deltalake goes by
    // the commit file's modification time (commitInfo.timestamp is taken before the file is
    // written, so it can be a few milliseconds earlier: a time between the two is version v-2).
    let commit_file = p.path().join(format!(
        "data/delta/customer_value/_delta_log/{:020}.json",
        v - 1
    ));
    let written: chrono::DateTime<chrono::Utc> = std::fs::metadata(&commit_file)
        .and_then(|m| m.modified())
        .unwrap()
        .into();
    let as_of = (written + chrono::Duration::milliseconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    reader_job(&p, &format!("\n    as_of: \"{as_of}\""), cols);
    p.ok(&["run", "delta_reader", "--date", RUN_DATE]);
    assert_eq!(
        got(&p),
        vec![want.iter().find(|r| r.0 == RUN_DATE).unwrap().clone()]
    );

    // A declared column the table lacks is named, with the table and its version.
    reader_job(&p, "", &format!("{cols}, lifetime_spend: float64"));
    let out = p.clvflow(&["run", "delta_reader", "--date", RUN_DATE]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("input `customers`"), "{err}");
    assert!(
        err.contains("missing column `lifetime_spend` (declared float64)"),
        "{err}"
    );
    assert!(err.contains(&format!("(version {v})")), "{err}");
}

#[test]
fn sigkill_at_random_points_of_a_delta_write_never_shows_a_mix() {
    let p = TestProject::shipped();
    p.generate(300);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let good = assert_same_as_twin(&read(&p, None, true));
    // How long a whole run takes here: kills are spread over it.
    let t = Instant::now();
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let whole = t.elapsed();
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    let points = [
        Some("after-staging"),
        Some("delta-files-in"),
        Some("delta-committed"),
        None,
    ];
    for i in 0..20 {
        let point = points[i % points.len()];
        // At a failpoint: up to 50 ms after it; else anywhere in the last 60 % of a run.
        let after = match point {
            Some(_) => Duration::from_millis(next() % 50),
            None => whole.mul_f64(0.4 + 0.6 * (next() % 1000) as f64 / 1000.0),
        };
        p.kill_run(point, after);
        // Both readers see a whole version: exactly one run's rows for the date.
        let seen = read(&p, None, false);
        let dl = rows(&seen, "deltalake");
        assert_eq!(dl, good, "kill {i} ({point:?}, {after:?}): deltalake");
        assert_eq!(
            rows(&seen, "duckdb"),
            good,
            "kill {i} ({point:?}, {after:?}): DuckDB"
        );
        // And the next run succeeds.
        if i % 4 == 3 {
            p.ok(&["run", "customer_value", "--date", RUN_DATE]);
        }
    }
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    assert_eq!(assert_same_as_twin(&read(&p, None, true)), good);
}

#[test]
fn two_writers_committing_one_delta_table_at_once_leave_one_copy() {
    let p = TestProject::shipped();
    p.generate(300);
    // A second writer: another project (its own state and leases; one project's validate
    // rejects two outputs of one table) whose job has the same steps, on the same exports, and
    // writes only the Delta table.
    let b = TestProject::shipped();
    let data = format!("file://{}/data", p.path().display());
    b.edit("config.yaml", "file://./data }", &format!("{data} }}"));
    let job = b
        .read("jobs/customer_value.yaml")
        .replace("file://./data", &data);
    let steps = &job[..job.find("\noutputs:").unwrap()];
    b.write(
        "jobs/customer_value.yaml",
        &format!(
            "{steps}\noutputs:\n  - from: customer_value\n    url: {data}/delta/customer_value/\n    format: delta\n    partition_by: [run_date, acquisition_channel]\n"
        ),
    );
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let good = assert_same_as_twin(&read(&p, None, true));
    let v0 = read(&p, None, false)["version"].as_u64().unwrap();
    // Both load the table, wait 3 s (so both build their commit on the same version), commit.
    let spawn = |p: &TestProject| {
        p.command(&["run", "customer_value", "--date", RUN_DATE])
            .env("CLVFLOW_FAILPOINT", "delta-files-in:delay")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (one, two) = (spawn(&p), spawn(&b));
    let (one, two) = (
        one.wait_with_output().unwrap(),
        two.wait_with_output().unwrap(),
    );
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();
    for out in [&one, &two] {
        assert!(
            out.status.success() || err(out).contains("other writers committed"),
            "{}",
            err(out)
        );
    }
    let after = read(&p, None, false);
    assert_eq!(rows(&after, "deltalake"), good, "one copy of the date");
    assert_eq!(rows(&after, "duckdb"), good, "one copy of the date");
    let committed = [&one, &two].iter().filter(|o| o.status.success()).count() as u64;
    assert_eq!(after["version"].as_u64().unwrap(), v0 + committed);
    let retried = [&one, &two]
        .iter()
        .any(|o| err(o).contains("another writer committed first"));
    assert!(
        retried || committed < 2,
        "the two commits did not race:\n{}\n{}",
        err(&one),
        err(&two)
    );
}

/// Per run date rows of the Delta table in `bucket` (deltalake, at `version` or the latest, over
/// the S3 server) and of its Parquet twin (pyarrow's S3 client); the Delta log's commit files.
const READ_S3: &str = r#"
import json, sys
import deltalake, duckdb, pyarrow.dataset as ds, pyarrow.fs as fs
from urllib.parse import urlparse
endpoint, bucket, version = sys.argv[1], sys.argv[2], sys.argv[3]
ep = urlparse(endpoint)
opts = {'AWS_ENDPOINT_URL': endpoint, 'AWS_ALLOW_HTTP': 'true', 'AWS_REGION': 'us-east-1',
        'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing'}
url = f's3://{bucket}/delta/customer_value'
dt = deltalake.DeltaTable(url, storage_options=opts) if version == 'latest' else deltalake.DeltaTable(url, storage_options=opts, version=int(version))
s3 = fs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme, region='us-east-1', access_key='testing', secret_key='testing')
con = duckdb.connect()
con.register('dl', dt.to_pyarrow_dataset().to_table())
con.register('twin', ds.dataset(f'{bucket}/marts/customer_value', filesystem=s3, format='parquet', partitioning='hive').to_table())
q = "select cast(run_date as varchar), count(*), round(sum(monetary), 2) from {} group by 1 order by 1"
log = [f.path for f in s3.get_file_info(fs.FileSelector(f'{bucket}/delta/customer_value/_delta_log')) if f.path.endswith('.json')]
print(json.dumps({'deltalake': con.execute(q.format('dl')).fetchall(), 'parquet': con.execute(q.format('twin')).fetchall(),
                  'version': dt.version(), 'history': dt.history(), 'commits': len(log)}, default=str), flush=True)
import os
os._exit(0)
"#;

#[test]
fn the_delta_output_on_s3_commits_by_conditional_put_and_reruns_replace() {
    let (p, bucket) = crate::s3::s3_project_via("delta", &crate::s3::endpoint());
    crate::s3::generate_in(&p, &bucket, "config.yaml", 600);
    let read = |version: &str| delta_py(READ_S3, &[&crate::s3::endpoint(), &bucket, version]);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let first = read("latest");
    assert_eq!(rows(&first, "deltalake"), rows(&first, "parquet"));
    let v1 = first["version"].as_u64().unwrap();
    assert_eq!(first["commits"].as_u64(), Some(v1 + 1), "versions 0..=v1");
    assert_eq!(first["history"][0]["clvflow.runDate"], RUN_DATE);

    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let again = read("latest");
    assert_eq!(
        rows(&again, "deltalake"),
        rows(&first, "deltalake"),
        "a rerun replaces"
    );
    assert_eq!(again["version"].as_u64(), Some(v1 + 1));

    p.ok(&["run", "customer_value", "--date", OTHER_DATE]);
    let both = read("latest");
    assert_eq!(rows(&both, "deltalake"), rows(&both, "parquet"));
    assert_eq!(rows(&both, "deltalake").len(), 2);
    // Time travel to the version before the second date.
    assert_eq!(
        rows(&read(&(v1 + 1).to_string()), "deltalake"),
        rows(&first, "deltalake")
    );
    // Vacuum through the same store: the replaced files go, the readers see the same rows.
    p.ok(&[
        "vacuum",
        &format!("s3://{bucket}/delta/customer_value/"),
        "--retain",
        "0s",
    ]);
    assert_eq!(rows(&read("latest"), "deltalake"), rows(&both, "deltalake"));
}

#[test]
fn a_checkpoint_is_written_every_checkpoint_interval_commits() {
    let p = TestProject::shipped();
    p.generate(300);
    p.edit(
        "jobs/customer_value.yaml",
        "retention: 7d",
        "retention: 7d\n    checkpoint_interval: 2",
    );
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let log = p.file(&format!("{DELTA}/_delta_log"));
    let checkpoints = || -> Vec<String> {
        let mut c: Vec<String> = std::fs::read_dir(&log)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".checkpoint"))
            .collect();
        c.sort();
        c
    };
    // A checkpoint after every second commit: versions 0 (the table's creation) and 1 (the run)
    // are two commits, so version 1 has one; versions 2 and 3 (two more runs) give the next.
    let name = |v: u64| format!("{v:020}.checkpoint.parquet");
    assert_eq!(checkpoints(), vec![name(1)]);
    p.ok(&["run", "customer_value", "--date", OTHER_DATE]);
    assert_eq!(checkpoints(), vec![name(1)]);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    assert_eq!(checkpoints(), vec![name(1), name(3)]);
    let last = std::fs::read_to_string(log.join("_last_checkpoint")).unwrap();
    assert!(last.contains("\"version\":3"), "{last}");
    // Readers start from the checkpoint and see both dates.
    assert_eq!(assert_same_as_twin(&read(&p, None, true)).len(), 2);
}
